//! Connecting to Redis.

use std::time::Duration;

use anyhow::Context as _;
use fred::clients::{Pool, SubscriberClient};
use fred::prelude::{Builder, ClientLike, Config, ReconnectPolicy};

/// How long one command may take before it fails, by default. A lock or cache call that
/// waits longer than this is worse than one that fails: the caller can answer or retry.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Which Redis deployment a `REDIS_URL` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One server (`redis://host:port`).
    Single,
    /// A Redis Cluster: the listed nodes are where discovery starts.
    Cluster,
    /// A master found through Sentinel: the listed nodes are sentinels.
    Sentinel,
}

/// `REDIS_URL` in any of the forms the service accepts, checked and rewritten into the
/// form fred reads:
///
/// - `redis://[user:password@]host[:port][/db]`: one server;
/// - `redis-cluster://[user:password@]h1:p1?node=h2:p2&node=h3:p3`: a cluster (any few of
///   its nodes; the rest are discovered);
/// - `redis-sentinel://[user:password@]s1:p1?node=s2:p2&sentinelServiceName=NAME`: the
///   master that the sentinels at `s1`, `s2`, ... name `NAME` (the credentials are the
///   master's);
/// - the same with the hosts as a comma-separated list (`redis-cluster://h1:p1,h2:p2`,
///   `redis-sentinel://s1:p1,s2:p2?sentinelServiceName=NAME`), and a bare list
///   `h1:p1,h2:p2,h3:p3`, which is a cluster.
///
/// Refused, with the reason: another scheme, TLS (`rediss`: this build has no TLS and
/// would connect in plain text), several hosts for one server, a host without a port in a
/// list, Sentinel without its service name, and query parameters other than `node` and
/// `sentinelServiceName` (a misspelt one would otherwise be ignored). The reason never
/// repeats the URL, which may hold a password.
///
/// # Errors
/// The reason the URL is refused.
pub fn parse_url(raw: &str) -> Result<(String, Topology), String> {
    const FORMS: &str = "must be redis://host:port, redis-cluster://host:port?node=host:port&node=host:port, redis-sentinel://host:port?node=host:port&sentinelServiceName=NAME, or a comma-separated list of cluster nodes host:port,host:port";
    let raw = raw.trim();
    let (scheme, rest) = match raw.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None if raw.contains(',') => ("redis-cluster".to_owned(), raw),
        None => return Err(FORMS.to_owned()),
    };
    let topology = match scheme.as_str() {
        "redis" => Topology::Single,
        "redis-cluster" => Topology::Cluster,
        "redis-sentinel" => Topology::Sentinel,
        "rediss" | "rediss-cluster" | "rediss-sentinel" => {
            return Err("asks for TLS (rediss), which this build does not include: it would connect in plain text. Use redis:// on a private network, or a TLS proxy such as stunnel in front of Redis".to_owned());
        }
        _ => return Err(FORMS.to_owned()),
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (credentials, hosts) = match authority.rsplit_once('@') {
        Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
        None => (String::new(), authority),
    };
    let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
    if hosts.iter().any(|host| host.is_empty()) {
        return Err("lists an empty host".to_owned());
    }
    if topology == Topology::Single && hosts.len() > 1 {
        return Err("lists several hosts for one server: a cluster is redis-cluster://h1:p1,h2:p2, Sentinel redis-sentinel://s1:p1,s2:p2?sentinelServiceName=NAME".to_owned());
    }
    let port_of =
        |host: &str| host.rsplit_once(':').map(|(_, port)| port.parse::<u16>().is_ok_and(|p| p > 0));
    if hosts.len() > 1 && hosts.iter().any(|host| port_of(host) != Some(true)) {
        return Err("lists a host without a valid port: every host of a list is host:port".to_owned());
    }
    let path = tail.split('?').next().unwrap_or_default();
    if topology == Topology::Cluster && !matches!(path, "" | "/" | "/0") {
        return Err(
            "names a database number, which a Redis Cluster does not have (only database 0)".to_owned()
        );
    }
    let mut url = format!("{scheme}://{credentials}{}{tail}", hosts[0]);
    for (i, host) in hosts[1..].iter().enumerate() {
        let separator = if i == 0 && !tail.contains('?') { '?' } else { '&' };
        url.push(separator);
        url.push_str("node=");
        url.push_str(host);
    }
    let parsed = url::Url::parse(&url).map_err(|error| format!("is not a valid URL ({error})"))?;
    for (name, value) in parsed.query_pairs() {
        match (name.as_ref(), topology) {
            ("node", Topology::Cluster | Topology::Sentinel) => {
                if port_of(&value) != Some(true) {
                    return Err(format!("has node={value}, which is not host:port"));
                }
            }
            ("sentinelServiceName", Topology::Sentinel) if !value.trim().is_empty() => {}
            ("sentinelServiceName", Topology::Sentinel) => {
                return Err("has an empty sentinelServiceName".to_owned());
            }
            (other, _) => {
                return Err(format!("has the query parameter {other:?}, which this form does not take"));
            }
        }
    }
    if topology == Topology::Sentinel && !parsed.query_pairs().any(|(name, _)| name == "sentinelServiceName")
    {
        return Err("is a Sentinel URL without sentinelServiceName=NAME (the name the sentinels monitor the master under)".to_owned());
    }
    Config::from_url(&url)
        .map_err(|error| format!("is not a Redis URL fred accepts ({})", error.details()))?;
    Ok((url, topology))
}

/// Refuses a Redis older than 7.0: lock releases are announced with sharded pub/sub
/// (`SPUBLISH`), which older servers answer with an error after the release script has
/// already deleted the key. On a cluster one node answers for all (a cluster runs one
/// version).
async fn require_redis_7(pool: &Pool) -> anyhow::Result<()> {
    let info: String = pool.next().info(Some(fred::types::InfoKind::Server)).await.context("INFO server")?;
    for version in info.lines().filter_map(|line| line.trim().strip_prefix("redis_version:")) {
        let major: u32 = version.split('.').next().and_then(|major| major.parse().ok()).unwrap_or(0);
        anyhow::ensure!(major >= 7, "Redis {version} is too old: 7.0 or later is needed (sharded pub/sub)");
    }
    Ok(())
}

/// The connections one instance keeps to Redis.
#[derive(Clone, Debug)]
pub struct RedisConnections {
    /// Commands, spread round-robin over a few connections.
    pub pool: Pool,
    /// Pub/sub needs a connection of its own (a subscribed connection takes no commands).
    pub subscriber: SubscriberClient,
}

impl RedisConnections {
    /// Connects `pool_size` command connections and one subscriber to `url`; every
    /// command fails after `command_timeout`.
    ///
    /// Fails at once when Redis cannot be reached at start-up, rather than start an
    /// instance whose locks can never be taken. After start-up, lost connections are
    /// re-established with exponential backoff, and subscriptions are restored.
    ///
    /// # Errors
    /// When the URL is invalid or Redis does not answer within a few seconds.
    pub async fn connect(url: &str, pool_size: usize, command_timeout: Duration) -> anyhow::Result<Self> {
        let config = Config::from_url(url).context("invalid REDIS_URL")?;
        let mut builder = Builder::from_config(config);
        builder
            .with_connection_config(|c| {
                c.connection_timeout = CONNECT_TIMEOUT;
                c.internal_command_timeout = command_timeout;
            })
            .with_performance_config(|c| c.default_command_timeout = command_timeout)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
        let pool = builder.build_pool(pool_size.max(1)).context("build the Redis pool")?;
        let subscriber = builder.build_subscriber_client().context("build the Redis subscriber")?;
        tokio::time::timeout(CONNECT_TIMEOUT * 2, async {
            pool.init().await.context("connect to Redis")?;
            subscriber.init().await.context("connect the Redis subscriber")?;
            anyhow::Ok(())
        })
        .await
        .context("Redis did not answer in time")??;
        require_redis_7(&pool).await?;
        // No `manage_subscriptions`: the one user of the subscriber, the lock, subscribes
        // its channels again itself after a reconnection (see `lock::Subscriptions`).
        Ok(Self { pool, subscriber })
    }

    /// Connects `pool_size` command connections to one node of a quorum lock, every command
    /// timing out after `command_timeout` (the quorum's node timeout: fred then knows a
    /// command was abandoned and never sends it after a reconnection).
    ///
    /// Unlike [`RedisConnections::connect`], a node that cannot be reached does not fail:
    /// its pool keeps trying in the background (a quorum lock works with a minority of its
    /// nodes down, and a node that comes back later is used from then on). Returns the
    /// pool and whether it connected within a few seconds.
    ///
    /// # Errors
    /// When the URL is invalid.
    pub async fn connect_lock_node(
        url: &str,
        pool_size: usize,
        command_timeout: Duration,
    ) -> anyhow::Result<(Pool, bool)> {
        let mut config = Config::from_url(url).context("invalid REDIS_LOCK_NODES entry")?;
        config.fail_fast = false;
        let pool = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = CONNECT_TIMEOUT;
                c.internal_command_timeout = command_timeout;
            })
            .with_performance_config(|c| c.default_command_timeout = command_timeout)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .build_pool(pool_size.max(1))
            .context("build a lock node's pool")?;
        let _connections = pool.connect_pool();
        // Asked until it answers, rather than waiting for a connect notice that could come
        // before the wait began (fred reports a later failed reconnect only as an error).
        let connected = tokio::time::timeout(CONNECT_TIMEOUT * 2, async {
            while pool.next().ping::<String>(None).await.is_err() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .is_ok();
        Ok((pool, connected))
    }

    /// Answers whether Redis takes commands now (readiness).
    ///
    /// # Errors
    /// When a PING fails or times out.
    pub async fn ping(&self) -> anyhow::Result<()> {
        let _: String = self.pool.next().ping(None).await.context("Redis PING failed")?;
        Ok(())
    }

    /// Closes every connection.
    pub async fn quit(&self) {
        let _ = self.subscriber.quit().await;
        let _ = self.pool.quit().await;
    }
}
