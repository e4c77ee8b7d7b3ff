//! Payment events on a real Redis Stream: a resent event reaches the consumer's handler
//! once, and an event delivered but never acknowledged (a consumer that crashed) comes
//! back to that consumer until it is acknowledged.

use std::time::Duration;

use adapters_redis::events::{EventConsumer, RedisEventPublisher};
use application::outbox::{EventPublisher, PendingEvent};
use fred::prelude::{KeysInterface as _, StreamsInterface as _};
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
    let _: i64 = redis.pool.del(&stream).await.unwrap_or(0);
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
    let _: fred::types::Value = redis
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
    let _: i64 = redis.pool.del(&stream).await.unwrap_or(0);
}
