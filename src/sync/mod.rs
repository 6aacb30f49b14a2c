//! Fleet-wide limits: the only code that talks to Redis, always off the request path (strict
//! rules, reserves and holds in flight aside: [`strict`]). Every round it pushes counters' unsynced deltas with HINCRBY, reads the fleet
//! totals back from the replies, and stores them in the counters; counters with no local delta
//! are read back with HMGET. Near a limit a counter is synced every round; far from its limits,
//! on its turn, once every few rounds (`sync_now`, `turn`): Redis work follows the counters in
//! use and those near a limit, not requests. A key's expiry is set on its window's first push
//! (and again if the key was lost mid-window); the `tokens` field is left alone by counters
//! with no token limit. Heartbeats in a sorted set tell each replica the fleet size.
//! When Redis fails, the request path keeps answering under the configured policy, and the
//! deltas are pushed once Redis answers again (if their window is still open).

mod capacity;
mod given_up;
mod keys;
mod lease;
mod lease_queue;
mod round;
mod store;
pub mod strict;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use clap::ValueEnum;
use redis::RedisError;

use crate::limiter::{Counts, FleetView, Limiter, Window};
use crate::rules::RuleSet;
use crate::telemetry::SyncMetrics;
pub use store::{Store, StoreAddress, TlsFiles};

/// The lease script, for tests that run it against a real Redis; not a stable interface.
#[doc(hidden)]
pub const LEASE_SCRIPT: &str = lease::LEASE_LUA;

/// A call to the fleet store that failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Redis refused the call, did not answer in time, or could not be reached.
    #[error("Redis: {0}")]
    Redis(#[from] RedisError),
}

/// What the sync task works with: the counters, the rules in force, and its metrics.
#[derive(Clone)]
pub struct SyncHandles {
    pub limiter: Arc<Limiter>,
    pub rules: Arc<ArcSwap<RuleSet>>,
    pub metrics: SyncMetrics,
}

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
    /// Whether the last round reached Redis.
    pub reachable: bool,
    /// Replicas seen by their heartbeats, this one included.
    pub replicas: u32,
    /// When a round last succeeded, in ms since the epoch.
    pub last_success_ms: Option<u64>,
    /// The error of the last failed round, while failing.
    pub last_error: Option<String>,
    /// Rounds failed in a row.
    pub consecutive_failures: u32,
    /// Rounds run.
    pub rounds: u64,
    /// Rounds failed.
    pub failures: u64,
    /// Duration of the last successful round.
    pub last_round: Duration,
    /// Counters pushed or refreshed in the last successful round.
    pub counters: usize,
}

/// The fleet store as the rest of sluice uses it: its settings, its connection once made, and
/// the sync status.
pub struct Fleet {
    /// How and where to sync.
    pub settings: SyncSettings,
    store: ArcSwapOption<Store>,
    /// What the sync task last did.
    pub status: ArcSwap<SyncStatus>,
    replica_id: String,
    /// This replica's name in a counter's fields (`h:<name>`): short, as every counter's
    /// window holds one per replica.
    replica_field: String,
    strict: redis::Script,
    holds: redis::Script,
    sliding: redis::Script,
    bucket: redis::Script,
    /// Lease calls given up on, for the next calls on their keys to name.
    given_up: given_up::GivenUp,
    /// The request path's lease calls, gathered into pipelines.
    lease_queue: lease_queue::LeaseQueue,
    /// Whether a Redis failure on the request path has been logged since the sync last
    /// reached Redis: an outage is told once, not once a call.
    request_path_told: std::sync::atomic::AtomicBool,
}

/// How long after its last heartbeat a replica stops counting in the fleet size.
fn heartbeat_ttl(interval: Duration) -> Duration {
    (interval * 5).max(Duration::from_secs(3))
}

/// Kept past a window's end, so a late push still finds its key (a later one writes to an
/// ended window's key, which no call reads again). Not a whole number of minutes: a minute's
/// keys would then expire together at a later minute's start, just as that minute's new keys
/// all lease at once (100,000 of each in the soak). At 30 s they expire half a minute off the
/// boundaries, and Redis holds a minute window's keys for 1.5 minutes, not 2.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

impl Fleet {
    /// The fleet store of `settings`; the URLs are checked now, a connection made on first use.
    pub fn new(settings: SyncSettings) -> Result<Fleet, RedisError> {
        Store::validate(&settings.address)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "sluice".into());
        let replica_id = format!("{host}-{}-{nanos:x}", std::process::id());
        let replica_field = {
            use std::hash::BuildHasher;
            let hash = foldhash::quality::FixedState::with_seed(0x51u64).hash_one(&replica_id);
            format!("{hash:012x}")[..12].to_string()
        };
        Ok(Fleet {
            replica_id,
            replica_field,
            settings,
            store: ArcSwapOption::empty(),
            status: ArcSwap::from_pointee(SyncStatus::default()),
            strict: store::strict_script(),
            holds: store::holds_script(),
            sliding: store::sliding_script(),
            bucket: store::bucket_script(),
            given_up: given_up::GivenUp::default(),
            lease_queue: lease_queue::LeaseQueue::default(),
            request_path_told: std::sync::atomic::AtomicBool::new(false),
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

    fn replica_field(&self) -> &str {
        &self.replica_field
    }

    fn strict_script(&self) -> &redis::Script {
        &self.strict
    }

    fn holds_script(&self) -> &redis::Script {
        &self.holds
    }

    fn sliding_script(&self) -> &redis::Script {
        &self.sliding
    }

    fn bucket_script(&self) -> &redis::Script {
        &self.bucket
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
    /// Queues a heartbeat on `pipe`, whose one reply is the number of replicas alive.
    fn queue_heartbeat(&self, pipe: &mut redis::Pipeline, now_ms: u64) {
        let key = self.replicas_key();
        let ttl = heartbeat_ttl(self.settings.interval).as_millis() as u64;
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
    }

    /// Logs a Redis failure on the request path (`what` failed): at warn the first time since
    /// the sync last reached Redis, at debug after, so an outage is told once, not once a
    /// call.
    pub fn request_path_failed(&self, what: &str, error: &dyn std::fmt::Display) {
        let told = self
            .request_path_told
            .swap(true, std::sync::atomic::Ordering::Relaxed);
        if told {
            tracing::debug!(%error, "{what}: Redis failed on the request path");
        } else {
            tracing::warn!(%error, policy = ?self.settings.policy, "{what}: Redis failed on the request path; deciding by the failure policy (told once, until Redis answers the sync again)");
        }
    }

    /// Pushes every counter's counts and gives back what its leases hold unused (at shutdown).
    pub async fn give_back(&self, handles: &SyncHandles) {
        let mut index = round::RuleIndex::default();
        let replicas = self.status.load().replicas.max(1);
        let round = round::round(
            handles,
            self,
            &mut index,
            (None, replicas),
            round::Mode::Leaving,
        );
        if let Err(error) = round.await {
            tracing::warn!(%error, "could not give the leases back to Redis; they lapse with their windows");
        }
    }

    /// Leaves the fleet at shutdown: pushes the last counts, gives back what its leases hold
    /// unused, and drops out of the fleet size, so the others take up its share at once.
    pub async fn leave(&self, handles: &SyncHandles) {
        self.give_back(handles).await;
        if let Ok(mut store) = self.store().await {
            let mut cmd = redis::cmd("ZREM");
            cmd.arg(self.replicas_key()).arg(&self.replica_id);
            let _: Result<i64, _> = store.command(&cmd, self.timeout()).await;
        }
    }

    /// This fleet's counts of one counter of `rule_window` in `window` (at a capacity factor
    /// of `scale` millionths, at `now_ms`). For a token bucket, what the fleet's bucket has
    /// taken of its burst now, as its grants drained it.
    pub async fn usage(
        &self,
        domain: &str,
        path: &str,
        (rule_window, scale): (&crate::rules::RuleWindow, u32),
        window: Window,
        now_ms: u64,
    ) -> Result<Counts, SyncError> {
        let mut store = self.store().await?;
        let mut cmd = redis::cmd("HMGET");
        let mut key = String::new();
        let limits = rule_window.in_force(scale, |_| true);
        if let Some(refill) = lease::Refill::of(limits, window, now_ms) {
            let path = |out: &mut String| out.push_str(path);
            let kind = keys::key_kind(rule_window);
            let unit = rule_window.counter_unit();
            self.write_counter_key(&mut key, domain, path, (&kind, unit), window);
            let total = if limits.tokens.is_some() {
                "tleased"
            } else {
                "requests"
            };
            cmd.arg(keys::bucket_key(&key))
                .arg(total)
                .arg(format!("{total}:at"));
            let (fill, at): (Option<u64>, Option<u64>) =
                store.command(&cmd, self.timeout()).await?;
            let taken = refill.taken(lease::Refill::called(limits), fill.unwrap_or(0), at);
            return Ok(if limits.tokens.is_some() {
                Counts {
                    requests: 0,
                    tokens: taken,
                }
            } else {
                Counts {
                    requests: clamp(taken as i64),
                    tokens: 0,
                }
            });
        }
        let kind = keys::key_kind(rule_window);
        // A bucket settled in the store call by call: its one key's fill, drained to now.
        if let crate::limiter::Algorithm::TokenBucket { burst } = limits.algorithm
            && !limits.leased
        {
            let path = |out: &mut String| out.push_str(path);
            let unit = rule_window.counter_unit();
            self.write_counter_key(&mut key, domain, path, (&kind, unit), Window(0));
            cmd.arg(key).arg("fill").arg("at");
            let (fill, at): (Option<u64>, Option<u64>) =
                store.command(&cmd, self.timeout()).await?;
            let Some((rate, _, tokens)) =
                crate::limiter::one_measure(limits, Counts::ZERO, unit.millis())
            else {
                return Ok(Counts::ZERO);
            };
            let (tick, _) = crate::limiter::bucket_terms(rate);
            let now = now_ms / tick;
            let drained =
                u64::from(rate.limit).saturating_mul(now.saturating_sub(at.unwrap_or(now)));
            let fill = u128::from(fill.unwrap_or(0).saturating_sub(drained));
            let (used, _) = crate::limiter::bucket_standing(fill, now_ms, rate, burst, None);
            return Ok(Counts::in_slot(used, tokens));
        }
        let earlier_key = (limits.algorithm == crate::limiter::Algorithm::InFlight).then(|| {
            let mut previous = String::new();
            let before = Window(window.0.saturating_sub(1));
            let path = |out: &mut String| out.push_str(path);
            let unit = rule_window.counter_unit();
            self.write_counter_key(&mut previous, domain, path, (&kind, unit), before);
            previous
        });
        let path = |out: &mut String| out.push_str(path);
        self.write_counter_key(
            &mut key,
            domain,
            path,
            (&kind, rule_window.counter_unit()),
            window,
        );
        // Holds in flight count in this window and the one before (taken call by call).
        if let Some(previous) = earlier_key {
            cmd.arg(key).arg("used");
            let (current,): (Option<i64>,) = store.command(&cmd, self.timeout()).await?;
            let mut get = redis::cmd("HGET");
            get.arg(previous).arg("used");
            let earlier: Option<i64> = store.command(&get, self.timeout()).await?;
            return Ok(Counts {
                requests: clamp(current.unwrap_or(0).saturating_add(earlier.unwrap_or(0))),
                tokens: 0,
            });
        }
        // What the fleet admitted, not what it leased: as of each replica's last sync.
        cmd.arg(key).arg("used").arg("tokens");
        let (requests, tokens): (Option<i64>, Option<i64>) =
            store.command(&cmd, self.timeout()).await?;
        Ok(Counts {
            requests: clamp(requests.unwrap_or(0)),
            // Whole: a budget above 32 bits is counted here by its strict script.
            tokens: tokens.and_then(|t| u64::try_from(t).ok()).unwrap_or(0),
        })
    }

    /// Deletes every window of one counter in the store (found with SCAN), returning how many
    /// keys went.
    pub async fn reset(&self, domain: &str, path: &str) -> Result<usize, SyncError> {
        let mut store = self.store().await?;
        let mut prefix = String::new();
        self.write_counter_prefix(&mut prefix, domain, path);
        let pattern = format!("{}*", keys::glob_escape(&prefix));
        let keys = store.scan(&pattern, &prefix, self.timeout()).await?;
        if !keys.is_empty() {
            // One command: the keys share the descriptor path's hash tag, so one cluster slot.
            let mut cmd = redis::cmd("UNLINK");
            cmd.arg(&keys);
            let _: i64 = store.command(&cmd, self.timeout()).await?;
        }
        // The other replicas forget their counts and leases of it too, or their next syncs
        // would give the store back what they hold. The message names the keys' prefix: a
        // hash, never a caller's value.
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(self.resets_channel()).arg(&prefix);
        let _: i64 = store.command(&publish, self.timeout()).await?;
        // A sync already on its way when the reset came (here or elsewhere) writes the old
        // counts back: once those have landed (a round is bounded by 4 timeouts), clear again.
        tokio::time::sleep((self.timeout() * 4).min(Duration::from_secs(2))).await;
        let again = store.scan(&pattern, &prefix, self.timeout()).await?;
        if !again.is_empty() {
            let mut cmd = redis::cmd("UNLINK");
            cmd.arg(&again);
            let _: i64 = store.command(&cmd, self.timeout()).await?;
        }
        Ok(keys.len())
    }

    fn resets_channel(&self) -> String {
        format!("{}:sluice:resets", self.settings.namespace)
    }

    /// Forgets, on this replica, every counter whose keys in the store start with `prefix`:
    /// its counts and its leases. Returns how many went.
    pub fn forget(&self, handles: &SyncHandles, prefix: &str) -> usize {
        let rules = handles.rules.load();
        let by_scope: std::collections::HashMap<u64, &crate::rules::Rule> = rules
            .domains()
            .flat_map(|d| d.rules.iter())
            .flat_map(|r| r.counter_scopes().map(move |s| (s, &**r)))
            .collect();
        let mut name = String::new();
        handles.limiter.counters().remove_where(|key| {
            name.clear();
            let rule = by_scope.get(&key.scope()).copied();
            keys::write_key_of(self, &mut name, key, rule, Window(0)) && name.starts_with(prefix)
        })
    }

    /// Forgets what other replicas reset, as their announcements arrive.
    async fn follow_resets(&self, handles: &SyncHandles) {
        let forget = |message: redis::Msg| {
            if let Ok(prefix) = message.get_payload::<String>() {
                let forgotten = self.forget(handles, &prefix);
                tracing::info!(forgotten, "another replica reset a counter; forgotten here");
            }
        };
        self.follow_channel(
            self.resets_channel(),
            forget,
            "reset channel lost; subscribing again",
        )
        .await;
    }

    /// Hands every message published on `channel` to `on_message`, subscribing again a second
    /// after the subscription is lost (logged as `lost`), on the one Redis, a cluster's nodes
    /// in turn, or the master the Sentinels name (see [`Store::subscriber`]).
    async fn follow_channel(
        &self,
        channel: String,
        mut on_message: impl FnMut(redis::Msg),
        lost: &'static str,
    ) {
        for attempt in 0.. {
            let subscribed = async {
                let store = self.store().await?;
                let client = store.subscriber(&self.settings.address, attempt).await?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                let mut messages = pubsub.on_message();
                while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
                    on_message(message);
                }
                Ok::<(), RedisError>(())
            };
            if let Err(error) = subscribed.await {
                tracing::debug!(%error, "{lost}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

fn clamp(n: i64) -> u32 {
    n.clamp(0, i64::from(u32::MAX)) as u32
}

/// A tokens count or limit as the store's leases take it: 32-bit, for the rule compiler keeps
/// a tokens budget above that (a wide counter) away from a fleet store.
use crate::limiter::saturating_u32 as narrow;

/// Syncs until the task is dropped: every interval, and sooner when a counter has used its
/// share. Failures switch the request path to the failure policy and back.
pub async fn run(handles: SyncHandles, fleet: Arc<Fleet>) {
    tokio::join!(sync(&handles, &fleet), fleet.follow_resets(&handles));
}

/// The sync loop of [`run`].
async fn sync(handles: &SyncHandles, fleet: &Arc<Fleet>) {
    let (limiter, metrics) = (&handles.limiter, &handles.metrics);
    let wanted = Arc::new(tokio::sync::Notify::new());
    let wake = wanted.clone();
    limiter.on_denial_while_synced(move || wake.notify_one());
    let interval = fleet.settings.interval;
    limiter.set_sync_interval(interval);
    let earliest_gap = (interval / 10).max(Duration::from_millis(5));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut index = round::RuleIndex::default();
    let mut replicas = 1u32;
    let mut failing_since: Option<Instant> = None;
    let mut last_log: Option<Instant> = None;
    let mut last_round = Instant::now() - interval;
    // Counts the rounds of the interval only: quiet counters take their turns on those, so
    // their syncs follow time, not how often denials wake the sync.
    let mut tick_no = 0u32;
    limiter.fleet().set(fleet.outage_view(1));
    loop {
        let ticked = tokio::select! {
            _ = ticker.tick() => true,
            _ = wanted.notified() => {
                let since = last_round.elapsed();
                if since < earliest_gap {
                    tokio::time::sleep(earliest_gap - since).await;
                }
                false
            }
        };
        last_round = Instant::now();
        let started = Instant::now();
        if ticked {
            tick_no = tick_no.wrapping_add(1).max(1);
        }
        let result = round::round(
            handles,
            fleet,
            &mut index,
            (ticked.then_some(tick_no), replicas),
            round::Mode::Serving,
        )
        .await;
        let mut status = (*fleet.status.load_full()).clone();
        status.rounds += 1;
        match result {
            Ok((seen, counters)) => {
                replicas = seen;
                metrics.duration.record(started.elapsed().as_secs_f64());
                metrics.counters.set(counters as f64);
                metrics.fleet_size.set(f64::from(replicas));
                metrics.redis_up.set(1.0);
                metrics.lag.set(0.0);
                limiter.fleet().set(FleetView::Synced { replicas });
                fleet
                    .request_path_told
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                if let Some(since) = failing_since.take() {
                    tracing::info!(down_for = ?since.elapsed(), counters, "Redis answers again; counts pushed");
                }
                status.reachable = true;
                status.replicas = replicas;
                status.last_success_ms = Some(limiter.clock().now_ms());
                status.last_error = None;
                status.consecutive_failures = 0;
                status.last_round = started.elapsed();
                status.counters = counters;
            }
            Err(error) => {
                limiter.fleet().set(fleet.outage_view(replicas));
                metrics.errors.increment(1);
                metrics.redis_up.set(0.0);
                if let Some(ok) = status.last_success_ms {
                    let lag = limiter.clock().now_ms().saturating_sub(ok);
                    metrics.lag.set(lag as f64 / 1000.0);
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
