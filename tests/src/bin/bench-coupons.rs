//! `make bench`: first-come coupons, the issue step decided two ways. Prints its figures and
//! writes `docs/report/coupons.md` and `docs/report/bench-coupons.json`.
//!
//! The same burst against each `COUPON_ISSUE_STRATEGY`: `mysql-lock` (before: every request
//! locks the campaign's row with `SELECT ... FOR UPDATE`, checks and inserts) and `redis`
//! (after: one Redis script decides, only the winners reach MySQL). For each, three
//! release-build instances on a fresh database and 2,000 users signed up (not timed), one
//! warm-up burst (not counted), then `RUNS` times: a new campaign of 100 coupons and 5,000
//! issue requests sent at once, round-robin over the instances, request i from user
//! i % 2,000 (every user asks two or three times).
//!
//! A run counts only if it was exact: 100 answers 201, to 100 different users, each coupon
//! its caller's; every 409 `COUPON_SOLD_OUT` or `COUPON_ALREADY_ISSUED`; MySQL holding
//! exactly those 100. Anything else stops the benchmark: a figure of a wrong result is
//! worth nothing.
//!
//! Release-build servers (`target/release/concert-server`, next to this program); the load
//! generator runs in this process on the same machine, so the figures are a lower bound of
//! what the servers can do. Needs `TEST_DATABASE_URL` and `TEST_REDIS_URL`.

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]
#![allow(clippy::cast_precision_loss, reason = "figures")]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::web::Bytes;
use anyhow::Context as _;
use e2e::booking::{ADMIN_KEY, AsFan as _, Fan, call, rfc3339, sign_up};
use e2e::stats::{ms, percentile};
use e2e::{Cluster, ClusterOptions, client, owned};
use futures::future::join_all;
use sea_orm::{ConnectionTrait as _, DatabaseConnection, DbBackend, Statement};
use serde_json::{Value, json};

const REPORT: &str = "docs/report/coupons.md";
const JSON_REPORT: &str = "docs/report/bench-coupons.json";
const INSTANCES: usize = 3;
const USERS: usize = 2_000;
const REQUESTS: usize = 5_000;
const QUANTITY: usize = 100;
/// Measured bursts per strategy: an odd number, so the median is one of them.
const RUNS: usize = 5;
/// A first, uncounted burst on a small campaign: connections opened, scripts loaded.
const WARMUP_REQUESTS: usize = 200;
const WARMUP_QUANTITY: usize = 10;
/// MySQL connections per instance, as in the booking storms.
const DATABASE_CONNECTIONS: u32 = 30;
/// The strategies in the order they run, before then after, each with its role.
const STRATEGIES: &[(&str, &str)] = &[("mysql-lock", "before"), ("redis", "after")];

/// One answer of a burst.
#[derive(Debug)]
struct Answer {
    /// The caller's index in the user list.
    user: usize,
    /// 0 when the server did not answer.
    status: u16,
    body: Bytes,
    /// From sending the request to having read the whole answer.
    latency: Duration,
}

/// The figures of one exact burst.
#[derive(Debug)]
struct Run {
    wall: Duration,
    latencies: Vec<Duration>,
    statuses: BTreeMap<u16, usize>,
}

impl Run {
    fn new(wall: Duration, answers: &[Answer]) -> Self {
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        for answer in answers {
            *statuses.entry(answer.status).or_default() += 1;
        }
        Self { wall, latencies: answers.iter().map(|a| a.latency).collect(), statuses }
    }

    fn per_second(&self) -> f64 {
        REQUESTS as f64 / self.wall.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }

    fn count(&self, status: u16) -> usize {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    fn server_errors(&self) -> usize {
        self.statuses.iter().filter(|(status, _)| **status >= 500).map(|(_, n)| n).sum()
    }
}

/// The smallest, middle and largest of a figure over the runs.
#[derive(Debug, Clone, Copy)]
struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        if n == 0 {
            return Self { min: 0.0, median: 0.0, max: 0.0 };
        }
        let median =
            if n.is_multiple_of(2) { f64::midpoint(values[n / 2 - 1], values[n / 2]) } else { values[n / 2] };
        Self { min: values[0], median, max: values[n - 1] }
    }

    /// `min / median / max`, with `decimals` after the point.
    fn show(&self, decimals: usize) -> String {
        format!("{:.decimals$} / {:.decimals$} / {:.decimals$}", self.min, self.median, self.max)
    }

    fn json(&self) -> Value {
        json!({"min": round(self.min), "median": round(self.median), "max": round(self.max)})
    }
}

/// One strategy's runs.
#[derive(Debug)]
struct Measured {
    strategy: &'static str,
    role: &'static str,
    runs: Vec<Run>,
}

impl Measured {
    fn wall_ms(&self) -> Spread {
        Spread::of(self.runs.iter().map(|r| ms(r.wall)).collect())
    }

    fn per_second(&self) -> Spread {
        Spread::of(self.runs.iter().map(Run::per_second).collect())
    }

    fn p99_ms(&self) -> Spread {
        Spread::of(self.runs.iter().map(|r| ms(r.percentile(99.0))).collect())
    }

    fn server_errors(&self) -> usize {
        self.runs.iter().map(Run::server_errors).sum()
    }
}

/// Where the figures were taken.
#[derive(Debug)]
struct Machine {
    commit: String,
    /// Whether the working tree differed from the commit (tracked files only).
    uncommitted: bool,
    cores: usize,
    cpu: String,
    database: String,
    date: String,
}

/// Before over after, of the medians: how many times shorter, faster, lower.
#[derive(Debug)]
struct Ratio {
    wall: f64,
    throughput: f64,
    p99: f64,
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let http = client();
    let mut measured = Vec::with_capacity(STRATEGIES.len());
    let mut database = String::new();
    for &(strategy, role) in STRATEGIES {
        let (runs, version) =
            measure(&http, strategy).await.with_context(|| format!("COUPON_ISSUE_STRATEGY={strategy}"))?;
        database = version;
        measured.push(Measured { strategy, role, runs });
    }

    println!("\nmin / median / max over {RUNS} runs of {REQUESTS} requests:");
    for m in &measured {
        println!(
            "  {:>10} ({}): wall {} ms, {} requests/s, p99 {} ms, 5xx x{}",
            m.strategy,
            m.role,
            m.wall_ms().show(0),
            m.per_second().show(0),
            m.p99_ms().show(1),
            m.server_errors(),
        );
    }
    let (before, after) = (&measured[0], &measured[1]);
    let ratio = Ratio {
        wall: before.wall_ms().median / after.wall_ms().median,
        throughput: after.per_second().median / before.per_second().median,
        p99: before.p99_ms().median / after.p99_ms().median,
    };
    println!(
        "  before / after (medians): wall {:.1}x shorter, throughput {:.1}x, p99 {:.1}x lower",
        ratio.wall, ratio.throughput, ratio.p99
    );

    let machine = machine(database)?;
    let markdown = render(&measured, &ratio, &machine)?;
    std::fs::write(REPORT, markdown)
        .with_context(|| format!("write {REPORT} (run from the repository root)"))?;
    let json = serde_json::to_string_pretty(&to_json(&measured, &ratio, &machine))?;
    std::fs::write(JSON_REPORT, json + "\n")
        .with_context(|| format!("write {JSON_REPORT} (run from the repository root)"))?;
    println!("\nwritten to {REPORT} and {JSON_REPORT}");
    Ok(())
}

/// Every run of one strategy on a cluster of its own, and the database server's version.
async fn measure(http: &awc::Client, strategy: &'static str) -> anyhow::Result<(Vec<Run>, String)> {
    println!(
        "{strategy}: {INSTANCES} instances, {USERS} users, {RUNS} runs of {REQUESTS} requests for \
         {QUANTITY} coupons"
    );
    let connections = DATABASE_CONNECTIONS.to_string();
    let env = owned(&[
        ("ADMIN_API_KEY", ADMIN_KEY),
        ("SEED_DEMO_DATA", "false"),
        ("COUPON_ISSUE_STRATEGY", strategy),
        ("DATABASE_MAX_CONNECTIONS", connections.as_str()),
        // The users' access tokens outlive a slow baseline's runs.
        ("AUTH_TOKEN_SECONDS", "3600"),
        ("RUST_LOG", "warn"),
    ]);
    let cluster =
        Cluster::start_with(INSTANCES, &ClusterOptions { env, ..ClusterOptions::default() }).await?;
    let started = Instant::now();
    let fans = sign_up_all(http, &cluster).await?;
    println!("  {USERS} users signed up in {:.1} s (not timed)", started.elapsed().as_secs_f64());
    let db = sea_orm::Database::connect(cluster.direct_database_url())
        .await
        .context("connect to the benchmark's database")?;
    let version = db
        .query_one_raw(Statement::from_string(DbBackend::MySql, "SELECT VERSION()"))
        .await?
        .and_then(|row| row.try_get_by_index::<String>(0).ok())
        .unwrap_or_default();

    let warm_up = open_campaign(http, cluster.url(0), WARMUP_QUANTITY).await?;
    let (_, answers) = burst(http, &cluster, &fans, &warm_up, WARMUP_REQUESTS).await;
    let unexpected: Vec<u16> = answers.iter().map(|a| a.status).filter(|s| *s != 201 && *s != 409).collect();
    anyhow::ensure!(unexpected.is_empty(), "warm-up answers other than 201 and 409: {unexpected:?}");
    println!(
        "  warm-up burst of {WARMUP_REQUESTS} requests for {WARMUP_QUANTITY} coupons done (not counted)"
    );

    println!("  run  wall (ms)  requests/s    201    409    5xx  p50 (ms)  p99 (ms)  max (ms)");
    let mut runs = Vec::with_capacity(RUNS);
    for number in 1..=RUNS {
        let campaign = open_campaign(http, cluster.url(number), QUANTITY).await?;
        let (wall, answers) = burst(http, &cluster, &fans, &campaign, REQUESTS).await;
        check(&answers, &fans, &campaign, &db)
            .await
            .with_context(|| format!("run {number} was not exact"))?;
        let run = Run::new(wall, &answers);
        println!(
            "  {number:>3}  {:>9.0}  {:>10.0}  {:>5}  {:>5}  {:>5}  {:>8.1}  {:>8.1}  {:>8.1}",
            ms(run.wall),
            run.per_second(),
            run.count(201),
            run.count(409),
            run.server_errors(),
            ms(run.percentile(50.0)),
            ms(run.percentile(99.0)),
            ms(run.percentile(100.0)),
        );
        runs.push(run);
    }
    let _ = db.close().await;
    cluster.shut_down().await;
    Ok((runs, version))
}

/// `USERS` users with access tokens, signed up round-robin over the instances.
async fn sign_up_all(http: &awc::Client, cluster: &Cluster) -> anyhow::Result<Vec<Fan>> {
    let mut fans = Vec::with_capacity(USERS);
    // In slices, so that sign-up does not open thousands of connections at once.
    for start in (0..USERS).step_by(100) {
        let made =
            join_all((start..USERS.min(start + 100)).map(|i| sign_up(http, cluster.url(i), "fan"))).await;
        fans.extend(made.into_iter().collect::<anyhow::Result<Vec<_>>>()?);
    }
    Ok(fans)
}

/// A campaign of `quantity` coupons whose issue window is open now: its id.
async fn open_campaign(http: &awc::Client, base: &str, quantity: usize) -> anyhow::Result<String> {
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())?;
    let (status, body) = call(
        http.post(format!("{base}/api/v1/admin/coupon-campaigns")).insert_header(("X-Admin-Key", ADMIN_KEY)),
        Some(json!({
            "name": "Bench burst",
            "discount": 1_000,
            "quantity": quantity,
            "issueOpensAt": rfc3339(now - 3_600),
            "issueClosesAt": rfc3339(now + 3_600),
            "validUntil": rfc3339(now + 86_400),
        })),
    )
    .await?;
    anyhow::ensure!(status == 201, "campaign not created: {status} {body}");
    body["id"].as_str().map(str::to_owned).context("a campaign id")
}

/// `requests` issue requests for `campaign`, all sent at once, round-robin over the
/// instances, request i from user i % users: the wall time, from the first request sent to
/// the last answer read, and every answer.
async fn burst(
    http: &awc::Client,
    cluster: &Cluster,
    fans: &[Fan],
    campaign: &str,
    requests: usize,
) -> (Duration, Vec<Answer>) {
    let started = Instant::now();
    let answers = join_all((0..requests).map(|i| {
        let user = i % fans.len();
        let (fan, base) = (&fans[user], cluster.url(i));
        async move {
            let sent = Instant::now();
            let (status, body) = match http
                .post(format!("{base}/api/v1/coupon-campaigns/{campaign}/coupons"))
                .bearer(fan)
                .send_json(&json!({}))
                .await
            {
                Ok(mut response) => (response.status().as_u16(), response.body().await.unwrap_or_default()),
                Err(_) => (0, Bytes::new()),
            };
            Answer { user, status, body, latency: sent.elapsed() }
        }
    }))
    .await;
    (started.elapsed(), answers)
}

/// Whether a burst was exact, in its answers and in MySQL.
async fn check(
    answers: &[Answer],
    fans: &[Fan],
    campaign: &str,
    db: &DatabaseConnection,
) -> anyhow::Result<()> {
    let mut winners = BTreeSet::new();
    for answer in answers {
        let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
        let caller = fans[answer.user].id.as_str();
        match answer.status {
            201 => {
                anyhow::ensure!(body["userId"] == caller, "{caller} was answered another's coupon: {body}");
                anyhow::ensure!(winners.insert(answer.user), "{caller} got two coupons");
            }
            409 => {
                let code = body["code"].as_str().unwrap_or_default();
                anyhow::ensure!(
                    code == "COUPON_SOLD_OUT" || code == "COUPON_ALREADY_ISSUED",
                    "a 409 that is not the race's: {body}"
                );
            }
            // Counted and reported: a server that gives up under load is a figure.
            status if status >= 500 => {}
            0 => anyhow::bail!("a request of {caller} got no answer"),
            status => anyhow::bail!("{status} for {caller}, not an answer of the issue step: {body}"),
        }
    }
    anyhow::ensure!(
        winners.len() == QUANTITY,
        "{} coupons answered 201, expected exactly {QUANTITY}",
        winners.len()
    );
    // Parsed, so that only a UUID's hex reaches the statement.
    let id = uuid::Uuid::parse_str(campaign).context("a campaign id")?.simple();
    let row = db
        .query_one_raw(Statement::from_string(
            DbBackend::MySql,
            format!(
                "SELECT COUNT(*), COUNT(DISTINCT user_id) FROM coupons WHERE campaign_id = UNHEX('{id}')"
            ),
        ))
        .await?
        .context("a count")?;
    let (stored, users) = (row.try_get_by_index::<i64>(0)?, row.try_get_by_index::<i64>(1)?);
    let expected = i64::try_from(QUANTITY)?;
    anyhow::ensure!(
        (stored, users) == (expected, expected),
        "MySQL holds {stored} coupons of the campaign for {users} users, expected {QUANTITY} for {QUANTITY}"
    );
    Ok(())
}

fn machine(database: String) -> anyhow::Result<Machine> {
    let (commit, uncommitted) = e2e::stats::commit();
    let cpu = e2e::stats::cpu();
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())?;
    Ok(Machine {
        commit,
        uncommitted,
        cores: std::thread::available_parallelism().map(usize::from).unwrap_or(0),
        cpu,
        database,
        date: rfc3339(now),
    })
}

/// One decimal is all a figure of this machine carries.
fn round(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

fn render(measured: &[Measured], ratio: &Ratio, machine: &Machine) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(out, "# Coupons: the issue step, a MySQL row lock versus one Redis script\n")?;
    writeln!(out, "Generated by `make bench` (`tests/src/bin/bench-coupons.rs`); do not edit by hand.\n")?;
    writeln!(
        out,
        "- commit `{}`{}, {} cores ({}), {}; the load generator shares the cores with the servers, \
         MariaDB and Redis",
        machine.commit,
        if machine.uncommitted { " with uncommitted changes" } else { "" },
        machine.cores,
        machine.cpu,
        machine.database
    )?;
    writeln!(out, "- run {}, with `make bench`\n", machine.date)?;

    writeln!(out, "## The burst\n")?;
    writeln!(
        out,
        "{REQUESTS} requests `POST /api/v1/coupon-campaigns/{{id}}/coupons` from {USERS} users (request i \
         from user i mod {USERS}: every user asks two or three times) for a campaign of {QUANTITY} coupons, \
         all sent at once, round-robin over {INSTANCES} release-build instances (the client keeps at most \
         1,000 connections open, so the later requests wait in the client first, in both versions). Each run \
         has a new campaign; the users stay. The two versions differ only in `COUPON_ISSUE_STRATEGY`:\n"
    )?;
    writeln!(
        out,
        "- `mysql-lock` (before, the naive version): every request opens a transaction, locks the campaign's \
         row (`SELECT ... FOR UPDATE`), checks the window, counts the coupon against the quantity and \
         inserts it; all the requests of the campaign queue on that one row."
    )?;
    writeln!(
        out,
        "- `redis` (after, the default): one Redis script decides (window, one per user, stock); only the \
         {QUANTITY} winners open a MySQL transaction to record their coupon.\n"
    )?;

    writeln!(out, "## Results: min / median / max over {RUNS} runs\n")?;
    writeln!(
        out,
        "| version | wall (ms) | requests/s | p99 (ms) | 5xx, all runs |\n|---|---:|---:|---:|---:|"
    )?;
    for m in measured {
        writeln!(
            out,
            "| `{}` ({}) | {} | {} | {} | {} |",
            m.strategy,
            m.role,
            m.wall_ms().show(0),
            m.per_second().show(0),
            m.p99_ms().show(1),
            m.server_errors(),
        )?;
    }
    writeln!(
        out,
        "\nBefore / after, of the medians: wall **{:.1}x** shorter, throughput **{:.1}x**, p99 **{:.1}x** \
         lower.\n",
        ratio.wall, ratio.throughput, ratio.p99
    )?;

    writeln!(out, "## Every run\n")?;
    writeln!(
        out,
        "| version | run | wall (ms) | requests/s | 201 | 409 | 5xx | p50 (ms) | p99 (ms) | max (ms) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for m in measured {
        for (i, run) in m.runs.iter().enumerate() {
            writeln!(
                out,
                "| `{}` | {} | {:.0} | {:.0} | {} | {} | {} | {:.1} | {:.1} | {:.1} |",
                m.strategy,
                i + 1,
                ms(run.wall),
                run.per_second(),
                run.count(201),
                run.count(409),
                run.server_errors(),
                ms(run.percentile(50.0)),
                ms(run.percentile(99.0)),
                ms(run.percentile(100.0)),
            )?;
        }
    }

    writeln!(out, "\n## What is and is not measured\n")?;
    writeln!(
        out,
        "- Both versions run on the same machine, against the same MariaDB and Redis, with the same settings \
         but `COUPON_ISSUE_STRATEGY`: {DATABASE_CONNECTIONS} MySQL connections per instance (as in the \
         booking storms), access tokens living an hour, the rate limits off (as in every harness run: all \
         the clients share one address), the other settings the product's defaults. They run one after the \
         other, before first, each on a fresh database. The servers, MariaDB, Redis and this load generator \
         share the {} cores, so the absolute figures are a lower bound and move between runs: read the \
         ratio, and the spread.",
        machine.cores
    )?;
    writeln!(
        out,
        "- Measured: the burst only. Wall time is from the first request sent to the last answer read; \
         requests/s is {REQUESTS} over it (every answer counts, 5xx included); latency is client-side, from \
         sending a request to having read its whole answer. Not measured: starting the servers, signing up \
         the users, creating the campaigns, and a first burst of {WARMUP_REQUESTS} requests for \
         {WARMUP_QUANTITY} coupons run before the counted ones."
    )?;
    writeln!(
        out,
        "- Every run counted was exact: {QUANTITY} answers 201, to {QUANTITY} different users, each coupon \
         its caller's; every 409 `COUPON_SOLD_OUT` or `COUPON_ALREADY_ISSUED`; MySQL holding exactly \
         {QUANTITY} coupons of the campaign, for {QUANTITY} users. A run that is not stops the benchmark."
    )?;
    writeln!(
        out,
        "- A 5xx is counted, not fatal (a figure, not a wrong result): a request that waits more than 5 s \
         for one of its instance's MySQL connections, or longer than `DATABASE_STATEMENT_TIMEOUT_MS` (5 s by \
         default) for the row lock, is refused, and that is how the naive version gives way under a crowd. \
         It still counts in requests/s, which flatters the version that refuses."
    )?;
    Ok(out)
}

fn to_json(measured: &[Measured], ratio: &Ratio, machine: &Machine) -> Value {
    let strategies: Vec<Value> = measured
        .iter()
        .map(|m| {
            let runs: Vec<Value> = m
                .runs
                .iter()
                .map(|run| {
                    json!({
                        "wallMs": round(ms(run.wall)),
                        "requestsPerSecond": round(run.per_second()),
                        "p50Ms": round(ms(run.percentile(50.0))),
                        "p99Ms": round(ms(run.percentile(99.0))),
                        "maxMs": round(ms(run.percentile(100.0))),
                        "statuses": run.statuses,
                        "serverErrors": run.server_errors(),
                    })
                })
                .collect();
            json!({
                "strategy": m.strategy,
                "role": m.role,
                "wallMs": m.wall_ms().json(),
                "requestsPerSecond": m.per_second().json(),
                "p99Ms": m.p99_ms().json(),
                "serverErrors": m.server_errors(),
                "runs": runs,
            })
        })
        .collect();
    json!({
        "benchmark": "coupons",
        "program": "tests/src/bin/bench-coupons.rs",
        "command": "make bench",
        "date": machine.date,
        "machine": {
            "commit": machine.commit,
            "uncommittedChanges": machine.uncommitted,
            "cores": machine.cores,
            "cpu": machine.cpu,
            "database": machine.database,
        },
        "burst": {
            "instances": INSTANCES,
            "users": USERS,
            "requests": REQUESTS,
            "coupons": QUANTITY,
            "runs": RUNS,
            "warmUpRequests": WARMUP_REQUESTS,
            "databaseConnectionsPerInstance": DATABASE_CONNECTIONS,
        },
        "strategies": strategies,
        "beforeOverAfter": {
            "wall": round(ratio.wall),
            "throughput": round(ratio.throughput),
            "p99": round(ratio.p99),
        },
    })
}
