//! How counters are named in Redis:
//! `{namespace}:ratelimit:{domain}:{<hash of the descriptor path>}:{unit}:{window start}`
//! (a sliding window's: `sliding.{unit}` or `sliding-tokens.{unit}`, apart from the fixed
//! window of the same unit).
//! The descriptor path carries the callers' values (API keys): Redis sees only its SHA-256,
//! the first 128 bits in hex, so no one who can read Redis can read a key.

use std::borrow::Cow;

use super::Fleet;
use crate::limiter::{Algorithm, CounterKey, Unit, Window};
use crate::rules::{OVERRIDE_SCOPE, Rule, RuleWindow};

impl Fleet {
    /// The key of a counter in one window:
    /// `{namespace}:ratelimit:{domain}:{<hash of the descriptor path>}:{unit}:{window start}`.
    /// The hashed path is the hash tag, so all windows of a counter share a cluster slot.
    pub fn counter_key(&self, domain: &str, path: &str, unit: Unit, window: Window) -> String {
        let mut key = String::new();
        self.write_counter_key(
            &mut key,
            domain,
            |out| out.push_str(path),
            ("", unit),
            window,
        );
        key
    }

    /// [`Fleet::counter_key`], appended to `out`, the path written by `path`.
    pub(super) fn write_counter_key(
        &self,
        out: &mut String,
        domain: &str,
        path: impl FnOnce(&mut String),
        (kind, unit): (&str, Unit),
        window: Window,
    ) {
        use std::fmt::Write;
        let mut clear = String::new();
        path(&mut clear);
        self.write_counter_prefix(out, domain, &clear);
        let _ = write!(out, "{kind}{unit}:{}", unit.window_start_ms(window) / 1000);
    }

    /// What every window's key of a counter starts with:
    /// `{namespace}:ratelimit:{domain}:{<hash of the path>}:`.
    pub(super) fn write_counter_prefix(&self, out: &mut String, domain: &str, path: &str) {
        out.push_str(&self.settings.namespace);
        out.push_str(":ratelimit:");
        out.push_str(domain);
        out.push_str(":{");
        write_path_hash(out, path);
        out.push_str("}:");
    }
}

/// The first 128 bits of the path's SHA-256, in hex: what Redis sees of a descriptor path.
fn write_path_hash(out: &mut String, path: &str) {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    for byte in &Sha256::digest(path.as_bytes())[..16] {
        let _ = write!(out, "{byte:02x}");
    }
}

pub(super) fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Appends a counter's Redis key in `window` to `out`, its descriptor path as
/// `api_key_k1.model_gpt-4o` (overrides: `override.k_v`). False for a counter whose rule is no
/// longer loaded.
/// The key of the same counter `offset_s` seconds of window start away from `key` (a
/// sliding window's previous or next window): only the window start, the key's last field,
/// changes.
pub(super) fn neighbour_key(key: &str, offset_s: i64) -> String {
    let (head, start) = key.rsplit_once(':').unwrap_or(("", key));
    let start: i64 = start.parse().unwrap_or(0);
    format!("{head}:{}", start.saturating_add(offset_s).max(0))
}

/// What tells a window's keys from the fixed window's of the same unit: a sliding window
/// counts one measure a counter, the fixed window both. A token bucket's counter counts in
/// windows of a second whatever its unit: its keys name the unit too
/// (`bucket.minute.second:<start>`).
pub(super) fn key_kind(window: &RuleWindow) -> Cow<'static, str> {
    match (window.algorithm, window.tokens.is_some()) {
        (Algorithm::SlidingWindow, false) => "sliding.".into(),
        (Algorithm::SlidingWindow, true) => "sliding-tokens.".into(),
        (Algorithm::TokenBucket { .. }, tokens) if window.leased => {
            let measure = if tokens { "bucket-tokens" } else { "bucket" };
            format!("{measure}.{}.", window.unit).into()
        }
        // A bucket settled in the store call by call: one key of its own.
        (Algorithm::TokenBucket { .. }, tokens) => {
            if tokens {
                "gcra-tokens.".into()
            } else {
                "gcra.".into()
            }
        }
        // Holds in flight count in their own keys, apart from a window's requests.
        (Algorithm::InFlight, _) => "holds.".into(),
        _ => "".into(),
    }
}

/// The key of the fleet's token bucket whose window key is `key`: one for all its windows,
/// beside them (the window start, the key's last field, replaced).
pub(super) fn bucket_key(key: &str) -> String {
    let (head, _) = key.rsplit_once(':').unwrap_or(("", key));
    format!("{head}:bucket")
}

/// When a counter's key in `window` expires: the window's end, plus a margin so a late push
/// still finds it.
pub(super) fn expiry_ms(unit: Unit, window: Window) -> u64 {
    unit.window_end_ms(window) + super::EXPIRY_MARGIN.as_millis() as u64
}

pub(super) fn write_key_of(
    fleet: &Fleet,
    out: &mut String,
    key: &CounterKey,
    rule: Option<&Rule>,
    window: Window,
) -> bool {
    let (unit, mut parts) = (key.unit(), key.parts());
    if key.scope() & OVERRIDE_SCOPE != 0 {
        let Some(domain) = parts.next() else {
            return false;
        };
        let path = |out: &mut String| {
            out.push_str("override");
            while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                out.push('.');
                out.push_str(k);
                out.push('_');
                out.push_str(v);
            }
        };
        fleet.write_counter_key(out, domain, path, ("", unit), window);
        return true;
    }
    let Some(rule) = rule else {
        return false;
    };
    // A sliding window counts one measure a counter: its keys are told apart from the fixed
    // window's of the same unit (which hold requests and tokens together), after the path's
    // hash, so a reset by path still finds them.
    let kind = rule
        .window_of(key.scope(), unit)
        .map_or("".into(), key_kind);
    let path = |out: &mut String| rule.write_counter_path(out, parts);
    fleet.write_counter_key(out, &rule.domain, path, (&kind, unit), window);
    true
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::limiter::CounterRef;
    use crate::rules::{SourceFile, compile_file, override_scope};
    use crate::sync::{FailurePolicy, StoreAddress, SyncSettings};

    fn fleet() -> Fleet {
        Fleet::new(SyncSettings {
            address: StoreAddress {
                urls: vec!["redis://127.0.0.1:1".into()],
                cluster: false,
                sentinel_master: None,
                tls: Default::default(),
                timeout: Duration::from_millis(100),
            },
            namespace: "prod".into(),
            interval: Duration::from_secs(1),
            quiet_refresh_rounds: 8,
            policy: FailurePolicy::default(),
        })
        .unwrap()
    }

    fn key_of(key: &CounterKey, rule: Option<&Rule>) -> Option<String> {
        let mut out = String::from("left alone|");
        let window = key.unit().window_at(1_767_225_600_000);
        write_key_of(&fleet(), &mut out, key, rule, window).then_some(out)
    }

    #[test]
    fn counter_keys_name_domain_path_unit_and_window_start() {
        let domain = compile_file(&SourceFile {
            path: "llm.yaml".into(),
            text: "domain: llm\ndescriptors:\n  - key: api_key\n    descriptors:\n      - key: model\n        rate_limit: { unit: minute, requests_per_unit: 5 }\n".into(),
        })
        .unwrap();
        let rule = &domain.rules[0];
        let key = CounterRef {
            scope: rule.id,
            unit: Unit::Minute,
            parts: &["k1", "gpt-4o"],
        }
        .to_key();
        let hashed = |path: &str| {
            let mut out = String::new();
            write_path_hash(&mut out, path);
            out
        };
        // The hash is SHA-256's, cut to 128 bits.
        assert_eq!(hashed("abc"), "ba7816bf8f01cfea414140de5dae2223");
        assert_eq!(
            key_of(&key, Some(rule)),
            Some(format!(
                "left alone|prod:ratelimit:llm:{{{}}}:minute:1767225600",
                hashed("api_key_k1.model_gpt-4o")
            ))
        );
        // A rule no longer loaded: no key, nothing written.
        assert_eq!(key_of(&key, None), None);
        let overridden = CounterRef {
            scope: override_scope("llm", ["api_key"]),
            unit: Unit::Hour,
            parts: &["llm", "api_key", "k1"],
        }
        .to_key();
        assert_eq!(
            key_of(&overridden, None),
            Some(format!(
                "left alone|prod:ratelimit:llm:{{{}}}:hour:1767225600",
                hashed("override.api_key_k1")
            ))
        );
        assert_eq!(
            fleet().counter_key("llm", "api_key_k1", Unit::Second, Window(1_767_225_600)),
            format!(
                "prod:ratelimit:llm:{{{}}}:second:1767225600",
                hashed("api_key_k1")
            )
        );
    }

    #[test]
    fn a_sliding_windows_keys_are_its_own_and_its_neighbours_are_one_window_apart() {
        let domain = crate::rules::compile_file_for(
            &SourceFile {
                path: "llm.yaml".into(),
                text: "domain: llm\ndescriptors:\n  - key: api_key\n    limits:\n      - { unit: minute, requests: 5 }\n      - { unit: minute, tokens: 900, algorithm: sliding_window }\n".into(),
            },
            true,
        )
        .unwrap();
        let rule = &domain.rules[0];
        let key = |scope| {
            CounterRef {
                scope,
                unit: Unit::Minute,
                parts: &["k1"],
            }
            .to_key()
        };
        let scopes: Vec<u64> = rule
            .windows()
            .iter()
            .map(|w| w.counter_scope(rule.id))
            .collect();
        let hash = {
            let mut out = String::new();
            write_path_hash(&mut out, "api_key_k1");
            out
        };
        let fixed = key_of(&key(scopes[0]), Some(rule)).unwrap();
        let sliding = key_of(&key(scopes[1]), Some(rule)).unwrap();
        assert_eq!(
            fixed,
            format!("left alone|prod:ratelimit:llm:{{{hash}}}:minute:1767225600")
        );
        assert_eq!(
            sliding,
            format!("left alone|prod:ratelimit:llm:{{{hash}}}:sliding-tokens.minute:1767225600")
        );
        // The previous and next windows' keys, as the lease script reads them.
        let sliding = sliding.trim_start_matches("left alone|");
        let mut previous = String::new();
        write_key_of(
            &fleet(),
            &mut previous,
            &key(scopes[1]),
            Some(rule),
            Window(1_767_225_600 / 60 - 1),
        );
        assert_eq!(neighbour_key(sliding, -60), previous);
        assert!(neighbour_key(sliding, 60).ends_with("sliding-tokens.minute:1767225660"));
    }
}
