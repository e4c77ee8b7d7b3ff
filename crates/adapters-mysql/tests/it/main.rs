//! Integration tests of the MySQL adapters against a real MariaDB/MySQL
//! (`TEST_DATABASE_URL`, or a testcontainers MariaDB). Every test gets a database of its own.

mod booking;
mod coupons;
mod erd;
mod outbox;
mod points;
mod pool;
mod queue;
mod ranking;
mod schema;
mod users;

use std::sync::Arc;

use adapters_mysql::idempotency::MySqlIdempotencyStore;
use adapters_mysql::points::MySqlPointRepository;
use adapters_mysql::tx::MySqlTransactionManager;
use adapters_mysql::users::MySqlUserRepository;
use adapters_mysql::{DatabaseConnection, database};

/// The adapter tests' statement and row-lock limit (`DATABASE_STATEMENT_TIMEOUT_MS`).
const STATEMENT_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// One row, one `i64` column `n`, read with `sql` on `conn`.
async fn number(conn: &impl sea_orm::ConnectionTrait, sql: &str) -> Result<i64, sea_orm::DbErr> {
    let row = conn
        .query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::MySql, sql))
        .await?
        .ok_or_else(|| sea_orm::DbErr::Custom("no row".into()))?;
    row.try_get::<i64>("", "n")
}

/// A migrated database of its own, with the adapters on it; dropped by [`Db::drop_now`].
struct Db {
    url: String,
    conn: DatabaseConnection,
    users: Arc<MySqlUserRepository>,
    points: Arc<MySqlPointRepository>,
    txm: Arc<MySqlTransactionManager>,
    idempotency: Arc<MySqlIdempotencyStore>,
}

impl Db {
    async fn fresh(label: &str) -> Self {
        let url = test_support::fresh_database(label).await.expect("test database");
        database::prepare(&url).await.expect("migrations apply");
        // Far above what any statement here takes, and no test here is about the limit: a
        // storm of charges on one row waits its turn in MySQL, however slow the machine.
        let conn = database::connect(&url, 16, STATEMENT_LIMIT).await.expect("pool");
        Self {
            users: Arc::new(MySqlUserRepository::new(conn.clone())),
            points: Arc::new(MySqlPointRepository::new(conn.clone())),
            txm: Arc::new(MySqlTransactionManager::new(conn.clone())),
            idempotency: Arc::new(MySqlIdempotencyStore::new(conn.clone())),
            url,
            conn,
        }
    }

    async fn drop_now(self) {
        self.conn.close().await.ok();
        test_support::drop_database(&self.url).await.expect("drop test database");
    }
}
