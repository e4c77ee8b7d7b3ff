//! Demo data (`SEED_DEMO_DATA`): a few concerts whose dates can be booked right away, so
//! that `make run` gives a client something to reserve.

use anyhow::Context as _;
use domain::booking::SeatNumber;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait, Value};
use time::{Duration, OffsetDateTime};

use crate::to_db_time;

/// (title, venue, seat prices of its dates)
const DEMO: [(&str, &str, &[i64]); 3] = [
    ("Winter Lights Orchestra", "Seoul Arts Center", &[80_000, 80_000, 120_000]),
    ("Midnight Jazz Session", "Blue Note Hall", &[55_000, 55_000]),
    ("Indie Rock Night", "Olympic Hall", &[66_000, 77_000]),
];

/// Inserts the demo catalog when there is no concert at all. Each date's booking window
/// opened a day ago and closes an hour before the show, 2 to 4 weeks from now. Returns
/// whether it seeded. The caller serialises concurrent calls (the migration lock).
///
/// # Errors
/// When a statement fails.
pub async fn seed_demo_data(db: &DatabaseConnection) -> anyhow::Result<bool> {
    let any = db
        .query_one_raw(Statement::from_string(
            DbBackend::MySql,
            "SELECT EXISTS (SELECT 1 FROM concerts) AS any_concert",
        ))
        .await
        .context("failed to look for concerts")?
        .and_then(|row| row.try_get::<i64>("", "any_concert").ok())
        .unwrap_or(0);
    if any != 0 {
        return Ok(false);
    }
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or_else(|_| OffsetDateTime::now_utc());
    // All or nothing: a start that dies half-way must not leave a catalog that stops
    // the next start from seeding.
    let txn = db.begin().await.context("failed to begin seeding")?;
    let run = |sql: String, values: Vec<Value>| {
        let txn = &txn;
        async move { txn.execute_raw(Statement::from_sql_and_values(DbBackend::MySql, sql, values)).await }
    };
    for (title, venue, prices) in DEMO {
        let concert = uuid::Uuid::now_v7();
        run(
            "INSERT INTO concerts (id, title, venue, created_at, updated_at) VALUES (?, ?, ?, ?, ?)".into(),
            vec![concert.into(), title.into(), venue.into(), to_db_time(now).into(), to_db_time(now).into()],
        )
        .await
        .context("failed to seed a concert")?;
        for (week, price) in (2_i64..).zip(prices.iter()) {
            let schedule = uuid::Uuid::now_v7();
            let starts = now + Duration::weeks(week);
            run(
                "INSERT INTO schedules (id, concert_id, starts_at, booking_opens_at, booking_closes_at, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?)"
                    .into(),
                vec![
                    schedule.into(),
                    concert.into(),
                    to_db_time(starts).into(),
                    to_db_time(now - Duration::days(1)).into(),
                    to_db_time(starts - Duration::hours(1)).into(),
                    to_db_time(now).into(),
                ],
            )
            .await
            .context("failed to seed a schedule")?;
            let rows = vec!["(?, ?, ?)"; SeatNumber::all().count()].join(", ");
            let values =
                SeatNumber::all().flat_map(|n| [schedule.into(), n.get().into(), (*price).into()]).collect();
            run(format!("INSERT INTO seats (schedule_id, seat_number, price) VALUES {rows}"), values)
                .await
                .context("failed to seed seats")?;
        }
    }
    txn.commit().await.context("failed to commit the demo catalog")?;
    tracing::info!(concerts = DEMO.len(), "demo catalog seeded");
    Ok(true)
}
