//! `make bench`: our figures beside the physical limits, measured in the same run, so that
//! every ratio reads "ours / the limit".
//!
//! 1. **The lock cycle.** Uncontended acquire + release through the service's own lock
//!    (`RedisLock`, a key of its own per task, `CLIENTS` tasks) against what Redis itself
//!    does at the same client count: `redis-benchmark -c CLIENTS` running `SET k x NX PX`
//!    and `DEL k` on random keys, the least a lock cycle can cost (one write to take with a
//!    lease, one to give back). The pair's rate is `1 / (1/SET + 1/DEL)`.
//! 2. **The charge transaction.** The very statements of a charge (`adapters_mysql::sql`:
//!    `LOCK_ACCOUNT` = `SELECT ... FOR UPDATE`, `SAVE_BALANCE`, `APPEND_HISTORY`, then
//!    `COMMIT`) sent straight to MariaDB from `CLIENTS` connections: all on one account (the
//!    database's serialized rate on one row), and spread over `USERS` accounts.
//! 3. **Charges over HTTP**, three release-build instances on the same database: a storm on
//!    one account, and `CLIENTS` connections charging random accounts among `USERS` for a
//!    fixed time. Each is compared with the matching limit of 2. `BENCH_SPREAD_INSTANCES=1`
//!    (or 2) sends the spread charges to that many of the instances only, the others idle:
//!    an experiment's knob (report 5.2), not what `make bench` runs: its figures are
//!    printed, the spread's ratio as not judged against its target, and nothing is written.
//!
//! Every figure is measured `benchkit::runs()` times (min / median / max); the targets of
//! issue 18 are printed beside the ratios, never asserted. Writes `docs/bench/limits.*`.
//! Needs `TEST_DATABASE_URL`, `TEST_REDIS_URL`, `redis-benchmark` (Debian's redis-tools),
//! and the release build next to it.

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]
#![allow(clippy::cast_precision_loss, reason = "figures")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use adapters_redis::connection::RedisConnections;
use adapters_redis::lock::{LockOptions, RedisLock};
use anyhow::Context as _;
use application::lock::{DistributedLock, LockKey, WaitPolicy};
use e2e::benchkit::{self, Figure, Progress, Series};
use e2e::booking::{AsFan as _, Fan, sign_up};
use e2e::{Cluster, ClusterOptions, client, owned};
use sea_orm::{ConnectionTrait as _, DatabaseConnection, DbBackend, Statement, TransactionTrait as _};
use serde_json::json;

const CLIENTS: usize = 50;
const INSTANCES: usize = 3;
const AMOUNT: i64 = 10;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let quick = benchkit::quick();
    let runs = benchkit::runs();
    let users = benchkit::size(1_000, 200);
    let spread_for = Duration::from_secs(if quick { 3 } else { 10 });
    let hot_storm = benchkit::size(3_000, 600);
    let cycles = benchkit::size(100_000, 20_000);
    let spread_instances = spread_instances()?;

    // 1. The lock cycle against redis-benchmark, alternating run by run.
    let redis_url = test_support::redis_url().await;
    let (mut ours, mut limit) = (Vec::new(), Vec::new());
    let progress = Progress::new("limits: lock cycle", u64::try_from(runs * 2)?);
    for _ in 0..runs {
        limit.push(redis_benchmark_pair(&redis_url, cycles)?);
        progress.step(1);
        ours.push(lock_cycles(&redis_url, cycles).await?);
        progress.step(1);
    }
    let lock_figure = Figure::new("lock-cycle", "Uncontended lock cycle, 50 clients", "cycles/s")
        .with(Series::new("redis-benchmark SET+DEL", limit))
        .with(Series::new("RedisLock acquire+release", ours));

    // The cluster and its users (not timed): accounts opened by a first charge each.
    let env = [owned(e2e::PATIENT_LOCKS), owned(&[("RUST_LOG", "warn"), ("DATABASE_MAX_CONNECTIONS", "30")])]
        .concat();
    let cluster =
        Cluster::start_with(INSTANCES, &ClusterOptions { env, ..ClusterOptions::default() }).await?;
    let http = client();
    let progress = Progress::new("limits: users", u64::try_from(users)?);
    let mut fans = Vec::with_capacity(users);
    for chunk in (0..users).collect::<Vec<_>>().chunks(100) {
        let made = futures::future::join_all(chunk.iter().map(|i| {
            let (http, base) = (&http, cluster.url(*i));
            async move {
                let fan = sign_up(http, base, "limits").await?;
                anyhow::ensure!(charge(http, base, &fan).await == 200, "opening charge refused");
                anyhow::Ok(fan)
            }
        }))
        .await;
        for fan in made {
            fans.push(fan?);
        }
        progress.step(u64::try_from(chunk.len())?);
    }
    let db = adapters_mysql::database::connect(
        cluster.direct_database_url(),
        u32::try_from(CLIENTS)?,
        Duration::from_secs(30),
    )
    .await?;
    let ids: Vec<uuid::Uuid> = fans.iter().map(|f| f.id.parse()).collect::<Result<_, _>>()?;

    // 2 and 3, alternating limit and ours run by run.
    let (mut db_hot, mut http_hot, mut db_spread, mut http_spread) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let progress = Progress::new("limits: charges", u64::try_from(runs * 4)?);
    for _ in 0..runs {
        db_hot.push(transactions(&db, &ids[..1], spread_for).await?);
        progress.step(1);
        http_hot.push(hot_http(&http, &cluster, &fans[0], hot_storm).await?);
        progress.step(1);
        db_spread.push(transactions(&db, &ids, spread_for).await?);
        progress.step(1);
        http_spread.push(spread_http(&http, &cluster, spread_instances, &fans, spread_for).await?);
        progress.step(1);
    }
    db.close().await.ok();
    let exact = exact_books(&cluster).await?;
    cluster.shut_down().await;

    let hot_figure = Figure::new("hot-account", "Charges on one account", "charges/s")
        .with(Series::new("MariaDB, the transaction alone", db_hot))
        .with(Series::new("HTTP, three instances", http_hot));
    let spread_figure =
        Figure::new("spread", format!("Charges over {users} accounts, 50 clients"), "charges/s")
            .with(Series::new("MariaDB, the transaction alone", db_spread))
            .with(Series::new(
                match spread_instances {
                    1 => "HTTP, one instance (two idle)",
                    2 => "HTTP, two instances (one idle)",
                    _ => "HTTP, three instances",
                },
                http_spread,
            ));
    let ratio = |what: &str, figure: &Figure| {
        benchkit::ratio(what, figure.series[1].spread().median, figure.series[0].spread().median)
    };
    // With the spread sent to fewer instances, its row is an experiment's figure, not the
    // target's: the target is judged as `make bench` measures it, over all three.
    let experiment = spread_instances != INSTANCES;
    let spread_what = if experiment {
        format!(
            "spread charges over HTTP (`BENCH_SPREAD_INSTANCES={spread_instances}`, an experiment: the target \
             is judged over {INSTANCES}) / MariaDB on distinct rows"
        )
    } else {
        "spread charges over HTTP / MariaDB on distinct rows".to_owned()
    };
    let targets = [
        ("lock cycle / redis-benchmark SET+DEL", &lock_figure, 0.5, true),
        ("hot-account charges over HTTP / MariaDB on one row", &hot_figure, 0.25, true),
        (spread_what.as_str(), &spread_figure, 0.5, !experiment),
    ]
    .into_iter()
    .map(|(what, figure, target, judged)| Ok((what, ratio(what, figure)?, target, judged)))
    .collect::<anyhow::Result<Vec<_>>>()?;
    let about = format!(
        "Our figures beside the limits measured in the same run (`tests/src/bin/bench-limits.rs`): \
         the lock cycle against `redis-benchmark` SET+DEL at {CLIENTS} clients, the charge transaction \
         sent straight to MariaDB ({CLIENTS} connections, on one row and spread over {users} accounts) \
         against charges over HTTP on {INSTANCES} release-build instances ({hot_storm} at once on one \
         account; {CLIENTS} clients for {} s over {users} accounts{}). Exactness after all runs: {exact}.",
        spread_for.as_secs(),
        if experiment {
            format!(", sent to {spread_instances} of the instances (`BENCH_SPREAD_INSTANCES`)")
        } else {
            String::new()
        }
    );
    let mut table = String::from("| ratio (medians) | measured | target |\n|---|---:|---:|\n");
    for (what, measured, target, judged) in &targets {
        let verdict = match (judged, measured >= target) {
            (false, _) => "not judged",
            (true, true) => "met",
            (true, false) => "not met",
        };
        table.push_str(&format!("| {what} | {measured:.2} | {target} ({verdict}) |\n"));
    }
    if experiment {
        // An experiment's figures: printed, never written over `make bench`'s files.
        println!("\n{about}\n");
        for figure in [&lock_figure, &hot_figure, &spread_figure] {
            println!("{}", figure.table());
        }
        println!("{table}\nBENCH_SPREAD_INSTANCES: an experiment, nothing written to {}", benchkit::DIR);
        return Ok(());
    }
    let mut markdown = benchkit::write(
        "limits",
        &about,
        &[lock_figure, hot_figure, spread_figure],
        json!({"targets": targets.iter().map(|(what, ratio, target, _)| json!({"ratio": what, "measured": ratio, "target": target})).collect::<Vec<_>>()}),
    )?;
    markdown.push_str(&table);
    std::fs::write(format!("{}/limits.md", benchkit::DIR), &markdown)?;
    println!("{markdown}");
    Ok(())
}

/// Cycles per second of `redis-benchmark`'s `SET key x NX PX 10000` (a take with a lease)
/// and `DEL key` (a give-back), taken as one pair, on random keys.
fn redis_benchmark_pair(url: &str, requests: usize) -> anyhow::Result<f64> {
    let address = url.trim_start_matches("redis://");
    let (host, port) = address.rsplit_once(':').unwrap_or((address, "6379"));
    let rate = |command: &[&str]| -> anyhow::Result<f64> {
        let output = std::process::Command::new("redis-benchmark")
            .args(["-h", host, "-p", port.trim_end_matches('/'), "-c", &CLIENTS.to_string()])
            .args(["-n", &requests.to_string(), "-r", "1000000", "--csv"])
            .args(command)
            .output()
            .context("run redis-benchmark (Debian's redis-tools)")?;
        anyhow::ensure!(
            output.status.success(),
            "redis-benchmark: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let csv = String::from_utf8_lossy(&output.stdout);
        // The header, then one line: "<command>","<requests per second>",...
        csv.lines()
            .nth(1)
            .and_then(|line| line.split("\",\"").nth(1))
            .and_then(|field| field.trim_matches('"').parse::<f64>().ok())
            .with_context(|| format!("no figure in redis-benchmark's output: {csv}"))
    };
    let set = rate(&["SET", "limits:__rand_int__", "x", "NX", "PX", "10000"])?;
    let del = rate(&["DEL", "limits:__rand_int__"])?;
    Ok(1.0 / (1.0 / set + 1.0 / del))
}

/// Uncontended acquire + release cycles per second: `CLIENTS` tasks, a key each.
async fn lock_cycles(url: &str, cycles: usize) -> anyhow::Result<f64> {
    let redis = RedisConnections::connect(url, 4, Duration::from_secs(5)).await?;
    let lock = RedisLock::new(redis.pool.clone(), Some(&redis.subscriber), LockOptions::default()).await?;
    let per_task = cycles / CLIENTS;
    let started = Instant::now();
    let tasks = (0..CLIENTS).map(|_| {
        let lock = lock.clone();
        let key = LockKey::new("bench", uuid::Uuid::new_v4().simple());
        tokio::spawn(async move {
            for _ in 0..per_task {
                lock.acquire(&key, WaitPolicy::FailFast).await?.release().await?;
            }
            anyhow::Ok(())
        })
    });
    for task in futures::future::join_all(tasks).await {
        task??;
    }
    let rate = (per_task * CLIENTS) as f64 / started.elapsed().as_secs_f64();
    redis.quit().await;
    Ok(rate)
}

/// A charge's transaction, as the adapter runs it, on account `user`.
async fn charge_transaction(db: &DatabaseConnection, user: uuid::Uuid) -> anyhow::Result<()> {
    let tx = db.begin().await?;
    let row = tx
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            adapters_mysql::sql::LOCK_ACCOUNT,
            [user.into()],
        ))
        .await?
        .context("no account")?;
    let balance: i64 = row.try_get_by_index(1)?;
    let version: i64 = row.try_get_by_index(2)?;
    let now = db_time();
    let fence: Option<i64> = None;
    let saved = tx
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            adapters_mysql::sql::SAVE_BALANCE,
            [
                (balance + AMOUNT).into(),
                (version + 1).into(),
                now.clone().into(),
                fence.into(),
                user.into(),
                version.into(),
                fence.into(),
                fence.into(),
            ],
        ))
        .await?;
    anyhow::ensure!(saved.rows_affected() == 1, "the balance was not saved");
    tx.execute_raw(Statement::from_sql_and_values(
        DbBackend::MySql,
        adapters_mysql::sql::APPEND_HISTORY,
        [
            uuid::Uuid::now_v7().into(),
            user.into(),
            "CHARGE".into(),
            AMOUNT.into(),
            (balance + AMOUNT).into(),
            (version + 1).into(),
            now.into(),
        ],
    ))
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The time as the database's DATETIME(6) text.
fn db_time() -> String {
    let now = application::clock::now_utc();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    )
}

/// Charge transactions per second from `CLIENTS` connections for `duration`, each on a
/// random account of `users`.
async fn transactions(
    db: &DatabaseConnection,
    users: &[uuid::Uuid],
    duration: Duration,
) -> anyhow::Result<f64> {
    let users = Arc::new(users.to_vec());
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks = (0..CLIENTS).map(|_| {
        let (db, users) = (db.clone(), Arc::clone(&users));
        tokio::spawn(async move {
            let mut done = 0_usize;
            while Instant::now() < deadline {
                charge_transaction(&db, users[fastrand::usize(..users.len())]).await?;
                done += 1;
            }
            anyhow::Ok(done)
        })
    });
    let mut total = 0;
    for task in futures::future::join_all(tasks).await {
        total += task??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn charge(http: &awc::Client, base: &str, fan: &Fan) -> u16 {
    http.post(format!("{base}/api/v1/users/{}/points/charge", fan.id))
        .bearer(fan)
        .send_json(&json!({"amount": AMOUNT}))
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// A storm of `storm` charges at once on one account, round-robin over the instances.
async fn hot_http(http: &awc::Client, cluster: &Cluster, fan: &Fan, storm: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let answers = futures::future::join_all((0..storm).map(|i| charge(http, cluster.url(i), fan))).await;
    let rate = storm as f64 / started.elapsed().as_secs_f64();
    let refused = answers.iter().filter(|status| **status != 200).count();
    anyhow::ensure!(refused == 0, "{refused} of {storm} hot-account charges refused");
    Ok(rate)
}

/// How many of the instances the spread charges go to: `BENCH_SPREAD_INSTANCES`, 1 to
/// `INSTANCES`, all of them when unset (an experiment's knob: what three processes on the
/// same cores cost beside one).
fn spread_instances() -> anyhow::Result<usize> {
    match std::env::var("BENCH_SPREAD_INSTANCES") {
        Err(std::env::VarError::NotPresent) => Ok(INSTANCES),
        Ok(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=INSTANCES).contains(&n) => Ok(n),
            _ => anyhow::bail!("BENCH_SPREAD_INSTANCES must be 1 to {INSTANCES}, not {raw:?}"),
        },
        Err(error) => anyhow::bail!("BENCH_SPREAD_INSTANCES: {error}"),
    }
}

/// `CLIENTS` clients charging random accounts for `duration` on the first `instances`.
async fn spread_http(
    http: &awc::Client,
    cluster: &Cluster,
    instances: usize,
    fans: &[Fan],
    duration: Duration,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let clients = (0..CLIENTS).map(|c| async move {
        let (mut done, mut refused) = (0_usize, 0_usize);
        let mut i = c;
        while Instant::now() < deadline {
            let fan = &fans[fastrand::usize(..fans.len())];
            if charge(http, cluster.url(i % instances), fan).await == 200 {
                done += 1;
            } else {
                refused += 1;
            }
            i += 1;
        }
        (done, refused)
    });
    let results = futures::future::join_all(clients).await;
    let refused: usize = results.iter().map(|(_, r)| r).sum();
    anyhow::ensure!(refused == 0, "{refused} spread charges refused");
    Ok(results.iter().map(|(d, _)| d).sum::<usize>() as f64 / started.elapsed().as_secs_f64())
}

/// After every run: each balance is the sum of its history, and each history a gap-free
/// chain (the HTTP charges and the direct transactions wrote the same accounts).
async fn exact_books(cluster: &Cluster) -> anyhow::Result<&'static str> {
    let db = sea_orm::Database::connect(cluster.direct_database_url()).await?;
    let count = |sql: &'static str| {
        let db = &db;
        async move {
            let row =
                db.query_one_raw(Statement::from_string(DbBackend::MySql, sql)).await?.context("a row")?;
            anyhow::Ok(row.try_get_by_index::<i64>(0)?)
        }
    };
    let off = count(
        "SELECT COUNT(*) FROM point_accounts a WHERE a.balance <> (SELECT COALESCE(SUM(h.amount), 0) \
         FROM point_history h WHERE h.user_id = a.user_id) OR a.version <> (SELECT COUNT(*) FROM point_history h \
         WHERE h.user_id = a.user_id)",
    )
    .await?;
    db.close().await.ok();
    anyhow::ensure!(off == 0, "{off} accounts whose balance or version is not their history's");
    Ok("every balance is the sum of its history")
}
