//! The cache on a real Redis: versions, the store's compare-and-set, one loader across
//! clients, the cache-aside race, a corrupt entry, and Redis down.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use adapters_redis::cache::RedisCache;
use application::cache::{Cache, CacheKey, CachePort, CacheRead, CacheSettings, CacheSpec};
use fred::prelude::KeysInterface as _;
use serde::{Deserialize, Serialize};

use super::connect;

const SEATS: CacheSpec = CacheSpec { name: "seats", ttl: Duration::from_secs(60) };

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Map {
    held: Vec<u8>,
}

async fn port(prefix: &str) -> RedisCache {
    RedisCache::with_prefix(connect().await.pool, prefix.to_owned())
}

#[tokio::test]
async fn an_entry_is_valid_only_for_the_version_it_was_stored_under() {
    let cache = port(&test_support::unique_prefix("cache")).await;
    let key = CacheKey::new("seats", "s1");

    let CacheRead::Missing { version } = cache.read(&key, None).await.expect("read") else { panic!("empty") };
    assert_eq!(version, 0, "a read creates no version");
    let stored =
        cache.store(&key, version, "{\"held\":[]}".into(), Duration::from_secs(60)).await.expect("store");
    let version = stored.expect("stored, under a version made for it");
    match cache.read(&key, None).await.expect("read") {
        CacheRead::Entry { version: v, json, ttl_left } => {
            assert_eq!((v, json.as_str()), (version, "{\"held\":[]}"));
            assert!(ttl_left > Duration::from_secs(50) && ttl_left <= Duration::from_secs(60));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(cache.read(&key, Some(version)).await.expect("read"), CacheRead::Unchanged { version });

    cache.begin_write(&key, 1, Duration::from_secs(30)).await.expect("begin");
    assert_eq!(cache.read(&key, Some(version)).await.expect("read"), CacheRead::Writing, "reads bypass");
    assert_eq!(
        cache.store(&key, version, "{\"held\":[]}".into(), Duration::from_secs(60)).await.expect("store"),
        None,
        "no store while a write is marked"
    );
    cache.end_write(&key, 1).await.expect("end");

    let CacheRead::Missing { version: after } = cache.read(&key, Some(version)).await.expect("read") else {
        panic!("evicted")
    };
    assert!(after > version);
    assert_eq!(
        cache.store(&key, version, "{\"held\":[1]}".into(), Duration::from_secs(60)).await.expect("store"),
        None,
        "a value loaded under the old version is refused"
    );
    assert!(matches!(cache.read(&key, None).await.expect("read"), CacheRead::Missing { .. }));
}

#[tokio::test]
async fn a_lost_version_starts_again_above_every_old_one() {
    let prefix = test_support::unique_prefix("cache");
    let cache = port(&prefix).await;
    let key = CacheKey::new("seats", "s2");
    let first = cache.store(&key, 0, "{\"held\":[]}".into(), Duration::from_secs(60)).await.expect("store");
    let first = first.expect("stored");
    // Redis evicts the version key (maxmemory) but keeps the entry.
    let admin = connect().await;
    let _: i64 = admin.pool.del(cache.redis_key(&key, "v")).await.expect("del");

    let read = cache.read(&key, Some(first)).await.expect("read");

    assert_eq!(read, CacheRead::Missing { version: 0 }, "the old entry must not look current");
    let again = cache.store(&key, 0, "{\"held\":[1]}".into(), Duration::from_secs(60)).await.expect("store");
    assert!(again.expect("stored") > first);
}

#[tokio::test]
async fn a_version_rolled_back_by_a_failover_never_revalidates_a_newer_local_copy() {
    let prefix = test_support::unique_prefix("cache");
    let port = port(&prefix).await;
    let a = Cache::new(Arc::new(port.clone()), CacheSettings::default());
    let writer = Cache::new(Arc::new(port.clone()), CacheSettings::default());
    let key = CacheKey::new("seats", "rollback");
    let old = |held: Vec<u8>| move || async move { Ok::<_, String>(Some(Map { held })) };
    a.get_or_load(&SEATS, "rollback", old(vec![])).await.expect("load");
    let CacheRead::Entry { version: copied, .. } = port.read(&key, None).await.expect("read") else {
        panic!()
    };
    // A failover loses the last increments: the version goes back below A's copy.
    let admin = connect().await;
    let _: () = admin
        .pool
        .set(port.redis_key(&key, "v"), (copied - 5).to_string(), None, None, false)
        .await
        .expect("set");
    // A write lands on the new primary.
    let mark = writer.begin_write(&SEATS, "rollback").await.expect("marked");
    writer.end_write(mark.into_iter().collect()).await;

    let seen = a.get_or_load(&SEATS, "rollback", old(vec![7])).await.expect("load").expect("value");

    assert_eq!(*seen, Map { held: vec![7] }, "A served its copy from before the write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_mark_never_lifted_sends_reads_to_the_database_until_it_runs_out() {
    let prefix = test_support::unique_prefix("cache");
    let settings = CacheSettings { write_mark: Duration::from_millis(400), ..CacheSettings::default() };
    let cache = Cache::new(Arc::new(port(&prefix).await), settings);
    let loads = Arc::new(AtomicUsize::new(0));
    cache.get_or_load(&SEATS, "marked", counting_loader(&loads)).await.expect("load");
    // A write marks the key, commits, and its request is cancelled before lifting it.
    drop(cache.begin_write(&SEATS, "marked").await.expect("marked"));

    let started = std::time::Instant::now();
    let mut bypassed = 0;
    while started.elapsed() < Duration::from_millis(300) {
        cache.get_or_load(&SEATS, "marked", counting_loader(&loads)).await.expect("load");
        bypassed += 1;
    }
    assert_eq!(loads.load(Ordering::SeqCst), 1 + bypassed, "every read under the mark went to the database");
    // Once it runs out, the cache fills again and serves.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut before = loads.load(Ordering::SeqCst);
    loop {
        cache.get_or_load(&SEATS, "marked", counting_loader(&loads)).await.expect("load");
        cache.get_or_load(&SEATS, "marked", counting_loader(&loads)).await.expect("load");
        let after = loads.load(Ordering::SeqCst);
        if after <= before + 1 {
            break;
        }
        before = after;
        assert!(std::time::Instant::now() < deadline, "the mark never ran out");
    }
}

type Load = futures::future::BoxFuture<'static, Result<Option<Map>, String>>;

fn counting_loader(loads: &Arc<AtomicUsize>) -> impl Fn() -> Load + use<> {
    let loads = Arc::clone(loads);
    move || {
        let loads = Arc::clone(&loads);
        Box::pin(async move {
            loads.fetch_add(1, Ordering::SeqCst);
            // A slow query, so that the misses overlap.
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(Some(Map { held: vec![7] }))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_misses_from_two_instances_load_once() {
    let prefix = test_support::unique_prefix("cache");
    // Two instances: each its own connections and its own local copies.
    let a = Cache::new(Arc::new(port(&prefix).await), CacheSettings::default());
    let b = Cache::new(Arc::new(port(&prefix).await), CacheSettings::default());
    let loads = Arc::new(AtomicUsize::new(0));
    let load = counting_loader(&loads);

    let results = futures::future::join_all((0..100).map(|i| {
        let cache = if i % 2 == 0 { &a } else { &b };
        cache.get_or_load(&SEATS, "hot", &load)
    }))
    .await;

    assert_eq!(loads.load(Ordering::SeqCst), 1, "exactly one load across both instances");
    assert!(results.iter().all(|r| r.as_ref().expect("loaded").as_deref() == Some(&Map { held: vec![7] })));
    // And later reads are hits, on either instance.
    a.get_or_load(&SEATS, "hot", &load).await.expect("hit");
    b.get_or_load(&SEATS, "hot", &load).await.expect("hit");
    assert_eq!(loads.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_loaded_before_a_write_cannot_store_its_stale_value_after_the_eviction() {
    let prefix = test_support::unique_prefix("cache");
    let reader = Arc::new(Cache::new(Arc::new(port(&prefix).await), CacheSettings::default()));
    let writer = Cache::new(Arc::new(port(&prefix).await), CacheSettings::default());
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel::<()>();
    let (evicted_tx, evicted_rx) = tokio::sync::oneshot::channel::<()>();

    // 1. The reader misses and reads the old row (seat 7 free)...
    let slow = tokio::spawn({
        let reader = Arc::clone(&reader);
        async move {
            reader
                .get_or_load(&SEATS, "race", || async move {
                    let old = Map { held: vec![] };
                    loaded_tx.send(()).ok();
                    // 3. ...and only gets to store it after the write's eviction.
                    evicted_rx.await.ok();
                    Ok::<_, String>(Some(old))
                })
                .await
        }
    });
    loaded_rx.await.expect("the reader loaded");
    // 2. A write commits (seat 7 held) and evicts.
    let mark = writer.begin_write(&SEATS, "race").await.expect("marked");
    writer.end_write(mark.into_iter().collect()).await;
    evicted_tx.send(()).ok();
    let stale = slow.await.expect("task").expect("load").expect("value");
    assert_eq!(*stale, Map { held: vec![] }, "the slow reader still answers its own request");

    // 4. Every later read, on either instance, sees the write.
    for cache in [reader.as_ref(), &writer] {
        let fresh = cache
            .get_or_load(&SEATS, "race", || async { Ok::<_, String>(Some(Map { held: vec![7] })) })
            .await
            .expect("load")
            .expect("value");
        assert_eq!(*fresh, Map { held: vec![7] }, "the stale value was stored after the eviction");
    }
}

#[tokio::test]
async fn an_entry_that_does_not_decode_is_reloaded_and_replaced() {
    let prefix = test_support::unique_prefix("cache");
    let port = port(&prefix).await;
    let cache = Cache::new(Arc::new(port.clone()), CacheSettings::default());
    let key = CacheKey::new("seats", "corrupt");
    let CacheRead::Missing { version } = port.read(&key, None).await.expect("read") else { panic!() };
    port.store(&key, version, "{\"held\": \"not a list\"".into(), Duration::from_secs(60))
        .await
        .expect("store");
    let loads = Arc::new(AtomicUsize::new(0));

    let value = cache.get_or_load(&SEATS, "corrupt", counting_loader(&loads)).await.expect("load");

    assert_eq!(value.as_deref(), Some(&Map { held: vec![7] }));
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    let CacheRead::Entry { json, .. } = port.read(&key, None).await.expect("read") else {
        panic!("replaced")
    };
    assert_eq!(json, r#"{"held":[7]}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_every_read_goes_to_the_loader_and_none_fails() {
    let mut redis = test_support::PrivateRedis::start().expect("a private redis-server");
    let pool = {
        use fred::prelude::{Builder, ClientLike, Config};
        let mut builder = Builder::from_config(Config::from_url(&redis.url()).expect("url"));
        builder.with_performance_config(|c| c.default_command_timeout = Duration::from_millis(200));
        builder.with_connection_config(|c| c.connection_timeout = Duration::from_millis(200));
        let pool = builder.build_pool(1).expect("pool");
        pool.init().await.expect("connected");
        pool
    };
    let cache = Cache::new(Arc::new(RedisCache::new(pool)), CacheSettings::default());
    let loads = Arc::new(AtomicUsize::new(0));
    cache.get_or_load(&SEATS, "down", counting_loader(&loads)).await.expect("load");
    assert_eq!(loads.load(Ordering::SeqCst), 1);

    redis.kill();

    for _ in 0..3 {
        let value = cache.get_or_load(&SEATS, "down", counting_loader(&loads)).await.expect("never fails");
        assert_eq!(value.as_deref(), Some(&Map { held: vec![7] }));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 4, "each read went to the database");
    // A write cannot be marked while Redis is down: the write must not go ahead.
    assert!(cache.begin_write(&SEATS, "down").await.is_err());
}

#[tokio::test]
async fn local_copies_stay_bounded() {
    let prefix = test_support::unique_prefix("cache");
    let settings = CacheSettings { local_capacity: 20, ..CacheSettings::default() };
    let cache = Cache::new(Arc::new(port(&prefix).await), settings);
    for i in 0..200 {
        cache
            .get_or_load(&SEATS, &format!("k{i}"), || async { Ok::<_, String>(Some(Map { held: vec![] })) })
            .await
            .expect("load");
    }
    // Every key is fresh, so all may be kept until the bound: then the map is cut back.
    assert!(cache.local_keys() <= 21, "{} keys kept", cache.local_keys());
}
