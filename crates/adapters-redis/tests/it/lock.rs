use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use adapters_redis::lock::{LockOptions, RedisLock, WaitStrategy};
use application::lock::{DistributedLock, LockError, LockKey, WaitPolicy};
use fred::prelude::{Expiration, KeysInterface};
use tokio::time::Instant;

use super::connect;

const PUBSUB: WaitStrategy = WaitStrategy::PubSub {
    fallback_poll: Duration::from_millis(250),
    handoff_limit: adapters_redis::lock::DEFAULT_HANDOFF_LIMIT,
};
const SPIN: WaitStrategy =
    WaitStrategy::Spin { initial: Duration::from_millis(2), max: Duration::from_millis(50) };

fn key() -> LockKey {
    LockKey::new("test", test_support::unique_prefix("lock"))
}

fn fenced_key() -> LockKey {
    LockKey::fenced("test", test_support::unique_prefix("fenced"))
}

async fn lock_with(options: LockOptions) -> RedisLock {
    let redis = connect().await;
    RedisLock::new(redis.pool.clone(), Some(&redis.subscriber), options).await.expect("lock is built")
}

async fn lock(wait: WaitStrategy) -> RedisLock {
    lock_with(LockOptions { wait, ..LockOptions::default() }).await
}

fn short_lease(wait: WaitStrategy) -> LockOptions {
    LockOptions {
        lease: Duration::from_millis(400),
        renew_every: Duration::from_millis(100),
        max_hold: Duration::from_secs(30),
        wait,
    }
}

/// Polls `check` until it holds or `within` passes.
async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Whether `lock` can take `key` (and give it back) at once within `within`.
async fn freed_within(lock: &RedisLock, key: &LockKey, within: Duration) -> bool {
    eventually(within, || async {
        match lock.acquire(key, WaitPolicy::FailFast).await {
            Ok(guard) => guard.release().await.is_ok(),
            Err(_) => false,
        }
    })
    .await
}

async fn mutual_exclusion_holds(wait: WaitStrategy) {
    // Two locks on two separate sets of connections: two "instances".
    let locks = [lock(wait).await, lock(wait).await];
    let key = key();
    let inside = Arc::new(AtomicUsize::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));

    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let (lock, key) = (locks[i % 2].clone(), key.clone());
            let (inside, entered, overlaps) = (inside.clone(), entered.clone(), overlaps.clone());
            tokio::spawn(async move {
                let guard = lock.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(20))).await?;
                if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                // Hold across real awaits, so that a broken lock would let others in.
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                entered.fetch_add(1, Ordering::SeqCst);
                guard.release().await
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task ran").expect("acquired and released");
    }

    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders were inside at once");
    assert_eq!(entered.load(Ordering::SeqCst), 40);
    if matches!(wait, WaitStrategy::PubSub { .. }) {
        // Twenty tasks per "instance" queue for one key: releases were handed to local
        // waiters, so the exclusion above held through hand-offs as well.
        assert!(locks.iter().map(RedisLock::handoffs).sum::<u64>() > 0, "no hold was handed over");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_of_many_tasks_on_two_clients_holds_the_lock_at_a_time_pubsub() {
    mutual_exclusion_holds(PUBSUB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_of_many_tasks_on_two_clients_holds_the_lock_at_a_time_spin() {
    mutual_exclusion_holds(SPIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_fast_answers_busy_while_held_and_succeeds_after_release() {
    let (first, second) = (lock(PUBSUB).await, lock(PUBSUB).await);
    let key = key();

    let guard = first.acquire(&key, WaitPolicy::FailFast).await.expect("free key");
    let refused = second.acquire(&key, WaitPolicy::FailFast).await;
    assert!(matches!(refused, Err(LockError::Busy { .. })), "got {refused:?}");

    guard.release().await.expect("ours to release");
    let again = second.acquire(&key, WaitPolicy::FailFast).await.expect("free again");
    again.release().await.expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_owner_cannot_release_and_the_old_holder_learns_its_lease_is_lost() {
    let redis = connect().await;
    let lock = lock_with(short_lease(PUBSUB)).await;
    let key = key();
    let guard = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key");
    let lost = guard.lease_lost();

    // Someone else now owns the key (as after our lease ran out during a pause).
    let _: () = redis
        .pool
        .set(key.as_str(), "someone-else", Some(Expiration::PX(30_000)), None, false)
        .await
        .expect("set");

    tokio::time::timeout(Duration::from_secs(5), lost).await.expect("lease_lost resolves");
    assert!(guard.is_lost());
    let released = guard.release().await;
    assert!(matches!(released, Err(LockError::LeaseLost { .. })), "got {released:?}");
    let value: Option<String> = redis.pool.get(key.as_str()).await.expect("get");
    assert_eq!(value.as_deref(), Some("someone-else"), "the other owner's lock was left alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_lets_the_next_holder_in_without_any_release() {
    let redis = connect().await;
    let lock = lock(PUBSUB).await;
    let key = key();
    // A holder that crashed: its lock stays for 300 ms and is never released.
    let _: () = redis
        .pool
        .set(key.as_str(), "crashed-holder", Some(Expiration::PX(300)), None, false)
        .await
        .expect("set");
    assert!(matches!(lock.acquire(&key, WaitPolicy::FailFast).await, Err(LockError::Busy { .. })));

    let guard =
        lock.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(5))).await.expect("lease expired");

    assert!(!guard.is_lost());
    guard.release().await.expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_a_holder_that_outlives_its_lease() {
    let lock = lock_with(short_lease(PUBSUB)).await;
    let other = lock_with(short_lease(PUBSUB)).await;
    let key = key();
    let guard = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key");

    // Long work: three leases' worth.
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    assert!(!guard.is_lost(), "the watchdog renewed the lease");
    assert!(matches!(other.acquire(&key, WaitPolicy::FailFast).await, Err(LockError::Busy { .. })));
    guard.release().await.expect("still ours");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubsub_waiter_is_woken_by_the_release_before_a_sleeping_spin_waiter_retries() {
    let holder_lock = lock(PUBSUB).await;
    // A spin waiter whose first pause is long: it will be asleep when the release comes.
    let spin =
        lock(WaitStrategy::Spin { initial: Duration::from_secs(4), max: Duration::from_secs(4) }).await;
    // Its fallback poll is as long, so only the release announcement can wake it early.
    let pubsub = lock(WaitStrategy::PubSub { fallback_poll: Duration::from_secs(4), handoff_limit: 8 }).await;
    let key = key();
    let holder = holder_lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key");

    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let spin_task = {
        let (spin, key, order) = (spin.clone(), key.clone(), order.clone());
        tokio::spawn(async move {
            let guard =
                spin.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(20))).await.expect("spin");
            order.lock().unwrap().push("spin");
            guard.release().await.expect("released");
        })
    };
    let pubsub_task = {
        let (pubsub, key, order) = (pubsub.clone(), key.clone(), order.clone());
        tokio::spawn(async move {
            let guard =
                pubsub.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(20))).await.expect("pubsub");
            order.lock().unwrap().push("pubsub");
            guard.release().await.expect("released");
        })
    };
    // Release only once both waiters have tried, failed and gone to sleep.
    let both_asleep =
        eventually(Duration::from_secs(5), || async { spin.waiting() == 1 && pubsub.waiting() == 1 }).await;
    assert!(both_asleep, "the waiters never went to sleep");
    holder.release().await.expect("released");

    pubsub_task.await.expect("pubsub waiter");
    spin_task.await.expect("spin waiter");
    assert_eq!(*order.lock().unwrap(), vec!["pubsub", "spin"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_gives_up_at_its_deadline() {
    for wait in [PUBSUB, SPIN] {
        let (holder_lock, waiter) = (lock(wait).await, lock(wait).await);
        let key = key();
        let holder = holder_lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key");

        let started = Instant::now();
        let result = waiter.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_millis(300))).await;
        let took = started.elapsed();

        match result {
            Err(LockError::Timeout { waited, .. }) => assert!(waited >= Duration::from_millis(300)),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(took >= Duration::from_millis(300), "gave up early: {took:?}");
        assert!(took < Duration::from_secs(3), "overran the deadline: {took:?}");
        holder.release().await.expect("released");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_numbers_strictly_increase_across_holders() {
    let locks = [lock(PUBSUB).await, lock(SPIN).await];
    let key = fenced_key();
    let mut fences = Vec::new();
    for i in 0..20 {
        let guard = locks[i % 2].acquire(&key, WaitPolicy::FailFast).await.expect("free key");
        fences.push(guard.fencing_token().expect("a fenced key carries a number"));
        guard.release().await.expect("released");
    }
    assert!(fences.windows(2).all(|pair| pair[0] < pair[1]), "not strictly increasing: {fences:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_numbers_keep_increasing_when_the_counter_is_lost() {
    let redis = connect().await;
    let lock = lock(PUBSUB).await;
    let key = fenced_key();
    let first = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key");
    let before = first.fencing_token().expect("fenced");
    first.release().await.expect("released");
    // What a Redis restart without persistence (or the counter's expiry) does.
    let _: i64 = redis.pool.del(format!("{key}:fence")).await.expect("DEL");

    let second = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key");
    let after = second.fencing_token().expect("fenced");
    second.release().await.expect("released");
    assert!(after > before, "{after:?} after {before:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfenced_keys_leave_nothing_behind_and_fencing_counters_expire() {
    let redis = connect().await;
    let lock = lock(PUBSUB).await;
    // A storm of fresh keys, as a client sending a new Idempotency-Key per request makes.
    let keys: Vec<LockKey> = (0..200).map(|_| key()).collect();
    for key in &keys {
        let guard = lock.acquire(key, WaitPolicy::FailFast).await.expect("free key");
        assert_eq!(guard.fencing_token(), None, "an unfenced key carries no number");
        guard.release().await.expect("released");
    }
    for key in &keys {
        let left: i64 =
            redis.pool.exists(vec![key.as_str().to_owned(), format!("{key}:fence")]).await.expect("EXISTS");
        assert_eq!(left, 0, "{key} left a key behind");
    }
    // A fenced key leaves its counter, but never without an expiry.
    let key = fenced_key();
    lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key").release().await.expect("released");
    let ttl: i64 = redis.pool.pttl(format!("{key}:fence")).await.expect("PTTL");
    let bound = i64::try_from(adapters_redis::lock::FENCE_TTL.as_millis()).expect("small");
    assert!(ttl > 0 && ttl <= bound, "the counter's PTTL is {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_guard_is_released_in_the_background() {
    let (lock, other) = (lock(PUBSUB).await, lock(PUBSUB).await);
    let key = key();
    let guard = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key");

    drop(guard); // a panic or a cancelled request

    assert!(
        freed_within(&other, &key, Duration::from_secs(2)).await,
        "the key was not released long before its 10 s lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_waiter_leaves_no_trace_and_later_waiters_still_get_the_lock() {
    let (holder_lock, waiter) = (lock(PUBSUB).await, lock(PUBSUB).await);
    let key = key();
    let holder = holder_lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key");
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        waiter.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(10))),
    )
    .await;
    assert!(cancelled.is_err(), "the waiter was still waiting when cancelled");
    holder.release().await.expect("released");

    let guard = waiter.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(2))).await.expect("free");
    guard.release().await.expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_an_unreachable_redis_fails_instead_of_hanging() {
    let result = adapters_redis::connection::RedisConnections::connect(
        "redis://127.0.0.1:1",
        1,
        adapters_redis::connection::DEFAULT_COMMAND_TIMEOUT,
    )
    .await;
    assert!(result.is_err());
}

/// A lock on a private Redis (these tests pause or stop it, which must not disturb the
/// other tests on the shared one), with a command timeout of `timeout`.
async fn private_lock(
    redis: &test_support::PrivateRedis,
    timeout: Duration,
) -> (RedisLock, fred::clients::Client) {
    use fred::prelude::{Builder, ClientLike, Config};
    let mut builder = Builder::from_config(Config::from_url(&redis.url()).expect("url"));
    builder.with_performance_config(|c| c.default_command_timeout = timeout);
    let pool = builder.build_pool(2).expect("pool");
    pool.init().await.expect("connected");
    let admin = Builder::from_config(Config::from_url(&redis.url()).expect("url")).build().expect("client");
    admin.init().await.expect("connected");
    let options = LockOptions { wait: SPIN, ..LockOptions::default() };
    let lock = RedisLock::new(pool, None, options).await.expect("lock");
    // Load the scripts (a fresh Redis answers the first EVALSHA with NOSCRIPT, and the
    // reload would not happen once the caller has gone).
    let warm_up = LockKey::new("test", test_support::unique_prefix("warm"));
    lock.acquire(&warm_up, WaitPolicy::FailFast).await.expect("free").release().await.expect("released");
    (lock, admin)
}

/// Pauses every client of `admin`'s Redis for `ms` (commands queue up, then run).
async fn pause_redis(admin: &fred::clients::Client, ms: u64) {
    use fred::prelude::ClientLike;
    let _: () = admin
        .custom(fred::cmd!("CLIENT"), vec!["PAUSE".to_owned(), ms.to_string(), "ALL".to_owned()])
        .await
        .expect("CLIENT PAUSE");
}

async fn exists(admin: &fred::clients::Client, key: &str) -> bool {
    let n: i64 = admin.exists(key).await.expect("EXISTS");
    n == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_dropped_after_its_script_was_sent_leaves_no_lock_behind() {
    let redis = test_support::PrivateRedis::start().expect("a private redis-server");
    let (lock, admin) = private_lock(&redis, Duration::from_secs(5)).await;
    let key = fenced_key();
    // Redis holds every command for 300 ms: the acquire goes out, and its caller gives up
    // (a client that hung up) long before Redis runs it.
    pause_redis(&admin, 300).await;
    let gave_up =
        tokio::time::timeout(Duration::from_millis(50), lock.acquire(&key, WaitPolicy::FailFast)).await;
    assert!(gave_up.is_err(), "the acquire was still waiting for Redis");

    // The script did run (the fencing counter moved), and the key is free again far sooner
    // than the 10 s lease.
    let ran = eventually(Duration::from_secs(30), || async {
        let fence: Option<i64> = admin.get(format!("{key}:fence")).await.expect("GET");
        fence.is_some()
    })
    .await;
    assert!(ran, "the acquire script never ran");
    assert!(
        eventually(Duration::from_secs(30), || async { !exists(&admin, key.as_str()).await }).await,
        "the lock nobody owns is still set"
    );
    assert!(eventually(Duration::from_secs(30), || async { lock.outstanding() == 0 }).await);
    let again = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free again");
    again.release().await.expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_that_timed_out_while_redis_still_ran_it_leaves_no_lock_behind() {
    let redis = test_support::PrivateRedis::start().expect("a private redis-server");
    // Commands time out after 100 ms; Redis answers only after 400.
    let (lock, admin) = private_lock(&redis, Duration::from_millis(100)).await;
    let key = fenced_key();
    pause_redis(&admin, 400).await;
    let timed_out = lock.acquire(&key, WaitPolicy::FailFast).await;
    assert!(matches!(timed_out, Err(LockError::Unavailable(_))), "got {timed_out:?}");

    let ran = eventually(Duration::from_secs(30), || async {
        let fence: Option<i64> = admin.get(format!("{key}:fence")).await.expect("GET");
        fence.is_some()
    })
    .await;
    assert!(ran, "the acquire script never ran");
    assert!(
        eventually(Duration::from_secs(30), || async { !exists(&admin, key.as_str()).await }).await,
        "the lock of a timed-out acquire is still set"
    );
    assert!(eventually(Duration::from_secs(2), || async { lock.outstanding() == 0 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_all_frees_held_locks_and_guards_dropped_where_no_release_could_run() {
    let redis = connect().await;
    let lock = lock(PUBSUB).await;
    let (held, dropped) = (key(), key());
    let guard = lock.acquire(&held, WaitPolicy::FailFast).await.expect("free key");
    // A guard dropped on a runtime that is going away: its release from `Drop` must not
    // be the only chance (it runs on the lock's runtime, and `release_all` sweeps it).
    let other = lock.clone();
    let dropped_key = dropped.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let guard = runtime.block_on(other.acquire(&dropped_key, WaitPolicy::FailFast)).expect("free key");
        drop(runtime);
        drop(guard);
    })
    .join()
    .expect("thread");

    // The guard still held keeps its entry until it is released: the sweep goes on until
    // its time is up, freeing the key again and again (an acquire that was on its way to
    // Redis during one sweep is caught by the next).
    let freed = lock.release_all(Duration::from_millis(500)).await;

    assert!(freed >= 1, "the held lock was ours to free");
    for key in [&held, &dropped] {
        let n: i64 = redis.pool.exists(key.as_str()).await.expect("EXISTS");
        assert_eq!(n, 0, "{key} still locked after release_all");
    }
    // Once stopping, nothing new is locked: a request still being dropped, or a waiter
    // woken by these releases, must not take a key nobody would release.
    let late = lock.acquire(&key(), WaitPolicy::FailFast).await;
    assert!(matches!(late, Err(LockError::Unavailable(_))), "got {late:?}");
    // The guard that outlived the sweep finds its key gone, says so, and forgets it.
    assert!(matches!(guard.release().await, Err(LockError::LeaseLost { .. })));
    assert_eq!(lock.outstanding(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_replayed_after_its_answer_was_lost_is_the_same_acquisition() {
    use fred::prelude::ClientLike;
    let redis = connect().await;
    let lock = lock(PUBSUB).await;
    let key = fenced_key();
    let guard = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free");
    let token: String = redis.pool.get(key.as_str()).await.expect("GET");

    // What the client does after a reconnection: it sends the same script again, with the
    // same token. It must answer "acquired" with the same fencing number, not "held".
    let replay: Vec<i64> = redis
        .pool
        .next()
        .custom(
            fred::cmd!("EVAL"),
            vec![
                adapters_redis::lock::ACQUIRE_LUA.to_owned(),
                "2".to_owned(),
                key.as_str().to_owned(),
                format!("{key}:fence"),
                token,
                "10000".to_owned(),
                "3600000".to_owned(),
            ],
        )
        .await
        .expect("EVAL");
    let fence = guard.fencing_token().expect("fenced").0;
    assert_eq!(replay, vec![1, i64::try_from(fence).expect("below 2^63")]);
    guard.release().await.expect("still ours");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waiters_of_few_keys_leave_no_entry_in_the_waiter_map() {
    let lock = lock(PUBSUB).await;
    let keys = [key(), key()];
    let guards = [
        lock.acquire(&keys[0], WaitPolicy::FailFast).await.expect("free"),
        lock.acquire(&keys[1], WaitPolicy::FailFast).await.expect("free"),
    ];
    // 200 waiters that give up at about the same time, two keys between them.
    let waiters: Vec<_> = (0..200)
        .map(|i| {
            let (lock, key) = (lock.clone(), keys[i % 2].clone());
            tokio::spawn(
                async move { lock.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_millis(300))).await },
            )
        })
        .collect();
    for waiter in waiters {
        assert!(matches!(waiter.await.expect("ran"), Err(LockError::Timeout { .. })));
    }
    for guard in guards {
        guard.release().await.expect("released");
    }
    assert_eq!(lock.waiter_keys(), 0, "entries left for keys nobody waits on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_stops_trusting_its_lease_before_it_runs_out_and_after_its_longest_hold() {
    let redis = test_support::PrivateRedis::start().expect("a private redis-server");
    let (_, admin) = private_lock(&redis, Duration::from_secs(1)).await;
    let pool = {
        use fred::prelude::{Builder, ClientLike, Config};
        let mut builder = Builder::from_config(Config::from_url(&redis.url()).expect("url"));
        builder.with_performance_config(|c| c.default_command_timeout = Duration::from_millis(100));
        let pool = builder.build_pool(1).expect("pool");
        pool.init().await.expect("connected");
        pool
    };
    let options = LockOptions {
        lease: Duration::from_millis(2_000),
        renew_every: Duration::from_millis(1_000),
        max_hold: Duration::from_secs(30),
        wait: SPIN,
    };
    let lock = RedisLock::new(pool, None, options).await.expect("lock");
    let key = key();
    let started = Instant::now();
    let guard = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free");
    // Renewals cannot get through: the lease runs out 2 s after the acquire was sent; the
    // guard must stop trusting it a tenth earlier, before anyone else could get in.
    pause_redis(&admin, 4_000).await;
    tokio::time::timeout(Duration::from_secs(4), guard.lease_lost()).await.expect("lease_lost resolves");
    assert!(guard.is_lost());
    assert!(started.elapsed() < Duration::from_millis(2_000), "noticed only after {:?}", started.elapsed());
    drop(guard);

    // A holder that renews fine but holds past its longest hold is cut off too.
    let redis2 = connect().await;
    let short = LockOptions {
        lease: Duration::from_millis(400),
        renew_every: Duration::from_millis(100),
        max_hold: Duration::from_millis(500),
        wait: SPIN,
    };
    let lock = RedisLock::new(redis2.pool.clone(), None, short).await.expect("lock");
    let key = self::key();
    let guard = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free");
    tokio::time::timeout(Duration::from_secs(2), guard.lease_lost())
        .await
        .expect("cut off at the longest hold");
    assert!(guard.is_lost());
    // And the key frees itself within a lease, since no one renews it any more.
    let other = lock.clone();
    assert!(
        eventually(Duration::from_secs(2), || async {
            match other.acquire(&key, WaitPolicy::FailFast).await {
                Ok(g) => g.release().await.is_ok(),
                Err(_) => false,
            }
        })
        .await
    );
}

/// Subscribers of `channel` on the node that owns it (`PUBSUB SHARDNUMSUB`).
async fn shard_subscribers(pool: &fred::clients::Pool, channel: &str) -> i64 {
    use fred::prelude::ClientLike as _;
    let node = pool.next().with_options(&fred::types::config::Options {
        cluster_hash: Some(fred::types::ClusterHash::Custom(adapters_redis::slots::slot(channel))),
        ..Default::default()
    });
    let reply: Vec<fred::types::Value> = node
        .custom(fred::cmd!("PUBSUB"), vec!["SHARDNUMSUB".to_owned(), channel.to_owned()])
        .await
        .expect("PUBSUB SHARDNUMSUB");
    reply.get(1).and_then(fred::types::Value::as_i64).unwrap_or(0)
}

/// A process listens on a key's release channel only while it has waiters for that key:
/// the first waiter subscribes it, a release wakes the waiter through it, and once the last
/// waiter has left the subscription is given up (Redis keeps no subscription per key ever
/// waited for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_channel_is_followed_only_while_its_key_has_waiters() {
    let redis = connect().await;
    let options = LockOptions {
        // No hand-off: the release must go through Redis and its channel.
        wait: WaitStrategy::PubSub { fallback_poll: Duration::from_secs(30), handoff_limit: 0 },
        ..LockOptions::default()
    };
    let lock = RedisLock::new(redis.pool.clone(), Some(&redis.subscriber), options).await.expect("lock");
    let key = key();
    let channel = adapters_redis::lock::release_channel(key.as_str());
    assert_eq!(adapters_redis::slots::shared_slot(&[key.as_str(), &channel]).map(|_| ()), Some(()));
    let holder = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free");
    assert_eq!(shard_subscribers(&redis.pool, &channel).await, 0, "nobody waits yet");

    let waiter = {
        let (lock, key) = (lock.clone(), key.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let guard =
                lock.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(60))).await.expect("woken");
            let waited = started.elapsed();
            guard.release().await.expect("released");
            waited
        })
    };
    let subscribed = eventually(Duration::from_secs(10), || async {
        lock.waiting() == 1 && shard_subscribers(&redis.pool, &channel).await == 1
    })
    .await;
    assert!(subscribed, "the waiter's key was never subscribed");
    holder.release().await.expect("released");
    // The fallback poll and the lease are 30 s and 10 s away: only the announcement wakes
    // the waiter this soon.
    let waited = tokio::time::timeout(Duration::from_secs(8), waiter).await.expect("woken by the release");
    assert!(waited.expect("ran") < Duration::from_secs(9));
    let given_up = eventually(Duration::from_secs(10), || async {
        lock.waiter_keys() == 0 && shard_subscribers(&redis.pool, &channel).await == 0
    })
    .await;
    assert!(given_up, "the channel is still subscribed with no waiter left");
}

/// The subscriber's connection is cut (`CLIENT KILL TYPE pubsub`): once it is back, the
/// channels of every key that still has waiters are subscribed again, and a release then
/// wakes its waiter through its channel (the fallback poll is far away). A private Redis,
/// so that the cut reaches no other test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_channels_are_subscribed_again_after_the_subscriber_reconnects() {
    let redis = test_support::PrivateRedis::start().expect("a private redis-server");
    let connections = adapters_redis::connection::RedisConnections::connect(
        &redis.url(),
        2,
        adapters_redis::connection::DEFAULT_COMMAND_TIMEOUT,
    )
    .await
    .expect("connected");
    let options = LockOptions {
        // No hand-off: the release must go through Redis and its channel.
        wait: WaitStrategy::PubSub { fallback_poll: Duration::from_secs(60), handoff_limit: 0 },
        lease: Duration::from_secs(60),
        renew_every: Duration::from_secs(20),
        max_hold: Duration::from_secs(120),
    };
    let lock =
        RedisLock::new(connections.pool.clone(), Some(&connections.subscriber), options).await.expect("lock");
    let keys = [key(), key()];
    let channels: Vec<String> =
        keys.iter().map(|k| adapters_redis::lock::release_channel(k.as_str())).collect();
    let holders = [
        lock.acquire(&keys[0], WaitPolicy::FailFast).await.expect("free"),
        lock.acquire(&keys[1], WaitPolicy::FailFast).await.expect("free"),
    ];
    let waiters: Vec<_> = keys
        .iter()
        .map(|key| {
            let (lock, key) = (lock.clone(), key.clone());
            tokio::spawn(async move {
                let guard =
                    lock.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(120))).await.expect("woken");
                guard.release().await.expect("released");
            })
        })
        .collect();
    let both = || async {
        lock.waiting() == 2
            && shard_subscribers(&connections.pool, &channels[0]).await == 1
            && shard_subscribers(&connections.pool, &channels[1]).await == 1
    };
    assert!(eventually(Duration::from_secs(10), both).await, "the waiters' channels were never subscribed");

    use fred::prelude::ClientLike as _;
    let killed: i64 = connections
        .pool
        .next()
        .custom(fred::cmd!("CLIENT"), vec!["KILL", "TYPE", "pubsub"])
        .await
        .expect("CLIENT KILL");
    assert_eq!(killed, 1, "the subscriber's connection was cut");
    assert!(
        eventually(Duration::from_secs(20), both).await,
        "the channels were not subscribed again after the reconnection"
    );
    for (holder, waiter) in holders.into_iter().zip(waiters) {
        holder.release().await.expect("released");
        tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("the release woke its waiter long before the poll")
            .expect("ran");
    }
    connections.quit().await;
}

/// Polls `waiter` (an acquisition not yet spawned) until it has made its attempt and gone to
/// sleep on `lock`, so that a release can find it registered.
async fn until_asleep<F: Future + Unpin>(lock: &RedisLock, waiter: &mut F, asleep: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while lock.waiting() < asleep {
        assert!(Instant::now() < deadline, "the waiter never went to sleep");
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut *waiter).await.is_err(),
            "it won a held key"
        );
    }
}

async fn stored(redis: &adapters_redis::connection::RedisConnections, key: &LockKey) -> Option<String> {
    redis.pool.get(key.as_str()).await.expect("GET")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_hands_the_hold_to_a_local_waiter_without_freeing_the_key() {
    let redis = connect().await;
    // A short lease, so that the hold's renewal is seen to go on after the hand-off.
    let lock = lock_with(LockOptions {
        lease: Duration::from_millis(1_000),
        renew_every: Duration::from_millis(200),
        max_hold: Duration::from_secs(30),
        wait: PUBSUB,
    })
    .await;
    let key = fenced_key();
    let holder = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key");
    let fence = holder.fencing_token();
    let token = stored(&redis, &key).await.expect("the key is held");

    let mut waiter = Box::pin(lock.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(20))));
    until_asleep(&lock, &mut waiter, 1).await;
    holder.release().await.expect("released");
    let next =
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("handed over").expect("held");

    assert_eq!(lock.handoffs(), 1);
    // The key was never free: the same token holds it, with the same fencing number (the
    // previous holder's work is over, and the SQL guards accept an equal number).
    assert_eq!(stored(&redis, &key).await.as_deref(), Some(token.as_str()));
    assert_eq!(next.fencing_token(), fence);
    // The new holder's watchdog renews the lease: leases later the key is still held and
    // trusted.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(!next.is_lost(), "the handed-over hold lost its lease");
    assert_eq!(stored(&redis, &key).await.as_deref(), Some(token.as_str()));

    // With nobody waiting, the release frees the key in Redis.
    next.release().await.expect("released");
    assert_eq!(stored(&redis, &key).await, None);
    assert_eq!(lock.handoffs(), 1);
    assert!(eventually(Duration::from_secs(2), || async { lock.outstanding() == 0 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_handoff_limit_the_key_is_freed_and_won_again_with_a_higher_fence() {
    const WAITERS: usize = adapters_redis::lock::DEFAULT_HANDOFF_LIMIT as usize + 2;
    let lock = lock(PUBSUB).await;
    let key = fenced_key();
    let first = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key");
    let (held, mut holders) = tokio::sync::mpsc::unbounded_channel();
    let waiters: Vec<_> = (0..WAITERS)
        .map(|_| {
            let (lock, key, held) = (lock.clone(), key.clone(), held.clone());
            tokio::spawn(async move {
                let guard = lock.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(60))).await;
                held.send(guard.expect("acquired")).expect("the test listens");
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || async { lock.waiting() == WAITERS }).await,
        "the waiters never all went to sleep"
    );

    let mut fences = vec![first.fencing_token().expect("fenced")];
    first.release().await.expect("released");
    for _ in 0..WAITERS {
        let guard = tokio::time::timeout(Duration::from_secs(10), holders.recv())
            .await
            .expect("the next holder came")
            .expect("a holder");
        fences.push(guard.fencing_token().expect("fenced"));
        guard.release().await.expect("released");
    }
    for waiter in waiters {
        waiter.await.expect("waiter ran");
    }

    // The first hold went through HANDOFF_LIMIT hand-offs, then was released in Redis and
    // won by a waiter with a new number, whose release was handed to the last waiter.
    let limit = adapters_redis::lock::DEFAULT_HANDOFF_LIMIT as usize;
    assert!(fences[..=limit].iter().all(|fence| *fence == fences[0]), "{fences:?}");
    assert!(fences[limit + 1] > fences[0], "{fences:?}");
    assert_eq!(fences[limit + 2], fences[limit + 1], "{fences:?}");
    assert_eq!(lock.handoffs(), u64::try_from(limit + 1).expect("small"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_handed_to_a_waiter_cancelled_meanwhile_frees_the_key() {
    let (lock, other) = (lock(PUBSUB).await, lock(PUBSUB).await);
    let key = key();
    let holder = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key");
    let mut waiter = Box::pin(lock.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(20))));
    until_asleep(&lock, &mut waiter, 1).await;

    // The hold is handed over while the waiter is not being polled, then the waiter is
    // dropped (its client went away) before it ever looks.
    holder.release().await.expect("released");
    assert_eq!(lock.handoffs(), 1);
    drop(waiter);

    // The dropped hold releases the key in the background, long before its 10 s lease.
    assert!(
        freed_within(&other, &key, Duration::from_secs(3)).await,
        "the key stayed held after its new holder was dropped"
    );
    assert!(eventually(Duration::from_secs(2), || async { lock.outstanding() == 0 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_gets_its_turn_while_local_holders_keep_handing_the_key_over() {
    let (local, remote) = (lock(PUBSUB).await, lock(PUBSUB).await);
    let key = key();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Four local tasks take the key again and again: there is always a local waiter to
    // hand it to.
    let busy: Vec<_> = (0..4)
        .map(|_| {
            let (local, key, stop) = (local.clone(), key.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let guard = local.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(30))).await?;
                    tokio::task::yield_now().await;
                    guard.release().await?;
                }
                Ok::<_, LockError>(())
            })
        })
        .collect();
    assert!(eventually(Duration::from_secs(10), || async { local.handoffs() > 0 }).await, "no hand-off");

    // Without the limit the local chain could keep the key for as long as the local tasks
    // run. With it the key is freed every ninth hold; the other instance may lose some of
    // those races to a local task, so it is given room.
    let guard = remote.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(20))).await;
    stop.store(true, Ordering::SeqCst);
    let guard = guard.unwrap_or_else(|error| panic!("the other instance never got the key: {error}"));
    guard.release().await.expect("released");
    for task in busy {
        task.await.expect("task ran").expect("local holds");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_whose_key_vanished_from_redis_is_not_handed_over() {
    let redis = connect().await;
    let lock = lock(PUBSUB).await;
    let key = fenced_key();
    let holder = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key");
    let fence = holder.fencing_token().expect("fenced");
    let waiter = {
        let (lock, key) = (lock.clone(), key.clone());
        tokio::spawn(async move { lock.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(20))).await })
    };
    assert!(eventually(Duration::from_secs(10), || async { lock.waiting() == 1 }).await, "never asleep");

    // What a failover to a replica that never saw the key does, between two renewals.
    let _: i64 = redis.pool.del(key.as_str()).await.expect("DEL");
    match holder.release().await {
        Err(LockError::LeaseLost { .. }) => {}
        other => panic!("expected the lost lease to be reported, got {other:?}"),
    }
    assert_eq!(lock.handoffs(), 0, "a hold that was no longer ours was handed over");

    // The waiter wins the key in Redis, with a new fencing number.
    let next = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter got the key")
        .expect("task ran")
        .expect("acquired");
    assert!(next.fencing_token().expect("fenced") > fence);
    next.release().await.expect("released");
}
