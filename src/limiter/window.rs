//! Fixed time windows: the units a limit is written in and where their windows start and end.

use std::fmt;
use std::time::Duration;

/// The unit of a limit. Windows are aligned to multiples of the unit since the Unix epoch, as in
/// envoyproxy/ratelimit, so every replica agrees on where a window starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
        }
    }

    /// Its length in milliseconds.
    pub const fn millis(self) -> u64 {
        self.seconds() * 1000
    }

    /// Its name, as rule files and the API write it.
    pub const fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    /// Case-insensitive, as envoyproxy/ratelimit reads units.
    pub fn parse(text: &str) -> Option<Unit> {
        Unit::ALL
            .into_iter()
            .find(|u| u.name().eq_ignore_ascii_case(text))
    }

    /// The number of the window that contains `now_ms`. A u32 holds second windows until 2106.
    pub fn window_at(self, now_ms: u64) -> Window {
        Window((now_ms / self.millis()).min(u64::from(Window::LAST.0)) as u32)
    }

    /// Time from `now_ms` until the window that contains it ends.
    pub fn until_reset(self, now_ms: u64) -> Duration {
        let unit = self.millis();
        Duration::from_millis(unit - now_ms % unit)
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
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
}
