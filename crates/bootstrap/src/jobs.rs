//! The background jobs every instance runs beside the HTTP server, one task each: the
//! queue's admission step, the hold expiry, the outbox relay, the purges of expired
//! idempotency keys and sent outbox events, the event stream's trim (only what every
//! consumer group has acknowledged), and the metrics recorder's upkeep. Each one is
//! safe to run on any number of instances at once.
//!
//! [`Jobs::spawn`] starts them all; [`Jobs::stop`] ends them (with the queue event fan-out
//! that [`crate::queue_events::QueueEvents::start`] started).

use std::sync::Arc;
use std::time::Duration;

use adapters_redis::events::RedisEventPublisher;
use application::idempotency::Idempotency;
use application::outbox::OutboxRelay;
use application::queue::WaitingQueue;
use application::reservations::Reservations;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;

use crate::settings::Settings;

/// How often each instance deletes expired idempotency keys, and how many per statement.
const PURGE_EVERY: Duration = Duration::from_secs(10 * 60);
const PURGE_BATCH: u64 = 1_000;

/// How long sent outbox events are kept (an audit trail for a week), then purged.
const OUTBOX_RETENTION: time::Duration = time::Duration::days(7);

/// How often each instance trims the event stream of what every group acknowledged.
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// How often the recorder drains its histograms.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// What the jobs work with.
pub struct JobPorts {
    /// The recorder whose histograms need draining.
    pub metrics: PrometheusHandle,
    /// Whose expired keys are purged.
    pub idempotency: Idempotency,
    /// What sends pending outbox events, and purges sent ones.
    pub outbox: OutboxRelay,
    /// The stream the events go to, trimmed of what every group acknowledged.
    pub stream: RedisEventPublisher,
    /// Whose admission step runs.
    pub queue: Arc<dyn WaitingQueue>,
    /// Whose run-out holds are expired.
    pub reservations: Reservations,
    /// The queue event fan-out's task, started with its hub (`QueueEvents::start`):
    /// stopped with the jobs.
    pub event_fanout: JoinHandle<()>,
    /// The shared signing keys to reload (`None` when the operator sets them).
    pub signing_keys: Option<application::identity::SigningKeys>,
    /// The per-client limits whose idle clients are forgotten.
    pub rate_limits: actix_web::web::Data<crate::limits::RateLimits>,
    /// What settles coupon decisions left pending.
    pub coupons: application::coupons::Reconciler,
}

impl std::fmt::Debug for JobPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobPorts").finish_non_exhaustive()
    }
}

/// The running background tasks of an instance.
#[derive(Debug)]
pub struct Jobs {
    upkeep: JoinHandle<()>,
    purge: JoinHandle<()>,
    admission: JoinHandle<()>,
    expiry: JoinHandle<()>,
    relay: JoinHandle<()>,
    trim: JoinHandle<()>,
    event_fanout: JoinHandle<()>,
    keys: Option<JoinHandle<()>>,
    limits: JoinHandle<()>,
    coupons: JoinHandle<()>,
}

impl Jobs {
    /// Starts every job, at the intervals `settings` gives.
    #[must_use]
    pub fn spawn(ports: JobPorts, settings: &Settings) -> Self {
        let JobPorts {
            metrics,
            idempotency,
            outbox,
            stream,
            queue,
            reservations,
            event_fanout,
            signing_keys,
            rate_limits,
            coupons,
        } = ports;
        let upkeep = metrics_upkeep(metrics);
        let purge = purge(idempotency, outbox.clone());
        // Twice per interval: with one instance, a step landing just before an interval's
        // end would otherwise skip the next; the step itself keeps the rate exact.
        let admission = admission(queue, settings.queue.admit_interval / 2);
        let relay = outbox_relay(outbox, settings.outbox_relay_interval);
        let expiry = hold_expiry(reservations, settings.hold_expiry_interval, settings.hold_expiry_batch);
        let trim = stream_trim(stream);
        let keys = signing_keys.map(|keys| key_refresh(keys, settings.auth_key_refresh));
        let limits = limits_trim(rate_limits);
        let coupons = coupon_reconciler(coupons);
        Self { upkeep, purge, admission, expiry, relay, trim, event_fanout, keys, limits, coupons }
    }

    /// Ends every job (a round in progress is dropped where it stands).
    pub fn stop(&self) {
        self.upkeep.abort();
        self.purge.abort();
        self.admission.abort();
        self.expiry.abort();
        self.relay.abort();
        self.trim.abort();
        self.event_fanout.abort();
        if let Some(keys) = &self.keys {
            keys.abort();
        }
        self.limits.abort();
        self.coupons.abort();
    }
}

/// Settles coupon decisions left pending past their grace (an instance died between a
/// decision and its insert), every 10 s. Every instance may do it: a decision is confirmed
/// or given back once.
#[must_use]
pub fn coupon_reconciler(reconciler: application::coupons::Reconciler) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(10));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if let Err(error) = reconciler.run_once(application::clock::now_utc()).await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "coupon reconciliation failed; retried next round"
                );
            }
        }
    })
}

/// Reloads the shared signing keys every `every` (`AUTH_KEY_REFRESH_SECONDS`), so a
/// rotated key reaches every instance before it signs; deletes keys whose tokens have all
/// run out. A failed reload keeps the keys in memory and is tried at the next tick.
#[must_use]
pub fn key_refresh(keys: application::identity::SigningKeys, every: Duration) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            interval.tick().await;
            if let Err(error) = keys.refresh().await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "signing keys not reloaded; keeping those in memory"
                );
            }
        }
    })
}

/// Every minute, forgets the clients of the per-client limits whose budget is full again,
/// so the limiters' memory follows the last minute's clients; and reports the malformed
/// requests of the minute in one line ([`crate::telemetry::report_malformed_requests`]).
#[must_use]
pub fn limits_trim(limits: actix_web::web::Data<crate::limits::RateLimits>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            crate::telemetry::report_malformed_requests();
            let tracked = limits.trim();
            #[allow(clippy::cast_precision_loss, reason = "a gauge")]
            metrics::gauge!("rate_limit_clients").set(tracked as f64);
        }
    })
}

/// The recorder keeps histograms until told to drain them: every 5 s.
#[must_use]
pub fn metrics_upkeep(metrics: PrometheusHandle) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        loop {
            every.tick().await;
            metrics.run_upkeep();
        }
    })
}

/// Expired idempotency keys, then sent outbox events older than a week, in batches, every
/// 10 minutes. Every instance may do it (a DELETE of what another already deleted deletes
/// nothing).
#[must_use]
pub fn purge(idempotency: Idempotency, relay: OutboxRelay) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(PURGE_EVERY);
        loop {
            every.tick().await;
            match idempotency.purge_expired(PURGE_BATCH).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "expired idempotency keys purged"),
                Err(error) => tracing::warn!(error = format!("{error:#}"), "idempotency key purge failed"),
            }
            let before = application::clock::now_utc() - OUTBOX_RETENTION;
            match relay.purge_sent(before, PURGE_BATCH as u32).await {
                Ok(0) => {}
                Ok(purged) => tracing::info!(purged, "sent outbox events purged"),
                Err(error) => tracing::warn!(error = format!("{error:#}"), "outbox purge failed"),
            }
        }
    })
}

/// The event stream trimmed of the entries every consumer group acknowledged, every
/// minute; never an entry a group has not read or acknowledged (see
/// `adapters_redis::events`). Every instance may do it.
#[must_use]
pub fn stream_trim(stream: RedisEventPublisher) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(TRIM_EVERY);
        loop {
            every.tick().await;
            match stream.trim().await {
                Ok(0) => {}
                Ok(trimmed) => tracing::debug!(trimmed, "event stream trimmed"),
                Err(error) => tracing::warn!(error = format!("{error:#}"), "event stream trim failed"),
            }
        }
    })
}

/// The queue's admission step, every `interval`.
#[must_use]
pub fn admission(queue: Arc<dyn WaitingQueue>, interval: Duration) -> JoinHandle<()> {
    tokio::spawn(admit_forever(queue, interval))
}

/// The outbox relay, every `interval`.
#[must_use]
pub fn outbox_relay(relay: OutboxRelay, interval: Duration) -> JoinHandle<()> {
    tokio::spawn(relay_forever(relay, interval))
}

/// The hold expiry, every `interval`, up to `batch` holds a round.
#[must_use]
pub fn hold_expiry(reservations: Reservations, interval: Duration, batch: u32) -> JoinHandle<()> {
    tokio::spawn(expire_forever(reservations, interval, batch))
}

/// The admission step, every `interval`, on every instance (the step is atomic in the
/// queue's store, so any number of instances may run it at once). Exports the queue's
/// sizes, the admissions and each step's duration.
async fn admit_forever(queue: Arc<dyn WaitingQueue>, interval: Duration) {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let started = std::time::Instant::now();
        match queue.admit().await {
            Ok(step) => {
                metrics::histogram!("queue_admission_step_seconds").record(started.elapsed().as_secs_f64());
                metrics::counter!("queue_admitted_total").increment(step.admitted);
                #[allow(clippy::cast_precision_loss, reason = "gauges")]
                {
                    metrics::gauge!("queue_waiting").set(step.waiting as f64);
                    metrics::gauge!("queue_active").set(step.active as f64);
                }
                if step.admitted > 0 {
                    tracing::debug!(
                        admitted = step.admitted,
                        active = step.active,
                        waiting = step.waiting,
                        "admitted"
                    );
                }
            }
            Err(error) => tracing::warn!(error = format!("{error:#}"), "queue admission step failed"),
        }
    }
}

/// The hold expiry job, every `interval`, on every instance (each hold is expired once,
/// under its seat's lock, by a conditional update). A full batch goes again at once.
async fn expire_forever(reservations: Reservations, interval: Duration, batch: u32) {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        loop {
            match reservations.expire_run_out(batch).await {
                Ok(expired) => {
                    metrics::counter!("reservation_holds_expired_total").increment(expired as u64);
                    if expired < batch as usize {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), "hold expiry round failed");
                    break;
                }
            }
        }
    }
}

/// The outbox relay, every `interval`, on every instance (rows are claimed with `SKIP
/// LOCKED`, so instances never send one row at the same time). A full batch goes again at
/// once; the pending count is exported every few seconds.
async fn relay_forever(relay: OutboxRelay, interval: Duration) {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_observed = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        every.tick().await;
        loop {
            match relay.relay_once().await {
                Ok(sent) if sent == relay.batch() as usize => {}
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "outbox relay round failed; the events stay pending"
                    );
                    break;
                }
            }
        }
        if last_observed.elapsed() >= Duration::from_secs(5) {
            last_observed = std::time::Instant::now();
            if let Err(error) = relay.observe_pending().await {
                tracing::debug!(error = format!("{error:#}"), "outbox pending count unavailable");
            }
        }
    }
}
