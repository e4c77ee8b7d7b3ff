//! `PaymentRepository` on MySQL. `uq_payments_reservation` refuses a second payment of a
//! reservation, whatever got past the locks.

use async_trait::async_trait;
use domain::payment::{Payment, PaymentRepository, PaymentRepositoryError};
use domain::queue::QueueTokenId;
use domain::unit_of_work::Tx;
use domain::user::UserId;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, SqlErr, Statement};

use crate::tx::connection;
use crate::{DbContext as _, column, db_error, sql, to_db_time};

#[derive(Clone, Debug)]
pub struct MySqlPaymentRepository {
    db: DatabaseConnection,
}

impl MySqlPaymentRepository {
    #[must_use]
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

#[async_trait]
impl PaymentRepository for MySqlPaymentRepository {
    async fn insert(
        &self,
        tx: &mut Tx,
        payment: &Payment,
        queue_token: Option<QueueTokenId>,
    ) -> Result<(), PaymentRepositoryError> {
        let inserted = connection(tx)?
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::INSERT_PAYMENT,
                [
                    (*payment.id.as_uuid()).into(),
                    (*payment.reservation_id.as_uuid()).into(),
                    (*payment.user_id.as_uuid()).into(),
                    payment.amount.points().into(),
                    payment.status().into(),
                    queue_token.map(|t| *t.as_uuid()).into(),
                    to_db_time(payment.paid_at).into(),
                ],
            ))
            .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                Err(PaymentRepositoryError::AlreadyPaid)
            }
            Err(e) => Err(db_error(e, "failed to insert a payment").into()),
        }
    }

    async fn user_of_spent_token(
        &self,
        token: QueueTokenId,
    ) -> Result<Option<UserId>, PaymentRepositoryError> {
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                "SELECT user_id FROM payments WHERE queue_token = ? LIMIT 1",
                [(*token.as_uuid()).into()],
            ))
            .await
            .db_context("failed to read a payment")?;
        Ok(row.map(|row| column(&row, "user_id").map(UserId::from_uuid)).transpose()?)
    }
}
