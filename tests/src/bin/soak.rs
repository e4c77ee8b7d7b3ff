//! `make soak`: the chaos soak. A mixed workload on three instances while a driver kills and
//! restarts them (SIGKILL, SIGTERM) and Redis at random moments; the invariants are checked
//! every few seconds during the soak, and once more at the end, when the faults are over and
//! every instance is up again.
//!
//! - Workload: [`VIRTUAL_USERS`] virtual users, each in a loop: sign up, charge points (with
//!   and without an `Idempotency-Key`), take a queue token and wait until it is ACTIVE, read
//!   the seat map, hold a free seat, then cancel the hold or pay for it (with and without a
//!   key). A keyed answer is sometimes asked for again, as a client that lost it would, and
//!   must come back the same. A request that gets no answer (its instance died) is sent again
//!   on another instance; one refused for the moment (429, 503, a payment in progress) after
//!   a pause. When the newest date is sold out, a fresh one is opened.
//! - Faults, one at a time, never on the last instance up, a lease and a few seconds apart:
//!   SIGKILL an instance and restart it; SIGTERM one and restart it; kill Redis and start it
//!   again (empty). The driver owns the processes and runs on a thread and runtime of its
//!   own, since a graceful stop blocks until it is done; the workers find the instances
//!   through a shared list of URLs that it keeps current (a restarted instance listens on
//!   another port).
//! - Invariants: in MySQL, each one statement (so one consistent snapshot, whatever commits
//!   meanwhile): every balance is the sum of its history; every SOLD seat has exactly one
//!   payment and every payment one USE row; no seat has two live holds. On the client: no
//!   idempotency key answered two ways; no 5xx but 503 with `Retry-After` (a request that
//!   got no answer from a killed instance is counted apart, not as a 5xx). At the end:
//!   every instance came back and is ready by itself.
//!
//! `SOAK_SECONDS` (default 600) bounds the workload; `SOAK_SEED` repeats a run's choices
//! (which fault, when, on which instance, what each user does; not the machine's timing).
//! Exits non-zero when an invariant failed, naming it with examples, and then keeps the
//! database for inspection (`make clean-test-dbs` drops it). Needs `TEST_DATABASE_URL` and
//! `redis-server` on `PATH` (`make soak` has both).

#![allow(clippy::print_stdout, reason = "the soak prints what it did and what held")]

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use awc::http::Method;
use awc::http::header::RETRY_AFTER;
use e2e::booking::{self, AsFan as _, Fan, open_schedule};
use e2e::{Cluster, ClusterOptions, PrivateRedis, client};
use sea_orm::{ConnectionTrait as _, DatabaseConnection, DbBackend, Statement};
use serde_json::{Value, json};

const INSTANCES: usize = 3;
const VIRTUAL_USERS: usize = 40;
/// Fewer queue slots than users: some wait in line, as on a sale day.
const QUEUE_SLOTS: usize = 30;
const PRICE: i64 = 1_000;
/// The product's lock lease (`LOCK_LEASE_MS`): a killed instance's locks outlive it this
/// long, so faults come at least this far apart for the others to get past them.
const LEASE: Duration = Duration::from_secs(10);
/// Time for the workload to get going before the first fault.
const FIRST_FAULT_AFTER: Duration = Duration::from_secs(10);
/// On top of [`LEASE`] between two faults, drawn at random.
const FAULT_GAP_MS: std::ops::RangeInclusive<u64> = 3_000..=12_000;
/// No fault starts this close to the end, so the last one is over before the workload stops.
const QUIET_END: Duration = Duration::from_secs(15);
/// A graceful stop takes about `SHUTDOWN_GRACE_SECONDS` (10 s); one that outlasts this hung.
const STOP_WITHIN: Duration = Duration::from_secs(60);
const RESTART_ATTEMPTS: usize = 2;
const CHECK_EVERY: Duration = Duration::from_secs(5);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How long a request is sent again while it gets no answer or a "not now": longer than a
/// dead instance's lease plus a restart.
const CALL_PATIENCE: Duration = Duration::from_secs(60);
const ADMISSION_PATIENCE: Duration = Duration::from_secs(90);
/// How long every instance has to answer ready after the last fault (a breaker's probe
/// comes within seconds).
const READY_WITHIN: Duration = Duration::from_secs(60);
/// A virtual user's pause between steps: real clients think, and two cores are shared
/// with three servers, MariaDB and Redis.
const THINK_MS: std::ops::RangeInclusive<u64> = 100..=500;
const CANCEL_SHARE: f64 = 0.25;
const KEYED_PAYMENT_SHARE: f64 = 0.6;
const HOLD_ATTEMPTS: usize = 4;
const PAY_ATTEMPTS: usize = 6;
const MAX_EXAMPLES: usize = 5;
const LOG_TAIL: usize = 30;
const BODY_LIMIT: usize = 1 << 20;

/// The soak's servers' settings beyond the booking tests' (`booking::env`) and
/// [`e2e::PATIENT_LOCKS`] (a charge or payment waits out a dead instance's lease instead of
/// giving up).
const SOAK_ENV: &[(&str, &str)] = &[
    // Holds and queue slots whose users went away (their answer lost in a crash) come back
    // within the soak, not after the product's 5 and 10 minutes.
    ("RESERVATION_HOLD_SECONDS", "60"),
    ("QUEUE_ACTIVE_SECONDS", "120"),
    // Every instance's output is kept in memory for the whole soak: warnings and errors only.
    ("RUST_LOG", "warn"),
];

const BALANCES: &str = "every balance is the sum of its history (and its newest balanceAfter)";
const SALES: &str = "every SOLD seat has exactly one payment, of its CONFIRMED reservation";
const USE_ROWS: &str = "every payment has exactly one USE row";
const HOLDS: &str = "no seat has two live holds";
const KEYS: &str = "no idempotency key answered two ways";
const ERRORS: &str = "no 5xx but 503 with Retry-After";
const RECOVERY: &str = "every instance came back and is ready after the faults";
const INVARIANTS: [&str; 7] = [BALANCES, SALES, USE_ROWS, HOLDS, KEYS, ERRORS, RECOVERY];

/// Users whose balance is not the sum of their history (`USE` subtracts, `CHARGE` and
/// `REFUND` add), whose history has not one row per change of the account (`version`,
/// which each row stores as `seq`), or whose newest row's `balance_after` is not the balance.
const BALANCES_SQL: &str = "SELECT COUNT(*) OVER (), CAST(CONCAT_WS(' ', 'user', HEX(u.id), \
       'balance', COALESCE(a.balance, 0), 'version', COALESCE(a.version, 0), \
       'history sum', COALESCE(h.total, 0), 'rows', COALESCE(h.n, 0), \
       'newest balanceAfter', COALESCE(newest.balance_after, '-')) AS CHAR) \
     FROM users u \
     LEFT JOIN point_accounts a ON a.user_id = u.id \
     LEFT JOIN (SELECT user_id, \
                       CAST(SUM(CASE WHEN kind = 'USE' THEN -amount ELSE amount END) AS SIGNED) AS total, \
                       COUNT(*) AS n, MAX(seq) AS last_seq \
                FROM point_history GROUP BY user_id) h ON h.user_id = u.id \
     LEFT JOIN point_history newest ON newest.user_id = u.id AND newest.seq = h.last_seq \
     WHERE COALESCE(a.balance, 0) <> COALESCE(h.total, 0) \
        OR COALESCE(a.version, 0) <> COALESCE(h.n, 0) \
        OR COALESCE(a.version, 0) <> COALESCE(h.last_seq, 0) \
        OR (h.n IS NOT NULL AND NOT (newest.balance_after <=> COALESCE(a.balance, 0))) \
     LIMIT 5";

/// SOLD seats without exactly one payment among all their reservations' payments.
const SOLD_SEATS_SQL: &str = "SELECT COUNT(*) OVER (), CAST(CONCAT_WS(' ', 'seat', s.seat_number, \
       'of date', HEX(s.schedule_id), 'is SOLD with', COUNT(p.id), 'payments') AS CHAR) \
     FROM seats s \
     LEFT JOIN reservations r ON r.schedule_id = s.schedule_id AND r.seat_number = s.seat_number \
     LEFT JOIN payments p ON p.reservation_id = r.id \
     WHERE s.status = 'SOLD' \
     GROUP BY s.schedule_id, s.seat_number \
     HAVING COUNT(p.id) <> 1 \
     LIMIT 5";

/// Payments whose reservation is not CONFIRMED, or whose seat is not SOLD to it: half of
/// a payment.
const PAID_SEATS_SQL: &str = "SELECT COUNT(*) OVER (), CAST(CONCAT_WS(' ', 'payment', HEX(p.id), \
       'of reservation', HEX(p.reservation_id), 'which is', COALESCE(r.status, 'missing'), \
       'and its seat', COALESCE(s.status, 'missing'), \
       IF(s.reservation_id <=> p.reservation_id, 'naming it', 'naming another')) AS CHAR) \
     FROM payments p \
     LEFT JOIN reservations r ON r.id = p.reservation_id \
     LEFT JOIN seats s ON s.schedule_id = r.schedule_id AND s.seat_number = r.seat_number \
     WHERE NOT (r.status <=> 'CONFIRMED') OR NOT (s.status <=> 'SOLD') \
        OR NOT (s.reservation_id <=> p.reservation_id) \
     LIMIT 5";

/// Users whose payments and USE rows differ in number or in points. A USE row names no
/// payment, so they are matched per user: nothing else writes USE rows.
const USE_ROWS_SQL: &str = "SELECT COUNT(*) OVER (), CAST(CONCAT_WS(' ', 'user', HEX(u.id), \
       'has', COALESCE(p.n, 0), 'payments of', COALESCE(p.total, 0), 'points and', \
       COALESCE(h.n, 0), 'USE rows of', COALESCE(h.total, 0)) AS CHAR) \
     FROM users u \
     LEFT JOIN (SELECT user_id, COUNT(*) AS n, CAST(SUM(amount) AS SIGNED) AS total \
                FROM payments GROUP BY user_id) p ON p.user_id = u.id \
     LEFT JOIN (SELECT user_id, COUNT(*) AS n, CAST(SUM(amount) AS SIGNED) AS total \
                FROM point_history WHERE kind = 'USE' GROUP BY user_id) h ON h.user_id = u.id \
     WHERE COALESCE(p.n, 0) <> COALESCE(h.n, 0) OR COALESCE(p.total, 0) <> COALESCE(h.total, 0) \
     LIMIT 5";

/// Seats with more than one live claim: a hold that lasts (HELD, `held_until` ahead on the
/// database's clock, which the server's own SQL uses) or a sale (CONFIRMED). A run-out hold
/// is not live, whether or not the expiry job has reached it.
const TWO_HOLDS_SQL: &str = "SELECT COUNT(*) OVER (), CAST(CONCAT_WS(' ', 'seat', seat_number, \
       'of date', HEX(schedule_id), 'has', SUM(status = 'HELD'), 'live holds and', \
       SUM(status = 'CONFIRMED'), 'CONFIRMED reservations') AS CHAR) \
     FROM reservations \
     WHERE (status = 'HELD' AND held_until > UTC_TIMESTAMP(6)) OR status = 'CONFIRMED' \
     GROUP BY schedule_id, seat_number \
     HAVING COUNT(*) > 1 \
     LIMIT 5";

/// Live holds whose seat is not HELD for them: the seat could be taken by another.
const HOLD_SEATS_SQL: &str = "SELECT COUNT(*) OVER (), CAST(CONCAT_WS(' ', 'live hold', HEX(r.id), \
       'of seat', r.seat_number, 'of date', HEX(r.schedule_id), 'but the seat is', s.status, \
       IF(s.reservation_id <=> r.id, 'naming it', 'naming another')) AS CHAR) \
     FROM reservations r \
     JOIN seats s ON s.schedule_id = r.schedule_id AND s.seat_number = r.seat_number \
     WHERE r.status = 'HELD' AND r.held_until > UTC_TIMESTAMP(6) \
       AND (s.status <> 'HELD' OR NOT (s.reservation_id <=> r.id)) \
     LIMIT 5";

/// The invariants kept in MySQL: each query selects its violations, how many there are
/// and up to five described.
const DATABASE_CHECKS: [(&str, &str); 6] = [
    (BALANCES, BALANCES_SQL),
    (SALES, SOLD_SEATS_SQL),
    (SALES, PAID_SEATS_SQL),
    (USE_ROWS, USE_ROWS_SQL),
    (HOLDS, TWO_HOLDS_SQL),
    (HOLDS, HOLD_SEATS_SQL),
];

/// What the workload left in MySQL, for the report.
const TOTALS_SQL: &str = "SELECT (SELECT COUNT(*) FROM users), \
       (SELECT COUNT(*) FROM point_history WHERE kind = 'CHARGE'), (SELECT COUNT(*) FROM payments), \
       (SELECT COUNT(*) FROM reservations WHERE status = 'CANCELLED'), \
       (SELECT COUNT(*) FROM reservations WHERE status = 'EXPIRED'), (SELECT COUNT(*) FROM schedules)";
const TOTALS: [&str; 6] = ["users", "charges", "payments", "holds cancelled", "holds expired", "dates"];

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let seconds = setting("SOAK_SECONDS")?.unwrap_or(600);
    let seed = setting("SOAK_SEED")?.unwrap_or_else(|| fastrand::u64(..));
    println!(
        "soak: {seconds} s, {VIRTUAL_USERS} virtual users over {INSTANCES} instances, seed {seed} \
         (SOAK_SEED={seed} repeats its choices)"
    );
    let mut rng = fastrand::Rng::with_seed(seed);
    let redis = PrivateRedis::start()?;
    let mut env = booking::env(QUEUE_SLOTS);
    env.extend(e2e::owned(e2e::PATIENT_LOCKS));
    env.extend(e2e::owned(SOAK_ENV));
    let options = ClusterOptions { redis_url: Some(redis.url()), env, ..ClusterOptions::default() };
    // Should this fail, the instances started so far and Redis are killed as they drop.
    let cluster = Cluster::start_with(INSTANCES, &options).await?;
    let http = client();
    let ready = async {
        let schedule = open_schedule(&http, cluster.url(0), PRICE).await?;
        let db = sea_orm::Database::connect(cluster.direct_database_url()).await?;
        anyhow::Ok((schedule, db))
    }
    .await;
    let (schedule, db) = match ready {
        Ok(ready) => ready,
        Err(error) => {
            cluster.shut_down().await;
            return Err(error.context("the soak could not be set up"));
        }
    };

    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let endpoints = Endpoints::of(&cluster);
    let faults: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let chaos = Chaos {
        cluster,
        redis,
        endpoints: endpoints.clone(),
        rng: rng.fork(),
        started,
        deadline,
        stop: Arc::clone(&stop),
        faults: Arc::clone(&faults),
        problems: Vec::new(),
    };
    // From here on the driver owns the processes; it hands them back when the soak ends,
    // every one of them up again, and it ends by itself at the deadline.
    let driver = chaos.spawn();
    let soak = Soak {
        http,
        endpoints,
        picker: RefCell::new(rng.fork()),
        seed,
        started,
        deadline,
        schedules: RefCell::new(vec![schedule]),
        opening: Cell::new(false),
        tally: RefCell::default(),
        first_answers: RefCell::default(),
        verdicts: RefCell::new(INVARIANTS.iter().map(|name| (*name, Verdict::default())).collect()),
        rounds: Cell::new(0),
        faults,
    };
    let users: Vec<VirtualUser> = (0..VIRTUAL_USERS).map(|n| VirtualUser::new(n, rng.fork())).collect();
    futures::join!(
        futures::future::join_all(users.into_iter().map(|user| user.run(&soak))),
        soak.monitor(&db)
    );
    stop.store(true, Ordering::Relaxed);
    println!("[{:>6.1}s] workload stopped; every process is being brought back", soak.elapsed());

    let Ok(Aftermath { cluster, redis, problems }) = driver.await else {
        // It panicked: the processes it owned were killed as its thread unwound.
        db.close().await.ok();
        anyhow::bail!("the fault driver panicked (instances and Redis are stopped)");
    };
    if !problems.is_empty() {
        soak.failed_with(RECOVERY, problems);
    }
    soak.final_checks(&cluster, &db).await;
    soak.report(&db).await;
    db.close().await.ok();
    let failed = soak.failed_invariants();
    if failed.is_empty() {
        cluster.shut_down().await;
        drop(redis);
        println!("\nsoak: every invariant held");
        return Ok(());
    }
    for (i, instance) in cluster.instances.iter().enumerate() {
        let lines = instance
            .output
            .lock()
            .map(|lines| lines[lines.len().saturating_sub(LOG_TAIL)..].to_vec())
            .unwrap_or_default();
        println!("\n--- last lines of instance {i} ({}) ---\n{}", instance.base_url, lines.join("\n"));
    }
    println!("\ndatabase kept for inspection: {}", cluster.direct_database_url());
    drop(cluster);
    drop(redis);
    anyhow::bail!("{} invariant(s) failed: {}", failed.len(), failed.join("; "))
}

/// A whole number from the environment, when it is set.
fn setting(name: &str) -> anyhow::Result<Option<u64>> {
    std::env::var(name)
        .ok()
        .map(|raw| raw.trim().parse().with_context(|| format!("{name}={raw:?} is not a whole number")))
        .transpose()
}

/// The instances' public URLs as the workers see them, `None` while one is down. The fault
/// driver keeps it current: a restarted instance listens on another port.
#[derive(Debug, Clone)]
struct Endpoints(Arc<RwLock<Vec<Option<String>>>>);

impl Endpoints {
    fn of(cluster: &Cluster) -> Self {
        Self(Arc::new(RwLock::new(cluster.instances.iter().map(|i| Some(i.base_url.clone())).collect())))
    }

    fn live(&self) -> Vec<String> {
        self.0.read().map(|urls| urls.iter().flatten().cloned().collect()).unwrap_or_default()
    }

    fn is_up(&self, i: usize) -> bool {
        self.0.read().is_ok_and(|urls| urls.get(i).is_some_and(Option::is_some))
    }

    fn set(&self, i: usize, url: Option<String>) {
        let mut urls = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = urls.get_mut(i) {
            *slot = url;
        }
    }
}

/// The fault driver. It owns the processes (a restart needs the cluster mutably) and runs on
/// a thread and runtime of its own: a graceful stop, a Redis restart and the kill of a
/// process block until they are done, and must not stall the workload meanwhile.
#[derive(Debug)]
struct Chaos {
    cluster: Cluster,
    redis: PrivateRedis,
    endpoints: Endpoints,
    rng: fastrand::Rng,
    started: Instant,
    deadline: Instant,
    /// Set when the workload has stopped.
    stop: Arc<AtomicBool>,
    /// Every fault, as printed; the progress lines count them.
    faults: Arc<Mutex<Vec<String>>>,
    /// What did not recover: an instance that did not stop or come back, a Redis that did
    /// not start again.
    problems: Vec<String>,
}

/// What the driver hands back at the end: the processes, up again if they could be.
#[derive(Debug)]
struct Aftermath {
    cluster: Cluster,
    redis: PrivateRedis,
    problems: Vec<String>,
}

impl Chaos {
    /// Starts the driver on its thread; what it hands back arrives when it is done.
    fn spawn(mut self) -> tokio::sync::oneshot::Receiver<Aftermath> {
        let (done, aftermath) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let ended = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime.block_on(self.run()),
                Err(error) => {
                    self.problems.push(format!("no runtime for the fault driver, no fault: {error}"));
                    self.into_aftermath()
                }
            };
            // Should the soak be gone, the processes are killed as they drop here.
            let _ = done.send(ended);
        });
        aftermath
    }

    async fn run(mut self) -> Aftermath {
        let mut pause = FIRST_FAULT_AFTER;
        while self.idle(pause).await {
            self.inject().await;
            pause = LEASE + Duration::from_millis(self.rng.u64(FAULT_GAP_MS));
        }
        self.bring_back().await;
        self.into_aftermath()
    }

    fn into_aftermath(self) -> Aftermath {
        Aftermath { cluster: self.cluster, redis: self.redis, problems: self.problems }
    }

    /// Sleeps `pause`; false as soon as the soak is too near its end for another fault.
    async fn idle(&self, pause: Duration) -> bool {
        let until = Instant::now() + pause;
        loop {
            if self.stop.load(Ordering::Relaxed) || Instant::now() + QUIET_END >= self.deadline {
                return false;
            }
            if Instant::now() >= until {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn inject(&mut self) {
        let at = self.started.elapsed();
        let up: Vec<usize> = (0..self.cluster.instances.len()).filter(|&i| self.endpoints.is_up(i)).collect();
        let roll = self.rng.u32(0..10);
        // Never the last instance up: the service must stay reachable. Redis may always go.
        let what = match self.rng.choice(up.iter().copied()) {
            Some(i) if up.len() >= 2 && roll < 4 => self.kill_instance(i).await,
            Some(i) if up.len() >= 2 && roll < 7 => self.stop_instance(i).await,
            _ => self.kill_redis().await,
        };
        self.log(at, &what);
    }

    /// SIGKILL, with requests and transactions in flight and locks held; down a moment, as
    /// a crashed process is until its supervisor starts it again.
    async fn kill_instance(&mut self, i: usize) -> String {
        self.cluster.instances[i].crash();
        self.endpoints.set(i, None);
        let down = Duration::from_millis(self.rng.u64(0..=5_000));
        tokio::time::sleep(down).await;
        let back = self.restart(i).await;
        format!("SIGKILL instance {i}, down {:.1} s, {back}", down.as_secs_f64())
    }

    /// SIGTERM, as a deploy does, then started again at once. The instance stays listed while
    /// it stops: the requests it no longer takes go to another, as behind a load balancer.
    async fn stop_instance(&mut self, i: usize) -> String {
        let began = Instant::now();
        let stopped = self.cluster.instances[i].terminate_and_wait(STOP_WITHIN);
        self.endpoints.set(i, None);
        let took = began.elapsed();
        if let Err(error) = stopped {
            self.problems.push(format!("instance {i} did not stop on SIGTERM: {error:#}"));
            self.cluster.instances[i].crash();
        }
        let back = self.restart(i).await;
        format!("SIGTERM instance {i}, stopped in {:.1} s, {back}", took.as_secs_f64())
    }

    /// SIGKILL Redis for a few seconds; it comes back empty (no persistence): no locks, no
    /// fencing counters, no queue, no cache.
    async fn kill_redis(&mut self) -> String {
        self.redis.kill();
        let down = Duration::from_millis(self.rng.u64(2_000..=6_000));
        tokio::time::sleep(down).await;
        let back = self.restart_redis().await;
        format!("Redis killed, down {:.1} s, {back}", down.as_secs_f64())
    }

    async fn restart(&mut self, i: usize) -> String {
        let began = Instant::now();
        // A failed attempt followed by a good one is a hiccup of the harness (a port taken
        // meanwhile), not of the service: only a restart that never succeeds is a problem.
        let mut errors = Vec::new();
        for attempt in 1..=RESTART_ATTEMPTS {
            match self.cluster.restart(i).await {
                Ok(()) => {
                    self.endpoints.set(i, Some(self.cluster.instances[i].base_url.clone()));
                    return format!("restarted in {:.1} s", began.elapsed().as_secs_f64());
                }
                Err(error) => errors.push(format!("attempt {attempt}: {error:#}")),
            }
        }
        self.problems.push(format!("instance {i} did not restart: {}", errors.join("; ")));
        "NOT restarted".to_owned()
    }

    async fn restart_redis(&mut self) -> String {
        let began = Instant::now();
        let mut errors = Vec::new();
        for attempt in 1..=RESTART_ATTEMPTS {
            match self.redis.restart() {
                Ok(()) => return format!("restarted (empty) in {:.1} s", began.elapsed().as_secs_f64()),
                Err(error) => {
                    errors.push(format!("attempt {attempt}: {error:#}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.problems.push(format!("Redis did not restart: {}", errors.join("; ")));
        "NOT restarted".to_owned()
    }

    /// Whatever a failed restart left down gets one more try, so the final check sees the
    /// whole service.
    async fn bring_back(&mut self) {
        for i in 0..self.cluster.instances.len() {
            if !self.endpoints.is_up(i) {
                let at = self.started.elapsed();
                let back = self.restart(i).await;
                self.log(at, &format!("instance {i} was down at the end, {back}"));
            }
        }
        if !self.redis.answers() {
            let at = self.started.elapsed();
            let back = self.restart_redis().await;
            self.log(at, &format!("Redis was down at the end, {back}"));
        }
    }

    fn log(&self, at: Duration, what: &str) {
        let line = format!("[{:>6.1}s] {what}", at.as_secs_f64());
        println!("{line}  (fault)");
        self.faults.lock().unwrap_or_else(PoisonError::into_inner).push(line);
    }
}

/// One request of a virtual user.
#[derive(Debug, Default)]
struct Call<'a> {
    /// What it is, in the tally: "pay (keyed)".
    op: &'static str,
    method: Method,
    path: String,
    /// `Authorization: Bearer` with this user's access token.
    fan: Option<&'a Fan>,
    queue_token: Option<&'a str>,
    idempotency_key: Option<&'a str>,
    body: Option<Value>,
}

#[derive(Debug)]
enum Answer {
    /// No answer: the connection failed or broke (its instance was killed or is stopping).
    Lost,
    Reply(Reply),
}

#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    retry_after: Option<String>,
    json: Value,
}

impl Reply {
    fn code(&self) -> &str {
        self.json["code"].as_str().unwrap_or("")
    }

    fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// "Not now": nothing changed, and the same request may be sent again after a pause.
    fn is_transient(&self) -> bool {
        matches!(self.status, 408 | 429 | 503) || self.code() == "PAYMENT_IN_PROGRESS"
    }

    /// The wait `Retry-After` asks for, at most 2 s: a soak has no time to sit out more.
    fn pause(&self) -> Duration {
        self.retry_after
            .as_deref()
            .and_then(|raw| raw.trim().parse().ok())
            .map_or(Duration::from_millis(500), Duration::from_secs)
            .min(Duration::from_secs(2))
    }
}

/// Every answer the workload got, by request and outcome.
#[derive(Debug, Default)]
struct Tally {
    outcomes: BTreeMap<String, u64>,
    successes: u64,
    refusals: u64,
    unavailable: u64,
    server_errors: u64,
    lost: u64,
    /// Payments a virtual user saw through (paid now, or by an attempt whose answer was lost).
    paid: u64,
}

impl Tally {
    fn count(&mut self, op: &str, answer: &Answer) {
        let outcome = match answer {
            Answer::Lost => {
                self.lost += 1;
                format!("{op}: no answer")
            }
            Answer::Reply(reply) => {
                if reply.is_success() {
                    self.successes += 1;
                } else if reply.status == 503 {
                    self.unavailable += 1;
                } else if reply.status >= 500 {
                    self.server_errors += 1;
                } else {
                    self.refusals += 1;
                }
                format!("{op}: {} {}", reply.status, reply.code()).trim_end().to_owned()
            }
        };
        *self.outcomes.entry(outcome).or_default() += 1;
    }

    fn note(&mut self, outcome: &str) {
        *self.outcomes.entry(outcome.to_owned()).or_default() += 1;
    }
}

/// How one invariant fared.
#[derive(Debug, Default)]
struct Verdict {
    checks: u64,
    failed: u64,
    /// A few examples, each with when it was first seen (seconds into the soak).
    examples: Vec<(f64, String)>,
    /// The most violations one database check found at once.
    most_found: i64,
}

/// What the virtual users and the monitor share. Everything runs on one thread (awc's
/// client is not `Send`), hence cells; no borrow is held across an await.
struct Soak {
    http: awc::Client,
    endpoints: Endpoints,
    /// Picks instances and jitter.
    picker: RefCell<fastrand::Rng>,
    seed: u64,
    started: Instant,
    deadline: Instant,
    /// The dates opened, newest last.
    schedules: RefCell<Vec<String>>,
    /// Whether a virtual user is opening a date now (the others wait for it).
    opening: Cell<bool>,
    tally: RefCell<Tally>,
    /// The first success answered to each idempotency key: `(status, body)`. The workload
    /// sends each key with one request only, so every later answer must be this one.
    first_answers: RefCell<HashMap<String, (u16, Value)>>,
    verdicts: RefCell<Vec<(&'static str, Verdict)>>,
    /// Rounds of the database checks run.
    rounds: Cell<u64>,
    faults: Arc<Mutex<Vec<String>>>,
}

impl Soak {
    fn running(&self) -> bool {
        Instant::now() < self.deadline
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn jitter(&self, max_ms: u64) -> Duration {
        Duration::from_millis(self.picker.borrow_mut().u64(0..=max_ms))
    }

    /// A live instance at random, another than `avoid` (the one that just gave no answer)
    /// when there is one.
    fn pick(&self, avoid: Option<&str>) -> Option<String> {
        let live = self.endpoints.live();
        let others: Vec<&String> = live.iter().filter(|url| Some(url.as_str()) != avoid).collect();
        let pool = if others.is_empty() { live.iter().collect() } else { others };
        self.picker.borrow_mut().choice(pool).cloned()
    }

    fn newest_schedule(&self) -> Option<String> {
        self.schedules.borrow().last().cloned()
    }

    fn checked(&self, name: &'static str) {
        self.with_verdict(name, |verdict| verdict.checks += 1);
    }

    fn failed(&self, name: &'static str, example: String) {
        self.failed_with(name, vec![example]);
    }

    /// One failed check of `name`; new examples are kept (a few) and printed at once, so
    /// that the log shows them beside the faults.
    fn failed_with(&self, name: &'static str, examples: Vec<String>) {
        let at = self.elapsed();
        self.with_verdict(name, |verdict| {
            verdict.failed += 1;
            for example in examples {
                if verdict.examples.len() < MAX_EXAMPLES
                    && verdict.examples.iter().all(|(_, e)| *e != example)
                {
                    println!("[{at:>6.1}s] VIOLATION of \"{name}\": {example}");
                    verdict.examples.push((at, example));
                }
            }
        });
    }

    fn with_verdict(&self, name: &'static str, change: impl FnOnce(&mut Verdict)) {
        let mut verdicts = self.verdicts.borrow_mut();
        if let Some((_, verdict)) = verdicts.iter_mut().find(|(known, _)| *known == name) {
            change(verdict);
        }
    }

    fn failed_invariants(&self) -> Vec<&'static str> {
        self.verdicts
            .borrow()
            .iter()
            .filter(|(_, verdict)| verdict.failed > 0)
            .map(|(name, _)| *name)
            .collect()
    }

    /// Sends `call` until it gets an answer that is not "not now", on another instance after
    /// no answer, for up to [`CALL_PATIENCE`]: `None` when it never got one.
    async fn call(&self, call: &Call<'_>) -> Option<Reply> {
        let give_up = Instant::now() + CALL_PATIENCE;
        let mut avoid = None;
        loop {
            let (base, answer) = self.once(call, avoid.as_deref()).await;
            let pause = match answer {
                Answer::Reply(reply) if !reply.is_transient() => return Some(reply),
                Answer::Reply(reply) => {
                    avoid = None;
                    reply.pause()
                }
                Answer::Lost => {
                    avoid = base;
                    Duration::from_millis(200)
                }
            };
            let pause = pause + self.jitter(200);
            if !self.running() || Instant::now() + pause > give_up {
                return None;
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Sends `call` once, to a live instance, and counts and checks what came back: the
    /// instance it went to, and the answer.
    async fn once(&self, call: &Call<'_>, avoid: Option<&str>) -> (Option<String>, Answer) {
        let Some(base) = self.pick(avoid) else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            return (None, Answer::Lost);
        };
        let mut request = self.http.request(call.method.clone(), format!("{base}{}", call.path));
        if let Some(fan) = call.fan {
            request = request.bearer(fan);
        }
        if let Some(token) = call.queue_token {
            request = request.queue(token);
        }
        if let Some(key) = call.idempotency_key {
            request = request.insert_header(("Idempotency-Key", key));
        }
        let sent = match &call.body {
            Some(body) => request.send_json(body).await,
            None => request.send().await,
        };
        let answer = match sent {
            Err(_) => Answer::Lost,
            Ok(mut response) => {
                let status = response.status().as_u16();
                let retry_after =
                    response.headers().get(RETRY_AFTER).map(|v| v.to_str().unwrap_or("?").to_owned());
                match response.body().limit(BODY_LIMIT).await {
                    // Cut off mid-body: the instance died while answering.
                    Err(_) => Answer::Lost,
                    Ok(bytes) => Answer::Reply(Reply {
                        status,
                        retry_after,
                        json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                    }),
                }
            }
        };
        self.observe(call, &base, &answer);
        (Some(base), answer)
    }

    fn observe(&self, call: &Call<'_>, base: &str, answer: &Answer) {
        self.tally.borrow_mut().count(call.op, answer);
        let Answer::Reply(reply) = answer else { return };
        self.checked(ERRORS);
        // A 503 with Retry-After is the service saying "not now, nothing changed": allowed.
        let unavailable = reply.status == 503 && reply.retry_after.is_some();
        if reply.status >= 500 && !unavailable {
            self.failed(
                ERRORS,
                format!(
                    "{}: {} {base}{} answered {} (Retry-After {:?}) {}",
                    call.op, call.method, call.path, reply.status, reply.retry_after, reply.json
                ),
            );
        }
        if let Some(key) = call.idempotency_key {
            self.observe_key(call.op, key, reply);
        }
    }

    /// Holds every answer to a key against the first success it got. Before a success the
    /// answers may differ (a refused request is not recorded, and a retry runs it again);
    /// after one, every answer is that one, or a "not now".
    fn observe_key(&self, op: &str, key: &str, reply: &Reply) {
        self.checked(KEYS);
        let first = self.first_answers.borrow().get(key).cloned();
        let broken = match first {
            None if reply.is_success() => {
                self.first_answers.borrow_mut().insert(key.to_owned(), (reply.status, reply.json.clone()));
                None
            }
            None => match reply.code() {
                // The key was only ever sent with one body.
                "IDEMPOTENCY_KEY_REUSED" => {
                    Some(format!("{op} {key}: 422 though only ever sent with one body"))
                }
                // Only this key ever paid this reservation: one of its attempts paid, and
                // its answer was not replayed.
                "ALREADY_PAID" => {
                    Some(format!("{op} {key}: 409 ALREADY_PAID, not the answer of the attempt that paid"))
                }
                _ => None,
            },
            Some((status, body)) if reply.is_success() && (status != reply.status || body != reply.json) => {
                Some(format!("{op} {key}: first {status} {body}, then {} {}", reply.status, reply.json))
            }
            Some((status, body)) if !reply.is_success() && !reply.is_transient() => Some(format!(
                "{op} {key}: first {status} {body}, then refused {} {}",
                reply.status, reply.json
            )),
            Some(_) => None,
        };
        if let Some(example) = broken {
            self.failed(KEYS, example);
        }
    }

    /// Opens a fresh date when `seen`, the newest, is sold out: one virtual user at a time,
    /// the others wait for it.
    async fn open_schedule_after(&self, seen: &str) {
        if self.opening.get() || self.newest_schedule().as_deref() != Some(seen) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            return;
        }
        self.opening.set(true);
        let give_up = Instant::now() + CALL_PATIENCE;
        while self.running() && Instant::now() < give_up {
            let opened = match self.pick(None) {
                Some(base) => open_schedule(&self.http, &base, PRICE).await.ok(),
                None => None,
            };
            if let Some(id) = opened {
                self.tally.borrow_mut().note("open date: 201");
                self.schedules.borrow_mut().push(id);
                break;
            }
            // Its instance died, or Redis is down (an admin write evicts cached answers).
            self.tally.borrow_mut().note("open date: failed");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.opening.set(false);
    }

    /// Checks the database's invariants every [`CHECK_EVERY`] and prints a progress line
    /// every [`PROGRESS_EVERY`], until the deadline.
    async fn monitor(&self, db: &DatabaseConnection) {
        let mut next_check = self.started + CHECK_EVERY;
        let mut next_progress = self.started + PROGRESS_EVERY;
        while self.running() {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if Instant::now() >= next_check {
                self.check_database(db).await;
                next_check = Instant::now() + CHECK_EVERY;
            }
            if Instant::now() >= next_progress {
                self.progress();
                next_progress += PROGRESS_EVERY;
            }
        }
    }

    async fn check_database(&self, db: &DatabaseConnection) {
        self.rounds.set(self.rounds.get() + 1);
        for (name, sql) in DATABASE_CHECKS {
            self.checked(name);
            match violations(db, sql).await {
                Ok((0, _)) => {}
                // A violation that stays is found again every round: its example is kept once.
                Ok((found, examples)) => {
                    self.failed_with(name, examples);
                    self.with_verdict(name, |verdict| verdict.most_found = verdict.most_found.max(found));
                }
                Err(error) => self.failed(name, format!("the check did not run: {error:#}")),
            }
        }
    }

    fn progress(&self) {
        let faults = self.faults.lock().map_or(0, |faults| faults.len());
        let violations: u64 = self.verdicts.borrow().iter().map(|(_, verdict)| verdict.failed).sum();
        let tally = self.tally.borrow();
        println!(
            "[{:>6.1}s] {} ok, {} refused, {} 503, {} other 5xx, {} unanswered; {} paid; {faults} faults; \
             {} check rounds, {violations} violations",
            self.elapsed(),
            tally.successes,
            tally.refusals,
            tally.unavailable,
            tally.server_errors,
            tally.lost,
            tally.paid,
            self.rounds.get(),
        );
    }

    /// After the faults, with every instance started again: each answers ready by itself
    /// (Redis back, breakers closed), and the database's invariants hold one last time.
    async fn final_checks(&self, cluster: &Cluster, db: &DatabaseConnection) {
        for i in 0..cluster.instances.len() {
            self.checked(RECOVERY);
            let url = format!("{}/health/ready", cluster.ops_url(i));
            let give_up = Instant::now() + READY_WITHIN;
            loop {
                let status = match self.http.get(url.as_str()).send().await {
                    Ok(mut response) => {
                        let _ = response.body().await;
                        response.status().as_u16()
                    }
                    Err(_) => 0,
                };
                if status == 200 {
                    break;
                }
                if Instant::now() >= give_up {
                    self.failed(
                        RECOVERY,
                        format!(
                            "instance {i} not ready {READY_WITHIN:?} after the faults (last answer: {status})"
                        ),
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        self.check_database(db).await;
    }

    async fn report(&self, db: &DatabaseConnection) {
        let totals = match totals(db).await {
            Ok(values) => TOTALS
                .iter()
                .zip(values)
                .map(|(what, n)| format!("{n} {what}"))
                .collect::<Vec<_>>()
                .join(", "),
            Err(error) => format!("not read: {error:#}"),
        };
        println!("\nsoak: what it did ({:.0} s, seed {})", self.elapsed(), self.seed);
        {
            let tally = self.tally.borrow();
            println!("  requests by outcome (\"no answer\": the instance was killed or stopping):");
            for (outcome, n) in &tally.outcomes {
                println!("    {outcome:<56} {n:>7}");
            }
            println!("  payments seen through by the users: {}", tally.paid);
        }
        println!("  in MySQL: {totals}");
        let faults = self.faults.lock().map(|faults| faults.clone()).unwrap_or_default();
        println!("  faults ({}):", faults.len());
        for fault in &faults {
            println!("    {fault}");
        }
        println!(
            "  invariant checks: {} rounds of the database checks (every {} s and once at the end); \
             every answer checked as it came",
            self.rounds.get(),
            CHECK_EVERY.as_secs()
        );
        println!("\nsoak: what held");
        for (name, verdict) in self.verdicts.borrow().iter() {
            if verdict.failed == 0 {
                println!("  held    {name} ({} checks)", verdict.checks);
            } else {
                println!("  FAILED  {name} ({} of {} checks), e.g.:", verdict.failed, verdict.checks);
                if verdict.most_found > 0 {
                    println!("            (up to {} violations found by one check)", verdict.most_found);
                }
                for (at, example) in &verdict.examples {
                    println!("            [{at:.1}s] {example}");
                }
            }
        }
    }
}

/// The violations `sql` selects: how many, and up to five described.
async fn violations(db: &DatabaseConnection, sql: &str) -> anyhow::Result<(i64, Vec<String>)> {
    let rows = db.query_all_raw(Statement::from_string(DbBackend::MySql, sql)).await?;
    let found = match rows.first() {
        Some(row) => row.try_get_by_index::<i64>(0)?,
        None => 0,
    };
    let examples = rows.iter().map(|row| row.try_get_by_index::<String>(1)).collect::<Result<Vec<_>, _>>()?;
    Ok((found, examples))
}

async fn totals(db: &DatabaseConnection) -> anyhow::Result<Vec<i64>> {
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::MySql, TOTALS_SQL))
        .await?
        .context("no row of totals")?;
    (0..TOTALS.len()).map(|i| row.try_get_by_index::<i64>(i).map_err(anyhow::Error::from)).collect()
}

/// One customer after another: each signs up, then, a few times over, charges points,
/// queues, holds a seat, and cancels or pays; after a payment it may leave for the next.
#[derive(Debug)]
struct VirtualUser {
    n: usize,
    rng: fastrand::Rng,
    fan: Option<Fan>,
    /// The current user's queue token, while it may still be ACTIVE.
    token: Option<String>,
    /// Numbers this virtual user's idempotency keys, so that every key of the soak is unique.
    keys: u64,
}

impl VirtualUser {
    fn new(n: usize, rng: fastrand::Rng) -> Self {
        Self { n, rng, fan: None, token: None, keys: 0 }
    }

    async fn run(mut self, soak: &Soak) {
        while soak.running() {
            self.cycle(soak).await;
            self.think().await;
        }
    }

    async fn think(&mut self) {
        tokio::time::sleep(Duration::from_millis(self.rng.u64(THINK_MS))).await;
    }

    fn key(&mut self, what: &str) -> String {
        self.keys += 1;
        format!("soak-{what}-{}-{}", self.n, self.keys)
    }

    /// Forgets what a refusal says is gone: the access token (the user is left, and a new
    /// one signs up) or the queue token (another is taken).
    fn forget(&mut self, reply: &Reply) {
        match (reply.status, reply.code()) {
            (401, "UNAUTHENTICATED") => {
                self.fan = None;
                self.token = None;
            }
            (401, "QUEUE_TOKEN_INVALID") => self.token = None,
            _ => {}
        }
    }

    async fn cycle(&mut self, soak: &Soak) {
        let fan = match self.fan.clone() {
            Some(fan) => fan,
            None => {
                let Some(fan) = self.sign_up(soak).await else { return };
                self.fan = Some(fan.clone());
                self.token = None;
                fan
            }
        };
        let amount = self.rng.i64(500..=2_500);
        self.charge(soak, &fan, amount).await;
        self.think().await;
        if !self.admitted(soak, &fan).await {
            return;
        }
        let Some(reservation) = self.hold(soak, &fan).await else { return };
        self.think().await;
        if self.rng.f64() < CANCEL_SHARE {
            self.cancel(soak, &fan, &reservation).await;
        } else if self.pay(soak, &fan, &reservation).await && self.rng.bool() {
            // Its token is spent: the user leaves without leaving a queue slot taken.
            self.fan = None;
        }
    }

    async fn sign_up(&self, soak: &Soak) -> Option<Fan> {
        let created = soak
            .call(&Call {
                op: "sign up",
                method: Method::POST,
                path: "/api/v1/users".into(),
                body: Some(json!({"name": format!("soak-{}", self.n)})),
                ..Call::default()
            })
            .await?;
        let id = created.json["id"].as_str()?.to_owned();
        let api_key = created.json["apiKey"].as_str()?.to_owned();
        // The API key is the bearer credential of this one route.
        let by_key = Fan { id: id.clone(), api_key: api_key.clone(), access: api_key.clone() };
        let issued = soak
            .call(&Call {
                op: "access token",
                method: Method::POST,
                path: "/api/v1/auth/tokens".into(),
                fan: Some(&by_key),
                ..Call::default()
            })
            .await?;
        let access = issued.json["accessToken"].as_str()?.to_owned();
        Some(Fan { id, api_key, access })
    }

    async fn charge(&mut self, soak: &Soak, fan: &Fan, amount: i64) {
        let key = self.rng.bool().then(|| self.key("charge"));
        let call = Call {
            op: if key.is_some() { "charge (keyed)" } else { "charge" },
            method: Method::POST,
            path: format!("/api/v1/users/{}/points/charge", fan.id),
            fan: Some(fan),
            idempotency_key: key.as_deref(),
            body: Some(json!({"amount": amount})),
            ..Call::default()
        };
        let answered = soak.call(&call).await;
        if key.is_some() && answered.is_some_and(|reply| reply.is_success()) && self.rng.bool() {
            // Asked again, as by a client that lost the answer: the same answer must come back.
            soak.call(&Call { op: "charge (asked again)", ..call }).await;
        }
    }

    /// Waits until the user's queue token is ACTIVE, taking one first when it has none (or
    /// its token is gone: it ran out, or Redis came back empty). False when it gave up.
    async fn admitted(&mut self, soak: &Soak, fan: &Fan) -> bool {
        let give_up = Instant::now() + ADMISSION_PATIENCE;
        while soak.running() && Instant::now() < give_up {
            let Some(token) = self.token.clone() else {
                let issued = soak
                    .call(&Call {
                        op: "queue token",
                        method: Method::POST,
                        path: "/api/v1/queue/tokens".into(),
                        fan: Some(fan),
                        body: Some(json!({})),
                        ..Call::default()
                    })
                    .await;
                let Some(issued) = issued else { return false };
                match issued.json["token"].as_str() {
                    Some(token) if issued.is_success() => self.token = Some(token.to_owned()),
                    _ => {
                        self.forget(&issued);
                        return false;
                    }
                }
                continue;
            };
            let view = soak
                .call(&Call {
                    op: "queue view",
                    method: Method::GET,
                    path: "/api/v1/queue/tokens/me".into(),
                    fan: Some(fan),
                    queue_token: Some(&token),
                    ..Call::default()
                })
                .await;
            let Some(view) = view else { return false };
            match (view.status, view.code()) {
                (200, _) if view.json["status"] == "ACTIVE" => return true,
                (200, _) => tokio::time::sleep(Duration::from_millis(250)).await,
                // It ran out, or Redis came back without it: another one.
                (401, "QUEUE_TOKEN_INVALID") => self.token = None,
                _ => {
                    self.forget(&view);
                    return false;
                }
            }
        }
        false
    }

    /// Holds a seat shown AVAILABLE on the newest date: the reservation's id.
    async fn hold(&mut self, soak: &Soak, fan: &Fan) -> Option<String> {
        for _ in 0..HOLD_ATTEMPTS {
            let token = self.token.clone()?;
            let schedule = soak.newest_schedule()?;
            let map = soak
                .call(&Call {
                    op: "seat map",
                    method: Method::GET,
                    path: format!("/api/v1/schedules/{schedule}/seats"),
                    fan: Some(fan),
                    queue_token: Some(&token),
                    ..Call::default()
                })
                .await?;
            if map.status != 200 {
                self.forget(&map);
                return None;
            }
            let free: Vec<u64> = map.json["seats"]
                .as_array()
                .map(|seats| {
                    seats
                        .iter()
                        .filter(|seat| seat["status"] == "AVAILABLE")
                        .filter_map(|seat| seat["seatNumber"].as_u64())
                        .collect()
                })
                .unwrap_or_default();
            let Some(seat) = self.rng.choice(free.iter().copied()) else {
                soak.open_schedule_after(&schedule).await;
                continue;
            };
            let held = soak
                .call(&Call {
                    op: "hold",
                    method: Method::POST,
                    path: "/api/v1/reservations".into(),
                    fan: Some(fan),
                    queue_token: Some(&token),
                    body: Some(json!({"scheduleId": schedule, "seatNumber": seat})),
                    ..Call::default()
                })
                .await?;
            match (held.status, held.code()) {
                (201, _) => return held.json["id"].as_str().map(str::to_owned),
                // Another user was quicker (or this one, in an attempt whose answer was lost).
                (409, "SEAT_UNAVAILABLE") => {}
                // Its holds whose answers were lost fill its limit on this date: the user
                // leaves, and a new one signs up.
                (409, "HOLD_LIMIT_REACHED") => {
                    self.fan = None;
                    return None;
                }
                _ => {
                    self.forget(&held);
                    return None;
                }
            }
        }
        None
    }

    async fn cancel(&mut self, soak: &Soak, fan: &Fan, reservation: &str) {
        let Some(token) = self.token.clone() else { return };
        let cancelled = soak
            .call(&Call {
                op: "cancel",
                method: Method::DELETE,
                path: format!("/api/v1/reservations/{reservation}"),
                fan: Some(fan),
                queue_token: Some(&token),
                ..Call::default()
            })
            .await;
        if let Some(reply) = cancelled {
            self.forget(&reply);
        }
    }

    /// Pays for `reservation`, topping the balance up when it is short: whether it is paid
    /// (now, or by an earlier attempt whose answer was lost).
    async fn pay(&mut self, soak: &Soak, fan: &Fan, reservation: &str) -> bool {
        let key = (self.rng.f64() < KEYED_PAYMENT_SHARE).then(|| self.key("pay"));
        let mut top_ups = 0;
        for _ in 0..PAY_ATTEMPTS {
            if self.token.is_none() && !self.admitted(soak, fan).await {
                return false;
            }
            let Some(token) = self.token.clone() else { return false };
            let call = Call {
                op: if key.is_some() { "pay (keyed)" } else { "pay" },
                method: Method::POST,
                path: "/api/v1/payments".into(),
                fan: Some(fan),
                queue_token: Some(&token),
                idempotency_key: key.as_deref(),
                body: Some(json!({"reservationId": reservation})),
            };
            let Some(paid) = soak.call(&call).await else { return false };
            match (paid.status, paid.code()) {
                (201, _) => {
                    soak.tally.borrow_mut().paid += 1;
                    // The payment spent the token.
                    self.token = None;
                    if key.is_some() && self.rng.bool() {
                        // Asked again with the spent token, as by a client that lost the
                        // answer: the same answer must come back.
                        soak.call(&Call { op: "pay (asked again)", ..call }).await;
                    }
                    return true;
                }
                (409, "INSUFFICIENT_BALANCE") if top_ups < 3 => {
                    top_ups += 1;
                    self.charge(soak, fan, PRICE).await;
                }
                // An attempt whose answer was lost paid it. (With a key that answer should
                // have been replayed instead: the check of keys counts it.)
                (409, "ALREADY_PAID") => {
                    soak.tally.borrow_mut().paid += 1;
                    self.token = None;
                    return true;
                }
                // Redis came back without it, or it ran out: paid with a new one.
                (401, "QUEUE_TOKEN_INVALID") => self.token = None,
                _ => {
                    self.forget(&paid);
                    return false;
                }
            }
        }
        false
    }
}
