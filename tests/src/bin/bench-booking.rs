//! `make bench`: booking (issue 18). Prints its figures and writes `docs/bench/booking.{md,json}`
//! and one SVG per figure through [`benchkit::write`] (run it from the repository root).
//!
//! 1. The seat map, cached and uncached (`CACHE_ENABLED=false`), each on one instance of its
//!    own kept for all its runs, against `/health/live` of the cached instance (on its
//!    operations listener): requests/s, p50, p99 and MySQL `SELECT`s per 1,000 requests (the
//!    server's `Com_select` delta, read with the `mariadb` or `mysql` client), at 64
//!    concurrent clients, `benchkit::size(20_000, 4_000)` requests per run (rounded down to
//!    a whole number per client) after 200 warm-up requests.
//! 2. `benchkit::size(500, 200)` racers for one seat, on three instances kept for all runs,
//!    with newly admitted users and a new date each run: wall time, outcomes, latencies, 5xx.
//! 3. `benchkit::size(10_000, 2_000)` users over 50 seats, on three fresh instances each run
//!    (so that a run's peak RSS is its own): wall time, outcomes, latencies, 5xx, and the
//!    largest peak RSS (`VmHWM`) of the three instances after the storm.
//!
//! Every figure is measured `benchkit::runs()` times and reported as min / median / max. A
//! storm counts only if it was exact, otherwise the program stops: no seat answered 201 to
//! two users, every answer was 201 or 409 (a 5xx stops it too), every seat that answered
//! 201 shows as taken on the seat map read back, no seat nobody asked for does, and every
//! seat asked for was won (one seat: 1 winner, the rest 409; fifty seats: 50 winners) and exactly
//! those show as taken. Per-run outcome and 5xx counts go to the JSON's `extra`. The targets
//! of the issue are printed, not asserted: cached seat map / uncached at least 10x, cached
//! seat map / `/health/live` at least 0.25 (median requests/s).
//!
//! `BENCH_QUICK=1` (`make bench QUICK=1`): smaller loads, fewer runs. `BENCH_SEAT_MAP_ONLY=1`
//! runs part 1 alone and writes nothing (for trying a change to the read path).
//! Release-build servers (`target/release/concert-server`, next to this program); the load
//! generator runs in this process on the same machine, so the figures are a lower bound of
//! what the servers can do. Needs `TEST_DATABASE_URL` and `TEST_REDIS_URL`.

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "figures"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use e2e::benchkit::{self, Figure, Progress, Series, Spread};
use e2e::booking::{AsFan as _, Fan, admitted_users, env, open_schedule, seat_statuses};
use e2e::stats::{ms, percentile};
use e2e::{Cluster, ClusterOptions, client};
use serde_json::{Value, json};

const SCENARIO: &str = "booking";
const CLIENTS: usize = 64;
/// Requests before each measured run of the seat map part, not counted.
const WARMUP: usize = 200;
/// Instances of the storm clusters.
const INSTANCES: usize = 3;
/// Seats of a date (`open_schedule`).
const SEATS: usize = 50;
/// The seat every racer of part 2 wants.
const RACED_SEAT: usize = 25;
/// MySQL connections per instance of the storm clusters (3 x 31 stay under MySQL's default
/// limit of 151).
const DATABASE_CONNECTIONS: &str = "30";
/// Targets of the issue, printed, not asserted: cached seat map over uncached ...
const TARGET_CACHED_OVER_UNCACHED: f64 = 10.0;
/// ... and cached seat map over `/health/live`, in median requests/s.
const TARGET_CACHED_OVER_LIVE: f64 = 0.25;

/// One run of [`hammer`].
#[derive(Debug)]
struct Rate {
    requests: usize,
    per_second: f64,
    p50: Duration,
    p99: Duration,
    selects_per_1000: f64,
    failures: usize,
}

impl Rate {
    fn json(&self) -> Value {
        json!({
            "requests": self.requests,
            "requests_per_s": self.per_second,
            "p50_ms": ms(self.p50),
            "p99_ms": ms(self.p99),
            "selects_per_1000": self.selects_per_1000,
            "failures": self.failures,
        })
    }
}

/// `n` GETs of `url` over `CLIENTS` clients (`n / CLIENTS` each), after a warm-up, each with
/// `user`'s access token and queue token (which `/health/live` ignores); each answer of the
/// measured ones steps `progress`.
async fn hammer(
    http: &awc::Client,
    url: &str,
    (user, token): (&Fan, &str),
    n: usize,
    progress: &Progress,
) -> anyhow::Result<Rate> {
    let get = || http.get(url).bearer(user).queue(token);
    for _ in 0..WARMUP {
        let mut response = get().send().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(response.status().is_success(), "warm-up: {}", response.status());
        let _ = response.body().await;
    }
    let selects = e2e::stats::com_select()?;
    let started = Instant::now();
    let per_client = n / CLIENTS;
    let clients = futures::future::join_all((0..CLIENTS).map(|_| async move {
        let mut latencies = Vec::with_capacity(per_client);
        let mut failures = 0;
        for _ in 0..per_client {
            let sent = Instant::now();
            match get().send().await {
                Ok(mut response) => {
                    let ok = response.status().is_success();
                    let _ = response.body().await;
                    if !ok {
                        failures += 1;
                    }
                }
                Err(_) => failures += 1,
            }
            latencies.push(sent.elapsed());
            progress.step(1);
        }
        (latencies, failures)
    }))
    .await;
    let elapsed = started.elapsed();
    let selects = e2e::stats::com_select()?.saturating_sub(selects);
    let total = per_client * CLIENTS;
    let failures = clients.iter().map(|(_, f)| f).sum();
    // A refused or failed request is not a seat map served: the rate would count it.
    anyhow::ensure!(failures == 0, "{failures} of {total} requests were not answered 2xx");
    let latencies: Vec<Duration> = clients.into_iter().flat_map(|(l, _)| l).collect();
    Ok(Rate {
        requests: total,
        per_second: total as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        selects_per_1000: selects as f64 * 1_000.0 / total as f64,
        failures,
    })
}

/// Part 1: every run of each route.
#[derive(Debug)]
struct SeatMap {
    cached: Vec<Rate>,
    uncached: Vec<Rate>,
    live: Vec<Rate>,
}

impl SeatMap {
    /// The routes, as the figures label them.
    fn routes(&self) -> [(&'static str, &[Rate]); 3] {
        [
            ("cached", self.cached.as_slice()),
            ("uncached", self.uncached.as_slice()),
            ("/health/live", self.live.as_slice()),
        ]
    }

    /// Cached over uncached and cached over `/health/live`, in median requests/s.
    fn ratios(&self) -> anyhow::Result<(f64, f64)> {
        let median =
            |rates: &[Rate]| Spread::of(&rates.iter().map(|r| r.per_second).collect::<Vec<_>>()).median;
        let cached = median(self.cached.as_slice());
        Ok((
            benchkit::ratio("cached / uncached seat map", cached, median(self.uncached.as_slice()))?,
            benchkit::ratio("cached seat map / /health/live", cached, median(self.live.as_slice()))?,
        ))
    }

    fn print(&self) {
        for (name, rates) in self.routes() {
            for (i, r) in rates.iter().enumerate() {
                println!(
                    "  {name} run {}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {:.1} SELECTs per 1,000, {} failed",
                    i + 1,
                    r.per_second,
                    ms(r.p50),
                    ms(r.p99),
                    r.selects_per_1000,
                    r.failures
                );
            }
        }
    }

    fn print_ratios(&self) -> anyhow::Result<()> {
        let (over_uncached, over_live) = self.ratios()?;
        println!(
            "seat map, median req/s: cached / uncached {over_uncached:.1}x (target >= {TARGET_CACHED_OVER_UNCACHED:.0}x, \
             {}); cached / health {over_live:.2} (target >= {TARGET_CACHED_OVER_LIVE:.2}, {})",
            if over_uncached >= TARGET_CACHED_OVER_UNCACHED { "met" } else { "NOT met" },
            if over_live >= TARGET_CACHED_OVER_LIVE { "met" } else { "NOT met" },
        );
        Ok(())
    }

    fn figures(&self) -> Vec<Figure> {
        let mut rps =
            Figure::new("seat-map-rps", format!("Seat map and /health/live, {CLIENTS} clients"), "req/s");
        let mut p99 = Figure::new("seat-map-p99", "p99 latency, seat map and /health/live", "ms");
        for (name, rates) in self.routes() {
            rps = rps.with(Series::new(name, rates.iter().map(|r| r.per_second).collect()));
            p99 = p99.with(Series::new(name, rates.iter().map(|r| ms(r.p99)).collect()));
        }
        let mut selects = Figure::new(
            "seat-map-selects",
            "MySQL SELECTs per 1,000 seat map requests",
            "SELECTs / 1,000 requests",
        );
        for (name, rates) in self.routes().into_iter().take(2) {
            selects = selects.with(Series::new(name, rates.iter().map(|r| r.selects_per_1000).collect()));
        }
        vec![rps, p99, selects]
    }

    fn json(&self) -> Value {
        let runs = |rates: &[Rate]| rates.iter().map(Rate::json).collect::<Vec<_>>();
        json!({
            "cached": runs(self.cached.as_slice()),
            "uncached": runs(self.uncached.as_slice()),
            "health_live": runs(self.live.as_slice()),
        })
    }
}

/// Part 1: `requests` per run of each route, `runs` runs; one instance per mode.
async fn seat_map(http: &awc::Client, requests: usize, runs: usize) -> anyhow::Result<SeatMap> {
    println!(
        "1. seat map: cached, uncached, /health/live ({CLIENTS} clients, {requests} requests per run, {runs} runs)"
    );
    let progress = Progress::new("booking: seat map", u64::try_from(3 * runs * requests)?);
    let mut map = SeatMap { cached: Vec::new(), uncached: Vec::new(), live: Vec::new() };
    for cached in [true, false] {
        let mut settings = env(100);
        settings.push(("CACHE_ENABLED".into(), cached.to_string()));
        settings.push(("RUST_LOG".into(), "warn".into()));
        let cluster =
            Cluster::start_with(1, &ClusterOptions { env: settings, ..ClusterOptions::default() }).await?;
        let base = cluster.url(0).to_owned();
        let ops = cluster.ops_url(0).to_owned();
        let users = admitted_users(http, &[&base], 1).await?;
        let schedule = open_schedule(http, &base, 50_000).await?;
        let caller = (&users[0].0, users[0].1.as_str());
        let live_url = format!("{ops}/health/live");
        let map_url = format!("{base}/api/v1/schedules/{schedule}/seats");
        for _ in 0..runs {
            if cached {
                map.live.push(hammer(http, &live_url, caller, requests, &progress).await?);
                map.cached.push(hammer(http, &map_url, caller, requests, &progress).await?);
            } else {
                map.uncached.push(hammer(http, &map_url, caller, requests, &progress).await?);
            }
        }
        cluster.shut_down().await;
    }
    Ok(map)
}

/// One hold request of a storm.
#[derive(Debug)]
struct Answer {
    seat: usize,
    /// 0: no answer.
    status: u16,
    latency: Duration,
}

#[derive(Debug)]
struct Storm {
    wall: Duration,
    answers: Vec<Answer>,
}

impl Storm {
    fn count(&self, f: impl Fn(u16) -> bool) -> usize {
        self.answers.iter().filter(|a| f(a.status)).count()
    }

    fn created(&self) -> usize {
        self.count(|s| s == 201)
    }

    fn conflicts(&self) -> usize {
        self.count(|s| s == 409)
    }

    fn server_errors(&self) -> usize {
        self.count(|s| s >= 500)
    }

    fn other(&self) -> usize {
        self.count(|s| s != 201 && s != 409 && s < 500)
    }

    /// The `p`th percentile of the requests' latencies, in ms.
    fn latency_ms(&self, p: f64) -> f64 {
        let latencies: Vec<Duration> = self.answers.iter().map(|a| a.latency).collect();
        ms(percentile(&latencies, p))
    }

    fn print(&self, name: &str, run: usize) {
        println!(
            "  {name} run {run}: wall {:.0} ms, 201 x{}, 409 x{}, 5xx x{}, other x{}, p50 {:.1} ms, p99 {:.1} ms, \
             max {:.1} ms",
            ms(self.wall),
            self.created(),
            self.conflicts(),
            self.server_errors(),
            self.other(),
            self.latency_ms(50.0),
            self.latency_ms(99.0),
            self.latency_ms(100.0),
        );
    }

    fn json(&self) -> Value {
        json!({
            "requests": self.answers.len(),
            "wall_ms": ms(self.wall),
            "created_201": self.created(),
            "conflicts_409": self.conflicts(),
            "server_errors_5xx": self.server_errors(),
            "other": self.other(),
            "p50_ms": self.latency_ms(50.0),
            "p90_ms": self.latency_ms(90.0),
            "p99_ms": self.latency_ms(99.0),
            "max_ms": self.latency_ms(100.0),
        })
    }
}

/// Every user of `users` sends one hold at once, round-robin over the instances; user i
/// wants seat `seat_of(i)`. Each answer steps `progress`.
async fn storm(
    http: &awc::Client,
    cluster: &Cluster,
    users: &[(Fan, String)],
    schedule: &str,
    seat_of: impl Fn(usize) -> usize,
    progress: &Progress,
) -> Storm {
    let started = Instant::now();
    let answers = futures::future::join_all(users.iter().enumerate().map(|(i, (user, token))| {
        let seat = seat_of(i);
        let base = cluster.url(i).to_owned();
        async move {
            let sent = Instant::now();
            let status = http
                .post(format!("{base}/api/v1/reservations"))
                .bearer(user)
                .queue(token)
                .send_json(&json!({"scheduleId": schedule, "seatNumber": seat}))
                .await
                .map(|mut r| {
                    let status = r.status().as_u16();
                    drop(r.body());
                    status
                })
                .unwrap_or(0);
            let latency = sent.elapsed();
            progress.step(1);
            Answer { seat, status, latency }
        }
    }))
    .await;
    Storm { wall: started.elapsed(), answers }
}

/// Whether `storm` for the seats `wanted` of `schedule` was exact (see the top of the file),
/// with the seat map read back on `base` by `observer`.
async fn check(
    http: &awc::Client,
    base: &str,
    observer: (&Fan, &str),
    schedule: &str,
    storm: &Storm,
    wanted: &BTreeSet<usize>,
) -> anyhow::Result<()> {
    let mut winners: BTreeMap<usize, usize> = BTreeMap::new();
    for answer in storm.answers.iter().filter(|a| a.status == 201) {
        *winners.entry(answer.seat).or_default() += 1;
    }
    let twice: Vec<(usize, usize)> = winners.iter().filter(|(_, n)| **n > 1).map(|(s, n)| (*s, *n)).collect();
    anyhow::ensure!(twice.is_empty(), "seats held by more than one user (seat, winners): {twice:?}");
    let other = storm.other();
    if other > 0 {
        let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
        for answer in &storm.answers {
            *statuses.entry(answer.status).or_default() += 1;
        }
        anyhow::bail!("{other} answers neither 201, 409 nor 5xx (answers by status, 0 none: {statuses:?})");
    }
    let won: BTreeSet<usize> = winners.into_keys().collect();
    let taken: BTreeSet<usize> = seat_statuses(http, base, observer, schedule)
        .await
        .context("the seat map after the storm")?
        .into_iter()
        .filter(|(_, status)| status != "AVAILABLE")
        .map(|(seat, _)| usize::try_from(seat))
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(won.is_subset(&taken), "seats won {won:?}, but the seat map shows only {taken:?} taken");
    anyhow::ensure!(
        taken.is_subset(wanted),
        "the seat map shows {taken:?} taken, but only {wanted:?} were asked for"
    );
    let server_errors = storm.server_errors();
    anyhow::ensure!(
        server_errors == 0,
        "{server_errors} answers were 5xx: a storm's figures count only without them"
    );
    anyhow::ensure!(won == *wanted, "seats won {won:?}, not every seat asked for {wanted:?}");
    anyhow::ensure!(taken == won, "seats won {won:?}, but the seat map shows {taken:?} taken");
    Ok(())
}

/// Environment for a storm cluster with room for `active` admitted users.
fn storm_env(active: usize) -> Vec<(String, String)> {
    let mut settings = env(active);
    settings.push(("RUST_LOG".into(), "warn".into()));
    settings.push(("DATABASE_MAX_CONNECTIONS".into(), DATABASE_CONNECTIONS.into()));
    settings
}

/// Part 2: `runs` storms of `racers` new admitted users for one seat of a new date, on one
/// cluster.
async fn one_seat(http: &awc::Client, racers: usize, runs: usize) -> anyhow::Result<Vec<Storm>> {
    println!("2. {racers} racers for one seat, {INSTANCES} instances, {runs} runs");
    // Every run's users stay admitted (QUEUE_ACTIVE_SECONDS): room for all of them.
    let options = ClusterOptions { env: storm_env(runs * racers + 2_000), ..ClusterOptions::default() };
    let cluster = Cluster::start_with(INSTANCES, &options).await?;
    let bases: Vec<&str> = cluster.instances.iter().map(|i| i.base_url.as_str()).collect();
    let progress = Progress::new("booking: one seat", u64::try_from(runs * racers)?);
    let mut storms = Vec::with_capacity(runs);
    for run in 1..=runs {
        let users = admitted_users(http, &bases, racers).await?;
        let schedule = open_schedule(http, bases[0], 70_000).await?;
        let outcome = storm(http, &cluster, &users, &schedule, |_| RACED_SEAT, &progress).await;
        let observer = (&users[0].0, users[0].1.as_str());
        check(http, bases[0], observer, &schedule, &outcome, &BTreeSet::from([RACED_SEAT]))
            .await
            .with_context(|| format!("one seat, run {run} of {runs} was not exact"))?;
        storms.push(outcome);
    }
    cluster.shut_down().await;
    for (i, outcome) in storms.iter().enumerate() {
        outcome.print(&format!("{racers} racers, one seat"), i + 1);
    }
    Ok(storms)
}

/// One run of part 3.
#[derive(Debug)]
struct Crowd {
    storm: Storm,
    /// Each instance's peak RSS after the storm, where `/proc` tells it.
    rss_kib: Vec<Option<u64>>,
    admitted_in: Duration,
}

impl Crowd {
    /// The largest peak RSS of the instances, in MiB.
    fn peak_rss_mib(&self) -> Option<f64> {
        self.rss_kib.iter().flatten().max().map(|kib| *kib as f64 / 1024.0)
    }

    fn json(&self) -> Value {
        let mut run = self.storm.json();
        run["peak_rss_mib_per_instance"] =
            json!(self.rss_kib.iter().map(|kib| kib.map(|k| k as f64 / 1024.0)).collect::<Vec<_>>());
        run["users_admitted_in_s"] = json!(self.admitted_in.as_secs_f64());
        run
    }
}

/// Part 3: `runs` storms of `crowd` users over the seats of a date, each on a fresh cluster.
async fn fifty_seats(http: &awc::Client, crowd: usize, runs: usize) -> anyhow::Result<Vec<Crowd>> {
    println!("3. {crowd} users over {SEATS} seats, {INSTANCES} fresh instances per run, {runs} runs");
    let progress = Progress::new("booking: fifty seats", u64::try_from(runs * crowd)?);
    let wanted: BTreeSet<usize> = (1..=SEATS.min(crowd)).collect();
    let mut crowds = Vec::with_capacity(runs);
    for run in 1..=runs {
        let options = ClusterOptions { env: storm_env(crowd + 2_000), ..ClusterOptions::default() };
        let cluster = Cluster::start_with(INSTANCES, &options).await?;
        let bases: Vec<&str> = cluster.instances.iter().map(|i| i.base_url.as_str()).collect();
        let started = Instant::now();
        let users = admitted_users(http, &bases, crowd).await?;
        let admitted_in = started.elapsed();
        let schedule = open_schedule(http, bases[1], 70_000).await?;
        let outcome = storm(http, &cluster, &users, &schedule, |i| i % SEATS + 1, &progress).await;
        let observer = (&users[0].0, users[0].1.as_str());
        check(http, bases[0], observer, &schedule, &outcome, &wanted)
            .await
            .with_context(|| format!("fifty seats, run {run} of {runs} was not exact"))?;
        let rss_kib: Vec<Option<u64>> = cluster.instances.iter().map(|i| i.peak_rss_kib()).collect();
        cluster.shut_down().await;
        crowds.push(Crowd { storm: outcome, rss_kib, admitted_in });
    }
    for (i, run) in crowds.iter().enumerate() {
        run.storm.print(&format!("{crowd} users, {SEATS} seats"), i + 1);
        println!(
            "    users admitted in {:.1} s; peak RSS per instance (MiB): {}",
            run.admitted_in.as_secs_f64(),
            run.rss_kib
                .iter()
                .map(|kib| kib.map_or_else(|| "n/a".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(crowds)
}

fn about(map_requests: usize, racers: usize, crowd: usize) -> String {
    format!(
        "Booking (`tests/src/bin/bench-booking.rs`). Seat map (`GET /api/v1/schedules/{{id}}/seats`), cached and \
         uncached (`CACHE_ENABLED=false`), each on one release-build instance kept for all its runs, against \
         `/health/live` of the cached instance (operations listener): {CLIENTS} concurrent clients, {map_requests} \
         requests per run after {WARMUP} warm-up requests; the seat map is behind the access token and the queue \
         gate (its token lookups shared per instance: one Redis script for many requests) in both modes. MySQL SELECTs are the server's `Com_select` delta, \
         all sessions: the background jobs' own are included (the hold expiry job runs every 2 s, the admission \
         step is on Redis). Targets: cached / uncached at least {TARGET_CACHED_OVER_UNCACHED:.0}x, cached / \
         `/health/live` at least {TARGET_CACHED_OVER_LIVE:.2}, in median requests/s. Seat storms, \
         {INSTANCES} instances, every user with an access token and an ACTIVE queue token asking for one seat, \
         all requests sent at once round-robin over the instances (the client keeps at most 1,000 connections \
         open), wall time from the first request sent to the last answer: {racers} racers for one seat (new \
         users and a new date each run, the same instances), then {crowd} users over {SEATS} seats (fresh \
         instances each run; peak RSS is the largest `VmHWM` of the instances after the storm). Every storm was \
         checked exact (no seat won twice, only 201 and 409 answers, no 5xx, every seat asked for won, and the \
         seat map read back agrees; the seat-map runs, every answer 2xx); targets: one seat 1 winner and 0 5xx, fifty seats 50 \
         winners and 0 5xx. Outcome and 5xx counts per run are in `booking.json`. The load generator shares \
         the machine with the servers, MariaDB and Redis."
    )
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let http = client();
    let runs = benchkit::runs();
    // A whole number of requests per client.
    let map_requests = benchkit::size(20_000, 4_000) / CLIENTS * CLIENTS;
    let racers = benchkit::size(500, 200);
    let crowd = benchkit::size(10_000, 2_000);

    let map = seat_map(&http, map_requests, runs).await?;
    map.print();
    map.print_ratios()?;
    let mut figures = map.figures();
    if std::env::var_os("BENCH_SEAT_MAP_ONLY").is_some() {
        for figure in &figures {
            println!("\n{}", figure.table());
        }
        println!("BENCH_SEAT_MAP_ONLY: storms skipped, nothing written");
        return Ok(());
    }

    let racing = one_seat(&http, racers, runs).await?;
    let crowds = fifty_seats(&http, crowd, runs).await?;

    let racers_label = format!("{racers} racers");
    figures.push(
        Figure::new("one-seat-wall", format!("{racers} racers for one seat: wall time"), "ms")
            .with(Series::new(racers_label.as_str(), racing.iter().map(|s| ms(s.wall)).collect())),
    );
    figures.push(
        Figure::new("one-seat-p99", format!("{racers} racers for one seat: p99 latency"), "ms")
            .with(Series::new(racers_label.as_str(), racing.iter().map(|s| s.latency_ms(99.0)).collect())),
    );
    let crowd_label = format!("{crowd} users");
    figures.push(
        Figure::new("fifty-seats-wall", format!("{crowd} users over {SEATS} seats: wall time"), "ms")
            .with(Series::new(crowd_label.as_str(), crowds.iter().map(|c| ms(c.storm.wall)).collect())),
    );
    figures.push(
        Figure::new("fifty-seats-p99", format!("{crowd} users over {SEATS} seats: p99 latency"), "ms").with(
            Series::new(crowd_label.as_str(), crowds.iter().map(|c| c.storm.latency_ms(99.0)).collect()),
        ),
    );
    if let Some(rss) = crowds.iter().map(Crowd::peak_rss_mib).collect::<Option<Vec<f64>>>() {
        figures.push(
            Figure::new(
                "fifty-seats-rss",
                format!("Peak RSS after {crowd} users over {SEATS} seats (largest of {INSTANCES} instances)"),
                "MiB",
            )
            .with(Series::new(crowd_label.as_str(), rss)),
        );
    } else {
        println!("peak RSS: not available (no /proc), figure left out");
    }

    let (over_uncached, over_live) = map.ratios()?;
    let extra = json!({
        "clients": CLIENTS,
        "seat_map_requests_per_run": map_requests,
        "warmup_requests": WARMUP,
        "storm_instances": INSTANCES,
        "database_max_connections": DATABASE_CONNECTIONS,
        "racers": racers,
        "crowd": crowd,
        "seats": SEATS,
        "cached_over_uncached_median": over_uncached,
        "target_cached_over_uncached": TARGET_CACHED_OVER_UNCACHED,
        "cached_over_live_median": over_live,
        "target_cached_over_live": TARGET_CACHED_OVER_LIVE,
        "seat_map": map.json(),
        "one_seat": racing.iter().map(Storm::json).collect::<Vec<_>>(),
        "fifty_seats": crowds.iter().map(Crowd::json).collect::<Vec<_>>(),
    });
    let markdown = benchkit::write(SCENARIO, &about(map_requests, racers, crowd), &figures, extra)?;
    println!("\n{markdown}");
    map.print_ratios()?;
    Ok(())
}
