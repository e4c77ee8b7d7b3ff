//! `make bench`: first-come coupons, the issue step decided two ways. Prints its figures and
//! writes `docs/bench/coupons.{md,json}` and one SVG per figure through [`benchkit::write`]
//! (run it from the repository root).
//!
//! The same burst against each `COUPON_ISSUE_STRATEGY`: `mysql-lock` (before: every request
//! locks the campaign's row with `SELECT ... FOR UPDATE`, checks and inserts) and `redis`
//! (after: one Redis script decides, only the winners reach MySQL). For each, three
//! release-build instances on a fresh database and `benchkit::size(2_000, 400)` users signed
//! up (not timed), one warm-up burst (not counted), then `benchkit::runs()` times (5; 3 in
//! quick mode, `BENCH_QUICK=1`): a new campaign of 100 coupons and
//! `benchkit::size(5_000, 1_000)` issue requests sent at once, round-robin over the
//! instances, request i from user i % users (every user asks two or three times, in both
//! modes).
//!
//! A run counts only if it was exact: 100 answers 201, to 100 different users, each coupon
//! its caller's; every 409 `COUPON_SOLD_OUT` or `COUPON_ALREADY_ISSUED`; MySQL holding
//! exactly those 100. Anything else stops the benchmark: a figure of a wrong result is
//! worth nothing. (A 5xx is counted and reported, not fatal: a server that gives up under
//! load is a figure.)
//!
//! Figures, min / median / max over the runs: the burst's wall time (first request sent to
//! last answer read), requests per second (every answer over it), and the p99 and p50 of
//! the client-side latency. The before / after ratios of the medians, every run's counts
//! and the database server's version are added to the Markdown and the JSON.
//!
//! Release-build servers (`target/release/concert-server`, next to this program); the load
//! generator runs in this process on the same machine, so the figures are a lower bound of
//! what the servers can do. Needs `TEST_DATABASE_URL` and `TEST_REDIS_URL`.

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]
#![allow(clippy::cast_precision_loss, reason = "figures")]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::web::Bytes;
use anyhow::Context as _;
use e2e::benchkit::{self, Figure, Progress, Series};
use e2e::booking::{ADMIN_KEY, AsFan as _, Fan, call, rfc3339, sign_up};
use e2e::stats::{ms, percentile};
use e2e::{Cluster, ClusterOptions, client, owned};
use futures::future::join_all;
use sea_orm::{ConnectionTrait as _, DatabaseConnection, DbBackend, Statement};
use serde_json::{Value, json};

const SCENARIO: &str = "coupons";
const INSTANCES: usize = 3;
const QUANTITY: usize = 100;
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

    /// Every answer, 5xx included, over the wall time.
    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }

    fn latency_ms(&self, p: f64) -> f64 {
        ms(percentile(&self.latencies, p))
    }

    fn count(&self, status: u16) -> usize {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    fn server_errors(&self) -> usize {
        self.statuses.iter().filter(|(status, _)| **status >= 500).map(|(_, n)| n).sum()
    }

    /// One row of the table of every run.
    fn row(&self, strategy: &str, number: usize) -> String {
        format!(
            "| `{strategy}` | {number} | {:.0} | {:.0} | {} | {} | {} | {:.1} | {:.1} | {:.1} |\n",
            ms(self.wall),
            self.per_second(),
            self.count(201),
            self.count(409),
            self.server_errors(),
            self.latency_ms(50.0),
            self.latency_ms(99.0),
            self.latency_ms(100.0),
        )
    }

    fn json(&self) -> Value {
        json!({
            "wallMs": ms(self.wall),
            "requestsPerSecond": self.per_second(),
            "p50Ms": self.latency_ms(50.0),
            "p99Ms": self.latency_ms(99.0),
            "maxMs": self.latency_ms(100.0),
            "statuses": self.statuses,
            "serverErrors": self.server_errors(),
        })
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
    /// The plots' name of the strategy.
    fn label(&self) -> String {
        format!("{} ({})", self.strategy, self.role)
    }

    fn server_errors(&self) -> usize {
        self.runs.iter().map(Run::server_errors).sum()
    }

    fn json(&self) -> Value {
        json!({
            "strategy": self.strategy,
            "role": self.role,
            "serverErrors": self.server_errors(),
            "runs": self.runs.iter().map(Run::json).collect::<Vec<_>>(),
        })
    }
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
    let runs = benchkit::runs();
    let users = benchkit::size(2_000, 400);
    let requests = benchkit::size(5_000, 1_000);
    let mut measured = Vec::with_capacity(STRATEGIES.len());
    let mut database = String::new();
    for &(strategy, role) in STRATEGIES {
        println!(
            "{strategy}: {INSTANCES} instances, {users} users, {runs} runs of {requests} requests for \
             {QUANTITY} coupons"
        );
        let (done, version) = measure(&http, strategy, users, requests, runs)
            .await
            .with_context(|| format!("COUPON_ISSUE_STRATEGY={strategy}"))?;
        println!("  run  wall (ms)  requests/s    201    409    5xx  p50 (ms)  p99 (ms)  max (ms)");
        for (i, run) in done.iter().enumerate() {
            println!(
                "  {:>3}  {:>9.0}  {:>10.0}  {:>5}  {:>5}  {:>5}  {:>8.1}  {:>8.1}  {:>8.1}",
                i + 1,
                ms(run.wall),
                run.per_second(),
                run.count(201),
                run.count(409),
                run.server_errors(),
                run.latency_ms(50.0),
                run.latency_ms(99.0),
                run.latency_ms(100.0),
            );
        }
        database = version;
        measured.push(Measured { strategy, role, runs: done });
    }

    let figure = |id: &str, title: &str, unit: &str, value: &dyn Fn(&Run) -> f64| {
        measured.iter().fold(Figure::new(id, title, unit), |drawn, m| {
            drawn.with(Series::new(m.label(), m.runs.iter().map(value).collect()))
        })
    };
    let figures = [
        figure(
            "wall",
            &format!("Wall time of a burst of {requests} requests for {QUANTITY} coupons"),
            "ms",
            &|r| ms(r.wall),
        ),
        figure("throughput", &format!("Requests per second, a burst of {requests}"), "requests/s", &|r| {
            r.per_second()
        }),
        figure("p99", "p99 latency of the burst", "ms", &|r| r.latency_ms(99.0)),
        figure("p50", "p50 latency of the burst", "ms", &|r| r.latency_ms(50.0)),
    ];
    // Series 0 is before (`mysql-lock`), 1 after (`redis`).
    let median = |figure: &Figure, i: usize| figure.series[i].spread().median;
    let ratio = Ratio {
        wall: benchkit::ratio("wall before / after", median(&figures[0], 0), median(&figures[0], 1))?,
        throughput: benchkit::ratio(
            "throughput after / before",
            median(&figures[1], 1),
            median(&figures[1], 0),
        )?,
        p99: benchkit::ratio("p99 before / after", median(&figures[2], 0), median(&figures[2], 1))?,
    };
    println!(
        "before / after (medians over {runs} runs): wall {:.1}x shorter, throughput {:.1}x, p99 {:.1}x lower",
        ratio.wall, ratio.throughput, ratio.p99
    );

    let about = format!(
        "First-come coupons, the issue step decided two ways (`tests/src/bin/bench-coupons.rs`). Per run, \
         {requests} requests `POST /api/v1/coupon-campaigns/{{id}}/coupons` from {users} users (request i \
         from user i mod {users}: every user asks two or three times) for a new campaign of {QUANTITY} \
         coupons, all sent at once, round-robin over {INSTANCES} release-build instances (the client keeps \
         at most 1,000 connections open, so the later requests wait in the client first, in both versions); \
         the users stay. The two versions differ only in `COUPON_ISSUE_STRATEGY`: `mysql-lock` (before, the \
         naive version: every request opens a transaction, locks the campaign's row with `SELECT ... FOR \
         UPDATE`, checks the window, counts the coupon against the quantity and inserts it, so all the \
         requests of the campaign queue on that one row) and `redis` (after, the default: one Redis script \
         decides the window, one per user and the stock; only the {QUANTITY} winners open a MySQL \
         transaction). Each version on a fresh database ({database}), one after the other, before first, \
         with a first uncounted burst of {WARMUP_REQUESTS} requests for {WARMUP_QUANTITY} coupons. Wall \
         time is from the first request sent to the last answer read; requests/s is every answer (5xx \
         included) over it; latency is client-side, from sending a request to having read its whole \
         answer. Every run counted was exact, or the program stopped: {QUANTITY} answers 201 to \
         {QUANTITY} different users, each coupon its caller's, every 409 `COUPON_SOLD_OUT` or \
         `COUPON_ALREADY_ISSUED`, MySQL holding exactly {QUANTITY} coupons of the campaign for \
         {QUANTITY} users."
    );
    let extra = json!({
        "instances": INSTANCES,
        "users": users,
        "requests": requests,
        "coupons": QUANTITY,
        "warmUpRequests": WARMUP_REQUESTS,
        "warmUpCoupons": WARMUP_QUANTITY,
        "databaseConnectionsPerInstance": DATABASE_CONNECTIONS,
        "database": database,
        "strategies": measured.iter().map(Measured::json).collect::<Vec<_>>(),
        "beforeOverAfter": {
            "wall": ratio.wall,
            "throughput": ratio.throughput,
            "p99": ratio.p99,
        },
    });
    let mut markdown = benchkit::write(SCENARIO, &about, &figures, extra)?;
    markdown.push_str(&format!(
        "Before / after, of the medians: wall **{:.1}x** shorter, throughput **{:.1}x**, p99 **{:.1}x** \
         lower.\n\nEvery run (5xx are counted, not fatal; all runs: {}):\n\n\
         | version | run | wall (ms) | requests/s | 201 | 409 | 5xx | p50 (ms) | p99 (ms) | max (ms) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        ratio.wall,
        ratio.throughput,
        ratio.p99,
        measured
            .iter()
            .map(|m| format!("{} 5xx for `{}`", m.server_errors(), m.strategy))
            .collect::<Vec<_>>()
            .join(", "),
    ));
    for m in &measured {
        for (i, run) in m.runs.iter().enumerate() {
            markdown.push_str(&run.row(m.strategy, i + 1));
        }
    }
    markdown.push_str(&format!(
        "\nBoth versions run on the same machine, against the same MariaDB and Redis, with the same \
         settings but `COUPON_ISSUE_STRATEGY`: {DATABASE_CONNECTIONS} MySQL connections per instance (as in \
         the booking storms), access tokens living an hour, the rate limits off (as in every harness run: \
         all the clients share one address), the other settings the product's defaults. The servers, \
         MariaDB, Redis and this load generator share the machine's cores, so the absolute figures are a \
         lower bound and move between runs: read the ratio, and the spread. A 5xx is a request that waited \
         more than 5 s for one of its instance's MySQL connections, or longer than \
         `DATABASE_STATEMENT_TIMEOUT_MS` (5 s by default) for the row lock: that is how the naive version \
         gives way under a crowd. It still counts in requests/s, which flatters the version that refuses.\n"
    ));
    std::fs::write(format!("{}/{SCENARIO}.md", benchkit::DIR), &markdown)
        .with_context(|| format!("write {}/{SCENARIO}.md (run from the repository root)", benchkit::DIR))?;
    println!("\n{markdown}");
    Ok(())
}

/// Every run of one strategy on a cluster of its own, and the database server's version.
async fn measure(
    http: &awc::Client,
    strategy: &'static str,
    users: usize,
    requests: usize,
    runs: usize,
) -> anyhow::Result<(Vec<Run>, String)> {
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
    // Sign-ups, the warm-up's answers and every counted answer.
    let progress = Progress::new(
        format!("coupons {strategy}"),
        u64::try_from(users + WARMUP_REQUESTS + runs * requests)?,
    );
    let fans = sign_up_all(http, &cluster, users, &progress).await?;
    let db = sea_orm::Database::connect(cluster.direct_database_url())
        .await
        .context("connect to the benchmark's database")?;
    let version = db
        .query_one_raw(Statement::from_string(DbBackend::MySql, "SELECT VERSION()"))
        .await?
        .and_then(|row| row.try_get_by_index::<String>(0).ok())
        .unwrap_or_default();

    let warm_up = open_campaign(http, cluster.url(0), WARMUP_QUANTITY).await?;
    let (_, answers) = burst(http, &cluster, &fans, &warm_up, WARMUP_REQUESTS, &progress).await;
    let unexpected: Vec<u16> = answers.iter().map(|a| a.status).filter(|s| *s != 201 && *s != 409).collect();
    anyhow::ensure!(unexpected.is_empty(), "warm-up answers other than 201 and 409: {unexpected:?}");

    let mut done = Vec::with_capacity(runs);
    for number in 1..=runs {
        let campaign = open_campaign(http, cluster.url(number), QUANTITY).await?;
        let (wall, answers) = burst(http, &cluster, &fans, &campaign, requests, &progress).await;
        check(&answers, &fans, &campaign, &db)
            .await
            .with_context(|| format!("run {number} was not exact"))?;
        done.push(Run::new(wall, &answers));
    }
    let _ = db.close().await;
    cluster.shut_down().await;
    Ok((done, version))
}

/// `users` users with access tokens, signed up round-robin over the instances.
async fn sign_up_all(
    http: &awc::Client,
    cluster: &Cluster,
    users: usize,
    progress: &Progress,
) -> anyhow::Result<Vec<Fan>> {
    let mut fans = Vec::with_capacity(users);
    // In slices, so that sign-up does not open thousands of connections at once.
    for start in (0..users).step_by(100) {
        let made =
            join_all((start..users.min(start + 100)).map(|i| sign_up(http, cluster.url(i), "fan"))).await;
        progress.step(u64::try_from(made.len())?);
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
/// the last answer read, and every answer (each one steps `progress`).
async fn burst(
    http: &awc::Client,
    cluster: &Cluster,
    fans: &[Fan],
    campaign: &str,
    requests: usize,
    progress: &Progress,
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
            let latency = sent.elapsed();
            progress.step(1);
            Answer { user, status, body, latency }
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
