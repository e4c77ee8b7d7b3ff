//! The coupon gate on a real Redis: the race for the last coupons, one per user, loads
//! that never undo decisions, give-backs that happen once, the window on Redis's clock, a
//! lost campaign, and the keys of a campaign in one hash slot.

use std::collections::HashSet;
use std::time::Duration;

use adapters_redis::coupons::RedisCouponGate;
use application::coupons::{CouponGate, Decision};
use domain::coupon::{Campaign, CampaignId, CouponId};
use domain::user::UserId;
use fred::prelude::KeysInterface as _;
use time::OffsetDateTime;

use super::connect;

async fn gate(prefix: &str) -> RedisCouponGate {
    RedisCouponGate::with_prefix(connect().await.pool, prefix.to_owned())
}

/// A campaign of `quantity` coupons, issuing from an hour ago until an hour from now.
fn campaign(quantity: u32) -> Campaign {
    let now = OffsetDateTime::now_utc();
    Campaign {
        id: CampaignId::generate(),
        name: "Early birds".into(),
        discount: 1_000,
        quantity,
        issue_opens_at: now - time::Duration::HOUR,
        issue_closes_at: now + time::Duration::HOUR,
        valid_until: now + time::Duration::DAY,
        created_at: now,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_coupons_go_to_distinct_users_and_the_stock_never_goes_below_zero() {
    let prefix = test_support::unique_prefix("coupons");
    // Two instances: each its own connections.
    let gates = [gate(&prefix).await, gate(&prefix).await];
    let campaign = campaign(50);
    let holders = [UserId::generate(), UserId::generate()];
    gates[0].load(&campaign, &holders).await.expect("load");
    assert_eq!(gates[0].remaining(campaign.id).await.expect("remaining"), Some(48));
    for holder in holders {
        assert_eq!(
            ask(&gates[1], &campaign, holder).await.0,
            Decision::AlreadyIssued,
            "a user loaded as holding a coupon"
        );
    }
    // 300 users, the first 200 of whom ask twice.
    let users: Vec<UserId> = (0..300).map(|_| UserId::generate()).collect();

    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let (gate, campaign, user) = (gates[i % 2].clone(), campaign.clone(), users[i % users.len()]);
            tokio::spawn(async move { (user, ask(&gate, &campaign, user).await.0) })
        })
        .collect();
    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        answers.push(task.await.expect("task ran"));
    }

    let winners: Vec<UserId> =
        answers.iter().filter(|(_, decision)| *decision == Decision::Issued).map(|(user, _)| *user).collect();
    assert_eq!(winners.len(), 48, "exactly the stock is issued");
    let distinct: HashSet<UserId> = winners.iter().copied().collect();
    assert_eq!(distinct.len(), 48, "no user is issued twice");
    assert!(
        answers.iter().all(|(_, decision)| matches!(
            decision,
            Decision::Issued | Decision::SoldOut | Decision::AlreadyIssued
        )),
        "{answers:?}"
    );
    assert_eq!(gates[0].remaining(campaign.id).await.expect("remaining"), Some(0));
    let pending: HashSet<UserId> = gates[1]
        .pending(campaign.id, Duration::ZERO)
        .await
        .expect("pending")
        .into_iter()
        .map(|(user, _)| user)
        .collect();
    assert_eq!(pending, distinct, "every winner is pending until confirmed");
}

/// One request of `user`: a fresh decision id, as every request has.
async fn ask(gate: &RedisCouponGate, campaign: &Campaign, user: UserId) -> (Decision, CouponId) {
    let decision = CouponId::generate();
    (gate.decide(campaign, user, decision).await.expect("decided"), decision)
}

#[tokio::test]
async fn a_decision_sent_twice_is_issued_once_and_answered_the_same() {
    let gate = gate(&test_support::unique_prefix("coupons")).await;
    let campaign = campaign(5);
    let user = UserId::generate();
    gate.load(&campaign, &[]).await.expect("load");
    let (decided, id) = ask(&gate, &campaign, user).await;
    assert_eq!(decided, Decision::Issued);

    // The client resent the script after losing its answer: still the winner, once.
    assert_eq!(gate.decide(&campaign, user, id).await.expect("decided"), Decision::Issued);
    assert_eq!(gate.remaining(campaign.id).await.expect("remaining"), Some(4));
    // Another request of the same user is another decision: refused.
    assert_eq!(ask(&gate, &campaign, user).await.0, Decision::AlreadyIssued);
    // A confirmation or a sold-out naming another decision leaves this one alone.
    gate.confirm(campaign.id, user, CouponId::generate()).await.expect("confirm");
    gate.sold_out(campaign.id, user, CouponId::generate()).await.expect("sold out");
    assert_eq!(gate.pending(campaign.id, Duration::ZERO).await.expect("pending"), vec![(user, id)]);
}

#[tokio::test]
async fn a_second_load_changes_nothing() {
    let redis = connect().await;
    let gate = RedisCouponGate::with_prefix(redis.pool.clone(), test_support::unique_prefix("coupons"));
    let campaign = campaign(10);
    let user = UserId::generate();
    gate.load(&campaign, &[]).await.expect("load");
    assert_eq!(ask(&gate, &campaign, user).await.0, Decision::Issued);

    gate.load(&campaign, &[]).await.expect("load again");

    assert_eq!(gate.remaining(campaign.id).await.expect("remaining"), Some(9), "the decision stands");
    assert_eq!(ask(&gate, &campaign, user).await.0, Decision::AlreadyIssued);
    // Every key goes a day after issuing closes.
    let day_after =
        (campaign.issue_closes_at + time::Duration::DAY - OffsetDateTime::now_utc()).whole_milliseconds();
    for key in gate.keys(campaign.id) {
        let ttl: i64 = redis.pool.pttl(key.as_str()).await.expect("PTTL");
        // Within a minute: the test's clock and Redis's may differ a little.
        assert!((i128::from(ttl) - day_after).abs() < 60_000, "{key}: {ttl} ms, expected {day_after}");
    }
}

#[tokio::test]
async fn a_load_in_several_batches_counts_every_holder() {
    let gate = gate(&test_support::unique_prefix("coupons")).await;
    let campaign = campaign(12_000);
    let holders: Vec<UserId> = (0..11_000).map(|_| UserId::generate()).collect();

    gate.load(&campaign, &holders).await.expect("load");

    assert_eq!(gate.remaining(campaign.id).await.expect("remaining"), Some(1_000));
    for holder in [holders[0], holders[5_000], holders[10_999]] {
        assert_eq!(ask(&gate, &campaign, holder).await.0, Decision::AlreadyIssued);
    }
}

#[tokio::test]
async fn a_confirmed_decision_is_no_longer_pending_nor_given_back() {
    let gate = gate(&test_support::unique_prefix("coupons")).await;
    let campaign = campaign(5);
    let (a, b) = (UserId::generate(), UserId::generate());
    gate.load(&campaign, &[]).await.expect("load");
    let (decided, a_id) = ask(&gate, &campaign, a).await;
    assert_eq!(decided, Decision::Issued);
    let (decided, b_id) = ask(&gate, &campaign, b).await;
    assert_eq!(decided, Decision::Issued);
    assert_eq!(gate.pending(campaign.id, Duration::ZERO).await.expect("pending").len(), 2);

    gate.confirm(campaign.id, a, a_id).await.expect("confirm");

    assert_eq!(gate.pending(campaign.id, Duration::ZERO).await.expect("pending"), vec![(b, b_id)]);
    assert!(
        !gate.give_back(campaign.id, a, a_id, false).await.expect("give back"),
        "confirmed: not given back"
    );
    assert_eq!(gate.remaining(campaign.id).await.expect("remaining"), Some(3));
    assert_eq!(ask(&gate, &campaign, a).await.0, Decision::AlreadyIssued);
}

#[tokio::test]
async fn a_decision_is_given_back_once_and_lets_the_user_ask_again() {
    let gate = gate(&test_support::unique_prefix("coupons")).await;
    let campaign = campaign(1);
    let (a, b) = (UserId::generate(), UserId::generate());
    gate.load(&campaign, &[]).await.expect("load");
    let (decided, a_id) = ask(&gate, &campaign, a).await;
    assert_eq!(decided, Decision::Issued);
    assert_eq!(ask(&gate, &campaign, b).await.0, Decision::SoldOut);

    assert!(
        !gate.give_back(campaign.id, a, CouponId::generate(), false).await.expect("give back"),
        "another decision's id"
    );
    assert!(gate.give_back(campaign.id, a, a_id, false).await.expect("give back"));
    assert!(!gate.give_back(campaign.id, a, a_id, false).await.expect("give back"), "only once");

    assert_eq!(gate.remaining(campaign.id).await.expect("remaining"), Some(1));
    assert!(gate.pending(campaign.id, Duration::ZERO).await.expect("pending").is_empty());
    assert_eq!(ask(&gate, &campaign, a).await.0, Decision::Issued, "may ask again");
}

#[tokio::test]
async fn a_decision_given_back_with_its_user_kept_frees_the_coupon_but_not_the_user() {
    let gate = gate(&test_support::unique_prefix("coupons")).await;
    let campaign = campaign(1);
    let a = UserId::generate();
    gate.load(&campaign, &[]).await.expect("load");
    let (decided, a_id) = ask(&gate, &campaign, a).await;
    assert_eq!(decided, Decision::Issued);

    assert!(gate.give_back(campaign.id, a, a_id, true).await.expect("give back"));

    assert_eq!(gate.remaining(campaign.id).await.expect("remaining"), Some(1));
    assert_eq!(ask(&gate, &campaign, a).await.0, Decision::AlreadyIssued);
    assert!(gate.pending(campaign.id, Duration::ZERO).await.expect("pending").is_empty());
}

#[tokio::test]
async fn sold_out_empties_the_stock_and_undoes_the_users_decision() {
    let redis = connect().await;
    let gate = RedisCouponGate::with_prefix(redis.pool.clone(), test_support::unique_prefix("coupons"));
    let campaign = campaign(5);
    let a = UserId::generate();
    gate.load(&campaign, &[]).await.expect("load");
    let (decided, a_id) = ask(&gate, &campaign, a).await;
    assert_eq!(decided, Decision::Issued);

    gate.sold_out(campaign.id, a, a_id).await.expect("sold out");

    assert_eq!(gate.remaining(campaign.id).await.expect("remaining"), Some(0));
    assert!(gate.pending(campaign.id, Duration::ZERO).await.expect("pending").is_empty());
    assert_eq!(ask(&gate, &campaign, a).await.0, Decision::SoldOut, "asked again");
    let ttl: i64 = redis.pool.pttl(gate.redis_key(campaign.id, "stock")).await.expect("PTTL");
    assert!(ttl > 0, "the stock keeps its expiry: {ttl}");
}

#[tokio::test]
async fn outside_the_issue_window_the_gate_is_closed() {
    let gate = gate(&test_support::unique_prefix("coupons")).await;
    let now = OffsetDateTime::now_utc();
    let mut not_yet = campaign(5);
    not_yet.issue_opens_at = now + time::Duration::HOUR;
    not_yet.issue_closes_at = now + time::Duration::hours(2);
    let mut over = campaign(5);
    over.issue_opens_at = now - time::Duration::hours(2);
    over.issue_closes_at = now - time::Duration::MINUTE;
    let mut over_and_unloaded = over.clone();
    over_and_unloaded.id = CampaignId::generate();
    gate.load(&not_yet, &[]).await.expect("load");
    gate.load(&over, &[]).await.expect("load");
    let user = UserId::generate();

    assert_eq!(ask(&gate, &not_yet, user).await.0, Decision::Closed);
    assert_eq!(ask(&gate, &over, user).await.0, Decision::Closed);
    assert_eq!(
        ask(&gate, &over_and_unloaded, user).await.0,
        Decision::Closed,
        "a closed campaign is never worth loading"
    );
    assert_eq!(gate.remaining(not_yet.id).await.expect("remaining"), Some(5), "nothing taken");
    assert_eq!(gate.remaining(over.id).await.expect("remaining"), Some(5), "nothing taken");
}

#[tokio::test]
async fn a_lost_campaign_is_not_loaded_until_it_is_loaded_again() {
    let redis = connect().await;
    let gate = RedisCouponGate::with_prefix(redis.pool.clone(), test_support::unique_prefix("coupons"));
    let campaign = campaign(3);
    let (a, b, c) = (UserId::generate(), UserId::generate(), UserId::generate());
    assert_eq!(ask(&gate, &campaign, a).await.0, Decision::NotLoaded, "never loaded");
    assert_eq!(gate.remaining(campaign.id).await.expect("remaining"), None);
    gate.load(&campaign, &[]).await.expect("load");
    let (decided, a_id) = ask(&gate, &campaign, a).await;
    assert_eq!(decided, Decision::Issued);
    gate.confirm(campaign.id, a, a_id).await.expect("confirm: MySQL has a's coupon");
    let (decided, c_id) = ask(&gate, &campaign, c).await;
    assert_eq!(decided, Decision::Issued);

    // The stock alone is lost (an eviction) while c's decision is pending: giving it back
    // does not make a stock up.
    let _: i64 = redis.pool.del(gate.redis_key(campaign.id, "stock")).await.expect("DEL");
    assert!(gate.give_back(campaign.id, c, c_id, false).await.expect("give back"));
    assert_eq!(gate.remaining(campaign.id).await.expect("remaining"), None);
    assert_eq!(ask(&gate, &campaign, b).await.0, Decision::NotLoaded);

    // Everything is lost (a flush).
    let _: i64 = redis.pool.del(gate.keys(campaign.id)).await.expect("DEL");
    assert_eq!(ask(&gate, &campaign, a).await.0, Decision::NotLoaded);
    assert!(gate.pending(campaign.id, Duration::ZERO).await.expect("pending").is_empty());

    gate.load(&campaign, &[a]).await.expect("load from MySQL");

    assert_eq!(gate.remaining(campaign.id).await.expect("remaining"), Some(2));
    assert_eq!(ask(&gate, &campaign, a).await.0, Decision::AlreadyIssued);
    assert_eq!(ask(&gate, &campaign, b).await.0, Decision::Issued);
    assert_eq!(ask(&gate, &campaign, c).await.0, Decision::Issued);
    assert_eq!(gate.remaining(campaign.id).await.expect("remaining"), Some(0));
}

#[tokio::test]
async fn pending_lists_only_decisions_at_least_as_old_as_asked() {
    let gate = gate(&test_support::unique_prefix("coupons")).await;
    let campaign = campaign(5);
    let a = UserId::generate();
    gate.load(&campaign, &[]).await.expect("load");
    let (decided, a_id) = ask(&gate, &campaign, a).await;
    assert_eq!(decided, Decision::Issued);

    let any_age = gate.pending(campaign.id, Duration::ZERO).await.expect("pending");
    let an_hour_old = gate.pending(campaign.id, Duration::from_secs(3_600)).await.expect("pending");

    assert_eq!(any_age, vec![(a, a_id)]);
    assert!(an_hour_old.is_empty(), "{an_hour_old:?}");
}

#[tokio::test]
async fn every_key_of_a_campaign_is_in_one_hash_slot() {
    let redis = connect().await;
    let prefix = test_support::unique_prefix("coupons");
    let gate = RedisCouponGate::with_prefix(redis.pool.clone(), prefix.clone());
    let campaign = campaign(2);
    let (a, b, c) = (UserId::generate(), UserId::generate(), UserId::generate());
    // Every script, so that every key a script writes exists.
    gate.load(&campaign, &[a]).await.expect("load");
    let (decided, b_id) = ask(&gate, &campaign, b).await;
    assert_eq!(decided, Decision::Issued);
    assert_eq!(ask(&gate, &campaign, c).await.0, Decision::SoldOut);
    assert!(gate.give_back(campaign.id, b, b_id, false).await.expect("give back"));
    let (decided, c_id) = ask(&gate, &campaign, c).await;
    assert_eq!(decided, Decision::Issued);
    gate.confirm(campaign.id, c, c_id).await.expect("confirm");
    gate.pending(campaign.id, Duration::ZERO).await.expect("pending");
    gate.sold_out(campaign.id, b, b_id).await.expect("sold out");

    // KEYS, not one SCAN page: a page covers only part of a large keyspace.
    let written = super::keys_everywhere(&redis.pool, &format!("{prefix}*{}*", campaign.id)).await;

    let keys = gate.keys(campaign.id);
    assert!(!written.is_empty());
    assert!(written.iter().all(|key| keys.contains(key)), "written {written:?}, declared {keys:?}");
    let tag = format!("{prefix}coupon:{{{}}}:", campaign.id);
    assert!(keys.iter().all(|key| key.starts_with(&tag)), "{keys:?}");
    let slots: HashSet<u16> = keys.iter().map(|key| fred::util::redis_keyslot(key.as_bytes())).collect();
    assert_eq!(slots.len(), 1, "{keys:?}");
}
