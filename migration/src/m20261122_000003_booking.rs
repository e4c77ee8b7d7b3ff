//! Concerts, schedules (dates), seats and reservations (seat holds).
//!
//! The rules the database itself enforces, whatever the application or the locks do:
//! - `UNIQUE (schedule_id, live_seat)` on `reservations`, where `live_seat` is the seat
//!   number while the reservation is HELD or CONFIRMED and NULL otherwise: two live
//!   reservations of one seat cannot exist, even if two holders got past the Redis lock.
//! - a seat is AVAILABLE exactly when it names no reservation (`ck_seats_reservation`);
//!   seat numbers are 1..=50 and prices 0..=10,000,000;
//! - a booking window opens before it closes and closes no later than the show starts.
//!
//! Indexes serve the hot queries: a schedule's seat map is a primary-key range on `seats`;
//! a concert's open schedules use `ix_schedules_concert_window`; the expiry job finds run-out
//! holds with `ix_reservations_expiry (status, held_until)`; a user's reservations use
//! `ix_reservations_user`.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const UP: &[&str] = &[
    r"CREATE TABLE concerts (
        id BINARY(16) NOT NULL,
        title VARCHAR(200) NOT NULL,
        venue VARCHAR(200) NOT NULL,
        created_at DATETIME(6) NOT NULL,
        updated_at DATETIME(6) NOT NULL,
        PRIMARY KEY (id)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    r"CREATE TABLE schedules (
        id BINARY(16) NOT NULL,
        concert_id BINARY(16) NOT NULL,
        starts_at DATETIME(6) NOT NULL,
        booking_opens_at DATETIME(6) NOT NULL,
        booking_closes_at DATETIME(6) NOT NULL,
        created_at DATETIME(6) NOT NULL,
        PRIMARY KEY (id),
        KEY ix_schedules_concert_window (concert_id, booking_opens_at, booking_closes_at),
        CONSTRAINT fk_schedules_concert FOREIGN KEY (concert_id) REFERENCES concerts (id),
        CONSTRAINT ck_schedules_window CHECK (booking_opens_at < booking_closes_at AND booking_closes_at <= starts_at)
    ) ENGINE = InnoDB",
    r"CREATE TABLE seats (
        schedule_id BINARY(16) NOT NULL,
        seat_number TINYINT UNSIGNED NOT NULL,
        price BIGINT NOT NULL,
        status VARCHAR(10) CHARACTER SET ascii NOT NULL DEFAULT 'AVAILABLE',
        reservation_id BINARY(16) NULL,
        held_until DATETIME(6) NULL,
        version BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (schedule_id, seat_number),
        CONSTRAINT fk_seats_schedule FOREIGN KEY (schedule_id) REFERENCES schedules (id),
        CONSTRAINT ck_seats_number CHECK (seat_number BETWEEN 1 AND 50),
        CONSTRAINT ck_seats_price CHECK (price BETWEEN 0 AND 10000000),
        CONSTRAINT ck_seats_status CHECK (status IN ('AVAILABLE', 'HELD', 'SOLD')),
        CONSTRAINT ck_seats_reservation CHECK ((status = 'AVAILABLE') = (reservation_id IS NULL))
    ) ENGINE = InnoDB",
    r"CREATE TABLE reservations (
        id BINARY(16) NOT NULL,
        user_id BINARY(16) NOT NULL,
        schedule_id BINARY(16) NOT NULL,
        seat_number TINYINT UNSIGNED NOT NULL,
        price BIGINT NOT NULL,
        status VARCHAR(10) CHARACTER SET ascii NOT NULL,
        held_until DATETIME(6) NOT NULL,
        created_at DATETIME(6) NOT NULL,
        updated_at DATETIME(6) NOT NULL,
        live_seat TINYINT UNSIGNED AS (CASE WHEN status IN ('HELD', 'CONFIRMED') THEN seat_number END) STORED,
        PRIMARY KEY (id),
        UNIQUE KEY uq_reservations_live_seat (schedule_id, live_seat),
        KEY ix_reservations_expiry (status, held_until),
        KEY ix_reservations_user (user_id, created_at),
        CONSTRAINT fk_reservations_user FOREIGN KEY (user_id) REFERENCES users (id),
        CONSTRAINT fk_reservations_seat FOREIGN KEY (schedule_id, seat_number) REFERENCES seats (schedule_id, seat_number),
        CONSTRAINT ck_reservations_status CHECK (status IN ('HELD', 'CONFIRMED', 'EXPIRED', 'CANCELLED')),
        CONSTRAINT ck_reservations_price CHECK (price BETWEEN 0 AND 10000000)
    ) ENGINE = InnoDB",
];

const DOWN: &[&str] = &[
    "DROP TABLE IF EXISTS reservations",
    "DROP TABLE IF EXISTS seats",
    "DROP TABLE IF EXISTS schedules",
    "DROP TABLE IF EXISTS concerts",
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
