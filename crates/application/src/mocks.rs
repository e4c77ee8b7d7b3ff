//! Mocks the use cases' unit tests share: a lock guard whose lease holds, and a unit of
//! work that commits or rolls back once.

use domain::unit_of_work::MockUnitOfWork;

use crate::lock::{FencingToken, LockKey, MockLockGuard};
use crate::tx::MockTransactionManager;

/// A guard of `key` whose lease holds for as long as the test runs. The caller says how it
/// is released (`expect_release`), in a sequence or not.
pub(crate) fn held_guard(key: LockKey) -> MockLockGuard {
    let mut guard = MockLockGuard::new();
    guard.expect_is_lost().return_const(false);
    guard.expect_key().return_const(key);
    guard.expect_fencing_token().return_const(FencingToken(1));
    guard.expect_lease_lost().returning(|| Box::pin(std::future::pending()));
    guard
}

/// [`held_guard`], released once.
pub(crate) fn released_guard(key: LockKey) -> MockLockGuard {
    let mut guard = held_guard(key);
    guard.expect_release().times(1).returning(|| Ok(()));
    guard
}

/// A unit of work that commits once (`commit`) or rolls back once and never commits.
pub(crate) fn unit_of_work(commit: bool) -> MockUnitOfWork {
    let mut uow = MockUnitOfWork::new();
    if commit {
        uow.expect_commit().times(1).returning(|| Ok(()));
    } else {
        uow.expect_commit().never();
        uow.expect_rollback().times(1).returning(|| Ok(()));
    }
    uow
}

/// A transaction manager that begins one [`unit_of_work`].
pub(crate) fn one_tx(commit: bool) -> MockTransactionManager {
    let uow = unit_of_work(commit);
    let mut txm = MockTransactionManager::new();
    txm.expect_begin().times(1).return_once(move || Ok(Box::new(uow)));
    txm
}
