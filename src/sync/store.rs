//! The fleet store: a single Redis, a Redis Cluster or the master of a Sentinel set, behind one
//! small interface. Every call
//! has a timeout; reconnection with backoff is the redis crate's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, ClientTlsConfig, ConnectionInfo, IntoConnectionInfo, TlsCertificates,
};
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisResult, Script, ScriptInvocation};

/// Where the fleet's counts live.
#[derive(Debug, Clone)]
pub struct StoreAddress {
    /// One `redis://` or `rediss://` URL, or several cluster seed URLs, or the Sentinels'.
    pub urls: Vec<String>,
    pub cluster: bool,
    /// The URLs are Redis Sentinels; the store is the master they name this.
    pub sentinel_master: Option<String>,
    /// Certificates for `rediss://`, in place of the system's roots and with a client cert.
    pub tls: TlsFiles,
    /// Bound on every call.
    pub timeout: Duration,
}

/// PEM files for TLS to Redis; each is optional.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// The CA that signs the server's certificate.
    pub ca: Option<PathBuf>,
    /// sluice's client certificate and its key (mutual TLS).
    pub client: Option<(PathBuf, PathBuf)>,
}

impl TlsFiles {
    fn any(&self) -> bool {
        self.ca.is_some() || self.client.is_some()
    }

    /// The files' contents, read now (so a rotated file applies at the next connection).
    fn read(&self) -> RedisResult<TlsCertificates> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| {
                RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "cannot read a Redis TLS file",
                    format!("{}: {e}", path.display()),
                ))
            })
        };
        Ok(TlsCertificates {
            client_tls: match &self.client {
                Some((cert, key)) => Some(ClientTlsConfig {
                    client_cert: read(cert)?,
                    client_key: read(key)?,
                }),
                None => None,
            },
            root_cert: self.ca.as_ref().map(read).transpose()?,
        })
    }
}

#[derive(Clone)]
pub enum Store {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelStore>),
}

/// The master a set of Sentinels names, connected on demand: a call that fails for want of
/// a master (connection lost, `READONLY` from a demoted one) drops the connection, and the next
/// call asks the Sentinels again, so the store follows a failover.
pub struct SentinelStore {
    client: tokio::sync::Mutex<SentinelClient>,
    connection: std::sync::Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
}

impl SentinelStore {
    async fn connection(&self) -> RedisResult<MultiplexedConnection> {
        if let Some(c) = self
            .connection
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(c);
        }
        let mut client = self.client.lock().await;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let connection = bounded(
            self.timeout * 2,
            client.get_async_connection_with_config(&config),
        )
        .await?;
        *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = Some(connection.clone());
        Ok(connection)
    }

    /// Forgets the master after an error that may mean it moved.
    fn after<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &result
            && (e.is_io_error()
                || e.is_connection_dropped()
                || e.is_timeout()
                || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly))
        {
            *self.connection.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        result
    }
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
        if address.sentinel_master.is_some() {
            return address
                .urls
                .iter()
                .try_for_each(|url| redis::Client::open(url.as_str()).map(drop));
        }
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
        if let Some(master) = &address.sentinel_master {
            return Store::sentinel(address, master);
        }
        if address.cluster {
            let mut builder = ClusterClient::builder(address.urls.clone())
                .connection_timeout(address.timeout)
                .response_timeout(address.timeout);
            if address.tls.any() {
                builder = builder.certs(address.tls.read()?);
            }
            let client = builder.build()?;
            let connection = bounded(address.timeout * 4, client.get_async_connection()).await?;
            return Ok(Store::Cluster(connection));
        }
        let url = address.urls.first().map(String::as_str).unwrap_or_default();
        let client = client_for(address, url)?;
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

    /// The master named `master` by the Sentinels at `address.urls`. The master's password
    /// and TLS are those of the first URL, which is also how the Sentinels are reached.
    fn sentinel(address: &StoreAddress, master: &str) -> RedisResult<Store> {
        let infos = address
            .urls
            .iter()
            .map(|url| url.as_str().into_connection_info())
            .collect::<RedisResult<Vec<ConnectionInfo>>>()?;
        let first = infos.first().ok_or_else(|| {
            RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Sentinel address"))
        })?;
        let redis = first.redis_settings();
        let mut builder = SentinelClientBuilder::new(
            infos.iter().map(|i| i.addr().clone()),
            master,
            SentinelServerType::Master,
        )?;
        if let Some(user) = redis.username() {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = redis.password() {
            builder = builder.set_client_to_redis_password(password);
        }
        if matches!(first.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            builder = builder
                .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
            if address.tls.any() {
                builder = builder
                    .set_client_to_redis_certificates(address.tls.read()?)
                    .set_client_to_sentinel_certificates(address.tls.read()?);
            }
        }
        Ok(Store::Sentinel(Arc::new(SentinelStore {
            client: tokio::sync::Mutex::new(builder.build()?),
            connection: std::sync::Mutex::new(None),
            timeout: address.timeout,
        })))
    }

    /// A client to subscribe with (pub/sub takes a connection of its own): the one Redis; on
    /// a cluster, the seed node `attempt` picks (a message published on any node reaches the
    /// subscribers of every node, so one node is enough, and the next is tried when it fails);
    /// with Sentinels, the master they name now.
    pub async fn subscriber(
        &self,
        address: &StoreAddress,
        attempt: usize,
    ) -> RedisResult<redis::Client> {
        if let Store::Sentinel(sentinel) = self {
            return sentinel.client.lock().await.async_get_client().await;
        }
        let url = address
            .urls
            .get(attempt % address.urls.len().max(1))
            .ok_or_else(|| {
                RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis URL"))
            })?;
        client_for(address, url)
    }

    pub async fn pipeline<T: FromRedisValue>(
        &mut self,
        pipe: &Pipeline,
        timeout: Duration,
    ) -> RedisResult<T> {
        match self {
            Store::Single(c) => bounded(timeout, pipe.query_async(c)).await,
            Store::Cluster(c) => bounded(timeout, pipe.query_async(c)).await,
            Store::Sentinel(s) => {
                let mut c = s.connection().await?;
                s.after(bounded(timeout, pipe.query_async(&mut c)).await)
            }
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
            Store::Sentinel(s) => {
                let mut c = s.connection().await?;
                s.after(bounded(timeout, cmd.query_async(&mut c)).await)
            }
        }
    }

    /// Runs a pipeline of `EVALSHA` calls of the script whose text is `code`; when Redis
    /// answers NOSCRIPT (after a restart or SCRIPT FLUSH) loads it and runs the pipeline again.
    /// Only for calls that may run twice: the scripts sent this way take absolute values.
    pub async fn pipeline_of_scripts<T: FromRedisValue>(
        &mut self,
        code: &str,
        pipe: &Pipeline,
        timeout: Duration,
    ) -> RedisResult<T> {
        match self.pipeline(pipe, timeout).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let mut load = redis::cmd("SCRIPT");
                load.arg("LOAD").arg(code);
                let _: redis::Value = self.command(&load, timeout).await?;
                self.pipeline(pipe, timeout).await
            }
            other => other,
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
            Store::Sentinel(s) => {
                let mut c = s.connection().await?;
                s.after(bounded(timeout, invocation.invoke_async(&mut c)).await)
            }
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
                Store::Sentinel(s) => {
                    let mut c = s.connection().await?;
                    s.after(bounded(timeout, cmd.query_async(&mut c)).await)?
                }
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

/// Atomically checks and takes a charge from the counter at `KEYS[1]`: a lease of exactly the
/// charge, spent at once (`requests` and `used` alike, in the layout of `sync::lease`).
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
  local u = math.max(0, tonumber(redis.call('HGET', KEYS[1], 'used') or '0') + cr)
  redis.call('HSET', KEYS[1], 'requests', r, 'used', u, 'tokens', t)
  redis.call('PEXPIREAT', KEYS[1], ARGV[5])
  return {r, t, 1}
end
if over(r, cr, lr) or over(t, ct, lt) then
  return {r, t, 0}
end
if cr > 0 then
  r = redis.call('HINCRBY', KEYS[1], 'requests', cr)
  redis.call('HINCRBY', KEYS[1], 'used', cr)
end
if ct > 0 then t = redis.call('HINCRBY', KEYS[1], 'tokens', ct) end
if cr > 0 or ct > 0 then redis.call('PEXPIREAT', KEYS[1], ARGV[5]) end
return {r, t, 1}
",
    )
}

/// Atomically checks and takes a charge from a sliding window kept in the store call by call:
/// `KEYS[1]` the current window's counts, `KEYS[2]` the previous one's (fields `requests` and
/// `tokens`). ARGV: requests charge, requests limit (-1: none), tokens charge, tokens limit
/// (-1: none), the current key's expiry (ms since the epoch), the window's length W and the
/// time elapsed in it (ms). A charge `n` fits when `(current + n) × W + previous × (W −
/// elapsed) ≤ limit × W`, as a replica's own sliding window has it (a charge of 0 checks that
/// one more fits); negative charges give back from the current window, never below zero.
/// Returns the current and previous windows' requests and tokens after the call, and 1 if
/// the charge was taken, 0 if refused.
pub fn sliding_script() -> Script {
    Script::new(
        r"
local rc = tonumber(redis.call('HGET', KEYS[1], 'requests') or '0')
local tc = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0')
local rp = tonumber(redis.call('HGET', KEYS[2], 'requests') or '0')
local tp = tonumber(redis.call('HGET', KEYS[2], 'tokens') or '0')
local cr, lr, ct, lt = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local w, e = tonumber(ARGV[6]), tonumber(ARGV[7])
local function over(current, previous, charge, limit)
  if limit < 0 then return false end
  return (current + math.max(charge, 1)) * w + previous * (w - e) > limit * w
end
if cr < 0 or ct < 0 then
  rc = math.max(0, rc + cr)
  tc = math.max(0, tc + ct)
  redis.call('HSET', KEYS[1], 'requests', rc, 'used', rc, 'tokens', tc)
  redis.call('PEXPIREAT', KEYS[1], ARGV[5])
  return {rc, tc, rp, tp, 1}
end
if over(rc, rp, cr, lr) or over(tc, tp, ct, lt) then
  return {rc, tc, rp, tp, 0}
end
if cr > 0 then
  rc = redis.call('HINCRBY', KEYS[1], 'requests', cr)
  redis.call('HSET', KEYS[1], 'used', rc)
end
if ct > 0 then tc = redis.call('HINCRBY', KEYS[1], 'tokens', ct) end
if cr > 0 or ct > 0 then redis.call('PEXPIREAT', KEYS[1], ARGV[5]) end
return {rc, tc, rp, tp, 1}
",
    )
}

/// Atomically checks and takes a charge from a token bucket kept in the store call by call
/// (GCRA in a replica's own terms, [`crate::limiter::bucket_terms`]): `KEYS[1]` holds its
/// `fill` (in W-ths of a unit) and when it was last charged (`at`, in ticks). ARGV: the
/// charge `n` (0 checks that one more fits; negative gives back, never below empty), the
/// burst, the fill drained a tick (the rule's rate), W, the time now in ticks, the tick (ms).
/// A charge fits when `fill + n × W ≤ burst × W`. The key lives until the bucket is full
/// again, plus a minute. Returns the fill after the call, and 1 if taken, 0 if refused.
pub fn bucket_script() -> Script {
    Script::new(
        r"
local n, burst, drain = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local w, now, tick = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local fill = tonumber(redis.call('HGET', KEYS[1], 'fill') or '0')
local at = tonumber(redis.call('HGET', KEYS[1], 'at') or ARGV[5])
if now > at then
  fill = math.max(0, fill - (now - at) * drain)
  at = now
end
local function keep(f)
  if drain <= 0 then return 60000 end
  return math.ceil(f / drain) * tick + 60000
end
if n < 0 then
  fill = math.max(0, fill + n * w)
  redis.call('HSET', KEYS[1], 'fill', fill, 'at', at)
  redis.call('PEXPIRE', KEYS[1], keep(fill))
  return {fill, 1}
end
if drain <= 0 or fill + math.max(n, 1) * w > burst * w then return {fill, 0} end
if n > 0 then
  fill = fill + n * w
  redis.call('HSET', KEYS[1], 'fill', fill, 'at', at)
  redis.call('PEXPIRE', KEYS[1], keep(fill))
end
return {fill, 1}
",
    )
}

/// Atomically takes or gives back holds in flight (a concurrency limit) in the fleet's two
/// windows of a hold's time to live: `KEYS[1]` the current window's, `KEYS[2]` the previous
/// one's (holds lapse when the window after theirs ends, as a replica's own counter has them).
/// ARGV: the holds to take (0 only checks) or, negative, to give back; the limit; which window
/// a give-back comes from (`current`, `previous`, `oldest` first, or `none`: lapsed); the
/// current window key's expiry (ms since the epoch). A take fits when both windows' holds and
/// it stay within the limit. Returns the current and previous windows' holds after the call,
/// and 1 if it was taken (a give-back always is), 0 if refused.
pub fn holds_script() -> Script {
    Script::new(
        r"
local c = tonumber(redis.call('HGET', KEYS[1], 'requests') or '0')
local p = tonumber(redis.call('HGET', KEYS[2], 'requests') or '0')
local n, limit, from = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
if n < 0 then
  local give = -n
  if (from == 'previous' or from == 'oldest') and p > 0 then
    local g = math.min(give, p)
    p = p - g
    give = give - g
    redis.call('HSET', KEYS[2], 'requests', p, 'used', p)
  end
  if (from == 'current' or from == 'oldest') and give > 0 and c > 0 then
    c = c - math.min(give, c)
    redis.call('HSET', KEYS[1], 'requests', c, 'used', c)
  end
  return {c, p, 1}
end
if c + p + math.max(n, 1) > limit then return {c, p, 0} end
if n > 0 then
  c = redis.call('HINCRBY', KEYS[1], 'requests', n)
  redis.call('HINCRBY', KEYS[1], 'used', n)
  redis.call('PEXPIREAT', KEYS[1], ARGV[4])
end
return {c, p, 1}
",
    )
}

/// A client for one Redis at `url`, with the address's TLS files when it has any.
fn client_for(address: &StoreAddress, url: &str) -> RedisResult<redis::Client> {
    if address.tls.any() {
        redis::Client::build_with_tls(url, address.tls.read()?)
    } else {
        redis::Client::open(url)
    }
}
