//! A user's reservations: read one, cancel a hold; and the job that expires holds that ran
//! out.
//!
//! Cancel and expiry change a seat, so they go through the same path as a hold: the seat's
//! lock `lock:seat:{scheduleId}:{seatNumber}`, one transaction with a conditional
//! transition (rows affected checked), commit, unlock, then the seat map evicted on every
//! instance. A cancel waits a little for the seat's lock (a hold attempt holds it for
//! milliseconds); the job does not wait: a seat someone is working on is left to the next
//! round.

use std::sync::Arc;
use std::time::Duration;

use domain::booking::{
    BookingRepository, BookingRepositoryError, Reservation, ReservationId, ReservationStatus,
};
use domain::unit_of_work::TxError;
use domain::user::UserId;

use crate::cache::WriteMark;
use crate::catalog::{Catalog, CatalogError};
use crate::clock;
use crate::hold_seat::seat_lock_key;
use crate::lock::{DistributedLock, LockError, WaitPolicy};
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
    /// The seat stayed locked for the whole wait.
    #[error("the seat is busy")]
    Busy(#[source] LockError),
    #[error("the lock service is unavailable")]
    LockUnavailable(#[source] anyhow::Error),
    /// The seat map's cache could not be marked for the change: not done.
    #[error("the cache is unavailable")]
    CacheUnavailable(#[source] anyhow::Error),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl From<BookingRepositoryError> for ReservationError {
    fn from(error: BookingRepositoryError) -> Self {
        Self::Unexpected(anyhow::Error::new(error).context("reservation storage failed"))
    }
}

impl From<TxError> for ReservationError {
    fn from(error: TxError) -> Self {
        Self::Unexpected(anyhow::Error::new(error).context("reservation transaction failed"))
    }
}

impl From<LockError> for ReservationError {
    fn from(error: LockError) -> Self {
        match error {
            LockError::Unavailable(source) => Self::LockUnavailable(source),
            other => Self::Busy(other),
        }
    }
}

/// Marks the seat map of `schedule` as changing, inside the change's transaction.
async fn marked(
    catalog: &Catalog,
    schedule: domain::booking::ScheduleId,
) -> Result<Option<WriteMark>, ReservationError> {
    catalog.seats_changing(schedule).await.map_err(|e| match e {
        CatalogError::CacheUnavailable(source) => {
            ReservationError::CacheUnavailable(anyhow::Error::new(source))
        }
        other => ReservationError::Unexpected(anyhow::Error::new(other)),
    })
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
    /// cancelled, or a hold that ran out), [`ReservationError::Busy`],
    /// [`ReservationError::LockUnavailable`]; nothing changes on any of them.
    #[tracing::instrument(name = "cancel_reservation", skip(self), fields(%user, %id))]
    pub async fn cancel(&self, user: UserId, id: ReservationId) -> Result<Reservation, ReservationError> {
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
            &seat_lock_key(reservation.schedule_id, reservation.seat_number),
            WaitPolicy::WaitUpTo(CANCEL_LOCK_WAIT),
            move |tx| {
                Box::pin(async move {
                    // Inside: the SQL allows the change only from a hold that still lasts.
                    if bookings.end_hold(tx, id, cancelled, clock::now_utc()).await? {
                        return marked(&catalog, schedule).await;
                    }
                    let now = bookings.reservation(id).await?.map(|r| r.status_at(clock::now_utc()));
                    Err(ReservationError::NotHeld(now.unwrap_or(ReservationStatus::Expired)))
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
        let mut marks = Vec::new();
        for hold in due {
            let (bookings, catalog, schedule) =
                (Arc::clone(&self.bookings), self.catalog.clone(), hold.schedule_id);
            let id = hold.id;
            let ended: Result<Option<Option<WriteMark>>, ReservationError> = locked_tx(
                self.lock.as_ref(),
                self.txm.as_ref(),
                &seat_lock_key(hold.schedule_id, hold.seat_number),
                WaitPolicy::FailFast,
                move |tx| {
                    Box::pin(async move {
                        if bookings.end_hold(tx, id, ReservationStatus::Expired, clock::now_utc()).await? {
                            Ok(Some(marked(&catalog, schedule).await?))
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
                    marks.push(mark);
                }
                // Settled meanwhile (paid, cancelled, replaced, or another instance's job).
                Ok(None) => {}
                Err(ReservationError::Busy(_)) => tracing::debug!(reservation = %id, "seat busy; next round"),
                Err(error) => {
                    tracing::warn!(reservation = %id, error = format!("{error:#}"), "failed to expire a hold");
                }
            }
        }
        self.catalog.changes_done(marks).await;
        if expired > 0 {
            tracing::info!(expired, "run-out holds expired");
        }
        Ok(expired)
    }
}
