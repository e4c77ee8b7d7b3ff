//! Payment events on a real Redis Stream: a resent event reaches the group's handlers
//! once, even with two consumers reading concurrently; an event delivered but never
//! acknowledged comes back to that consumer, or, once its consumer is gone past the
//! visibility timeout, to another; trimming drops only what every group acknowledged;
//! with a replica, a publication counts only once the replica has it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use adapters_redis::connection::{DEFAULT_COMMAND_TIMEOUT, RedisConnections};
use adapters_redis::events::{EventConsumer, RedisEventPublisher, ReplicaAcks};
use application::outbox::{EventPublisher, PendingEvent};
use fred::prelude::{ClientLike as _, KeysInterface as _, StreamsInterface as _};
use fred::types::{CustomCommand, InfoKind, Value};
use uuid::Uuid;

use super::connect;

fn event(n: u64) -> PendingEvent {
    PendingEvent {
        seq: n,
        id: Uuid::now_v7(),
        aggregate_id: Uuid::now_v7(),
        event_type: "PaymentCompleted".into(),
        payload: format!(r#"{{"n":{n}}}"#),
        created_at: application::clock::now_utc(),
    }
}

/// The stream's entry ids, oldest first.
async fn entry_ids(redis: &RedisConnections, stream: &str) -> Vec<String> {
    let entries: Vec<(String, HashMap<String, String>)> =
        redis.pool.xrange_values(stream, "-", "+", None).await.expect("XRANGE");
    entries.into_iter().map(|(id, _)| id).collect()
}

/// How many entries `group` has delivered and not had acknowledged.
async fn pending(redis: &RedisConnections, stream: &str, group: &str) -> u64 {
    let summary: Value = redis.pool.xpending(stream, group, ()).await.expect("XPENDING");
    summary.into_array().first().and_then(Value::as_u64).unwrap_or(0)
}

/// Deletes the stream and the groups' records of `events`.
async fn forget(redis: &RedisConnections, stream: &str, groups: &[&str], events: &[PendingEvent]) {
    let mut keys = vec![stream.to_owned()];
    for group in groups {
        keys.extend(events.iter().map(|e| format!("{stream}:processed:{group}:{}", e.id)));
    }
    let _: i64 = redis.pool.del(keys).await.unwrap_or(0);
}

#[tokio::test]
async fn an_event_published_twice_is_processed_once() {
    let redis = connect().await;
    let stream = format!("{}events", test_support::unique_prefix("stream"));
    let publisher = RedisEventPublisher::new(redis.pool.clone(), stream.clone());
    let (first, second) = (event(1), event(2));
    // The relay died after publishing `first` and before marking it sent: it goes again.
    for e in [&first, &second, &first] {
        publisher.publish(e).await.expect("published");
    }
    let consumer = EventConsumer::new(redis.pool.clone(), &stream, "g", "c1");
    consumer.ensure_group().await.expect("group");
    consumer.ensure_group().await.expect("an existing group is fine");

    let seen = consumer.poll(10, Duration::from_millis(10)).await.expect("poll");
    consumer.acknowledge(&seen).await.expect("acknowledged");

    let summary: Vec<(String, bool)> = seen.iter().map(|e| (e.event_id.clone(), e.first_time)).collect();
    assert_eq!(
        summary,
        vec![(first.id.to_string(), true), (second.id.to_string(), true), (first.id.to_string(), false)]
    );
    assert_eq!(seen[0].payload, r#"{"n":1}"#);
    assert!(consumer.poll(10, Duration::from_millis(10)).await.expect("poll").is_empty(), "all acknowledged");
    forget(&redis, &stream, &["g"], &[first, second]).await;
}

#[tokio::test]
async fn an_event_delivered_but_not_acknowledged_comes_back_and_is_not_processed_twice() {
    let redis = connect().await;
    let stream = format!("{}events", test_support::unique_prefix("stream"));
    let publisher = RedisEventPublisher::new(redis.pool.clone(), stream.clone());
    let lost = event(7);
    publisher.publish(&lost).await.expect("published");
    let consumer = EventConsumer::new(redis.pool.clone(), &stream, "g", "c1");
    consumer.ensure_group().await.expect("group");
    // A consumer read it and crashed before acknowledging it.
    let _: Value = redis
        .pool
        .xreadgroup("g", "c1", Some(10), None, false, stream.as_str(), ">")
        .await
        .expect("read without ack");

    let seen = consumer.poll(10, Duration::from_millis(10)).await.expect("poll");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!((seen[0].event_id.clone(), seen[0].first_time), (lost.id.to_string(), true));
    // Handled, then the consumer dies before acknowledging: it comes back, still new.
    let again = consumer.poll(10, Duration::from_millis(10)).await.expect("poll");
    assert_eq!((again[0].event_id.clone(), again[0].first_time), (lost.id.to_string(), true));
    consumer.acknowledge(&again).await.expect("acknowledged");
    assert!(consumer.poll(10, Duration::from_millis(10)).await.expect("poll").is_empty());
    forget(&redis, &stream, &["g"], &[lost]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_of_one_group_handle_each_resent_event_once() {
    let redis = connect().await;
    let stream = format!("{}events", test_support::unique_prefix("stream"));
    let publisher = RedisEventPublisher::new(redis.pool.clone(), stream.clone());
    let events: Vec<PendingEvent> = (0..100).map(event).collect();
    // Every event twice, its copy after the next event (a relay that died between XADD
    // and its commit sends it again): the two copies of an event are often read by
    // different consumers, each before the other acknowledged.
    for (i, e) in events.iter().enumerate() {
        publisher.publish(e).await.expect("published");
        if let Some(previous) = i.checked_sub(1) {
            publisher.publish(&events[previous]).await.expect("resent");
        }
    }
    publisher.publish(&events[events.len() - 1]).await.expect("resent");
    let entries = 2 * events.len();
    EventConsumer::new(redis.pool.clone(), &stream, "g", "c1").ensure_group().await.expect("group");

    let acknowledged = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    let consumers = ["c1", "c2"].map(|name| {
        let consumer = EventConsumer::new(redis.pool.clone(), &stream, "g", name);
        let acknowledged = Arc::clone(&acknowledged);
        tokio::spawn(async move {
            let mut handled = Vec::new();
            while acknowledged.load(Ordering::SeqCst) < entries {
                assert!(Instant::now() < deadline, "the stream was not drained in time");
                let batch = consumer.poll(3, Duration::from_millis(20)).await.expect("poll");
                for event in batch.iter().filter(|e| e.first_time) {
                    // Handling it: the other consumer runs meanwhile.
                    tokio::task::yield_now().await;
                    handled.push(event.event_id.clone());
                }
                consumer.acknowledge(&batch).await.expect("acknowledged");
                acknowledged.fetch_add(batch.len(), Ordering::SeqCst);
            }
            handled
        })
    });

    let mut times: HashMap<String, usize> = HashMap::new();
    let mut per_consumer = Vec::new();
    for consumer in consumers {
        let handled = consumer.await.expect("a consumer task");
        per_consumer.push(handled.len());
        for id in handled {
            *times.entry(id).or_default() += 1;
        }
    }
    let repeated: Vec<(&String, &usize)> = times.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "handled more than once: {repeated:?} (handled per consumer: {per_consumer:?})"
    );
    let expected: HashSet<String> = events.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(times.keys().cloned().collect::<HashSet<_>>(), expected, "every event handled");
    assert_eq!(pending(&redis, &stream, "g").await, 0, "every entry acknowledged");
    forget(&redis, &stream, &["g"], &events).await;
}

#[tokio::test]
async fn entries_of_a_consumer_that_never_came_back_are_taken_over_and_handled_once() {
    let visibility = Duration::from_millis(200);
    let redis = connect().await;
    let stream = format!("{}events", test_support::unique_prefix("stream"));
    let publisher = RedisEventPublisher::new(redis.pool.clone(), stream.clone());
    let events: Vec<PendingEvent> = (0..5).map(event).collect();
    for e in &events {
        publisher.publish(e).await.expect("published");
    }
    let dead =
        EventConsumer::new(redis.pool.clone(), &stream, "g", "dead").with_visibility_timeout(visibility);
    dead.ensure_group().await.expect("group");
    let read = dead.poll(10, Duration::from_millis(10)).await.expect("poll");
    assert_eq!(read.len(), events.len(), "{read:?}");
    assert!(read.iter().all(|e| e.first_time), "{read:?}");
    // It dies here: it never handles, marks or acknowledges them, and never comes back.
    drop(dead);

    // A consumer whose visibility timeout (30 s) has not run out leaves them alone.
    let patient = EventConsumer::new(redis.pool.clone(), &stream, "g", "patient");
    assert!(patient.poll(10, Duration::from_millis(10)).await.expect("poll").is_empty());

    let heir =
        EventConsumer::new(redis.pool.clone(), &stream, "g", "heir").with_visibility_timeout(visibility);
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut handled, mut duplicates) = (Vec::new(), Vec::new());
    while handled.len() < events.len() {
        assert!(
            Instant::now() < deadline,
            "only {} of the dead consumer's {} events were taken over",
            handled.len(),
            events.len()
        );
        let batch = heir.poll(10, Duration::from_millis(50)).await.expect("poll");
        for e in &batch {
            if e.first_time {
                handled.push(e.event_id.clone());
            } else {
                duplicates.push(e.event_id.clone());
            }
        }
        heir.acknowledge(&batch).await.expect("acknowledged");
    }
    handled.sort();
    let mut expected: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
    expected.sort();
    assert_eq!(handled, expected, "each taken over and handled once");
    assert!(duplicates.is_empty(), "{duplicates:?}");
    assert_eq!(pending(&redis, &stream, "g").await, 0);
    // Nothing is left for anyone, the dead consumer's name included.
    let back =
        EventConsumer::new(redis.pool.clone(), &stream, "g", "dead").with_visibility_timeout(visibility);
    assert!(back.poll(10, Duration::from_millis(10)).await.expect("poll").is_empty());
    assert!(heir.poll(10, Duration::from_millis(10)).await.expect("poll").is_empty());
    forget(&redis, &stream, &["g"], &events).await;
}

#[tokio::test]
async fn a_consumer_that_keeps_its_batch_while_handling_it_is_not_taken_over() {
    // Handling outlasts the visibility timeout several times over; the consumer keeps its
    // batch at a fraction of it, so another consumer never gets the events.
    let visibility = Duration::from_secs(3);
    let redis = connect().await;
    let stream = format!("{}events", test_support::unique_prefix("stream"));
    let publisher = RedisEventPublisher::new(redis.pool.clone(), stream.clone());
    let events: Vec<PendingEvent> = (0..3).map(event).collect();
    for e in &events {
        publisher.publish(e).await.expect("published");
    }
    let slow =
        EventConsumer::new(redis.pool.clone(), &stream, "g", "slow").with_visibility_timeout(visibility);
    slow.ensure_group().await.expect("group");
    let batch = slow.poll(10, Duration::from_millis(10)).await.expect("poll");
    assert_eq!(batch.len(), events.len());
    let other =
        EventConsumer::new(redis.pool.clone(), &stream, "g", "other").with_visibility_timeout(visibility);
    let handling_ends = Instant::now() + visibility * 2;
    while Instant::now() < handling_ends {
        slow.keep(&batch).await.expect("kept");
        let seen = other.poll(10, Duration::from_millis(200)).await.expect("poll");
        assert!(seen.iter().all(|e| !e.first_time), "taken over while kept: {seen:?}");
        other.acknowledge(&seen).await.expect("acknowledged");
    }
    slow.keep(&batch).await.expect("still ours");
    slow.acknowledge(&batch).await.expect("acknowledged");
    assert_eq!(pending(&redis, &stream, "g").await, 0);
    forget(&redis, &stream, &["g"], &events).await;
}

#[tokio::test]
async fn trimming_drops_only_entries_every_group_acknowledged() {
    let redis = connect().await;
    let stream = format!("{}events", test_support::unique_prefix("stream"));
    let publisher = RedisEventPublisher::new(redis.pool.clone(), stream.clone());
    assert_eq!(publisher.trim().await.expect("trim"), 0, "no stream yet");
    let events: Vec<PendingEvent> = (0..10).map(event).collect();
    for e in &events {
        publisher.publish(e).await.expect("published");
    }
    let ids = entry_ids(&redis, &stream).await;
    assert_eq!(ids.len(), 10);
    assert_eq!(publisher.trim().await.expect("trim"), 0, "no group: nothing goes");

    let slow = EventConsumer::new(redis.pool.clone(), &stream, "slow", "c");
    let fast = EventConsumer::new(redis.pool.clone(), &stream, "fast", "c");
    slow.ensure_group().await.expect("group");
    fast.ensure_group().await.expect("group");
    assert_eq!(publisher.trim().await.expect("trim"), 0, "groups that read nothing keep everything");
    // `fast` reads all ten and acknowledges eight; `slow` reads six and acknowledges three.
    let fast_read = fast.poll(10, Duration::from_millis(10)).await.expect("poll");
    assert_eq!(fast_read.len(), 10);
    fast.acknowledge(&fast_read[..8]).await.expect("acknowledged");
    let slow_read = slow.poll(6, Duration::from_millis(10)).await.expect("poll");
    assert_eq!(slow_read.len(), 6);
    slow.acknowledge(&slow_read[..3]).await.expect("acknowledged");

    // `slow`'s oldest pending entry bounds what goes.
    assert_eq!(publisher.trim().await.expect("trim"), 3);
    assert_eq!(entry_ids(&redis, &stream).await, ids[3..]);

    // With nothing pending, `slow` is bounded by the first entry it was never delivered.
    slow.acknowledge(&slow_read[3..]).await.expect("acknowledged");
    assert_eq!(publisher.trim().await.expect("trim"), 3);
    assert_eq!(entry_ids(&redis, &stream).await, ids[6..]);
    // `slow` has four to read, `fast` two pending: nothing more goes.
    assert_eq!(publisher.trim().await.expect("trim"), 0);
    assert_eq!(entry_ids(&redis, &stream).await, ids[6..]);

    // Once both groups are through, everything goes.
    let rest = slow.poll(10, Duration::from_millis(10)).await.expect("poll");
    assert_eq!(rest.iter().map(|e| e.entry.clone()).collect::<Vec<_>>(), ids[6..]);
    slow.acknowledge(&rest).await.expect("acknowledged");
    assert_eq!(publisher.trim().await.expect("trim"), 2, "`fast` still has its last two pending");
    assert_eq!(entry_ids(&redis, &stream).await, ids[8..]);
    fast.acknowledge(&fast_read[8..]).await.expect("acknowledged");
    assert_eq!(publisher.trim().await.expect("trim"), 2);
    assert!(entry_ids(&redis, &stream).await.is_empty());
    forget(&redis, &stream, &["slow", "fast"], &events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_replica_a_publication_counts_once_the_replica_has_it() {
    let primary = test_support::PrivateRedis::start().expect("a private redis-server");
    let mut replica = test_support::PrivateRedis::start().expect("a private redis-server");
    let to_primary =
        RedisConnections::connect(&primary.url(), 1, DEFAULT_COMMAND_TIMEOUT).await.expect("primary");
    let to_replica =
        RedisConnections::connect(&replica.url(), 1, DEFAULT_COMMAND_TIMEOUT).await.expect("replica");
    let port = primary.url().rsplit(':').next().expect("a port").to_owned();
    let config = CustomCommand::new_static("CONFIG", None::<u16>, false);
    // No files: the primary streams its copy at once, the replica loads it from the socket.
    let _: Value = to_primary
        .pool
        .next()
        .custom(config.clone(), vec!["SET", "repl-diskless-sync", "yes", "repl-diskless-sync-delay", "0"])
        .await
        .expect("CONFIG SET on the primary");
    let _: Value = to_replica
        .pool
        .next()
        .custom(config, vec!["SET", "repl-diskless-load", "swapdb"])
        .await
        .expect("CONFIG SET on the replica");
    let _: Value = to_replica
        .pool
        .next()
        .custom(
            CustomCommand::new_static("REPLICAOF", None::<u16>, false),
            vec!["127.0.0.1".to_owned(), port],
        )
        .await
        .expect("REPLICAOF");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info: String = to_primary.pool.next().info(Some(InfoKind::Replication)).await.expect("INFO");
        if info.contains("state=online") {
            break;
        }
        assert!(Instant::now() < deadline, "the replica never came online:\n{info}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let publisher = RedisEventPublisher::new(to_primary.pool.clone(), "events")
        .with_replica_ack_timeout(Duration::from_secs(5));
    publisher.publish(&event(1)).await.expect("acknowledged by the replica");
    let on_replica: u64 = to_replica.pool.xlen("events").await.expect("XLEN on the replica");
    assert_eq!(on_replica, 1, "publish answered before the replica had the event");
    let strict = RedisEventPublisher::new(to_primary.pool.clone(), "events")
        .with_replica_acks(ReplicaAcks::AtLeast(1))
        .with_replica_ack_timeout(Duration::from_secs(5));
    strict.publish(&event(2)).await.expect("acknowledged by the replica");

    to_replica.quit().await;
    replica.kill();
    // Requiring a replica: no publication counts while none answers (the relay keeps
    // the row and sends it again later).
    assert!(strict.publish(&event(3)).await.is_err(), "published with no replica to acknowledge it");
    // Requiring every replica online: one that is gone is no longer waited for (after at
    // most one failed publication, made with a stale count).
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(error) = publisher.publish(&event(4)).await {
        assert!(Instant::now() < deadline, "still waiting for a replica that is gone: {error:#}");
    }
    to_primary.quit().await;
}
