use std::sync::Arc;
use std::time::Duration;

use application::charge_points::ChargePoints;
use application::clock;
use application::create_user::CreateUser;
use application::idempotency::{DEFAULT_RETENTION, Idempotency, IdempotencyKey, Outcome};
use application::tx::TransactionManager;
use domain::point::{
    Balance, ChargeAmount, HistoryLimit, PointHistoryKind, PointRepository, PointRepositoryError,
};
use domain::user::{User, UserName};

use super::Db;

pub(crate) use application::lock::NoLock;

async fn registered_user(db: &Db) -> User {
    CreateUser::new(db.users.clone(), db.points.clone(), db.txm.clone())
        .execute(UserName::new("kim").expect("valid"))
        .await
        .expect("user created")
        .0
}

/// The real use case on the real adapters, with the distributed lock taken out.
fn charge_without_lock(db: &Db) -> ChargePoints {
    ChargePoints::new(
        db.points.clone(),
        Arc::new(NoLock),
        db.txm.clone(),
        Duration::from_secs(3),
        Idempotency::new(db.idempotency.clone(), Duration::from_secs(3), DEFAULT_RETENTION),
    )
}

/// The optimistic baseline on the real adapters: no lock of any kind, the version's
/// compare-and-set alone keeps concurrent charges exact (losers retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimistic_charges_stay_exact_on_the_version_alone() {
    let db = Db::fresh("points_optimistic").await;
    let user = registered_user(&db).await;
    let charge = charge_without_lock(&db)
        .with_strategy(application::charge_points::ChargeStrategy::Optimistic { attempts: 1_000 });

    forty_concurrent_charges_are_exact(&db, &user, &charge).await;
    db.drop_now().await;
}

/// Batches on the real adapters: many charges per transaction, one multi-row history
/// insert each, and still one history row and one distinct answer per charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_charges_stay_exact_with_one_history_row_and_one_answer_each() {
    let db = Db::fresh("points_batched").await;
    let user = registered_user(&db).await;
    let charge = charge_without_lock(&db).with_batches(std::num::NonZeroUsize::new(16).expect("non-zero"));

    let results = futures::future::join_all(
        (0..200).map(|_| charge.execute(user.id(), ChargeAmount::new(100).expect("valid"), None)),
    )
    .await;

    let mut answers: Vec<i64> = results
        .into_iter()
        .map(|result| result.expect("every charge applies").into_inner().points())
        .collect();
    answers.sort_unstable();
    let expected: Vec<i64> = (1..=200).map(|n| n * 100).collect();
    assert_eq!(answers, expected, "each charge answered its own balance after");
    assert_eq!(db.points.balance(user.id()).await.expect("balance"), Some(Balance::new(20_000).unwrap()));
    let history = db.points.history(user.id(), HistoryLimit::new(1000).unwrap()).await.expect("history");
    let mut afters: Vec<i64> = history.iter().map(|e| e.balance_after().points()).collect();
    afters.sort_unstable();
    assert_eq!(afters, expected, "one history row per charge");
    let mut seqs: Vec<u64> = history.iter().map(|e| e.seq()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<u64>>(), "the versions have no gap");
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_charges_stay_exact_with_the_distributed_lock_removed() {
    let db = Db::fresh("points_nolock").await;
    let user = registered_user(&db).await;
    let charge = charge_without_lock(&db);

    forty_concurrent_charges_are_exact(&db, &user, &charge).await;
    db.drop_now().await;
}

/// Forty concurrent charges of 1,000 to `user` through `charge`: every one applied, the
/// balance 40,000, forty history rows whose balances after are 1,000 apart (each charge saw
/// the one before).
async fn forty_concurrent_charges_are_exact(db: &Db, user: &User, charge: &ChargePoints) {
    let results = futures::future::join_all(
        (0..40).map(|_| charge.execute(user.id(), ChargeAmount::new(1_000).expect("valid"), None)),
    )
    .await;

    for result in &results {
        assert!(result.is_ok(), "a charge failed: {result:?}");
    }
    assert_eq!(
        db.points.balance(user.id()).await.expect("balance"),
        Some(Balance::new(40_000).expect("in range"))
    );
    let history =
        db.points.history(user.id(), HistoryLimit::new(1000).expect("in range")).await.expect("history");
    assert_eq!(history.len(), 40);
    let mut afters: Vec<i64> = history.iter().map(|e| e.balance_after().points()).collect();
    afters.sort_unstable();
    assert_eq!(afters, (1..=40).map(|n| n * 1_000).collect::<Vec<_>>(), "each charge saw the one before");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_charges_with_one_idempotency_key_apply_once_with_every_lock_removed() {
    let db = Db::fresh("points_idem").await;
    let user = registered_user(&db).await;
    let charge = charge_without_lock(&db);
    let key = IdempotencyKey::new("order-7").expect("valid");

    // No distributed lock at all (neither the key's nor the account's): only the table's
    // primary key stands between these and a double charge.
    let results = futures::future::join_all(
        (0..12).map(|_| charge.execute(user.id(), ChargeAmount::new(250).expect("valid"), Some(key.clone()))),
    )
    .await;

    let outcomes: Vec<Outcome<Balance>> = results.into_iter().map(|r| r.expect("answered")).collect();
    assert_eq!(outcomes.iter().filter(|o| !o.is_replay()).count(), 1, "{outcomes:?}");
    assert!(outcomes.iter().all(|o| o.clone().into_inner() == Balance::new(250).unwrap()), "{outcomes:?}");
    assert_eq!(db.points.balance(user.id()).await.expect("balance"), Some(Balance::new(250).unwrap()));
    let history = db.points.history(user.id(), HistoryLimit::new(1000).unwrap()).await.expect("history");
    assert_eq!(history.len(), 1);

    // The same key with another amount is refused and changes nothing.
    let reused = charge.execute(user.id(), ChargeAmount::new(300).expect("valid"), Some(key)).await;
    assert!(
        matches!(reused, Err(application::charge_points::ChargePointsError::IdempotencyKeyReused)),
        "{reused:?}"
    );
    assert_eq!(db.points.balance(user.id()).await.expect("balance"), Some(Balance::new(250).unwrap()));
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_record_is_stored_once_found_by_user_and_key_and_purged_after_expiry() {
    use application::idempotency::{Fingerprint, IdempotencyRecord, IdempotencyStore, RecordError};

    let db = Db::fresh("idem_store").await;
    let user = registered_user(&db).await;
    let other = registered_user(&db).await;
    let now = clock::now_utc();
    let record = |user_id, key: &str, expires_at| IdempotencyRecord {
        user_id,
        key: IdempotencyKey::new(key).expect("valid"),
        fingerprint: Fingerprint::of("test", &1),
        response: r#"{"balance":5}"#.to_owned(),
        created_at: now,
        expires_at,
    };
    let live = record(user.id(), "k", now + time::Duration::hours(24));
    let mut tx = db.txm.begin().await.expect("begin");
    db.idempotency.insert(tx.as_mut(), &live).await.expect("stored");
    assert!(matches!(db.idempotency.insert(tx.as_mut(), &live).await, Err(RecordError::Duplicate)));
    tx.rollback().await.expect("rollback");
    assert_eq!(
        db.idempotency.find(user.id(), &live.key).await.expect("find"),
        None,
        "rolled back with its tx"
    );

    let mut tx = db.txm.begin().await.expect("begin");
    db.idempotency.insert(tx.as_mut(), &live).await.expect("stored");
    // Keys are scoped to the user, and compared byte for byte.
    db.idempotency.insert(tx.as_mut(), &record(other.id(), "k", live.expires_at)).await.expect("other user");
    db.idempotency.insert(tx.as_mut(), &record(user.id(), "K", live.expires_at)).await.expect("other case");
    for n in 0..5 {
        let expired = record(user.id(), &format!("old-{n}"), now - time::Duration::seconds(1));
        db.idempotency.insert(tx.as_mut(), &expired).await.expect("stored");
    }
    tx.commit().await.expect("commit");

    assert_eq!(db.idempotency.find(user.id(), &live.key).await.expect("find"), Some(live.clone()));
    assert_eq!(db.idempotency.purge_expired(now, 2).await.expect("purge"), 2, "a batch at a time");
    let idempotency = Idempotency::new(db.idempotency.clone(), Duration::from_secs(1), DEFAULT_RETENTION);
    assert_eq!(idempotency.purge_expired(2).await.expect("purge"), 3, "the rest, in batches");
    assert!(db.idempotency.find(user.id(), &live.key).await.expect("find").is_some(), "live keys stay");
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_write_from_a_stale_read_is_refused() {
    let db = Db::fresh("points_stale").await;
    let user = registered_user(&db).await;
    let mut tx = db.txm.begin().await.expect("begin");
    let mut account = db.points.lock_account(tx.as_mut(), user.id()).await.expect("lock").expect("account");
    account.charge(ChargeAmount::new(500).unwrap(), clock::now_utc()).expect("charge");

    // The caller believes it read the account at version 3; it is at version 0.
    let refused = db.points.save_balance(tx.as_mut(), &account, 3).await;

    assert!(matches!(refused, Err(PointRepositoryError::StaleBalance { .. })));
    tx.rollback().await.expect("rollback");
    assert_eq!(db.points.balance(user.id()).await.expect("balance"), Some(Balance::ZERO));
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balance_write_under_an_older_point_lock_than_the_last_one_is_refused() {
    use application::lock::{FencingToken, LockKey};
    let db = Db::fresh("points_fence").await;
    let user = registered_user(&db).await;
    // One charge of `amount` in its own transaction, its point lock carrying `fence`
    // (`None`: no lock, as with the lock turned off).
    let charge = |amount: i64, fence: Option<u64>| {
        let db = &db;
        let user = user.id();
        async move {
            let mut tx = db.txm.begin().await.expect("begin");
            let mut account =
                db.points.lock_account(tx.as_mut(), user).await.expect("lock").expect("account");
            let read_at = account.version();
            account.charge(ChargeAmount::new(amount).unwrap(), clock::now_utc()).expect("charge");
            let fences = fence.map(|n| (LockKey::point(user), FencingToken(n))).into_iter().collect();
            let saved =
                application::tx::with_fences(fences, db.points.save_balance(tx.as_mut(), &account, read_at))
                    .await;
            if saved.is_ok() {
                tx.commit().await.expect("commit");
            } else {
                tx.rollback().await.expect("rollback");
            }
            saved
        }
    };

    charge(100, Some(1_000)).await.expect("the holder with 1000");
    // The holder before it, paused past its lease, resumes and writes: refused.
    let stale = charge(5_000, Some(999)).await;
    assert!(
        matches!(stale, Err(PointRepositoryError::Fenced { refused: 999, stored: 1_000, .. })),
        "{stale:?}"
    );
    charge(10, Some(1_000)).await.expect("the same holder again");
    charge(1, Some(1_001)).await.expect("the next holder");
    // A Redis restart that lost the counter hands out the Redis clock in microseconds,
    // far above what any counter reached: taken.
    charge(1, Some(1_800_000_000_000_000)).await.expect("after a counter reset");
    charge(1, None).await.expect("an unfenced write (the lock turned off) is not fenced out");
    assert_eq!(db.points.balance(user.id()).await.expect("balance").map(|b| b.points()), Some(113));
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_out_write_is_told_from_a_stale_one_even_after_an_early_snapshot() {
    use application::idempotency::IdempotencyStore as _;
    use application::lock::{FencingToken, LockKey};
    let db = Db::fresh("points_fence_snapshot").await;
    let user = registered_user(&db).await;
    let fences = |n: u64| vec![(LockKey::point(user.id()), FencingToken(n))];

    // Holder A (100) reads first as a keyed charge does (a plain read: its snapshot starts
    // here), then is paused.
    let mut a = db.txm.begin().await.expect("begin");
    let key = IdempotencyKey::new("k-1").expect("key");
    assert!(!db.idempotency.is_recorded(a.as_mut(), user.id(), &key).await.expect("read"));
    // Holder B (200) charges and commits meanwhile.
    let mut b = db.txm.begin().await.expect("begin");
    let mut account = db.points.lock_account(b.as_mut(), user.id()).await.expect("lock").expect("account");
    let read_at = account.version();
    account.charge(ChargeAmount::new(7).unwrap(), clock::now_utc()).expect("charge");
    application::tx::with_fences(fences(200), db.points.save_balance(b.as_mut(), &account, read_at))
        .await
        .expect("B's write");
    b.commit().await.expect("commit");
    // A resumes: its locking read sees B's version, so only the fence can refuse it, and
    // the refusal is named for what it is.
    let mut account = db.points.lock_account(a.as_mut(), user.id()).await.expect("lock").expect("account");
    let read_at = account.version();
    account.charge(ChargeAmount::new(1_000).unwrap(), clock::now_utc()).expect("charge");
    let refused =
        application::tx::with_fences(fences(100), db.points.save_balance(a.as_mut(), &account, read_at))
            .await;
    assert!(
        matches!(refused, Err(PointRepositoryError::Fenced { refused: 100, stored: 200, .. })),
        "{refused:?}"
    );
    a.rollback().await.expect("rollback");
    assert_eq!(db.points.balance(user.id()).await.expect("balance").map(|b| b.points()), Some(7));
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_newest_first_and_cut_at_the_limit() {
    let db = Db::fresh("points_hist").await;
    let user = registered_user(&db).await;
    let charge = charge_without_lock(&db);
    for amount in 1..=5 {
        charge.execute(user.id(), ChargeAmount::new(amount).unwrap(), None).await.expect("charge");
    }

    let newest_three = db.points.history(user.id(), HistoryLimit::new(3).unwrap()).await.expect("history");

    let seen: Vec<(u64, i64, i64)> =
        newest_three.iter().map(|e| (e.seq(), e.amount().points(), e.balance_after().points())).collect();
    assert_eq!(seen, vec![(5, 5, 15), (4, 4, 10), (3, 3, 6)]);
    assert!(newest_three.iter().all(|e| e.kind() == PointHistoryKind::Charge && e.user_id() == user.id()));
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_has_no_balance() {
    let db = Db::fresh("points_none").await;
    assert_eq!(db.points.balance(domain::user::UserId::generate()).await.expect("balance"), None);
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_change_cannot_be_recorded_twice() {
    let db = Db::fresh("points_once").await;
    let user = registered_user(&db).await;
    let mut tx = db.txm.begin().await.expect("begin");
    let mut account = db.points.lock_account(tx.as_mut(), user.id()).await.expect("lock").expect("account");
    let entry = account.charge(ChargeAmount::new(5).unwrap(), clock::now_utc()).expect("charge");
    db.points.append_history(tx.as_mut(), &entry).await.expect("first record");

    // The same change (same user, same seq) under another id, as a replayed write would be.
    let replay = domain::point::PointHistoryEntry::restore(
        uuid::Uuid::now_v7(),
        entry.user_id(),
        entry.kind(),
        entry.amount(),
        entry.balance_after(),
        entry.seq(),
        entry.created_at(),
    );
    let refused = db.points.append_history(tx.as_mut(), &replay).await;

    assert!(refused.is_err(), "a second row for seq {} was accepted", entry.seq());
    tx.rollback().await.expect("rollback");
    db.drop_now().await;
}

#[tokio::test]
async fn several_history_entries_go_in_whole_in_chunks_and_a_repeated_one_refuses_them_all() {
    let db = Db::fresh("points_rows").await;
    let user = registered_user(&db).await;
    let mut tx = db.txm.begin().await.expect("begin");
    let mut account = db.points.lock_account(tx.as_mut(), user.id()).await.expect("lock").expect("account");
    let read_at = account.version();
    // Seven rows: chunks of 4, 2 and 1.
    let entries: Vec<_> = (0..7)
        .map(|_| account.charge(ChargeAmount::new(5).unwrap(), clock::now_utc()).expect("charge"))
        .collect();
    db.points.save_balance(tx.as_mut(), &account, read_at).await.expect("balance");
    db.points.append_histories(tx.as_mut(), &entries).await.expect("rows");
    tx.commit().await.expect("commit");

    let history = db.points.history(user.id(), HistoryLimit::new(100).unwrap()).await.expect("history");
    let seqs: Vec<u64> = history.iter().rev().map(|e| e.seq()).collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<u64>>());
    let afters: Vec<i64> = history.iter().rev().map(|e| e.balance_after().points()).collect();
    assert_eq!(afters, (1..=7).map(|n| n * 5).collect::<Vec<i64>>());

    // A batch holding an entry already recorded goes in not at all.
    let mut tx = db.txm.begin().await.expect("begin");
    let mut account = db.points.lock_account(tx.as_mut(), user.id()).await.expect("lock").expect("account");
    let fresh = account.charge(ChargeAmount::new(5).unwrap(), clock::now_utc()).expect("charge");
    let refused = db.points.append_histories(tx.as_mut(), &[fresh, entries[0].clone()]).await;
    assert!(refused.is_err(), "a repeated seq was accepted");
    tx.rollback().await.expect("rollback");
    let history = db.points.history(user.id(), HistoryLimit::new(100).unwrap()).await.expect("history");
    assert_eq!(history.len(), 7);
    db.drop_now().await;
}
