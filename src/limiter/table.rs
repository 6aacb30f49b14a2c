//! The table of live counters: one per (limit scope, unit, descriptor values), found without
//! allocating and without a lock.

use std::hash::{Hash, Hasher};

use papaya::{Equivalent, HashMap};
use smallvec::SmallVec;

use super::counter::{Counter, Retired};
use super::window::Unit;

/// Which counter a request touches. `scope` names the limit (a rule's stable id, or a request's
/// override); `parts` are the descriptor values that make one caller's counter differ from
/// another's.
#[derive(Debug, Clone, Copy)]
pub struct CounterRef<'a> {
    /// The limit the counter serves: a rule's id, or a request override's scope.
    pub scope: u64,
    /// The unit of its windows.
    pub unit: Unit,
    /// The descriptor values that name one caller's counter.
    pub parts: &'a [&'a str],
}

/// The owned form of a [`CounterRef`], kept as the table's key. Parts are stored
/// length-prefixed in one buffer, inline up to 32 bytes: the key then sits in the table's entry
/// itself, so a lookup does not follow a second pointer (one cache miss fewer with many keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterKey {
    scope: u64,
    unit: Unit,
    parts: SmallVec<[u8; 32]>,
}

/// A part's length: one byte below 255, else 255 and four bytes.
fn push_len(buf: &mut SmallVec<[u8; 32]>, len: usize) {
    match u8::try_from(len) {
        Ok(short) if short < u8::MAX => buf.push(short),
        _ => {
            buf.push(u8::MAX);
            buf.extend_from_slice(&(len as u32).to_le_bytes());
        }
    }
}

/// Splits the first part off `rest`.
fn next_part(rest: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&first, tail) = rest.split_first()?;
    let (len, tail) = if first < u8::MAX {
        (usize::from(first), tail)
    } else {
        let (len, tail) = tail.split_first_chunk::<4>()?;
        (u32::from_le_bytes(*len) as usize, tail)
    };
    (tail.len() >= len).then(|| tail.split_at(len))
}

impl CounterKey {
    pub fn scope(&self) -> u64 {
        self.scope
    }

    pub fn unit(&self) -> Unit {
        self.unit
    }

    pub fn with_parts<'p>(&self, parts: &'p [&'p str]) -> CounterRef<'p> {
        CounterRef {
            scope: self.scope,
            unit: self.unit,
            parts,
        }
    }

    pub fn parts(&self) -> impl Iterator<Item = &str> {
        let mut rest = &self.parts[..];
        std::iter::from_fn(move || {
            let (part, tail) = next_part(rest)?;
            rest = tail;
            // Built only from &str in `to_key`.
            std::str::from_utf8(part).ok()
        })
    }
}

impl<'a> CounterRef<'a> {
    /// The owned key the table stores.
    pub fn to_key(self) -> CounterKey {
        let mut parts = SmallVec::new();
        for part in self.parts {
            push_len(&mut parts, part.len());
            parts.extend_from_slice(part.as_bytes());
        }
        CounterKey {
            scope: self.scope,
            unit: self.unit,
            parts,
        }
    }
}

#[inline]
fn hash_parts<'p, H: Hasher>(
    state: &mut H,
    scope: u64,
    unit: Unit,
    parts: impl Iterator<Item = &'p [u8]>,
) {
    state.write_u64(scope);
    state.write_u64(unit.seconds());
    for part in parts {
        state.write_usize(part.len());
        state.write(part);
    }
}

// Both forms must hash alike, so the table can be searched with a borrowed key.
impl Hash for CounterKey {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut rest = &self.parts[..];
        let parts = std::iter::from_fn(|| {
            let (part, tail) = next_part(rest)?;
            rest = tail;
            Some(part)
        });
        hash_parts(state, self.scope, self.unit, parts);
    }
}

impl Hash for CounterRef<'_> {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        hash_parts(
            state,
            self.scope,
            self.unit,
            self.parts.iter().map(|p| p.as_bytes()),
        );
    }
}

impl Equivalent<CounterKey> for CounterRef<'_> {
    fn equivalent(&self, key: &CounterKey) -> bool {
        if self.scope != key.scope || self.unit != key.unit {
            return false;
        }
        let mut rest = &key.parts[..];
        for part in self.parts {
            match next_part(rest) {
                Some((stored, tail)) if stored == part.as_bytes() => rest = tail,
                _ => return false,
            }
        }
        rest.is_empty()
    }
}

pub struct CounterTable {
    map: HashMap<CounterKey, Counter, foldhash::fast::RandomState>,
}

impl Default for CounterTable {
    fn default() -> Self {
        CounterTable::new()
    }
}

impl CounterTable {
    pub fn new() -> Self {
        CounterTable {
            map: HashMap::with_hasher(foldhash::fast::RandomState::default()),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A view of the table for one request: counters it returns stay valid while it lives.
    pub fn pin(&self) -> PinnedTable<'_> {
        PinnedTable {
            map: self.map.pin(),
        }
    }

    /// Drops every counter whose window has ended. A counter is retired before it is removed, so
    /// a request that found it a moment earlier cannot count into it unseen.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let map = self.map.pin();
        let before = map.len();
        // Counters leave the table only here, so it holds the most it will before this sweep
        // now. Grown now to what its next rebuild would make it at this count (twice the size
        // once half full), it does so on this thread, once, at the first peak, and not later
        // at whatever moment a rebuild meets a peak again: on a request's insert, and with
        // keys churning minutes into a steady state (the soak's one step of resident memory).
        map.reserve(before / 2 + 1);
        // Counted as this sweep retires them: the table's length also moves with inserts and a
        // reload's removals, and a rebuild under way shows the walk some counters twice.
        let mut dropped = 0;
        map.retain(|key, counter| {
            let retired_before = counter.is_retired();
            let idle = counter.retire_if_idle(key.unit.window_at(now_ms));
            dropped += usize::from(idle && !retired_before);
            !idle
        });
        release_retired(&self.map.guard());
        dropped
    }

    /// Removes the counters of one scope whose parts satisfy `matches`.
    pub fn remove_where(&self, mut matches: impl FnMut(&CounterKey) -> bool) -> usize {
        let map = self.map.pin();
        // Counted as they match: the table's length also moves with a sweep under way (a
        // rebuild under way may show the walk one twice, and count it so).
        let mut removed = 0;
        map.retain(|key, _| {
            let matched = matches(key);
            removed += usize::from(matched);
            !matched
        });
        // A reload's walk may finish a rebuild on a thread that retires little else.
        release_retired(&self.map.guard());
        removed
    }

    /// A view that may be held across an await: the sync task walks it over Redis round trips.
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            map: &self.map,
            guard: self.map.owned_guard(),
        }
    }
}

/// A view of the table that may be held across an await; counters it yields stay valid
/// while it lives.
pub struct Snapshot<'t> {
    map: &'t HashMap<CounterKey, Counter, foldhash::fast::RandomState>,
    guard: papaya::OwnedGuard<'t>,
}

impl Snapshot<'_> {
    /// Every live counter, with its key.
    pub fn iter(&self) -> impl Iterator<Item = (&CounterKey, &Counter)> {
        self.map.iter(&self.guard)
    }
}

impl Drop for Snapshot<'_> {
    /// A walk finishes any rebuild of the table under way, and retires the old array with
    /// this view's guard, which retires nothing else: handed on here, or it would stay.
    fn drop(&mut self) {
        release_retired(&self.guard);
    }
}

type Pinned<'t> = papaya::HashMapRef<
    't,
    CounterKey,
    Counter,
    foldhash::fast::RandomState,
    papaya::LocalGuard<'t>,
>;

thread_local! {
    /// Counters this thread has inserted since it last let go of what it retired.
    static INSERTS_SINCE_RELEASE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Inserts on one thread between two [`release_retired`]s: the release costs a process-wide
/// memory barrier (a system call), so a few microseconds per 1,024 new counters.
const RELEASE_EVERY: u32 = 1024;

/// Placeholders retired to fill a batch: more than the threads that can be inside the table
/// at once (a request thread a core, the sync's walk, the sweep, the admin API), so the batch
/// is never too small to be handed on.
fn placeholders() -> usize {
    static PLACEHOLDERS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PLACEHOLDERS
        .get_or_init(|| std::thread::available_parallelism().map_or(64, |cores| cores.get() + 16))
}

/// Hands this thread's batch of retired objects to the reclaimer, topped up with placeholders
/// so it is large enough to go; what it holds is freed once no thread can still read it.
///
/// Why: removed counters leave tombstones, so with keys churning the table is rebuilt at the
/// same size every few hundred thousand inserts, and whoever finishes a rebuild (a walk
/// finishes any under way: the sync's every second, the sweep, a reload; or an insert)
/// retires the old array, 2.25 MiB at 200,000 counters. papaya's reclaimer, seize, frees a
/// thread's retired objects in batches of 32, and a batch goes only once it holds one object
/// per thread then inside the table; the sync's walk and the request threads retire little
/// else, so old arrays stayed: in the soak (100,000 new keys a minute) the heap grew 1.1 MiB a
/// minute, the arrays allocated by table rebuilds still live (heaptrack).
///
/// The one `unsafe` of the library: seize's retire is unsafe because the object must be
/// unreachable, and a placeholder never was reachable.
#[allow(unsafe_code)]
fn release_retired(guard: &impl papaya::Guard) {
    unsafe fn free_placeholder(placeholder: *mut u64, _: &seize::Collector) {
        // SAFETY: made by `Box::into_raw` below, and the reclaimer frees each object once.
        drop(unsafe { Box::from_raw(placeholder) });
    }
    for _ in 0..placeholders() {
        let placeholder = Box::into_raw(Box::new(0u64));
        // SAFETY: the placeholder was never shared: no thread can be reading it.
        unsafe { guard.defer_retire(placeholder, free_placeholder) };
    }
    guard.flush();
}

/// A view of the table for one request.
pub struct PinnedTable<'t> {
    map: Pinned<'t>,
}

impl<'t> PinnedTable<'t> {
    /// Runs `op` on the counter for `key`, creating it when missing. Allocates only to create.
    pub fn with_counter<T>(
        &self,
        key: CounterRef<'_>,
        mut op: impl FnMut(&Counter) -> Result<T, Retired>,
    ) -> T {
        loop {
            let counter = match self.map.get(&key) {
                Some(counter) => counter,
                None => {
                    let counter = self.map.get_or_insert(key.to_key(), Counter::new());
                    self.inserted();
                    counter
                }
            };
            match op(counter) {
                Ok(value) => return value,
                Err(Retired) => {
                    self.map.remove_if(&key, |_, c| c.is_retired()).ok();
                }
            }
        }
    }

    /// Counts an insert on this thread and, every [`RELEASE_EVERY`] of them, hands on what the
    /// thread has retired: an insert may finish a rebuild of the table ([`release_retired`]).
    #[inline]
    fn inserted(&self) {
        let due = INSERTS_SINCE_RELEASE.with(|count| {
            let next = count.get() + 1;
            count.set(if next >= RELEASE_EVERY { 0 } else { next });
            next >= RELEASE_EVERY
        });
        if due {
            release_retired(&self.map.map().guard());
        }
    }

    /// The counter for `key`, if one is live.
    pub fn get(&self, key: CounterRef<'_>) -> Option<&Counter> {
        self.map.get(&key).filter(|c| !c.is_retired())
    }

    /// [`PinnedTable::get`] by an owned key (a lease wanted).
    pub fn get_owned(&self, key: &CounterKey) -> Option<&Counter> {
        let parts: Vec<&str> = key.parts().collect();
        self.get(key.with_parts(&parts))
    }
}

#[cfg(test)]
mod tests {
    use super::super::Enforcement;
    use super::super::counter::{Counts, Limits};
    use super::super::window::Window;
    use super::*;
    use std::hash::BuildHasher;

    fn key<'a>(parts: &'a [&'a str]) -> CounterRef<'a> {
        CounterRef {
            scope: 7,
            unit: Unit::Minute,
            parts,
        }
    }

    #[test]
    fn owned_and_borrowed_keys_agree() {
        let parts = ["k1", "gpt-4o"];
        let owned = key(&parts).to_key();
        assert!(key(&parts).equivalent(&owned));
        assert!(!key(&["k1", "gpt-4"]).equivalent(&owned));
        // Length prefixes keep ("ab","c") apart from ("a","bc").
        assert!(!key(&["ab", "c"]).equivalent(&key(&["a", "bc"]).to_key()));
        let state = foldhash::fast::RandomState::default();
        assert_eq!(state.hash_one(key(&parts)), state.hash_one(&owned));
        assert_eq!(owned.parts().collect::<Vec<_>>(), parts);
        // Parts of 255 bytes and more take a long length; the key spills past 32 bytes.
        let long = "x".repeat(300);
        let parts = ["k1", long.as_str(), ""];
        let owned = key(&parts).to_key();
        assert!(key(&parts).equivalent(&owned));
        assert!(!key(&parts[..2]).equivalent(&owned));
        assert_eq!(state.hash_one(key(&parts)), state.hash_one(&owned));
        assert_eq!(owned.parts().collect::<Vec<_>>(), parts);
    }

    #[test]
    fn sweep_drops_only_ended_windows() {
        let table = CounterTable::new();
        let now = 10 * 60_000;
        let one = Counts {
            requests: 1,
            tokens: 0,
        };
        let pinned = table.pin();
        for (parts, at) in [(["old"], now - 60_000), (["live"], now)] {
            pinned.with_counter(key(&parts), |c| {
                c.charge(
                    Unit::Minute.window_at(at),
                    one,
                    Limits::default(),
                    Enforcement::Enforce,
                )
            });
        }
        drop(pinned);
        assert_eq!(table.sweep(now), 1);
        assert_eq!(table.len(), 1);
        let pinned = table.pin();
        assert!(pinned.get(key(&["live"])).is_some());
        // A swept key starts again from zero.
        let reading = pinned.with_counter(key(&["old"]), |c| {
            c.charge(Window(10), one, Limits::default(), Enforcement::Enforce)
        });
        assert_eq!(reading.counts, one);
    }
}
