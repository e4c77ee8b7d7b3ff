//! Payment events on a Redis Stream: the outbox relay's publisher, and an idempotent
//! consumer.
//!
//! Entries of `events:payments` carry `eventId`, `type`, `aggregateId` and `payload` (the
//! event's JSON). Publication is at least once (a relay that dies before marking its rows
//! sent publishes them again), so the consumer deduplicates by `eventId`: an event is
//! handled, then recorded under `{stream}:processed:{group}:{eventId}` (kept 7 days) and
//! acknowledged; one already recorded is reported as a duplicate and only acknowledged.

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

    /// Reads up to `count` events: first those delivered to this consumer before and never
    /// acknowledged (it crashed, or its acknowledgement failed), then new ones, waiting up
    /// to `block`. Each is flagged `first_time: false` when this group processed it
    /// already (a resend, or a repeat within the batch). Handle the new ones, then
    /// [`EventConsumer::acknowledge`] the batch: an event handled but not acknowledged is
    /// delivered again (at least once), never lost.
    ///
    /// # Errors
    /// When Redis fails; nothing is acknowledged then.
    pub async fn poll(&self, count: u64, block: Duration) -> anyhow::Result<Vec<ConsumedEvent>> {
        let mut events = self.read("0", count, None).await?;
        if events.is_empty() {
            let block = u64::try_from(block.as_millis()).unwrap_or(u64::MAX);
            events = self.read(">", count, Some(block)).await?;
        }
        let mut seen = std::collections::HashSet::new();
        let mut consumed = Vec::with_capacity(events.len());
        for (entry, fields) in events {
            let field = |name: &str| fields.get(name).cloned().unwrap_or_default();
            let event_id = field("eventId");
            let processed: bool = self
                .pool
                .exists(self.processed_key(&event_id))
                .await
                .map_err(|e| anyhow::Error::new(e).context("failed to look up an event"))?;
            let first_time = !processed && seen.insert(event_id.clone());
            consumed.push(ConsumedEvent {
                entry,
                event_id,
                event_type: field("type"),
                payload: field("payload"),
                first_time,
            });
        }
        Ok(consumed)
    }

    /// Records `events` as processed by this group (kept 7 days) and acknowledges them.
    /// Call it once they are handled.
    ///
    /// # Errors
    /// When Redis fails: what was not acknowledged is delivered again, as a duplicate if it
    /// was recorded.
    pub async fn acknowledge(&self, events: &[ConsumedEvent]) -> anyhow::Result<()> {
        let ttl = i64::try_from(PROCESSED_TTL.as_secs()).unwrap_or(i64::MAX);
        for event in events {
            let _: Option<String> = self
                .pool
                .set(
                    self.processed_key(&event.event_id),
                    "1",
                    Some(fred::types::Expiration::EX(ttl)),
                    Some(fred::types::SetOptions::NX),
                    false,
                )
                .await
                .map_err(|e| anyhow::Error::new(e).context("failed to record an event"))?;
            let _: i64 = self
                .pool
                .xack(&self.stream, &self.group, event.entry.as_str())
                .await
                .map_err(|e| anyhow::Error::new(e).context("failed to acknowledge an event"))?;
        }
        Ok(())
    }

    fn processed_key(&self, event_id: &str) -> String {
        format!("{}:{event_id}", self.processed_prefix)
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
