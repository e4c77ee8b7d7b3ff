//! `OutboxStore` on MySQL: the `outbox_events` table.

use application::outbox::{OutboxEvent, OutboxStore, PendingEvent};
use async_trait::async_trait;
use domain::unit_of_work::Tx;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, Value};
use time::{OffsetDateTime, PrimitiveDateTime};

use crate::tx::connection;
use crate::{DbContext as _, column, from_db_time, sql, to_db_time};

#[derive(Clone, Debug)]
pub struct MySqlOutboxStore {
    db: DatabaseConnection,
}

impl MySqlOutboxStore {
    #[must_use]
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

#[async_trait]
impl OutboxStore for MySqlOutboxStore {
    async fn append(&self, tx: &mut Tx, event: &OutboxEvent) -> anyhow::Result<()> {
        connection(tx)?
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::APPEND_OUTBOX,
                [
                    event.id.into(),
                    event.aggregate_id.into(),
                    event.event_type.into(),
                    event.payload.clone().into(),
                    to_db_time(event.created_at).into(),
                ],
            ))
            .await
            .db_context("failed to write an outbox event")?;
        Ok(())
    }

    async fn claim(&self, tx: &mut Tx, limit: u32) -> anyhow::Result<Vec<PendingEvent>> {
        // Rows another relay holds are skipped, not waited for; an event whose aggregate
        // has an older unsent one waits for it (a plain read sees that one unsent until
        // its relay commits), so events of one aggregate go out in order.
        let rows = connection(tx)?
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::CLAIM_OUTBOX,
                [limit.into()],
            ))
            .await
            .db_context("failed to claim outbox events")?;
        rows.iter()
            .map(|row| {
                Ok(PendingEvent {
                    seq: column(row, "seq")?,
                    id: column(row, "id")?,
                    aggregate_id: column(row, "aggregate_id")?,
                    event_type: column(row, "event_type")?,
                    payload: column(row, "payload")?,
                    created_at: from_db_time(column::<PrimitiveDateTime>(row, "created_at")?),
                })
            })
            .collect()
    }

    async fn mark_sent(&self, tx: &mut Tx, seqs: &[u64], at: OffsetDateTime) -> anyhow::Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let placeholders = vec!["?"; seqs.len()].join(", ");
        let mut values: Vec<Value> = vec![to_db_time(at).into()];
        values.extend(seqs.iter().map(|seq| Value::from(*seq)));
        connection(tx)?
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                format!(
                    "UPDATE outbox_events SET sent_at = ?, attempts = attempts + 1 WHERE seq IN ({placeholders}) AND sent_at IS NULL"
                ),
                values,
            ))
            .await
            .db_context("failed to mark outbox events sent")?;
        Ok(())
    }

    async fn pending(&self) -> anyhow::Result<u64> {
        let row = self
            .db
            .query_one_raw(Statement::from_string(
                DbBackend::MySql,
                "SELECT COUNT(*) AS n FROM outbox_events WHERE sent_at IS NULL",
            ))
            .await
            .db_context("failed to count outbox events")?;
        Ok(row.map(|row| column::<i64>(&row, "n")).transpose()?.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
    }

    async fn purge_sent(&self, before: OffsetDateTime, limit: u32) -> anyhow::Result<u64> {
        let deleted = self
            .db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                "DELETE FROM outbox_events WHERE sent_at IS NOT NULL AND sent_at < ? ORDER BY sent_at LIMIT ?",
                [to_db_time(before).into(), limit.into()],
            ))
            .await
            .db_context("failed to purge sent outbox events")?;
        Ok(deleted.rows_affected())
    }
}
