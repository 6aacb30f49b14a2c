//! Leases: how a fleet keeps a requests limit exactly while deciding locally. The store holds,
//! for each counter's window, what the fleet has leased of the limit (`requests`), and per
//! replica what it holds (`h:<replica>`), has admitted (`u:<replica>`) and reported in tokens
//! (`t:<replica>`). A replica admits only from what it holds, and one script grants
//! `min(wanted, left)`, so the fleet never admits more than the limit in a window.
//!
//! The sync tops leases up before they run out, sized by the counter's rate; a replica whose
//! lease is spent while the fleet had budget left takes more on the request path (at most a
//! few times a window). Every call sends absolute values (what the replica holds and has
//! counted), never increments, so a call whose answer was lost can be sent again without
//! counting anything twice, and a store that lost its data (a restart) gets back what the
//! replicas hold.

use std::sync::LazyLock;

use redis::{Cmd, RedisError, Script};

use super::Fleet;
use super::given_up::Tag;
use crate::decision::LeaseWant;
use crate::limiter::{Algorithm, Counter, Counts, Limiter, Limits, Stored, Unit, Window};

/// The limit argument: no requests limit on the counter.
pub(super) const NO_LIMIT: i64 = -1;
/// The limit argument: the limit is the one last stored with the key (a limit override,
/// which only requests carry).
pub(super) const STORED_LIMIT: i64 = -2;

/// What a call asks of one of a counter's budgets (requests or tokens).
#[derive(Debug, Clone, Copy)]
pub(super) struct Ask {
    /// The limit in force ([`NO_LIMIT`], [`STORED_LIMIT`]).
    pub limit: i64,
    /// What the replica wants to hold after the call (no more than it holds: no grant).
    pub target: u32,
    /// Give back this many (it has lowered its lease by as much already).
    pub release: u32,
    /// What it must hold at least for the request waiting on it.
    pub need: u32,
    /// What it holds, or has counted if more (requests admitted while the store was away,
    /// tokens reported past the lease by calls already admitted): given back to a store that
    /// lost it, and taken from the fleet's budget.
    pub holding: u32,
    /// What it had counted when the call was made (admitted, or tokens reported): the
    /// counter's lease is raised to it before a grant is added, as the store raises it to
    /// `holding` (not to `holding`: a give-back sent since would be held again).
    pub counted: u32,
}

impl Ask {
    /// Nothing asked of a budget the counter has no limit on.
    pub const NONE: Ask = Ask {
        limit: NO_LIMIT,
        target: 0,
        release: 0,
        need: 0,
        holding: 0,
        counted: 0,
    };
}

/// One call of the lease script for one counter's window.
#[derive(Debug, Clone, Copy)]
pub(super) struct LeaseCall {
    pub requests: Ask,
    pub tokens: Ask,
    /// Store the requests limit with the key (an override's, for the sync to find).
    pub remember_limit: bool,
    /// What this replica has counted in the window: requests admitted, tokens reported
    /// (none: a lease taken ahead of the window, which leaves the counts as they are).
    pub counted: Option<Counts>,
    pub expire_at_ms: u64,
    pub replicas: u32,
    /// A sliding window's: the store weighs the previous window's leases in its grants.
    pub slide: Option<Slide>,
    /// A token bucket's: the store grants from the fleet's bucket.
    pub refill: Option<Refill>,
}

/// How a token bucket kept in leases refills, for the store to keep the fleet's bucket: in
/// ticks of a millisecond (a second for a bucket whose full fill in them passes 2^53), one
/// unit costs `cost` (the unit's length) and the fill drains `drain` (the limit) a tick, as
/// the replica's own bucket does ([`crate::limiter::Algorithm::TokenBucket`]). The call's
/// limit is the burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refill {
    pub cost: u64,
    pub drain: u64,
    /// The time of the call, in ticks.
    pub now: u64,
    /// When the call's window of a second began, in ticks: what it gives back goes back into
    /// the bucket only if the bucket was not full since (then every grant of the window is
    /// still in its fill, and taking it out leaves the bucket as if it was never granted).
    pub window_start: u64,
    /// How long the bucket's key is kept after a call: until the bucket would be full again.
    pub keep_ms: u64,
}

impl Refill {
    /// For a counter judged against `limits`, a call about `window` at `now_ms`; none unless
    /// it is a token bucket kept in leases.
    pub(super) fn of(limits: Limits, window: Window, now_ms: u64) -> Option<Refill> {
        let Algorithm::TokenBucket { burst } = limits.algorithm else {
            return None;
        };
        if limits.refill_ms == 0 {
            return None;
        }
        let rate = limits
            .requests
            .map(u64::from)
            .or(limits.tokens)?
            .clamp(1, u64::from(u32::MAX));
        let tick = crate::rules::bucket_tick_ms(burst, limits.refill_ms);
        let full_ms = (u128::from(burst) * u128::from(limits.refill_ms)).div_ceil(u128::from(rate));
        Some(Refill {
            cost: limits.refill_ms / tick,
            drain: rate,
            now: now_ms / tick,
            window_start: crate::limiter::LEASED_BUCKET_WINDOW.window_start_ms(window) / tick,
            keep_ms: full_ms.min(u128::from(u32::MAX)) as u64
                + super::EXPIRY_MARGIN.as_millis() as u64,
        })
    }

    /// What the fleet's bucket has taken of its burst now (`called`: its limits as a call
    /// names them), from its fill as last stored and when it was last drained (in ticks), as
    /// the lease script reckons it.
    pub(super) fn taken(&self, called: Limits, fill: u64, at: Option<u64>) -> u64 {
        let burst = called
            .requests
            .map(u64::from)
            .or(called.tokens)
            .unwrap_or(0);
        let since = self.now.saturating_sub(at.unwrap_or(self.now));
        let fill = fill.saturating_sub(since.saturating_mul(self.drain));
        let holds = (burst * self.cost).saturating_sub(fill) / self.cost.max(1);
        burst.saturating_sub(holds)
    }

    /// The limits a lease call names: for a token bucket its burst in place of its rate, since
    /// the store's bucket holds no more than that.
    pub(super) fn called(limits: Limits) -> Limits {
        match limits.algorithm {
            Algorithm::TokenBucket { burst } if limits.refill_ms > 0 => Limits {
                requests: limits.requests.map(|_| burst),
                tokens: limits.tokens.map(|_| burst.into()),
                ..limits
            },
            _ => limits,
        }
    }
}

/// Where a call stands in a sliding window, for the store to weigh the previous window: the
/// window's length and how far into it the call is, in one unit of time (milliseconds up to a
/// day's window, seconds beyond, so the store's integer arithmetic stays within 2^53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slide {
    pub length: u64,
    pub elapsed: u64,
    /// The window's length in seconds: its neighbours' keys are this far apart.
    pub step_s: u64,
}

impl Slide {
    /// For a limit counted under `algorithm` in `window` of `unit` at `now_ms` (before the
    /// window: at its start); none unless it is a sliding window.
    pub(super) fn of(
        algorithm: Algorithm,
        unit: Unit,
        window: Window,
        now_ms: u64,
    ) -> Option<Slide> {
        if algorithm != Algorithm::SlidingWindow {
            return None;
        }
        let length_ms = unit.millis();
        let elapsed_ms = now_ms
            .saturating_sub(unit.window_start_ms(window))
            .min(length_ms);
        let tick = if length_ms <= 86_400_000 { 1 } else { 1_000 };
        Some(Slide {
            length: length_ms / tick,
            elapsed: elapsed_ms / tick,
            step_s: length_ms / 1_000,
        })
    }

    /// When a sliding window's key may expire: not before the next window, which weighs it.
    pub(super) fn keeps_until(slide: Option<Slide>, expire_at_ms: u64) -> u64 {
        expire_at_ms + slide.map_or(0, |s| s.step_s * 1_000)
    }
}

/// The script, hashed once: calls name it by its hash.
static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(LEASE_LUA));

/// What the script answers: per budget what the replica holds, what this call granted and
/// what the fleet has leased; and what the fleet has admitted and reported in tokens.
pub(super) type Reply = [i64; 8];

impl LeaseCall {
    /// The call, as an `EVALSHA` of the lease script on `key` for `replica` (a sliding
    /// window's call names the previous and the next window's keys too).
    pub(super) fn command(&self, key: &str, replica: &str, tag: &Tag) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(LEASE.get_hash());
        match (self.slide, self.refill) {
            (Some(slide), _) => cmd
                .arg(3)
                .arg(key)
                .arg(super::keys::neighbour_key(key, -(slide.step_s as i64)))
                .arg(super::keys::neighbour_key(key, slide.step_s as i64)),
            (None, Some(_)) => cmd.arg(2).arg(key).arg(super::keys::bucket_key(key)),
            (None, None) => cmd.arg(1).arg(key),
        };
        cmd.arg(replica)
            .arg(self.counted.map_or(-1, |c| i64::from(c.requests)))
            .arg(
                self.counted
                    .map_or(-1, |c| i64::from(super::narrow(c.tokens))),
            )
            .arg(self.expire_at_ms)
            .arg(self.replicas.max(1))
            .arg(u8::from(self.remember_limit));
        for ask in [self.requests, self.tokens] {
            cmd.arg(ask.limit)
                .arg(ask.target)
                .arg(ask.need)
                .arg(ask.holding)
                .arg(ask.release);
        }
        cmd.arg(tag.id).arg(tag.given_up_arg());
        if let Some(slide) = self.slide {
            cmd.arg(slide.length).arg(slide.elapsed);
        }
        if let Some(refill) = self.refill {
            cmd.arg(refill.cost)
                .arg(refill.drain)
                .arg(refill.now)
                .arg(refill.keep_ms)
                .arg(refill.window_start);
        }
        cmd
    }

    /// Whether this call asks nothing of the store but to be answered: a fixed window's sync
    /// that wants no grant, gives nothing back and names no stored limit. If the store also
    /// holds what the replica last pushed and at least what it holds, the script would write
    /// nothing, and a plain `HMGET` ([`LeaseCall::read_command`]) answers the same for a third
    /// of the commands and none of the script's work. Most syncs of a fleet with many quiet
    /// counters are such reads (a counter's turn, far from its limit, while it is idle).
    pub(super) fn reads_only(&self) -> bool {
        let asks_nothing = |a: Ask| {
            a.limit != STORED_LIMIT
                && a.release == 0
                && a.target <= a.holding
                && a.need <= a.holding
        };
        self.slide.is_none()
            && self.refill.is_none()
            && !self.remember_limit
            && self.counted.is_some()
            && asks_nothing(self.requests)
            && asks_nothing(self.tokens)
    }

    /// A call that [`LeaseCall::reads_only`], as the `HMGET` of the fields the script reads.
    pub(super) fn read_command(key: &str, replica: &str) -> Cmd {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key);
        for prefix in ["h:", "k:", "u:", "t:"] {
            cmd.arg(format!("{prefix}{replica}"));
        }
        cmd.arg("requests").arg("tleased").arg("used").arg("tokens");
        cmd
    }

    /// What the script would have answered a call that [`LeaseCall::reads_only`], from what
    /// [`LeaseCall::read_command`] read; none when the script would have written (the store
    /// lost what this replica pushed or holds, or it was reset): then the call is sent as the
    /// script, which gives it back.
    pub(super) fn reply_of_read(&self, read: &[Option<i64>]) -> Option<Reply> {
        let counted = self.counted?;
        let field = |i: usize| read.get(i).copied().flatten().unwrap_or(0);
        let (held, tokens_held, used, tokens) = (field(0), field(1), field(2), field(3));
        let as_pushed = held >= i64::from(self.requests.holding)
            && tokens_held >= i64::from(self.tokens.holding)
            && used == i64::from(counted.requests)
            && tokens == i64::from(super::narrow(counted.tokens));
        as_pushed.then(|| {
            [
                held,
                0,
                field(4),
                tokens_held,
                0,
                field(5),
                field(6),
                field(7),
            ]
        })
    }

    /// Whether the answer `held`, `leased` (requests) and `admitted` (the fleet's, as pushed)
    /// says this fixed window's requests budget is spent for the rest of the window: all of
    /// it leased, and what is leased but not admitted is this replica's own. A replica gives
    /// back only what it holds unused, and what another pushed as admitted can only grow, so
    /// nothing can come back (a killed replica's lease, unused as last pushed, keeps the
    /// others asking). Windows that fade or refill, and counters with a tokens budget, are
    /// never spent for good.
    fn spent_for_good(&self, held: u32, leased: u32, admitted: u32) -> bool {
        let Some(counted) = self.counted else {
            return false;
        };
        let limit = self.requests.limit;
        let fixed = self.slide.is_none() && self.refill.is_none() && self.tokens.limit == NO_LIMIT;
        let own_unused = i64::from(held) - i64::from(counted.requests);
        let fleet_unused = i64::from(leased) - i64::from(admitted);
        fixed && limit >= 0 && i64::from(leased) >= limit && fleet_unused <= own_unused
    }

    /// What the store answered, as the counter records it.
    pub(super) fn stored(&self, reply: Reply) -> Stored {
        let [
            held,
            granted,
            leased,
            tokens_held,
            tokens_granted,
            tokens_leased,
            used,
            _tokens,
        ] = reply.map(super::clamp);
        Stored {
            pushed: self.counted.unwrap_or(Counts::ZERO),
            fleet: Counts {
                requests: leased,
                tokens: tokens_leased.into(),
            },
            held: Counts {
                requests: held,
                tokens: tokens_held.into(),
            },
            granted: Counts {
                requests: granted,
                tokens: tokens_granted.into(),
            },
            fleet_admitted: used,
            fades: self.slide.is_some() || self.refill.is_some(),
            refills: self.refill.is_some(),
            spent_for_good: self.spent_for_good(held, leased, used),
            tokens_counted: self.tokens.counted.into(),
        }
    }
}

/// What a replica in a fleet may hold of a requests lease unused, once the call waiting on it
/// has taken its need: a 64th of the limit, at least one unit (the script's `most`; the sync
/// lowers a lease leased while its replica saw itself alone to it).
pub(super) fn unused_bound(limit: u32) -> u32 {
    (limit / 64).max(1)
}

/// The lease script. KEYS[1]: the counter's window. ARGV: replica, requests counted, tokens
/// counted (-1: left as they are), expiry (ms since the epoch), replicas, remember the
/// requests limit (1/0); then for requests and for tokens: limit (-1 none, -2 the one
/// stored), target, need, holding, give back this many; then the call's id and the ids of
/// calls this replica gave up on (comma-separated, [`super::given_up`]). Returns, for
/// requests and for tokens, what the replica holds, what this call granted and what the fleet
/// has leased; then what the fleet has admitted and reported in tokens.
///
/// Per budget the store keeps what each replica holds (`h:`, `k:`) and the fleet's total
/// (`requests`, `tleased`); tokens reported past a lease (by calls admitted before it was
/// spent) raise what the replica holds, so they are taken from the fleet's budget too.
///
/// A grant is at most half of what is left shared among the replicas, so that near the end of
/// a window's budget leases shrink and what a replica holds unused is little (with the whole
/// share, 3 replicas offered 1.5x with 80 % on one admitted 196 of 200 a window; with half,
/// 196 to 200); but never less than the request waiting on it needs (`need`). In a fleet, a
/// requests grant also leaves the replica no more than a 64th of the limit unused: what a
/// replica killed held unused is lost to the fleet for the rest of the window (before this
/// bound, 186 to 195 of 200 in the window of a kill; with it, 197 to 200). A replica that
/// sees itself alone may take all that is left of a fixed window's or sliding window's
/// budget: what it holds unused is refused to no one.
///
/// A sliding window's call names three keys: this window's, the previous one's and the next
/// one's, and adds ARGV 19 and 20: the window's length and how far into it the call is. What
/// is left to lease is then the limit less this window's leases and the previous window's,
/// weighed by the share of it still within the last unit (rounded up), and less the next
/// window's leases when that has begun (a grant here would weigh fully at its start). The
/// weight only falls as the window goes on, so what was granted stays within the limit at
/// every later moment. What the fleet has leased is answered with that weight added: the
/// replicas see the fleet's count as the sliding window sees it.
///
/// A token bucket's call names two keys: this second's window and the fleet's bucket (per
/// budget its fill in ticks, when it was last drained and when it was last full), and adds
/// ARGV 19 to 23: what one unit costs, what drains a tick, the time now in ticks, how long to
/// keep the bucket's key, when the call's window began in ticks. The limit is the burst. What
/// is left to lease is what the bucket holds, drained to now; each unit granted (or counted
/// past a lease) fills it by its cost. A grant is spent within its second or given back, so
/// the fleet admits within any span no more than the bucket granted within it and the second
/// before. What goes back leaves the fill only if the bucket was not full since the window
/// began: then every grant of the window is still in the fill, and the bucket is left as if
/// they were never granted; otherwise it is lost (a unit given back after the bucket filled
/// up would be granted twice). A bucket at least half full grants half a replica's share of
/// what it holds whatever was asked (the replica's next calls in its second need no call);
/// nearer empty, what was asked up to a whole share. What the fleet has leased is answered as
/// the burst less what the bucket holds.
pub(super) const LEASE_LUA: &str = r"
local GRANTS_KEPT = 4
local key, me = KEYS[1], ARGV[1]
local used, tokens = tonumber(ARGV[2]), tonumber(ARGV[3])
local replicas = math.max(1, tonumber(ARGV[5]))
local fresh = redis.call('EXISTS', key) == 0
local f = redis.call('HMGET', key, 'h:' .. me, 'k:' .. me, 'u:' .. me, 't:' .. me,
  'requests', 'tleased', 'used', 'tokens', 'limit', 'g:' .. me, 'x:' .. me)
local stored_limit = f[9]
local call, newest_given_up = tonumber(ARGV[17]), tonumber(f[11] or '0')
if call <= newest_given_up then
  -- A call this replica gave up on, named by a later one before it got here (or sent before
  -- one that was): it changes nothing and grants nothing.
  local function n(v) return tonumber(v or '0') end
  return {n(f[1]), 0, n(f[5]), n(f[2]), 0, n(f[6]), n(f[7]), n(f[8])}
end
-- This replica's last grants on the key (`id:requests:tokens`, comma-separated, newest last):
-- those of calls it gave up on are no one's, so they go back. Several are kept because a call
-- given up on may run after others on the key granted (a sync and the request path in flight
-- at once); the oldest falls off past GRANTS_KEPT.
local taken_back, tokens_taken_back = 0, 0
local grants, grants_changed = f[10] or '', false
if ARGV[18] ~= '' then
  local named = {}
  for id in string.gmatch(ARGV[18], '%d+') do
    named[id] = true
    newest_given_up = math.max(newest_given_up, tonumber(id))
  end
  local kept = {}
  for id, g, tg in string.gmatch(grants, '(%d+):(%d+):(%d+)') do
    if named[id] then
      taken_back, tokens_taken_back = taken_back + tonumber(g), tokens_taken_back + tonumber(tg)
      grants_changed = true
    else
      kept[#kept + 1] = id .. ':' .. g .. ':' .. tg
    end
  end
  grants = table.concat(kept, ',')
  redis.call('HSET', key, 'x:' .. me, newest_given_up)
end
local slide = #KEYS == 3
local bucket = #KEYS == 2
-- floor(n / d) for integers a double holds exactly (the quotient's rounding corrected).
local function whole_units(n, d)
  if n <= 0 then return 0 end
  local q = math.floor(n / d)
  if q * d > n then q = q - 1 end
  if (q + 1) * d <= n then q = q + 1 end
  return q
end
-- previous x (length - elapsed) / length, rounded up, in integers a double holds exactly.
local function weighed(total)
  local previous = tonumber(redis.call('HGET', KEYS[2], total) or '0')
  local length, elapsed = tonumber(ARGV[19]), tonumber(ARGV[20])
  local left_of_it = length - elapsed
  local whole = math.floor(previous / length)
  local n = (previous - whole * length) * left_of_it
  local q = math.floor(n / length)
  if q * length > n then q = q - 1 end
  if (q + 1) * length <= n then q = q + 1 end
  if q * length < n then q = q + 1 end
  return whole * left_of_it + q
end
local function lease(field, total, held, leased, at, counted, lost)
  local limit, target, need = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local holding, release = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  if limit == -2 then
    limit = tonumber(stored_limit or '-1')
  elseif at == 7 and ARGV[6] == '1' and tostring(limit) ~= stored_limit then
    redis.call('HSET', key, 'limit', limit)
  end
  local weight, room = 0, limit
  if slide and limit >= 0 then
    weight = weighed(total)
    local next_leased = tonumber(redis.call('HGET', KEYS[3], total) or '0')
    room = math.min(limit - weight, limit - next_leased)
  end
  -- A token bucket's fill, in ticks, drained to now; what is left is what it holds.
  local fill, cost, ticked, full_at = 0, 1, false, -1
  if bucket and limit >= 0 then
    local drain, now = tonumber(ARGV[20]), tonumber(ARGV[21])
    cost = tonumber(ARGV[19])
    local b = redis.call('HMGET', KEYS[2], total, total .. ':at', total .. ':full')
    fill = tonumber(b[1] or '0')
    full_at = tonumber(b[3] or '-1')
    local since = now - tonumber(b[2] or now)
    if since > 0 then
      if fill - since * drain <= 0 then
        -- Full (at the latest now): what was granted before is no longer in its fill.
        fill, full_at = 0, now
        redis.call('HSET', KEYS[2], total .. ':full', now)
      else
        fill = fill - since * drain
      end
      ticked = true
    end
  end
  local function holds()
    return whole_units(limit * cost - fill, cost)
  end
  local function give_back(n)
    leased = redis.call('HINCRBY', key, total, -n)
    held = redis.call('HINCRBY', key, field, -n)
    if bucket and limit >= 0 and full_at < tonumber(ARGV[23]) then
      -- Not full since the window began, so every grant of it is still in the fill, whole:
      -- taking these out leaves the bucket as if they were never granted.
      fill = math.max(0, fill - n * cost)
    end
  end
  lost = math.min(lost, held)
  if lost > 0 then give_back(lost) end
  if holding > held then
    leased = redis.call('HINCRBY', key, total, holding - held)
    fill = fill + (holding - held) * cost
    held = holding
    redis.call('HSET', key, field, held)
  end
  local granted = 0
  release = math.min(release, held)
  if release > 0 then
    give_back(release)
  elseif limit >= 0 and (target > holding or need > holding) then
    -- Sized from what the replica knows it holds, not what the store says: an answer lost on
    -- the way (a timeout) left the store counting a grant the replica never had, and sizing
    -- from the store would refuse it more for the rest of the window. What was lost stays
    -- leased (unused, never admitted twice).
    local left = room - leased
    if bucket then left = holds() end
    if left > 0 then
      local cap = math.max(1, math.ceil(left / (2 * replicas)))
      if slide or (replicas == 1 and not bucket) then
        -- A sliding window's budget opens a little at a time as the previous window's weight
        -- fades: what is left is what opened since the last grant, and the replica asking may
        -- take all it wants of it (a share of it sent each replica back for more at once),
        -- within the 64th it may hold unused (below). A replica alone leaves no other short.
        cap = left
      end
      local most = cap
      if counted and replicas > 1 and not bucket then
        -- In a fleet, what a replica holds of a requests lease unused, once the request
        -- waiting on it has taken what it needs, stays within a 64th of the limit (at least
        -- one unit): a replica killed loses that for the rest of the window, so the others
        -- still admit 98 % of the limit when one dies.
        local unused = holding - math.max(counted, 0)
        most = math.max(1, math.floor(limit / 64)) - unused + math.max(need - holding, 0)
      end
      if bucket and left * 2 >= limit then
        -- A token bucket at least half full grants the share, whatever was asked: the
        -- replica's next calls in the second need no call here.
        most = math.max(cap, target - holding)
        target = holding + cap
      elseif bucket then
        -- Nearer empty, what refilled is what is left, and the replica asking may take its
        -- whole share of it: what it leaves unused goes back into the bucket whole when its
        -- second ends (a bucket near empty was not full since), and half a share sent each
        -- replica back for more at every call.
        cap = math.ceil(left / replicas)
        most = cap
      end
      granted = math.min(left, math.max(math.min(target - holding, cap, most), need - holding))
      if granted > 0 then
        held = redis.call('HINCRBY', key, field, granted)
        leased = redis.call('HINCRBY', key, total, granted)
        fill = fill + granted * cost
      else
        granted = 0
      end
    end
  end
  if bucket and limit >= 0 then
    -- The fleet's count, as a bucket has it: its burst less what it holds.
    redis.call('HSET', KEYS[2], total, fill)
    if ticked or redis.call('HEXISTS', KEYS[2], total .. ':at') == 0 then
      redis.call('HSET', KEYS[2], total .. ':at', ARGV[21])
    end
    redis.call('PEXPIRE', KEYS[2], ARGV[22])
    return held, granted, limit - holds()
  end
  return held, granted, leased + weight
end
local held, granted, leased = lease('h:' .. me, 'requests', tonumber(f[1] or '0'), tonumber(f[5] or '0'), 7, used, taken_back)
local theld, tgranted, tleased = lease('k:' .. me, 'tleased', tonumber(f[2] or '0'), tonumber(f[6] or '0'), 12, nil, tokens_taken_back)
if granted > 0 or tgranted > 0 then
  local all, kept = {}, {}
  for grant in string.gmatch(grants, '[^,]+') do all[#all + 1] = grant end
  for i = math.max(1, #all - GRANTS_KEPT + 2), #all do kept[#kept + 1] = all[i] end
  kept[#kept + 1] = ARGV[17] .. ':' .. granted .. ':' .. tgranted
  redis.call('HSET', key, 'g:' .. me, table.concat(kept, ','))
elseif grants_changed and grants == '' then
  redis.call('HDEL', key, 'g:' .. me)
elseif grants_changed then
  redis.call('HSET', key, 'g:' .. me, grants)
end
local mine_used, mine_tokens = tonumber(f[3] or '0'), tonumber(f[4] or '0')
local all_used, all_tokens = tonumber(f[7] or '0'), tonumber(f[8] or '0')
if used >= 0 and used ~= mine_used then
  redis.call('HSET', key, 'u:' .. me, used)
  all_used = redis.call('HINCRBY', key, 'used', used - mine_used)
end
if tokens >= 0 and tokens ~= mine_tokens then
  redis.call('HSET', key, 't:' .. me, tokens)
  all_tokens = redis.call('HINCRBY', key, 'tokens', tokens - mine_tokens)
end
if fresh and redis.call('EXISTS', key) == 1 then redis.call('PEXPIREAT', key, ARGV[4]) end
return {held, granted, leased, theld, tgranted, tleased, all_used, all_tokens}
";

/// What a counter will admit in the rest of its window at the rate it admitted `spent` in the
/// last `over_ms`: the most a lease should cover, since what a replica holds at the window's
/// end is lost to the fleet.
pub(super) fn rest_of_window(spent: u32, over_ms: u64, unit: Unit, now_ms: u64) -> u32 {
    let left = unit.until_reset(now_ms).as_millis() as u64;
    let projected = u64::from(spent) * left / over_ms.max(1);
    projected.min(u64::from(u32::MAX)) as u32
}

/// The shortest span a window's rate so far is read over: a quarter of a sync interval (or
/// the window, if shorter), so a few calls at a window's start do not read as a burst.
fn shortest_read(unit: Unit, interval: std::time::Duration) -> u64 {
    (interval.as_millis() as u64 / 4).min(unit.millis())
}

/// What a counter will admit in the rest of its window, at the lower of two rates: what it
/// admitted since it last synced (`spent`), and what it admitted in the window so far (`own`),
/// read over a quarter of a sync interval at least. The first follows a change of rate; the
/// second is steadier. A rate read from two calls 37 ms into a per-second window was 1.8
/// times the replica's: it was leased 34 and admitted 30, and the fleet 196 of its 200.
pub(super) fn rest_at_rate(
    counter: &Counter,
    window: Window,
    (own, spent): (u32, u32),
    (unit, interval): (Unit, std::time::Duration),
    now_ms: u64,
) -> u32 {
    let into_window = unit.elapsed_ms(now_ms);
    let since = counter
        .pushed_ago(window, now_ms)
        .map_or(into_window, |ago| ago.min(into_window));
    rest_of_window(spent, since, unit, now_ms).min(rest_of_window(
        own,
        into_window.max(shortest_read(unit, interval)),
        unit,
        now_ms,
    ))
}

/// What a replica asks to hold when a request finds its lease spent: what the request needs,
/// and half as much again as it has admitted in the window so far (so a busy counter asks on
/// the request path a few times a window, the sync topping it up after that), but no more
/// than half of what the rest of the window will use at its rate since its last sync. Half: a
/// lease too small costs one more call to Redis; one too large strands what the replica does
/// not use before the window ends, and the fleet admits that much less.
fn request_path_target(admitted: u32, need: u32, rest: u32) -> u32 {
    let ahead = admitted.min(rest) / 2;
    need.saturating_add(ahead.max(1))
}

/// What a replica alone asks to hold when a request finds its lease spent: what the request
/// needs (`need`, with what the counter admitted in the window), and what the rest of the
/// window will admit at the rate of those. A quiet counter in a long window asked four or
/// five times a window with the fleet's half-again target (100,000 keys a minute, each called
/// 8.6 times against a limit of 6: 61-64 % of the soak's calls leased on the request path).
fn lone_target(need: u32, unit: Unit, interval: std::time::Duration, now_ms: u64) -> u32 {
    let over = unit.elapsed_ms(now_ms).max(shortest_read(unit, interval));
    need.saturating_add(rest_of_window(need, over, unit, now_ms))
}

impl Fleet {
    /// Claims, for each counter of a denied request whose lease ran out, the lease the sync
    /// took ahead of this window (no call to the store); whether any counter now holds lease
    /// it has not used, or another request is asking the store again for a fleet seen spent
    /// (`Counter::mark_fleet_asked`), so the request is decided again before the store is
    /// asked. That
    /// includes a lease the sync claimed a moment ago, after the request was decided: at a
    /// window's start the two race, and the request found nothing left to claim (measured: 3
    /// to 10 request-path calls in 5 window starts with 2 replicas, where 0 were needed).
    pub fn claim_ahead(&self, limiter: &Limiter, wants: &[LeaseWant]) -> bool {
        let now = limiter.clock().now_ms();
        let table = limiter.counters().pin();
        let mut claimed = false;
        for want in wants {
            if let Some(counter) = table.get_owned(&want.counter) {
                let window = want.counter.unit().window_at(now);
                claimed |= counter.claim_ahead(window) > 0
                    || counter.has_unused_lease(window)
                    || want
                        .limits
                        .requests
                        .is_some_and(|limit| counter.mark_fleet_asked(window, limit, now));
            }
        }
        claimed
    }

    /// Of `wants` to take in the background, those no other call is asking the store for
    /// now: a recheck of a spent fleet marks the view read (`Counter::mark_fleet_asked`),
    /// so that the calls refused on it meanwhile do not ask again; a lease running low is
    /// flagged once per grant, and passes.
    pub fn unasked(&self, limiter: &Limiter, mut wants: Vec<LeaseWant>) -> Vec<LeaseWant> {
        let now = limiter.clock().now_ms();
        let table = limiter.counters().pin();
        wants.retain(|want| {
            let window = want.counter.unit().window_at(now);
            table.get_owned(&want.counter).is_some_and(|counter| {
                want.limits
                    .requests
                    .is_none_or(|limit| !counter.mark_fleet_asked(window, limit, now))
            })
        });
        wants
    }

    /// Leases afresh the counters of `wants`, each for a fleet of the replicas given, in one
    /// pipeline (bounded by the Redis timeout): what the request path's queue gathered
    /// (`lease_queue`). Each counter records what the store answered, so the requests waiting
    /// on it can be decided again.
    pub(super) async fn lease_now(
        &self,
        limiter: &Limiter,
        wants: &[(LeaseWant, u32)],
    ) -> Result<(), RedisError> {
        let now = limiter.clock().now_ms();
        // The calls are made with the table unpinned: a pin may not wait on Redis.
        let calls: Vec<(usize, Window, String, LeaseCall)> = {
            let table = limiter.counters().pin();
            wants
                .iter()
                .enumerate()
                .filter_map(|(i, (want, replicas))| {
                    let unit = want.counter.unit();
                    let window = unit.window_at(now);
                    let counter = table.get_owned(&want.counter)?;
                    let mut key = String::new();
                    let rule = want.rule.as_deref();
                    super::keys::write_key_of(self, &mut key, &want.counter, rule, window).then(
                        || {
                            (
                                i,
                                window,
                                key,
                                request_path_call(
                                    counter,
                                    window,
                                    want,
                                    (*replicas, self.settings.interval),
                                    now,
                                ),
                            )
                        },
                    )
                })
                .collect()
        };
        if calls.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        // Calls not answered and recorded (a timeout, this future dropped) are given up on.
        let mut in_flight = self.given_up.in_flight();
        for (_, _, key, call) in &calls {
            let (_, tag) = in_flight.call(key, call.expire_at_ms);
            pipe.add_command(call.command(key, self.replica_field(), tag));
        }
        let mut store = self.store().await?;
        let replies: Vec<Reply> = store
            .pipeline_of_scripts(LEASE_LUA, &pipe, self.timeout())
            .await?;
        let table = limiter.counters().pin();
        for (n, ((i, window, _, call), reply)) in calls.iter().zip(replies).enumerate() {
            let (want, _) = &wants[*i];
            if let Some(counter) = table.get_owned(&want.counter) {
                counter.leased_with_fleet(*window, call.stored(reply), now);
                in_flight.answered(n);
            }
        }
        Ok(())
    }
}

fn request_path_call(
    counter: &Counter,
    window: Window,
    want: &LeaseWant,
    (replicas, interval): (u32, std::time::Duration),
    now_ms: u64,
) -> LeaseCall {
    let (stamp, local) = counter.local();
    let own = if stamp == window { local } else { Counts::ZERO };
    let (pushed_in, pushed) = counter.pushed();
    let pushed = if pushed_in == window {
        pushed
    } else {
        Counts::ZERO
    };
    let unit = want.counter.unit();
    let slide = Slide::of(want.limits.algorithm, unit, window, now_ms);
    let long_window = super::round::leases_ahead(unit, interval);
    // A replica alone strands nothing another replica could use, so in a long fixed window
    // it leases a requests budget for the rest of the window at the counter's rate so far,
    // this call counted ([`lone_target`]). Killed, it strands no more than the counter was on
    // course to admit; a replica that joins is served once the sync lowers the lease to the
    // fleet's bound.
    let lone = replicas == 1 && long_window && want.limits.algorithm.is_fixed();
    // One budget: what the request needs of it (a tokens check, one token of lease left),
    // and half as much again as the counter has used in the window so far. Far from the
    // limit (under half of it leased, as last read) in a long window, a lease stranded at the
    // window's end is refused to no one: sized by the rate alone.
    let ask = |limit: Option<u32>,
               (used, pushed): (u32, u32),
               held: u32,
               need: u32,
               seen,
               whole: bool| {
        let Some(limit) = limit else {
            return Ask::NONE;
        };
        let holding = held.max(used);
        let need = used.saturating_add(need);
        if need <= held {
            // Not this budget's lease that is spent.
            return Ask {
                holding,
                counted: used,
                ..Ask::NONE
            };
        }
        let rest = if !long_window || super::round::near_limit(seen, limit) {
            let spent = used.saturating_sub(pushed);
            rest_at_rate(counter, window, (used, spent), (unit, interval), now_ms)
        } else {
            u32::MAX
        };
        Ask {
            limit: i64::from(limit),
            target: if whole {
                lone_target(need, unit, interval, now_ms)
            } else {
                request_path_target(used, need, rest)
            },
            release: 0,
            need,
            holding,
            counted: used,
        }
    };
    let called = Refill::called(want.limits);
    let held = counter.lease(window);
    // A top-up asks one unit past what the counter holds unused, but no request waits on it:
    // it needs nothing, and the store keeps the lease within its 64th unused.
    let need = if want.top_up {
        held.saturating_sub(own.requests).saturating_add(1)
    } else {
        want.need.requests
    };
    let mut requests = ask(
        called.requests,
        (own.requests, pushed.requests),
        held,
        need,
        counter.fleet_leased_seen(window),
        lone,
    );
    if want.top_up {
        requests.need = 0;
    }
    let tokens = ask(
        called.tokens.map(super::narrow),
        (super::narrow(own.tokens), super::narrow(pushed.tokens)),
        super::narrow(counter.tokens_lease(window)),
        super::narrow(want.need.tokens).max(1),
        counter.fleet_tokens_leased_seen(window),
        false,
    );
    tracing::debug!(
        admitted = own.requests,
        reported = own.tokens,
        until_reset_ms = unit.until_reset(now_ms).as_millis() as u64,
        top_up = want.top_up,
        held,
        into_ms = unit.elapsed_ms(now_ms),
        fleet_seen = ?counter.fleet_leased_seen(window),
        "a lease ran out or runs low: leasing"
    );
    LeaseCall {
        requests,
        tokens,
        remember_limit: want.rule.is_none(),
        // Tokens as last pushed: what is reported since goes with the next sync.
        counted: Some(Counts {
            requests: own.requests,
            tokens: pushed.tokens,
        }),
        expire_at_ms: Slide::keeps_until(slide, super::keys::expiry_ms(unit, window)),
        replicas,
        slide,
        refill: Refill::of(want.limits, window, now_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_rest_of_a_window_is_read_at_a_steady_rate() {
        let counter = Counter::new();
        let (unit, second) = (Unit::Second, Duration::from_secs(1));
        let window = Window(1_000);
        // Two calls 37 ms into a second: read over 250 ms, not 37 (7 more, not 52).
        let now = 1_000 * 1000 + 37;
        assert_eq!(
            rest_at_rate(&counter, window, (2, 2), (unit, second), now),
            7
        );
        // Half way through, 50 admitted: 50 more at that rate.
        let now = 1_000 * 1000 + 500;
        assert_eq!(
            rest_at_rate(&counter, window, (50, 50), (unit, second), now),
            50
        );
        // The lower of the two rates: 10 since the last sync over the window so far is 10.
        assert_eq!(
            rest_at_rate(&counter, window, (50, 10), (unit, second), now),
            10
        );
    }

    #[test]
    fn a_replica_alone_asks_for_the_rest_of_the_window_at_the_counters_rate() {
        let (minute, second) = (Unit::Minute, Duration::from_secs(1));
        let start = 1_000 * 60_000;
        // The first call 1 s into a minute: 59 more at that rate, 60 in all.
        assert_eq!(lone_target(1, minute, second, start + 1_000), 60);
        // Met first 50 s in: nothing more at its rate, the call's own unit.
        assert_eq!(lone_target(1, minute, second, start + 50_000), 1);
        // 5 in the first 30 s (this call counted): 5 more.
        assert_eq!(lone_target(5, minute, second, start + 30_000), 10);
        // At the window's very start the rate is read over a quarter of the interval.
        assert_eq!(lone_target(1, minute, second, start), 1 + 240);
    }

    /// A fixed window's sync of a counter that admitted 3 and holds 4, asking nothing.
    fn quiet_sync() -> LeaseCall {
        LeaseCall {
            requests: Ask {
                limit: 100,
                target: 0,
                release: 0,
                need: 0,
                holding: 4,
                counted: 3,
            },
            tokens: Ask::NONE,
            remember_limit: false,
            counted: Some(Counts {
                requests: 3,
                tokens: 0,
            }),
            expire_at_ms: 0,
            replicas: 3,
            slide: None,
            refill: None,
        }
    }

    #[test]
    fn a_fixed_window_is_spent_for_good_when_no_other_replica_holds_lease_unused() {
        // A limit of 100; this replica admitted 3 and holds 4. The answer: held, granted,
        // leased, tokens held, granted, leased, the fleet's admitted, its tokens.
        let quiet = quiet_sync();
        let answer = |leased, admitted| {
            quiet
                .stored([4, 0, leased, 0, 0, 0, admitted, 0])
                .spent_for_good
        };
        assert!(
            answer(100, 99),
            "all leased; the one unit unused is its own"
        );
        assert!(
            !answer(100, 97),
            "others hold 2 unused, and may give them back"
        );
        assert!(!answer(99, 98), "a unit not leased");
        let spent_for_good = |change: fn(&mut LeaseCall)| {
            let mut call = quiet;
            change(&mut call);
            call.stored([4, 0, 100, 0, 0, 0, 99, 0]).spent_for_good
        };
        assert!(spent_for_good(|_| {}));
        assert!(
            !spent_for_good(|c| {
                c.slide = Slide::of(Algorithm::SlidingWindow, Unit::Minute, Window(1), 0)
            }),
            "a sliding window opens as its previous window fades"
        );
        assert!(
            !spent_for_good(|c| c.tokens.limit = 1_000),
            "a tokens budget too"
        );
        assert!(
            !spent_for_good(|c| c.requests.limit = STORED_LIMIT),
            "a limit not known here"
        );
        assert!(!spent_for_good(|c| c.counted = None), "a lease ahead");
    }

    #[test]
    fn only_a_call_asking_nothing_is_sent_as_a_read() {
        let quiet = quiet_sync();
        assert!(quiet.reads_only());
        let asking = |change: fn(&mut LeaseCall)| {
            let mut call = quiet;
            change(&mut call);
            call.reads_only()
        };
        assert!(!asking(|c| c.requests.target = 5), "a top-up");
        assert!(!asking(|c| c.requests.release = 1), "a give-back");
        assert!(!asking(|c| c.requests.need = 5), "a request waiting");
        assert!(!asking(|c| c.requests.limit = STORED_LIMIT), "an override");
        assert!(!asking(|c| c.remember_limit = true), "a limit to store");
        assert!(!asking(|c| c.counted = None), "a lease ahead");
        assert!(
            !asking(|c| c.slide = Slide::of(Algorithm::SlidingWindow, Unit::Minute, Window(1), 0)),
            "a sliding window (the store weighs the previous window)"
        );
        // Wanting no more than it holds is asking nothing.
        assert!(asking(|c| c.requests.target = 4));
    }

    #[test]
    fn a_grant_is_added_to_what_was_counted_not_to_what_was_held() {
        // Tokens: 240 held, 200 reported when the call was made. The counter raises its lease
        // to the 200 before adding the grant; 240 would hold again what a give-back sent
        // meanwhile returned.
        let mut call = quiet_sync();
        call.tokens = Ask {
            limit: 1_000,
            target: 300,
            release: 0,
            need: 0,
            holding: 240,
            counted: 200,
        };
        let stored = call.stored([4, 0, 40, 245, 5, 500, 31, 200]);
        assert_eq!(stored.tokens_counted, 200);
        assert_eq!(stored.granted.tokens, 5);
        // Requests: what was admitted (the call's counts).
        assert_eq!(stored.pushed.requests, 3);
    }

    #[test]
    fn a_read_answers_as_the_script_only_when_the_store_holds_what_was_pushed() {
        let quiet = quiet_sync();
        // h:, k:, u:, t: of this replica; the fleet's requests, tleased, used, tokens.
        let stored = [Some(4), None, Some(3), None, Some(40), None, Some(31), None];
        assert_eq!(
            quiet.reply_of_read(&stored),
            Some([4, 0, 40, 0, 0, 0, 31, 0])
        );
        // The store holds more for this replica than it knows (a grant whose answer was lost):
        // the script writes nothing either, and answers what the store holds.
        let more = [Some(6), None, Some(3), None, Some(42), None, Some(31), None];
        assert_eq!(quiet.reply_of_read(&more), Some([6, 0, 42, 0, 0, 0, 31, 0]));
        // Lost (a restart, a reset): the script must push it back.
        assert_eq!(quiet.reply_of_read(&[None; 8]), None);
        let unpushed = [Some(4), None, Some(2), None, Some(40), None, Some(30), None];
        assert_eq!(
            quiet.reply_of_read(&unpushed),
            None,
            "admitted 3, the store has 2"
        );
        let short = [Some(3), None, Some(3), None, Some(39), None, Some(31), None];
        assert_eq!(
            quiet.reply_of_read(&short),
            None,
            "holds 4, the store has 3"
        );
    }
}
