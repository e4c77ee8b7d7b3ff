//! `CouponRepository` on MySQL, in plain SQL.
//!
//! An insert is guarded twice, whatever the Redis decision said: the campaign's `issued`
//! counter goes up only `WHERE issued < quantity` (rows affected checked) in the insert's
//! own transaction, and the coupon's row meets `UNIQUE (campaign_id, user_id)`. A refused
//! insert returns an error and its caller rolls the transaction back, the count with it.

use async_trait::async_trait;
use domain::coupon::{
    Campaign, CampaignId, Coupon, CouponId, CouponRepository, CouponRepositoryError, CouponStatus,
};
use domain::payment::PaymentId;
use domain::unit_of_work::Tx;
use domain::user::UserId;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, QueryResult, SqlErr, Statement};
use time::OffsetDateTime;

use crate::tx::connection;
use crate::{DbContext as _, column, db_error, from_db_time, sql, to_db_time};

#[derive(Clone, Debug)]
pub struct MySqlCouponRepository {
    db: DatabaseConnection,
}

impl MySqlCouponRepository {
    #[must_use]
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

/// A `coupon_campaigns` row read with [`sql::CAMPAIGN`] or [`sql::RECENT_CAMPAIGNS`].
fn campaign_from(row: &QueryResult) -> anyhow::Result<Campaign> {
    Ok(Campaign {
        id: CampaignId::from_uuid(column(row, "id")?),
        name: column(row, "name")?,
        discount: column(row, "discount")?,
        quantity: column(row, "quantity")?,
        issue_opens_at: from_db_time(column(row, "issue_opens_at")?),
        issue_closes_at: from_db_time(column(row, "issue_closes_at")?),
        valid_until: from_db_time(column(row, "valid_until")?),
        created_at: from_db_time(column(row, "created_at")?),
    })
}

/// A `coupons` row read with [`sql::USER_COUPONS`].
fn coupon_from(row: &QueryResult) -> anyhow::Result<Coupon> {
    let status = column::<String>(row, "status")?;
    Ok(Coupon {
        id: CouponId::from_uuid(column(row, "id")?),
        campaign_id: CampaignId::from_uuid(column(row, "campaign_id")?),
        user_id: UserId::from_uuid(column(row, "user_id")?),
        discount: column(row, "discount")?,
        status: CouponStatus::parse(&status).map_err(anyhow::Error::msg)?,
        valid_until: from_db_time(column(row, "valid_until")?),
        issued_at: from_db_time(column(row, "issued_at")?),
    })
}

#[async_trait]
impl CouponRepository for MySqlCouponRepository {
    #[tracing::instrument(name = "coupons.create_campaign", skip_all, fields(campaign = %campaign.id))]
    async fn create_campaign(&self, campaign: &Campaign) -> Result<(), CouponRepositoryError> {
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::INSERT_CAMPAIGN,
                [
                    (*campaign.id.as_uuid()).into(),
                    campaign.name.clone().into(),
                    campaign.discount.into(),
                    campaign.quantity.into(),
                    to_db_time(campaign.issue_opens_at).into(),
                    to_db_time(campaign.issue_closes_at).into(),
                    to_db_time(campaign.valid_until).into(),
                    to_db_time(campaign.created_at).into(),
                ],
            ))
            .await
            .db_context("failed to insert a coupon campaign")?;
        Ok(())
    }

    #[tracing::instrument(name = "coupons.campaign", skip(self))]
    async fn campaign(&self, id: CampaignId) -> Result<Option<Campaign>, CouponRepositoryError> {
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::CAMPAIGN,
                [(*id.as_uuid()).into()],
            ))
            .await
            .db_context("failed to read a coupon campaign")?;
        Ok(row.map(|row| campaign_from(&row)).transpose()?)
    }

    #[tracing::instrument(name = "coupons.lock_campaign", skip(self, tx))]
    async fn lock_campaign(
        &self,
        tx: &mut Tx,
        id: CampaignId,
    ) -> Result<Option<Campaign>, CouponRepositoryError> {
        let row = connection(tx)?
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::LOCK_CAMPAIGN,
                [(*id.as_uuid()).into()],
            ))
            .await
            .db_context("failed to lock a coupon campaign")?;
        Ok(row.map(|row| campaign_from(&row)).transpose()?)
    }

    #[tracing::instrument(name = "coupons.issued_count", skip(self))]
    async fn issued_count(&self, id: CampaignId) -> Result<u32, CouponRepositoryError> {
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::CAMPAIGN_ISSUED,
                [(*id.as_uuid()).into()],
            ))
            .await
            .db_context("failed to count a campaign's coupons")?;
        let row = row.ok_or_else(|| anyhow::anyhow!("coupon campaign {id} does not exist"))?;
        Ok(column::<u32>(&row, "issued")?)
    }

    #[tracing::instrument(name = "coupons.issued", skip(self))]
    async fn issued(&self, id: CampaignId) -> Result<Vec<UserId>, CouponRepositoryError> {
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::CAMPAIGN_HOLDERS,
                [(*id.as_uuid()).into()],
            ))
            .await
            .db_context("failed to read a campaign's coupon holders")?;
        Ok(rows
            .iter()
            .map(|row| column(row, "user_id").map(UserId::from_uuid))
            .collect::<anyhow::Result<_>>()?)
    }

    #[tracing::instrument(
        name = "coupons.insert",
        skip_all,
        fields(campaign = %coupon.campaign_id, user_id = %coupon.user_id)
    )]
    async fn insert(&self, tx: &mut Tx, coupon: &Coupon) -> Result<(), CouponRepositoryError> {
        let conn = connection(tx)?;
        // The count first: it takes the campaign row's lock, so that concurrent inserts of
        // one campaign queue there and each is counted against what the ones before it
        // committed.
        let counted = conn
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::COUNT_COUPON,
                [(*coupon.campaign_id.as_uuid()).into()],
            ))
            .await
            .db_context("failed to count a coupon against its campaign")?;
        match counted.rows_affected() {
            1 => {}
            0 => {
                // No row changed: sold out, unless there is no such campaign at all (a
                // coupon is only ever issued from a campaign read first: a broken caller).
                let campaign = conn
                    .query_one_raw(Statement::from_sql_and_values(
                        DbBackend::MySql,
                        sql::CAMPAIGN,
                        [(*coupon.campaign_id.as_uuid()).into()],
                    ))
                    .await
                    .db_context("failed to read a coupon campaign")?;
                return match campaign {
                    Some(_) => Err(CouponRepositoryError::SoldOut),
                    None => {
                        Err(anyhow::anyhow!("coupon campaign {} does not exist", coupon.campaign_id).into())
                    }
                };
            }
            n => return Err(anyhow::anyhow!("a coupon count matched {n} campaigns").into()),
        }
        let inserted = conn
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::INSERT_COUPON,
                [
                    (*coupon.id.as_uuid()).into(),
                    (*coupon.campaign_id.as_uuid()).into(),
                    (*coupon.user_id.as_uuid()).into(),
                    coupon.discount.into(),
                    coupon.status.as_str().into(),
                    to_db_time(coupon.valid_until).into(),
                    to_db_time(coupon.issued_at).into(),
                ],
            ))
            .await;
        match inserted {
            Ok(_) => Ok(()),
            // The other unique key is the primary key, a fresh v7 id: a duplicate is the
            // user's coupon of this campaign. The count above is undone with the
            // transaction, which the caller rolls back on this error.
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                Err(CouponRepositoryError::AlreadyIssued)
            }
            Err(e) => Err(db_error(e, "failed to insert a coupon").into()),
        }
    }

    #[tracing::instrument(name = "coupons.use", skip(self, tx))]
    async fn use_coupon(
        &self,
        tx: &mut Tx,
        id: CouponId,
        user: UserId,
        payment: PaymentId,
        now: OffsetDateTime,
    ) -> Result<i64, CouponRepositoryError> {
        let conn = connection(tx)?;
        let row = conn
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::COUPON_FOR_PAYMENT,
                [(*id.as_uuid()).into()],
            ))
            .await
            .db_context("failed to read a coupon")?;
        let Some(row) = row else { return Err(CouponRepositoryError::NotFound) };
        let owner: uuid::Uuid = column(&row, "user_id")?;
        if owner != *user.as_uuid() {
            return Err(CouponRepositoryError::NotFound);
        }
        let status: String = column(&row, "status")?;
        let valid_until = from_db_time(column(&row, "valid_until")?);
        if status != CouponStatus::Available.as_str() {
            return Err(CouponRepositoryError::NotUsable("used already"));
        }
        if valid_until <= now {
            return Err(CouponRepositoryError::NotUsable("expired"));
        }
        let discount: i64 = column(&row, "discount")?;
        let used = conn
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::USE_COUPON,
                [to_db_time(now).into(), (*payment.as_uuid()).into(), (*id.as_uuid()).into()],
            ))
            .await
            .db_context("failed to use a coupon")?;
        if used.rows_affected() != 1 {
            // The row is locked and was AVAILABLE a statement ago: a broken invariant.
            return Err(anyhow::anyhow!("coupon {id} changed under its row lock").into());
        }
        Ok(discount)
    }

    #[tracing::instrument(name = "coupons.has_coupon", skip(self))]
    async fn has_coupon(&self, id: CouponId) -> Result<bool, CouponRepositoryError> {
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::COUPON_EXISTS,
                [(*id.as_uuid()).into()],
            ))
            .await
            .db_context("failed to look up a coupon")?;
        Ok(row.is_some())
    }

    #[tracing::instrument(name = "coupons.exists", skip(self))]
    async fn exists(&self, campaign: CampaignId, user: UserId) -> Result<bool, CouponRepositoryError> {
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::HAS_COUPON,
                [(*campaign.as_uuid()).into(), (*user.as_uuid()).into()],
            ))
            .await
            .db_context("failed to look up a coupon")?;
        Ok(row.is_some())
    }

    #[tracing::instrument(name = "coupons.of_user", skip(self))]
    async fn of_user(&self, user: UserId, limit: u32) -> Result<Vec<Coupon>, CouponRepositoryError> {
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::USER_COUPONS,
                [(*user.as_uuid()).into(), limit.into()],
            ))
            .await
            .db_context("failed to read a user's coupons")?;
        Ok(rows.iter().map(coupon_from).collect::<anyhow::Result<_>>()?)
    }

    #[tracing::instrument(name = "coupons.recent_campaigns", skip(self))]
    async fn recent_campaigns(
        &self,
        now: OffsetDateTime,
        grace: time::Duration,
    ) -> Result<Vec<Campaign>, CouponRepositoryError> {
        let closed_since = now
            .checked_sub(grace)
            .ok_or_else(|| anyhow::anyhow!("{now} minus a grace of {grace} is out of range"))?;
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::RECENT_CAMPAIGNS,
                [to_db_time(closed_since).into(), to_db_time(now).into()],
            ))
            .await
            .db_context("failed to read the recent coupon campaigns")?;
        Ok(rows.iter().map(campaign_from).collect::<anyhow::Result<_>>()?)
    }
}
