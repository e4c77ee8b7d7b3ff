//! Typed settings, read from environment variables with documented defaults.
//!
//! Every value is validated at start-up, so a typo stops the process with a message that
//! names the variable, instead of surfacing later as odd behaviour.

use std::time::Duration;

use adapters_mysql::database::DEFAULT_STATEMENT_TIMEOUT;
use adapters_redis::connection::{DEFAULT_COMMAND_TIMEOUT, Topology as RedisTopology};
use adapters_redis::lock::{DEFAULT_HANDOFF_LIMIT, DEFAULT_LEASE, DEFAULT_MAX_HOLD};
use application::charge_points::DEFAULT_LOCK_WAIT;
use domain::queue::AdmitPolicy;

/// The window over which the queue's admission rate (for wait estimates) is observed.
pub const QUEUE_RATE_WINDOW: Duration = Duration::from_secs(60);

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line: for log shippers.
    Json,
    /// Human-readable lines: for a terminal.
    Text,
}

/// How a request waits for a lock that someone else holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWaitMode {
    /// Sleep until the holder's release is announced on Redis pub/sub (the default).
    PubSub,
    /// Retry with exponential backoff and jitter: the baseline pub/sub is measured against.
    Spin,
}

/// Where the waiting queue lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueBackend {
    /// Sorted sets and Lua scripts (the default).
    Redis,
    /// Tables: the baseline.
    MySql,
}

/// Everything the server can be configured with. See the README's configuration table.
/// Its `Debug` leaves the secrets out (the admin key, the signing keys, URL passwords).
#[derive(Clone)]
pub struct Settings {
    /// `DATABASE_URL`: MySQL 8 or MariaDB 10.6+; the database is created when missing.
    pub database_url: String,
    /// `REDIS_URL`.
    pub redis_url: String,
    /// What `REDIS_URL` names: one server, a cluster or a master behind Sentinel.
    pub redis_topology: RedisTopology,
    /// `REDIS_LOCK_NODES`: independent Redis nodes (comma-separated URLs, at least three)
    /// for the quorum lock; `None`: the lock lives on `REDIS_URL`.
    pub redis_lock_nodes: Option<Vec<String>>,
    /// `LOCK_NODE_TIMEOUT_MS`: how long a quorum acquisition waits for one node.
    pub lock_node_timeout: Duration,
    /// `HTTP_ADDR`: where to listen; port 0 picks a free port (tests).
    pub http_addr: String,
    /// `RUST_LOG`.
    pub log_filter: String,
    /// `LOG_FORMAT`: `text` or `json`.
    pub log_format: LogFormat,
    /// `DATABASE_MAX_CONNECTIONS`: pool size per instance.
    pub database_max_connections: u32,
    /// `REDIS_POOL_SIZE`: command connections per instance.
    pub redis_pool_size: usize,
    /// `POINT_LOCK_WAIT_MS`: how long a charge waits for `lock:{point:<userId>}`.
    pub point_lock_wait: Duration,
    /// `POINT_CHARGE_BATCH_MAX`: the most queued charges of one account applied under one
    /// lock hold and transaction (1: each charge alone).
    pub point_charge_batch_max: std::num::NonZeroUsize,
    /// `POINT_CHARGE_STRATEGY` (`locked` or `optimistic`, a benchmark's baseline) and
    /// `POINT_OPTIMISTIC_ATTEMPTS`.
    pub point_charge_strategy: application::charge_points::ChargeStrategy,
    /// `LOCK_LEASE_MS`: how long a lock outlives a crashed holder.
    pub lock_lease: Duration,
    /// `LOCK_WAIT_STRATEGY`: `pubsub` or `spin`.
    pub lock_wait_mode: LockWaitMode,
    /// `LOCK_MAX_HOLD_MS`: the longest a lock is held; past it the work is abandoned.
    pub lock_max_hold: Duration,
    /// `LOCK_HANDOFF_LIMIT`: in pub/sub mode, how many times in a row a released lock may
    /// pass straight to a waiter of the same instance before it is freed in Redis (0: never).
    pub lock_handoff_limit: u32,
    /// `REDIS_COMMAND_TIMEOUT_MS`: how long one Redis command may take.
    pub redis_command_timeout: Duration,
    /// `DATABASE_STATEMENT_TIMEOUT_MS`: the database cuts a statement (and a row-lock
    /// wait) that takes longer.
    pub database_statement_timeout: Duration,
    /// `SHUTDOWN_GRACE_SECONDS`: how long in-flight requests and writes may run on after
    /// SIGTERM (and then connections may take to close).
    pub shutdown_grace_seconds: u64,
    /// `QUEUE_BACKEND`: `redis` or `mysql`.
    pub queue_backend: QueueBackend,
    /// `QUEUE_*`: how the queue admits.
    pub queue: application::queue::QueueConfig,
    /// `QUEUE_NAME`: the queue's Redis hash tag (every key is `{name}:...`), so that
    /// deployments (or tests) sharing one Redis keep separate lines.
    pub queue_name: String,
    /// `RESERVATION_HOLD_SECONDS`: how long a seat hold lasts.
    pub reservation_hold: Duration,
    /// `HOLD_EXPIRY_INTERVAL_MS`: how often each instance expires run-out holds.
    pub hold_expiry_interval: Duration,
    /// `HOLD_EXPIRY_BATCH`: the most holds one round expires.
    pub hold_expiry_batch: u32,
    /// `ADMIN_API_KEY`: the admin API's key (header `X-Admin-Key`); unset, the admin API
    /// answers 401 to everything.
    pub admin_api_key: Option<String>,
    /// `SEED_DEMO_DATA`: demo concerts when the database has none.
    pub seed_demo_data: bool,
    /// `CACHE_ENABLED`: `false` sends every catalog read to MySQL (the benchmark's
    /// baseline).
    pub cache_enabled: bool,
    /// `CACHE_SINGLE_LOADER`: `false` lets every cache miss load by itself (no single
    /// loader per key): the stampede benchmark's baseline; never in production.
    pub cache_single_loader: bool,
    /// `COUPON_ISSUE_STRATEGY`: `redis` (one Redis script decides) or `mysql-lock` (every
    /// request locks the campaign's row: the benchmark's baseline).
    pub coupon_issue_strategy: application::coupons::IssueStrategy,
    /// `CACHE_REPLICA_ACKS` / `CACHE_REPLICA_ACK_TIMEOUT_MS`: how many Redis replicas must
    /// have a cache write mark before the write goes on (0: no wait), and how long to wait.
    pub cache_replica_acks: adapters_redis::cache::ReplicaAcks,
    /// `DISABLE_LOCKS_FOR_TESTING`: replaces the distributed lock by one that excludes no
    /// one, so that tests can show the SQL guards alone keep every write exact. Never in
    /// production.
    pub disable_locks_for_testing: bool,
    /// `CACHE_PREFIX`: put before every cache key, so that deployments (or tests) sharing
    /// one Redis with different databases never read each other's answers. Default: the
    /// database's name and a colon.
    pub cache_prefix: String,
    /// `PAYMENT_EVENTS_STREAM`: the Redis Stream payment events go to.
    pub payment_events_stream: String,
    /// `OUTBOX_RELAY_INTERVAL_MS`: how often every instance sends pending outbox events.
    pub outbox_relay_interval: Duration,
    /// `OUTBOX_BATCH`: the most events one relay round sends.
    pub outbox_batch: u32,
    /// `OPS_ADDR`: the listener of health and metrics.
    pub ops_addr: String,
    /// `AUTH_SIGNING_KEY`: keys set by the operator (the first signs, every one verifies);
    /// `None`: shared keys kept in MySQL.
    pub auth_signing_keys: Option<Vec<Vec<u8>>>,
    /// `AUTH_TOKEN_SECONDS`: how long an access token lives.
    pub auth_token_lifetime: Duration,
    /// `AUTH_KEY_REFRESH_SECONDS`: how often the shared signing keys are reloaded.
    pub auth_key_refresh: Duration,
    /// `MAX_HOLDS_PER_USER`: live holds one user may have on one schedule.
    pub max_holds_per_user: u32,
    /// `RATE_LIMIT_*_PER_MINUTE`.
    pub rate_limits: crate::limits::RateLimitSettings,
    /// `TRUSTED_PROXIES`: whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<crate::limits::IpNet>,
    /// `SSE_MAX_STREAMS`: open event streams one instance serves.
    pub sse_max_streams: usize,
    /// `HTTP_MAX_CONNECTIONS`: open connections of the public listener, all workers
    /// together; `None`: derived from the process's open-file limit
    /// ([`crate::startup::connection_budget`]).
    pub http_max_connections: Option<usize>,
    /// `HTTP_BODY_TIMEOUT_MS`: how long a request body may take to arrive.
    pub http_body_timeout: Duration,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &redact(&self.database_url))
            .field("redis_url", &redact(&self.redis_url))
            .field(
                "redis_lock_nodes",
                &self
                    .redis_lock_nodes
                    .as_ref()
                    .map(|nodes| nodes.iter().map(|n| redact(n)).collect::<Vec<_>>()),
            )
            .field("http_addr", &self.http_addr)
            .field("ops_addr", &self.ops_addr)
            .field("admin_api_key", &self.admin_api_key.as_ref().map(|_| "***"))
            .field(
                "auth_signing_keys",
                &self.auth_signing_keys.as_ref().map(|keys| format!("{} key(s)", keys.len())),
            )
            .finish_non_exhaustive()
    }
}

/// A variable that is set but cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {problem} (got {value:?})")]
pub struct SettingsError {
    name: &'static str,
    value: String,
    problem: String,
}

impl Settings {
    /// Reads the process environment.
    ///
    /// # Errors
    /// [`SettingsError`] naming the first variable that is set to an unusable value.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup` (tests pass a map).
    ///
    /// # Errors
    /// As [`Settings::from_env`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let text = |name: &'static str, default: &str| lookup(name).unwrap_or_else(|| default.to_owned());
        let number = |name: &'static str, default: u64, range: std::ops::RangeInclusive<u64>| {
            let Some(raw) = lookup(name) else { return Ok(default) };
            raw.trim().parse::<u64>().ok().filter(|n| range.contains(n)).ok_or_else(|| SettingsError {
                name,
                value: raw.clone(),
                problem: format!("must be a whole number in {}..={}", range.start(), range.end()),
            })
        };

        let address = |name: &'static str, default: &str| {
            let value = text(name, default);
            if value.rsplit_once(':').is_none_or(|(_, port)| port.parse::<u16>().is_err()) {
                return Err(SettingsError { name, value, problem: "must be host:port".into() });
            }
            Ok(value)
        };
        let http_addr = address("HTTP_ADDR", "127.0.0.1:8080")?;
        let ops_addr = address("OPS_ADDR", "127.0.0.1:9090")?;
        let choice = |name: &'static str, default: &str, options: &[&str]| {
            let value = text(name, default).to_ascii_lowercase();
            if options.contains(&value.as_str()) {
                Ok(value)
            } else {
                Err(SettingsError { name, value, problem: format!("must be one of {}", options.join(", ")) })
            }
        };
        let url = |name: &'static str, default: &str, schemes: &[&str]| {
            let value = text(name, default);
            if schemes.iter().any(|scheme| value.starts_with(&format!("{scheme}://"))) {
                Ok(value)
            } else {
                let problem = format!("must be a {} URL", schemes.join(":// or ") + "://");
                Err(SettingsError { name, value: redact(&value), problem })
            }
        };
        let log_format = if choice("LOG_FORMAT", "text", &["text", "json"])? == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        };
        // sea-orm recognises only mysql:// (for MariaDB too).
        let database_url = url("DATABASE_URL", "mysql://root@127.0.0.1:3306/concert", &["mysql"])?;
        // One server, a cluster or Sentinel, normalised to fred's form (see `parse_url`).
        let (redis_url, redis_topology) = {
            let value = text("REDIS_URL", "redis://127.0.0.1:6379");
            adapters_redis::connection::parse_url(&value).map_err(|problem| SettingsError {
                name: "REDIS_URL",
                value: redact(&value),
                problem,
            })?
        };
        let lock_lease =
            Duration::from_millis(number("LOCK_LEASE_MS", millis(DEFAULT_LEASE), 300..=600_000)?);
        let lock_wait_mode = if choice("LOCK_WAIT_STRATEGY", "pubsub", &["pubsub", "spin"])? == "spin" {
            LockWaitMode::Spin
        } else {
            LockWaitMode::PubSub
        };
        let ms = |name: &'static str, default: Duration, range: std::ops::RangeInclusive<u64>| {
            number(name, millis(default), range).map(Duration::from_millis)
        };
        let lock_max_hold = ms("LOCK_MAX_HOLD_MS", DEFAULT_MAX_HOLD, 500..=600_000)?;
        let lock_handoff_limit =
            u32::try_from(number("LOCK_HANDOFF_LIMIT", u64::from(DEFAULT_HANDOFF_LIMIT), 0..=1_000)?)
                .unwrap_or(DEFAULT_HANDOFF_LIMIT);
        let redis_command_timeout = ms("REDIS_COMMAND_TIMEOUT_MS", DEFAULT_COMMAND_TIMEOUT, 50..=60_000)?;
        let database_statement_timeout =
            ms("DATABASE_STATEMENT_TIMEOUT_MS", DEFAULT_STATEMENT_TIMEOUT, 100..=600_000)?;
        let point_charge_attempts = number("POINT_OPTIMISTIC_ATTEMPTS", 10, 1..=1_000)?;
        let point_charge_strategy =
            if choice("POINT_CHARGE_STRATEGY", "locked", &["locked", "optimistic"])? == "optimistic" {
                application::charge_points::ChargeStrategy::Optimistic {
                    attempts: u32::try_from(point_charge_attempts).unwrap_or(10),
                }
            } else {
                application::charge_points::ChargeStrategy::Locked
            };
        let shutdown_grace_seconds = number("SHUTDOWN_GRACE_SECONDS", 10, 0..=600)?;
        // The settings that only make sense together.
        let related = |ok: bool, name: &'static str, value: Duration, problem: String| {
            if ok { Ok(()) } else { Err(SettingsError { name, value: millis(value).to_string(), problem }) }
        };
        related(
            lock_lease >= redis_command_timeout * 3,
            "LOCK_LEASE_MS",
            lock_lease,
            format!(
                "must be at least 3 x REDIS_COMMAND_TIMEOUT_MS ({} ms): renewals start a third into the lease, and one that times out must leave time for another",
                millis(redis_command_timeout)
            ),
        )?;
        related(
            lock_max_hold >= lock_lease,
            "LOCK_MAX_HOLD_MS",
            lock_max_hold,
            format!("must be at least LOCK_LEASE_MS ({} ms)", millis(lock_lease)),
        )?;
        related(
            database_statement_timeout < lock_max_hold,
            "DATABASE_STATEMENT_TIMEOUT_MS",
            database_statement_timeout,
            format!(
                "must be below LOCK_MAX_HOLD_MS ({} ms), so that the database cuts a hung statement before the lock holder is abandoned",
                millis(lock_max_hold)
            ),
        )?;
        let redis_lock_nodes = match lookup("REDIS_LOCK_NODES").filter(|raw| !raw.trim().is_empty()) {
            None => None,
            Some(raw) => {
                let nodes: Vec<String> = raw.split(',').map(|node| node.trim().to_owned()).collect();
                let problem = if nodes.len() < 3 {
                    Some(
                        "must list at least three Redis URLs: a majority of two is both nodes, so one down would stop every write",
                    )
                } else if nodes.iter().any(|n| {
                    !matches!(adapters_redis::connection::parse_url(n), Ok((_, RedisTopology::Single)))
                }) {
                    Some(
                        "every entry must be the redis://host:port URL of one server (no TLS: this build has none)",
                    )
                } else if nodes.iter().enumerate().any(|(i, n)| nodes[..i].iter().any(|m| same_node(m, n))) {
                    Some("lists a node twice: a quorum needs independent nodes")
                } else {
                    None
                };
                if let Some(problem) = problem {
                    let value = nodes.iter().map(|n| redact(n)).collect::<Vec<_>>().join(",");
                    return Err(SettingsError { name: "REDIS_LOCK_NODES", value, problem: problem.into() });
                }
                Some(nodes)
            }
        };
        let lock_node_timeout =
            ms("LOCK_NODE_TIMEOUT_MS", adapters_redis::quorum::DEFAULT_NODE_TIMEOUT, 10..=10_000)?;
        related(
            redis_lock_nodes.is_none() || lock_node_timeout * 3 <= lock_lease,
            "LOCK_NODE_TIMEOUT_MS",
            lock_node_timeout,
            format!(
                "must be at most a third of LOCK_LEASE_MS ({} ms) with REDIS_LOCK_NODES: renewals on each node start a third into the lease, and one that times out must leave time for another",
                millis(lock_lease)
            ),
        )?;
        let queue_backend = if choice("QUEUE_BACKEND", "redis", &["redis", "mysql"])? == "mysql" {
            QueueBackend::MySql
        } else {
            QueueBackend::Redis
        };
        let max_active = number("QUEUE_MAX_ACTIVE", 1_000, 1..=1_000_000)?;
        let admit_interval = ms("QUEUE_ADMIT_INTERVAL_MS", Duration::from_secs(1), 10..=60_000)?;
        let batch = number("QUEUE_ADMIT_BATCH", 100, 1..=1_000_000)?;
        let policy = match choice("QUEUE_ADMIT_POLICY", "max-active", &["max-active", "rate"])?.as_str() {
            "rate" => AdmitPolicy::Rate { batch, interval: admit_interval, max_active },
            _ => AdmitPolicy::MaxActive { max_active },
        };
        let queue = application::queue::QueueConfig {
            active_lifetime: Duration::from_secs(number("QUEUE_ACTIVE_SECONDS", 600, 1..=86_400)?),
            waiting_idle: Duration::from_secs(number("QUEUE_WAITING_IDLE_SECONDS", 300, 5..=86_400)?),
            policy,
            admit_interval,
            rate_window: QUEUE_RATE_WINDOW,
        };
        let queue_name = text("QUEUE_NAME", "queue");
        if queue_name.is_empty()
            || queue_name.len() > 64
            || !queue_name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(&b))
        {
            return Err(SettingsError {
                name: "QUEUE_NAME",
                value: queue_name,
                problem: "must be 1..=64 letters, digits, '-', '_', ':' or '.'".into(),
            });
        }
        let flag = |name: &'static str, default: bool| {
            let Some(raw) = lookup(name) else { return Ok(default) };
            match raw.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(SettingsError { name, value: raw, problem: "must be true or false".into() }),
            }
        };
        let admin_api_key = match lookup("ADMIN_API_KEY") {
            None => None,
            Some(key)
                if key.len() >= 16
                    && key.len() <= 256
                    && key.bytes().all(|b| b.is_ascii_graphic())
                    && distinct(key.as_bytes()) >= MIN_DISTINCT =>
            {
                Some(key)
            }
            Some(_) => {
                return Err(SettingsError {
                    name: "ADMIN_API_KEY",
                    value: "***".into(),
                    problem: format!(
                        "must be 16..=256 visible ASCII characters, at least {MIN_DISTINCT} of them different (a weak key is refused); leave it unset to turn the admin API off"
                    ),
                });
            }
        };
        let auth_signing_keys = match lookup("AUTH_SIGNING_KEY") {
            None => None,
            Some(raw) => {
                let keys: Vec<Vec<u8>> = raw.split(',').map(|k| k.trim().as_bytes().to_vec()).collect();
                if keys.iter().any(|k| {
                    k.len() < 32 || k.len() > 512 || distinct(k) < 16 || !k.iter().all(u8::is_ascii_graphic)
                }) {
                    return Err(SettingsError {
                        name: "AUTH_SIGNING_KEY",
                        value: "***".into(),
                        problem: "must be one key, or several separated by commas (the first signs, all verify), each 32..=512 visible ASCII characters with at least 16 different ones; leave it unset for the shared key kept in MySQL".into(),
                    });
                }
                Some(keys)
            }
        };
        let trusted_proxies = match lookup("TRUSTED_PROXIES") {
            None => Vec::new(),
            Some(raw) => raw
                .split(',')
                .filter(|entry| !entry.trim().is_empty())
                .map(|entry| crate::limits::IpNet::parse(entry.trim()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|problem| SettingsError {
                    name: "TRUSTED_PROXIES",
                    value: raw.clone(),
                    problem: format!("{problem}: give IP addresses or CIDR blocks, comma-separated"),
                })?,
        };
        let per_minute = |name: &'static str, default: u32| {
            number(name, u64::from(default), 0..=1_000_000).map(|n| u32::try_from(n).unwrap_or(default))
        };
        let defaults = crate::limits::RateLimitSettings::default();
        let rate_limits = crate::limits::RateLimitSettings {
            signups: per_minute("RATE_LIMIT_SIGNUPS_PER_MINUTE", defaults.signups)?,
            auth: per_minute("RATE_LIMIT_AUTH_PER_MINUTE", defaults.auth)?,
            queue_tokens: per_minute("RATE_LIMIT_QUEUE_TOKENS_PER_MINUTE", defaults.queue_tokens)?,
            charges: per_minute("RATE_LIMIT_CHARGES_PER_MINUTE", defaults.charges)?,
            coupons: per_minute("RATE_LIMIT_COUPONS_PER_MINUTE", defaults.coupons)?,
        };
        Ok(Self {
            ops_addr,
            auth_signing_keys,
            auth_token_lifetime: Duration::from_secs(number("AUTH_TOKEN_SECONDS", 900, 60..=86_400)?),
            auth_key_refresh: Duration::from_secs(number("AUTH_KEY_REFRESH_SECONDS", 60, 1..=3_600)?),
            max_holds_per_user: u32::try_from(number("MAX_HOLDS_PER_USER", 4, 1..=50)?).unwrap_or(4),
            rate_limits,
            trusted_proxies,
            sse_max_streams: usize::try_from(number("SSE_MAX_STREAMS", 10_000, 1..=1_000_000)?)
                .unwrap_or(10_000),
            http_max_connections: match lookup("HTTP_MAX_CONNECTIONS") {
                None => None,
                Some(_) => Some(
                    usize::try_from(number("HTTP_MAX_CONNECTIONS", 0, 16..=1_000_000)?).unwrap_or(25_000),
                ),
            },
            http_body_timeout: ms("HTTP_BODY_TIMEOUT_MS", Duration::from_secs(10), 100..=600_000)?,
            reservation_hold: Duration::from_secs(number("RESERVATION_HOLD_SECONDS", 300, 1..=86_400)?),
            hold_expiry_interval: ms("HOLD_EXPIRY_INTERVAL_MS", Duration::from_secs(2), 100..=600_000)?,
            hold_expiry_batch: u32::try_from(number("HOLD_EXPIRY_BATCH", 200, 1..=10_000)?).unwrap_or(200),
            admin_api_key,
            seed_demo_data: flag("SEED_DEMO_DATA", true)?,
            cache_enabled: flag("CACHE_ENABLED", true)?,
            cache_single_loader: flag("CACHE_SINGLE_LOADER", true)?,
            coupon_issue_strategy: if choice("COUPON_ISSUE_STRATEGY", "redis", &["redis", "mysql-lock"])?
                == "mysql-lock"
            {
                application::coupons::IssueStrategy::DatabaseLock
            } else {
                application::coupons::IssueStrategy::Gate
            },
            cache_replica_acks: adapters_redis::cache::ReplicaAcks {
                replicas: u32::try_from(number("CACHE_REPLICA_ACKS", 0, 0..=16)?).unwrap_or(0),
                timeout: ms("CACHE_REPLICA_ACK_TIMEOUT_MS", Duration::from_millis(200), 1..=5_000)?,
            },
            disable_locks_for_testing: flag("DISABLE_LOCKS_FOR_TESTING", false)?,
            cache_prefix: {
                let default = adapters_mysql::database::database_name(&database_url)
                    .map(|name| format!("{name}:"))
                    .unwrap_or_default();
                let prefix = text("CACHE_PREFIX", &default);
                if prefix.len() > 64
                    || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(&b))
                {
                    return Err(SettingsError {
                        name: "CACHE_PREFIX",
                        value: prefix,
                        problem: "must be at most 64 letters, digits, '-', '_', ':' or '.'".into(),
                    });
                }
                prefix
            },
            payment_events_stream: {
                let stream = text("PAYMENT_EVENTS_STREAM", adapters_redis::events::PAYMENTS_STREAM);
                if stream.is_empty()
                    || stream.len() > 128
                    || !stream.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_:.{}".contains(&b))
                {
                    return Err(SettingsError {
                        name: "PAYMENT_EVENTS_STREAM",
                        value: stream,
                        problem: "must be 1..=128 letters, digits, '-', '_', ':', '.', '{' or '}'".into(),
                    });
                }
                stream
            },
            outbox_relay_interval: ms("OUTBOX_RELAY_INTERVAL_MS", Duration::from_millis(200), 10..=60_000)?,
            outbox_batch: u32::try_from(number("OUTBOX_BATCH", 100, 1..=10_000)?).unwrap_or(100),
            queue_backend,
            queue,
            queue_name,
            lock_max_hold,
            lock_handoff_limit,
            redis_command_timeout,
            database_statement_timeout,
            shutdown_grace_seconds,
            database_url,
            redis_url,
            redis_topology,
            redis_lock_nodes,
            lock_node_timeout,
            http_addr,
            log_filter: text("RUST_LOG", "info"),
            log_format,
            database_max_connections: u32::try_from(number("DATABASE_MAX_CONNECTIONS", 20, 1..=1_000)?)
                .unwrap_or(20),
            redis_pool_size: usize::try_from(number("REDIS_POOL_SIZE", 4, 1..=64)?).unwrap_or(4),
            point_lock_wait: Duration::from_millis(number(
                "POINT_LOCK_WAIT_MS",
                millis(DEFAULT_LOCK_WAIT),
                0..=60_000,
            )?),
            point_charge_batch_max: usize::try_from(number(
                "POINT_CHARGE_BATCH_MAX",
                application::charge_points::DEFAULT_BATCH_MAX.get() as u64,
                1..=1_000,
            )?)
            .ok()
            .and_then(std::num::NonZeroUsize::new)
            .unwrap_or(application::charge_points::DEFAULT_BATCH_MAX),
            point_charge_strategy,
            lock_lease,
            lock_wait_mode,
        })
    }
}

/// Whether two Redis URLs name the same server: `redis://a`, `redis://A:6379/1` and
/// `rediss://user:pw@a:6379` do (two databases of one server fail together, so they are
/// not independent nodes). Two names of one host cannot be told apart here.
fn same_node(a: &str, b: &str) -> bool {
    fn address(url: &str) -> String {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let address = rest.split(['/', '?']).next().unwrap_or(rest).to_ascii_lowercase();
        if address.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok()) {
            address
        } else {
            format!("{address}:6379")
        }
    }
    address(a) == address(b)
}

/// The fewest different characters a secret set by the operator may have: `aaaa...` or
/// `1234123412341234` is refused at start-up.
const MIN_DISTINCT: usize = 10;

fn distinct(bytes: &[u8]) -> usize {
    let mut seen = [false; 256];
    bytes.iter().filter(|b| !std::mem::replace(&mut seen[usize::from(**b)], true)).count()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A URL with any password replaced, fit for logs and error messages.
#[must_use]
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    // The last `@`: a password may contain one.
    match rest.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split_once(':').map_or(credentials, |(user, _)| user);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let map: HashMap<String, String> =
            vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Settings::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.database_url, "mysql://root@127.0.0.1:3306/concert");
        assert_eq!(s.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(s.http_addr, "127.0.0.1:8080");
        assert_eq!(s.log_filter, "info");
        assert_eq!(s.point_lock_wait, Duration::from_secs(3));
        assert_eq!(s.point_charge_batch_max.get(), 100);
        assert_eq!(s.point_charge_strategy, application::charge_points::ChargeStrategy::Locked);
        assert_eq!(s.queue_backend, QueueBackend::Redis);
        assert_eq!(s.queue.policy, AdmitPolicy::MaxActive { max_active: 1_000 });
        assert_eq!(s.queue.active_lifetime, Duration::from_secs(600));
        assert_eq!(s.queue.admit_interval, Duration::from_secs(1));
        assert_eq!(s.reservation_hold, Duration::from_secs(300));
        assert_eq!((s.admin_api_key, s.seed_demo_data, s.cache_enabled), (None, true, true));
        assert!(s.cache_single_loader, "one loader per key unless the benchmark says otherwise");
        assert_eq!(s.cache_prefix, "concert:", "the database's name");
        assert_eq!(s.payment_events_stream, "events:payments");
        assert_eq!(s.ops_addr, "127.0.0.1:9090");
        assert_eq!((s.auth_signing_keys, s.auth_token_lifetime), (None, Duration::from_secs(900)));
        assert_eq!(s.max_holds_per_user, 4);
        assert_eq!(s.rate_limits, crate::limits::RateLimitSettings::default());
        assert!(s.trusted_proxies.is_empty());
        assert_eq!((s.sse_max_streams, s.http_body_timeout), (10_000, Duration::from_secs(10)));
        assert_eq!((s.redis_lock_nodes, s.lock_node_timeout), (None, Duration::from_millis(250)));
        assert_eq!(s.cache_replica_acks.replicas, 0, "no replica wait with one Redis");
        assert_eq!(s.coupon_issue_strategy, application::coupons::IssueStrategy::Gate);
        let baseline = settings(&[("COUPON_ISSUE_STRATEGY", "mysql-lock")]).unwrap();
        assert_eq!(baseline.coupon_issue_strategy, application::coupons::IssueStrategy::DatabaseLock);
        assert!(settings(&[("COUPON_ISSUE_STRATEGY", "memcached")]).is_err());
        let acks = settings(&[("CACHE_REPLICA_ACKS", "1"), ("CACHE_REPLICA_ACK_TIMEOUT_MS", "50")]).unwrap();
        assert_eq!(
            acks.cache_replica_acks,
            adapters_redis::cache::ReplicaAcks { replicas: 1, timeout: Duration::from_millis(50) }
        );
        assert!(settings(&[("CACHE_REPLICA_ACKS", "17")]).is_err());
        assert!(settings(&[("CACHE_REPLICA_ACK_TIMEOUT_MS", "0")]).is_err(), "WAIT 0 waits for ever");
    }

    #[test]
    fn redis_url_names_one_server_a_cluster_or_sentinel() {
        let read = |raw: &str| {
            let s = settings(&[("REDIS_URL", raw)]).unwrap();
            (s.redis_url, s.redis_topology)
        };
        assert_eq!(read("redis://:pw@r:6380/2"), ("redis://:pw@r:6380/2".to_owned(), RedisTopology::Single));
        let cluster = "redis-cluster://a:7001?node=b:7002&node=c:7003";
        assert_eq!(read(cluster), (cluster.to_owned(), RedisTopology::Cluster));
        assert_eq!(
            read("redis-cluster://a:7001,b:7002, c:7003"),
            (cluster.to_owned(), RedisTopology::Cluster)
        );
        assert_eq!(read("a:7001,b:7002,c:7003"), (cluster.to_owned(), RedisTopology::Cluster), "a bare list");
        assert_eq!(
            read("redis-cluster://u:pw@a:7001,b:7002").0,
            "redis-cluster://u:pw@a:7001?node=b:7002",
            "credentials stay with the first host"
        );
        let sentinel = "redis-sentinel://s1:26379?node=s2:26380&sentinelServiceName=concert";
        assert_eq!(read(sentinel), (sentinel.to_owned(), RedisTopology::Sentinel));
        assert_eq!(
            read("redis-sentinel://s1:26379,s2:26380?sentinelServiceName=concert"),
            (
                "redis-sentinel://s1:26379?sentinelServiceName=concert&node=s2:26380".to_owned(),
                RedisTopology::Sentinel
            )
        );
        for (bad, why) in [
            ("http://r:6379", "another scheme"),
            ("r:6379", "one host without a scheme"),
            ("rediss://:pw@r:6379", "TLS, which this build would not do"),
            ("rediss-cluster://a:1,b:2", "TLS"),
            ("redis://a:6379,b:6379", "several hosts for one server"),
            ("redis-cluster://a:7001,b", "a listed host without a port"),
            ("redis-cluster://a:7001,,b:7002", "an empty host"),
            ("redis-cluster://a:7001?node=b", "a node without a port"),
            ("redis-cluster://a:7001?nodes=b:7002", "a misspelt parameter"),
            ("redis-sentinel://s1:26379?node=s2:26380", "Sentinel without its service name"),
            ("redis-sentinel://s1:26379?sentinelServiceName=", "an empty service name"),
            ("redis://r:6379?sentinelServiceName=x", "a parameter of another form"),
            ("redis-cluster://a:7001,b:7002/3", "a database number, which a cluster does not have"),
        ] {
            let error = settings(&[("REDIS_URL", bad)]).unwrap_err().to_string();
            assert!(error.starts_with("REDIS_URL:"), "{bad} ({why}): {error}");
        }
        let error = settings(&[("REDIS_URL", "rediss://:s3cret@r:6379")]).unwrap_err().to_string();
        assert!(!error.contains("s3cret"), "{error}");
        assert_eq!(redact("redis://:p@ss@r:6379/0"), "redis://:***@r:6379/0", "a password with an @");
    }

    #[test]
    fn quorum_lock_nodes_are_read_and_checked() {
        let three = "redis://a:6379, redis://b:6379,redis://c:6380";
        let s = settings(&[("REDIS_LOCK_NODES", three)]).unwrap();
        assert_eq!(
            s.redis_lock_nodes.as_deref(),
            Some(
                &["redis://a:6379".to_owned(), "redis://b:6379".to_owned(), "redis://c:6380".to_owned()][..]
            )
        );
        assert_eq!(settings(&[("REDIS_LOCK_NODES", " ")]).unwrap().redis_lock_nodes, None, "blank is unset");
        for bad in [
            "redis://a,redis://b",
            "redis://a,redis://b,http://c",
            "redis://a,redis://b,redis://a",
            "redis://a,redis://b,redis://A:6379/0",
            "redis://a:6379/,redis://b,rediss://u:pw@a",
            "redis://a/0,redis://b,redis://a/1",
            "redis://a,redis://b,rediss://c",
            "redis://a,redis://b,redis-cluster://c:1?node=d:2",
        ] {
            let error = settings(&[("REDIS_LOCK_NODES", bad)]).unwrap_err().to_string();
            assert!(error.starts_with("REDIS_LOCK_NODES:"), "{bad}: {error}");
        }
        let error = settings(&[("REDIS_LOCK_NODES", "redis://:pw1@a,redis://b,redis://c,ftp://:pw2@d")])
            .unwrap_err()
            .to_string();
        assert!(!error.contains("pw1") && !error.contains("pw2"), "{error}");
        // A node timeout the lease could not absorb, with a quorum (without one it is unused).
        let error = settings(&[("REDIS_LOCK_NODES", three), ("LOCK_NODE_TIMEOUT_MS", "5000")])
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("LOCK_NODE_TIMEOUT_MS:"), "{error}");
        assert!(settings(&[("LOCK_NODE_TIMEOUT_MS", "5000")]).is_ok());
    }

    #[test]
    fn identity_and_limit_settings_are_read_and_checked() {
        let key = "k3y-0f-the-0perat0r-ABCDEFGHIJKLMNOPQRSTU";
        let s = settings(&[
            ("AUTH_SIGNING_KEY", &format!("{key}, old-{key}")),
            ("OPS_ADDR", "0.0.0.0:9100"),
            ("MAX_HOLDS_PER_USER", "2"),
            ("RATE_LIMIT_SIGNUPS_PER_MINUTE", "0"),
            ("TRUSTED_PROXIES", "10.0.0.0/8, ::1"),
        ])
        .unwrap();
        assert_eq!(
            s.auth_signing_keys,
            Some(vec![key.as_bytes().to_vec(), format!("old-{key}").into_bytes()]),
            "the first signs, the rest verify"
        );
        assert_eq!(
            (s.ops_addr.as_str(), s.max_holds_per_user, s.rate_limits.signups),
            ("0.0.0.0:9100", 2, 0)
        );
        assert_eq!(s.trusted_proxies.len(), 2);
        for (name, value) in [
            ("AUTH_SIGNING_KEY", "too-short"),
            ("AUTH_SIGNING_KEY", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
            ("AUTH_SIGNING_KEY", &format!("{key},")),
            ("ADMIN_API_KEY", "abababababababababab"),
            ("ADMIN_API_KEY", "1234123412341234"),
            ("OPS_ADDR", "9090"),
            ("MAX_HOLDS_PER_USER", "0"),
            ("TRUSTED_PROXIES", "10.0.0.0/40"),
            ("RATE_LIMIT_CHARGES_PER_MINUTE", "-1"),
            ("AUTH_TOKEN_SECONDS", "10"),
        ] {
            let error = settings(&[(name, value)]).unwrap_err().to_string();
            assert!(error.starts_with(name), "{error}");
            assert!(!error.contains(key) && !error.contains("abab"), "a secret is never echoed: {error}");
        }
    }

    #[test]
    fn booking_settings_are_read_and_checked() {
        let s = settings(&[
            ("RESERVATION_HOLD_SECONDS", "3"),
            ("ADMIN_API_KEY", "a-long-enough-admin-key"),
            ("SEED_DEMO_DATA", "false"),
            ("CACHE_ENABLED", "0"),
            ("CACHE_SINGLE_LOADER", "false"),
        ])
        .unwrap();
        assert_eq!(s.reservation_hold, Duration::from_secs(3));
        assert_eq!(s.admin_api_key.as_deref(), Some("a-long-enough-admin-key"));
        assert!(!s.seed_demo_data && !s.cache_enabled && !s.cache_single_loader);
        for (name, value) in [
            ("RESERVATION_HOLD_SECONDS", "0"),
            ("ADMIN_API_KEY", ""),
            ("ADMIN_API_KEY", "short"),
            ("ADMIN_API_KEY", "sixteen chars but a space"),
            ("SEED_DEMO_DATA", "maybe"),
            ("CACHE_SINGLE_LOADER", "maybe"),
            ("HOLD_EXPIRY_BATCH", "0"),
            ("POINT_CHARGE_BATCH_MAX", "0"),
            ("POINT_CHARGE_BATCH_MAX", "1001"),
            ("POINT_CHARGE_STRATEGY", "hopeful"),
            ("POINT_OPTIMISTIC_ATTEMPTS", "0"),
        ] {
            let error = settings(&[(name, value)]).unwrap_err().to_string();
            assert!(error.starts_with(name), "{error}");
            assert!(!error.contains("short"), "the key is never echoed: {error}");
        }
    }

    #[test]
    fn the_queue_policy_and_backend_are_read_and_checked() {
        let s = settings(&[
            ("QUEUE_ADMIT_POLICY", "rate"),
            ("QUEUE_ADMIT_BATCH", "50"),
            ("QUEUE_MAX_ACTIVE", "200"),
            ("QUEUE_ADMIT_INTERVAL_MS", "500"),
            ("QUEUE_BACKEND", "mysql"),
        ])
        .unwrap();
        assert_eq!(
            s.queue.policy,
            AdmitPolicy::Rate { batch: 50, interval: Duration::from_millis(500), max_active: 200 }
        );
        assert_eq!(s.queue_backend, QueueBackend::MySql);
        for (name, value) in [
            ("QUEUE_ADMIT_POLICY", "fifo"),
            ("QUEUE_BACKEND", "memory"),
            ("QUEUE_MAX_ACTIVE", "0"),
            ("QUEUE_ADMIT_BATCH", "-1"),
            ("QUEUE_ADMIT_INTERVAL_MS", "1"),
            ("QUEUE_ACTIVE_SECONDS", "0"),
            ("QUEUE_NAME", "{tag}"),
        ] {
            let error = settings(&[(name, value)]).unwrap_err().to_string();
            assert!(error.starts_with(name), "{error}");
        }
    }

    #[test]
    fn an_unusable_value_names_its_variable() {
        let error = settings(&[("POINT_LOCK_WAIT_MS", "soon")]).unwrap_err().to_string();
        assert!(error.starts_with("POINT_LOCK_WAIT_MS:"), "{error}");
        assert!(settings(&[("HTTP_ADDR", "8080")]).is_err());
        assert!(settings(&[("LOG_FORMAT", "xml")]).is_err());
        assert!(settings(&[("DATABASE_URL", "postgres://x/y")]).is_err());
        assert!(
            settings(&[("DATABASE_URL", "mariadb://h/concert")]).is_err(),
            "the driver takes mysql:// only"
        );
        assert!(settings(&[("LOCK_LEASE_MS", "10")]).is_err());
        assert!(settings(&[("LOCK_WAIT_STRATEGY", "sleep")]).is_err());
        assert_eq!(settings(&[("LOCK_WAIT_STRATEGY", "SPIN")]).unwrap().lock_wait_mode, LockWaitMode::Spin);
        assert_eq!(settings(&[]).unwrap().lock_handoff_limit, DEFAULT_HANDOFF_LIMIT);
        assert_eq!(settings(&[("LOCK_HANDOFF_LIMIT", "0")]).unwrap().lock_handoff_limit, 0);
        assert!(settings(&[("LOCK_HANDOFF_LIMIT", "-1")]).is_err());
        assert!(settings(&[("LOCK_HANDOFF_LIMIT", "1001")]).is_err());
    }

    #[test]
    fn settings_that_contradict_each_other_are_refused() {
        // A lease the Redis command timeout could eat whole.
        let error = settings(&[("LOCK_LEASE_MS", "3000")]).unwrap_err().to_string();
        assert!(error.starts_with("LOCK_LEASE_MS:") && error.contains("REDIS_COMMAND_TIMEOUT_MS"), "{error}");
        assert!(settings(&[("LOCK_LEASE_MS", "3000"), ("REDIS_COMMAND_TIMEOUT_MS", "1000")]).is_ok());
        // A statement allowed to run longer than the lock may be held.
        let error = settings(&[("DATABASE_STATEMENT_TIMEOUT_MS", "30000")]).unwrap_err().to_string();
        assert!(error.starts_with("DATABASE_STATEMENT_TIMEOUT_MS:"), "{error}");
        assert!(
            settings(&[("DATABASE_STATEMENT_TIMEOUT_MS", "30000"), ("LOCK_MAX_HOLD_MS", "60000")]).is_ok()
        );
    }

    #[test]
    fn passwords_never_reach_error_messages() {
        let error = settings(&[("DATABASE_URL", "pg://app:s3cret@db/x")]).unwrap_err().to_string();
        assert!(!error.contains("s3cret"), "{error}");
        assert_eq!(redact("redis://:pw@cache:6379"), "redis://:***@cache:6379");
    }
}
