//! What can go wrong below a use case, the same for every use case.
//!
//! A use case's error enum names its own business outcomes (not found, sold out, ...) and
//! wraps one [`Failure`] for everything the infrastructure can do to it, so the meaning of
//! "the lock was busy", "the lock was lost" or "Redis is down" is decided here once, and
//! the HTTP layer maps [`Failure`] to a status once.
//!
//! **A lost lock means one thing everywhere**: the lease ran out before the commit (the
//! lock store was unreachable for a whole lease, or this process was paused that long), so
//! the work was rolled back and nothing changed. That is an infrastructure fault, not
//! contention: it is [`Failure::LeaseLost`], answered like an unavailable lock store (503
//! with `Retry-After`), whatever the use case.

use std::fmt;

use domain::unit_of_work::TxError;

use crate::cache::CacheError;
use crate::lock::{LockError, LockKey};

/// A dependency that failed closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// The lock store: no lock, no write.
    LockStore,
    /// The cache, for a write that must mark the answers it changes before committing.
    Cache,
    /// The coupon gate (Redis), which decides every issue: no decision, no coupon.
    CouponGate,
    /// This process's room for writes in flight ([`crate::detach::MAX_IN_FLIGHT`]).
    WriteCapacity,
    /// This process is stopping: it takes no new write ([`crate::detach::drain`]).
    ShuttingDown,
}

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::LockStore => "lock service",
            Self::Cache => "cache service",
            Self::CouponGate => "coupon service",
            Self::WriteCapacity => "room for more concurrent writes",
            Self::ShuttingDown => "instance (shutting down)",
        })
    }
}

/// An infrastructure failure. On every one of them nothing was changed, except
/// [`Failure::Unexpected`] whose cause chain may say the commit's outcome is unknown
/// (`domain::unavailable::is_outcome_unknown`).
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The lock stayed held by another holder: at once for a fail-fast lock, or for the
    /// whole wait. The client may retry shortly.
    #[error("{0} is held by another request")]
    Contended(LockKey),
    /// The lease on the lock ran out before the commit; the work was rolled back.
    #[error("the lease on {0} ran out before the commit; nothing was changed")]
    LeaseLost(LockKey),
    /// A dependency that fails closed cannot be reached.
    #[error("the {what} is unavailable")]
    Unavailable {
        what: Dependency,
        #[source]
        source: anyhow::Error,
    },
    /// Anything else: the database (whose cause chain says whether a retry may succeed),
    /// or a broken invariant.
    #[error(transparent)]
    Unexpected(anyhow::Error),
}

impl Failure {
    /// The key of a lock that was busy, if that is what this is.
    #[must_use]
    pub const fn contended(&self) -> Option<&LockKey> {
        match self {
            Self::Contended(key) => Some(key),
            _ => None,
        }
    }
}

impl Failure {
    /// The same failure once more, for another caller of one piece of work that several
    /// callers share (a batch of charges, see `charge_points`): the same variant, so the same
    /// HTTP meaning. An underlying error cannot be cloned, so its cause chain is kept as
    /// text, with what the answer depends on: whether a commit's outcome is unknown, or a
    /// store was unavailable.
    #[must_use]
    pub fn for_another_caller(&self) -> Self {
        match self {
            Self::Contended(key) => Self::Contended(key.clone()),
            Self::LeaseLost(key) => Self::LeaseLost(key.clone()),
            Self::Unavailable { what, source } => {
                Self::Unavailable { what: *what, source: anyhow::anyhow!("{source:#}") }
            }
            Self::Unexpected(error) => Self::Unexpected(retold(error)),
        }
    }
}

/// `error`'s text, as an error of the same kind to [`domain::unavailable`]: what one
/// failure tells each of the callers that shared it.
pub(crate) fn retold(error: &anyhow::Error) -> anyhow::Error {
    let text: Box<dyn std::error::Error + Send + Sync> = format!("{error:#}").into();
    if domain::unavailable::is_outcome_unknown(error) {
        anyhow::Error::new(domain::unavailable::OutcomeUnknown { source: text })
    } else if let Some(reason) = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<domain::unavailable::Unavailable>())
        .map(|u| u.reason)
    {
        anyhow::Error::new(domain::unavailable::Unavailable { reason, source: text })
    } else {
        anyhow::Error::msg(text)
    }
}

impl From<LockError> for Failure {
    fn from(error: LockError) -> Self {
        match error {
            LockError::Busy { key } | LockError::Timeout { key, .. } => Self::Contended(key),
            LockError::LeaseLost { key } => Self::LeaseLost(key),
            LockError::Unavailable(source) => Self::Unavailable { what: Dependency::LockStore, source },
        }
    }
}

impl From<TxError> for Failure {
    fn from(error: TxError) -> Self {
        Self::Unexpected(anyhow::Error::new(error).context("transaction failed"))
    }
}

impl From<CacheError> for Failure {
    fn from(error: CacheError) -> Self {
        Self::Unavailable { what: Dependency::Cache, source: anyhow::Error::new(error) }
    }
}

/// What a failed point-account write means to any use case that makes one (charge, pay):
/// a write fenced out by a later holder of the account's lock is a lost lease (this one's
/// ran out under it, a pause, and the database refused the write; nothing changed);
/// anything else is unexpected, with `what` as its context.
pub(crate) fn point_write(error: domain::point::PointRepositoryError, what: &'static str) -> Failure {
    match error {
        domain::point::PointRepositoryError::Fenced { user_id, refused, stored } => {
            tracing::warn!(%user_id, refused, stored, "a write under a lost point lock was fenced out");
            Failure::LeaseLost(LockKey::point(user_id))
        }
        other => anyhow::Error::new(other).context(what).into(),
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self::Unexpected(error)
    }
}

/// Gives a use-case error enum with a `Failure(Failure)` variant the conversions its
/// code needs for `?`: from [`Failure`] and from everything a [`Failure`] is made of.
/// Written once here instead of a copy per use case.
#[macro_export]
macro_rules! failure_conversions {
    ($error:ty) => {
        impl From<$crate::failure::Failure> for $error {
            fn from(failure: $crate::failure::Failure) -> Self {
                Self::Failure(failure)
            }
        }
        impl From<$crate::lock::LockError> for $error {
            fn from(error: $crate::lock::LockError) -> Self {
                Self::Failure(error.into())
            }
        }
        impl From<$crate::cache::CacheError> for $error {
            fn from(error: $crate::cache::CacheError) -> Self {
                Self::Failure(error.into())
            }
        }
        impl From<$crate::domain::unit_of_work::TxError> for $error {
            fn from(error: $crate::domain::unit_of_work::TxError) -> Self {
                Self::Failure(error.into())
            }
        }
        impl From<anyhow::Error> for $error {
            fn from(error: anyhow::Error) -> Self {
                Self::Failure($crate::failure::Failure::Unexpected(error))
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_failure_told_to_another_caller_keeps_its_meaning() {
        let key = LockKey::new("point", "u");
        assert!(
            matches!(Failure::Contended(key.clone()).for_another_caller(), Failure::Contended(k) if k == key)
        );
        assert!(
            matches!(Failure::LeaseLost(key.clone()).for_another_caller(), Failure::LeaseLost(k) if k == key)
        );
        let unavailable =
            Failure::Unavailable { what: Dependency::LockStore, source: anyhow::anyhow!("down") };
        assert!(matches!(
            unavailable.for_another_caller(),
            Failure::Unavailable { what: Dependency::LockStore, source } if source.to_string() == "down"
        ));
        let io = || Box::new(std::io::Error::other("reset"));
        let unknown =
            anyhow::Error::new(domain::unavailable::OutcomeUnknown { source: io() }).context("commit");
        let Failure::Unexpected(told) = Failure::Unexpected(unknown).for_another_caller() else { panic!() };
        assert!(domain::unavailable::is_outcome_unknown(&told), "{told:#}");
        let down =
            anyhow::Error::new(domain::unavailable::Unavailable { reason: "unreachable", source: io() });
        let Failure::Unexpected(told) = Failure::Unexpected(down).for_another_caller() else { panic!() };
        assert!(
            domain::unavailable::is_unavailable(&told) && !domain::unavailable::is_outcome_unknown(&told)
        );
        let Failure::Unexpected(told) = Failure::Unexpected(anyhow::anyhow!("a bug")).for_another_caller()
        else {
            panic!()
        };
        assert!(!domain::unavailable::is_unavailable(&told) && told.to_string() == "a bug");
    }

    #[test]
    fn a_lost_lease_is_not_contention_whatever_the_lock() {
        let key = LockKey::new("point", "u");
        assert!(matches!(Failure::from(LockError::LeaseLost { key: key.clone() }), Failure::LeaseLost(_)));
        assert!(matches!(Failure::from(LockError::Busy { key: key.clone() }), Failure::Contended(_)));
        assert!(matches!(
            Failure::from(LockError::Timeout { key, waited: Duration::from_secs(1) }),
            Failure::Contended(_)
        ));
        assert!(matches!(
            Failure::from(LockError::Unavailable(anyhow::anyhow!("down"))),
            Failure::Unavailable { what: Dependency::LockStore, .. }
        ));
    }
}
