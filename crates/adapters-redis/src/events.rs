//! Payment events on a Redis Stream: the outbox relay's publisher, and an idempotent
//! consumer.
//!
//! Entries of `events:payments` carry `eventId`, `type`, `aggregateId` and `payload` (the
//! event's JSON).
//!
//! # What a publication guarantees
//!
//! The outbox relay marks a row sent once [`RedisEventPublisher::publish`] returns `Ok`:
//! from then on nothing resends it, so "published" must mean "will not be lost". What
//! Redis promises at that point depends on the deployment (this module configures none
//! of it; `docs/payments.md` says what to set):
//!
//! | deployment | an event `publish` confirmed |
//! |---|---|
//! | one node, no AOF (RDB snapshots or nothing) | is in memory only: a crash or restart before the next snapshot loses it, and nothing resends it |
//! | one node, `appendonly yes`, `appendfsync everysec` | can be lost with up to about a second of writes on a crash |
//! | one node, `appendonly yes`, `appendfsync always` | is on that node's disk (fsynced before `XADD` answers): durable on that node |
//! | a primary with replicas | was also received by the replicas `WAIT` asked for ([`ReplicaAcks`]): a failover to one of them keeps it |
//!
//! With replicas, `publish` runs `WAIT` after its `XADD` (on the same connection) and
//! fails when fewer replicas acknowledged than it required: the row stays unsent and the
//! next round publishes it again (a duplicate entry, which consumers drop). `WAIT` means
//! *received* (in the replicas' memory), not written to their disks.
//!
//! # At least once, handled once per group
//!
//! Publication is at least once (a relay that dies between `XADD` and its commit, or a
//! `WAIT` that fell short, publishes the event again), so one event may sit in the stream
//! under several entries. [`EventConsumer`] makes a group handle each event once:
//! reading an entry, a consumer *claims* its event id under
//! `{stream}:processed:{group}:{eventId}` (value `{consumer}:claimed:{entry}`, expiring
//! after the visibility timeout) before anything handles it; a copy whose event another
//! entry has claimed, or that was handled (`done`, kept 7 days), is reported as a
//! duplicate and only acknowledged. An entry a consumer read and never acknowledged (it
//! died) is taken over by another consumer of the group with `XAUTOCLAIM` once it has
//! been idle for the visibility timeout; by then the dead consumer's claim has expired
//! too, and the taker claims and handles the event. A live consumer whose handling may
//! outlast the visibility timeout calls [`EventConsumer::keep`] meanwhile (claims renewed,
//! entries' idle time reset); a claim found lost there is an error, never a silent second
//! handling.
//!
//! # Trimming
//!
//! The stream is not capped at `XADD`: [`RedisEventPublisher::trim`] deletes only the
//! entries every consumer group has acknowledged (`XTRIM MINID`), so a slow or stopped
//! consumer never loses an event; the price is that the stream grows while a group lags.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use application::outbox::{EventPublisher, PendingEvent};
use async_trait::async_trait;
use fred::clients::{Client, Pool, WithOptions};
use fred::prelude::{ClientLike as _, KeysInterface, ServerInterface as _, StreamsInterface};
use fred::types::scripts::Script;
use fred::types::streams::XReadResponse;
use fred::types::{Expiration, InfoKind, Value};

/// The stream payment events go to.
pub const PAYMENTS_STREAM: &str = "events:payments";

/// How long a consumer group remembers an event it handled.
const PROCESSED_TTL: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// What the processed key of an event handled by its group holds.
const DONE: &str = "done";

/// How long an entry read by a consumer is its own, by default: its claim on the event
/// lasts this long, and an entry unacknowledged for this long may be taken over by
/// another consumer of the group. Handle and acknowledge well within it.
pub const DEFAULT_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `publish` waits for replicas to acknowledge an event, by default. Keep it
/// below the pool's command timeout (`WAIT` blocks its connection meanwhile).
pub const DEFAULT_REPLICA_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the publisher trusts its count of online replicas before asking again.
const REPLICA_COUNT_TTL: Duration = Duration::from_secs(5);

/// Claims an event id for one entry of one consumer (see the script's header).
const CLAIM_LUA: &str = include_str!("lua/events_claim.lua");

/// How many replicas must have received an event before its publication counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReplicaAcks {
    /// Every replica online when it is published (from `INFO replication`, cached for a
    /// few seconds); no `WAIT` at all when there is none. A replica that drops out is
    /// no longer waited for once the publisher notices (at most one failed publish).
    #[default]
    AllConnected,
    /// At least this many, whatever is online: publications fail (and the outbox keeps
    /// its rows) while fewer answer. `AtLeast(0)` never waits.
    AtLeast(u32),
}

/// Publishes outbox events to a stream, durably as far as the deployment allows (see
/// the module docs). Cheap to clone.
#[derive(Clone)]
pub struct RedisEventPublisher {
    pool: Pool,
    stream: String,
    replica_acks: ReplicaAcks,
    replica_ack_timeout: Duration,
    /// Online replicas, and when that was read.
    replicas: Arc<Mutex<Option<(Instant, u64)>>>,
}

impl fmt::Debug for RedisEventPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisEventPublisher")
            .field("stream", &self.stream)
            .field("replica_acks", &self.replica_acks)
            .field("replica_ack_timeout", &self.replica_ack_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisEventPublisher {
    /// Publishes to `stream`, waiting for every online replica
    /// ([`ReplicaAcks::AllConnected`]) for up to [`DEFAULT_REPLICA_ACK_TIMEOUT`].
    #[must_use]
    pub fn new(pool: Pool, stream: impl Into<String>) -> Self {
        Self {
            pool,
            stream: stream.into(),
            replica_acks: ReplicaAcks::default(),
            replica_ack_timeout: DEFAULT_REPLICA_ACK_TIMEOUT,
            replicas: Arc::new(Mutex::new(None)),
        }
    }

    /// How many replicas must acknowledge each event.
    #[must_use]
    pub fn with_replica_acks(mut self, replica_acks: ReplicaAcks) -> Self {
        self.replica_acks = replica_acks;
        self
    }

    /// How long to wait for them (`WAIT`'s timeout) before the publication fails.
    #[must_use]
    pub fn with_replica_ack_timeout(mut self, timeout: Duration) -> Self {
        self.replica_ack_timeout = timeout;
        self
    }

    /// Deletes the entries every consumer group of the stream has acknowledged, and only
    /// those: it keeps everything from the oldest entry some group has not acknowledged,
    /// that is the smallest, over the groups (`XINFO GROUPS`), of the oldest pending
    /// entry (`XPENDING`) and the entry after the last delivered one (`XTRIM MINID`,
    /// exact). Returns how many entries went. Run it periodically (every minute is
    /// plenty); it is safe on every instance at once.
    ///
    /// With no consumer group it deletes nothing and warns: the stream then grows until a
    /// group exists (a deliberate choice: no cap can tell an unread event from a read
    /// one). A group created later starts from what is left: create groups before
    /// events they must see are trimmed (at deployment, or at `$`).
    ///
    /// Metric: `events_stream_entries` (the stream's length after trimming).
    ///
    /// # Errors
    /// When Redis fails or answers something unexpected; nothing is deleted then.
    pub async fn trim(&self) -> anyhow::Result<u64> {
        let groups = match self.pool.xinfo_groups::<Value, _>(&self.stream).await {
            Ok(groups) => groups,
            // No stream yet: nothing to trim.
            Err(e) if e.details().contains("no such key") => return Ok(0),
            Err(e) => {
                return Err(anyhow::Error::new(e).context("failed to list the stream's consumer groups"));
            }
        };
        let mut keep_from: Option<StreamId> = None;
        let mut names = Vec::new();
        for group in groups.into_array() {
            if group.is_null() {
                continue;
            }
            let mut fields: HashMap<String, Value> = group
                .convert()
                .map_err(|e| anyhow::Error::new(e).context("unexpected XINFO GROUPS reply"))?;
            let name = fields
                .remove("name")
                .and_then(Value::into_string)
                .ok_or_else(|| anyhow::anyhow!("XINFO GROUPS named no group: {fields:?}"))?;
            let last_delivered = fields
                .remove("last-delivered-id")
                .and_then(Value::into_string)
                .and_then(|id| StreamId::parse(&id))
                .ok_or_else(|| anyhow::anyhow!("group {name}: no last-delivered-id in {fields:?}"))?;
            let mut oldest = last_delivered.successor();
            if let Some(pending) = self.oldest_pending(&name).await? {
                oldest = oldest.min(pending);
            }
            keep_from = Some(keep_from.map_or(oldest, |k| k.min(oldest)));
            names.push(name);
        }
        let trimmed = if let Some(keep_from) = keep_from {
            let trimmed: u64 = self
                .pool
                .xtrim(&self.stream, ("MINID", "=", keep_from.to_string()))
                .await
                .map_err(|e| anyhow::Error::new(e).context("failed to trim the stream"))?;
            tracing::debug!(
                stream = %self.stream,
                groups = ?names,
                %keep_from,
                trimmed,
                "event stream trimmed"
            );
            trimmed
        } else {
            0
        };
        let length: u64 = self
            .pool
            .xlen(&self.stream)
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to read the stream's length"))?;
        if keep_from.is_none() && length > 0 {
            tracing::warn!(
                stream = %self.stream,
                length,
                "no consumer group reads the event stream: nothing is trimmed and it keeps growing"
            );
        }
        #[allow(clippy::cast_precision_loss, reason = "a gauge")]
        metrics::gauge!("events_stream_entries").set(length as f64);
        Ok(trimmed)
    }

    /// The oldest entry `group` has delivered and not had acknowledged, if any.
    async fn oldest_pending(&self, group: &str) -> anyhow::Result<Option<StreamId>> {
        let summary: Value = self
            .pool
            .xpending(&self.stream, group, ())
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to read a group's pending entries"))?;
        // [count, smallest id, greatest id, [[consumer, count], ...]]; nils when empty.
        let mut parts = summary.into_array().into_iter();
        let count = parts.next().and_then(|count| count.as_u64()).unwrap_or(0);
        if count == 0 {
            return Ok(None);
        }
        let oldest =
            parts.next().and_then(Value::into_string).and_then(|id| StreamId::parse(&id)).ok_or_else(
                || anyhow::anyhow!("group {group}: {count} pending entries but no smallest id"),
            )?;
        Ok(Some(oldest))
    }

    /// Waits until the replicas this publisher requires have what `client` wrote.
    async fn confirm_replicated(&self, client: &Client, event: &PendingEvent) -> anyhow::Result<()> {
        // On a cluster: the stream's node, whose replicas are the ones that count.
        let client = &crate::slots::routed_to(client, &self.stream);
        let required = match self.replica_acks {
            ReplicaAcks::AtLeast(n) => u64::from(n),
            ReplicaAcks::AllConnected => self.online_replicas(client).await?,
        };
        if required == 0 {
            return Ok(());
        }
        let timeout = i64::try_from(self.replica_ack_timeout.as_millis()).unwrap_or(i64::MAX).max(1);
        let acknowledged: i64 = client
            .wait(i64::try_from(required).unwrap_or(i64::MAX), timeout)
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to wait for the replicas"))?;
        let acknowledged = u64::try_from(acknowledged).unwrap_or(0);
        if acknowledged < required {
            // A replica may have gone: count them again next time.
            *self.replicas.lock().unwrap_or_else(PoisonError::into_inner) = None;
            metrics::counter!("events_replica_ack_shortfall_total").increment(1);
            anyhow::bail!(
                "event {} reached {acknowledged} of {required} replicas within {:?}; it stays unsent",
                event.id,
                self.replica_ack_timeout
            );
        }
        Ok(())
    }

    /// Replicas online now, as of at most [`REPLICA_COUNT_TTL`] ago.
    async fn online_replicas(&self, client: &WithOptions<Client>) -> anyhow::Result<u64> {
        let cached = *self.replicas.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, replicas)) = cached.filter(|(at, _)| at.elapsed() < REPLICA_COUNT_TTL) {
            return Ok(replicas);
        }
        let info: String = client
            .info(Some(InfoKind::Replication))
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to read INFO replication"))?;
        let replicas = count_online_replicas(&info);
        *self.replicas.lock().unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), replicas));
        Ok(replicas)
    }
}

#[async_trait]
impl EventPublisher for RedisEventPublisher {
    /// `XADD`s `event`, then, with replicas, `WAIT`s for them (see [`ReplicaAcks`]).
    ///
    /// # Errors
    /// When Redis fails, or fewer replicas than required acknowledged in time: the event
    /// may be in the stream all the same, and will be published again.
    async fn publish(&self, event: &PendingEvent) -> anyhow::Result<()> {
        let fields = vec![
            ("eventId", event.id.to_string()),
            ("type", event.event_type.clone()),
            ("aggregateId", event.aggregate_id.to_string()),
            ("payload", event.payload.clone()),
        ];
        // `WAIT` counts the writes of its own connection: both go through one client.
        let client = self.pool.next();
        let _: String = client
            .xadd(&self.stream, false, None::<()>, "*", fields)
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to publish an event"))?;
        self.confirm_replicated(client, event).await
    }
}

/// Counts the `slaveN:...,state=online,...` lines of `INFO replication`: replicas still
/// loading their first copy are connected but acknowledge nothing yet, so waiting for
/// them would only fail.
fn count_online_replicas(info: &str) -> u64 {
    let online = info
        .lines()
        .filter_map(|line| line.trim().strip_prefix("slave")?.split_once(':'))
        .filter(|(n, fields)| {
            !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
                && fields.split(',').any(|f| f == "state=online")
        })
        .count();
    u64::try_from(online).unwrap_or(u64::MAX)
}

/// A stream entry id, `ms-seq`, ordered as Redis orders them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct StreamId(u64, u64);

impl StreamId {
    fn parse(id: &str) -> Option<Self> {
        let (ms, seq) = id.split_once('-')?;
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }

    /// The smallest id after this one.
    fn successor(self) -> Self {
        match self.1.checked_add(1) {
            Some(seq) => Self(self.0, seq),
            None => Self(self.0.saturating_add(1), 0),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
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
    /// `false`: a copy of an event this consumer group handled, or is handling under
    /// another entry (a resend): acknowledge it, do not handle it.
    pub first_time: bool,
}

/// What a consumer may do with an entry it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// The event is this entry's to handle.
    Ours,
    /// The event was handled, or another entry holds it: acknowledge this copy only.
    Duplicate,
    /// This very entry was claimed by another consumer, which may still be handling it
    /// (we took the entry over while its claim lasted): neither handle nor acknowledge
    /// it now; it is read again, and decided then.
    HeldElsewhere,
}

/// Decides from what the processed key held (`None`: nothing, and the claim is now ours).
fn decide(held: Option<&str>, mine: &str, entry: &str) -> Claim {
    match held {
        None => Claim::Ours,
        Some(held) if held == mine => Claim::Ours,
        Some(held) if held.strip_suffix(entry).is_some_and(|claimer| claimer.ends_with(":claimed:")) => {
            Claim::HeldElsewhere
        }
        // `done`, or a claim through another entry (which stays pending until that event
        // is done, and is taken over if its consumer dies).
        Some(_) => Claim::Duplicate,
    }
}

/// Reads a stream as one member of a consumer group, handling each event once per group
/// however many entries carry it (see the module docs). Cheap to clone; clones are the
/// same consumer.
#[derive(Clone, Debug)]
pub struct EventConsumer {
    pool: Pool,
    stream: String,
    group: String,
    consumer: String,
    processed_prefix: String,
    visibility_timeout: Duration,
    claim: Script,
    /// Where the next `XAUTOCLAIM` scan of the group's pending entries starts.
    takeover_cursor: Arc<Mutex<String>>,
}

impl EventConsumer {
    /// A consumer `consumer` of `group` on `stream`, with the
    /// [`DEFAULT_VISIBILITY_TIMEOUT`]; event ids are claimed and recorded under
    /// `{stream}:processed:{group}:{eventId}`.
    #[must_use]
    pub fn new(pool: Pool, stream: &str, group: &str, consumer: &str) -> Self {
        Self {
            pool,
            stream: stream.to_owned(),
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            processed_prefix: format!("{stream}:processed:{group}"),
            visibility_timeout: DEFAULT_VISIBILITY_TIMEOUT,
            claim: Script::from_lua(CLAIM_LUA),
            takeover_cursor: Arc::new(Mutex::new("0-0".to_owned())),
        }
    }

    /// How long an entry read stays this consumer's (its claim's lifetime, and how long
    /// unacknowledged before another consumer may take it over). Every consumer of a
    /// group should use the same; handling and acknowledging must fit well within it,
    /// or another consumer may handle the event too.
    #[must_use]
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = timeout.max(Duration::from_millis(1));
        self
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

    /// Reads up to `count` events: first it takes over the group's entries left
    /// unacknowledged for the visibility timeout by any consumer (`XAUTOCLAIM`: one that
    /// died, or this one before a restart); then returns those delivered to this consumer
    /// and never acknowledged; when there are none, new ones, waiting up to `block`.
    ///
    /// Each event is claimed for this consumer before it is returned `first_time: true`:
    /// only one consumer of the group gets it so. A copy whose event was handled, or is
    /// claimed through another entry, comes back `first_time: false`. An entry this
    /// consumer took over while the claim of the consumer it came from still lasts is not
    /// returned yet: it is read again at a later poll. Handle the new ones, then
    /// [`EventConsumer::acknowledge`] the whole batch, within the visibility timeout: an
    /// event handled but not acknowledged is delivered again (at least once), never lost.
    ///
    /// # Errors
    /// When Redis fails; nothing is acknowledged then.
    pub async fn poll(&self, count: u64, block: Duration) -> anyhow::Result<Vec<ConsumedEvent>> {
        self.take_over_abandoned(count).await?;
        let mut consumed = self.claim_all(self.read("0", count, None).await?).await?;
        if consumed.is_empty() {
            let block = u64::try_from(block.as_millis()).unwrap_or(u64::MAX);
            consumed = self.claim_all(self.read(">", count, Some(block)).await?).await?;
        }
        Ok(consumed)
    }

    /// Marks the events handled (`first_time` ones: kept 7 days, replacing the claim) and
    /// acknowledges every entry. Call it once the new ones are handled.
    ///
    /// # Errors
    /// When Redis fails: what was not acknowledged is delivered again, as a duplicate if it
    /// was marked.
    pub async fn acknowledge(&self, events: &[ConsumedEvent]) -> anyhow::Result<()> {
        let ttl = i64::try_from(PROCESSED_TTL.as_secs()).unwrap_or(i64::MAX);
        for event in events {
            // A duplicate leaves the key alone: it may be another entry's live claim,
            // and marking it done would make that entry's taker drop the event.
            if event.first_time {
                let _: () = self
                    .pool
                    .set(self.processed_key(&event.event_id), DONE, Some(Expiration::EX(ttl)), None, false)
                    .await
                    .map_err(|e| anyhow::Error::new(e).context("failed to record an event"))?;
            }
            let _: i64 = self
                .pool
                .xack(&self.stream, &self.group, event.entry.as_str())
                .await
                .map_err(|e| anyhow::Error::new(e).context("failed to acknowledge an event"))?;
        }
        Ok(())
    }

    /// Keeps `events` (a batch [`EventConsumer::poll`] returned) this consumer's while it
    /// is still handling them: each `first_time` event's claim is renewed for another
    /// visibility timeout, and every entry's idle time is reset (`XCLAIM ... JUSTID`), so
    /// that no other consumer of the group takes them over. Call it more often than the
    /// visibility timeout when handling may take longer than that.
    ///
    /// # Errors
    /// When Redis fails, or when claims were lost already (they ran out and another
    /// consumer claimed those events): the error names them; stop handling those (the
    /// others are kept all the same).
    pub async fn keep(&self, events: &[ConsumedEvent]) -> anyhow::Result<()> {
        let mut lost = Vec::new();
        let mut kept = Vec::with_capacity(events.len());
        for event in events {
            if event.first_time {
                let (claim, made_now) = self.claim(&event.event_id, &event.entry).await?;
                if claim != Claim::Ours {
                    lost.push(event.event_id.clone());
                    continue;
                }
                if made_now {
                    // Ours again, but it had lapsed: the calls come too seldom.
                    tracing::warn!(event = %event.event_id, "a claim had lapsed before it was kept");
                }
            }
            kept.push(event.entry.clone());
        }
        // Every entry still ours is kept, even when some claim was lost.
        if !kept.is_empty() {
            let mut args =
                vec![self.stream.clone(), self.group.clone(), self.consumer.clone(), "0".to_owned()];
            args.extend(kept);
            args.push("JUSTID".to_owned());
            let _: fred::types::Value = self
                .pool
                .next()
                .custom(fred::cmd!("XCLAIM"), args)
                .await
                .map_err(|e| anyhow::Error::new(e).context("failed to keep entries"))?;
        }
        anyhow::ensure!(
            lost.is_empty(),
            "the claims on events {lost:?} ran out and another consumer took them: stop handling those"
        );
        Ok(())
    }

    /// Runs the claim script for `event_id` through `entry` (a new claim, or this very
    /// claim renewed): what this consumer may do with the event, and whether the key was
    /// free (the claim made now rather than renewed).
    async fn claim(&self, event_id: &str, entry: &str) -> anyhow::Result<(Claim, bool)> {
        let mine = format!("{}:claimed:{entry}", self.consumer);
        let held: Option<String> = self
            .claim
            .evalsha_with_reload(
                self.pool.next(),
                vec![self.processed_key(event_id)],
                vec![mine.clone(), self.visibility_ms().to_string()],
            )
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to claim an event"))?;
        Ok((decide(held.as_deref(), &mine, entry), held.is_none()))
    }

    fn processed_key(&self, event_id: &str) -> String {
        format!("{}:{event_id}", self.processed_prefix)
    }

    fn visibility_ms(&self) -> u64 {
        u64::try_from(self.visibility_timeout.as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// Moves to this consumer up to `count` of the group's entries idle for the
    /// visibility timeout (ids only: they are then read as this consumer's own).
    async fn take_over_abandoned(&self, count: u64) -> anyhow::Result<()> {
        let start = self.takeover_cursor.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let reply: Value = self
            .pool
            .xautoclaim(
                &self.stream,
                &self.group,
                &self.consumer,
                self.visibility_ms(),
                start.as_str(),
                Some(count),
                true,
            )
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to take over abandoned entries"))?;
        // [next start ("0-0": the scan is over), [ids taken], [ids deleted meanwhile]]
        let mut parts = reply.into_array().into_iter();
        let next = parts.next().and_then(Value::into_string).unwrap_or_else(|| "0-0".to_owned());
        let taken =
            parts.next().map_or(0, |ids| ids.into_array().into_iter().filter(|id| !id.is_null()).count());
        *self.takeover_cursor.lock().unwrap_or_else(PoisonError::into_inner) = next;
        if taken > 0 {
            tracing::info!(
                stream = %self.stream,
                group = %self.group,
                consumer = %self.consumer,
                taken,
                "took over event entries left unacknowledged past the visibility timeout"
            );
            metrics::counter!("events_taken_over_total").increment(taken as u64);
        }
        Ok(())
    }

    /// Claims each entry's event; leaves out entries held by another consumer.
    async fn claim_all(
        &self,
        entries: Vec<(String, HashMap<String, String>)>,
    ) -> anyhow::Result<Vec<ConsumedEvent>> {
        let mut consumed = Vec::with_capacity(entries.len());
        for (entry, fields) in entries {
            let field = |name: &str| fields.get(name).cloned().unwrap_or_default();
            let event_id = field("eventId");
            let first_time = match self.claim(&event_id, &entry).await?.0 {
                Claim::Ours => true,
                Claim::Duplicate => false,
                Claim::HeldElsewhere => {
                    tracing::debug!(
                        %entry,
                        %event_id,
                        "event still claimed by the consumer it was taken from: read again later"
                    );
                    continue;
                }
            };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_replicas_online_are_counted() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:3\r\n\
            slave0:ip=10.0.0.2,port=6379,state=online,offset=42,lag=0\r\n\
            slave1:ip=10.0.0.3,port=6379,state=wait_bgsave,offset=0,lag=0\r\n\
            slave2:ip=10.0.0.4,port=6379,state=online,offset=42,lag=1\r\n\
            slave_read_only:1\r\nmaster_repl_offset:42\r\n";
        assert_eq!(count_online_replicas(info), 2);
        assert_eq!(count_online_replicas("# Replication\r\nrole:master\r\nconnected_slaves:0\r\n"), 0);
    }

    #[test]
    fn stream_ids_order_like_redis_and_have_successors() {
        let a = StreamId::parse("1700000000000-9").expect("an id");
        let b = StreamId::parse("1700000000001-0").expect("an id");
        assert!(a < b);
        assert_eq!(a.successor().to_string(), "1700000000000-10");
        assert_eq!(StreamId(5, u64::MAX).successor(), StreamId(6, 0));
        assert_eq!(StreamId::parse("0-0").expect("an id").successor().to_string(), "0-1");
        assert!(StreamId::parse("nonsense").is_none());
    }

    #[test]
    fn a_claim_is_ours_a_duplicate_or_held_elsewhere() {
        let mine = "c1:claimed:5-0";
        assert_eq!(decide(None, mine, "5-0"), Claim::Ours);
        assert_eq!(decide(Some(mine), mine, "5-0"), Claim::Ours);
        assert_eq!(decide(Some(DONE), mine, "5-0"), Claim::Duplicate);
        // Another entry carries the event, under our claim or another consumer's.
        assert_eq!(decide(Some("c1:claimed:3-0"), mine, "5-0"), Claim::Duplicate);
        assert_eq!(decide(Some("c2:claimed:3-0"), mine, "5-0"), Claim::Duplicate);
        // This entry, taken over from c2 while c2's claim lasts.
        assert_eq!(decide(Some("c2:claimed:5-0"), mine, "5-0"), Claim::HeldElsewhere);
        // An entry id that merely ends like ours is another entry.
        assert_eq!(decide(Some("c2:claimed:15-0"), mine, "5-0"), Claim::Duplicate);
    }
}
