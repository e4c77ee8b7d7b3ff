//! Payments and their outbox.
//!
//! - `payments`: one per reservation (`uq_payments_reservation`): a second payment of a
//!   seat cannot be stored, whatever got past the locks. `queue_token` is the token the
//!   payment expired, so that a retry of it (same token, same Idempotency-Key) can still
//!   be told who it was and get its answer back.
//! - `outbox_events`: written in the payment's transaction, sent to Redis by a relay on
//!   every instance (`FOR UPDATE SKIP LOCKED`), oldest first per aggregate; `sent_at`
//!   stays NULL until sent. `ix_outbox_pending` serves the relay's scan,
//!   `ix_outbox_aggregate` its "nothing older unsent for this reservation" check.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const UP: &[&str] = &[
    r"CREATE TABLE payments (
        id BINARY(16) NOT NULL,
        reservation_id BINARY(16) NOT NULL,
        user_id BINARY(16) NOT NULL,
        amount BIGINT NOT NULL,
        status VARCHAR(10) CHARACTER SET ascii NOT NULL,
        queue_token BINARY(16) NULL,
        paid_at DATETIME(6) NOT NULL,
        PRIMARY KEY (id),
        UNIQUE KEY uq_payments_reservation (reservation_id),
        KEY ix_payments_queue_token (queue_token),
        KEY ix_payments_user (user_id, paid_at),
        CONSTRAINT fk_payments_reservation FOREIGN KEY (reservation_id) REFERENCES reservations (id),
        CONSTRAINT fk_payments_user FOREIGN KEY (user_id) REFERENCES users (id),
        CONSTRAINT ck_payments_amount CHECK (amount BETWEEN 0 AND 10000000),
        CONSTRAINT ck_payments_status CHECK (status IN ('COMPLETED'))
    ) ENGINE = InnoDB",
    r"CREATE TABLE outbox_events (
        seq BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
        id BINARY(16) NOT NULL,
        aggregate_id BINARY(16) NOT NULL,
        event_type VARCHAR(64) CHARACTER SET ascii NOT NULL,
        payload TEXT NOT NULL,
        created_at DATETIME(6) NOT NULL,
        sent_at DATETIME(6) NULL,
        attempts INT UNSIGNED NOT NULL DEFAULT 0,
        PRIMARY KEY (seq),
        UNIQUE KEY uq_outbox_events_id (id),
        KEY ix_outbox_pending (sent_at, seq),
        KEY ix_outbox_aggregate (aggregate_id, sent_at, seq)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
];

const DOWN: &[&str] = &["DROP TABLE IF EXISTS outbox_events", "DROP TABLE IF EXISTS payments"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(manager, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(manager, DOWN).await
    }
}
