//! The pool `database::connect` builds: how often it pings, and what a connection killed
//! under it costs.

use std::time::Duration;

use adapters_mysql::{DatabaseConnection, database};
use sea_orm::{ConnectionTrait, DbBackend, Statement, TransactionTrait as _};
use tokio::time::Instant;

/// One row, one `i64` column `n`, read with `sql` on `conn`.
async fn number(conn: &impl ConnectionTrait, sql: &str) -> Result<i64, sea_orm::DbErr> {
    let row = conn
        .query_one_raw(Statement::from_string(DbBackend::MySql, sql))
        .await?
        .ok_or_else(|| sea_orm::DbErr::Custom("no row".into()))?;
    row.try_get::<i64>("", "n")
}

/// `COM_PING`s this session has received: MariaDB and MySQL count them in
/// `Com_admin_commands`, and the test's own statements are not admin commands.
async fn pings(conn: &impl ConnectionTrait) -> i64 {
    let row = conn
        .query_one_raw(Statement::from_string(
            DbBackend::MySql,
            "SHOW SESSION STATUS LIKE 'Com_admin_commands'",
        ))
        .await
        .expect("status")
        .expect("a row");
    let value: String = row.try_get_by_index(1).expect("a value");
    value.parse().expect("a number")
}

/// A connection given back a moment ago is handed out again without a ping: a
/// transaction costs the pool one ping (sqlx's own, when the connection comes back), not
/// two. On one connection, so every use is on the session counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_in_use_is_not_pinged_again_before_each_transaction() {
    const USES: i64 = 20;
    let url = test_support::fresh_database("pings").await.expect("test database");
    let conn = database::connect(&url, 1, database::DEFAULT_STATEMENT_TIMEOUT).await.expect("pool");
    let before = pings(&conn).await;
    for _ in 0..USES {
        let tx = conn.begin().await.expect("begin");
        assert_eq!(number(&tx, "SELECT 1 AS n").await.expect("a statement"), 1);
        tx.commit().await.expect("commit");
    }
    let spent = pings(&conn).await - before;
    // One ping per return to the pool (the 20 transactions and the first status read);
    // pinging on hand-out as well would be about twice as many. A use more than a second
    // after the last one may add one, on a machine slow enough to pause that long.
    assert!(spent >= USES, "sqlx pings each connection given back: {spent}");
    assert!(spent < USES + USES / 2, "{spent} pings for {USES} transactions");
    conn.close().await.ok();
    test_support::drop_database(&url).await.expect("drop");
}

/// A pooled connection the server kills (a restart, `KILL`, a timeout) costs at most the
/// one use that finds it dead: that use fails (a 503 to its request), and the pool closes
/// the connection and opens another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_killed_by_the_server_fails_at_most_one_use() {
    let url = test_support::fresh_database("killed").await.expect("test database");
    let conn = database::connect(&url, 1, database::DEFAULT_STATEMENT_TIMEOUT).await.expect("pool");
    let first = number(&conn, "SELECT CAST(CONNECTION_ID() AS SIGNED) AS n").await.expect("an id");
    kill(&url, first).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut failures = 0;
    let second = loop {
        match number(&conn, "SELECT CAST(CONNECTION_ID() AS SIGNED) AS n").await {
            Ok(id) => break id,
            Err(_) if Instant::now() < deadline => failures += 1,
            Err(e) => panic!("the pool did not recover within 30 s: {e}"),
        }
    };
    assert_ne!(second, first, "a new connection");
    assert!(failures <= 1, "{failures} uses failed on the killed connection");
    conn.close().await.ok();
    test_support::drop_database(&url).await.expect("drop");
}

/// Kills connection `id` from a connection of its own, and waits until the server has.
async fn kill(url: &str, id: i64) {
    let admin: DatabaseConnection = sea_orm::Database::connect(url).await.expect("admin connection");
    admin
        .execute_raw(Statement::from_string(DbBackend::MySql, format!("KILL CONNECTION {id}")))
        .await
        .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(30);
    let sql = format!("SELECT COUNT(*) AS n FROM information_schema.PROCESSLIST WHERE ID = {id}");
    while number(&admin, &sql).await.expect("processlist") > 0 {
        assert!(Instant::now() < deadline, "connection {id} still listed after 30 s");
        tokio::task::yield_now().await;
    }
    admin.close().await.ok();
}
