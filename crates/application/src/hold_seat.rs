//! Hold a seat for a few minutes.
//!
//! Outside the lock, from the cached seat map (cheap reads that turn most requests away
//! before they touch a lock): the schedule must exist, its booking window be open now, and
//! the seat not be held or sold already. Under
//! `lock:{seat:<scheduleId>:<seatNumber>}`, failing fast (another holder means someone else
//! is taking this seat: 409 at once, no queue): lock the seat row, refuse a seat that is
//! held (and not run out) or sold, then take it by a conditional update and insert the
//! reservation, in one transaction. A hold that ran out and was not cleaned up yet is
//! replaced, and marked EXPIRED in the same transaction. After the commit, the seat map is
//! evicted on every instance before the answer goes out.

use std::sync::Arc;
use std::time::Duration;

use domain::booking::{
    BookingRepository, BookingRepositoryError, Reservation, ScheduleId, SeatNumber, SeatStatus,
};

use domain::user::UserId;

use crate::catalog::{Catalog, CatalogError};
use crate::clock;
use crate::detach::run_to_end;
use crate::failure::Failure;
use crate::lock::{DistributedLock, LockKey, LockRequest};
use crate::tx::{TransactionManager, locked_tx};

/// How long a hold lasts by default (`RESERVATION_HOLD_SECONDS`).
pub const DEFAULT_HOLD: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum HoldSeatError {
    #[error("schedule {0} not found")]
    ScheduleNotFound(ScheduleId),
    #[error("booking for this schedule is not open now")]
    BookingClosed,
    /// Held by someone else, sold, or being taken right now (its lock was busy).
    #[error("the seat is not available")]
    SeatUnavailable,
    /// The user holds as many seats of this date as one user may.
    #[error("the user holds {0} seats of this schedule already")]
    HoldLimitReached(u32),
    /// A lost lease, an unavailable lock store or cache, the database: nothing changed.
    #[error(transparent)]
    Failure(Failure),
}

crate::failure_conversions!(HoldSeatError);

/// Holds seats.
#[derive(Clone)]
pub struct HoldSeat {
    catalog: Catalog,
    bookings: Arc<dyn BookingRepository>,
    lock: Arc<dyn DistributedLock>,
    txm: Arc<dyn TransactionManager>,
    hold: Duration,
    /// `MAX_HOLDS_PER_USER`: live holds one user may have on one date.
    max_holds: u32,
}

impl std::fmt::Debug for HoldSeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HoldSeat").field("hold", &self.hold).finish_non_exhaustive()
    }
}

impl HoldSeat {
    #[must_use]
    pub fn new(
        catalog: Catalog,
        bookings: Arc<dyn BookingRepository>,
        lock: Arc<dyn DistributedLock>,
        txm: Arc<dyn TransactionManager>,
        hold: Duration,
        max_holds: u32,
    ) -> Self {
        Self { catalog, bookings, lock, txm, hold, max_holds }
    }

    /// Holds `seat` of `schedule_id` for `user_id`. Runs to its end on a task of its own
    /// ([`run_to_end`]): a client that hangs up does not leave the seat map's write mark
    /// standing or the lock to its lease.
    ///
    /// # Errors
    /// [`HoldSeatError::ScheduleNotFound`], [`HoldSeatError::BookingClosed`],
    /// [`HoldSeatError::SeatUnavailable`] (also when another request is taking it right
    /// now), [`HoldSeatError::Failure`]; on every error nothing is changed.
    #[tracing::instrument(name = "hold_seat", skip(self), fields(%user_id, %schedule_id, %seat))]
    pub async fn execute(
        &self,
        user_id: UserId,
        schedule_id: ScheduleId,
        seat: SeatNumber,
    ) -> Result<Reservation, HoldSeatError> {
        let this = self.clone();
        run_to_end(async move { this.hold(user_id, schedule_id, seat).await }).await
    }

    async fn hold(
        &self,
        user_id: UserId,
        schedule_id: ScheduleId,
        seat: SeatNumber,
    ) -> Result<Reservation, HoldSeatError> {
        let map = self.catalog.seat_map(schedule_id).await.map_err(|error| match error {
            CatalogError::ScheduleNotFound(id) => HoldSeatError::ScheduleNotFound(id),
            other => anyhow::Error::new(other).context("failed to read the seat map").into(),
        })?;
        let now = clock::now_utc();
        if !map.schedule.is_open(now) {
            return Err(HoldSeatError::BookingClosed);
        }
        // A fresh map (every change evicts it before answering) that says taken: no need
        // to queue on the lock. One that says free may be out of date by a moment; the
        // lock and the SQL decide.
        if map.seat(seat).is_none_or(|s| s.status_at(now) != SeatStatus::Available) {
            return Err(HoldSeatError::SeatUnavailable);
        }
        let bookings = Arc::clone(&self.bookings);
        let catalog = self.catalog.clone();
        let hold = time::Duration::try_from(self.hold).map_err(anyhow::Error::new)?;
        let max_holds = self.max_holds;
        let (reservation, mark) = locked_tx(
            self.lock.as_ref(),
            self.txm.as_ref(),
            &[LockRequest::fail_fast(LockKey::seat(schedule_id, seat))],
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
                    // The limit, under the holder's row lock: this user's other holds, on
                    // any seat and any instance, wait here for this one's commit, so N
                    // racing holds cannot all count N - 1 before them. (The adapter's count
                    // must see what committed during that wait: see `sql::LIVE_HOLDS`. No
                    // plain read may come before it in this transaction.)
                    let held = bookings.lock_live_holds(tx, user_id, schedule_id).await?;
                    if held >= max_holds {
                        return Err(HoldSeatError::HoldLimitReached(max_holds));
                    }
                    // A run-out hold still on the row is replaced (and expired) in this tx.
                    let replaces =
                        (current.status == SeatStatus::Held).then_some(current.reservation_id).flatten();
                    let mut reservation = Reservation::hold(user_id, &current, now, hold);
                    // The end as stored, on the database's clock: the one every later check
                    // (payment, cancel, expiry) goes by, so the one the client is told.
                    reservation.held_until =
                        bookings.hold_seat(tx, &reservation, replaces, now).await.map_err(|e| match e {
                            BookingRepositoryError::SeatTaken => HoldSeatError::SeatUnavailable,
                            other => other.into(),
                        })?;
                    // Before the commit: from here every instance reads this map from
                    // MySQL until the mark is lifted, so none shows the seat free after
                    // this request returned, whatever happens next.
                    let mark = catalog.seats_changing(schedule_id).await?;
                    Ok((reservation, mark))
                })
            },
        )
        .await
        .map_err(|error| match error {
            // Someone else is taking this seat right now: not yours.
            HoldSeatError::Failure(Failure::Contended(key)) => {
                tracing::debug!(%key, "seat contended");
                HoldSeatError::SeatUnavailable
            }
            other => other,
        })?;
        self.catalog.changes_done([mark]).await;
        tracing::info!(reservation = %reservation.id, "seat held");
        Ok(reservation)
    }
}

impl From<BookingRepositoryError> for HoldSeatError {
    fn from(error: BookingRepositoryError) -> Self {
        anyhow::Error::new(error).context("failed to hold the seat").into()
    }
}

#[cfg(test)]
mod tests {
    use domain::booking::{
        BookingWindow, ConcertId, MockBookingRepository, MockCatalogRepository, Price, ReservationId,
        Schedule, Seat,
    };

    use super::*;
    use crate::cache::Cache;
    use crate::lock::{LockError, MockDistributedLock, WaitPolicy};
    use crate::mocks::{one_tx, released_guard};
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
        let guard = released_guard(LockKey::new("seat", "x"));
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire()
            .withf(|key, wait| key.as_str().starts_with("lock:{seat:") && *wait == WaitPolicy::FailFast)
            .times(1)
            .return_once(move |_, _| Ok(Box::new(guard)));
        (lock, one_tx(commit))
    }

    /// What the (uncached) seat map shows before the lock: the schedule, if `found`, with
    /// seat 7 `shown` and every other seat free.
    fn catalog(found: Option<bool>, shown: SeatStatus) -> MockCatalogRepository {
        let mut catalog = MockCatalogRepository::new();
        catalog.expect_schedule().returning(move |id| Ok(found.map(|open| schedule(id, open))));
        catalog.expect_seats().returning(move |id| {
            Ok(SeatNumber::all()
                .map(|n| {
                    let mut free = seat(id, SeatStatus::Available, None);
                    free.number = n;
                    if n.get() == 7 && shown != SeatStatus::Available {
                        free = seat(id, shown, Some(clock::now_utc() + time::Duration::minutes(3)));
                    }
                    free
                })
                .collect())
        });
        catalog
    }

    fn use_case_with(
        catalog: MockCatalogRepository,
        bookings: MockBookingRepository,
        lock: MockDistributedLock,
        txm: MockTransactionManager,
    ) -> HoldSeat {
        let catalog = Catalog::new(Arc::new(catalog), Arc::new(Cache::disabled()));
        HoldSeat::new(catalog, Arc::new(bookings), Arc::new(lock), Arc::new(txm), DEFAULT_HOLD, 4)
    }

    /// An open schedule whose map shows seat 7 free.
    fn use_case(
        bookings: MockBookingRepository,
        lock: MockDistributedLock,
        txm: MockTransactionManager,
    ) -> HoldSeat {
        use_case_with(catalog(Some(true), SeatStatus::Available), bookings, lock, txm)
    }

    #[tokio::test]
    async fn an_unknown_schedule_or_a_closed_window_is_refused_before_any_lock() {
        for (found, shown) in [
            (None, SeatStatus::Available),
            (Some(false), SeatStatus::Available),
            (Some(true), SeatStatus::Held),
            (Some(true), SeatStatus::Sold),
        ] {
            let id = ScheduleId::generate();
            let mut lock = MockDistributedLock::new();
            lock.expect_acquire().never();
            let result = use_case_with(
                catalog(found, shown),
                MockBookingRepository::new(),
                lock,
                MockTransactionManager::new(),
            )
            .execute(UserId::generate(), id, SeatNumber::new(7).unwrap())
            .await;
            match (found, shown) {
                (None, _) => assert!(matches!(result, Err(HoldSeatError::ScheduleNotFound(_))), "{result:?}"),
                (Some(false), _) => {
                    assert!(matches!(result, Err(HoldSeatError::BookingClosed)), "{result:?}")
                }
                _ => assert!(matches!(result, Err(HoldSeatError::SeatUnavailable)), "{result:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_free_seat_is_held_under_its_lock_at_its_price() {
        let id = ScheduleId::generate();
        let user = UserId::generate();
        let mut bookings = MockBookingRepository::new();
        bookings
            .expect_lock_seat()
            .times(1)
            .returning(move |_, s, _| Ok(Some(seat(s, SeatStatus::Available, None))));
        bookings
            .expect_lock_live_holds()
            .withf(move |_, u, s| *u == user && *s == id)
            .times(1)
            .returning(|_, _, _| Ok(3));
        bookings
            .expect_hold_seat()
            .withf(move |_, r, replaces, _| {
                r.user_id == user
                    && r.price.points() == 50_000
                    && r.status == domain::booking::ReservationStatus::Held
                    && replaces.is_none()
            })
            .times(1)
            .returning(|_, r, _, _| Ok(r.held_until));
        let (lock, txm) = lock_and_tx(true);

        let held =
            use_case(bookings, lock, txm).execute(user, id, SeatNumber::new(7).unwrap()).await.unwrap();

        let hold = held.held_until - held.created_at;
        assert_eq!(hold, time::Duration::seconds(300));
    }

    #[tokio::test]
    async fn a_live_hold_or_a_sale_the_map_did_not_show_yet_is_refused_under_the_lock_and_nothing_is_written()
    {
        for (status, until) in [
            (SeatStatus::Held, Some(clock::now_utc() + time::Duration::minutes(3))),
            (SeatStatus::Sold, None),
        ] {
            let id = ScheduleId::generate();
            let mut bookings = MockBookingRepository::new();
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
        bookings.expect_lock_seat().returning(move |_, _, _| Ok(Some(stale.clone())));
        bookings.expect_lock_live_holds().returning(|_, _, _| Ok(0));
        bookings
            .expect_hold_seat()
            .withf(move |_, _, replaces, _| *replaces == old)
            .times(1)
            .returning(|_, r, _, _| Ok(r.held_until));
        let (lock, txm) = lock_and_tx(true);

        let result =
            use_case(bookings, lock, txm).execute(UserId::generate(), id, SeatNumber::new(7).unwrap()).await;

        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn a_user_at_the_hold_limit_is_refused_under_the_lock_and_nothing_is_written() {
        let id = ScheduleId::generate();
        let user = UserId::generate();
        let mut bookings = MockBookingRepository::new();
        bookings.expect_lock_seat().returning(|_, s, _| Ok(Some(seat(s, SeatStatus::Available, None))));
        // Counted after the seat's row lock, under the holder's row lock (the adapter's).
        bookings
            .expect_lock_live_holds()
            .withf(move |_, u, s| *u == user && *s == id)
            .times(1)
            .returning(|_, _, _| Ok(4));
        bookings.expect_hold_seat().never();
        let (lock, txm) = lock_and_tx(false);

        let result = use_case(bookings, lock, txm).execute(user, id, SeatNumber::new(7).unwrap()).await;

        assert!(matches!(result, Err(HoldSeatError::HoldLimitReached(4))), "{result:?}");
    }

    #[tokio::test]
    async fn a_seat_someone_else_is_taking_is_unavailable_at_once_without_a_transaction() {
        let id = ScheduleId::generate();
        let bookings = MockBookingRepository::new();
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire().times(1).returning(|key, _| Err(LockError::Busy { key: key.clone() }));
        let mut txm = MockTransactionManager::new();
        txm.expect_begin().never();

        let result =
            use_case(bookings, lock, txm).execute(UserId::generate(), id, SeatNumber::new(7).unwrap()).await;

        assert!(matches!(result, Err(HoldSeatError::SeatUnavailable)), "{result:?}");
    }

    #[tokio::test]
    async fn a_hold_whose_seat_map_cannot_be_marked_is_rolled_back() {
        use crate::cache::{CacheError, CacheSettings, MockCachePort};
        let down = || CacheError::Unavailable(anyhow::anyhow!("redis down"));
        let mut port = MockCachePort::new();
        // Reads fall back to MySQL; the write's mark fails closed.
        port.expect_read().returning(move |_, _| Err(down()));
        port.expect_begin_write().times(1).returning(move |_, _, _| Err(down()));
        port.expect_end_write().never();
        let cache = Arc::new(Cache::new(Arc::new(port), CacheSettings::default()));
        let catalog = Catalog::new(Arc::new(catalog(Some(true), SeatStatus::Available)), cache);
        let mut bookings = MockBookingRepository::new();
        bookings.expect_lock_seat().returning(|_, s, _| Ok(Some(seat(s, SeatStatus::Available, None))));
        bookings.expect_lock_live_holds().returning(|_, _, _| Ok(0));
        bookings.expect_hold_seat().times(1).returning(|_, r, _, _| Ok(r.held_until));
        let (lock, txm) = lock_and_tx(false);
        let hold = HoldSeat::new(catalog, Arc::new(bookings), Arc::new(lock), Arc::new(txm), DEFAULT_HOLD, 4);

        let result =
            hold.execute(UserId::generate(), ScheduleId::generate(), SeatNumber::new(7).unwrap()).await;

        assert!(
            matches!(
                result,
                Err(HoldSeatError::Failure(Failure::Unavailable {
                    what: crate::failure::Dependency::Cache,
                    ..
                }))
            ),
            "{result:?}"
        );
    }
}
