//! Connecting to Redis.

use std::time::Duration;

use anyhow::Context as _;
use fred::clients::{Pool, SubscriberClient};
use fred::prelude::{Builder, ClientLike, Config, ReconnectPolicy};

/// How long one command may take before it fails, by default. A lock or cache call that
/// waits longer than this is worse than one that fails: the caller can answer or retry.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

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
        // Re-subscribe to every channel after a reconnection.
        let _resubscriber = subscriber.manage_subscriptions();
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
