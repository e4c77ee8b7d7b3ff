use adapters_mysql::database;
use sea_orm::{ConnectionTrait, DbBackend, Statement};

use super::Db;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_once_when_many_instances_start_together() {
    let url = test_support::fresh_database("migrate").await.expect("test database");

    let runs = futures::future::join_all((0..4).map(|_| database::prepare(&url))).await;

    for run in runs {
        run.expect("every instance starts");
    }
    database::prepare(&url).await.expect("a later start finds nothing to do");
    let conn = database::connect(&url, 1, database::DEFAULT_STATEMENT_TIMEOUT).await.expect("pool");
    let applied = conn
        .query_one_raw(Statement::from_string(DbBackend::MySql, "SELECT COUNT(*) AS n FROM seaql_migrations"))
        .await
        .expect("query")
        .expect("a row")
        .try_get::<i64>("", "n")
        .expect("count");
    let known =
        i64::try_from(<migration::Migrator as migration::MigratorTrait>::migrations().len()).expect("few");
    assert_eq!(applied, known, "each migration applied once");
    conn.close().await.ok();
    test_support::drop_database(&url).await.expect("drop");
}

/// Every connection the pool opens works in UTC with the configured row-lock wait and
/// statement limit, not only the first: transactions held at once each pin a connection
/// of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pooled_connection_gets_the_session_settings() {
    use sea_orm::TransactionTrait as _;

    const HELD: usize = 4;
    let url = test_support::fresh_database("session").await.expect("test database");
    let conn = database::connect(&url, 8, std::time::Duration::from_millis(7_500)).await.expect("pool");
    let mut held = Vec::new();
    for _ in 0..HELD {
        held.push(conn.begin().await.expect("a transaction on a connection of its own"));
    }
    // MariaDB's limit is in seconds, MySQL's (SELECT only) in milliseconds.
    let version = conn
        .query_one_raw(Statement::from_string(DbBackend::MySql, "SELECT VERSION() AS v"))
        .await
        .expect("query")
        .expect("a row")
        .try_get::<String>("", "v")
        .expect("a version");
    let (limit, expected) = if version.contains("MariaDB") {
        ("@@session.max_statement_time", 7.5)
    } else {
        ("@@session.max_execution_time", 7_500.0)
    };
    let mut sessions = std::collections::HashSet::new();
    for tx in &held {
        let row = tx
            .query_one_raw(Statement::from_string(
                DbBackend::MySql,
                format!(
                    "SELECT CAST(CONNECTION_ID() AS SIGNED) AS id, @@session.time_zone AS tz, \
                     CAST(@@session.innodb_lock_wait_timeout AS SIGNED) AS lock_wait, CAST({limit} AS DOUBLE) AS limit_s"
                ),
            ))
            .await
            .expect("query")
            .expect("a row");
        sessions.insert(row.try_get::<i64>("", "id").expect("id"));
        assert_eq!(row.try_get::<String>("", "tz").expect("tz"), "+00:00");
        assert_eq!(row.try_get::<i64>("", "lock_wait").expect("lock wait"), 8, "7.5 s rounded up");
        assert!((row.try_get::<f64>("", "limit_s").expect("limit") - expected).abs() < 1e-9, "{limit}");
    }
    assert_eq!(sessions.len(), HELD, "each transaction on its own connection");
    for tx in held {
        tx.rollback().await.expect("rollback");
    }
    conn.close().await.ok();
    test_support::drop_database(&url).await.expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_database_is_created_at_start() {
    let server = test_support::mysql_server_url().await;
    let url = format!("{server}/t_created_{}", uuid::Uuid::new_v4().simple());

    database::prepare(&url).await.expect("database created and migrated");

    database::connect(&url, 1, database::DEFAULT_STATEMENT_TIMEOUT)
        .await
        .expect("it exists now")
        .close()
        .await
        .ok();
    test_support::drop_database(&url).await.expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_itself_refuses_a_negative_or_excessive_balance() {
    let db = Db::fresh("check").await;
    db.conn
        .execute_unprepared(
            "INSERT INTO users (id, name, created_at) VALUES (UNHEX('00000000000000000000000000000001'), 'kim', NOW(6))",
        )
        .await
        .expect("user");
    for balance in ["-1", "1000000001"] {
        let refused = db
            .conn
            .execute_unprepared(&format!(
                "INSERT INTO point_accounts (user_id, balance, updated_at) \
                 VALUES (UNHEX('00000000000000000000000000000001'), {balance}, NOW(6))"
            ))
            .await;
        assert!(refused.is_err(), "balance {balance} was accepted");
    }
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_itself_refuses_two_live_reservations_of_one_seat() {
    let db = Db::fresh("liveseat").await;
    for sql in [
        "INSERT INTO users (id, name, created_at) VALUES (UNHEX('00000000000000000000000000000001'), 'kim', NOW(6))",
        "INSERT INTO concerts (id, title, venue, created_at, updated_at) \
         VALUES (UNHEX('000000000000000000000000000000c1'), 'Live', 'Hall', NOW(6), NOW(6))",
        "INSERT INTO schedules (id, concert_id, starts_at, booking_opens_at, booking_closes_at, created_at) \
         VALUES (UNHEX('000000000000000000000000000000d1'), UNHEX('000000000000000000000000000000c1'), \
                 NOW(6) + INTERVAL 10 DAY, NOW(6), NOW(6) + INTERVAL 9 DAY, NOW(6))",
        "INSERT INTO seats (schedule_id, seat_number, price) VALUES (UNHEX('000000000000000000000000000000d1'), 7, 50000)",
    ] {
        db.conn.execute_unprepared(sql).await.expect(sql);
    }
    let reserve = |n: u8, status: &str| {
        format!(
            "INSERT INTO reservations (id, user_id, schedule_id, seat_number, price, status, held_until, created_at, updated_at) \
             VALUES (UNHEX('{n:032x}'), UNHEX('00000000000000000000000000000001'), \
                     UNHEX('000000000000000000000000000000d1'), 7, 50000, '{status}', NOW(6) + INTERVAL 5 MINUTE, NOW(6), NOW(6))"
        )
    };
    // Settled reservations do not count; one live one does.
    for (n, status) in [(1, "CANCELLED"), (2, "EXPIRED"), (3, "HELD")] {
        db.conn.execute_unprepared(&reserve(n, status)).await.expect(status);
    }
    for (n, status) in [(4, "HELD"), (5, "CONFIRMED")] {
        let refused = db.conn.execute_unprepared(&reserve(n, status)).await;
        assert!(
            matches!(
                refused.as_ref().map_err(sea_orm::DbErr::sql_err),
                Err(Some(sea_orm::SqlErr::UniqueConstraintViolation(_)))
            ),
            "a second live reservation ({status}) of one seat was stored: {refused:?}"
        );
    }
    // Once the hold is settled, the seat can be held again.
    db.conn
        .execute_unprepared(
            "UPDATE reservations SET status = 'EXPIRED' WHERE id = UNHEX('00000000000000000000000000000003')",
        )
        .await
        .expect("expired");
    db.conn.execute_unprepared(&reserve(6, "HELD")).await.expect("held again");
    // A seat that is not AVAILABLE names its reservation, and an AVAILABLE one names none.
    let inconsistent = db
        .conn
        .execute_unprepared(
            "UPDATE seats SET status = 'HELD' WHERE schedule_id = UNHEX('000000000000000000000000000000d1') AND seat_number = 7",
        )
        .await;
    assert!(inconsistent.is_err(), "a HELD seat without a reservation was stored");
    for bad_seat in [0, 51] {
        let refused = db
            .conn
            .execute_unprepared(&format!(
                "INSERT INTO seats (schedule_id, seat_number, price) VALUES (UNHEX('000000000000000000000000000000d1'), {bad_seat}, 1)"
            ))
            .await;
        assert!(refused.is_err(), "seat {bad_seat} was stored");
    }
    db.drop_now().await;
}
