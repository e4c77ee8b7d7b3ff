//! Payment events on a Redis Stream: the outbox relay's publisher, and an idempotent
//! consumer.
//!
//! Entries of `events:payments` carry `eventId`, `type`, `aggregateId` and `payload` (the
//! event's JSON). Publication is at least once (a relay that dies before marking its rows
//! sent publishes them again), so the consumer deduplicates by `eventId`: it records each
//! event under `{prefix}:{eventId}` with `SET NX` (kept 7 days) before acknowledging it,
//! and an event already recorded is acknowledged and reported as a duplicate.

use std::collections::HashMap;
use std::time::Duration;

use application::outbox::{EventPublisher, PendingEvent};
use async_trait::async_trait;
use fred::clients::Pool;
use fred::prelude::{KeysInterface, StreamsInterface};
use fred::types::Value;
use fred::types::streams::XReadResponse;

/// The stream payment events go to.
pub const PAYMENTS_STREAM: &str = "events:payments";

/// How many entries the stream keeps (approximately): far more than a consumer lags.
const STREAM_MAX_LEN: i64 = 1_000_000;

/// How long a consumer remembers an event it processed.
const PROCESSED_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Publishes outbox events to a stream.
#[derive(Clone, Debug)]
pub struct RedisEventPublisher {
    pool: Pool,
    stream: String,
}

impl RedisEventPublisher {
    #[must_use]
    pub fn new(pool: Pool, stream: impl Into<String>) -> Self {
        Self { pool, stream: stream.into() }
    }
}

#[async_trait]
impl EventPublisher for RedisEventPublisher {
    async fn publish(&self, event: &PendingEvent) -> anyhow::Result<()> {
        let fields = vec![
            ("eventId", event.id.to_string()),
            ("type", event.event_type.clone()),
            ("aggregateId", event.aggregate_id.to_string()),
            ("payload", event.payload.clone()),
        ];
        let _: String = self
            .pool
            .xadd(&self.stream, false, ("MAXLEN", "~", STREAM_MAX_LEN), "*", fields)
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to publish an event"))?;
        Ok(())
    }
}

/// An event as a consumer saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedEvent {
    /// The stream entry's id.
    pub entry: String,
    pub event_id: String,
    pub event_type: String,
    pub payload: String,
    /// `false`: an event this consumer group had processed already (a resend).
    pub first_time: bool,
}

/// Reads a stream as one member of a consumer group, processing each event once.
#[derive(Clone, Debug)]
pub struct EventConsumer {
    pool: Pool,
    stream: String,
    group: String,
    consumer: String,
    processed_prefix: String,
}

impl EventConsumer {
    /// A consumer `consumer` of `group` on `stream`; processed ids are kept under
    /// `{stream}:processed:{group}:{eventId}`.
    #[must_use]
    pub fn new(pool: Pool, stream: &str, group: &str, consumer: &str) -> Self {
        Self {
            pool,
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            processed_prefix: format!("{stream}:processed:{group}"),
        }
    }

    /// Creates the group (from the stream's start) and the stream if missing.
    ///
    /// # Errors
    /// When Redis fails (an existing group is not an error).
    pub async fn ensure_group(&self) -> anyhow::Result<()> {
        match self.pool.xgroup_create::<(), _, _, _>(&self.stream, &self.group, "0", true).await {
            Ok(()) => Ok(()),
            Err(e) if e.details().contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(anyhow::Error::new(e).context("failed to create the consumer group")),
        }
    }

    /// Reads up to `count` events (first those delivered to this consumer before and not
    /// acknowledged, e.g. after a crash; then new ones, waiting up to `block`), records
    /// each, acknowledges it, and returns them in stream order.
    ///
    /// # Errors
    /// When Redis fails; unacknowledged events are delivered again next time.
    pub async fn poll(&self, count: u64, block: Duration) -> anyhow::Result<Vec<ConsumedEvent>> {
        let mut events = self.read("0", count, None).await?;
        if events.is_empty() {
            let block = u64::try_from(block.as_millis()).unwrap_or(u64::MAX);
            events = self.read(">", count, Some(block)).await?;
        }
        let mut consumed = Vec::with_capacity(events.len());
        for (entry, fields) in events {
            let field = |name: &str| fields.get(name).cloned().unwrap_or_default();
            let event_id = field("eventId");
            let recorded: Option<String> = self
                .pool
                .set(
                    format!("{}:{event_id}", self.processed_prefix),
                    field("payload"),
                    Some(fred::types::Expiration::EX(
                        i64::try_from(PROCESSED_TTL.as_secs()).unwrap_or(i64::MAX),
                    )),
                    Some(fred::types::SetOptions::NX),
                    false,
                )
                .await
                .map_err(|e| anyhow::Error::new(e).context("failed to record an event"))?;
            let _: i64 = self
                .pool
                .xack(&self.stream, &self.group, entry.as_str())
                .await
                .map_err(|e| anyhow::Error::new(e).context("failed to acknowledge an event"))?;
            consumed.push(ConsumedEvent {
                entry,
                event_id,
                event_type: field("type"),
                payload: field("payload"),
                first_time: recorded.is_some(),
            });
        }
        Ok(consumed)
    }

    async fn read(
        &self,
        from: &str,
        count: u64,
        block: Option<u64>,
    ) -> anyhow::Result<Vec<(String, HashMap<String, String>)>> {
        let reply: Value = self
            .pool
            .xreadgroup(&self.group, &self.consumer, Some(count), block, false, &self.stream, from)
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to read the stream"))?;
        // A blocking read that timed out answers nil.
        if reply.is_null() {
            return Ok(Vec::new());
        }
        let response: XReadResponse<String, String, String, String> = reply
            .into_xread_response()
            .map_err(|e| anyhow::Error::new(e).context("unexpected stream reply"))?;
        Ok(response.into_values().flatten().collect())
    }
}
