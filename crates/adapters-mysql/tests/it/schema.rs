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
