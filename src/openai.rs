//! OpenAI's rate-limit conventions, so OpenAI-compatible SDKs back off correctly:
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` on every answer, and for a denial
//! `retry-after` and OpenAI's JSON error body.

use std::time::Duration;

use crate::decision::{Code, ReportedLimit, Status, Verdict};
use crate::rules::Measure;

/// A header's text, built on the stack: the longest, a reset of `u64::MAX` milliseconds, is 24
/// bytes. Numbers are written by `itoa`: `core::fmt` cost more than the decision itself here.
struct Short {
    bytes: [u8; 32],
    len: usize,
}

impl Short {
    fn new() -> Self {
        Short {
            bytes: [0; 32],
            len: 0,
        }
    }

    fn push(&mut self, text: &str) {
        let end = (self.len + text.len()).min(self.bytes.len());
        self.bytes[self.len..end].copy_from_slice(&text.as_bytes()[..end - self.len]);
        self.len = end;
    }

    fn number(&mut self, n: u64) {
        self.push(itoa::Buffer::new().format(n));
    }

    fn as_str(&self) -> &str {
        // Only whole ASCII pieces are pushed.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

/// `1m30s`, `45s`, `250ms`: the reset format OpenAI's headers use.
fn reset_text(d: Duration) -> Short {
    let mut text = Short::new();
    // u64 (585 million years of milliseconds): u128 formatting costs a call several times more.
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms < 1000 {
        text.number(ms);
        text.push("ms");
        return text;
    }
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    if h > 0 {
        text.number(h);
        text.push("h");
    }
    if h > 0 || m > 0 {
        text.number(m);
        text.push("m");
    }
    text.number(s);
    if ms > 0 {
        text.push(if ms < 10 {
            ".00"
        } else if ms < 100 {
            ".0"
        } else {
            "."
        });
        text.number(ms);
    }
    text.push("s");
    text
}

/// Hands `header` the OpenAI-style headers of every answer (name, value), and returns for a
/// denial the JSON error body (empty when allowed).
pub fn answer(verdict: &Verdict<'_>, mut header: impl FnMut(&'static str, &str)) -> Vec<u8> {
    let mut number = itoa::Buffer::new();
    let lines = [
        ("requests", verdict.headline.requests),
        ("tokens", verdict.headline.tokens),
    ];
    let names = [
        [
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        ],
        [
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        ],
    ];
    for ((_, line), [limit, remaining, reset]) in lines.iter().zip(names) {
        let Some(line) = line else { continue };
        header(limit, number.format(line.limit.per_unit));
        header(remaining, number.format(line.remaining()));
        header(reset, reset_text(line.until_reset).as_str());
    }
    if let Some(streams) = verdict.headline.concurrency {
        concurrency_headers(streams.limit.per_unit, streams.remaining(), &mut header);
    }
    if verdict.allowed {
        return Vec::new();
    }
    // What denied: the over limit that resets last decides when to retry.
    let over = lines
        .iter()
        .filter_map(|(what, line)| line.filter(|l| l.over).map(|l| (*what, l)))
        .max_by_key(|(_, l)| l.until_reset);
    let Some((what, line)) = over else {
        return streams_refusal(verdict, header);
    };
    let retry = line.until_reset.as_millis().div_ceil(1000).max(1);
    header("retry-after", number.format(retry));
    header("content-type", "application/json");
    let name = line
        .limit
        .name
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    let message = format!(
        "Rate limit reached for {what} per {unit}{name}: limit {limit}, used {used}. Please try again in {retry}s.",
        unit = line.limit.unit,
        limit = line.limit.per_unit,
        used = line.used,
    );
    error_body(&message)
}

/// Streams in flight, beside OpenAI's headers (which speak of requests and tokens a window):
/// how many may run at once and how many more may start now. No reset: slots free as
/// streams end.
pub fn concurrency_headers(limit: u64, remaining: u64, mut header: impl FnMut(&'static str, &str)) {
    let mut number = itoa::Buffer::new();
    header("x-ratelimit-limit-concurrency", number.format(limit));
    header(
        "x-ratelimit-remaining-concurrency",
        number.format(remaining),
    );
}

/// An OpenAI-style error body: what a client SDK reads to back off.
fn error_body(message: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "error": {
            "message": message,
            "type": "rate_limit_exceeded",
            "param": null,
            "code": "rate_limit_exceeded",
        }
    });
    body.to_string().into_bytes()
}

/// `retry-after` and the error body of a request denied by limits settled in the fleet store
/// (`statuses`: theirs), which the local decision's headline did not see: a concurrency limit
/// asks for a retry in a second, as [`streams_refusal`]; else the over limit that resets last
/// decides.
pub fn store_refusal(
    statuses: &[Status<'_>],
    mut header: impl FnMut(&'static str, &str),
) -> Vec<u8> {
    let over = || {
        statuses
            .iter()
            .filter(|s| s.over && s.code == Code::OverLimit)
            .filter_map(|s| s.limit.map(|l| (l, s)))
    };
    if let Some((limit, _)) = over().find(|(l, _)| l.measure == Measure::Concurrency) {
        return streams_message(limit, header);
    }
    let Some((limit, status)) = over().max_by_key(|(_, s)| s.until_reset) else {
        return Vec::new();
    };
    let retry = status.until_reset.as_millis().div_ceil(1000).max(1);
    header("retry-after", itoa::Buffer::new().format(retry));
    header("content-type", "application/json");
    let what = match limit.measure {
        Measure::Tokens => "tokens",
        _ => "requests",
    };
    let name = limit.name.map(|n| format!(" ({n})")).unwrap_or_default();
    let message = format!(
        "Rate limit reached for {what} per {unit}{name}: limit {limit}, used {used}. Please try again in {retry}s.",
        unit = limit.unit,
        limit = limit.per_unit,
        used = limit.ceiling.saturating_sub(status.remaining),
    );
    error_body(&message)
}

/// The body of a denial by a concurrency limit (the headers speak of requests a window and
/// cannot say it): how many streams may run at once. Its holds free as streams end, so the
/// client is asked to retry in a second, not when they would lapse.
fn streams_refusal(verdict: &Verdict<'_>, header: impl FnMut(&'static str, &str)) -> Vec<u8> {
    let Some(limit) = verdict
        .statuses
        .iter()
        .filter(|s| s.over && s.code == Code::OverLimit)
        .filter_map(|s| s.limit)
        .find(|l| l.measure == Measure::Concurrency)
    else {
        return Vec::new();
    };
    streams_message(limit, header)
}

fn streams_message(
    limit: ReportedLimit<'_>,
    mut header: impl FnMut(&'static str, &str),
) -> Vec<u8> {
    header("retry-after", "1");
    header("content-type", "application/json");
    let name = limit.name.map(|n| format!(" ({n})")).unwrap_or_default();
    let message = format!(
        "Too many requests in flight{name}: at most {} at once. Please try again when one of them ends.",
        limit.per_unit
    );
    error_body(&message)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    fn reset_text(d: Duration) -> String {
        super::reset_text(d).as_str().to_string()
    }

    #[test]
    fn resets_read_like_openais() {
        assert_eq!(reset_text(Duration::from_millis(250)), "250ms");
        assert_eq!(reset_text(Duration::from_secs(45)), "45s");
        assert_eq!(reset_text(Duration::from_millis(1_500)), "1.500s");
        assert_eq!(reset_text(Duration::from_secs(90)), "1m30s");
        assert_eq!(reset_text(Duration::from_secs(3_600 + 61)), "1h1m1s");
        assert_eq!(reset_text(Duration::from_secs(3_600)), "1h0m0s");
        assert_eq!(reset_text(Duration::from_millis(61_005)), "1m1.005s");
        assert_eq!(reset_text(Duration::from_millis(2_050)), "2.050s");
        // The longest there is fits the text's buffer whole.
        let longest = reset_text(Duration::from_millis(u64::MAX));
        assert_eq!(longest, "5124095576030h25m51.615s");
    }
}
