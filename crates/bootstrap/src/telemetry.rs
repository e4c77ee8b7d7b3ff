//! Logs (`tracing`) and metrics (Prometheus).

use std::io::IsTerminal as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::settings::LogFormat;

/// Where the HTTP library reports a connection it gave up on (a request line, header or
/// chunked body it could not parse, a peer that reset): `stream error: ...` at ERROR, one
/// line per connection, so anyone could fill the logs at will. Those events are not
/// printed; they are counted, and one WARN line a minute says how many there were
/// ([`report_malformed_requests`]). The library's other complaints are printed as they are.
const HTTP_DISPATCHER_TARGET: &str = "actix_http::h1::dispatcher";

/// Malformed requests since the last report.
static MALFORMED: AtomicU64 = AtomicU64::new(0);

/// Whether `event` is the HTTP dispatcher's per-connection `stream error`.
fn is_stream_error(event: &tracing::Event<'_>) -> bool {
    struct Message(bool);
    impl tracing::field::Visit for Message {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.0 = format!("{value:?}").starts_with("stream error");
            }
        }
    }
    let metadata = event.metadata();
    if metadata.target() != HTTP_DISPATCHER_TARGET || *metadata.level() != tracing::Level::ERROR {
        return false;
    }
    let mut message = Message(false);
    event.record(&mut message);
    message.0
}

/// Counts the HTTP dispatcher's stream errors instead of printing them.
struct MalformedRequests;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for MalformedRequests {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if is_stream_error(event) {
            MALFORMED.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("http_malformed_requests_total").increment(1);
        }
    }
}

/// Lets every event through but the dispatcher's stream errors (it restricts no level: the
/// log filter beside it does).
struct NotStreamErrors;

impl<S> tracing_subscriber::layer::Filter<S> for NotStreamErrors {
    fn enabled(&self, _: &tracing::Metadata<'_>, _: &tracing_subscriber::layer::Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        !is_stream_error(event)
    }

    fn max_level_hint(&self) -> Option<tracing_subscriber::filter::LevelFilter> {
        Some(tracing_subscriber::filter::LevelFilter::TRACE)
    }
}

/// Installs the log subscriber; a second call (tests) is a no-op.
pub fn init_logs(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal; escape codes in files and log shippers are noise.
    let ansi = std::io::stdout().is_terminal();
    let printed = tracing_subscriber::filter::FilterExt::and(filter, NotStreamErrors);
    let counted = MalformedRequests.with_filter(
        tracing_subscriber::filter::filter_fn(|metadata| {
            metadata.target() == HTTP_DISPATCHER_TARGET && *metadata.level() == tracing::Level::ERROR
        })
        .with_max_level_hint(tracing::Level::ERROR),
    );
    let registry = tracing_subscriber::registry().with(counted);
    let _ = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_target(false)
                    .with_ansi(false)
                    .with_filter(printed),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_target(false).with_ansi(ansi).with_filter(printed))
            .try_init(),
    };
}

/// One WARN line for the malformed requests of the last period, if there were any: what
/// the HTTP parser would have logged one ERROR line each for. Run every minute by a job.
pub fn report_malformed_requests() {
    let count = MALFORMED.swap(0, Ordering::Relaxed);
    if count > 0 {
        tracing::warn!(
            count,
            "malformed HTTP requests refused since the last report (each answered 400 and closed)"
        );
    }
}

/// Latency buckets, in seconds: from a cache hit to a request that waited out a lock.
const SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use.
///
/// # Panics
/// Never in practice: the bucket list is a valid constant and the recorder is installed
/// once per process.
#[must_use]
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(PrometheusBuilder::install_recorder)
                .unwrap_or_else(|error| panic!("the Prometheus recorder cannot be installed: {error}"))
        })
        .clone()
}
