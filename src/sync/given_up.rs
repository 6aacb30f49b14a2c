//! Lease calls this replica gave up on: timed out, failed or dropped before their answers were
//! recorded. Redis may still have run one (a command it read before the replica stopped
//! waiting runs when Redis gets to it), and what that call granted would be held for this
//! replica in the store but never admitted from: lost to the fleet for the rest of the window.
//! A slow Redis times out round after round, each round's grants lost that way.
//!
//! So every lease call carries an id, unique in this process, and the store keeps, per key, the
//! ids and grants of this replica's last four calls that granted anything (`g:<replica>`). The
//! next calls on the key name the ids given up on: the store takes back the grants it finds
//! (they are no one's), and a call named arriving later still (from a connection dropped while
//! Redis was paused) changes nothing (`x:<replica>`, the newest id named). Four are kept
//! because a call given up on may run after others on the key granted (a sync and the request
//! path's call in flight at once); a grant is found again unless four calls granted on the key
//! after it before a call named it, and then its units stay held unused, which never admits a
//! unit twice.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The ids of lease calls given up on, per key, until a call naming them is answered.
#[derive(Debug)]
pub(super) struct GivenUp {
    next_id: AtomicU64,
    /// Whether any key has ids waiting to be named: the common case asks no lock.
    any: AtomicBool,
    by_key: Mutex<HashMap<String, Waiting>>,
}

/// A key's ids to name, and when the key expires (ms since the epoch): no call names it after.
#[derive(Debug, Default)]
struct Waiting {
    ids: Vec<u64>,
    expires_ms: u64,
}

/// The most ids one call names: a key whose calls failed longer than this many times in a row
/// names the newest (the store keeps only the newest grants anyway).
const NAMED_AT_MOST: usize = 16;

/// The most keys kept with ids to name (each about a hundred bytes).
const KEYS_AT_MOST: usize = 200_000;

/// What a lease call carries: its id, and the ids given up on that it names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Tag {
    pub id: u64,
    pub given_up: Vec<u64>,
}

impl Tag {
    /// The ids given up on, as the script reads them: decimal, comma-separated.
    pub(super) fn given_up_arg(&self) -> String {
        let ids: Vec<String> = self.given_up.iter().map(u64::to_string).collect();
        ids.join(",")
    }
}

impl Default for GivenUp {
    fn default() -> Self {
        GivenUp {
            // 0 is never an id: the store reads a missing `x:` field as 0.
            next_id: AtomicU64::new(1),
            any: AtomicBool::new(false),
            by_key: Mutex::new(HashMap::new()),
        }
    }
}

impl GivenUp {
    /// A new call's tag on `key`.
    pub(super) fn tag(&self, key: &str) -> Tag {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let given_up = if self.any.load(Ordering::Acquire) {
            self.lock()
                .get(key)
                .map(|w| w.ids.clone())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        Tag { id, given_up }
    }

    /// Whether calls on `key` were given up on and are still to be named.
    pub(super) fn has(&self, key: &str) -> bool {
        self.any.load(Ordering::Acquire) && self.lock().contains_key(key)
    }

    /// Starts a batch of calls: those not [`InFlight::answered`] when it drops were given up on.
    pub(super) fn in_flight(&self) -> InFlight<'_> {
        InFlight {
            given_up: self,
            calls: Vec::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiting>> {
        // A panic elsewhere while holding it leaves plain data: still good to use.
        self.by_key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the given-up calls and forgets the ids the answered calls named, and the keys
    /// expired, in one lock.
    fn settle(&self, given_up: Vec<(String, u64, u64)>, named: Vec<(String, Vec<u64>)>) {
        if given_up.is_empty() && named.is_empty() && !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut by_key = self.lock();
        for (key, ids) in named {
            if let Some(waiting) = by_key.get_mut(&key) {
                waiting.ids.retain(|id| !ids.contains(id));
                if waiting.ids.is_empty() {
                    by_key.remove(&key);
                }
            }
        }
        for (key, id, expires_ms) in given_up {
            let waiting = by_key.entry(key).or_default();
            waiting.ids.push(id);
            waiting.expires_ms = waiting.expires_ms.max(expires_ms);
            if waiting.ids.len() > NAMED_AT_MOST {
                waiting.ids.remove(0);
            }
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        by_key.retain(|_, waiting| waiting.expires_ms > now_ms);
        // Bounded: past this many, grants of a long outage are not taken back.
        if by_key.len() > KEYS_AT_MOST {
            by_key.clear();
        }
        self.any.store(!by_key.is_empty(), Ordering::Release);
    }
}

/// A batch of lease calls sent: the ones not answered when it drops (an error, a timeout, the
/// caller's future dropped) are given up on.
pub(super) struct InFlight<'a> {
    given_up: &'a GivenUp,
    calls: Vec<Call<'a>>,
}

struct Call<'a> {
    key: &'a str,
    expires_ms: u64,
    tag: Tag,
    answered: bool,
}

impl<'a> InFlight<'a> {
    /// Tags a call on `key`, which expires at `expires_ms` (ms since the epoch), and keeps it
    /// in the batch; returns its index and tag.
    pub(super) fn call(&mut self, key: &'a str, expires_ms: u64) -> (usize, &Tag) {
        let tag = self.given_up.tag(key);
        self.calls.push(Call {
            key,
            expires_ms,
            tag,
            answered: false,
        });
        let i = self.calls.len() - 1;
        (i, &self.calls[i].tag)
    }

    /// How many calls the batch has tagged.
    pub(super) fn len(&self) -> usize {
        self.calls.len()
    }

    /// The call at `i` was answered and its answer recorded.
    pub(super) fn answered(&mut self, i: usize) {
        if let Some(call) = self.calls.get_mut(i) {
            call.answered = true;
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut given_up = Vec::new();
        let mut named = Vec::new();
        for call in self.calls.drain(..) {
            if !call.answered {
                given_up.push((call.key.to_string(), call.tag.id, call.expires_ms));
            } else if !call.tag.given_up.is_empty() {
                named.push((call.key.to_string(), call.tag.given_up));
            }
        }
        self.given_up.settle(given_up, named);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An expiry no test reaches.
    const FAR: u64 = u64::MAX;

    #[test]
    fn calls_not_answered_are_named_by_the_next_calls_on_their_key_until_one_is_answered() {
        let given_up = GivenUp::default();
        {
            let mut batch = given_up.in_flight();
            let (first, tag) = batch.call("k1", FAR);
            assert!(tag.given_up.is_empty());
            batch.call("k2", FAR);
            batch.answered(first);
        }
        // k2's call was never answered: the next calls on k2 name it, none on k1.
        assert!(given_up.has("k2"));
        assert!(!given_up.has("k1"));
        let next = given_up.tag("k2");
        assert_eq!(next.given_up.len(), 1);
        assert!(next.id > next.given_up[0]);
        assert!(given_up.tag("k1").given_up.is_empty());
        // A call naming it, given up on too: both are named next.
        {
            let mut batch = given_up.in_flight();
            batch.call("k2", FAR);
        }
        let named = given_up.tag("k2").given_up;
        assert_eq!(named.len(), 2);
        assert_eq!(
            Tag {
                id: 9,
                given_up: named.clone()
            }
            .given_up_arg()
            .matches(',')
            .count(),
            1
        );
        // Answered, it clears what it named.
        {
            let mut batch = given_up.in_flight();
            let (i, tag) = batch.call("k2", FAR);
            assert_eq!(tag.given_up, named);
            batch.answered(i);
        }
        assert!(!given_up.has("k2"));
        assert!(given_up.tag("k2").given_up.is_empty());
    }

    #[test]
    fn an_id_given_up_on_after_a_call_was_tagged_stays_to_be_named() {
        let given_up = GivenUp::default();
        {
            let mut batch = given_up.in_flight();
            batch.call("k", FAR);
        }
        let mut answered = given_up.in_flight();
        let (i, _) = answered.call("k", FAR);
        {
            // A call on the key given up on while `answered` was in flight.
            let mut late = given_up.in_flight();
            late.call("k", FAR);
        }
        answered.answered(i);
        drop(answered);
        assert_eq!(given_up.tag("k").given_up.len(), 1, "the later one only");
    }

    #[test]
    fn a_key_expired_is_named_no_more() {
        let given_up = GivenUp::default();
        {
            let mut batch = given_up.in_flight();
            batch.call("gone", 1);
            batch.call("kept", FAR);
        }
        assert!(!given_up.has("gone"), "its window is long over");
        assert!(given_up.has("kept"));
    }

    #[test]
    fn a_key_names_its_newest_ids_only() {
        let given_up = GivenUp::default();
        for _ in 0..NAMED_AT_MOST + 5 {
            let mut batch = given_up.in_flight();
            batch.call("k", FAR);
        }
        let named = given_up.tag("k").given_up;
        assert_eq!(named.len(), NAMED_AT_MOST);
        assert!(named.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(named[0], 6);
    }
}
