//! Live token views for the event streams, fanned out from one place per instance.
//!
//! Each open `GET /api/v1/queue/tokens/me/events` subscribes to its token here. One task
//! per instance looks up every subscribed token in a single batched call per tick (1,000
//! tokens per round trip) and writes each one's newest view into a `watch` channel that
//! all of that token's streams read. So 10,000 open streams cost the store a few calls per
//! tick, not 10,000 polling loops, and a slow client only ever misses intermediate views
//! (a `watch` keeps the latest), never grows a buffer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use application::queue::{QueueReader, TokenView};
use domain::queue::{QueueStatus, QueueTokenId};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The most tokens looked up in one call.
const BATCH: usize = 1_000;

/// What a stream shows next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamState {
    /// The token's view (the stream ends after an ACTIVE one).
    View(TokenView),
    /// The token is no longer live (expired, ended, abandoned): the stream ends.
    Gone,
    /// This instance is stopping: the stream ends, and the client reconnects (to another
    /// instance behind the load balancer) with its token, place kept.
    Closing,
}

type Subscribers = Arc<Mutex<HashMap<QueueTokenId, watch::Sender<StreamState>>>>;

/// The per-instance hub. Cheap to clone.
#[derive(Clone)]
pub struct QueueEvents {
    subscribers: Subscribers,
    /// Set once the instance is stopping: new streams end at once.
    closing: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for QueueEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueEvents").field("tokens", &self.tokens()).finish()
    }
}

impl QueueEvents {
    /// Starts the fan-out task: every `tick`, refresh every subscribed token.
    #[must_use]
    pub fn start(reader: QueueReader, tick: Duration) -> (Self, JoinHandle<()>) {
        let events = Self { subscribers: Arc::default(), closing: Arc::default() };
        let subscribers = Arc::clone(&events.subscribers);
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                refresh(&reader, &subscribers).await;
            }
        });
        (events, task)
    }

    /// Ends every open stream (each gets [`StreamState::Closing`]) and every one opened from
    /// now on: called when the instance starts stopping, so that open streams do not hold
    /// the graceful shutdown for its whole grace period.
    pub fn close_all(&self) {
        // Under the lock, so that no `subscribe` can slip in between the flag and the sweep.
        let mut subscribers = self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        for sender in subscribers.values() {
            sender.send_replace(StreamState::Closing);
        }
        subscribers.clear();
    }

    /// Follows `token`, starting from `first` (the view the handler just read).
    #[must_use]
    pub fn subscribe(&self, token: QueueTokenId, first: TokenView) -> watch::Receiver<StreamState> {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
            // Stopping: the stream shows its first view, then ends at once.
            let (sender, receiver) = watch::channel(StreamState::Closing);
            sender.send_replace(StreamState::Closing);
            return receiver;
        }
        let receiver = match subscribers.get(&token) {
            Some(sender) if !sender.is_closed() => sender.subscribe(),
            _ => {
                let (sender, receiver) = watch::channel(StreamState::View(first));
                subscribers.insert(token, sender);
                receiver
            }
        };
        metrics::gauge!("queue_event_streams_tokens").set(count(subscribers.len()));
        receiver
    }

    /// How many tokens have open streams on this instance.
    #[must_use]
    pub fn tokens(&self) -> usize {
        self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

#[allow(clippy::cast_precision_loss, reason = "a gauge")]
fn count(n: usize) -> f64 {
    n as f64
}

/// One tick: drop tokens nobody follows any more, look the others up in batches, and
/// publish what changed. A token that is gone or active gets its last state and is dropped.
async fn refresh(reader: &QueueReader, subscribers: &Subscribers) {
    let tokens: Vec<QueueTokenId> = {
        let mut map = subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.retain(|_, sender| !sender.is_closed());
        metrics::gauge!("queue_event_streams_tokens").set(count(map.len()));
        map.keys().copied().collect()
    };
    for chunk in tokens.chunks(BATCH) {
        let views = match reader.views(chunk.to_vec()).await {
            Ok(views) => views,
            Err(error) => {
                // These streams stay open; the next tick tries them again.
                tracing::warn!(error = format!("{error:#}"), "queue event refresh failed");
                continue;
            }
        };
        let mut map = subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (token, view) in chunk.iter().zip(views) {
            let Some(sender) = map.get(token) else { continue };
            let next = view.map_or(StreamState::Gone, StreamState::View);
            let last = matches!(next, StreamState::Gone)
                || matches!(&next, StreamState::View(v) if v.status == QueueStatus::Active);
            sender.send_if_modified(|current| {
                if *current == next {
                    false
                } else {
                    *current = next;
                    true
                }
            });
            if last {
                map.remove(token);
            }
        }
    }
}
