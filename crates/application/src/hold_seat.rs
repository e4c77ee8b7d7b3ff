//! Hold a seat for a few minutes.
//!
//! Outside the lock: the schedule must exist and its booking window be open now (cheap
//! reads that turn requests away before they touch a lock). Under
//! `lock:seat:{scheduleId}:{seatNumber}`, failing fast (another holder means someone else
//! is taking this seat: 409 at once, no queue): lock the seat row, refuse a seat that is
//! held (and not run out) or sold, then take it by a conditional update and insert the
//! reservation, in one transaction. A hold that ran out and was not cleaned up yet is
//! replaced, and marked EXPIRED in the same transaction.

use std::sync::Arc;
use std::time::Duration;

use domain::booking::{
    BookingRepository, BookingRepositoryError, Reservation, ScheduleId, SeatNumber, SeatStatus,
};
use domain::unit_of_work::TxError;
use domain::user::UserId;

use crate::clock;
use crate::lock::{DistributedLock, LockError, LockKey, WaitPolicy};
use crate::tx::{TransactionManager, locked_tx};

/// How long a hold lasts by default (`RESERVATION_HOLD_SECONDS`).
pub const DEFAULT_HOLD: Duration = Duration::from_secs(300);

/// `lock:seat:{scheduleId}:{seatNumber}`: holds, cancels and expiries of one seat.
#[must_use]
pub fn seat_lock_key(schedule_id: ScheduleId, seat: SeatNumber) -> LockKey {
    LockKey::new("seat", format!("{schedule_id}:{seat}"))
}

#[derive(Debug, thiserror::Error)]
pub enum HoldSeatError {
    #[error("schedule {0} not found")]
    ScheduleNotFound(ScheduleId),
    #[error("booking for this schedule is not open now")]
    BookingClosed,
    /// Held by someone else, sold, or being taken right now.
    #[error("the seat is not available")]
    SeatUnavailable,
    #[error("the lock service is unavailable")]
    LockUnavailable(#[source] anyhow::Error),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Holds seats.
#[derive(Clone)]
pub struct HoldSeat {
    bookings: Arc<dyn BookingRepository>,
    lock: Arc<dyn DistributedLock>,
    txm: Arc<dyn TransactionManager>,
    hold: Duration,
}

impl std::fmt::Debug for HoldSeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoldSeat").field("hold", &self.hold).finish_non_exhaustive()
    }
}

impl HoldSeat {
    #[must_use]
    pub fn new(
        bookings: Arc<dyn BookingRepository>,
        lock: Arc<dyn DistributedLock>,
        txm: Arc<dyn TransactionManager>,
        hold: Duration,
    ) -> Self {
        Self { bookings, lock, txm, hold }
    }

    /// Holds `seat` of `schedule_id` for `user_id`.
    ///
    /// # Errors
    /// [`HoldSeatError::ScheduleNotFound`], [`HoldSeatError::BookingClosed`],
    /// [`HoldSeatError::SeatUnavailable`] (also when another request is taking it right
    /// now), [`HoldSeatError::LockUnavailable`]; on every error nothing is changed.
    #[tracing::instrument(name = "hold_seat", skip(self), fields(%user_id, %schedule_id, %seat))]
    pub async fn execute(
        &self,
        user_id: UserId,
        schedule_id: ScheduleId,
        seat: SeatNumber,
    ) -> Result<Reservation, HoldSeatError> {
        let schedule = self
            .bookings
            .schedule(schedule_id)
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to read the schedule"))?
            .ok_or(HoldSeatError::ScheduleNotFound(schedule_id))?;
        if !schedule.window.is_open(clock::now_utc()) {
            return Err(HoldSeatError::BookingClosed);
        }
        let bookings = Arc::clone(&self.bookings);
        let hold = time::Duration::try_from(self.hold).map_err(anyhow::Error::new)?;
        let reservation = locked_tx(
            self.lock.as_ref(),
            self.txm.as_ref(),
            &seat_lock_key(schedule_id, seat),
            WaitPolicy::FailFast,
            move |tx| {
                Box::pin(async move {
                    let now = clock::now_utc();
                    let current = bookings
                        .lock_seat(tx, schedule_id, seat)
                        .await?
                        .ok_or_else(|| anyhow::anyhow!("schedule {schedule_id} has no seat {seat}"))?;
                    if current.status_at(now) != SeatStatus::Available {
                        return Err(HoldSeatError::SeatUnavailable);
                    }
                    // A run-out hold still on the row is replaced (and expired) in this tx.
                    let replaces =
                        (current.status == SeatStatus::Held).then_some(current.reservation_id).flatten();
                    let reservation = Reservation::hold(user_id, &current, now, hold);
                    bookings.hold_seat(tx, &reservation, replaces, now).await.map_err(|e| match e {
                        BookingRepositoryError::SeatTaken => HoldSeatError::SeatUnavailable,
                        other => other.into(),
                    })?;
                    Ok(reservation)
                })
            },
        )
        .await?;
        tracing::info!(reservation = %reservation.id, "seat held");
        Ok(reservation)
    }
}

impl From<BookingRepositoryError> for HoldSeatError {
    fn from(error: BookingRepositoryError) -> Self {
        Self::Unexpected(anyhow::Error::new(error).context("failed to hold the seat"))
    }
}

impl From<TxError> for HoldSeatError {
    fn from(error: TxError) -> Self {
        Self::Unexpected(anyhow::Error::new(error).context("hold transaction failed"))
    }
}

impl From<LockError> for HoldSeatError {
    fn from(error: LockError) -> Self {
        match error {
            // Someone else is taking this seat right now (or our lease ran out and the
            // work was rolled back): either way, not yours.
            LockError::Busy { key } | LockError::Timeout { key, .. } | LockError::LeaseLost { key } => {
                tracing::debug!(%key, "seat contended");
                Self::SeatUnavailable
            }
            LockError::Unavailable(source) => Self::LockUnavailable(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use domain::booking::{
        BookingWindow, ConcertId, MockBookingRepository, Price, ReservationId, Schedule, Seat,
    };
    use domain::unit_of_work::MockUnitOfWork;

    use super::*;
    use crate::lock::{FencingToken, MockDistributedLock, MockLockGuard};
    use crate::tx::MockTransactionManager;

    fn schedule(id: ScheduleId, open: bool) -> Schedule {
        let now = clock::now_utc();
        let (opens, closes) = if open {
            (now - time::Duration::hours(1), now + time::Duration::days(1))
        } else {
            (now + time::Duration::days(1), now + time::Duration::days(2))
        };
        Schedule {
            id,
            concert_id: ConcertId::generate(),
            starts_at: now + time::Duration::days(3),
            window: BookingWindow::new(opens, closes, now + time::Duration::days(3)).unwrap(),
        }
    }

    fn seat(schedule_id: ScheduleId, status: SeatStatus, held_until: Option<time::OffsetDateTime>) -> Seat {
        Seat {
            schedule_id,
            number: SeatNumber::new(7).unwrap(),
            price: Price::new(50_000).unwrap(),
            status,
            reservation_id: (status != SeatStatus::Available).then(ReservationId::generate),
            held_until,
        }
    }

    /// A lock and a transaction that are taken once; `commit` says how the work ends.
    fn lock_and_tx(commit: bool) -> (MockDistributedLock, MockTransactionManager) {
        let mut guard = MockLockGuard::new();
        guard.expect_is_lost().return_const(false);
        guard.expect_key().return_const(LockKey::new("seat", "x"));
        guard.expect_fencing_token().return_const(FencingToken(1));
        guard.expect_lease_lost().returning(|| Box::pin(std::future::pending()));
        guard.expect_release().times(1).returning(|| Ok(()));
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire()
            .withf(|key, wait| key.as_str().starts_with("lock:seat:") && *wait == WaitPolicy::FailFast)
            .times(1)
            .return_once(move |_, _| Ok(Box::new(guard)));
        let mut uow = MockUnitOfWork::new();
        if commit {
            uow.expect_commit().times(1).returning(|| Ok(()));
        } else {
            uow.expect_commit().never();
            uow.expect_rollback().times(1).returning(|| Ok(()));
        }
        let mut txm = MockTransactionManager::new();
        txm.expect_begin().times(1).return_once(move || Ok(Box::new(uow)));
        (lock, txm)
    }

    fn use_case(
        bookings: MockBookingRepository,
        lock: MockDistributedLock,
        txm: MockTransactionManager,
    ) -> HoldSeat {
        HoldSeat::new(Arc::new(bookings), Arc::new(lock), Arc::new(txm), DEFAULT_HOLD)
    }

    #[tokio::test]
    async fn an_unknown_schedule_or_a_closed_window_is_refused_before_any_lock() {
        for (found, expected_closed) in [(false, false), (true, true)] {
            let id = ScheduleId::generate();
            let mut bookings = MockBookingRepository::new();
            bookings.expect_schedule().returning(move |_| Ok(found.then(|| schedule(id, false))));
            let mut lock = MockDistributedLock::new();
            lock.expect_acquire().never();
            let result = use_case(bookings, lock, MockTransactionManager::new())
                .execute(UserId::generate(), id, SeatNumber::new(7).unwrap())
                .await;
            if expected_closed {
                assert!(matches!(result, Err(HoldSeatError::BookingClosed)), "{result:?}");
            } else {
                assert!(matches!(result, Err(HoldSeatError::ScheduleNotFound(_))), "{result:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_free_seat_is_held_under_its_lock_at_its_price() {
        let id = ScheduleId::generate();
        let user = UserId::generate();
        let mut bookings = MockBookingRepository::new();
        bookings.expect_schedule().returning(move |_| Ok(Some(schedule(id, true))));
        bookings
            .expect_lock_seat()
            .times(1)
            .returning(move |_, s, _| Ok(Some(seat(s, SeatStatus::Available, None))));
        bookings
            .expect_hold_seat()
            .withf(move |_, r, replaces, _| {
                r.user_id == user
                    && r.price.points() == 50_000
                    && r.status == domain::booking::ReservationStatus::Held
                    && replaces.is_none()
            })
            .times(1)
            .returning(|_, _, _, _| Ok(()));
        let (lock, txm) = lock_and_tx(true);

        let held =
            use_case(bookings, lock, txm).execute(user, id, SeatNumber::new(7).unwrap()).await.unwrap();

        let hold = held.held_until - held.created_at;
        assert_eq!(hold, time::Duration::seconds(300));
    }

    #[tokio::test]
    async fn a_live_hold_or_a_sale_makes_the_seat_unavailable_and_nothing_is_written() {
        for (status, until) in [
            (SeatStatus::Held, Some(clock::now_utc() + time::Duration::minutes(3))),
            (SeatStatus::Sold, None),
        ] {
            let id = ScheduleId::generate();
            let mut bookings = MockBookingRepository::new();
            bookings.expect_schedule().returning(move |_| Ok(Some(schedule(id, true))));
            bookings.expect_lock_seat().returning(move |_, s, _| Ok(Some(seat(s, status, until))));
            bookings.expect_hold_seat().never();
            let (lock, txm) = lock_and_tx(false);

            let result = use_case(bookings, lock, txm)
                .execute(UserId::generate(), id, SeatNumber::new(7).unwrap())
                .await;

            assert!(matches!(result, Err(HoldSeatError::SeatUnavailable)), "{result:?}");
        }
    }

    #[tokio::test]
    async fn a_hold_that_ran_out_is_replaced_and_expired_in_the_same_transaction() {
        let id = ScheduleId::generate();
        let stale = seat(id, SeatStatus::Held, Some(clock::now_utc() - time::Duration::seconds(1)));
        let old = stale.reservation_id;
        let mut bookings = MockBookingRepository::new();
        bookings.expect_schedule().returning(move |_| Ok(Some(schedule(id, true))));
        bookings.expect_lock_seat().returning(move |_, _, _| Ok(Some(stale.clone())));
        bookings
            .expect_hold_seat()
            .withf(move |_, _, replaces, _| *replaces == old)
            .times(1)
            .returning(|_, _, _, _| Ok(()));
        let (lock, txm) = lock_and_tx(true);

        let result =
            use_case(bookings, lock, txm).execute(UserId::generate(), id, SeatNumber::new(7).unwrap()).await;

        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn a_seat_someone_else_is_taking_is_unavailable_at_once_without_a_transaction() {
        let id = ScheduleId::generate();
        let mut bookings = MockBookingRepository::new();
        bookings.expect_schedule().returning(move |_| Ok(Some(schedule(id, true))));
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire().times(1).returning(|key, _| Err(LockError::Busy { key: key.clone() }));
        let mut txm = MockTransactionManager::new();
        txm.expect_begin().never();

        let result =
            use_case(bookings, lock, txm).execute(UserId::generate(), id, SeatNumber::new(7).unwrap()).await;

        assert!(matches!(result, Err(HoldSeatError::SeatUnavailable)), "{result:?}");
    }
}
