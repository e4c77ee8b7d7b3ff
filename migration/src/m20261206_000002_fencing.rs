//! Fencing in the database: the highest fencing number each fenced resource accepted.
//!
//! A write made under the point lock (a balance change) or the seat lock (a hold's take)
//! carries the lock's fencing number; the conditional update that already guards the write
//! also requires `fence <= number` and stores the number. A holder whose lease ran out
//! while it was paused carries a lower number than the holder after it, so its write
//! matches no row and is refused. 0 is "no fenced write yet".

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const UP: &[&str] = &[
    "ALTER TABLE point_accounts ADD COLUMN fence BIGINT UNSIGNED NOT NULL DEFAULT 0",
    "ALTER TABLE seats ADD COLUMN fence BIGINT UNSIGNED NOT NULL DEFAULT 0",
];

const DOWN: &[&str] =
    &["ALTER TABLE seats DROP COLUMN fence", "ALTER TABLE point_accounts DROP COLUMN fence"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(manager, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(manager, DOWN).await
    }
}
