//! The pool `database::connect` builds: a connection the server dropped is never handed
//! to a request.

use std::time::Duration;

use adapters_mysql::{DatabaseConnection, database};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use tokio::time::Instant;

use super::number;

/// A pooled connection the server kills (a restart, `KILL`, a timeout) moments after its
/// last use costs no request: the pool pings it before handing it out, finds it dead and
/// opens another. Without that ping the next use would fail (a 503), and a connection
/// whose peer went silent would hang its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_killed_by_the_server_is_replaced_before_any_use() {
    const ID: &str = "SELECT CAST(CONNECTION_ID() AS SIGNED) AS n";
    let url = test_support::fresh_database("killed").await.expect("test database");
    let conn = database::connect(&url, 1, database::DEFAULT_STATEMENT_TIMEOUT).await.expect("pool");
    let first = number(&conn, ID).await.expect("an id");
    kill(&url, first).await;

    let second = number(&conn, ID).await.expect("the first use after the kill succeeds");
    assert_ne!(second, first, "a new connection");
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
