//! Writes that run to their end whatever the caller does.
//!
//! A request's future is dropped when its client hangs up. Dropped after a commit, it
//! would skip what belongs to the commit: releasing the locks (left to their leases),
//! lifting the seat map's write mark (left standing, so every read of that date goes to
//! MySQL until it runs out), ending the queue token a payment spent (left ACTIVE, still
//! passing the gate and counting against the cap). So every write use case runs on a task
//! of its own, and the request only waits for it: a hang-up drops the waiting, not the
//! work.
//!
//! Bounded three ways:
//! - in time, by the lock waits, the longest hold of a lock (`LOCK_MAX_HOLD_MS`: past it
//!   the work is abandoned and rolled back) and the database's statement timeout;
//! - in number: at most [`MAX_IN_FLIGHT`] writes per process; one more is refused at once
//!   with [`Failure::Unavailable`] (503, nothing done) instead of queueing without end
//!   (clients that send writes and hang up at once cannot pile up tasks);
//! - at shutdown: the server stops taking connections and [`drain`] refuses new writes
//!   (503) and waits for those in flight before the workers stop, so a write whose client
//!   has gone still ends.
//!
//! A write that ends after its client has gone is logged (its error at `warn`), since no
//! answer will carry it.

use std::future::Future;
use std::panic::resume_unwind;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::Instrument as _;

use crate::failure::{Dependency, Failure};

/// The most writes one process runs at once.
pub const MAX_IN_FLIGHT: usize = 10_000;

/// Work in flight, counted: how much runs, whether new work is still taken, and a signal
/// each time some ends. The process's writes are one ([`run_to_end`], [`Ticket`],
/// [`drain`]); the server counts its requests in another, to stop only once none runs.
pub struct Registry {
    count: AtomicUsize,
    closing: AtomicBool,
    ended: Notify,
    limit: usize,
}

impl Registry {
    /// A registry that takes at most `limit` pieces of work at once.
    #[must_use]
    pub const fn new(limit: usize) -> Self {
        Self {
            count: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            ended: Notify::const_new(),
            limit,
        }
    }

    /// Counts new work until the returned guard is dropped, or refuses it (at the limit:
    /// [`Dependency::WriteCapacity`]; once closed: [`Dependency::ShuttingDown`]). Counted
    /// first and checked after, so that a [`Registry::close_and_wait`] that closes the
    /// registry and then reads the count either sees this work or is seen by it: never
    /// work that slips past both.
    ///
    /// # Errors
    /// As above: then nothing is counted.
    pub fn enter(&self) -> Result<InFlight<'_>, Dependency> {
        let running = self.count.fetch_add(1, Ordering::SeqCst);
        let counted = InFlight(self);
        if running >= self.limit {
            return Err(Dependency::WriteCapacity);
        }
        if self.closing.load(Ordering::SeqCst) {
            return Err(Dependency::ShuttingDown);
        }
        Ok(counted)
    }

    /// Takes no new work from now on.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// Takes no new work from now on ([`Registry::close`]), then waits until the work
    /// running has ended, or `within` passed; returns how much still runs.
    pub async fn close_and_wait(&self, within: Duration) -> usize {
        self.close();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            // Registered before the count is read, so an end between the two is not missed.
            ended.as_mut().enable();
            let running = self.count.load(Ordering::SeqCst);
            if running == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return self.count.load(Ordering::SeqCst);
            }
        }
    }

    /// How much work runs now.
    #[must_use]
    pub fn running(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("running", &self.running())
            .field("closing", &self.closing.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

static WRITES: Registry = Registry::new(MAX_IN_FLIGHT);

/// One piece of work counted in its [`Registry`] until dropped.
pub struct InFlight<'a>(&'a Registry);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
        // Only a closed registry has anyone waiting (and Notify takes a lock: not on every
        // request). Race-free: a drop that reads "open" decremented before the closing
        // waiter read the count, which then saw it.
        if self.0.closing.load(Ordering::SeqCst) {
            self.0.ended.notify_waiters();
        }
    }
}

impl std::fmt::Debug for InFlight<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

/// One write counted among the process's writes while it lives (the [`MAX_IN_FLIGHT`]
/// bound, and the [`drain`] at shutdown waits for it), for a write handed from task to task
/// instead of running on one of its own: a charge queued for its account's next batch
/// (see `charge_points`), which the batch's task answers.
pub struct Ticket(#[allow(dead_code, reason = "held for its Drop")] InFlight<'static>);

impl Ticket {
    /// Counts one more write, or refuses it as [`run_to_end`] would.
    ///
    /// # Errors
    /// [`Failure::Unavailable`] when [`MAX_IN_FLIGHT`] writes are running already or the
    /// process is shutting down ([`drain`]).
    pub fn take() -> Result<Self, Failure> {
        WRITES.enter().map(Self).map_err(|what| {
            tracing::warn!(refused = %what, "a write was refused before it began");
            Failure::Unavailable { what, source: anyhow::anyhow!("write refused: {what}") }
        })
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ticket")
    }
}

/// Runs `work` on a task of its own, in the caller's tracing span, and waits for its
/// result. Dropping the returned future does not stop `work`.
///
/// # Errors
/// `work`'s own error, or [`Failure::Unavailable`] (converted into `E`) when
/// [`MAX_IN_FLIGHT`] writes are running already or the process is shutting down
/// ([`drain`]): then `work` does not run.
///
/// # Panics
/// When `work` panics (the panic goes on in the caller).
pub async fn run_to_end<T, E, F>(work: F) -> Result<T, E>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: From<Failure> + std::fmt::Display + Send + 'static,
{
    run_in(&WRITES, work).await
}

async fn run_in<T, E, F>(registry: &'static Registry, work: F) -> Result<T, E>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: From<Failure> + std::fmt::Display + Send + 'static,
{
    let in_flight = match registry.enter() {
        Ok(in_flight) => in_flight,
        Err(what) => {
            tracing::warn!(refused = %what, "a write was refused before it began");
            return Err(
                Failure::Unavailable { what, source: anyhow::anyhow!("write refused: {what}") }.into()
            );
        }
    };
    let (answer, answered) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(
        async move {
            let _in_flight = in_flight;
            let outcome = work.await;
            deliver(answer, outcome);
        }
        .in_current_span(),
    );
    match task.await {
        Ok(()) => answered.await.unwrap_or_else(|_| unreachable!("the task answers before it ends")),
        Err(error) if error.is_panic() => resume_unwind(error.into_panic()),
        Err(error) => panic!("a write was cancelled by the runtime shutting down: {error}"),
    }
}

/// Sends a write's outcome to the request waiting for it; if that request has gone (its
/// client hung up), logs the outcome instead, since no answer will carry it.
pub(crate) fn deliver<T, E: std::fmt::Display>(
    answer: tokio::sync::oneshot::Sender<Result<T, E>>,
    outcome: Result<T, E>,
) {
    if let Err(unheard) = answer.send(outcome) {
        match unheard {
            Ok(_) => tracing::info!("a write ended after its client had gone"),
            Err(error) => tracing::warn!(error = %error, "a write failed after its client had gone"),
        }
    }
}

/// For shutdown: takes no new write from now on (each is refused with 503, nothing done),
/// then waits until the writes running have ended, or `within` passed; returns how many
/// still run.
pub async fn drain(within: Duration) -> usize {
    WRITES.close_and_wait(within).await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error(transparent)]
        Failure(#[from] Failure),
    }

    #[tokio::test]
    async fn work_goes_on_to_its_end_when_the_caller_stops_waiting_and_a_drain_waits_for_it_then_refuses_more()
     {
        // A registry of its own: closing the process's would refuse other tests' writes.
        static REGISTRY: Registry = Registry::new(MAX_IN_FLIGHT);
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&finished);
        let call = run_in(&REGISTRY, async move {
            let _ = started_tx.send(());
            let _ = go_rx.await;
            flag.store(true, Ordering::SeqCst);
            Ok::<_, TestError>(())
        });
        tokio::select! {
            _ = call => panic!("the work waits for the go"),
            _ = started_rx => {} // the work has begun: the client hangs up here
        }
        assert_eq!(REGISTRY.count.load(Ordering::SeqCst), 1);
        let drained = tokio::spawn(REGISTRY.close_and_wait(Duration::from_secs(60)));
        let _ = go_tx.send(());
        assert_eq!(drained.await.expect("drain"), 0, "drained");
        assert!(finished.load(Ordering::SeqCst), "the write ran to its end");
        // Closed: a new write is refused before it begins, and leaves no count behind.
        let refused: Result<(), TestError> = run_in(&REGISTRY, async { panic!("must not run") }).await;
        assert!(
            matches!(
                refused,
                Err(TestError::Failure(Failure::Unavailable { what: Dependency::ShuttingDown, .. }))
            ),
            "{refused:?}"
        );
        assert_eq!(REGISTRY.count.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_answer_and_a_panic_reach_the_caller() {
        let answer: Result<u8, TestError> = run_to_end(async { Ok(7) }).await;
        assert_eq!(answer.unwrap(), 7);
        let outcome = tokio::spawn(run_to_end::<(), TestError, _>(async { panic!("boom") })).await;
        assert!(outcome.expect_err("panicked").is_panic());
    }
}
