//! Redis Cluster hash slots.
//!
//! A Redis Cluster splits the key space into 16,384 slots spread over its masters; a key's
//! slot is CRC16 of the key modulo 16,384, or of only the part between the first `{` and
//! the next `}` when there is one (the *hash tag*). A script (and a sharded pub/sub
//! message it sends) may only touch keys of one slot: on a cluster, keys of two slots fail
//! with `CROSSSLOT`, and on one node the same script would work, so the mistake hides until
//! production. Every adapter therefore builds the keys of one script under one hash tag:
//!
//! | keys | hash tag | what shares a slot |
//! |---|---|---|
//! | `lock:{<kind>:<id>}`, `...:fence`, `...:released` | the resource | one lock's key, fencing counter and release channel; locks spread over the cluster by resource |
//! | `<prefix>cache:<name>:{<id>}:v/e/w` | the cached id | one cache entry's value, version and write marks |
//! | `{<queue>}:seq`, `:waiting`, ... | the queue's name | the whole waiting queue: one slot, one master (the hot spot, see docs/redis-cluster.md) |
//! | `<prefix>coupon:{<campaignId>}:stock/users/pending` | the campaign | one campaign |
//! | `<prefix>ranking:{concerts}:...` | `concerts` | the whole ranking |
//!
//! [`debug_check`] asserts it for every script call in debug builds (the adapter and
//! end-to-end tests run them all), and the tests below check each adapter's key builders.

use fred::clients::{Client, WithOptions};
use fred::prelude::ClientLike;
use fred::types::ClusterHash;
use fred::types::config::Options;

/// The hash slot of `key` (CRC16 of its hash tag, or of the whole key without one).
#[must_use]
pub fn slot(key: &str) -> u16 {
    fred::util::redis_keyslot(key.as_bytes())
}

/// The one slot every key of `keys` lives in; `None` when they span several (or there are
/// none).
#[must_use]
pub fn shared_slot<S: AsRef<str>>(keys: &[S]) -> Option<u16> {
    let (first, rest) = keys.split_first()?;
    let slot = slot(first.as_ref());
    rest.iter().all(|key| self::slot(key.as_ref()) == slot).then_some(slot)
}

/// Debug builds: panics when the keys of one script span several slots, naming them.
#[inline]
pub(crate) fn debug_check<S: AsRef<str>>(keys: &[S]) {
    if cfg!(debug_assertions) && keys.len() > 1 && shared_slot(keys).is_none() {
        let listed: Vec<&str> = keys.iter().map(AsRef::as_ref).collect();
        panic!("the keys of one Redis script span several cluster slots: {listed:?}");
    }
}

/// `client`, sending its commands to the node that owns `key`'s slot. A command without a
/// key (`WAIT`, `INFO`) goes to any node of a cluster otherwise, while `WAIT` counts the
/// replicas of the node this connection wrote to, so it must follow the key it waits
/// for. On one server (or Sentinel's master) there is only one node and this changes
/// nothing.
pub(crate) fn routed_to(client: &Client, key: &str) -> WithOptions<Client> {
    client.with_options(&Options { cluster_hash: Some(ClusterHash::Custom(slot(key))), ..Options::default() })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use application::cache::CacheKey;
    use application::lock::LockKey;
    use application::queue::QueueConfig;
    use application::ranking::Hour;
    use domain::booking::{ReservationId, ScheduleId, SeatNumber};
    use domain::coupon::CampaignId;
    use domain::queue::AdmitPolicy;
    use domain::user::UserId;
    use fred::prelude::Builder;

    use super::{shared_slot, slot};
    use crate::lock::{fence_key, release_channel};

    fn pool() -> fred::clients::Pool {
        Builder::default_centralized().build_pool(1).expect("a pool is built without connecting")
    }

    /// The examples from the Redis Cluster specification, so that `slot` is the server's.
    #[test]
    fn slots_are_redis_cluster_slots() {
        assert_eq!(slot("123456789"), 12_739, "CRC16/XMODEM of the spec's check string");
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_ne!(slot("foo{}{bar}"), slot("bar"), "an empty tag: the whole key is hashed");
        assert_eq!(slot("foo{{bar}}zap"), slot("{bar"), "the tag ends at the first }}");
        assert_eq!(shared_slot::<&str>(&[]), None);
        assert_eq!(shared_slot(&["a{x}", "b{x}"]), Some(slot("x")));
        assert_eq!(shared_slot(&["a", "b"]), None);
    }

    fn lock_keys() -> Vec<LockKey> {
        let user = UserId::generate();
        vec![
            LockKey::point(user),
            LockKey::seat(ScheduleId::generate(), SeatNumber::new(50).expect("a seat")),
            LockKey::reservation(ReservationId::generate()),
            LockKey::idempotency(user, "0123456789abcdef"),
            LockKey::new("coupon", CampaignId::generate()),
            LockKey::new("ranking", "concerts"),
        ]
    }

    /// The acquire script takes the key and its fencing counter; the release script
    /// publishes on the key's channel. All three in the key's slot.
    #[test]
    fn a_lock_key_its_fence_and_its_release_channel_share_a_slot() {
        for key in lock_keys() {
            let together = [key.as_str().to_owned(), fence_key(&key), release_channel(key.as_str())];
            assert!(shared_slot(&together).is_some(), "{together:?}");
        }
    }

    /// The tag is the resource, not the family: locks of many users spread over the
    /// cluster instead of piling onto one master.
    #[test]
    fn locks_of_different_resources_spread_over_slots() {
        let slots: HashSet<u16> =
            (0..1_000).map(|_| slot(LockKey::point(UserId::generate()).as_str())).collect();
        assert!(slots.len() > 900, "1,000 users' locks fell into only {} slots", slots.len());
    }

    #[test]
    fn a_cache_entry_s_keys_share_a_slot() {
        let cache = crate::cache::RedisCache::with_prefix(pool(), "t:cache:".to_owned());
        for name in ["concerts", "schedules", "seats"] {
            let keys = cache.keys(&CacheKey::new(name, ScheduleId::generate().to_string()));
            assert!(shared_slot(&keys).is_some(), "{keys:?}");
        }
    }

    #[tokio::test]
    async fn the_queue_s_keys_share_a_slot() {
        let config = QueueConfig {
            active_lifetime: Duration::from_secs(60),
            waiting_idle: Duration::from_secs(60),
            policy: AdmitPolicy::MaxActive { max_active: 1 },
            admit_interval: Duration::from_secs(1),
            rate_window: Duration::from_secs(60),
        };
        let queue = crate::queue::RedisQueue::new(pool(), "concert:queue", config);
        assert_eq!(queue.keys().len(), 9);
        assert!(shared_slot(queue.keys()).is_some(), "{:?}", queue.keys());
    }

    #[test]
    fn a_campaign_s_keys_share_a_slot() {
        let gate = crate::coupons::RedisCouponGate::with_prefix(pool(), "concert:".to_owned());
        let keys = gate.keys(CampaignId::generate());
        assert!(shared_slot(&keys).is_some(), "{keys:?}");
    }

    /// The record script takes the control keys and one hour's bucket and seen set; the
    /// load script the control keys and every hour of the window.
    #[test]
    fn the_ranking_s_keys_share_a_slot() {
        let ranking = crate::ranking::RedisRanking::with_prefix(pool(), "concert:".to_owned());
        let now = Hour::of(application::clock::now_utc());
        let mut keys = ranking.control_keys();
        keys.extend(ranking.pairs(now));
        keys.push(ranking.bucket(now));
        keys.push(ranking.seen(now));
        assert!(shared_slot(&keys).is_some(), "{keys:?}");
    }
}
