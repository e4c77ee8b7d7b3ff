//! `IdempotencyStore` on MySQL: the `idempotency_keys` table, in plain SQL.
//!
//! The insert goes through the caller's transaction, so a record exists exactly when the
//! operation it answers for committed. A second insert of one (user, key) is a duplicate
//! key (1062), reported as [`RecordError::Duplicate`].

use anyhow::Context as _;
use application::idempotency::{
    Fingerprint, IdempotencyKey, IdempotencyRecord, IdempotencyStore, RecordError,
};
use async_trait::async_trait;
use domain::unit_of_work::Tx;
use domain::user::UserId;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, SqlErr, Statement};
use time::{OffsetDateTime, PrimitiveDateTime};

use crate::tx::connection;
use crate::{DbContext as _, db_error, from_db_time, sql, to_db_time};

#[derive(Clone, Debug)]
pub struct MySqlIdempotencyStore {
    db: DatabaseConnection,
}

impl MySqlIdempotencyStore {
    #[must_use]
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

#[async_trait]
impl IdempotencyStore for MySqlIdempotencyStore {
    #[tracing::instrument(name = "idempotency.find", skip_all, fields(%user_id))]
    async fn find(&self, user_id: UserId, key: &IdempotencyKey) -> anyhow::Result<Option<IdempotencyRecord>> {
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::IDEMPOTENCY_FIND,
                [(*user_id.as_uuid()).into(), key.as_str().into()],
            ))
            .await
            .db_context("failed to read an idempotency key")?;
        let Some(row) = row else { return Ok(None) };
        let at = |column: &str| -> anyhow::Result<OffsetDateTime> {
            Ok(from_db_time(
                row.try_get::<PrimitiveDateTime>("", column).context("a stored time is unreadable")?,
            ))
        };
        Ok(Some(IdempotencyRecord {
            user_id,
            key: key.clone(),
            fingerprint: Fingerprint::restore(
                row.try_get::<String>("", "fingerprint").context("a stored fingerprint is unreadable")?,
            ),
            response: row.try_get::<String>("", "response").context("a stored response is unreadable")?,
            created_at: at("created_at")?,
            expires_at: at("expires_at")?,
        }))
    }

    #[tracing::instrument(name = "idempotency.is_recorded", skip_all, fields(%user_id))]
    async fn is_recorded(&self, tx: &mut Tx, user_id: UserId, key: &IdempotencyKey) -> anyhow::Result<bool> {
        let row = connection(tx)?
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::IDEMPOTENCY_IS_RECORDED,
                [(*user_id.as_uuid()).into(), key.as_str().into()],
            ))
            .await
            .db_context("failed to look up an idempotency key")?;
        Ok(row.is_some())
    }

    #[tracing::instrument(name = "idempotency.insert", skip_all, fields(user_id = %record.user_id))]
    async fn insert(&self, tx: &mut Tx, record: &IdempotencyRecord) -> Result<(), RecordError> {
        let inserted = connection(tx)?
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::IDEMPOTENCY_INSERT,
                [
                    (*record.user_id.as_uuid()).into(),
                    record.key.as_str().into(),
                    record.fingerprint.as_str().into(),
                    record.response.as_str().into(),
                    to_db_time(record.created_at).into(),
                    to_db_time(record.expires_at).into(),
                ],
            ))
            .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                Err(RecordError::Duplicate)
            }
            Err(e) => Err(db_error(e, "failed to store an idempotency key").into()),
        }
    }

    #[tracing::instrument(name = "idempotency.purge", skip(self))]
    async fn purge_expired(&self, now: OffsetDateTime, batch: u64) -> anyhow::Result<u64> {
        let deleted = self
            .db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                "DELETE FROM idempotency_keys WHERE expires_at < ? LIMIT ?",
                [to_db_time(now).into(), batch.into()],
            ))
            .await
            .db_context("failed to purge expired idempotency keys")?;
        Ok(deleted.rows_affected())
    }
}
