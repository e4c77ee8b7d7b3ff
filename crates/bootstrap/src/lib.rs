//! The `concert-server` binary's library: configuration, wiring and the HTTP API.
//!
//! This is the composition root. It is the only crate that knows every other one: it
//! reads [`settings::Settings`], builds the adapters, hands them to the use cases as ports
//! and serves the use cases over actix-web ([`startup::Application`]). Handlers translate
//! HTTP to use-case calls and back; they never open transactions or touch SQL or Redis.
//!
//! - [`settings`]: typed configuration from environment variables.
//! - [`startup`]: `Application::build` / `run_until_stopped`.
//! - [`jobs`]: the background jobs (admission, hold expiry, outbox relay, purges).
//! - [`routes`]: handlers and their DTOs, one module per resource.
//! - [`problem`]: every error as `application/problem+json`, mapped in one place.
//! - [`problem_responses`]: the problem answers many routes document alike, for OpenAPI.
//! - [`extract`]: the JSON body extractor that names the offending field.
//! - [`gate`]: the queue gate of the booking routes (`Queue-Token`, 401 / 403).
//! - [`idempotency_header`]: the `Idempotency-Key` and `Idempotent-Replayed` headers.
//! - [`middleware`]: request ids, request logs and HTTP metrics.
//! - [`draining`]: the requests a graceful stop waits for before the workers end.
//! - [`queue_events`]: the per-instance fan-out behind the queue's event streams.
//! - [`openapi`]: the OpenAPI document served with Swagger UI.
//! - [`telemetry`]: logs and the Prometheus recorder.

pub mod auth;
pub mod draining;
pub mod extract;
pub mod gate;
pub mod idempotency_header;
pub mod jobs;
pub mod limits;
pub mod middleware;
pub mod openapi;
pub mod problem;
pub mod problem_responses;
pub mod queue_events;
pub mod routes;
pub mod settings;
pub mod startup;
pub mod telemetry;
