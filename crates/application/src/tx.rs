//! Transactions, and the one place that orders them with locks.
//!
//! **Acquire the lock, begin the transaction, commit, then release the lock.**
//! - A lock released before commit lets the next holder read the rows as they were before
//!   this holder's commit, and overwrite them.
//! - A transaction begun before the lock reads a snapshot from before the previous holder
//!   committed, and holds a pooled connection all the while it waits.
//!
//! [`locked_tx`] is that order, written once, for one lock or several taken in a fixed
//! order (a payment takes its reservation's, then its user's). It also releases the locks
//! on every path:
//! when the work fails (rollback, then release), when it panics (rollback, release, then
//! the panic goes on), and when the caller's future is dropped mid-way (the guard's and
//! the unit of work's `Drop` release and roll back). Before committing it checks that the
//! lease is still held; a lost lease rolls the work back, since another holder may already
//! be writing.

use std::any::Any;
use std::panic::{AssertUnwindSafe, resume_unwind};

use async_trait::async_trait;
use domain::unit_of_work::{Tx, TxError};
use futures::FutureExt;
use futures::future::{BoxFuture, Either};

use crate::failure::Failure;
use crate::lock::{DistributedLock, FencingToken, LockError, LockGuard, LockKey, LockRequest};

/// Begins transactions. The adapter decides what a transaction is.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait TransactionManager: Send + Sync {
    /// Begins a transaction on a pooled connection.
    ///
    /// # Errors
    /// [`TxError::Unexpected`] when no connection can be had or the database refuses.
    async fn begin(&self) -> Result<Box<Tx>, TxError>;

    /// Begins a transaction whose locking reads lock only the rows they return (no gaps):
    /// for queue-like work (the outbox relay) that must not hold up writers appending
    /// after it.
    ///
    /// # Errors
    /// As [`TransactionManager::begin`].
    async fn begin_read_committed(&self) -> Result<Box<Tx>, TxError>;
}

/// Runs `work` inside a transaction: begin, work, then commit on `Ok` or roll back on
/// `Err` (or panic). For writes that need no lock, such as inserting a fresh row.
///
/// # Errors
/// `work`'s own error, or a [`Failure`] from begin or commit, converted into `E`.
pub async fn in_tx<T, E, F>(txm: &dyn TransactionManager, work: F) -> Result<T, E>
where
    F: for<'u> FnOnce(&'u mut Tx) -> BoxFuture<'u, Result<T, E>> + Send,
    E: From<Failure>,
{
    match transaction(txm, &[], work).await {
        Ended::Returned(result) => result,
        // Without a lease there is nothing to lose.
        Ended::LeaseLost(key) => unreachable!("no lease was given, yet {key} was lost"),
        Ended::Panicked(panic) => resume_unwind(panic),
    }
}

tokio::task_local! {
    /// The fencing tokens of the locks the running transaction's work holds.
    static FENCES: Vec<(LockKey, FencingToken)>;
}

/// The fencing token of `key`'s lock, when the transaction running on this task holds it
/// (inside [`locked_tx`]'s work); `None` outside, or for an unfenced key.
///
/// Every write made under a fenced lock carries this number (the adapters ask for it), and
/// the database keeps the highest number it accepted per resource and refuses a lower one
/// in the same conditional update that already guards the write: a holder whose lease ran
/// out while it was paused cannot overwrite what the next holder committed.
#[must_use]
pub fn fence(key: &LockKey) -> Option<FencingToken> {
    FENCES
        .try_with(|fences| fences.iter().find(|(held, _)| held == key).map(|(_, token)| *token))
        .ok()
        .flatten()
}

/// Runs `work` with `fences` as its transaction's fencing tokens ([`fence`]): what
/// [`locked_tx`] does with the tokens of the locks it took. For adapters' tests.
pub async fn with_fences<T>(fences: Vec<(LockKey, FencingToken)>, work: impl Future<Output = T>) -> T {
    FENCES.scope(fences, work).await
}

/// Runs `work` as: acquire every lock of `locks`, in their order, each under its own wait
/// -> begin -> work -> commit (or roll back) -> release them all, in reverse order. See
/// the module documentation for why this order, and for what happens on each failure path.
///
/// Every lease is watched: the work may take only as long as all of them can be trusted,
/// and the commit is not sent once any of them is known lost ([`Failure::LeaseLost`]:
/// the work was rolled back). A lock that cannot be had releases the ones taken before it
/// and begins nothing.
///
/// A release that fails after a commit is logged, not returned: the work is durable and
/// the caller must hear so; the lease frees the key.
///
/// # Errors
/// A [`Failure`] from acquiring (contended, unavailable), a lease lost before the commit,
/// or the transaction; or `work`'s own error.
pub async fn locked_tx<T, E, F>(
    lock: &dyn DistributedLock,
    txm: &dyn TransactionManager,
    locks: &[LockRequest],
    work: F,
) -> Result<T, E>
where
    F: for<'u> FnOnce(&'u mut Tx) -> BoxFuture<'u, Result<T, E>> + Send,
    E: From<Failure>,
{
    let mut guards: Vec<Box<dyn LockGuard>> = Vec::with_capacity(locks.len());
    for request in locks {
        match lock.acquire(&request.key, request.wait).await {
            Ok(guard) => guards.push(guard),
            Err(error) => {
                release_all(guards).await;
                return Err(Failure::from(error).into());
            }
        }
    }
    let ended = transaction(txm, &guards, work).await;
    release_all(guards).await;
    match ended {
        Ended::Returned(result) => result,
        Ended::LeaseLost(key) => Err(Failure::LeaseLost(key).into()),
        Ended::Panicked(panic) => resume_unwind(panic),
    }
}

/// Releases `guards` in the reverse of the order they were taken.
async fn release_all(guards: Vec<Box<dyn LockGuard>>) {
    for guard in guards.into_iter().rev() {
        let key = guard.key().clone();
        match guard.release().await {
            Ok(()) => {}
            Err(LockError::LeaseLost { .. }) => {
                tracing::warn!(%key, "lease had run out by release time; another holder may have overlapped, the SQL guards keep writes exact");
            }
            Err(error) => {
                tracing::warn!(%key, error = %error, "lock release failed; the lease will free the key");
            }
        }
    }
}

enum Ended<T, E> {
    Returned(Result<T, E>),
    /// The work succeeded but a lease ran out first; the work was rolled back.
    LeaseLost(LockKey),
    Panicked(Box<dyn Any + Send>),
}

async fn transaction<T, E, F>(
    txm: &dyn TransactionManager,
    leases: &[Box<dyn LockGuard>],
    work: F,
) -> Ended<T, E>
where
    F: for<'u> FnOnce(&'u mut Tx) -> BoxFuture<'u, Result<T, E>> + Send,
    E: From<Failure>,
{
    let mut tx = match txm.begin().await {
        Ok(tx) => tx,
        Err(error) => return Ended::Returned(Err(Failure::from(error).into())),
    };
    let fences: Vec<(LockKey, FencingToken)> = leases
        .iter()
        .filter_map(|guard| guard.fencing_token().map(|token| (guard.key().clone(), token)))
        .collect();
    let worked = {
        let work = AssertUnwindSafe(FENCES.scope(fences, work(tx.as_mut()))).catch_unwind();
        if leases.is_empty() {
            Some(work.await)
        } else {
            // The work may take only as long as every lease can be trusted.
            let lost = futures::future::select_all(leases.iter().map(|guard| guard.lease_lost()));
            match futures::future::select(Box::pin(work), lost).await {
                Either::Left((worked, _)) => Some(worked),
                Either::Right(_) => None,
            }
        }
    };
    let Some(worked) = worked else {
        // The work was dropped mid-way; nothing it did may commit.
        roll_back(tx).await;
        let key = lost_key(leases);
        tracing::warn!(%key, "the lease ran out before the work was done; rolled back");
        return Ended::LeaseLost(key);
    };
    match worked {
        Ok(Ok(value)) => {
            if leases.iter().any(|guard| guard.is_lost()) {
                roll_back(tx).await;
                return Ended::LeaseLost(lost_key(leases));
            }
            Ended::Returned(tx.commit().await.map(|()| value).map_err(|e| Failure::from(e).into()))
        }
        Ok(Err(error)) => {
            roll_back(tx).await;
            Ended::Returned(Err(error))
        }
        Err(panic) => {
            roll_back(tx).await;
            Ended::Panicked(panic)
        }
    }
}

/// The key of the first lease known lost (or the first lease, if none is known yet).
fn lost_key(leases: &[Box<dyn LockGuard>]) -> LockKey {
    leases
        .iter()
        .find(|guard| guard.is_lost())
        .or_else(|| leases.first())
        .map_or_else(|| LockKey::new("none", "-"), |guard| guard.key().clone())
}

async fn roll_back(tx: Box<Tx>) {
    if let Err(error) = tx.rollback().await {
        // The database rolls back by itself when the connection drops; nothing is lost.
        tracing::warn!(error = %error, "rollback failed");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use domain::unit_of_work::MockUnitOfWork;
    use mockall::Sequence;

    use super::*;
    use crate::lock::{FencingToken, MockDistributedLock, MockLockGuard, WaitPolicy};

    /// A step of the work, so the work takes its place in a mockall `Sequence`.
    #[mockall::automock]
    trait Step: Send + Sync {
        fn run(&self);
    }

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error("work failed")]
        Work,
        #[error(transparent)]
        Failure(#[from] Failure),
    }

    fn key() -> LockKey {
        LockKey::new("test", "k")
    }

    const WAIT: WaitPolicy = WaitPolicy::WaitUpTo(Duration::from_secs(3));

    /// A guard whose `is_lost` answers `lost`, released exactly once.
    fn guard(lost: bool) -> MockLockGuard {
        let mut guard = MockLockGuard::new();
        guard.expect_is_lost().return_const(lost);
        guard.expect_key().return_const(key());
        guard.expect_fencing_token().return_const(Some(FencingToken(1)));
        guard.expect_lease_lost().returning(|| Box::pin(std::future::pending()));
        guard.expect_release().times(1).returning(|| Ok(()));
        guard
    }

    fn lock_handing_out(guard: MockLockGuard) -> MockDistributedLock {
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire().times(1).return_once(move |_, _| Ok(Box::new(guard)));
        lock
    }

    fn txm_handing_out(uow: MockUnitOfWork) -> MockTransactionManager {
        let mut txm = MockTransactionManager::new();
        txm.expect_begin().times(1).return_once(move || Ok(Box::new(uow)));
        txm
    }

    #[tokio::test]
    async fn the_work_sees_the_fencing_token_of_each_lock_it_holds_and_nothing_outside() {
        let mut uow = MockUnitOfWork::new();
        uow.expect_commit().times(1).returning(|| Ok(()));
        let mut fenced = MockLockGuard::new();
        fenced.expect_is_lost().return_const(false);
        fenced.expect_key().return_const(LockKey::fenced("test", "f"));
        fenced.expect_fencing_token().return_const(Some(FencingToken(42)));
        fenced.expect_lease_lost().returning(|| Box::pin(std::future::pending()));
        fenced.expect_release().times(1).returning(|| Ok(()));
        let mut unfenced = MockLockGuard::new();
        unfenced.expect_is_lost().return_const(false);
        unfenced.expect_key().return_const(key());
        unfenced.expect_fencing_token().return_const(None);
        unfenced.expect_lease_lost().returning(|| Box::pin(std::future::pending()));
        unfenced.expect_release().times(1).returning(|| Ok(()));
        let mut lock = MockDistributedLock::new();
        let guards = Mutex::new(vec![Box::new(unfenced) as Box<dyn LockGuard>, Box::new(fenced)]);
        lock.expect_acquire().times(2).returning(move |_, _| Ok(guards.lock().unwrap().pop().unwrap()));
        let requests = [LockRequest::fail_fast(LockKey::fenced("test", "f")), LockRequest::fail_fast(key())];

        let seen = locked_tx(&lock, &txm_handing_out(uow), &requests, |_| {
            Box::pin(async {
                Ok::<_, Failure>((
                    fence(&LockKey::fenced("test", "f")),
                    fence(&key()),
                    fence(&LockKey::fenced("test", "other")),
                ))
            })
        })
        .await
        .unwrap();

        assert_eq!(seen, (Some(FencingToken(42)), None, None));
    }

    #[tokio::test]
    async fn lock_then_begin_then_work_then_commit_then_release() {
        let mut seq = Sequence::new();
        // The guard and the unit of work are made before their expectations are all set,
        // so they reach the `returning` closures through shared slots.
        let guard_slot: Arc<Mutex<Option<MockLockGuard>>> = Arc::default();
        let uow_slot: Arc<Mutex<Option<MockUnitOfWork>>> = Arc::default();

        let mut lock = MockDistributedLock::new();
        let slot = Arc::clone(&guard_slot);
        lock.expect_acquire()
            .withf(|k, w| k.as_str() == "lock:{test:k}" && *w == WAIT)
            .times(1)
            .in_sequence(&mut seq)
            .returning(move |_, _| Ok(Box::new(slot.lock().unwrap().take().unwrap())));

        let mut txm = MockTransactionManager::new();
        let slot = Arc::clone(&uow_slot);
        txm.expect_begin()
            .times(1)
            .in_sequence(&mut seq)
            .returning(move || Ok(Box::new(slot.lock().unwrap().take().unwrap())));

        let mut step = MockStep::new();
        step.expect_run().times(1).in_sequence(&mut seq).return_const(());

        let mut uow = MockUnitOfWork::new();
        uow.expect_commit().times(1).in_sequence(&mut seq).returning(|| Ok(()));
        uow.expect_rollback().never();

        let mut guard = MockLockGuard::new();
        guard.expect_is_lost().return_const(false);
        guard.expect_key().return_const(key());
        guard.expect_fencing_token().return_const(None);
        guard.expect_lease_lost().returning(|| Box::pin(std::future::pending()));
        guard.expect_release().times(1).in_sequence(&mut seq).returning(|| Ok(()));

        *guard_slot.lock().unwrap() = Some(guard);
        *uow_slot.lock().unwrap() = Some(uow);

        let result: Result<u32, TestError> =
            locked_tx(&lock, &txm, &[LockRequest { key: key(), wait: WAIT }], move |_tx| {
                Box::pin(async move {
                    step.run();
                    Ok(7)
                })
            })
            .await;

        assert_eq!(result.unwrap(), 7);
    }

    #[tokio::test]
    async fn failed_work_is_rolled_back_and_the_lock_released() {
        let mut uow = MockUnitOfWork::new();
        uow.expect_commit().never();
        uow.expect_rollback().times(1).returning(|| Ok(()));
        let lock = lock_handing_out(guard(false));
        let txm = txm_handing_out(uow);

        let result: Result<(), TestError> =
            locked_tx(&lock, &txm, &[LockRequest { key: key(), wait: WAIT }], |_tx| {
                Box::pin(async { Err(TestError::Work) })
            })
            .await;

        assert!(matches!(result, Err(TestError::Work)));
    }

    #[tokio::test]
    async fn panicking_work_is_rolled_back_and_the_lock_released_before_the_panic_goes_on() {
        let mut uow = MockUnitOfWork::new();
        uow.expect_commit().never();
        uow.expect_rollback().times(1).returning(|| Ok(()));
        let lock = lock_handing_out(guard(false));
        let txm = txm_handing_out(uow);

        let outcome = AssertUnwindSafe(locked_tx::<(), TestError, _>(
            &lock,
            &txm,
            &[LockRequest { key: key(), wait: WAIT }],
            |_tx| Box::pin(async { panic!("work exploded") }),
        ))
        .catch_unwind()
        .await;

        let panic = outcome.expect_err("the panic reaches the caller");
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"work exploded"));
        // Dropping the mocks here verifies rollback and release were each called once.
    }

    #[tokio::test]
    async fn a_lease_lost_during_the_work_rolls_back_instead_of_committing() {
        let mut uow = MockUnitOfWork::new();
        uow.expect_commit().never();
        uow.expect_rollback().times(1).returning(|| Ok(()));
        let lock = lock_handing_out(guard(true));
        let txm = txm_handing_out(uow);

        let result: Result<(), TestError> =
            locked_tx(&lock, &txm, &[LockRequest { key: key(), wait: WAIT }], |_tx| {
                Box::pin(async { Ok(()) })
            })
            .await;

        assert!(matches!(result, Err(TestError::Failure(Failure::LeaseLost(_)))));
    }

    #[tokio::test]
    async fn work_that_outlasts_the_lease_is_abandoned_rolled_back_and_the_lock_released() {
        let mut uow = MockUnitOfWork::new();
        uow.expect_commit().never();
        uow.expect_rollback().times(1).returning(|| Ok(()));
        let mut guard = MockLockGuard::new();
        guard.expect_is_lost().return_const(true);
        guard.expect_key().return_const(key());
        guard.expect_fencing_token().return_const(None);
        // The lease runs out while the work hangs (a database call that never returns).
        let (lost_tx, lost_rx) = tokio::sync::oneshot::channel::<()>();
        let lost = std::sync::Mutex::new(Some(lost_rx));
        guard.expect_lease_lost().times(1).returning(move || {
            let rx = lost.lock().unwrap().take().expect("asked once");
            Box::pin(async move {
                let _ = rx.await;
            })
        });
        guard.expect_release().times(1).returning(|| Ok(()));
        let lock = lock_handing_out(guard);
        let txm = txm_handing_out(uow);

        let result: Result<(), TestError> =
            locked_tx(&lock, &txm, &[LockRequest { key: key(), wait: WAIT }], move |_tx| {
                Box::pin(async move {
                    let _ = lost_tx.send(());
                    std::future::pending::<()>().await;
                    Ok(())
                })
            })
            .await;

        assert!(matches!(result, Err(TestError::Failure(Failure::LeaseLost(_)))), "{result:?}");
    }

    #[tokio::test]
    async fn a_lock_that_cannot_be_had_begins_no_transaction() {
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire().times(1).returning(|key, _| Err(LockError::Busy { key: key.clone() }));
        let mut txm = MockTransactionManager::new();
        txm.expect_begin().never();

        let result: Result<(), TestError> =
            locked_tx(&lock, &txm, &[LockRequest::fail_fast(key())], |_tx| Box::pin(async { Ok(()) })).await;

        assert!(matches!(result, Err(TestError::Failure(Failure::Contended(_)))));
    }

    #[tokio::test]
    async fn a_transaction_that_cannot_begin_still_releases_the_lock() {
        let lock = lock_handing_out(guard(false));
        let mut txm = MockTransactionManager::new();
        txm.expect_begin().times(1).returning(|| Err(TxError::Unexpected(anyhow::anyhow!("pool exhausted"))));

        let result: Result<(), TestError> =
            locked_tx(&lock, &txm, &[LockRequest { key: key(), wait: WAIT }], |_tx| {
                Box::pin(async { Ok(()) })
            })
            .await;

        assert!(matches!(result, Err(TestError::Failure(Failure::Unexpected(_)))));
    }

    #[tokio::test]
    async fn a_failed_commit_is_reported_and_the_lock_still_released() {
        let mut uow = MockUnitOfWork::new();
        uow.expect_commit().times(1).returning(|| Err(TxError::Unexpected(anyhow::anyhow!("deadlock"))));
        let lock = lock_handing_out(guard(false));
        let txm = txm_handing_out(uow);

        let result: Result<(), TestError> =
            locked_tx(&lock, &txm, &[LockRequest { key: key(), wait: WAIT }], |_tx| {
                Box::pin(async { Ok(()) })
            })
            .await;

        assert!(matches!(result, Err(TestError::Failure(Failure::Unexpected(_)))));
    }

    #[tokio::test]
    async fn a_release_that_fails_after_commit_does_not_undo_the_answer() {
        let mut guard = MockLockGuard::new();
        guard.expect_is_lost().return_const(false);
        guard.expect_key().return_const(key());
        guard.expect_fencing_token().return_const(None);
        guard.expect_lease_lost().returning(|| Box::pin(std::future::pending()));
        guard.expect_release().times(1).returning(|| Err(LockError::LeaseLost { key: key() }));
        let mut uow = MockUnitOfWork::new();
        uow.expect_commit().times(1).returning(|| Ok(()));
        let lock = lock_handing_out(guard);
        let txm = txm_handing_out(uow);

        let result: Result<&str, TestError> =
            locked_tx(&lock, &txm, &[LockRequest { key: key(), wait: WAIT }], |_tx| {
                Box::pin(async { Ok("committed") })
            })
            .await;

        assert_eq!(result.unwrap(), "committed");
    }

    /// Records being dropped: what a real guard (release in the background) and a real
    /// unit of work (rollback) do when a request is cancelled.
    #[derive(Debug)]
    struct DropFlag(Arc<Mutex<Vec<&'static str>>>, &'static str);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.lock().unwrap().push(self.1);
        }
    }

    #[derive(Debug)]
    struct FakeGuard(DropFlag, LockKey);

    #[async_trait]
    impl LockGuard for FakeGuard {
        fn key(&self) -> &LockKey {
            &self.1
        }
        fn fencing_token(&self) -> Option<FencingToken> {
            Some(FencingToken(1))
        }
        fn is_lost(&self) -> bool {
            false
        }
        fn lease_lost(&self) -> BoxFuture<'static, ()> {
            Box::pin(std::future::pending())
        }
        async fn release(self: Box<Self>) -> Result<(), LockError> {
            self.0.0.lock().unwrap().push("released");
            Ok(())
        }
    }

    #[derive(Debug)]
    struct FakeUow(#[allow(dead_code, reason = "held for its Drop")] DropFlag);

    #[async_trait]
    impl domain::unit_of_work::UnitOfWork for FakeUow {
        async fn commit(self: Box<Self>) -> Result<(), TxError> {
            Ok(())
        }
        async fn rollback(self: Box<Self>) -> Result<(), TxError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_cancelled_caller_drops_the_guard_and_the_transaction_without_committing() {
        let dropped: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let mut lock = MockDistributedLock::new();
        let flag = Arc::clone(&dropped);
        lock.expect_acquire()
            .times(1)
            .return_once(move |key, _| Ok(Box::new(FakeGuard(DropFlag(flag, "guard dropped"), key.clone()))));
        let mut txm = MockTransactionManager::new();
        let flag = Arc::clone(&dropped);
        txm.expect_begin().times(1).return_once(move || Ok(Box::new(FakeUow(DropFlag(flag, "tx dropped")))));
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();

        let key = key();
        let locks = [LockRequest { key: key.clone(), wait: WAIT }];
        let call = locked_tx::<(), TestError, _>(&lock, &txm, &locks, move |_tx| {
            Box::pin(async move {
                let _ = started_tx.send(());
                std::future::pending::<()>().await; // a client that hangs up mid-work
                Ok(())
            })
        });
        tokio::select! {
            _ = call => panic!("the work never finishes"),
            _ = started_rx => {} // the work has begun: cancel the call by dropping it here
        }

        let dropped = dropped.lock().unwrap().clone();
        assert!(dropped.contains(&"tx dropped"), "{dropped:?}");
        assert!(dropped.contains(&"guard dropped"), "{dropped:?}");
        assert!(!dropped.contains(&"released"), "nothing ran after the cancellation: {dropped:?}");
    }

    #[tokio::test]
    async fn in_tx_commits_on_success_and_rolls_back_on_failure() {
        let mut committed = MockUnitOfWork::new();
        committed.expect_commit().times(1).returning(|| Ok(()));
        let txm = txm_handing_out(committed);
        let ok: Result<i32, TestError> = in_tx(&txm, |_tx| Box::pin(async { Ok(1) })).await;
        assert_eq!(ok.unwrap(), 1);

        let mut rolled_back = MockUnitOfWork::new();
        rolled_back.expect_commit().never();
        rolled_back.expect_rollback().times(1).returning(|| Ok(()));
        let txm = txm_handing_out(rolled_back);
        let failed: Result<i32, TestError> =
            in_tx(&txm, |_tx| Box::pin(async { Err(TestError::Work) })).await;
        assert!(matches!(failed, Err(TestError::Work)));
    }
}
