//! The fleet store: a single Redis or a Redis Cluster, behind one small interface. Every call
//! has a timeout; reconnection with backoff is the redis crate's.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisResult, Script, ScriptInvocation};

/// Where the fleet's counts live.
#[derive(Debug, Clone)]
pub struct StoreAddress {
    /// One `redis://` or `rediss://` URL, or several cluster seed URLs.
    pub urls: Vec<String>,
    pub cluster: bool,
    /// Bound on every call.
    pub timeout: Duration,
}

#[derive(Clone)]
pub enum Store {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

fn timed_out(after: Duration) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer from Redis within {after:?}"),
    ))
}

async fn bounded<T>(after: Duration, call: impl Future<Output = RedisResult<T>>) -> RedisResult<T> {
    tokio::time::timeout(after, call)
        .await
        .unwrap_or_else(|_| Err(timed_out(after)))
}

impl Store {
    /// Checks the URLs now. A single Redis is connected lazily (sluice starts while it is down);
    /// a cluster is connected by [`Store::connect`].
    pub fn validate(address: &StoreAddress) -> RedisResult<()> {
        if address.cluster {
            ClusterClient::new(address.urls.clone()).map(drop)
        } else {
            match address.urls.as_slice() {
                [url] => redis::Client::open(url.as_str()).map(drop),
                _ => Err(RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "give one Redis URL, or several with --redis-cluster",
                ))),
            }
        }
    }

    pub async fn connect(address: &StoreAddress) -> RedisResult<Store> {
        if address.cluster {
            let client = ClusterClient::builder(address.urls.clone())
                .connection_timeout(address.timeout)
                .response_timeout(address.timeout)
                .build()?;
            let connection = bounded(address.timeout * 4, client.get_async_connection()).await?;
            return Ok(Store::Cluster(connection));
        }
        let url = address.urls.first().map(String::as_str).unwrap_or_default();
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(address.timeout))
            .set_response_timeout(Some(address.timeout))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2));
        Ok(Store::Single(ConnectionManager::new_lazy_with_config(
            client, config,
        )?))
    }

    pub async fn pipeline<T: FromRedisValue>(
        &mut self,
        pipe: &Pipeline,
        timeout: Duration,
    ) -> RedisResult<T> {
        match self {
            Store::Single(c) => bounded(timeout, pipe.query_async(c)).await,
            Store::Cluster(c) => bounded(timeout, pipe.query_async(c)).await,
        }
    }

    pub async fn command<T: FromRedisValue>(
        &mut self,
        cmd: &Cmd,
        timeout: Duration,
    ) -> RedisResult<T> {
        match self {
            Store::Single(c) => bounded(timeout, cmd.query_async(c)).await,
            Store::Cluster(c) => bounded(timeout, cmd.query_async(c)).await,
        }
    }

    /// Runs a script by its hash, loading it again when Redis answers NOSCRIPT (after a restart
    /// or SCRIPT FLUSH).
    pub async fn script<T: FromRedisValue>(
        &mut self,
        invocation: &ScriptInvocation<'_>,
        timeout: Duration,
    ) -> RedisResult<T> {
        match self {
            Store::Single(c) => bounded(timeout, invocation.invoke_async(c)).await,
            Store::Cluster(c) => bounded(timeout, invocation.invoke_async(c)).await,
        }
    }

    /// Every key matching `pattern`, found with SCAN (never KEYS). `slot_key` names the
    /// cluster slot all matches live in: they share its hash tag.
    pub async fn scan(
        &mut self,
        pattern: &str,
        slot_key: &str,
        timeout: Duration,
    ) -> RedisResult<Vec<String>> {
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, batch): (u64, Vec<String>) = match self {
                Store::Single(c) => bounded(timeout, cmd.query_async(c)).await?,
                Store::Cluster(c) => {
                    let route = Route::with_key(slot_key, SlotAddr::Master);
                    let routing =
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route));
                    let value = bounded(timeout, c.route_command(cmd, routing)).await?;
                    FromRedisValue::from_redis_value(value)?
                }
            };
            keys.extend(batch);
            if next == 0 {
                return Ok(keys);
            }
            cursor = next;
        }
    }
}

/// Atomically checks and takes a charge from the counter at `KEYS[1]`.
/// ARGV: requests charge, requests limit (-1: none), tokens charge, tokens limit (-1: none),
/// expiry (ms since the epoch). A charge of 0 only checks; negative charges give back, never
/// below zero. Returns the counts after the call and 1 if the charge was taken, 0 if refused.
pub fn strict_script() -> Script {
    Script::new(
        r"
local function over(used, charge, limit)
  if limit < 0 then return false end
  if charge == 0 then return used >= limit end
  return used + charge > limit
end
local r = tonumber(redis.call('HGET', KEYS[1], 'requests') or '0')
local t = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0')
local cr, lr, ct, lt = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if cr < 0 or ct < 0 then
  r = math.max(0, r + cr)
  t = math.max(0, t + ct)
  redis.call('HSET', KEYS[1], 'requests', r, 'tokens', t)
  redis.call('PEXPIREAT', KEYS[1], ARGV[5])
  return {r, t, 1}
end
if over(r, cr, lr) or over(t, ct, lt) then
  return {r, t, 0}
end
if cr > 0 then r = redis.call('HINCRBY', KEYS[1], 'requests', cr) end
if ct > 0 then t = redis.call('HINCRBY', KEYS[1], 'tokens', ct) end
if cr > 0 or ct > 0 then redis.call('PEXPIREAT', KEYS[1], ARGV[5]) end
return {r, t, 1}
",
    )
}
