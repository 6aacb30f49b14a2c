//! OpenAI's rate-limit conventions, so OpenAI-compatible SDKs back off correctly:
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` on every answer, and for a denial
//! `retry-after` and OpenAI's JSON error body.

use envoy_types::pb::envoy::config::core::v3::HeaderValue;

use crate::decision::Verdict;

/// `1m30s`, `45s`, `250ms`: the reset format OpenAI's headers use. Whole numbers, one
/// string: this is written for every answer.
pub fn reset_text(d: std::time::Duration) -> String {
    use std::fmt::Write;
    // u64 (585 million years of milliseconds): u128 formatting costs a call several times more.
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s, ms) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut text = String::with_capacity(16);
    if h > 0 {
        write!(text, "{h}h").ok();
    }
    if h > 0 || m > 0 {
        write!(text, "{m}m").ok();
    }
    if ms == 0 {
        write!(text, "{s}s").ok();
    } else {
        write!(text, "{s}.{ms:03}s").ok();
    }
    text
}

fn header(key: &str, value: String) -> HeaderValue {
    HeaderValue {
        key: key.to_string(),
        value,
        ..Default::default()
    }
}

/// The OpenAI-style headers of every answer and, for a denial, the JSON error body.
pub fn answer(verdict: &Verdict<'_>) -> (Vec<HeaderValue>, Vec<u8>) {
    let mut headers = Vec::with_capacity(8);
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
        headers.push(header(limit, line.limit.per_unit.to_string()));
        headers.push(header(remaining, line.remaining().to_string()));
        headers.push(header(reset, reset_text(line.until_reset)));
    }
    if verdict.allowed {
        return (headers, Vec::new());
    }
    // What denied: the over limit that resets last decides when to retry.
    let over = lines
        .iter()
        .filter_map(|(what, line)| line.filter(|l| l.over).map(|l| (*what, l)))
        .max_by_key(|(_, l)| l.until_reset);
    let Some((what, line)) = over else {
        return (headers, Vec::new());
    };
    let retry = line.until_reset.as_millis().div_ceil(1000).max(1);
    headers.push(header("retry-after", retry.to_string()));
    headers.push(header("content-type", "application/json".into()));
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
    let body = serde_json::json!({
        "error": {
            "message": message,
            "type": "rate_limit_exceeded",
            "param": null,
            "code": "rate_limit_exceeded",
        }
    });
    (headers, body.to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::reset_text;
    use std::time::Duration;

    #[test]
    fn resets_read_like_openais() {
        assert_eq!(reset_text(Duration::from_millis(250)), "250ms");
        assert_eq!(reset_text(Duration::from_secs(45)), "45s");
        assert_eq!(reset_text(Duration::from_millis(1_500)), "1.500s");
        assert_eq!(reset_text(Duration::from_secs(90)), "1m30s");
        assert_eq!(reset_text(Duration::from_secs(3_600 + 61)), "1h1m1s");
        assert_eq!(reset_text(Duration::from_secs(3_600)), "1h0m0s");
        assert_eq!(reset_text(Duration::from_millis(61_005)), "1m1.005s");
    }
}
