//! `make bench`: booking. Prints its figures and writes `docs/report/booking.md`.
//!
//! 1. The seat map, cached and uncached (`CACHE_ENABLED=false`), against `/health/live` of
//!    the cached server in the same run (on its operations listener): requests/s, p50, p99
//!    and MySQL `SELECT`s per 1,000 requests (the server's `Com_select` delta), at 64
//!    concurrent clients.
//! 2. 500 racers for one seat, three instances: wall time, outcomes, latencies, 5xx.
//! 3. 10,000 users over 50 seats, three instances: wall time, outcomes, latencies, 5xx,
//!    each instance's peak RSS.
//!
//! `BENCH_SEAT_MAP_ONLY=1` runs part 1 alone and writes nothing (for trying a change to the
//! read path). Release-build servers (`target/release/concert-server`, next to this program); the
//! load generator runs in this process on the same machine, so the figures are a lower
//! bound of what the servers can do. Needs `TEST_DATABASE_URL` and `TEST_REDIS_URL`.

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "figures"
)]

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use e2e::booking::{AsFan as _, Fan, admitted_users, env, open_schedule};
use e2e::stats::{ms, percentile};
use e2e::{Cluster, ClusterOptions, client};
use serde_json::json;

const REPORT: &str = "docs/report/booking.md";
const CLIENTS: usize = 64;
const MAP_REQUESTS: usize = 20_000;

/// The MySQL server's `Com_select` counter (every SELECT it ran, all sessions).
fn com_select() -> anyhow::Result<u64> {
    let url = std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
    let rest = url.trim_start_matches("mysql://");
    let (user, host) = rest.split_once('@').unwrap_or(("root", rest));
    let (user, password) = user.split_once(':').map_or((user, None), |(u, p)| (u, Some(p)));
    let host = host.split('/').next().unwrap_or(host);
    let (host, port) = host.split_once(':').unwrap_or((host, "3306"));
    for client in ["mariadb", "mysql"] {
        let mut command = std::process::Command::new(client);
        command.args(["-N", "-B", "-h", host, "-P", port, "-u", user]);
        if let Some(password) = password {
            command.arg(format!("-p{password}"));
        }
        let Ok(output) = command.args(["-e", "SHOW GLOBAL STATUS LIKE 'Com_select'"]).output() else {
            continue;
        };
        if output.status.success() {
            let text = String::from_utf8_lossy(&output.stdout);
            return text.split_whitespace().nth(1).and_then(|n| n.parse().ok()).context("Com_select");
        }
    }
    anyhow::bail!("neither mariadb nor mysql client could read Com_select")
}

struct Rate {
    per_second: f64,
    p50: Duration,
    p99: Duration,
    selects_per_1000: f64,
    failures: usize,
}

/// `n` GETs of `url` over `CLIENTS` clients, after a warm-up, each with `user`'s access
/// token and queue token (which `/health/live` ignores).
async fn hammer(
    http: &awc::Client,
    url: &str,
    (user, token): (&Fan, &str),
    n: usize,
) -> anyhow::Result<Rate> {
    let get = || http.get(url).bearer(user).queue(token);
    for _ in 0..200 {
        let mut response = get().send().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(response.status().is_success(), "warm-up: {}", response.status());
        let _ = response.body().await;
    }
    let selects = com_select()?;
    let started = Instant::now();
    let per_client = n / CLIENTS;
    let runs = futures::future::join_all((0..CLIENTS).map(|_| async move {
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
        }
        (latencies, failures)
    }))
    .await;
    let elapsed = started.elapsed();
    let selects = com_select()?.saturating_sub(selects);
    let total = per_client * CLIENTS;
    let failures = runs.iter().map(|(_, f)| f).sum();
    let latencies: Vec<Duration> = runs.into_iter().flat_map(|(l, _)| l).collect();
    Ok(Rate {
        per_second: total as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
        selects_per_1000: selects as f64 * 1_000.0 / total as f64,
        failures,
    })
}

struct Storm {
    wall: Duration,
    created: usize,
    conflicts: usize,
    server_errors: usize,
    other: usize,
    latencies: Vec<Duration>,
}

/// Every user of `users` sends one hold at once, round-robin over the instances; user i
/// wants seat `seat_of(i)`.
async fn storm(
    http: &awc::Client,
    cluster: &Cluster,
    users: &[(Fan, String)],
    schedule: &str,
    seat_of: impl Fn(usize) -> usize,
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
            (status, sent.elapsed())
        }
    }))
    .await;
    let wall = started.elapsed();
    let count = |f: &dyn Fn(u16) -> bool| answers.iter().filter(|(s, _)| f(*s)).count();
    Storm {
        wall,
        created: count(&|s| s == 201),
        conflicts: count(&|s| s == 409),
        server_errors: count(&|s| s >= 500),
        other: count(&|s| s != 201 && s != 409 && s < 500),
        latencies: answers.iter().map(|(_, l)| *l).collect(),
    }
}

fn storm_row(out: &mut String, name: &str, s: &Storm) -> std::fmt::Result {
    println!(
        "  {name}: wall {:.0} ms, 201 x{}, 409 x{}, 5xx x{}, other x{}, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(s.wall),
        s.created,
        s.conflicts,
        s.server_errors,
        s.other,
        ms(percentile(&s.latencies, 50.0)),
        ms(percentile(&s.latencies, 99.0)),
        ms(percentile(&s.latencies, 100.0)),
    );
    writeln!(
        out,
        "| {name} | {:.0} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
        ms(s.wall),
        s.created,
        s.conflicts,
        s.server_errors,
        s.other,
        ms(percentile(&s.latencies, 50.0)),
        ms(percentile(&s.latencies, 90.0)),
        ms(percentile(&s.latencies, 99.0)),
        ms(percentile(&s.latencies, 100.0)),
    )
}

async fn seat_map_rates(http: &awc::Client, out: &mut String) -> anyhow::Result<()> {
    println!("1. seat map: cached, uncached, /health/live ({CLIENTS} clients, {MAP_REQUESTS} requests each)");
    let mut rows = Vec::new();
    for cached in [true, false] {
        let mut env = env(100);
        env.push(("CACHE_ENABLED".into(), cached.to_string()));
        env.push(("RUST_LOG".into(), "warn".into()));
        let cluster = Cluster::start_with(1, &ClusterOptions { env, ..ClusterOptions::default() }).await?;
        let base = cluster.url(0).to_owned();
        let ops = cluster.ops_url(0).to_owned();
        let users = admitted_users(http, &[&base], 1).await?;
        let schedule = open_schedule(http, &base, 50_000).await?;
        let caller = (&users[0].0, users[0].1.as_str());
        if cached {
            let live = hammer(http, &format!("{ops}/health/live"), caller, MAP_REQUESTS).await?;
            rows.push(("`/health/live` (same server as cached)", live));
        }
        let map =
            hammer(http, &format!("{base}/api/v1/schedules/{schedule}/seats"), caller, MAP_REQUESTS).await?;
        rows.push((
            if cached { "seat map, cached" } else { "seat map, uncached (`CACHE_ENABLED=false`)" },
            map,
        ));
        cluster.shut_down().await;
    }
    writeln!(out, "## Seat map: cached, uncached, and `/health/live`\n")?;
    writeln!(
        out,
        "{CLIENTS} concurrent clients, {MAP_REQUESTS} requests per row after 200 warm-up requests; one release-build \
         instance per row pair; the seat map is behind the access token and the queue gate (one Redis script per \
         request) in both modes; `/health/live` is served on the operations listener.\n"
    )?;
    writeln!(
        out,
        "| route | req/s | p50 (ms) | p99 (ms) | MySQL SELECTs per 1,000 requests | failed |\n|---|---:|---:|---:|---:|---:|"
    )?;
    for (name, r) in &rows {
        println!(
            "  {name}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {:.1} SELECTs per 1,000, {} failed",
            r.per_second,
            ms(r.p50),
            ms(r.p99),
            r.selects_per_1000,
            r.failures
        );
        writeln!(
            out,
            "| {name} | {:.0} | {:.2} | {:.2} | {:.1} | {} |",
            r.per_second,
            ms(r.p50),
            ms(r.p99),
            r.selects_per_1000,
            r.failures
        )?;
    }
    let (live, cached, uncached) = (&rows[0].1, &rows[1].1, &rows[2].1);
    let speedup = cached.per_second / uncached.per_second;
    let of_live = cached.per_second / live.per_second;
    println!(
        "  cached / uncached: {speedup:.1}x (target >= 10x); cached / health: {of_live:.2} (target >= 0.25)"
    );
    writeln!(
        out,
        "\nCached / uncached: **{speedup:.1}x** (target at least 10x). Cached / `/health/live`: **{of_live:.2}** \
         (target at least 0.25). The SELECT counts include the background jobs' own (the hold expiry job runs \
         every 2 s, the admission step is on Redis).\n"
    )?;
    Ok(())
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let http = client();
    let mut out = String::new();
    writeln!(out, "# Booking\n")?;
    writeln!(out, "Generated by `make bench` (`tests/src/bin/bench-booking.rs`); do not edit by hand.\n")?;
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(0);
    writeln!(
        out,
        "- commit `{commit}`, {cores} cores; the load generator shares them with the servers, MariaDB and Redis\n"
    )?;

    seat_map_rates(&http, &mut out).await?;
    if std::env::var_os("BENCH_SEAT_MAP_ONLY").is_some() {
        println!("BENCH_SEAT_MAP_ONLY: storms skipped, report not written");
        return Ok(());
    }

    println!("2-3. storms on three instances");
    let mut env = env(12_000);
    env.push(("RUST_LOG".into(), "warn".into()));
    env.push(("DATABASE_MAX_CONNECTIONS".into(), "30".into()));
    let cluster = Cluster::start_with(3, &ClusterOptions { env, ..ClusterOptions::default() }).await?;
    let bases: Vec<&str> = cluster.instances.iter().map(|i| i.base_url.as_str()).collect();
    let started = Instant::now();
    let users = admitted_users(&http, &bases, 10_500).await?;
    println!("  10,500 admitted users ready in {:.1} s", started.elapsed().as_secs_f64());
    writeln!(out, "## Seat storms, three instances\n")?;
    writeln!(
        out,
        "Every user holds an access token and an ACTIVE queue token and asks for one seat; all requests are sent \
         at once, round-robin over the instances (the client keeps at most 1,000 connections open). Wall time is \
         from the first request sent to the last answer.\n"
    )?;
    writeln!(
        out,
        "| storm | wall (ms) | 201 | 409 | 5xx | other | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    let one_seat = open_schedule(&http, bases[0], 70_000).await?;
    let racers = storm(&http, &cluster, &users[..500], &one_seat, |_| 25).await;
    storm_row(&mut out, "500 racers, one seat", &racers)?;
    let fifty = open_schedule(&http, bases[1], 70_000).await?;
    let crowd = storm(&http, &cluster, &users[500..], &fifty, |i| i % 50 + 1).await;
    storm_row(&mut out, "10,000 users, 50 seats", &crowd)?;
    writeln!(
        out,
        "\nTargets: 500 racers -> 1 winner, 499 409, 0 5xx, wall under 350 ms; 10,000 users -> exactly 50 winners, 0 5xx.\n"
    )?;
    writeln!(out, "Peak resident memory per instance (VmHWM), after both storms:\n")?;
    for (i, instance) in cluster.instances.iter().enumerate() {
        let rss = instance
            .peak_rss_kib()
            .map_or_else(|| "n/a".to_owned(), |kib| format!("{:.1} MiB", kib as f64 / 1024.0));
        println!("  instance {i}: peak RSS {rss}");
        writeln!(out, "- instance {i}: {rss}")?;
    }
    cluster.shut_down().await;
    std::fs::write(REPORT, &out).with_context(|| format!("write {REPORT} (run from the repository root)"))?;
    println!("\nwritten to {REPORT}");
    Ok(())
}
