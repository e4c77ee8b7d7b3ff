//! `make bench`: lock release announcements on a Redis Cluster. Prints its figures and
//! writes `docs/bench/redis-cluster.{md,json}` and its plots.
//!
//! 1. **What one release costs the cluster.** Three subscriber connections stand for three
//!    instances. The design before: every instance subscribed to one channel
//!    (`lock:released`) and every release was `PUBLISH`ed on it. The design now: a release
//!    is `SPUBLISH`ed on the key's own channel (`<key>:released`, in the key's slot), and
//!    only an instance with a waiter for that key is subscribed to it. The same 20,000
//!    releases over 200 keys (each key waited for on one instance) are announced both ways,
//!    and the cluster's own counters (`CLUSTER INFO`: `cluster_stats_messages_*_sent`
//!    summed over the masters) say how many messages crossed the cluster bus, beside how
//!    many announcements each instance received.
//! 2. **Lock hand-offs through the adapter.** Three `RedisLock`s (three instances' worth
//!    of connections) on one hot key, 150 waiting tasks, each acquiring and releasing in
//!    turn: hand-offs per second with pub/sub waiting and with spinning, on the cluster and
//!    on the single Redis of `TEST_REDIS_URL`.
//!
//! Each figure is measured `benchkit::runs()` times; the report gives min, median and max. The cluster
//! is started by `deploy/redis-cluster.sh` on free loopback ports and stopped at the end.

#![allow(clippy::print_stdout, reason = "a benchmark prints its figures")]
#![allow(clippy::cast_precision_loss, reason = "figures")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use adapters_redis::connection::RedisConnections;
use adapters_redis::lock::{LockOptions, RedisLock, WaitStrategy, release_channel};
use anyhow::Context as _;
use application::lock::{DistributedLock, LockKey, WaitPolicy};
use e2e::ScriptedRedis;
use e2e::benchkit::{self, Figure, Series};
use fred::prelude::{ClientLike as _, EventInterface as _, PubsubInterface as _};
use serde_json::json;

const INSTANCES: usize = 3;
const RELEASES: usize = 20_000;
const KEYS: usize = 200;
const OLD_CHANNEL: &str = "lock:released";
const WAITERS: usize = 150;
const TURNS: usize = 10;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let single = test_support::redis_url().await;
    let cluster = ScriptedRedis::cluster().context("start a Redis Cluster")?;
    println!("Redis Cluster of three masters at {}", cluster.url());

    let mut announcements = Vec::new();
    for design in [Design::Broadcast, Design::Sharded] {
        let mut runs = Vec::new();
        for run in 1..=benchkit::runs() {
            let figures = announce(cluster.url(), design).await?;
            println!(
                "{:>9} run {run}: {:>7.0} releases/s, {:>6} bus messages, received per instance {:?}",
                design.name(),
                figures.per_second,
                figures.bus_messages,
                figures.received
            );
            runs.push(figures);
        }
        announcements.push((design, runs));
    }

    let mut handoffs = Vec::new();
    for (where_, url) in [("cluster", cluster.url().to_owned()), ("one server", single)] {
        for (name, wait) in [
            // No local hand-off: every hand-off here goes through Redis and its channel.
            ("pub/sub", WaitStrategy::PubSub { fallback_poll: Duration::from_millis(250), handoff_limit: 0 }),
            (
                "spin",
                WaitStrategy::Spin { initial: Duration::from_millis(1), max: Duration::from_millis(50) },
            ),
        ] {
            let mut runs = Vec::new();
            for run in 1..=benchkit::runs() {
                let rate = hand_offs(&url, wait).await?;
                println!("{where_:>10} {name:>7} run {run}: {rate:>7.0} hand-offs/s");
                runs.push(rate);
            }
            handoffs.push((where_, name, runs));
        }
    }
    drop(cluster);
    write_report(&announcements, &handoffs)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Design {
    /// Before: one channel for every release, every instance subscribed, `PUBLISH`.
    Broadcast,
    /// Now: one channel per key, in its slot, `SPUBLISH`, subscribed by its waiters only.
    Sharded,
}

impl Design {
    const fn name(self) -> &'static str {
        match self {
            Self::Broadcast => "broadcast",
            Self::Sharded => "sharded",
        }
    }
}

#[derive(Debug)]
struct Announced {
    per_second: f64,
    bus_messages: u64,
    received: Vec<usize>,
}

/// Connects a pool (and its subscriber) to `url`.
async fn connect(url: &str) -> anyhow::Result<RedisConnections> {
    RedisConnections::connect(url, 4, Duration::from_secs(5)).await
}

/// Messages every master has sent over the cluster bus for pub/sub so far.
async fn bus_messages(redis: &RedisConnections) -> anyhow::Result<u64> {
    let client = redis.pool.next();
    let mut nodes = client.active_connections();
    nodes.sort_by_key(ToString::to_string);
    nodes.dedup();
    let mut total = 0;
    for node in nodes {
        let info: String = client.with_cluster_node(node).custom(fred::cmd!("CLUSTER"), vec!["INFO"]).await?;
        total += info
            .lines()
            .filter_map(|line| line.strip_prefix("cluster_stats_messages_"))
            .filter(|line| line.starts_with("publish_sent:") || line.starts_with("publishshard_sent:"))
            .filter_map(|line| line.split_once(':')?.1.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(total)
}

async fn announce(url: &str, design: Design) -> anyhow::Result<Announced> {
    let publisher = connect(url).await?;
    let keys: Vec<String> =
        (0..KEYS).map(|_| LockKey::point(domain::user::UserId::generate()).as_str().to_owned()).collect();
    // Three instances; key k is waited for on instance k % 3.
    let mut instances = Vec::new();
    for i in 0..INSTANCES {
        let redis = connect(url).await?;
        match design {
            Design::Broadcast => redis.subscriber.subscribe(OLD_CHANNEL).await?,
            Design::Sharded => {
                for key in keys.iter().skip(i).step_by(INSTANCES) {
                    redis.subscriber.ssubscribe(release_channel(key)).await?;
                }
            }
        }
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut messages = redis.subscriber.message_rx();
        let counted = Arc::clone(&counter);
        let task = tokio::spawn(async move {
            loop {
                // A receiver that falls behind is told how many it missed: they were
                // delivered to this connection all the same.
                let delivered = match messages.recv().await {
                    Ok(_) => 1,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        usize::try_from(missed).unwrap_or(usize::MAX)
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                counted.fetch_add(delivered, std::sync::atomic::Ordering::Relaxed);
            }
        });
        instances.push((redis, counter, task));
    }
    let before = bus_messages(&publisher).await?;
    let started = Instant::now();
    for chunk in (0..RELEASES).collect::<Vec<_>>().chunks(500) {
        let sends = chunk.iter().map(|i| {
            let key = &keys[i % KEYS];
            let client = publisher.pool.next();
            async move {
                match design {
                    Design::Broadcast => client.publish::<i64, _, _>(OLD_CHANNEL, key.as_str()).await,
                    Design::Sharded => client.spublish::<i64, _, _>(release_channel(key), key.as_str()).await,
                }
            }
        });
        for sent in futures::future::join_all(sends).await {
            sent?;
        }
    }
    let elapsed = started.elapsed();
    // Every expected announcement delivered (or a deadline), then read the counters.
    let expected: usize = match design {
        Design::Broadcast => RELEASES * INSTANCES,
        Design::Sharded => RELEASES,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while instances.iter().map(|(_, c, _)| c.load(std::sync::atomic::Ordering::Relaxed)).sum::<usize>()
        < expected
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = bus_messages(&publisher).await?;
    let received = instances.iter().map(|(_, c, _)| c.load(std::sync::atomic::Ordering::Relaxed)).collect();
    for (redis, _, task) in instances {
        task.abort();
        redis.quit().await;
    }
    publisher.quit().await;
    Ok(Announced {
        per_second: RELEASES as f64 / elapsed.as_secs_f64(),
        bus_messages: after - before,
        received,
    })
}

/// Hand-offs per second of one hot key between `WAITERS` tasks over three locks.
async fn hand_offs(url: &str, wait: WaitStrategy) -> anyhow::Result<f64> {
    let mut locks = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..INSTANCES {
        let redis = connect(url).await?;
        let options = LockOptions { wait, ..LockOptions::default() };
        locks.push(RedisLock::new(redis.pool.clone(), Some(&redis.subscriber), options).await?);
        connections.push(redis);
    }
    let key = LockKey::point(domain::user::UserId::generate());
    let started = Instant::now();
    let tasks = (0..WAITERS).map(|i| {
        let (lock, key) = (locks[i % INSTANCES].clone(), key.clone());
        tokio::spawn(async move {
            for _ in 0..TURNS {
                let guard = lock.acquire(&key, WaitPolicy::WaitUpTo(Duration::from_secs(120))).await?;
                guard.release().await?;
            }
            anyhow::Ok(())
        })
    });
    for task in futures::future::join_all(tasks).await {
        task??;
    }
    let rate = (WAITERS * TURNS) as f64 / started.elapsed().as_secs_f64();
    for redis in connections {
        redis.quit().await;
    }
    Ok(rate)
}

fn write_report(
    announcements: &[(Design, Vec<Announced>)],
    handoffs: &[(&str, &str, Vec<f64>)],
) -> anyhow::Result<()> {
    let label = |design: &Design| match design {
        Design::Broadcast => "before: PUBLISH, all subscribed",
        Design::Sharded => "now: SPUBLISH per key",
    };
    let mut bus = Figure::new("bus", format!("Cluster-bus messages for {RELEASES} releases"), "messages");
    let mut delivered =
        Figure::new("delivered", format!("Announcements delivered for {RELEASES} releases"), "messages");
    let mut rate = Figure::new("publish-rate", "Releases announced per second", "releases/s");
    for (design, runs) in announcements {
        bus = bus.with(Series::new(label(design), runs.iter().map(|r| r.bus_messages as f64).collect()));
        delivered = delivered.with(Series::new(
            label(design),
            runs.iter().map(|r| r.received.iter().sum::<usize>() as f64).collect(),
        ));
        rate = rate.with(Series::new(label(design), runs.iter().map(|r| r.per_second).collect()));
    }
    let mut hand = Figure::new(
        "hand-offs",
        format!("One hot key, {WAITERS} tasks over {INSTANCES} locks"),
        "hand-offs/s",
    );
    for (where_, name, runs) in handoffs {
        hand = hand.with(Series::new(format!("{where_}, {name}"), runs.clone()));
    }
    let about = format!(
        "Lock release announcements on a Redis Cluster of three masters on loopback (`deploy/redis-cluster.sh`; \
         `tests/src/bin/bench-cluster.rs`). {RELEASES} releases over {KEYS} keys, {INSTANCES} instances, each key \
         waited for on one: announced the way before this design (`PUBLISH lock:released`, every instance \
         subscribed) and the way now (`SPUBLISH <key>:released`, only the waiting instance subscribed); the \
         cluster's own counters (`CLUSTER INFO`, publish and publishshard messages sent, summed over the \
         masters) count the bus traffic. A `PUBLISH` is forwarded to every other node and reaches every \
         subscribed instance; a `SPUBLISH` stays on the shard that owns the key (its replicas only; none here) \
         and reaches only the instance waiting for that key. Then one hot key's hand-offs through the lock \
         adapter on the cluster and on one server: one key lives on one master whatever the cluster's size, so a \
         cluster spreads different keys, it does not make one key faster. See docs/redis-cluster.md."
    );
    let markdown = benchkit::write(
        "redis-cluster",
        &about,
        &[bus, delivered, rate, hand],
        json!({
            "received_per_instance": announcements.iter().map(|(design, runs)| json!({
                "design": design.name(),
                "runs": runs.iter().map(|r| r.received.clone()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
    )?;
    println!("{markdown}");
    Ok(())
}
