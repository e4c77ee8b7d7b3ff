//! `docs/explain.sh` (run by `make bench`): the plan the server chooses for every hot
//! statement, written to `docs/report/explain.md`.
//!
//! The statements are [`adapters_mysql::sql::EXPLAINED`]: the very constants the adapters
//! run, so the report cannot drift from the code. Each is explained as a prepared
//! statement, `EXPLAIN <sql>` with a sample value bound to each `?` (EXPLAIN of a write
//! does not carry it out). The samples are rows `docs/explain.sh` creates in its scratch
//! database: date `0xd0…07`, concert `0xc0…07`, user `0x00…07`, seat 7 and the live hold on
//! that seat, reservation `0xe0…0133` (so that the statements that match a seat to its hold,
//! the hold's `INSERT ... SELECT` among them, find the row they would in earnest).
//!
//! `EXPLAIN_DATABASE_URL` names the scratch database (already migrated and filled); the
//! report goes to the first argument, else `EXPLAIN_REPORT`, else `docs/report/explain.md`.

#![allow(clippy::print_stdout, reason = "a report generator says where it wrote")]

use std::fmt::Write as _;

use adapters_mysql::sql::{EXPLAINED, Explained, Sample};
use anyhow::Context as _;
use sea_orm::entity::prelude::{TimeDateTime, TimeDateTimeWithTimeZone};
use sea_orm::{ConnectionTrait as _, DatabaseConnection, DbBackend, QueryResult, Statement, Value};
use uuid::Uuid;

const DEFAULT_REPORT: &str = "docs/report/explain.md";

/// The sample ids `docs/explain.sh` creates: `UNHEX(CONCAT('d', LPAD(HEX(7), 31, '0')))`
/// and so on.
const SCHEDULE: Uuid = Uuid::from_u128(0xd000_0000_0000_0000_0000_0000_0000_0007);
const CONCERT: Uuid = Uuid::from_u128(0xc000_0000_0000_0000_0000_0000_0000_0007);
/// Reservation 307 (`HEX(307)` is `133`): the live hold of date 7, seat 7 in the scratch
/// data (reservation n is on date (n - 1) DIV 50 + 1, seat (n - 1) % 50 + 1).
const RESERVATION: Uuid = Uuid::from_u128(0xe000_0000_0000_0000_0000_0000_0000_0133);
const USER: Uuid = Uuid::from_u128(0x0000_0000_0000_0000_0000_0000_0000_0007);
/// The id of a row being inserted: no row has it.
const NEW_ID: Uuid = Uuid::from_u128(0xf000_0000_0000_0000_0000_0000_0000_0007);
const SEAT: u8 = 7;
/// Five minutes, a hold's default length.
const MICROS: i64 = 300_000_000;
/// The expiry job's batch.
const LIMIT: u32 = 200;
const TEXT: &str = "k-1";
const NUMBER: i64 = 1;

fn value(sample: Sample, now: TimeDateTime) -> Value {
    match sample {
        Sample::Schedule => SCHEDULE.into(),
        Sample::Concert => CONCERT.into(),
        Sample::Reservation => RESERVATION.into(),
        Sample::User => USER.into(),
        Sample::Id => NEW_ID.into(),
        Sample::Seat => SEAT.into(),
        Sample::Micros => MICROS.into(),
        Sample::Limit => LIMIT.into(),
        Sample::Time => now.into(),
        Sample::Text => TEXT.into(),
        Sample::Number => NUMBER.into(),
    }
}

/// How a sample is shown under its statement.
fn shown(sample: Sample) -> String {
    match sample {
        Sample::Schedule => "date `0xd0…07`".to_owned(),
        Sample::Concert => "concert `0xc0…07`".to_owned(),
        Sample::Reservation => "reservation `0xe0…0133` (the hold of that seat)".to_owned(),
        Sample::User => "user `0x00…07`".to_owned(),
        Sample::Id => "new id `0xf0…07`".to_owned(),
        Sample::Seat => format!("seat {SEAT}"),
        Sample::Micros => format!("{MICROS} µs"),
        Sample::Limit => format!("limit {LIMIT}"),
        Sample::Time => "now".to_owned(),
        Sample::Text => format!("'{TEXT}'"),
        Sample::Number => NUMBER.to_string(),
    }
}

/// Column `index` of `row` as text, whatever its type (EXPLAIN's columns differ in type
/// between MariaDB and MySQL, and between the text and binary protocols); NULL is empty.
fn cell(row: &QueryResult, index: usize) -> String {
    fn text<T: ToString>(value: Option<T>) -> String {
        value.map_or_else(String::new, |v| v.to_string())
    }
    if let Ok(v) = row.try_get_by_index::<Option<String>>(index) {
        return v.unwrap_or_default();
    }
    if let Ok(v) = row.try_get_by_index::<Option<i64>>(index) {
        return text(v);
    }
    if let Ok(v) = row.try_get_by_index::<Option<u64>>(index) {
        return text(v);
    }
    if let Ok(v) = row.try_get_by_index::<Option<f64>>(index) {
        return text(v);
    }
    if let Ok(v) = row.try_get_by_index::<Option<f32>>(index) {
        return text(v);
    }
    if let Ok(v) = row.try_get_by_index::<Option<Vec<u8>>>(index) {
        return v.map_or_else(String::new, |v| String::from_utf8_lossy(&v).into_owned());
    }
    // Any other type (a DECIMAL): its bytes as text, unchecked.
    row.try_as_mysql_row()
        .and_then(|mysql| {
            let raw: Result<Option<String>, _> = sea_orm::sqlx::Row::try_get_unchecked(mysql, index);
            raw.ok()
        })
        .map_or_else(|| "?".to_owned(), Option::unwrap_or_default)
}

/// A Markdown table cell: no line breaks, no unescaped `|`.
fn escaped(cell: &str) -> String {
    cell.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// `cell` without the scratch database's name (`explain_123.o.aggregate_id` is
/// `o.aggregate_id`), so that the report does not change from run to run for it.
fn unqualified(cell: &str, database: &str) -> String {
    if database.is_empty() { cell.to_owned() } else { cell.replace(&format!("{database}."), "") }
}

async fn query(db: &DatabaseConnection, sql: &str) -> anyhow::Result<Vec<QueryResult>> {
    db.query_all_raw(Statement::from_string(DbBackend::MySql, sql)).await.with_context(|| sql.to_owned())
}

/// The first row's columns, as text.
async fn first_row(db: &DatabaseConnection, sql: &str) -> anyhow::Result<Vec<String>> {
    let rows = query(db, sql).await?;
    let row = rows.first().with_context(|| format!("no row: {sql}"))?;
    Ok((0..row.column_names().len()).map(|i| cell(row, i)).collect())
}

/// What the scratch database holds, counted rather than assumed.
async fn data_shape(db: &DatabaseConnection) -> anyhow::Result<String> {
    let counts = first_row(
        db,
        "SELECT (SELECT COUNT(*) FROM schedules) AS dates, (SELECT COUNT(*) FROM seats) AS seats, \
           (SELECT COUNT(*) FROM reservations) AS reservations, \
           (SELECT COUNT(*) FROM reservations WHERE status = 'HELD') AS held, \
           (SELECT COUNT(*) FROM reservations WHERE status = 'HELD' AND held_until <= UTC_TIMESTAMP(6)) AS run_out, \
           (SELECT COUNT(*) FROM users) AS users, (SELECT COUNT(*) FROM point_accounts) AS accounts, \
           (SELECT COUNT(*) FROM idempotency_keys) AS idempotency_keys",
    )
    .await?;
    let [dates, seats, reservations, held, run_out, users, accounts, keys] = counts.as_slice() else {
        anyhow::bail!("the data shape query answered {} columns", counts.len());
    };
    Ok(format!(
        "{dates} dates and {seats} seats, {reservations} reservations ({held} live holds, {run_out} of them \
         run out), {users} users with {accounts} point accounts, {keys} idempotency keys"
    ))
}

async fn explain(
    db: &DatabaseConnection,
    database: &str,
    statement: &Explained,
    now: TimeDateTime,
) -> anyhow::Result<String> {
    let values: Vec<Value> = statement.params.iter().map(|&sample| value(sample, now)).collect();
    let plan = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            format!("EXPLAIN {}", statement.sql),
            values,
        ))
        .await
        .with_context(|| format!("EXPLAIN of {:?} failed: {}", statement.title, statement.sql))?;
    let mut out = String::new();
    writeln!(out, "## {}\n", statement.title)?;
    writeln!(out, "```sql\n{}\n```\n", statement.sql)?;
    if !statement.params.is_empty() {
        let bound: Vec<String> = statement.params.iter().map(|&sample| shown(sample)).collect();
        writeln!(out, "Explained with: {}.\n", bound.join(", "))?;
    }
    let Some(first) = plan.first() else {
        writeln!(out, "(EXPLAIN answered no rows)")?;
        return Ok(out);
    };
    let columns = first.column_names();
    writeln!(out, "| {} |", columns.iter().map(|c| escaped(c.as_str())).collect::<Vec<_>>().join(" | "))?;
    writeln!(out, "|{}", "---|".repeat(columns.len()))?;
    for row in &plan {
        let cells: Vec<String> =
            (0..columns.len()).map(|i| escaped(&unqualified(&cell(row, i), database))).collect();
        writeln!(out, "| {} |", cells.join(" | "))?;
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("EXPLAIN_DATABASE_URL")
        .context("EXPLAIN_DATABASE_URL must name the scratch database (docs/explain.sh sets it)")?;
    let report = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("EXPLAIN_REPORT").ok())
        .unwrap_or_else(|| DEFAULT_REPORT.to_owned());
    // The server's own session settings (UTC, statement limits).
    let db = adapters_mysql::database::connect(&url, 1, adapters_mysql::database::DEFAULT_STATEMENT_TIMEOUT)
        .await?;
    let now = TimeDateTimeWithTimeZone::now_utc();
    let now = TimeDateTime::new(now.date(), now.time());

    let version = first_row(&db, "SELECT VERSION() AS version").await?.concat();
    let database = first_row(&db, "SELECT DATABASE() AS name").await?.concat();
    let shape = data_shape(&db).await?;
    let mut out = String::new();
    writeln!(out, "# Query plans of the hot statements\n")?;
    writeln!(
        out,
        "Generated by `docs/explain.sh` (run by `make bench`, with `tests/src/bin/explain.rs`); do not edit \
         by hand. {version}, on a scratch database of {shape}.\n"
    )?;
    writeln!(
        out,
        "Each statement is the constant in `crates/adapters-mysql/src/sql.rs` the adapter runs, explained as \
         a prepared statement with a sample value bound to each `?` (EXPLAIN does not carry out a write). A \
         hot statement should read through a key: `type` `const`, `eq_ref`, `ref` or `range`, not `ALL`; \
         the exceptions are the concert list (a small table, read by the cache only) and a plain \
         `INSERT ... VALUES`, which reads no rows (MariaDB shows it as `ALL` with no `rows`).\n"
    )?;
    for statement in EXPLAINED {
        out.push_str(&explain(&db, &database, statement, now).await?);
        out.push('\n');
    }
    db.close().await.ok();
    // One trailing newline.
    let out = format!("{}\n", out.trim_end());
    std::fs::write(&report, out).with_context(|| format!("failed to write {report}"))?;
    println!("written to {report}");
    Ok(())
}
