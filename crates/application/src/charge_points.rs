//! Charge points to a user's account.
//!
//! Under `lock:{point:<userId>}`, waiting: read the account with its row locked, apply the
//! domain rule, write the balance only if the account's version is still the one read, and
//! append the history row, all in one transaction. (No read of the user before the lock:
//! the route only charges its authenticated caller, whose account exists; an account
//! missing inside the lock is still answered `UserNotFound`.)
//!
//! **Batches.** A hot account (thousands of charges at once) would otherwise pay one lock
//! hand-off per charge, and the hand-off, not the database, is what costs. So the
//! charges without an idempotency key that one instance has for one account queue up
//! ([`ChargePoints::with_batches`]): the first becomes the batch's *leader*, a task that
//! takes the lock once, applies up to `max` queued charges in one transaction, each
//! judged on the balance the ones before it left (a refused one changes nothing and gets
//! its own 409), writes one history row per charge and the balance once, commits,
//! releases, and answers each charge with its own balance; then it takes the next batch
//! if more queued meanwhile. Exact as before: one history row and one answer per charge,
//! the same version compare-and-set and fencing. A failure of the batch (the lock, the
//! database) is every member's answer, as it would have been each one's alone. Each
//! queued charge counts as a write in flight ([`crate::detach::Ticket`]), so the
//! per-process bound and the shutdown drain see it; a client that hangs up leaves its
//! charge queued, applied and logged, as an unbatched one would be.
//!
//! With an idempotency key the charge runs through [`Idempotency`] on its own: at most
//! once per (user, key), its answer recorded in the same transaction, so a client that
//! lost the answer and retries is charged once.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::point::{Balance, ChargeAmount, PointError, PointRepository, PointRepositoryError};
use domain::user::UserId;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument as _;

use serde::{Deserialize, Serialize};

use crate::clock;
use crate::detach::{Ticket, run_to_end};
use crate::failure::Failure;
use crate::idempotency::{Fingerprint, Idempotency, IdempotencyError, IdempotencyKey, Outcome, Recorder};
use crate::lock::{DistributedLock, LockKey, LockRequest, WaitPolicy};
use crate::tx::{TransactionManager, in_tx, locked_tx};

/// How long a charge waits for `lock:{point:<userId>}` by default. A holder keeps it for a
/// few milliseconds, so three seconds is hundreds of turns; beyond that the client is
/// better told to retry than kept hanging.
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(3);

/// How charges without an idempotency key keep the changes of one account apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeStrategy {
    /// The product: `lock:{point:<userId>}`, waiting, then the row lock, in batches when
    /// [`ChargePoints::with_batches`] says so.
    Locked,
    /// A benchmark's baseline (`POINT_CHARGE_STRATEGY=optimistic`): no distributed lock and
    /// no row lock; read the account, write it with a compare-and-set on the version read,
    /// and on a conflict (another charge committed in between) start again after a random
    /// pause (full jitter, from 1 ms doubling up to 50 ms), `attempts` times in all; then
    /// refuse as contended (429, nothing changed). Exact (the compare-and-set is the
    /// guard), but under contention most attempts lose.
    Optimistic { attempts: u32 },
}

/// The first and the largest pause of an optimistic charge after a conflict.
const OPTIMISTIC_BACKOFF: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(50));

/// The default largest batch: a hundred charges are one transaction of a few milliseconds.
pub const DEFAULT_BATCH_MAX: NonZeroUsize = NonZeroUsize::MIN.saturating_add(99);

#[derive(Clone)]
pub struct ChargePoints {
    points: Arc<dyn PointRepository>,
    lock: Arc<dyn DistributedLock>,
    txm: Arc<dyn TransactionManager>,
    lock_wait: Duration,
    idempotency: Idempotency,
    /// Unkeyed charges queued per account on this instance; `None`: each charge alone.
    batches: Option<Arc<Batches>>,
    strategy: ChargeStrategy,
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
        points: Arc<dyn PointRepository>,
        lock: Arc<dyn DistributedLock>,
        txm: Arc<dyn TransactionManager>,
        lock_wait: Duration,
        idempotency: Idempotency,
    ) -> Self {
        Self { points, lock, txm, lock_wait, idempotency, batches: None, strategy: ChargeStrategy::Locked }
    }

    /// How unkeyed charges are kept apart ([`ChargeStrategy::Locked`] unless told).
    #[must_use]
    pub const fn with_strategy(mut self, strategy: ChargeStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Applies the unkeyed charges this instance has queued for one account in batches of
    /// up to `max` per lock hold and transaction (see the module documentation); a `max` of
    /// one keeps every charge alone.
    #[must_use]
    pub fn with_batches(mut self, max: NonZeroUsize) -> Self {
        self.batches =
            (max.get() > 1).then(|| Arc::new(Batches { queued: Mutex::default(), max: max.get() }));
        self
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
        if key.is_none() {
            if let ChargeStrategy::Optimistic { attempts } = self.strategy {
                let this = self.clone();
                return run_to_end(async move { this.optimistic(user_id, amount, attempts).await }).await;
            }
            if let Some(batches) = &self.batches {
                return self.batched(Arc::clone(batches), user_id, amount).await;
            }
        }
        let this = self.clone();
        run_to_end(async move { this.charge(user_id, amount, key).await }).await
    }

    async fn charge(
        &self,
        user_id: UserId,
        amount: ChargeAmount,
        key: Option<IdempotencyKey>,
    ) -> Result<Outcome<Balance>, ChargePointsError> {
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
    /// [`ChargeStrategy::Optimistic`]: read, compare-and-set, retry on conflict.
    async fn optimistic(
        &self,
        user_id: UserId,
        amount: ChargeAmount,
        attempts: u32,
    ) -> Result<Outcome<Balance>, ChargePointsError> {
        let (mut pause, longest) = OPTIMISTIC_BACKOFF;
        for attempt in 1..=attempts.max(1) {
            let points = Arc::clone(&self.points);
            let applied = in_tx(self.txm.as_ref(), move |tx| {
                Box::pin(async move {
                    let mut account = points
                        .read_account(tx, user_id)
                        .await?
                        .ok_or(ChargePointsError::UserNotFound(user_id))?;
                    let read_at = account.version();
                    let entry = account.charge(amount, clock::now_utc())?;
                    match points.save_balance(tx, &account, read_at).await {
                        Ok(()) => {}
                        // Changed since it was read: nothing was written, try again.
                        Err(PointRepositoryError::StaleBalance { .. }) => return Ok(None),
                        Err(other) => return Err(other.into()),
                    }
                    points.append_history(tx, &entry).await?;
                    Ok::<_, ChargePointsError>(Some(account.balance()))
                })
            })
            .await?;
            if let Some(balance) = applied {
                return Ok(Outcome::Fresh(balance));
            }
            metrics::counter!("point_charge_conflicts_total").increment(1);
            if attempt < attempts {
                let micros = u64::try_from(pause.as_micros()).unwrap_or(u64::MAX);
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..=micros))).await;
                pause = (pause * 2).min(longest);
            }
        }
        tracing::info!(attempts, "an optimistic charge lost every attempt");
        Err(Failure::Contended(LockKey::point(user_id)).into())
    }

    /// Queues an unkeyed charge for its account's next batch, leading the batch when none
    /// is running on this instance, and waits for its answer.
    async fn batched(
        &self,
        batches: Arc<Batches>,
        user_id: UserId,
        amount: ChargeAmount,
    ) -> Result<Outcome<Balance>, ChargePointsError> {
        let ticket = Ticket::take()?;
        let (answer, answered) = oneshot::channel();
        let queued = Queued { amount, since: Instant::now(), answer, _ticket: ticket };
        if batches.join(user_id, queued) {
            let leader = Leader { batches: Arc::clone(&batches), user_id, done: false };
            // In a span of its own (not the first request's: it answers many), on the
            // runtime of the request that started it: an actix worker's. Every worker runs
            // its leaders itself (one runtime for all of them would be one thread for
            // every charge of the instance). At shutdown the drain waits for every queued
            // charge (each holds a ticket) while all workers still run; only past the
            // drain's grace can a stopping worker take a leader with it, and then the
            // charges it had in hand are answered OUTCOME_UNKNOWN (below), the queued
            // ones 503 (`Leader`'s drop).
            tokio::spawn(
                self.clone()
                    .lead(leader)
                    .instrument(tracing::info_span!(parent: None, "charge_batches", %user_id)),
            );
        }
        match answered.await {
            Ok(result) => result.map(Outcome::Fresh),
            // The leader's task died with this charge in hand (a panic, or its runtime
            // stopped): it may or may not have been committed.
            Err(_) => Err(anyhow::Error::new(domain::unavailable::OutcomeUnknown {
                source: "the charge's batch ended without answering it".into(),
            })
            .into()),
        }
    }

    /// The leader's loop: batch after batch until the account's queue is empty.
    async fn lead(self, mut leader: Leader) {
        loop {
            let batch = leader.batches.take(leader.user_id);
            if batch.is_empty() {
                leader.done = true;
                return;
            }
            self.apply(leader.user_id, batch).await;
        }
    }

    /// One lock hold, one transaction: applies `batch` in order and answers each charge.
    async fn apply(&self, user_id: UserId, batch: Vec<Queued>) {
        // No charge is refused as contended before it has waited its whole wait: the batch
        // waits what is left of its youngest charge's wait (so an older one may wait up to
        // about twice its wait before its answer, never less than its wait before a 429).
        let waited = batch.last().map_or(Duration::ZERO, |youngest| youngest.since.elapsed());
        let wait = match self.lock_wait.checked_sub(waited) {
            Some(left) if !left.is_zero() => WaitPolicy::WaitUpTo(left),
            _ => WaitPolicy::FailFast,
        };
        let amounts: Vec<ChargeAmount> = batch.iter().map(|queued| queued.amount).collect();
        let points = Arc::clone(&self.points);
        let locks = [LockRequest { key: LockKey::point(user_id), wait }];
        let applied = locked_tx(self.lock.as_ref(), self.txm.as_ref(), &locks, move |tx| {
            Box::pin(async move {
                let mut account = points
                    .lock_account(tx, user_id)
                    .await?
                    .ok_or(ChargePointsError::UserNotFound(user_id))?;
                let read_at = account.version();
                let now = clock::now_utc();
                let mut entries = Vec::with_capacity(amounts.len());
                let mut answers = Vec::with_capacity(amounts.len());
                for amount in amounts {
                    match account.charge(amount, now) {
                        Ok(entry) => {
                            answers.push(Ok(entry.balance_after()));
                            entries.push(entry);
                        }
                        // Refused alone: the account is unchanged, the next may still fit.
                        Err(refused @ PointError::BalanceLimitExceeded { .. }) => answers.push(Err(refused)),
                        Err(other) => return Err(other.into()),
                    }
                }
                if !entries.is_empty() {
                    points.save_balance(tx, &account, read_at).await?;
                    points.append_histories(tx, &entries).await?;
                }
                Ok::<_, ChargePointsError>(answers)
            })
        })
        .await;
        let size = batch.len();
        match applied {
            Ok(answers) => {
                let balance = answers.iter().rev().find_map(|a| a.as_ref().ok()).map(|b| b.points());
                tracing::info!(charges = size, ?balance, "points charged in one batch");
                for (queued, answer) in batch.into_iter().zip(answers) {
                    queued.answer(answer.map_err(ChargePointsError::from));
                }
            }
            Err(error) => {
                tracing::info!(charges = size, error = %error, "a batch of charges changed nothing");
                for queued in batch {
                    queued.answer(Err(error.for_another_caller()));
                }
            }
        }
    }
}

/// The unkeyed charges of this instance queued per account, each account's with a leader
/// task running while its queue is not empty.
struct Batches {
    queued: Mutex<HashMap<UserId, Vec<Queued>>>,
    max: usize,
}

impl Batches {
    /// Queues `charge`; true when no batch of this account was running, so the caller
    /// must start its leader.
    fn join(&self, user_id: UserId, charge: Queued) -> bool {
        let mut queued = self.queued.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match queued.entry(user_id) {
            Entry::Occupied(mut waiting) => {
                waiting.get_mut().push(charge);
                false
            }
            Entry::Vacant(none) => {
                none.insert(vec![charge]);
                true
            }
        }
    }

    /// The next batch of `user_id`, oldest first, at most `max`; empty (and the account's
    /// queue forgotten, so the next charge starts a new leader) when none is queued.
    fn take(&self, user_id: UserId) -> Vec<Queued> {
        let mut queued = self.queued.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(waiting) = queued.get_mut(&user_id) else { return Vec::new() };
        if waiting.is_empty() {
            queued.remove(&user_id);
            return Vec::new();
        }
        let n = waiting.len().min(self.max);
        waiting.drain(..n).collect()
    }
}

/// One charge waiting for its batch.
struct Queued {
    amount: ChargeAmount,
    since: Instant,
    answer: oneshot::Sender<Result<Balance, ChargePointsError>>,
    /// Counted as a write in flight until answered.
    _ticket: Ticket,
}

impl Queued {
    fn answer(self, result: Result<Balance, ChargePointsError>) {
        crate::detach::deliver(self.answer, result);
    }
}

/// The leadership of one account's batches. Should its task end any other way than by
/// finding the queue empty (a panic), the queue is dropped, so that its charges are
/// answered (with an error) instead of waiting for ever, and the next charge leads anew.
struct Leader {
    batches: Arc<Batches>,
    user_id: UserId,
    done: bool,
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.done {
            let stranded = {
                let mut queued =
                    self.batches.queued.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                queued.remove(&self.user_id).unwrap_or_default()
            };
            // Never tried: nothing of them was applied. A panic is a bug (500); otherwise
            // the runtime is stopping (503, retry elsewhere).
            let panicking = std::thread::panicking();
            for queued in stranded {
                let failure = if panicking {
                    Failure::Unexpected(anyhow::anyhow!(
                        "the charge's batch leader panicked before trying it"
                    ))
                } else {
                    Failure::Unavailable {
                        what: crate::failure::Dependency::ShuttingDown,
                        source: anyhow::anyhow!("the charge's batch leader stopped before trying it"),
                    }
                };
                queued.answer(Err(failure.into()));
            }
        }
    }
}

impl ChargePointsError {
    /// This error once more, for another charge of the same batch.
    fn for_another_caller(&self) -> Self {
        match self {
            Self::UserNotFound(id) => Self::UserNotFound(*id),
            Self::BalanceLimitExceeded { balance, amount } => {
                Self::BalanceLimitExceeded { balance: *balance, amount: *amount }
            }
            Self::IdempotencyKeyReused => Self::IdempotencyKeyReused,
            Self::Failure(failure) => Self::Failure(failure.for_another_caller()),
        }
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

    use std::sync::Mutex;

    use super::*;
    use crate::lock::{FencingToken, LockError, MockDistributedLock, MockLockGuard};
    use crate::tx::MockTransactionManager;

    struct Harness {
        points: MockPointRepository,
        lock: MockDistributedLock,
        txm: MockTransactionManager,
    }

    impl Harness {
        /// A known user whose lock and transaction succeed; `commit` says whether the
        /// transaction is expected to commit or to roll back.
        fn new(user_id: UserId, commit: bool) -> Self {
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
            Self { points: MockPointRepository::new(), lock, txm }
        }

        fn build(self) -> ChargePoints {
            ChargePoints::new(
                Arc::new(self.points),
                Arc::new(self.lock),
                Arc::new(self.txm),
                DEFAULT_LOCK_WAIT,
                unkeyed(),
            )
        }
    }

    /// Charges over `lock` that must fail before any transaction begins (the account is
    /// never read either).
    fn before_any_transaction(lock: MockDistributedLock) -> ChargePoints {
        let mut txm = MockTransactionManager::new();
        txm.expect_begin().never();
        ChargePoints::new(
            Arc::new(MockPointRepository::new()),
            Arc::new(lock),
            Arc::new(txm),
            DEFAULT_LOCK_WAIT,
            unkeyed(),
        )
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
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire()
            .times(1)
            .returning(|key, _| Err(LockError::Timeout { key: key.clone(), waited: DEFAULT_LOCK_WAIT }));
        let charge = before_any_transaction(lock);

        let result = charge.execute(user_id, amount(6), None).await;

        assert!(
            matches!(result, Err(ChargePointsError::Failure(Failure::Contended(key))) if key == LockKey::point(user_id))
        );
    }

    #[tokio::test]
    async fn an_unreachable_lock_store_fails_closed() {
        let user_id = UserId::generate();
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire()
            .times(1)
            .returning(|_, _| Err(LockError::Unavailable(anyhow::anyhow!("connection refused"))));
        let charge = before_any_transaction(lock);

        let result = charge.execute(user_id, amount(6), None).await;

        assert!(matches!(result, Err(ChargePointsError::Failure(Failure::Unavailable { .. }))));
    }

    // --- Batches -------------------------------------------------------------------------

    /// An account kept in memory: the balance and version the mocked repository stores,
    /// and the size of each history insert.
    #[derive(Default)]
    struct Stored {
        balance: i64,
        version: u64,
        inserts: Vec<usize>,
        balances_after: Vec<i64>,
    }

    fn stored_points(stored: &Arc<Mutex<Stored>>) -> MockPointRepository {
        let mut points = MockPointRepository::new();
        let read = Arc::clone(stored);
        points.expect_lock_account().returning(move |_, u| {
            let s = read.lock().unwrap();
            Ok(Some(PointAccount::restore(u, Balance::new(s.balance).unwrap(), s.version)))
        });
        let write = Arc::clone(stored);
        points.expect_save_balance().returning(move |_, account, read_at| {
            let mut s = write.lock().unwrap();
            assert_eq!(s.version, read_at, "compare-and-set on the version read");
            s.balance = account.balance().points();
            s.version = account.version();
            Ok(())
        });
        let history = Arc::clone(stored);
        points.expect_append_histories().returning(move |_, entries| {
            let mut s = history.lock().unwrap();
            s.inserts.push(entries.len());
            s.balances_after.extend(entries.iter().map(|e| e.balance_after().points()));
            Ok(())
        });
        points.expect_append_history().never();
        points
    }

    fn committing_txm() -> MockTransactionManager {
        let mut txm = MockTransactionManager::new();
        txm.expect_begin().returning(|| {
            let mut uow = MockUnitOfWork::new();
            uow.expect_commit().returning(|| Ok(()));
            uow.expect_rollback().returning(|| Ok(()));
            Ok(Box::new(uow))
        });
        txm
    }

    /// A lock whose first acquisition waits until the test opens it.
    struct GatedLock {
        opened: tokio::sync::watch::Receiver<bool>,
        acquisitions: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl DistributedLock for GatedLock {
        async fn acquire(
            &self,
            key: &LockKey,
            wait: WaitPolicy,
        ) -> Result<Box<dyn crate::lock::LockGuard>, LockError> {
            if self.acquisitions.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                let mut opened = self.opened.clone();
                opened.wait_for(|open| *open).await.expect("the test keeps the gate");
            }
            crate::lock::NoLock.acquire(key, wait).await
        }
    }

    fn queued(amount_points: i64) -> (Queued, oneshot::Receiver<Result<Balance, ChargePointsError>>) {
        let (answer, answered) = oneshot::channel();
        let queued = Queued {
            amount: amount(amount_points),
            since: Instant::now(),
            answer,
            _ticket: Ticket::take().expect("not shutting down"),
        };
        (queued, answered)
    }

    #[tokio::test]
    async fn charges_queued_behind_a_held_lock_are_applied_in_one_batch_each_with_its_own_answer() {
        let user_id = UserId::generate();
        let stored = Arc::new(Mutex::new(Stored::default()));
        let (open, opened) = tokio::sync::watch::channel(false);
        let lock = Arc::new(GatedLock { opened, acquisitions: 0.into() });
        let charge = ChargePoints::new(
            Arc::new(stored_points(&stored)),
            Arc::clone(&lock) as Arc<dyn DistributedLock>,
            Arc::new(committing_txm()),
            DEFAULT_LOCK_WAIT,
            unkeyed(),
        )
        .with_batches(NonZeroUsize::new(3).unwrap());

        // The first charge leads, and its batch (itself) waits at the lock...
        let first = tokio::spawn({
            let charge = charge.clone();
            async move { charge.execute(user_id, amount(1), None).await }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while lock.acquisitions.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the leader never asked for the lock");
            tokio::task::yield_now().await;
        }
        // ... while five more queue behind it.
        let rest: Vec<_> = (0..5)
            .map(|_| {
                let charge = charge.clone();
                tokio::spawn(async move { charge.execute(user_id, amount(10), None).await })
            })
            .collect();
        let queue_len =
            || charge.batches.as_ref().unwrap().queued.lock().unwrap().get(&user_id).map_or(0, Vec::len);
        while queue_len() < 5 {
            assert!(Instant::now() < deadline, "the charges never queued");
            tokio::task::yield_now().await;
        }
        open.send(true).unwrap();

        assert_eq!(first.await.unwrap().unwrap().into_inner().points(), 1);
        let mut answers = Vec::new();
        for charge in rest {
            answers.push(charge.await.unwrap().unwrap().into_inner().points());
        }
        answers.sort_unstable();
        assert_eq!(answers, vec![11, 21, 31, 41, 51], "each answer is its own balance after");
        let s = stored.lock().unwrap();
        assert_eq!((s.balance, s.version), (51, 6));
        assert_eq!(s.inserts, vec![1, 3, 2], "the five queued charges went in batches of at most three");
        assert_eq!(s.balances_after, vec![1, 11, 21, 31, 41, 51]);
        assert_eq!(lock.acquisitions.load(std::sync::atomic::Ordering::SeqCst), 3, "three lock holds");
        assert!(charge.batches.as_ref().unwrap().queued.lock().unwrap().is_empty(), "the queue is forgotten");
    }

    #[tokio::test]
    async fn a_charge_refused_in_a_batch_changes_nothing_and_the_next_one_still_applies() {
        let user_id = UserId::generate();
        let stored =
            Arc::new(Mutex::new(Stored { balance: MAX_BALANCE - 15, version: 3, ..Stored::default() }));
        let charge = ChargePoints::new(
            Arc::new(stored_points(&stored)),
            Arc::new(crate::lock::NoLock),
            Arc::new(committing_txm()),
            DEFAULT_LOCK_WAIT,
            unkeyed(),
        )
        .with_batches(NonZeroUsize::new(10).unwrap());
        let (a, a_answer) = queued(10);
        let (b, b_answer) = queued(10);
        let (c, c_answer) = queued(5);

        charge.apply(user_id, vec![a, b, c]).await;

        assert_eq!(a_answer.await.unwrap().unwrap().points(), MAX_BALANCE - 5);
        assert!(matches!(
            b_answer.await.unwrap(),
            Err(ChargePointsError::BalanceLimitExceeded { balance, amount: 10 }) if balance == MAX_BALANCE - 5
        ));
        assert_eq!(c_answer.await.unwrap().unwrap().points(), MAX_BALANCE);
        let s = stored.lock().unwrap();
        assert_eq!((s.balance, s.version, s.inserts.clone()), (MAX_BALANCE, 5, vec![2]));
    }

    #[tokio::test]
    async fn a_batch_that_cannot_have_its_lock_answers_every_charge_with_the_failure() {
        let user_id = UserId::generate();
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire()
            .times(1)
            .returning(|_, _| Err(LockError::Unavailable(anyhow::anyhow!("connection refused"))));
        let charge = before_any_transaction(lock).with_batches(NonZeroUsize::new(10).unwrap());
        let (a, a_answer) = queued(10);
        let (b, b_answer) = queued(20);

        charge.apply(user_id, vec![a, b]).await;

        for answer in [a_answer, b_answer] {
            assert!(matches!(
                answer.await.unwrap(),
                Err(ChargePointsError::Failure(Failure::Unavailable { .. }))
            ));
        }
    }

    #[tokio::test]
    async fn a_batch_waits_what_is_left_of_its_youngest_charges_wait() {
        let user_id = UserId::generate();
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire()
            .withf(|_, wait| matches!(wait, WaitPolicy::WaitUpTo(left) if *left > Duration::from_secs(50)))
            .times(1)
            .returning(|key, _| {
                Err(LockError::Timeout { key: key.clone(), waited: Duration::from_secs(60) })
            });
        let charge = ChargePoints::new(
            Arc::new(MockPointRepository::new()),
            Arc::new(lock),
            Arc::new(MockTransactionManager::new()),
            Duration::from_secs(60),
            unkeyed(),
        )
        .with_batches(NonZeroUsize::new(10).unwrap());
        // The oldest has used up its wait; the youngest has not: no 429 without waiting.
        let (mut old, old_answer) = queued(10);
        old.since = Instant::now().checked_sub(Duration::from_secs(61)).unwrap();
        let (young, young_answer) = queued(10);

        charge.apply(user_id, vec![old, young]).await;

        for answer in [old_answer, young_answer] {
            assert!(matches!(answer.await.unwrap(), Err(ChargePointsError::Failure(Failure::Contended(_)))));
        }
    }

    #[tokio::test]
    async fn a_leader_that_stops_before_trying_answers_its_queue_as_unavailable() {
        let user_id = UserId::generate();
        let batches = Arc::new(Batches { queued: Mutex::default(), max: 10 });
        let (a, a_answer) = queued(10);
        let (b, b_answer) = queued(20);
        assert!(batches.join(user_id, a), "the first leads");
        assert!(!batches.join(user_id, b), "the second only queues");

        drop(Leader { batches: Arc::clone(&batches), user_id, done: false });

        for answer in [a_answer, b_answer] {
            assert!(matches!(
                answer.await.unwrap(),
                Err(ChargePointsError::Failure(Failure::Unavailable {
                    what: crate::failure::Dependency::ShuttingDown,
                    ..
                }))
            ));
        }
        assert!(batches.queued.lock().unwrap().is_empty(), "the next charge leads anew");
    }

    #[tokio::test]
    async fn a_batch_whose_youngest_charge_waited_its_whole_wait_tries_the_lock_once() {
        let user_id = UserId::generate();
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire()
            .withf(|_, wait| *wait == WaitPolicy::FailFast)
            .times(1)
            .returning(|key, _| Err(LockError::Busy { key: key.clone() }));
        let charge = ChargePoints::new(
            Arc::new(MockPointRepository::new()),
            Arc::new(lock),
            Arc::new(MockTransactionManager::new()),
            Duration::from_millis(1),
            unkeyed(),
        )
        .with_batches(NonZeroUsize::new(10).unwrap());
        let (mut old, old_answer) = queued(10);
        old.since = Instant::now().checked_sub(Duration::from_millis(5)).unwrap();

        charge.apply(user_id, vec![old]).await;

        assert!(matches!(old_answer.await.unwrap(), Err(ChargePointsError::Failure(Failure::Contended(_)))));
    }

    // --- Optimistic ------------------------------------------------------------------------

    #[tokio::test]
    async fn an_optimistic_charge_retries_a_conflict_and_takes_no_lock() {
        let user_id = UserId::generate();
        let mut points = MockPointRepository::new();
        let reads = Arc::new(std::sync::atomic::AtomicU64::new(4));
        let version = Arc::clone(&reads);
        points.expect_read_account().times(2).returning(move |_, u| {
            let v = version.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(Some(PointAccount::restore(u, Balance::new(100).unwrap(), v)))
        });
        points.expect_lock_account().never();
        let mut first = true;
        points.expect_save_balance().times(2).returning(move |_, _, _| {
            if std::mem::take(&mut first) {
                Err(PointRepositoryError::StaleBalance { user_id })
            } else {
                Ok(())
            }
        });
        points.expect_append_history().times(1).returning(|_, _| Ok(()));
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire().never();
        let charge = ChargePoints::new(
            Arc::new(points),
            Arc::new(lock),
            Arc::new(committing_txm()),
            DEFAULT_LOCK_WAIT,
            unkeyed(),
        )
        .with_strategy(ChargeStrategy::Optimistic { attempts: 3 })
        .with_batches(NonZeroUsize::new(10).unwrap());

        let balance = charge.execute(user_id, amount(5), None).await.unwrap().into_inner();

        assert_eq!(balance.points(), 105);
    }

    #[tokio::test]
    async fn an_optimistic_charge_that_loses_every_attempt_is_contended_and_writes_nothing() {
        let user_id = UserId::generate();
        let mut points = MockPointRepository::new();
        points.expect_read_account().times(2).returning(move |_, u| Ok(Some(account(u, 0))));
        points
            .expect_save_balance()
            .times(2)
            .returning(move |_, _, _| Err(PointRepositoryError::StaleBalance { user_id }));
        points.expect_append_history().never();
        let charge = ChargePoints::new(
            Arc::new(points),
            Arc::new(MockDistributedLock::new()),
            Arc::new(committing_txm()),
            DEFAULT_LOCK_WAIT,
            unkeyed(),
        )
        .with_strategy(ChargeStrategy::Optimistic { attempts: 2 });

        let result = charge.execute(user_id, amount(5), None).await;

        assert!(
            matches!(result, Err(ChargePointsError::Failure(Failure::Contended(key))) if key == LockKey::point(user_id))
        );
    }
}
