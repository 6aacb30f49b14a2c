//! A swarm of processes sharing one limit through Redis: each embeds a `RateLimiter` on the
//! same store and namespace, sets the same capacity in code, and takes calls from it; halfway
//! through, one of them announces that the provider is saturated, and every other process hears
//! of it and slows down with it.
//!
//! ```text
//! redis-server --port 6379 &
//! cargo run --example swarm -- redis://127.0.0.1:6379
//! ```
//!
//! Arguments: the Redis URL, then optionally the number of processes (3) and seconds (6). The
//! process started from the command line starts the others (copies of itself with `--member`),
//! gathers what each admitted per second, and prints the swarm's total beside the limit.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice::settings::Settings;
use sluice::{Descriptor, RateLimiter};

/// The provider's capacity, shared by the swarm: calls a second.
const LIMIT: u32 = 100;
/// What each process offers: calls a second (three offer 2.4x the limit).
const OFFERED: u64 = 80;

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One member of the swarm: takes calls for `seconds`, announces a reduction halfway if it is
/// member 0, and prints one line per event: `admitted <window> <n>`, `announced <ms>`,
/// `heard <factor> <ms>`.
fn member(url: &str, namespace: &str, index: usize, seconds: u64) {
    let mut settings = Settings::local("config".into());
    settings.redis_url = Some(url.to_string());
    settings.redis_namespace = Some(namespace.to_string());
    let limiter = RateLimiter::builder()
        .settings(settings)
        .build()
        .expect("the limiter starts");
    let per_second = NonZeroU32::new(LIMIT).unwrap();
    limiter
        .set_capacity("provider", per_second, Duration::from_secs(1))
        .expect("a valid capacity");
    limiter.on_capacity_change(|change| {
        println!("heard {} {}", change.factor, wall_ms());
    });
    let provider = Descriptor::resource("provider");
    let mut admitted = BTreeMap::<u64, u64>::new();
    let started = Instant::now();
    let mut announced = false;
    for n in 0..OFFERED * seconds {
        let at = started + Duration::from_nanos(n * 1_000_000_000 / OFFERED);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        if index == 0 && !announced && started.elapsed() >= Duration::from_secs(seconds / 2) {
            let factor = limiter
                .announce_reduced(&provider, 0.5, "the provider answered 429")
                .expect("the rule is there and Redis answers");
            println!("announced {} {factor}", wall_ms());
            announced = true;
        }
        let sent = wall_ms();
        let decision = limiter.try_acquire(&provider).expect("a valid call");
        if decision.is_allowed() {
            // The window it was decided in ends `reset_after` from then.
            let reset = decision.reset_after().as_millis() as u64;
            *admitted
                .entry((sent + reset).div_ceil(1000) - 1)
                .or_default() += 1;
        }
    }
    for (window, n) in admitted {
        println!("admitted {window} {n}");
    }
}

/// Starts `members` copies of this program, reads their lines, and checks the swarm's totals:
/// no second over the limit, none over half of it from a second after the announcement, each
/// steady second at 98 % of its limit or more, and every member told of the reduction.
/// Returns whether every check held.
fn coordinate(url: &str, members: usize, seconds: u64) -> bool {
    let namespace = format!("swarm-{}-{}", std::process::id(), wall_ms());
    let program = std::env::current_exe().expect("this program's path");
    let children: Vec<_> = (0..members)
        .map(|i| {
            Command::new(&program)
                .args([
                    "--member",
                    url,
                    &namespace,
                    &i.to_string(),
                    &seconds.to_string(),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .expect("a member starts")
        })
        .collect();
    let mut per_window = BTreeMap::<u64, u64>::new();
    let (mut announced_at, mut heard) = (None, 0);
    for child in children {
        let out = child.wait_with_output().expect("a member ends");
        assert!(out.status.success(), "a member failed: {:?}", out.status);
        let mut heard_here = false;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["admitted", window, n] => {
                    *per_window.entry(window.parse().unwrap()).or_default() +=
                        n.parse::<u64>().unwrap();
                }
                ["announced", ms, _] => announced_at = ms.parse::<u64>().ok(),
                ["heard", factor, _] if factor.parse::<f64>().is_ok_and(|f| f < 1.0) => {
                    heard_here = true
                }
                _ => {}
            }
        }
        heard += usize::from(heard_here);
    }
    let announced_at = announced_at.expect("member 0 announced");
    // The first and last seconds are partial: the members start and stop within them.
    let full: Vec<(u64, u64)> = per_window
        .iter()
        .skip(1)
        .take(per_window.len().saturating_sub(2))
        .map(|(w, n)| (*w, *n))
        .collect();
    let mut held = heard == members;
    println!("{heard} of {members} members heard the reduction");
    for (window, n) in &full {
        let (start, end) = (window * 1000, window * 1000 + 1000);
        let after = start >= announced_at + 1000;
        let limit = u64::from(if after { LIMIT / 2 } else { LIMIT });
        // Offered well over the limit, a second wholly before the announcement, or a second
        // after it, admits no less than 98 % of its limit; the seconds between are a change.
        let steady = after || end <= announced_at;
        let over = *n > limit;
        let under = steady && (*n as f64) < 0.98 * limit as f64;
        held &= !over && !under;
        let mark = match (over, under) {
            (true, _) => "  <-- over",
            (_, true) => "  <-- under",
            _ => "",
        };
        println!("second {window}: {n} admitted by the swarm, limit {limit}{mark}");
    }
    held
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, url, namespace, index, seconds] if flag == "--member" => member(
            url,
            namespace,
            index.parse().expect("a member index"),
            seconds.parse().expect("seconds"),
        ),
        [url, rest @ ..] => {
            let members = rest.first().map_or(3, |n| n.parse().expect("a count"));
            let seconds = rest.get(1).map_or(6, |s| s.parse().expect("seconds"));
            if !coordinate(url, members, seconds) {
                std::process::exit(1);
            }
        }
        [] => {
            eprintln!("usage: swarm <redis-url> [processes] [seconds]");
            std::process::exit(2);
        }
    }
}
