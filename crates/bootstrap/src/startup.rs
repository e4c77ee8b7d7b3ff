//! The composition root: builds every adapter, hands them to the use cases as ports, and
//! serves the HTTP API.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::http::header;
use actix_web::{App, HttpResponse, HttpServer, web};
use adapters_mysql::booking::MySqlBookingRepository;
use adapters_mysql::catalog::MySqlCatalogRepository;
use adapters_mysql::idempotency::MySqlIdempotencyStore;
use adapters_mysql::outbox::MySqlOutboxStore;
use adapters_mysql::payments::MySqlPaymentRepository;
use adapters_mysql::points::MySqlPointRepository;
use adapters_mysql::tx::MySqlTransactionManager;
use adapters_mysql::users::MySqlUserRepository;
use adapters_mysql::{DatabaseConnection, database};
use adapters_redis::cache::RedisCache;
use adapters_redis::connection::RedisConnections;
use adapters_redis::events::RedisEventPublisher;
use adapters_redis::lock::{DEFAULT_FALLBACK_POLL, LockOptions, RedisLock, WaitStrategy};
use anyhow::Context as _;
use application::cache::{Cache, CacheSettings};
use application::catalog::Catalog;
use application::charge_points::ChargePoints;
use application::create_user::CreateUser;
use application::get_balance::GetBalance;
use application::hold_seat::HoldSeat;
use application::idempotency::{DEFAULT_RETENTION, Idempotency};
use application::outbox::OutboxRelay;
use application::pay::{Pay, PayPorts};
use application::point_history::PointHistory;
use application::queue::{IssueToken, QueueReader, WaitingQueue};
use application::reservations::Reservations;
use tokio::task::JoinHandle;
use utoipa::OpenApi as _;
use utoipa_swagger_ui::SwaggerUi;

use crate::openapi::ApiDoc;
use crate::problem::ApiError;
use crate::queue_events::QueueEvents;
use crate::routes::admin::AdminKey;
use crate::routes::{self, AppState, health::Readiness};
use crate::settings::{LockWaitMode, QueueBackend, Settings, redact};
use crate::telemetry;

/// How often each instance deletes expired idempotency keys, and how many per statement.
const PURGE_EVERY: Duration = Duration::from_secs(10 * 60);
const PURGE_BATCH: u64 = 1_000;

/// How long sent outbox events are kept (an audit trail for a week), then purged.
const OUTBOX_RETENTION: time::Duration = time::Duration::days(7);

/// How long shutdown waits for Redis to confirm the release of locks still held.
const RELEASE_AT_SHUTDOWN: Duration = Duration::from_secs(3);

/// A built, listening server.
pub struct Application {
    port: u16,
    server: Server,
    db: DatabaseConnection,
    redis: RedisConnections,
    lock: RedisLock,
    upkeep: JoinHandle<()>,
    purge: JoinHandle<()>,
    admission: JoinHandle<()>,
    expiry: JoinHandle<()>,
    relay: JoinHandle<()>,
    events: JoinHandle<()>,
    queue_events: QueueEvents,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application").field("port", &self.port).finish_non_exhaustive()
    }
}

impl Application {
    /// Prepares the database (create, migrate), connects Redis, wires the use cases and
    /// binds the listener. Nothing is served until [`Application::run_until_stopped`].
    ///
    /// # Errors
    /// When MySQL or Redis cannot be reached, a migration fails, or the address is taken.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        tracing::info!(database = %redact(&settings.database_url), redis = %redact(&settings.redis_url), "starting");
        database::prepare_with(&settings.database_url, settings.seed_demo_data)
            .await
            .context("database not ready")?;
        let db = database::connect(
            &settings.database_url,
            settings.database_max_connections,
            settings.database_statement_timeout,
        )
        .await?;
        let redis = RedisConnections::connect(
            &settings.redis_url,
            settings.redis_pool_size,
            settings.redis_command_timeout,
        )
        .await?;
        let lock = RedisLock::new(
            redis.pool.clone(),
            Some(&redis.subscriber),
            LockOptions {
                lease: settings.lock_lease,
                renew_every: settings.lock_lease / 3,
                max_hold: settings.lock_max_hold,
                wait: match settings.lock_wait_mode {
                    LockWaitMode::PubSub => WaitStrategy::PubSub { fallback_poll: DEFAULT_FALLBACK_POLL },
                    LockWaitMode::Spin => WaitStrategy::Spin {
                        initial: Duration::from_millis(5),
                        max: Duration::from_millis(100),
                    },
                },
            },
        )
        .await
        .context("failed to set up the distributed lock")?;

        let users = Arc::new(MySqlUserRepository::new(db.clone()));
        let points = Arc::new(MySqlPointRepository::new(db.clone()));
        let txm = Arc::new(MySqlTransactionManager::new(db.clone()));
        let lock_port: Arc<dyn application::lock::DistributedLock> = if settings.disable_locks_for_testing {
            tracing::error!(
                "DISABLE_LOCKS_FOR_TESTING=true: distributed locks are OFF; only the SQL guards keep writes exact. Never run this in production"
            );
            Arc::new(application::lock::NoLock)
        } else {
            Arc::new(lock.clone())
        };
        // A duplicate waits for the first request with its key: its lock wait plus its
        // longest hold.
        let idempotency = Idempotency::new(
            Arc::new(MySqlIdempotencyStore::new(db.clone())),
            Arc::clone(&lock_port),
            settings.point_lock_wait + settings.lock_max_hold,
            DEFAULT_RETENTION,
        );
        let queue: Arc<dyn WaitingQueue> = match settings.queue_backend {
            QueueBackend::Redis => Arc::new(adapters_redis::queue::RedisQueue::new(
                redis.pool.clone(),
                &settings.queue_name,
                settings.queue,
            )),
            QueueBackend::MySql => {
                Arc::new(adapters_mysql::queue::MySqlQueue::new(db.clone(), settings.queue))
            }
        };
        let queue_reader = QueueReader::new(Arc::clone(&queue));
        let gate = web::Data::new(queue_reader.clone());
        let (queue_events, events) = QueueEvents::start(
            queue_reader.clone(),
            settings.queue.admit_interval.min(Duration::from_secs(1)),
        );
        let cache_prefix = settings.cache_prefix.clone();
        let cache = Arc::new(if settings.cache_enabled {
            // A write's mark must outlast the longest a write may hold its lock.
            let settings = CacheSettings {
                write_mark: settings.lock_max_hold + settings.lock_lease,
                ..CacheSettings::default()
            };
            Cache::new(Arc::new(RedisCache::with_prefix(redis.pool.clone(), cache_prefix)), settings)
        } else {
            tracing::warn!("CACHE_ENABLED=false: every catalog read goes to MySQL");
            Cache::disabled()
        });
        let catalog = Catalog::new(Arc::new(MySqlCatalogRepository::new(db.clone())), cache);
        let bookings = Arc::new(MySqlBookingRepository::new(db.clone()));
        let hold_seat = HoldSeat::new(
            catalog.clone(),
            bookings.clone(),
            Arc::clone(&lock_port),
            txm.clone(),
            settings.reservation_hold,
        );
        let reservations =
            Reservations::new(catalog.clone(), bookings.clone(), Arc::clone(&lock_port), txm.clone());
        let outbox = Arc::new(MySqlOutboxStore::new(db.clone()));
        let pay = Pay::new(
            PayPorts {
                bookings,
                points: points.clone(),
                payments: Arc::new(MySqlPaymentRepository::new(db.clone())),
                outbox: outbox.clone(),
                catalog: catalog.clone(),
                queue: Arc::clone(&queue),
                lock: Arc::clone(&lock_port),
                txm: txm.clone(),
                idempotency: idempotency.clone(),
            },
            settings.point_lock_wait,
        );
        let relay = OutboxRelay::new(
            outbox,
            Arc::new(RedisEventPublisher::new(redis.pool.clone(), settings.payment_events_stream.clone())),
            txm.clone(),
            settings.outbox_batch,
        );
        let metrics = telemetry::prometheus();
        let state = web::Data::new(AppState {
            create_user: CreateUser::new(users.clone(), points.clone(), txm.clone()),
            charge_points: ChargePoints::new(
                users.clone(),
                points.clone(),
                lock_port,
                txm,
                settings.point_lock_wait,
                idempotency.clone(),
            ),
            get_balance: GetBalance::new(points.clone()),
            point_history: PointHistory::new(users.clone(), points),
            issue_token: IssueToken::new(users, Arc::clone(&queue)),
            queue_reader,
            queue_events: queue_events.clone(),
            catalog,
            hold_seat,
            reservations: reservations.clone(),
            pay,
            readiness: Readiness { db: db.clone(), redis: redis.clone() },
            metrics: metrics.clone(),
        });

        let admin_key = web::Data::new(AdminKey(settings.admin_api_key.clone()));
        let listener = TcpListener::bind(&settings.http_addr)
            .with_context(|| format!("failed to listen on {}", settings.http_addr))?;
        let address = listener.local_addr()?;
        let openapi = ApiDoc::openapi();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                // What the queue gate (`routes::queue::Admitted`) reads tokens with.
                .app_data(gate.clone())
                .app_data(admin_key.clone())
                .app_data(web::QueryConfig::default().error_handler(|error, _| {
                    ApiError::validation("query", format!("the query string cannot be read: {error}")).into()
                }))
                .wrap(actix_web::middleware::from_fn(crate::middleware::observe))
                .configure(routes::configure)
                .service(SwaggerUi::new("/docs/{_:.*}").url("/api-docs/openapi.json", openapi.clone()))
                .route(
                    "/docs",
                    web::get().to(|| async {
                        HttpResponse::PermanentRedirect().insert_header((header::LOCATION, "/docs/")).finish()
                    }),
                )
                .default_service(web::to(routes::not_found))
        })
        .listen(listener)?
        .shutdown_timeout(settings.shutdown_grace_seconds)
        // SIGTERM and SIGINT are handled in `run_until_stopped`, which ends the event
        // streams before the graceful stop starts waiting for in-flight requests.
        .disable_signals()
        .run();

        // The recorder keeps histograms until told to drain them.
        let upkeep = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                metrics.run_upkeep();
            }
        });
        // Expired idempotency keys go in batches; every instance may do it (a DELETE of
        // what another already deleted deletes nothing).
        let purging_relay = relay.clone();
        let purge = tokio::spawn(async move {
            let mut every = tokio::time::interval(PURGE_EVERY);
            loop {
                every.tick().await;
                match idempotency.purge_expired(PURGE_BATCH).await {
                    Ok(0) => {}
                    Ok(purged) => tracing::info!(purged, "expired idempotency keys purged"),
                    Err(error) => {
                        tracing::warn!(error = format!("{error:#}"), "idempotency key purge failed")
                    }
                }
                let before = application::clock::now_utc() - OUTBOX_RETENTION;
                match purging_relay.purge_sent(before, PURGE_BATCH as u32).await {
                    Ok(0) => {}
                    Ok(purged) => tracing::info!(purged, "sent outbox events purged"),
                    Err(error) => tracing::warn!(error = format!("{error:#}"), "outbox purge failed"),
                }
            }
        });
        // Twice per interval: with one instance, a step landing just before an interval's
        // end would otherwise skip the next; the step itself keeps the rate exact.
        let admission = tokio::spawn(admit_forever(queue, settings.queue.admit_interval / 2));
        let relay = tokio::spawn(relay_forever(relay, settings.outbox_relay_interval));
        let expiry = tokio::spawn(expire_forever(
            reservations,
            settings.hold_expiry_interval,
            settings.hold_expiry_batch,
        ));
        tracing::info!("listening on http://{address}");
        Ok(Self {
            port: address.port(),
            server,
            db,
            redis,
            lock,
            upkeep,
            purge,
            admission,
            expiry,
            relay,
            events,
            queue_events,
        })
    }

    /// The port actually bound (useful with `HTTP_ADDR=...:0`).
    #[must_use]
    pub const fn port(&self) -> u16 {
        self.port
    }

    /// Serves until SIGINT or SIGTERM, lets in-flight requests finish (for up to
    /// `SHUTDOWN_GRACE_SECONDS`; the rest are dropped), releases every lock this process may
    /// still hold (those of dropped requests included), then closes the connections to
    /// MySQL and Redis.
    ///
    /// # Errors
    /// When the server fails.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let queue_events = self.queue_events.clone();
        let stopper = tokio::spawn(async move {
            stop_signal().await;
            tracing::info!("stopping: ending event streams, then letting requests finish");
            queue_events.close_all();
            let graceful = handle.clone();
            tokio::spawn(async move { graceful.stop(true).await });
            // A second signal does not wait for the grace: stop now.
            stop_signal().await;
            tracing::warn!("second stop signal: stopping without waiting for requests");
            handle.stop(false).await;
        });
        let served = self.server.await;
        stopper.abort();
        self.upkeep.abort();
        self.purge.abort();
        self.admission.abort();
        self.expiry.abort();
        self.relay.abort();
        self.events.abort();
        self.lock.release_all(RELEASE_AT_SHUTDOWN).await;
        self.redis.quit().await;
        self.db.close().await.ok();
        tracing::info!("stopped");
        served.context("the HTTP server failed")
    }
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

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                tracing::warn!("cannot listen for SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
