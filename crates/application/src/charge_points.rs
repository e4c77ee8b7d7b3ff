//! Charge points to a user's account.
//!
//! Outside the lock: the user must exist (a cheap read that turns away unknown ids before
//! they queue for a lock). Under `lock:{point:<userId>}`, waiting: read the account with its
//! row locked, apply the domain rule, write the balance only if the account's version is
//! still the one read, and append the history row, all in one transaction.
//!
//! With an idempotency key the charge runs through [`Idempotency`]: at most once per
//! (user, key), its answer recorded in the same transaction, so a client that lost the
//! answer and retries is charged once.

use std::sync::Arc;
use std::time::Duration;

use domain::point::{Balance, ChargeAmount, PointError, PointRepository, PointRepositoryError};
use domain::user::{UserId, UserRepository};

use serde::{Deserialize, Serialize};

use crate::clock;
use crate::detach::run_to_end;
use crate::failure::Failure;
use crate::idempotency::{Fingerprint, Idempotency, IdempotencyError, IdempotencyKey, Outcome, Recorder};
use crate::lock::{DistributedLock, LockKey, LockRequest};
use crate::tx::{TransactionManager, locked_tx};

/// How long a charge waits for `lock:{point:<userId>}` by default. A holder keeps it for a
/// few milliseconds, so three seconds is hundreds of turns; beyond that the client is
/// better told to retry than kept hanging.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct ChargePoints {
    users: Arc<dyn UserRepository>,
    points: Arc<dyn PointRepository>,
    lock: Arc<dyn DistributedLock>,
    txm: Arc<dyn TransactionManager>,
    lock_wait: Duration,
    idempotency: Idempotency,
}

/// What a charge answers, as its idempotency record keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct Charged {
    balance: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ChargePointsError {
    #[error("user {0} not found")]
    UserNotFound(UserId),
    #[error("charging {amount} points to a balance of {balance} would pass the limit")]
    BalanceLimitExceeded { balance: i64, amount: i64 },
    /// The idempotency key was used before with another amount.
    #[error("the idempotency key was used for a different charge")]
    IdempotencyKeyReused,
    /// Contended (the account's lock stayed held for the whole wait), a lost lease, an
    /// unavailable lock store, the database: nothing was changed.
    #[error(transparent)]
    Failure(Failure),
}

crate::failure_conversions!(ChargePointsError);

impl std::fmt::Debug for ChargePoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChargePoints").finish_non_exhaustive()
    }
}

impl ChargePoints {
    #[must_use]
    pub fn new(
        users: Arc<dyn UserRepository>,
        points: Arc<dyn PointRepository>,
        lock: Arc<dyn DistributedLock>,
        txm: Arc<dyn TransactionManager>,
        lock_wait: Duration,
        idempotency: Idempotency,
    ) -> Self {
        Self { users, points, lock, txm, lock_wait, idempotency }
    }

    /// Adds `amount` to the balance of `user_id`, exactly once, and returns the new balance.
    /// With `key`, a repetition of an earlier charge under that key is not applied again:
    /// it answers [`Outcome::Replayed`] with the first charge's balance.
    ///
    /// The charge runs to its end on a task of its own ([`run_to_end`]): a client that
    /// hangs up does not cut it between its commit and its unlock.
    ///
    /// # Errors
    /// [`ChargePointsError::UserNotFound`], [`ChargePointsError::BalanceLimitExceeded`],
    /// [`ChargePointsError::IdempotencyKeyReused`], [`ChargePointsError::Failure`]; on
    /// every error nothing is changed (unless the failure says the commit's outcome is
    /// unknown).
    #[tracing::instrument(name = "charge_points", skip(self, key), fields(%user_id, amount = amount.points(), keyed = key.is_some()))]
    pub async fn execute(
        &self,
        user_id: UserId,
        amount: ChargeAmount,
        key: Option<IdempotencyKey>,
    ) -> Result<Outcome<Balance>, ChargePointsError> {
        let this = self.clone();
        run_to_end(async move { this.charge(user_id, amount, key).await }).await
    }

    async fn charge(
        &self,
        user_id: UserId,
        amount: ChargeAmount,
        key: Option<IdempotencyKey>,
    ) -> Result<Outcome<Balance>, ChargePointsError> {
        let user = self
            .users
            .find(user_id)
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to read the user"))?;
        if user.is_none() {
            return Err(ChargePointsError::UserNotFound(user_id));
        }

        let fingerprint = Fingerprint::of("charge_points", &serde_json::json!({ "amount": amount.points() }));
        let outcome = self
            .idempotency
            .run(user_id, key, fingerprint, |recorder| {
                let points = Arc::clone(&self.points);
                // The key's lock first (if keyed), then the account's.
                let locks = Recorder::locks(
                    recorder.as_ref(),
                    [LockRequest::wait_up_to(LockKey::point(user_id), self.lock_wait)],
                );
                async move {
                    locked_tx(self.lock.as_ref(), self.txm.as_ref(), &locks, move |tx| {
                        Box::pin(async move {
                            // First read of the transaction (its snapshot begins here, after
                            // the locks): keep it first.
                            if let Some(recorder) = &recorder {
                                recorder.ensure_unrecorded(tx).await?;
                            }
                            // Re-checked inside: the account may have gone since the read above.
                            let mut account = points
                                .lock_account(tx, user_id)
                                .await?
                                .ok_or(ChargePointsError::UserNotFound(user_id))?;
                            let read_at = account.version();
                            let entry = account.charge(amount, clock::now_utc())?;
                            points.save_balance(tx, &account, read_at).await?;
                            points.append_history(tx, &entry).await?;
                            let charged = Charged { balance: account.balance().points() };
                            if let Some(recorder) = &recorder {
                                recorder.record(tx, &charged).await?;
                            }
                            Ok::<_, ChargePointsError>(charged)
                        })
                    })
                    .await
                }
            })
            .await?;
        let replayed = outcome.is_replay();
        let balance = Balance::new(outcome.into_inner().balance)
            .map_err(|e| anyhow::Error::new(e).context("a charged balance is out of range"))?;
        tracing::info!(balance = balance.points(), replayed, "points charged");
        let balance = if replayed { Outcome::Replayed(balance) } else { Outcome::Fresh(balance) };
        Ok(balance)
    }
}

impl From<IdempotencyError> for ChargePointsError {
    fn from(error: IdempotencyError) -> Self {
        match error {
            IdempotencyError::KeyReused => Self::IdempotencyKeyReused,
            // Only seen when the run replays instead; reported as is otherwise.
            IdempotencyError::Duplicate => anyhow::anyhow!("idempotency key stored twice").into(),
            IdempotencyError::Failure(failure) => Self::Failure(failure),
        }
    }
}

impl From<PointError> for ChargePointsError {
    fn from(error: PointError) -> Self {
        match error {
            PointError::BalanceLimitExceeded { balance, amount } => {
                Self::BalanceLimitExceeded { balance, amount }
            }
            other => anyhow::Error::new(other).context("point rule violated in storage").into(),
        }
    }
}

impl From<PointRepositoryError> for ChargePointsError {
    fn from(error: PointRepositoryError) -> Self {
        crate::failure::point_write(error, "failed to charge points").into()
    }
}

#[cfg(test)]
mod tests {
    use domain::point::{MAX_BALANCE, MockPointRepository, PointAccount, PointHistoryKind};
    use domain::unit_of_work::MockUnitOfWork;
    use domain::user::{MockUserRepository, User, UserName};

    use super::*;
    use crate::lock::{FencingToken, LockError, MockDistributedLock, MockLockGuard, WaitPolicy};
    use crate::tx::MockTransactionManager;

    struct Harness {
        users: MockUserRepository,
        points: MockPointRepository,
        lock: MockDistributedLock,
        txm: MockTransactionManager,
    }

    impl Harness {
        /// A known user whose lock and transaction succeed; `commit` says whether the
        /// transaction is expected to commit or to roll back.
        fn new(user_id: UserId, commit: bool) -> Self {
            let mut users = MockUserRepository::new();
            users.expect_find().returning(move |_| {
                Ok(Some(User::restore(user_id, UserName::new("kim").unwrap(), clock::now_utc())))
            });
            let mut guard = MockLockGuard::new();
            guard.expect_is_lost().return_const(false);
            guard.expect_key().return_const(LockKey::point(user_id));
            guard.expect_fencing_token().return_const(Some(FencingToken(1)));
            guard.expect_lease_lost().returning(|| Box::pin(std::future::pending()));
            guard.expect_release().times(1).returning(|| Ok(()));
            let mut lock = MockDistributedLock::new();
            lock.expect_acquire()
                .withf(move |key, wait| {
                    key.as_str() == format!("lock:{{point:{user_id}}}")
                        && *wait == WaitPolicy::WaitUpTo(DEFAULT_LOCK_WAIT)
                })
                .times(1)
                .return_once(move |_, _| Ok(Box::new(guard)));
            let mut uow = MockUnitOfWork::new();
            if commit {
                uow.expect_commit().times(1).returning(|| Ok(()));
            } else {
                uow.expect_commit().never();
                uow.expect_rollback().times(1).returning(|| Ok(()));
            }
            let mut txm = MockTransactionManager::new();
            txm.expect_begin().times(1).return_once(move || Ok(Box::new(uow)));
            Self { users, points: MockPointRepository::new(), lock, txm }
        }

        fn build(self) -> ChargePoints {
            ChargePoints::new(
                Arc::new(self.users),
                Arc::new(self.points),
                Arc::new(self.lock),
                Arc::new(self.txm),
                DEFAULT_LOCK_WAIT,
                unkeyed(),
            )
        }
    }

    /// Idempotency for charges made without a key: its store is never asked.
    fn unkeyed() -> Idempotency {
        let mut store = crate::idempotency::MockIdempotencyStore::new();
        store.expect_find().never();
        store.expect_insert().never();
        Idempotency::new(Arc::new(store), DEFAULT_LOCK_WAIT, crate::idempotency::DEFAULT_RETENTION)
    }

    fn amount(points: i64) -> ChargeAmount {
        ChargeAmount::new(points).unwrap()
    }

    fn account(user_id: UserId, points: i64) -> PointAccount {
        PointAccount::restore(user_id, Balance::new(points).unwrap(), 4)
    }

    #[tokio::test]
    async fn charge_adds_the_amount_and_records_a_charge_under_the_point_lock() {
        let user_id = UserId::generate();
        let mut harness = Harness::new(user_id, true);
        harness.points.expect_lock_account().times(1).returning(move |_, u| Ok(Some(account(u, 500))));
        harness
            .points
            .expect_save_balance()
            .withf(|_, account, read_at| {
                account.balance().points() == 1_500 && account.version() == 5 && *read_at == 4
            })
            .times(1)
            .returning(|_, _, _| Ok(()));
        harness
            .points
            .expect_append_history()
            .withf(|_, entry| {
                entry.kind() == PointHistoryKind::Charge
                    && entry.seq() == 5
                    && entry.amount().points() == 1_000
                    && entry.balance_after().points() == 1_500
            })
            .times(1)
            .returning(|_, _| Ok(()));

        let balance = harness.build().execute(user_id, amount(1_000), None).await.unwrap().into_inner();

        assert_eq!(balance.points(), 1_500);
    }

    #[tokio::test]
    async fn unknown_user_is_turned_away_before_any_lock() {
        let mut users = MockUserRepository::new();
        users.expect_find().times(1).returning(|_| Ok(None));
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire().never();
        let mut txm = MockTransactionManager::new();
        txm.expect_begin().never();
        let charge = ChargePoints::new(
            Arc::new(users),
            Arc::new(MockPointRepository::new()),
            Arc::new(lock),
            Arc::new(txm),
            DEFAULT_LOCK_WAIT,
            unkeyed(),
        );

        let result = charge.execute(UserId::generate(), amount(10), None).await;

        assert!(matches!(result, Err(ChargePointsError::UserNotFound(_))));
    }

    #[tokio::test]
    async fn charge_past_the_ceiling_is_refused_and_rolled_back() {
        let user_id = UserId::generate();
        let mut harness = Harness::new(user_id, false);
        harness
            .points
            .expect_lock_account()
            .times(1)
            .returning(move |_, u| Ok(Some(account(u, MAX_BALANCE - 5))));
        harness.points.expect_save_balance().never();
        harness.points.expect_append_history().never();

        let result = harness.build().execute(user_id, amount(6), None).await;

        assert!(matches!(
            result,
            Err(ChargePointsError::BalanceLimitExceeded { balance, amount: 6 }) if balance == MAX_BALANCE - 5
        ));
    }

    #[tokio::test]
    async fn account_gone_inside_the_lock_is_not_found() {
        let user_id = UserId::generate();
        let mut harness = Harness::new(user_id, false);
        harness.points.expect_lock_account().times(1).returning(|_, _| Ok(None));

        let result = harness.build().execute(user_id, amount(6), None).await;

        assert!(matches!(result, Err(ChargePointsError::UserNotFound(id)) if id == user_id));
    }

    #[tokio::test]
    async fn a_stale_balance_rolls_back_and_writes_no_history() {
        let user_id = UserId::generate();
        let mut harness = Harness::new(user_id, false);
        harness.points.expect_lock_account().times(1).returning(move |_, u| Ok(Some(account(u, 0))));
        harness
            .points
            .expect_save_balance()
            .times(1)
            .returning(move |_, _, _| Err(PointRepositoryError::StaleBalance { user_id }));
        harness.points.expect_append_history().never();

        let result = harness.build().execute(user_id, amount(6), None).await;

        assert!(matches!(result, Err(ChargePointsError::Failure(Failure::Unexpected(_)))));
    }

    #[tokio::test]
    async fn a_write_fenced_out_by_a_later_holder_rolls_back_as_a_lost_lease() {
        let user_id = UserId::generate();
        let mut harness = Harness::new(user_id, false);
        harness.points.expect_lock_account().times(1).returning(move |_, u| Ok(Some(account(u, 0))));
        harness
            .points
            .expect_save_balance()
            .times(1)
            .returning(move |_, _, _| Err(PointRepositoryError::Fenced { user_id, refused: 1, stored: 2 }));
        harness.points.expect_append_history().never();

        let result = harness.build().execute(user_id, amount(6), None).await;

        assert!(
            matches!(&result, Err(ChargePointsError::Failure(Failure::LeaseLost(key))) if *key == LockKey::point(user_id)),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_failed_history_insert_rolls_the_balance_back() {
        let user_id = UserId::generate();
        let mut harness = Harness::new(user_id, false);
        harness.points.expect_lock_account().times(1).returning(move |_, u| Ok(Some(account(u, 0))));
        harness.points.expect_save_balance().times(1).returning(|_, _, _| Ok(()));
        harness
            .points
            .expect_append_history()
            .times(1)
            .returning(|_, _| Err(PointRepositoryError::Unexpected(anyhow::anyhow!("lost connection"))));

        let result = harness.build().execute(user_id, amount(6), None).await;

        assert!(matches!(result, Err(ChargePointsError::Failure(Failure::Unexpected(_)))));
    }

    #[tokio::test]
    async fn a_lock_wait_that_runs_out_is_contention_not_failure() {
        let user_id = UserId::generate();
        let mut users = MockUserRepository::new();
        users.expect_find().returning(move |_| {
            Ok(Some(User::restore(user_id, UserName::new("kim").unwrap(), clock::now_utc())))
        });
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire()
            .times(1)
            .returning(|key, _| Err(LockError::Timeout { key: key.clone(), waited: DEFAULT_LOCK_WAIT }));
        let mut txm = MockTransactionManager::new();
        txm.expect_begin().never();
        let charge = ChargePoints::new(
            Arc::new(users),
            Arc::new(MockPointRepository::new()),
            Arc::new(lock),
            Arc::new(txm),
            DEFAULT_LOCK_WAIT,
            unkeyed(),
        );

        let result = charge.execute(user_id, amount(6), None).await;

        assert!(
            matches!(result, Err(ChargePointsError::Failure(Failure::Contended(key))) if key == LockKey::point(user_id))
        );
    }

    #[tokio::test]
    async fn an_unreachable_lock_store_fails_closed() {
        let user_id = UserId::generate();
        let mut users = MockUserRepository::new();
        users.expect_find().returning(move |_| {
            Ok(Some(User::restore(user_id, UserName::new("kim").unwrap(), clock::now_utc())))
        });
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire()
            .times(1)
            .returning(|_, _| Err(LockError::Unavailable(anyhow::anyhow!("connection refused"))));
        let mut txm = MockTransactionManager::new();
        txm.expect_begin().never();
        let charge = ChargePoints::new(
            Arc::new(users),
            Arc::new(MockPointRepository::new()),
            Arc::new(lock),
            Arc::new(txm),
            DEFAULT_LOCK_WAIT,
            unkeyed(),
        );

        let result = charge.execute(user_id, amount(6), None).await;

        assert!(matches!(result, Err(ChargePointsError::Failure(Failure::Unavailable { .. }))));
    }
}
