//! `make bench`: lock strategies for one hot account (issue 18). Charges all aimed at one
//! user's points, kept apart six ways, compared on throughput, latency, retries and Redis
//! work.
//!
//! The strategies, in this order, each on three release-build instances of its own (a fresh
//! database, started by [`Cluster::start_with`]):
//!
//! 1. `db-pessimistic`: no distributed lock (`DISABLE_LOCKS_FOR_TESTING`, [`e2e::NO_LOCKS`]);
//!    the charges queue on MySQL's row lock (`SELECT ... FOR UPDATE` on the account);
//! 2. `db-optimistic`: no lock at all (`POINT_CHARGE_STRATEGY=optimistic`): a plain read, the
//!    version's compare-and-set, a conflict retried after a jittered pause, 10 attempts in
//!    all (`POINT_OPTIMISTIC_ATTEMPTS`), then 429. Allowed refusals (with `quorum`): a
//!    run counts if every refusal is a 429 and the books are exact for the charges applied;
//!    its conflicts per charge are read from the instances' `point_charge_conflicts_total`;
//! 3. `redis-spin`: the Redis lock, waiters retrying the acquire script with backoff
//!    (`LOCK_WAIT_STRATEGY=spin`);
//! 4. `redis-pubsub-no-handoff`: the Redis lock, waiters woken by the release's
//!    announcement, every release freeing the key in Redis (`LOCK_HANDOFF_LIMIT=0`: the
//!    pub/sub lock before the local hand-off);
//! 5. `redis-pubsub`: the same with a release handed straight to a waiter of the same
//!    instance up to 8 times in a row (`LOCK_WAIT_STRATEGY=pubsub`, `LOCK_HANDOFF_LIMIT=8`,
//!    the defaults);
//! 6. `quorum`: the quorum lock on three `redis-server` nodes this program starts and kills
//!    (`REDIS_LOCK_NODES`, `LOCK_NODE_TIMEOUT_MS=2000`; its waiters retry, pub/sub plays no
//!    part). Its waiters form no queue: each retries with a jittered backoff, so on a slow
//!    machine an unlucky charge can wait out even `POINT_LOCK_WAIT_MS=60000` and be refused
//!    (429 `RESOURCE_BUSY`, nothing changed; seen on 2 cores on 2026-12-07). Up to one in a
//!    hundred such refusals is allowed, and counted as its failures;
//! 7. `redis-pubsub-batched`: the product as it runs by default, the pub/sub lock with the
//!    charges an instance has queued for the account applied in batches
//!    (`POINT_CHARGE_BATCH_MAX=100`).
//!
//! Strategies 1 to 6 run with `POINT_CHARGE_BATCH_MAX=1` (each charge its own lock hold
//! and transaction), so that they compare the ways of waiting, not the batches.
//!
//! Every cluster runs with [`e2e::PATIENT_LOCKS`] (a charge waits up to 60 s for the lock,
//! so that with a queue to wait in, none gives up however slow the machine). Per cluster:
//! one warm-up storm of 30 charges on a user of its own (checked, not counted), then
//! [`benchkit::runs`] storms of `benchkit::size(3_000, 600)` charges of 100 points, each on
//! a newly signed-up user, sent all at once (the shared [`client`] keeps at most 1,000
//! requests in flight; the rest wait for a connection, inside their measured latency)
//! round-robin over the three instances.
//!
//! A run counts only if it was exact, otherwise the program stops: every charge answered 200
//! (but for `db-optimistic` and `quorum`, see above) with a balance no other answer
//! reported; the balance read back is 100 x charges; the
//! history API's newest entries (it shows at most 1,000) step down by 100 from there; and
//! MySQL holds exactly that many CHARGE entries of 100, with balances after 100, 200, ...,
//! 100 x charges. Per run: wall time, charges/s, client-side p50 and p99 latency, failures
//! (refusals: always 0 in a run that counts but for the two strategies above), the final
//! balance, and lock scripts per charge: the `EVALSHA` + `EVAL` calls of Redis's `INFO
//! commandstats` during the storm, on the shared Redis for the single-Redis strategies and
//! summed over the three nodes for `quorum` (`db-pessimistic` runs none: 0).
//!
//! Writes `docs/bench/lock-strategies.{json,md}` and one SVG per figure through
//! [`benchkit::write`] (run it from the repository root), prints that Markdown, and prints
//! the median throughput of pub/sub over spin against the target of at least 2x (not
//! asserted). `BENCH_QUICK=1`: smaller storms, fewer runs.
//!
//! Needs `TEST_DATABASE_URL` and `TEST_REDIS_URL` (a Redis without a password, used by
//! nothing else while this runs: its commands are counted), `redis-server` on `PATH` (the
//! quorum's nodes), and the release build: `concert-server` next to this program in
//! `target/release/` (or named by `CONCERT_SERVER_BIN`).

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]
#![allow(clippy::cast_precision_loss, reason = "figures")]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use e2e::benchkit::{self, Figure, Progress, Series, Spread};
use e2e::booking::{AsFan as _, Fan, call, sign_up};
use e2e::stats::{ms, percentile};
use e2e::{Cluster, ClusterOptions, PrivateRedis, client, owned};
use futures::future::join_all;
use sea_orm::{ConnectionTrait as _, DatabaseConnection, DbBackend, Statement};
use serde_json::{Value, json};

const SCENARIO: &str = "lock-strategies";
const INSTANCES: usize = 3;
/// Points per charge.
const AMOUNT: i64 = 100;
/// The first, uncounted storm of each cluster: connections opened, scripts loaded.
const WARMUP: usize = 30;
/// The quorum's nodes.
const LOCK_NODES: usize = 3;
/// MySQL connections per instance, as in the other storms (3 x 31 stay under MySQL's
/// default limit of 151).
const DATABASE_CONNECTIONS: &str = "30";
/// The most entries one history read returns (`HistoryLimit::MAX`).
const HISTORY_PAGE: usize = 1_000;
/// What pub/sub waiting should achieve over spinning, in median throughput.
const TARGET_RATIO: f64 = 2.0;

/// How the charges of one account are kept one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strategy {
    DbPessimistic,
    DbOptimistic,
    RedisSpin,
    RedisPubSubNoHandoff,
    RedisPubSub,
    Quorum,
    RedisPubSubBatched,
}

/// In the order they run.
const STRATEGIES: [Strategy; 7] = [
    Strategy::DbPessimistic,
    Strategy::DbOptimistic,
    Strategy::RedisSpin,
    Strategy::RedisPubSubNoHandoff,
    Strategy::RedisPubSub,
    Strategy::Quorum,
    Strategy::RedisPubSubBatched,
];

impl Strategy {
    const fn name(self) -> &'static str {
        match self {
            Self::DbPessimistic => "db-pessimistic",
            Self::DbOptimistic => "db-optimistic",
            Self::RedisSpin => "redis-spin",
            Self::RedisPubSubNoHandoff => "redis-pubsub-no-handoff",
            Self::RedisPubSub => "redis-pubsub",
            Self::Quorum => "quorum",
            Self::RedisPubSubBatched => "redis-pubsub-batched",
        }
    }

    /// The settings that make it, as the report states them.
    const fn settings(self) -> &'static str {
        match self {
            Self::DbPessimistic => {
                "DISABLE_LOCKS_FOR_TESTING=true, DATABASE_STATEMENT_TIMEOUT_MS=30000, LOCK_MAX_HOLD_MS=60000, \
                 POINT_CHARGE_BATCH_MAX=1"
            }
            Self::DbOptimistic => "POINT_CHARGE_STRATEGY=optimistic, POINT_OPTIMISTIC_ATTEMPTS=10",
            Self::RedisSpin => "LOCK_WAIT_STRATEGY=spin, POINT_CHARGE_BATCH_MAX=1",
            Self::RedisPubSubNoHandoff => {
                "LOCK_WAIT_STRATEGY=pubsub, LOCK_HANDOFF_LIMIT=0, POINT_CHARGE_BATCH_MAX=1"
            }
            Self::RedisPubSub => "LOCK_WAIT_STRATEGY=pubsub, LOCK_HANDOFF_LIMIT=8, POINT_CHARGE_BATCH_MAX=1",
            Self::Quorum => {
                "REDIS_LOCK_NODES=<three private redis-server nodes>, LOCK_NODE_TIMEOUT_MS=2000, \
                 POINT_CHARGE_BATCH_MAX=1"
            }
            Self::RedisPubSubBatched => {
                "LOCK_WAIT_STRATEGY=pubsub, LOCK_HANDOFF_LIMIT=8, POINT_CHARGE_BATCH_MAX=100 (the defaults)"
            }
        }
    }

    /// Whether it runs lock scripts at all.
    fn locks_in_redis(self) -> bool {
        !matches!(self, Self::DbPessimistic | Self::DbOptimistic)
    }

    /// How many of `charges` may be refused (429, nothing changed) and the run still count:
    /// any optimistic charge after its last attempt; for the quorum lock, a waiter that never
    /// won a retry within its wait (no queue orders them), which is starvation of a few: more
    /// than one in a hundred says the lock is broken, not slow. None for the others.
    fn refusals_allowed(self, charges: usize) -> usize {
        match self {
            Self::DbOptimistic => charges,
            Self::Quorum => charges / 100,
            _ => 0,
        }
    }

    /// Every instance's environment; `nodes` are the quorum's.
    fn env(self, nodes: &[PrivateRedis]) -> Vec<(String, String)> {
        let mut env = owned(e2e::PATIENT_LOCKS);
        env.extend(owned(&[
            ("RUST_LOG", "warn"),
            ("SEED_DEMO_DATA", "false"),
            ("DATABASE_MAX_CONNECTIONS", DATABASE_CONNECTIONS),
            // The waiting queue is not used here; its admission step (a script, twice per
            // interval on every instance) would only add to the scripts counted.
            ("QUEUE_ADMIT_INTERVAL_MS", "60000"),
        ]));
        if self != Self::RedisPubSubBatched {
            env.push(("POINT_CHARGE_BATCH_MAX".into(), "1".into()));
        }
        match self {
            // After PATIENT_LOCKS: its LOCK_MAX_HOLD_MS gives way to NO_LOCKS' (the later wins).
            Self::DbPessimistic => env.extend(owned(e2e::NO_LOCKS)),
            Self::DbOptimistic => env.extend(owned(&[
                ("POINT_CHARGE_STRATEGY", "optimistic"),
                ("POINT_OPTIMISTIC_ATTEMPTS", "10"),
            ])),
            Self::RedisSpin => env.extend(owned(&[("LOCK_WAIT_STRATEGY", "spin")])),
            Self::RedisPubSubNoHandoff => {
                env.extend(owned(&[("LOCK_WAIT_STRATEGY", "pubsub"), ("LOCK_HANDOFF_LIMIT", "0")]));
            }
            Self::RedisPubSub | Self::RedisPubSubBatched => {
                env.extend(owned(&[("LOCK_WAIT_STRATEGY", "pubsub"), ("LOCK_HANDOFF_LIMIT", "8")]));
            }
            Self::Quorum => {
                let urls: Vec<String> = nodes.iter().map(PrivateRedis::url).collect();
                env.push(("REDIS_LOCK_NODES".into(), urls.join(",")));
                // A node slower than this counts as down: room for a loaded machine (the
                // product's 250 ms is for a healthy network), as tests/e2e/quorum.rs gives.
                env.push(("LOCK_NODE_TIMEOUT_MS".into(), "2000".into()));
            }
        }
        env
    }
}

/// One charge's answer.
#[derive(Debug)]
struct Answer {
    /// 0 when the server did not answer.
    status: u16,
    /// The balance the answer reported.
    balance: Option<i64>,
    /// From sending the request to having read the whole answer.
    latency: Duration,
}

/// The figures of one exact storm.
#[derive(Debug)]
struct Run {
    /// Charges sent.
    charges: usize,
    wall: Duration,
    latencies: Vec<Duration>,
    /// Answers other than 200: 429s of `db-optimistic` and `quorum`, within
    /// [`Strategy::refusals_allowed`] (any other run with one is not recorded: the program
    /// stops).
    failures: usize,
    /// Version conflicts the instances counted (`db-optimistic`'s retries and last losses).
    conflicts: u64,
    /// The balance read back after the storm.
    balance: i64,
    /// `EVALSHA` + `EVAL` calls on the counted Redis (or nodes) during the storm.
    scripts_seen: u64,
    /// Whether those are lock scripts (`false` for `db-pessimistic`: whatever the shared
    /// Redis ran meanwhile was not a lock's).
    lock_scripts: bool,
}

impl Run {
    /// Charges applied per second.
    fn per_second(&self) -> f64 {
        (self.charges - self.failures) as f64 / self.wall.as_secs_f64()
    }

    fn failures(&self) -> f64 {
        self.failures as f64
    }

    fn conflicts_per_charge(&self) -> f64 {
        self.conflicts as f64 / self.charges as f64
    }

    fn p50_ms(&self) -> f64 {
        ms(percentile(&self.latencies, 50.0))
    }

    fn p99_ms(&self) -> f64 {
        ms(percentile(&self.latencies, 99.0))
    }

    fn scripts_per_charge(&self) -> f64 {
        if self.lock_scripts { self.scripts_seen as f64 / self.charges as f64 } else { 0.0 }
    }
}

/// One strategy's runs.
#[derive(Debug)]
struct Measured {
    strategy: Strategy,
    runs: Vec<Run>,
    /// `SELECT VERSION()` of the database server.
    database: String,
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let shared_redis = test_support::redis_url().await;
    let charges = benchkit::size(3_000, 600);
    let runs = benchkit::runs();
    let http = client();
    println!(
        "{SCENARIO}: {} strategies x {runs} runs of {charges} charges of {AMOUNT} points on one account, \
         {INSTANCES} instances each",
        STRATEGIES.len()
    );
    let mut measured = Vec::with_capacity(STRATEGIES.len());
    for strategy in STRATEGIES {
        let m = measure(&http, strategy, &shared_redis, charges, runs)
            .await
            .with_context(|| format!("{} ({})", strategy.name(), strategy.settings()))?;
        measured.push(m);
    }

    let median_throughput = |strategy: Strategy| {
        measured
            .iter()
            .find(|m| m.strategy == strategy)
            .map_or(0.0, |m| Spread::of(&m.runs.iter().map(Run::per_second).collect::<Vec<_>>()).median)
    };
    let over = |what: &str, numerator: Strategy, denominator: Strategy| {
        benchkit::ratio(what, median_throughput(numerator), median_throughput(denominator))
    };
    let ratio = over("pub/sub / spin", Strategy::RedisPubSub, Strategy::RedisSpin)?;
    let batched = over("batched / pub/sub", Strategy::RedisPubSubBatched, Strategy::RedisPubSub)?;
    let handoff = over("hand-off / no hand-off", Strategy::RedisPubSub, Strategy::RedisPubSubNoHandoff)?;

    let figures = [
        figure(&measured, "throughput", "Charges per second on one account", "charges/s", Run::per_second),
        figure(&measured, "p99", "p99 latency of a charge", "ms", Run::p99_ms),
        figure(&measured, "p50", "p50 latency of a charge", "ms", Run::p50_ms),
        figure(
            &measured,
            "scripts-per-charge",
            "Lock scripts per charge",
            "scripts/charge",
            Run::scripts_per_charge,
        ),
        figure(&measured, "refused", "Charges refused per run (429)", "charges", Run::failures),
        figure(
            &measured,
            "conflicts-per-charge",
            "Version conflicts per charge sent",
            "conflicts/charge",
            Run::conflicts_per_charge,
        ),
    ];
    let redis_version = redis_command(&shared_redis, "INFO server")?
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    let extra = json!({
        "instances": INSTANCES,
        "charges_per_run": charges,
        "amount": AMOUNT,
        "warmup_charges": WARMUP,
        "database_max_connections": DATABASE_CONNECTIONS,
        "redis_version": redis_version,
        "database_version": measured.first().map(|m| m.database.clone()).unwrap_or_default(),
        "pubsub_over_spin_median_throughput": ratio,
        "target_pubsub_over_spin": TARGET_RATIO,
        "batched_over_pubsub_median_throughput": batched,
        "handoff_over_no_handoff_median_throughput": handoff,
        "strategies": measured.iter().map(|m| json!({
            "strategy": m.strategy.name(),
            "settings": m.strategy.settings(),
            "runs": m.runs.iter().map(|run| json!({
                "wall_ms": ms(run.wall),
                "charges_per_s": run.per_second(),
                "p50_ms": run.p50_ms(),
                "p99_ms": run.p99_ms(),
                "failures": run.failures,
                "conflicts": run.conflicts,
                "final_balance": run.balance,
                "scripts_per_charge": run.scripts_per_charge(),
                // For db-pessimistic: what the shared Redis ran besides (no lock scripts).
                "scripts_seen": run.scripts_seen,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let markdown = benchkit::write(SCENARIO, &about(charges), &figures, extra)?;
    println!("\n{markdown}");
    println!(
        "pub/sub over spin, median throughput: {ratio:.2}x (target: at least {TARGET_RATIO:.0}x, {})",
        if ratio >= TARGET_RATIO { "met" } else { "NOT met" }
    );
    println!("pub/sub with the local hand-off over pub/sub without, median throughput: {handoff:.2}x");
    println!("pub/sub with batches over pub/sub one charge per hold, median throughput: {batched:.2}x");
    Ok(())
}

/// Every run of one strategy on a cluster of its own.
async fn measure(
    http: &awc::Client,
    strategy: Strategy,
    shared_redis: &str,
    charges: usize,
    runs: usize,
) -> anyhow::Result<Measured> {
    let mut nodes = if strategy == Strategy::Quorum {
        (0..LOCK_NODES)
            .map(|_| PrivateRedis::start())
            .collect::<anyhow::Result<Vec<_>>>()
            .context("start the quorum's redis-server nodes")?
    } else {
        Vec::new()
    };
    // Where the lock's scripts run.
    let counted: Vec<String> = if strategy == Strategy::Quorum {
        nodes.iter().map(PrivateRedis::url).collect()
    } else {
        vec![shared_redis.to_owned()]
    };
    let options = ClusterOptions { env: strategy.env(&nodes), ..ClusterOptions::default() };
    let cluster = Cluster::start_with(INSTANCES, &options).await.context("start the instances")?;
    let db = sea_orm::Database::connect(cluster.direct_database_url())
        .await
        .context("connect to the benchmark's database")?;
    let database = db
        .query_one_raw(Statement::from_string(DbBackend::MySql, "SELECT VERSION()"))
        .await?
        .and_then(|row| row.try_get_by_index::<String>(0).ok())
        .unwrap_or_default();

    let fan = sign_up(http, cluster.url(0), "warm-up").await.context("sign up the warm-up user")?;
    let answers = storm(http, &cluster, &fan, WARMUP, None).await;
    check(http, &cluster, &db, &fan, &answers, strategy.refusals_allowed(answers.len()))
        .await
        .context("the warm-up storm")?;

    let progress = Progress::new(format!("locks {}", strategy.name()), u64::try_from(runs * charges)?);
    let mut measured = Vec::with_capacity(runs);
    for run in 1..=runs {
        let fan = sign_up(http, cluster.url(run), "hot-account")
            .await
            .with_context(|| format!("sign up the user of run {run}"))?;
        let before = scripts_run(&counted)?;
        let conflicts_before = conflicts(http, &cluster).await?;
        let started = Instant::now();
        let answers = storm(http, &cluster, &fan, charges, Some(&progress)).await;
        let wall = started.elapsed();
        let scripts_seen = scripts_run(&counted)?.saturating_sub(before);
        let conflicts = conflicts(http, &cluster).await?.saturating_sub(conflicts_before);
        let balance = check(http, &cluster, &db, &fan, &answers, strategy.refusals_allowed(answers.len()))
            .await
            .with_context(|| format!("run {run} of {runs} was not exact"))?;
        measured.push(Run {
            charges,
            wall,
            latencies: answers.iter().map(|a| a.latency).collect(),
            failures: answers.iter().filter(|a| a.status != 200).count(),
            conflicts,
            balance,
            scripts_seen,
            lock_scripts: strategy.locks_in_redis(),
        });
    }
    db.close().await.context("close the database connection")?;
    cluster.shut_down().await;
    for node in &mut nodes {
        node.kill();
    }

    println!("{} ({}):", strategy.name(), strategy.settings());
    for (i, run) in measured.iter().enumerate() {
        println!(
            "  run {}: {:>7.0} charges/s, wall {:>7.0} ms, p50 {:>7.1} ms, p99 {:>7.1} ms, {} failures, \
             {:.2} lock scripts/charge, {:.2} conflicts/charge",
            i + 1,
            run.per_second(),
            ms(run.wall),
            run.p50_ms(),
            run.p99_ms(),
            run.failures,
            run.scripts_per_charge(),
            run.conflicts_per_charge(),
        );
    }
    Ok(Measured { strategy, runs: measured, database })
}

/// `count` charges of [`AMOUNT`] to `fan`'s account, all sent at once, round-robin over the
/// instances; each answer steps `progress`.
async fn storm(
    http: &awc::Client,
    cluster: &Cluster,
    fan: &Fan,
    count: usize,
    progress: Option<&Progress>,
) -> Vec<Answer> {
    let user = fan.id.as_str();
    join_all((0..count).map(|i| {
        let request = http.post(format!("{}/api/v1/users/{user}/points/charge", cluster.url(i))).bearer(fan);
        async move {
            let started = Instant::now();
            let answer = call(request, Some(json!({"amount": AMOUNT}))).await;
            let latency = started.elapsed();
            if let Some(progress) = progress {
                progress.step(1);
            }
            let (status, body) = answer.unwrap_or((0, Value::Null));
            Answer { status, balance: body["balance"].as_i64(), latency }
        }
    }))
    .await
}

/// Whether the storm that gave `answers` was exact (see the top of the file); the balance
/// read back.
async fn check(
    http: &awc::Client,
    cluster: &Cluster,
    db: &DatabaseConnection,
    fan: &Fan,
    answers: &[Answer],
    refusals_allowed: usize,
) -> anyhow::Result<i64> {
    let failures = answers.iter().filter(|a| a.status != 200).count();
    let refusals_only = answers.iter().all(|a| a.status == 200 || a.status == 429);
    // The charges applied: all of them, or (where refusals are allowed) the 200s.
    let refused_within = refusals_only && failures <= refusals_allowed;
    let n = answers.len() - if refused_within { failures } else { 0 };
    if failures > 0 && !refused_within {
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        for answer in answers {
            *statuses.entry(answer.status).or_default() += 1;
        }
        anyhow::bail!("{failures} of {n} charges were not applied (answers by status, 0 none: {statuses:?})");
    }
    let steps = i64::try_from(n)?;
    let expected: BTreeSet<i64> = (1..=steps).map(|k| k * AMOUNT).collect();
    // Each charge saw the balance the one before left: n answers, n different balances.
    let answered: BTreeSet<i64> =
        answers.iter().filter(|a| a.status == 200).filter_map(|a| a.balance).collect();
    anyhow::ensure!(
        answered == expected,
        "the answers reported {} different balances, expected {n}: 100, 200, ..., {}",
        answered.len(),
        steps * AMOUNT
    );

    let (status, body) =
        call(http.get(format!("{}/api/v1/users/{}/points", cluster.url(1), fan.id)).bearer(fan), None)
            .await?;
    anyhow::ensure!(status == 200, "balance: {status} {body}");
    let balance = body["balance"].as_i64().context("a balance")?;
    anyhow::ensure!(
        balance == steps * AMOUNT,
        "balance {balance}, expected {}: a charge was lost or doubled",
        steps * AMOUNT
    );

    // The newest entries through the API (it shows at most HISTORY_PAGE), newest first.
    let page = n.min(HISTORY_PAGE);
    let (status, body) = call(
        http.get(format!("{}/api/v1/users/{}/points/history?limit={page}", cluster.url(2), fan.id))
            .bearer(fan),
        None,
    )
    .await?;
    anyhow::ensure!(status == 200, "history: {status} {body}");
    let entries = body.as_array().context("a history list")?;
    anyhow::ensure!(
        entries.iter().all(|e| e["kind"] == "CHARGE" && e["amount"] == AMOUNT),
        "the history holds an entry other than a charge of {AMOUNT}"
    );
    let listed = entries
        .iter()
        .map(|e| e["balanceAfter"].as_i64().context("balanceAfter"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let newest: Vec<i64> = (steps - i64::try_from(page)? + 1..=steps).rev().map(|k| k * AMOUNT).collect();
    anyhow::ensure!(
        listed == newest,
        "the history's newest {page} entries are not {AMOUNT} apart down from {balance}"
    );

    // All of it, in MySQL. Parsed, so that only a UUID's hex reaches the statement.
    let id = uuid::Uuid::parse_str(&fan.id).context("a user id")?.simple();
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::MySql,
            format!("SELECT balance_after, kind, amount FROM point_history WHERE user_id = UNHEX('{id}')"),
        ))
        .await?;
    anyhow::ensure!(rows.len() == n, "MySQL holds {} history entries, expected {n}", rows.len());
    let mut afters = BTreeSet::new();
    for row in &rows {
        let (after, kind, amount) = (
            row.try_get_by_index::<i64>(0)?,
            row.try_get_by_index::<String>(1)?,
            row.try_get_by_index::<i64>(2)?,
        );
        anyhow::ensure!(kind == "CHARGE" && amount == AMOUNT, "a history entry {kind} of {amount}");
        afters.insert(after);
    }
    anyhow::ensure!(afters == expected, "the history's balances after are not 100, 200, ..., {balance}");
    Ok(balance)
}

/// One figure: a series per strategy, `value` of each run.
fn figure(measured: &[Measured], id: &str, title: &str, unit: &str, value: fn(&Run) -> f64) -> Figure {
    measured.iter().fold(Figure::new(id, title, unit), |figure, m| {
        figure.with(Series::new(m.strategy.name(), m.runs.iter().map(value).collect()))
    })
}

/// What the figures are, for the report.
fn about(charges: usize) -> String {
    format!(
        "Charges of {AMOUNT} points, {charges} per run sent at once to **one** account (round-robin over \
         {INSTANCES} release-build instances sharing one MySQL and one Redis), so every charge contends for \
         the same account: `db-pessimistic` takes no distributed lock (`DISABLE_LOCKS_FOR_TESTING`) and the \
         charges queue on MySQL's row lock (`SELECT ... FOR UPDATE` on the account); `redis-spin` waits for \
         the Redis lock by retrying its acquire script (exponential backoff, full jitter); \
         `redis-pubsub-no-handoff` sleeps until the holder's release is announced on the key's channel, \
         every release freeing the key in Redis (`LOCK_HANDOFF_LIMIT=0`); `redis-pubsub` (the default) does \
         the same but a release hands the hold straight to a waiter of the same instance, up to 8 times in \
         a row, before the key is freed in Redis (`LOCK_HANDOFF_LIMIT=8`, docs/locking.md); `quorum` takes \
         the lock on a majority of three independent Redis nodes (`REDIS_LOCK_NODES`), its waiters retrying \
         with backoff in no queue, so an unlucky one may wait out its 60 s and be refused (429, counted as \
         refused; more than 1 in 100 stops the benchmark); `db-optimistic` takes no lock at all (`POINT_CHARGE_STRATEGY=optimistic`): a plain \
         read, the version's compare-and-set, a conflict retried after a jittered pause (1 ms doubling to 50 \
         ms), 10 attempts, then 429 (its throughput counts the charges applied; its refusals and conflicts \
         have figures of their own). These six run each charge on its own lock hold and transaction \
         (`POINT_CHARGE_BATCH_MAX=1`); `redis-pubsub-batched` is the product's default, the pub/sub lock \
         with the charges each instance has queued for the account applied up to 100 per hold and \
         transaction (docs/locking.md). All with `POINT_LOCK_WAIT_MS=60000` (none that waits in a queue gives up) and \
         `DATABASE_MAX_CONNECTIONS={DATABASE_CONNECTIONS}`.\n\n\
         Each cluster gets an uncounted warm-up storm of {WARMUP} charges; each run is a new user. A run \
         counts only if exact (all answers 200, or 200 and 429 for `db-optimistic` and `quorum`, with distinct balances, final balance {AMOUNT} x charges applied, the \
         history exactly those charges with balances after {AMOUNT}, {}, ..., {AMOUNT} x charges); anything \
         else stops the benchmark. Latency is client-side, from sending to having the answer (the client keeps \
         at most 1,000 requests in flight; a request waiting for a connection is waiting). Lock scripts are \
         the `EVALSHA` and `EVAL` calls in Redis's `INFO commandstats` during the storm (acquire attempts, \
         releases, renewals, fence write-backs), on the shared Redis or summed over the quorum's three nodes, \
         per charge; the two `db-` strategies run none.",
        2 * AMOUNT,
    )
}

/// `point_charge_conflicts_total` summed over the instances' metrics (0 where none was
/// counted yet: the counter appears with its first conflict).
async fn conflicts(http: &awc::Client, cluster: &Cluster) -> anyhow::Result<u64> {
    let mut total = 0;
    for i in 0..INSTANCES {
        let mut response = http
            .get(format!("{}/metrics", cluster.ops_url(i)))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("metrics of instance {i}: {e}"))?;
        let body = response.body().limit(16 << 20).await.map_err(|e| anyhow::anyhow!("metrics body: {e}"))?;
        let text = String::from_utf8_lossy(&body);
        total += text
            .lines()
            .filter(|line| line.starts_with("point_charge_conflicts_total"))
            .filter_map(|line| line.split_whitespace().last()?.parse::<f64>().ok())
            .map(|value| value as u64)
            .sum::<u64>();
    }
    Ok(total)
}

/// `EVALSHA` + `EVAL` calls the Redis servers at `urls` have run so far, together.
fn scripts_run(urls: &[String]) -> anyhow::Result<u64> {
    let mut total = 0;
    for url in urls {
        let info = redis_command(url, "INFO commandstats")?;
        total += info
            .lines()
            .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
            .filter_map(|line| line.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(total)
}

/// One inline command over a plain TCP connection, answered with a bulk string.
fn redis_command(redis_url: &str, command: &str) -> anyhow::Result<String> {
    let rest = redis_url.split_once("://").map_or(redis_url, |(_, rest)| rest);
    anyhow::ensure!(
        !rest.contains('@'),
        "counting commands needs a Redis without a password, not {redis_url}"
    );
    let address = rest.split(['/', '?']).next().unwrap_or(rest);
    let mut stream = std::net::TcpStream::connect(address).with_context(|| format!("connect {address}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.read_line(&mut header)?;
    let length: usize = header
        .trim()
        .strip_prefix('$')
        .with_context(|| format!("{command} on {address}: not a bulk reply: {}", header.trim()))?
        .parse()?;
    let mut body = vec![0_u8; length];
    reader.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}
