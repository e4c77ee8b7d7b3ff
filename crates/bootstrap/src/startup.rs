//! The composition root: builds every adapter, hands them to the use cases as ports, and
//! serves the HTTP API.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::http::header;
use actix_web::{App, HttpResponse, HttpServer, web};
use adapters_jwt::JwtTokens;
use adapters_mysql::booking::MySqlBookingRepository;
use adapters_mysql::catalog::MySqlCatalogRepository;
use adapters_mysql::idempotency::MySqlIdempotencyStore;
use adapters_mysql::outbox::MySqlOutboxStore;
use adapters_mysql::payments::MySqlPaymentRepository;
use adapters_mysql::points::MySqlPointRepository;
use adapters_mysql::signing_keys::MySqlSigningKeyStore;
use adapters_mysql::tx::MySqlTransactionManager;
use adapters_mysql::users::MySqlUserRepository;
use adapters_mysql::{DatabaseConnection, database};
use adapters_redis::cache::RedisCache;
use adapters_redis::connection::RedisConnections;
use adapters_redis::events::RedisEventPublisher;
use adapters_redis::lock::{DEFAULT_FALLBACK_POLL, LockOptions, RedisLock, WaitStrategy};
use adapters_redis::quorum::{QuorumLock, QuorumOptions};
use anyhow::Context as _;
use application::breaker::{BreakerCache, BreakerLock, BreakerSettings};
use application::cache::{Cache, CacheSettings};
use application::catalog::Catalog;
use application::charge_points::ChargePoints;
use application::create_user::CreateUser;
use application::get_balance::GetBalance;
use application::hold_seat::HoldSeat;
use application::idempotency::{DEFAULT_RETENTION, Idempotency};
use application::identity::{KeySet, Keyring, Secret, SignIn, SigningKey, SigningKeys, TokenVerifier};
use application::outbox::OutboxRelay;
use application::pay::{Pay, PayPorts};
use application::point_history::PointHistory;
use application::queue::{IssueToken, QueueReader, WaitingQueue};
use application::reservations::Reservations;
use utoipa::OpenApi as _;
use utoipa_swagger_ui::SwaggerUi;

use crate::jobs::{JobPorts, Jobs};
use crate::limits::RateLimits;
use crate::openapi::ApiDoc;
use crate::problem::ApiError;
use crate::queue_events::QueueEvents;
use crate::routes::admin::AdminKey;
use crate::routes::{self, AppState, health::OpsState};
use crate::settings::{LockWaitMode, QueueBackend, Settings, redact};
use crate::telemetry;

/// Open connections the operations listener takes (health checks and scrapes).
const OPS_CONNECTIONS: usize = 64;

/// File descriptors kept for everything but public connections: the pools, the operations
/// listener, logs, the Redis subscriber, a margin.
const RESERVED_FDS: usize = 256 + OPS_CONNECTIONS;

/// The public listener's connection cap when `HTTP_MAX_CONNECTIONS` is unset: the soft
/// open-file limit (from `/proc/self/limits`) less [`RESERVED_FDS`], so a flood of
/// connections is refused at accept before the process runs out of descriptors; 25,000
/// where the limit cannot be read or is unlimited.
#[must_use]
pub fn connection_budget(limits: Option<&str>) -> usize {
    const FALLBACK: usize = 25_000;
    let soft = limits.and_then(|text| {
        let line = text.lines().find(|line| line.starts_with("Max open files"))?;
        line.trim_start_matches("Max open files").split_whitespace().next()?.parse::<usize>().ok()
    });
    soft.map_or(FALLBACK, |soft| soft.saturating_sub(RESERVED_FDS).clamp(16, FALLBACK))
}

/// How long shutdown waits for Redis to confirm the release of locks still held.
const RELEASE_AT_SHUTDOWN: Duration = Duration::from_secs(3);

/// A built, listening server.
pub struct Application {
    port: u16,
    ops_port: u16,
    server: Server,
    ops_server: Server,
    db: DatabaseConnection,
    redis: RedisConnections,
    lock: ServerLock,
    jobs: Arc<Jobs>,
    queue_events: QueueEvents,
    /// Set at the first stop signal: readiness then answers 503.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// The public requests running, which the stop waits for before any worker ends.
    requests: web::Data<crate::draining::Requests>,
    /// `SHUTDOWN_GRACE_SECONDS`.
    grace: Duration,
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
        tracing::info!(database = %redact(&settings.database_url), redis = %redact(&settings.redis_url), redis_topology = ?settings.redis_topology, "starting");
        let redis = RedisConnections::connect(
            &settings.redis_url,
            settings.redis_pool_size,
            settings.redis_command_timeout,
        )
        .await?;
        let cache_prefix = settings.cache_prefix.clone();
        let cache = Arc::new(if settings.cache_enabled {
            // A write's mark must outlast the longest a write may hold its lock.
            let cache_settings = CacheSettings {
                write_mark: settings.lock_max_hold + settings.lock_lease,
                single_loader: settings.cache_single_loader,
                ..CacheSettings::default()
            };
            if !settings.cache_single_loader {
                tracing::warn!("CACHE_SINGLE_LOADER=false: every cache miss loads by itself");
            }
            // Behind a circuit breaker: while Redis is down, reads go to MySQL at once
            // instead of after the command timeout each.
            let port = BreakerCache::new(
                RedisCache::with_prefix(redis.pool.clone(), cache_prefix)
                    .with_replica_acks(settings.cache_replica_acks),
                BreakerSettings::default(),
            );
            Cache::new(Arc::new(port), cache_settings)
        } else {
            tracing::warn!("CACHE_ENABLED=false: every catalog read goes to MySQL");
            Cache::disabled()
        });
        // Preparing the database (and seeding the demo catalog) is a catalog write like an
        // admin's: the cached concert list is marked before it and lifted after, so no
        // instance keeps listing the concerts of a database that was dropped and
        // re-created under the same name. Done at every start, so a start that died
        // between its seed and the lift is made good by the next.
        application::catalog::seeding(&cache, async {
            database::prepare_with(&settings.database_url, settings.seed_demo_data).await
        })
        .await
        .context("database not ready")?;
        let db = database::connect(
            &settings.database_url,
            settings.database_max_connections,
            settings.database_statement_timeout,
        )
        .await?;
        let lock =
            ServerLock::build(&settings, &redis).await.context("failed to set up the distributed lock")?;

        let users = Arc::new(MySqlUserRepository::new(db.clone()));
        let points = Arc::new(MySqlPointRepository::new(db.clone()));
        let txm = Arc::new(MySqlTransactionManager::new(db.clone()));
        let lock_port: Arc<dyn application::lock::DistributedLock> = if settings.disable_locks_for_testing {
            tracing::error!(
                "DISABLE_LOCKS_FOR_TESTING=true: distributed locks are OFF; only the SQL guards keep writes exact. Never run this in production"
            );
            Arc::new(application::lock::NoLock)
        } else {
            // Behind a circuit breaker: while Redis is down, writes are refused (503) at once.
            match &lock {
                ServerLock::Single(lock) => {
                    Arc::new(BreakerLock::new(lock.clone(), BreakerSettings::default()))
                }
                ServerLock::Quorum(lock) => {
                    Arc::new(BreakerLock::new(lock.clone(), BreakerSettings::default()))
                }
            }
        };
        // A duplicate waits for the first request with its key: its lock wait plus its
        // longest hold.
        let idempotency = Idempotency::new(
            Arc::new(MySqlIdempotencyStore::new(db.clone())),
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
            settings.sse_max_streams,
        );
        let catalog = Catalog::new(Arc::new(MySqlCatalogRepository::new(db.clone())), cache);
        let bookings = Arc::new(MySqlBookingRepository::new(db.clone()));
        let hold_seat = HoldSeat::new(
            catalog.clone(),
            bookings.clone(),
            Arc::clone(&lock_port),
            txm.clone(),
            settings.reservation_hold,
            settings.max_holds_per_user,
        );
        let reservations =
            Reservations::new(catalog.clone(), bookings.clone(), Arc::clone(&lock_port), txm.clone());
        let outbox = Arc::new(MySqlOutboxStore::new(db.clone()));
        let pay = Pay::new(
            PayPorts {
                bookings,
                points: points.clone(),
                payments: Arc::new(MySqlPaymentRepository::new(db.clone())),
                coupons: Arc::new(adapters_mysql::coupons::MySqlCouponRepository::new(db.clone())),
                outbox: outbox.clone(),
                catalog: catalog.clone(),
                queue: Arc::clone(&queue),
                lock: Arc::clone(&lock_port),
                txm: txm.clone(),
                idempotency: idempotency.clone(),
            },
            settings.point_lock_wait,
        );
        let publisher = RedisEventPublisher::new(redis.pool.clone(), settings.payment_events_stream.clone());
        // The popular-concert ranking: hourly counts in Redis (under the cache's prefix, so
        // deployments sharing a Redis keep theirs apart), fed by the relay with each round's
        // published events, rebuilt from MySQL when Redis lost them.
        let ranking = application::ranking::Ranking::new(
            Arc::new(adapters_redis::ranking::RedisRanking::with_prefix(
                redis.pool.clone(),
                settings.cache_prefix.clone(),
            )),
            Arc::new(adapters_mysql::ranking::MySqlRankingSource::new(db.clone())),
            catalog.clone(),
            Arc::clone(&lock_port),
        );
        let relay = OutboxRelay::new(outbox, Arc::new(publisher.clone()), txm.clone(), settings.outbox_batch)
            .with_after_publish(Arc::new(ranking.clone()));
        let metrics = telemetry::prometheus();
        // Identity: the signing keys (the operator's, or the shared ones kept in MySQL,
        // created on the first start), and the JWT adapter that signs and verifies with them.
        let keyring = Arc::new(Keyring::default());
        let signing_keys = match &settings.auth_signing_keys {
            Some(keys) => {
                // The first signs; the others only verify (the keys being rotated out).
                let now = application::clock::now_utc();
                let keys = keys.iter().enumerate().map(|(i, secret)| {
                    let activates = if i == 0 { now } else { time::OffsetDateTime::UNIX_EPOCH };
                    SigningKey::from_operator(Secret::new(secret.clone()), activates)
                });
                keyring.replace(KeySet::new(keys.collect()));
                tracing::info!("access tokens are signed with the key set by AUTH_SIGNING_KEY");
                None
            }
            None => {
                let keys = SigningKeys::new(
                    Arc::new(MySqlSigningKeyStore::new(db.clone())),
                    Arc::clone(&keyring),
                    settings.auth_key_refresh,
                    settings.auth_token_lifetime,
                );
                keys.load().await.context("failed to load the access-token signing keys")?;
                Some(keys)
            }
        };
        let tokens = Arc::new(JwtTokens::new(keyring, settings.auth_token_lifetime));
        let verifier: crate::auth::Verifier = web::Data::new(tokens.clone() as Arc<dyn TokenVerifier>);
        let rate_limits =
            web::Data::new(RateLimits::new(settings.rate_limits, settings.trusted_proxies.clone()));
        let body_deadline = web::Data::new(crate::extract::BodyDeadline(settings.http_body_timeout));
        // First-come coupons: decided in Redis, kept in MySQL, reconciled between them.
        let coupon_repo: Arc<dyn domain::coupon::CouponRepository> =
            Arc::new(adapters_mysql::coupons::MySqlCouponRepository::new(db.clone()));
        let coupon_gate: Arc<dyn application::coupons::CouponGate> =
            Arc::new(adapters_redis::coupons::RedisCouponGate::new(redis.pool.clone()));
        let coupons = application::coupons::Coupons::new(
            Arc::clone(&coupon_repo),
            Arc::clone(&coupon_gate),
            Arc::clone(&lock_port),
            txm.clone(),
        )
        .with_strategy(settings.coupon_issue_strategy);
        let coupon_reconciler = application::coupons::Reconciler::new(coupon_repo, coupon_gate);
        let state = web::Data::new(AppState {
            create_user: CreateUser::new(users.clone(), points.clone(), txm.clone()),
            charge_points: ChargePoints::new(
                points.clone(),
                lock_port,
                txm,
                settings.point_lock_wait,
                idempotency.clone(),
            )
            .with_batches(settings.point_charge_batch_max)
            .with_strategy(settings.point_charge_strategy),
            get_balance: GetBalance::new(points.clone()),
            point_history: PointHistory::new(users.clone(), points),
            issue_token: IssueToken::new(users.clone(), Arc::clone(&queue)),
            sign_in: SignIn::new(users, tokens),
            signing_keys: signing_keys.clone(),
            seat_maps: crate::routes::catalog::RenderedSeatMaps::default(),
            queue_reader,
            queue_events: queue_events.clone(),
            catalog,
            hold_seat,
            reservations: reservations.clone(),
            pay,
            coupons,
            ranking,
        });
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ops_state = web::Data::new(OpsState {
            db: db.clone(),
            redis: redis.clone(),
            metrics: metrics.clone(),
            stopping: Arc::clone(&stopping),
        });
        // Both addresses taken before anything is served: a busy OPS_ADDR stops the start.
        let ops_listener = TcpListener::bind(&settings.ops_addr)
            .with_context(|| format!("OPS_ADDR: failed to listen on {}", settings.ops_addr))?;

        let requests = web::Data::new(crate::draining::Requests::new(Arc::clone(&stopping)));
        let admin_key = web::Data::new(AdminKey::new(settings.admin_api_key.as_deref()));
        let listener = TcpListener::bind(&settings.http_addr)
            .with_context(|| format!("failed to listen on {}", settings.http_addr))?;
        let address = listener.local_addr()?;
        let openapi = ApiDoc::openapi();
        let (limits, deadline, counted) = (rate_limits.clone(), body_deadline, requests.clone());
        let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let budget = settings.http_max_connections.unwrap_or_else(|| {
            connection_budget(std::fs::read_to_string("/proc/self/limits").ok().as_deref())
        });
        let per_worker = (budget / workers).max(1);
        tracing::info!(connections = budget, workers, "public listener connection cap");
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                // What the queue gate (`gate::Admitted`) reads tokens with.
                .app_data(gate.clone())
                .app_data(verifier.clone())
                .app_data(limits.clone())
                .app_data(deadline.clone())
                .app_data(admin_key.clone())
                .app_data(counted.clone())
                .app_data(web::QueryConfig::default().error_handler(|error, _| {
                    ApiError::validation("query", format!("the query string cannot be read: {error}")).into()
                }))
                // Inside `observe`, so that a request refused during a stop is logged and
                // counted like any other.
                .wrap(actix_web::middleware::from_fn(crate::draining::count))
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
        // With the event streams' own cap, what keeps one flood of connections from taking
        // every file descriptor (and the operations listener, the pools and the logs with
        // them). actix counts per worker thread.
        .max_connections(per_worker)
        .shutdown_timeout(settings.shutdown_grace_seconds)
        // SIGTERM and SIGINT are handled in `run_until_stopped`, which ends the event
        // streams before the graceful stop starts waiting for in-flight requests.
        .disable_signals()
        .run();

        let ops_address = ops_listener.local_addr()?;
        let ops_server = HttpServer::new(move || {
            App::new()
                .app_data(ops_state.clone())
                .wrap(actix_web::middleware::from_fn(crate::middleware::observe))
                .configure(routes::configure_ops)
                .default_service(web::to(routes::not_found))
        })
        .listen(ops_listener)?
        .workers(1)
        .max_connections(OPS_CONNECTIONS)
        .shutdown_timeout(1)
        .disable_signals()
        .run();

        let jobs = Jobs::spawn(
            JobPorts {
                metrics,
                idempotency,
                outbox: relay,
                stream: publisher,
                queue,
                reservations,
                event_fanout: events,
                signing_keys,
                rate_limits,
                coupons: coupon_reconciler,
            },
            &settings,
        );
        tracing::info!("operations listening on http://{ops_address}");
        tracing::info!("listening on http://{address}");
        let grace = Duration::from_secs(settings.shutdown_grace_seconds);
        Ok(Self {
            port: address.port(),
            ops_port: ops_address.port(),
            server,
            ops_server,
            db,
            redis,
            lock,
            jobs: Arc::new(jobs),
            queue_events,
            stopping,
            requests,
            grace,
        })
    }

    /// The port actually bound (useful with `HTTP_ADDR=...:0`).
    #[must_use]
    pub const fn port(&self) -> u16 {
        self.port
    }

    /// The operations listener's port (`OPS_ADDR`).
    #[must_use]
    pub const fn ops_port(&self) -> u16 {
        self.ops_port
    }

    /// Serves until SIGINT or SIGTERM; then takes no new connection (and closes each kept
    /// one after its next answer), lets every request running finish while refusing new
    /// ones with 503, then the writes whose clients have gone (both within one
    /// `SHUTDOWN_GRACE_SECONDS`), stops the jobs, then the workers, which close their
    /// connections (for up to the grace again; the rest are dropped), releases every lock
    /// this process may still hold (those of dropped requests included), and closes the
    /// connections to MySQL and Redis.
    ///
    /// No request runs while the workers stop one by one: each one's runtime ends with it,
    /// and with it the pooled connections it opened, which a request on another worker
    /// could otherwise still be using ([`crate::draining`]).
    ///
    /// # Errors
    /// When the server fails.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let queue_events = self.queue_events.clone();
        let grace = self.grace;
        let stopping = Arc::clone(&self.stopping);
        let requests = self.requests.clone();
        let jobs = Arc::clone(&self.jobs);
        let stopper = tokio::spawn(async move {
            stop_signal().await;
            stopping.store(true, std::sync::atomic::Ordering::SeqCst);
            tracing::info!("stopping: ending event streams, then letting requests finish");
            queue_events.close_all();
            let graceful = handle.clone();
            let requests = requests.clone();
            let jobs = Arc::clone(&jobs);
            tokio::spawn(async move {
                // No new connection; every request running is answered (the writes they
                // start included), new ones refused; then the writes whose clients have
                // gone end too; both within one grace. Then the jobs, which may hold a
                // pooled connection a worker opened. Only then may the workers stop (a
                // worker's runtime takes the tasks and connections it opened with it), and
                // their connections get the grace again.
                graceful.pause().await;
                let deadline = tokio::time::Instant::now() + grace;
                let open = requests.close_and_wait(grace).await;
                if open > 0 {
                    tracing::warn!(open, "requests still running after the grace; stopping anyway");
                }
                let left = application::detach::drain(
                    deadline.saturating_duration_since(tokio::time::Instant::now()),
                )
                .await;
                if left > 0 {
                    tracing::warn!(left, "writes still running after the grace; stopping anyway");
                }
                jobs.stop();
                graceful.stop(true).await;
            });
            // A second signal does not wait for the grace: stop now.
            stop_signal().await;
            tracing::warn!("second stop signal: stopping without waiting for requests");
            handle.stop(false).await;
        });
        let ops = self.ops_server.handle();
        let ops_served = tokio::spawn(self.ops_server);
        let served = self.server.await;
        stopper.abort();
        // Health answers until the public listener is done, then stops too.
        ops.stop(true).await;
        let _ = ops_served.await;
        self.jobs.stop();
        self.lock.release_all(RELEASE_AT_SHUTDOWN).await;
        self.redis.quit().await;
        self.db.close().await.ok();
        tracing::info!("stopped");
        served.context("the HTTP server failed")
    }
}

/// The lock an instance takes its keys on: on `REDIS_URL`, or over `REDIS_LOCK_NODES`.
enum ServerLock {
    Single(RedisLock),
    Quorum(QuorumLock),
}

impl ServerLock {
    async fn build(settings: &Settings, redis: &RedisConnections) -> anyhow::Result<Self> {
        let options = LockOptions {
            lease: settings.lock_lease,
            renew_every: settings.lock_lease / 3,
            max_hold: settings.lock_max_hold,
            wait: match settings.lock_wait_mode {
                LockWaitMode::PubSub => WaitStrategy::PubSub {
                    fallback_poll: DEFAULT_FALLBACK_POLL,
                    handoff_limit: settings.lock_handoff_limit,
                },
                LockWaitMode::Spin => {
                    WaitStrategy::Spin { initial: Duration::from_millis(5), max: Duration::from_millis(100) }
                }
            },
        };
        let Some(urls) = &settings.redis_lock_nodes else {
            return Ok(Self::Single(
                RedisLock::new(redis.pool.clone(), Some(&redis.subscriber), options).await?,
            ));
        };
        // Each node is asked once per attempt and never waited on: the quorum retries.
        let node_options = LockOptions {
            wait: WaitStrategy::Spin { initial: Duration::from_millis(5), max: Duration::from_millis(100) },
            ..options
        };
        let connected = futures::future::try_join_all(urls.iter().map(|url| {
            RedisConnections::connect_lock_node(url, settings.redis_pool_size, settings.lock_node_timeout)
        }))
        .await?;
        let mut nodes = Vec::with_capacity(urls.len());
        let mut reachable = 0;
        for ((pool, up), url) in connected.into_iter().zip(urls) {
            if up {
                reachable += 1;
            } else {
                tracing::warn!(node = %redact(url), "a lock node is not reachable; it is retried in the background");
            }
            nodes.push(RedisLock::new(pool, None, node_options).await?);
        }
        let lock = QuorumLock::new(
            nodes,
            QuorumOptions { node_timeout: settings.lock_node_timeout, ..QuorumOptions::default() },
        )?;
        // Fail at start, as with a single Redis, rather than start an instance that could
        // never take a lock.
        anyhow::ensure!(
            reachable >= lock.quorum(),
            "only {reachable} of {} REDIS_LOCK_NODES answered; a quorum lock needs {}",
            urls.len(),
            lock.quorum()
        );
        tracing::info!(
            nodes = urls.len(),
            quorum = lock.quorum(),
            "locks are taken on a quorum of Redis nodes"
        );
        Ok(Self::Quorum(lock))
    }

    async fn release_all(&self, within: Duration) -> usize {
        match self {
            Self::Single(lock) => lock.release_all(within).await,
            Self::Quorum(lock) => lock.release_all(within).await,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_cap_follows_the_open_file_limit() {
        let limits = |soft: &str| {
            format!(
                "Limit                     Soft Limit           Hard Limit           Units\n\
                 Max processes             95000                95000                processes\n\
                 Max open files            {soft:<20} 1048576              files\n"
            )
        };
        assert_eq!(connection_budget(Some(&limits("1024"))), 1024 - RESERVED_FDS);
        assert_eq!(connection_budget(Some(&limits("1048576"))), 25_000, "capped");
        assert_eq!(connection_budget(Some(&limits("100"))), 16, "never below a floor");
        assert_eq!(connection_budget(Some(&limits("unlimited"))), 25_000);
        assert_eq!(connection_budget(None), 25_000);
    }
}
