//! Fixed time windows: the units a limit is written in and where their windows start and end.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

/// The unit of a limit. Windows are aligned to multiples of the unit since the Unix epoch, as in
/// envoyproxy/ratelimit, so every replica agrees on where a window starts. Units compare by
/// their length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// 1 second.
    Second,
    /// 60 seconds.
    Minute,
    /// 3,600 seconds.
    Hour,
    /// 86,400 seconds.
    Day,
    /// 7 days.
    Week,
    /// 30 days.
    Month,
    /// 365 days.
    Year,
    /// Any other whole number of seconds (a rule's `window: 90s`). Never the length of a named
    /// unit: [`Unit::of_seconds`] gives those their name.
    Span(NonZeroU32),
    /// A calendar day, week (from Monday) or month in a time zone (a rule's `period:`): a
    /// monthly budget that resets on the 1st at midnight there, whatever the month's length.
    Calendar(Calendar),
}

/// A calendar period in a time zone. Four bytes, so a unit stays eight and a counter's key
/// no larger than with fixed units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Calendar {
    pub period: Period,
    pub zone: ZoneId,
}

/// The calendar periods a limit may count in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    Day,
    /// Monday to Sunday.
    Week,
    Month,
}

impl Period {
    /// Its name, as rule files write it.
    pub const fn name(self) -> &'static str {
        match self {
            Period::Day => "calendar_day",
            Period::Week => "calendar_week",
            Period::Month => "calendar_month",
        }
    }

    /// As rule files write it.
    pub fn parse(text: &str) -> Option<Period> {
        [Period::Day, Period::Week, Period::Month]
            .into_iter()
            .find(|p| p.name() == text)
    }
}

/// An IANA time zone, loaded once per name for the life of the process.
#[derive(Debug)]
pub struct Zone {
    name: Box<str>,
    tz: jiff::tz::TimeZone,
}

/// More than the zone database's names (about 600).
const MOST_ZONES: usize = 1024;

/// The zones loaded, by [`ZoneId`]: written once each, read with no lock.
static ZONES: [std::sync::OnceLock<Zone>; MOST_ZONES] =
    [const { std::sync::OnceLock::new() }; MOST_ZONES];

/// A zone loaded by [`Zone::named`]: its place in the process's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ZoneId(u16);

impl ZoneId {
    /// The zone.
    pub fn get(self) -> &'static Zone {
        ZONES[usize::from(self.0)]
            .get()
            .expect("a ZoneId is made only once its zone is loaded")
    }
}

impl Zone {
    /// The zone of an IANA name (`Europe/Paris`, `UTC`), from the database bundled in the
    /// binary; `None` for an unknown name.
    pub fn named(name: &str) -> Option<ZoneId> {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock};
        static IDS: OnceLock<Mutex<HashMap<String, ZoneId>>> = OnceLock::new();
        let mut ids = IDS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(id) = ids.get(name) {
            return Some(*id);
        }
        let tz = jiff::tz::TimeZone::get(name).ok()?;
        let next = ids.len();
        if next >= MOST_ZONES {
            return None;
        }
        let id = ZoneId(next as u16);
        let _ = ZONES[next].set(Zone {
            name: name.into(),
            tz,
        });
        ids.insert(name.to_string(), id);
        Some(id)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Days from 1970-01-01 to a civil date (proleptic Gregorian).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

impl Calendar {
    /// Time from `now_ms` until the period that contains it ends.
    #[cold]
    fn until_reset(self, now_ms: u64) -> Duration {
        let end = self.start_ms(self.window_at(now_ms) + 1);
        Duration::from_millis(end.saturating_sub(now_ms).max(1))
    }

    /// The number of the period containing `now_ms`: days, weeks (from Monday 1969-12-29) or
    /// months since the epoch, in the zone's own calendar.
    #[cold]
    fn window_at(self, now_ms: u64) -> u64 {
        let Ok(at) = jiff::Timestamp::from_millisecond(now_ms.min(i64::MAX as u64) as i64) else {
            return 0;
        };
        let date = self.zone.get().tz.to_datetime(at).date();
        let (y, m, d) = (
            i64::from(date.year()),
            i64::from(date.month()),
            i64::from(date.day()),
        );
        let index = match self.period {
            Period::Day => days_from_civil(y, m, d),
            Period::Week => (days_from_civil(y, m, d) + 3).div_euclid(7),
            Period::Month => (y - 1970) * 12 + (m - 1),
        };
        index.max(0) as u64
    }

    /// When period `window` starts: its first day's midnight in the zone (the first instant
    /// of that day where a clock change skips midnight).
    fn start_ms(self, window: u64) -> u64 {
        let window = window as i64;
        let (y, m, d) = match self.period {
            Period::Day => civil_from_days(window),
            Period::Week => civil_from_days(window * 7 - 3),
            Period::Month => (1970 + window.div_euclid(12), window.rem_euclid(12) + 1, 1),
        };
        let start = jiff::civil::date(y.clamp(1970, 9999) as i16, m as i8, d as i8).at(0, 0, 0, 0);
        self.zone
            .get()
            .tz
            .to_ambiguous_timestamp(start)
            .compatible()
            .map_or(0, |t| t.as_millisecond().max(0) as u64)
    }
}

impl Ord for Unit {
    fn cmp(&self, other: &Self) -> Ordering {
        // By length; a calendar period after the unit of its nominal length, then by zone.
        let key = |u: &Unit| match u {
            Unit::Calendar(c) => (u.seconds(), 1, c.period, c.zone.get().name()),
            _ => (u.seconds(), 0, Period::Day, ""),
        };
        key(self).cmp(&key(other))
    }
}

impl PartialOrd for Unit {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Unit {
    /// Every unit, shortest first.
    pub const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];

    /// Its length in seconds.
    pub const fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
            Unit::Span(seconds) => seconds.get() as u64,
            // Nominal: what orders units and sizes the sync's rates; windows are the calendar's.
            Unit::Calendar(c) => match c.period {
                Period::Day => 86_400,
                Period::Week => 7 * 86_400,
                Period::Month => 30 * 86_400,
            },
        }
    }

    /// When window `window` starts, in ms since the epoch.
    pub fn window_start_ms(self, window: Window) -> u64 {
        match self {
            Unit::Calendar(c) => c.start_ms(u64::from(window.0)),
            _ => u64::from(window.0) * self.millis(),
        }
    }

    /// When window `window` ends (the next one starts), in ms since the epoch.
    pub fn window_end_ms(self, window: Window) -> u64 {
        match self {
            Unit::Calendar(c) => c.start_ms(u64::from(window.0) + 1),
            _ => (u64::from(window.0) + 1) * self.millis(),
        }
    }

    /// Time from the start of the window that contains `now_ms` until `now_ms`, in ms.
    pub fn elapsed_ms(self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.window_start_ms(self.window_at(now_ms)))
    }

    /// The unit of `seconds`: a named unit when it is one's length, else a span (none for 0 or
    /// more than `u32::MAX` seconds).
    pub fn of_seconds(seconds: u64) -> Option<Unit> {
        if let Some(named) = Unit::ALL.into_iter().find(|u| u.seconds() == seconds) {
            return Some(named);
        }
        NonZeroU32::new(u32::try_from(seconds).ok()?).map(Unit::Span)
    }

    /// The named unit nearest this one's length (by ratio): what the Envoy API, which names
    /// only those, is told of a span.
    pub fn nearest_named(self) -> Unit {
        let seconds = self.seconds();
        let off = |u: &Unit| {
            let (a, b) = (u.seconds(), seconds);
            // max(a/b, b/a), compared exactly as a fraction (numerator, denominator).
            if a >= b { (a, b) } else { (b, a) }
        };
        Unit::ALL
            .into_iter()
            .min_by(|x, y| {
                let ((xn, xd), (yn, yd)) = (off(x), off(y));
                (u128::from(xn) * u128::from(yd)).cmp(&(u128::from(yn) * u128::from(xd)))
            })
            .expect("named units")
    }

    /// Its length in milliseconds.
    pub const fn millis(self) -> u64 {
        self.seconds() * 1000
    }

    /// Its name, as rule files and the API write it: a span as its seconds, `90s`.
    pub fn name(self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
            Unit::Span(seconds) => return Cow::Owned(format!("{seconds}s")),
            Unit::Calendar(c) => {
                return Cow::Owned(format!("{}@{}", c.period.name(), c.zone.get().name()));
            }
        })
    }

    /// Case-insensitive, as envoyproxy/ratelimit reads units.
    pub fn parse(text: &str) -> Option<Unit> {
        Unit::ALL
            .into_iter()
            .find(|u| u.name().eq_ignore_ascii_case(text))
    }

    /// The number of the window that contains `now_ms`. A u32 holds second windows until 2106.
    #[inline]
    pub fn window_at(self, now_ms: u64) -> Window {
        let index = match self {
            Unit::Calendar(c) => c.window_at(now_ms),
            _ => now_ms / self.millis(),
        };
        Window(index.min(u64::from(Window::LAST.0)) as u32)
    }

    /// Time from `now_ms` until the window that contains it ends.
    #[inline]
    pub fn until_reset(self, now_ms: u64) -> Duration {
        if let Unit::Calendar(c) = self {
            return c.until_reset(now_ms);
        }
        let unit = self.millis();
        Duration::from_millis(unit - now_ms % unit)
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// The index of a window of some unit: `unix time / unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Window(pub u32);

impl Window {
    /// The largest real window; `u32::MAX` is kept free to mark retired counters.
    pub const LAST: Window = Window(u32::MAX - 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_parse_case_insensitively() {
        assert_eq!(Unit::parse("MINUTE"), Some(Unit::Minute));
        assert_eq!(Unit::parse("Day"), Some(Unit::Day));
        assert_eq!(Unit::parse("minutes"), None);
        assert_eq!(Unit::parse(""), None);
    }

    #[test]
    fn windows_align_to_the_epoch() {
        let now = 1_700_000_123_456; // ms
        assert_eq!(Unit::Minute.window_at(now), Window((now / 60_000) as u32));
        assert_eq!(
            Unit::Minute.until_reset(now),
            Duration::from_millis(60_000 - now % 60_000)
        );
        // At the exact start of a window, the whole window remains.
        assert_eq!(Unit::Second.until_reset(5_000), Duration::from_secs(1));
        assert_eq!(Unit::Month.seconds(), 30 * 86_400);
        assert_eq!(Unit::Year.seconds(), 365 * 86_400);
    }

    /// Milliseconds since the epoch of a UTC date and time.
    fn utc(y: i64, m: i64, d: i64, h: u64) -> u64 {
        days_from_civil(y, m, d) as u64 * 86_400_000 + h * 3_600_000
    }

    #[test]
    fn civil_days_round_trip() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for days in [0, 59, 365, 11_016, 11_017, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn a_calendar_month_runs_from_the_first_at_midnight_in_its_zone() {
        let paris = Unit::Calendar(Calendar {
            period: Period::Month,
            zone: Zone::named("Europe/Paris").unwrap(),
        });
        let in_utc = Unit::Calendar(Calendar {
            period: Period::Month,
            zone: Zone::named("UTC").unwrap(),
        });
        assert_ne!(paris, in_utc);
        assert_eq!(paris.name(), "calendar_month@Europe/Paris");
        // 2026-02-28 23:30 UTC is already March 1st, 00:30, in Paris (UTC+1 in winter).
        let now = utc(2026, 2, 28, 23) + 30 * 60_000;
        let (p, u) = (paris.window_at(now), in_utc.window_at(now));
        assert_eq!(u64::from(u.0), (2026 - 1970) * 12 + 1, "February in UTC");
        assert_eq!(p.0, u.0 + 1, "March in Paris");
        assert_eq!(paris.window_start_ms(p), utc(2026, 2, 28, 23));
        // March has 31 days, and Paris moves to summer time on the 29th: April starts at
        // 22:00 UTC on March 31st.
        assert_eq!(paris.window_end_ms(p), utc(2026, 3, 31, 22));
        assert_eq!(
            paris.until_reset(now),
            Duration::from_millis(utc(2026, 3, 31, 22) - now)
        );
        // February in UTC: 28 days.
        assert_eq!(
            in_utc.window_end_ms(u) - in_utc.window_start_ms(u),
            28 * 86_400_000
        );
        assert_eq!(paris.nearest_named(), Unit::Month);
    }

    #[test]
    fn calendar_days_and_weeks_follow_the_zones_clock() {
        let zone = Zone::named("America/New_York").unwrap();
        let day = Unit::Calendar(Calendar {
            period: Period::Day,
            zone,
        });
        let week = Unit::Calendar(Calendar {
            period: Period::Week,
            zone,
        });
        // 2026-03-08, the day New York springs forward, lasts 23 hours.
        let noon = utc(2026, 3, 8, 16);
        let today = day.window_at(noon);
        assert_eq!(day.window_start_ms(today), utc(2026, 3, 8, 5));
        assert_eq!(day.window_end_ms(today), utc(2026, 3, 9, 4));
        // That Sunday ends the week that began on Monday the 2nd.
        let this_week = week.window_at(noon);
        assert_eq!(week.window_start_ms(this_week), utc(2026, 3, 2, 5));
        assert_eq!(week.window_end_ms(this_week), utc(2026, 3, 9, 4));
        assert_eq!(week.elapsed_ms(noon), noon - utc(2026, 3, 2, 5));
    }

    #[test]
    fn spans_are_windows_of_any_length_aligned_to_the_epoch() {
        let ninety = Unit::of_seconds(90).unwrap();
        assert_eq!(ninety.name(), "90s");
        assert_eq!(
            Unit::of_seconds(60),
            Some(Unit::Minute),
            "a named length keeps its name"
        );
        assert_eq!(Unit::of_seconds(0), None);
        let now = 1_700_000_123_456;
        assert_eq!(ninety.window_at(now), Window((now / 90_000) as u32));
        assert_eq!(
            ninety.until_reset(now),
            Duration::from_millis(90_000 - now % 90_000)
        );
        // Ordered by length among the named units.
        assert!(Unit::Minute < ninety && ninety < Unit::Hour);
        // Reported to Envoy as the nearest named unit, by ratio.
        assert_eq!(ninety.nearest_named(), Unit::Minute);
        assert_eq!(Unit::of_seconds(45).unwrap().nearest_named(), Unit::Minute);
        assert_eq!(Unit::of_seconds(7).unwrap().nearest_named(), Unit::Second);
        assert_eq!(
            Unit::of_seconds(3 * 3600).unwrap().nearest_named(),
            Unit::Hour
        );
        // 5 h is 5 hours but 1/4.8 of a day: the day is nearer.
        assert_eq!(
            Unit::of_seconds(5 * 3600).unwrap().nearest_named(),
            Unit::Day
        );
        assert_eq!(
            Unit::of_seconds(14 * 86_400).unwrap().nearest_named(),
            Unit::Week
        );
    }
}
