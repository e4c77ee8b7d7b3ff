//! Users, point accounts and point history.
//!
//! - Ids are UUIDs stored as `BINARY(16)`; v7 ids arrive in time order, so inserts append
//!   to the primary-key index instead of splitting pages.
//! - Times are `DATETIME(6)` in UTC (not `TIMESTAMP`: no session time-zone conversion, no
//!   2038 limit).
//! - `point_accounts.balance` is checked to stay within 0..=1,000,000,000 by the database
//!   itself: the last line of defence if a lock and the application both failed.
//! - `point_accounts.version` counts the balance's changes; each history row stores the
//!   version its change produced as `seq`. `UNIQUE (user_id, seq)` makes one change
//!   impossible to record twice, and serves "a user's newest entries" read backwards,
//!   without a sort and without trusting any instance's clock.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const UP: &[&str] = &[
    r"CREATE TABLE users (
        id BINARY(16) NOT NULL,
        name VARCHAR(50) NOT NULL,
        created_at DATETIME(6) NOT NULL,
        PRIMARY KEY (id)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    r"CREATE TABLE point_accounts (
        user_id BINARY(16) NOT NULL,
        balance BIGINT NOT NULL,
        version BIGINT NOT NULL,
        updated_at DATETIME(6) NOT NULL,
        PRIMARY KEY (user_id),
        CONSTRAINT ck_point_accounts_version CHECK (version >= 0),
        CONSTRAINT fk_point_accounts_user FOREIGN KEY (user_id) REFERENCES users (id),
        CONSTRAINT ck_point_accounts_balance CHECK (balance BETWEEN 0 AND 1000000000)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    r"CREATE TABLE point_history (
        id BINARY(16) NOT NULL,
        user_id BINARY(16) NOT NULL,
        kind VARCHAR(10) NOT NULL,
        amount BIGINT NOT NULL,
        balance_after BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        created_at DATETIME(6) NOT NULL,
        PRIMARY KEY (id),
        UNIQUE KEY uq_point_history_user_seq (user_id, seq),
        CONSTRAINT fk_point_history_user FOREIGN KEY (user_id) REFERENCES users (id),
        CONSTRAINT ck_point_history_kind CHECK (kind IN ('CHARGE', 'USE', 'REFUND')),
        CONSTRAINT ck_point_history_amount CHECK (amount > 0),
        CONSTRAINT ck_point_history_balance_after CHECK (balance_after BETWEEN 0 AND 1000000000),
        CONSTRAINT ck_point_history_seq CHECK (seq > 0)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
];

const DOWN: &[&str] = &[
    "DROP TABLE IF EXISTS point_history",
    "DROP TABLE IF EXISTS point_accounts",
    "DROP TABLE IF EXISTS users",
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
