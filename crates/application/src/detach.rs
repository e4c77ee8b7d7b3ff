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
//! - at shutdown: the server stops taking requests, then waits for the writes in flight
//!   ([`drain`]) before its workers stop, so a write whose client has gone still ends.
//!
//! A write that ends after its client has gone is logged (its error at `warn`), since no
//! answer will carry it.

use std::future::Future;
use std::panic::resume_unwind;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tracing::Instrument as _;

use crate::failure::{Dependency, Failure};

/// The most writes one process runs at once.
pub const MAX_IN_FLIGHT: usize = 10_000;

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static ENDED: Notify = Notify::const_new();

/// One write counted in [`IN_FLIGHT`] until dropped.
struct InFlight;

impl InFlight {
    fn enter() -> Option<Self> {
        IN_FLIGHT
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < MAX_IN_FLIGHT).then_some(n + 1))
            .ok()
            .map(|_| Self)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        ENDED.notify_waiters();
    }
}

/// Runs `work` on a task of its own, in the caller's tracing span, and waits for its
/// result. Dropping the returned future does not stop `work`.
///
/// # Errors
/// `work`'s own error, or [`Failure::Unavailable`] (converted into `E`) when
/// [`MAX_IN_FLIGHT`] writes are running already: then `work` does not run.
///
/// # Panics
/// When `work` panics (the panic goes on in the caller).
pub async fn run_to_end<T, E, F>(work: F) -> Result<T, E>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: From<Failure> + std::fmt::Display + Send + 'static,
{
    let Some(in_flight) = InFlight::enter() else {
        tracing::warn!(limit = MAX_IN_FLIGHT, "too many writes in flight; refused");
        return Err(Failure::Unavailable {
            what: Dependency::WriteCapacity,
            source: anyhow::anyhow!("{MAX_IN_FLIGHT} writes in flight"),
        }
        .into());
    };
    let (answer, answered) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(
        async move {
            let _in_flight = in_flight;
            let outcome = work.await;
            if let Err(unheard) = answer.send(outcome) {
                match unheard {
                    Ok(_) => tracing::info!("a write ended after its client had gone"),
                    Err(error) => {
                        tracing::warn!(error = %error, "a write failed after its client had gone");
                    }
                }
            }
        }
        .in_current_span(),
    );
    match task.await {
        Ok(()) => answered.await.unwrap_or_else(|_| unreachable!("the task answers before it ends")),
        Err(error) if error.is_panic() => resume_unwind(error.into_panic()),
        Err(error) => panic!("a write was cancelled by the runtime shutting down: {error}"),
    }
}

/// How many writes are running now.
#[must_use]
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::SeqCst)
}

/// Waits until no write is running, or `within` passed; returns how many still run.
pub async fn drain(within: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ended = ENDED.notified();
        tokio::pin!(ended);
        // Registered before the count is read, so an end between the two is not missed.
        ended.as_mut().enable();
        let running = in_flight();
        if running == 0 {
            return 0;
        }
        if tokio::time::timeout_at(deadline, ended).await.is_err() {
            return in_flight();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error(transparent)]
        Failure(#[from] Failure),
    }

    #[tokio::test]
    async fn work_goes_on_to_its_end_when_the_caller_stops_waiting_and_drain_waits_for_it() {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&finished);
        let call = run_to_end(async move {
            let _ = started_tx.send(());
            let _ = go_rx.await;
            flag.store(true, Ordering::SeqCst);
            Ok::<_, TestError>(())
        });
        tokio::select! {
            _ = call => panic!("the work waits for the go"),
            _ = started_rx => {} // the work has begun: the client hangs up here
        }
        assert!(in_flight() >= 1);
        let _ = go_tx.send(());
        // Other tests of this process may run writes too: wait for all of them.
        assert_eq!(drain(Duration::from_secs(60)).await, 0, "drained");
        assert!(finished.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn the_answer_and_a_panic_reach_the_caller() {
        let answer: Result<u8, TestError> = run_to_end(async { Ok(7) }).await;
        assert_eq!(answer.unwrap(), 7);
        let outcome = tokio::spawn(run_to_end::<(), TestError, _>(async { panic!("boom") })).await;
        assert!(outcome.expect_err("panicked").is_panic());
    }
}
