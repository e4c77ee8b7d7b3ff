//! Redis adapters, on fred: the distributed lock family and the cache.
//!
//! - [`connection`]: connecting a command pool and a pub/sub subscriber.
//! - [`lock`]: [`lock::RedisLock`], the `DistributedLock` port: owner tokens, leases
//!   renewed by a watchdog, fencing numbers, and three ways of waiting.
//! - [`quorum`]: [`quorum::QuorumLock`], the same port over several independent Redis
//!   nodes (Redlock), with fencing numbers that stay monotonic across majorities.
//! - [`cache`]: [`cache::RedisCache`], the `CachePort` port.
//! - [`queue`]: [`queue::RedisQueue`], the `WaitingQueue` port (the default queue).
//! - [`events`]: payment events on a Redis Stream: the outbox publisher, an idempotent consumer.
//! - [`coupons`]: [`coupons::RedisCouponGate`], the `CouponGate` port: the first-come coupon
//!   decision, one atomic script per request.
//! - [`ranking`]: [`ranking::RedisRanking`], the `RankingStore` port: hourly counts of
//!   completed payments per concert, counted once each, rebuilt from MySQL when lost.
//!
//! - [`slots`]: Redis Cluster hash slots: which keys share one, and the check that every
//!   script's keys do.
//!
//! This crate never decides *what* to lock or cache; application use cases do.

pub mod cache;
pub mod connection;
pub mod coupons;
pub mod events;
pub mod lock;
pub mod queue;
pub mod quorum;
pub mod ranking;
pub mod slots;
