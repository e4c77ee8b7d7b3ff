//! Schema migrations of the concert service, applied at start-up by every instance
//! (`adapters_mysql::database::prepare` serialises concurrent runs with a MySQL named lock).
//!
//! Migrations are plain MySQL DDL: the constraints are part of the design (money columns
//! that cannot go negative or pass the ceiling), and DDL states them most plainly.

pub use sea_orm_migration::MigratorTrait;
use sea_orm_migration::prelude::*;

mod m20261121_000001_users_and_points;
mod m20261122_000001_idempotency_keys;
mod m20261122_000002_waiting_queue;
mod m20261122_000003_booking;
mod m20261122_000004_payments;
mod m20261206_000001_identity;
mod m20261206_000002_fencing;
mod m20261206_000003_coupons;
mod m20261206_000004_payments_paid_at;

/// Runs `statements` in order on the migration's connection: every migration here is a
/// list of plain DDL statements, up and down.
async fn execute_all(manager: &SchemaManager<'_>, statements: &[&str]) -> Result<(), DbErr> {
    for statement in statements {
        manager.get_connection().execute_unprepared(statement).await?;
    }
    Ok(())
}

/// Every migration, oldest first.
#[derive(Debug)]
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261121_000001_users_and_points::Migration),
            Box::new(m20261122_000001_idempotency_keys::Migration),
            Box::new(m20261122_000002_waiting_queue::Migration),
            Box::new(m20261122_000003_booking::Migration),
            Box::new(m20261122_000004_payments::Migration),
            Box::new(m20261206_000001_identity::Migration),
            Box::new(m20261206_000002_fencing::Migration),
            Box::new(m20261206_000003_coupons::Migration),
            Box::new(m20261206_000004_payments_paid_at::Migration),
        ]
    }
}
