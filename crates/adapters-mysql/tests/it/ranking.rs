//! What the ranking reads from the real database: the window's completed payments with
//! their concerts (through reservation and date), their counts per concert, and a date's
//! concert.

use std::collections::HashMap;

use adapters_mysql::ranking::MySqlRankingSource;
use application::clock;
use application::ranking::RankingSource;
use domain::booking::{ConcertId, ScheduleId};
use domain::payment::PaymentId;
use sea_orm::ConnectionTrait as _;
use time::OffsetDateTime;

use super::Db;

fn hex(id: &uuid::Uuid) -> String {
    id.simple().to_string()
}

/// `DATETIME(6)` text of `at` (UTC).
fn sql_time(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    )
}

async fn run(db: &Db, statement: String) {
    db.conn.execute_unprepared(&statement).await.unwrap_or_else(|e| panic!("{statement}: {e}"));
}

/// A concert with one date of 50 seats: (concert, date).
async fn concert_with_a_date(db: &Db) -> (ConcertId, ScheduleId) {
    let (concert, schedule) = (ConcertId::generate(), ScheduleId::generate());
    let (c, s) = (hex(concert.as_uuid()), hex(schedule.as_uuid()));
    run(
        db,
        format!(
            "INSERT INTO concerts (id, title, venue, created_at, updated_at) \
             VALUES (UNHEX('{c}'), 'Live', 'Hall', NOW(6), NOW(6))"
        ),
    )
    .await;
    run(
        db,
        format!(
            "INSERT INTO schedules (id, concert_id, starts_at, booking_opens_at, booking_closes_at, created_at) \
             VALUES (UNHEX('{s}'), UNHEX('{c}'), UTC_TIMESTAMP(6) + INTERVAL 10 DAY, \
                     UTC_TIMESTAMP(6) - INTERVAL 3 DAY, UTC_TIMESTAMP(6) + INTERVAL 9 DAY, UTC_TIMESTAMP(6))"
        ),
    )
    .await;
    let seats: Vec<String> = (1..=50).map(|n| format!("(UNHEX('{s}'), {n}, 1000)")).collect();
    run(db, format!("INSERT INTO seats (schedule_id, seat_number, price) VALUES {}", seats.join(", "))).await;
    (concert, schedule)
}

/// A user's CONFIRMED reservation of `seat` and its payment at `paid_at`: the payment's id.
async fn paid(db: &Db, schedule: ScheduleId, seat: u8, paid_at: OffsetDateTime) -> PaymentId {
    let (user, reservation, payment) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7(), PaymentId::generate());
    let (u, r, p, s) = (hex(&user), hex(&reservation), hex(payment.as_uuid()), hex(schedule.as_uuid()));
    let at = sql_time(paid_at);
    run(db, format!("INSERT INTO users (id, name, created_at) VALUES (UNHEX('{u}'), 'fan', NOW(6))")).await;
    run(
        db,
        format!(
            "INSERT INTO reservations (id, user_id, schedule_id, seat_number, price, status, held_until, created_at, updated_at) \
             VALUES (UNHEX('{r}'), UNHEX('{u}'), UNHEX('{s}'), {seat}, 1000, 'CONFIRMED', '{at}', '{at}', '{at}')"
        ),
    )
    .await;
    run(
        db,
        format!(
            "INSERT INTO payments (id, reservation_id, user_id, amount, status, paid_at) \
             VALUES (UNHEX('{p}'), UNHEX('{r}'), UNHEX('{u}'), 1000, 'COMPLETED', '{at}')"
        ),
    )
    .await;
    payment
}

#[tokio::test]
async fn the_windows_payments_come_with_their_concerts_and_add_up_per_concert() {
    let db = Db::fresh("ranking").await;
    let source = MySqlRankingSource::new(db.conn.clone());
    let ((a, a_date), (b, b_date)) = (concert_with_a_date(&db).await, concert_with_a_date(&db).await);
    let now = clock::now_utc();
    let since = now - time::Duration::hours(25);
    let recent = [
        (paid(&db, a_date, 1, now).await, a, now),
        (paid(&db, a_date, 2, now - time::Duration::hours(20)).await, a, now - time::Duration::hours(20)),
        (paid(&db, b_date, 1, now - time::Duration::hours(1)).await, b, now - time::Duration::hours(1)),
    ];
    // Before the window: neither listed nor counted.
    paid(&db, a_date, 3, now - time::Duration::hours(30)).await;

    let mut sales = source.sales_since(since).await.expect("sales");
    let counts = source.counts_since(since).await.expect("counts");

    sales.sort_by_key(|sale| sale.paid_at);
    let mut expected = recent.to_vec();
    expected.sort_by_key(|(_, _, at)| *at);
    let got: Vec<(PaymentId, ConcertId, OffsetDateTime)> =
        sales.iter().map(|sale| (sale.payment, sale.concert, sale.paid_at)).collect();
    assert_eq!(got, expected);
    let counts: HashMap<ConcertId, u64> = counts.iter().map(|c| (c.concert, c.reservations)).collect();
    assert_eq!(counts, HashMap::from([(a, 2), (b, 1)]));
    db.drop_now().await;
}

#[tokio::test]
async fn a_dates_concert_is_found_and_an_unknown_date_has_none() {
    let db = Db::fresh("ranking_date").await;
    let source = MySqlRankingSource::new(db.conn.clone());
    let (concert, date) = concert_with_a_date(&db).await;

    assert_eq!(source.concert_of(date).await.expect("read"), Some(concert));
    assert_eq!(source.concert_of(ScheduleId::generate()).await.expect("read"), None);
    assert!(
        source.sales_since(clock::now_utc() - time::Duration::hours(25)).await.expect("sales").is_empty()
    );
    db.drop_now().await;
}
