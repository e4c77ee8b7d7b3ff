//! The distributed lock port.
//!
//! A lock is named by a [`LockKey`] (`lock:{kind:id}`, named after the *resource*, never
//! the operation, so that a charge and a payment of one user exclude each other). It is
//! held under a *lease*: if the holder stops renewing (crash, long pause) the lock frees
//! itself when the lease runs out, so a crashed instance never blocks a key for ever. The
//! price of that is that a paused holder can lose the lock while it still believes it holds
//! it; the lock therefore hands out a [`FencingToken`] per acquisition of a key whose
//! writes are checked against one (a *fenced* key), the guard reports a lost lease, and
//! every write is also guarded in SQL. See `docs/locking.md`.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;

/// The name of a lock: `lock:{<kind>:<id>}`.
///
/// Every key the service locks is made here, by one constructor per resource, so that
/// the key shapes (and which of them carry a fencing number) are written once:
///
/// | key | guards | fenced |
/// |---|---|---|
/// | `lock:{point:<userId>}` | every change to one balance (charge, payment) | yes |
/// | `lock:{seat:<scheduleId>:<seatNumber>}` | hold, cancel, expiry of one seat | yes |
/// | `lock:{reservation:<reservationId>}` | one payment of a hold at a time | no |
/// | `lock:{idem:<userId>:<keyHash>}` | one run of an idempotency key at a time | no |
///
/// The braces are a Redis Cluster *hash tag*: only the part inside them picks the key's
/// slot, so the lock key and what the lock store keeps beside it (the fencing counter
/// `<key>:fence`, the release channel `<key>:released`) live in one slot, which a script
/// touching them together needs, while different resources spread over the cluster.
///
/// A *fenced* key hands out a [`FencingToken`] per acquisition because writes made under
/// it are (or will be) checked against it in SQL; the others carry none, so the lock store
/// keeps no counter for them (a client sending a new idempotency key per request must not
/// be able to grow it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LockKey {
    kind: &'static str,
    key: String,
    fenced: bool,
}

impl LockKey {
    /// An unfenced key for resource `id` of family `kind` (a short, fixed word: it labels
    /// metrics).
    #[must_use]
    pub fn new(kind: &'static str, id: impl fmt::Display) -> Self {
        Self { kind, key: format!("lock:{{{kind}:{id}}}"), fenced: false }
    }

    /// A key whose acquisitions carry a [`FencingToken`].
    #[must_use]
    pub fn fenced(kind: &'static str, id: impl fmt::Display) -> Self {
        Self { fenced: true, ..Self::new(kind, id) }
    }

    /// `lock:{point:<userId>}`: every change to one user's balance (charge, payment).
    #[must_use]
    pub fn point(user_id: domain::user::UserId) -> Self {
        Self::fenced("point", user_id)
    }

    /// `lock:{seat:<scheduleId>:<seatNumber>}`: holds, cancels and expiries of one seat.
    #[must_use]
    pub fn seat(schedule_id: domain::booking::ScheduleId, seat: domain::booking::SeatNumber) -> Self {
        Self::fenced("seat", format_args!("{schedule_id}:{seat}"))
    }

    /// `lock:{reservation:<reservationId>}`: one payment of a hold at a time. Unfenced: the
    /// payment's writes are made under the point lock, which is.
    #[must_use]
    pub fn reservation(id: domain::booking::ReservationId) -> Self {
        Self::new("reservation", id)
    }

    /// `lock:{idem:<userId>:<keyHash>}`: one run of an idempotency key at a time. Unfenced:
    /// the record's primary key is what keeps two runs apart in SQL.
    #[must_use]
    pub fn idempotency(user_id: domain::user::UserId, key_hash: &str) -> Self {
        Self::new("idem", format_args!("{user_id}:{key_hash}"))
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

    /// Whether acquisitions of this key carry a [`FencingToken`].
    #[must_use]
    pub const fn is_fenced(&self) -> bool {
        self.fenced
    }
}

/// A lock to take, and how long to wait for it: what [`crate::tx::locked_tx`] is given,
/// in the order the locks are taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRequest {
    pub key: LockKey,
    pub wait: WaitPolicy,
}

impl LockRequest {
    #[must_use]
    pub const fn fail_fast(key: LockKey) -> Self {
        Self { key, wait: WaitPolicy::FailFast }
    }

    #[must_use]
    pub const fn wait_up_to(key: LockKey, limit: Duration) -> Self {
        Self { key, wait: WaitPolicy::WaitUpTo(limit) }
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

/// A number that strictly increases with every acquisition of one fenced key. A storage
/// write that carries it can refuse a holder older than one it already saw.
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

    /// This acquisition's fencing number; `None` for an unfenced key
    /// ([`LockKey::is_fenced`]).
    fn fencing_token(&self) -> Option<FencingToken>;

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

    fn fencing_token(&self) -> Option<FencingToken> {
        None
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
