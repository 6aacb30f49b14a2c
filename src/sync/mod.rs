//! Fleet-wide limits: the only code that talks to Redis, always off the request path (strict
//! rules aside). Every round it pushes counters' unsynced deltas with HINCRBY, reads the fleet
//! totals back from the replies, and stores them in the counters; counters with no local delta
//! are read back with HMGET. Near a limit a counter is synced every round; far from its limits,
//! on its turn, once every few rounds (`sync_now`, `turn`): Redis work follows the counters in
//! use and those near a limit, not requests. A key's expiry is set on its window's first push
//! (and again if the key was lost mid-window); the `tokens` field is left alone by counters
//! with no token limit. Heartbeats in a sorted set tell each replica the fleet size.
//! When Redis fails, the request path keeps answering under the configured policy, and the
//! deltas are pushed once Redis answers again (if their window is still open).

pub mod store;
pub mod strict;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use clap::ValueEnum;
use redis::RedisError;

use crate::limiter::{Counter, CounterKey, Counts, FleetView, Unit, Window};
use crate::rules::{OVERRIDE_SCOPE, Rule, RuleSet};
use crate::server::App;
pub use store::{Store, StoreAddress};

/// What the request path does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum FailurePolicy {
    /// Enforce `limit / last known fleet size` on this replica's own counts.
    #[default]
    #[value(name = "local_share")]
    LocalShare,
    /// Fail open: allow everything (and keep counting).
    Allow,
    /// Fail closed: deny anything that has a limit.
    Deny,
}

#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub address: StoreAddress,
    /// Prefix of every key, so environments and test runs never see each other's counts.
    pub namespace: String,
    pub interval: Duration,
    /// Sync a counter far from its limits once every this many rounds (1: every round).
    pub quiet_refresh_rounds: u32,
    pub policy: FailurePolicy,
}

/// What the sync task last did: for the admin API and metrics.
#[derive(Debug, Clone, Default)]
pub struct SyncStatus {
    pub reachable: bool,
    /// Replicas seen by their heartbeats, this one included.
    pub replicas: u32,
    pub last_success_ms: Option<u64>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub rounds: u64,
    pub failures: u64,
    /// Duration of the last successful round.
    pub last_round: Duration,
    /// Counters pushed or refreshed in the last successful round.
    pub counters: usize,
}

/// The fleet store as the rest of sluice uses it: its settings, its connection once made, and
/// the sync status.
pub struct Fleet {
    pub settings: SyncSettings,
    store: ArcSwapOption<Store>,
    pub status: ArcSwap<SyncStatus>,
    replica_id: String,
    strict: redis::Script,
}

/// How long after its last heartbeat a replica stops counting in the fleet size.
fn heartbeat_ttl(interval: Duration) -> Duration {
    (interval * 5).max(Duration::from_secs(3))
}

/// Kept past a window's end, so a late push still finds its key.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);

impl Fleet {
    pub fn new(settings: SyncSettings) -> Result<Fleet, RedisError> {
        Store::validate(&settings.address)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "sluice".into());
        Ok(Fleet {
            replica_id: format!("{host}-{}-{nanos:x}", std::process::id()),
            settings,
            store: ArcSwapOption::empty(),
            status: ArcSwap::from_pointee(SyncStatus::default()),
            strict: store::strict_script(),
        })
    }

    /// The store, connecting first if needed.
    pub async fn store(&self) -> Result<Store, RedisError> {
        if let Some(store) = self.store.load_full() {
            return Ok((*store).clone());
        }
        let store = Store::connect(&self.settings.address).await?;
        self.store.store(Some(Arc::new(store.clone())));
        Ok(store)
    }

    fn strict_script(&self) -> &redis::Script {
        &self.strict
    }

    fn timeout(&self) -> Duration {
        self.settings.address.timeout
    }

    /// Whether this replica cannot serve without Redis: with the `deny` policy it refuses
    /// everything limited while Redis is down, so it is not ready.
    pub fn required(&self) -> bool {
        self.settings.policy == FailurePolicy::Deny
    }

    /// The view the request path takes while the store does not answer.
    pub fn outage_view(&self, replicas: u32) -> FleetView {
        match self.settings.policy {
            FailurePolicy::LocalShare => FleetView::LocalShare { replicas },
            FailurePolicy::Allow => FleetView::AllowAll,
            FailurePolicy::Deny => FleetView::DenyAll,
        }
    }

    fn replicas_key(&self) -> String {
        format!("{}:sluice:replicas", self.settings.namespace)
    }

    /// The key of a counter in one window:
    /// `{namespace}:ratelimit:{domain}:{{descriptor path}}:{unit}:{window start}`.
    /// The descriptor path is the hash tag, so all windows of a counter share a cluster slot.
    pub fn counter_key(&self, domain: &str, path: &str, unit: Unit, window: Window) -> String {
        let mut key = String::new();
        self.write_counter_key(&mut key, domain, |out| out.push_str(path), unit, window);
        key
    }

    /// [`Fleet::counter_key`], appended to `out`, the path written by `path`.
    fn write_counter_key(
        &self,
        out: &mut String,
        domain: &str,
        path: impl FnOnce(&mut String),
        unit: Unit,
        window: Window,
    ) {
        use std::fmt::Write;
        out.push_str(&self.settings.namespace);
        out.push_str(":ratelimit:");
        out.push_str(domain);
        out.push_str(":{");
        path(out);
        let _ = write!(out, "}}:{unit}:{}", u64::from(window.0) * unit.seconds());
    }

    /// Sends a heartbeat and counts the replicas alive.
    async fn heartbeat(&self, store: &mut Store, now_ms: u64) -> Result<u32, RedisError> {
        let key = self.replicas_key();
        let ttl = heartbeat_ttl(self.settings.interval).as_millis() as u64;
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD")
            .arg(&key)
            .arg(now_ms)
            .arg(&self.replica_id)
            .ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(format!("({}", now_ms.saturating_sub(ttl)))
            .ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(ttl * 2).ignore();
        pipe.cmd("ZCARD").arg(&key);
        let (replicas,): (u32,) = store.pipeline(&pipe, self.timeout()).await?;
        Ok(replicas.max(1))
    }

    /// Leaves the fleet at shutdown, so the others take up its share at once.
    pub async fn leave(&self) {
        if let Ok(mut store) = self.store().await {
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(self.replicas_key()).arg(&self.replica_id);
            let _: Result<i64, _> = store.command(&cmd, self.timeout()).await;
        }
    }

    fn capacity_key(&self) -> String {
        format!("{}:sluice:capacity", self.settings.namespace)
    }

    /// Announces a capacity reduction to the fleet: kept in a hash (replicas read it every
    /// tick, and a replica that starts later catches up), and published so others apply it now.
    pub async fn announce_capacity(
        &self,
        domain: &str,
        rule: &str,
        a: crate::capacity::Announcement,
    ) -> Result<(), RedisError> {
        let mut store = self.store().await?;
        let field = format!("{domain}\u{1f}{rule}");
        let value = format!("{},{}", a.factor, a.at_ms);
        let mut pipe = redis::pipe();
        pipe.cmd("HSET")
            .arg(self.capacity_key())
            .arg(&field)
            .arg(&value)
            .ignore();
        pipe.cmd("PEXPIRE")
            .arg(self.capacity_key())
            .arg(7 * 86_400_000u64)
            .ignore();
        pipe.cmd("PUBLISH")
            .arg(self.capacity_key())
            .arg(&field)
            .ignore();
        let () = store.pipeline(&pipe, self.timeout()).await?;
        Ok(())
    }

    /// Every capacity announcement the fleet holds.
    pub async fn capacity_announcements(
        &self,
    ) -> Result<Vec<((String, String), crate::capacity::Announcement)>, RedisError> {
        let mut store = self.store().await?;
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(self.capacity_key());
        let all: HashMap<String, String> = store.command(&cmd, self.timeout()).await?;
        Ok(all
            .into_iter()
            .filter_map(|(field, value)| {
                let (domain, rule) = field.split_once('\u{1f}')?;
                let (factor, at) = value.split_once(',')?;
                let a = crate::capacity::Announcement {
                    factor: factor.parse().ok()?,
                    at_ms: at.parse().ok()?,
                };
                Some(((domain.to_string(), rule.to_string()), a))
            })
            .collect())
    }

    /// Wakes `changed` whenever another replica publishes an announcement (single Redis; on a
    /// cluster the hash is read every tick anyway).
    pub async fn follow_capacity(&self, changed: &tokio::sync::Notify) {
        if self.settings.address.cluster {
            return;
        }
        let Some(url) = self.settings.address.urls.first() else {
            return;
        };
        loop {
            let subscribed = async {
                let client = redis::Client::open(url.as_str())?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(self.capacity_key()).await?;
                let mut messages = pubsub.on_message();
                while futures_util::StreamExt::next(&mut messages).await.is_some() {
                    changed.notify_one();
                }
                Ok::<(), RedisError>(())
            };
            if let Err(error) = subscribed.await {
                tracing::debug!(%error, "capacity channel lost; reading the hash every tick meanwhile");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// This fleet's counts of one counter in `window`.
    pub async fn usage(
        &self,
        domain: &str,
        path: &str,
        unit: Unit,
        window: Window,
    ) -> Result<Counts, RedisError> {
        let mut store = self.store().await?;
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.counter_key(domain, path, unit, window))
            .arg("requests")
            .arg("tokens");
        let (requests, tokens): (Option<i64>, Option<i64>) =
            store.command(&cmd, self.timeout()).await?;
        Ok(Counts {
            requests: clamp(requests.unwrap_or(0)),
            tokens: clamp(tokens.unwrap_or(0)),
        })
    }

    /// Deletes every window of one counter in the store (found with SCAN), returning how many
    /// keys went.
    pub async fn reset(&self, domain: &str, path: &str) -> Result<usize, RedisError> {
        let mut store = self.store().await?;
        let prefix = format!("{}:ratelimit:{domain}:{{{path}}}:", self.settings.namespace);
        let pattern = format!("{}*", glob_escape(&prefix));
        let keys = store.scan(&pattern, &prefix, self.timeout()).await?;
        if !keys.is_empty() {
            // One command: the keys share the descriptor path's hash tag, so one cluster slot.
            let mut cmd = redis::cmd("UNLINK");
            cmd.arg(&keys);
            let _: i64 = store.command(&cmd, self.timeout()).await?;
        }
        Ok(keys.len())
    }
}

fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn clamp(n: i64) -> u32 {
    n.clamp(0, i64::from(u32::MAX)) as u32
}

/// Appends a counter's Redis key in `window` to `out`, its descriptor path as
/// `api_key_k1.model_gpt-4o` (overrides: `override.k_v`). False for a counter whose rule is no
/// longer loaded.
fn write_key_of(
    fleet: &Fleet,
    out: &mut String,
    key: &CounterKey,
    rule: Option<&Rule>,
    window: Window,
) -> bool {
    let (unit, mut parts) = (key.unit(), key.parts());
    if key.scope() & OVERRIDE_SCOPE != 0 {
        let Some(domain) = parts.next() else {
            return false;
        };
        let path = |out: &mut String| {
            out.push_str("override");
            while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                out.push('.');
                out.push_str(k);
                out.push('_');
                out.push_str(v);
            }
        };
        fleet.write_counter_key(out, domain, path, unit, window);
        return true;
    }
    let Some(rule) = rule else {
        return false;
    };
    let path = |out: &mut String| push_rule_path(out, rule, parts);
    fleet.write_counter_key(out, &rule.domain, path, unit, window);
    true
}

/// `key_value` per level, joined with dots.
pub fn rule_path<'a>(rule: &Rule, values: impl Iterator<Item = &'a str>) -> String {
    let mut path = String::new();
    push_rule_path(&mut path, rule, values);
    path
}

fn push_rule_path<'a>(out: &mut String, rule: &Rule, values: impl Iterator<Item = &'a str>) {
    for (level, (key, value)) in rule.keys.iter().zip(values).enumerate() {
        if level > 0 {
            out.push('.');
        }
        out.push_str(key);
        out.push('_');
        out.push_str(value);
    }
}

type RulesByScope = HashMap<u64, Arc<Rule>, foldhash::fast::FixedState>;

fn rules_by_scope(rules: &RuleSet) -> RulesByScope {
    rules
        .domains()
        .flat_map(|d| d.rules.iter().map(|r| (r.id, r.clone())))
        .collect()
}

struct Work<'g> {
    counter: &'g Counter,
    /// The configured limits of the counter's window (none for overrides).
    limits: crate::limiter::Limits,
    window: Window,
    /// This replica's counts in `window` when read.
    own: Counts,
    delta: (i64, i64),
    /// Whether the fleet's tokens matter: the window limits them, or this replica counted
    /// some (overrides limit requests only). Otherwise the `tokens` field is neither written
    /// nor read.
    tokens: bool,
    /// Nothing pushed in this window yet: the key may be new and needs its expiry.
    first_push: bool,
    /// Where the key's name is in the batch's `keys`.
    key: std::ops::Range<usize>,
    expire_at_ms: u64,
}

impl Work<'_> {
    /// One command per field: HINCRBY what changed, HGET the rest; HMGET when nothing
    /// changed. A requests-only counter with a delta costs one command a round.
    fn queue(&self, keys: &str, pipe: &mut redis::Pipeline) {
        let key = &keys[self.key.clone()];
        if self.delta == (0, 0) {
            let cmd = pipe.cmd("HMGET").arg(key).arg("requests");
            if self.tokens {
                cmd.arg("tokens");
            }
            return;
        }
        let fields = [("requests", self.delta.0), ("tokens", self.delta.1)];
        for (field, delta) in &fields[..if self.tokens { 2 } else { 1 }] {
            if *delta == 0 {
                pipe.cmd("HGET").arg(key).arg(*field);
            } else {
                pipe.cmd("HINCRBY").arg(key).arg(*field).arg(*delta);
            }
        }
        if self.first_push {
            self.expire(keys, pipe);
        }
    }

    fn expire(&self, keys: &str, pipe: &mut redis::Pipeline) {
        pipe.cmd("PEXPIREAT")
            .arg(&keys[self.key.clone()])
            .arg(self.expire_at_ms)
            .ignore();
    }

    /// The fleet's totals from this counter's replies (fields not read count as this
    /// replica's own).
    fn totals(
        &self,
        replies: &mut impl Iterator<Item = redis::Value>,
    ) -> Result<Counts, RedisError> {
        let mut next = || replies.next().unwrap_or(redis::Value::Nil);
        let (requests, tokens): (Option<i64>, Option<i64>) = if self.delta == (0, 0) {
            let values: Vec<Option<i64>> = redis::FromRedisValue::from_redis_value(next())?;
            (
                values.first().copied().flatten(),
                values.get(1).copied().flatten(),
            )
        } else {
            let requests = redis::FromRedisValue::from_redis_value(next())?;
            let tokens = if self.tokens {
                redis::FromRedisValue::from_redis_value(next())?
            } else {
                None
            };
            (requests, tokens)
        };
        let tokens = if self.tokens {
            tokens.unwrap_or(0)
        } else {
            i64::from(self.own.tokens)
        };
        let requests = requests.unwrap_or(0);
        Ok(Counts {
            requests: clamp(requests),
            tokens: clamp(tokens),
        })
    }

    /// A push that found no key (the total is just this push) outside the window's first
    /// push: the key was lost mid-window (a Redis restart, a flush) and has no expiry now.
    fn recreated(&self, total: Counts) -> bool {
        let fresh = |delta: i64, total: u32| delta > 0 && i64::from(total) == delta;
        !self.first_push
            && (fresh(self.delta.0, total.requests)
                || (self.tokens && fresh(self.delta.1, total.tokens)))
    }
}

/// Pipelines are cut at this many counters, so one round never builds an unbounded request.
const BATCH: usize = 500;

/// Whether a counter is synced this round rather than on its turn (pushed if it has a pending
/// count, else read back): always while its limits are not known here (overrides) or it was
/// never synced; else when the fleet's count with this one's pending part reaches half of a
/// limit (where a stale total could let the fleet past it), or the pending part reaches half
/// of this replica's share of what the fleet has left (past the share it would be refused
/// here). A counter far from its limits can wait: the share cap bounds what any replica admits
/// unseen, however late it syncs.
fn sync_now(
    seen: Counts,
    pending: (i64, i64),
    limits: Option<crate::limiter::Limits>,
    synced_before: bool,
    replicas: u32,
) -> bool {
    let (Some(limits), true) = (limits, synced_before) else {
        return true;
    };
    let near = |limit: Option<u32>, seen: u32, pending: i64| {
        let Some(limit) = limit else { return false };
        let (limit, seen, pending) = (u64::from(limit), u64::from(seen), pending.max(0) as u64);
        (seen + pending) * 2 >= limit
            || pending * 2 * u64::from(replicas.max(1)) >= limit.saturating_sub(seen)
    };
    near(limits.requests, seen.requests, pending.0) || near(limits.tokens, seen.tokens, pending.1)
}

/// Whether this round is the turn of a counter far from its limits: every `every` rounds, at a
/// round set by its key, so the syncs of many such counters spread evenly over the rounds
/// instead of coming all at once. Most counters of a busy fleet are far from their limits:
/// syncing each every round made Redis work follow requests and counters alive, not the
/// counters near a limit.
fn turn(key: &CounterKey, round_no: u32, every: u32) -> bool {
    use std::hash::BuildHasher;
    let spread = foldhash::fast::FixedState::default().hash_one(key) as u32;
    round_no.wrapping_add(spread).is_multiple_of(every.max(1))
}

/// Runs one sync round: heartbeat, then push or refresh every live counter that is due, a batch
/// at a time (the batch's work and key names reuse their buffers).
async fn round(
    app: &App,
    fleet: &Fleet,
    index: &mut (Arc<RuleSet>, RulesByScope),
    round_no: u32,
) -> Result<(u32, usize), RedisError> {
    let mut store = fleet.store().await?;
    let now = app.limiter.clock().now_ms();
    let replicas = fleet.heartbeat(&mut store, now).await?;
    let rules = app.rules.load_full();
    if !Arc::ptr_eq(&rules, &index.0) {
        *index = (rules.clone(), rules_by_scope(&rules));
    }
    let (interval, every) = (fleet.settings.interval, fleet.settings.quiet_refresh_rounds);
    let table = app.limiter.counters().pin_owned();
    let mut entries = table.iter();
    let (mut batch, mut keys) = (Vec::with_capacity(BATCH), String::new());
    let (mut counters, mut overshoot) = (0, 0u32);
    loop {
        batch.clear();
        keys.clear();
        for (key, counter) in entries.by_ref() {
            let unit = key.unit();
            let window = unit.window_at(now);
            let rule = index.1.get(&key.scope()).map(Arc::as_ref);
            let (stamp, local) = counter.local();
            let (pushed_in, pushed) = counter.pushed();
            let own = if stamp == window { local } else { Counts::ZERO };
            let base = if pushed_in == window {
                pushed
            } else {
                Counts::ZERO
            };
            let limits = rule
                .and_then(|rule| match &rule.policy {
                    crate::rules::Policy::Limited(windows) => {
                        windows.iter().find(|w| w.unit == unit)
                    }
                    crate::rules::Policy::Unlimited => None,
                })
                .map(|w| crate::limiter::Limits {
                    requests: w.requests.as_ref().map(|l| l.per_unit),
                    tokens: w.tokens.as_ref().map(|l| l.per_unit),
                })
                .unwrap_or_default();
            let delta = (
                i64::from(own.requests) - i64::from(base.requests),
                i64::from(own.tokens) - i64::from(base.tokens),
            );
            let (seen, synced_in) = counter.last_synced(window);
            // Overrides carry their limits in the request: not known here.
            let known = (key.scope() & OVERRIDE_SCOPE == 0).then_some(limits);
            // A window's last round pushes what is pending, so its fleet total is whole.
            let closing = delta != (0, 0) && unit.until_reset(now) <= interval;
            if !(closing
                || sync_now(seen, delta, known, synced_in.is_some(), replicas)
                || turn(key, round_no, every))
            {
                continue;
            }
            let start = keys.len();
            if !write_key_of(fleet, &mut keys, key, rule, window) {
                continue;
            }
            batch.push(Work {
                limits,
                counter,
                window,
                own,
                delta,
                tokens: limits.tokens.is_some() || own.tokens > 0,
                first_push: pushed_in != window,
                key: start..keys.len(),
                expire_at_ms: (u64::from(window.0) + 1) * unit.millis()
                    + EXPIRY_MARGIN.as_millis() as u64,
            });
            if batch.len() == BATCH {
                break;
            }
        }
        if batch.is_empty() {
            break;
        }
        counters += batch.len();
        let mut pipe = redis::pipe();
        for w in &batch {
            w.queue(&keys, &mut pipe);
        }
        let replies: Vec<redis::Value> = store.pipeline(&pipe, fleet.timeout() * 4).await?;
        let mut replies = replies.into_iter();
        let mut lost = redis::pipe();
        for w in &batch {
            let total = w.totals(&mut replies)?;
            if w.recreated(total) {
                w.expire(&keys, &mut lost);
            }
            w.counter.synced(w.window, w.own, total, round_no);
            // How far past a limit the fleet went: what the accuracy model bounds.
            let past = |limit: Option<u32>, used: u32| limit.map_or(0, |l| used.saturating_sub(l));
            overshoot = overshoot
                .max(past(w.limits.requests, total.requests))
                .max(past(w.limits.tokens, total.tokens));
        }
        if !lost.is_empty() {
            store
                .pipeline::<redis::Value>(&lost, fleet.timeout() * 4)
                .await?;
        }
    }
    app.metrics.overshoot.set(overshoot as f64);
    Ok((replicas, counters))
}

/// Syncs until the task is dropped: every interval, and sooner when a counter has used its
/// share. Failures switch the request path to the failure policy and back.
pub async fn run(app: Arc<App>, fleet: Arc<Fleet>) {
    let interval = fleet.settings.interval;
    let earliest_gap = (interval / 10).max(Duration::from_millis(5));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut index = (Arc::new(RuleSet::default()), RulesByScope::default());
    let mut replicas = 1u32;
    let mut failing_since: Option<Instant> = None;
    let mut last_log: Option<Instant> = None;
    let mut last_round = Instant::now() - interval;
    let mut round_no = 0u32;
    app.limiter.fleet().set(fleet.outage_view(1));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = app.limiter.sync_soon.notified() => {
                let since = last_round.elapsed();
                if since < earliest_gap {
                    tokio::time::sleep(earliest_gap - since).await;
                }
            }
        }
        last_round = Instant::now();
        let started = Instant::now();
        round_no = round_no.wrapping_add(1);
        let result = round(&app, &fleet, &mut index, round_no).await;
        let mut status = (*fleet.status.load_full()).clone();
        status.rounds += 1;
        match result {
            Ok((seen, counters)) => {
                replicas = seen;
                app.metrics
                    .sync_duration
                    .record(started.elapsed().as_secs_f64());
                app.metrics.sync_counters.set(counters as f64);
                app.metrics.fleet_size.set(f64::from(replicas));
                app.metrics.redis_up.set(1.0);
                app.metrics.sync_lag.set(0.0);
                app.limiter.fleet().set(FleetView::Synced { replicas });
                if let Some(since) = failing_since.take() {
                    tracing::info!(down_for = ?since.elapsed(), counters, "Redis answers again; counts pushed");
                }
                status.reachable = true;
                status.replicas = replicas;
                status.last_success_ms = Some(app.limiter.clock().now_ms());
                status.last_error = None;
                status.consecutive_failures = 0;
                status.last_round = started.elapsed();
                status.counters = counters;
            }
            Err(error) => {
                app.limiter.fleet().set(fleet.outage_view(replicas));
                app.metrics.sync_errors.increment(1);
                app.metrics.redis_up.set(0.0);
                if let Some(ok) = status.last_success_ms {
                    let lag = app.limiter.clock().now_ms().saturating_sub(ok);
                    app.metrics.sync_lag.set(lag as f64 / 1000.0);
                }
                let now = Instant::now();
                if failing_since.is_none() {
                    failing_since = Some(now);
                }
                // One line at the start of an outage, then one every 30 s.
                if last_log.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(30))
                    || status.consecutive_failures == 0
                {
                    tracing::error!(%error, failures = status.consecutive_failures + 1, policy = ?fleet.settings.policy, "Redis sync failed; deciding locally");
                    last_log = Some(now);
                }
                status.reachable = false;
                status.failures += 1;
                status.consecutive_failures += 1;
                status.last_error = Some(error.to_string());
                let backoff = interval
                    .saturating_mul(1 << status.consecutive_failures.min(6))
                    .min(Duration::from_secs(2));
                fleet.status.store(Arc::new(status));
                tokio::time::sleep(backoff).await;
                continue;
            }
        }
        fleet.status.store(Arc::new(status));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::CounterRef;
    use crate::rules::{SourceFile, compile_file, override_scope};

    fn fleet() -> Fleet {
        Fleet::new(SyncSettings {
            address: StoreAddress {
                urls: vec!["redis://127.0.0.1:1".into()],
                cluster: false,
                timeout: Duration::from_millis(100),
            },
            namespace: "prod".into(),
            interval: Duration::from_secs(1),
            quiet_refresh_rounds: 8,
            policy: FailurePolicy::default(),
        })
        .unwrap()
    }

    fn key_of(key: &CounterKey, rule: Option<&Rule>) -> Option<String> {
        let mut out = String::from("left alone|");
        let window = key.unit().window_at(1_767_225_600_000);
        write_key_of(&fleet(), &mut out, key, rule, window).then_some(out)
    }

    #[test]
    fn counters_near_a_limit_or_of_unknown_limits_are_read_every_round() {
        let limits = crate::limiter::Limits {
            requests: Some(100),
            tokens: Some(1000),
        };
        let counts = |requests, tokens| Counts { requests, tokens };
        let read = |seen, limits, synced_in: Option<u32>| {
            sync_now(seen, (0, 0), limits, synced_in.is_some(), 3)
        };
        // Well under both limits: left to its turn.
        assert!(!read(counts(49, 499), Some(limits), Some(10)));
        // At half of either limit: every round.
        assert!(read(counts(50, 0), Some(limits), Some(10)));
        assert!(read(counts(0, 500), Some(limits), Some(10)));
        // Limits not known here (an override), or never synced: every round.
        assert!(read(counts(0, 0), None, Some(10)));
        assert!(read(counts(0, 0), Some(limits), None));
        // Unlimited: never near a limit, so its turn alone.
        assert!(!read(counts(9, 9), Some(Default::default()), Some(10)));
    }

    #[test]
    fn pending_counts_wait_only_while_far_from_every_limit() {
        let limits = crate::limiter::Limits {
            requests: Some(120),
            tokens: Some(1000),
        };
        let counts = |requests, tokens| Counts { requests, tokens };
        let push = |seen, pending, limits, synced_in: Option<u32>| {
            sync_now(seen, pending, limits, synced_in.is_some(), 3)
        };
        // 10 of 120 seen, 5 pending: far (half is 60; the share of 110 left is 36).
        assert!(!push(counts(10, 0), (5, 0), Some(limits), Some(4)));
        // Seen and pending together reach half a limit: now.
        assert!(push(counts(50, 0), (10, 0), Some(limits), Some(4)));
        assert!(push(counts(0, 400), (0, 100), Some(limits), Some(4)));
        // Pending reaches half of this replica's share of what is left: (120 - 10) / 3 / 2.
        assert!(!push(counts(10, 0), (18, 0), Some(limits), Some(4)));
        assert!(push(counts(10, 0), (19, 0), Some(limits), Some(4)));
        // Never synced, or limits not known here (an override): now.
        assert!(push(counts(0, 0), (1, 0), Some(limits), None));
        assert!(push(counts(0, 0), (1, 0), None, Some(4)));
        // A refund (negative pending) brings nothing nearer a limit.
        assert!(!push(counts(10, 0), (-5, 0), Some(limits), Some(4)));
        // Unlimited: never near.
        assert!(!push(
            counts(9, 9),
            (9, 9),
            Some(Default::default()),
            Some(4)
        ));
    }

    #[test]
    fn far_counters_take_turns_once_every_n_rounds() {
        let keys: Vec<CounterKey> = (0..800)
            .map(|i| {
                let part = format!("k{i}");
                CounterRef {
                    scope: 7,
                    unit: Unit::Minute,
                    parts: &[part.as_str()],
                }
                .to_key()
            })
            .collect();
        let mut per_round = [0usize; 8];
        for key in &keys {
            let turns: Vec<u32> = (100..116).filter(|&r| turn(key, r, 8)).collect();
            assert_eq!(turns.len(), 2, "once every 8 rounds");
            assert_eq!(turns[1] - turns[0], 8);
            per_round[(turns[0] - 100) as usize] += 1;
        }
        // Spread over the rounds, not all in one: 100 a round on average.
        assert!(
            per_round.iter().all(|&n| (50..=150).contains(&n)),
            "{per_round:?}"
        );
        // Every round when `every` is 1.
        assert!((0..10).all(|r| turn(&keys[0], r, 1)));
    }

    #[test]
    fn counter_keys_name_domain_path_unit_and_window_start() {
        let domain = compile_file(&SourceFile {
            path: "llm.yaml".into(),
            text: "domain: llm\ndescriptors:\n  - key: api_key\n    descriptors:\n      - key: model\n        rate_limit: { unit: minute, requests_per_unit: 5 }\n".into(),
        })
        .unwrap();
        let rule = &domain.rules[0];
        let key = CounterRef {
            scope: rule.id,
            unit: Unit::Minute,
            parts: &["k1", "gpt-4o"],
        }
        .to_key();
        assert_eq!(
            key_of(&key, Some(rule)).as_deref(),
            Some("left alone|prod:ratelimit:llm:{api_key_k1.model_gpt-4o}:minute:1767225600")
        );
        // A rule no longer loaded: no key, nothing written.
        assert_eq!(key_of(&key, None), None);
        let overridden = CounterRef {
            scope: override_scope("llm", ["api_key"]),
            unit: Unit::Hour,
            parts: &["llm", "api_key", "k1"],
        }
        .to_key();
        assert_eq!(
            key_of(&overridden, None).as_deref(),
            Some("left alone|prod:ratelimit:llm:{override.api_key_k1}:hour:1767225600")
        );
        assert_eq!(
            fleet().counter_key("llm", "api_key_k1", Unit::Second, Window(1_767_225_600)),
            "prod:ratelimit:llm:{api_key_k1}:second:1767225600"
        );
    }
}
