//! envoyproxy/ratelimit's environment variables, read with the peer's meanings and defaults, so
//! a Deployment written for it runs sluice unchanged. A variable applies only where sluice's
//! own flag or variable is not given; what was taken, and what is ignored, is reported for the
//! start-up log. The peer's names are those of its `src/settings/settings.go`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::ArgMatches;
use clap::parser::ValueSource;

use super::{LogFormat, Settings};

/// What sluice took from the peer's environment, for the start-up log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    /// One line per variable applied: `GRPC_PORT=8081 → --grpc-addr 0.0.0.0:8081`.
    pub taken: Vec<String>,
    /// Variables set but not applied, and why.
    pub ignored: Vec<String>,
}

/// A peer variable whose value sluice cannot read: sluice refuses to start, naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value}: {problem}")]
pub struct PeerEnvError {
    /// The variable.
    pub var: String,
    /// Its value.
    pub value: String,
    /// What is wrong with it.
    pub problem: String,
}

/// Families of the peer's variables that configure what sluice does not have (statsd,
/// memcache, an xDS config source, a second Redis for per-second limits): each one set is
/// named in a warning, never silently dropped.
const IGNORED_PREFIXES: [(&str, &str); 6] = [
    ("STATSD_", "sluice exports Prometheus metrics, not statsd"),
    ("MEMCACHE_", "sluice stores fleet counts in Redis only"),
    ("CONFIG_GRPC_XDS_", "sluice reads rules from files only"),
    ("XDS_CLIENT_", "sluice reads rules from files only"),
    (
        "REDIS_PERSECOND_",
        "per-second limits share the one Redis store",
    ),
    ("REDIS_PIPELINE_", "sluice pipelines its sync rounds itself"),
];

/// Single variables sluice accepts and does not need.
const IGNORED: [(&str, &str); 13] = [
    (
        "USE_STATSD",
        "sluice exports Prometheus metrics, not statsd",
    ),
    (
        "USE_DOG_STATSD",
        "sluice exports Prometheus metrics, not statsd",
    ),
    (
        "USE_DOG_STATSD_MOGRIFIERS",
        "sluice exports Prometheus metrics, not statsd",
    ),
    (
        "EXTRA_TAGS",
        "sluice exports Prometheus metrics, not statsd",
    ),
    (
        "STATS_FLUSH_INTERVAL",
        "Prometheus scrapes; nothing is flushed",
    ),
    ("DISABLE_STATS", "metrics are always served"),
    (
        "PROMETHEUS_MAPPER_YAML",
        "sluice writes the peer's default metric names itself",
    ),
    (
        "REDIS_POOL_SIZE",
        "sluice multiplexes one connection per replica",
    ),
    (
        "REDIS_HEALTH_CHECK_ACTIVE_CONNECTION",
        "see --redis-failure-policy deny",
    ),
    (
        "LOCAL_CACHE_SIZE_IN_BYTES",
        "every decision is local already",
    ),
    (
        "EXPIRATION_JITTER_MAX_SECONDS",
        "keys expire one minute after their window",
    ),
    ("GRPC_UDS", "sluice listens on TCP"),
    ("PROTO", "sluice listens on TCP"),
];

struct Reader<'a> {
    vars: &'a BTreeMap<String, String>,
    given: &'a ArgMatches,
    adopted: Adopted,
}

impl Reader<'_> {
    fn get(&self, var: &str) -> Option<&str> {
        self.vars
            .get(var)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Whether sluice's own flag or variable for setting `id` was given: then it wins.
    fn own(&self, id: &str) -> bool {
        matches!(
            self.given.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    }

    fn took(&mut self, vars: &str, flag: &str, value: impl std::fmt::Display) {
        self.adopted
            .taken
            .push(format!("{vars} → --{flag} {value}"));
    }

    fn ignore(&mut self, var: &str, why: impl std::fmt::Display) {
        self.adopted.ignored.push(format!("{var}: {why}"));
    }

    fn error(&self, var: &str, problem: impl Into<String>) -> PeerEnvError {
        PeerEnvError {
            var: var.into(),
            value: self.vars.get(var).cloned().unwrap_or_default(),
            problem: problem.into(),
        }
    }

    /// A boolean as Go's `strconv.ParseBool` reads it.
    fn flag(&self, var: &str) -> Result<Option<bool>, PeerEnvError> {
        let Some(text) = self.get(var) else {
            return Ok(None);
        };
        match text {
            "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(Some(true)),
            "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(Some(false)),
            _ => Err(self.error(var, "not a boolean (true or false)")),
        }
    }

    /// A duration as Go writes them (`24h`, `1h30m`, `250ms`).
    fn duration(&self, var: &str) -> Result<Option<Duration>, PeerEnvError> {
        self.get(var)
            .map(|text| {
                humantime::parse_duration(text).map_err(|e| self.error(var, format!("{e}")))
            })
            .transpose()
    }

    /// `HOST` and `PORT` style pairs, each defaulting as in the peer; `None` when neither is set.
    fn address(
        &self,
        host_var: &str,
        port_var: &str,
        default_port: u16,
    ) -> Result<Option<SocketAddr>, PeerEnvError> {
        if self.get(host_var).is_none() && self.get(port_var).is_none() {
            return Ok(None);
        }
        let host = self.get(host_var).unwrap_or("0.0.0.0");
        let port = match self.get(port_var) {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| self.error(port_var, "not a port number"))?,
        };
        listen_address(host, port)
            .map(Some)
            .map_err(|problem| self.error(host_var, problem))
    }

    /// A boolean peer variable onto a boolean setting.
    fn boolean(
        &mut self,
        var: &str,
        id: &str,
        flag: &str,
        setting: &mut bool,
    ) -> Result<(), PeerEnvError> {
        if let Some(value) = self.flag(var)? {
            if self.own(id) {
                self.ignore(var, format!("--{flag} is given"));
            } else {
                *setting = value;
                self.took(var, flag, value);
            }
        }
        Ok(())
    }

    /// A text peer variable onto a text setting.
    fn text(
        &mut self,
        var: &str,
        id: &str,
        flag: &str,
        setting: &mut String,
    ) -> Result<(), PeerEnvError> {
        if let Some(value) = self.get(var).map(str::to_string) {
            if self.own(id) {
                self.ignore(var, format!("--{flag} is given"));
            } else {
                self.took(var, flag, &value);
                *setting = value;
            }
        }
        Ok(())
    }
}

/// A listen address from a host (a name, an IPv4 or IPv6 address, or empty for every
/// interface) and a port.
fn listen_address(host: &str, port: u16) -> Result<SocketAddr, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = match host {
        "" | "0.0.0.0" => "0.0.0.0",
        "localhost" => "127.0.0.1",
        other => other,
    };
    host.parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, port))
        .map_err(|_| format!("`{host}` is not an IP address to listen on"))
}

/// Applies the peer's variables in `vars` to `settings` wherever `given` (the parsed command
/// line) shows that sluice's own flag or variable was not set.
pub fn adopt(
    settings: &mut Settings,
    given: &ArgMatches,
    vars: &BTreeMap<String, String>,
) -> Result<Adopted, PeerEnvError> {
    let mut r = Reader {
        vars,
        given,
        adopted: Adopted::default(),
    };
    config_location(&mut r, settings)?;
    listeners(&mut r, settings)?;
    logging(&mut r, settings)?;
    redis(&mut r, settings)?;
    behaviour(&mut r, settings)?;
    for (var, why) in IGNORED {
        if r.get(var).is_some() {
            r.ignore(var, format!("ignored: {why}"));
        }
    }
    for (var, value) in vars {
        if let Some((_, why)) = IGNORED_PREFIXES.iter().find(|(p, _)| var.starts_with(p))
            && !value.is_empty()
        {
            r.ignore(var, format!("ignored: {why}"));
        }
    }
    if let Some(kind) = r
        .get("BACKEND_TYPE")
        .filter(|k| !k.eq_ignore_ascii_case("redis"))
    {
        let kind = kind.to_string();
        r.ignore(
            "BACKEND_TYPE",
            format!("ignored: `{kind}`; sluice counts locally and syncs through Redis"),
        );
    }
    if let Some(kind) = r
        .get("CONFIG_TYPE")
        .filter(|k| !k.eq_ignore_ascii_case("FILE"))
    {
        let kind = kind.to_string();
        r.ignore(
            "CONFIG_TYPE",
            format!("ignored: `{kind}`; sluice reads rules from files"),
        );
    }
    Ok(r.adopted)
}

/// `RUNTIME_ROOT`/`RUNTIME_SUBDIRECTORY`/`RUNTIME_APPDIRECTORY`: the rules directory is their
/// join, with the peer's defaults for the parts not set.
fn config_location(r: &mut Reader<'_>, settings: &mut Settings) -> Result<(), PeerEnvError> {
    const PARTS: [&str; 3] = [
        "RUNTIME_ROOT",
        "RUNTIME_SUBDIRECTORY",
        "RUNTIME_APPDIRECTORY",
    ];
    if PARTS.iter().any(|p| r.get(p).is_some()) {
        if r.own("config") {
            r.ignore("RUNTIME_ROOT", "--config is given");
        } else {
            let mut dir =
                PathBuf::from(r.get("RUNTIME_ROOT").unwrap_or("/srv/runtime_data/current"));
            if let Some(sub) = r.get("RUNTIME_SUBDIRECTORY") {
                dir.push(sub);
            }
            dir.push(r.get("RUNTIME_APPDIRECTORY").unwrap_or("config"));
            let set: Vec<&str> = PARTS
                .iter()
                .copied()
                .filter(|p| r.get(p).is_some())
                .collect();
            r.took(&set.join(", "), "config", dir.display());
            settings.config = dir;
        }
    }
    if r.flag("RUNTIME_WATCH_ROOT")?.is_some() {
        r.ignore(
            "RUNTIME_WATCH_ROOT",
            "accepted: sluice watches the config directory, symlink swaps included, and rescans it",
        );
    }
    if r.flag("RUNTIME_IGNOREDOTFILES")? == Some(false) {
        r.ignore(
            "RUNTIME_IGNOREDOTFILES",
            "sluice always ignores hidden files (a ConfigMap's ..data entries among them)",
        );
    }
    Ok(())
}

fn listeners(r: &mut Reader<'_>, settings: &mut Settings) -> Result<(), PeerEnvError> {
    let pairs: [(&str, &str, u16, &str, &str); 3] = [
        ("HOST", "PORT", 8080, "http_addr", "http-addr"),
        ("GRPC_HOST", "GRPC_PORT", 8081, "grpc_addr", "grpc-addr"),
        ("DEBUG_HOST", "DEBUG_PORT", 6070, "debug_addr", "debug-addr"),
    ];
    for (host, port, default_port, id, flag) in pairs {
        let Some(addr) = r.address(host, port, default_port)? else {
            continue;
        };
        if r.own(id) {
            r.ignore(port, format!("--{flag} is given"));
            continue;
        }
        r.took(&format!("{host}/{port}"), flag, addr);
        match id {
            "http_addr" => settings.http_addr = addr,
            "grpc_addr" => settings.grpc_addr = addr,
            _ => settings.debug_addr = Some(addr),
        }
    }
    for (var, id, flag) in [
        (
            "GRPC_MAX_CONNECTION_AGE",
            "grpc_max_connection_age",
            "grpc-max-connection-age",
        ),
        (
            "GRPC_MAX_CONNECTION_AGE_GRACE",
            "grpc_max_connection_age_grace",
            "grpc-max-connection-age-grace",
        ),
    ] {
        if let Some(age) = r.duration(var)? {
            if r.own(id) {
                r.ignore(var, format!("--{flag} is given"));
                continue;
            }
            r.took(var, flag, humantime::format_duration(age));
            if id == "grpc_max_connection_age" {
                settings.grpc_max_connection_age = Some(age);
            } else {
                settings.grpc_max_connection_age_grace = Some(age);
            }
        }
    }
    if r.flag("GRPC_SERVER_USE_TLS")? == Some(true) {
        if r.own("grpc_tls_cert") {
            r.ignore("GRPC_SERVER_USE_TLS", "--grpc-tls-cert is given");
        } else {
            let path = |var: &str| {
                r.get(var)
                    .map(PathBuf::from)
                    .ok_or_else(|| r.error(var, "GRPC_SERVER_USE_TLS=true needs it"))
            };
            settings.grpc_tls_cert = Some(path("GRPC_SERVER_TLS_CERT")?);
            settings.grpc_tls_key = Some(path("GRPC_SERVER_TLS_KEY")?);
            settings.grpc_client_ca = r.get("GRPC_CLIENT_TLS_CACERT").map(PathBuf::from);
            settings.grpc_client_san = r.get("GRPC_CLIENT_TLS_SAN").map(str::to_string);
            let mutual = if settings.grpc_client_ca.is_some() {
                "mutual TLS"
            } else {
                "TLS"
            };
            r.took(
                "GRPC_SERVER_USE_TLS, GRPC_SERVER_TLS_CERT, GRPC_SERVER_TLS_KEY, GRPC_CLIENT_TLS_CACERT, GRPC_CLIENT_TLS_SAN",
                "grpc-tls-cert",
                mutual,
            );
        }
    }
    if r.flag("USE_PROMETHEUS")? == Some(true) {
        if r.own("metrics_addr") {
            r.ignore("USE_PROMETHEUS", "--metrics-addr is given");
        } else {
            let text = r.get("PROMETHEUS_ADDR").unwrap_or(":9090").to_string();
            let (host, port) = text
                .rsplit_once(':')
                .ok_or_else(|| r.error("PROMETHEUS_ADDR", "expected host:port or :port"))?;
            let port = port
                .parse::<u16>()
                .map_err(|_| r.error("PROMETHEUS_ADDR", "not a port number"))?;
            let addr = listen_address(host, port).map_err(|p| r.error("PROMETHEUS_ADDR", p))?;
            r.took("USE_PROMETHEUS, PROMETHEUS_ADDR", "metrics-addr", addr);
            settings.metrics_addr = Some(addr);
        }
        let mut path = settings.metrics_path.clone();
        r.text("PROMETHEUS_PATH", "metrics_path", "metrics-path", &mut path)?;
        settings.metrics_path = path;
    }
    Ok(())
}

fn logging(r: &mut Reader<'_>, settings: &mut Settings) -> Result<(), PeerEnvError> {
    if let Some(level) = r.get("LOG_LEVEL") {
        // logrus's level names, as the peer reads them.
        let level = match level.to_ascii_lowercase().as_str() {
            "trace" => "trace",
            "debug" => "debug",
            "info" => "info",
            "warn" | "warning" => "warn",
            "error" | "fatal" | "panic" => "error",
            _ => return Err(r.error("LOG_LEVEL", "expected trace, debug, info, warn or error")),
        };
        if r.own("log_level") {
            r.ignore("LOG_LEVEL", "--log-level is given");
        } else {
            r.took("LOG_LEVEL", "log-level", level);
            settings.log_level = level.into();
        }
    }
    if let Some(format) = r.get("LOG_FORMAT") {
        let format = match format.to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err(r.error("LOG_FORMAT", "expected text or json")),
        };
        if r.own("log_format") {
            r.ignore("LOG_FORMAT", "--log-format is given");
        } else {
            r.took(
                "LOG_FORMAT",
                "log-format",
                format!("{format:?}").to_lowercase(),
            );
            settings.log_format = format;
        }
    }
    Ok(())
}

/// The peer's Redis variables. `REDIS_URL` is sluice's variable too: a value with a scheme
/// (`redis://…`) is sluice's and used as it is; one without (`host:port`, a socket path, a
/// comma list) is the peer's, read with `REDIS_SOCKET_TYPE`, `REDIS_TYPE`, `REDIS_AUTH` and
/// `REDIS_TLS`.
fn redis(r: &mut Reader<'_>, s: &mut Settings) -> Result<(), PeerEnvError> {
    let peer_form = s.redis_url.as_deref().filter(|url| !url.contains("://"));
    if let Some(url) = peer_form.map(str::to_string) {
        let kind = r.get("REDIS_TYPE").unwrap_or("SINGLE").to_ascii_uppercase();
        let tls = r.flag("REDIS_TLS")?.unwrap_or(false);
        let auth = r.get("REDIS_AUTH").map(|auth| match auth.split_once(':') {
            Some((user, password)) => (Some(user.to_string()), password.to_string()),
            None => (None, auth.to_string()),
        });
        let socket = match r.get("REDIS_SOCKET_TYPE") {
            Some(kind) => kind.to_ascii_lowercase(),
            // The peer's default is `unix`; an address that is not a path must mean tcp.
            None if url.starts_with('/') => "unix".into(),
            None => "tcp".into(),
        };
        let scheme = if tls { "rediss" } else { "redis" };
        let userinfo = auth.as_ref().map_or(String::new(), |(user, password)| {
            let user = user.as_deref().map(escape).unwrap_or_default();
            format!("{user}:{}@", escape(password))
        });
        let insecure = r.flag("REDIS_TLS_SKIP_HOSTNAME_VERIFICATION")? == Some(true);
        let fragment = if insecure { "#insecure" } else { "" };
        let tcp = |address: &str| format!("{scheme}://{userinfo}{}{fragment}", address.trim());
        let (urls, meaning) = match (kind.as_str(), socket.as_str()) {
            (_, "unix") if kind == "SINGLE" => {
                let mut query = Vec::new();
                if let Some((user, password)) = &auth {
                    if let Some(user) = user {
                        query.push(format!("user={}", escape(user)));
                    }
                    query.push(format!("pass={}", escape(password)));
                }
                let query = if query.is_empty() {
                    String::new()
                } else {
                    format!("?{}", query.join("&"))
                };
                (
                    vec![format!("redis+unix://{url}{query}")],
                    "a single Redis on a socket",
                )
            }
            (_, "unix") => {
                return Err(r.error(
                    "REDIS_SOCKET_TYPE",
                    "a unix socket works with REDIS_TYPE=SINGLE only",
                ));
            }
            (_, "tcp") => match kind.as_str() {
                "SINGLE" => (vec![tcp(&url)], "a single Redis"),
                "CLUSTER" => {
                    s.redis_cluster = true;
                    (url.split(',').map(tcp).collect(), "a Redis Cluster")
                }
                "SENTINEL" => {
                    let mut parts = url.split(',').map(str::trim);
                    let master = parts.next().unwrap_or_default().to_string();
                    let sentinels: Vec<String> = parts.map(tcp).collect();
                    if master.is_empty() || sentinels.is_empty() {
                        return Err(r.error(
                            "REDIS_URL",
                            "REDIS_TYPE=SENTINEL takes `master-name,host:port[,host:port…]`",
                        ));
                    }
                    s.redis_sentinel_master = Some(master);
                    (sentinels, "Redis Sentinel")
                }
                _ => return Err(r.error("REDIS_TYPE", "expected SINGLE, CLUSTER or SENTINEL")),
            },
            _ => return Err(r.error("REDIS_SOCKET_TYPE", "expected tcp or unix")),
        };
        let shown: Vec<String> = urls.iter().map(|u| redact(u)).collect();
        r.took(
            "REDIS_URL, REDIS_SOCKET_TYPE, REDIS_TYPE, REDIS_AUTH, REDIS_TLS",
            "redis-url",
            format!("{} ({meaning})", shown.join(",")),
        );
        s.redis_url = Some(urls.join(","));
        for (var, field) in [
            ("REDIS_TLS_CACERT", &mut s.redis_ca_file),
            ("REDIS_TLS_CLIENT_CERT", &mut s.redis_cert_file),
            ("REDIS_TLS_CLIENT_KEY", &mut s.redis_key_file),
        ] {
            if let Some(path) = r.vars.get(var).filter(|v| !v.is_empty()) {
                *field = Some(PathBuf::from(path));
                r.adopted
                    .taken
                    .push(format!("{var} → the Redis TLS file {path}"));
            }
        }
        if insecure {
            r.ignore(
                "REDIS_TLS_SKIP_HOSTNAME_VERIFICATION",
                "applied as rediss://…#insecure, which skips certificate verification altogether",
            );
        }
    } else if r.get("REDIS_AUTH").is_some() || r.get("REDIS_TYPE").is_some() {
        let why = "REDIS_URL is a URL (sluice's form): its own user, password and scheme apply";
        for var in ["REDIS_AUTH", "REDIS_TYPE", "REDIS_SOCKET_TYPE", "REDIS_TLS"] {
            if r.get(var).is_some() {
                r.ignore(var, why);
            }
        }
    }
    if let Some(timeout) = r.duration("REDIS_TIMEOUT")? {
        if r.own("redis_timeout") {
            r.ignore("REDIS_TIMEOUT", "--redis-timeout is given");
        } else if timeout.is_zero() {
            return Err(r.error("REDIS_TIMEOUT", "must be more than zero"));
        } else {
            r.took(
                "REDIS_TIMEOUT",
                "redis-timeout",
                humantime::format_duration(timeout),
            );
            s.redis_timeout = timeout;
        }
    }
    if let Some(prefix) = r.get("CACHE_KEY_PREFIX").map(str::to_string) {
        if r.own("redis_namespace") {
            r.ignore("CACHE_KEY_PREFIX", "--redis-namespace is given");
        } else {
            r.took("CACHE_KEY_PREFIX", "redis-namespace", &prefix);
            s.redis_namespace = Some(prefix);
        }
    }
    if r.flag("REDIS_PERSECOND")? == Some(true) {
        r.ignore("REDIS_PERSECOND", "per-second limits share the one Redis store (sluice counts them locally and syncs them like any other)");
    }
    Ok(())
}

/// Percent-encodes what may not stand in a URL's user or password as it is.
fn escape(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A Redis URL with its password hidden, for logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => match url.find("pass=") {
            Some(at) => format!("{}pass=***", &url[..at]),
            None => url.to_string(),
        },
    }
}

fn behaviour(r: &mut Reader<'_>, s: &mut Settings) -> Result<(), PeerEnvError> {
    r.boolean(
        "SHADOW_MODE",
        "shadow_mode",
        "shadow-mode",
        &mut s.shadow_mode,
    )?;
    r.boolean("QUOTA_MODE", "quota_mode", "quota-mode", &mut s.quota_mode)?;
    r.boolean(
        "RESPONSE_DYNAMIC_METADATA",
        "response_dynamic_metadata",
        "response-dynamic-metadata",
        &mut s.response_dynamic_metadata,
    )?;
    r.boolean(
        "MERGE_DOMAIN_CONFIG",
        "merge_domain_config",
        "merge-domain-config",
        &mut s.merge_domain_config,
    )?;
    r.boolean(
        "LIMIT_RESPONSE_HEADERS_ENABLED",
        "limit_response_headers",
        "limit-response-headers",
        &mut s.limit_response_headers,
    )?;
    r.text(
        "LIMIT_LIMIT_HEADER",
        "limit_limit_header",
        "limit-limit-header",
        &mut s.limit_limit_header,
    )?;
    r.text(
        "LIMIT_REMAINING_HEADER",
        "limit_remaining_header",
        "limit-remaining-header",
        &mut s.limit_remaining_header,
    )?;
    r.text(
        "LIMIT_RESET_HEADER",
        "limit_reset_header",
        "limit-reset-header",
        &mut s.limit_reset_header,
    )?;
    r.boolean(
        "FORCE_START_WITHOUT_INITIAL_CONFIG",
        "force_start_without_initial_config",
        "force-start-without-initial-config",
        &mut s.force_start_without_initial_config,
    )?;
    r.boolean(
        "HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED",
        "healthy_with_at_least_one_config_loaded",
        "healthy-with-at-least-one-config-loaded",
        &mut s.healthy_with_at_least_one_config_loaded,
    )?;
    if let Some(text) = r.get("NEAR_LIMIT_RATIO") {
        let ratio = super::parse_ratio(text).map_err(|p| r.error("NEAR_LIMIT_RATIO", p))?;
        if r.own("near_limit_ratio") {
            r.ignore("NEAR_LIMIT_RATIO", "--near-limit-ratio is given");
        } else {
            r.took("NEAR_LIMIT_RATIO", "near-limit-ratio", ratio);
            s.near_limit_ratio = ratio;
        }
    }
    tracing_variables(r, s)?;
    if r.flag("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT")?.is_some() {
        r.ignore(
            "STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT",
            "accepted: a denied request never counts in sluice",
        );
    }
    Ok(())
}

/// `TRACING_*` as the peer reads them (its exporter's default protocol is HTTP), and the
/// standard `OTEL_*` names where sluice has a setting for them.
fn tracing_variables(r: &mut Reader<'_>, s: &mut Settings) -> Result<(), PeerEnvError> {
    let enabled = r.flag("TRACING_ENABLED")?;
    r.boolean("TRACING_ENABLED", "tracing", "tracing", &mut s.tracing)?;
    let protocol = |text: &str| match text.to_ascii_lowercase().as_str() {
        "grpc" => Some(crate::traces::ExportProtocol::Grpc),
        "http" | "http/protobuf" => Some(crate::traces::ExportProtocol::Http),
        _ => None,
    };
    for var in ["TRACING_EXPORTER_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        if let Some(text) = r.get(var).map(str::to_string) {
            let value = protocol(&text).ok_or_else(|| r.error(var, "expected grpc or http"))?;
            if r.own("tracing_protocol") {
                r.ignore(var, "--tracing-protocol is given");
            } else {
                r.took(var, "tracing-protocol", format!("{value:?}").to_lowercase());
                s.tracing_protocol = value;
            }
            return finish_tracing(r, s);
        }
    }
    if enabled == Some(true) && !r.own("tracing_protocol") {
        // The peer's exporter speaks OTLP over HTTP unless told otherwise.
        r.took(
            "TRACING_ENABLED (the peer's default protocol)",
            "tracing-protocol",
            "http",
        );
        s.tracing_protocol = crate::traces::ExportProtocol::Http;
    }
    finish_tracing(r, s)
}

fn finish_tracing(r: &mut Reader<'_>, s: &mut Settings) -> Result<(), PeerEnvError> {
    for var in ["TRACING_SERVICE_NAME", "OTEL_SERVICE_NAME"] {
        if r.get(var).is_some() && !r.own("tracing_service_name") {
            let mut name = s.tracing_service_name.clone();
            r.text(
                var,
                "tracing_service_name",
                "tracing-service-name",
                &mut name,
            )?;
            s.tracing_service_name = name;
            break;
        }
    }
    if let Some(text) = r.get("TRACING_SAMPLING_RATE") {
        let rate = super::parse_share(text).map_err(|p| r.error("TRACING_SAMPLING_RATE", p))?;
        if r.own("tracing_sampling_rate") {
            r.ignore("TRACING_SAMPLING_RATE", "--tracing-sampling-rate is given");
        } else {
            r.took("TRACING_SAMPLING_RATE", "tracing-sampling-rate", rate);
            s.tracing_sampling_rate = rate;
        }
    }
    let mut resource = Vec::new();
    for (var, attribute) in [
        ("TRACING_SERVICE_NAMESPACE", "service.namespace"),
        ("TRACING_SERVICE_INSTANCE_ID", "service.instance.id"),
    ] {
        if let Some(value) = r.get(var) {
            resource.push(format!("{attribute}={value}"));
        }
    }
    if !resource.is_empty() && !r.own("tracing_resource") {
        let resource = resource.join(",");
        r.took(
            "TRACING_SERVICE_NAMESPACE, TRACING_SERVICE_INSTANCE_ID",
            "tracing-resource",
            &resource,
        );
        s.tracing_resource = resource;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Parser)]
    struct Serve {
        #[command(flatten)]
        settings: Settings,
    }

    /// Parses `args` with no environment, then adopts `vars`.
    fn adopt_env(
        args: &[&str],
        vars: &[(&str, &str)],
    ) -> Result<(Settings, Adopted), PeerEnvError> {
        let command = Serve::command().mut_args(|arg| arg.env(None));
        let matches = command
            .try_get_matches_from(std::iter::once("sluice").chain(args.iter().copied()))
            .unwrap();
        let mut settings = Serve::from_arg_matches(&matches).unwrap().settings;
        let vars = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let adopted = adopt(&mut settings, &matches, &vars)?;
        Ok((settings, adopted))
    }

    #[test]
    fn a_peer_deployment_environment_sets_the_same_things() {
        let (s, adopted) = adopt_env(
            &[],
            &[
                ("RUNTIME_ROOT", "/data"),
                ("RUNTIME_SUBDIRECTORY", "ratelimit"),
                ("GRPC_PORT", "9081"),
                ("PORT", "9080"),
                ("DEBUG_PORT", "9070"),
                ("LOG_LEVEL", "WARNING"),
                ("LOG_FORMAT", "json"),
                ("SHADOW_MODE", "True"),
                ("USE_PROMETHEUS", "true"),
                ("NEAR_LIMIT_RATIO", "0.9"),
                ("GRPC_MAX_CONNECTION_AGE", "1h30m"),
            ],
        )
        .unwrap();
        assert_eq!(s.config, PathBuf::from("/data/ratelimit/config"));
        assert_eq!(s.grpc_addr.to_string(), "0.0.0.0:9081");
        assert_eq!(s.http_addr.to_string(), "0.0.0.0:9080");
        assert_eq!(s.debug_addr.unwrap().to_string(), "0.0.0.0:9070");
        assert_eq!(s.metrics_addr.unwrap().to_string(), "0.0.0.0:9090");
        assert_eq!(
            (s.log_level.as_str(), s.log_format),
            ("warn", LogFormat::Json)
        );
        assert!(s.shadow_mode);
        assert_eq!(s.near_limit_ratio, 0.9);
        assert_eq!(s.grpc_max_connection_age, Some(Duration::from_secs(5400)));
        assert!(
            adopted
                .taken
                .iter()
                .any(|t| t == "GRPC_HOST/GRPC_PORT → --grpc-addr 0.0.0.0:9081"),
            "{adopted:?}"
        );
    }

    #[test]
    fn sluices_own_flags_win_and_unknown_features_are_named() {
        let (s, adopted) = adopt_env(
            &["--grpc-addr", "127.0.0.1:7000"],
            &[
                ("GRPC_PORT", "9081"),
                ("USE_STATSD", "true"),
                ("MEMCACHE_HOST_PORT", "m:11211"),
            ],
        )
        .unwrap();
        assert_eq!(s.grpc_addr.to_string(), "127.0.0.1:7000");
        assert!(adopted.taken.is_empty(), "{adopted:?}");
        assert_eq!(
            adopted.ignored,
            [
                "GRPC_PORT: --grpc-addr is given",
                "USE_STATSD: ignored: sluice exports Prometheus metrics, not statsd",
                "MEMCACHE_HOST_PORT: ignored: sluice stores fleet counts in Redis only",
            ]
        );
        // Nothing set: nothing changes.
        let (plain, adopted) = adopt_env(&[], &[]).unwrap();
        assert_eq!(plain.config, PathBuf::from("config"));
        assert_eq!(adopted, Adopted::default());
    }

    #[test]
    fn peer_redis_addresses_become_urls() {
        let (s, adopted) = adopt_env(
            &["--redis-url", "10.0.0.5:6379"],
            &[
                ("REDIS_SOCKET_TYPE", "tcp"),
                ("REDIS_AUTH", "svc:p@ss"),
                ("REDIS_TIMEOUT", "2s"),
                ("CACHE_KEY_PREFIX", "rl_"),
            ],
        )
        .unwrap();
        assert_eq!(
            s.redis_url.as_deref(),
            Some("redis://svc:p%40ss@10.0.0.5:6379")
        );
        assert_eq!(s.redis_timeout, Duration::from_secs(2));
        assert_eq!(s.redis_namespace.as_deref(), Some("rl_"));
        assert!(
            adopted.taken[0].contains("redis://***@10.0.0.5:6379"),
            "{adopted:?}"
        );
        let (s, _) = adopt_env(
            &["--redis-url", "a:7000, b:7001"],
            &[
                ("REDIS_TYPE", "cluster"),
                ("REDIS_TLS", "true"),
                ("REDIS_AUTH", "pw"),
            ],
        )
        .unwrap();
        assert!(s.redis_cluster);
        assert_eq!(
            s.redis_url.as_deref(),
            Some("rediss://:pw@a:7000,rediss://:pw@b:7001")
        );
        let (s, _) = adopt_env(
            &["--redis-url", "mymaster,s1:26379,s2:26379"],
            &[("REDIS_TYPE", "SENTINEL")],
        )
        .unwrap();
        assert_eq!(s.redis_sentinel_master.as_deref(), Some("mymaster"));
        assert_eq!(
            s.redis_url.as_deref(),
            Some("redis://s1:26379,redis://s2:26379")
        );
        let (s, _) =
            adopt_env(&["--redis-url", "/run/redis.sock"], &[("REDIS_AUTH", "pw")]).unwrap();
        assert_eq!(
            s.redis_url.as_deref(),
            Some("redis+unix:///run/redis.sock?pass=pw")
        );
        // sluice's own URL form is left alone.
        let (s, adopted) =
            adopt_env(&["--redis-url", "redis://r:6379"], &[("REDIS_AUTH", "pw")]).unwrap();
        assert_eq!(s.redis_url.as_deref(), Some("redis://r:6379"));
        assert_eq!(adopted.ignored.len(), 1);
    }

    #[test]
    fn peer_tracing_and_tls_variables() {
        let (s, _) = adopt_env(
            &[],
            &[
                ("TRACING_ENABLED", "true"),
                ("TRACING_SERVICE_NAME", "RateLimit"),
                ("TRACING_SERVICE_NAMESPACE", "edge"),
                ("TRACING_SAMPLING_RATE", "0.25"),
                ("GRPC_SERVER_USE_TLS", "true"),
                ("GRPC_SERVER_TLS_CERT", "/tls/cert.pem"),
                ("GRPC_SERVER_TLS_KEY", "/tls/key.pem"),
                ("GRPC_CLIENT_TLS_CACERT", "/tls/ca.pem"),
                ("GRPC_CLIENT_TLS_SAN", "envoy.mesh"),
            ],
        )
        .unwrap();
        assert!(s.tracing);
        // The peer's exporter default: OTLP over HTTP.
        assert_eq!(s.tracing_protocol, crate::traces::ExportProtocol::Http);
        assert_eq!(s.tracing_service_name, "RateLimit");
        assert_eq!(s.tracing_sampling_rate, 0.25);
        assert_eq!(s.tracing_resource, "service.namespace=edge");
        let tls = s.grpc_tls().expect("TLS on");
        assert_eq!(tls.client_ca, Some(PathBuf::from("/tls/ca.pem")));
        assert_eq!(tls.client_san.as_deref(), Some("envoy.mesh"));
        let error = adopt_env(&[], &[("GRPC_SERVER_USE_TLS", "true")])
            .err()
            .unwrap();
        assert_eq!(error.var, "GRPC_SERVER_TLS_CERT");
    }

    #[test]
    fn unreadable_values_name_the_variable() {
        let error = adopt_env(&[], &[("GRPC_PORT", "http")]).err().unwrap();
        assert_eq!(error.to_string(), "GRPC_PORT=http: not a port number");
        let error = adopt_env(&[], &[("SHADOW_MODE", "yes please")])
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "SHADOW_MODE=yes please: not a boolean (true or false)"
        );
    }
}
