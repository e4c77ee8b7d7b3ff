//! Payments: a seat hold paid with points, once.
//!
//! A payment confirms one reservation; the storage refuses a second payment of a
//! reservation whatever got past the locks.

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::booking::{Price, Reservation, ReservationId};
use crate::queue::QueueTokenId;
use crate::unit_of_work::Tx;
use crate::user::UserId;

uuid_id!(
    /// A payment's id.
    PaymentId
);

/// A completed payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub id: PaymentId,
    pub reservation_id: ReservationId,
    pub user_id: UserId,
    pub amount: Price,
    pub paid_at: OffsetDateTime,
}

impl Payment {
    /// The payment of `reservation` at its price, made `now`.
    #[must_use]
    pub fn of(reservation: &Reservation, now: OffsetDateTime) -> Self {
        Self {
            id: PaymentId::generate(),
            reservation_id: reservation.id,
            user_id: reservation.user_id,
            amount: reservation.price,
            paid_at: now,
        }
    }

    /// Payments are stored once complete: their only status.
    #[must_use]
    pub const fn status(&self) -> &'static str {
        "COMPLETED"
    }
}

/// Where payments are kept.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait PaymentRepository: Send + Sync {
    /// Stores `payment` in `tx`, with the queue token it ends.
    ///
    /// # Errors
    /// [`PaymentRepositoryError::AlreadyPaid`] when the reservation has a payment already
    /// (the storage's unique key).
    async fn insert(
        &self,
        tx: &mut Tx,
        payment: &Payment,
        queue_token: Option<QueueTokenId>,
    ) -> Result<(), PaymentRepositoryError>;

    /// The user whose payment ended `token`, if one did: so that a retry of that payment
    /// with its (now expired) token can still get its answer back.
    async fn user_of_spent_token(
        &self,
        token: QueueTokenId,
    ) -> Result<Option<UserId>, PaymentRepositoryError>;
}

#[derive(Debug, thiserror::Error)]
pub enum PaymentRepositoryError {
    #[error("the reservation is paid already")]
    AlreadyPaid,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::booking::{ReservationStatus, ScheduleId, SeatNumber};

    #[test]
    fn a_payment_is_of_its_reservation_at_its_price() {
        let now = OffsetDateTime::now_utc();
        let reservation = Reservation {
            id: ReservationId::generate(),
            user_id: UserId::generate(),
            schedule_id: ScheduleId::generate(),
            seat_number: SeatNumber::new(4).unwrap(),
            price: Price::new(80_000).unwrap(),
            status: ReservationStatus::Held,
            held_until: now,
            created_at: now,
        };
        let payment = Payment::of(&reservation, now);
        assert_eq!(
            (payment.reservation_id, payment.user_id, payment.amount, payment.status()),
            (reservation.id, reservation.user_id, reservation.price, "COMPLETED")
        );
    }
}
