use application::clock;
use application::tx::TransactionManager;
use domain::user::{User, UserId, UserName, UserRepository, UserRepositoryError};

use super::Db;

fn kim() -> User {
    User::register(UserName::new("김민지").expect("valid"), clock::now_utc())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_user_is_found_exactly_as_stored() {
    let db = Db::fresh("users").await;
    let user = kim();

    let mut tx = db.txm.begin().await.expect("begin");
    db.users.insert(tx.as_mut(), &user).await.expect("insert");
    tx.commit().await.expect("commit");

    assert_eq!(db.users.find(user.id()).await.expect("find"), Some(user));
    assert_eq!(db.users.find(UserId::generate()).await.expect("find"), None);
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_or_dropped_transaction_leaves_nothing() {
    let db = Db::fresh("users_rb").await;
    let (rolled_back, dropped) = (kim(), kim());

    let mut tx = db.txm.begin().await.expect("begin");
    db.users.insert(tx.as_mut(), &rolled_back).await.expect("insert");
    tx.rollback().await.expect("rollback");
    let mut tx = db.txm.begin().await.expect("begin");
    db.users.insert(tx.as_mut(), &dropped).await.expect("insert");
    drop(tx); // a cancelled request

    assert_eq!(db.users.find(rolled_back.id()).await.expect("find"), None);
    assert_eq!(db.users.find(dropped.id()).await.expect("find"), None);
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserting_the_same_id_twice_is_a_duplicate() {
    let db = Db::fresh("users_dup").await;
    let user = kim();
    let mut tx = db.txm.begin().await.expect("begin");
    db.users.insert(tx.as_mut(), &user).await.expect("insert");
    tx.commit().await.expect("commit");

    let mut tx = db.txm.begin().await.expect("begin");
    let again = db.users.insert(tx.as_mut(), &user).await;

    assert!(matches!(again, Err(UserRepositoryError::Duplicate(id)) if id == user.id()));
    tx.rollback().await.expect("rollback");
    db.drop_now().await;
}
