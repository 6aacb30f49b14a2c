//! Redis Sentinel, for real: a master, a replica and Debian's `redis-sentinel`, all on loopback.
//! sluice follows the master the Sentinel names; after `SENTINEL FAILOVER` it writes to the new
//! master, and no ShouldRateLimit call fails on the way (decisions never wait on Redis).

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::redis::{RedisServer, unique_namespace};
use common::*;

const RULES: &str = "domain: guarded\ndescriptors:\n  - key: user\n    rate_limit: { unit: hour, requests_per_unit: 100000 }\n";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A Sentinel process watching `master` as `mymaster`, killed by its pid when dropped.
struct Sentinel {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    fn start(binary: &std::path::Path, master: u16) -> Sentinel {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                 sentinel monitor mymaster 127.0.0.1 {master} 1\n\
                 sentinel down-after-milliseconds mymaster 2000\n\
                 sentinel failover-timeout mymaster 10000\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new(binary)
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-sentinel");
        let sentinel = Sentinel {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while sentinel.query::<String>(&::redis::cmd("PING")).is_err() {
            assert!(Instant::now() < deadline, "redis-sentinel did not answer");
            std::thread::sleep(Duration::from_millis(50));
        }
        sentinel
    }

    fn query<T: ::redis::FromRedisValue>(&self, cmd: &::redis::Cmd) -> ::redis::RedisResult<T> {
        let client = ::redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?;
        cmd.query(&mut client.get_connection_with_timeout(Duration::from_secs(2))?)
    }

    fn master_port(&self) -> Option<u16> {
        let addr: Vec<String> = self
            .query(
                ::redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg("mymaster"),
            )
            .ok()?;
        addr.get(1)?.parse().ok()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// The requests counted under `namespace` in the Redis at `redis`.
fn stored(redis: &RedisServer, namespace: &str) -> u64 {
    let keys: Vec<String> =
        redis.query(::redis::cmd("KEYS").arg(format!("{namespace}:ratelimit:*")));
    keys.iter()
        .filter_map(|key| {
            let count: Option<u64> = redis.query(::redis::cmd("HGET").arg(key).arg("requests"));
            count
        })
        .sum()
}

fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_follows_the_master_through_a_sentinel_failover() {
    let Some(binary) = common::redis::binary("SLUICE_REDIS_SENTINEL", "redis-sentinel") else {
        return;
    };
    let Some(master) = RedisServer::start() else {
        return;
    };
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()])
        .expect("redis-server");
    until("the replica to sync", Duration::from_secs(15), || {
        let info: String = replica.query(::redis::cmd("INFO").arg("replication"));
        info.contains("master_link_status:up")
    });
    let sentinel = Sentinel::start(&binary, master.port);
    until(
        "the Sentinel to find the replica",
        Duration::from_secs(20),
        || {
            sentinel
                .query::<Vec<::redis::Value>>(
                    ::redis::cmd("SENTINEL").arg("replicas").arg("mymaster"),
                )
                .is_ok_and(|r| !r.is_empty())
        },
    );

    let namespace = unique_namespace("sentinel");
    let sentinel_url = format!("redis://127.0.0.1:{}", sentinel.port);
    let through_sentinel = |ns: String, url: String| {
        move |s: &mut sluice::settings::Settings| {
            s.redis_url = Some(url);
            s.redis_sentinel_master = Some("mymaster".into());
            s.redis_namespace = Some(ns);
        }
    };
    let rules = [("guarded.yaml", RULES)];
    let settings = through_sentinel(namespace.clone(), sentinel_url.clone());
    let server = start_at(now_ms(), &rules, settings).await;
    // A second replica, subscribed to resets before the failover.
    let settings = through_sentinel(namespace.clone(), sentinel_url);
    let other = start_at(now_ms(), &rules, settings).await;

    // Steady calls for the whole test, each one answered or counted as failed.
    let (calls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let driver = {
        let (client, calls, failures, stop) = (
            server.client.clone(),
            calls.clone(),
            failures.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let request = request("guarded", &[&[("user", "u1")]]);
            while !stop.load(Ordering::Relaxed) {
                let mut client = client.clone();
                let answered =
                    tokio::time::timeout(CALL_TIMEOUT, client.should_rate_limit(request.clone()))
                        .await;
                calls.fetch_add(1, Ordering::Relaxed);
                if !matches!(answered, Ok(Ok(r)) if is_ok(r.get_ref())) {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Counts reach the master the Sentinel names.
    let master_ref = &master;
    tokio::task::block_in_place(|| {
        until(
            "counts in the first master",
            Duration::from_secs(15),
            || stored(master_ref, &namespace) >= 20,
        )
    });

    // Fail over: the replica becomes the master.
    let _: String = sentinel
        .query(::redis::cmd("SENTINEL").arg("failover").arg("mymaster"))
        .expect("SENTINEL FAILOVER");
    let promoted = replica.port;
    tokio::task::block_in_place(|| {
        until(
            "the Sentinel to name the new master",
            Duration::from_secs(30),
            || sentinel.master_port() == Some(promoted),
        )
    });
    let at_failover = stored(&replica, &namespace);
    // sluice's next pushes land in the new master.
    let replica_ref = &replica;
    tokio::task::block_in_place(|| {
        until("counts in the new master", Duration::from_secs(30), || {
            stored(replica_ref, &namespace) >= at_failover + 50
        })
    });
    let fleet = server.running.as_ref().unwrap().app.fleet.clone().unwrap();
    assert!(fleet.status.load().reachable, "the sync is healthy again");

    // A reset made on one replica after the failover reaches the other through the master
    // the Sentinels name now: it forgets its count of the key.
    let entries = [("user", "u2")];
    assert_eq!(other.admitted(1, &request("guarded", &[&entries])).await, 1);
    let other_app = other.running.as_ref().unwrap().app.clone();
    let counted = || async {
        let usage = sluice::counters::usage(&other_app, "guarded", &entries)
            .await
            .unwrap();
        usage.windows[0].local.requests
    };
    assert_eq!(counted().await, 1);
    let app = server.running.as_ref().unwrap().app.clone();
    sluice::counters::reset(&app, "guarded", &entries)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while counted().await > 0 {
        assert!(
            Instant::now() < deadline,
            "the other replica still counts u2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    other.stop().await;

    stop.store(true, Ordering::Relaxed);
    driver.await.unwrap();
    let (calls, failures) = (
        calls.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
    );
    eprintln!(
        "{calls} calls, {failures} failed; the new master holds {} requests",
        stored(&replica, &namespace)
    );
    assert!(calls > 100, "{calls} calls");
    assert_eq!(
        failures, 0,
        "ShouldRateLimit calls failed during the failover"
    );
    server.stop().await;
}
