//! The waiting queue on MySQL: the baseline the Redis queue is measured against.
//!
//! - `seq` (`AUTO_INCREMENT`) orders the line: FIFO even for tokens issued in the same
//!   millisecond by several instances.
//! - `UNIQUE (user_id)`: one live token per user, so re-issuing is idempotent even when two
//!   instances issue for one user at once.
//! - Times are milliseconds on the database's clock (`UNIX_TIMESTAMP(NOW(6))`), so every
//!   instance agrees on what has expired.
//! - `queue_admission` has one row, locked `FOR UPDATE` by each admission step: steps of
//!   all instances run one at a time, so the cap holds and a `rate` batch is admitted once
//!   per interval (`last_batch_ms`: when the last one was).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const UP: &[&str] = &[
    r"CREATE TABLE queue_tokens (
        id BINARY(16) NOT NULL,
        user_id BINARY(16) NOT NULL,
        seq BIGINT NOT NULL AUTO_INCREMENT,
        status VARCHAR(8) CHARACTER SET ascii NOT NULL,
        issued_ms BIGINT NOT NULL,
        seen_ms BIGINT NOT NULL,
        expires_ms BIGINT NULL,
        PRIMARY KEY (id),
        UNIQUE KEY uq_queue_tokens_seq (seq),
        UNIQUE KEY uq_queue_tokens_user (user_id),
        KEY ix_queue_tokens_status_seq (status, seq),
        KEY ix_queue_tokens_status_expires (status, expires_ms),
        KEY ix_queue_tokens_status_seen (status, seen_ms),
        CONSTRAINT ck_queue_tokens_status CHECK (status IN ('WAITING', 'ACTIVE'))
    ) ENGINE = InnoDB",
    r"CREATE TABLE queue_admission (
        id TINYINT NOT NULL,
        last_batch_ms BIGINT NOT NULL,
        rate DOUBLE NOT NULL,
        PRIMARY KEY (id)
    ) ENGINE = InnoDB",
    r"INSERT INTO queue_admission (id, last_batch_ms, rate) VALUES (1, 0, 0)",
    r"CREATE TABLE queue_admission_log (
        id BIGINT NOT NULL AUTO_INCREMENT,
        at_ms BIGINT NOT NULL,
        admitted INT NOT NULL,
        PRIMARY KEY (id),
        KEY ix_queue_admission_log_at (at_ms)
    ) ENGINE = InnoDB",
];

const DOWN: &[&str] = &[
    "DROP TABLE IF EXISTS queue_admission_log",
    "DROP TABLE IF EXISTS queue_admission",
    "DROP TABLE IF EXISTS queue_tokens",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(manager, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(manager, DOWN).await
    }
}
