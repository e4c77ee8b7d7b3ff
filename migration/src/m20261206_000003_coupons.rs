//! First-come coupons: campaigns and the coupons issued from them.
//!
//! The issue race is decided in Redis; these are the rules the database itself enforces
//! whatever Redis said (after a restart, a flush, a replayed decision):
//! - `coupon_campaigns.issued` counts the campaign's coupons. A coupon's insert first
//!   raises it with `... SET issued = issued + 1 WHERE id = ? AND issued < quantity` (rows
//!   affected checked) in the insert's own transaction, and `ck_coupon_campaigns_issued`
//!   (`issued <= quantity`) holds even against a statement that forgot the guard: never
//!   more than `quantity` coupons of a campaign. The counter's row is also where
//!   concurrent inserts of one campaign queue, one row lock instead of a count of rows.
//! - `uq_coupons_campaign_user`: one coupon per user per campaign.
//! - discounts are 1..=10,000,000 points (the largest seat price), quantities
//!   1..=1,000,000; issuing opens before it closes, and coupons stay valid at least until
//!   it closes (`Campaign::new`'s rules, restated where no code path can skip them);
//! - a coupon is USED exactly when it has a `used_at` (`ck_coupons_used`); `payment_id`
//!   is the payment that used it.
//!
//! Indexes serve the reads: the reconciler's campaigns still issuing or closed lately
//! use `ix_coupon_campaigns_closes`; a campaign's coupons (rebuilding the Redis stock and
//! user set, "does this user have one") are a range of `uq_coupons_campaign_user`; a
//! user's coupons, newest first, `ix_coupons_user` read backwards.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

const UP: &[&str] = &[
    r"CREATE TABLE coupon_campaigns (
        id BINARY(16) NOT NULL,
        name VARCHAR(100) NOT NULL,
        discount BIGINT NOT NULL,
        quantity INT UNSIGNED NOT NULL,
        issued INT UNSIGNED NOT NULL DEFAULT 0,
        issue_opens_at DATETIME(6) NOT NULL,
        issue_closes_at DATETIME(6) NOT NULL,
        valid_until DATETIME(6) NOT NULL,
        created_at DATETIME(6) NOT NULL,
        PRIMARY KEY (id),
        KEY ix_coupon_campaigns_closes (issue_closes_at),
        CONSTRAINT ck_coupon_campaigns_discount CHECK (discount BETWEEN 1 AND 10000000),
        CONSTRAINT ck_coupon_campaigns_quantity CHECK (quantity BETWEEN 1 AND 1000000),
        CONSTRAINT ck_coupon_campaigns_issued CHECK (issued <= quantity),
        CONSTRAINT ck_coupon_campaigns_window CHECK (issue_opens_at < issue_closes_at AND issue_closes_at <= valid_until)
    ) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin",
    r"CREATE TABLE coupons (
        id BINARY(16) NOT NULL,
        campaign_id BINARY(16) NOT NULL,
        user_id BINARY(16) NOT NULL,
        discount BIGINT NOT NULL,
        status VARCHAR(10) CHARACTER SET ascii NOT NULL DEFAULT 'AVAILABLE',
        valid_until DATETIME(6) NOT NULL,
        issued_at DATETIME(6) NOT NULL,
        used_at DATETIME(6) NULL,
        payment_id BINARY(16) NULL,
        PRIMARY KEY (id),
        UNIQUE KEY uq_coupons_campaign_user (campaign_id, user_id),
        KEY ix_coupons_user (user_id, issued_at),
        CONSTRAINT fk_coupons_campaign FOREIGN KEY (campaign_id) REFERENCES coupon_campaigns (id),
        CONSTRAINT fk_coupons_user FOREIGN KEY (user_id) REFERENCES users (id),
        CONSTRAINT ck_coupons_discount CHECK (discount BETWEEN 1 AND 10000000),
        CONSTRAINT ck_coupons_status CHECK (status IN ('AVAILABLE', 'USED')),
        CONSTRAINT ck_coupons_used CHECK ((status = 'USED') = (used_at IS NOT NULL))
    ) ENGINE = InnoDB",
];

const DOWN: &[&str] = &["DROP TABLE IF EXISTS coupons", "DROP TABLE IF EXISTS coupon_campaigns"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(manager, UP).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        crate::execute_all(manager, DOWN).await
    }
}
