//! sluice inside a Rust service: the server's rules, counters and fleet store behind a small
//! API, for callers that do not go through Envoy (an agent swarm, a batch worker, a gateway).
//!
//! A [`RateLimiter`] is the server without its listeners. Every call goes through the same
//! pipeline as a `ShouldRateLimit` call (the descriptor is written as the request Envoy would
//! send), so an embedded limiter and server replicas on one Redis give the same answers from
//! the same rules and the same fleet totals. It runs its background work (the counter sweep,
//! capacity recovery, rule reloads, the fleet sync and every Redis call) on a thread of its
//! own, so [`RateLimiter::try_acquire`] needs no async runtime from its caller.

mod descriptor;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;

use descriptor::Purpose;
pub use descriptor::{
    Capacity, CapacityChange, Decision, Descriptor, Hold, Limit, RESOURCE_KEY, Why,
};

use crate::admin::counters::usage_of;
use crate::app::App;
use crate::background::{Background, Reloads};
use crate::capacity::RuleName;
use crate::decision::{Ask, Judged, Purpose as AskPurpose, explain};
use crate::limiter::{Algorithm, Clock, SystemClock};
use crate::reload::{Catalog, Changes, ReloadSettings};
use crate::rules::{
    ConfigError, Consistency, Domain, Measure, Rule, RuleSet, SourceFile, compile_file_for,
};
use crate::service::{AnswerError, Answered, Patience, answer_at_once};
use crate::settings::Settings;
use crate::sync::Fleet;

/// Why a limiter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The rules have errors (each names its file, line and field): a limiter never starts on
    /// broken rules.
    #[error("{} errors in the rules; the first: {}", .0.len(), .0.first().map(ToString::to_string).unwrap_or_default())]
    Rules(Vec<ConfigError>),
    /// The Redis settings are not valid.
    #[error("invalid Redis settings: {0}")]
    Redis(#[from] redis::RedisError),
    /// The background thread could not start.
    #[error("cannot start the limiter's background thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// Why a call got no decision.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    /// The descriptor breaks the request bounds (no entry, an entry too long, a reserved
    /// entry misused), as a server would answer INVALID_ARGUMENT.
    #[error("invalid descriptor: {0}")]
    Invalid(String),
    /// A bug: the decision panicked. Never read it as an allow.
    #[error("sluice: internal error")]
    Internal,
    /// The limiter's background thread has stopped (the limiter is shutting down).
    #[error("the limiter has stopped")]
    Stopped,
    /// Called from the limiter's own background thread (a capacity callback), where waiting
    /// on the fleet store would wait on itself.
    #[error("a limiter cannot be asked from its own background thread (a capacity callback)")]
    OwnThread,
}

impl From<AnswerError> for AcquireError {
    fn from(error: AnswerError) -> Self {
        match error {
            AnswerError::Invalid(invalid) => AcquireError::Invalid(invalid.to_string()),
            AnswerError::Internal => AcquireError::Internal,
        }
    }
}

/// Why a capacity could not be set or announced.
#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    /// A resource is named by letters, digits, `_`, `-` and `.`, at most 64 of them.
    #[error("a resource name is 1 to 64 letters, digits, `_`, `-` or `.`, not `{0}`")]
    Name(String),
    /// A window is a whole number of seconds, at least one.
    #[error("a window is a whole number of seconds, at least 1, not {0:?}")]
    Window(Duration),
    /// The rule built for it did not compile (a bug, reported with its message).
    #[error("{0}")]
    Rule(ConfigError),
    /// No rule matches the descriptor, so there is no capacity to reduce.
    #[error("no rule of domain `{domain}` matches the descriptor")]
    NoRule {
        /// The descriptor's domain.
        domain: String,
    },
    /// A reduction keeps a share of what is in force: above 0 and below 1.
    #[error("a reduction factor is above 0 and below 1, not {0}")]
    Factor(f64),
    /// The fleet store did not take the announcement (it holds here all the same).
    #[error("announced here; the fleet store failed: {0}")]
    Store(String),
    /// The limiter's background thread has stopped.
    #[error("the limiter has stopped")]
    Stopped,
}

/// Builds a [`RateLimiter`]: where its rules come from, and optionally the fleet store it
/// shares limits through.
///
/// ```
/// use std::time::Duration;
/// use sluice::{Descriptor, RateLimiter};
///
/// // A directory of rule files, reloaded as they change, as `sluice serve --config` reads it.
/// let dir = std::env::temp_dir().join(format!("sluice-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// std::fs::write(
///     dir.join("api.yaml"),
///     "domain: api\ndescriptors:\n  - key: team\n    rate_limit: { unit: minute, requests_per_unit: 100 }\n",
/// )?;
/// let limiter = RateLimiter::builder().rules_dir(&dir).watch(true).build()?;
/// let team = Descriptor::new("api").entry("team", "search");
/// assert_eq!(limiter.capacity(&team).unwrap().total, Some(100));
/// # drop(limiter);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Sharing the limits with server replicas takes their store and namespace, as the server's
/// settings name them (`--redis-url`, `--redis-namespace`):
///
/// ```no_run
/// use sluice::RateLimiter;
/// use sluice::settings::Settings;
///
/// let mut settings = Settings::local("config".into());
/// settings.redis_url = Some("redis://redis.internal:6379".into());
/// settings.redis_namespace = Some("production".into());
/// let limiter = RateLimiter::builder().rules_dir("config").settings(settings).build()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Builder {
    settings: Settings,
    dir: Option<PathBuf>,
    texts: Vec<RulesText>,
    watch: bool,
    clock: Arc<dyn Clock>,
}

impl Builder {
    /// Loads the rule files of `dir` (`*.yaml`, `*.yml`), as `sluice serve --config` does.
    pub fn rules_dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.dir = Some(dir.into());
        self
    }

    /// Adds one rule file's text (one domain, in the server's format); its errors name it
    /// `<rules_yaml #N>`.
    pub fn rules_yaml(mut self, text: impl Into<String>) -> Builder {
        self.texts.push(RulesText::Given(text.into()));
        self
    }

    /// Adds one rule file (one domain), read when the limiter is built; its errors name it.
    /// Not reloaded: for rules that change, use [`Builder::rules_dir`] with
    /// [`Builder::watch`].
    pub fn rules_file(mut self, path: impl Into<PathBuf>) -> Builder {
        self.texts.push(RulesText::File(path.into()));
        self
    }

    /// Reloads the directory's rules when its files change, as the server does (off unless
    /// set; SIGHUP is left to the host process).
    pub fn watch(mut self, watch: bool) -> Builder {
        self.watch = watch;
        self
    }

    /// Shares limits through the Redis at `url` with every replica and embedded limiter of
    /// the same namespace (`redis://`, `rediss://`), as `--redis-url` does.
    pub fn redis(mut self, url: impl Into<String>) -> Builder {
        self.settings.redis_url = Some(url.into());
        self
    }

    /// Every other setting, as the server takes them (the sync interval, the Redis failure
    /// policy, the namespace, request bounds...): start from [`Settings::local`] and change
    /// what you need. Listener addresses are not used, nor `config`: rules come from
    /// [`Builder::rules_dir`] and [`Builder::rules_yaml`].
    pub fn settings(mut self, settings: Settings) -> Builder {
        self.settings = settings;
        self
    }

    /// Where time is read (tests use [`ManualClock`](crate::ManualClock)).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Builder {
        self.clock = clock;
        self
    }

    /// Loads the rules (refusing any error) and starts the background thread.
    pub fn build(self) -> Result<RateLimiter, BuildError> {
        let Builder {
            mut settings,
            dir,
            texts,
            watch,
            clock,
        } = self;
        let store = settings.redis_url.is_some();
        let now = clock.now_ms();
        let (catalog, files) = match &dir {
            Some(dir) => {
                let (catalog, set) = Catalog::load(dir, now, settings.domain_files(), store)
                    .map_err(BuildError::Rules)?;
                (Some(catalog), set)
            }
            None => (None, RuleSet::default()),
        };
        let mut given = BTreeMap::new();
        for (i, text) in texts.into_iter().enumerate() {
            let file = match text {
                RulesText::Given(text) => SourceFile {
                    path: PathBuf::from(format!("<rules_yaml #{}>", i + 1)),
                    text,
                },
                RulesText::File(path) => match std::fs::read_to_string(&path) {
                    Ok(text) => SourceFile { path, text },
                    Err(error) => {
                        return Err(BuildError::Rules(vec![ConfigError {
                            file: path,
                            line: None,
                            column: None,
                            field: None,
                            message: format!("cannot read: {error}"),
                        }]));
                    }
                },
            };
            let domain = compile_file_for(&file, store).map_err(BuildError::Rules)?;
            given.insert(domain.name.to_string(), Arc::new(domain));
        }
        let rules = with_domains(&files, &given).map_err(BuildError::Rules)?;
        let fleet = match settings.sync() {
            Some(sync) => Some(Arc::new(Fleet::new(sync)?)),
            None => None,
        };
        settings.watch = watch;
        let app = Arc::new(App::new(settings, rules, clock, fleet));
        let own = Arc::new(Mutex::new(given));
        let thread = BackgroundThread::start()?;
        let reloads = match (catalog, &dir) {
            (Some(catalog), Some(dir)) if watch => {
                let (applying, own) = (app.clone(), own.clone());
                Some(Reloads {
                    catalog,
                    changes: Changes::watch(dir, true),
                    settings: ReloadSettings {
                        debounce: app.settings.reload_debounce,
                        rescan_every: app.settings.rescan_interval,
                        on_hangup: false,
                    },
                    apply: Box::new(move |mut reloaded: crate::reload::Reloaded| {
                        // The files changed: the domains set in code stay on top of them.
                        if let Some(set) = reloaded.rules.take() {
                            let own = own.lock().unwrap_or_else(PoisonError::into_inner);
                            match with_domains(&set, &own) {
                                Ok(set) => reloaded.rules = Some(set),
                                Err(errors) => {
                                    for error in errors {
                                        tracing::error!(%error, "reloaded rules not applied");
                                    }
                                }
                            }
                        }
                        applying.apply_reload(reloaded);
                    }),
                })
            }
            _ => None,
        };
        let background = {
            let _entered = thread.handle.enter();
            Background::start(&app, reloads)
        };
        Ok(RateLimiter {
            inner: Arc::new(Inner {
                app,
                own,
                background: Mutex::new(Some(background)),
                thread,
            }),
        })
    }
}

/// One rule file given to the builder.
enum RulesText {
    /// Its text, from code.
    Given(String),
    /// Its path, read at build.
    File(PathBuf),
}

/// The rule set `files` with `own` (domains set in code) in place of any domain of that name.
fn with_domains(
    files: &RuleSet,
    own: &BTreeMap<String, Arc<Domain>>,
) -> Result<RuleSet, Vec<ConfigError>> {
    let domains = files
        .domains()
        .filter(|d| !own.contains_key(d.name.as_ref()))
        .chain(own.values())
        .cloned()
        .collect();
    let (set, errors) = RuleSet::assemble(domains, crate::rules::DomainFiles::One);
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(errors)
    }
}

/// The thread the limiter's tasks and Redis calls run on: a one-thread tokio runtime, stopped
/// when the limiter is dropped.
struct BackgroundThread {
    handle: tokio::runtime::Handle,
    id: std::thread::ThreadId,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    joined: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundThread {
    fn start() -> Result<BackgroundThread, std::io::Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let joined = std::thread::Builder::new()
            .name("sluice-limiter".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(BackgroundThread {
            handle,
            id: joined.thread().id(),
            stop: Some(stop),
            joined: Some(joined),
        })
    }
}

struct Inner {
    app: Arc<App>,
    /// The domains set in code ([`RateLimiter::set_capacity`] and [`Builder::rules_yaml`]).
    own: Arc<Mutex<BTreeMap<String, Arc<Domain>>>>,
    background: Mutex<Option<Background>>,
    thread: BackgroundThread,
}

impl Inner {
    /// Runs `work` on the background thread and waits for it here.
    fn wait_for<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Result<T, AcquireError> {
        if std::thread::current().id() == self.thread.id {
            return Err(AcquireError::OwnThread);
        }
        let (done, result) = std::sync::mpsc::sync_channel(1);
        self.thread.handle.spawn(async move {
            let _ = done.send(work.await);
        });
        result.recv().map_err(|_| AcquireError::Stopped)
    }

    /// Answers one request through the server's pipeline, waiting up to `patience`.
    fn answer(
        self: &Arc<Self>,
        request: Bytes,
        patience: Patience,
    ) -> Result<Answer, AcquireError> {
        let answered = {
            let _entered = self.thread.handle.enter();
            answer_at_once(&self.app, request, patience)
        };
        match answered {
            Answered::Now(answer) => Ok(answer?),
            Answered::Later(unfinished) => {
                let app = self.app.clone();
                Ok(self.wait_for(async move { unfinished.finish(&app).await })??)
            }
        }
    }

    /// Reads the rule matching `descriptor` and its limits as the decision would judge them
    /// now, counting nothing (what `/v1/explain` reads); none when no rule matches.
    fn judged<T>(
        &self,
        descriptor: &Descriptor,
        read: impl FnOnce(&Arc<Rule>, &[Judged<'_>]) -> T,
    ) -> Option<T> {
        let app = &self.app;
        let rules = app.rules.load_full();
        let entries: Vec<(&str, &str)> = descriptor.entries().collect();
        let asks = [Ask {
            entries: &entries,
            hits: 0,
            refund: false,
            limit_override: None,
            purpose: AskPurpose::Call,
            class: None,
        }];
        let judged = explain(&rules, &app.limiter, descriptor.domain(), &asks, app.mode())?;
        let (rule, limits) = judged.into_iter().next()?;
        Some(read(rule?, &limits))
    }

    /// A decision from an answer, with the hold it took given back when dropped.
    fn decision(self: &Arc<Self>, descriptor: &Descriptor, answer: &Answer) -> Decision {
        let (mut decision, taken) = Decision::read(answer);
        if let Some(taken_ms) = taken {
            let (inner, descriptor) = (Arc::downgrade(self), descriptor.clone());
            decision.hold = Some(Hold {
                taken_ms,
                release: Some(Box::new(move || {
                    if let Some(inner) = inner.upgrade() {
                        inner.release(&descriptor, taken_ms);
                    }
                })),
            });
        }
        decision
    }

    /// Gives back a hold without waiting for it: on the background thread, as a release may
    /// call the fleet store.
    fn release(self: &Arc<Self>, descriptor: &Descriptor, taken_ms: u64) {
        let Ok(request) = encode(descriptor, Purpose::Release { taken_ms }) else {
            return;
        };
        let app = self.app.clone();
        self.thread.handle.spawn(async move {
            if let Err(error) = crate::service::answer(&app, request).await {
                tracing::warn!(%error, "a hold in flight was not given back; it lapses after its hold_ttl");
            }
        });
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let background = self
            .background
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let app = self.app.clone();
        // Give back what the leases hold unused and leave the fleet, as a server stopping does.
        let leaving = self.thread.handle.spawn(async move {
            if let Some(background) = background {
                background.stop();
            }
            if let Some(fleet) = &app.fleet {
                let handles = app.sync_handles();
                fleet.give_back(&handles).await;
                fleet.leave(&handles).await;
            }
        });
        if std::thread::current().id() != self.thread.id {
            let (done, left) = std::sync::mpsc::sync_channel(1);
            self.thread.handle.spawn(async move {
                let _ = leaving.await;
                let _ = done.send(());
            });
            let _ = left.recv_timeout(Duration::from_secs(5));
        }
        if let Some(stop) = self.thread.stop.take() {
            let _ = stop.send(());
        }
        if let Some(joined) = self.thread.joined.take()
            && std::thread::current().id() != self.thread.id
        {
            let _ = joined.join();
        }
    }
}

/// A rate limiter in the calling process, with the server's rules and counters. Cheap to
/// clone: clones share one limiter.
///
/// ```
/// use std::num::NonZeroU32;
/// use std::time::Duration;
/// use sluice::{Descriptor, RateLimiter};
///
/// let limiter = RateLimiter::builder().build()?;
/// limiter.set_capacity("openai", NonZeroU32::new(2).unwrap(), Duration::from_secs(60))?;
/// let openai = Descriptor::resource("openai");
/// assert!(limiter.try_acquire(&openai)?.is_allowed());
/// assert!(limiter.try_acquire(&openai)?.is_allowed());
/// let third = limiter.try_acquire(&openai)?;
/// assert!(!third.is_allowed());
/// assert!(third.retry_after().unwrap() <= Duration::from_secs(60));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rules = self.inner.app.rules.load();
        f.debug_struct("RateLimiter")
            .field("domains", &rules.domains().count())
            .field("rules", &rules.rule_count())
            .field("fleet_store", &self.inner.app.fleet.is_some())
            .finish()
    }
}

type Answer = crate::proto::Answer;

/// The request for `descriptor`, encoded as gRPC carries it. A descriptor with no entry is
/// refused here: Envoy's API lets it through unmatched, which in code is a mistake.
fn encode(descriptor: &Descriptor, what: Purpose) -> Result<Bytes, AcquireError> {
    if descriptor.entries().next().is_none() {
        return Err(AcquireError::Invalid(format!(
            "a descriptor of domain `{}` has no entry: add at least one",
            descriptor.domain()
        )));
    }
    Ok(prost::Message::encode_to_vec(&descriptor.request(what)).into())
}

impl RateLimiter {
    /// A builder with no rules, no fleet store, and every setting at the server's default.
    pub fn builder() -> Builder {
        let mut settings = Settings::local(PathBuf::from("config"));
        settings.watch = false;
        Builder {
            settings,
            dir: None,
            texts: Vec::new(),
            watch: false,
            clock: Arc::new(SystemClock),
        }
    }

    /// Decides a call now: allowed (and counted) or not, never waiting for capacity. Without a
    /// fleet store it returns at once; with one it may wait for Redis, at most the Redis
    /// timeout, when a lease must be taken or the rule is settled in Redis call by call. In
    /// async code, prefer [`RateLimiter::acquire`] with a zero wait, which waits without
    /// blocking a thread.
    ///
    /// ```
    /// use sluice::{Descriptor, RateLimiter, Why};
    ///
    /// let limiter = RateLimiter::builder()
    ///     .rules_yaml("domain: api\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: hour, requests_per_unit: 1 }\n")
    ///     .build()?;
    /// let key = Descriptor::new("api").entry("api_key", "k1");
    /// assert_eq!(limiter.try_acquire(&key)?.why(), Why::Within);
    /// let refused = limiter.try_acquire(&key)?;
    /// assert_eq!(refused.why(), Why::OverLimit);
    /// assert_eq!(refused.limit().unwrap().per_unit, 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn try_acquire(&self, descriptor: &Descriptor) -> Result<Decision, AcquireError> {
        let answer = self
            .inner
            .answer(encode(descriptor, Purpose::Call)?, Patience::Never)?;
        Ok(self.inner.decision(descriptor, &answer))
    }

    /// Decides a call, waiting up to `wait` for capacity to come back if it is refused now
    /// (a window moving on, a bucket refilling, a slot given back), in arrival order with
    /// every other call waiting on the same descriptor. Nothing is counted while it waits.
    /// The call is decided on the limiter's thread from the moment `acquire` is called; await
    /// the [`Acquire`] for its decision, from any executor. Dropped before it is ready, the
    /// call leaves the queue and counts nothing, except in the instant between admission and
    /// the decision's return, where the request stays counted as made (a slot in flight it
    /// took is given back).
    ///
    /// ```
    /// use std::time::Duration;
    /// use sluice::{Descriptor, RateLimiter};
    ///
    /// # tokio::runtime::Runtime::new()?.block_on(async {
    /// // 20 a second, one at a time: the second call waits ~50 ms for the bucket to refill.
    /// let limiter = RateLimiter::builder()
    ///     .rules_yaml("domain: d\ndescriptors:\n  - key: k\n    limits:\n      - { unit: second, requests: 20, algorithm: token_bucket, burst: 1 }\n")
    ///     .build()?;
    /// let call = Descriptor::new("d").entry("k", "v");
    /// assert!(limiter.acquire(&call, Duration::ZERO).await?.is_allowed());
    /// assert!(limiter.acquire(&call, Duration::from_secs(1)).await?.is_allowed());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// # })?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn acquire(&self, descriptor: &Descriptor, wait: Duration) -> Acquire {
        let request = match encode(descriptor, Purpose::Call) {
            Ok(request) => request,
            Err(error) => return Acquire(Err(Some(error))),
        };
        let patience = if wait.is_zero() {
            Patience::Never
        } else {
            Patience::UpTo(wait)
        };
        let (inner, descriptor) = (self.inner.clone(), descriptor.clone());
        // The decision is made in the task, so that if its caller is gone by then, the hold
        // it took is dropped with it, and given back.
        Acquire(Ok(self.inner.thread.handle.spawn(async move {
            let answer = crate::service::answer_with(&inner.app, request, patience).await?;
            Ok(inner.decision(&descriptor, &answer))
        })))
    }

    /// [`RateLimiter::acquire`] for a thread outside async code (a worker pool): blocks the
    /// calling thread until the call is admitted or `wait` has passed.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sluice::{Descriptor, RateLimiter};
    ///
    /// // Two workers share one slot: the second waits for the first to end.
    /// let limiter = RateLimiter::builder()
    ///     .rules_yaml("domain: jobs\ndescriptors:\n  - key: queue\n    limits:\n      - { concurrency: 1, hold_ttl: 1m }\n")
    ///     .build()?;
    /// let job = Descriptor::new("jobs").entry("queue", "exports");
    /// let mut first = limiter.acquire_blocking(&job, Duration::ZERO)?;
    /// let slot = first.take_hold().unwrap();
    /// let waiting = {
    ///     let (limiter, job) = (limiter.clone(), job.clone());
    ///     std::thread::spawn(move || limiter.acquire_blocking(&job, Duration::from_secs(5)))
    /// };
    /// std::thread::sleep(Duration::from_millis(50));
    /// drop(slot); // the first job ends
    /// assert!(waiting.join().unwrap()?.is_allowed());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn acquire_blocking(
        &self,
        descriptor: &Descriptor,
        wait: Duration,
    ) -> Result<Decision, AcquireError> {
        // The same call as `acquire`'s, this thread waiting for it.
        self.inner.wait_for(self.acquire(descriptor, wait))?
    }

    /// Reports the tokens a call admitted with `descriptor` used (its usage, known once the
    /// response is done): counted against the descriptor's tokens limits, never refused. If
    /// the descriptor reserved an estimate ([`Descriptor::estimate_tokens`]), the report
    /// settles the difference.
    ///
    /// ```
    /// use sluice::{Descriptor, RateLimiter};
    ///
    /// let limiter = RateLimiter::builder()
    ///     .rules_yaml("domain: llm\ndescriptors:\n  - key: api_key\n    limits:\n      - { unit: minute, tokens: 1000 }\n")
    ///     .build()?;
    /// // Reserve the call's max_tokens up front; settle what it used after.
    /// let call = Descriptor::new("llm").entry("api_key", "k1").estimate_tokens(800);
    /// assert!(limiter.try_acquire(&call)?.is_allowed());
    /// limiter.report_tokens(&call, 120)?;
    /// let capacity = limiter.capacity(&Descriptor::new("llm").entry("api_key", "k1"));
    /// # let _ = capacity;
    /// // 120 used, 880 left: a call reserving 900 does not fit, one reserving 880 does.
    /// let big = Descriptor::new("llm").entry("api_key", "k1").estimate_tokens(900);
    /// assert!(!limiter.try_acquire(&big)?.is_allowed());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn report_tokens(&self, descriptor: &Descriptor, tokens: u64) -> Result<(), AcquireError> {
        let request = encode(descriptor, Purpose::Report { tokens })?;
        self.inner.answer(request, Patience::Never).map(drop)
    }

    /// Sets a resource's capacity: `requests` calls per `window` (whole seconds), as a
    /// one-rule domain named after the resource, matched by [`Descriptor::resource`]. Set
    /// again, the limit changes and the counts carry on. The domain stays through reloads of
    /// the rules directory.
    ///
    /// ```
    /// use std::num::NonZeroU32;
    /// use std::time::Duration;
    /// use sluice::{Descriptor, RateLimiter};
    ///
    /// let limiter = RateLimiter::builder().build()?;
    /// let every_90s = Duration::from_secs(90);
    /// limiter.set_capacity("geocoder", NonZeroU32::new(3).unwrap(), every_90s)?;
    /// let geocoder = Descriptor::resource("geocoder");
    /// for _ in 0..3 {
    ///     assert!(limiter.try_acquire(&geocoder)?.is_allowed());
    /// }
    /// assert!(!limiter.try_acquire(&geocoder)?.is_allowed());
    /// // Zero is not a capacity: `NonZeroU32` says so before the call.
    /// assert!(NonZeroU32::new(0).is_none());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_capacity(
        &self,
        resource: &str,
        requests: NonZeroU32,
        window: Duration,
    ) -> Result<(), CapacityError> {
        let valid = !resource.is_empty()
            && resource.len() <= 64
            && resource
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !valid {
            return Err(CapacityError::Name(resource.to_string()));
        }
        if window.subsec_nanos() != 0 || window.as_secs() == 0 || window.as_secs() > u32::MAX.into()
        {
            return Err(CapacityError::Window(window));
        }
        let text = format!(
            "domain: {resource}\ndescriptors:\n  - key: {RESOURCE_KEY}\n    value: {resource}\n    limits:\n      - {{ window: {}s, requests: {requests} }}\n",
            window.as_secs()
        );
        let file = SourceFile {
            path: PathBuf::from(format!("<set_capacity {resource}>")),
            text,
        };
        let app = &self.inner.app;
        let domain = compile_file_for(&file, app.fleet.is_some())
            .map_err(|mut e| CapacityError::Rule(e.remove(0)))?;
        let mut own = self
            .inner
            .own
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        own.insert(resource.to_string(), Arc::new(domain));
        let current = app.rules.load_full();
        let set = with_domains(&current, &own).map_err(|mut e| CapacityError::Rule(e.remove(0)))?;
        let mut status = (**app.reload_status.load()).clone();
        status.generation += 1;
        app.apply_reload(crate::reload::Reloaded {
            rules: Some(set),
            status,
            reason: "set_capacity",
        });
        Ok(())
    }

    /// Where the limits of the rule matching `descriptor` stand now, counting nothing; none
    /// when no rule matches it. With a fleet store, the holds in flight and strict limits,
    /// settled in Redis call by call, are read from Redis (a wait of at most the Redis
    /// timeout; this process's own counts if it does not answer).
    ///
    /// ```
    /// use std::num::NonZeroU32;
    /// use std::time::Duration;
    /// use sluice::{Descriptor, RateLimiter, Unit};
    ///
    /// let limiter = RateLimiter::builder().build()?;
    /// limiter.set_capacity("search", NonZeroU32::new(10).unwrap(), Duration::from_secs(60))?;
    /// let search = Descriptor::resource("search");
    /// let _ = limiter.try_acquire(&search)?;
    /// let capacity = limiter.capacity(&search).unwrap();
    /// assert_eq!((capacity.total, capacity.available), (Some(10), Some(9)));
    /// assert_eq!(capacity.window, Some(Unit::Minute));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn capacity(&self, descriptor: &Descriptor) -> Option<Capacity> {
        let (rule, mut capacity) = self.inner.judged(descriptor, |rule, limits| {
            (rule.clone(), capacity_of(limits))
        })?;
        // Limits settled in the fleet store call by call (holds in flight, strict rules) are
        // read from the fleet's counts there, as `/v1/explain` does: this process's own
        // counters hold only what it counted while the store was away.
        let app = self.inner.app.clone();
        let strict = rule.consistency == Consistency::Strict;
        let in_store = strict
            || rule
                .windows()
                .iter()
                .any(|w| w.algorithm == Algorithm::InFlight);
        if app.fleet.is_none() || !in_store {
            return Some(capacity);
        }
        let entries: Vec<(String, String)> = descriptor
            .entries()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let reading = self.inner.wait_for(async move {
            let entries: Vec<(&str, &str)> = entries
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            usage_of(&app, rule, &entries).await
        });
        for window in reading.map(|usage| usage.windows).unwrap_or_default() {
            let Some(fleet) = window.fleet else { continue };
            if window.algorithm() == Some(Algorithm::InFlight) {
                capacity.in_flight = fleet.requests.into();
            } else if strict && capacity.window == Some(window.unit) {
                capacity.available = capacity
                    .total
                    .map(|total| total.saturating_sub(fleet.requests.into()));
            }
        }
        Some(capacity)
    }
}

/// A descriptor's capacity from its limits as the decision would judge them now.
fn capacity_of(limits: &[Judged<'_>]) -> Capacity {
    let mut capacity = Capacity {
        total: None,
        available: None,
        window: None,
        in_flight: 0,
        in_flight_limit: None,
    };
    let mut nearest: Option<u64> = None;
    for judged in limits {
        let standing = &judged.standing;
        let limit = standing.limit.per_unit;
        let left = standing.limit.ceiling.saturating_sub(standing.used);
        match standing.limit.measure {
            Measure::Concurrency => {
                capacity.in_flight = standing.used;
                capacity.in_flight_limit = Some(limit);
            }
            Measure::Tokens => {}
            Measure::Hits | Measure::Requests => {
                if nearest.is_none_or(|n| left < n) {
                    nearest = Some(left);
                    capacity.total = Some(limit);
                    capacity.available = Some(left);
                    capacity.window = Some(judged.unit);
                }
            }
        }
    }
    capacity
}

impl RateLimiter {
    /// Announces that the upstream behind the rule matching `descriptor` is saturated (it
    /// answered 429, or said so): the rule's limits drop to `factor` of what is in force, here
    /// and, with a fleet store, on every replica and embedded limiter at once; then they
    /// recover step by step, as the server's `/v1/capacity/reduce` does. `reason` goes to the
    /// log. Returns the share of the configured limits in force now.
    ///
    /// ```
    /// use std::num::NonZeroU32;
    /// use std::time::Duration;
    /// use sluice::{Descriptor, RateLimiter};
    ///
    /// let limiter = RateLimiter::builder().build()?;
    /// limiter.set_capacity("openai", NonZeroU32::new(100).unwrap(), Duration::from_secs(60))?;
    /// limiter.on_capacity_change(|change| println!("{} now at {}", change.domain, change.factor));
    /// let openai = Descriptor::resource("openai");
    /// assert_eq!(limiter.announce_reduced(&openai, 0.5, "429 from the provider")?, 0.5);
    /// assert_eq!(limiter.capacity(&openai).unwrap().total, Some(50));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn announce_reduced(
        &self,
        descriptor: &Descriptor,
        factor: f64,
        reason: &str,
    ) -> Result<f64, CapacityError> {
        if !(factor > 0.0 && factor < 1.0) {
            return Err(CapacityError::Factor(factor));
        }
        let app = &self.inner.app;
        let rule = self
            .inner
            .judged(descriptor, |rule, _| rule.clone())
            .ok_or_else(|| CapacityError::NoRule {
                domain: descriptor.domain().to_string(),
            })?;
        let name = RuleName {
            domain: descriptor.domain().to_string(),
            rule: rule.path.to_string(),
        };
        let in_force = rule.capacity.fraction();
        let announcing = app.clone();
        let announced = self
            .inner
            .wait_for(async move { announcing.reduce_capacity(name, in_force, factor).await })
            .map_err(|_| CapacityError::Stopped)?;
        tracing::warn!(domain = %descriptor.domain(), rule = %rule.path, factor, reason, "capacity reduced by an embedded limiter");
        match announced {
            Ok(announcement) => Ok(announcement.factor),
            Err(error) => Err(CapacityError::Store(error.to_string())),
        }
    }

    /// Has `listener` told of every change of a rule's capacity factor: reductions announced
    /// here or anywhere in the fleet, and each step of their recovery. It runs on the
    /// limiter's background thread: keep it short, and do not call the limiter's blocking
    /// methods from it.
    pub fn on_capacity_change(&self, listener: impl Fn(&CapacityChange) + Send + Sync + 'static) {
        let mut listeners = self
            .inner
            .app
            .capacity_listeners
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        listeners.push(Box::new(move |changed| {
            listener(&CapacityChange {
                domain: changed.name.domain.clone(),
                rule: changed.name.rule.clone(),
                factor: changed.factor,
            })
        }));
    }
}

/// A call being decided on the limiter's thread ([`RateLimiter::acquire`]): await it for the
/// [`Decision`]. Dropped before it is ready, the call leaves its queue.
#[must_use = "dropping it gives the call up"]
pub struct Acquire(
    Result<tokio::task::JoinHandle<Result<Decision, AcquireError>>, Option<AcquireError>>,
);

impl std::future::Future for Acquire {
    type Output = Result<Decision, AcquireError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut self.0 {
            Ok(deciding) => std::pin::Pin::new(deciding)
                .poll(cx)
                .map(|done| done.map_err(|_| AcquireError::Stopped)?),
            Err(error) => {
                std::task::Poll::Ready(Err(error.take().unwrap_or(AcquireError::Stopped)))
            }
        }
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if let Ok(deciding) = &self.0 {
            deciding.abort();
        }
    }
}

impl std::fmt::Debug for Acquire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acquire")
    }
}
