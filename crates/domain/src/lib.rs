//! The concert service's business core: entities, value objects, the rules they enforce and
//! the repository ports that persist them.
//!
//! This crate knows nothing of sea-orm, fred, actix or serde. Everything here is built
//! through constructors that validate, so a value of a domain type is always a valid one:
//! a [`point::ChargeAmount`] is always within 1..=10,000,000, a [`point::Balance`] never
//! negative and never above [`point::MAX_BALANCE`].
//!
//! - [`user`]: users and their repository port.
//! - [`booking`]: concerts, schedules, seats and the reservation state machine (the
//!   booking routes build on it).
//! - [`coupon`]: first-come coupon campaigns, their coupons and repository port.
//! - [`payment`]: payments of seat holds and their repository port.
//! - [`point`]: point accounts, history entries and their repository port.
//! - [`queue`]: waiting-queue tokens, their states and the admission policies.
//! - [`unit_of_work`]: the handle of a live transaction that repository ports write through.
//! - [`unavailable`]: the marker of a storage failure the caller may retry (answered 503).

/// Declares a UUID id newtype: v7 when made here, any UUID when read back.
macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(::uuid::Uuid);

        impl $name {
            /// A fresh, time-ordered id.
            #[must_use]
            pub fn generate() -> Self {
                Self(::uuid::Uuid::now_v7())
            }

            #[must_use]
            pub const fn from_uuid(id: ::uuid::Uuid) -> Self {
                Self(id)
            }

            #[must_use]
            pub const fn as_uuid(&self) -> &::uuid::Uuid {
                &self.0
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

pub mod booking;
pub mod coupon;
pub mod payment;
pub mod point;
pub mod queue;
pub mod unavailable;
pub mod unit_of_work;
pub mod user;
