//! `make bench`: charges under contention, lock waiting by spinning versus by pub/sub.
//!
//! For each waiting mode and each storm size, starts three release-build instances on a
//! fresh database, fires the storm at **one** account (the hottest possible lock key),
//! checks that every charge was applied exactly once, and records client-side latency,
//! throughput, and how many lock scripts Redis ran per charge (`INFO commandstats`). The
//! figures are printed and written to `docs/report/points-lock-wait.md`.
//!
//! Needs the same services as the tests (`TEST_DATABASE_URL`, `TEST_REDIS_URL`) and a
//! Redis used by nothing else while it runs (it counts that Redis's commands).

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use e2e::booking::AsFan as _;
use e2e::stats::{ms, percentile};
use e2e::{Cluster, ClusterOptions, client};
use futures::future::join_all;

const INSTANCES: usize = 3;
const AMOUNT: i64 = 100;
const WARMUP: usize = 30;
const STORMS: &[usize] = &[300, 1_000];
const MODES: &[&str] = &["spin", "pubsub"];
const REPORT: &str = "docs/report/points-lock-wait.md";

#[derive(Debug)]
struct Run {
    mode: &'static str,
    storm: usize,
    wall: Duration,
    latencies: Vec<Duration>,
    scripts: u64,
}

impl Run {
    fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let redis_url = test_support::redis_url().await;
    let mut runs = Vec::new();
    for &storm in STORMS {
        for &mode in MODES {
            let run =
                measure(mode, storm, &redis_url).await.with_context(|| format!("{mode}, {storm} charges"))?;
            println!(
                "{mode:>6} {storm:>5} charges: {:>7.0} charges/s, p50 {:>6.1} ms, p99 {:>6.1} ms, {:.1} lock scripts/charge",
                storm as f64 / run.wall.as_secs_f64(),
                ms(run.percentile(50.0)),
                ms(run.percentile(99.0)),
                run.scripts as f64 / storm as f64,
            );
            runs.push(run);
        }
    }
    let report = render(&runs, &redis_url).await?;
    std::fs::write(REPORT, &report)
        .with_context(|| format!("write {REPORT} (run from the repository root)"))?;
    println!("\nwritten to {REPORT}");
    Ok(())
}

async fn measure(mode: &'static str, storm: usize, redis_url: &str) -> anyhow::Result<Run> {
    let options = ClusterOptions {
        redis_url: None,
        env: vec![
            ("LOCK_WAIT_STRATEGY".into(), mode.into()),
            // Long enough that no charge gives up: this measures waiting, not refusing.
            ("POINT_LOCK_WAIT_MS".into(), "60000".into()),
            ("RUST_LOG".into(), "warn".into()),
        ],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start_with(INSTANCES, &options).await?;
    let http = client();
    let fan = e2e::booking::sign_up(&http, cluster.url(0), "bench").await.context("create user")?;
    let user = fan.id.as_str();
    let charge = |i: usize| {
        let request = http.post(format!("{}/api/v1/users/{user}/points/charge", cluster.url(i))).bearer(&fan);
        async move {
            let started = Instant::now();
            let response = request.send_json(&serde_json::json!({"amount": AMOUNT})).await;
            let status = response.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
            (status, started.elapsed())
        }
    };
    for i in 0..WARMUP {
        anyhow::ensure!(charge(i).await.0 == 200, "warm-up charge failed");
    }

    let scripts_before = lock_scripts(redis_url)?;
    let started = Instant::now();
    let answers = join_all((0..storm).map(charge)).await;
    let wall = started.elapsed();
    let scripts = lock_scripts(redis_url)? - scripts_before;

    let failed = answers.iter().filter(|(status, _)| *status != 200).count();
    anyhow::ensure!(failed == 0, "{failed} charges were not applied");
    let balance = http
        .get(format!("{}/api/v1/users/{user}/points", cluster.url(1)))
        .bearer(&fan)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("balance: {e}"))?
        .json::<serde_json::Value>()
        .await?["balance"]
        .as_i64()
        .context("balance")?;
    let expected = i64::try_from(WARMUP + storm)? * AMOUNT;
    anyhow::ensure!(
        balance == expected,
        "balance {balance}, expected {expected}: a charge was lost or doubled"
    );
    cluster.shut_down().await;
    Ok(Run {
        mode,
        storm,
        wall,
        latencies: answers.into_iter().map(|(_, latency)| latency).collect(),
        scripts,
    })
}

/// Script calls Redis has run so far (`EVALSHA` + `EVAL`): lock attempts, releases and
/// renewals. The cache and queue run none yet.
fn lock_scripts(redis_url: &str) -> anyhow::Result<u64> {
    let info = redis_command(redis_url, "INFO commandstats")?;
    Ok(info
        .lines()
        .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
        .filter_map(|line| line.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum())
}

/// One inline command over a plain TCP connection, answered with a bulk string.
fn redis_command(redis_url: &str, command: &str) -> anyhow::Result<String> {
    let address = redis_url.trim_start_matches("redis://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(address).with_context(|| format!("connect {address}"))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.read_line(&mut header)?;
    let length: usize = header.trim().strip_prefix('$').context("a bulk reply")?.parse()?;
    let mut body = vec![0_u8; length];
    reader.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

async fn render(runs: &[Run], redis_url: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(0);
    let redis_version = redis_command(redis_url, "INFO server")?
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:").map(str::to_owned))
        .unwrap_or_default();
    writeln!(out, "# Charges on one hot account: spin versus pub/sub lock waiting\n")?;
    writeln!(out, "Generated by `make bench` (`tests/src/bin/bench-points.rs`); do not edit by hand.\n")?;
    writeln!(
        out,
        "- commit `{commit}`, {cores} cores ({cpu}), Redis {redis_version}, MariaDB/MySQL from `TEST_DATABASE_URL`"
    )?;
    writeln!(
        out,
        "- {INSTANCES} release-build instances, one fresh database each run; every charge of {AMOUNT} points goes \
         to the same user, so all of them queue on `lock:point:{{userId}}`; requests are spread round-robin \
         and all sent at once after {WARMUP} sequential warm-up charges"
    )?;
    writeln!(
        out,
        "- every run is checked exact (all answers 200, balance = charges x {AMOUNT}) before its figures count"
    )?;
    writeln!(
        out,
        "- latency is client-side, from sending a request to its answer; lock scripts are Redis `EVALSHA`/`EVAL` calls (attempts, releases, renewals) per charge\n"
    )?;
    writeln!(
        out,
        "| mode | charges | wall (s) | charges/s | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) | lock scripts / charge |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for run in runs {
        writeln!(
            out,
            "| {} | {} | {:.2} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            run.mode,
            run.storm,
            run.wall.as_secs_f64(),
            run.storm as f64 / run.wall.as_secs_f64(),
            ms(run.percentile(50.0)),
            ms(run.percentile(95.0)),
            ms(run.percentile(99.0)),
            ms(run.percentile(100.0)),
            run.scripts as f64 / run.storm as f64,
        )?;
    }
    Ok(out)
}
