//! First-come coupons: a campaign of `quantity` coupons worth `discount` points each,
//! issued one per user while its issue window is open, usable until `valid_until`.
//!
//! The rules the storage enforces whatever got past the fast path (the Redis decision):
//! never more than `quantity` coupons of a campaign (a counter guarded in the same
//! transaction as the insert), never two for one user (a unique key).

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::unit_of_work::Tx;
use crate::user::UserId;

uuid_id!(
    /// A campaign's id.
    CampaignId
);

uuid_id!(
    /// A coupon's id.
    CouponId
);

/// The most coupons one campaign may have.
pub const MAX_QUANTITY: u32 = 1_000_000;
/// The largest discount, in points (the largest seat price).
pub const MAX_DISCOUNT: i64 = 10_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CouponError {
    #[error("a campaign's name is 1..=100 characters")]
    NameLength,
    #[error("a discount is 1..={MAX_DISCOUNT} points")]
    DiscountOutOfRange,
    #[error("a campaign has 1..={MAX_QUANTITY} coupons")]
    QuantityOutOfRange,
    #[error("issuing must open before it closes")]
    EmptyIssueWindow,
    #[error("coupons must stay valid at least until issuing closes")]
    ValidBeforeIssueCloses,
}

/// A coupon campaign: what an admin creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Campaign {
    pub id: CampaignId,
    pub name: String,
    pub discount: i64,
    pub quantity: u32,
    pub issue_opens_at: OffsetDateTime,
    pub issue_closes_at: OffsetDateTime,
    pub valid_until: OffsetDateTime,
    pub created_at: OffsetDateTime,
}

/// What an admin asks for; checked by [`Campaign::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCampaign {
    pub name: String,
    pub discount: i64,
    pub quantity: u32,
    pub issue_opens_at: OffsetDateTime,
    pub issue_closes_at: OffsetDateTime,
    pub valid_until: OffsetDateTime,
}

impl Campaign {
    /// A new campaign, made `now`.
    ///
    /// # Errors
    /// [`CouponError`] naming the first rule `spec` breaks.
    pub fn new(spec: NewCampaign, now: OffsetDateTime) -> Result<Self, CouponError> {
        let name = spec.name.trim().to_owned();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(CouponError::NameLength);
        }
        if !(1..=MAX_DISCOUNT).contains(&spec.discount) {
            return Err(CouponError::DiscountOutOfRange);
        }
        if !(1..=MAX_QUANTITY).contains(&spec.quantity) {
            return Err(CouponError::QuantityOutOfRange);
        }
        if spec.issue_opens_at >= spec.issue_closes_at {
            return Err(CouponError::EmptyIssueWindow);
        }
        if spec.valid_until < spec.issue_closes_at {
            return Err(CouponError::ValidBeforeIssueCloses);
        }
        Ok(Self {
            id: CampaignId::generate(),
            name,
            discount: spec.discount,
            quantity: spec.quantity,
            issue_opens_at: spec.issue_opens_at,
            issue_closes_at: spec.issue_closes_at,
            valid_until: spec.valid_until,
            created_at: now,
        })
    }

    /// Whether coupons can be issued at `now`: `issue_opens_at <= now < issue_closes_at`.
    #[must_use]
    pub fn is_issuing(&self, now: OffsetDateTime) -> bool {
        self.issue_opens_at <= now && now < self.issue_closes_at
    }
}

/// A coupon's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CouponStatus {
    Available,
    Used,
}

impl CouponStatus {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Available => "AVAILABLE",
            Self::Used => "USED",
        }
    }

    /// # Errors
    /// When `text` is not a status.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "AVAILABLE" => Ok(Self::Available),
            "USED" => Ok(Self::Used),
            other => Err(format!("unknown coupon status {other:?}")),
        }
    }
}

/// An issued coupon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coupon {
    pub id: CouponId,
    pub campaign_id: CampaignId,
    pub user_id: UserId,
    pub discount: i64,
    pub status: CouponStatus,
    pub valid_until: OffsetDateTime,
    pub issued_at: OffsetDateTime,
}

impl Coupon {
    /// The coupon of `campaign` for `user`, issued `now`.
    #[must_use]
    pub fn issue(campaign: &Campaign, user: UserId, now: OffsetDateTime) -> Self {
        Self {
            id: CouponId::generate(),
            campaign_id: campaign.id,
            user_id: user,
            discount: campaign.discount,
            status: CouponStatus::Available,
            valid_until: campaign.valid_until,
            issued_at: now,
        }
    }
}

/// Where campaigns and coupons are kept (MySQL: the truth).
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait CouponRepository: Send + Sync {
    /// Stores a new campaign (nothing issued yet).
    async fn create_campaign(&self, campaign: &Campaign) -> Result<(), CouponRepositoryError>;

    /// The campaign, if it exists.
    async fn campaign(&self, id: CampaignId) -> Result<Option<Campaign>, CouponRepositoryError>;

    /// How many coupons of the campaign are issued (its counter: one row read, whatever the
    /// campaign's size).
    async fn issued_count(&self, id: CampaignId) -> Result<u32, CouponRepositoryError>;

    /// How many coupons of the campaign are issued, and to whom: what the fast path is
    /// rebuilt from when Redis lost it.
    async fn issued(&self, id: CampaignId) -> Result<Vec<UserId>, CouponRepositoryError>;

    /// Stores `coupon` in `tx`, counting it against its campaign's quantity in the same
    /// statement order: the campaign's `issued` counter goes up only while below
    /// `quantity`.
    ///
    /// # Errors
    /// - [`CouponRepositoryError::SoldOut`]: the campaign has `quantity` coupons already;
    /// - [`CouponRepositoryError::AlreadyIssued`]: the user has one of this campaign.
    async fn insert(&self, tx: &mut Tx, coupon: &Coupon) -> Result<(), CouponRepositoryError>;

    /// Uses coupon `id` for `payment` in `tx` (`USED`, with when and by which payment) and
    /// answers its discount: only the owner's, only while `AVAILABLE` and valid at `now`.
    /// Rolled back with the payment if the payment fails, so a failed payment leaves it
    /// `AVAILABLE`.
    ///
    /// # Errors
    /// - [`CouponRepositoryError::NotFound`]: no such coupon, or another user's (not told
    ///   apart);
    /// - [`CouponRepositoryError::NotUsable`]: used already, or expired.
    async fn use_coupon(
        &self,
        tx: &mut Tx,
        id: CouponId,
        user: UserId,
        payment: crate::payment::PaymentId,
        now: OffsetDateTime,
    ) -> Result<i64, CouponRepositoryError>;

    /// The campaign, its row locked until `tx` ends: the pessimistic baseline of the issue
    /// step (`COUPON_ISSUE_STRATEGY=mysql-lock`), where every request queues on this lock.
    async fn lock_campaign(
        &self,
        tx: &mut Tx,
        id: CampaignId,
    ) -> Result<Option<Campaign>, CouponRepositoryError>;

    /// Whether coupon `id` exists: whether a decision of that id reached MySQL.
    async fn has_coupon(&self, id: CouponId) -> Result<bool, CouponRepositoryError>;

    /// Whether `user` has a coupon of `campaign` (the reconciler asks after a decision
    /// whose insert it never saw confirmed).
    async fn exists(&self, campaign: CampaignId, user: UserId) -> Result<bool, CouponRepositoryError>;

    /// The user's coupons, newest first, at most `limit`.
    async fn of_user(&self, user: UserId, limit: u32) -> Result<Vec<Coupon>, CouponRepositoryError>;

    /// Campaigns whose issue window is open at `now` or closed less than `grace` ago: those
    /// a reconciler looks at.
    async fn recent_campaigns(
        &self,
        now: OffsetDateTime,
        grace: time::Duration,
    ) -> Result<Vec<Campaign>, CouponRepositoryError>;
}

#[derive(Debug, thiserror::Error)]
pub enum CouponRepositoryError {
    #[error("the campaign has no coupon left")]
    SoldOut,
    #[error("the user has a coupon of this campaign already")]
    AlreadyIssued,
    #[error("no such coupon of this user")]
    NotFound,
    #[error("the coupon is {0}")]
    NotUsable(&'static str),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[cfg(test)]
mod tests {
    use time::Duration;

    use super::*;

    fn spec(now: OffsetDateTime) -> NewCampaign {
        NewCampaign {
            name: " Early birds ".into(),
            discount: 1_000,
            quantity: 100,
            issue_opens_at: now,
            issue_closes_at: now + Duration::hours(1),
            valid_until: now + Duration::days(7),
        }
    }

    #[test]
    fn a_campaign_keeps_to_its_rules() {
        let now = OffsetDateTime::now_utc();
        let campaign = Campaign::new(spec(now), now).expect("valid");
        assert_eq!(campaign.name, "Early birds", "trimmed");
        assert!(campaign.is_issuing(now));
        assert!(!campaign.is_issuing(now - Duration::SECOND));
        assert!(!campaign.is_issuing(now + Duration::hours(1)), "the window closes exclusively");

        let broken = |change: fn(&mut NewCampaign)| {
            let mut spec = spec(now);
            change(&mut spec);
            Campaign::new(spec, now).unwrap_err()
        };
        assert_eq!(broken(|s| s.name = "  ".into()), CouponError::NameLength);
        assert_eq!(broken(|s| s.name = "x".repeat(101)), CouponError::NameLength);
        assert_eq!(broken(|s| s.discount = 0), CouponError::DiscountOutOfRange);
        assert_eq!(broken(|s| s.discount = MAX_DISCOUNT + 1), CouponError::DiscountOutOfRange);
        assert_eq!(broken(|s| s.quantity = 0), CouponError::QuantityOutOfRange);
        assert_eq!(broken(|s| s.quantity = MAX_QUANTITY + 1), CouponError::QuantityOutOfRange);
        assert_eq!(broken(|s| s.issue_closes_at = s.issue_opens_at), CouponError::EmptyIssueWindow);
        assert_eq!(
            broken(|s| s.valid_until = s.issue_closes_at - Duration::SECOND),
            CouponError::ValidBeforeIssueCloses
        );
    }

    #[test]
    fn a_coupon_takes_its_campaigns_discount_and_validity() {
        let now = OffsetDateTime::now_utc();
        let campaign = Campaign::new(spec(now), now).expect("valid");
        let user = UserId::generate();
        let coupon = Coupon::issue(&campaign, user, now);
        assert_eq!(
            (coupon.campaign_id, coupon.user_id, coupon.discount, coupon.status, coupon.valid_until),
            (campaign.id, user, 1_000, CouponStatus::Available, campaign.valid_until)
        );
        assert_eq!(CouponStatus::parse("USED"), Ok(CouponStatus::Used));
        assert!(CouponStatus::parse("used").is_err());
    }
}
