//! The public listener's requests, counted, so that a graceful stop ends the workers only
//! once none of them runs.
//!
//! actix stops its workers one by one, each as soon as its own connections are done, and
//! a worker's runtime ends with it. A pooled MySQL connection belongs to the runtime that
//! opened it: whichever worker's request needed one then. A request still running on
//! another worker that takes such a connection from the pool finds it dead, and under a
//! COMMIT that is `OUTCOME_UNKNOWN` (a sign-up answered so at a SIGTERM was how this
//! showed). So the stop first closes the door ([`Requests::close_and_wait`]: each new
//! request is refused with 503 `SERVICE_UNAVAILABLE`, `Retry-After` and nothing done) and
//! waits until no request runs; then it drains the writes whose clients have gone
//! (`application::detach::drain`) and stops the jobs, and only then may a worker stop.
//!
//! A load balancer that keeps connections to the instance sees those refusals: nginx, as
//! configured in `deploy/`, does not retry a 503 (a POST must not be sent twice), so the
//! instance should leave the balancer first (readiness answers 503 from the signal on;
//! Kubernetes' preStop waits for the endpoint to go).
//!
//! From the first stop signal on, every answer also carries `Connection: close`, so that
//! clients on kept-alive connections go to another instance instead of sending more here.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::ConnectionType;
use actix_web::middleware::Next;
use actix_web::{Error, ResponseError as _, web};
use application::detach::Registry;

use crate::problem::ApiError;

/// The public requests of one server, and whether it is stopping.
#[derive(Debug)]
pub struct Requests {
    running: Registry,
    /// Set at the first stop signal (readiness answers 503 from then on too).
    stopping: Arc<AtomicBool>,
}

impl Requests {
    /// Counts requests for a server whose stop is announced by `stopping`.
    #[must_use]
    pub const fn new(stopping: Arc<AtomicBool>) -> Self {
        Self { running: Registry::new(usize::MAX), stopping }
    }

    /// Refuses every new request from now on, logs how many run, then waits until they
    /// have been answered (or dropped by their clients), or `within` passed; returns how
    /// many still run.
    pub async fn close_and_wait(&self, within: Duration) -> usize {
        self.running.close();
        tracing::info!(running = self.running(), "no new request is taken; waiting for those running");
        self.running.close_and_wait(within).await
    }

    /// How many requests run now.
    #[must_use]
    pub fn running(&self) -> usize {
        self.running.running()
    }
}

/// Counts each request of a server that has [`Requests`] in its app data while it runs
/// (until its answer is back or its client has gone), refuses it once the server has
/// closed its door, and closes the connection after each answer once it is stopping.
///
/// # Errors
/// Whatever the inner service returns.
pub async fn count(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody + 'static>>, Error> {
    let Some(requests) = req.app_data::<web::Data<Requests>>().cloned() else {
        return next.call(req).await.map(ServiceResponse::map_into_left_body);
    };
    let Ok(_running) = requests.running.enter() else {
        let refusal = ApiError::Unavailable(
            "this instance is shutting down; nothing was done, retry (another instance will answer)".into(),
        )
        .error_response();
        let mut response = req.into_response(refusal).map_into_right_body();
        response.response_mut().head_mut().set_connection_type(ConnectionType::Close);
        return Ok(response);
    };
    let mut response = next.call(req).await?;
    if requests.stopping.load(Ordering::SeqCst) {
        response.response_mut().head_mut().set_connection_type(ConnectionType::Close);
    }
    Ok(response.map_into_left_body())
}

#[cfg(test)]
mod tests {
    use actix_web::{App, HttpResponse, test};

    use super::*;

    async fn slow(release: web::Data<tokio::sync::Notify>) -> HttpResponse {
        release.notified().await;
        HttpResponse::Ok().body("done")
    }

    #[actix_web::test]
    async fn a_stop_waits_for_the_requests_running_and_refuses_new_ones_with_nothing_done() {
        let stopping = Arc::new(AtomicBool::new(false));
        let requests = web::Data::new(Requests::new(Arc::clone(&stopping)));
        let release = web::Data::new(tokio::sync::Notify::new());
        let app = test::init_service(
            App::new()
                .app_data(requests.clone())
                .app_data(release.clone())
                .wrap(actix_web::middleware::from_fn(count))
                .route("/slow", web::get().to(slow))
                .route("/fast", web::get().to(|| async { HttpResponse::Ok().finish() })),
        )
        .await;

        // Before a stop: answered, the connection kept.
        let kept = test::call_service(&app, test::TestRequest::get().uri("/fast").to_request()).await;
        assert_eq!(kept.status(), 200);
        assert_ne!(kept.response().head().connection_type(), ConnectionType::Close);

        let running = test::call_service(&app, test::TestRequest::get().uri("/slow").to_request());
        let mut running = Box::pin(running);
        // Polled until the handler waits: then the request is counted.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while requests.running() == 0 {
            assert!(std::time::Instant::now() < deadline, "the request never started");
            tokio::select! {
                _ = &mut running => panic!("answered before its release"),
                () = tokio::task::yield_now() => {}
            }
        }
        stopping.store(true, Ordering::SeqCst);
        let closed = {
            let requests = requests.clone();
            actix_web::rt::spawn(async move { requests.close_and_wait(Duration::from_secs(60)).await })
        };
        // The door is closed (the stop runs till its first wait): a new request is refused.
        while !closed.is_finished() && requests.running.enter().is_ok() {
            tokio::task::yield_now().await;
        }
        let refused = test::call_service(&app, test::TestRequest::get().uri("/fast").to_request()).await;
        assert_eq!(refused.status(), 503);
        assert_eq!(refused.headers().get("retry-after").expect("Retry-After"), "1");
        assert_eq!(refused.headers().get("content-type").expect("type"), "application/problem+json");
        assert_eq!(refused.response().head().connection_type(), ConnectionType::Close);
        assert!(!closed.is_finished(), "the stop waits for the request running");

        release.notify_one();
        let answered = running.await;
        assert_eq!(answered.status(), 200, "the request running is answered");
        assert_eq!(answered.response().head().connection_type(), ConnectionType::Close);
        assert_eq!(closed.await.expect("stop"), 0, "nothing runs any more");
    }
}
