//! Draws what each way of counting admits over time for the same bursty calls: the picture in
//! the README's "How counting works". The limiter decides every call with a manual clock, so
//! the picture is what sluice does, not a sketch of it.
//!
//!     cargo run --example algorithms_plot > docs/algorithms.svg

use std::fmt::Write;
use std::sync::Arc;

use sluice::{
    Algorithm, CounterRef, Counts, Demand, Enforcement, Limiter, Limits, ManualClock, Outcome, Unit,
};

/// A limit of 60 a minute; a token bucket of 20.
const LIMIT: u32 = 60;
const BURST: u32 = 20;
/// Three minutes from a minute boundary.
const SPAN_MS: u64 = 180_000;
const T0: u64 = 1_767_225_600_000;

/// The calls: a quiet trickle, a burst of 80 across the first minute's end, a steady
/// 2 a second through the second minute, and a burst of 40 at 150 s.
fn arrivals() -> Vec<u64> {
    let mut at = Vec::new();
    at.extend((0..50_000).step_by(5_000)); // one every 5 s
    at.extend((0..80).map(|i| 55_000 + i * 100)); // 80 in 8 s, from 55 s to 63 s
    at.extend((64_000..120_000).step_by(500)); // 2 a second
    at.extend((0..40).map(|i| 150_000 + i * 50)); // 40 in 2 s
    at.sort_unstable();
    at
}

/// The times of the calls each algorithm admits.
fn admitted(algorithm: Algorithm, calls: &[u64]) -> Vec<u64> {
    let clock = Arc::new(ManualClock::new(T0));
    let limiter = Limiter::new(clock.clone());
    let parts = ["k"];
    let demand = Demand {
        counter: CounterRef {
            scope: 1,
            unit: Unit::Minute,
            parts: &parts,
        },
        limits: Limits {
            requests: Some(LIMIT),
            tokens: None,
            algorithm,
            wide: false,
            leased: false,
            refill_ms: 0,
        },
        charge: Counts {
            requests: 1,
            tokens: 0,
        },
        refund: false,
        hold_taken_ms: None,
        enforcement: Enforcement::Enforce,
    };
    let mut outcome = [Outcome::default()];
    calls
        .iter()
        .copied()
        .filter(|&t| {
            clock.set_ms(T0 + t);
            limiter.settle(&[demand], &mut outcome).allowed
        })
        .collect()
}

fn main() {
    print!("{}", picture());
}

/// The picture, as `docs/algorithms.svg` holds it (tests/examples.rs checks that it does).
pub fn picture() -> String {
    let calls = arrivals();
    let lines = [
        ("calls sent", "#9e9e9e", calls.clone()),
        (
            "fixed_window",
            "#d62728",
            admitted(Algorithm::FixedWindow, &calls),
        ),
        (
            "sliding_window",
            "#1f77b4",
            admitted(Algorithm::SlidingWindow, &calls),
        ),
        (
            "token_bucket (burst 20)",
            "#2ca02c",
            admitted(Algorithm::TokenBucket { burst: BURST }, &calls),
        ),
    ];
    svg(&lines)
}

/// Cumulative calls over time, one step line per series, minute boundaries dashed.
fn svg(lines: &[(&str, &str, Vec<u64>)]) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 400.0, 56.0, 230.0, 20.0, 44.0);
    let max_y = lines.iter().map(|l| l.2.len()).max().unwrap_or(1).max(1) as f64;
    let x = |ms: u64| left + (ms as f64 / SPAN_MS as f64) * (w - left - right);
    let y = |n: f64| top + (1.0 - n / max_y) * (h - top - bottom);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{left}" y="14">Calls admitted so far, 60 a minute, for the same bursty calls</text>"#
    );
    // Axes, minute boundaries, ticks.
    let (x0, x1, y0, y1) = (x(0), x(SPAN_MS), y(0.0), y(max_y));
    let _ = writeln!(
        out,
        r##"<path d="M{x0} {y1} V{y0} H{x1}" stroke="#333" fill="none"/>"##
    );
    for minute in 0..=3u64 {
        let xm = x(minute * 60_000);
        let _ = writeln!(
            out,
            r##"<line x1="{xm}" y1="{y1}" x2="{xm}" y2="{y0}" stroke="#bbb" stroke-dasharray="4 4"/><text x="{xm}" y="{}" text-anchor="middle">{} s</text>"##,
            y0 + 16.0,
            minute * 60
        );
    }
    let step = if max_y > 200.0 { 50 } else { 20 };
    for n in (0..=max_y as usize).step_by(step) {
        let yn = y(n as f64);
        let _ = writeln!(
            out,
            r##"<text x="{}" y="{}" text-anchor="end">{n}</text><line x1="{}" y1="{yn}" x2="{x0}" y2="{yn}" stroke="#333"/>"##,
            x0 - 6.0,
            yn + 4.0,
            x0 - 3.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">time</text>"#,
        (x0 + x1) / 2.0,
        h - 8.0
    );
    // One step line per series, and its legend with the total.
    for (i, (name, colour, times)) in lines.iter().enumerate() {
        let mut d = format!("M{x0} {y0}");
        for (n, &t) in times.iter().enumerate() {
            let _ = write!(d, " H{:.1} V{:.1}", x(t), y((n + 1) as f64));
        }
        let _ = write!(d, " H{x1}");
        let _ = writeln!(
            out,
            r#"<path d="{d}" stroke="{colour}" stroke-width="2" fill="none"/>"#
        );
        let ly = top + 30.0 + i as f64 * 22.0;
        let lx = w - right + 14.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{name}: {}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            times.len()
        );
    }
    out.push_str("</svg>\n");
    out
}
