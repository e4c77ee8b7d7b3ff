//! The queue contract suite on the MySQL adapter: each test on a database of its own.

use std::sync::{Arc, Mutex};

use adapters_mysql::queue::MySqlQueue;
use application::queue::{QueueConfig, WaitingQueue};
use async_trait::async_trait;
use test_support::queue_contract::{self as contract, MakeQueue};

use super::Db;

/// Makes queues on fresh databases, and drops them when the test is done.
#[derive(Default)]
struct MySql(Mutex<Vec<String>>);

#[async_trait]
impl MakeQueue for MySql {
    async fn make(&self, config: QueueConfig) -> Arc<dyn WaitingQueue> {
        let db = Db::fresh("queue").await;
        self.0.lock().expect("lock").push(db.url.clone());
        Arc::new(MySqlQueue::new(db.conn.clone(), config))
    }
}

impl MySql {
    async fn clean_up(self) {
        let urls = self.0.into_inner().expect("lock");
        for url in urls {
            test_support::drop_database(&url).await.ok();
        }
    }
}

macro_rules! contract_tests {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let make = MySql::default();
            contract::$case(&make).await;
            make.clean_up().await;
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
