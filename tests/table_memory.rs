//! The counter table's memory while keys churn: it gives back the arrays it outgrows, and it
//! reaches its size at the first peak instead of growing minutes later. Its own binary: the
//! tests count large allocations with a global allocator of their own, made on threads they
//! mark, one test at a time.
//!
//! Found by the soak (BENCHMARKS.md): 100,000 new keys a minute, swept as their windows end,
//! and the heap grew about 1.1 MiB a minute. Removed counters leave tombstones, so the table is
//! rebuilt at the same size again and again; whoever finishes a rebuild (an insert, or a walk:
//! the sync's, the sweep's) retires the old array, and papaya's reclaimer freed a thread's
//! retired objects only in batches that those threads rarely filled.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::mpsc;

mod common;

use common::{T0, one_request};
use sluice::{CounterRef, Limiter, ManualClock, Outcome, Unit};

/// Allocations this large are the table's arrays here: counters and keys are far smaller.
const LARGE: usize = 256 * 1024;

/// Large allocations live, made or freed on the test's marked threads.
static LARGE_LIVE: AtomicIsize = AtomicIsize::new(0);

/// The largest allocation made on the marked threads since it was last read (swapped to 0).
static LARGEST_MADE: AtomicUsize = AtomicUsize::new(0);

/// Held by each test for its whole run: the counts above are the process's, not a test's.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

thread_local! {
    static MARKED: Cell<bool> = const { Cell::new(false) };
}

struct CountingLarge;

fn counted(size: usize, by: isize) {
    if size >= LARGE && MARKED.with(Cell::get) {
        LARGE_LIVE.fetch_add(by, Ordering::Relaxed);
        if by > 0 {
            LARGEST_MADE.fetch_max(size, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call goes to the system allocator unchanged; only counts are kept.
unsafe impl GlobalAlloc for CountingLarge {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted(layout.size(), 1);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted(layout.size(), 1);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        counted(layout.size(), -1);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        counted(layout.size(), -1);
        counted(new_size, 1);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingLarge = CountingLarge;

const KEYS_A_ROUND: usize = 20_000;
const ROUNDS: usize = 60;

/// One of the server's threads, played here: runs each job it is sent, marked as the test's.
fn worker(limiter: Arc<Limiter>) -> (mpsc::Sender<Job>, mpsc::Receiver<()>) {
    let (jobs, next) = mpsc::channel::<Job>();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        MARKED.with(|m| m.set(true));
        for job in next {
            job(&limiter);
            done.send(()).unwrap();
        }
    });
    (jobs, finished)
}

type Job = Box<dyn FnOnce(&Limiter) + Send>;

fn run(worker: &(mpsc::Sender<Job>, mpsc::Receiver<()>), job: Job) {
    worker.0.send(job).unwrap();
    worker.1.recv().unwrap();
}

#[test]
fn churning_keys_leave_no_old_table_arrays_behind() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let limiter = Arc::new(Limiter::new(Arc::new(ManualClock::new(T0))));
    // As in the server: requests insert on their threads, the sync walks the table on
    // another, the sweep removes on a third.
    let requests = worker(limiter.clone());
    let sync = worker(limiter.clone());
    let sweep = worker(limiter.clone());
    let mut live = Vec::new();
    for round in 0..ROUNDS {
        run(
            &requests,
            Box::new(move |limiter: &Limiter| {
                let table = limiter.counters().pin();
                for i in 0..KEYS_A_ROUND {
                    let part = format!("r{round}-k{i}");
                    let parts = [part.as_str()];
                    let key = CounterRef {
                        scope: 7,
                        unit: Unit::Minute,
                        parts: &parts,
                    };
                    table.with_counter(key, |_| Ok(()));
                }
            }),
        );
        run(
            &sync,
            Box::new(|limiter: &Limiter| {
                let walked = limiter.counters().snapshot().iter().count();
                assert_eq!(walked, KEYS_A_ROUND);
            }),
        );
        run(
            &sweep,
            Box::new(|limiter: &Limiter| {
                limiter.counters().remove_where(|_| true);
            }),
        );
        live.push(LARGE_LIVE.load(Ordering::Relaxed));
    }
    println!("the table's large arrays live after each round: {live:?}");
    // 1.2 million inserts rebuild the table many times; what stays is the array in use and
    // the odd one not yet freed (before the fix: one more for each rebuild, up to 32).
    let most = live[ROUNDS / 2..].iter().copied().max().unwrap();
    assert!(
        most <= 3,
        "{most} large arrays live after churning: old table arrays are kept ({live:?})"
    );
}

/// The table grows to the size its churn needs at the first sweep that sees the peak, not at
/// some later moment when a rebuild happens to meet a peak (the soak's one step of resident
/// memory, at minute 16 of 30). As in the soak: each minute brings new keys, and the sweep
/// drops the last minute's only after most of this minute's have come, so the table is at
/// its fullest just before a sweep.
#[test]
fn the_table_reaches_its_size_at_the_first_peak_and_keeps_it() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const MINUTE: u64 = 60_000;
    const KEYS_A_MINUTE: usize = 20_000;
    const BEFORE_SWEEP: usize = KEYS_A_MINUTE * 9 / 10;
    const MINUTES: u64 = 100;
    let clock = Arc::new(ManualClock::new(T0));
    let limiter = Arc::new(Limiter::new(clock.clone()));
    let requests = worker(limiter.clone());
    let sweep = worker(limiter.clone());
    let hit = move |minute: u64, keys: std::ops::Range<usize>| -> Job {
        Box::new(move |limiter: &Limiter| {
            let mut outcome = [Outcome::default()];
            for i in keys {
                let part = format!("m{minute}-k{i}");
                let parts = [part.as_str()];
                let demand = one_request(9, Unit::Minute, &parts, 100);
                assert!(limiter.settle(&[demand], &mut outcome).allowed);
            }
        })
    };
    // The largest array made in each minute, in KiB.
    let mut largest = Vec::new();
    for minute in 0..MINUTES {
        let now = T0 + minute * MINUTE + 1_000;
        clock.set_ms(now);
        LARGEST_MADE.store(0, Ordering::Relaxed);
        run(&requests, hit(minute, 0..BEFORE_SWEEP));
        run(
            &sweep,
            Box::new(move |limiter: &Limiter| {
                limiter.counters().sweep(now);
            }),
        );
        run(&requests, hit(minute, BEFORE_SWEEP..KEYS_A_MINUTE));
        assert_eq!(limiter.counters().len(), KEYS_A_MINUTE);
        largest.push(LARGEST_MADE.swap(0, Ordering::Relaxed) / 1024);
    }
    println!("the largest array made in each minute (KiB): {largest:?}");
    // Minute 0 fills an empty table; minute 1's sweep is the first to see the peak.
    let settled = *largest[..2].iter().max().unwrap();
    let later = largest[2..].iter().copied().max().unwrap();
    assert!(
        later <= settled,
        "the table grew after the first peak ({settled} KiB by minute 1, {later} KiB later): {largest:?}"
    );
}
