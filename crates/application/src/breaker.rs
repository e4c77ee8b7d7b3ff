//! Degrade fast, recover by itself: a circuit breaker in front of Redis.
//!
//! While Redis is unreachable, every call to it waits out the command timeout (2 s by
//! default) before failing. The cache falls back to MySQL and writes fail closed anyway,
//! so those two seconds buy nothing. The breaker counts consecutive failures of one
//! dependency; after [`BreakerSettings::failures`] of them it **opens**: calls fail at once
//! with the dependency's "unavailable" error, without touching it (cache reads go straight
//! to MySQL; writes answer 503 at once). After [`BreakerSettings::cooldown`] it lets **one**
//! call through as a probe (half-open): a success closes it, a failure opens it for another
//! cooldown. No operator acts in either direction.
//!
//! [`BreakerCache`] and [`BreakerLock`] put one breaker each in front of the cache port and
//! the lock port. Only "unavailable" errors count as failures: a busy lock or a refused
//! store is Redis answering.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::cache::{CacheError, CacheKey, CachePort, CacheRead};
use crate::lock::{DistributedLock, LockError, LockGuard, LockKey, WaitPolicy};

/// The least time without a success before failures count as an outage: one stall that
/// times out every call in flight at once, right after successes, does not open a breaker.
const MIN_OUTAGE: Duration = Duration::from_secs(1);

/// When a breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// How long it stays open before one probe goes through.
    pub cooldown: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self { failures: 5, cooldown: Duration::from_secs(5) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    /// Calls fail at once until the instant; then one probe goes through.
    Open {
        until: Instant,
    },
    /// One probe is out since the instant; the others fail at once until it answers, or
    /// until a cooldown has passed (a probe caught in a long lock wait must not keep the
    /// breaker half-open for that long): then another probe goes.
    HalfOpen {
        since: Instant,
    },
}

/// One dependency's breaker.
pub struct Breaker {
    name: &'static str,
    settings: BreakerSettings,
    failures: AtomicU32,
    state: Mutex<State>,
    /// When a call last succeeded: a burst of failures within a moment of a success (one
    /// stall timing out every call in flight) is not yet an outage.
    last_success: Mutex<Instant>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker").field("name", &self.name).field("state", &self.state()).finish()
    }
}

/// What a call may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    Call,
    Probe,
    Refuse,
}

impl Breaker {
    #[must_use]
    pub fn new(name: &'static str, settings: BreakerSettings) -> Self {
        Self {
            name,
            settings,
            failures: AtomicU32::new(0),
            state: Mutex::new(State::Closed),
            last_success: Mutex::new(Instant::now()),
        }
    }

    fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the breaker is letting calls through now (closed).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.state() == State::Closed
    }

    fn admit(&self) -> Admit {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        match *state {
            State::Closed => Admit::Call,
            State::Open { until } if now >= until => {
                *state = State::HalfOpen { since: now };
                self.gauge(2.0);
                Admit::Probe
            }
            State::HalfOpen { since } if now >= since + self.settings.cooldown => {
                *state = State::HalfOpen { since: now };
                Admit::Probe
            }
            State::Open { .. } | State::HalfOpen { .. } => Admit::Refuse,
        }
    }

    fn succeeded(&self, admitted: Admit) {
        self.failures.store(0, Ordering::Relaxed);
        *self.last_success.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Instant::now();
        if admitted == Admit::Probe {
            *self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = State::Closed;
            self.gauge(0.0);
            tracing::info!(dependency = self.name, "circuit breaker closed: the dependency answers again");
        }
    }

    fn failed(&self, admitted: Admit) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let quiet = self.last_success.lock().unwrap_or_else(std::sync::PoisonError::into_inner).elapsed();
        let outage = failures >= self.settings.failures && quiet >= MIN_OUTAGE;
        if admitted != Admit::Probe && !outage {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match *state {
            // Already open: a late failure of a call that started before does not push the
            // probe back.
            State::Open { .. } => return,
            // Only the probe's own answer decides a half-open breaker.
            State::HalfOpen { .. } if admitted != Admit::Probe => return,
            State::HalfOpen { .. } => {}
            State::Closed => {
                tracing::warn!(
                    dependency = self.name,
                    failures,
                    cooldown_ms = u64::try_from(self.settings.cooldown.as_millis()).unwrap_or(u64::MAX),
                    "circuit breaker open: calls fail at once until a probe succeeds"
                );
                metrics::counter!("circuit_breaker_opened_total", "dependency" => self.name).increment(1);
            }
        }
        *state = State::Open { until: Instant::now() + self.settings.cooldown };
        self.gauge(1.0);
    }

    /// A call that did not count either way (the probe was cancelled, say): let another
    /// probe go.
    fn abandoned(&self, admitted: Admit) {
        if admitted == Admit::Probe {
            let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if matches!(*state, State::HalfOpen { .. }) {
                *state = State::Open { until: Instant::now() };
                self.gauge(1.0);
            }
        }
    }

    fn gauge(&self, value: f64) {
        metrics::gauge!("circuit_breaker_state", "dependency" => self.name).set(value);
    }

    /// Runs `call` through the breaker. `is_outage` says which errors count as the
    /// dependency failing; `refused` is the error of a call refused at once.
    async fn run<T, E>(
        &self,
        call: impl Future<Output = Result<T, E>>,
        is_outage: impl Fn(&E) -> bool,
        refused: impl FnOnce() -> E,
    ) -> Result<T, E> {
        let admitted = self.admit();
        if admitted == Admit::Refuse {
            metrics::counter!("circuit_breaker_refused_total", "dependency" => self.name).increment(1);
            return Err(refused());
        }
        let mut guard = Pending { breaker: self, admitted, settled: false };
        let result = call.await;
        match &result {
            Err(error) if is_outage(error) => self.failed(admitted),
            _ => self.succeeded(admitted),
        }
        guard.settled = true;
        result
    }
}

/// Gives a cancelled probe back (see [`Breaker::abandoned`]).
struct Pending<'a> {
    breaker: &'a Breaker,
    admitted: Admit,
    settled: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.abandoned(self.admitted);
        }
    }
}

fn cache_refused() -> CacheError {
    CacheError::Unavailable(anyhow::anyhow!("the cache's circuit breaker is open (Redis failed repeatedly)"))
}

fn cache_outage(error: &CacheError) -> bool {
    matches!(error, CacheError::Unavailable(_))
}

/// The cache port behind a breaker.
pub struct BreakerCache<P> {
    inner: P,
    breaker: Breaker,
}

impl<P> fmt::Debug for BreakerCache<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerCache").field("breaker", &self.breaker).finish_non_exhaustive()
    }
}

impl<P> BreakerCache<P> {
    #[must_use]
    pub fn new(inner: P, settings: BreakerSettings) -> Self {
        Self { inner, breaker: Breaker::new("cache", settings) }
    }
}

#[async_trait]
impl<P: CachePort> CachePort for BreakerCache<P> {
    async fn read(&self, key: &CacheKey, known: Option<u64>) -> Result<CacheRead, CacheError> {
        self.breaker.run(self.inner.read(key, known), cache_outage, cache_refused).await
    }

    async fn store(
        &self,
        key: &CacheKey,
        version: u64,
        json: String,
        ttl: Duration,
    ) -> Result<Option<u64>, CacheError> {
        self.breaker.run(self.inner.store(key, version, json, ttl), cache_outage, cache_refused).await
    }

    async fn begin_write(&self, key: &CacheKey, token: u64, ttl: Duration) -> Result<(), CacheError> {
        self.breaker.run(self.inner.begin_write(key, token, ttl), cache_outage, cache_refused).await
    }

    async fn end_write(&self, key: &CacheKey, token: u64) -> Result<(), CacheError> {
        // Lifting a mark is tried whatever the breaker says: a mark left standing only
        // sends reads to MySQL until its TTL, but lifting it early is what every caller
        // wants once Redis answers.
        self.inner.end_write(key, token).await
    }

    async fn claim_load(&self, key: &CacheKey, token: u64, ttl: Duration) -> Result<bool, CacheError> {
        self.breaker.run(self.inner.claim_load(key, token, ttl), cache_outage, cache_refused).await
    }

    async fn release_load(&self, key: &CacheKey, token: u64) -> Result<(), CacheError> {
        // Through the breaker: a claim that was refused at once was never taken, and its
        // give-back must not wait out the command timeout either.
        self.breaker.run(self.inner.release_load(key, token), cache_outage, cache_refused).await
    }
}

/// The lock port behind a breaker: while Redis is down, a write is refused (503) at once
/// instead of after the command timeout. Guards already handed out are not touched.
pub struct BreakerLock<L> {
    inner: L,
    breaker: Breaker,
}

impl<L> fmt::Debug for BreakerLock<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerLock").field("breaker", &self.breaker).finish_non_exhaustive()
    }
}

impl<L> BreakerLock<L> {
    #[must_use]
    pub fn new(inner: L, settings: BreakerSettings) -> Self {
        Self { inner, breaker: Breaker::new("lock", settings) }
    }
}

#[async_trait]
impl<L: DistributedLock> DistributedLock for BreakerLock<L> {
    async fn acquire(&self, key: &LockKey, wait: WaitPolicy) -> Result<Box<dyn LockGuard>, LockError> {
        self.breaker
            .run(
                self.inner.acquire(key, wait),
                |error| matches!(error, LockError::Unavailable(_)),
                || {
                    LockError::Unavailable(anyhow::anyhow!(
                        "the lock's circuit breaker is open (Redis failed repeatedly)"
                    ))
                },
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::cache::MockCachePort;

    fn key() -> CacheKey {
        CacheKey::new("seats", "s1")
    }

    /// A cache port whose reads fail while `down` is set, counting the calls that reach it.
    fn port(down: Arc<std::sync::atomic::AtomicBool>, calls: Arc<AtomicUsize>) -> MockCachePort {
        let mut port = MockCachePort::new();
        port.expect_read().returning(move |_, _| {
            calls.fetch_add(1, Ordering::SeqCst);
            if down.load(Ordering::SeqCst) {
                Err(CacheError::Unavailable(anyhow::anyhow!("connection refused")))
            } else {
                Ok(CacheRead::Missing { version: 0 })
            }
        });
        port
    }

    #[tokio::test(start_paused = true)]
    async fn it_opens_after_consecutive_failures_refuses_at_once_then_probes_and_closes_by_itself() {
        let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let calls = Arc::new(AtomicUsize::new(0));
        let settings = BreakerSettings { failures: 3, cooldown: Duration::from_secs(5) };
        let cache = BreakerCache::new(port(Arc::clone(&down), Arc::clone(&calls)), settings);

        // Failures within a second of the last success (a stall) do not open it yet.
        for _ in 0..3 {
            assert!(cache.read(&key(), None).await.is_err());
        }
        assert!(cache.breaker.is_closed(), "a burst right after a success is not an outage");
        calls.store(0, Ordering::SeqCst);
        cache.breaker.failures.store(0, Ordering::SeqCst);
        tokio::time::advance(MIN_OUTAGE).await;
        for _ in 0..3 {
            assert!(cache.read(&key(), None).await.is_err());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(!cache.breaker.is_closed(), "open after 3 failures in a row");
        // Open: refused without a call.
        for _ in 0..10 {
            assert!(matches!(cache.read(&key(), None).await, Err(CacheError::Unavailable(_))));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3, "no call reached Redis while open");

        // After the cooldown one probe goes; it fails: open again for another cooldown.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(cache.read(&key(), None).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert!(cache.read(&key(), None).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4, "open again");

        // Redis is back: the next probe closes it, and calls flow.
        down.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(cache.read(&key(), None).await.is_ok());
        assert!(cache.breaker.is_closed());
        assert!(cache.read(&key(), None).await.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_between_failures_keeps_it_closed_and_answers_that_are_not_outages_do_not_count() {
        let breaker = Breaker::new("t", BreakerSettings { failures: 2, cooldown: Duration::from_secs(1) });
        tokio::time::advance(MIN_OUTAGE).await;
        let outage = || async { Err::<(), LockError>(LockError::Unavailable(anyhow::anyhow!("down"))) };
        let busy = || async { Err::<(), LockError>(LockError::Busy { key: LockKey::new("t", "k") }) };
        let is_outage = |e: &LockError| matches!(e, LockError::Unavailable(_));
        let refused = || LockError::Unavailable(anyhow::anyhow!("open"));

        assert!(breaker.run(outage(), is_outage, refused).await.is_err());
        assert!(breaker.run(async { Ok::<(), LockError>(()) }, is_outage, refused).await.is_ok());
        assert!(breaker.run(outage(), is_outage, refused).await.is_err());
        assert!(breaker.is_closed(), "the success reset the count");
        tokio::time::advance(MIN_OUTAGE).await;
        for _ in 0..5 {
            assert!(breaker.run(busy(), is_outage, refused).await.is_err());
        }
        assert!(breaker.is_closed(), "a busy lock is Redis answering (and resets the count)");
        tokio::time::advance(MIN_OUTAGE).await;
        assert!(breaker.run(outage(), is_outage, refused).await.is_err());
        assert!(breaker.is_closed());
        assert!(breaker.run(outage(), is_outage, refused).await.is_err());
        assert!(!breaker.is_closed(), "two outages in a row");
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_caught_in_a_long_wait_does_not_keep_the_breaker_half_open() {
        let breaker = Breaker::new("t", BreakerSettings { failures: 1, cooldown: Duration::from_secs(1) });
        tokio::time::advance(MIN_OUTAGE).await;
        let is_outage = |_: &()| true;
        assert!(breaker.run(async { Err::<(), ()>(()) }, is_outage, || ()).await.is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        // The probe waits (a lock held by someone else, say); meanwhile calls are refused...
        let slow = breaker.run(
            async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok::<(), ()>(())
            },
            is_outage,
            || (),
        );
        let mut slow = Box::pin(slow);
        assert!(futures::poll!(&mut slow).is_pending());
        assert!(
            breaker.run(async { Ok::<(), ()>(()) }, is_outage, || ()).await.is_err(),
            "refused while probing"
        );
        // ...but only for a cooldown: then another probe goes, and closes it.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(breaker.run(async { Ok::<(), ()>(()) }, is_outage, || ()).await.is_ok());
        assert!(breaker.is_closed());
        drop(slow);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_lets_another_probe_go() {
        let breaker = Breaker::new("t", BreakerSettings { failures: 1, cooldown: Duration::from_secs(1) });
        tokio::time::advance(MIN_OUTAGE).await;
        let is_outage = |_: &()| true;
        assert!(breaker.run(async { Err::<(), ()>(()) }, is_outage, || ()).await.is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        // The probe is dropped before it answers.
        let probe = breaker.run(std::future::pending::<Result<(), ()>>(), is_outage, || ());
        assert!(tokio::time::timeout(Duration::from_millis(10), probe).await.is_err());
        // Not stuck half-open: the next call is a probe, and it closes the breaker.
        assert!(breaker.run(async { Ok::<(), ()>(()) }, is_outage, || ()).await.is_ok());
        assert!(breaker.is_closed());
    }
}
