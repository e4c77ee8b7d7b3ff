//! Seat holds on the real database with the distributed lock taken out: the SQL guards
//! alone must keep every seat held once.

use std::sync::Arc;
use std::time::Duration;

use adapters_mysql::booking::MySqlBookingRepository;
use application::hold_seat::{HoldSeat, HoldSeatError};
use domain::booking::{ScheduleId, SeatNumber};
use domain::user::UserId;
use sea_orm::ConnectionTrait as _;

use super::Db;
use super::points::NoLock;

/// A concert with one schedule open now and 50 seats; returns its id.
async fn open_schedule(db: &Db) -> ScheduleId {
    let schedule = ScheduleId::generate();
    let concert = uuid::Uuid::now_v7().simple().to_string();
    let hex = schedule.as_uuid().simple().to_string();
    db.conn
        .execute_unprepared(&format!(
            "INSERT INTO concerts (id, title, venue, created_at, updated_at) VALUES (UNHEX('{concert}'), 'Live', 'Hall', NOW(6), NOW(6))"
        ))
        .await
        .expect("concert");
    db.conn
        .execute_unprepared(&format!(
            "INSERT INTO schedules (id, concert_id, starts_at, booking_opens_at, booking_closes_at, created_at) \
             VALUES (UNHEX('{hex}'), UNHEX('{concert}'), UTC_TIMESTAMP(6) + INTERVAL 10 DAY, \
                     UTC_TIMESTAMP(6) - INTERVAL 1 HOUR, UTC_TIMESTAMP(6) + INTERVAL 9 DAY, UTC_TIMESTAMP(6))"
        ))
        .await
        .expect("schedule");
    let seats: Vec<String> = (1..=50).map(|n| format!("(UNHEX('{hex}'), {n}, {})", 1_000 * n)).collect();
    db.conn
        .execute_unprepared(&format!(
            "INSERT INTO seats (schedule_id, seat_number, price) VALUES {}",
            seats.join(", ")
        ))
        .await
        .expect("seats");
    schedule
}

async fn users(db: &Db, n: usize) -> Vec<UserId> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let id = UserId::generate();
        db.conn
            .execute_unprepared(&format!(
                "INSERT INTO users (id, name, created_at) VALUES (UNHEX('{}'), 'racer', NOW(6))",
                id.as_uuid().simple()
            ))
            .await
            .expect("user");
        ids.push(id);
    }
    ids
}

fn hold_without_lock(db: &Db, hold: Duration) -> HoldSeat {
    HoldSeat::new(
        Arc::new(MySqlBookingRepository::new(db.conn.clone())),
        Arc::new(NoLock),
        db.txm.clone(),
        hold,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_racers_for_one_seat_with_the_lock_removed_give_exactly_one_hold() {
    let db = Db::fresh("hold_race").await;
    let schedule = open_schedule(&db).await;
    let racers = users(&db, 40).await;
    let hold = hold_without_lock(&db, Duration::from_secs(300));
    let seat = SeatNumber::new(17).unwrap();

    let results =
        futures::future::join_all(racers.iter().map(|user| hold.execute(*user, schedule, seat))).await;

    let held: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(held.len(), 1, "{results:?}");
    assert_eq!(held[0].price.points(), 17_000);
    assert!(
        results.iter().filter(|r| r.is_err()).all(|r| matches!(r, Err(HoldSeatError::SeatUnavailable))),
        "{results:?}"
    );
    let live: i64 = db
        .conn
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::MySql,
            "SELECT COUNT(*) AS n FROM reservations WHERE status = 'HELD'",
        ))
        .await
        .expect("count")
        .expect("row")
        .try_get("", "n")
        .expect("n");
    assert_eq!(live, 1);
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_that_ran_out_can_be_taken_over_and_is_expired_on_the_way() {
    let db = Db::fresh("hold_over").await;
    let schedule = open_schedule(&db).await;
    let people = users(&db, 2).await;
    let seat = SeatNumber::new(3).unwrap();
    let first = hold_without_lock(&db, Duration::from_millis(200))
        .execute(people[0], schedule, seat)
        .await
        .expect("held");
    let hold = hold_without_lock(&db, Duration::from_secs(300));
    assert!(matches!(hold.execute(people[1], schedule, seat).await, Err(HoldSeatError::SeatUnavailable)));

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let second = loop {
        match hold.execute(people[1], schedule, seat).await {
            Ok(second) => break second,
            Err(HoldSeatError::SeatUnavailable) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("{other:?}"),
        }
    };

    assert_ne!(second.id, first.id);
    let old = MySqlBookingRepository::new(db.conn.clone());
    let old =
        domain::booking::BookingRepository::reservation(&old, first.id).await.expect("read").expect("kept");
    assert_eq!(old.status, domain::booking::ReservationStatus::Expired);
    db.drop_now().await;
}
