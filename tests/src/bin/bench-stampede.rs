//! `make bench`: a cache stampede. 100 concurrent misses on one key, from two instances,
//! with and without the single loader. Prints its figures and writes
//! `docs/bench/stampede.{md,json}` and its plots.
//!
//! For each mode (`CACHE_SINGLE_LOADER=true`, the product; `false`, the baseline where
//! every miss loads by itself), two release-build instances share one database and one
//! Redis. Each of `benchkit::runs()` runs opens a fresh date, whose seat map has never
//! been cached, and sends 100 seat-map GETs of it at once, half to each instance, by a
//! few admitted users (an access token and an ACTIVE queue token each: the seat map is
//! behind the queue gate). Measured per burst:
//!
//! - **loads**: how many times the seat map was loaded from MySQL, by the servers' own
//!   counter `cache_loads_total{cache="seats"}` (each instance's `/metrics`, before and
//!   after, summed). One load is two `SELECT`s (the date, its seats).
//! - **p50 / p99**: each request's latency, from its send to its whole body.
//! - every answer must be 200 with 50 seats, or the benchmark fails.
//!
//! The MySQL server's `Com_select` delta is reported beside the loads: it also counts what
//! runs anyway (token checks, the background jobs), so a warm burst of the same size on a
//! date already cached (which also opens the client's connections to both instances, so
//! that the cold burst does not pay for them) is measured just before each cold burst, as
//! the baseline to subtract. Quick mode (`BENCH_QUICK=1`) keeps the burst at 100 (it is
//! small) and runs three times instead of five.
//!
//! Needs `TEST_DATABASE_URL` and `TEST_REDIS_URL` (and a `mariadb` or `mysql` client for
//! `Com_select`), and the release build of the server next to this program
//! (`cargo build --release --workspace --bins`); run it from the repository root.

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]
#![allow(clippy::cast_precision_loss, reason = "figures")]

use std::time::{Duration, Instant};

use anyhow::Context as _;
use e2e::benchkit::{self, Figure, Progress, Series, Spread};
use e2e::booking::{AsFan as _, Fan, admitted_users, env, open_schedule};
use e2e::stats::{ms, percentile};
use e2e::{Cluster, ClusterOptions, client};
use serde_json::{Value, json};

const SCENARIO: &str = "stampede";
const INSTANCES: usize = 2;
/// Requests per burst, all sent at once: request i goes to instance i % 2.
const BURST: usize = 100;
/// Admitted users sharing the burst: request i is user i % USERS's. Even, so that each
/// user's requests go to the instance it was created on.
const USERS: usize = 10;
/// Seats of every date `open_schedule` makes.
const SEATS: usize = 50;

/// What one run measured.
#[derive(Debug, Clone)]
struct Run {
    /// `cache_loads_total{cache="seats"}` during the cold burst, both instances.
    loads: f64,
    /// The same during the warm burst (0 unless the warm entry ran out).
    warm_loads: f64,
    /// `Com_select` during the cold burst.
    selects: u64,
    /// `Com_select` during the warm burst: what the same requests cost without a miss.
    warm_selects: u64,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Run {
    fn json(&self) -> Value {
        json!({
            "loads": self.loads,
            "warmLoads": self.warm_loads,
            "comSelect": self.selects,
            "warmComSelect": self.warm_selects,
            "p50Ms": ms(self.p50),
            "p99Ms": ms(self.p99),
            "maxMs": ms(self.max),
        })
    }
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let http = client();
    let runs = benchkit::runs();
    let progress = Progress::new("stampede", u64::try_from(runs * 2)?);
    let mut modes = Vec::new();
    for single_loader in [true, false] {
        let measured = mode(&http, single_loader, runs, &progress).await?;
        for (i, run) in measured.iter().enumerate() {
            println!(
                "{:>16} run {}: {} loads ({} during the warm burst), Com_select {} (warm {}), p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                label(single_loader),
                i + 1,
                run.loads,
                run.warm_loads,
                run.selects,
                run.warm_selects,
                ms(run.p50),
                ms(run.p99),
                ms(run.max),
            );
        }
        modes.push((single_loader, measured));
    }

    let figure = |id: &str, title: &str, unit: &str, value: &dyn Fn(&Run) -> f64| {
        modes.iter().fold(Figure::new(id, title, unit), |drawn, (single_loader, runs)| {
            drawn.with(Series::new(label(*single_loader), runs.iter().map(value).collect()))
        })
    };
    let figures = [
        figure("loads", "Seat-map loads from MySQL per burst of 100 misses", "loads", &|r| r.loads),
        figure("p99", "p99 latency of the burst", "ms", &|r| ms(r.p99)),
        figure("p50", "p50 latency of the burst", "ms", &|r| ms(r.p50)),
    ];
    let about = format!(
        "A cache stampede (`tests/src/bin/bench-stampede.rs`): {BURST} seat-map GETs of a date never \
         cached, sent at once, half to each of {INSTANCES} release-build instances sharing one database and \
         one Redis, by {USERS} admitted users; a fresh date per run. `single loader` is the product \
         (`CACHE_SINGLE_LOADER=true`: requests of one instance queue on a per-key mutex, one loader across \
         instances, the others wait for its entry); `no single loader` is the baseline \
         (`CACHE_SINGLE_LOADER=false`: every miss loads by itself, and stores under the version read \
         right before loading, as a loader does). Loads are the servers' own counter \
         `cache_loads_total{{cache=\"seats\"}}` (one load is two SELECTs); latency is from send to whole \
         body; every answer was 200 with {SEATS} seats."
    );
    let extra = json!({
        "burst": BURST,
        "instances": INSTANCES,
        "users": USERS,
        "modes": modes.iter().map(|(single_loader, runs)| json!({
            "singleLoader": single_loader,
            "label": label(*single_loader),
            "runs": runs.iter().map(Run::json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let mut markdown = benchkit::write(SCENARIO, &about, &figures, extra)?;
    markdown.push_str(
        "MySQL `SELECT`s (the server's `Com_select`, every session) during the cold burst, during a warm \
         burst of the same size on a cached date just before it (token checks and background jobs: what \
         runs without a miss), and the difference (min / median / max over the runs):\n\n\
         | mode | cold burst | warm burst | difference |\n|---|---:|---:|---:|\n",
    );
    for (single_loader, runs) in &modes {
        let spread = |value: &dyn Fn(&Run) -> f64| {
            let s = Spread::of(&runs.iter().map(value).collect::<Vec<_>>());
            format!("{} / {} / {}", benchkit::fmt(s.min), benchkit::fmt(s.median), benchkit::fmt(s.max))
        };
        markdown.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            label(*single_loader),
            spread(&|r| r.selects as f64),
            spread(&|r| r.warm_selects as f64),
            spread(&|r| r.selects as f64 - r.warm_selects as f64),
        ));
    }
    std::fs::write(format!("{}/{SCENARIO}.md", benchkit::DIR), &markdown)
        .with_context(|| format!("write {}/{SCENARIO}.md (run from the repository root)", benchkit::DIR))?;
    println!("\n{markdown}");
    Ok(())
}

const fn label(single_loader: bool) -> &'static str {
    if single_loader { "single loader" } else { "no single loader" }
}

/// Two instances with `CACHE_SINGLE_LOADER=<single_loader>`, `runs` bursts on them.
async fn mode(
    http: &awc::Client,
    single_loader: bool,
    runs: usize,
    progress: &Progress,
) -> anyhow::Result<Vec<Run>> {
    let mut env = env(100);
    env.push(("CACHE_SINGLE_LOADER".into(), single_loader.to_string()));
    env.push(("RUST_LOG".into(), "warn".into()));
    let cluster =
        Cluster::start_with(INSTANCES, &ClusterOptions { env, ..ClusterOptions::default() }).await?;
    let bases: Vec<&str> = cluster.instances.iter().map(|i| i.base_url.as_str()).collect();
    let users = admitted_users(http, &bases, USERS).await?;
    let mut measured = Vec::with_capacity(runs);
    for _ in 0..runs {
        measured.push(run(http, &cluster, &users).await?);
        progress.step(1);
    }
    cluster.shut_down().await;
    Ok(measured)
}

/// One run: a warm burst on a cached date (the baseline, and the client's connections
/// opened), then the cold burst on a date never cached.
async fn run(http: &awc::Client, cluster: &Cluster, users: &[(Fan, String)]) -> anyhow::Result<Run> {
    let warm = open_schedule(http, cluster.url(0), 5_000).await?;
    let cold = open_schedule(http, cluster.url(1), 5_000).await?;
    // The warm date cached (an entry lives 10 s; the bursts follow at once).
    burst(http, cluster, users, &warm, INSTANCES).await?;

    let before_warm = seat_loads(http, cluster).await?;
    let selects_before_warm = e2e::stats::com_select()?;
    burst(http, cluster, users, &warm, BURST).await?;
    let selects_before = e2e::stats::com_select()?;
    let loads_before = seat_loads(http, cluster).await?;

    let latencies = burst(http, cluster, users, &cold, BURST).await?;

    let selects_after = e2e::stats::com_select()?;
    let loads_after = seat_loads(http, cluster).await?;
    Ok(Run {
        loads: loads_after - loads_before,
        warm_loads: loads_before - before_warm,
        selects: selects_after.saturating_sub(selects_before),
        warm_selects: selects_before.saturating_sub(selects_before_warm),
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        max: percentile(&latencies, 100.0),
    })
}

/// `n` GETs of `schedule`'s seat map sent at once, request i to instance i % 2 as user
/// i % `USERS`: each one's latency. Fails unless every answer is 200 with 50 seats.
async fn burst(
    http: &awc::Client,
    cluster: &Cluster,
    users: &[(Fan, String)],
    schedule: &str,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let answers = futures::future::join_all((0..n).map(|i| {
        let (user, token) = &users[i % users.len()];
        let request = http
            .get(format!("{}/api/v1/schedules/{schedule}/seats", cluster.url(i)))
            .bearer(user)
            .queue(token);
        async move {
            let sent = Instant::now();
            let mut response = request.send().await.map_err(|e| anyhow::anyhow!("no answer: {e}"))?;
            let body = response.body().limit(10 * 1024 * 1024).await.context("a body")?;
            let latency = sent.elapsed();
            let status = response.status().as_u16();
            let seats = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|map| map["seats"].as_array().map(Vec::len));
            anyhow::ensure!(
                status == 200 && seats == Some(SEATS),
                "request {i}: {status} with {seats:?} seats: {}",
                String::from_utf8_lossy(&body)
            );
            anyhow::Ok(latency)
        }
    }))
    .await;
    answers.into_iter().collect()
}

/// `cache_loads_total{cache="seats"}` summed over the instances' `/metrics`.
async fn seat_loads(http: &awc::Client, cluster: &Cluster) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for instance in &cluster.instances {
        let mut response = http
            .get(format!("{}/metrics", instance.ops_url))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("no metrics from {}: {e}", instance.ops_url))?;
        anyhow::ensure!(response.status().is_success(), "metrics: {}", response.status());
        let body = response.body().limit(10 * 1024 * 1024).await.context("the metrics")?;
        total += loads_in(&String::from_utf8_lossy(&body));
    }
    Ok(total)
}

/// `cache_loads_total{cache="seats"}` in a Prometheus scrape (none before the first load).
fn loads_in(text: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with("cache_loads_total{") && line.contains("cache=\"seats\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
