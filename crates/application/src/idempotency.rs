//! Idempotency keys: an operation that a client may retry (its answer was lost, it clicked
//! twice) runs at most once per key; every repetition gets the first answer back.
//!
//! One mechanism for every route that takes an `Idempotency-Key` (charges now, payments
//! next). How [`Idempotency::run`] goes:
//!
//! 1. A stored record for (user, key) answers at once: the same request gets the first
//!    answer back ([`Outcome::Replayed`]); another request under that key is refused
//!    ([`IdempotencyError::KeyReused`]). Keys are scoped to the user.
//! 2. Otherwise the operation runs, handed a [`Recorder`]. It takes
//!    `lock:{idem:<userId>:<keyHash>}` (waiting) **first among its locks, through the same
//!    [`crate::tx::locked_tx`] as the rest**, so its lease is watched up to the commit like
//!    every other. A duplicate that arrives while the first is still running (another
//!    tab, another instance) waits for it there; inside its transaction
//!    [`Recorder::ensure_unrecorded`] then finds the first's record, the work is rolled
//!    back, and the duplicate replays the first answer.
//! 3. The operation stores the record through the [`Recorder`], **in its own
//!    transaction**. Commit and key therefore cannot disagree: if the commit happened, the
//!    key is stored; if not, neither is. A retry after a lost answer finds the record,
//!    however the first request ended.
//! 4. The table's primary key (user, key) is the last line of defence: should two runs of
//!    one key ever overlap (the lock store lost a lease), the second insert fails, its
//!    transaction rolls back whole, and it replays the first's record.
//!
//! Only completed operations are recorded. A refused one (validation, a conflict, busy,
//! unavailable) changed nothing and is not: retrying it with the same key runs it again.
//! Records are kept [`DEFAULT_RETENTION`] (at least 24 hours) and then purged in batches.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use domain::unit_of_work::Tx;
use domain::user::UserId;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::clock;
use crate::failure::Failure;
use crate::lock::{LockKey, LockRequest};

/// How long a record is kept: a client may retry for a day.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// A client's idempotency key: 1..=64 visible ASCII characters (`!`..=`~`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an idempotency key must be 1 to 64 visible ASCII characters (no spaces)")]
pub struct InvalidIdempotencyKey;

impl IdempotencyKey {
    /// # Errors
    /// [`InvalidIdempotencyKey`] when `raw` is empty, longer than 64 bytes, or holds a
    /// character outside `!`..=`~`.
    pub fn new(raw: &str) -> Result<Self, InvalidIdempotencyKey> {
        if (1..=64).contains(&raw.len()) && raw.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidIdempotencyKey)
        }
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What identifies a request's content: SHA-256 of the operation's name and its canonical
/// JSON (parsed values, not raw bytes, so spacing and field order do not matter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(String);

impl Fingerprint {
    #[must_use]
    pub fn of(operation: &str, request: &impl Serialize) -> Self {
        let canonical = serde_json::to_vec(request).unwrap_or_default();
        let mut hash = Sha256::new();
        hash.update(operation.as_bytes());
        hash.update([0]);
        hash.update(&canonical);
        Self(hex(&hash.finalize()))
    }

    /// As stored: 64 lowercase hex digits.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A fingerprint read back from storage.
    #[must_use]
    pub fn restore(stored: String) -> Self {
        Self(stored)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// A completed operation's stored answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub user_id: UserId,
    pub key: IdempotencyKey,
    pub fingerprint: Fingerprint,
    /// The operation's result, as JSON.
    pub response: String,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A record for this (user, key) exists already.
    #[error("this idempotency key is already recorded")]
    Duplicate,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Where records live: in the same database as the operations, so that a record is
/// written in the operation's transaction.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// The record of (user, key), if any (expired ones included until purged).
    async fn find(&self, user_id: UserId, key: &IdempotencyKey) -> anyhow::Result<Option<IdempotencyRecord>>;

    /// Whether (user, key) has a record, read in `tx` (on its connection: a transaction
    /// never waits for a second one from the pool).
    async fn is_recorded(&self, tx: &mut Tx, user_id: UserId, key: &IdempotencyKey) -> anyhow::Result<bool>;

    /// Stores `record` in `tx`.
    ///
    /// # Errors
    /// [`RecordError::Duplicate`] when (user, key) is taken.
    async fn insert(&self, tx: &mut Tx, record: &IdempotencyRecord) -> Result<(), RecordError>;

    /// Deletes up to `batch` records that expired before `now`; returns how many went.
    async fn purge_expired(&self, now: OffsetDateTime, batch: u64) -> anyhow::Result<u64>;
}

/// How a keyed operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// It ran now.
    Fresh(T),
    /// It had run before under this key; this is its first answer.
    Replayed(T),
}

impl<T> Outcome<T> {
    pub fn into_inner(self) -> T {
        match self {
            Self::Fresh(value) | Self::Replayed(value) => value,
        }
    }

    pub const fn is_replay(&self) -> bool {
        matches!(self, Self::Replayed(_))
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Self::Fresh(value) => Outcome::Fresh(f(value)),
            Self::Replayed(value) => Outcome::Replayed(f(value)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    /// The key was used before for a different request.
    #[error("this idempotency key was used for a different request")]
    KeyReused,
    /// Another run of the key stored its record first (the run then replays that one).
    #[error("another request stored this idempotency key first")]
    Duplicate,
    #[error(transparent)]
    Failure(Failure),
}

crate::failure_conversions!(IdempotencyError);

/// Runs keyed operations at most once. Cheap to clone.
#[derive(Clone)]
pub struct Idempotency {
    store: Arc<dyn IdempotencyStore>,
    /// How long a duplicate waits for the first request with its key.
    wait: Duration,
    retention: Duration,
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency").field("wait", &self.wait).finish_non_exhaustive()
    }
}

/// What an operation is handed to store its answer in its own transaction.
pub struct Recorder {
    store: Arc<dyn IdempotencyStore>,
    user_id: UserId,
    key: IdempotencyKey,
    fingerprint: Fingerprint,
    retention: Duration,
    /// `lock:{idem:<userId>:<keyHash>}`, waited for up to the configured wait.
    lock: LockRequest,
    /// Set when the key was found taken: the run then replays instead of failing.
    collided: Arc<AtomicBool>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("key", &self.key).finish_non_exhaustive()
    }
}

impl Recorder {
    /// The key's lock: take it first, before the operation's own locks.
    #[must_use]
    pub fn lock(&self) -> LockRequest {
        self.lock.clone()
    }

    /// The locks of an operation that may be keyed: the key's lock first (when there is a
    /// `recorder`), then the operation's own `locks`, in their order.
    #[must_use]
    pub fn locks(recorder: Option<&Self>, locks: impl IntoIterator<Item = LockRequest>) -> Vec<LockRequest> {
        recorder.map(Self::lock).into_iter().chain(locks).collect()
    }

    /// Call first in the transaction, under [`Recorder::lock`]: a run of this key that
    /// completed while this one waited for the lock is found here.
    ///
    /// # Errors
    /// [`IdempotencyError::Duplicate`] when the key has its record already (roll back: the
    /// run then replays it); a [`Failure`] when the store cannot be read.
    pub async fn ensure_unrecorded(&self, tx: &mut Tx) -> Result<(), IdempotencyError> {
        // In the transaction, whose snapshot begins here, after the locks: it sees what a
        // run that held them before committed.
        let found = self
            .store
            .is_recorded(tx, self.user_id, &self.key)
            .await
            .map_err(|e| e.context("failed to read the idempotency key"))?;
        if found {
            self.collided.store(true, Ordering::SeqCst);
            return Err(IdempotencyError::Duplicate);
        }
        Ok(())
    }

    /// Stores `answer` as this key's record, in `tx`. Call it last in the transaction.
    ///
    /// # Errors
    /// [`IdempotencyError::Duplicate`] when another run stored the key first (roll back:
    /// the run then replays that one), a [`Failure`] otherwise.
    pub async fn record<T: Serialize + Sync>(&self, tx: &mut Tx, answer: &T) -> Result<(), IdempotencyError> {
        let now = clock::now_utc();
        let record = IdempotencyRecord {
            user_id: self.user_id,
            key: self.key.clone(),
            fingerprint: self.fingerprint.clone(),
            response: serde_json::to_string(answer)
                .map_err(|e| anyhow::Error::new(e).context("an answer could not be serialised"))?,
            created_at: now,
            expires_at: now + self.retention,
        };
        match self.store.insert(tx, &record).await {
            Ok(()) => Ok(()),
            Err(RecordError::Duplicate) => {
                self.collided.store(true, Ordering::SeqCst);
                Err(IdempotencyError::Duplicate)
            }
            Err(RecordError::Other(error)) => {
                Err(error.context("failed to store the idempotency key").into())
            }
        }
    }
}

impl Idempotency {
    #[must_use]
    pub fn new(store: Arc<dyn IdempotencyStore>, wait: Duration, retention: Duration) -> Self {
        Self { store, wait, retention }
    }

    /// Runs `operation` for `user_id`; with a `key`, at most once per (user, key), as the
    /// module documentation describes. `fingerprint` identifies the request's content.
    /// Without a key the operation just runs (and gets no [`Recorder`]).
    ///
    /// # Errors
    /// The operation's own error, or [`IdempotencyError`] converted into `E`.
    pub async fn run<T, E, F, Fut>(
        &self,
        user_id: UserId,
        key: Option<IdempotencyKey>,
        fingerprint: Fingerprint,
        operation: F,
    ) -> Result<Outcome<T>, E>
    where
        T: DeserializeOwned,
        E: From<IdempotencyError>,
        F: FnOnce(Option<Recorder>) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let Some(key) = key else {
            return operation(None).await.map(Outcome::Fresh);
        };
        if let Some(answer) = self.lookup(user_id, &key, &fingerprint).await? {
            return Ok(Outcome::Replayed(answer));
        }
        let collided = Arc::new(AtomicBool::new(false));
        let recorder = Recorder {
            store: Arc::clone(&self.store),
            user_id,
            key: key.clone(),
            fingerprint: fingerprint.clone(),
            retention: self.retention,
            lock: LockRequest::wait_up_to(
                LockKey::idempotency(user_id, &hex(&Sha256::digest(key.as_str()))[..32]),
                self.wait,
            ),
            collided: Arc::clone(&collided),
        };
        match operation(Some(recorder)).await {
            Ok(value) => Ok(Outcome::Fresh(value)),
            // Another run of this key may have completed meanwhile: this one waited for it
            // and found its record, or collided with it, or (the lock store having lost a
            // lease) it got there first and made this one fail, e.g. as already paid.
            // Either way the key has an answer: give it.
            Err(error) => match self.lookup(user_id, &key, &fingerprint).await {
                Ok(Some(answer)) => Ok(Outcome::Replayed(answer)),
                Ok(None) => Err(error),
                Err(replay_error) if collided.load(Ordering::SeqCst) => Err(E::from(replay_error)),
                Err(_) => Err(error),
            },
        }
    }

    /// The stored answer for (user, key) if the request matches it, without running
    /// anything: what [`Idempotency::run`] replays, and what a retry that can no longer run
    /// gets (its payment expired the queue token it would need).
    ///
    /// # Errors
    /// [`IdempotencyError::KeyReused`] when the key was used for another request.
    pub async fn lookup<T: DeserializeOwned>(
        &self,
        user_id: UserId,
        key: &IdempotencyKey,
        fingerprint: &Fingerprint,
    ) -> Result<Option<T>, IdempotencyError> {
        let Some(record) = self
            .store
            .find(user_id, key)
            .await
            .map_err(|e| IdempotencyError::from(e.context("failed to read the idempotency key")))?
        else {
            return Ok(None);
        };
        if record.fingerprint != *fingerprint {
            return Err(IdempotencyError::KeyReused);
        }
        let answer = serde_json::from_str(&record.response)
            .map_err(|e| anyhow::Error::new(e).context("a stored idempotent answer does not decode"))?;
        tracing::info!(key = key.as_str(), "idempotent request replayed");
        Ok(Some(answer))
    }

    /// Deletes expired records, `batch` at a time, until none is left; returns how many.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn purge_expired(&self, batch: u64) -> anyhow::Result<u64> {
        let now = clock::now_utc();
        let mut purged = 0;
        loop {
            let deleted = self.store.purge_expired(now, batch).await?;
            purged += deleted;
            if deleted < batch {
                return Ok(purged);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use domain::unit_of_work::MockUnitOfWork;

    use super::*;
    use crate::lock::WaitPolicy;

    #[derive(Debug, thiserror::Error)]
    enum TestError {
        #[error("operation failed")]
        Failed,
        #[error(transparent)]
        Idem(#[from] IdempotencyError),
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
    struct Answer {
        balance: i64,
    }

    fn key(raw: &str) -> IdempotencyKey {
        IdempotencyKey::new(raw).unwrap()
    }

    fn fingerprint(amount: i64) -> Fingerprint {
        Fingerprint::of("test", &serde_json::json!({ "amount": amount }))
    }

    fn record(user_id: UserId, amount: i64, balance: i64) -> IdempotencyRecord {
        IdempotencyRecord {
            user_id,
            key: key("k-1"),
            fingerprint: fingerprint(amount),
            response: serde_json::to_string(&Answer { balance }).unwrap(),
            created_at: clock::now_utc(),
            expires_at: clock::now_utc() + DEFAULT_RETENTION,
        }
    }

    fn idempotency(store: MockIdempotencyStore) -> Idempotency {
        Idempotency::new(Arc::new(store), Duration::from_secs(5), DEFAULT_RETENTION)
    }

    #[test]
    fn keys_are_one_to_sixty_four_visible_ascii_characters() {
        assert!(IdempotencyKey::new("a").is_ok());
        assert!(IdempotencyKey::new(&"k".repeat(64)).is_ok());
        assert!(IdempotencyKey::new("order-42/retry:{1}~").is_ok());
        for bad in ["", " ", "a b", "é", "tab\t", &"k".repeat(65)] {
            assert_eq!(IdempotencyKey::new(bad), Err(InvalidIdempotencyKey), "{bad:?}");
        }
    }

    #[test]
    fn a_fingerprint_depends_on_the_operation_and_the_content_only() {
        let a = Fingerprint::of("charge", &serde_json::json!({ "amount": 5 }));
        assert_eq!(a, Fingerprint::of("charge", &serde_json::json!({ "amount": 5 })));
        assert_ne!(a, Fingerprint::of("charge", &serde_json::json!({ "amount": 6 })));
        assert_ne!(a, Fingerprint::of("pay", &serde_json::json!({ "amount": 5 })));
        assert_eq!(a.as_str().len(), 64);
    }

    #[tokio::test]
    async fn without_a_key_the_operation_just_runs_with_no_recorder() {
        let mut store = MockIdempotencyStore::new();
        store.expect_find().never();

        let outcome: Result<Outcome<Answer>, TestError> = idempotency(store)
            .run(UserId::generate(), None, fingerprint(5), |recorder| async move {
                assert!(recorder.is_none());
                Ok(Answer { balance: 5 })
            })
            .await;

        assert_eq!(outcome.unwrap(), Outcome::Fresh(Answer { balance: 5 }));
    }

    #[tokio::test]
    async fn a_stored_answer_is_replayed_without_a_second_run() {
        let user_id = UserId::generate();
        let mut store = MockIdempotencyStore::new();
        store.expect_find().times(1).returning(move |_, _| Ok(Some(record(user_id, 5, 105))));

        let outcome: Result<Outcome<Answer>, TestError> = idempotency(store)
            .run(user_id, Some(key("k-1")), fingerprint(5), |_| async { panic!("must not run again") })
            .await;

        assert_eq!(outcome.unwrap(), Outcome::Replayed(Answer { balance: 105 }));
    }

    #[tokio::test]
    async fn a_key_reused_for_another_request_is_refused_and_nothing_runs() {
        let user_id = UserId::generate();
        let mut store = MockIdempotencyStore::new();
        store.expect_find().times(1).returning(move |_, _| Ok(Some(record(user_id, 5, 105))));

        let outcome: Result<Outcome<Answer>, TestError> = idempotency(store)
            .run(user_id, Some(key("k-1")), fingerprint(6), |_| async { panic!("must not run") })
            .await;

        assert!(matches!(outcome, Err(TestError::Idem(IdempotencyError::KeyReused))), "{outcome:?}");
    }

    #[tokio::test]
    async fn a_new_key_runs_under_its_lock_and_records_the_answer_in_the_operations_transaction() {
        let user_id = UserId::generate();
        let inserted: Arc<Mutex<Vec<IdempotencyRecord>>> = Arc::default();
        let mut store = MockIdempotencyStore::new();
        // Looked up before the operation, and again in its transaction, under its lock.
        store.expect_find().times(1).returning(|_, _| Ok(None));
        store.expect_is_recorded().times(1).returning(|_, _, _| Ok(false));
        let sink = Arc::clone(&inserted);
        store.expect_insert().times(1).returning(move |_, record| {
            sink.lock().unwrap().push(record.clone());
            Ok(())
        });

        let outcome: Result<Outcome<Answer>, TestError> = idempotency(store)
            .run(user_id, Some(key("k-1")), fingerprint(5), |recorder| async move {
                let recorder = recorder.expect("a keyed run gets a recorder");
                let lock = recorder.lock();
                assert!(lock.key.as_str().starts_with(&format!("lock:{{idem:{user_id}:")), "{lock:?}");
                assert!(matches!(lock.wait, WaitPolicy::WaitUpTo(_)) && !lock.key.is_fenced());
                let mut tx: Box<domain::unit_of_work::Tx> = Box::new(MockUnitOfWork::new());
                recorder.ensure_unrecorded(tx.as_mut()).await?;
                recorder.record(tx.as_mut(), &Answer { balance: 105 }).await?;
                Ok(Answer { balance: 105 })
            })
            .await;

        assert_eq!(outcome.unwrap(), Outcome::Fresh(Answer { balance: 105 }));
        let inserted = inserted.lock().unwrap();
        assert_eq!(inserted.len(), 1);
        assert_eq!(inserted[0].user_id, user_id);
        assert_eq!(inserted[0].fingerprint, fingerprint(5));
        assert_eq!(inserted[0].response, r#"{"balance":105}"#);
        assert!(inserted[0].expires_at - inserted[0].created_at >= time::Duration::hours(24));
    }

    #[tokio::test]
    async fn a_duplicate_that_waited_for_the_first_replays_its_answer() {
        let user_id = UserId::generate();
        let mut store = MockIdempotencyStore::new();
        let mut seq = mockall::Sequence::new();
        // Nothing yet when it arrives; the first has finished once it holds the lock, and
        // the replay reads its record.
        store.expect_find().times(1).in_sequence(&mut seq).returning(|_, _| Ok(None));
        store.expect_is_recorded().times(1).in_sequence(&mut seq).returning(|_, _, _| Ok(true));
        store
            .expect_find()
            .times(1)
            .in_sequence(&mut seq)
            .returning(move |_, _| Ok(Some(record(user_id, 5, 105))));

        let outcome: Result<Outcome<Answer>, TestError> = idempotency(store)
            .run(user_id, Some(key("k-1")), fingerprint(5), |recorder| async move {
                // Under the key's lock, inside the transaction: the first has finished.
                let mut tx: Box<domain::unit_of_work::Tx> = Box::new(MockUnitOfWork::new());
                recorder.unwrap().ensure_unrecorded(tx.as_mut()).await?;
                panic!("must not run again")
            })
            .await;

        assert_eq!(outcome.unwrap(), Outcome::Replayed(Answer { balance: 105 }));
    }

    #[tokio::test]
    async fn a_run_whose_record_collides_replays_the_winner_instead_of_failing() {
        let user_id = UserId::generate();
        let mut store = MockIdempotencyStore::new();
        let mut seq = mockall::Sequence::new();
        store.expect_find().times(1).in_sequence(&mut seq).returning(|_, _| Ok(None));
        store.expect_insert().times(1).returning(|_, _| Err(RecordError::Duplicate));
        store
            .expect_find()
            .times(1)
            .in_sequence(&mut seq)
            .returning(move |_, _| Ok(Some(record(user_id, 5, 105))));

        let outcome: Result<Outcome<Answer>, TestError> = idempotency(store)
            .run(user_id, Some(key("k-1")), fingerprint(5), |recorder| async move {
                let mut tx: Box<domain::unit_of_work::Tx> = Box::new(MockUnitOfWork::new());
                // The operation's transaction rolls back on this error.
                recorder.unwrap().record(tx.as_mut(), &Answer { balance: 110 }).await?;
                Ok(Answer { balance: 110 })
            })
            .await;

        assert_eq!(outcome.unwrap(), Outcome::Replayed(Answer { balance: 105 }));
    }

    #[tokio::test]
    async fn a_failed_operation_is_not_recorded_and_its_error_returned() {
        let mut store = MockIdempotencyStore::new();
        // Before the operation, and once more after the failure (no other run of the key
        // completed meanwhile).
        store.expect_find().times(2).returning(|_, _| Ok(None));
        store.expect_insert().never();

        let outcome: Result<Outcome<Answer>, TestError> = idempotency(store)
            .run(UserId::generate(), Some(key("k-1")), fingerprint(5), |_| async { Err(TestError::Failed) })
            .await;

        assert!(matches!(outcome, Err(TestError::Failed)));
    }

    #[tokio::test]
    async fn an_operation_that_failed_because_another_run_of_its_key_completed_answers_as_that_one() {
        let user_id = UserId::generate();
        let mut store = MockIdempotencyStore::new();
        let mut finds = vec![Some(record(user_id, 5, 105)), None];
        store.expect_find().times(2).returning(move |_, _| Ok(finds.pop().flatten()));
        store.expect_insert().never();

        let outcome: Result<Outcome<Answer>, TestError> = idempotency(store)
            .run(user_id, Some(key("k-1")), fingerprint(5), |_| async { Err(TestError::Failed) })
            .await;

        assert_eq!(outcome.unwrap(), Outcome::Replayed(Answer { balance: 105 }));
    }
}
