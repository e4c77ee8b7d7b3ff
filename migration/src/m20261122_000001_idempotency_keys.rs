//! Idempotency keys: one row per (user, key) of a completed operation, written in that
//! operation's transaction.
//!
//! - `PRIMARY KEY (user_id, idem_key)`: keys are scoped to the user, and a second run of
//!   one key cannot commit (its insert fails and its whole transaction rolls back).
//! - `idem_key` is `ascii_bin`: keys are visible ASCII and compared byte for byte
//!   (`Abc` and `abc` are two keys).
//! - `response` keeps the operation's answer as JSON text, replayed as it was.
//! - `ix_idempotency_keys_expires` serves the purge job's `DELETE ... WHERE expires_at < ?
//!   LIMIT n` without a scan.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const UP: &[&str] = &[r"CREATE TABLE idempotency_keys (
        user_id BINARY(16) NOT NULL,
        idem_key VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
        fingerprint CHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
        response TEXT NOT NULL,
        created_at DATETIME(6) NOT NULL,
        expires_at DATETIME(6) NOT NULL,
        PRIMARY KEY (user_id, idem_key),
        KEY ix_idempotency_keys_expires (expires_at),
        CONSTRAINT fk_idempotency_keys_user FOREIGN KEY (user_id) REFERENCES users (id)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin"];

const DOWN: &[&str] = &["DROP TABLE IF EXISTS idempotency_keys"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(manager, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(manager, DOWN).await
    }
}
