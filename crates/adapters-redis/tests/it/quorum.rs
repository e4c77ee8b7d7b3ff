//! The quorum lock on three private `redis-server` processes (started here and killed at the
//! end): exclusion, one node down still works, two down fails closed, fencing numbers that
//! keep rising across different majorities, and a guard lost with its majority.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use adapters_redis::connection::RedisConnections;
use adapters_redis::lock::{LockOptions, RedisLock, WaitStrategy};
use adapters_redis::quorum::{QuorumLock, QuorumOptions};
use application::lock::{DistributedLock, FencingToken, LockError, LockGuard, LockKey, WaitPolicy};
use fred::prelude::{ClientLike, KeysInterface};
use test_support::PrivateRedis;
use tokio::time::Instant;

const SPIN: WaitStrategy =
    WaitStrategy::Spin { initial: Duration::from_millis(5), max: Duration::from_millis(50) };

/// Three independent nodes, and a plain client on each to look at (or tamper with) them.
struct Nodes {
    servers: Vec<PrivateRedis>,
    admins: Vec<fred::clients::Client>,
}

impl Nodes {
    async fn start() -> Self {
        let servers: Vec<PrivateRedis> =
            (0..3).map(|_| PrivateRedis::start().expect("redis-server")).collect();
        let mut admins = Vec::new();
        for server in &servers {
            let admin = fred::prelude::Builder::from_config(
                fred::prelude::Config::from_url(&server.url()).expect("url"),
            )
            .build()
            .expect("client");
            admin.init().await.expect("connected");
            admins.push(admin);
        }
        Self { servers, admins }
    }

    /// A quorum lock over the three (one "instance": its own connections).
    async fn lock(&self, options: LockOptions) -> QuorumLock {
        let mut nodes = Vec::new();
        for server in &self.servers {
            let (pool, up) = RedisConnections::connect_lock_node(&server.url(), 2, Duration::from_secs(1))
                .await
                .expect("a valid URL");
            assert!(up, "a node did not answer");
            nodes.push(RedisLock::new(pool, None, options).await.expect("node lock"));
        }
        let lock = QuorumLock::new(
            nodes,
            QuorumOptions { node_timeout: Duration::from_millis(500), ..QuorumOptions::default() },
        )
        .expect("three nodes");
        // Load the scripts on every node (a fresh Redis answers the first EVALSHA with
        // NOSCRIPT, and a reload cut short by the node timeout would count as a failure).
        let warm_up = LockKey::fenced("test", test_support::unique_prefix("warm"));
        lock.acquire(&warm_up, WaitPolicy::WaitUpTo(Duration::from_secs(10)))
            .await
            .expect("free")
            .release()
            .await
            .expect("released");
        lock
    }

    /// On how many nodes `key` is set now.
    async fn holding(&self, key: &LockKey) -> usize {
        let mut count = 0;
        for admin in &self.admins {
            let n: i64 = admin.exists(key.as_str()).await.expect("EXISTS");
            count += usize::try_from(n).expect("0 or 1");
        }
        count
    }
}

fn options() -> LockOptions {
    LockOptions { wait: SPIN, ..LockOptions::default() }
}

fn fenced_key() -> LockKey {
    LockKey::fenced("test", test_support::unique_prefix("quorum"))
}

fn fence(guard: &dyn LockGuard) -> FencingToken {
    guard.fencing_token().expect("a fenced key carries a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_of_many_tasks_on_two_instances_holds_a_quorum_lock_at_a_time() {
    let nodes = Nodes::start().await;
    let locks = [nodes.lock(options()).await, nodes.lock(options()).await];
    let key = fenced_key();
    let (inside, entered, overlaps) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let fences = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let (lock, key) = (locks[i % 2].clone(), key.clone());
            let (inside, entered, overlaps, fences) =
                (inside.clone(), entered.clone(), overlaps.clone(), fences.clone());
            tokio::spawn(async move {
                let guard = lock.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(60))).await?;
                if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                fences.lock().expect("not poisoned").push(fence(guard.as_ref()));
                // Hold across real awaits, so that a broken lock would let others in.
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                entered.fetch_add(1, Ordering::SeqCst);
                guard.release().await
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("acquired and released");
    }
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders at once");
    assert_eq!(entered.load(Ordering::SeqCst), 30);
    // In the order the holders came in, each number is above the one before.
    let fences = fences.lock().expect("not poisoned").clone();
    assert!(fences.windows(2).all(|pair| pair[0] < pair[1]), "not strictly increasing: {fences:?}");
    assert_eq!(nodes.holding(&key).await, 0, "a node still holds the key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_key_is_busy_for_others_and_is_set_on_every_node_until_released() {
    let nodes = Nodes::start().await;
    let (a, b) = (nodes.lock(options()).await, nodes.lock(options()).await);
    let key = fenced_key();
    let guard = a.acquire(&key, WaitPolicy::FailFast).await.expect("free key");
    // Every node answers at once here, so every node granted it.
    assert_eq!(nodes.holding(&key).await, 3);
    assert!(matches!(b.acquire(&key, WaitPolicy::FailFast).await, Err(LockError::Busy { .. })));
    assert!(matches!(
        b.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_millis(300))).await,
        Err(LockError::Timeout { .. })
    ));
    assert_eq!(nodes.holding(&key).await, 3, "a losing attempt took nothing from the holder");
    guard.release().await.expect("released");
    assert_eq!(nodes.holding(&key).await, 0);
    b.acquire(&key, WaitPolicy::FailFast).await.expect("free again").release().await.expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_node_down_the_lock_still_excludes_and_its_numbers_keep_rising() {
    let mut nodes = Nodes::start().await;
    let (a, b) = (nodes.lock(options()).await, nodes.lock(options()).await);
    let key = fenced_key();
    let first = a.acquire(&key, WaitPolicy::FailFast).await.expect("free key");
    let before = fence(first.as_ref());
    first.release().await.expect("released");

    nodes.servers[0].kill();

    let guard = a.acquire(&key, WaitPolicy::FailFast).await.expect("a majority is up");
    assert!(fence(guard.as_ref()) > before);
    assert!(!guard.is_lost());
    assert!(matches!(b.acquire(&key, WaitPolicy::FailFast).await, Err(LockError::Busy { .. })));
    guard.release().await.expect("released on the two nodes up");
    b.acquire(&key, WaitPolicy::FailFast).await.expect("free again").release().await.expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_nodes_down_the_lock_fails_closed_and_recovers_when_one_returns() {
    let mut nodes = Nodes::start().await;
    let lock = nodes.lock(options()).await;
    let key = fenced_key();
    nodes.servers[0].kill();
    nodes.servers[1].kill();

    assert!(matches!(lock.acquire(&key, WaitPolicy::FailFast).await, Err(LockError::Unavailable(_))));
    // Waiting does not help when no majority can be reached: it fails closed at once
    // rather than spend its wait.
    let waited = lock.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(60))).await;
    assert!(matches!(waited, Err(LockError::Unavailable(_))), "{waited:?}");
    assert!(!nodes.holding_on(2, &key).await, "the node up kept no grant of a failed quorum");

    // A node comes back (empty, as a Redis without persistence does): the lock works again
    // without being rebuilt.
    nodes.servers[1].restart().expect("restarted");
    let deadline = Instant::now() + Duration::from_secs(30);
    let guard = loop {
        match lock.acquire(&key, WaitPolicy::FailFast).await {
            Ok(guard) => break guard,
            Err(error) => {
                assert!(Instant::now() < deadline, "still failing after the node returned: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    guard.release().await.expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_keep_rising_across_majorities_whose_nodes_disagree() {
    let mut nodes = Nodes::start().await;
    let lock = nodes.lock(options()).await;
    let key = fenced_key();
    // Node 1's counter is far ahead of the others' (its clock ran fast once, say).
    let ahead = 4_000_000_000_000_000_i64;
    let _: () = nodes.admins[1]
        .set(format!("{key}:fence"), ahead, Some(fred::types::Expiration::EX(3_600)), None, false)
        .await
        .expect("SET");
    let first = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key");
    let high = fence(first.as_ref());
    assert!(high.0 > u64::try_from(ahead).expect("positive"), "the highest node's number wins");
    first.release().await.expect("released");

    // The next majority does not contain node 1; one of its nodes saw the number anyway,
    // because it was written back before it was handed out.
    nodes.servers[1].kill();
    let second = lock.acquire(&key, WaitPolicy::FailFast).await.expect("a majority is up");
    assert!(fence(second.as_ref()) > high, "{:?} after {high:?}", second.fencing_token());
    second.release().await.expect("released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_is_lost_once_a_majority_of_its_grants_is() {
    let nodes = Nodes::start().await;
    let short = LockOptions {
        lease: Duration::from_millis(600),
        renew_every: Duration::from_millis(150),
        max_hold: Duration::from_secs(60),
        wait: SPIN,
    };
    let lock = nodes.lock(short).await;
    let key = fenced_key();
    let guard = lock.acquire(&key, WaitPolicy::FailFast).await.expect("free key");
    let lost = guard.lease_lost();

    // One grant gone (a node restarted without its data): a majority still holds it.
    let _: i64 = nodes.admins[0].del(key.as_str()).await.expect("DEL");
    let lost = match tokio::time::timeout(Duration::from_secs(2), lost).await {
        Ok(()) => panic!("lost with a majority still holding the key"),
        Err(_) => guard.lease_lost(),
    };
    assert!(!guard.is_lost());

    // A second one gone: the majority is gone, and the guard says so.
    let _: i64 = nodes.admins[1].del(key.as_str()).await.expect("DEL");
    tokio::time::timeout(Duration::from_secs(10), lost).await.expect("the loss is reported");
    assert!(guard.is_lost());
    assert!(matches!(guard.release().await, Err(LockError::LeaseLost { .. })));
}

impl Nodes {
    async fn holding_on(&self, node: usize, key: &LockKey) -> bool {
        let n: i64 = self.admins[node].exists(key.as_str()).await.expect("EXISTS");
        n == 1
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_grant_on_the_first_node_does_not_block_a_key_the_others_give() {
    let nodes = Nodes::start().await;
    let lock = nodes.lock(options()).await;
    let key = fenced_key();
    // A grant nobody owns any more (its holder's release never reached node 0).
    let _: () = nodes.admins[0]
        .set(key.as_str(), "orphan", Some(fred::types::Expiration::EX(60)), None, false)
        .await
        .expect("SET");
    let guard = lock.acquire(&key, WaitPolicy::FailFast).await.expect("nodes 1 and 2 give it");
    assert!(!guard.is_lost());
    guard.release().await.expect("released on the two that gave it");
    let orphan: Option<String> = nodes.admins[0].get(key.as_str()).await.expect("GET");
    assert_eq!(orphan.as_deref(), Some("orphan"), "someone else's grant is left alone");
}
