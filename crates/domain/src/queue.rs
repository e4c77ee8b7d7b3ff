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

    /// The most tokens one admission step admits (fewer when the line is shorter): the
    /// free places under `max_active`, at most `step_cap`; under [`AdmitPolicy::Rate`],
    /// also at most `batch`, and none unless a batch is due ([`next_batch_mark`]).
    ///
    /// This is the one statement of the policies' arithmetic. `active` and `batch_due` must
    /// be read inside the step's atomic section (other instances change them between
    /// steps), so a store that decides there mirrors this function instead of calling it:
    /// the Redis admission script (`crates/adapters-redis/src/lua/queue_admit.lua`) does,
    /// and must be changed with it.
    #[must_use]
    pub fn to_admit(&self, active: u64, batch_due: bool, step_cap: u64) -> u64 {
        let room = self.max_active().saturating_sub(active).min(step_cap);
        match *self {
            Self::MaxActive { .. } => room,
            Self::Rate { batch, .. } if batch_due => room.min(batch),
            Self::Rate { .. } => 0,
        }
    }
}

/// The cadence of [`AdmitPolicy::Rate`]: one batch per interval, whichever instance's step
/// comes first. `last_ms` is the mark of the last batch, `now_ms` the store's clock.
///
/// `Some(new mark)` when a batch is due (at least `interval_ms`, taken as at least 1, since
/// the mark); `None` otherwise. The mark advances by whole intervals, so batches keep their
/// cadence however the steps' timing jitters, and a long pause skips intervals instead of
/// piling up batches. A due batch moves the mark even when the cap leaves no room for it.
///
/// Mirrored, like [`AdmitPolicy::to_admit`], by the Redis admission script.
#[must_use]
pub fn next_batch_mark(last_ms: i64, now_ms: i64, interval_ms: i64) -> Option<i64> {
    let interval = interval_ms.max(1);
    if now_ms < last_ms.saturating_add(interval) {
        return None;
    }
    Some(last_ms + interval * ((now_ms - last_ms) / interval))
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
    fn max_active_fills_the_free_places_up_to_the_step_cap() {
        let policy = AdmitPolicy::MaxActive { max_active: 10 };
        assert_eq!(policy.to_admit(0, false, 5_000), 10);
        assert_eq!(policy.to_admit(7, false, 5_000), 3);
        assert_eq!(policy.to_admit(10, false, 5_000), 0);
        assert_eq!(policy.to_admit(12, false, 5_000), 0, "over the cap (it was lowered): none");
        assert_eq!(policy.to_admit(0, true, 4), 4, "the step cap; the rest next step");
        assert_eq!(AdmitPolicy::MaxActive { max_active: 0 }.to_admit(0, false, 5_000), 0);
    }

    #[test]
    fn rate_admits_one_batch_when_due_never_past_the_cap() {
        let policy = AdmitPolicy::Rate { batch: 3, interval: Duration::from_secs(1), max_active: 10 };
        assert_eq!(policy.to_admit(0, true, 5_000), 3);
        assert_eq!(policy.to_admit(0, false, 5_000), 0, "not due: none, whatever the room");
        assert_eq!(policy.to_admit(8, true, 5_000), 2, "the cap first");
        assert_eq!(policy.to_admit(10, true, 5_000), 0);
        assert_eq!(policy.to_admit(11, true, 5_000), 0);
        assert_eq!(policy.to_admit(0, true, 2), 2, "the step cap");
        let zero = AdmitPolicy::Rate { batch: 0, interval: Duration::from_secs(1), max_active: 10 };
        assert_eq!(zero.to_admit(0, true, 5_000), 0);
    }

    #[test]
    fn a_batch_is_due_once_per_interval_and_the_mark_keeps_the_cadence() {
        assert_eq!(next_batch_mark(1_000, 1_499, 500), None);
        assert_eq!(next_batch_mark(1_000, 1_500, 500), Some(1_500));
        assert_eq!(next_batch_mark(1_000, 1_740, 500), Some(1_500), "jitter does not shift the cadence");
        assert_eq!(next_batch_mark(1_000, 3_200, 500), Some(3_000), "a pause skips intervals");
        assert_eq!(next_batch_mark(0, 1_733_000_000_123, 500), Some(1_733_000_000_000), "no mark yet");
        assert_eq!(next_batch_mark(1_000, 900, 500), None, "a clock behind the mark");
        assert_eq!(next_batch_mark(1_000, 1_000, 0), None, "an interval of at least 1 ms");
        assert_eq!(next_batch_mark(1_000, 1_001, 0), Some(1_001));
    }

    #[test]
    fn a_token_is_a_uuid() {
        let id = QueueTokenId::generate();
        assert_eq!(QueueTokenId::parse(&id.to_string()), Ok(id));
        assert_eq!(QueueTokenId::parse("nope"), Err(MalformedQueueToken));
        assert_eq!(QueueTokenId::parse(""), Err(MalformedQueueToken));
    }
}
