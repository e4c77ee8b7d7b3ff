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

/// A transaction of its own, made heavier than any one-row statement (fifty rows written),
/// so that InnoDB picks the other side as a deadlock's victim.
async fn heavy_transaction(outside: &sea_orm::DatabaseConnection) -> sea_orm::DatabaseTransaction {
    use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
    let blocker = outside.begin().await.expect("begin");
    for _ in 0..50 {
        blocker
            .execute_unprepared(&format!(
                "INSERT INTO users (id, name, created_at) VALUES (UNHEX('{}'), 'weight', NOW(6))",
                uuid::Uuid::now_v7().simple()
            ))
            .await
            .expect("a row");
    }
    blocker
}

/// Polls until a statement starting with `prefix` runs (waits for a lock) on the test's
/// database, failing if `task` finished first or a minute passed.
async fn until_waiting<T>(
    outside: &sea_orm::DatabaseConnection,
    prefix: &str,
    task: &tokio::task::JoinHandle<T>,
) {
    use sea_orm::ConnectionTrait as _;
    let waiting = format!(
        "SELECT COUNT(*) AS n FROM information_schema.processlist WHERE db = DATABASE() AND info LIKE '{prefix}%'"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let n = outside
            .query_one_raw(sea_orm::Statement::from_string(sea_orm::DbBackend::MySql, waiting.clone()))
            .await
            .expect("query")
            .expect("a row")
            .try_get::<i64>("", "n")
            .expect("a count");
        if n > 0 {
            return;
        }
        assert!(!task.is_finished(), "{prefix}... did not wait for the lock");
        assert!(std::time::Instant::now() < deadline, "{prefix}... never waited for the lock");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// An issue whose insert InnoDB chose as a deadlock's victim (rolled back whole) is tried
/// again and issues the token, instead of failing the request with 503. The deadlock is
/// made from outside: a heavier transaction holds the gap the insert's user index entry
/// needs, then reads the insert's new row for update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issue_a_deadlock_rolled_back_is_tried_again() {
    use domain::queue::AdmitPolicy;
    use domain::user::UserId;
    use sea_orm::ConnectionTrait as _;

    let db = Db::fresh("queue_deadlock").await;
    let queue = Arc::new(MySqlQueue::new(
        db.conn.clone(),
        test_support::queue_contract::config(AdmitPolicy::MaxActive { max_active: 0 }),
    ));
    let outside = sea_orm::Database::connect(&db.url).await.expect("a connection of its own");
    let blocker = heavy_transaction(&outside).await;
    // Every gap of the user index (the table is empty: up to its supremum).
    blocker
        .execute_unprepared("SELECT id FROM queue_tokens WHERE user_id >= X'00' FOR UPDATE")
        .await
        .expect("gap locked");

    let issued = {
        let queue = Arc::clone(&queue);
        tokio::spawn(async move { queue.issue(UserId::from_uuid(uuid::Uuid::now_v7())).await })
    };
    until_waiting(&outside, "INSERT INTO queue_tokens", &issued).await;
    // The insert's new row, read for update: each now waits for the other, and InnoDB
    // rolls back the lighter one, the insert.
    blocker
        .execute_unprepared("SELECT id FROM queue_tokens FOR UPDATE")
        .await
        .expect("the heavier transaction is not the victim");
    blocker.rollback().await.expect("rollback");

    let issued = issued.await.expect("the issue's task").expect("issued once the deadlock was over");
    assert!(issued.created, "a new token");
    outside.close().await.ok();
    db.drop_now().await;
}

/// A status read whose seen-mark InnoDB chose as a deadlock's victim runs the mark again
/// and answers, instead of 503: the order a burst of status reads meets in every
/// instance's admission step (the token's row, then its `(status, seen_ms)` entry; the
/// step's cleanup locks that index first). Made from outside as above: a heavier
/// transaction holds the gap the mark's new index entry goes into, then reads the token's
/// row, which the mark has locked, for update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_read_whose_mark_a_deadlock_rolled_back_is_tried_again() {
    use domain::queue::{AdmitPolicy, QueueStatus};
    use domain::user::UserId;
    use sea_orm::ConnectionTrait as _;

    let db = Db::fresh("queue_mark_deadlock").await;
    let queue = Arc::new(MySqlQueue::new(
        db.conn.clone(),
        test_support::queue_contract::config(AdmitPolicy::MaxActive { max_active: 0 }),
    ));
    let token = queue.issue(UserId::generate()).await.expect("issued").state.token;
    let outside = sea_orm::Database::connect(&db.url).await.expect("a connection of its own");
    // Seen a second ago, so that the mark moves the index entry (a mark within the same
    // millisecond would change nothing and lock no gap).
    outside
        .execute_unprepared("UPDATE queue_tokens SET seen_ms = seen_ms - 1000")
        .await
        .expect("seen earlier");
    let seen = |conn: &sea_orm::DatabaseConnection| {
        let conn = conn.clone();
        async move {
            conn.query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::MySql,
                "SELECT seen_ms FROM queue_tokens",
            ))
            .await
            .expect("query")
            .expect("the token")
            .try_get::<i64>("", "seen_ms")
            .expect("seen_ms")
        }
    };
    let before = seen(&outside).await;

    let blocker = heavy_transaction(&outside).await;
    // The gap after the token's `(WAITING, seen_ms)` entry, up to the supremum, and not the
    // entry itself or its row.
    blocker
        .execute_unprepared(&format!(
            "SELECT id FROM queue_tokens FORCE INDEX (ix_queue_tokens_status_seen) \
             WHERE status = 'WAITING' AND seen_ms > {before} FOR UPDATE"
        ))
        .await
        .expect("gap locked");

    let read = {
        let queue = Arc::clone(&queue);
        tokio::spawn(async move { queue.state(token).await })
    };
    until_waiting(&outside, "UPDATE queue_tokens SET seen_ms", &read).await;
    // The token's row, which the waiting mark holds: each now waits for the other, and
    // InnoDB rolls back the lighter one, the mark.
    blocker
        .execute_unprepared("SELECT id FROM queue_tokens FOR UPDATE")
        .await
        .expect("the heavier transaction is not the victim");
    blocker.rollback().await.expect("rollback");

    let state = read.await.expect("the read's task").expect("answered once the deadlock was over");
    let state = state.expect("the token is live");
    assert_eq!(state.status, QueueStatus::Waiting);
    assert_eq!(state.position, Some(1));
    assert!(seen(&outside).await > before, "the mark ran again and moved seen_ms");
    outside.close().await.ok();
    db.drop_now().await;
}
