//! The distributed lock on one Redis.
//!
//! - **Owner token.** The value of `lock:{kind}:{id}` is a random token of this
//!   acquisition; only a caller that presents it can renew or release.
//! - **Acquire** is a script that sets `key` to the token with the lease when it is free
//!   and, for a fenced key only, moves `key:fence` to `max(last + 1, now in µs)` (the
//!   fencing number, strictly increasing per key; the counter expires an hour after the
//!   key's last acquisition, see [`ACQUIRE_LUA`]);
//!   when another token holds it, it answers the key's remaining lease (`PTTL`) so a waiter
//!   knows the latest time to look again even if no release is ever announced; when *our*
//!   token holds it (the client resent an attempt whose answer was lost in a reconnection),
//!   it answers acquired again, with the same fencing number.
//! - **Release** is a compare-and-delete script: delete only if the value is still our
//!   token, then announce it with `SPUBLISH` on the key's own release channel
//!   (`<key>:released`, see [`release_channel`]) for pub/sub waiters.
//! - **Lease renewal.** While a guard lives, a watchdog task extends the lease every
//!   `renew_every` (compare-and-`PEXPIRE`). If the key is no longer ours, or renewal keeps
//!   failing until the lease would have run out, the guard is marked lost and its
//!   `lease_lost` future resolves.
//! - **Waiting**: [`WaitPolicy::FailFast`] tries once. [`WaitPolicy::WaitUpTo`] waits
//!   per the lock's [`WaitStrategy`]: [`WaitStrategy::Spin`] retries after exponential
//!   backoff with full jitter; [`WaitStrategy::PubSub`] sleeps until a release of the key
//!   is announced, the holder's lease would end, a fallback poll interval passes, or the
//!   deadline comes, whichever is first.
//! - **Local hand-off** (pub/sub mode): a release while another acquisition of this process
//!   waits for the same key passes the hold to it (same token and fencing number, a fresh
//!   lease after one compare-and-extend that proves the key is still ours) instead of
//!   freeing the key, up to `handoff_limit` times in a row; then the key is freed in Redis
//!   for every instance (`docs/locking.md`, "Local hand-off").
//!
//! - **Outcomes nobody saw are undone.** Every token is recorded as *outstanding* before its
//!   acquire script is sent, and stays so until an answer proves the key is not (or no
//!   longer) held with it. An acquire whose answer never reached its caller (the future
//!   was dropped while Redis ran the script, or the command timed out) is undone with a
//!   compare-and-delete sent **on the same connection**, so Redis runs it after the
//!   acquire and never before. [`RedisLock::release_all`] sweeps every outstanding token
//!   at shutdown, so a deploy does not leave in-flight users locked for a lease.
//! - **Bounded holds.** A guard trusts its lease only until the last confirmed expiry
//!   minus a margin ([`LockOptions::margin`]): `is_lost` turns true and `lease_lost`
//!   resolves then, even before the watchdog has noticed a failed renewal. The watchdog
//!   stops extending the lease once the guard has been held for
//!   [`LockOptions::max_hold`], so a holder stuck in a hung call cannot keep a key for ever.
//!
//! In pub/sub mode a process listens only on the release channels of the keys it has
//! waiters for: the first local waiter of a key that finds it held subscribes
//! (`SSUBSCRIBE`) to the key's channel and the last one to leave unsubscribes, through one
//! task that applies these changes in order and subscribes them again after a
//! reconnection (see [`Subscriptions`]); a waiter that wins at once costs no subscription. Announcements are *sharded* pub/sub: the
//! channel shares the key's hash tag, so on a Redis Cluster a release is delivered by the
//! node that owns the key, to the instances waiting for that key, instead of being
//! broadcast over the cluster bus to every node (classic `PUBLISH` is) and on to every
//! instance. A release wakes *one* local waiter of that key per instance
//! (`Notify::notify_one`), so it does not set off a herd of retries. A waiter whose key is
//! not subscribed yet still wakes when the holder's lease would end or after the fallback
//! poll, and the waiters of a key look again once its subscription is confirmed. Unfenced keys (a payment's reservation, an idempotency key)
//! leave nothing behind once released; fenced ones leave one counter for [`FENCE_TTL`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use application::lock::{DistributedLock, FencingToken, LockError, LockGuard, LockKey, WaitPolicy};
use async_trait::async_trait;
use fred::clients::{Client, Pool, SubscriberClient};
use fred::prelude::{EventInterface, PubsubInterface};
use fred::types::scripts::Script;
use futures::future::BoxFuture;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The sharded pub/sub channel on which releases of `key` are announced: `<key>:released`,
/// in the key's hash slot (the key's `{...}` tag), so that the release script may publish
/// on it on a Redis Cluster and only the key's node carries the message.
#[must_use]
pub fn release_channel(key: &str) -> String {
    format!("{key}{RELEASE_SUFFIX}")
}

const RELEASE_SUFFIX: &str = ":released";

/// The acquire script (public so that tests can replay it as a reconnecting client would).
///
/// `KEYS[2]`, the fencing counter, is passed for fenced keys only. The number handed out
/// is `max(last + 1, Redis's clock in microseconds)`, and the counter expires
/// [`FENCE_TTL`] after its last acquisition: Redis keeps one small key per fenced
/// resource locked in the last hour, not one per resource ever locked, and the numbers
/// still only grow, across the counter's expiry and across a Redis restart that lost it,
/// as long as Redis's clock does not step back by more than the time since the last
/// acquisition (the same rule as the cache's versions).
pub const ACQUIRE_LUA: &str = include_str!("lua/lock_acquire.lua");

/// How long a fencing counter outlives its key's last acquisition.
pub const FENCE_TTL: Duration = Duration::from_secs(60 * 60);

const RELEASE_LUA: &str = include_str!("lua/lock_release.lua");

const RENEW_LUA: &str = include_str!("lua/lock_renew.lua");

const RAISE_FENCE_LUA: &str = include_str!("lua/lock_raise_fence.lua");

/// The default lease: short enough that a crashed instance blocks a key only briefly; long
/// enough that a renewal can miss a beat or two.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// The default longest hold: the watchdog stops renewing after this, so a holder stuck in a
/// hung call frees its key within one more lease.
pub const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(20);

/// How often an undo or a release from `Drop` is tried before the lease is left to free
/// the key.
const CLEANUP_ATTEMPTS: u32 = 3;

/// The default bound on each pub/sub sleep, in case a release announcement is missed.
/// It is the poll rate of a key's waiters on one instance together: each waiter of a key
/// sleeps this long times the number of the key's local waiters (jittered), so a thousand
/// waiters of one key do not send a thousand scripts every 250 ms.
pub const DEFAULT_FALLBACK_POLL: Duration = Duration::from_millis(250);

/// The default of how many times in a row a held key may be handed straight to a local
/// waiter (lock cohorting) before it is released in Redis for every instance to compete for.
pub const DEFAULT_HANDOFF_LIMIT: u32 = 8;

/// How a waiting acquisition waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStrategy {
    /// Retry after `initial`, doubling up to `max`, each pause drawn uniformly from
    /// `0..=backoff` (full jitter) so that waiters do not retry in step.
    Spin { initial: Duration, max: Duration },
    /// Sleep until a release of the key is announced on its [`release_channel`], or a
    /// local holder hands the key over on release. `fallback_poll` bounds the sleeps of a
    /// key's local waiters together, in case an announcement is missed (a reconnecting
    /// subscriber, a subscription not yet confirmed); `handoff_limit` is how many times in
    /// a row a hold may pass to a local waiter before the key is released in Redis (0: never).
    PubSub { fallback_poll: Duration, handoff_limit: u32 },
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
    /// The longest a guard may be held: past it the watchdog stops renewing and the guard
    /// counts as lost, so the work under it is abandoned and rolled back.
    pub max_hold: Duration,
    pub wait: WaitStrategy,
}

impl LockOptions {
    /// How long before the last confirmed expiry a guard stops trusting its lease: a tenth
    /// of it, for clock drift between this process and Redis and for the time a commit
    /// takes after the last check.
    #[must_use]
    pub fn margin(&self) -> Duration {
        self.lease / 10
    }
}

impl Default for LockOptions {
    fn default() -> Self {
        Self {
            lease: DEFAULT_LEASE,
            renew_every: DEFAULT_LEASE / 3,
            max_hold: DEFAULT_MAX_HOLD,
            wait: WaitStrategy::PubSub {
                fallback_poll: DEFAULT_FALLBACK_POLL,
                handoff_limit: DEFAULT_HANDOFF_LIMIT,
            },
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
    raise: Script,
    /// Local pub/sub waiters, by key.
    waiters: Waiters,
    /// The pub/sub tasks (dispatching releases, applying subscriptions), aborted with
    /// the lock.
    listener: Option<[JoinHandle<()>; 2]>,
    /// Acquisitions of this lock now asleep between attempts.
    sleeping: AtomicUsize,
    /// Holds passed from a releasing guard straight to a local waiter.
    handed_off: AtomicU64,
    /// Tokens that may be holding a key: sent to Redis and not yet known to be free.
    outstanding: Mutex<HashMap<u64, Outstanding>>,
    next_ticket: AtomicU64,
    /// Set by [`RedisLock::release_all`]: the process is stopping, no new acquisition.
    closing: std::sync::atomic::AtomicBool,
    /// The runtime this lock was built on (the server's main one): releases from `Drop`
    /// run there, since the runtime of the request that dropped a guard may be going away.
    runtime: tokio::runtime::Handle,
}

/// A token that may hold `key`, and the connection its acquire went out on.
#[derive(Clone)]
struct Outstanding {
    key: LockKey,
    token: String,
    client: Client,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in self.listener.take().into_iter().flatten() {
            task.abort();
        }
    }
}

impl fmt::Debug for RedisLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLock").field("options", &self.inner.options).finish_non_exhaustive()
    }
}

impl RedisLock {
    /// A lock on `pool`. In [`WaitStrategy::PubSub`] mode `subscriber` listens on the
    /// release channels of the keys this process waits for, and a task dispatches
    /// releases to local waiters.
    ///
    /// # Errors
    /// When pub/sub mode is asked without a subscriber.
    pub async fn new(
        pool: Pool,
        subscriber: Option<&SubscriberClient>,
        options: LockOptions,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!options.lease.is_zero(), "a lock lease must be above zero");
        anyhow::ensure!(options.renew_every < options.lease, "renewal must come before the lease runs out");
        anyhow::ensure!(!options.max_hold.is_zero(), "the longest hold must be above zero");
        let (waiters, listener) = match (options.wait, subscriber) {
            (WaitStrategy::PubSub { .. }, Some(subscriber)) => {
                let (waiters, tasks) = Waiters::subscribed(subscriber);
                (waiters, Some(tasks))
            }
            (WaitStrategy::PubSub { .. }, None) => anyhow::bail!("pub/sub waiting needs a subscriber"),
            (WaitStrategy::Spin { .. }, _) => (Waiters::default(), None),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                options,
                acquire: Script::from_lua(ACQUIRE_LUA),
                release: Script::from_lua(RELEASE_LUA),
                renew: Script::from_lua(RENEW_LUA),
                raise: Script::from_lua(RAISE_FENCE_LUA),
                waiters,
                listener,
                sleeping: AtomicUsize::new(0),
                handed_off: AtomicU64::new(0),
                outstanding: Mutex::new(HashMap::new()),
                next_ticket: AtomicU64::new(0),
                closing: std::sync::atomic::AtomicBool::new(false),
                runtime: tokio::runtime::Handle::current(),
            }),
        })
    }

    /// How many acquisitions through this lock are asleep between attempts right now
    /// (also exported as the `lock_waiters` gauge).
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.inner.sleeping.load(Ordering::SeqCst)
    }

    /// How many holds were handed from a releasing guard straight to a local waiter of the
    /// same key, without a release and an acquire in Redis (also the `lock_handoffs_total`
    /// counter). A hold counts when it is sent, including one whose taker left before
    /// looking (that hold is then released from `Drop`).
    #[must_use]
    pub fn handoffs(&self) -> u64 {
        self.inner.handed_off.load(Ordering::Relaxed)
    }

    /// How many tokens may still hold a key: acquired and not released, or sent and not
    /// answered (a cancelled or timed-out acquire not yet undone).
    #[must_use]
    pub fn outstanding(&self) -> usize {
        lock_map(&self.inner.outstanding).len()
    }

    /// How many keys have local pub/sub waiters registered (diagnostics and tests: it
    /// falls back to zero once every waiter has left).
    #[must_use]
    pub fn waiter_keys(&self) -> usize {
        self.inner.waiters.len()
    }

    /// Releases every key this process may still hold (held guards, releases from `Drop`
    /// not yet run, acquisitions not yet undone), waiting at most `within`. For shutdown:
    /// call it once the HTTP server has stopped, before closing the Redis connections.
    ///
    /// From the first call on, new acquisitions are refused ([`LockError::Unavailable`]):
    /// requests still being dropped by stopping workers, or woken by these very releases,
    /// must not take keys that nobody would release. Entries leave the outstanding set only
    /// through their owners (a guard's release, a drop's clean-up, an undone attempt), so
    /// the sweep repeats until the set is empty or the time is up: an acquire that was on
    /// its way to Redis when a sweep ran is caught by the next one. Guards still alive
    /// afterwards find their key gone at release, which is harmless.
    ///
    /// Returns how many keys were ours and were freed.
    pub async fn release_all(&self, within: Duration) -> usize {
        self.inner.closing.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + within;
        let inner = &self.inner;
        let mut freed = 0;
        loop {
            let pending: Vec<Outstanding> = lock_map(&inner.outstanding).values().cloned().collect();
            if pending.is_empty() {
                tracing::info!(freed, "every lock this process held is released");
                return freed;
            }
            let sweep = futures::future::join_all(
                pending.iter().map(|o| release_on(inner, &o.client, &o.key, &o.token)),
            );
            match tokio::time::timeout_at(deadline, sweep).await {
                Ok(answers) => freed += answers.iter().filter(|r| matches!(r, Ok(true))).count(),
                Err(_) => break,
            }
            // Give the owners (drop clean-ups on this runtime, tickets on their way back)
            // a moment to forget their entries before looking again.
            if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(20))).await.is_err()
            {
                break;
            }
        }
        let left = self.outstanding();
        tracing::warn!(freed, left, "some locks may be left at shutdown; their leases will free them");
        freed
    }

    /// Acquires `key` and returns the concrete guard: [`DistributedLock::acquire`] without
    /// its metrics, for a [`crate::quorum::QuorumLock`] that takes one per node. `report`
    /// says whether the guard records its hold time (a node's guard of a quorum does not:
    /// the quorum's hold is one hold, not one per node).
    pub(crate) async fn acquire_guard(
        &self,
        key: &LockKey,
        wait: WaitPolicy,
        report: bool,
    ) -> Result<RedisLockGuard, LockError> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let acquired = match wait {
            WaitPolicy::FailFast => match self.try_once(key, &token).await? {
                Attempt::Acquired(acquired) => acquired,
                Attempt::Held { .. } => return Err(LockError::Busy { key: key.clone() }),
            },
            WaitPolicy::WaitUpTo(limit) => match self.acquire_waiting(key, &token, limit).await? {
                Won::Acquired(acquired) => acquired,
                Won::HandedOff(mut guard) => {
                    guard.report = report;
                    return Ok(*guard);
                }
            },
        };
        Ok(self.guard(key, token, acquired, report))
    }

    /// Raises `key`'s fencing counter to at least `floor` (never lowers it). A quorum lock
    /// hands out the highest number its nodes gave and writes it back to them, so that
    /// whichever majority the next holder wins, one of its nodes has seen this number.
    pub(crate) async fn raise_fence(&self, key: &LockKey, floor: FencingToken) -> Result<(), LockError> {
        let _: i64 = self
            .inner
            .raise
            .evalsha_with_reload(
                self.inner.pool.next(),
                vec![fence_key(key)],
                vec![floor.0.to_string(), millis(FENCE_TTL).to_string()],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// One attempt: the fencing number if acquired, else how long the holder's lease has left.
    ///
    /// The token is outstanding from before the script is sent; if this future is dropped
    /// before the answer is read, or the answer is an error, the [`Ticket`] undoes the
    /// attempt. On success the ticket's registration passes to the guard.
    async fn try_once(&self, key: &LockKey, token: &str) -> Result<Attempt, LockError> {
        let inner = &self.inner;
        if inner.closing.load(Ordering::SeqCst) {
            return Err(LockError::Unavailable(anyhow::anyhow!("the process is shutting down")));
        }
        let client = inner.pool.next().clone();
        let ticket = Ticket::issue(inner, key, token, &client);
        let sent_at = Instant::now();
        let lease_ms = millis(inner.options.lease);
        let keys = if key.is_fenced() {
            vec![key.as_str().to_owned(), fence_key(key)]
        } else {
            vec![key.as_str().to_owned()]
        };
        crate::slots::debug_check(&keys);
        let reply: Vec<i64> = inner
            .acquire
            .evalsha_with_reload(
                &client,
                keys,
                vec![token.to_owned(), lease_ms.to_string(), millis(FENCE_TTL).to_string()],
            )
            .await
            // The ticket is dropped armed here: the script may still run, so it is undone.
            .map_err(unavailable)?;
        match reply.as_slice() {
            [1, fence] => Ok(Attempt::Acquired(Acquired {
                fence: key.is_fenced().then(|| FencingToken(u64::try_from(*fence).unwrap_or(0))),
                lease_from: sent_at,
                ticket: ticket.keep(),
            })),
            [0, pttl] => {
                ticket.forget();
                Ok(Attempt::Held { lease_left: Duration::from_millis(u64::try_from(*pttl).unwrap_or(0)) })
            }
            other => Err(LockError::Unavailable(anyhow::anyhow!("unexpected acquire reply {other:?}"))),
        }
    }

    /// Waits for `key` until `wait` has passed: won in Redis with `token`, or, in pub/sub
    /// mode, handed over by a local holder of the key that released it.
    async fn acquire_waiting(&self, key: &LockKey, token: &str, wait: Duration) -> Result<Won, LockError> {
        let started = Instant::now();
        let deadline = started + wait;
        // Built once, before the first attempt: a pub/sub waiter registers first, so a
        // release between a failed attempt and the sleep is not missed.
        let mut pause_state = match self.inner.options.wait {
            WaitStrategy::Spin { initial, max } => Pause::Spin { backoff: initial, max },
            WaitStrategy::PubSub { fallback_poll, .. } => {
                Pause::PubSub { registration: self.inner.waiters.register(key.as_str()), fallback_poll }
            }
        };
        loop {
            if let Some(guard) = pause_state.take_baton() {
                return self.handed_over(guard);
            }
            let attempt = self.try_once(key, token).await;
            // A hold handed over while the attempt was out wins over its failure (a key
            // held by that very hold, a Redis error, the deadline).
            let lease_left = match (attempt, pause_state.take_baton()) {
                (Ok(Attempt::Acquired(acquired)), _) => return Ok(Won::Acquired(acquired)),
                (_, Some(guard)) => return self.handed_over(guard),
                (Ok(Attempt::Held { lease_left }), None) => lease_left,
                (Err(error), None) => return Err(error),
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
                    registration.follow();
                    // The key's local waiters together poll about once per `fallback_poll`.
                    let poll =
                        fallback_poll.mul_f64(registration.waiters_of_key() as f64 * (0.5 + fastrand::f64()));
                    // Wake at the latest when the holder's lease would run out: a crashed
                    // holder announces nothing.
                    let pause = remaining.min(poll).min(lease_left + Duration::from_millis(1));
                    if let Ok(Some(guard)) = tokio::time::timeout(pause, registration.next_turn()).await {
                        return self.handed_over(guard);
                    }
                }
            }
        }
    }

    fn guard(&self, key: &LockKey, token: String, acquired: Acquired, report: bool) -> RedisLockGuard {
        // The watchdog runs where the holder does.
        new_guard(&tokio::runtime::Handle::current(), &self.inner, key, token, acquired, report)
    }

    /// A hold a local holder handed over, unless the process began to stop meanwhile: then
    /// it is dropped (which releases the key) and the acquisition refused, as a new one is.
    fn handed_over(&self, mut guard: Box<RedisLockGuard>) -> Result<Won, LockError> {
        if self.inner.closing.load(Ordering::SeqCst) {
            drop(guard);
            return Err(LockError::Unavailable(anyhow::anyhow!("the process is shutting down")));
        }
        // The hold time counts from when this waiter took the hold, not from when it was sent.
        guard.acquired_at = Instant::now();
        Ok(Won::HandedOff(guard))
    }
}

/// A guard of `acquired`, its lease counted from `acquired.lease_from`, with its watchdog
/// spawned on `runtime`.
fn new_guard(
    runtime: &tokio::runtime::Handle,
    inner: &Arc<Inner>,
    key: &LockKey,
    token: String,
    acquired: Acquired,
    report: bool,
) -> RedisLockGuard {
    let options = inner.options;
    let (state_tx, state_rx) = watch::channel(LeaseState {
        lost: false,
        trusted_until: acquired.lease_from + options.lease - options.margin(),
    });
    let hold_until = acquired.lease_from + options.max_hold;
    let watchdog = runtime.spawn(watchdog(
        Arc::clone(inner),
        key.clone(),
        token.clone(),
        acquired.lease_from,
        hold_until,
        state_tx,
        report,
    ));
    RedisLockGuard {
        key: key.clone(),
        token,
        ticket: acquired.ticket,
        fence: acquired.fence,
        inner: Arc::clone(inner),
        state: state_rx,
        hold_until: hold_until - options.margin(),
        watchdog: Some(watchdog),
        acquired_at: Instant::now(),
        released: false,
        report,
        handoffs: 0,
        hold_recorded: false,
    }
}

/// An acquire attempt in flight. Registered as outstanding when issued; dropped without
/// [`Ticket::keep`] or [`Ticket::forget`] (cancelled, or the answer was an error), it sends
/// a compare-and-delete on the attempt's own connection, so that a script Redis still runs
/// leaves no lock behind.
struct Ticket {
    inner: Arc<Inner>,
    id: u64,
    armed: bool,
}

impl Ticket {
    fn issue(inner: &Arc<Inner>, key: &LockKey, token: &str, client: &Client) -> Self {
        let id = inner.next_ticket.fetch_add(1, Ordering::Relaxed);
        lock_map(&inner.outstanding)
            .insert(id, Outstanding { key: key.clone(), token: token.to_owned(), client: client.clone() });
        Self { inner: Arc::clone(inner), id, armed: true }
    }

    /// The attempt won: the registration now belongs to the guard.
    fn keep(mut self) -> u64 {
        self.armed = false;
        self.id
    }

    /// The attempt lost: the token holds nothing.
    fn forget(mut self) {
        self.armed = false;
        lock_map(&self.inner.outstanding).remove(&self.id);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.armed {
            metrics::counter!("lock_acquire_undone_total").increment(1);
            clean_up(&self.inner, self.id, "acquire whose answer was never read undone");
        }
    }
}

/// Releases outstanding entry `id` in the background on the lock's runtime, retrying a few
/// times, and forgets it once Redis answered (or after the last try: the lease frees it).
fn clean_up(inner: &Arc<Inner>, id: u64, what: &'static str) {
    let Some(entry) = lock_map(&inner.outstanding).get(&id).cloned() else { return };
    let inner = Arc::clone(inner);
    let runtime = inner.runtime.clone();
    runtime.spawn(async move {
        let mut pause = Duration::from_millis(50);
        for attempt in 1..=CLEANUP_ATTEMPTS {
            match release_on(&inner, &entry.client, &entry.key, &entry.token).await {
                Ok(freed) => {
                    tracing::debug!(key = %entry.key, freed, "{what}");
                    break;
                }
                Err(error) if attempt == CLEANUP_ATTEMPTS => {
                    tracing::warn!(key = %entry.key, error = %error, "{what}: failed; the lease will free the key");
                }
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
        lock_map(&inner.outstanding).remove(&id);
    });
}

fn lock_map<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a guard knows of its lease.
#[derive(Debug, Clone, Copy)]
struct LeaseState {
    /// Renewal found the key gone, or failed until the lease ran out.
    lost: bool,
    /// The last confirmed expiry minus the margin: past it the lease is not trusted.
    trusted_until: Instant,
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

impl Pause {
    /// A hold a local holder has handed over already (pub/sub mode only).
    fn take_baton(&mut self) -> Option<Box<RedisLockGuard>> {
        match self {
            Self::PubSub { registration, .. } => registration.take_baton(),
            Self::Spin { .. } => None,
        }
    }
}

/// A successful attempt.
#[derive(Debug)]
struct Acquired {
    fence: Option<FencingToken>,
    /// When the winning attempt was sent: Redis started the lease no earlier, so counting
    /// from here never overestimates how long the lease lasts.
    lease_from: Instant,
    /// The outstanding entry of the token, owned by the guard from now on.
    ticket: u64,
}

enum Attempt {
    Acquired(Acquired),
    Held { lease_left: Duration },
}

/// How a waiting acquisition got its key.
enum Won {
    /// Its own acquire script won in Redis.
    Acquired(Acquired),
    /// A local holder handed its hold over on release (boxed: a guard is large).
    HandedOff(Box<RedisLockGuard>),
}

#[async_trait]
impl DistributedLock for RedisLock {
    #[tracing::instrument(name = "lock.acquire", skip(self), fields(key = %key))]
    async fn acquire(&self, key: &LockKey, wait: WaitPolicy) -> Result<Box<dyn LockGuard>, LockError> {
        let started = Instant::now();
        let outcome = self.acquire_guard(key, wait, true).await;
        record_acquire(key, started, outcome.as_ref().map(|_| ()));
        let guard = outcome?;
        tracing::debug!(fence = guard.fence.map(|fence| fence.0), "lock acquired");
        Ok(Box::new(guard))
    }
}

/// The metrics of one acquisition (by the lock as a whole, not by a node of a quorum).
pub(crate) fn record_acquire(key: &LockKey, started: Instant, outcome: Result<(), &LockError>) {
    let label = match outcome {
        Ok(()) => "acquired",
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
}

/// Extends the lease every `renew_every` while the guard lives and until `hold_until`;
/// moves the guard's trusted expiry forward on each success, and marks the guard lost when
/// the key is no longer ours or the lease ran out without a successful renewal.
async fn watchdog(
    inner: Arc<Inner>,
    key: LockKey,
    token: String,
    lease_from: Instant,
    hold_until: Instant,
    state: watch::Sender<LeaseState>,
    report: bool,
) {
    let lease = inner.options.lease;
    let margin = inner.options.margin();
    let mut renewed_until = lease_from + lease;
    let mut pause = inner.options.renew_every;
    loop {
        tokio::time::sleep(pause).await;
        // After a failure, try again soon: waiting a whole `renew_every` again could let
        // the lease run out between two attempts.
        pause = inner.options.renew_every;
        let sent_at = Instant::now();
        if sent_at >= hold_until {
            // Held too long: stop extending. The guard stops trusting the lease at
            // `hold_until` and the work under it is abandoned; nothing to mark here.
            tracing::warn!(%key, "lock held past its longest hold; no longer renewed");
            if report {
                metrics::counter!("lock_hold_limit_reached_total", "kind" => key.kind()).increment(1);
            }
            return;
        }
        let renewed: Result<i64, _> = inner
            .renew
            .evalsha_with_reload(
                inner.pool.next(),
                vec![key.as_str().to_owned()],
                vec![token.clone(), millis(lease).to_string()],
            )
            .await;
        match renewed {
            Ok(1) => {
                renewed_until = sent_at + lease;
                state.send_modify(|s| s.trusted_until = renewed_until - margin);
            }
            Ok(_) => {
                tracing::warn!(%key, "lock lease lost: the key is no longer ours");
                break;
            }
            Err(error) if Instant::now() >= renewed_until => {
                tracing::warn!(%key, error = %error, "lock lease lost: renewal failed for a whole lease");
                break;
            }
            Err(error) => {
                tracing::warn!(%key, error = %error, "lock renewal failed; retrying");
                pause = inner.options.renew_every / 4;
            }
        }
    }
    if report {
        // A node's grant of a quorum lock is not the lock: its losses are counted by
        // `lock_quorum_node_failures_total` and the quorum guard.
        metrics::counter!("lock_lease_lost_total", "kind" => key.kind()).increment(1);
    }
    state.send_modify(|s| s.lost = true);
}

/// A held lock. Release it with [`LockGuard::release`]; dropping it releases in the
/// background.
pub struct RedisLockGuard {
    key: LockKey,
    token: String,
    /// This token's outstanding entry.
    ticket: u64,
    fence: Option<FencingToken>,
    inner: Arc<Inner>,
    state: watch::Receiver<LeaseState>,
    /// Past this (the longest hold, minus the margin) the guard counts as lost.
    hold_until: Instant,
    /// The renewal task; `None` once stopped.
    watchdog: Option<JoinHandle<()>>,
    acquired_at: Instant,
    /// Set only once the release script has answered. A guard dropped before that (a
    /// release that failed on a Redis blip, or one cancelled while fred reloads a flushed
    /// script) tries again from `Drop`, instead of leaving the key locked for its lease.
    released: bool,
    /// Whether the hold time is recorded (not for a node's guard of a quorum, which is
    /// never handed off either).
    report: bool,
    /// How many times this hold was handed from one local holder to the next so far.
    handoffs: u32,
    /// The hold time was recorded (by `release`, or by `Drop` after a failed release).
    hold_recorded: bool,
}

impl fmt::Debug for RedisLockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLockGuard")
            .field("key", &self.key)
            .field("fence", &self.fence)
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl LockGuard for RedisLockGuard {
    fn key(&self) -> &LockKey {
        &self.key
    }

    fn fencing_token(&self) -> Option<FencingToken> {
        self.fence
    }

    fn is_lost(&self) -> bool {
        let state = *self.state.borrow();
        state.lost || Instant::now() >= state.trusted_until.min(self.hold_until)
    }

    fn lease_lost(&self) -> BoxFuture<'static, ()> {
        let mut state = self.state.clone();
        let hold_until = self.hold_until;
        Box::pin(async move {
            loop {
                let now = *state.borrow_and_update();
                if now.lost {
                    return;
                }
                tokio::select! {
                    changed = state.changed() => {
                        if changed.is_err() {
                            // The watchdog ended without a loss (released, or held past the
                            // longest hold): only the clock can end the lease now.
                            tokio::time::sleep_until(now.trusted_until.min(hold_until)).await;
                            return;
                        }
                    }
                    () = tokio::time::sleep_until(now.trusted_until.min(hold_until)) => return,
                }
            }
        })
    }

    async fn release(mut self: Box<Self>) -> Result<(), LockError> {
        self.record_hold();
        if self.may_hand_off() {
            return self.hand_off().await;
        }
        self.release_in_redis().await
    }
}

impl RedisLockGuard {
    /// Whether a release may hand this hold to a local waiter instead of freeing the key:
    /// the work under it is over, so the next local waiter may start at once, skipping the
    /// release script, its announcement and a new acquire. Not when the process is
    /// stopping, when the lease is no longer trusted, or past the limit of hand-offs in a
    /// row (the other instances' waiters get their turn), and never for a node's guard of a
    /// quorum or in spin mode.
    fn may_hand_off(&self) -> bool {
        let WaitStrategy::PubSub { handoff_limit, .. } = self.inner.options.wait else { return false };
        self.report
            && self.handoffs < handoff_limit
            && !self.inner.closing.load(Ordering::SeqCst)
            && !self.is_lost()
            && self.inner.waiters.has_baton_takers(self.key.as_str())
    }

    /// Hands this hold to the first local waiter of the key, after one compare-and-extend
    /// in Redis: the key is still held with our token (the watchdog's last renewal may be
    /// seconds old, and the key may have gone since: a failover, an eviction), and the next
    /// holder gets a whole lease and a whole longest hold, counted from that round trip,
    /// with a watchdog of its own. Only the token, the fencing number and the outstanding
    /// entry carry over.
    ///
    /// Keeping the fencing number is safe: this holder's work is over, and the SQL guards
    /// accept a number equal to the stored one; a holder that won the key in Redis since
    /// has a higher one.
    async fn hand_off(mut self: Box<Self>) -> Result<(), LockError> {
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
        let sent_at = Instant::now();
        let extended: Result<i64, _> = self
            .inner
            .renew
            .evalsha_with_reload(
                self.inner.pool.next(),
                vec![self.key.as_str().to_owned()],
                vec![self.token.clone(), millis(self.inner.options.lease).to_string()],
            )
            .await;
        match extended {
            Ok(1) => {}
            Ok(_) => {
                // Not ours any more: nothing to hand over or delete. The local waiters may
                // find the key free; one looks now rather than at its next poll.
                self.released = true;
                lock_map(&self.inner.outstanding).remove(&self.ticket);
                self.inner.waiters.wake_one(self.key.as_str());
                return Err(LockError::LeaseLost { key: self.key.clone() });
            }
            // Redis did not answer: release the usual way (which may fail the same way and
            // leave the key to its lease).
            Err(_) => return self.release_in_redis().await,
        }
        self.released = true;
        let acquired = Acquired { fence: self.fence, lease_from: sent_at, ticket: self.ticket };
        // The next holder may run on another worker than this releasing one: its watchdog
        // runs on the lock's own runtime, not on a worker that may stop or stall first.
        let mut next = Box::new(new_guard(
            &self.inner.runtime,
            &self.inner,
            &self.key,
            self.token.clone(),
            acquired,
            self.report,
        ));
        next.handoffs = self.handoffs + 1;
        match self.inner.waiters.hand_off(self.key.as_str(), next) {
            Ok(()) => {
                self.inner.handed_off.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("lock_handoffs_total", "kind" => self.key.kind()).increment(1);
                tracing::debug!(key = %self.key, "lock handed to a local waiter");
                Ok(())
            }
            // Every local waiter had left meanwhile: release it in Redis after all.
            Err(mut next) => {
                next.hold_recorded = true;
                next.release_in_redis().await
            }
        }
    }

    /// Compare-and-delete in Redis (and the announcement to the key's waiters).
    async fn release_in_redis(&mut self) -> Result<(), LockError> {
        // Stop renewing first: a renewal racing the delete would report a lost lease.
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.abort();
        }
        let ours = release(&self.inner, &self.key, &self.token).await?;
        self.released = true;
        lock_map(&self.inner.outstanding).remove(&self.ticket);
        if ours {
            tracing::debug!(key = %self.key, "lock released");
            Ok(())
        } else {
            Err(LockError::LeaseLost { key: self.key.clone() })
        }
    }

    /// Records the hold time, once.
    fn record_hold(&mut self) {
        if !self.report || self.hold_recorded {
            return;
        }
        self.hold_recorded = true;
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
        // On the lock's own runtime: the request's runtime may be shutting down. What has
        // not run by shutdown is swept by `RedisLock::release_all`.
        clean_up(&self.inner, self.ticket, "lock released on drop");
    }
}

/// Compare-and-delete; true when the key was ours.
async fn release(inner: &Inner, key: &LockKey, token: &str) -> Result<bool, LockError> {
    release_on(inner, inner.pool.next(), key, token).await
}

/// Compare-and-delete on a given connection (the one an acquire went out on, so that Redis
/// runs the two in order).
async fn release_on(inner: &Inner, client: &Client, key: &LockKey, token: &str) -> Result<bool, LockError> {
    let channel = release_channel(key.as_str());
    crate::slots::debug_check(&[key.as_str(), &channel]);
    let deleted: i64 = inner
        .release
        .evalsha_with_reload(client, vec![key.as_str().to_owned()], vec![token.to_owned(), channel])
        .await
        .map_err(unavailable)?;
    Ok(deleted == 1)
}

/// Local waiters by key. Entries are weak: a key's entry lives as long as one of its
/// waiters does, and the last one to leave removes it. In pub/sub mode the first waiter of
/// a key that finds it held asks for its release channel ([`Registration::follow`]) and the
/// last one to leave gives it up; both are sent under the map's mutex, so the changes of
/// one key reach [`Subscriptions`] in order. A waiter whose first attempt wins costs no
/// subscription.
#[derive(Clone, Default)]
struct Waiters {
    map: Arc<Mutex<HashMap<String, Entry>>>,
    changes: Option<mpsc::UnboundedSender<Change>>,
}

/// The waiters of one key: what wakes them, where a local holder may hand its hold over,
/// and whether the key's channel was asked for. The default has no waiter yet.
#[derive(Default)]
struct Entry {
    notify: Weak<Notify>,
    /// One sender per waiting acquisition, in the order they came: a releasing holder
    /// hands its hold to the first whose receiver is still there. Senders of waiters that
    /// left are pruned when the queue outgrows twice the waiters.
    batons: VecDeque<oneshot::Sender<Box<RedisLockGuard>>>,
    followed: bool,
}

/// A key's channel is wanted (`true`: a waiter found the key held) or no longer (`false`:
/// its last waiter left).
type Change = (String, bool);

struct Registration {
    waiters: Waiters,
    key: String,
    /// `Some` until dropped: taken out in `Drop` so that our strong reference is gone
    /// before we look at the entry, under the map's mutex.
    notify: Option<Arc<Notify>>,
    /// Where a local holder's hand-off arrives; `None` once it did (or its sender is gone).
    /// Dropped with a hold inside (the waiter was cancelled meanwhile), the hold's guard
    /// releases the key from `Drop`.
    baton: Option<oneshot::Receiver<Box<RedisLockGuard>>>,
    /// This registration has already made sure the key's channel is asked for.
    following: bool,
}

impl Registration {
    /// Sleeps until a release of the key is announced (`None`) or a local holder hands its
    /// hold over (the hold).
    async fn next_turn(&mut self) -> Option<Box<RedisLockGuard>> {
        // Borrowed, not cloned: the number of references counts the key's waiters.
        let Self { notify, baton, .. } = self;
        let notified = async {
            if let Some(notify) = notify.as_deref() {
                notify.notified().await;
            }
        };
        let Some(receiver) = baton.as_mut() else {
            notified.await;
            return None;
        };
        tokio::select! {
            biased;
            handed = receiver => {
                *baton = None;
                handed.ok()
            }
            () = notified => None,
        }
    }

    /// A hold handed over already, if any (checked before each attempt in Redis).
    fn take_baton(&mut self) -> Option<Box<RedisLockGuard>> {
        match self.baton.as_mut()?.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => None,
            // Handed over, or never to be (the sender is gone): either way the channel is done.
            handed => {
                self.baton = None;
                handed.ok()
            }
        }
    }

    /// How many acquisitions of this process wait for the key, this one included.
    fn waiters_of_key(&self) -> usize {
        self.notify.as_ref().map_or(1, Arc::strong_count)
    }

    /// Asks for the key's release channel unless a waiter of the key already has: called
    /// once the key was found held, before the first sleep.
    fn follow(&mut self) {
        if self.following {
            return;
        }
        self.following = true;
        let mut map = lock_map(&self.waiters.map);
        if let Some(entry) = map.get_mut(&self.key).filter(|entry| !entry.followed) {
            entry.followed = true;
            self.waiters.change(&self.key, true);
        }
    }
}

impl Waiters {
    /// Waiters whose keys' release channels `subscriber` follows, with the two tasks that
    /// keep it so: one applies the subscriptions, one dispatches releases.
    fn subscribed(subscriber: &SubscriberClient) -> (Self, [JoinHandle<()>; 2]) {
        let (changes, requested) = mpsc::unbounded_channel();
        let waiters = Self { map: Arc::default(), changes: Some(changes) };
        let mut messages = subscriber.message_rx();
        let dispatch = {
            let waiters = waiters.clone();
            tokio::spawn(async move {
                loop {
                    match messages.recv().await {
                        Ok(message) => {
                            if let Some(key) = message.channel.strip_suffix(RELEASE_SUFFIX) {
                                waiters.wake_one(key);
                            }
                        }
                        // Missed messages: wake every waiter to look again.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => waiters.wake_all(),
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
            })
        };
        let apply = tokio::spawn(
            Subscriptions {
                subscriber: subscriber.clone(),
                waiters: waiters.clone(),
                wanted: HashSet::new(),
                current: HashSet::new(),
            }
            .run(requested),
        );
        (waiters, [dispatch, apply])
    }

    fn register(&self, key: &str) -> Registration {
        let mut map = lock_map(&self.map);
        let entry = map.entry(key.to_owned()).or_default();
        let notify = match entry.notify.upgrade() {
            Some(notify) => notify,
            None => {
                let notify = Arc::new(Notify::new());
                *entry = Entry { notify: Arc::downgrade(&notify), ..Entry::default() };
                notify
            }
        };
        let (sender, baton) = oneshot::channel();
        if entry.batons.len() >= 2 * Arc::strong_count(&notify) + 8 {
            entry.batons.retain(|sender| !sender.is_closed());
        }
        entry.batons.push_back(sender);
        Registration {
            waiters: self.clone(),
            key: key.to_owned(),
            notify: Some(notify),
            baton: Some(baton),
            following: false,
        }
    }

    /// Whether a local acquisition may be waiting for `key` to be handed over.
    fn has_baton_takers(&self, key: &str) -> bool {
        lock_map(&self.map)
            .get(key)
            .is_some_and(|entry| entry.batons.iter().any(|sender| !sender.is_closed()))
    }

    /// Hands `guard`'s hold to the first local waiter of its key still waiting for one, or
    /// gives it back when there is none.
    fn hand_off(&self, key: &str, mut guard: Box<RedisLockGuard>) -> Result<(), Box<RedisLockGuard>> {
        let mut map = lock_map(&self.map);
        let Some(entry) = map.get_mut(key) else { return Err(guard) };
        while let Some(sender) = entry.batons.pop_front() {
            match sender.send(guard) {
                Ok(()) => return Ok(()),
                Err(returned) => guard = returned,
            }
        }
        Err(guard)
    }

    fn change(&self, key: &str, wanted: bool) {
        if let Some(changes) = &self.changes {
            // Fails only when the task is gone (the lock is being dropped): nothing to do.
            let _ = changes.send((key.to_owned(), wanted));
        }
    }

    fn len(&self) -> usize {
        lock_map(&self.map).len()
    }

    fn notify(&self, key: &str) -> Option<Arc<Notify>> {
        lock_map(&self.map).get(key).and_then(|entry| entry.notify.upgrade())
    }

    fn wake_one(&self, key: &str) {
        if let Some(notify) = self.notify(key) {
            notify.notify_one();
        }
    }

    /// The key's channel was just subscribed: a release announced before then was not
    /// heard. Every waiter asleep now looks again, and so does the next one to go to sleep
    /// (one that was between its attempt and its sleep).
    fn wake_key(&self, key: &str) {
        if let Some(notify) = self.notify(key) {
            notify.notify_waiters();
            notify.notify_one();
        }
    }

    fn wake_all(&self) {
        for notify in lock_map(&self.map).values().filter_map(|entry| entry.notify.upgrade()) {
            notify.notify_waiters();
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = lock_map(&self.waiters.map);
        // Our reference goes first, under the mutex (two waiters of one key leaving at once
        // must not each see the other's reference and both keep the entry). `register`
        // upgrades under the same mutex, so a dead entry here has no waiter left.
        drop(self.notify.take());
        if map.get(&self.key).is_some_and(|entry| entry.notify.strong_count() == 0)
            && let Some(entry) = map.remove(&self.key)
            && entry.followed
        {
            self.waiters.change(&self.key, false);
        }
    }
}

/// How often channels wanted but not subscribed (a failed `SSUBSCRIBE`) are asked again.
const RESUBSCRIBE_EVERY: Duration = Duration::from_secs(1);

/// The release channels this process follows: those of the keys with local waiters that
/// found them held. One task applies the changes in the order they were made; what queued
/// up while it waited for Redis is coalesced (a key whose waiters came and went meanwhile
/// costs nothing). A subscription that failed is asked again every
/// [`RESUBSCRIBE_EVERY`] while it is wanted, and after a reconnection every wanted channel
/// is subscribed again (the server forgot them with the old connection) and every waiter
/// looks again (releases during the gap were not heard). The sets are bounded by the keys
/// with waiters, that is by the requests in flight.
///
/// The task does this itself rather than through fred's `manage_subscriptions`, whose
/// resubscription sends an empty `SUBSCRIBE` when only sharded channels are followed and
/// then takes Redis's error for the answer to its first `SSUBSCRIBE`, stopping there.
struct Subscriptions {
    subscriber: SubscriberClient,
    waiters: Waiters,
    /// Channels (by key) that should be subscribed now.
    wanted: HashSet<String>,
    /// Channels (by key) Redis confirmed on the current connection.
    current: HashSet<String>,
}

impl Subscriptions {
    async fn run(mut self, mut requested: mpsc::UnboundedReceiver<Change>) {
        let mut reconnections = self.subscriber.reconnect_rx();
        let mut retry = tokio::time::interval(RESUBSCRIBE_EVERY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut dirty: HashSet<String> = HashSet::new();
            tokio::select! {
                change = requested.recv() => {
                    let Some(change) = change else { break };
                    self.note(change, &mut dirty);
                    while let Ok(change) = requested.try_recv() {
                        self.note(change, &mut dirty);
                    }
                }
                reconnected = reconnections.recv() => {
                    if matches!(reconnected, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                        break;
                    }
                    self.current.clear();
                    dirty.extend(self.wanted.iter().cloned());
                    self.waiters.wake_all();
                }
                _ = retry.tick() => dirty.extend(self.wanted.difference(&self.current).cloned()),
            }
            for key in dirty {
                self.apply(key).await;
            }
            metrics::gauge!("lock_release_channels").set(self.current.len() as f64);
        }
    }

    fn note(&mut self, (key, want): Change, dirty: &mut HashSet<String>) {
        if want {
            self.wanted.insert(key.clone());
        } else {
            self.wanted.remove(&key);
        }
        dirty.insert(key);
    }

    async fn apply(&mut self, key: String) {
        let channel = release_channel(&key);
        match (self.wanted.contains(&key), self.current.contains(&key)) {
            (true, false) => match self.subscriber.ssubscribe(channel).await {
                Ok(()) => {
                    self.waiters.wake_key(&key);
                    self.current.insert(key);
                }
                // Its waiters still look again when the holder's lease ends or the fallback
                // poll passes; the channel is asked for again shortly.
                Err(error) => {
                    metrics::counter!("lock_release_subscribe_failures_total").increment(1);
                    tracing::debug!(%key, %error, "could not subscribe to a lock's release channel");
                }
            },
            (false, true) => {
                self.current.remove(&key);
                // A failure leaves at worst a subscription whose messages wake nobody; the
                // connection's next reconnection drops it.
                if let Err(error) = self.subscriber.sunsubscribe(channel).await {
                    tracing::debug!(%key, %error, "could not unsubscribe from a lock's release channel");
                }
            }
            _ => {}
        }
    }
}

pub(crate) fn fence_key(key: &LockKey) -> String {
    format!("{key}:fence")
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// Full jitter: uniformly in `0..=backoff`.
pub(crate) fn jitter(backoff: Duration) -> Duration {
    let nanos = u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

fn unavailable(error: fred::error::Error) -> LockError {
    LockError::Unavailable(anyhow::Error::new(error).context("Redis lock command failed"))
}

#[cfg(test)]
mod tests {
    use super::Waiters;

    /// Waiters of few keys registering and leaving at once, from several threads: the map
    /// must end empty. (Before the fix, two waiters of one key leaving together each saw
    /// the other's reference and both kept the dead entry.)
    #[test]
    fn the_waiter_map_is_empty_once_every_waiter_has_left() {
        const THREADS: usize = 4;
        const ROUNDS: usize = 50_000;
        let waiters = Waiters::default();
        let start = std::sync::Barrier::new(THREADS);
        std::thread::scope(|scope| {
            for thread in 0..THREADS {
                let (waiters, start) = (waiters.clone(), &start);
                scope.spawn(move || {
                    start.wait();
                    for round in 0..ROUNDS {
                        let key = ["a", "b"][(round + thread) % 2];
                        let first = waiters.register(key);
                        let second = waiters.register(key);
                        drop(first);
                        drop(second);
                    }
                });
            }
        });
        assert_eq!(waiters.len(), 0, "dead entries left in the waiter map");
    }
}
