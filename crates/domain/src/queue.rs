//! The waiting queue: tokens that give a user a place in line, then a limited time to book.
//!
//! A token is WAITING from the moment it is issued until the admission step lets it in;
//! then it is ACTIVE until its active lifetime runs out or a payment ends it. A waiting
//! token whose holder stopped asking about it (no status call, no open event stream) for
//! the idle timeout is abandoned and leaves the line, so an idle line does not grow for
//! ever. Each user has at most one live token; asking again gives the same one back.

use std::fmt;
use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::user::UserId;

/// A queue token's id: a UUID v7, made by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueTokenId(Uuid);

/// A `Queue-Token` that is not a UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a queue token is a UUID")]
pub struct MalformedQueueToken;

impl QueueTokenId {
    /// A fresh, time-ordered id.
    #[must_use]
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    #[must_use]
    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    /// Reads a token as a client sends it.
    ///
    /// # Errors
    /// [`MalformedQueueToken`] when `raw` is not a UUID.
    pub fn parse(raw: &str) -> Result<Self, MalformedQueueToken> {
        Uuid::try_parse(raw.trim()).map(Self).map_err(|_| MalformedQueueToken)
    }

    #[must_use]
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for QueueTokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a token stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueStatus {
    /// In line, not yet admitted.
    Waiting,
    /// Admitted: may use the booking routes until it expires.
    Active,
}

impl QueueStatus {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "WAITING",
            Self::Active => "ACTIVE",
        }
    }
}

/// What the queue knows of a live token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenState {
    pub token: QueueTokenId,
    pub user_id: UserId,
    pub status: QueueStatus,
    /// 1-based place among waiting tokens; `None` once active.
    pub position: Option<u64>,
    /// When an active token stops being valid; `None` while waiting.
    pub expires_at: Option<OffsetDateTime>,
    /// Tokens admitted per second, as observed over the recent window (0 when none were).
    pub admissions_per_second: f64,
}

impl TokenState {
    /// How long until this token is likely admitted: its position over the admission rate
    /// actually observed, rounded up. `None` when active, or when nobody was admitted
    /// recently (no honest estimate can be made).
    #[must_use]
    pub fn estimated_wait(&self) -> Option<Duration> {
        let position = self.position?;
        if !(self.admissions_per_second.is_finite() && self.admissions_per_second > 0.0) {
            return None;
        }
        #[allow(clippy::cast_precision_loss, reason = "positions far below 2^52")]
        let seconds = (position as f64 / self.admissions_per_second).ceil();
        Some(Duration::from_secs_f64(seconds.min(86_400.0 * 365.0)))
    }
}

/// How the admission step lets tokens in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitPolicy {
    /// Keep up to `max_active` tokens active: each step fills the free places, oldest first.
    MaxActive { max_active: u64 },
    /// Admit up to `batch` tokens per `interval` (once per interval, whichever instance runs
    /// the step first), never past `max_active`.
    Rate { batch: u64, interval: Duration, max_active: u64 },
}

impl AdmitPolicy {
    #[must_use]
    pub const fn max_active(&self) -> u64 {
        match *self {
            Self::MaxActive { max_active } | Self::Rate { max_active, .. } => max_active,
        }
    }
}

/// What one admission step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Admission {
    /// Tokens admitted by this step.
    pub admitted: u64,
    /// Active tokens after it.
    pub active: u64,
    /// Waiting tokens after it.
    pub waiting: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting_at(position: u64, rate: f64) -> TokenState {
        TokenState {
            token: QueueTokenId::generate(),
            user_id: UserId::generate(),
            status: QueueStatus::Waiting,
            position: Some(position),
            expires_at: None,
            admissions_per_second: rate,
        }
    }

    #[test]
    fn the_wait_is_the_position_over_the_observed_rate_rounded_up() {
        assert_eq!(waiting_at(10, 4.0).estimated_wait(), Some(Duration::from_secs(3)));
        assert_eq!(waiting_at(8, 4.0).estimated_wait(), Some(Duration::from_secs(2)));
        assert_eq!(waiting_at(1, 1000.0).estimated_wait(), Some(Duration::from_secs(1)));
    }

    #[test]
    fn no_estimate_without_an_observed_rate_or_once_active() {
        assert_eq!(waiting_at(10, 0.0).estimated_wait(), None);
        assert_eq!(waiting_at(10, f64::NAN).estimated_wait(), None);
        let mut active = waiting_at(1, 5.0);
        active.status = QueueStatus::Active;
        active.position = None;
        assert_eq!(active.estimated_wait(), None);
    }

    #[test]
    fn a_token_is_a_uuid() {
        let id = QueueTokenId::generate();
        assert_eq!(QueueTokenId::parse(&id.to_string()), Ok(id));
        assert_eq!(QueueTokenId::parse("nope"), Err(MalformedQueueToken));
        assert_eq!(QueueTokenId::parse(""), Err(MalformedQueueToken));
    }
}
