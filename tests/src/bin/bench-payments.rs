//! `make bench`: payments end to end, token -> hold -> pay, and how far the outbox lags
//! behind them (issue 18). Prints its figures and writes `docs/bench/payments.{md,json}` and
//! one SVG per figure.
//!
//! Three release-build instances (`target/release/concert-server`, next to this program) on
//! a fresh database, with room in the queue for every buyer of every run
//! (`QUEUE_MAX_ACTIVE`), `PATIENT_LOCKS`, `RUST_LOG=warn` and a payment-event stream of
//! their own. One warm-up run (checked, not counted), then `benchkit::runs()` runs (5; 3 in
//! quick mode, with the same sizes: 50 buyers is already small). Each run:
//!
//! - **Prepared, not timed**: a new date (its 50 seats at `PRICE` points) and 50 buyers
//!   signed up, each with an access token, an ACTIVE queue token and `CHARGE` points.
//! - **Timed**: all 50 at once, buyer i on instance i % 3: hold seat i + 1
//!   (`POST /api/v1/reservations`), then pay the hold (`POST /api/v1/payments` with
//!   `reservationId` and a fresh `Idempotency-Key`). Paid seats per second: 50 over the wall
//!   time from the first hold sent to the last payment answered. Latency, per buyer: from
//!   its hold sent to its payment's answer read, p50 and p99 (nearest rank: of 50 buyers, the
//!   p99 is the slowest).
//! - **Exact, or the benchmark stops**: 50 holds answered 201 and 50 payments answered 201
//!   (`COMPLETED`, of the buyer's reservation, `PRICE` points); in MySQL, 50 payments of the
//!   date's reservations by 50 users, all of `PRICE`, 50 CONFIRMED reservations, 50 SOLD
//!   seats, each buyer's balance `CHARGE - PRICE`, and exactly 50 `PaymentCompleted` rows in
//!   `outbox_events` for the date's reservations (an event if and only if a payment).
//! - **Outbox lag**: MySQL is polled every 100 ms (for up to 60 s) until those 50 rows all
//!   have a `sent_at`; then, per event, `sent_at - created_at` to the microsecond
//!   (`TIMESTAMPDIFF(MICROSECOND, created_at, sent_at)`), p50, p99 and max. `created_at` is
//!   the paying instance's clock inside the payment transaction (after its distributed
//!   locks, before its writes and commit); `sent_at` is the relaying instance's clock once
//!   its batch is `XADD`ed to the stream (and its after-publish steps ran), before the
//!   relay's commit. Both instances read one machine's clock. So the lag is the rest of the
//!   payment transaction, the wait for the next relay round of any of the three instances
//!   (each every `OUTBOX_RELAY_INTERVAL_MS`) and the publishing. A run starts only once
//!   every event of the previous one was sent.
//!
//! `OUTBOX_RELAY_INTERVAL_MS` and `OUTBOX_BATCH` are the product's defaults (200 ms, 100)
//! unless set in this program's environment; either way the instances are given them
//! explicitly and the report states them. The load generator runs in this process on the
//! same machine as the servers, MariaDB and Redis, so the figures are a lower bound of what
//! the servers can do. Needs `TEST_DATABASE_URL` and `TEST_REDIS_URL`.

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]
#![allow(clippy::cast_precision_loss, reason = "figures")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use e2e::benchkit::{self, Figure, Progress, Series};
use e2e::booking::{AsFan as _, Fan, admitted_users, call, env, open_schedule};
use e2e::stats::{ms, percentile};
use e2e::{Cluster, ClusterOptions, client, owned};
use futures::future::join_all;
use sea_orm::{ConnectionTrait as _, DatabaseConnection, DbBackend, QueryResult, Statement};
use serde_json::{Value, json};

const INSTANCES: usize = 3;
/// Buyers per run: one per seat of a date (seats 1..=50).
const BUYERS: usize = 50;
/// The date's seat price, in points.
const PRICE: i64 = 30_000;
/// What each buyer is charged before the clock starts: enough for one seat.
const CHARGE: i64 = 50_000;
/// The product's `OUTBOX_RELAY_INTERVAL_MS` and `OUTBOX_BATCH`, when this program's
/// environment does not set them.
const DEFAULT_RELAY_INTERVAL_MS: u64 = 200;
const DEFAULT_OUTBOX_BATCH: u64 = 100;
/// How long the relays may take to send a run's events, and how often MySQL is asked.
const OUTBOX_DEADLINE: Duration = Duration::from_secs(60);
const OUTBOX_POLL: Duration = Duration::from_millis(100);

/// One buyer's timed part: its hold and its payment.
#[derive(Debug)]
struct Bought {
    /// When the hold was sent.
    sent: Instant,
    /// When the payment's answer was read (or the hold's, when there was no payment).
    answered: Instant,
    hold: (u16, Value),
    /// `None` when the hold was refused.
    payment: Option<(u16, Value)>,
}

/// The figures of one exact run.
#[derive(Debug)]
struct Run {
    /// From the first hold sent to the last payment answered.
    wall: Duration,
    /// Per buyer, from its hold sent to its payment answered.
    latencies: Vec<Duration>,
    /// Per outbox event, `sent_at - created_at`.
    lags: Vec<Duration>,
}

impl Run {
    fn paid_per_second(&self) -> f64 {
        BUYERS as f64 / self.wall.as_secs_f64()
    }

    fn latency_ms(&self, p: f64) -> f64 {
        ms(percentile(&self.latencies, p))
    }

    fn lag_ms(&self, p: f64) -> f64 {
        ms(percentile(&self.lags, p))
    }

    /// One line for the terminal.
    fn line(&self) -> String {
        format!(
            "wall {:.0} ms, {:.1} paid seats/s, latency p50 {:.1} / p99 {:.1} ms, outbox lag p50 {:.1} / \
             p99 {:.1} / max {:.1} ms",
            ms(self.wall),
            self.paid_per_second(),
            self.latency_ms(50.0),
            self.latency_ms(99.0),
            self.lag_ms(50.0),
            self.lag_ms(99.0),
            self.lag_ms(100.0),
        )
    }

    /// One row of the report's table of every run.
    fn row(&self, name: &str) -> String {
        format!(
            "| {name} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            ms(self.wall),
            self.paid_per_second(),
            self.latency_ms(50.0),
            self.latency_ms(99.0),
            self.latency_ms(100.0),
            self.lag_ms(50.0),
            self.lag_ms(99.0),
            self.lag_ms(100.0),
        )
    }

    fn json(&self) -> Value {
        json!({
            "wallMs": ms(self.wall),
            "paidPerSecond": self.paid_per_second(),
            "latencyMs": {
                "p50": self.latency_ms(50.0),
                "p99": self.latency_ms(99.0),
                "max": self.latency_ms(100.0),
            },
            "outboxLagMs": {
                "p50": self.lag_ms(50.0),
                "p99": self.lag_ms(99.0),
                "max": self.lag_ms(100.0),
            },
        })
    }
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let runs = benchkit::runs();
    let relay_interval = setting("OUTBOX_RELAY_INTERVAL_MS", DEFAULT_RELAY_INTERVAL_MS)?;
    let outbox_batch = setting("OUTBOX_BATCH", DEFAULT_OUTBOX_BATCH)?;
    let (relay_text, batch_text) = (relay_interval.to_string(), outbox_batch.to_string());
    // A stream of its own, so that the shared Redis's default stream is left alone.
    let stream = format!("bench:{}:payments", uuid::Uuid::new_v4().simple());
    // Every buyer of every run, the warm-up's too, fits among the admitted at once, even if
    // no payment freed its place.
    let mut env = env(BUYERS * (runs + 1));
    env.extend(owned(e2e::PATIENT_LOCKS));
    env.extend(owned(&[
        ("RUST_LOG", "warn"),
        ("OUTBOX_RELAY_INTERVAL_MS", relay_text.as_str()),
        ("OUTBOX_BATCH", batch_text.as_str()),
        ("PAYMENT_EVENTS_STREAM", stream.as_str()),
    ]));
    println!(
        "payments: {INSTANCES} instances, {BUYERS} buyers per run, 1 warm-up + {runs} runs, outbox relay \
         every {relay_interval} ms (batch {outbox_batch})"
    );
    let cluster =
        Cluster::start_with(INSTANCES, &ClusterOptions { env, ..ClusterOptions::default() }).await?;
    let http = client();
    let db = sea_orm::Database::connect(cluster.direct_database_url())
        .await
        .context("connect to the benchmark's database")?;

    let progress = Progress::new("payments: runs", u64::try_from(runs + 1)?);
    let warm_up = run(&http, &cluster, &db).await.context("the warm-up run was not exact")?;
    progress.step(1);
    println!("  warm-up (not counted): {}", warm_up.line());
    let mut measured = Vec::with_capacity(runs);
    for number in 1..=runs {
        let done = run(&http, &cluster, &db).await.with_context(|| format!("run {number} was not exact"))?;
        progress.step(1);
        println!("  run {number}: {}", done.line());
        measured.push(done);
    }
    let _ = db.close().await;
    cluster.shut_down().await;

    let label = format!("{INSTANCES} instances, relay every {relay_interval} ms");
    let paid = series(&label, &measured, Run::paid_per_second);
    let latency_p99 = series(&label, &measured, |r| r.latency_ms(99.0));
    let latency_p50 = series(&label, &measured, |r| r.latency_ms(50.0));
    let lag_p99 = series(&label, &measured, |r| r.lag_ms(99.0));
    let lag_p50 = series(&label, &measured, |r| r.lag_ms(50.0));
    let figures = [
        Figure::new("paid-per-second", format!("Paid seats per second, {BUYERS} buyers"), "seats/s")
            .with(paid),
        Figure::new("latency-p99", "Hold sent to payment answered, p99", "ms").with(latency_p99),
        Figure::new("latency-p50", "Hold sent to payment answered, p50", "ms").with(latency_p50),
        Figure::new("outbox-lag-p99", "Outbox lag, sent_at - created_at, p99", "ms").with(lag_p99),
        Figure::new("outbox-lag-p50", "Outbox lag, sent_at - created_at, p50", "ms").with(lag_p50),
    ];
    let about = format!(
        "Payments end to end (`tests/src/bin/bench-payments.rs`): per run, {BUYERS} buyers prepared before \
         the clock starts (signed up, an ACTIVE queue token, {CHARGE} points each) all at once hold one seat \
         each of a fresh date ({BUYERS} seats at {PRICE} points; `POST /api/v1/reservations`) and pay it \
         (`POST /api/v1/payments` with an `Idempotency-Key`), buyer i on instance i mod {INSTANCES}. \
         {INSTANCES} release-build instances on one machine, which MariaDB, Redis and the load generator \
         (this process) share: the figures are a lower bound. Paid seats per second: {BUYERS} over the wall \
         time from the first hold sent to the last payment answered. Latency: per buyer, from its hold sent \
         to its payment's answer read. Percentiles are nearest rank: of {BUYERS} samples, a run's p99 is its \
         largest, for the latency and for the lag. Outbox lag: per event, \
         `outbox_events.sent_at - created_at`, read from MySQL once the relays had sent all {BUYERS} \
         events of the run (polled every 100 ms): `created_at` is taken inside the payment \
         transaction before its writes and commit, `sent_at` by the relaying instance once its batch is on \
         the Redis stream, before its commit; so the lag is the rest of the payment transaction, the wait \
         for the next relay round of any of the {INSTANCES} instances (`OUTBOX_RELAY_INTERVAL_MS` = \
         {relay_interval} ms on each, `OUTBOX_BATCH` = {outbox_batch}) and the publishing. Every run, and a \
         first uncounted warm-up run, was exact or the benchmark stopped: {BUYERS} holds and {BUYERS} \
         payments answered 201; in MySQL {BUYERS} payments and {BUYERS} SOLD seats for the date, each \
         buyer's balance {CHARGE} - {PRICE}, one outbox event per payment. Settings: the product's \
         defaults except the harness's (the per-client rate limits off, as in every harness run), \
         `POINT_LOCK_WAIT_MS=60000`, `LOCK_MAX_HOLD_MS=120000` and `RUST_LOG=warn`."
    );
    let mut markdown = benchkit::write(
        "payments",
        &about,
        &figures,
        json!({
            "instances": INSTANCES,
            "buyers": BUYERS,
            "seatPrice": PRICE,
            "charged": CHARGE,
            "outboxRelayIntervalMs": relay_interval,
            "outboxBatch": outbox_batch,
            "warmUp": warm_up.json(),
            "runs": measured.iter().map(Run::json).collect::<Vec<_>>(),
        }),
    )?;
    markdown.push_str(
        "| run | wall (ms) | paid seats/s | latency p50 (ms) | p99 | max | outbox lag p50 (ms) | p99 \
         | max |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    markdown.push_str(&warm_up.row("warm-up (not counted)"));
    for (i, done) in measured.iter().enumerate() {
        markdown.push_str(&done.row(&(i + 1).to_string()));
    }
    let path = format!("{}/payments.md", benchkit::DIR);
    std::fs::write(&path, &markdown).with_context(|| format!("write {path}"))?;
    println!("{markdown}");
    Ok(())
}

/// A setting of this program's environment, passed on to the instances, or the product's
/// default.
fn setting(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(value) => value.trim().parse().with_context(|| format!("{name}={value} is not a number")),
        Err(_) => Ok(default),
    }
}

/// One series of a figure: `value` of every run.
fn series(label: &str, runs: &[Run], value: impl Fn(&Run) -> f64) -> Series {
    Series::new(label, runs.iter().map(value).collect())
}

/// One run: a fresh date and fresh buyers (not timed), the timed burst, the checks, and
/// the outbox's lag.
async fn run(http: &awc::Client, cluster: &Cluster, db: &DatabaseConnection) -> anyhow::Result<Run> {
    let bases: Vec<&str> = cluster.instances.iter().map(|i| i.base_url.as_str()).collect();
    let schedule = open_schedule(http, cluster.url(0), PRICE).await?;
    // Buyer i signed up and queued on instance i % 3.
    let buyers = admitted_users(http, &bases, BUYERS).await?;
    for charged in
        join_all(buyers.iter().enumerate().map(|(i, (fan, _))| charge(http, cluster.url(i), fan))).await
    {
        charged?;
    }

    let bought = join_all(
        buyers
            .iter()
            .enumerate()
            .map(|(i, (fan, token))| buy(http, cluster.url(i), (fan, token.as_str()), &schedule, i + 1)),
    )
    .await
    .into_iter()
    .collect::<anyhow::Result<Vec<_>>>()?;
    let first_sent = bought.iter().map(|b| b.sent).min().context("no buyer")?;
    let last_answered = bought.iter().map(|b| b.answered).max().context("no buyer")?;

    check_answers(&bought)?;
    let date = hex(&schedule)?;
    check_database(db, &date, &buyers).await?;
    let lags = outbox_lags(db, &date).await?;
    Ok(Run {
        wall: last_answered.duration_since(first_sent),
        latencies: bought.iter().map(|b| b.answered.duration_since(b.sent)).collect(),
        lags,
    })
}

/// `CHARGE` points for `fan`, on `base`.
async fn charge(http: &awc::Client, base: &str, fan: &Fan) -> anyhow::Result<()> {
    let (status, body) = call(
        http.post(format!("{base}/api/v1/users/{}/points/charge", fan.id)).bearer(fan),
        Some(json!({"amount": CHARGE})),
    )
    .await?;
    anyhow::ensure!(status == 200 && body["balance"] == CHARGE, "charge of {}: {status} {body}", fan.id);
    Ok(())
}

/// One buyer's timed part on `base`: hold `seat`, then pay the hold with a key of its own.
async fn buy(
    http: &awc::Client,
    base: &str,
    (fan, token): (&Fan, &str),
    schedule: &str,
    seat: usize,
) -> anyhow::Result<Bought> {
    let key = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let sent = Instant::now();
    let hold = call(
        http.post(format!("{base}/api/v1/reservations")).bearer(fan).queue(token),
        Some(json!({"scheduleId": schedule, "seatNumber": seat})),
    )
    .await
    .with_context(|| format!("the hold of seat {seat}"))?;
    let payment = match hold.1["id"].as_str() {
        Some(reservation) if hold.0 == 201 => Some(
            call(
                http.post(format!("{base}/api/v1/payments"))
                    .bearer(fan)
                    .queue(token)
                    .insert_header(("Idempotency-Key", key)),
                Some(json!({"reservationId": reservation})),
            )
            .await
            .with_context(|| format!("the payment of seat {seat}"))?,
        ),
        _ => None,
    };
    Ok(Bought { sent, answered: Instant::now(), hold, payment })
}

/// Every hold and every payment answered 201, each payment `COMPLETED`, of its buyer's
/// reservation, for `PRICE`.
fn check_answers(bought: &[Bought]) -> anyhow::Result<()> {
    for (i, b) in bought.iter().enumerate() {
        let seat = i + 1;
        let (status, hold) = &b.hold;
        anyhow::ensure!(*status == 201, "the hold of seat {seat} answered {status}: {hold}");
        let reservation = hold["id"].as_str().context("a reservation id")?;
        let Some((status, paid)) = &b.payment else {
            anyhow::bail!("seat {seat} was held but not paid");
        };
        anyhow::ensure!(*status == 201, "the payment of seat {seat} answered {status}: {paid}");
        anyhow::ensure!(
            paid["status"] == "COMPLETED" && paid["reservationId"] == reservation && paid["amount"] == PRICE,
            "the payment of seat {seat} (reservation {reservation}, {PRICE} points) answered {paid}"
        );
    }
    Ok(())
}

/// MySQL after a run: 50 payments of the date, by 50 users, each of `PRICE`; 50 CONFIRMED
/// reservations; 50 SOLD seats; every buyer's balance `CHARGE - PRICE`.
async fn check_database(db: &DatabaseConnection, date: &str, buyers: &[(Fan, String)]) -> anyhow::Result<()> {
    let expected = i64::try_from(BUYERS)?;
    let row = one(
        db,
        format!(
            "SELECT COUNT(*), COUNT(DISTINCT p.user_id), COUNT(CASE WHEN p.amount = {PRICE} THEN 1 END) \
             FROM payments p JOIN reservations r ON r.id = p.reservation_id \
             WHERE r.schedule_id = UNHEX('{date}')"
        ),
    )
    .await?;
    let (payments, payers, priced) =
        (row.try_get_by_index::<i64>(0)?, row.try_get_by_index::<i64>(1)?, row.try_get_by_index::<i64>(2)?);
    anyhow::ensure!(
        (payments, payers, priced) == (expected, expected, expected),
        "MySQL holds {payments} payments of the date by {payers} users, {priced} of {PRICE} points; \
         expected {BUYERS} by {BUYERS}, all of {PRICE}"
    );
    let confirmed = one(
        db,
        format!(
            "SELECT COUNT(*) FROM reservations WHERE schedule_id = UNHEX('{date}') AND status = 'CONFIRMED'"
        ),
    )
    .await?
    .try_get_by_index::<i64>(0)?;
    anyhow::ensure!(
        confirmed == expected,
        "{confirmed} CONFIRMED reservations of the date, expected {BUYERS}"
    );
    let sold = one(
        db,
        format!("SELECT COUNT(*) FROM seats WHERE schedule_id = UNHEX('{date}') AND status = 'SOLD'"),
    )
    .await?
    .try_get_by_index::<i64>(0)?;
    anyhow::ensure!(sold == expected, "{sold} SOLD seats of the date, expected {BUYERS}");

    let ids = buyers.iter().map(|(fan, _)| hex(&fan.id)).collect::<anyhow::Result<Vec<_>>>()?;
    let list = ids.iter().map(|id| format!("UNHEX('{id}')")).collect::<Vec<_>>().join(", ");
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::MySql,
            format!(
                "SELECT CAST(LOWER(HEX(user_id)) AS CHAR), balance FROM point_accounts \
                 WHERE user_id IN ({list})"
            ),
        ))
        .await?;
    let mut balances = BTreeMap::new();
    for row in &rows {
        balances.insert(row.try_get_by_index::<String>(0)?, row.try_get_by_index::<i64>(1)?);
    }
    for id in &ids {
        let balance = balances.get(id).copied();
        anyhow::ensure!(
            balance == Some(CHARGE - PRICE),
            "buyer {id} has a balance of {balance:?}, expected {}",
            CHARGE - PRICE
        );
    }
    Ok(())
}

/// Waits until the relays have sent every outbox event of the date's reservations (exactly
/// one per payment), then reads each event's lag, `sent_at - created_at`.
async fn outbox_lags(db: &DatabaseConnection, date: &str) -> anyhow::Result<Vec<Duration>> {
    let expected = i64::try_from(BUYERS)?;
    let of_the_date = format!(
        "FROM outbox_events o JOIN reservations r ON r.id = o.aggregate_id \
         WHERE r.schedule_id = UNHEX('{date}') AND o.event_type = 'PaymentCompleted'"
    );
    let deadline = Instant::now() + OUTBOX_DEADLINE;
    loop {
        let row = one(db, format!("SELECT COUNT(*), COUNT(o.sent_at) {of_the_date}")).await?;
        let (events, sent) = (row.try_get_by_index::<i64>(0)?, row.try_get_by_index::<i64>(1)?);
        // Every payment committed before it was answered, and its event with it.
        anyhow::ensure!(events == expected, "{events} outbox events for {BUYERS} payments");
        if sent == expected {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {sent} of {events} outbox events sent after {OUTBOX_DEADLINE:?}"
        );
        tokio::time::sleep(OUTBOX_POLL).await;
    }
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::MySql,
            format!(
                "SELECT CAST(TIMESTAMPDIFF(MICROSECOND, o.created_at, o.sent_at) AS SIGNED) {of_the_date}"
            ),
        ))
        .await?;
    anyhow::ensure!(rows.len() == BUYERS, "{} outbox events read back, expected {BUYERS}", rows.len());
    rows.iter()
        .map(|row| -> anyhow::Result<Duration> {
            let micros = row.try_get_by_index::<i64>(0)?;
            // Both times come from one machine's clock: never negative unless it stepped back.
            Ok(Duration::from_micros(u64::try_from(micros.max(0))?))
        })
        .collect()
}

/// The one row `sql` selects.
async fn one(db: &DatabaseConnection, sql: String) -> anyhow::Result<QueryResult> {
    db.query_one_raw(Statement::from_string(DbBackend::MySql, sql)).await?.context("no row")
}

/// A UUID as the 32 hex digits `UNHEX` takes: parsed, so that only hex reaches a statement.
fn hex(id: &str) -> anyhow::Result<String> {
    Ok(uuid::Uuid::parse_str(id).with_context(|| format!("not a UUID: {id}"))?.simple().to_string())
}
