//! `CatalogRepository` on MySQL: concerts, their dates and seats, and the admin writes.

use anyhow::Context as _;
use async_trait::async_trait;
use domain::booking::{
    BookingRepositoryError, BookingWindow, CatalogRepository, Concert, ConcertId, Label, NewSchedule,
    Schedule, ScheduleId, Seat, SeatNumber,
};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, QueryResult, Statement, TransactionTrait, Value,
};

use crate::booking::seat_from;
use crate::{DbContext as _, column, commit_error, from_db_time, sql, to_db_time};

#[derive(Clone, Debug)]
pub struct MySqlCatalogRepository {
    db: DatabaseConnection,
}

impl MySqlCatalogRepository {
    #[must_use]
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

fn concert_from(row: &QueryResult) -> anyhow::Result<Concert> {
    Ok(Concert {
        id: ConcertId::from_uuid(column(row, "id")?),
        title: Label::new("title", &column::<String>(row, "title")?).context("a stored title")?,
        venue: Label::new("venue", &column::<String>(row, "venue")?).context("a stored venue")?,
    })
}

fn schedule_from(row: &QueryResult) -> anyhow::Result<Schedule> {
    let starts_at = from_db_time(column(row, "starts_at")?);
    let window = BookingWindow::new(
        from_db_time(column(row, "booking_opens_at")?),
        from_db_time(column(row, "booking_closes_at")?),
        starts_at,
    )
    .context("a stored booking window is invalid")?;
    Ok(Schedule {
        id: ScheduleId::from_uuid(column(row, "id")?),
        concert_id: ConcertId::from_uuid(column(row, "concert_id")?),
        starts_at,
        window,
    })
}

const SCHEDULE_COLUMNS: &str = "id, concert_id, starts_at, booking_opens_at, booking_closes_at";

#[async_trait]
impl CatalogRepository for MySqlCatalogRepository {
    async fn concerts(&self) -> Result<Vec<Concert>, BookingRepositoryError> {
        let rows = crate::query_all(&self.db, sql::CONCERTS, vec![], "failed to list concerts").await?;
        Ok(rows.iter().map(concert_from).collect::<anyhow::Result<_>>()?)
    }

    async fn concert(&self, id: ConcertId) -> Result<Option<Concert>, BookingRepositoryError> {
        let rows = crate::query_all(
            &self.db,
            sql::CONCERT,
            vec![(*id.as_uuid()).into()],
            "failed to read a concert",
        )
        .await?;
        Ok(rows.first().map(concert_from).transpose()?)
    }

    async fn schedules_of(&self, concert: ConcertId) -> Result<Vec<Schedule>, BookingRepositoryError> {
        let rows = crate::query_all(
            &self.db,
            sql::CONCERT_SCHEDULES,
            vec![(*concert.as_uuid()).into()],
            "failed to list a concert's schedules",
        )
        .await?;
        Ok(rows.iter().map(schedule_from).collect::<anyhow::Result<_>>()?)
    }

    async fn schedule(&self, id: ScheduleId) -> Result<Option<Schedule>, BookingRepositoryError> {
        let rows = crate::query_all(
            &self.db,
            sql::SCHEDULE,
            vec![(*id.as_uuid()).into()],
            "failed to read a schedule",
        )
        .await?;
        Ok(rows.first().map(schedule_from).transpose()?)
    }

    async fn seats(&self, schedule: ScheduleId) -> Result<Vec<Seat>, BookingRepositoryError> {
        let rows = crate::query_all(
            &self.db,
            sql::SEAT_MAP,
            vec![(*schedule.as_uuid()).into()],
            "failed to read a seat map",
        )
        .await?;
        Ok(rows.iter().map(|row| seat_from(row, schedule)).collect::<anyhow::Result<_>>()?)
    }

    async fn insert_concert(&self, concert: &Concert) -> Result<(), BookingRepositoryError> {
        let now = to_db_time(time::OffsetDateTime::now_utc());
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                "INSERT INTO concerts (id, title, venue, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                [
                    (*concert.id.as_uuid()).into(),
                    concert.title.as_str().into(),
                    concert.venue.as_str().into(),
                    now.into(),
                    now.into(),
                ],
            ))
            .await
            .db_context("failed to insert a concert")?;
        Ok(())
    }

    async fn update_concert(&self, concert: &Concert) -> Result<bool, BookingRepositoryError> {
        let now = to_db_time(time::OffsetDateTime::now_utc());
        // Rows *matched*, not changed: an update to the same values still finds the row.
        let found = crate::query_all(
            &self.db,
            "SELECT 1 AS found FROM concerts WHERE id = ?",
            vec![(*concert.id.as_uuid()).into()],
            "failed to read a concert",
        )
        .await?;
        if found.is_empty() {
            return Ok(false);
        }
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                "UPDATE concerts SET title = ?, venue = ?, updated_at = ? WHERE id = ?",
                [
                    concert.title.as_str().into(),
                    concert.venue.as_str().into(),
                    now.into(),
                    (*concert.id.as_uuid()).into(),
                ],
            ))
            .await
            .db_context("failed to update a concert")?;
        Ok(true)
    }

    async fn insert_schedule(&self, new: &NewSchedule) -> Result<bool, BookingRepositoryError> {
        let schedule = &new.schedule;
        let txn = self.db.begin().await.db_context("failed to begin a transaction")?;
        // The concert row is locked so that it cannot vanish under its new date.
        let concert = txn
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                "SELECT id FROM concerts WHERE id = ? LOCK IN SHARE MODE",
                [(*schedule.concert_id.as_uuid()).into()],
            ))
            .await
            .db_context("failed to read a concert")?;
        if concert.is_none() {
            return Ok(false);
        }
        let now = to_db_time(time::OffsetDateTime::now_utc());
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            format!("INSERT INTO schedules ({SCHEDULE_COLUMNS}, created_at) VALUES (?, ?, ?, ?, ?, ?)"),
            [
                (*schedule.id.as_uuid()).into(),
                (*schedule.concert_id.as_uuid()).into(),
                to_db_time(schedule.starts_at).into(),
                to_db_time(schedule.window.opens_at()).into(),
                to_db_time(schedule.window.closes_at()).into(),
                now.into(),
            ],
        ))
        .await
        .db_context("failed to insert a schedule")?;
        let placeholders = vec!["(?, ?, ?)"; SeatNumber::all().count()].join(", ");
        let values: Vec<Value> = SeatNumber::all()
            .flat_map(|seat| {
                [(*schedule.id.as_uuid()).into(), seat.get().into(), new.seat_price.points().into()]
            })
            .collect();
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            format!("INSERT INTO seats (schedule_id, seat_number, price) VALUES {placeholders}"),
            values,
        ))
        .await
        .db_context("failed to insert seats")?;
        txn.commit().await.map_err(|e| commit_error(e, "failed to commit a new schedule"))?;
        Ok(true)
    }
}
