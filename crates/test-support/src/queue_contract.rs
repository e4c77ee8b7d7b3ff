//! One contract suite for every `WaitingQueue` adapter: the Redis one and the MySQL one run
//! the very same cases with the very same expectations.
//!
//! An adapter's test crate implements [`MakeQueue`] (a fresh, empty queue per call) and
//! calls each case from a test of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use application::queue::{QueueConfig, WaitingQueue};
use async_trait::async_trait;
use domain::queue::{AdmitPolicy, QueueStatus, QueueTokenId};
use domain::user::UserId;

/// Makes an empty queue with `config`, isolated from every other test.
#[async_trait]
pub trait MakeQueue: Send + Sync {
    async fn make(&self, config: QueueConfig) -> Arc<dyn WaitingQueue>;
}

/// A configuration for tests: long lifetimes unless a case shortens them.
#[must_use]
pub fn config(policy: AdmitPolicy) -> QueueConfig {
    QueueConfig {
        active_lifetime: Duration::from_secs(600),
        waiting_idle: Duration::from_secs(600),
        policy,
        admit_interval: Duration::from_millis(100),
        rate_window: Duration::from_secs(60),
    }
}

async fn issue_many(queue: &dyn WaitingQueue, n: usize) -> Vec<QueueTokenId> {
    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        tokens.push(queue.issue(UserId::generate()).await.expect("issued").state.token);
    }
    tokens
}

async fn positions(queue: &dyn WaitingQueue, tokens: &[QueueTokenId]) -> Vec<Option<u64>> {
    let mut out = Vec::new();
    for token in tokens {
        out.push(queue.state(*token).await.expect("state").and_then(|s| s.position));
    }
    out
}

/// Tokens line up in the order they were issued: positions 1..n; admission takes the
/// oldest first, and the rest move up.
pub async fn fifo_positions_and_admission_order(make: &dyn MakeQueue) {
    let queue = make.make(config(AdmitPolicy::MaxActive { max_active: 2 })).await;
    let tokens = issue_many(queue.as_ref(), 5).await;
    assert_eq!(positions(queue.as_ref(), &tokens).await, (1..=5).map(Some).collect::<Vec<_>>());
    for token in &tokens {
        let state = queue.state(*token).await.expect("state").expect("live");
        assert_eq!((state.status, state.expires_at), (QueueStatus::Waiting, None));
    }

    let admission = queue.admit().await.expect("admitted");

    assert_eq!((admission.admitted, admission.active, admission.waiting), (2, 2, 3));
    for token in &tokens[..2] {
        let state = queue.state(*token).await.expect("state").expect("live");
        assert_eq!((state.status, state.position), (QueueStatus::Active, None));
        assert!(state.expires_at.is_some(), "an active token says when it expires");
    }
    assert_eq!(positions(queue.as_ref(), &tokens[2..]).await, vec![Some(1), Some(2), Some(3)]);
    assert!(
        queue.state(tokens[2]).await.expect("state").expect("live").admissions_per_second > 0.0,
        "the observed rate is known once someone was admitted"
    );
}

/// A user who asks again gets the same token, and keeps its place.
pub async fn reissue_returns_the_same_token_and_place(make: &dyn MakeQueue) {
    let queue = make.make(config(AdmitPolicy::MaxActive { max_active: 0 })).await;
    let (first, second) = (UserId::generate(), UserId::generate());
    let a = queue.issue(first).await.expect("issued");
    let b = queue.issue(second).await.expect("issued");
    assert!(a.created && b.created);

    let again = queue.issue(first).await.expect("issued");

    assert!(!again.created);
    assert_eq!(again.state.token, a.state.token);
    assert_eq!(again.state.position, Some(1));
    assert_eq!(again.state.user_id, first);
    // Eight at once for a new user: one token.
    let third = UserId::generate();
    let issued = futures::future::join_all((0..8).map(|_| queue.issue(third))).await;
    let tokens: std::collections::BTreeSet<QueueTokenId> =
        issued.into_iter().map(|i| i.expect("issued").state.token).collect();
    assert_eq!(tokens.len(), 1, "concurrent issues for one user made several tokens");
}

/// Eight admitters at once never pass the cap, and admit the oldest.
pub async fn the_cap_holds_when_eight_clients_admit_at_once(make: &dyn MakeQueue) {
    let queue = make.make(config(AdmitPolicy::MaxActive { max_active: 10 })).await;
    let tokens = issue_many(queue.as_ref(), 30).await;

    let steps = futures::future::join_all((0..8).map(|_| queue.admit())).await;

    let admitted: u64 = steps.into_iter().map(|s| s.expect("step").admitted).sum();
    assert_eq!(admitted, 10);
    let mut active = Vec::new();
    for (n, token) in tokens.iter().enumerate() {
        if queue.state(*token).await.expect("state").expect("live").status == QueueStatus::Active {
            active.push(n);
        }
    }
    assert_eq!(active, (0..10).collect::<Vec<_>>(), "the oldest ten, and only them");
    assert_eq!(queue.admit().await.expect("step").admitted, 0, "full: nobody more");
}

/// Under the rate policy, a batch is admitted once per interval, however many steps run.
pub async fn a_rate_batch_is_admitted_once_per_interval(make: &dyn MakeQueue) {
    let policy = AdmitPolicy::Rate { batch: 3, interval: Duration::from_secs(86_400), max_active: 100 };
    let queue = make.make(config(policy)).await;
    issue_many(queue.as_ref(), 12).await;

    let steps = futures::future::join_all((0..8).map(|_| queue.admit())).await;

    let admitted: u64 = steps.into_iter().map(|s| s.expect("step").admitted).sum();
    assert_eq!(admitted, 3, "one batch in one interval");
}

/// An active token that runs out is gone, frees its place, and the line moves up.
pub async fn expiry_frees_places_and_moves_the_line_up(make: &dyn MakeQueue) {
    let mut settings = config(AdmitPolicy::MaxActive { max_active: 2 });
    settings.active_lifetime = Duration::from_millis(300);
    let queue = make.make(settings).await;
    let tokens = issue_many(queue.as_ref(), 4).await;
    assert_eq!(queue.admit().await.expect("step").admitted, 2);

    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.state(tokens[0]).await.expect("state").is_some() {
        assert!(Instant::now() < deadline, "an active token never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(queue.state(tokens[1]).await.expect("state").is_none(), "admitted together, expired together");

    let next = queue.admit().await.expect("step");

    assert_eq!((next.admitted, next.active, next.waiting), (2, 2, 0));
    for token in &tokens[2..] {
        assert_eq!(queue.state(*token).await.expect("state").expect("live").status, QueueStatus::Active);
    }
}

/// Unknown tokens have no state; an expired (ended) token is gone for good.
pub async fn unknown_and_ended_tokens_are_gone(make: &dyn MakeQueue) {
    let queue = make.make(config(AdmitPolicy::MaxActive { max_active: 1 })).await;
    assert!(queue.state(QueueTokenId::generate()).await.expect("state").is_none());
    let user = UserId::generate();
    let tokens = issue_many(queue.as_ref(), 1).await;
    let other = queue.issue(user).await.expect("issued").state.token;
    queue.admit().await.expect("step");

    assert!(queue.expire(tokens[0]).await.expect("expired"), "it was live");
    assert!(queue.state(tokens[0]).await.expect("state").is_none());
    assert!(!queue.expire(tokens[0]).await.expect("expired"), "already gone");
    // The waiting one moves up, and its user gets a new token once the old one ended.
    assert_eq!(queue.state(other).await.expect("state").and_then(|s| s.position), Some(1));
    assert!(queue.expire(other).await.expect("expired"));
    let fresh = queue.issue(user).await.expect("issued");
    assert!(fresh.created);
    assert_ne!(fresh.state.token, other);
    let states = queue.states(vec![tokens[0], fresh.state.token]).await.expect("states");
    assert!(states[0].is_none(), "the ended token");
    assert_eq!(states[1].as_ref().map(|s| s.token), Some(fresh.state.token));
}

/// A waiting token nobody asks about leaves the line; one that is asked about stays.
pub async fn an_abandoned_waiting_token_leaves_the_line(make: &dyn MakeQueue) {
    let mut settings = config(AdmitPolicy::MaxActive { max_active: 0 });
    settings.waiting_idle = Duration::from_millis(400);
    let queue = make.make(settings).await;
    let tokens = issue_many(queue.as_ref(), 2).await;

    // Only the second holder keeps asking, for longer than the idle timeout.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(700) {
        assert!(queue.state(tokens[1]).await.expect("state").is_some());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let step = queue.admit().await.expect("step");

    assert_eq!(step.waiting, 1, "the abandoned token left the line");
    assert!(queue.state(tokens[0]).await.expect("state").is_none());
    assert_eq!(queue.state(tokens[1]).await.expect("state").and_then(|s| s.position), Some(1));
}
