//! The queue contract suite on the MySQL adapter: each test on a database of its own.

use std::sync::{Arc, Mutex};

use adapters_mysql::queue::MySqlQueue;
use application::queue::{QueueConfig, WaitingQueue};
use async_trait::async_trait;
use test_support::queue_contract::{self as contract, MakeQueue};

use super::{Db, number};

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

/// Polls until the row write of a statement waiting for a lock can be seen by a dirty read
/// (`READ UNCOMMITTED`: `written` holds for the number `dirty` answers), failing if `task`
/// finished first or a minute passed. InnoDB writes a row before its secondary index
/// entries, so once the row shows, the statement holds the row's lock while it waits for
/// the gap its index entry goes into: taking the row from the gap's holder then makes a
/// deadlock for certain. (`dirty` reads the primary key: a secondary index mid-update has
/// the old entry marked deleted and the new one not yet written.)
async fn until_written<T>(
    outside: &sea_orm::DatabaseConnection,
    dirty: &str,
    written: impl Fn(i64) -> bool,
    task: &tokio::task::JoinHandle<T>,
) {
    use sea_orm::TransactionTrait as _;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let read = outside
            .begin_with_config(Some(sea_orm::IsolationLevel::ReadUncommitted), None)
            .await
            .expect("a dirty read");
        let n = number(&read, dirty).await.expect("a dirty read");
        read.rollback().await.expect("rollback");
        if written(n) {
            return;
        }
        assert!(!task.is_finished(), "the statement did not wait for the lock");
        assert!(std::time::Instant::now() < deadline, "the statement never wrote its row");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// How many deadlocks the server has resolved since it started (all databases: it only
/// grows, so a test compares it before and after its own).
async fn deadlocks(conn: &sea_orm::DatabaseConnection) -> i64 {
    number(
        conn,
        "SELECT CAST(variable_value AS SIGNED) AS n FROM information_schema.global_status \
         WHERE variable_name = 'INNODB_DEADLOCKS'",
    )
    .await
    .expect("the deadlock count")
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
    let deadlocks_before = deadlocks(&outside).await;
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
    // The insert's row written (it waits for the user index's gap).
    until_written(
        &outside,
        "SELECT COUNT(*) AS n FROM queue_tokens FORCE INDEX (PRIMARY)",
        |n| n == 1,
        &issued,
    )
    .await;
    // The insert's new row, read for update: each now waits for the other, and InnoDB
    // rolls back the lighter one, the insert.
    blocker
        .execute_unprepared("SELECT id FROM queue_tokens FOR UPDATE")
        .await
        .expect("the heavier transaction is not the victim");
    blocker.rollback().await.expect("rollback");

    let issued = issued.await.expect("the issue's task").expect("issued once the deadlock was over");
    assert!(issued.created, "a new token");
    assert!(deadlocks(&outside).await > deadlocks_before, "the server counted a deadlock");
    outside.close().await.ok();
    db.drop_now().await;
}

/// What a status read answered when its seen-mark was made a deadlock's victim, and
/// whether `seen_ms` moved. The order is the one a burst of status reads meets in every
/// instance's admission step (a mark holds the token's row and needs its new
/// `(status, seen_ms)` entry; a step's locking count and admission lock that index's
/// range, and its admission wants the row). Made from outside as for the insert: a heavier transaction holds the gap
/// the mark's new index entry goes into, then takes the token's row, which the mark holds:
/// by a read for update, rolled back after (`admit` false), or by admitting the token and
/// committing, as a step would (`admit` true).
async fn a_status_read_with_its_mark_deadlocked(admit: bool) -> (Option<domain::queue::TokenState>, bool) {
    use domain::queue::AdmitPolicy;
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
    let seen = "SELECT seen_ms AS n FROM queue_tokens FORCE INDEX (PRIMARY)";
    let before = number(&outside, seen).await.expect("seen_ms");

    let deadlocks_before = deadlocks(&outside).await;
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
    // The mark's row written (it waits for the `(status, seen_ms)` index's gap).
    until_written(&outside, seen, |n| n != before, &read).await;
    // The token's row, which the waiting mark holds: each now waits for the other, and
    // InnoDB rolls back the lighter one, the mark.
    let take_the_row = if admit {
        "UPDATE queue_tokens SET status = 'ACTIVE', \
         expires_ms = CAST(UNIX_TIMESTAMP(NOW(6)) * 1000 AS SIGNED) + 600000"
    } else {
        "SELECT id FROM queue_tokens FOR UPDATE"
    };
    blocker.execute_unprepared(take_the_row).await.expect("the heavier transaction is not the victim");
    if admit {
        blocker.commit().await.expect("commit");
    } else {
        blocker.rollback().await.expect("rollback");
    }

    let state = read.await.expect("the read's task").expect("answered once the deadlock was over");
    let moved = number(&outside, seen).await.expect("seen_ms") > before;
    assert!(deadlocks(&outside).await > deadlocks_before, "the server counted a deadlock");
    outside.close().await.ok();
    db.drop_now().await;
    (state, moved)
}

/// A status read whose seen-mark InnoDB chose as a deadlock's victim runs the mark again
/// and answers, instead of 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_read_whose_mark_a_deadlock_rolled_back_is_tried_again() {
    let (state, moved) = a_status_read_with_its_mark_deadlocked(false).await;
    let state = state.expect("the token is live");
    assert_eq!(state.status, domain::queue::QueueStatus::Waiting);
    assert_eq!(state.position, Some(1));
    assert!(moved, "the mark ran again and moved seen_ms");
}

/// When the side that won the deadlock admitted the token, the mark run again finds it
/// no longer waiting, and the read answers what is stored now (active), not the waiting
/// state it read before the mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_read_whose_mark_lost_to_an_admission_answers_active() {
    let (state, moved) = a_status_read_with_its_mark_deadlocked(true).await;
    let state = state.expect("the token is live");
    assert_eq!(state.status, domain::queue::QueueStatus::Active);
    assert_eq!(state.position, None);
    assert!(state.expires_at.is_some(), "an active token's end");
    assert!(!moved, "an active token is not marked seen");
}
