//! The cache across a Redis failover, on a real master and replica (private processes):
//! a write mark that only the master had is lost when the replica is promoted, so with
//! `CACHE_REPLICA_ACKS` a mark waits for a replica, and a write whose mark no replica got is
//! refused before it changes anything.

use std::time::Duration;

use adapters_redis::cache::{RedisCache, ReplicaAcks};
use application::cache::{CacheError, CacheKey, CachePort, CacheRead};
use fred::clients::{Client, Pool};
use fred::prelude::{Builder, ClientLike, Config, KeysInterface as _};
use test_support::PrivateRedis;
use tokio::time::Instant;

// Seconds, not milliseconds: a replica on a loaded two-core machine can be slow to answer.
const ACKS: ReplicaAcks = ReplicaAcks { replicas: 1, timeout: Duration::from_secs(5) };

async fn client(redis: &PrivateRedis) -> Client {
    let client = Builder::from_config(Config::from_url(&redis.url()).expect("url")).build().expect("client");
    client.init().await.expect("connected");
    client
}

async fn pool(redis: &PrivateRedis) -> Pool {
    let pool =
        Builder::from_config(Config::from_url(&redis.url()).expect("url")).build_pool(2).expect("pool");
    pool.init().await.expect("connected");
    pool
}

async fn poll(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A master with one replica that has synchronised, and an entry stored on the master that
/// the replica has too.
async fn replicated_entry() -> (PrivateRedis, PrivateRedis, Client, CacheKey) {
    let master = PrivateRedis::start().expect("master");
    let replica = PrivateRedis::start_replica_of(&master).expect("replica");
    let on_replica = client(&replica).await;
    poll("the replica's link", async || {
        let info: String =
            on_replica.custom(fred::cmd!("INFO"), vec!["replication".to_owned()]).await.expect("INFO");
        info.contains("master_link_status:up")
    })
    .await;
    let cache = RedisCache::new(pool(&master).await);
    let key = CacheKey::new("seats", "s1");
    let CacheRead::Missing { version } = cache.read(&key, None).await.expect("read") else { panic!("empty") };
    cache
        .store(&key, version, r#"{"held":[]}"#.into(), Duration::from_secs(60))
        .await
        .expect("store")
        .expect("stored");
    let entry = cache.redis_key(&key, "e");
    poll("the entry on the replica", async || {
        let n: i64 = on_replica.exists(&entry).await.expect("EXISTS");
        n == 1
    })
    .await;
    (master, replica, on_replica, key)
}

/// The master dies and the replica is promoted, as Sentinel would do.
async fn fail_over(master: &mut PrivateRedis, on_replica: &Client) {
    master.kill();
    let _: String = on_replica
        .custom(fred::cmd!("REPLICAOF"), vec!["NO".to_owned(), "ONE".to_owned()])
        .await
        .expect("promoted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_acknowledged_by_a_replica_survives_its_promotion() {
    let (mut master, replica, on_replica, key) = replicated_entry().await;
    let cache = RedisCache::new(pool(&master).await).with_replica_acks(ACKS);

    cache.begin_write(&key, 7, Duration::from_secs(60)).await.expect("the replica has the mark");
    // The write would commit in MySQL now; then the master dies before the mark is lifted.
    fail_over(&mut master, &on_replica).await;

    let promoted = RedisCache::new(pool(&replica).await);
    let read = promoted.read(&key, None).await.expect("read");
    assert!(matches!(read, CacheRead::Writing), "the promoted node serves {read:?}, not the write's mark");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_no_replica_got_refuses_the_write_and_the_unwaited_one_is_lost_in_a_failover() {
    let (mut master, replica, on_replica, key) = replicated_entry().await;
    let waiting = RedisCache::new(pool(&master).await).with_replica_acks(ACKS);
    let not_waiting = RedisCache::new(pool(&master).await);

    // The replica's link to the master breaks (it keeps its data): nothing written now
    // reaches it. (Stopping the process would not do: what the master already sent waits in
    // its socket and arrives when it runs on.)
    let _: String = on_replica
        .custom(fred::cmd!("REPLICAOF"), vec!["127.0.0.1".to_owned(), "1".to_owned()])
        .await
        .expect("link cut");
    let refused = waiting.begin_write(&key, 7, Duration::from_secs(60)).await;
    assert!(matches!(refused, Err(CacheError::Unavailable(_))), "{refused:?}");
    // Without the wait the master takes the mark, and the write would go on to commit...
    not_waiting.begin_write(&key, 8, Duration::from_secs(60)).await.expect("marked on the master only");
    fail_over(&mut master, &on_replica).await;

    // ...while the promoted node still has the entry from before it, and serves it as
    // current: the stale answer the wait exists to prevent. (With the wait, the write was
    // refused before it changed anything, so this entry is still the truth.)
    let promoted = RedisCache::new(pool(&replica).await);
    let read = promoted.read(&key, None).await.expect("read");
    assert!(matches!(read, CacheRead::Entry { .. }), "{read:?}");
}
