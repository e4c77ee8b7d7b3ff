//! `RankingSource` on MySQL: the completed payments the popular-concert ranking counts,
//! read through reservation and date to their concert. See `docs/ranking.md`.
//!
//! These run when Redis lost the ranking (a rebuild, one instance at a time) or cannot
//! answer (then at most once per instance per few seconds), and once per new date the
//! outbox relay meets; never per request. The window's payments are found through
//! `ix_payments_paid_at` (migration `m20261206_000004`), then primary-key lookups.

use application::ranking::{ConcertCount, RankingSource, Sale};
use async_trait::async_trait;
use domain::booking::{ConcertId, ScheduleId};
use domain::payment::PaymentId;
use sea_orm::DatabaseConnection;
use time::OffsetDateTime;

use crate::{column, from_db_time, to_db_time};

/// Every completed payment paid at or after a time, with its concert.
const SALES_SINCE: &str = "SELECT p.id AS payment_id, s.concert_id AS concert_id, p.paid_at AS paid_at \
     FROM payments p \
     JOIN reservations r ON r.id = p.reservation_id \
     JOIN schedules s ON s.id = r.schedule_id \
     WHERE p.status = 'COMPLETED' AND p.paid_at >= ?";

/// Completed payments paid at or after a time, per concert.
const COUNTS_SINCE: &str = "SELECT s.concert_id AS concert_id, COUNT(*) AS n \
     FROM payments p \
     JOIN reservations r ON r.id = p.reservation_id \
     JOIN schedules s ON s.id = r.schedule_id \
     WHERE p.status = 'COMPLETED' AND p.paid_at >= ? \
     GROUP BY s.concert_id";

/// The concert of one date.
const CONCERT_OF: &str = "SELECT concert_id FROM schedules WHERE id = ?";

#[derive(Clone, Debug)]
pub struct MySqlRankingSource {
    db: DatabaseConnection,
}

impl MySqlRankingSource {
    #[must_use]
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

#[async_trait]
impl RankingSource for MySqlRankingSource {
    #[tracing::instrument(name = "ranking.mysql.sales_since", skip(self))]
    async fn sales_since(&self, since: OffsetDateTime) -> anyhow::Result<Vec<Sale>> {
        let rows = crate::query_all(
            &self.db,
            SALES_SINCE,
            vec![to_db_time(since).into()],
            "failed to read the ranking's payments",
        )
        .await?;
        rows.iter()
            .map(|row| -> anyhow::Result<Sale> {
                Ok(Sale {
                    payment: PaymentId::from_uuid(column(row, "payment_id")?),
                    concert: ConcertId::from_uuid(column(row, "concert_id")?),
                    paid_at: from_db_time(column(row, "paid_at")?),
                })
            })
            .collect()
    }

    #[tracing::instrument(name = "ranking.mysql.counts_since", skip(self))]
    async fn counts_since(&self, since: OffsetDateTime) -> anyhow::Result<Vec<ConcertCount>> {
        let rows = crate::query_all(
            &self.db,
            COUNTS_SINCE,
            vec![to_db_time(since).into()],
            "failed to count the ranking's payments",
        )
        .await?;
        rows.iter()
            .map(|row| -> anyhow::Result<ConcertCount> {
                Ok(ConcertCount {
                    concert: ConcertId::from_uuid(column(row, "concert_id")?),
                    reservations: u64::try_from(column::<i64>(row, "n")?).unwrap_or(0),
                })
            })
            .collect()
    }

    async fn concert_of(&self, schedule: ScheduleId) -> anyhow::Result<Option<ConcertId>> {
        let rows = crate::query_all(
            &self.db,
            CONCERT_OF,
            vec![(*schedule.as_uuid()).into()],
            "failed to read a date's concert",
        )
        .await?;
        let Some(row) = rows.first() else { return Ok(None) };
        Ok(Some(ConcertId::from_uuid(column(row, "concert_id")?)))
    }
}
