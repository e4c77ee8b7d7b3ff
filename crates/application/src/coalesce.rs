//! Round trips shared by the requests of one instance: [`Coalesced`].
//!
//! Under a crowd, many requests of one instance ask the same store the same kind of
//! question at once (the cache's version of one key, the state of a queue token). Each
//! asking on its own costs a round trip, and the store's time, per request. Here they
//! share: a request joins the *next* batch to go out, never one already on its way, so
//! every answer comes from a question sent after its request arrived. A write that
//! returned before a request was sent is therefore always seen, exactly as if the request
//! had asked on its own; only the round trip is shared.
//!
//! While one batch is out, the requests arriving meanwhile wait and go together in the
//! next: one round trip per round trip time instead of one per request. A slow batch (the
//! store stalling until its command timeout) does not hold back those that arrive after
//! it for long: once [`OVERLAP`] has passed, the waiting go out in a batch of their own,
//! up to [`MAX_IN_FLIGHT`] at once. With that many out, the store is stalling, and those
//! waiting get no answer (`None`) at once instead of queueing behind the timeouts; each
//! user decides what that means (the cache reads the database, the queue gate answers
//! 503).
//!
//! The batches are sent by a task of their own, on the runtime the [`Coalesced`] was made
//! on (the server's main one), so a request that goes away (its client hung up) takes
//! nobody's answer with it, and a worker that stops does not either. Should that task end any other way than by
//! finding nothing to do (a panic, its runtime stopping), the waiting get no answer and
//! the next request starts a new task.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use tokio::sync::oneshot;

/// How long the requests that arrived after a batch went out wait for it to come back
/// before they go out in a batch of their own.
pub const OVERLAP: Duration = Duration::from_millis(50);

/// The most batches of one [`Coalesced`] in flight at once.
pub const MAX_IN_FLIGHT: usize = 8;

/// The questions of one kind, to one store, on one instance, that share their round trips
/// (see the [module](self)). `I` is what a request asks, `O` its answer.
pub struct Coalesced<I, O> {
    state: Mutex<State<I, O>>,
    max_batch: usize,
    /// Where the sending task runs (see [`Coalesced::on`]); `None`: the asking request's.
    runtime: Option<tokio::runtime::Handle>,
}

struct State<I, O> {
    /// A task is sending the batches.
    running: bool,
    /// The requests that arrived since the last batch went out, in arrival order.
    waiting: Vec<(I, oneshot::Sender<O>)>,
}

impl<I, O> std::fmt::Debug for Coalesced<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalesced").field("max_batch", &self.max_batch).finish_non_exhaustive()
    }
}

/// The sending task's guard: see the [module](self).
struct Sender<I, O> {
    shared: Arc<Coalesced<I, O>>,
    done: bool,
}

impl<I, O> Drop for Sender<I, O> {
    fn drop(&mut self) {
        if !self.done {
            let mut state = self.shared.lock();
            state.running = false;
            state.waiting.clear();
        }
    }
}

impl<I, O> Coalesced<I, O> {
    /// At most `max_batch` questions per round trip (at least 1); more waiting go out in
    /// further batches at once.
    #[must_use]
    pub fn new(max_batch: usize) -> Self {
        Self::on(tokio::runtime::Handle::try_current().ok(), max_batch)
    }

    /// As [`Coalesced::new`], with the batches sent from a task on `runtime`. The server
    /// makes its own at start-up, so theirs run on its main runtime: that one outlives the
    /// workers' runtimes (which a graceful stop ends one by one, and with them any task
    /// spawned there, leaving the other workers' requests without their answer), and no
    /// worker's own load holds back the requests of the others.
    #[must_use]
    pub fn on(runtime: Option<tokio::runtime::Handle>, max_batch: usize) -> Self {
        Self {
            state: Mutex::new(State { running: false, waiting: Vec::new() }),
            max_batch: max_batch.max(1),
            runtime,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<I, O>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many requests wait for the next batch (for tests).
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    /// Whether a task is sending batches (for tests).
    #[cfg(test)]
    pub(crate) fn is_sending(&self) -> bool {
        self.lock().running
    }
}

impl<I, O> Coalesced<I, O>
where
    I: Send + 'static,
    O: Send + 'static,
{
    /// `question`'s answer, from the next batch to go out after this call: `send` gets the
    /// batch's questions in order and must answer each, in the same order. `None` when no
    /// batch answered it: too many batches were stalled (see the [module](self)), the
    /// sending task died, or `send` answered fewer than it was asked.
    ///
    /// `send` is used only when this request starts the sending task (nobody was waiting
    /// or in flight); requests that join give theirs up. So every request must pass an
    /// equivalent one.
    pub async fn ask<S, Fut>(self: &Arc<Self>, question: I, send: S) -> Option<O>
    where
        S: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let start = {
            let mut state = self.lock();
            state.waiting.push((question, answer));
            !std::mem::replace(&mut state.running, true)
        };
        if start {
            let sender = Sender { shared: Arc::clone(self), done: false };
            let batches = Self::send_batches(sender, send);
            // A runtime already shut down drops the task at once: the guard answers `None`.
            match &self.runtime {
                Some(runtime) => drop(runtime.spawn(batches)),
                None => drop(tokio::spawn(batches)),
            }
        }
        answered.await.ok()
    }

    /// Sends batches while requests wait for them.
    async fn send_batches<S, Fut>(mut sender: Sender<I, O>, send: S)
    where
        S: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<O>> + Send + 'static,
    {
        let mut in_flight = FuturesUnordered::new();
        // The last wait ended with the overlap passing and no batch back: every batch
        // out has been out for at least that long.
        let mut stalled = false;
        loop {
            let (batch, more) = {
                let mut state = sender.shared.lock();
                if state.waiting.is_empty() {
                    if in_flight.is_empty() {
                        state.running = false;
                        sender.done = true;
                        return;
                    }
                    (None, false)
                } else if in_flight.len() < MAX_IN_FLIGHT {
                    let take = state.waiting.len().min(sender.shared.max_batch);
                    let batch: Vec<_> = state.waiting.drain(..take).collect();
                    (Some(batch), !state.waiting.is_empty())
                } else if stalled {
                    // Every batch out has been out for a while: the store is stalling.
                    // Those waiting get no answer now rather than queueing behind timeouts.
                    state.waiting.clear();
                    (None, false)
                } else {
                    // Full, but only just sent (a burst went out in several batches):
                    // they wait for the first to come back, or the overlap to pass.
                    (None, false)
                }
            };
            if let Some(batch) = batch {
                stalled = false;
                let (questions, answers): (Vec<I>, Vec<oneshot::Sender<O>>) = batch.into_iter().unzip();
                let round_trip = send(questions);
                in_flight.push(async move {
                    for (answer, output) in answers.into_iter().zip(round_trip.await) {
                        // A request that went away no longer listens.
                        let _ = answer.send(output);
                    }
                });
                if more {
                    // More waiting than one batch takes: they go now too.
                    continue;
                }
            }
            // Until a batch comes back, or the overlap passes with requests waiting.
            stalled = tokio::select! {
                _ = in_flight.next(), if !in_flight.is_empty() => false,
                () = tokio::time::sleep(OVERLAP) => !in_flight.is_empty(),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A store that answers each question with its double, counting its round trips and
    /// the batch sizes, after `gate` lets it.
    #[derive(Clone)]
    struct Store {
        round_trips: Arc<AtomicUsize>,
        sizes: Arc<Mutex<Vec<usize>>>,
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl Default for Store {
        fn default() -> Self {
            Self {
                round_trips: Arc::default(),
                sizes: Arc::default(),
                gate: Arc::new(tokio::sync::Semaphore::new(0)),
            }
        }
    }

    impl Store {
        fn send(
            &self,
        ) -> impl Fn(Vec<u32>) -> futures::future::BoxFuture<'static, Vec<u32>> + Send + 'static {
            let store = self.clone();
            move |questions: Vec<u32>| {
                let store = store.clone();
                Box::pin(async move {
                    store.round_trips.fetch_add(1, Ordering::SeqCst);
                    store.sizes.lock().unwrap().push(questions.len());
                    let _permit = store.gate.acquire().await.unwrap();
                    questions.iter().map(|q| q * 2).collect()
                })
            }
        }
    }

    type Shared = Arc<Coalesced<u32, u32>>;

    /// `q` asked in a task of its own.
    fn ask(shared: &Shared, store: &Store, q: u32) -> tokio::task::JoinHandle<Option<u32>> {
        let (shared, send) = (Arc::clone(shared), store.send());
        tokio::spawn(async move { shared.ask(q, send).await })
    }

    /// `q` asked, once its batch went out (and is held until the store's gate opens).
    async fn first_out(shared: &Shared, store: &Store, q: u32) -> tokio::task::JoinHandle<Option<u32>> {
        let first = ask(shared, store, q);
        until("the first batch to go out", || store.round_trips.load(Ordering::SeqCst) == 1).await;
        first
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn a_lone_request_goes_out_at_once_and_gets_its_own_answer() {
        let store = Store::default();
        store.gate.add_permits(100);
        let shared = Arc::new(Coalesced::new(10));
        assert_eq!(shared.ask(21, store.send()).await, Some(42));
        assert_eq!(shared.ask(5, store.send()).await, Some(10));
        assert_eq!(store.round_trips.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn requests_arriving_while_a_batch_is_out_share_the_next_one_never_the_one_in_flight() {
        let store = Store::default();
        let shared = Arc::new(Coalesced::new(100));
        let first = first_out(&shared, &store, 1).await;
        // Out, and held: these three arrive after it was sent.
        let later: Vec<_> = (2..5).map(|q| ask(&shared, &store, q)).collect();
        until("the three to queue", || shared.waiting() == 3).await;
        store.gate.add_permits(100);
        assert_eq!(first.await.unwrap(), Some(2));
        for (task, q) in later.into_iter().zip(2..5) {
            assert_eq!(task.await.unwrap(), Some(q * 2));
        }
        assert_eq!(*store.sizes.lock().unwrap(), vec![1, 3], "one batch for the first, one for the three");
    }

    #[tokio::test]
    async fn more_waiting_than_a_batch_takes_go_out_in_several_at_once() {
        let store = Store::default();
        let shared = Arc::new(Coalesced::new(2));
        let first = first_out(&shared, &store, 0).await;
        let later: Vec<_> = (1..6).map(|q| ask(&shared, &store, q)).collect();
        store.gate.add_permits(100);
        assert_eq!(first.await.unwrap(), Some(0));
        for (task, q) in later.into_iter().zip(1..6) {
            assert_eq!(task.await.unwrap(), Some(q * 2));
        }
        assert!(store.sizes.lock().unwrap().iter().all(|size| *size <= 2), "{:?}", store.sizes);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_more_batches_than_may_be_out_at_once_is_answered_in_full() {
        let store = Store::default();
        let shared = Arc::new(Coalesced::new(2));
        // A first batch out and held, then enough waiting for twice the batches allowed out.
        let first = first_out(&shared, &store, 0).await;
        let burst = u32::try_from(MAX_IN_FLIGHT * 2 * 2).unwrap();
        let later: Vec<_> = (1..=burst).map(|q| ask(&shared, &store, q)).collect();
        until("the burst to queue", || shared.waiting() == later.len()).await;
        store.gate.add_permits(1_000);
        assert_eq!(first.await.unwrap(), Some(0));
        for (task, q) in later.into_iter().zip(1..) {
            assert_eq!(task.await.unwrap(), Some(q * 2), "a healthy store answers every request");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_batch_holds_later_requests_back_for_the_overlap_only_and_a_stalled_store_answers_none()
    {
        let store = Store::default();
        let shared = Arc::new(Coalesced::new(100));
        // Nothing ever comes back: every batch stalls. Each request arrives after the one
        // before went out, and goes out an overlap later in a batch of its own.
        let mut asks = Vec::new();
        for (sent, q) in (1..=MAX_IN_FLIGHT).zip(0_u32..) {
            asks.push(ask(&shared, &store, q));
            until("the next batch out", || store.round_trips.load(Ordering::SeqCst) == sent).await;
        }
        assert!(asks.iter().all(|task| !task.is_finished()), "nothing came back");
        // With every batch out and stalled, a new request is not held behind them.
        let late = tokio::time::timeout(OVERLAP * 4, shared.ask(99, store.send())).await;
        assert_eq!(late.expect("answered within the overlap"), None);
        assert_eq!(store.round_trips.load(Ordering::SeqCst), MAX_IN_FLIGHT, "no ninth batch");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_batches_outlive_the_runtime_of_the_request_that_started_them() {
        // Made on this runtime (the server's main one); a "worker" with a runtime of its own
        // asks first, so its request starts the sending task, then stops while its batch is
        // out and another worker's request waits for the next.
        let store = Store::default();
        let shared: Shared = Arc::new(Coalesced::new(100));
        let (out, first_out) = tokio::sync::oneshot::channel();
        let (queued, later_queued) = tokio::sync::oneshot::channel::<()>();
        let worker = {
            let (shared, store) = (Arc::clone(&shared), store.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async {
                    drop(ask(&shared, &store, 1));
                    until("the first batch to go out", || store.round_trips.load(Ordering::SeqCst) == 1)
                        .await;
                    out.send(()).unwrap();
                    later_queued.await.unwrap();
                });
                // The worker's runtime ends, with every task spawned on it.
                drop(runtime);
            })
        };
        first_out.await.unwrap();
        let later = ask(&shared, &store, 2);
        until("the other request to queue", || shared.waiting() == 1).await;
        queued.send(()).unwrap();
        tokio::task::spawn_blocking(move || worker.join().unwrap()).await.unwrap();
        store.gate.add_permits(10);
        assert_eq!(later.await.unwrap(), Some(4), "answered by batches that outlived the worker");
    }

    #[tokio::test]
    async fn a_dying_sender_leaves_no_request_waiting_and_the_next_starts_anew() {
        let shared: Arc<Coalesced<u32, u32>> = Arc::new(Coalesced::new(10));
        fn dying(_: Vec<u32>) -> futures::future::Ready<Vec<u32>> {
            panic!("the store's client panicked")
        }
        assert_eq!(shared.ask(1, dying).await, None);
        let store = Store::default();
        store.gate.add_permits(100);
        until("the dead task's reset", || !shared.is_sending()).await;
        assert_eq!(shared.ask(3, store.send()).await, Some(6));
    }

    #[tokio::test]
    async fn a_short_answer_leaves_the_unanswered_with_none() {
        let shared = Arc::new(Coalesced::new(10));
        let short = |questions: Vec<u32>| async move { questions.into_iter().skip(1).collect::<Vec<_>>() };
        assert_eq!(shared.ask(1, short).await, None);
    }
}
