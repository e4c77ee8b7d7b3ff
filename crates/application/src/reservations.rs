//! A user's reservations: read one, cancel a hold; and the job that expires holds that ran
//! out.
//!
//! Cancel and expiry change a seat, so they go through the same path as a hold: the seat's
//! lock `lock:{seat:<scheduleId>:<seatNumber>}`, one transaction with a conditional
//! transition (rows affected checked), commit, unlock, then the seat map evicted on every
//! instance. A cancel waits a little for the seat's lock (a hold attempt holds it for
//! milliseconds); the job does not wait: a seat someone is working on is left to the next
//! round.

use std::sync::Arc;
use std::time::Duration;

use domain::booking::{
    BookingRepository, BookingRepositoryError, Reservation, ReservationId, ReservationStatus,
};
use domain::user::UserId;

use crate::cache::WriteMark;
use crate::catalog::Catalog;
use crate::clock;
use crate::detach::run_to_end;
use crate::failure::Failure;
use crate::lock::{DistributedLock, LockKey, LockRequest};
use crate::tx::{TransactionManager, locked_tx};

/// How long a cancel waits for the seat's lock.
pub const CANCEL_LOCK_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ReservationError {
    /// No such reservation, or another user's (which is not told apart).
    #[error("reservation {0} not found")]
    NotFound(ReservationId),
    /// Only a live hold can be cancelled.
    #[error("the reservation is {}, not HELD", .0.as_str())]
    NotHeld(ReservationStatus),
    /// The seat stayed locked for the whole wait, a lost lease, an unavailable lock store
    /// or cache, the database: nothing changed.
    #[error(transparent)]
    Failure(Failure),
}

crate::failure_conversions!(ReservationError);

impl From<BookingRepositoryError> for ReservationError {
    fn from(error: BookingRepositoryError) -> Self {
        anyhow::Error::new(error).context("reservation storage failed").into()
    }
}

/// Reads and cancels reservations, and expires run-out holds.
#[derive(Clone)]
pub struct Reservations {
    catalog: Catalog,
    bookings: Arc<dyn BookingRepository>,
    lock: Arc<dyn DistributedLock>,
    txm: Arc<dyn TransactionManager>,
}

impl std::fmt::Debug for Reservations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservations").finish_non_exhaustive()
    }
}

impl Reservations {
    #[must_use]
    pub fn new(
        catalog: Catalog,
        bookings: Arc<dyn BookingRepository>,
        lock: Arc<dyn DistributedLock>,
        txm: Arc<dyn TransactionManager>,
    ) -> Self {
        Self { catalog, bookings, lock, txm }
    }

    /// `user`'s reservation `id`, its status as of now (a hold that ran out is EXPIRED).
    ///
    /// # Errors
    /// [`ReservationError::NotFound`] also for another user's reservation.
    pub async fn get(&self, user: UserId, id: ReservationId) -> Result<Reservation, ReservationError> {
        let mut reservation = self.owned(user, id).await?;
        reservation.status = reservation.status_at(clock::now_utc());
        Ok(reservation)
    }

    async fn owned(&self, user: UserId, id: ReservationId) -> Result<Reservation, ReservationError> {
        self.bookings
            .reservation(id)
            .await?
            .filter(|r| r.user_id == user)
            .ok_or(ReservationError::NotFound(id))
    }

    /// Cancels `user`'s live hold `id`: the reservation CANCELLED, its seat AVAILABLE.
    ///
    /// # Errors
    /// [`ReservationError::NotFound`], [`ReservationError::NotHeld`] (confirmed, expired,
    /// cancelled, or a hold that ran out), [`ReservationError::Failure`]; nothing changes
    /// on any of them. Runs to its end on a task of its own ([`run_to_end`]).
    #[tracing::instrument(name = "cancel_reservation", skip(self), fields(%user, %id))]
    pub async fn cancel(&self, user: UserId, id: ReservationId) -> Result<Reservation, ReservationError> {
        let this = self.clone();
        run_to_end(async move { this.cancel_attached(user, id).await }).await
    }

    async fn cancel_attached(
        &self,
        user: UserId,
        id: ReservationId,
    ) -> Result<Reservation, ReservationError> {
        let mut reservation = self.owned(user, id).await?;
        // Outside the lock: a reservation that is not a live hold is refused at once.
        let cancelled = reservation
            .status
            .cancel(reservation.held_until, clock::now_utc())
            .map_err(|_| ReservationError::NotHeld(reservation.status_at(clock::now_utc())))?;
        let (bookings, catalog, schedule) =
            (Arc::clone(&self.bookings), self.catalog.clone(), reservation.schedule_id);
        let mark = locked_tx(
            self.lock.as_ref(),
            self.txm.as_ref(),
            &[LockRequest::wait_up_to(
                LockKey::seat(reservation.schedule_id, reservation.seat_number),
                CANCEL_LOCK_WAIT,
            )],
            move |tx| {
                Box::pin(async move {
                    // Inside: the SQL allows the change only from a hold that still lasts.
                    if bookings.end_hold(tx, id, cancelled, clock::now_utc()).await? {
                        return Ok(catalog.seats_changing(schedule).await?);
                    }
                    // Why not, as stored; a hold still stored HELD ran out by the
                    // database's clock (the statement's judge).
                    let stored = bookings.reservation_in(tx, id).await?.map(|r| r.status);
                    Err(ReservationError::NotHeld(ReservationStatus::after_refusal(stored)))
                })
            },
        )
        .await?;
        self.catalog.changes_done([mark]).await;
        tracing::info!("hold cancelled");
        reservation.status = cancelled;
        Ok(reservation)
    }

    /// One round of the expiry job: up to `batch` holds that ran out become EXPIRED and
    /// their seats AVAILABLE, each under its seat's lock (not waited for: a busy seat is
    /// left to the next round, or to whoever holds it). Safe on many instances at once:
    /// the transition is conditional, so a hold is expired once. Returns how many this
    /// round expired.
    ///
    /// # Errors
    /// When the run-out holds cannot be listed; a failure on one hold is logged and the
    /// round goes on.
    pub async fn expire_run_out(&self, batch: u32) -> Result<usize, ReservationError> {
        let due = self.bookings.run_out_holds(clock::now_utc(), batch).await?;
        let mut expired = 0;
        for hold in due {
            let (bookings, catalog, schedule) =
                (Arc::clone(&self.bookings), self.catalog.clone(), hold.schedule_id);
            let id = hold.id;
            let ended: Result<Option<Option<WriteMark>>, ReservationError> = locked_tx(
                self.lock.as_ref(),
                self.txm.as_ref(),
                &[LockRequest::fail_fast(LockKey::seat(hold.schedule_id, hold.seat_number))],
                move |tx| {
                    Box::pin(async move {
                        if bookings.end_hold(tx, id, ReservationStatus::Expired, clock::now_utc()).await? {
                            Ok(Some(catalog.seats_changing(schedule).await?))
                        } else {
                            Ok(None)
                        }
                    })
                },
            )
            .await;
            match ended {
                Ok(Some(mark)) => {
                    expired += 1;
                    // Lifted at once: the seat map bypasses the cache only while needed.
                    self.catalog.changes_done([mark]).await;
                }
                // Settled meanwhile (paid, cancelled, replaced, or another instance's job).
                Ok(None) => {}
                Err(ReservationError::Failure(Failure::Contended(_))) => {
                    tracing::debug!(reservation = %id, "seat busy; next round");
                }
                Err(error) => {
                    tracing::warn!(reservation = %id, error = format!("{error:#}"), "failed to expire a hold");
                }
            }
        }
        if expired > 0 {
            tracing::info!(expired, "run-out holds expired");
        }
        Ok(expired)
    }
}

#[cfg(test)]
mod tests {
    use domain::booking::{MockBookingRepository, MockCatalogRepository, Price, ScheduleId, SeatNumber};

    use super::*;
    use crate::cache::Cache;
    use crate::lock::{LockError, MockDistributedLock, WaitPolicy};
    use crate::mocks::{one_tx, released_guard};
    use crate::tx::MockTransactionManager;

    fn reservation(user: UserId, status: ReservationStatus, left: time::Duration) -> Reservation {
        let now = clock::now_utc();
        Reservation {
            id: ReservationId::generate(),
            user_id: user,
            schedule_id: ScheduleId::generate(),
            seat_number: SeatNumber::new(5).unwrap(),
            price: Price::new(1_000).unwrap(),
            status,
            held_until: now + left,
            created_at: now - time::Duration::minutes(1),
        }
    }

    fn use_case(
        bookings: MockBookingRepository,
        lock: MockDistributedLock,
        txm: MockTransactionManager,
    ) -> Reservations {
        let catalog = Catalog::new(Arc::new(MockCatalogRepository::new()), Arc::new(Cache::disabled()));
        Reservations::new(catalog, Arc::new(bookings), Arc::new(lock), Arc::new(txm))
    }

    /// A lock taken once with `wait`, and a transaction that commits or rolls back.
    fn lock_and_tx(wait: WaitPolicy, commit: bool) -> (MockDistributedLock, MockTransactionManager) {
        let guard = released_guard(LockKey::new("seat", "x"));
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire()
            .withf(move |key, w| key.as_str().starts_with("lock:{seat:") && *w == wait)
            .times(1)
            .return_once(move |_, _| Ok(Box::new(guard)));
        (lock, one_tx(commit))
    }

    fn no_lock() -> (MockDistributedLock, MockTransactionManager) {
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire().never();
        let mut txm = MockTransactionManager::new();
        txm.expect_begin().never();
        (lock, txm)
    }

    #[tokio::test]
    async fn another_users_reservation_does_not_exist_and_a_run_out_hold_reads_expired() {
        let owner = UserId::generate();
        let held = reservation(owner, ReservationStatus::Held, -time::Duration::seconds(1));
        let id = held.id;
        let mut bookings = MockBookingRepository::new();
        bookings.expect_reservation().returning(move |_| Ok(Some(held.clone())));
        let (lock, txm) = no_lock();
        let reservations = use_case(bookings, lock, txm);

        assert!(matches!(reservations.get(UserId::generate(), id).await, Err(ReservationError::NotFound(_))));
        assert_eq!(reservations.get(owner, id).await.unwrap().status, ReservationStatus::Expired);
    }

    #[tokio::test]
    async fn only_a_live_hold_of_ones_own_is_cancelled_and_others_are_refused_before_the_lock() {
        let owner = UserId::generate();
        for (status, left, expected) in [
            (ReservationStatus::Confirmed, time::Duration::minutes(3), ReservationStatus::Confirmed),
            (ReservationStatus::Cancelled, time::Duration::minutes(3), ReservationStatus::Cancelled),
            (ReservationStatus::Held, -time::Duration::seconds(1), ReservationStatus::Expired),
        ] {
            let found = reservation(owner, status, left);
            let id = found.id;
            let mut bookings = MockBookingRepository::new();
            bookings.expect_reservation().returning(move |_| Ok(Some(found.clone())));
            bookings.expect_end_hold().never();
            let (lock, txm) = no_lock();
            let result = use_case(bookings, lock, txm).cancel(owner, id).await;
            assert!(matches!(result, Err(ReservationError::NotHeld(s)) if s == expected), "{result:?}");
        }
        let mut bookings = MockBookingRepository::new();
        bookings.expect_reservation().returning(|_| Ok(None));
        let (lock, txm) = no_lock();
        let result = use_case(bookings, lock, txm).cancel(owner, ReservationId::generate()).await;
        assert!(matches!(result, Err(ReservationError::NotFound(_))), "{result:?}");
    }

    #[tokio::test]
    async fn a_cancel_ends_the_hold_under_the_seat_lock_waiting_for_it() {
        let owner = UserId::generate();
        let held = reservation(owner, ReservationStatus::Held, time::Duration::minutes(3));
        let id = held.id;
        let mut bookings = MockBookingRepository::new();
        bookings.expect_reservation().returning(move |_| Ok(Some(held.clone())));
        bookings
            .expect_end_hold()
            .withf(move |_, r, to, _| *r == id && *to == ReservationStatus::Cancelled)
            .times(1)
            .returning(|_, _, _, _| Ok(true));
        let (lock, txm) = lock_and_tx(WaitPolicy::WaitUpTo(CANCEL_LOCK_WAIT), true);

        let cancelled = use_case(bookings, lock, txm).cancel(owner, id).await.unwrap();

        assert_eq!(cancelled.status, ReservationStatus::Cancelled);
    }

    #[tokio::test]
    async fn a_hold_that_changed_under_the_lock_is_not_cancelled_and_nothing_commits() {
        let owner = UserId::generate();
        let held = reservation(owner, ReservationStatus::Held, time::Duration::minutes(3));
        let paid = Reservation { status: ReservationStatus::Confirmed, ..held.clone() };
        let id = held.id;
        let mut bookings = MockBookingRepository::new();
        bookings.expect_reservation().times(1).returning(move |_| Ok(Some(held.clone())));
        bookings.expect_reservation_in().times(1).returning(move |_, _| Ok(Some(paid.clone())));
        bookings.expect_end_hold().times(1).returning(|_, _, _, _| Ok(false));
        let (lock, txm) = lock_and_tx(WaitPolicy::WaitUpTo(CANCEL_LOCK_WAIT), false);

        let result = use_case(bookings, lock, txm).cancel(owner, id).await;

        assert!(matches!(result, Err(ReservationError::NotHeld(ReservationStatus::Confirmed))), "{result:?}");
    }

    #[tokio::test]
    async fn a_seat_that_stays_busy_or_a_lock_store_that_is_down_changes_nothing() {
        let owner = UserId::generate();
        for down in [false, true] {
            let held = reservation(owner, ReservationStatus::Held, time::Duration::minutes(3));
            let id = held.id;
            let mut bookings = MockBookingRepository::new();
            bookings.expect_reservation().returning(move |_| Ok(Some(held.clone())));
            bookings.expect_end_hold().never();
            let mut lock = MockDistributedLock::new();
            lock.expect_acquire().times(1).returning(move |key, _| {
                Err(if down {
                    LockError::Unavailable(anyhow::anyhow!("redis down"))
                } else {
                    LockError::Timeout { key: key.clone(), waited: CANCEL_LOCK_WAIT }
                })
            });
            let mut txm = MockTransactionManager::new();
            txm.expect_begin().never();
            let result = use_case(bookings, lock, txm).cancel(owner, id).await;
            if down {
                assert!(
                    matches!(result, Err(ReservationError::Failure(Failure::Unavailable { .. }))),
                    "{result:?}"
                );
            } else {
                assert!(
                    matches!(result, Err(ReservationError::Failure(Failure::Contended(_)))),
                    "{result:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn the_expiry_job_skips_a_busy_seat_and_expires_the_rest_failing_fast() {
        let user = UserId::generate();
        let busy = reservation(user, ReservationStatus::Held, -time::Duration::seconds(5));
        let due = reservation(user, ReservationStatus::Held, -time::Duration::seconds(1));
        let busy_key = LockKey::seat(busy.schedule_id, busy.seat_number);
        let due_id = due.id;
        let mut bookings = MockBookingRepository::new();
        let listed = vec![busy.clone(), due.clone()];
        bookings
            .expect_run_out_holds()
            .withf(|_, limit| *limit == 10)
            .returning(move |_, _| Ok(listed.clone()));
        bookings
            .expect_end_hold()
            .withf(move |_, r, to, _| *r == due_id && *to == ReservationStatus::Expired)
            .times(1)
            .returning(|_, _, _, _| Ok(true));
        let txm = one_tx(true);
        // The busy seat's lock is held elsewhere; the other one is taken as usual.
        let mut combined = MockDistributedLock::new();
        combined.expect_acquire().times(2).returning(move |key, wait| {
            assert_eq!(wait, WaitPolicy::FailFast);
            if *key == busy_key {
                return Err(LockError::Busy { key: key.clone() });
            }
            Ok(Box::new(released_guard(LockKey::new("seat", "x"))))
        });

        let expired = use_case(bookings, combined, txm).expire_run_out(10).await.unwrap();

        assert_eq!(expired, 1);
    }
}
