//! Operations: liveness, readiness, metrics, served on the operations listener
//! (`OPS_ADDR`) only.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use adapters_mysql::DatabaseConnection;
use adapters_redis::connection::RedisConnections;
use serde::Serialize;
use utoipa::ToSchema;

use crate::problem::{ApiError, Problem};

/// How long a readiness check waits for each dependency.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the operations listener's handlers share: what readiness checks, and the metrics.
#[derive(Clone)]
pub struct OpsState {
    pub db: DatabaseConnection,
    pub redis: RedisConnections,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Set when the instance starts stopping: readiness answers 503 from then on, so the
    /// load balancer sends nothing more while the requests in flight end.
    pub stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for OpsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpsState").finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    #[schema(example = "UP")]
    pub status: &'static str,
    /// Per dependency: `UP` or `DOWN`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks: Option<Checks>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Checks {
    pub mysql: &'static str,
    pub redis: &'static str,
}

/// Always 200 while the process runs.
#[utoipa::path(
    get,
    path = "/health/live",
    tag = "operations",
    responses((status = 200, description = "The process runs", body = HealthResponse))
)]
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(HealthResponse { status: "UP", checks: None })
}

/// 200 when MySQL and Redis both answer, else 503 naming which did not; 503 once the
/// instance is stopping.
#[utoipa::path(
    get,
    path = "/health/ready",
    tag = "operations",
    responses(
        (status = 200, description = "MySQL and Redis both answer", body = HealthResponse),
        (status = 503, description = "NOT_READY: a dependency is down; `checks` names it", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn ready(state: web::Data<OpsState>) -> HttpResponse {
    if state.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        let problem = ApiError::NotReady("this instance is stopping".into()).problem();
        return HttpResponse::ServiceUnavailable()
            .insert_header((header::CONTENT_TYPE, "application/problem+json"))
            .insert_header((header::RETRY_AFTER, "1"))
            .json(problem);
    }
    let readiness = &state;
    let (mysql, redis) = futures::join!(
        tokio::time::timeout(CHECK_TIMEOUT, adapters_mysql::database::ping(&readiness.db)),
        tokio::time::timeout(CHECK_TIMEOUT, readiness.redis.ping()),
    );
    let up = |ok: bool| if ok { "UP" } else { "DOWN" };
    let checks = Checks { mysql: up(matches!(mysql, Ok(Ok(())))), redis: up(matches!(redis, Ok(Ok(())))) };
    if checks.mysql == "UP" && checks.redis == "UP" {
        return HttpResponse::Ok().json(HealthResponse { status: "UP", checks: Some(checks) });
    }
    let down: Vec<&str> = [("mysql", checks.mysql), ("redis", checks.redis)]
        .into_iter()
        .filter(|(_, state)| *state == "DOWN")
        .map(|(name, _)| name)
        .collect();
    tracing::warn!(?down, "not ready");
    let problem = ApiError::NotReady(format!("not answering: {}", down.join(", "))).problem();
    HttpResponse::ServiceUnavailable()
        .insert_header((header::CONTENT_TYPE, "application/problem+json"))
        .json(NotReady { problem, checks })
}

/// The readiness problem, with which dependency is down.
#[derive(Debug, Serialize)]
struct NotReady {
    #[serde(flatten)]
    problem: Problem,
    checks: Checks,
}

/// Prometheus text format.
pub async fn metrics(state: web::Data<OpsState>) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(state.metrics.render())
}
