//! Use cases of the concert service and the ports they need from the outside world.
//!
//! This crate depends on `domain` and on no infrastructure: no sea-orm, fred or actix.
//! It is where the order **acquire lock -> begin transaction -> commit -> release lock**
//! lives ([`tx::locked_tx`]); every use case that writes under a lock goes through it.
//!
//! - [`lock`]: the [`lock::DistributedLock`] port, its keys and wait policies.
//! - [`tx`]: the [`tx::TransactionManager`] port and the helpers that order lock and
//!   transaction.
//! - [`failure`]: the one error model for what fails below a use case; [`detach`]: writes
//!   that run to their end when the client hangs up.
//! - [`coalesce`]: round trips shared by the requests of one instance (the cache's
//!   version checks, the queue gate).
//! - [`breaker`]: circuit breakers in front of the cache and lock ports (degrade fast,
//!   recover by itself).
//! - [`cache`]: the [`cache::CachePort`] port and the read path over it ([`cache::Cache`]:
//!   versioned entries, local copies, one loader per key).
//! - [`catalog`]: concerts, dates and seat maps through the cache, and the admin writes.
//! - [`hold_seat`], [`reservations`]: seat holds, their cancel and expiry.
//! - [`coupons`]: first-come coupon campaigns (a Redis decision, MySQL the truth, a
//!   reconciler between them).
//! - [`pay`]: paying a hold with points; [`outbox`]: the outbox its events leave by.
//! - [`ranking`]: the popular-concert ranking (hourly counts in Redis, fed by the outbox
//!   relay, rebuilt from MySQL when Redis lost them).
//! - [`idempotency`]: idempotency keys, one mechanism for every retried operation.
//! - [`identity`]: API keys, access tokens (the [`identity::TokenVerifier`] port) and
//!   their signing keys.
//! - [`queue`]: the [`queue::WaitingQueue`] port and the queue's use cases.
//! - one module per use case: [`create_user`], [`charge_points`], [`get_balance`],
//!   [`point_history`].

pub mod breaker;
pub mod cache;
pub mod catalog;
pub mod charge_points;
pub mod clock;
pub mod coalesce;
pub mod coupons;
pub mod create_user;
pub mod detach;
pub mod failure;
pub mod get_balance;
pub mod hold_seat;
pub mod idempotency;
pub mod identity;
pub mod lock;
#[cfg(test)]
mod mocks;
pub mod outbox;
pub mod pay;
pub mod point_history;
pub mod queue;
pub mod ranking;
pub mod reservations;
pub mod tx;

pub use domain;
