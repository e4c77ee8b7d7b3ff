//! The distributed lock on one Redis.
//!
//! - **Owner token.** The value of `lock:{kind}:{id}` is a random token of this
//!   acquisition; only a caller that presents it can renew or release.
//! - **Acquire** is `SET key token NX PX lease` in a script that, on success, also bumps
//!   `key:fence` with `INCR` (the fencing number, strictly increasing per key) and, on
//!   failure, answers the key's remaining lease (`PTTL`) so a waiter knows the latest time
//!   to look again even if no release is ever announced.
//! - **Release** is a compare-and-delete script: delete only if the value is still our
//!   token, then `PUBLISH` the key on [`RELEASE_CHANNEL`] for pub/sub waiters.
//! - **Lease renewal.** While a guard lives, a watchdog task extends the lease every
//!   `renew_every` (compare-and-`PEXPIRE`). If the key is no longer ours, or renewal keeps
//!   failing until the lease would have run out, the guard is marked lost and its
//!   `lease_lost` future resolves.
//! - **Waiting**: [`WaitPolicy::FailFast`] tries once. [`WaitPolicy::WaitUpTo`] waits
//!   per the lock's [`WaitStrategy`]: [`WaitStrategy::Spin`] retries after exponential
//!   backoff with full jitter; [`WaitStrategy::PubSub`] sleeps until a release of the key
//!   is announced, the holder's lease would end, a fallback poll interval passes, or the
//!   deadline comes, whichever is first.
//!
//! In pub/sub mode one subscriber per process listens on one channel; a release wakes
//! *one* local waiter of that key per instance (`Notify::notify_one`), so a release does not
//! set off a herd of retries. Fencing counters are kept without expiry (one small key per
//! locked resource); that is what makes them monotonic.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use application::lock::{DistributedLock, FencingToken, LockError, LockGuard, LockKey, WaitPolicy};
use async_trait::async_trait;
use fred::clients::{Pool, SubscriberClient};
use fred::prelude::{EventInterface, PubsubInterface};
use fred::types::scripts::Script;
use futures::future::BoxFuture;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The pub/sub channel on which every release is announced; the message is the key.
pub const RELEASE_CHANNEL: &str = "lock:released";

const ACQUIRE_LUA: &str = r"
-- KEYS[1] lock key, KEYS[2] fencing counter; ARGV[1] owner token, ARGV[2] lease (ms)
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('INCR', KEYS[2])}
end
return {0, redis.call('PTTL', KEYS[1])}
";

const RELEASE_LUA: &str = r"
-- KEYS[1] lock key; ARGV[1] owner token, ARGV[2] release channel
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], KEYS[1])
  return 1
end
return 0
";

const RENEW_LUA: &str = r"
-- KEYS[1] lock key; ARGV[1] owner token, ARGV[2] lease (ms)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// The default lease: short enough that a crashed instance blocks a key only briefly; long
/// enough that a renewal can miss a beat or two.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// The default bound on each pub/sub sleep, in case a release announcement is missed.
pub const DEFAULT_FALLBACK_POLL: Duration = Duration::from_millis(250);

/// How a waiting acquisition waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStrategy {
    /// Retry after `initial`, doubling up to `max`, each pause drawn uniformly from
    /// `0..=backoff` (full jitter) so that waiters do not retry in step.
    Spin { initial: Duration, max: Duration },
    /// Sleep until a release is announced on [`RELEASE_CHANNEL`]. `fallback_poll` bounds
    /// each sleep, in case an announcement is missed (a reconnecting subscriber).
    PubSub { fallback_poll: Duration },
}

/// Settings of a [`RedisLock`].
#[derive(Debug, Clone, Copy)]
pub struct LockOptions {
    /// How long a lock outlives a holder that stopped renewing it (a crash). Short
    /// enough that a crashed instance blocks a key only briefly; long enough that a
    /// renewal can miss a beat or two.
    pub lease: Duration,
    /// How often the watchdog renews; a third of the lease leaves two retries.
    pub renew_every: Duration,
    pub wait: WaitStrategy,
}

impl Default for LockOptions {
    fn default() -> Self {
        Self {
            lease: DEFAULT_LEASE,
            renew_every: DEFAULT_LEASE / 3,
            wait: WaitStrategy::PubSub { fallback_poll: DEFAULT_FALLBACK_POLL },
        }
    }
}

/// The distributed lock. Cheap to clone; clones share connections and waiters.
#[derive(Clone)]
pub struct RedisLock {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    options: LockOptions,
    acquire: Script,
    release: Script,
    renew: Script,
    /// Local pub/sub waiters, by key.
    waiters: Waiters,
    /// Keeps the subscriber task alive as long as the lock.
    listener: Option<JoinHandle<()>>,
    /// Acquisitions of this lock now asleep between attempts.
    sleeping: AtomicUsize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
    }
}

impl fmt::Debug for RedisLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLock").field("options", &self.inner.options).finish_non_exhaustive()
    }
}

impl RedisLock {
    /// A lock on `pool`. In [`WaitStrategy::PubSub`] mode `subscriber` is subscribed to
    /// [`RELEASE_CHANNEL`] and a task dispatches releases to local waiters.
    ///
    /// # Errors
    /// When pub/sub mode is asked without a subscriber, or the subscription fails.
    pub async fn new(
        pool: Pool,
        subscriber: Option<&SubscriberClient>,
        options: LockOptions,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!options.lease.is_zero(), "a lock lease must be above zero");
        anyhow::ensure!(options.renew_every < options.lease, "renewal must come before the lease runs out");
        let waiters = Waiters::default();
        let listener = match (options.wait, subscriber) {
            (WaitStrategy::PubSub { .. }, Some(subscriber)) => {
                let mut messages = subscriber.message_rx();
                subscriber.subscribe(RELEASE_CHANNEL).await?;
                let waiters = waiters.clone();
                Some(tokio::spawn(async move {
                    loop {
                        match messages.recv().await {
                            Ok(message) if message.channel == RELEASE_CHANNEL => {
                                if let Some(key) = message.value.as_str() {
                                    waiters.wake_one(&key);
                                }
                            }
                            Ok(_) => {}
                            // Missed messages: wake every waiter to look again.
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => waiters.wake_all(),
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                        }
                    }
                }))
            }
            (WaitStrategy::PubSub { .. }, None) => anyhow::bail!("pub/sub waiting needs a subscriber"),
            (WaitStrategy::Spin { .. }, _) => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                options,
                acquire: Script::from_lua(ACQUIRE_LUA),
                release: Script::from_lua(RELEASE_LUA),
                renew: Script::from_lua(RENEW_LUA),
                waiters,
                listener,
                sleeping: AtomicUsize::new(0),
            }),
        })
    }

    /// How many acquisitions through this lock are asleep between attempts right now
    /// (also exported as the `lock_waiters` gauge).
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.inner.sleeping.load(Ordering::SeqCst)
    }

    /// One attempt: the fencing number if acquired, else how long the holder's lease has left.
    async fn try_once(&self, key: &LockKey, token: &str) -> Result<Attempt, LockError> {
        let inner = &self.inner;
        let sent_at = Instant::now();
        let lease_ms = millis(inner.options.lease);
        let reply: Vec<i64> = inner
            .acquire
            .evalsha_with_reload(
                inner.pool.next(),
                vec![key.as_str().to_owned(), fence_key(key)],
                vec![token.to_owned(), lease_ms.to_string()],
            )
            .await
            .map_err(unavailable)?;
        match reply.as_slice() {
            [1, fence] => Ok(Attempt::Acquired(Acquired {
                fence: FencingToken(u64::try_from(*fence).unwrap_or(0)),
                lease_from: sent_at,
            })),
            [0, pttl] => {
                Ok(Attempt::Held { lease_left: Duration::from_millis(u64::try_from(*pttl).unwrap_or(0)) })
            }
            other => Err(LockError::Unavailable(anyhow::anyhow!("unexpected acquire reply {other:?}"))),
        }
    }

    async fn acquire_waiting(
        &self,
        key: &LockKey,
        token: &str,
        wait: Duration,
    ) -> Result<Acquired, LockError> {
        let started = Instant::now();
        let deadline = started + wait;
        // Built once, before the first attempt: a pub/sub waiter registers first, so a
        // release between a failed attempt and the sleep is not missed.
        let mut pause_state = match self.inner.options.wait {
            WaitStrategy::Spin { initial, max } => Pause::Spin { backoff: initial, max },
            WaitStrategy::PubSub { fallback_poll } => {
                Pause::PubSub { registration: self.inner.waiters.register(key.as_str()), fallback_poll }
            }
        };
        loop {
            let lease_left = match self.try_once(key, token).await? {
                Attempt::Acquired(acquired) => return Ok(acquired),
                Attempt::Held { lease_left } => lease_left,
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(LockError::Timeout { key: key.clone(), waited: now - started });
            }
            let remaining = deadline - now;
            let _asleep = Asleep::new(&self.inner.sleeping, key.kind());
            match &mut pause_state {
                Pause::Spin { backoff, max } => {
                    tokio::time::sleep(jitter(*backoff).min(remaining)).await;
                    *backoff = (*backoff * 2).min(*max);
                }
                Pause::PubSub { registration, fallback_poll } => {
                    // Wake at the latest when the holder's lease would run out: a crashed
                    // holder announces nothing.
                    let pause = remaining.min(*fallback_poll).min(lease_left + Duration::from_millis(1));
                    let _ = tokio::time::timeout(pause, registration.notify.notified()).await;
                }
            }
        }
    }

    fn guard(&self, key: &LockKey, token: String, acquired: Acquired) -> RedisLockGuard {
        let (lost_tx, lost_rx) = watch::channel(false);
        let watchdog = tokio::spawn(watchdog(
            Arc::clone(&self.inner),
            key.clone(),
            token.clone(),
            acquired.lease_from,
            lost_tx,
        ));
        RedisLockGuard {
            key: key.clone(),
            token,
            fence: acquired.fence,
            inner: Arc::clone(&self.inner),
            lost: lost_rx,
            watchdog: Some(watchdog),
            acquired_at: Instant::now(),
            released: false,
        }
    }
}

/// Counts a waiter as asleep for as long as it lives (a cancelled waiter included).
struct Asleep<'a> {
    count: &'a AtomicUsize,
    kind: &'static str,
}

impl<'a> Asleep<'a> {
    fn new(count: &'a AtomicUsize, kind: &'static str) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        metrics::gauge!("lock_waiters", "kind" => kind).increment(1.0);
        Self { count, kind }
    }
}

impl Drop for Asleep<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!("lock_waiters", "kind" => self.kind).decrement(1.0);
    }
}

/// How a waiting acquisition sleeps between attempts, with the state it keeps.
enum Pause {
    Spin { backoff: Duration, max: Duration },
    PubSub { registration: Registration, fallback_poll: Duration },
}

/// A successful attempt.
#[derive(Debug, Clone, Copy)]
struct Acquired {
    fence: FencingToken,
    /// When the winning attempt was sent: Redis started the lease no earlier, so counting
    /// from here never overestimates how long the lease lasts.
    lease_from: Instant,
}

enum Attempt {
    Acquired(Acquired),
    Held { lease_left: Duration },
}

#[async_trait]
impl DistributedLock for RedisLock {
    #[tracing::instrument(name = "lock.acquire", skip(self), fields(key = %key))]
    async fn acquire(&self, key: &LockKey, wait: WaitPolicy) -> Result<Box<dyn LockGuard>, LockError> {
        let started = Instant::now();
        let token = uuid::Uuid::new_v4().simple().to_string();
        let outcome = match wait {
            WaitPolicy::FailFast => match self.try_once(key, &token).await {
                Ok(Attempt::Acquired(acquired)) => Ok(acquired),
                Ok(Attempt::Held { .. }) => Err(LockError::Busy { key: key.clone() }),
                Err(error) => Err(error),
            },
            WaitPolicy::WaitUpTo(limit) => self.acquire_waiting(key, &token, limit).await,
        };
        let label = match &outcome {
            Ok(_) => "acquired",
            Err(LockError::Busy { .. }) => "busy",
            Err(LockError::Timeout { .. }) => "timeout",
            Err(_) => "error",
        };
        metrics::histogram!("lock_wait_seconds", "kind" => key.kind(), "outcome" => label)
            .record(started.elapsed().as_secs_f64());
        if outcome.is_err() {
            metrics::counter!("lock_acquire_failures_total", "kind" => key.kind(), "reason" => label)
                .increment(1);
        }
        let acquired = outcome?;
        tracing::debug!(fence = acquired.fence.0, "lock acquired");
        Ok(Box::new(self.guard(key, token, acquired)))
    }
}

/// Extends the lease every `renew_every` while the guard lives; marks the guard lost when
/// the key is no longer ours or the lease ran out without a successful renewal.
async fn watchdog(
    inner: Arc<Inner>,
    key: LockKey,
    token: String,
    lease_from: Instant,
    lost: watch::Sender<bool>,
) {
    let lease = inner.options.lease;
    let mut renewed_until = lease_from + lease;
    loop {
        tokio::time::sleep(inner.options.renew_every).await;
        let sent_at = Instant::now();
        let renewed: Result<i64, _> = inner
            .renew
            .evalsha_with_reload(
                inner.pool.next(),
                vec![key.as_str().to_owned()],
                vec![token.clone(), millis(lease).to_string()],
            )
            .await;
        match renewed {
            Ok(1) => renewed_until = sent_at + lease,
            Ok(_) => {
                tracing::warn!(%key, "lock lease lost: the key is no longer ours");
                break;
            }
            Err(error) if Instant::now() >= renewed_until => {
                tracing::warn!(%key, error = %error, "lock lease lost: renewal failed for a whole lease");
                break;
            }
            Err(error) => tracing::warn!(%key, error = %error, "lock renewal failed; retrying"),
        }
    }
    metrics::counter!("lock_lease_lost_total", "kind" => key.kind()).increment(1);
    let _ = lost.send(true);
}

/// A held lock. Release it with [`LockGuard::release`]; dropping it releases in the
/// background.
pub struct RedisLockGuard {
    key: LockKey,
    token: String,
    fence: FencingToken,
    inner: Arc<Inner>,
    lost: watch::Receiver<bool>,
    /// The renewal task; `None` once stopped.
    watchdog: Option<JoinHandle<()>>,
    acquired_at: Instant,
    /// Set only once the release script has answered. A guard dropped before that (a
    /// release that failed on a Redis blip, or one cancelled while fred reloads a flushed
    /// script) tries again from `Drop`, instead of leaving the key locked for its lease.
    released: bool,
}

impl fmt::Debug for RedisLockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLockGuard")
            .field("key", &self.key)
            .field("fence", &self.fence)
            .field("lost", &*self.lost.borrow())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl LockGuard for RedisLockGuard {
    fn key(&self) -> &LockKey {
        &self.key
    }

    fn fencing_token(&self) -> FencingToken {
        self.fence
    }

    fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    fn lease_lost(&self) -> BoxFuture<'static, ()> {
        let mut lost = self.lost.clone();
        Box::pin(async move {
            if lost.wait_for(|lost| *lost).await.is_err() {
                // The watchdog ended without a loss: released in time, so never.
                std::future::pending::<()>().await;
            }
        })
    }

    async fn release(mut self: Box<Self>) -> Result<(), LockError> {
        // Stop renewing first: a renewal racing the delete would report a lost lease.
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
        let ours = release(&self.inner, &self.key, &self.token).await?;
        self.released = true;
        self.record_hold();
        if ours {
            tracing::debug!(key = %self.key, "lock released");
            Ok(())
        } else {
            Err(LockError::LeaseLost { key: self.key.clone() })
        }
    }
}

impl RedisLockGuard {
    fn record_hold(&self) {
        metrics::histogram!("lock_hold_seconds", "kind" => self.key.kind())
            .record(self.acquired_at.elapsed().as_secs_f64());
    }
}

impl Drop for RedisLockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
        self.record_hold();
        let (inner, key, token) =
            (Arc::clone(&self.inner), self.key.clone(), std::mem::take(&mut self.token));
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    match release(&inner, &key, &token).await {
                        Ok(_) => tracing::debug!(%key, "lock released on drop"),
                        Err(error) => tracing::warn!(%key, error = %error, "release on drop failed; the lease will free the key"),
                    }
                });
            }
            Err(_) => {
                tracing::warn!(key = %self.key, "guard dropped outside a runtime; the lease will free the key")
            }
        }
    }
}

/// Compare-and-delete; true when the key was ours.
async fn release(inner: &Inner, key: &LockKey, token: &str) -> Result<bool, LockError> {
    let deleted: i64 = inner
        .release
        .evalsha_with_reload(
            inner.pool.next(),
            vec![key.as_str().to_owned()],
            vec![token.to_owned(), RELEASE_CHANNEL.to_owned()],
        )
        .await
        .map_err(unavailable)?;
    Ok(deleted == 1)
}

/// Local waiters by key. Entries are weak: a key's entry lives as long as one of its
/// waiters does, and the last one to leave removes it.
#[derive(Clone, Default)]
struct Waiters(Arc<Mutex<HashMap<String, Weak<Notify>>>>);

struct Registration {
    waiters: Waiters,
    key: String,
    notify: Arc<Notify>,
}

impl Waiters {
    fn register(&self, key: &str) -> Registration {
        let mut map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let notify = match map.get(key).and_then(Weak::upgrade) {
            Some(notify) => notify,
            None => {
                let notify = Arc::new(Notify::new());
                map.insert(key.to_owned(), Arc::downgrade(&notify));
                notify
            }
        };
        Registration { waiters: self.clone(), key: key.to_owned(), notify }
    }

    fn wake_one(&self, key: &str) {
        let map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(notify) = map.get(key).and_then(Weak::upgrade) {
            notify.notify_one();
        }
    }

    fn wake_all(&self) {
        let map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for notify in map.values().filter_map(Weak::upgrade) {
            notify.notify_waiters();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.waiters.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Under the map's mutex no one can be upgrading this entry: if ours is the last
        // strong reference, the key has no other waiter here.
        if Arc::strong_count(&self.notify) == 1 {
            map.remove(&self.key);
        }
    }
}

fn fence_key(key: &LockKey) -> String {
    format!("{key}:fence")
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// Full jitter: uniformly in `0..=backoff`.
fn jitter(backoff: Duration) -> Duration {
    let nanos = u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

fn unavailable(error: fred::error::Error) -> LockError {
    LockError::Unavailable(anyhow::Error::new(error).context("Redis lock command failed"))
}
