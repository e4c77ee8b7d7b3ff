//! `payment-events`: a small consumer of the payment events stream. Prints each event
//! once, as a JSON line on stdout, however many times the outbox relay sent it (a resend
//! is acknowledged and reported on stderr); an event is acknowledged only after it was
//! printed.
//!
//! ```sh
//! cargo run --bin payment-events -- --once        # what is there now, then exit
//! cargo run --bin payment-events                  # follow
//! ```
//! Options: `--group NAME` (default `payment-events`), `--consumer NAME` (default the
//! host's name), `--visibility-ms MS` (default 30000: how long an event read stays this
//! consumer's; entries another consumer of the group left unacknowledged that long are
//! taken over and printed here, once). Environment: `REDIS_URL` (default
//! `redis://127.0.0.1:6379`), `PAYMENT_EVENTS_STREAM` (default `events:payments`).

#![allow(clippy::print_stdout, reason = "a command-line consumer prints what it reads")]

use std::time::Duration;

use adapters_redis::connection::{DEFAULT_COMMAND_TIMEOUT, RedisConnections};
use adapters_redis::events::{DEFAULT_VISIBILITY_TIMEOUT, EventConsumer, PAYMENTS_STREAM};
use anyhow::Context as _;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let mut once = false;
    let mut group = "payment-events".to_owned();
    let mut consumer = std::env::var("HOSTNAME").unwrap_or_else(|_| "consumer-1".to_owned());
    let mut visibility = DEFAULT_VISIBILITY_TIMEOUT;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--once" => once = true,
            "--group" => group = args.next().context("--group needs a name")?,
            "--consumer" => consumer = args.next().context("--consumer needs a name")?,
            "--visibility-ms" => {
                let ms: u64 = args
                    .next()
                    .context("--visibility-ms needs a number of milliseconds")?
                    .parse()
                    .context("--visibility-ms needs a number of milliseconds")?;
                anyhow::ensure!(ms > 0, "--visibility-ms must be positive");
                visibility = Duration::from_millis(ms);
            }
            other => {
                anyhow::bail!(
                    "unknown argument {other:?} (expected --once, --group NAME, --consumer NAME, --visibility-ms MS)"
                )
            }
        }
    }
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let stream = std::env::var("PAYMENT_EVENTS_STREAM").unwrap_or_else(|_| PAYMENTS_STREAM.to_owned());
    // Reads block for up to a second: longer than the command timeout of the server's pool.
    let redis = RedisConnections::connect(&url, 1, DEFAULT_COMMAND_TIMEOUT + Duration::from_secs(2)).await?;
    let events = EventConsumer::new(redis.pool.clone(), &stream, &group, &consumer)
        .with_visibility_timeout(visibility);
    events.ensure_group().await?;
    loop {
        let batch =
            events.poll(100, if once { Duration::from_millis(1) } else { Duration::from_secs(1) }).await?;
        for event in &batch {
            if event.first_time {
                let line = serde_json::json!({
                    "entry": event.entry,
                    "eventId": event.event_id,
                    "type": event.event_type,
                    "event": serde_json::from_str::<serde_json::Value>(&event.payload).unwrap_or(serde_json::Value::Null),
                });
                println!("{line}");
            } else {
                eprintln!("duplicate of event {} ignored (entry {})", event.event_id, event.entry);
            }
        }
        // Printed first, acknowledged after (well within the visibility timeout): a crash
        // in between prints them again, here after a restart or in another consumer of
        // the group once the timeout has passed.
        events.acknowledge(&batch).await?;
        if once && batch.is_empty() {
            break;
        }
    }
    redis.quit().await;
    Ok(())
}
