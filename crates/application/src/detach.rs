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
//! The task is bounded: by the lock waits, the longest hold of a lock
//! (`LOCK_MAX_HOLD_MS`: past it the work is abandoned and rolled back) and the database's
//! statement timeout; so is how many run, by the requests the server accepted.

use std::future::Future;
use std::panic::resume_unwind;

use tracing::Instrument as _;

/// Runs `work` on a task of its own, in the caller's tracing span, and waits for its
/// result. Dropping the returned future does not stop `work`.
///
/// # Panics
/// When `work` panics (the panic goes on in the caller), or when the runtime shuts down
/// before `work` ended.
pub async fn run_to_end<T, F>(work: F) -> T
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::spawn(work.in_current_span()).await {
        Ok(value) => value,
        Err(error) if error.is_panic() => resume_unwind(error.into_panic()),
        Err(error) => panic!("a write was cancelled by the runtime shutting down: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn work_goes_on_to_its_end_when_the_caller_stops_waiting() {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&finished);
        let call = run_to_end(async move {
            let _ = started_tx.send(());
            let _ = go_rx.await;
            flag.store(true, Ordering::SeqCst);
            let _ = done_tx.send(());
        });
        tokio::select! {
            () = call => panic!("the work waits for the go"),
            _ = started_rx => {} // the work has begun: the client hangs up here
        }
        let _ = go_tx.send(());
        tokio::time::timeout(Duration::from_secs(60), done_rx).await.expect("ran to its end").expect("sent");
        assert!(finished.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_panic_in_the_work_reaches_the_caller() {
        let outcome = tokio::spawn(run_to_end(async { panic!("boom") })).await;
        assert!(outcome.expect_err("panicked").is_panic());
    }
}
