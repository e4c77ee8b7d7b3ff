//! Identity: the digests of users' API keys, and the keys that sign access tokens.
//!
//! - `api_keys`: the SHA-256 digest of each API key (the key itself is never stored) and its
//!   user. The digest is the primary key: signing in is one point lookup.
//! - `auth_signing_keys`: the shared HMAC keys of access tokens. `generation` is the primary
//!   key, so instances that create the first key, or rotate, at the same moment insert the
//!   same generation and all but one insert is ignored: one key per generation, however
//!   many ask. `activates_at` is when a key starts signing (a rotated key waits until every
//!   instance has read it); a key a later one replaced is deleted once its tokens have all
//!   run out.
//! - `ix_reservations_user_schedule`: the hold limit counts a user's live holds of one date
//!   (`MAX_HOLDS_PER_USER`) inside every hold's transaction; this key makes that a range
//!   read of the user's few rows.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const UP: &[&str] = &[
    r"CREATE TABLE api_keys (
        key_digest BINARY(32) NOT NULL,
        user_id BINARY(16) NOT NULL,
        created_at DATETIME(6) NOT NULL,
        PRIMARY KEY (key_digest),
        KEY ix_api_keys_user (user_id),
        CONSTRAINT fk_api_keys_user FOREIGN KEY (user_id) REFERENCES users (id)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    r"CREATE TABLE auth_signing_keys (
        generation INT UNSIGNED NOT NULL,
        kid VARCHAR(32) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
        secret VARBINARY(64) NOT NULL,
        activates_at DATETIME(6) NOT NULL,
        created_at DATETIME(6) NOT NULL,
        PRIMARY KEY (generation),
        UNIQUE KEY ux_auth_signing_keys_kid (kid),
        CONSTRAINT ck_auth_signing_keys_secret CHECK (LENGTH(secret) >= 32)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    "CREATE INDEX ix_reservations_user_schedule ON reservations (user_id, schedule_id, status, held_until)",
];

const DOWN: &[&str] = &[
    "DROP INDEX ix_reservations_user_schedule ON reservations",
    "DROP TABLE IF EXISTS auth_signing_keys",
    "DROP TABLE IF EXISTS api_keys",
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
