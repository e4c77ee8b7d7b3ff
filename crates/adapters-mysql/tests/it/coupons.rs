//! Coupon campaigns and coupons on the real database, without the Redis fast path: the
//! SQL guards alone must keep a campaign to its quantity and a user to one coupon.

use adapters_mysql::coupons::MySqlCouponRepository;
use application::clock;
use application::tx::TransactionManager;
use domain::coupon::{Campaign, CampaignId, Coupon, CouponRepository, CouponRepositoryError, NewCampaign};
use domain::user::{User, UserId, UserName, UserRepository};
use sea_orm::{ConnectionTrait as _, DbBackend, Statement};
use time::{Duration, OffsetDateTime};

use super::Db;

fn repository(db: &Db) -> MySqlCouponRepository {
    MySqlCouponRepository::new(db.conn.clone())
}

/// `n` users, stored through the users repository.
async fn users(db: &Db, n: usize) -> Vec<UserId> {
    let mut tx = db.txm.begin().await.expect("begin");
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let user = User::register(UserName::new(&format!("fan {i}")).expect("valid"), clock::now_utc());
        db.users.insert(tx.as_mut(), &user).await.expect("user");
        ids.push(user.id());
    }
    tx.commit().await.expect("commit");
    ids
}

/// A campaign of `quantity` coupons issuing from `now + opens` until `now + closes`, not
/// stored.
fn campaign_at(now: OffsetDateTime, quantity: u32, opens: Duration, closes: Duration) -> Campaign {
    Campaign::new(
        NewCampaign {
            name: "Early birds".into(),
            discount: 5_000,
            quantity,
            issue_opens_at: now + opens,
            issue_closes_at: now + closes,
            valid_until: now + closes + Duration::days(7),
        },
        now,
    )
    .expect("valid")
}

/// A stored campaign of `quantity` coupons, issuing now.
async fn open_campaign(repo: &MySqlCouponRepository, quantity: u32) -> Campaign {
    let campaign = campaign_at(clock::now_utc(), quantity, -Duration::hours(1), Duration::hours(1));
    repo.create_campaign(&campaign).await.expect("created");
    campaign
}

/// Issues `user` a coupon of `campaign` in a transaction of its own, committed when the
/// insert succeeds and rolled back when it is refused, as the use case does.
async fn issue(
    db: &Db,
    repo: &MySqlCouponRepository,
    campaign: &Campaign,
    user: UserId,
    at: OffsetDateTime,
) -> Result<Coupon, CouponRepositoryError> {
    let coupon = Coupon::issue(campaign, user, at);
    let mut tx = db.txm.begin().await.expect("begin");
    match repo.insert(tx.as_mut(), &coupon).await {
        Ok(()) => {
            tx.commit().await.expect("commit");
            Ok(coupon)
        }
        Err(refused) => {
            tx.rollback().await.expect("rollback");
            Err(refused)
        }
    }
}

/// The campaign's `issued` counter, as committed.
async fn counter(db: &Db, campaign: CampaignId) -> u32 {
    db.conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            "SELECT issued FROM coupon_campaigns WHERE id = ?",
            [(*campaign.as_uuid()).into()],
        ))
        .await
        .expect("read")
        .expect("row")
        .try_get("", "issued")
        .expect("issued")
}

/// How many coupon rows the campaign has, as committed.
async fn coupon_rows(db: &Db, campaign: CampaignId) -> i64 {
    db.conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            "SELECT COUNT(*) AS n FROM coupons WHERE campaign_id = ?",
            [(*campaign.as_uuid()).into()],
        ))
        .await
        .expect("count")
        .expect("row")
        .try_get("", "n")
        .expect("n")
}

fn sorted(mut ids: Vec<UserId>) -> Vec<UserId> {
    ids.sort_unstable();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_campaign_reads_back_exactly_as_stored() {
    let db = Db::fresh("coupon_campaign").await;
    let repo = repository(&db);

    let campaign = open_campaign(&repo, 100).await;

    assert_eq!(repo.campaign(campaign.id).await.expect("read"), Some(campaign.clone()));
    assert_eq!(repo.campaign(CampaignId::generate()).await.expect("read"), None);
    assert_eq!(counter(&db, campaign.id).await, 0, "nothing issued yet");
    assert!(repo.issued(campaign.id).await.expect("issued").is_empty());
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coupons_are_issued_up_to_the_quantity_and_then_sold_out() {
    let db = Db::fresh("coupon_sold_out").await;
    let repo = repository(&db);
    let campaign = open_campaign(&repo, 3).await;
    let people = users(&db, 4).await;

    for user in &people[..3] {
        issue(&db, &repo, &campaign, *user, clock::now_utc()).await.expect("issued");
    }
    let late = issue(&db, &repo, &campaign, people[3], clock::now_utc()).await;

    assert!(matches!(late, Err(CouponRepositoryError::SoldOut)), "{late:?}");
    assert_eq!(counter(&db, campaign.id).await, 3);
    assert_eq!(coupon_rows(&db, campaign.id).await, 3);
    assert_eq!(sorted(repo.issued(campaign.id).await.expect("issued")), sorted(people[..3].to_vec()));
    assert!(!repo.exists(campaign.id, people[3]).await.expect("exists"));
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_coupon_for_one_user_is_refused_and_its_count_rolled_back() {
    let db = Db::fresh("coupon_twice").await;
    let repo = repository(&db);
    let campaign = open_campaign(&repo, 5).await;
    let user = users(&db, 1).await[0];
    let first = issue(&db, &repo, &campaign, user, clock::now_utc()).await.expect("issued");

    // A new coupon (a new id) for the same user: only the unique key tells them apart.
    let again = issue(&db, &repo, &campaign, user, clock::now_utc()).await;

    assert!(matches!(again, Err(CouponRepositoryError::AlreadyIssued)), "{again:?}");
    assert_eq!(counter(&db, campaign.id).await, 1, "the second count went with its transaction");
    assert_eq!(coupon_rows(&db, campaign.id).await, 1);
    assert_eq!(repo.of_user(user, 10).await.expect("coupons"), vec![first]);
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coupon_of_a_campaign_never_stored_is_an_unexpected_error() {
    let db = Db::fresh("coupon_nocampaign").await;
    let repo = repository(&db);
    let user = users(&db, 1).await[0];
    let unknown = campaign_at(clock::now_utc(), 10, -Duration::hours(1), Duration::hours(1));

    let refused = issue(&db, &repo, &unknown, user, clock::now_utc()).await;

    assert!(matches!(refused, Err(CouponRepositoryError::Unexpected(_))), "{refused:?}");
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_and_exists_name_exactly_the_holders_of_that_campaign() {
    let db = Db::fresh("coupon_holders").await;
    let repo = repository(&db);
    let (campaign, other_campaign) = (open_campaign(&repo, 10).await, open_campaign(&repo, 10).await);
    let people = users(&db, 3).await;
    for user in &people[..2] {
        issue(&db, &repo, &campaign, *user, clock::now_utc()).await.expect("issued");
    }
    issue(&db, &repo, &other_campaign, people[2], clock::now_utc()).await.expect("issued");

    assert_eq!(sorted(repo.issued(campaign.id).await.expect("issued")), sorted(people[..2].to_vec()));
    assert_eq!(repo.issued(other_campaign.id).await.expect("issued"), vec![people[2]]);
    assert!(repo.exists(campaign.id, people[0]).await.expect("exists"));
    assert!(repo.exists(campaign.id, people[1]).await.expect("exists"));
    assert!(!repo.exists(campaign.id, people[2]).await.expect("exists"), "a holder of another campaign");
    assert!(!repo.exists(other_campaign.id, people[0]).await.expect("exists"));
    assert!(!repo.exists(CampaignId::generate(), people[0]).await.expect("exists"));
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_coupons_come_newest_first_and_limited() {
    let db = Db::fresh("coupon_of_user").await;
    let repo = repository(&db);
    let people = users(&db, 2).await;
    let (user, other) = (people[0], people[1]);
    let start = clock::now_utc();
    let mut mine = Vec::new();
    for n in 0..3 {
        let campaign = open_campaign(&repo, 10).await;
        // Issued in the order of the campaigns, a second apart, whatever the clock does.
        mine.push(issue(&db, &repo, &campaign, user, start + Duration::seconds(n)).await.expect("issued"));
        if n == 1 {
            issue(&db, &repo, &campaign, other, start + Duration::seconds(n)).await.expect("issued");
        }
    }
    mine.reverse();

    assert_eq!(repo.of_user(user, 10).await.expect("coupons"), mine);
    assert_eq!(repo.of_user(user, 2).await.expect("coupons"), mine[..2].to_vec());
    assert_eq!(repo.of_user(other, 10).await.expect("coupons").len(), 1);
    assert!(repo.of_user(UserId::generate(), 10).await.expect("coupons").is_empty());
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_campaigns_are_those_issuing_now_or_closed_within_the_grace() {
    let db = Db::fresh("coupon_recent").await;
    let repo = repository(&db);
    let now = clock::now_utc();
    let grace = Duration::minutes(1);
    let open = campaign_at(now, 10, -Duration::hours(1), Duration::hours(1));
    let closed_lately = campaign_at(now, 10, -Duration::hours(2), -Duration::seconds(30));
    let closed_long_ago = campaign_at(now, 10, -Duration::hours(2), -Duration::minutes(2));
    let not_open_yet = campaign_at(now, 10, Duration::minutes(1), Duration::hours(1));
    for campaign in [&open, &closed_lately, &closed_long_ago, &not_open_yet] {
        repo.create_campaign(campaign).await.expect("created");
    }

    let recent = repo.recent_campaigns(now, grace).await.expect("recent");

    assert_eq!(recent, vec![closed_lately, open], "by closing time");
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_concurrent_inserts_for_twenty_coupons_issue_exactly_twenty() {
    let db = Db::fresh("coupon_race").await;
    let repo = repository(&db);
    let campaign = open_campaign(&repo, 20).await;
    let racers = users(&db, 60).await;

    // Each insert in a transaction of its own, all at once: nothing but the counter's
    // conditional update stands between them and a 21st coupon.
    let results = futures::future::join_all(
        racers.iter().map(|user| issue(&db, &repo, &campaign, *user, clock::now_utc())),
    )
    .await;

    let issued: Vec<UserId> = results.iter().filter_map(|r| r.as_ref().ok()).map(|c| c.user_id).collect();
    assert_eq!(issued.len(), 20, "{results:?}");
    assert!(
        results.iter().filter(|r| r.is_err()).all(|r| matches!(r, Err(CouponRepositoryError::SoldOut))),
        "{results:?}"
    );
    assert_eq!(counter(&db, campaign.id).await, 20);
    assert_eq!(coupon_rows(&db, campaign.id).await, 20);
    assert_eq!(sorted(repo.issued(campaign.id).await.expect("issued")), sorted(issued));
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_itself_refuses_a_count_past_the_quantity_and_an_empty_window() {
    let db = Db::fresh("coupon_checks").await;
    let repo = repository(&db);
    let campaign = open_campaign(&repo, 2).await;

    let past = db
        .conn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            "UPDATE coupon_campaigns SET issued = 3 WHERE id = ?",
            [(*campaign.id.as_uuid()).into()],
        ))
        .await;
    let empty = db
        .conn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            "UPDATE coupon_campaigns SET issue_closes_at = issue_opens_at WHERE id = ?",
            [(*campaign.id.as_uuid()).into()],
        ))
        .await;

    assert!(past.is_err(), "issued past the quantity was accepted");
    assert!(empty.is_err(), "an empty issue window was accepted");
    assert_eq!(repo.campaign(campaign.id).await.expect("read"), Some(campaign));
    db.drop_now().await;
}
