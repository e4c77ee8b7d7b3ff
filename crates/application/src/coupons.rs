//! First-come coupons: campaigns, the issue race, and the reconciliation that keeps the
//! fast path honest.
//!
//! **The race.** 5,000 people press "get coupon" for 100 coupons. Locking a MySQL row per
//! request would serialise all 5,000 on it. Instead one Redis script decides each request
//! in one atomic step ([`CouponGate::decide`]: the issue window on Redis's clock, one
//! coupon per user, the stock never below zero), and only the (at most `quantity`) winners
//! reach MySQL. The losers are answered from Redis alone.
//!
//! **The truth stays in MySQL**, guarded there as well: the insert counts the coupon
//! against the campaign's quantity in the same transaction (a conditional update) and a
//! unique key allows one coupon per user ([`CouponRepository::insert`]). Whatever Redis
//! says (after a restart, a flush, a replay), MySQL never holds more than `quantity`
//! coupons of a campaign, nor two for one user.
//!
//! **No issued coupon is lost, none is made up.** A winning decision is recorded in Redis as
//! *pending* until MySQL has the coupon ([`CouponGate::confirm`] after the commit). If the
//! insert fails, the decision is given back at once ([`CouponGate::give_back`]). If the
//! instance dies between the decision and the insert (or the commit's outcome is unknown),
//! the pending entry stays, and [`Reconciler`] settles it later: the coupon is in MySQL →
//! confirmed; it is not → given back. If Redis loses a campaign (restart, flush, eviction)
//! the next request finds it unloaded and rebuilds it from MySQL
//! ([`CouponGate::load`], under `lock:{coupon:<campaignId>}` so that one instance loads).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use domain::coupon::{
    Campaign, CampaignId, Coupon, CouponError, CouponId, CouponRepository, CouponRepositoryError, NewCampaign,
};
use domain::user::UserId;
use time::OffsetDateTime;

use crate::clock;
use crate::detach::run_to_end;
use crate::failure::{Dependency, Failure};
use crate::lock::{DistributedLock, LockKey, WaitPolicy};
use crate::tx::{TransactionManager, in_tx};

/// How long a pending decision may wait for its insert before the reconciler settles it:
/// well past the longest an insert can take (the statement timeout, a commit).
pub const PENDING_GRACE: Duration = Duration::from_secs(30);

/// How many campaigns one process remembers (see [`Coupons::campaign`]).
const KNOWN_CAMPAIGNS: usize = 1_024;

/// How long a load waits for another instance's load of the same campaign.
const LOAD_WAIT: Duration = Duration::from_secs(5);

/// What the fast path decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A coupon is the user's: the stock went down by one, the user is recorded, and the
    /// decision is pending until [`CouponGate::confirm`].
    Issued,
    SoldOut,
    AlreadyIssued,
    /// Outside the issue window, on the gate's clock.
    Closed,
    /// The gate does not know this campaign (never loaded, or lost): load it and ask again.
    NotLoaded,
}

/// The fast path (Redis): one atomic decision per request.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait CouponGate: Send + Sync {
    /// Makes the gate know `campaign`, with `issued` users already holding one of its
    /// coupons: the stock is `quantity - issued.len()`. Does nothing when the campaign is
    /// loaded already (a concurrent load, or a request that got there first), so a load
    /// never undoes decisions made since.
    async fn load(&self, campaign: &Campaign, issued: &[UserId]) -> Result<(), GateError>;

    /// Decides whether `user` gets a coupon of `campaign` now. `decision` names this
    /// decision (the coupon's id, if it is issued): the same decision sent again answers
    /// [`Decision::Issued`] again and changes nothing, so a client resending a lost answer
    /// never turns a winner into "already issued".
    async fn decide(
        &self,
        campaign: &Campaign,
        user: UserId,
        decision: CouponId,
    ) -> Result<Decision, GateError>;

    /// `decision` is in MySQL: no longer pending (a later decision of the user is left alone).
    async fn confirm(&self, campaign: CampaignId, user: UserId, decision: CouponId) -> Result<(), GateError>;

    /// Undoes pending `decision`, whose coupon MySQL does not have: the stock goes back up
    /// by one and, unless `keep_user` (MySQL says the user has a coupon of this campaign
    /// after all), the user may ask again. Does nothing (false) when that decision is no
    /// longer pending, so a decision is never given back twice, and a later one never in
    /// its place.
    async fn give_back(
        &self,
        campaign: CampaignId,
        user: UserId,
        decision: CouponId,
        keep_user: bool,
    ) -> Result<bool, GateError>;

    /// MySQL refused `decision` because the campaign is sold out: the gate's stock goes to
    /// zero and the decision is undone (if still pending).
    async fn sold_out(&self, campaign: CampaignId, user: UserId, decision: CouponId)
    -> Result<(), GateError>;

    /// The decisions pending for at least `older_than`: (user, decision).
    async fn pending(
        &self,
        campaign: CampaignId,
        older_than: Duration,
    ) -> Result<Vec<(UserId, CouponId)>, GateError>;

    /// Coupons left, when the gate knows the campaign.
    async fn remaining(&self, campaign: CampaignId) -> Result<Option<u32>, GateError>;
}

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("the coupon gate is unavailable")]
    Unavailable(#[source] anyhow::Error),
}

impl From<GateError> for Failure {
    fn from(error: GateError) -> Self {
        let GateError::Unavailable(source) = error;
        Self::Unavailable { what: Dependency::CouponGate, source }
    }
}

fn repository(error: CouponRepositoryError) -> Failure {
    match error {
        CouponRepositoryError::Unexpected(error) => Failure::Unexpected(error),
        other => Failure::Unexpected(anyhow::anyhow!("unexpected coupon repository answer: {other}")),
    }
}

/// A campaign as answered: with the coupons left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignView {
    pub campaign: Campaign,
    pub remaining: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CouponUseCaseError {
    #[error("campaign {0} not found")]
    CampaignNotFound(CampaignId),
    #[error(transparent)]
    Invalid(#[from] CouponError),
    #[error("the campaign has no coupon left")]
    SoldOut,
    #[error("you have a coupon of this campaign already")]
    AlreadyIssued,
    #[error("coupons of this campaign are not being issued now")]
    IssueClosed,
    #[error(transparent)]
    Failure(Failure),
}

crate::failure_conversions!(CouponUseCaseError);

impl From<GateError> for CouponUseCaseError {
    fn from(error: GateError) -> Self {
        Self::Failure(error.into())
    }
}

/// Why an insert did not happen: the repository refused it, or the transaction failed.
enum InsertError {
    Refused(CouponRepositoryError),
    Failure(Failure),
}

impl From<Failure> for InsertError {
    fn from(failure: Failure) -> Self {
        Self::Failure(failure)
    }
}

/// How the issue step decides (`COUPON_ISSUE_STRATEGY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IssueStrategy {
    /// One Redis script decides; only the winners reach MySQL.
    #[default]
    Gate,
    /// Every request locks the campaign's row in MySQL (`SELECT ... FOR UPDATE`), checks and
    /// inserts: the naive, pessimistic version, kept as the benchmark's baseline. Exact too
    /// (the same guards), but every request of a campaign queues on one row.
    DatabaseLock,
}

/// Campaigns and the coupon race.
#[derive(Clone)]
pub struct Coupons {
    repo: Arc<dyn CouponRepository>,
    gate: Arc<dyn CouponGate>,
    lock: Arc<dyn DistributedLock>,
    txm: Arc<dyn TransactionManager>,
    strategy: IssueStrategy,
    /// Campaigns read before (they never change).
    known: Arc<std::sync::Mutex<std::collections::HashMap<CampaignId, Campaign>>>,
}

impl std::fmt::Debug for Coupons {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coupons").finish_non_exhaustive()
    }
}

impl Coupons {
    #[must_use]
    pub fn new(
        repo: Arc<dyn CouponRepository>,
        gate: Arc<dyn CouponGate>,
        lock: Arc<dyn DistributedLock>,
        txm: Arc<dyn TransactionManager>,
    ) -> Self {
        Self { repo, gate, lock, txm, strategy: IssueStrategy::Gate, known: Arc::default() }
    }

    /// The same, deciding with `strategy`.
    #[must_use]
    pub const fn with_strategy(mut self, strategy: IssueStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Creates a campaign (admin) and loads its stock into the gate, so that the first
    /// requests need not. A gate that cannot be reached now loads it on first use.
    ///
    /// # Errors
    /// [`CouponUseCaseError::Invalid`] naming the broken rule; a failure of MySQL.
    pub async fn create(&self, spec: NewCampaign) -> Result<Campaign, CouponUseCaseError> {
        let campaign = Campaign::new(spec, clock::now_utc())?;
        self.repo.create_campaign(&campaign).await.map_err(repository)?;
        if let Err(error) = self.gate.load(&campaign, &[]).await {
            tracing::warn!(campaign = %campaign.id, error = %error, "campaign not loaded into the gate; the first request will");
        }
        tracing::info!(campaign = %campaign.id, quantity = campaign.quantity, "coupon campaign created");
        Ok(campaign)
    }

    /// The campaign and how many coupons are left (from the gate when it knows the
    /// campaign, else from MySQL).
    ///
    /// # Errors
    /// [`CouponUseCaseError::CampaignNotFound`]; a failure of MySQL.
    pub async fn view(&self, id: CampaignId) -> Result<CampaignView, CouponUseCaseError> {
        let campaign = self.campaign(id).await?;
        let remaining = match self.gate.remaining(id).await {
            Ok(Some(left)) => left,
            // Unknown to the gate, or the gate is down: count in MySQL.
            Ok(None) | Err(_) => {
                let issued = self.repo.issued_count(id).await.map_err(repository)?;
                campaign.quantity.saturating_sub(issued)
            }
        };
        Ok(CampaignView { campaign, remaining })
    }

    /// The campaign, from this process's memory when it read it before: campaigns never
    /// change once created, so a storm of requests reads MySQL once per instance, not once
    /// per request. An unknown id is not remembered (it may be created later).
    async fn campaign(&self, id: CampaignId) -> Result<Campaign, CouponUseCaseError> {
        if let Some(known) = self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&id) {
            return Ok(known.clone());
        }
        let campaign = self
            .repo
            .campaign(id)
            .await
            .map_err(repository)?
            .ok_or(CouponUseCaseError::CampaignNotFound(id))?;
        let mut known = self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.len() >= KNOWN_CAMPAIGNS {
            // Bounded: forgetting them all is cheap (each costs one read to learn again).
            known.clear();
        }
        known.insert(id, campaign.clone());
        Ok(campaign)
    }

    /// The user's coupons, newest first.
    ///
    /// # Errors
    /// A failure of MySQL.
    pub async fn of_user(&self, user: UserId, limit: u32) -> Result<Vec<Coupon>, CouponUseCaseError> {
        Ok(self.repo.of_user(user, limit).await.map_err(repository)?)
    }

    /// Issues a coupon of campaign `id` to `user`, first come, first served.
    ///
    /// Runs to its end on a task of its own once started ([`run_to_end`]): a decision the
    /// gate made is recorded in MySQL, or given back, whatever the client does.
    ///
    /// # Errors
    /// [`CouponUseCaseError::CampaignNotFound`], `SoldOut`, `AlreadyIssued`, `IssueClosed`;
    /// a failure (the gate or MySQL unreachable: nothing issued).
    #[tracing::instrument(name = "issue_coupon", skip(self), fields(%user, campaign = %id))]
    pub async fn issue(&self, id: CampaignId, user: UserId) -> Result<Coupon, CouponUseCaseError> {
        let this = self.clone();
        run_to_end(async move {
            match this.strategy {
                IssueStrategy::Gate => this.issue_now(id, user).await,
                IssueStrategy::DatabaseLock => this.issue_locked(id, user).await,
            }
        })
        .await
    }

    /// The baseline: the campaign's row locked, the window checked on this instance's
    /// clock, the coupon inserted under the same guards as the fast path's winners.
    async fn issue_locked(&self, id: CampaignId, user: UserId) -> Result<Coupon, CouponUseCaseError> {
        let repo = Arc::clone(&self.repo);
        in_tx(self.txm.as_ref(), |tx| {
            Box::pin(async move {
                let campaign = repo.lock_campaign(tx, id).await.map_err(repository)?;
                let campaign = campaign.ok_or(CouponUseCaseError::CampaignNotFound(id))?;
                let now = clock::now_utc();
                if !campaign.is_issuing(now) {
                    return Err(CouponUseCaseError::IssueClosed);
                }
                let coupon = Coupon::issue(&campaign, user, now);
                match repo.insert(tx, &coupon).await {
                    Ok(()) => Ok(coupon),
                    Err(CouponRepositoryError::SoldOut) => Err(CouponUseCaseError::SoldOut),
                    Err(CouponRepositoryError::AlreadyIssued) => Err(CouponUseCaseError::AlreadyIssued),
                    Err(other) => Err(repository(other).into()),
                }
            })
        })
        .await
    }

    async fn issue_now(&self, id: CampaignId, user: UserId) -> Result<Coupon, CouponUseCaseError> {
        let campaign = self.campaign(id).await?;
        // The coupon this request would get: its id names the gate's decision, so that the
        // gate's later steps (confirm, give back) act on this decision only, and a decision
        // sent twice counts once.
        let coupon = Coupon::issue(&campaign, user, clock::now_utc());
        let decision = coupon.id;
        let mut decided = self.decide(&campaign, user, decision).await?;
        if decided == Decision::NotLoaded {
            self.load(&campaign).await?;
            decided = self.decide(&campaign, user, decision).await?;
        }
        match decided {
            Decision::Issued => {}
            Decision::SoldOut => return Err(CouponUseCaseError::SoldOut),
            Decision::AlreadyIssued => return Err(CouponUseCaseError::AlreadyIssued),
            Decision::Closed => return Err(CouponUseCaseError::IssueClosed),
            Decision::NotLoaded => {
                // Lost again between the load and the decision (evicted, flushed): the gate
                // is not fit to decide now; nothing was issued.
                return Err(Failure::from(GateError::Unavailable(anyhow::anyhow!(
                    "campaign {id} is still unknown to the gate after loading it"
                )))
                .into());
            }
        }
        metrics::counter!("coupon_decisions_total", "outcome" => "issued").increment(1);
        let inserted = in_tx(self.txm.as_ref(), |tx| {
            let (repo, coupon) = (Arc::clone(&self.repo), coupon.clone());
            Box::pin(async move { repo.insert(tx, &coupon).await.map_err(InsertError::Refused) })
        })
        .await;
        match inserted {
            Ok(()) => {
                // Best effort: a confirmation lost here is made by the reconciler.
                if let Err(error) = self.gate.confirm(id, user, decision).await {
                    tracing::warn!(error = %error, "issued coupon not confirmed in the gate; the reconciler will");
                }
                Ok(coupon)
            }
            Err(InsertError::Refused(CouponRepositoryError::SoldOut)) => {
                // The gate had more stock than MySQL allows (it was rebuilt while a decision
                // was on its way): MySQL is right, whether or not the gate takes the
                // correction.
                tracing::warn!("the gate issued past the campaign's quantity; corrected");
                if let Err(error) = self.gate.sold_out(id, user, decision).await {
                    tracing::warn!(error = %error, "the gate's stock not corrected; the reconciler gives the decision back");
                }
                Err(CouponUseCaseError::SoldOut)
            }
            Err(InsertError::Refused(CouponRepositoryError::AlreadyIssued)) => {
                self.give_back_quietly(id, user, decision, true).await;
                Err(CouponUseCaseError::AlreadyIssued)
            }
            Err(InsertError::Refused(CouponRepositoryError::Unexpected(error))) => {
                self.give_back_quietly(id, user, decision, false).await;
                Err(Failure::Unexpected(error).into())
            }
            Err(InsertError::Refused(
                other @ (CouponRepositoryError::NotFound | CouponRepositoryError::NotUsable(_)),
            )) => {
                // An insert answers neither: a broken adapter.
                self.give_back_quietly(id, user, decision, false).await;
                Err(Failure::Unexpected(anyhow::anyhow!("a coupon insert answered {other}")).into())
            }
            Err(InsertError::Failure(failure)) => {
                if matches!(&failure, Failure::Unexpected(error) if domain::unavailable::is_outcome_unknown(error))
                {
                    // The coupon may be in MySQL: the reconciler decides once it can tell.
                    tracing::warn!("coupon commit unconfirmed; left pending for the reconciler");
                } else {
                    self.give_back_quietly(id, user, decision, false).await;
                }
                Err(failure.into())
            }
        }
    }

    /// One decision. A gate that failed may still have decided (the script ran, its
    /// answer was lost): that decision is given back at once (it is this one's only, by its
    /// id), so the user is not told "already issued" for a coupon they never got.
    async fn decide(
        &self,
        campaign: &Campaign,
        user: UserId,
        decision: CouponId,
    ) -> Result<Decision, CouponUseCaseError> {
        match self.gate.decide(campaign, user, decision).await {
            Ok(decided) => Ok(decided),
            Err(error) => {
                self.give_back_quietly(campaign.id, user, decision, false).await;
                Err(error.into())
            }
        }
    }

    /// Gives back `decision`, best effort: what cannot be given back now is settled by the
    /// reconciler.
    async fn give_back_quietly(&self, id: CampaignId, user: UserId, decision: CouponId, keep_user: bool) {
        if let Err(error) = self.gate.give_back(id, user, decision, keep_user).await {
            tracing::warn!(error = %error, "a coupon decision not given back; the reconciler will");
        }
    }

    /// Loads `campaign` into the gate from MySQL, one instance at a time.
    async fn load(&self, campaign: &Campaign) -> Result<(), CouponUseCaseError> {
        let guard =
            self.lock.acquire(&LockKey::new("coupon", campaign.id), WaitPolicy::WaitUpTo(LOAD_WAIT)).await?;
        let loaded = async {
            // Another instance (or request) may have loaded it while this one waited for
            // the lock: then there is nothing to read.
            if self.gate.remaining(campaign.id).await?.is_some() {
                return Ok(());
            }
            let issued = self.repo.issued(campaign.id).await.map_err(repository)?;
            self.gate.load(campaign, &issued).await?;
            tracing::info!(campaign = %campaign.id, issued = issued.len(), "coupon campaign loaded into the gate");
            Ok::<_, CouponUseCaseError>(())
        }
        .await;
        let _ = guard.release().await;
        loaded
    }
}

/// Settles decisions left pending (an instance died between a decision and its insert, or
/// a commit's outcome was unknown): the coupon is in MySQL → confirmed, it is not → given
/// back. Every instance runs it; settling twice is harmless (a give-back happens once).
#[derive(Clone)]
pub struct Reconciler {
    repo: Arc<dyn CouponRepository>,
    gate: Arc<dyn CouponGate>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler").finish_non_exhaustive()
    }
}

impl Reconciler {
    async fn settle(&self, campaign: CampaignId) -> Result<(usize, usize), Failure> {
        let (mut confirmed, mut given_back) = (0, 0);
        for (user, decision) in self.gate.pending(campaign, PENDING_GRACE).await? {
            if self.repo.has_coupon(decision).await.map_err(repository)? {
                self.gate.confirm(campaign, user, decision).await?;
                confirmed += 1;
            } else {
                // Not this decision's coupon. The user may hold an earlier one (a decision
                // made while the gate had forgotten them): then they stay recorded.
                let keep_user = self.repo.exists(campaign, user).await.map_err(repository)?;
                if self.gate.give_back(campaign, user, decision, keep_user).await? {
                    given_back += 1;
                }
            }
        }
        Ok((confirmed, given_back))
    }

    #[must_use]
    pub fn new(repo: Arc<dyn CouponRepository>, gate: Arc<dyn CouponGate>) -> Self {
        Self { repo, gate }
    }

    /// One round over the campaigns issuing now or lately: returns (confirmed, given back).
    ///
    /// # Errors
    /// A failure of MySQL or the gate (the next round tries again).
    pub async fn run_once(&self, now: OffsetDateTime) -> Result<(usize, usize), Failure> {
        let grace = time::Duration::try_from(PENDING_GRACE * 2).unwrap_or(time::Duration::MINUTE);
        let campaigns = self.repo.recent_campaigns(now, grace).await.map_err(repository)?;
        let (mut confirmed, mut given_back) = (0, 0);
        for campaign in campaigns {
            // One campaign failing does not stop the others' settling.
            match self.settle(campaign.id).await {
                Ok((c, g)) => {
                    confirmed += c;
                    given_back += g;
                }
                Err(error) => {
                    tracing::warn!(campaign = %campaign.id, error = %error, "coupon decisions not settled; retried next round")
                }
            }
        }
        if confirmed + given_back > 0 {
            tracing::warn!(confirmed, given_back, "coupon decisions left pending were settled");
            metrics::counter!("coupon_reconciled_total", "outcome" => "confirmed")
                .increment(u64::try_from(confirmed).unwrap_or(0));
            metrics::counter!("coupon_reconciled_total", "outcome" => "given_back")
                .increment(u64::try_from(given_back).unwrap_or(0));
        }
        Ok((confirmed, given_back))
    }
}

#[cfg(test)]
mod tests {
    use domain::coupon::{MockCouponRepository, NewCampaign};
    use mockall::predicate::{always, eq};
    use time::Duration as Span;

    use super::*;
    use crate::lock::MockDistributedLock;
    use crate::mocks::{one_tx, released_guard};
    use crate::tx::MockTransactionManager;

    fn campaign() -> Campaign {
        let now = clock::now_utc();
        Campaign::new(
            NewCampaign {
                name: "Early birds".into(),
                discount: 1_000,
                quantity: 2,
                issue_opens_at: now - Span::hours(1),
                issue_closes_at: now + Span::hours(1),
                valid_until: now + Span::days(1),
            },
            now,
        )
        .expect("valid")
    }

    fn coupons(
        repo: MockCouponRepository,
        gate: MockCouponGate,
        lock: MockDistributedLock,
        txm: MockTransactionManager,
    ) -> Coupons {
        Coupons::new(Arc::new(repo), Arc::new(gate), Arc::new(lock), Arc::new(txm))
    }

    fn repo_with(campaign: &Campaign) -> MockCouponRepository {
        let mut repo = MockCouponRepository::new();
        let found = campaign.clone();
        repo.expect_campaign().with(eq(campaign.id)).returning(move |_| Ok(Some(found.clone())));
        repo
    }

    fn no_tx() -> MockTransactionManager {
        let mut txm = MockTransactionManager::new();
        txm.expect_begin().never();
        txm
    }

    #[tokio::test]
    async fn a_won_decision_is_recorded_in_mysql_and_then_confirmed() {
        let campaign = campaign();
        let user = UserId::generate();
        let mut repo = repo_with(&campaign);
        repo.expect_insert().times(1).returning(|_, _| Ok(()));
        let mut gate = MockCouponGate::new();
        gate.expect_decide().times(1).returning(|_, _, _| Ok(Decision::Issued));
        gate.expect_confirm().with(eq(campaign.id), eq(user), always()).times(1).returning(|_, _, _| Ok(()));
        gate.expect_give_back().never();
        let coupon = coupons(repo, gate, MockDistributedLock::new(), one_tx(true))
            .issue(campaign.id, user)
            .await
            .expect("issued");
        assert_eq!((coupon.campaign_id, coupon.user_id, coupon.discount), (campaign.id, user, 1_000));
    }

    #[tokio::test]
    async fn the_gates_refusals_reach_no_database_write() {
        for (decision, expected) in [
            (Decision::SoldOut, "SoldOut"),
            (Decision::AlreadyIssued, "AlreadyIssued"),
            (Decision::Closed, "IssueClosed"),
        ] {
            let campaign = campaign();
            let mut repo = repo_with(&campaign);
            repo.expect_insert().never();
            let mut gate = MockCouponGate::new();
            gate.expect_decide().times(1).returning(move |_, _, _| Ok(decision));
            let error = coupons(repo, gate, MockDistributedLock::new(), no_tx())
                .issue(campaign.id, UserId::generate())
                .await
                .expect_err("refused");
            assert!(format!("{error:?}").starts_with(expected), "{decision:?}: {error:?}");
        }
    }

    #[tokio::test]
    async fn an_unknown_campaign_is_not_found_before_the_gate_is_asked() {
        let mut repo = MockCouponRepository::new();
        repo.expect_campaign().returning(|_| Ok(None));
        let mut gate = MockCouponGate::new();
        gate.expect_decide().never();
        let error = coupons(repo, gate, MockDistributedLock::new(), no_tx())
            .issue(CampaignId::generate(), UserId::generate())
            .await
            .expect_err("unknown");
        assert!(matches!(error, CouponUseCaseError::CampaignNotFound(_)));
    }

    #[tokio::test]
    async fn a_campaign_the_gate_lost_is_rebuilt_from_mysql_under_its_lock_then_decided() {
        let campaign = campaign();
        let user = UserId::generate();
        let holder = UserId::generate();
        let mut repo = repo_with(&campaign);
        repo.expect_issued().with(eq(campaign.id)).times(1).returning(move |_| Ok(vec![holder]));
        repo.expect_insert().times(1).returning(|_, _| Ok(()));
        let mut gate = MockCouponGate::new();
        let mut seq = mockall::Sequence::new();
        gate.expect_decide().times(1).in_sequence(&mut seq).returning(|_, _, _| Ok(Decision::NotLoaded));
        // Not loaded by anyone else while this request waited for the lock.
        gate.expect_remaining().times(1).in_sequence(&mut seq).returning(|_| Ok(None));
        gate.expect_load()
            .withf(move |_, issued| issued == [holder])
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _| Ok(()));
        gate.expect_decide().times(1).in_sequence(&mut seq).returning(|_, _, _| Ok(Decision::Issued));
        gate.expect_confirm().times(1).returning(|_, _, _| Ok(()));
        let mut lock = MockDistributedLock::new();
        let key = LockKey::new("coupon", campaign.id);
        lock.expect_acquire()
            .withf(move |k, _| *k == key)
            .times(1)
            .returning(|k, _| Ok(Box::new(released_guard(k.clone()))));
        coupons(repo, gate, lock, one_tx(true)).issue(campaign.id, user).await.expect("issued");
    }

    #[tokio::test]
    async fn mysql_saying_sold_out_overrules_the_gate_and_corrects_it() {
        let campaign = campaign();
        let user = UserId::generate();
        let mut repo = repo_with(&campaign);
        repo.expect_insert().times(1).returning(|_, _| Err(CouponRepositoryError::SoldOut));
        let mut gate = MockCouponGate::new();
        gate.expect_decide().returning(|_, _, _| Ok(Decision::Issued));
        gate.expect_sold_out().with(eq(campaign.id), eq(user), always()).times(1).returning(|_, _, _| Ok(()));
        gate.expect_confirm().never();
        let error = coupons(repo, gate, MockDistributedLock::new(), one_tx(false))
            .issue(campaign.id, user)
            .await
            .expect_err("sold out");
        assert!(matches!(error, CouponUseCaseError::SoldOut));
    }

    #[tokio::test]
    async fn mysql_saying_already_issued_gives_the_stock_back_but_keeps_the_user() {
        let campaign = campaign();
        let user = UserId::generate();
        let mut repo = repo_with(&campaign);
        repo.expect_insert().times(1).returning(|_, _| Err(CouponRepositoryError::AlreadyIssued));
        let mut gate = MockCouponGate::new();
        gate.expect_decide().returning(|_, _, _| Ok(Decision::Issued));
        gate.expect_give_back()
            .with(eq(campaign.id), eq(user), always(), eq(true))
            .times(1)
            .returning(|_, _, _, _| Ok(true));
        let error = coupons(repo, gate, MockDistributedLock::new(), one_tx(false))
            .issue(campaign.id, user)
            .await
            .expect_err("already");
        assert!(matches!(error, CouponUseCaseError::AlreadyIssued));
    }

    #[tokio::test]
    async fn a_failed_insert_gives_the_decision_back_so_no_coupon_is_lost() {
        let campaign = campaign();
        let user = UserId::generate();
        let mut repo = repo_with(&campaign);
        repo.expect_insert().times(1).returning(|_, _| Err(anyhow::anyhow!("connection reset").into()));
        let mut gate = MockCouponGate::new();
        gate.expect_decide().returning(|_, _, _| Ok(Decision::Issued));
        gate.expect_give_back()
            .with(eq(campaign.id), eq(user), always(), eq(false))
            .times(1)
            .returning(|_, _, _, _| Ok(true));
        gate.expect_confirm().never();
        let error = coupons(repo, gate, MockDistributedLock::new(), one_tx(false))
            .issue(campaign.id, user)
            .await
            .expect_err("failed");
        assert!(matches!(error, CouponUseCaseError::Failure(Failure::Unexpected(_))));
    }

    #[tokio::test]
    async fn a_gate_that_cannot_be_reached_issues_nothing() {
        let campaign = campaign();
        let mut repo = repo_with(&campaign);
        repo.expect_insert().never();
        let mut gate = MockCouponGate::new();
        gate.expect_decide().returning(|_, _, _| Err(GateError::Unavailable(anyhow::anyhow!("down"))));
        // The script may have run before the answer was lost: its decision is given back.
        gate.expect_give_back()
            .times(1)
            .returning(|_, _, _, _| Err(GateError::Unavailable(anyhow::anyhow!("down"))));
        let error = coupons(repo, gate, MockDistributedLock::new(), no_tx())
            .issue(campaign.id, UserId::generate())
            .await
            .expect_err("down");
        assert!(matches!(
            error,
            CouponUseCaseError::Failure(Failure::Unavailable { what: Dependency::CouponGate, .. })
        ));
    }

    #[tokio::test]
    async fn the_reconciler_confirms_what_mysql_has_and_gives_back_what_it_does_not() {
        let campaign = campaign();
        let (kept, lost, holder) = (UserId::generate(), UserId::generate(), UserId::generate());
        let (kept_decision, lost_decision, holder_decision) =
            (CouponId::generate(), CouponId::generate(), CouponId::generate());
        let mut repo = MockCouponRepository::new();
        let listed = campaign.clone();
        repo.expect_recent_campaigns().returning(move |_, _| Ok(vec![listed.clone()]));
        repo.expect_has_coupon().with(eq(kept_decision)).returning(|_| Ok(true));
        repo.expect_has_coupon().with(eq(lost_decision)).returning(|_| Ok(false));
        repo.expect_has_coupon().with(eq(holder_decision)).returning(|_| Ok(false));
        repo.expect_exists().with(eq(campaign.id), eq(lost)).returning(|_, _| Ok(false));
        // A second decision of a user who holds an earlier coupon: given back, user kept.
        repo.expect_exists().with(eq(campaign.id), eq(holder)).returning(|_, _| Ok(true));
        let mut gate = MockCouponGate::new();
        gate.expect_pending().withf(|_, age| *age == PENDING_GRACE).returning(move |_, _| {
            Ok(vec![(kept, kept_decision), (lost, lost_decision), (holder, holder_decision)])
        });
        gate.expect_confirm()
            .with(eq(campaign.id), eq(kept), eq(kept_decision))
            .times(1)
            .returning(|_, _, _| Ok(()));
        gate.expect_give_back()
            .with(eq(campaign.id), eq(lost), eq(lost_decision), eq(false))
            .times(1)
            .returning(|_, _, _, _| Ok(true));
        gate.expect_give_back()
            .with(eq(campaign.id), eq(holder), eq(holder_decision), eq(true))
            .times(1)
            .returning(|_, _, _, _| Ok(true));
        let settled = Reconciler::new(Arc::new(repo), Arc::new(gate)).run_once(clock::now_utc()).await;
        assert_eq!(settled.expect("ran"), (1, 2));
    }

    #[tokio::test]
    async fn the_baseline_locks_the_campaign_row_and_never_asks_the_gate() {
        let campaign = campaign();
        let user = UserId::generate();
        let mut repo = MockCouponRepository::new();
        let locked = campaign.clone();
        repo.expect_lock_campaign().times(2).returning(move |_, _| Ok(Some(locked.clone())));
        let mut inserts = 0;
        repo.expect_insert().times(2).returning(move |_, _| {
            inserts += 1;
            if inserts == 1 { Ok(()) } else { Err(CouponRepositoryError::SoldOut) }
        });
        let mut gate = MockCouponGate::new();
        gate.expect_decide().never();
        let mut txm = MockTransactionManager::new();
        let mut commits = vec![true, false].into_iter();
        txm.expect_begin()
            .times(2)
            .returning(move || Ok(Box::new(crate::mocks::unit_of_work(commits.next().unwrap_or(false)))));
        let coupons =
            coupons(repo, gate, MockDistributedLock::new(), txm).with_strategy(IssueStrategy::DatabaseLock);
        let coupon = coupons.issue(campaign.id, user).await.expect("issued");
        assert_eq!(coupon.user_id, user);
        let error = coupons.issue(campaign.id, UserId::generate()).await.expect_err("sold out");
        assert!(matches!(error, CouponUseCaseError::SoldOut));
    }

    #[tokio::test]
    async fn a_campaign_breaking_a_rule_is_refused_before_anything_is_stored() {
        let mut repo = MockCouponRepository::new();
        repo.expect_create_campaign().never();
        let now = clock::now_utc();
        let error = coupons(repo, MockCouponGate::new(), MockDistributedLock::new(), no_tx())
            .create(NewCampaign {
                name: "x".into(),
                discount: 0,
                quantity: 1,
                issue_opens_at: now,
                issue_closes_at: now + Span::hours(1),
                valid_until: now + Span::hours(2),
            })
            .await
            .expect_err("refused");
        assert!(matches!(
            error,
            CouponUseCaseError::Invalid(domain::coupon::CouponError::DiscountOutOfRange)
        ));
    }
}
