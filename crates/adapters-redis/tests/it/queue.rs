//! The queue contract suite on the Redis adapter: each test on a queue of its own (a
//! unique hash tag; the few keys left are small).

use std::sync::Arc;

use adapters_redis::queue::RedisQueue;
use application::queue::{QueueConfig, WaitingQueue};
use async_trait::async_trait;
use test_support::queue_contract::{self as contract, MakeQueue};

use super::connect;

struct Redis;

#[async_trait]
impl MakeQueue for Redis {
    async fn make(&self, config: QueueConfig) -> Arc<dyn WaitingQueue> {
        let redis = connect().await;
        let name = test_support::unique_prefix("queue");
        Arc::new(RedisQueue::new(redis.pool.clone(), &name, config))
    }
}

macro_rules! contract_tests {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            contract::$case(&Redis).await;
        }
    )*};
}

contract_tests!(
    fifo_positions_and_admission_order,
    reissue_returns_the_same_token_and_place,
    the_cap_holds_when_eight_clients_admit_at_once,
    a_rate_batch_is_admitted_once_per_interval,
    expiry_frees_places_and_moves_the_line_up,
    unknown_and_ended_tokens_are_gone,
    an_abandoned_waiting_token_leaves_the_line,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_of_a_queue_shares_one_hash_tag() {
    let redis = connect().await;
    let name = test_support::unique_prefix("queue");
    let queue = RedisQueue::new(
        redis.pool.clone(),
        &name,
        contract::config(domain::queue::AdmitPolicy::MaxActive { max_active: 1 }),
    );
    queue.issue(domain::user::UserId::generate()).await.expect("issued");
    queue.admit().await.expect("step");
    // KEYS, not one SCAN page: a page covers only part of a large keyspace.
    let keys = super::keys_everywhere(&redis.pool, &format!("*{name}*")).await;
    assert!(!keys.is_empty());
    assert!(keys.iter().all(|k| k.starts_with(&format!("{{{name}}}:"))), "{keys:?}");
}
