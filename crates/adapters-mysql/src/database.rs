//! Connecting to MySQL, creating the database, migrating.

use std::time::Duration;

use anyhow::Context as _;
use migration::{Migrator, MigratorTrait as _};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};

/// The named lock that lets one instance at a time run migrations.
const MIGRATION_LOCK: &str = "concert-server:migrations";
/// How long an instance waits for another one's migrations.
const MIGRATION_LOCK_WAIT_SECONDS: i64 = 120;

/// The default bound on one statement and on one row-lock wait.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects a pool of up to `max_connections` to `url`. Every connection works in UTC
/// (`time_zone = '+00:00'`: no daylight-saving hour repeats in `NOW()`), and has
/// the database cut a statement that runs longer than `statement_timeout` and a row-lock
/// wait longer than it (rounded up to whole seconds, InnoDB's unit), so a hung query fails
/// (`SERVICE_UNAVAILABLE`) instead of holding a lock and a connection.
///
/// # Errors
/// When the database cannot be reached within a few seconds.
pub async fn connect(
    url: &str,
    max_connections: u32,
    statement_timeout: Duration,
) -> anyhow::Result<DatabaseConnection> {
    let mut options = quiet(url);
    let lock_wait_seconds = statement_timeout.as_millis().div_ceil(1_000).max(1);
    let statement_seconds = statement_timeout.as_secs_f64();
    let statement_ms = statement_timeout.as_millis();
    // On every connection the pool opens, old or new: sqlx's own hook. (sea-orm's
    // `ConnectOptions::after_connect` runs once, on the pool, so it reached one connection
    // and left the others with the server's time zone, a 50 s row-lock wait and no
    // statement limit.)
    options.map_sqlx_mysql_pool_opts(move |pool| {
        pool.after_connect(move |conn, _| {
            Box::pin(async move {
                use sea_orm::sqlx::{Executor as _, Row as _};
                // MariaDB and MySQL name the statement limit differently (and MySQL's
                // applies to SELECT only).
                let version: String = conn.fetch_one("SELECT VERSION()").await?.try_get(0)?;
                let statement_limit = if version.contains("MariaDB") {
                    format!("max_statement_time = {statement_seconds}")
                } else {
                    format!("max_execution_time = {statement_ms}")
                };
                let session = format!(
                    "SET SESSION time_zone = '+00:00', innodb_lock_wait_timeout = {lock_wait_seconds}, {statement_limit}"
                );
                // Numbers formatted here, nothing from outside.
                conn.execute(sea_orm::sqlx::raw_sql(sea_orm::sqlx::AssertSqlSafe(session))).await.map(|_| ())
            })
        })
    });
    options
        .max_connections(max_connections)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        // A request that cannot get a connection soon is better failed than queued for ever.
        .acquire_timeout(Duration::from_secs(5))
        // sqlx pings a connection before handing it out, and again (always) when it comes
        // back: a charge's five statements are seven commands. The ping on hand-out is
        // kept on purpose. It runs under the acquire timeout, so an idle connection whose
        // peer went silent (a partition, a failover that left the old address unanswered)
        // fails its request after 5 s (503) and is dropped; handed out unpinged it would
        // hang its request until the kernel gives up on the socket (sqlx has no read
        // timeout), about 15 minutes. (A statement already in flight hangs that long
        // either way: docs/report.md section 7.) Skipping it for connections used within
        // the last second was measured (docs/report.md 5.2): pings per commit 2.01 to
        // 1.03, throughput within the noise. Not worth the hang.
        .test_before_acquire(true)
        .sqlx_logging(false);
    Database::connect(options).await.context("failed to connect to MySQL")
}

async fn connect_plain(url: &str) -> anyhow::Result<DatabaseConnection> {
    let mut options = quiet(url);
    options
        .max_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5));
    Database::connect(options).await.context("failed to connect to MySQL")
}

/// Answers whether the database takes queries now (readiness).
///
/// # Errors
/// When a round trip fails.
pub async fn ping(db: &DatabaseConnection) -> anyhow::Result<()> {
    db.ping().await.context("MySQL ping failed")
}

/// Makes the database at `url` ready: creates it when missing, then applies pending
/// migrations. Safe when many instances start at once: creation is `IF NOT EXISTS`, and
/// migrations run under a MySQL named lock on a dedicated single connection, so the
/// others wait and then find nothing left to do.
///
/// # Errors
/// When the server cannot be reached, the database name is not plain, or a migration fails.
pub async fn prepare(url: &str) -> anyhow::Result<()> {
    prepare_with(url, false).await
}

/// [`prepare`], then, when `seed_demo` is on and the database has no concert yet, the demo
/// catalog ([`crate::seed`]), under the same lock (so that instances starting together
/// seed once).
///
/// # Errors
/// As [`prepare`], or when seeding fails.
pub async fn prepare_with(url: &str, seed_demo: bool) -> anyhow::Result<()> {
    let (server, name) = split_database_url(url)?;
    // The connection that migrates also tells whether the database exists.
    // Migrations may take long: no statement limit on this connection.
    let conn = match connect_plain(url).await {
        Ok(conn) => conn,
        Err(_) => {
            create_database(&server, &name).await?;
            connect_plain(url).await?
        }
    };
    let result = migrate_exclusively(&conn, seed_demo).await;
    conn.close().await.ok();
    result
}

async fn migrate_exclusively(conn: &DatabaseConnection, seed_demo: bool) -> anyhow::Result<()> {
    let locked = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            "SELECT GET_LOCK(?, ?) AS locked",
            [MIGRATION_LOCK.into(), MIGRATION_LOCK_WAIT_SECONDS.into()],
        ))
        .await
        .context("failed to take the migration lock")?
        .and_then(|row| row.try_get::<Option<i64>>("", "locked").ok().flatten());
    anyhow::ensure!(
        locked == Some(1),
        "another instance held the migration lock for {MIGRATION_LOCK_WAIT_SECONDS} s"
    );
    let mut migrated = Migrator::up(conn, None).await.context("failed to apply migrations");
    if seed_demo && migrated.is_ok() {
        migrated = crate::seed::seed_demo_data(conn).await.map(drop);
    }
    conn.execute_raw(Statement::from_sql_and_values(
        DbBackend::MySql,
        "DO RELEASE_LOCK(?)",
        [MIGRATION_LOCK.into()],
    ))
    .await
    .context("failed to release the migration lock")?;
    migrated
}

/// Creates database `name` on `server`, so `make run` works on a server that has never
/// seen this service.
async fn create_database(server: &str, name: &str) -> anyhow::Result<()> {
    let admin = Database::connect(quiet(server).max_connections(1).to_owned())
        .await
        .context("failed to connect to the MySQL server")?;
    admin
        .execute_unprepared(&format!(
            "CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        ))
        .await
        .with_context(|| format!("failed to create database {name}"))?;
    admin.close().await.ok();
    tracing::info!(database = %name, "database created");
    Ok(())
}

/// Options that keep statements out of the logs (they may carry personal data, and at
/// INFO they would drown everything else).
fn quiet(url: &str) -> ConnectOptions {
    let mut options = ConnectOptions::new(url);
    options.sqlx_logging(false);
    options
}

/// The database name of `url` (`mysql://.../name?...`), if it is a plain one.
#[must_use]
pub fn database_name(url: &str) -> Option<String> {
    split_database_url(url).ok().map(|(_, name)| name)
}

/// Splits `mysql://user@host:port/name?options` into the server URL (options kept) and
/// the database name, which must be plain (letters, digits, `_`, `$`) since it is spliced
/// into DDL.
fn split_database_url(url: &str) -> anyhow::Result<(String, String)> {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let after_scheme = base.split_once("://").map_or(base, |(_, rest)| rest);
    let (_, name) =
        after_scheme.split_once('/').context("DATABASE_URL must name a database: mysql://host/name")?;
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$'),
        "the database name in DATABASE_URL must be 1..=64 letters, digits, '_' or '$'"
    );
    let server_base = &base[..base.len() - name.len() - 1];
    let server = query.map_or_else(|| server_base.to_owned(), |q| format!("{server_base}?{q}"));
    Ok((server, name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::split_database_url;

    #[test]
    fn a_database_url_splits_into_server_and_name() {
        let (server, name) = split_database_url("mysql://root@127.0.0.1:3306/concert").unwrap();
        assert_eq!((server.as_str(), name.as_str()), ("mysql://root@127.0.0.1:3306", "concert"));
        let (server, name) = split_database_url("mysql://u:p@db/concert_1?ssl-mode=disabled").unwrap();
        assert_eq!((server.as_str(), name.as_str()), ("mysql://u:p@db?ssl-mode=disabled", "concert_1"));
    }

    #[test]
    fn a_url_without_a_plain_database_name_is_refused() {
        assert!(split_database_url("mysql://root@127.0.0.1:3306").is_err());
        assert!(split_database_url("mysql://root@127.0.0.1:3306/").is_err());
        assert!(split_database_url("mysql://root@h/x`; DROP TABLE users").is_err());
    }
}
