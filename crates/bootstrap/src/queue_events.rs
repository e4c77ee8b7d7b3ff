//! Live token views for the event streams, fanned out from one place per instance.
//!
//! Each open `GET /api/v1/queue/tokens/me/events` subscribes to its token here. One task
//! per instance looks up every subscribed token in a single batched call per tick (1,000
//! tokens per round trip) and writes each one's newest view into a `watch` channel that
//! all of that token's streams read. So 10,000 open streams cost the store a few calls per
//! tick, not 10,000 polling loops, and a slow client only ever misses intermediate views
//! (a `watch` keeps the latest), never grows a buffer.
//!
//! Bounded twice: a token has at most [`STREAMS_PER_TOKEN`] open streams on an instance (a
//! new one ends the oldest, which gets [`Subscription::superseded`]), and an instance at
//! most `SSE_MAX_STREAMS` (past that, `subscribe` refuses and the route answers 503), so
//! one client opening streams in a loop holds two, and many cannot exhaust the instance's
//! memory or file descriptors.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use application::queue::{QueueReader, TokenView};
use domain::queue::{QueueStatus, QueueTokenId};
use tokio::sync::{oneshot, watch};
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

/// The most open streams of one token on one instance.
pub const STREAMS_PER_TOKEN: usize = 2;

/// One token's channel and its open streams, oldest first (each with the sender that ends
/// it when a newer one pushes it out).
struct Entry {
    sender: watch::Sender<StreamState>,
    streams: VecDeque<(u64, oneshot::Sender<()>)>,
}

type Subscribers = Arc<Mutex<HashMap<QueueTokenId, Entry>>>;

/// The per-instance hub. Cheap to clone.
#[derive(Clone)]
pub struct QueueEvents {
    subscribers: Subscribers,
    /// Set once the instance is stopping: new streams end at once.
    closing: Arc<std::sync::atomic::AtomicBool>,
    /// Streams open now, and the most there may be.
    open: Arc<AtomicUsize>,
    max_streams: usize,
    next_id: Arc<AtomicU64>,
}

/// One open stream's side of the hub: the token's updates, the signal that a newer stream
/// of the token pushed this one out, and its place in the counts (given back on drop,
/// whether the stream ended or the client went away).
pub struct Subscription {
    pub updates: watch::Receiver<StreamState>,
    /// Fires when this stream is pushed out; closed (an error) when the hub let go of the
    /// token, which ends nothing by itself.
    pub superseded: oneshot::Receiver<()>,
    _slot: Slot,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

struct Slot {
    subscribers: Subscribers,
    open: Arc<AtomicUsize>,
    token: QueueTokenId,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = map.get_mut(&self.token) {
            entry.streams.retain(|(id, _)| *id != self.id);
        }
        drop(map);
        let open = self.open.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        metrics::gauge!("queue_event_streams_open").set(count(open));
    }
}

impl std::fmt::Debug for QueueEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueEvents").field("tokens", &self.tokens()).finish()
    }
}

impl QueueEvents {
    /// Starts the fan-out task: every `tick`, refresh every subscribed token.
    #[must_use]
    pub fn start(reader: QueueReader, tick: Duration, max_streams: usize) -> (Self, JoinHandle<()>) {
        let events = Self {
            subscribers: Arc::default(),
            closing: Arc::default(),
            open: Arc::default(),
            max_streams,
            next_id: Arc::default(),
        };
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
        for entry in subscribers.values() {
            entry.sender.send_replace(StreamState::Closing);
        }
        subscribers.clear();
    }

    /// Follows `token`, starting from `first` (the view the handler just read). `None`
    /// when the instance serves as many streams as it takes. A third stream of a token ends
    /// its oldest.
    #[must_use]
    pub fn subscribe(&self, token: QueueTokenId, first: TokenView) -> Option<Subscription> {
        if self.open.fetch_add(1, Ordering::SeqCst) >= self.max_streams {
            self.open.fetch_sub(1, Ordering::SeqCst);
            metrics::counter!("queue_event_streams_refused_total").increment(1);
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot =
            Slot { subscribers: Arc::clone(&self.subscribers), open: Arc::clone(&self.open), token, id };
        let (ender, superseded) = oneshot::channel();
        let mut subscribers = self.subscribers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.closing.load(Ordering::SeqCst) {
            // Stopping: the stream shows its first view, then ends at once.
            let (sender, updates) = watch::channel(StreamState::Closing);
            sender.send_replace(StreamState::Closing);
            return Some(Subscription { updates, superseded, _slot: slot });
        }
        let entry = match subscribers.get_mut(&token) {
            Some(entry) if !entry.sender.is_closed() => entry,
            _ => {
                let (sender, _) = watch::channel(StreamState::View(first));
                subscribers.insert(token, Entry { sender, streams: VecDeque::new() });
                subscribers.get_mut(&token)?
            }
        };
        while entry.streams.len() >= STREAMS_PER_TOKEN {
            if let Some((_, oldest)) = entry.streams.pop_front() {
                let _ = oldest.send(());
            }
        }
        entry.streams.push_back((id, ender));
        let updates = entry.sender.subscribe();
        metrics::gauge!("queue_event_streams_tokens").set(count(subscribers.len()));
        metrics::gauge!("queue_event_streams_open").set(count(self.open.load(Ordering::SeqCst)));
        Some(Subscription { updates, superseded, _slot: slot })
    }

    /// How many streams are open on this instance.
    #[must_use]
    pub fn streams(&self) -> usize {
        self.open.load(Ordering::SeqCst)
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
        map.retain(|_, entry| !entry.sender.is_closed());
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
            let Some(Entry { sender, .. }) = map.get(token) else { continue };
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
