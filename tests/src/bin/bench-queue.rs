//! `make bench`: the waiting queue. Prints its figures and writes `docs/bench/queue.{md,json}`
//! and one SVG per figure through [`benchkit::write`] (run it from the repository root).
//!
//! 1. Issue + status pairs at 50 concurrent clients, on the Redis and on the MySQL adapter
//!    (adapter calls, in process: the same port both ways, no HTTP in between):
//!    `benchkit::size(10_000, 5_000)` pairs on Redis and `benchkit::size(2_000, 1_000)` on
//!    MySQL per run, the two alternating run by run. Each run has a line of its own (a new
//!    Redis queue, deleted afterwards; a fresh migrated database, dropped afterwards), so
//!    that no run queues behind the tokens of the one before. Pairs per second, and the p99
//!    of a pair.
//! 2. Status latency by the line's length (Redis adapter): one line filled in turn to
//!    1,000, 100,000 and 1,000,000 waiting tokens (quick mode: 1,000 and 10,000), 200
//!    issues at a time. At each length, `benchkit::runs()` passes of 8 concurrent readers,
//!    each making 1,000 counted status calls after 100 that are not (the first calls after
//!    a fill meet a busy Redis), over a sample of about 1,000 tokens spread along the part
//!    of the line filled last; p50 and p99 per pass. Then, with the line at its longest,
//!    `benchkit::runs()` admission steps of 1,000 tokens (a cap 1,000 higher each time),
//!    timed one by one. Redis memory per waiting token (`used_memory` before and after the
//!    fill) is the one figure of the one fill, not a spread.
//! 3. The two admission policies on the same burst of `benchkit::size(2_000, 400)`
//!    arrivals, a new queue per run, admitted by three loops every 100 ms (as three
//!    instances would run them), active tokens living 1 s: time from the burst to each
//!    token's admission (p50, p99), the most tokens active at once, and the active count
//!    over time (sampled every 100 ms; every run's samples go to the JSON).
//! 4. One release-build server holding `benchkit::size(10_000, 1_000)` open event streams,
//!    read by clients the whole time: the latency of another route
//!    (`GET /api/v1/users/{id}/points`, 300 sequential requests per pass),
//!    `benchkit::runs()` passes before the streams are opened and as many while they are
//!    open.
//!
//! Every figure is reported as min / median / max over its `benchkit::runs()` runs or
//! passes (5; 3 in quick mode, `BENCH_QUICK=1`). The targets (Redis at least 5x MySQL,
//! status p99 at the longest line within 1.5x of p99 at 1,000, an admission step under
//! 10 ms) are printed and written, not asserted. A wrong result stops the program instead
//! of being plotted: a token issue that fails, a fresh or sampled token that reads as gone,
//! an admission step that admits other than 1,000, a burst not wholly admitted within
//! 120 s, an answer of the other route other than 200, a stream refused.
//!
//! Needs `TEST_DATABASE_URL` and `TEST_REDIS_URL` (as the tests), and the release build of
//! the server next to this program for part 4; every queue it makes has a name of its own
//! and is deleted afterwards.

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]
#![allow(clippy::cast_precision_loss, reason = "figures")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use adapters_mysql::queue::MySqlQueue;
use adapters_redis::connection::{DEFAULT_COMMAND_TIMEOUT, RedisConnections};
use adapters_redis::queue::RedisQueue;
use anyhow::Context as _;
use application::queue::{QueueConfig, WaitingQueue};
use domain::queue::{AdmitPolicy, QueueStatus, QueueTokenId};
use domain::user::UserId;
use e2e::benchkit::{self, Figure, Progress, Series};
use e2e::booking::{AsFan as _, Fan, queue_token, sign_up};
use e2e::stats::{ms, percentile};
use e2e::{Cluster, ClusterOptions, owned};
use futures::StreamExt as _;
use futures::future::join_all;
use serde_json::{Value, json};

const SCENARIO: &str = "queue";
/// Concurrent clients of part 1.
const CLIENTS: usize = 50;
/// Part 2: concurrent readers, and the status calls each makes per pass, counted and not.
const READERS: usize = 8;
const READS: usize = 1_000;
const UNCOUNTED_READS: usize = 100;
/// Tokens issued at once while the line is filled.
const FILL_BATCH: usize = 200;
/// Tokens one admission step of part 2 admits.
const STEP: u64 = 1_000;
/// Part 3: the admission loops (instances), how often each runs and the active tokens'
/// lifetime; how often the burst is sampled and how long it may take.
const ADMISSION_LOOPS: usize = 3;
const ADMIT_EVERY: Duration = Duration::from_millis(100);
const POLICY_LIFETIME: Duration = Duration::from_secs(1);
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
const POLICY_DEADLINE: Duration = Duration::from_secs(120);
/// The admission policies of part 3: the plots' label, a description, the policy.
const POLICIES: [(&str, &str, AdmitPolicy); 2] = [
    ("max-active", "`max-active`: at most 200 active", AdmitPolicy::MaxActive { max_active: 200 }),
    (
        "rate",
        "`rate`: 100 every 500 ms, at most 1,000 active",
        AdmitPolicy::Rate { batch: 100, interval: Duration::from_millis(500), max_active: 1_000 },
    ),
];
/// Part 4: sequential requests of the other route per pass.
const OTHER_ROUTE_REQUESTS: usize = 300;

fn config(policy: AdmitPolicy) -> QueueConfig {
    QueueConfig {
        active_lifetime: Duration::from_secs(600),
        waiting_idle: Duration::from_secs(3_600),
        policy,
        admit_interval: Duration::from_millis(100),
        rate_window: Duration::from_secs(60),
    }
}

/// The line lengths of part 2, shortest first: 1,000, 100,000 and 1,000,000 (quick mode:
/// 1,000 and 10,000).
fn lengths() -> Vec<usize> {
    let mut lengths = vec![1_000, benchkit::size(100_000, 10_000), benchkit::size(1_000_000, 10_000)];
    lengths.dedup();
    lengths
}

/// `n` with thousands separators: 1,000,000.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// The `p`th percentile of each pass, in ms.
fn percentiles(passes: &[Vec<Duration>], p: f64) -> Vec<f64> {
    passes.iter().map(|latencies| ms(percentile(latencies, p))).collect()
}

/// One run of part 1.
#[derive(Debug)]
struct Pairs {
    per_second: f64,
    latencies: Vec<Duration>,
}

impl Pairs {
    /// The `p`th percentile of each run's pairs, in ms.
    fn percentiles(runs: &[Self], p: f64) -> Vec<f64> {
        runs.iter().map(|run| ms(percentile(&run.latencies, p))).collect()
    }

    fn json(&self) -> Value {
        json!({
            "pairs": self.latencies.len(),
            "pairsPerSecond": self.per_second,
            "p50Ms": ms(percentile(&self.latencies, 50.0)),
            "p99Ms": ms(percentile(&self.latencies, 99.0)),
        })
    }
}

/// `n` issue + status pairs over `CLIENTS` concurrent clients: pairs per second, and the
/// pair latencies.
async fn issue_and_status(queue: Arc<dyn WaitingQueue>, n: usize) -> anyhow::Result<Pairs> {
    let started = Instant::now();
    let per_client = n / CLIENTS;
    let clients = (0..CLIENTS).map(|_| {
        let queue = Arc::clone(&queue);
        async move {
            let mut latencies = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let began = Instant::now();
                let issued = queue.issue(UserId::generate()).await?;
                queue.state(issued.state.token).await?.context("a fresh token is live")?;
                latencies.push(began.elapsed());
            }
            anyhow::Ok(latencies)
        }
    });
    let mut all = Vec::with_capacity(n);
    for latencies in join_all(clients).await {
        all.extend(latencies?);
    }
    Ok(Pairs { per_second: (per_client * CLIENTS) as f64 / started.elapsed().as_secs_f64(), latencies: all })
}

/// One run of part 1 on Redis: `n` pairs on a queue of its own, deleted afterwards.
async fn redis_pairs(redis: &RedisConnections, n: usize) -> anyhow::Result<Pairs> {
    let name = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let queue: Arc<dyn WaitingQueue> = Arc::new(RedisQueue::new(
        redis.pool.clone(),
        &name,
        config(AdmitPolicy::MaxActive { max_active: 0 }),
    ));
    let measured = issue_and_status(queue, n).await;
    delete_queue(redis, &name).await;
    measured
}

/// One run of part 1 on MySQL: `n` pairs on a fresh database, dropped afterwards.
async fn mysql_pairs(n: usize) -> anyhow::Result<Pairs> {
    let database = test_support::fresh_database("benchqueue").await?;
    let measured = mysql_pairs_on(&database, n).await;
    test_support::drop_database(&database).await.ok();
    measured
}

async fn mysql_pairs_on(database: &str, n: usize) -> anyhow::Result<Pairs> {
    adapters_mysql::database::prepare(database).await?;
    let db = adapters_mysql::database::connect(
        database,
        u32::try_from(CLIENTS)?,
        adapters_mysql::database::DEFAULT_STATEMENT_TIMEOUT,
    )
    .await?;
    let queue: Arc<dyn WaitingQueue> =
        Arc::new(MySqlQueue::new(db.clone(), config(AdmitPolicy::MaxActive { max_active: 0 })));
    let measured = issue_and_status(queue, n).await;
    db.close().await.ok();
    measured
}

/// Fills `queue` from `from` up to `size` waiting tokens, `FILL_BATCH` issues at a time;
/// returns a sample of about 1,000 of the new tokens, spread along them.
async fn fill(
    queue: &Arc<dyn WaitingQueue>,
    from: usize,
    size: usize,
    progress: &Progress,
) -> anyhow::Result<Vec<QueueTokenId>> {
    let step = (size / 1_000).max(1);
    let mut sample = Vec::new();
    let mut issued = from;
    while issued < size {
        let batch = (size - issued).min(FILL_BATCH);
        let tokens = join_all((0..batch).map(|_| queue.issue(UserId::generate()))).await;
        for (i, token) in tokens.into_iter().enumerate() {
            let token = token.with_context(|| format!("issue token {} of the line", issued + i + 1))?;
            if (issued + i).is_multiple_of(step) {
                sample.push(token.state.token);
            }
        }
        issued += batch;
        progress.step(u64::try_from(batch)?);
    }
    Ok(sample)
}

/// One pass of status calls on `samples`: `READERS` concurrent readers, `READS` counted
/// calls each after `UNCOUNTED_READS` that are not.
async fn status_latency(
    queue: &Arc<dyn WaitingQueue>,
    samples: &[QueueTokenId],
    progress: &Progress,
) -> anyhow::Result<Vec<Duration>> {
    anyhow::ensure!(!samples.is_empty(), "no sampled token");
    let calls = u64::try_from(UNCOUNTED_READS + READS)?;
    let readers = (0..READERS).map(|r| {
        let queue = Arc::clone(queue);
        let samples = samples.to_vec();
        async move {
            let mut latencies = Vec::with_capacity(READS);
            for n in 0..UNCOUNTED_READS + READS {
                let token = samples[(n * READERS + r) % samples.len()];
                let began = Instant::now();
                queue.state(token).await?.context("a sampled token is live")?;
                if n >= UNCOUNTED_READS {
                    latencies.push(began.elapsed());
                }
            }
            progress.step(calls);
            anyhow::Ok(latencies)
        }
    });
    let mut all = Vec::with_capacity(READERS * READS);
    for latencies in join_all(readers).await {
        all.extend(latencies?);
    }
    Ok(all)
}

fn used_memory(redis_url: &str) -> anyhow::Result<u64> {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    let address = redis_url.trim_start_matches("redis://").trim_end_matches('/');
    let mut stream =
        std::net::TcpStream::connect(address).with_context(|| format!("connect to {address}"))?;
    stream.write_all(b"INFO memory\r\n")?;
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.read_line(&mut header)?;
    let length: usize = header.trim().strip_prefix('$').context("a bulk reply")?.parse()?;
    let mut body = vec![0_u8; length];
    reader.read_exact(&mut body)?;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:").and_then(|v| v.trim().parse().ok()))
        .context("used_memory missing")
}

async fn delete_queue(redis: &RedisConnections, name: &str) {
    for key in ["seq", "waiting", "seen", "active", "tokens", "users", "slot", "log", "rate"] {
        let _: Result<i64, _> =
            fred::prelude::KeysInterface::del(&redis.pool, format!("{{{name}}}:{key}")).await;
    }
}

/// What part 2 measured.
#[derive(Debug)]
struct Lengths {
    /// Per length: the waiting tokens, and each pass's latencies.
    passes: Vec<(usize, Vec<Vec<Duration>>)>,
    /// Each admission step's time, with the line at its longest.
    steps: Vec<Duration>,
    /// Redis `used_memory` per waiting token, over the whole fill.
    bytes_per_token: f64,
}

/// Part 2 on the queue `name`, which the caller deletes.
async fn by_length(
    redis: &RedisConnections,
    redis_url: &str,
    name: &str,
    lengths: &[usize],
    runs: usize,
) -> anyhow::Result<Lengths> {
    let queue: Arc<dyn WaitingQueue> = Arc::new(RedisQueue::new(
        redis.pool.clone(),
        name,
        config(AdmitPolicy::MaxActive { max_active: STEP }),
    ));
    let largest = lengths.iter().copied().max().context("no line length")?;
    let work = largest + lengths.len() * runs * READERS * (UNCOUNTED_READS + READS) + runs;
    let progress = Progress::new("queue: line lengths", u64::try_from(work)?);
    let memory_before = used_memory(redis_url)?;
    let mut passes = Vec::with_capacity(lengths.len());
    let mut filled = 0;
    for &length in lengths {
        let sample = fill(&queue, filled, length, &progress).await?;
        filled = length;
        let mut at_length = Vec::with_capacity(runs);
        for _ in 0..runs {
            at_length.push(status_latency(&queue, &sample, &progress).await?);
        }
        passes.push((length, at_length));
    }
    let bytes_per_token = used_memory(redis_url)?.saturating_sub(memory_before) as f64 / largest as f64;
    // A cap `STEP` higher each time, against the same line.
    let mut steps = Vec::with_capacity(runs);
    for n in 1..=u64::try_from(runs)? {
        let stepper = RedisQueue::new(
            redis.pool.clone(),
            name,
            config(AdmitPolicy::MaxActive { max_active: n * STEP }),
        );
        let began = Instant::now();
        let step = stepper.admit().await?;
        steps.push(began.elapsed());
        anyhow::ensure!(
            step.admitted == STEP,
            "admission step {n} admitted {} tokens, not {STEP}",
            step.admitted
        );
        progress.step(1);
    }
    Ok(Lengths { passes, steps, bytes_per_token })
}

/// One burst of part 3.
#[derive(Debug)]
struct PolicyRun {
    /// Per token, from the burst to its admission.
    waits: Vec<Duration>,
    /// (seconds since the burst, active tokens)
    active_over_time: Vec<(f64, u64)>,
}

impl PolicyRun {
    fn wait_seconds(&self, p: f64) -> f64 {
        percentile(&self.waits, p).as_secs_f64()
    }

    fn peak(&self) -> u64 {
        self.active_over_time.iter().map(|(_, active)| *active).max().unwrap_or(0)
    }

    fn json(&self) -> Value {
        json!({
            "admitted": self.waits.len(),
            "p50WaitS": self.wait_seconds(50.0),
            "p99WaitS": self.wait_seconds(99.0),
            "peakActive": self.peak(),
            "activeOverTime": self.active_over_time,
        })
    }
}

/// A burst of `arrivals` tokens on a queue of their own under `policy` (active tokens
/// living `POLICY_LIFETIME`), deleted afterwards. Fails unless every token was admitted
/// within `POLICY_DEADLINE`.
async fn policy_run(
    redis: &RedisConnections,
    policy: AdmitPolicy,
    arrivals: usize,
) -> anyhow::Result<PolicyRun> {
    let name = format!("bench-policy-{}", uuid::Uuid::new_v4().simple());
    let mut settings = config(policy);
    settings.active_lifetime = POLICY_LIFETIME;
    let queue: Arc<dyn WaitingQueue> = Arc::new(RedisQueue::new(redis.pool.clone(), &name, settings));
    let run = burst(&queue, arrivals).await;
    delete_queue(redis, &name).await;
    let run = run?;
    anyhow::ensure!(
        run.waits.len() == arrivals,
        "{} of {arrivals} tokens admitted within {POLICY_DEADLINE:?}",
        run.waits.len()
    );
    Ok(run)
}

/// `arrivals` tokens issued at once, then admitted by `ADMISSION_LOOPS` loops every
/// `ADMIT_EVERY`, as that many instances would run them, and watched until all were.
async fn burst(queue: &Arc<dyn WaitingQueue>, arrivals: usize) -> anyhow::Result<PolicyRun> {
    let started = Instant::now();
    let issued = join_all((0..arrivals).map(|_| queue.issue(UserId::generate()))).await;
    let tokens: Vec<QueueTokenId> =
        issued.into_iter().map(|i| i.map(|i| i.state.token)).collect::<anyhow::Result<_>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..ADMISSION_LOOPS)
        .map(|_| {
            let (queue, stop) = (Arc::clone(queue), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut every = tokio::time::interval(ADMIT_EVERY);
                while !stop.load(Ordering::Relaxed) {
                    every.tick().await;
                    let _ = queue.admit().await;
                }
            })
        })
        .collect();
    let watched = watch(queue, &tokens, started).await;
    stop.store(true, Ordering::Relaxed);
    for admission in loops {
        let _ = admission.await;
    }
    watched
}

/// Reads every token's state each `SAMPLE_EVERY` until all were admitted or
/// `POLICY_DEADLINE` passed: when each was first seen admitted, and the active count of
/// each sample.
async fn watch(
    queue: &Arc<dyn WaitingQueue>,
    tokens: &[QueueTokenId],
    started: Instant,
) -> anyhow::Result<PolicyRun> {
    let mut admitted_at: Vec<Option<Duration>> = vec![None; tokens.len()];
    let mut active_over_time = Vec::new();
    let deadline = Instant::now() + POLICY_DEADLINE;
    while admitted_at.iter().any(Option::is_none) && Instant::now() < deadline {
        let mut active = 0;
        for (chunk_start, chunk) in tokens.chunks(1_000).enumerate().map(|(n, c)| (n * 1_000, c)) {
            let states = queue.states(chunk.to_vec()).await?;
            for (offset, state) in states.iter().enumerate() {
                let seen_active = state.as_ref().is_some_and(|s| s.status == QueueStatus::Active);
                if seen_active {
                    active += 1;
                }
                // A token gone (expired after its lifetime) was admitted before.
                if (seen_active || state.is_none()) && admitted_at[chunk_start + offset].is_none() {
                    admitted_at[chunk_start + offset] = Some(started.elapsed());
                }
            }
        }
        active_over_time.push((started.elapsed().as_secs_f64(), active));
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    Ok(PolicyRun { waits: admitted_at.into_iter().flatten().collect(), active_over_time })
}

/// Latency of `GET /api/v1/users/{id}/points` on `base`, as `user`: `OTHER_ROUTE_REQUESTS`
/// sequential requests.
async fn other_route_latency(http: &awc::Client, base: &str, user: &Fan) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(OTHER_ROUTE_REQUESTS);
    for _ in 0..OTHER_ROUTE_REQUESTS {
        let began = Instant::now();
        let mut response = http
            .get(format!("{base}/api/v1/users/{}/points", user.id))
            .bearer(user)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let _ = response.body().await;
        anyhow::ensure!(response.status().as_u16() == 200, "the other route answered {}", response.status());
        latencies.push(began.elapsed());
    }
    Ok(latencies)
}

/// What part 4 measured.
#[derive(Debug)]
struct Streams {
    /// Streams open during the second half.
    open: usize,
    /// Each pass's latencies, before the streams and while they were open.
    before: Vec<Vec<Duration>>,
    during: Vec<Vec<Duration>>,
}

/// Part 4 on one instance of its own.
async fn streams(count: usize, runs: usize) -> anyhow::Result<Streams> {
    let options = ClusterOptions {
        env: owned(&[("QUEUE_MAX_ACTIVE", "10"), ("RUST_LOG", "warn"), ("DATABASE_MAX_CONNECTIONS", "20")]),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start_with(1, &options).await?;
    let measured = streams_on(cluster.url(0), count, runs).await;
    cluster.shut_down().await;
    measured
}

async fn streams_on(base: &str, count: usize, runs: usize) -> anyhow::Result<Streams> {
    let http = awc::Client::builder()
        .connector(awc::Connector::new().limit(count + 2_000))
        .timeout(Duration::from_secs(60))
        .finish();
    let progress = Progress::new("queue: event streams", u64::try_from(2 * count + 2 * runs)?);
    let user = sign_up(&http, base, "bench").await?;
    let mut before = Vec::with_capacity(runs);
    for _ in 0..runs {
        before.push(other_route_latency(&http, base, &user).await?);
        progress.step(1);
    }
    // `count` users, each with its queue token (and the access token a stream is opened with).
    let mut tokens = Vec::with_capacity(count);
    for start in (0..count).step_by(100) {
        let made = join_all((start..count.min(start + 100)).map(|_| async {
            let fan = sign_up(&http, base, "s").await?;
            let (_, token) = queue_token(&http, base, &fan).await?;
            anyhow::Ok((fan, token))
        }))
        .await;
        progress.step(u64::try_from(made.len())?);
        for token in made {
            tokens.push(token?);
        }
    }
    let mut opened_streams = Vec::with_capacity(count);
    for chunk in tokens.chunks(500) {
        let opened = join_all(chunk.iter().map(|(fan, token)| {
            http.get(format!("{base}/api/v1/queue/tokens/me/events"))
                .bearer(fan)
                .queue(token)
                .timeout(Duration::from_secs(600))
                .send()
        }))
        .await;
        for response in opened {
            let response = response.map_err(|e| anyhow::anyhow!("a stream was not opened: {e}"))?;
            anyhow::ensure!(response.status().as_u16() == 200, "a stream was refused: {}", response.status());
            opened_streams.push(response);
        }
        progress.step(u64::try_from(chunk.len())?);
    }
    let open = opened_streams.len();
    // Keep reading the streams in the background, as clients would.
    let readers: Vec<_> = opened_streams
        .into_iter()
        .map(|mut s| actix_web::rt::spawn(async move { while let Some(Ok(_)) = s.next().await {} }))
        .collect();
    let mut during = Vec::with_capacity(runs);
    let mut failed = None;
    for _ in 0..runs {
        match other_route_latency(&http, base, &user).await {
            Ok(latencies) => during.push(latencies),
            Err(error) => {
                failed = Some(error);
                break;
            }
        }
        progress.step(1);
    }
    for reader in readers {
        reader.abort();
    }
    if let Some(error) = failed {
        return Err(error.context("the other route with the streams open"));
    }
    Ok(Streams { open, before, during })
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let runs = benchkit::runs();
    let redis_count = benchkit::size(10_000, 5_000);
    let mysql_count = benchkit::size(2_000, 1_000);
    let lengths = lengths();
    let arrivals = benchkit::size(2_000, 400);
    let stream_count = benchkit::size(10_000, 1_000);
    let redis_url = test_support::redis_url().await;
    let redis = RedisConnections::connect(&redis_url, 8, DEFAULT_COMMAND_TIMEOUT).await?;

    // 1. Issue + status, both adapters, alternating run by run.
    let progress = Progress::new("queue: issue + status", u64::try_from(runs * 2)?);
    let (mut on_redis, mut on_mysql) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        on_redis.push(redis_pairs(&redis, redis_count).await.context("issue + status on Redis")?);
        progress.step(1);
        on_mysql.push(mysql_pairs(mysql_count).await.context("issue + status on MySQL")?);
        progress.step(1);
    }
    let pair_rate = Figure::new(
        "issue-status-rate",
        format!("Issue + status pairs per second, {CLIENTS} clients (in process)"),
        "pairs/s",
    )
    .with(Series::new("Redis adapter", on_redis.iter().map(|r| r.per_second).collect()))
    .with(Series::new("MySQL adapter", on_mysql.iter().map(|r| r.per_second).collect()));
    let pair_p99 = Figure::new("issue-status-p99", "Issue + status pair latency, p99", "ms")
        .with(Series::new("Redis adapter", Pairs::percentiles(&on_redis, 99.0)))
        .with(Series::new("MySQL adapter", Pairs::percentiles(&on_mysql, 99.0)));

    // 2. Status latency by the line's length; admission steps; memory.
    let name = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let measured = by_length(&redis, &redis_url, &name, &lengths, runs).await;
    delete_queue(&redis, &name).await;
    let lines = measured.context("status latency by line length")?;
    let largest = lines.passes.last().map_or(0, |(length, _)| *length);
    let by_line = |id: &str, title: &str, p: f64| {
        lines.passes.iter().fold(Figure::new(id, title, "ms"), |figure, (length, passes)| {
            figure.with(Series::new(format!("{} waiting", thousands(*length)), percentiles(passes, p)))
        })
    };
    let status_p99 = by_line("status-p99", "Status call latency by line length, p99 (Redis)", 99.0);
    let status_p50 = by_line("status-p50", "Status call latency by line length, p50 (Redis)", 50.0);
    let admission_step = Figure::new(
        "admission-step",
        format!("One admission step of {} tokens, {} waiting", thousands(1_000), thousands(largest)),
        "ms",
    )
    .with(Series::new(
        format!("{} waiting", thousands(largest)),
        lines.steps.iter().map(|d| ms(*d)).collect(),
    ));

    // 3. The policies on one burst, alternating run by run.
    let progress = Progress::new("queue: admission policies", u64::try_from(runs * POLICIES.len())?);
    let mut by_policy: Vec<Vec<PolicyRun>> = POLICIES.iter().map(|_| Vec::with_capacity(runs)).collect();
    for _ in 0..runs {
        for ((label, _, policy), done) in POLICIES.iter().zip(&mut by_policy) {
            done.push(
                policy_run(&redis, *policy, arrivals).await.with_context(|| format!("the {label} policy"))?,
            );
            progress.step(1);
        }
    }
    let by_policy_figure = |id: &str, title: String, unit: &str, value: &dyn Fn(&PolicyRun) -> f64| {
        POLICIES.iter().zip(&by_policy).fold(Figure::new(id, title, unit), |figure, ((label, _, _), done)| {
            figure.with(Series::new(*label, done.iter().map(value).collect()))
        })
    };
    let wait_p50 = by_policy_figure(
        "policy-wait-p50",
        format!("Time to admission, p50, burst of {}", thousands(arrivals)),
        "s",
        &|r| r.wait_seconds(50.0),
    );
    let wait_p99 = by_policy_figure(
        "policy-wait-p99",
        format!("Time to admission, p99, burst of {}", thousands(arrivals)),
        "s",
        &|r| r.wait_seconds(99.0),
    );
    let peak_active = by_policy_figure(
        "policy-peak-active",
        format!("Most tokens active at once, burst of {}", thousands(arrivals)),
        "tokens",
        &|r| r.peak() as f64,
    );

    // 4. One instance with many open event streams.
    let streamed = streams(stream_count, runs).await.context("the event streams")?;
    let open = thousands(streamed.open);
    let with_streams = format!("{open} streams open");
    let streams_p99 =
        Figure::new("streams-p99", format!("Another route, p99, before and with {open} streams open"), "ms")
            .with(Series::new("before the streams", percentiles(&streamed.before, 99.0)))
            .with(Series::new(with_streams.as_str(), percentiles(&streamed.during, 99.0)));
    let streams_p50 =
        Figure::new("streams-p50", format!("Another route, p50, before and with {open} streams open"), "ms")
            .with(Series::new("before the streams", percentiles(&streamed.before, 50.0)))
            .with(Series::new(with_streams.as_str(), percentiles(&streamed.during, 50.0)));

    // The targets, on the medians.
    let median = |figure: &Figure, i: usize| figure.series[i].spread().median;
    let redis_over_mysql =
        benchkit::ratio("pairs/s, Redis / MySQL", median(&pair_rate, 0), median(&pair_rate, 1))?;
    let longest_over_shortest = benchkit::ratio(
        "status p99, longest / shortest line",
        median(&status_p99, status_p99.series.len() - 1),
        median(&status_p99, 0),
    )?;
    let step_ms = median(&admission_step, 0);
    let targets = [
        (
            "issue + status pairs/s, Redis / MySQL".to_owned(),
            format!("{redis_over_mysql:.1}x"),
            "at least 5x",
            redis_over_mysql >= 5.0,
        ),
        (
            format!("status p99, {} / {} waiting", thousands(largest), thousands(1_000)),
            format!("{longest_over_shortest:.2}x"),
            "at most 1.5x",
            longest_over_shortest <= 1.5,
        ),
        (
            format!("one admission step of {}, {} waiting", thousands(1_000), thousands(largest)),
            format!("{step_ms:.2} ms"),
            "under 10 ms",
            step_ms < 10.0,
        ),
    ];

    let figures = [
        pair_rate,
        pair_p99,
        status_p99,
        status_p50,
        admission_step,
        wait_p50,
        wait_p99,
        peak_active,
        streams_p99,
        streams_p50,
    ];
    let lengths_text = lengths.iter().map(|l| thousands(*l)).collect::<Vec<_>>().join(", ");
    let policies_text =
        POLICIES.iter().map(|(_, description, _)| *description).collect::<Vec<_>>().join("; ");
    let about = format!(
        "The waiting queue (`tests/src/bin/bench-queue.rs`). (1) Issue + status pairs at {CLIENTS} concurrent \
         clients, adapter calls in process (no HTTP): {redis_count} pairs per run on the Redis adapter, \
         {mysql_count} on the MySQL adapter, each run on a line of its own (a new Redis queue; a fresh \
         database). (2) Status latency on the Redis adapter with {lengths_text} tokens waiting: one line \
         filled in turn, and at each length one pass per run of {READERS} concurrent readers making {READS} \
         counted calls each (after {UNCOUNTED_READS} each not counted) over about 1,000 tokens spread along \
         the part filled last; then, at {}, one admission step of {} tokens per run (a cap {} higher each \
         time). (3) The admission policies ({policies_text}) on the same burst of {} arrivals, a new queue \
         per run, admitted by {ADMISSION_LOOPS} loops every {} ms as {ADMISSION_LOOPS} instances would, \
         active tokens living {} s: time from the burst to each token's admission, and the most tokens seen \
         active at once (sampled every {} ms). (4) One release-build instance holding {open} open event \
         streams, read by clients the whole time: `GET /api/v1/users/{{id}}/points`, \
         {OTHER_ROUTE_REQUESTS} sequential requests per pass, one pass per run before the streams and one \
         while they are open. Every token issued and read was live, every admission step admitted {}, every \
         burst was wholly admitted, every answer of the other route was 200, or the program stopped. Redis \
         and MariaDB from `TEST_REDIS_URL` / `TEST_DATABASE_URL`, on the same machine as this process.",
        thousands(largest),
        thousands(1_000),
        thousands(1_000),
        thousands(arrivals),
        ADMIT_EVERY.as_millis(),
        POLICY_LIFETIME.as_secs(),
        SAMPLE_EVERY.as_millis(),
        thousands(1_000),
    );
    let extra = json!({
        "clients": CLIENTS,
        "issueStatus": {
            "redisPairsPerRun": redis_count,
            "mysqlPairsPerRun": mysql_count,
            "redis": on_redis.iter().map(Pairs::json).collect::<Vec<_>>(),
            "mysql": on_mysql.iter().map(Pairs::json).collect::<Vec<_>>(),
        },
        "lineLengths": lines.passes.iter().map(|(length, passes)| json!({
            "waiting": length,
            "p50Ms": percentiles(passes, 50.0),
            "p99Ms": percentiles(passes, 99.0),
        })).collect::<Vec<_>>(),
        "readers": READERS,
        "countedReadsPerReader": READS,
        "admissionStepMs": lines.steps.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        "redisBytesPerWaitingToken": lines.bytes_per_token,
        "arrivals": arrivals,
        "policies": POLICIES.iter().zip(&by_policy).map(|((label, description, _), done)| json!({
            "policy": label,
            "description": description,
            "runs": done.iter().map(PolicyRun::json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "streams": {
            "open": streamed.open,
            "requestsPerPass": OTHER_ROUTE_REQUESTS,
            "beforeP50Ms": percentiles(&streamed.before, 50.0),
            "beforeP99Ms": percentiles(&streamed.before, 99.0),
            "duringP50Ms": percentiles(&streamed.during, 50.0),
            "duringP99Ms": percentiles(&streamed.during, 99.0),
        },
        "targets": targets.iter().map(|(what, measured, target, met)| json!({
            "what": what,
            "measured": measured,
            "target": target,
            "met": met,
        })).collect::<Vec<_>>(),
    });
    let mut markdown = benchkit::write(SCENARIO, &about, &figures, extra)?;
    markdown.push_str("| target (of the medians) | measured | target |\n|---|---:|---:|\n");
    for (what, measured, target, met) in &targets {
        let verdict = if *met { "met" } else { "not met" };
        markdown.push_str(&format!("| {what} | {measured} | {target} ({verdict}) |\n"));
    }
    markdown.push_str(&format!(
        "\nRedis memory per waiting token: **{:.0} bytes** (`used_memory` before and after filling the line \
         to {}; one fill, so one figure).\n\nActive tokens over time in the first run (every fifth sample of \
         {} ms; seconds: count; every run's samples are in `{SCENARIO}.json`):\n\n",
        lines.bytes_per_token,
        thousands(largest),
        SAMPLE_EVERY.as_millis(),
    ));
    for ((label, _, _), done) in POLICIES.iter().zip(&by_policy) {
        let points: Vec<String> = done
            .first()
            .map(|run| run.active_over_time.iter().step_by(5).map(|(t, a)| format!("{t:.1}: {a}")).collect())
            .unwrap_or_default();
        markdown.push_str(&format!("- {label}: {}\n", points.join(", ")));
    }
    std::fs::write(format!("{}/{SCENARIO}.md", benchkit::DIR), &markdown)
        .with_context(|| format!("write {}/{SCENARIO}.md (run from the repository root)", benchkit::DIR))?;
    println!("\n{markdown}");
    Ok(())
}
