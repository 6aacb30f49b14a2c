//! The limits of one descriptor: `rate_limit` and `limits` read into a [`Policy`], each
//! window holding at most one requests-like and one tokens limit.

use std::collections::HashMap;

use super::compile::Compiler;
use super::locate::YamlPath;
use super::raw::{RawDescriptor, RawLimit};
use super::{Limit, Measure, Policy, RuleWindow};
use crate::limiter::{Algorithm, Calendar, Period, Unit, Zone};

/// How long a concurrency hold lives when its release never comes, unless `hold_ttl` says.
pub const DEFAULT_HOLD_TTL_SECONDS: u64 = 300;

/// One limit as written: a limit, or `unlimited: true`.
enum Written {
    Unlimited,
    Limited(Limit),
}

impl Compiler<'_> {
    /// The descriptor's limits, `None` when it sets none (it only leads to nested descriptors).
    pub(super) fn policy(&mut self, raw: &RawDescriptor, at: &YamlPath) -> Option<Policy> {
        let written: Vec<(YamlPath, &RawLimit)> = raw
            .rate_limit
            .iter()
            .map(|l| (at.field("rate_limit"), l))
            .chain(
                raw.limits
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (at.field("limits").index(i), l)),
            )
            .collect();
        if written.is_empty() {
            return None;
        }
        if let Some((path, _)) = written.iter().find(|(_, l)| l.unlimited)
            && written.len() > 1
        {
            self.error(
                path,
                "an unlimited descriptor cannot have other limits".into(),
            );
        }
        let settled_in_store =
            raw.consistency == Some(super::Consistency::Strict) || raw.reserve.is_some();
        let mut windows: Vec<RuleWindow> = Vec::new();
        let mut unlimited = false;
        let mut slot_paths: HashMap<(Unit, Measure), YamlPath> = HashMap::new();
        for (path, raw_limit) in &written {
            let limit = match self.limit(raw_limit, path) {
                None => continue,
                Some(Written::Unlimited) => {
                    unlimited = true;
                    continue;
                }
                Some(Written::Limited(limit)) => limit,
            };
            // Requests-like limits share a slot; tokens and concurrency have their own.
            let slot = match limit.measure {
                Measure::Hits => (limit.unit, Measure::Requests),
                measure => (limit.unit, measure),
            };
            if let Some(first) = slot_paths.get(&slot) {
                let line = self.line_of(first);
                let what = match slot.1 {
                    Measure::Tokens => format!("tokens limit per {}", limit.unit),
                    Measure::Concurrency => format!("concurrency limit of hold_ttl {}", limit.unit),
                    _ => format!("requests limit per {}", limit.unit),
                };
                self.error(
                    path,
                    format!("a second {what} on this descriptor (the first is at line {line})"),
                );
                continue;
            }
            slot_paths.insert(slot, path.clone());
            // Fixed windows of one unit share a counter; the other algorithms count one
            // measure a counter.
            // A tokens budget above 32 bits has a (wide) counter of its own.
            let shared = |w: &&mut RuleWindow| {
                w.unit == limit.unit
                    && w.algorithm == limit.algorithm
                    && limit.algorithm.is_fixed()
                    && !limit.is_wide()
                    && !w.tokens.as_ref().is_some_and(Limit::is_wide)
            };
            let window = match windows.iter_mut().find(shared) {
                Some(window) => window,
                None => {
                    windows.push(RuleWindow {
                        unit: limit.unit,
                        requests: None,
                        tokens: None,
                        algorithm: limit.algorithm,
                        // Holds, strict rules and reserves are settled in the store call
                        // by call, not leased: a replica's own counter (while the store is
                        // away) keeps the algorithm's own word.
                        leased: self.fleet_store
                            && limit.algorithm != Algorithm::InFlight
                            && !settled_in_store,
                    });
                    windows.last_mut().expect("just pushed")
                }
            };
            if limit.measure.is_tokens() {
                window.tokens = Some(limit);
            } else {
                window.requests = Some(limit);
            }
        }
        if unlimited {
            return Some(Policy::Unlimited);
        }
        windows.sort_by_key(|w| w.unit);
        // A tokens budget above 32 bits is settled in the store call by call, with its rule's
        // other windows: none of them is leased.
        if windows.iter().any(RuleWindow::is_wide) {
            for w in &mut windows {
                w.leased = false;
            }
        }
        Some(Policy::Limited(windows.into_boxed_slice()))
    }

    /// One limit; `None` when it is wrong (its errors recorded).
    fn limit(&mut self, raw: &RawLimit, at: &YamlPath) -> Option<Written> {
        let mut ok = true;
        if let Some(name) = &raw.name {
            if name.trim().is_empty() {
                self.error(&at.field("name"), "name must not be empty".into());
                ok = false;
            } else {
                self.names.insert(name.clone());
            }
        }
        for (i, replace) in raw.replaces.iter().enumerate() {
            let path = at.field("replaces").index(i).field("name");
            if replace.name.trim().is_empty() {
                self.error(&path, "name must not be empty".into());
                ok = false;
            } else if raw.name.as_ref() == Some(&replace.name) {
                // As envoyproxy/ratelimit: a limit replacing itself would never be evaluated.
                self.error(
                    &path,
                    format!("the limit `{}` must not replace itself", replace.name),
                );
                ok = false;
            } else {
                self.replaced.push((path, replace.name.clone()));
            }
        }
        if raw.tokens.is_some_and(|t| t > u64::from(u32::MAX)) && !self.wide_fits(raw, at) {
            return None;
        }
        let amounts: Vec<(Measure, u64)> = [
            (Measure::Hits, raw.requests_per_unit.map(u64::from)),
            (Measure::Requests, raw.requests.map(u64::from)),
            (Measure::Tokens, raw.tokens),
            (Measure::Concurrency, raw.concurrency.map(u64::from)),
        ]
        .into_iter()
        .filter_map(|(m, n)| n.map(|n| (m, n)))
        .collect();

        if raw.unlimited {
            if raw.algorithm.is_some() || raw.burst.is_some() {
                let field = if raw.algorithm.is_some() {
                    "algorithm"
                } else {
                    "burst"
                };
                self.error(
                    &at.field(field),
                    format!("an unlimited limit must not set {field}"),
                );
                ok = false;
            }
            let length = [
                ("unit", raw.unit.is_some()),
                ("window", raw.window.is_some()),
                ("period", raw.period.is_some()),
            ]
            .into_iter()
            .find(|(_, set)| *set);
            if let Some((field, _)) = length {
                self.error(
                    &at.field(field),
                    format!("an unlimited limit must not set a {field}"),
                );
                ok = false;
            }
            if let Some((measure, _)) = amounts.first() {
                self.error(
                    &at.field(measure.field()),
                    format!("an unlimited limit must not set {}", measure.field()),
                );
                ok = false;
            }
            return ok.then_some(Written::Unlimited);
        }
        if raw.concurrency.is_some() {
            return self.in_flight(raw, &amounts, at).filter(|_| ok);
        }
        if raw.hold_ttl.is_some() {
            self.error(
                &at.field("hold_ttl"),
                "hold_ttl is a concurrency limit's: set `concurrency: N` with it".into(),
            );
            ok = false;
        }
        if raw.timezone.is_some() && raw.period.is_none() {
            self.error(
                &at.field("timezone"),
                "a timezone is a calendar period's: set `period: calendar_day`, `calendar_week` \
                 or `calendar_month` with it"
                    .into(),
            );
            ok = false;
        }
        let unit = match (&raw.unit, &raw.window, &raw.period) {
            (None, None, None) => {
                self.error(
                    at,
                    "missing `unit` (second, minute, hour, day, week, month or year), `window` \
                     (a length such as 90s, 5m or 2h) or `period` (calendar_day, calendar_week \
                     or calendar_month)"
                        .into(),
                );
                None
            }
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
                let second = if raw.unit.is_some() && raw.window.is_some() {
                    "window"
                } else {
                    "period"
                };
                self.error(
                    &at.field(second),
                    "set one of `unit`, `window` and `period`".into(),
                );
                None
            }
            (None, None, Some(text)) => self.period(text, raw.timezone.as_deref(), at),
            (None, Some(text), None) => self.window(text, &at.field("window")),
            (Some(text), None, None) => {
                let unit = Unit::parse(text.trim());
                if unit.is_none() {
                    self.error(
                        &at.field("unit"),
                        format!(
                            "unknown unit `{text}` (expected second, minute, hour, day, week, month or year)"
                        ),
                    );
                }
                unit
            }
        };
        let amount = match amounts.as_slice() {
            [one] => Some(*one),
            [] => {
                self.error(
                    at,
                    "missing the limit: set requests_per_unit, requests, tokens or concurrency, \
                     or unlimited: true"
                        .into(),
                );
                None
            }
            [_, (second, _), ..] => {
                self.error(
                    &at.field(second.field()),
                    "set only one of requests_per_unit, requests, tokens and concurrency per \
                     limit; use `limits:` for several"
                        .into(),
                );
                None
            }
        };
        // A bucket's burst defaults to the limit; a wide limit is never a bucket (wide_fits).
        let written_limit = amount.map_or(0, |(_, n)| crate::limiter::saturating_u32(n));
        let algorithm = self.algorithm(raw, written_limit, at);
        let (unit, (measure, per_unit), algorithm) = (unit?, amount?, algorithm?);
        if let Algorithm::TokenBucket { burst } = algorithm
            && self.fleet_store
            && !store_counts_bucket(burst, unit)
        {
            let field = if raw.burst.is_some() {
                "burst"
            } else {
                "algorithm"
            };
            self.error(
                &at.field(field),
                format!(
                    "a token bucket kept fleet-wide holds burst x its unit's length in seconds \
                     under 2^53 (the store's exact integers): {burst} per {unit} is more; keep \
                     a shorter unit or a smaller burst"
                ),
            );
            return None;
        }
        ok.then(|| {
            Written::Limited(Limit {
                name: raw.name.as_deref().map(Into::into),
                unit,
                per_unit,
                measure,
                replaces: raw
                    .replaces
                    .iter()
                    .map(|r| r.name.as_str().into())
                    .collect(),
                algorithm,
            })
        })
    }

    /// A `concurrency` limit: holds in flight, each living `hold_ttl` at most (with no
    /// release) and from then on until the next window of that length begins. A window, an
    /// algorithm or a second amount does not apply. `None` when it is wrong (errors recorded).
    fn in_flight(
        &mut self,
        raw: &RawLimit,
        amounts: &[(Measure, u64)],
        at: &YamlPath,
    ) -> Option<Written> {
        let mut ok = true;
        if let Some((other, _)) = amounts.iter().find(|(m, _)| *m != Measure::Concurrency) {
            self.error(
                &at.field(other.field()),
                "set only one of requests_per_unit, requests, tokens and concurrency per limit; \
                 use `limits:` for several"
                    .into(),
            );
            ok = false;
        }
        let not_here = [
            ("unit", raw.unit.is_some()),
            ("window", raw.window.is_some()),
            ("period", raw.period.is_some()),
            ("timezone", raw.timezone.is_some()),
            ("algorithm", raw.algorithm.is_some()),
            ("burst", raw.burst.is_some()),
        ];
        for (field, _) in not_here.iter().filter(|(_, set)| *set) {
            self.error(
                &at.field(field),
                format!(
                    "a concurrency limit counts streams in flight, not calls over time: \
                     `{field}` does not apply (`hold_ttl` sets how long a hold lives if its \
                     release never comes)"
                ),
            );
            ok = false;
        }
        let hold_ttl = match &raw.hold_ttl {
            Some(text) => self.window(text, &at.field("hold_ttl")),
            None => Unit::of_seconds(DEFAULT_HOLD_TTL_SECONDS),
        };
        let (hold_ttl, per_unit) = (hold_ttl?, raw.concurrency?);
        ok.then(|| {
            Written::Limited(Limit {
                name: raw.name.as_deref().map(Into::into),
                unit: hold_ttl,
                per_unit: per_unit.into(),
                measure: Measure::Concurrency,
                replaces: raw
                    .replaces
                    .iter()
                    .map(|r| r.name.as_str().into())
                    .collect(),
                algorithm: Algorithm::InFlight,
            })
        })
    }

    /// A calendar period in a time zone (UTC by default).
    fn period(&mut self, text: &str, timezone: Option<&str>, at: &YamlPath) -> Option<Unit> {
        let Some(period) = Period::parse(text.trim()) else {
            self.error(
                &at.field("period"),
                format!(
                    "unknown period `{text}` (expected calendar_day, calendar_week or calendar_month)"
                ),
            );
            return None;
        };
        let name = timezone.map_or("UTC", str::trim);
        let Some(zone) = Zone::named(name) else {
            self.error(
                &at.field("timezone"),
                format!("unknown time zone `{name}` (an IANA name, e.g. Europe/Paris or UTC)"),
            );
            return None;
        };
        Some(Unit::Calendar(Calendar { period, zone }))
    }

    /// A window of any length: whole seconds, from one second to `u32::MAX` seconds.
    fn window(&mut self, text: &str, at: &YamlPath) -> Option<Unit> {
        let length = match humantime::parse_duration(text.trim()) {
            Ok(length) => length,
            Err(e) => {
                self.error(
                    at,
                    format!("`{text}` is not a length of time ({e}); write e.g. 90s, 5m or 2h"),
                );
                return None;
            }
        };
        let unit = (length.subsec_nanos() == 0)
            .then(|| Unit::of_seconds(length.as_secs()))
            .flatten();
        if unit.is_none() {
            self.error(
                at,
                format!(
                    "a window is a whole number of seconds, from 1s to {}s: `{text}` is not",
                    u32::MAX
                ),
            );
        }
        unit
    }

    /// Whether a tokens limit above `u32::MAX` a window can be counted as written: in fixed
    /// windows (the other algorithms keep 32 bits). With a fleet store its rule is settled in
    /// the store call by call (a store's leases are 32-bit). Records the error when not.
    fn wide_fits(&mut self, raw: &RawLimit, at: &YamlPath) -> bool {
        let algorithm = raw.algorithm.as_deref().map(str::trim);
        let why = if algorithm.is_some_and(|a| a != "fixed_window") {
            "counts in fixed windows only (the other algorithms keep 32 bits): drop `algorithm`, \
             or keep the limit within that"
        } else {
            return true;
        };
        self.error(
            &at.field("tokens"),
            format!("a tokens limit above {} a window {why}", u32::MAX),
        );
        false
    }

    /// How a limit counts: `algorithm` and, for a token bucket, `burst` (the limit written,
    /// `per_unit`, by default). `None` when either is wrong (its errors recorded).
    fn algorithm(&mut self, raw: &RawLimit, per_unit: u32, at: &YamlPath) -> Option<Algorithm> {
        let algorithm = match raw.algorithm.as_deref().map(str::trim) {
            None | Some("fixed_window") => Algorithm::FixedWindow,
            Some("sliding_window") => Algorithm::SlidingWindow,
            Some("token_bucket") => Algorithm::TokenBucket {
                burst: raw.burst.unwrap_or(per_unit),
            },
            Some(other) => {
                self.error(
                    &at.field("algorithm"),
                    format!(
                        "unknown algorithm `{other}` (expected fixed_window, sliding_window or token_bucket)"
                    ),
                );
                return None;
            }
        };
        match (algorithm, raw.burst) {
            (Algorithm::TokenBucket { .. }, Some(0)) => {
                self.error(&at.field("burst"), "burst must be at least 1".into());
                return None;
            }
            (Algorithm::TokenBucket { .. }, _) | (_, None) => {}
            (_, Some(_)) => {
                self.error(
                    &at.field("burst"),
                    "burst is a token bucket's size: set `algorithm: token_bucket` with it".into(),
                );
                return None;
            }
        }
        if !algorithm.is_fixed() && raw.period.is_some() {
            self.error(
                &at.field("algorithm"),
                format!(
                    "a calendar period counts in fixed windows: {} needs `unit` or `window`",
                    algorithm.name()
                ),
            );
            return None;
        }
        Some(algorithm)
    }
}

/// Whether the store can keep a token bucket of `burst` per `unit` exactly: its script counts
/// the bucket's fill in doubles, in milliseconds or, for long units, seconds
/// ([`bucket_tick_ms`]), so the fill of a full bucket must stay under 2^53.
fn store_counts_bucket(burst: u32, unit: Unit) -> bool {
    u128::from(burst) * u128::from(unit.seconds()) < 1 << 53
}

/// The tick the store counts a token bucket's fill in, for a unit of `unit_ms`: a millisecond
/// while a full bucket's fill in them stays under 2^53, else a second.
pub fn bucket_tick_ms(burst: u32, unit_ms: u64) -> u64 {
    if u128::from(burst) * u128::from(unit_ms) < 1 << 53 {
        1
    } else {
        1_000
    }
}
