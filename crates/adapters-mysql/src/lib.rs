//! MySQL adapters, on sea-orm: the repository ports of `domain` and the transaction port
//! of `application`.
//!
//! - [`database`]: connecting, creating the database if needed, and migrating (once,
//!   even when many instances start together).
//! - [`tx`]: [`tx::MySqlTransactionManager`] and the unit of work repositories downcast.
//! - [`users`], [`points`]: the repositories; [`idempotency`]: the idempotency-key store.
//! - `entities`: sea-orm models. They never leave this crate; repositories convert them
//!   to domain types at the boundary.

pub mod database;
mod entities;
pub mod idempotency;
pub mod points;
pub mod tx;
pub mod users;

pub use sea_orm::DatabaseConnection;

use domain::unavailable::Unavailable;
use sea_orm::{DbErr, RuntimeErr};

use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// `DATETIME(6)` columns hold UTC wall-clock time.
fn to_db_time(at: OffsetDateTime) -> PrimitiveDateTime {
    let utc = at.to_offset(UtcOffset::UTC);
    PrimitiveDateTime::new(utc.date(), utc.time())
}

fn from_db_time(at: PrimitiveDateTime) -> OffsetDateTime {
    at.assume_utc()
}

/// MySQL / MariaDB error numbers that mean "try again": lock-wait timeout, deadlock,
/// MariaDB's `max_statement_time` and MySQL's `max_execution_time` exceeded, too many
/// connections, server shutting down, connection killed, server gone away / lost.
const RETRYABLE_ERRORS: [(u16, &str); 9] = [
    (1205, "lock wait timeout"),
    (1213, "deadlock"),
    (1969, "statement timeout"),
    (3024, "statement timeout"),
    (1040, "too many connections"),
    (1053, "server shutting down"),
    (1927, "connection killed"),
    (2006, "server gone away"),
    (2013, "connection lost"),
];

/// Why `error` is worth a retry, or `None` when it is not (a bug, a constraint).
fn retryable(error: &DbErr) -> Option<&'static str> {
    use sea_orm::sqlx::Error as Sqlx;
    match error {
        DbErr::ConnectionAcquire(_) => Some("no connection could be had"),
        DbErr::Conn(_) => Some("unreachable"),
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => match e.as_ref() {
            Sqlx::Io(_) | Sqlx::Tls(_) | Sqlx::PoolTimedOut | Sqlx::PoolClosed | Sqlx::WorkerCrashed => {
                Some("unreachable")
            }
            Sqlx::Database(db) => {
                let number = db.try_downcast_ref::<sea_orm::sqlx::mysql::MySqlDatabaseError>()?.number();
                RETRYABLE_ERRORS.iter().find(|(n, _)| *n == number).map(|(_, reason)| *reason)
            }
            _ => None,
        },
        _ => None,
    }
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

/// `error` with context `what`, marked [`Unavailable`] when a retry may succeed.
fn db_error(error: DbErr, what: &'static str) -> anyhow::Error {
    match retryable(&error) {
        Some(reason) => anyhow::Error::new(Unavailable { reason, source: Box::new(error) }).context(what),
        None => anyhow::Error::new(error).context(what),
    }
}
