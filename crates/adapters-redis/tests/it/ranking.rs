//! The ranking's store on a real Redis: nothing counted before a rebuild, a rebuild that
//! counts each payment once, recordings parked during a rebuild and replayed unless MySQL
//! had them, a rebuild overtaken by another, ties at the limit, expiry with the hour, and
//! every key in one hash slot.

use std::collections::{HashMap, HashSet};

use adapters_redis::ranking::RedisRanking;
use application::clock;
use application::ranking::{ConcertCount, Hour, RankingStore, Recorded, Sale};
use domain::booking::ConcertId;
use domain::payment::PaymentId;
use fred::prelude::KeysInterface as _;
use time::OffsetDateTime;

use super::connect;

fn sale(concert: ConcertId, paid_at: OffsetDateTime) -> Sale {
    Sale { payment: PaymentId::generate(), concert, paid_at }
}

fn by_concert(counts: &[ConcertCount]) -> HashMap<ConcertId, u64> {
    counts.iter().map(|c| (c.concert, c.reservations)).collect()
}

/// A store under a prefix of its own, and the current hour.
async fn store() -> (RedisRanking, fred::clients::Pool, Hour) {
    let redis = connect().await;
    let store = RedisRanking::with_prefix(redis.pool.clone(), test_support::unique_prefix("ranking"));
    (store, redis.pool.clone(), Hour::of(clock::now_utc()))
}

/// Rebuilds the ranking with `sales`, as the use case does.
async fn rebuild(store: &RedisRanking, now: Hour, sales: &[Sale]) {
    let token = store.begin_rebuild(now).await.expect("begin").expect("not built yet");
    assert!(store.finish_rebuild(&token, now, sales).await.expect("finish"), "the rebuild is still ours");
}

/// Forgets the summed-up window, so that the next read sums the buckets again.
async fn forget_top(store: &RedisRanking, pool: &fred::clients::Pool, now: Hour) {
    let _: i64 = pool.del(store.redis_key(format_args!("top:{}", now.index()))).await.expect("DEL");
}

#[tokio::test]
async fn an_unbuilt_ranking_answers_nothing_and_counts_nothing() {
    let (store, _, now) = store().await;

    assert_eq!(store.top(now, 10).await.expect("top"), None);
    let recorded = store.record(&sale(ConcertId::generate(), clock::now_utc())).await.expect("record");

    assert_eq!(recorded, Recorded::Unbuilt);
    assert_eq!(store.top(now, 10).await.expect("top"), None);
}

#[tokio::test]
async fn a_rebuild_counts_each_payment_once_in_the_window_and_later_payments_add_up_once() {
    let (store, pool, now) = store().await;
    let (a, b) = (ConcertId::generate(), ConcertId::generate());
    let at = clock::now_utc();
    let twice = sale(a, at - time::Duration::hours(3));
    let sales = vec![
        sale(a, at),
        twice,
        // Listed twice (as a retried read might): counted once.
        twice,
        sale(b, at - time::Duration::hours(23)),
        // Before the window: not counted.
        sale(b, at - time::Duration::hours(30)),
    ];

    rebuild(&store, now, &sales).await;

    let top = store.top(now, 10).await.expect("top").expect("built");
    assert_eq!(by_concert(&top), HashMap::from([(a, 2), (b, 1)]));
    assert_eq!(top[0].concert, a, "most first");
    let later = sale(b, clock::now_utc());
    assert_eq!(store.record(&later).await.expect("record"), Recorded::Counted);
    assert_eq!(store.record(&later).await.expect("record again"), Recorded::Duplicate);
    assert_eq!(store.record(&twice).await.expect("a rebuilt one"), Recorded::Duplicate);
    assert_eq!(
        by_concert(&store.top(now, 10).await.expect("top").expect("built")),
        HashMap::from([(a, 2), (b, 1)]),
        "the summed window is reused for a few seconds"
    );
    forget_top(&store, &pool, now).await;
    assert_eq!(
        by_concert(&store.top(now, 10).await.expect("top").expect("built")),
        HashMap::from([(a, 2), (b, 2)])
    );
    assert_eq!(store.begin_rebuild(now).await.expect("begin"), None, "built: nothing to rebuild");
}

#[tokio::test]
async fn recordings_during_a_rebuild_are_parked_and_replayed_unless_mysql_counted_them() {
    let (store, _, now) = store().await;
    let (a, b, c) = (ConcertId::generate(), ConcertId::generate(), ConcertId::generate());
    let at = clock::now_utc();
    let token = store.begin_rebuild(now).await.expect("begin").expect("not built");
    // Committed before MySQL was read (so in its answer), and relayed during the rebuild.
    let in_mysql = sale(a, at);
    // Committed after MySQL was read: only the parked recording has it.
    let after_read = sale(b, at);
    assert_eq!(store.record(&in_mysql).await.expect("record"), Recorded::Parked);
    assert_eq!(store.record(&after_read).await.expect("record"), Recorded::Parked);

    let finished = store.finish_rebuild(&token, now, &[in_mysql, sale(c, at)]).await.expect("finish");

    assert!(finished);
    let top = store.top(now, 10).await.expect("top").expect("built");
    assert_eq!(by_concert(&top), HashMap::from([(a, 1), (b, 1), (c, 1)]), "each once");
    assert_eq!(store.record(&after_read).await.expect("record"), Recorded::Duplicate);
}

#[tokio::test]
async fn a_rebuild_overtaken_by_another_loads_nothing_and_marks_nothing() {
    let (store, _, now) = store().await;
    let (a, b) = (ConcertId::generate(), ConcertId::generate());
    // The first rebuilder's lease ran out and a second one began over it.
    let first = store.begin_rebuild(now).await.expect("begin").expect("not built");
    let second = store.begin_rebuild(now).await.expect("begin").expect("still not built");

    let stale = store.finish_rebuild(&first, now, &[sale(a, clock::now_utc())]).await.expect("finish");

    assert!(!stale, "the first token is no longer the rebuild's");
    assert_eq!(store.top(now, 10).await.expect("top"), None, "nothing marked built");
    assert!(store.finish_rebuild(&second, now, &[sale(b, clock::now_utc())]).await.expect("finish"));
    let top = store.top(now, 10).await.expect("top").expect("built");
    assert_eq!(by_concert(&top), HashMap::from([(b, 1)]));
}

#[tokio::test]
async fn every_entry_tied_with_the_last_of_the_limit_comes_back() {
    let (store, _, now) = store().await;
    let concerts: Vec<ConcertId> = (0..5).map(|_| ConcertId::generate()).collect();
    let at = clock::now_utc();
    let mut sales = Vec::new();
    for (concert, n) in concerts.iter().zip([4, 2, 2, 2, 1]) {
        sales.extend((0..n).map(|_| sale(*concert, at)));
    }
    rebuild(&store, now, &sales).await;

    let top = store.top(now, 2).await.expect("top").expect("built");

    let counts: Vec<u64> = top.iter().map(|c| c.reservations).collect();
    assert_eq!(counts, vec![4, 2, 2, 2], "the limit is 2, and three are tied for second");
    assert_eq!(store.top(now, 100).await.expect("top").expect("built").len(), 5);
}

#[tokio::test]
async fn an_hours_keys_expire_when_it_leaves_the_window_and_all_share_one_slot() {
    let (store, pool, now) = store().await;
    let prefix = store.redis_key("");
    let at = clock::now_utc();
    let early = sale(ConcertId::generate(), at - time::Duration::hours(5));
    let token = store.begin_rebuild(now).await.expect("begin").expect("not built");
    assert_eq!(store.record(&sale(ConcertId::generate(), at)).await.expect("record"), Recorded::Parked);
    assert!(store.finish_rebuild(&token, now, &[early]).await.expect("finish"));
    store.record(&sale(ConcertId::generate(), at)).await.expect("record");
    store.top(now, 10).await.expect("top");

    let hour = early.hour();
    let left = hour.leaves_window_at().unix_timestamp() - OffsetDateTime::now_utc().unix_timestamp();
    for key in [store.redis_key(hour.index()), store.redis_key(format_args!("seen:{}", hour.index()))] {
        let ttl: i64 = pool.ttl(key.as_str()).await.expect("TTL");
        // Within a minute: the test's clock and Redis's may differ a little.
        assert!((ttl - left).abs() < 60, "{key}: {ttl} s, expected {left}");
    }
    // KEYS, not one SCAN page: a page covers only part of a large keyspace.
    let written = super::keys_everywhere(&pool, &format!("{prefix}*")).await;
    assert!(written.len() >= 4, "{written:?}");
    let slots: HashSet<u16> = written.iter().map(|key| fred::util::redis_keyslot(key.as_bytes())).collect();
    assert_eq!(slots.len(), 1, "{written:?}");
    for key in &written {
        let ttl: i64 = pool.ttl(key.as_str()).await.expect("TTL");
        assert!(ttl > 0, "{key} would live for ever");
    }
}
