//! An in-process limiter for a worker pool: eight threads call a pretend LLM provider, each
//! call first asking sluice (no Envoy, no async runtime), holding a slot in flight while it
//! runs, and the pool backing off when the provider says it is saturated.
//!
//! ```text
//! cargo run --example embedded
//! ```
//!
//! The provider really takes 50 calls in any second; the pool was told 80. Its first 429 makes
//! the pool announce a reduction (half of what is in force: 40 a second), after which the
//! provider, once its last second has passed, refuses no more.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice::{Descriptor, RateLimiter};

/// The pool's rules: 80 calls a second per provider, smoothed by a token bucket (no more than
/// 8 at once after a pause), and 4 in flight.
const RULES: &str = r#"
domain: workers
descriptors:
  - key: provider
    limits:
      - { unit: second, requests: 80, algorithm: token_bucket, burst: 8 }
      - { concurrency: 4, hold_ttl: 30s }
"#;

/// What a run came to.
#[derive(Debug)]
pub struct Summary {
    /// Jobs finished.
    pub done: usize,
    /// Calls the provider refused (429).
    pub refused_by_provider: u64,
    /// Of those, a second or more after the pool's reduction (the provider's own second
    /// still holds calls from before it until then).
    pub refused_after_reduction: u64,
    /// The most calls the provider ran at once.
    pub peak_in_flight: usize,
    /// The capacity factors the pool was told of, in order.
    pub factors: Vec<f64>,
}

/// A provider that takes `per_second` calls in any second and answers 429 past that.
struct Provider {
    per_second: usize,
    recent: Mutex<VecDeque<Instant>>,
    running: AtomicUsize,
    peak: AtomicUsize,
}

impl Provider {
    fn call(&self) -> Result<(), &'static str> {
        let now = Instant::now();
        {
            let mut recent = self.recent.lock().unwrap();
            while recent
                .front()
                .is_some_and(|t| now - *t > Duration::from_secs(1))
            {
                recent.pop_front();
            }
            if recent.len() >= self.per_second {
                return Err("429 Too Many Requests");
            }
            recent.push_back(now);
        }
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(running, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(15));
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Runs `jobs` jobs over eight worker threads.
pub fn run(jobs: usize) -> Summary {
    let limiter = RateLimiter::builder()
        .rules_yaml(RULES)
        .build()
        .expect("the rules load");
    let factors = Arc::new(Mutex::new(Vec::new()));
    let told = factors.clone();
    limiter.on_capacity_change(move |change| {
        println!("capacity of {} now {:.2}", change.domain, change.factor);
        told.lock().unwrap().push(change.factor);
    });
    let provider = Arc::new(Provider {
        per_second: 50,
        recent: Mutex::new(VecDeque::new()),
        running: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
    });
    let next_job = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let refused_after = Arc::new(AtomicU64::new(0));
    let reduced = Arc::new(Mutex::new(None::<Instant>));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (limiter, provider, next_job) =
                (limiter.clone(), provider.clone(), next_job.clone());
            let (refused, refused_after, reduced) =
                (refused.clone(), refused_after.clone(), reduced.clone());
            std::thread::spawn(move || {
                let call = Descriptor::new("workers").entry("provider", "pretend-llm");
                while next_job.fetch_add(1, Ordering::SeqCst) < jobs {
                    loop {
                        // Waits (this thread only) for a call to pass: the bucket refilling, a
                        // slot in flight given back.
                        let mut decision = limiter
                            .acquire_blocking(&call, Duration::from_secs(5))
                            .expect("a valid call");
                        if !decision.is_allowed() {
                            continue;
                        }
                        // The slot in flight is ours until `hold` is dropped.
                        let hold = decision.take_hold();
                        let answered = provider.call();
                        drop(hold);
                        match answered {
                            Ok(()) => break,
                            Err(_) => {
                                refused.fetch_add(1, Ordering::SeqCst);
                                let mut reduced = reduced.lock().unwrap();
                                match *reduced {
                                    Some(at) if at.elapsed() > Duration::from_millis(1100) => {
                                        refused_after.fetch_add(1, Ordering::SeqCst);
                                    }
                                    Some(_) => {}
                                    None => {
                                        // The provider is saturated: every worker slows down.
                                        let factor = limiter
                                            .announce_reduced(&call, 0.5, "provider answered 429")
                                            .expect("a rule to reduce");
                                        println!("provider saturated: limit now {factor:.2} of configured");
                                        *reduced = Some(Instant::now());
                                    }
                                }
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("a worker ends");
    }
    let factors = factors.lock().unwrap().clone();
    Summary {
        done: jobs,
        refused_by_provider: refused.load(Ordering::SeqCst),
        refused_after_reduction: refused_after.load(Ordering::SeqCst),
        peak_in_flight: provider.peak.load(Ordering::SeqCst),
        factors,
    }
}

fn main() {
    let started = Instant::now();
    let summary = run(250);
    println!("{summary:#?}");
    println!("took {:.1} s", started.elapsed().as_secs_f64());
}
