//! Pay for a seat hold with points.
//!
//! 1. Outside any lock (fail fast): the reservation exists and is the caller's (else 404,
//!    another user's included), is a hold that still lasts (else EXPIRED / ALREADY_PAID).
//! 2. `lock:{reservation:<id>}`, failing fast: another payment of this hold is running, and
//!    this one would only be refused after it (409 `PAYMENT_IN_PROGRESS`).
//! 3. `lock:{point:<userId>}`, waiting: shared with charges, so a charge and a payment of one
//!    user never run at once. Always in this order (reservation, then points): a lock
//!    order that no other use case inverts (charges take only the second). With an
//!    `Idempotency-Key`, `lock:{idem:...}` comes before both. All of them are taken by the
//!    one [`locked_tx`], which watches every lease up to the commit.
//! 4. One transaction: the reservation HELD -> CONFIRMED while the hold lasts and its seat
//!    SOLD (conditional updates, rows affected checked); the balance deducted (row locked,
//!    compare-and-set on its version, never below zero) with a USE history row; the
//!    payment (unique per reservation); the `PaymentCompleted` event in the outbox; the
//!    idempotency record; the seat map marked as changing. Commit, unlock (points, then
//!    reservation).
//! 5. After commit: the seat map mark lifted and the queue token expired (also when a
//!    request replays a payment: the first may have been cut off before this step), then
//!    the answer.
//!
//! With an `Idempotency-Key` all of it runs through [`Idempotency`]: at most once per
//! (user, key), the first answer recorded in the payment's own transaction.

use std::sync::Arc;
use std::time::Duration;

use domain::booking::{
    BookingRepository, BookingRepositoryError, Price, Reservation, ReservationId, ReservationStatus,
};
use domain::coupon::{CouponId, CouponRepository, CouponRepositoryError};
use domain::payment::{Payment, PaymentRepository, PaymentRepositoryError};
use domain::point::{PointAmount, PointError, PointRepository, PointRepositoryError};
use domain::queue::QueueTokenId;
use domain::user::UserId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::cache::WriteMark;
use crate::catalog::Catalog;
use crate::clock;
use crate::detach::run_to_end;
use crate::failure::Failure;
use crate::idempotency::{Fingerprint, Idempotency, IdempotencyError, IdempotencyKey, Outcome, Recorder};
use crate::lock::{DistributedLock, LockKey, LockRequest};
use crate::outbox::{OutboxEvent, OutboxStore};
use crate::queue::WaitingQueue;
use crate::tx::{TransactionManager, locked_tx};

/// The event type a payment writes to the outbox.
pub const PAYMENT_COMPLETED: &str = "PaymentCompleted";

/// A payment as answered (and as its idempotency record keeps it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentView {
    pub id: Uuid,
    pub reservation_id: Uuid,
    /// Points deducted: the seat's price, less the coupon's discount (never below zero).
    pub amount: i64,
    pub status: String,
    #[serde(with = "time::serde::rfc3339")]
    pub paid_at: OffsetDateTime,
    /// The coupon the payment used, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coupon_id: Option<Uuid>,
    /// The queue token the payment ended (kept in its idempotency record, not answered):
    /// a replay expires that one, not whatever token the retry came with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_token: Option<Uuid>,
}

impl PaymentView {
    fn of(payment: &Payment, token: QueueTokenId, coupon: Option<CouponId>) -> Self {
        Self {
            id: *payment.id.as_uuid(),
            reservation_id: *payment.reservation_id.as_uuid(),
            amount: payment.amount.points(),
            status: payment.status().to_owned(),
            paid_at: payment.paid_at,
            coupon_id: coupon.map(|id| *id.as_uuid()),
            queue_token: Some(*token.as_uuid()),
        }
    }
}

/// The `PaymentCompleted` event, as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentCompleted {
    pub event_id: Uuid,
    pub payment_id: Uuid,
    pub reservation_id: Uuid,
    pub user_id: Uuid,
    pub schedule_id: Uuid,
    pub seat_number: u8,
    pub amount: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub paid_at: OffsetDateTime,
}

#[derive(Debug, thiserror::Error)]
pub enum PayError {
    /// No such reservation, or another user's (not told apart).
    #[error("reservation {0} not found")]
    ReservationNotFound(ReservationId),
    /// The hold ran out, or was cancelled.
    #[error("the reservation is {}, no longer a hold that can be paid", .0.as_str())]
    ReservationExpired(ReservationStatus),
    #[error("the reservation is paid already")]
    AlreadyPaid,
    /// Another payment of this reservation is running right now.
    #[error("a payment of this reservation is in progress")]
    PaymentInProgress,
    #[error("the balance of {balance} points does not cover {amount}")]
    InsufficientBalance { balance: i64, amount: i64 },
    #[error("the idempotency key was used for a different payment")]
    IdempotencyKeyReused,
    /// No such coupon, or another user's (not told apart).
    #[error("coupon {0} not found")]
    CouponNotFound(CouponId),
    /// The coupon is used already, or expired.
    #[error("the coupon is {0}")]
    CouponNotUsable(&'static str),
    /// The user's points stayed locked for the whole wait, a lost lease, an unavailable
    /// lock store or cache, the database: nothing changed.
    #[error(transparent)]
    Failure(Failure),
}

crate::failure_conversions!(PayError);

/// Pays for seat holds.
#[derive(Clone)]
pub struct Pay {
    bookings: Arc<dyn BookingRepository>,
    points: Arc<dyn PointRepository>,
    payments: Arc<dyn PaymentRepository>,
    coupons: Arc<dyn CouponRepository>,
    outbox: Arc<dyn OutboxStore>,
    catalog: Catalog,
    queue: Arc<dyn WaitingQueue>,
    lock: Arc<dyn DistributedLock>,
    txm: Arc<dyn TransactionManager>,
    idempotency: Idempotency,
    point_lock_wait: Duration,
}

impl std::fmt::Debug for Pay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pay").finish_non_exhaustive()
    }
}

/// What [`Pay::new`] needs.
#[derive(Clone)]
#[allow(missing_debug_implementations, reason = "ports")]
pub struct PayPorts {
    pub bookings: Arc<dyn BookingRepository>,
    pub points: Arc<dyn PointRepository>,
    pub payments: Arc<dyn PaymentRepository>,
    /// The coupons a payment may use.
    pub coupons: Arc<dyn CouponRepository>,
    pub outbox: Arc<dyn OutboxStore>,
    pub catalog: Catalog,
    pub queue: Arc<dyn WaitingQueue>,
    pub lock: Arc<dyn DistributedLock>,
    pub txm: Arc<dyn TransactionManager>,
    pub idempotency: Idempotency,
}

/// What a payment's key stands for: the reservation, and the coupon when there is one (the
/// same key with another coupon is another request). Without a coupon the fingerprint is
/// what it was before coupons existed, so keys stored then still replay.
fn fingerprint(reservation: ReservationId, coupon: Option<CouponId>) -> Fingerprint {
    let request = match coupon {
        None => serde_json::json!({ "reservationId": reservation.to_string() }),
        Some(coupon) => {
            serde_json::json!({ "reservationId": reservation.to_string(), "couponId": coupon.to_string() })
        }
    };
    Fingerprint::of("pay", &request)
}

impl Pay {
    #[must_use]
    pub fn new(ports: PayPorts, point_lock_wait: Duration) -> Self {
        let PayPorts { bookings, points, payments, coupons, outbox, catalog, queue, lock, txm, idempotency } =
            ports;
        Self {
            bookings,
            points,
            payments,
            coupons,
            outbox,
            catalog,
            queue,
            lock,
            txm,
            idempotency,
            point_lock_wait,
        }
    }

    /// Pays `reservation_id` for `user_id`, who holds the ACTIVE queue `token` (expired
    /// once paid). With `key`, a repetition answers the first payment
    /// ([`Outcome::Replayed`]) and changes nothing.
    ///
    /// # Errors
    /// See [`PayError`]; on every error nothing is changed.
    ///
    /// The payment runs to its end on a task of its own ([`run_to_end`]): once it has
    /// committed, its locks are released, the seat map's mark lifted and the token expired
    /// whatever the client does.
    #[tracing::instrument(name = "pay", skip(self, token, key), fields(%user_id, reservation = %reservation_id, keyed = key.is_some()))]
    pub async fn execute(
        &self,
        user_id: UserId,
        token: QueueTokenId,
        reservation_id: ReservationId,
        coupon: Option<CouponId>,
        key: Option<IdempotencyKey>,
    ) -> Result<Outcome<PaymentView>, PayError> {
        let this = self.clone();
        run_to_end(async move { this.pay(user_id, token, reservation_id, coupon, key).await }).await
    }

    async fn pay(
        &self,
        user_id: UserId,
        token: QueueTokenId,
        reservation_id: ReservationId,
        coupon: Option<CouponId>,
        key: Option<IdempotencyKey>,
    ) -> Result<Outcome<PaymentView>, PayError> {
        let outcome = self
            .idempotency
            .run(user_id, key, fingerprint(reservation_id, coupon), |recorder| async move {
                let reservation = self.payable(user_id, reservation_id).await?;
                let (view, mark) = self.pay_under_lock(reservation, token, coupon, recorder).await?;
                // After the commit: every instance shows the seat SOLD from here.
                self.catalog.changes_done([mark]).await;
                Ok::<_, PayError>(view)
            })
            .await?;
        // The token the payment ended has done its work, whether this request paid or
        // replays a payment (whose own request may have been cut off before it got here).
        // Expiring twice is harmless.
        let spent = outcome.clone().into_inner().queue_token.map_or(token, QueueTokenId::from_uuid);
        if let Err(error) = self.queue.expire(spent).await {
            tracing::warn!(
                error = format!("{error:#}"),
                "the paid queue token could not be expired; it runs out on its own"
            );
        }
        tracing::info!(replayed = outcome.is_replay(), "paid");
        Ok(outcome)
    }

    /// The answer of an earlier payment of `reservation_id` under `key`, if there is one:
    /// for a retry whose queue token that payment expired.
    ///
    /// # Errors
    /// [`PayError::IdempotencyKeyReused`] when the key was used for another request.
    pub async fn replay(
        &self,
        user_id: UserId,
        reservation_id: ReservationId,
        coupon: Option<CouponId>,
        key: &IdempotencyKey,
    ) -> Result<Option<PaymentView>, PayError> {
        Ok(self.idempotency.lookup(user_id, key, &fingerprint(reservation_id, coupon)).await?)
    }

    /// The user whose payment expired `token`, if one did.
    ///
    /// # Errors
    /// When the payments cannot be read.
    pub async fn user_of_spent_token(&self, token: QueueTokenId) -> Result<Option<UserId>, PayError> {
        self.payments
            .user_of_spent_token(token)
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to read payments").into())
    }

    /// The fail-fast checks: the caller's reservation, a hold that still lasts.
    async fn payable(&self, user_id: UserId, id: ReservationId) -> Result<Reservation, PayError> {
        let reservation = self
            .bookings
            .reservation(id)
            .await?
            .filter(|r| r.user_id == user_id)
            .ok_or(PayError::ReservationNotFound(id))?;
        // The stored status only: whether a hold still lasts is the database's call (its
        // clock, in the confirming statement), not this instance's, whose clock may run
        // ahead of the `heldUntil` the client was told.
        match reservation.status {
            ReservationStatus::Held => Ok(reservation),
            ReservationStatus::Confirmed => Err(PayError::AlreadyPaid),
            other => Err(PayError::ReservationExpired(other)),
        }
    }

    async fn pay_under_lock(
        &self,
        reservation: Reservation,
        token: QueueTokenId,
        coupon: Option<CouponId>,
        recorder: Option<crate::idempotency::Recorder>,
    ) -> Result<(PaymentView, Option<WriteMark>), PayError> {
        let (bookings, points, payments, coupons, outbox, catalog) = (
            Arc::clone(&self.bookings),
            Arc::clone(&self.points),
            Arc::clone(&self.payments),
            Arc::clone(&self.coupons),
            Arc::clone(&self.outbox),
            self.catalog.clone(),
        );
        let user_id = reservation.user_id;
        // The key's lock (if keyed), then the reservation's (failing fast: another payment
        // of this hold is running), then the user's points (waiting, shared with charges).
        // Always this order; no other use case takes them the other way round.
        let locks = Recorder::locks(
            recorder.as_ref(),
            [
                LockRequest::fail_fast(LockKey::reservation(reservation.id)),
                LockRequest::wait_up_to(LockKey::point(user_id), self.point_lock_wait),
            ],
        );
        locked_tx(self.lock.as_ref(), self.txm.as_ref(), &locks, move |tx| {
            Box::pin(async move {
                // First read of the transaction (its snapshot begins here, after the
                // locks): keep it first.
                if let Some(recorder) = &recorder {
                    recorder.ensure_unrecorded(tx).await?;
                }
                let now = clock::now_utc();
                // Re-checked inside: the hold may have run out, been paid or cancelled.
                if !bookings.confirm(tx, &reservation, now).await? {
                    // Why not, as stored; a hold still stored HELD ran out by the database's
                    // clock (the confirming statement's judge).
                    let stored = bookings.reservation_in(tx, reservation.id).await?.map(|r| r.status);
                    return Err(match ReservationStatus::after_refusal(stored) {
                        ReservationStatus::Confirmed => PayError::AlreadyPaid,
                        other => PayError::ReservationExpired(other),
                    });
                }
                let mut payment = Payment::of(&reservation, now);
                if let Some(coupon) = coupon {
                    // Used in this transaction: a payment that fails below leaves it
                    // AVAILABLE.
                    let discount =
                        coupons.use_coupon(tx, coupon, user_id, payment.id, now).await.map_err(|error| {
                            match error {
                                CouponRepositoryError::NotFound => PayError::CouponNotFound(coupon),
                                CouponRepositoryError::NotUsable(why) => PayError::CouponNotUsable(why),
                                other => anyhow::Error::new(other).context("failed to use the coupon").into(),
                            }
                        })?;
                    let charged = (payment.amount.points() - discount).max(0);
                    payment.amount = Price::new(charged)
                        .map_err(|e| anyhow::Error::new(e).context("a discounted price out of range"))?;
                }
                if payment.amount.points() > 0 {
                    let amount = PointAmount::new(payment.amount.points())
                        .map_err(|e| anyhow::Error::new(e).context("a price is not a point amount"))?;
                    let mut account = points
                        .lock_account(tx, user_id)
                        .await?
                        .ok_or_else(|| anyhow::anyhow!("user {user_id} has no point account"))?;
                    let read_at = account.version();
                    let entry = account.deduct(amount, now)?;
                    points.save_balance(tx, &account, read_at).await?;
                    points.append_history(tx, &entry).await?;
                }
                payments.insert(tx, &payment, Some(token)).await?;
                let event = PaymentCompleted {
                    event_id: Uuid::now_v7(),
                    payment_id: *payment.id.as_uuid(),
                    reservation_id: *reservation.id.as_uuid(),
                    user_id: *user_id.as_uuid(),
                    schedule_id: *reservation.schedule_id.as_uuid(),
                    seat_number: reservation.seat_number.get(),
                    amount: payment.amount.points(),
                    paid_at: payment.paid_at,
                };
                outbox
                    .append(
                        tx,
                        &OutboxEvent {
                            id: event.event_id,
                            aggregate_id: event.reservation_id,
                            event_type: PAYMENT_COMPLETED,
                            payload: serde_json::to_string(&event).map_err(anyhow::Error::new)?,
                            created_at: now,
                        },
                    )
                    .await?;
                let view = PaymentView::of(&payment, token, coupon);
                if let Some(recorder) = &recorder {
                    recorder.record(tx, &view).await?;
                }
                // Before the commit: no instance shows the seat as held after this.
                let mark = catalog.seats_changing(reservation.schedule_id).await?;
                Ok((view, mark))
            })
        })
        .await
        .map_err(|error| match error {
            PayError::Failure(Failure::Contended(key)) if key.kind() == "reservation" => {
                PayError::PaymentInProgress
            }
            other => other,
        })
    }
}

impl From<IdempotencyError> for PayError {
    fn from(error: IdempotencyError) -> Self {
        match error {
            IdempotencyError::KeyReused => Self::IdempotencyKeyReused,
            IdempotencyError::Duplicate => anyhow::anyhow!("idempotency key stored twice").into(),
            IdempotencyError::Failure(failure) => Self::Failure(failure),
        }
    }
}

impl From<PointError> for PayError {
    fn from(error: PointError) -> Self {
        match error {
            PointError::InsufficientBalance { balance, amount } => {
                Self::InsufficientBalance { balance, amount }
            }
            other => anyhow::Error::new(other).context("point rule violated in storage").into(),
        }
    }
}

impl From<PointRepositoryError> for PayError {
    fn from(error: PointRepositoryError) -> Self {
        crate::failure::point_write(error, "failed to deduct points").into()
    }
}

impl From<BookingRepositoryError> for PayError {
    fn from(error: BookingRepositoryError) -> Self {
        anyhow::Error::new(error).context("failed to confirm the reservation").into()
    }
}

impl From<PaymentRepositoryError> for PayError {
    fn from(error: PaymentRepositoryError) -> Self {
        match error {
            PaymentRepositoryError::AlreadyPaid => Self::AlreadyPaid,
            PaymentRepositoryError::Unexpected(e) => e.context("failed to store the payment").into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use domain::booking::{MockBookingRepository, MockCatalogRepository, Price, ScheduleId, SeatNumber};
    use domain::payment::MockPaymentRepository;
    use domain::point::{Balance, MockPointRepository, PointAccount};
    use mockall::Sequence;

    use super::*;
    use crate::cache::Cache;
    use crate::idempotency::{DEFAULT_RETENTION, MockIdempotencyStore};
    use crate::lock::{LockError, MockDistributedLock, MockLockGuard, WaitPolicy};
    use crate::mocks::{held_guard, unit_of_work};
    use crate::outbox::MockOutboxStore;
    use crate::queue::MockWaitingQueue;
    use crate::tx::MockTransactionManager;

    fn reservation(user: UserId, status: ReservationStatus, left: time::Duration) -> Reservation {
        let now = clock::now_utc();
        Reservation {
            id: ReservationId::generate(),
            user_id: user,
            schedule_id: ScheduleId::generate(),
            seat_number: SeatNumber::new(12).unwrap(),
            price: Price::new(80_000).unwrap(),
            status,
            held_until: now + left,
            created_at: now - time::Duration::minutes(1),
        }
    }

    /// Every port, none expecting anything yet.
    struct Ports {
        bookings: MockBookingRepository,
        points: MockPointRepository,
        payments: MockPaymentRepository,
        coupons: domain::coupon::MockCouponRepository,
        outbox: MockOutboxStore,
        queue: MockWaitingQueue,
        lock: MockDistributedLock,
        txm: MockTransactionManager,
    }

    impl Ports {
        fn new() -> Self {
            Self {
                bookings: MockBookingRepository::new(),
                points: MockPointRepository::new(),
                payments: MockPaymentRepository::new(),
                coupons: domain::coupon::MockCouponRepository::new(),
                outbox: MockOutboxStore::new(),
                queue: MockWaitingQueue::new(),
                lock: MockDistributedLock::new(),
                txm: MockTransactionManager::new(),
            }
        }

        fn pay(self) -> Pay {
            let lock: Arc<dyn DistributedLock> = Arc::new(self.lock);
            let idempotency = Idempotency::new(
                Arc::new(MockIdempotencyStore::new()),
                Duration::from_secs(1),
                DEFAULT_RETENTION,
            );
            Pay::new(
                PayPorts {
                    bookings: Arc::new(self.bookings),
                    points: Arc::new(self.points),
                    payments: Arc::new(self.payments),
                    coupons: Arc::new(self.coupons),
                    outbox: Arc::new(self.outbox),
                    catalog: Catalog::new(
                        Arc::new(MockCatalogRepository::new()),
                        Arc::new(Cache::disabled()),
                    ),
                    queue: Arc::new(self.queue),
                    lock,
                    txm: Arc::new(self.txm),
                    idempotency,
                },
                Duration::from_secs(3),
            )
        }
    }

    /// A guard of `key` released once, in `released` order.
    fn guard(key: LockKey, released: &mut Sequence) -> MockLockGuard {
        let mut guard = held_guard(key);
        guard.expect_release().times(1).in_sequence(released).returning(|| Ok(()));
        guard
    }

    #[tokio::test]
    async fn a_payment_takes_the_reservation_lock_then_the_point_lock_and_releases_them_after_the_commit() {
        let user = UserId::generate();
        let held = reservation(user, ReservationStatus::Held, time::Duration::minutes(3));
        let (id, token) = (held.id, QueueTokenId::generate());
        let mut seq = Sequence::new();
        let mut ports = Ports::new();
        let read = held.clone();
        ports.bookings.expect_reservation().times(1).returning(move |_| Ok(Some(read.clone())));
        // Both guards are made up front; their releases are ordered below.
        let mut releases = Sequence::new();
        let point_guard = Mutex::new(Some(guard(LockKey::point(user), &mut releases)));
        let reservation_guard = Mutex::new(Some(guard(LockKey::reservation(id), &mut releases)));
        ports
            .lock
            .expect_acquire()
            .withf(move |key, wait| *key == LockKey::reservation(id) && *wait == WaitPolicy::FailFast)
            .times(1)
            .in_sequence(&mut seq)
            .returning(move |_, _| Ok(Box::new(reservation_guard.lock().unwrap().take().unwrap())));
        ports
            .lock
            .expect_acquire()
            .withf(move |key, wait| *key == LockKey::point(user) && matches!(wait, WaitPolicy::WaitUpTo(_)))
            .times(1)
            .in_sequence(&mut seq)
            .returning(move |_, _| Ok(Box::new(point_guard.lock().unwrap().take().unwrap())));
        let uow = unit_of_work(true);
        ports.txm.expect_begin().times(1).in_sequence(&mut seq).return_once(move || Ok(Box::new(uow)));
        ports.bookings.expect_confirm().times(1).in_sequence(&mut seq).returning(|_, _, _| Ok(true));
        ports
            .points
            .expect_lock_account()
            .times(1)
            .in_sequence(&mut seq)
            .returning(move |_, u| Ok(Some(PointAccount::restore(u, Balance::new(100_000).unwrap(), 4))));
        ports
            .points
            .expect_save_balance()
            .withf(|_, account, read_at| account.balance().points() == 20_000 && *read_at == 4)
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _, _| Ok(()));
        ports
            .points
            .expect_append_history()
            .withf(|_, entry| entry.amount().points() == 80_000 && entry.kind().as_str() == "USE")
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _| Ok(()));
        ports
            .payments
            .expect_insert()
            .withf(move |_, p, t| p.reservation_id == id && p.amount.points() == 80_000 && *t == Some(token))
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _, _| Ok(()));
        ports
            .outbox
            .expect_append()
            .withf(move |_, e| e.event_type == PAYMENT_COMPLETED && e.aggregate_id == *id.as_uuid())
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _| Ok(()));
        ports.queue.expect_expire().withf(move |t| *t == token).times(1).returning(|_| Ok(true));

        let paid = ports.pay().execute(user, token, id, None, None).await.unwrap();

        let paid = paid.into_inner();
        assert_eq!((paid.amount, paid.status.as_str()), (80_000, "COMPLETED"));
    }

    #[tokio::test]
    async fn what_can_be_told_outside_the_locks_is_refused_before_any_lock() {
        let user = UserId::generate();
        for (owner, status, left) in [
            (UserId::generate(), ReservationStatus::Held, time::Duration::minutes(3)),
            // (A HELD hold whose end passed on this instance's clock is not refused here:
            // the database's clock decides, in the confirming statement.)
            (user, ReservationStatus::Cancelled, time::Duration::minutes(3)),
            (user, ReservationStatus::Confirmed, time::Duration::minutes(3)),
        ] {
            let found = reservation(owner, status, left);
            let id = found.id;
            let mut ports = Ports::new();
            ports.bookings.expect_reservation().returning(move |_| Ok(Some(found.clone())));
            ports.lock.expect_acquire().never();
            ports.queue.expect_expire().never();
            let result = ports.pay().execute(user, QueueTokenId::generate(), id, None, None).await;
            match (owner == user, status) {
                (false, _) => {
                    assert!(matches!(result, Err(PayError::ReservationNotFound(_))), "{result:?}")
                }
                (_, ReservationStatus::Confirmed) => {
                    assert!(matches!(result, Err(PayError::AlreadyPaid)), "{result:?}")
                }
                _ => assert!(
                    matches!(result, Err(PayError::ReservationExpired(ReservationStatus::Cancelled))),
                    "{result:?}"
                ),
            }
        }
    }

    #[tokio::test]
    async fn a_payment_of_a_hold_already_being_paid_is_refused_at_once() {
        let user = UserId::generate();
        let held = reservation(user, ReservationStatus::Held, time::Duration::minutes(3));
        let id = held.id;
        let mut ports = Ports::new();
        ports.bookings.expect_reservation().returning(move |_| Ok(Some(held.clone())));
        ports.lock.expect_acquire().times(1).returning(|key, _| Err(LockError::Busy { key: key.clone() }));
        ports.txm.expect_begin().never();
        ports.queue.expect_expire().never();

        let result = ports.pay().execute(user, QueueTokenId::generate(), id, None, None).await;

        assert!(matches!(result, Err(PayError::PaymentInProgress)), "{result:?}");
    }

    /// Locks that are granted; a transaction that must roll back.
    fn granted_and_rolled_back(ports: &mut Ports, user: UserId, id: ReservationId) {
        let mut releases = Sequence::new();
        let guards = Mutex::new(vec![
            guard(LockKey::point(user), &mut releases),
            guard(LockKey::reservation(id), &mut releases),
        ]);
        ports
            .lock
            .expect_acquire()
            .times(2)
            .returning(move |_, _| Ok(Box::new(guards.lock().unwrap().pop().unwrap())));
        let uow = unit_of_work(false);
        ports.txm.expect_begin().times(1).return_once(move || Ok(Box::new(uow)));
    }

    #[tokio::test]
    async fn a_hold_past_its_end_on_this_instances_clock_is_left_to_the_database_clock() {
        let user = UserId::generate();
        // This instance's clock says the hold ran out a second ago.
        let held = reservation(user, ReservationStatus::Held, -time::Duration::seconds(1));
        let id = held.id;
        let mut ports = Ports::new();
        ports.bookings.expect_reservation().returning(move |_| Ok(Some(held.clone())));
        granted_and_rolled_back(&mut ports, user, id);
        // The database's clock decides in the confirming statement: here, ran out (the row
        // still says HELD: the expiry job has not run).
        ports.bookings.expect_confirm().times(1).returning(|_, _, _| Ok(false));
        let stored = reservation(user, ReservationStatus::Held, -time::Duration::seconds(1));
        ports.bookings.expect_reservation_in().times(1).returning(move |_, _| Ok(Some(stored.clone())));
        ports.points.expect_lock_account().never();
        ports.queue.expect_expire().never();

        let result = ports.pay().execute(user, QueueTokenId::generate(), id, None, None).await;

        assert!(
            matches!(result, Err(PayError::ReservationExpired(ReservationStatus::Expired))),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn an_insufficient_balance_changes_nothing_and_keeps_the_token() {
        let user = UserId::generate();
        let held = reservation(user, ReservationStatus::Held, time::Duration::minutes(3));
        let id = held.id;
        let mut ports = Ports::new();
        ports.bookings.expect_reservation().returning(move |_| Ok(Some(held.clone())));
        granted_and_rolled_back(&mut ports, user, id);
        ports.bookings.expect_confirm().times(1).returning(|_, _, _| Ok(true));
        ports
            .points
            .expect_lock_account()
            .returning(|_, u| Ok(Some(PointAccount::restore(u, Balance::new(79_999).unwrap(), 1))));
        ports.points.expect_save_balance().never();
        ports.payments.expect_insert().never();
        ports.outbox.expect_append().never();
        ports.queue.expect_expire().never();

        let result = ports.pay().execute(user, QueueTokenId::generate(), id, None, None).await;

        assert!(
            matches!(result, Err(PayError::InsufficientBalance { balance: 79_999, amount: 80_000 })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_hold_paid_or_run_out_under_the_lock_is_refused_and_rolled_back() {
        for (now_status, expected_paid) in
            [(ReservationStatus::Confirmed, true), (ReservationStatus::Expired, false)]
        {
            let user = UserId::generate();
            let held = reservation(user, ReservationStatus::Held, time::Duration::minutes(3));
            let id = held.id;
            let later = Reservation { status: now_status, ..held.clone() };
            let mut ports = Ports::new();
            ports.bookings.expect_reservation().times(1).returning(move |_| Ok(Some(held.clone())));
            ports.bookings.expect_reservation_in().times(1).returning(move |_, _| Ok(Some(later.clone())));
            granted_and_rolled_back(&mut ports, user, id);
            ports.bookings.expect_confirm().times(1).returning(|_, _, _| Ok(false));
            ports.points.expect_lock_account().never();
            ports.payments.expect_insert().never();
            ports.queue.expect_expire().never();

            let result = ports.pay().execute(user, QueueTokenId::generate(), id, None, None).await;

            if expected_paid {
                assert!(matches!(result, Err(PayError::AlreadyPaid)), "{result:?}");
            } else {
                assert!(matches!(result, Err(PayError::ReservationExpired(_))), "{result:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_replay_expires_the_token_its_payment_ended_not_the_one_it_came_with() {
        use crate::idempotency::IdempotencyRecord;
        let user = UserId::generate();
        let (spent, retry_token) = (QueueTokenId::generate(), QueueTokenId::generate());
        let reservation_id = ReservationId::generate();
        let first = PaymentView {
            id: Uuid::now_v7(),
            reservation_id: *reservation_id.as_uuid(),
            amount: 80_000,
            status: "COMPLETED".into(),
            paid_at: clock::now_utc(),
            coupon_id: None,
            queue_token: Some(*spent.as_uuid()),
        };
        let key = IdempotencyKey::new("pay-1").unwrap();
        let record = IdempotencyRecord {
            user_id: user,
            key: key.clone(),
            fingerprint: fingerprint(reservation_id, None),
            response: serde_json::to_string(&first).unwrap(),
            created_at: clock::now_utc(),
            expires_at: clock::now_utc() + DEFAULT_RETENTION,
        };
        let mut store = MockIdempotencyStore::new();
        store.expect_find().returning(move |_, _| Ok(Some(record.clone())));
        let mut ports = Ports::new();
        ports.bookings.expect_reservation().never();
        ports.lock.expect_acquire().never();
        ports.queue.expect_expire().withf(move |t| *t == spent).times(1).returning(|_| Ok(false));
        let mut pay = ports.pay();
        pay.idempotency = Idempotency::new(Arc::new(store), Duration::from_secs(1), DEFAULT_RETENTION);

        let outcome = pay.execute(user, retry_token, reservation_id, None, Some(key)).await.unwrap();

        assert!(outcome.is_replay());
        assert_eq!(outcome.into_inner(), first);
    }
}
