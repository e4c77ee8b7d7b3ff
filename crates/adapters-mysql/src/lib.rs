//! MySQL adapters, on sea-orm: the repository ports of `domain` and the transaction port
//! of `application`.
//!
//! - [`database`]: connecting, creating the database if needed, and migrating (once,
//!   even when many instances start together).
//! - [`tx`]: [`tx::MySqlTransactionManager`] and the unit of work repositories downcast.
//! - [`users`], [`points`]: the repositories; [`idempotency`]: the idempotency-key store;
//!   [`queue`]: the waiting queue's baseline adapter.
//! - [`coupons`]: campaigns and first-come coupons, each insert counted against its
//!   campaign's quantity in the insert's transaction.
//! - [`ranking`]: what the popular-concert ranking reads from MySQL (completed payments
//!   by concert), when Redis lost it or cannot answer; its statements live beside it.
//! - [`sql`]: the hot statements the adapters run, and the list `docs/explain.sh` explains.
//! - `entities`: sea-orm models. They never leave this crate; repositories convert them
//!   to domain types at the boundary.

pub mod booking;
pub mod catalog;
pub mod coupons;
pub mod database;
mod entities;
pub mod idempotency;
pub mod outbox;
pub mod payments;
pub mod points;
pub mod queue;
pub mod ranking;
pub mod seed;
pub mod signing_keys;
pub mod sql;
pub mod tx;
pub mod users;

pub use sea_orm::DatabaseConnection;

use domain::unavailable::{OutcomeUnknown, Unavailable};
use sea_orm::{DbErr, RuntimeErr};

use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// Column `name` of a raw query's row, with the column named in the error.
fn column<T: sea_orm::TryGetable>(row: &sea_orm::QueryResult, name: &str) -> anyhow::Result<T> {
    use anyhow::Context as _;
    row.try_get::<T>("", name).with_context(|| format!("column {name} unreadable"))
}

/// `DATETIME(6)` columns hold UTC wall-clock time.
fn to_db_time(at: OffsetDateTime) -> PrimitiveDateTime {
    let utc = at.to_offset(UtcOffset::UTC);
    PrimitiveDateTime::new(utc.date(), utc.time())
}

fn from_db_time(at: PrimitiveDateTime) -> OffsetDateTime {
    at.assume_utc()
}

/// MySQL / MariaDB server error numbers that mean "try again": the statement failed and
/// its transaction is rolled back, but the same request may succeed shortly.
const RETRYABLE_ERRORS: [(u16, &str); 12] = [
    (SNAPSHOT_CONFLICT, "record changed since the snapshot"),
    (1205, "lock wait timeout"),
    (1213, "deadlock"),
    (1969, "statement timeout"), // MariaDB max_statement_time
    (3024, "statement timeout"), // MySQL max_execution_time
    (1317, "query interrupted"),
    (1040, "too many connections"),
    (1053, "server shutting down"),
    (1927, "connection killed"),      // MariaDB
    (4031, "idle connection closed"), // MySQL 8
    (1290, "server read-only"),       // a primary demoted during a failover
    (1836, "server read-only"),
];

/// Whether `error` is the connection itself failing (as opposed to the server answering
/// with an error): what was sent may or may not have been carried out.
fn connection_lost(error: &DbErr) -> bool {
    use sea_orm::sqlx::Error as Sqlx;
    match error {
        DbErr::Conn(_) => true,
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => {
            matches!(e.as_ref(), Sqlx::Io(_) | Sqlx::WorkerCrashed)
        }
        _ => false,
    }
}

/// The server's error number, when `error` is the server answering with an error.
fn server_error_number(error: &DbErr) -> Option<u16> {
    match error {
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => match e.as_ref() {
            sea_orm::sqlx::Error::Database(db) => {
                Some(db.try_downcast_ref::<sea_orm::sqlx::mysql::MySqlDatabaseError>()?.number())
            }
            _ => None,
        },
        _ => None,
    }
}

/// MariaDB 11.6+ (`innodb_snapshot_isolation`): a write to a row changed since the
/// transaction's snapshot fails with this instead of reading the latest version.
const SNAPSHOT_CONFLICT: u16 = 1020;

/// Why `error` is worth a retry, or `None` when it is not (a bug, a constraint).
fn retryable(error: &DbErr) -> Option<&'static str> {
    use sea_orm::sqlx::Error as Sqlx;
    match error {
        DbErr::ConnectionAcquire(_) => Some("no connection could be had"),
        DbErr::Conn(_) => Some("unreachable"),
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => match e.as_ref() {
            // Not TLS: a refused certificate is a misconfiguration, not worth retrying.
            Sqlx::Io(_) | Sqlx::PoolTimedOut | Sqlx::PoolClosed | Sqlx::WorkerCrashed => Some("unreachable"),
            Sqlx::Database(_) => {
                let number = server_error_number(error)?;
                RETRYABLE_ERRORS.iter().find(|(n, _)| *n == number).map(|(_, reason)| *reason)
            }
            _ => None,
        },
        _ => None,
    }
}

/// Every row of a raw read `sql` with `values`, its failure described as `what` (and
/// marked retryable where it is, as every read here).
async fn query_all(
    db: &sea_orm::DatabaseConnection,
    sql: &'static str,
    values: Vec<sea_orm::Value>,
    what: &'static str,
) -> anyhow::Result<Vec<sea_orm::QueryResult>> {
    use sea_orm::ConnectionTrait as _;
    db.query_all_raw(sea_orm::Statement::from_sql_and_values(sea_orm::DbBackend::MySql, sql, values))
        .await
        .db_context(what)
}

/// `.context(...)` for database results that also marks a retryable failure
/// [`Unavailable`], so that it is answered 503 instead of 500.
trait DbContext<T> {
    fn db_context(self, what: &'static str) -> anyhow::Result<T>;
}

impl<T> DbContext<T> for Result<T, DbErr> {
    fn db_context(self, what: &'static str) -> anyhow::Result<T> {
        self.map_err(|error| db_error(error, what))
    }
}

/// The `fence` column of the one row `sql` (a locking read) finds with `values`, 0 when
/// none: what a write refused by its fencing number is compared with.
pub(crate) async fn stored_fence(
    conn: &sea_orm::DatabaseTransaction,
    sql: &'static str,
    values: Vec<sea_orm::Value>,
    what: &'static str,
) -> anyhow::Result<u64> {
    use sea_orm::ConnectionTrait as _;
    let row = conn
        .query_one_raw(sea_orm::Statement::from_sql_and_values(sea_orm::DbBackend::MySql, sql, values))
        .await
        .db_context(what)?;
    Ok(row.map(|row| column::<u64>(&row, "fence")).transpose()?.unwrap_or(0))
}

/// A failed COMMIT with context `what`: when the connection failed under it, the outcome
/// is unknown ([`OutcomeUnknown`]), never "nothing changed"; when the server answered with
/// an error, it rolled back and the error is classified as any other.
pub(crate) fn commit_error(error: DbErr, what: &'static str) -> anyhow::Error {
    if connection_lost(&error) {
        anyhow::Error::new(OutcomeUnknown { source: Box::new(error) }).context(what)
    } else {
        db_error(error, what)
    }
}

/// `error` with context `what`, marked [`Unavailable`] when a retry may succeed.
fn db_error(error: DbErr, what: &'static str) -> anyhow::Error {
    match retryable(&error) {
        Some(reason) => anyhow::Error::new(Unavailable { reason, source: Box::new(error) }).context(what),
        None => anyhow::Error::new(error).context(what),
    }
}
