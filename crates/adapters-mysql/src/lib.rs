//! MySQL adapters, on sea-orm: the repository ports of `domain` and the transaction port
//! of `application`.
//!
//! - [`database`]: connecting, creating the database if needed, and migrating (once,
//!   even when many instances start together).
//! - [`tx`]: [`tx::MySqlTransactionManager`] and the unit of work repositories downcast.
//! - [`users`], [`points`]: the repositories.
//! - `entities`: sea-orm models. They never leave this crate; repositories convert them
//!   to domain types at the boundary.

pub mod database;
mod entities;
pub mod points;
pub mod tx;
pub mod users;

pub use sea_orm::DatabaseConnection;

use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// `DATETIME(6)` columns hold UTC wall-clock time.
fn to_db_time(at: OffsetDateTime) -> PrimitiveDateTime {
    let utc = at.to_offset(UtcOffset::UTC);
    PrimitiveDateTime::new(utc.date(), utc.time())
}

fn from_db_time(at: PrimitiveDateTime) -> OffsetDateTime {
    at.assume_utc()
}
