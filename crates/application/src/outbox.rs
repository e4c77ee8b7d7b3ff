//! The transactional outbox: events written in the transaction of the change they tell
//! about, then sent by a relay, at least once, oldest first per aggregate.
//!
//! [`OutboxRelay::relay_once`], on every instance, in one transaction: claim up to a
//! batch of unsent events (`FOR UPDATE SKIP LOCKED`: two relays never hold the same row,
//! and none waits for the other), leaving out any event whose aggregate has an older one
//! unsent; publish them in order; mark them sent; commit. A relay that dies after
//! publishing and before its commit leaves the rows unsent: they are published again
//! (at least once), and consumers drop the duplicate by the event's id.
//!
//! What else must hear of every published event (the popular-concert ranking) is told in
//! the same round, after the publication and before the rows are marked sent
//! ([`AfterPublish`]): so it hears each event at least once too, and never holds the relay
//! up for long nor fails it.
//!
//! Metrics: `outbox_published_total`, `outbox_relay_lag_seconds` (from an event's write to
//! its publication), `outbox_pending` (unsent events, as of the last round).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use domain::unit_of_work::{Tx, TxError};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::clock;
use crate::tx::TransactionManager;

/// An event to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Unique: what consumers deduplicate by.
    pub id: Uuid,
    /// What the event is about (a reservation): events of one aggregate go out in order.
    pub aggregate_id: Uuid,
    /// `PaymentCompleted`, ...
    pub event_type: &'static str,
    /// The event as JSON.
    pub payload: String,
    pub created_at: OffsetDateTime,
}

/// An event claimed by a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEvent {
    /// Its place in the outbox (ascending = written earlier).
    pub seq: u64,
    pub id: Uuid,
    pub aggregate_id: Uuid,
    pub event_type: String,
    pub payload: String,
    pub created_at: OffsetDateTime,
}

/// Where events wait to be sent.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait OutboxStore: Send + Sync {
    /// Writes `event` in `tx` (the transaction of the change it tells about).
    async fn append(&self, tx: &mut Tx, event: &OutboxEvent) -> anyhow::Result<()>;

    /// Locks and returns up to `limit` unsent events in `tx`, oldest first, skipping rows
    /// another relay holds and events whose aggregate has an older unsent one.
    async fn claim(&self, tx: &mut Tx, limit: u32) -> anyhow::Result<Vec<PendingEvent>>;

    /// Marks events sent in `tx`.
    async fn mark_sent(&self, tx: &mut Tx, seqs: &[u64], at: OffsetDateTime) -> anyhow::Result<()>;

    /// How many events are unsent.
    async fn pending(&self) -> anyhow::Result<u64>;

    /// Deletes up to `limit` events sent before `before`; returns how many went.
    async fn purge_sent(&self, before: OffsetDateTime, limit: u32) -> anyhow::Result<u64>;
}

/// Where events go (a Redis Stream).
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait EventPublisher: Send + Sync {
    /// Publishes `event`; at least once (a retry may publish it again).
    async fn publish(&self, event: &PendingEvent) -> anyhow::Result<()>;
}

/// The longest a relay round waits for one [`AfterPublish`] step: the round holds its
/// claimed rows (and a connection) meanwhile.
pub const AFTER_PUBLISH_BUDGET: Duration = Duration::from_secs(5);

/// Told of the events a relay round published, in order, before the round marks them sent:
/// at least once (a round that fails after this step publishes and tells again).
///
/// It cannot fail the round: an implementation handles its own failures (logs and counts
/// them), and the relay stops waiting for it after [`AFTER_PUBLISH_BUDGET`].
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait AfterPublish: Send + Sync {
    /// Hears `events`, published in this order. Infallible by design: whatever goes wrong
    /// here is the step's to log and count.
    async fn published(&self, events: &[PendingEvent]);
}

/// Sends outbox events. Cheap to clone.
#[derive(Clone)]
pub struct OutboxRelay {
    store: Arc<dyn OutboxStore>,
    publisher: Arc<dyn EventPublisher>,
    txm: Arc<dyn TransactionManager>,
    batch: u32,
    after_publish: Vec<Arc<dyn AfterPublish>>,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("batch", &self.batch)
            .field("after_publish", &self.after_publish.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Tx(#[from] TxError),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl OutboxRelay {
    #[must_use]
    pub fn new(
        store: Arc<dyn OutboxStore>,
        publisher: Arc<dyn EventPublisher>,
        txm: Arc<dyn TransactionManager>,
        batch: u32,
    ) -> Self {
        Self { store, publisher, txm, batch, after_publish: Vec::new() }
    }

    /// Tells `step` of every round's published events too (see [`AfterPublish`]).
    #[must_use]
    pub fn with_after_publish(mut self, step: Arc<dyn AfterPublish>) -> Self {
        self.after_publish.push(step);
        self
    }

    /// One round: claims, publishes and marks up to a batch. Returns how many were sent.
    ///
    /// # Errors
    /// When the store or the publisher fails: what was claimed stays unsent (nothing is
    /// marked), and the next round sends it.
    pub async fn relay_once(&self) -> Result<usize, RelayError> {
        // READ COMMITTED: the claim locks the rows it returns and no gap after them, so
        // payments appending events meanwhile are not held up by this relay's round trips
        // to Redis.
        let mut tx = self.txm.begin_read_committed().await?;
        let sent = match self.send(tx.as_mut()).await {
            Ok(sent) => {
                tx.commit().await?;
                sent
            }
            Err(error) => {
                if let Err(rollback) = tx.rollback().await {
                    tracing::warn!(error = %rollback, "outbox relay rollback failed; the connection drops it");
                }
                return Err(error);
            }
        };
        let now = clock::now_utc();
        for event in &sent {
            let lag = (now - event.created_at).as_seconds_f64().max(0.0);
            metrics::histogram!("outbox_relay_lag_seconds").record(lag);
        }
        metrics::counter!("outbox_published_total").increment(sent.len() as u64);
        Ok(sent.len())
    }

    async fn send(&self, tx: &mut Tx) -> Result<Vec<PendingEvent>, RelayError> {
        let events = self.store.claim(tx, self.batch).await?;
        for event in &events {
            self.publisher.publish(event).await?;
        }
        if !events.is_empty() {
            for step in &self.after_publish {
                if tokio::time::timeout(AFTER_PUBLISH_BUDGET, step.published(&events)).await.is_err() {
                    tracing::warn!(
                        events = events.len(),
                        "an after-publish step ran past its budget; the relay went on without it"
                    );
                    metrics::counter!("outbox_after_publish_timeouts_total").increment(1);
                }
            }
            let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
            self.store.mark_sent(tx, &seqs, clock::now_utc()).await?;
        }
        Ok(events)
    }

    /// Deletes events sent before `before`, `batch` at a time; returns how many went.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn purge_sent(&self, before: OffsetDateTime, batch: u32) -> anyhow::Result<u64> {
        let mut purged = 0;
        loop {
            let deleted = self.store.purge_sent(before, batch).await?;
            purged += deleted;
            if deleted < u64::from(batch) {
                return Ok(purged);
            }
        }
    }

    /// The number of unsent events, exported as `outbox_pending`.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub async fn observe_pending(&self) -> anyhow::Result<u64> {
        let pending = self.store.pending().await?;
        #[allow(clippy::cast_precision_loss, reason = "a gauge")]
        metrics::gauge!("outbox_pending").set(pending as f64);
        Ok(pending)
    }

    #[must_use]
    pub const fn batch(&self) -> u32 {
        self.batch
    }
}

#[cfg(test)]
mod tests {
    use mockall::Sequence;

    use super::*;
    use crate::mocks::unit_of_work;
    use crate::tx::MockTransactionManager;

    fn pending(seq: u64) -> PendingEvent {
        PendingEvent {
            seq,
            id: Uuid::now_v7(),
            aggregate_id: Uuid::now_v7(),
            event_type: "PaymentCompleted".into(),
            payload: "{}".into(),
            created_at: clock::now_utc(),
        }
    }

    fn txm(commit: bool) -> MockTransactionManager {
        let uow = unit_of_work(commit);
        let mut txm = MockTransactionManager::new();
        txm.expect_begin_read_committed().times(1).return_once(move || Ok(Box::new(uow)));
        txm
    }

    #[tokio::test]
    async fn claimed_events_are_published_in_order_then_marked_sent_in_one_transaction() {
        let mut seq = Sequence::new();
        let mut store = MockOutboxStore::new();
        let mut publisher = MockEventPublisher::new();
        store
            .expect_claim()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _| Ok(vec![pending(1), pending(2)]));
        for expected in [1, 2] {
            publisher
                .expect_publish()
                .withf(move |e| e.seq == expected)
                .times(1)
                .in_sequence(&mut seq)
                .returning(|_| Ok(()));
        }
        store
            .expect_mark_sent()
            .withf(|_, seqs, _| seqs == [1, 2])
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _, _| Ok(()));
        let relay = OutboxRelay::new(Arc::new(store), Arc::new(publisher), Arc::new(txm(true)), 10);

        assert_eq!(relay.relay_once().await.unwrap(), 2);
    }

    #[tokio::test]
    async fn the_after_publish_step_hears_the_published_events_before_they_are_marked_sent() {
        let mut seq = Sequence::new();
        let mut store = MockOutboxStore::new();
        let mut publisher = MockEventPublisher::new();
        let mut step = MockAfterPublish::new();
        store
            .expect_claim()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _| Ok(vec![pending(1), pending(2)]));
        publisher.expect_publish().times(2).in_sequence(&mut seq).returning(|_| Ok(()));
        step.expect_published()
            .withf(|events| events.iter().map(|e| e.seq).collect::<Vec<_>>() == [1, 2])
            .times(1)
            .in_sequence(&mut seq)
            .return_const(());
        store.expect_mark_sent().times(1).in_sequence(&mut seq).returning(|_, _, _| Ok(()));
        let relay = OutboxRelay::new(Arc::new(store), Arc::new(publisher), Arc::new(txm(true)), 10)
            .with_after_publish(Arc::new(step));

        assert_eq!(relay.relay_once().await.unwrap(), 2);
    }

    /// A step that never answers.
    struct Hangs;

    #[async_trait]
    impl AfterPublish for Hangs {
        async fn published(&self, _events: &[PendingEvent]) {
            std::future::pending::<()>().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_that_hangs_holds_the_round_up_no_longer_than_its_budget() {
        let mut store = MockOutboxStore::new();
        let mut publisher = MockEventPublisher::new();
        store.expect_claim().returning(|_, _| Ok(vec![pending(1)]));
        publisher.expect_publish().returning(|_| Ok(()));
        store.expect_mark_sent().times(1).returning(|_, _, _| Ok(()));
        let relay = OutboxRelay::new(Arc::new(store), Arc::new(publisher), Arc::new(txm(true)), 10)
            .with_after_publish(Arc::new(Hangs));
        let started = tokio::time::Instant::now();

        assert_eq!(relay.relay_once().await.unwrap(), 1);
        let waited = started.elapsed();
        assert!(waited >= AFTER_PUBLISH_BUDGET && waited < AFTER_PUBLISH_BUDGET * 2, "{waited:?}");
    }

    #[tokio::test]
    async fn no_step_hears_of_an_empty_round() {
        let mut store = MockOutboxStore::new();
        store.expect_claim().returning(|_, _| Ok(Vec::new()));
        store.expect_mark_sent().never();
        let mut step = MockAfterPublish::new();
        step.expect_published().never();
        let relay =
            OutboxRelay::new(Arc::new(store), Arc::new(MockEventPublisher::new()), Arc::new(txm(true)), 10)
                .with_after_publish(Arc::new(step));

        assert_eq!(relay.relay_once().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_publish_that_fails_marks_nothing_so_the_next_round_sends_again() {
        let mut store = MockOutboxStore::new();
        let mut publisher = MockEventPublisher::new();
        store.expect_claim().returning(|_, _| Ok(vec![pending(1), pending(2)]));
        let mut calls = 0;
        publisher.expect_publish().returning(move |_| {
            calls += 1;
            if calls == 2 { Err(anyhow::anyhow!("redis down")) } else { Ok(()) }
        });
        store.expect_mark_sent().never();
        let relay = OutboxRelay::new(Arc::new(store), Arc::new(publisher), Arc::new(txm(false)), 10);

        assert!(relay.relay_once().await.is_err());
    }
}
