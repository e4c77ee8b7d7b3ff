//! An index on `payments.paid_at`: the popular-concert ranking reads the last day's
//! payments (its rebuild from MySQL, and its count when Redis cannot answer). Without it
//! both scan every payment ever made, and once that takes longer than the statement
//! timeout the ranking can never be rebuilt.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const UP: &[&str] = &["CREATE INDEX ix_payments_paid_at ON payments (paid_at)"];

const DOWN: &[&str] = &["DROP INDEX ix_payments_paid_at ON payments"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(manager, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(manager, DOWN).await
    }
}
