//! Seat holds on the real database with the distributed lock taken out: the SQL guards
//! alone must keep every seat held once.

use std::sync::Arc;
use std::time::Duration;

use adapters_mysql::booking::MySqlBookingRepository;
use adapters_mysql::catalog::MySqlCatalogRepository;
use application::cache::Cache;
use application::catalog::{Catalog, ScheduleDraft};
use application::hold_seat::{HoldSeat, HoldSeatError};
use application::reservations::{ReservationError, Reservations};
use domain::booking::{ConcertId, ReservationStatus};
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

/// The catalog read straight from MySQL (no cache).
fn catalog(db: &Db) -> Catalog {
    Catalog::new(Arc::new(MySqlCatalogRepository::new(db.conn.clone())), Arc::new(Cache::disabled()))
}

fn reservations_without_lock(db: &Db) -> Reservations {
    Reservations::new(
        catalog(db),
        Arc::new(MySqlBookingRepository::new(db.conn.clone())),
        Arc::new(NoLock),
        db.txm.clone(),
    )
}

fn hold_without_lock(db: &Db, hold: Duration) -> HoldSeat {
    HoldSeat::new(
        catalog(db),
        Arc::new(MySqlBookingRepository::new(db.conn.clone())),
        Arc::new(NoLock),
        db.txm.clone(),
        hold,
        4,
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

async fn count(db: &Db, sql: &str) -> i64 {
    super::number(&db.conn, sql).await.expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_frees_the_seat_once_and_a_run_out_hold_is_expired_not_cancelled() {
    let db = Db::fresh("cancel").await;
    let schedule = open_schedule(&db).await;
    let people = users(&db, 2).await;
    let reservations = reservations_without_lock(&db);
    let held = hold_without_lock(&db, Duration::from_secs(300))
        .execute(people[0], schedule, SeatNumber::new(9).unwrap())
        .await
        .expect("held");

    // Another user's reservation does not exist for them.
    assert!(matches!(reservations.cancel(people[1], held.id).await, Err(ReservationError::NotFound(_))));
    // Eight concurrent cancels of one hold: one changes it, the others find it CANCELLED.
    let results = futures::future::join_all((0..8).map(|_| reservations.cancel(people[0], held.id))).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert!(
        results
            .iter()
            .filter(|r| r.is_err())
            .all(|r| matches!(r, Err(ReservationError::NotHeld(ReservationStatus::Cancelled)))),
        "{results:?}"
    );
    assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM seats WHERE status <> 'AVAILABLE'").await, 0);

    // A hold that ran out reads EXPIRED and cannot be cancelled; the job expires it once.
    let short = hold_without_lock(&db, Duration::from_millis(100))
        .execute(people[1], schedule, SeatNumber::new(10).unwrap())
        .await
        .expect("held");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while reservations.get(people[1], short.id).await.expect("read").status != ReservationStatus::Expired {
        assert!(std::time::Instant::now() < deadline, "the hold never ran out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(
        reservations.cancel(people[1], short.id).await,
        Err(ReservationError::NotHeld(ReservationStatus::Expired))
    ));
    let rounds = futures::future::join_all((0..4).map(|_| reservations.expire_run_out(100))).await;
    assert_eq!(rounds.iter().map(|r| *r.as_ref().expect("round")).sum::<usize>(), 1, "{rounds:?}");
    assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM reservations WHERE status = 'EXPIRED'").await, 1);
    assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM seats WHERE status <> 'AVAILABLE'").await, 0);
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expiry_job_never_frees_a_seat_that_a_newer_hold_took() {
    let db = Db::fresh("expiry_newer").await;
    let schedule = open_schedule(&db).await;
    let people = users(&db, 2).await;
    let seat = SeatNumber::new(4).unwrap();
    let old = hold_without_lock(&db, Duration::from_millis(50))
        .execute(people[0], schedule, seat)
        .await
        .expect("held");
    // The old hold runs out; mark it back HELD-and-run-out after a newer hold replaced it,
    // as if the job had listed it just before the replacement.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let newer = loop {
        match hold_without_lock(&db, Duration::from_secs(300)).execute(people[1], schedule, seat).await {
            Ok(newer) => break newer,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(other) => panic!("{other:?}"),
        }
    };
    db.conn
        .execute_unprepared(&format!(
            "UPDATE reservations SET status = 'HELD' WHERE id = UNHEX('{}')",
            old.id.as_uuid().simple()
        ))
        .await
        .expect_err("the unique live-seat key refuses a second live reservation of the seat");

    let expired = reservations_without_lock(&db).expire_run_out(100).await.expect("round");

    assert_eq!(expired, 0);
    let seat_row = count(
        &db,
        &format!(
            "SELECT COUNT(*) AS n FROM seats WHERE status = 'HELD' AND reservation_id = UNHEX('{}')",
            newer.id.as_uuid().simple()
        ),
    )
    .await;
    assert_eq!(seat_row, 1, "the newer hold keeps its seat");
    db.drop_now().await;
}

#[tokio::test]
async fn the_catalog_writes_and_reads_concerts_dates_and_seats() {
    let db = Db::fresh("catalog").await;
    assert!(
        adapters_mysql::seed::seed_demo_data(&db.conn).await.expect("seed"),
        "an empty database is seeded"
    );
    assert!(!adapters_mysql::seed::seed_demo_data(&db.conn).await.expect("seed"), "but only once");
    let catalog = catalog(&db);
    let seeded = catalog.concerts().await.expect("concerts");
    assert_eq!(seeded.len(), 3);
    let open = catalog.open_schedules(ConcertId::from_uuid(seeded[0].id)).await.expect("dates");
    assert!(!open.is_empty() && open.iter().all(|s| s.total_seats == 50 && s.available_seats == 50));

    let created = catalog.create_concert("  Spring Tour ", "Main Hall").await.expect("created");
    assert_eq!(created.title, "Spring Tour", "trimmed");
    let id = ConcertId::from_uuid(created.id);
    let renamed = catalog.update_concert(id, "Spring Tour 2027", "Main Hall").await.expect("renamed");
    assert_eq!(renamed.title, "Spring Tour 2027");
    assert!(catalog.update_concert(ConcertId::generate(), "x", "y").await.is_err());
    let now = application::clock::now_utc();
    let draft = |opens: time::Duration| ScheduleDraft {
        starts_at: now + time::Duration::days(30),
        booking_opens_at: now + opens,
        booking_closes_at: now + time::Duration::days(29),
        seat_price: 70_000,
    };
    let date = catalog.add_schedule(id, &draft(-time::Duration::hours(1))).await.expect("date");
    catalog.add_schedule(id, &draft(time::Duration::days(1))).await.expect("a date not open yet");
    assert!(catalog.add_schedule(ConcertId::generate(), &draft(time::Duration::ZERO)).await.is_err());
    let bad =
        ScheduleDraft { booking_closes_at: now + time::Duration::days(31), ..draft(time::Duration::ZERO) };
    assert!(catalog.add_schedule(id, &bad).await.is_err(), "closing after the show");

    let open = catalog.open_schedules(id).await.expect("dates");
    assert_eq!(open.len(), 1, "only the open date is listed");
    assert_eq!(open[0].schedule, date);
    let map = catalog.seat_map(ScheduleId::from_uuid(date.id)).await.expect("seats");
    assert_eq!(map.seats.iter().map(|s| s.number).collect::<Vec<_>>(), (1..=50).collect::<Vec<_>>());
    assert!(map.seats.iter().all(|s| s.price == 70_000));
    db.drop_now().await;
}

/// Takes seat `n` for `user` in a transaction whose seat lock carries fencing number
/// `fence` (as `locked_tx` would hand it), committing when taken.
async fn take_fenced(
    db: &Db,
    schedule: ScheduleId,
    n: SeatNumber,
    user: UserId,
    fence: u64,
) -> Result<domain::booking::ReservationId, domain::booking::BookingRepositoryError> {
    use application::lock::{FencingToken, LockKey};
    use application::tx::TransactionManager as _;
    use domain::booking::BookingRepository as _;
    let repo = MySqlBookingRepository::new(db.conn.clone());
    let mut tx = db.txm.begin().await.expect("begin");
    let seat = repo.lock_seat(tx.as_mut(), schedule, n).await.expect("lock").expect("seat");
    let now = application::clock::now_utc();
    let reservation = domain::booking::Reservation::hold(user, &seat, now, time::Duration::minutes(5));
    let taken = application::tx::with_fences(
        vec![(LockKey::seat(schedule, n), FencingToken(fence))],
        repo.hold_seat(tx.as_mut(), &reservation, None, now),
    )
    .await;
    match taken {
        Ok(_) => {
            tx.commit().await.expect("commit");
            Ok(reservation.id)
        }
        Err(error) => {
            tx.rollback().await.expect("rollback");
            Err(error)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_under_an_older_seat_lock_than_the_last_one_is_refused_by_the_database() {
    let db = Db::fresh("seat_fence").await;
    let schedule = open_schedule(&db).await;
    let people = users(&db, 2).await;
    let seat = SeatNumber::new(4).unwrap();
    let reservations = reservations_without_lock(&db);

    // The holder with number 200 takes the seat, then lets it go.
    let first = take_fenced(&db, schedule, seat, people[0], 200).await.expect("taken under 200");
    reservations.cancel(people[0], first).await.expect("cancelled");
    assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM seats WHERE fence = 200").await, 1);

    // A holder of an older acquisition (its lease ran out while it was paused) wakes up:
    // the seat is free, but its number is lower than the one the seat saw. Refused.
    let stale = take_fenced(&db, schedule, seat, people[1], 100).await;
    assert!(matches!(stale, Err(domain::booking::BookingRepositoryError::SeatTaken)), "{stale:?}");
    assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM seats WHERE status <> 'AVAILABLE'").await, 0);

    // A later acquisition, and an equal one (the same holder writing again), are taken.
    take_fenced(&db, schedule, seat, people[1], 200).await.expect("taken under 200 again");
    assert_eq!(count(&db, "SELECT COUNT(*) AS n FROM seats WHERE status = 'HELD' AND fence = 200").await, 1);
    db.drop_now().await;
}
