//! The distributed lock port.
//!
//! A lock is named by a [`LockKey`] (`lock:{kind}:{id}`, named after the *resource*, never
//! the operation, so that a charge and a payment of one user exclude each other). It is
//! held under a *lease*: if the holder stops renewing (crash, long pause) the lock frees
//! itself when the lease runs out, so a crashed instance never blocks a key for ever. The
//! price of that is that a paused holder can lose the lock while it still believes it holds
//! it; the lock therefore hands out a [`FencingToken`] per acquisition, the guard reports a
//! lost lease, and every write is also guarded in SQL. See `docs/locking.md`.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;

/// The name of a lock: `lock:{kind}:{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LockKey {
    kind: &'static str,
    key: String,
}

impl LockKey {
    /// A key for resource `id` of family `kind` (a short, fixed word: it labels metrics).
    #[must_use]
    pub fn new(kind: &'static str, id: impl fmt::Display) -> Self {
        Self { kind, key: format!("lock:{kind}:{id}") }
    }

    /// `lock:point:{userId}`: every change to one user's balance (charge, payment).
    #[must_use]
    pub fn point(user_id: domain::user::UserId) -> Self {
        Self::new("point", user_id)
    }

    /// The whole key, as stored.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// The family (`point`, `seat`, ...), bounded in number, for metric labels.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        self.kind
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

/// What to do when the lock is held by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitPolicy {
    /// Give up at once with [`LockError::Busy`]: right when another holder means "someone
    /// else is taking this" (a seat).
    FailFast,
    /// Wait up to this long, then give up with [`LockError::Timeout`]: right when holders
    /// are brief and every request should get its turn (a balance). How the adapter waits
    /// (polling, or woken on release) is its own configuration.
    WaitUpTo(Duration),
}

/// A number that strictly increases with every acquisition of one key. A storage write
/// that carries it can refuse a holder older than one it already saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

/// A lock shared by every instance of the service.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait DistributedLock: Send + Sync {
    /// Acquires `key` under `wait`.
    ///
    /// The lock is held under a lease that the implementation renews while the guard lives.
    /// **When a lease runs out** (renewal failed: the store was unreachable for a whole
    /// lease, or the process was paused that long), another caller may acquire the key; the
    /// old guard then reports [`LockGuard::is_lost`] and its [`LockGuard::lease_lost`]
    /// future resolves, and its release is a no-op that never removes the new holder's lock.
    ///
    /// # Errors
    /// - [`LockError::Busy`]: held by another holder and `wait` is `FailFast`;
    /// - [`LockError::Timeout`]: still held when the wait ran out;
    /// - [`LockError::Unavailable`]: the lock store cannot be reached. Locks fail closed:
    ///   no lock, no write.
    async fn acquire(&self, key: &LockKey, wait: WaitPolicy) -> Result<Box<dyn LockGuard>, LockError>;
}

/// Proof of holding a lock.
///
/// Dropping a guard without calling [`LockGuard::release`] (a panic, a cancelled request)
/// still releases the lock, in the background; the lease bounds the rest.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait LockGuard: Send + Sync + std::fmt::Debug {
    fn key(&self) -> &LockKey;

    /// This acquisition's fencing number.
    fn fencing_token(&self) -> FencingToken;

    /// True once the lease is known to have run out; the lock may now be someone else's.
    fn is_lost(&self) -> bool;

    /// Resolves when the lease is lost (never, if it is released in time).
    fn lease_lost(&self) -> BoxFuture<'static, ()>;

    /// Releases the lock, if it is still ours.
    ///
    /// # Errors
    /// - [`LockError::LeaseLost`]: the lease had run out; the key was left alone;
    /// - [`LockError::Unavailable`]: the store cannot be reached; the lease frees the key.
    async fn release(self: Box<Self>) -> Result<(), LockError>;
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{key} is held by another holder")]
    Busy { key: LockKey },
    #[error("{key} was still held after waiting {waited:?}")]
    Timeout { key: LockKey, waited: Duration },
    #[error("the lease on {key} ran out before the work was done")]
    LeaseLost { key: LockKey },
    #[error("the lock store is unavailable")]
    Unavailable(#[source] anyhow::Error),
}

/// A lock that never excludes anyone. Only for proving that the SQL guards alone keep
/// every write exact (tests, and the server's `DISABLE_LOCKS_FOR_TESTING`); never for
/// production, where it would turn every race into database contention.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLock;

#[derive(Debug)]
struct NoGuard(LockKey);

#[async_trait]
impl DistributedLock for NoLock {
    async fn acquire(&self, key: &LockKey, _wait: WaitPolicy) -> Result<Box<dyn LockGuard>, LockError> {
        Ok(Box::new(NoGuard(key.clone())))
    }
}

#[async_trait]
impl LockGuard for NoGuard {
    fn key(&self) -> &LockKey {
        &self.0
    }

    fn fencing_token(&self) -> FencingToken {
        FencingToken(0)
    }

    fn is_lost(&self) -> bool {
        false
    }

    fn lease_lost(&self) -> BoxFuture<'static, ()> {
        Box::pin(std::future::pending())
    }

    async fn release(self: Box<Self>) -> Result<(), LockError> {
        Ok(())
    }
}
