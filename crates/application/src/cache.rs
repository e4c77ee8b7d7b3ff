//! The cache: cache-aside in front of MySQL, shared by every instance, never wrong.
//!
//! [`CachePort`] is what a store must offer (Redis in production): each key has a
//! *version* besides its value, an entry is valid only for the version it was stored
//! under, and an eviction moves the version on. [`Cache`] builds the read path on it:
//!
//! - **Fresh after every write, whatever fails.** A write marks the key *before* its
//!   commit ([`Cache::begin_write`]: the version moves on, the entry goes, and until the
//!   mark is lifted every read goes to MySQL and no load may store), and lifts the mark
//!   after its commit, before its answer goes out ([`Cache::end_write`], moving the version
//!   on again). A mark that cannot be set fails the write (nothing changed, 503), as a
//!   lock does; one that cannot be lifted (Redis gone, the request cancelled) simply runs
//!   out, and meanwhile reads bypass the cache. Every read asks the store for the current
//!   version and marks (one small round trip), so no instance serves an answer from
//!   before a write that returned.
//! - **The cache-aside race closed.** A loader reads the version *before* it reads MySQL
//!   and stores its value only if the version is still the same ([`CachePort::store`] is a
//!   compare-and-set): a reader that loaded the old row before a write committed cannot
//!   put it back after that write's eviction.
//! - **Cheap hits.** Each instance keeps a decoded copy of what it read, tagged with its
//!   version; while the store's version matches, the store sends back no value at all.
//! - **One version check per round trip, not per request.** The requests of one instance
//!   for one key share their checks: a request joins the *next* check to go out, never one
//!   already on its way, so every answer comes from a check sent after its request
//!   arrived (a write that returned before a request was sent is always seen). While one
//!   check is out, the requests arriving meanwhile wait and go together in the next:
//!   under a crowd, one check per round trip per key and instance instead of one per
//!   request ([`Cache::checked`], on [`crate::coalesce`]). A slow check does not hold the
//!   next ones back for long (a new one goes out after 50 ms, up to 8 at once per key;
//!   beyond that the requests read the database). `cache_errors_total{op=read}`
//!   counts failed checks, `cache_requests_total{result=bypass}` the requests they sent to
//!   the database.
//! - **One loader per key** across all instances when many miss at once: the first claims
//!   the load in the store, the others (and, within an instance, every other request for
//!   the key) wait for its value, up to a bound, then load themselves. TTLs get jitter.
//!   ([`CacheSettings::single_loader`] turns this off for the benchmark's baseline.)
//! - **The cache is never a reason to fail.** A store that cannot be reached, or an entry
//!   that does not decode, sends the read to MySQL and is counted; locks, by contrast,
//!   fail closed.
//!
//! Metrics (label `cache`, one of a fixed set of names): `cache_requests_total{result}`
//! (`local` hit, `hit`, `miss`, `writing` while a write is marked, `bypass` when the store
//! failed), `cache_loads_total`,
//! `cache_load_waits_total{outcome}` (`filled`, `timeout`), `cache_store_rejected_total`
//! (a load that lost the race to a write), `cache_decode_failures_total`,
//! `cache_errors_total{op}`, `cache_writes_total`.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::coalesce::Coalesced;

/// What a [`Cache::peek`] found when it found no value: the answer of its version check
/// (`None` inside: the store could not be read), for [`Cache::get_or_load_after`] to go on
/// from; or nothing, when no check was made.
#[derive(Debug)]
pub struct Peeked(Option<Option<CacheRead>>);

impl Peeked {
    /// No check was made (no cache, or the caller did not peek): the next read checks.
    pub const NOTHING: Self = Self(None);
}

/// Which answer a cache key holds: a fixed name (a metric label) and an id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    name: &'static str,
    id: String,
}

impl CacheKey {
    #[must_use]
    pub fn new(name: &'static str, id: impl Into<String>) -> Self {
        Self { name, id: id.into() }
    }

    #[must_use]
    pub const fn name(&self) -> &'static str {
        self.name
    }

    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cache:{}:{}", self.name, self.id)
    }
}

/// What [`CachePort::read`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheRead {
    /// A write to this answer is under way: read the database, store nothing.
    Writing,
    /// The current version is the one the caller already has a copy of.
    Unchanged { version: u64 },
    /// The entry stored for the current version, and how long it has left.
    Entry { version: u64, json: String, ttl_left: Duration },
    /// No entry for the current version (none at all, or one from before a write).
    /// Version 0 means the key has no version yet.
    Missing { version: u64 },
}

/// A key-value store with a version and write marks per key. A version only moves
/// forward, and each write moves it to at least the store's clock in microseconds, so a
/// version lost with a failover or an eviction never comes back to a value an entry was
/// stored under.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait CachePort: Send + Sync {
    /// Whether a write is marked and, if not, the current version of `key` and (unless it
    /// equals `known`) the entry stored for it, in one round trip. Creates nothing.
    async fn read(&self, key: &CacheKey, known: Option<u64>) -> Result<CacheRead, CacheError>;

    /// Stores `json` under `key` for `ttl`, only if no write is marked and the current
    /// version is still `version` (0: still none); the version it was stored under, or
    /// `None` when refused (the value may be stale: not stored).
    async fn store(
        &self,
        key: &CacheKey,
        version: u64,
        json: String,
        ttl: Duration,
    ) -> Result<Option<u64>, CacheError>;

    /// Marks a write under `token` for at most `ttl`, moves the version on and drops the
    /// entry.
    async fn begin_write(&self, key: &CacheKey, token: u64, ttl: Duration) -> Result<(), CacheError>;

    /// Moves the version on, drops the entry and lifts `token`'s mark.
    async fn end_write(&self, key: &CacheKey, token: u64) -> Result<(), CacheError>;

    /// Claims the right to load `key` for `ttl` under `token`: `false` when another
    /// loader holds it.
    async fn claim_load(&self, key: &CacheKey, token: u64, ttl: Duration) -> Result<bool, CacheError>;

    /// Gives a claim back, if it is still `token`'s.
    async fn release_load(&self, key: &CacheKey, token: u64) -> Result<(), CacheError>;
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("the cache is unavailable")]
    Unavailable(#[source] anyhow::Error),
}

/// One kind of cached answer: its name (in keys and metric labels) and lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSpec {
    pub name: &'static str,
    /// The longest an entry lives; each store takes up to a tenth off (jitter), so that
    /// entries filled together do not all run out together.
    pub ttl: Duration,
}

impl CacheSpec {
    fn jittered_ttl(&self) -> Duration {
        self.ttl.mul_f64(1.0 - fastrand::f64() / 10.0).max(Duration::from_millis(1))
    }
}

/// How the read path waits and how much it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// How long a request waits for another instance's loader before loading itself.
    pub loader_wait: Duration,
    /// How often it looks for that value meanwhile.
    pub loader_poll: Duration,
    /// How long a load claim lasts if its loader dies without giving it back.
    pub load_claim: Duration,
    /// Most keys with a local copy per instance.
    pub local_capacity: usize,
    /// The longest a write mark lasts if it is never lifted: longer than any write may
    /// take between its mark and its commit (the lock's longest hold).
    pub write_mark: Duration,
    /// One loader per key (`true`, the default): a miss queues on its instance's fill
    /// mutex and claims the load across instances, or waits for the claim's holder.
    /// `false` lets every miss load by itself at once (no queue, no claim, no wait); what
    /// it loaded is still stored under the version read right before loading, exactly as a
    /// leader's. The benchmark's baseline (`CACHE_SINGLE_LOADER=false`); never turn it off
    /// in production.
    pub single_loader: bool,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            loader_wait: Duration::from_millis(500),
            loader_poll: Duration::from_millis(5),
            load_claim: Duration::from_secs(5),
            local_capacity: 10_000,
            write_mark: Duration::from_secs(30),
            single_loader: true,
        }
    }
}

/// The read path over a [`CachePort`], or straight to the loader when there is none
/// (`CACHE_ENABLED=false`, the baseline of the benchmark).
pub struct Cache {
    port: Option<Arc<dyn CachePort>>,
    settings: CacheSettings,
    slots: Mutex<HashMap<CacheKey, Arc<Slot>>>,
    /// The runtime the cache was made on (the server's main one): the keys' shared checks
    /// run there ([`Coalesced::on`]).
    runtime: Option<tokio::runtime::Handle>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("enabled", &self.port.is_some())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A key's local copy, the mutex that lets one request of this instance fill it, and its
/// shared version checks.
struct Slot {
    copy: Mutex<Option<LocalCopy>>,
    fill: tokio::sync::Mutex<()>,
    /// The version checks of this key, shared by its requests ([`Cache::checked`]).
    checks: Arc<Coalesced<(), Option<CacheRead>>>,
}

#[derive(Clone)]
struct LocalCopy {
    version: u64,
    value: Arc<dyn Any + Send + Sync>,
    until: Instant,
}

impl Slot {
    fn on(runtime: Option<tokio::runtime::Handle>) -> Self {
        Self {
            copy: Mutex::default(),
            fill: tokio::sync::Mutex::default(),
            checks: Arc::new(Coalesced::on(runtime, usize::MAX)),
        }
    }

    fn copy(&self) -> Option<LocalCopy> {
        let copy = self.copy.lock().unwrap_or_else(PoisonError::into_inner);
        copy.as_ref().filter(|c| c.until > Instant::now()).cloned()
    }

    fn keep(&self, version: u64, value: Arc<dyn Any + Send + Sync>, ttl: Duration) {
        let mut copy = self.copy.lock().unwrap_or_else(PoisonError::into_inner);
        // Never replace a copy of a newer version with an older one.
        if copy.as_ref().is_none_or(|c| c.version <= version) {
            *copy = Some(LocalCopy { version, value, until: Instant::now() + ttl });
        }
    }

    /// The local copy, if it is of `version` and of type `T`.
    fn copy_at<T: Send + Sync + 'static>(&self, version: u64) -> Option<Arc<T>> {
        self.copy().filter(|c| c.version == version).and_then(|c| c.value.downcast().ok())
    }

    fn is_live(&self) -> bool {
        self.copy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|c| c.until > Instant::now())
    }
}

fn count(name: &'static str, cache: &'static str) {
    metrics::counter!(name, "cache" => cache).increment(1);
}

fn count_with(name: &'static str, cache: &'static str, label: &'static str, value: &'static str) {
    metrics::counter!(name, "cache" => cache, label => value).increment(1);
}

impl Cache {
    #[must_use]
    pub fn new(port: Arc<dyn CachePort>, settings: CacheSettings) -> Self {
        let runtime = tokio::runtime::Handle::try_current().ok();
        Self { port: Some(port), settings, slots: Mutex::default(), runtime }
    }

    /// No cache: every read loads.
    #[must_use]
    pub fn disabled() -> Self {
        Self { port: None, settings: CacheSettings::default(), slots: Mutex::default(), runtime: None }
    }

    /// The value of `spec`/`id`: from this instance's copy while the store's version
    /// matches it, else from the store, else from `load` (whose value is then stored,
    /// unless a write moved the version on meanwhile). `Ok(None)` when `load` finds
    /// nothing (nothing is cached then). While a write is marked, straight from `load`.
    ///
    /// # Errors
    /// Only `load`'s own errors: the cache's are counted and bypassed.
    pub async fn get_or_load<T, E, F, Fut>(
        &self,
        spec: &CacheSpec,
        id: &str,
        load: F,
    ) -> Result<Option<Arc<T>>, E>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let Some(port) = &self.port else {
            return Ok(load().await?.map(Arc::new));
        };
        let key = CacheKey::new(spec.name, id);
        let slot = self.slot(&key);
        let read = Self::checked(port, &key, &slot).await;
        if let Some(value) = self.hit(spec, &key, &slot, read.as_ref()) {
            return Ok(Some(value));
        }
        self.load_after(port, spec, &key, &slot, read, load).await
    }

    /// [`Cache::get_or_load`] going on from the version check of a [`Cache::peek`] that
    /// found no value, instead of sending one more: the same answer and counts, one check.
    ///
    /// # Errors
    /// Only `load`'s own errors.
    pub async fn get_or_load_after<T, E, F, Fut>(
        &self,
        spec: &CacheSpec,
        id: &str,
        peeked: Peeked,
        load: F,
    ) -> Result<Option<Arc<T>>, E>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let (Some(port), Peeked(Some(read))) = (&self.port, peeked) else {
            // No cache, or nothing was peeked at: the whole read path.
            return self.get_or_load(spec, id, load).await;
        };
        let key = CacheKey::new(spec.name, id);
        let slot = self.slot(&key);
        self.load_after(port, spec, &key, &slot, read, load).await
    }

    /// The read path after a check that gave no value: straight from `load` when the store
    /// could not be read or a write is marked, else a miss at the version read.
    async fn load_after<T, E, F, Fut>(
        &self,
        port: &Arc<dyn CachePort>,
        spec: &CacheSpec,
        key: &CacheKey,
        slot: &Slot,
        read: Option<CacheRead>,
        load: F,
    ) -> Result<Option<Arc<T>>, E>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        let version = match read {
            None => {
                count_with("cache_requests_total", spec.name, "result", "bypass");
                return Ok(load().await?.map(Arc::new));
            }
            Some(CacheRead::Writing) => {
                count_with("cache_requests_total", spec.name, "result", "writing");
                return Ok(load().await?.map(Arc::new));
            }
            // Not a hit: no copy of it here, or an entry that did not decode.
            Some(
                CacheRead::Unchanged { version }
                | CacheRead::Entry { version, .. }
                | CacheRead::Missing { version },
            ) => version,
        };
        count_with("cache_requests_total", spec.name, "result", "miss");
        self.fill(port.as_ref(), spec, key, slot, version, load).await
    }

    /// The value of `spec`/`id` if the cache can give it now, as fresh as
    /// [`Cache::get_or_load`]'s (from a version check sent after this call began), without
    /// ever loading: no value on a miss, while a write is marked, when the store cannot be
    /// read, and with no cache. For a caller that starts this read before it knows whether
    /// it may load (the seat map, while the queue gate is asked): without a value it goes through
    /// [`Cache::get_or_load_after`] with what it hands back, which goes on from its check
    /// (so a miss costs one check, not two) and counts that request's outcome; only hits
    /// are counted here.
    ///
    /// # Errors
    /// No value: [`Peeked`], what the check found instead.
    pub async fn peek<T>(&self, spec: &CacheSpec, id: &str) -> Result<Arc<T>, Peeked>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let Some(port) = self.port.as_ref() else {
            return Err(Peeked::NOTHING);
        };
        let key = CacheKey::new(spec.name, id);
        let slot = self.slot(&key);
        let read = Self::checked(port, &key, &slot).await;
        self.hit(spec, &key, &slot, read.as_ref()).ok_or(Peeked(Some(read)))
    }

    /// The value a check's answer `read` gives without loading: this instance's copy when
    /// the version is unchanged, or the entry sent back (decoded once per instance and
    /// version). Counts the hit.
    fn hit<T>(
        &self,
        spec: &CacheSpec,
        key: &CacheKey,
        slot: &Slot,
        read: Option<&CacheRead>,
    ) -> Option<Arc<T>>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let (value, result) = match read? {
            CacheRead::Unchanged { version } => (slot.copy_at::<T>(*version)?, "local"),
            CacheRead::Entry { version, json, ttl_left } => {
                // Another request of the same check may have decoded it already.
                let value = match slot.copy_at::<T>(*version) {
                    Some(value) => value,
                    None => self.decode::<T>(spec, key, slot, *version, json, *ttl_left)?,
                };
                (value, "hit")
            }
            CacheRead::Writing | CacheRead::Missing { .. } => return None,
        };
        count_with("cache_requests_total", spec.name, "result", result);
        Some(value)
    }

    /// What the store says of `key` now: the answer of a version check sent after this call
    /// began (the next one to go out, shared with the other requests for `key` that arrive
    /// before it goes; see [`crate::coalesce`]); `None` when the store could not be read
    /// (counted and logged once per check) or stalled.
    async fn checked(port: &Arc<dyn CachePort>, key: &CacheKey, slot: &Arc<Slot>) -> Option<CacheRead> {
        let (port, key, checked_slot) = (Arc::clone(port), key.clone(), Arc::clone(slot));
        let send = move |requests: Vec<()>| {
            let (port, key, slot) = (Arc::clone(&port), key.clone(), Arc::clone(&checked_slot));
            async move { vec![Self::check(port.as_ref(), &key, &slot).await; requests.len()] }
        };
        slot.checks.ask((), send).await.flatten()
    }

    /// One version check, for every request of its batch.
    async fn check(port: &dyn CachePort, key: &CacheKey, slot: &Slot) -> Option<CacheRead> {
        let known = slot.copy().map(|c| c.version);
        match port.read(key, known).await {
            Ok(read) => Some(read),
            Err(error) => {
                count_with("cache_errors_total", key.name(), "op", "read");
                tracing::debug!(%key, error = format!("{error:#}"), "cache unreachable; reading the database");
                None
            }
        }
    }

    /// Decodes an entry and keeps it as this instance's copy; `None` (counted, logged)
    /// when it does not decode: an old format after a deploy, or garbage, reloaded and
    /// overwritten by the miss path.
    fn decode<T>(
        &self,
        spec: &CacheSpec,
        key: &CacheKey,
        slot: &Slot,
        version: u64,
        json: &str,
        ttl: Duration,
    ) -> Option<Arc<T>>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        match serde_json::from_str::<T>(json) {
            Ok(value) => {
                let value = Arc::new(value);
                slot.keep(version, value.clone(), ttl);
                Some(value)
            }
            Err(error) => {
                count("cache_decode_failures_total", spec.name);
                tracing::warn!(%key, %error, "cached value does not decode; reloading");
                None
            }
        }
    }

    /// The miss path: one request per instance, one loader across instances (unless
    /// [`CacheSettings::single_loader`] is off: then this request loads at once, and
    /// stores as a leader does).
    async fn fill<T, E, F, Fut>(
        &self,
        port: &dyn CachePort,
        spec: &CacheSpec,
        key: &CacheKey,
        slot: &Slot,
        version: u64,
        load: F,
    ) -> Result<Option<Arc<T>>, E>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
    {
        // Without the single loader (the benchmark's baseline) there is no queue, no claim
        // and no wait: straight to the leader's path below, with no claim to give back.
        let (_filling, claim) = if self.settings.single_loader {
            // Bounded: a request that queued this long behind its instance's loader (MySQL
            // slow or down) loads by itself rather than wait for every one ahead of it.
            let Ok(filling) = tokio::time::timeout(self.settings.loader_wait, slot.fill.lock()).await else {
                count_with("cache_load_waits_total", spec.name, "outcome", "timeout");
                count("cache_loads_total", spec.name);
                return Ok(load().await?.map(Arc::new));
            };
            // Another request of this instance may have filled it while this one queued (a
            // later version is as fresh: versions only grow past any this request saw). Not
            // when Redis has no version at all (0): then no copy can be shown current.
            if let Some(value) = slot
                .copy()
                .filter(|c| version != 0 && c.version >= version)
                .and_then(|c| c.value.downcast::<T>().ok())
            {
                count_with("cache_load_waits_total", spec.name, "outcome", "filled");
                return Ok(Some(value));
            }
            let token = fastrand::u64(..);
            let mut leader = match port.claim_load(key, token, self.settings.load_claim).await {
                Ok(leader) => leader,
                Err(error) => {
                    count_with("cache_errors_total", spec.name, "op", "claim");
                    tracing::debug!(%key, error = format!("{error:#}"), "cannot claim the load; loading anyway");
                    true
                }
            };
            if !leader {
                match self.wait_for_loader::<T>(port, spec, key, slot, token).await {
                    Waited::Value(value) => return Ok(Some(value)),
                    Waited::Claimed => leader = true,
                    Waited::GaveUp => {}
                }
            }
            (Some(filling), leader.then(|| Claim::new(self.port.clone(), key.clone(), token)))
        } else {
            (None, None)
        };
        // The version to store under is read again right before loading: writes may have
        // moved it while this request queued, and a value loaded now is fresh for the
        // version as it is now.
        let store_under = match port.read(key, None).await {
            Ok(CacheRead::Entry { version, json, ttl_left }) => {
                if let Some(value) = self.decode::<T>(spec, key, slot, version, &json, ttl_left) {
                    count_with("cache_load_waits_total", spec.name, "outcome", "filled");
                    if let Some(claim) = claim {
                        claim.release().await;
                    }
                    return Ok(Some(value));
                }
                Some(version)
            }
            Ok(CacheRead::Missing { version } | CacheRead::Unchanged { version }) => Some(version),
            Ok(CacheRead::Writing) => None,
            Err(_) => Some(version),
        };
        count("cache_loads_total", spec.name);
        let value = match load().await {
            Ok(Some(value)) => Arc::new(value),
            Ok(None) => return Ok(None),
            Err(error) => return Err(error),
        };
        if let Some(version) = store_under {
            self.store(port, spec, key, slot, version, &value).await;
        }
        if let Some(claim) = claim {
            claim.release().await;
        }
        Ok(Some(value))
    }

    async fn store<T>(
        &self,
        port: &dyn CachePort,
        spec: &CacheSpec,
        key: &CacheKey,
        slot: &Slot,
        version: u64,
        value: &Arc<T>,
    ) where
        T: Serialize + Send + Sync + 'static,
    {
        let ttl = spec.jittered_ttl();
        let json = match serde_json::to_string(value.as_ref()) {
            Ok(json) => json,
            Err(error) => return tracing::error!(%key, %error, "a loaded value does not encode"),
        };
        match port.store(key, version, json, ttl).await {
            Ok(Some(stored)) => slot.keep(stored, value.clone(), ttl),
            Ok(None) => {
                // A write moved the version on (or is marked) since this load read it: the
                // value may predate that write, so it is not kept. This request still gets
                // it: it began before that write's answer went out.
                count("cache_store_rejected_total", spec.name);
            }
            Err(error) => {
                count_with("cache_errors_total", spec.name, "op", "store");
                tracing::debug!(%key, error = format!("{error:#}"), "cannot store a loaded value");
            }
        }
    }

    /// Waits for another instance's loader: its value, or the claim once it is given up
    /// with nothing stored (a load that found nothing, or failed), or the bound.
    async fn wait_for_loader<T>(
        &self,
        port: &dyn CachePort,
        spec: &CacheSpec,
        key: &CacheKey,
        slot: &Slot,
        token: u64,
    ) -> Waited<T>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        let deadline = Instant::now() + self.settings.loader_wait;
        while Instant::now() < deadline {
            tokio::time::sleep(self.settings.loader_poll).await;
            match port.read(key, None).await {
                Ok(CacheRead::Entry { version, json, ttl_left }) => {
                    if let Some(value) = self.decode::<T>(spec, key, slot, version, &json, ttl_left) {
                        count_with("cache_load_waits_total", spec.name, "outcome", "filled");
                        return Waited::Value(value);
                    }
                    return Waited::GaveUp;
                }
                Ok(CacheRead::Missing { .. } | CacheRead::Unchanged { .. }) => {
                    if let Ok(true) = port.claim_load(key, token, self.settings.load_claim).await {
                        return Waited::Claimed;
                    }
                }
                Ok(CacheRead::Writing) | Err(_) => return Waited::GaveUp,
            }
        }
        count_with("cache_load_waits_total", spec.name, "outcome", "timeout");
        Waited::GaveUp
    }

    /// Marks a write of `spec`/`id` (call it inside the write's lock, before its commit):
    /// the version moves on, the entry goes, and until [`Cache::end_write`] (or the mark's
    /// lifetime) every read bypasses the cache and no load stores. `None` when there is
    /// no cache.
    ///
    /// # Errors
    /// [`CacheError::Unavailable`]: the write must not go ahead (it could leave a stale
    /// answer cached), as when its lock cannot be had.
    pub async fn begin_write(&self, spec: &CacheSpec, id: &str) -> Result<Option<WriteMark>, CacheError> {
        let Some(port) = &self.port else { return Ok(None) };
        let key = CacheKey::new(spec.name, id);
        let token = fastrand::u64(..);
        port.begin_write(&key, token, self.settings.write_mark).await.inspect_err(|_| {
            count_with("cache_errors_total", spec.name, "op", "begin_write");
        })?;
        count("cache_writes_total", spec.name);
        Ok(Some(WriteMark { port: Arc::clone(port), key, token, name: spec.name }))
    }

    /// Lifts write marks after the write's commit, before its answer goes out. Runs to
    /// the end even if the request is cancelled meanwhile; a mark that cannot be lifted
    /// runs out on its own (reads bypass the cache until then), so this never fails.
    pub async fn end_write(&self, marks: Vec<WriteMark>) {
        if marks.is_empty() {
            return;
        }
        let lifted = tokio::spawn(async move {
            for mark in marks {
                mark.lift().await;
            }
        });
        let _ = lifted.await;
    }

    fn slot(&self, key: &CacheKey) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get(key) {
            return Arc::clone(slot);
        }
        if slots.len() >= self.settings.local_capacity {
            // Bounded: keep what is in use or still fresh; if that is still too much, keep
            // only what is in use.
            slots.retain(|_, slot| Arc::strong_count(slot) > 1 || slot.is_live());
            if slots.len() >= self.settings.local_capacity {
                slots.retain(|_, slot| Arc::strong_count(slot) > 1);
            }
        }
        Arc::clone(slots.entry(key.clone()).or_insert_with(|| Arc::new(Slot::on(self.runtime.clone()))))
    }

    /// How many keys have a slot on this instance (bounded by `local_capacity` plus those
    /// in use).
    #[must_use]
    pub fn local_keys(&self) -> usize {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

enum Waited<T> {
    Value(Arc<T>),
    Claimed,
    GaveUp,
}

/// A write marked on one cached answer; lift it with [`Cache::end_write`] after the
/// commit. Dropped without that (a failed commit, a cancelled request), it stays until it
/// runs out: lifting it early could let a read store rows from before a commit that is
/// still landing.
pub struct WriteMark {
    port: Arc<dyn CachePort>,
    key: CacheKey,
    token: u64,
    name: &'static str,
}

impl std::fmt::Debug for WriteMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteMark").field("key", &self.key).finish_non_exhaustive()
    }
}

impl WriteMark {
    async fn lift(self) {
        if let Err(error) = self.port.end_write(&self.key, self.token).await {
            count_with("cache_errors_total", self.name, "op", "end_write");
            tracing::warn!(key = %self.key, error = format!("{error:#}"), "write mark not lifted; it runs out on its own");
        }
    }
}

/// A load claim, given back when the load is done, or from `Drop` when the request was
/// cancelled mid-load (so that other loaders need not wait out its TTL).
struct Claim {
    port: Option<Arc<dyn CachePort>>,
    key: CacheKey,
    token: u64,
}

impl Claim {
    fn new(port: Option<Arc<dyn CachePort>>, key: CacheKey, token: u64) -> Self {
        Self { port, key, token }
    }

    async fn release(mut self) {
        if let Some(port) = self.port.take()
            && let Err(error) = port.release_load(&self.key, self.token).await
        {
            tracing::debug!(key = %self.key, error = format!("{error:#}"), "load claim not given back; it runs out");
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(port) = self.port.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (key, token) = (self.key.clone(), self.token);
            runtime.spawn(async move {
                let _ = port.release_load(&key, token).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const SPEC: CacheSpec = CacheSpec { name: "seats", ttl: Duration::from_secs(10) };

    fn down() -> CacheError {
        CacheError::Unavailable(anyhow::anyhow!("connection refused"))
    }

    /// A port whose reads answer `reads` in order, recording the version each asked with.
    fn port_reading(reads: Vec<CacheRead>, known: Arc<Mutex<Vec<Option<u64>>>>) -> MockCachePort {
        let reads = Mutex::new(VecDeque::from(reads));
        let mut port = MockCachePort::new();
        port.expect_read().returning(move |_, asked| {
            known.lock().unwrap().push(asked);
            Ok(reads.lock().unwrap().pop_front().expect("no more reads expected"))
        });
        port
    }

    /// [`port_reading`] where this instance always wins the load claim.
    fn leading_port_reading(reads: Vec<CacheRead>, known: Arc<Mutex<Vec<Option<u64>>>>) -> MockCachePort {
        let mut port = port_reading(reads, known);
        port.expect_claim_load().returning(|_, _, _| Ok(true));
        port.expect_release_load().returning(|_, _| Ok(()));
        port
    }

    async fn get(cache: &Cache, loads: &AtomicUsize, value: u32) -> Option<u32> {
        let found = cache
            .get_or_load(&SPEC, "s", || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(Some(value))
            })
            .await
            .expect("never fails");
        found.map(|v| *v)
    }

    /// A port whose every read finds no entry for version 5.
    fn port_missing_at_5() -> MockCachePort {
        let mut port = MockCachePort::new();
        port.expect_read().returning(|_, _| Ok(CacheRead::Missing { version: 5 }));
        port
    }

    /// `n` misses of one key at once on one instance; each load takes 20 ms, so that they
    /// are all in flight together. What each got, and how many loads ran.
    async fn stampede(port: MockCachePort, single_loader: bool, n: usize) -> (Vec<Option<u32>>, usize) {
        let settings =
            CacheSettings { single_loader, loader_wait: Duration::from_secs(10), ..CacheSettings::default() };
        let cache = Cache::new(Arc::new(port), settings);
        let loads = AtomicUsize::new(0);
        let (cache, loads) = (&cache, &loads);
        let found = futures::future::join_all((0..n).map(|_| async move {
            let found = cache
                .get_or_load(&SPEC, "s", || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok::<_, String>(Some(7_u32))
                })
                .await
                .expect("never fails");
            found.map(|v| *v)
        }))
        .await;
        (found, loads.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn concurrent_misses_of_one_key_on_one_instance_load_once_with_the_single_loader() {
        let mut port = port_missing_at_5();
        port.expect_claim_load().times(1).returning(|_, _, _| Ok(true));
        port.expect_release_load().times(1).returning(|_, _| Ok(()));
        port.expect_store()
            .withf(|_, v, json, _| *v == 5 && json == "7")
            .times(1)
            .returning(|_, _, _, _| Ok(Some(5)));

        let (found, loads) = stampede(port, true, 20).await;

        assert_eq!(found, vec![Some(7); 20]);
        assert_eq!(loads, 1, "one load; the others got its value");
    }

    #[tokio::test]
    async fn without_the_single_loader_every_concurrent_miss_loads_and_stores_by_itself() {
        let mut port = port_missing_at_5();
        port.expect_claim_load().never();
        port.expect_release_load().never();
        port.expect_store()
            .withf(|_, v, json, _| *v == 5 && json == "7")
            .times(20)
            .returning(|_, _, _, _| Ok(Some(5)));

        let (found, loads) = stampede(port, false, 20).await;

        assert_eq!(found, vec![Some(7); 20]);
        assert_eq!(loads, 20, "no queue, no claim, no wait: every miss loads");
    }

    #[tokio::test]
    async fn without_the_single_loader_a_load_is_stored_under_the_version_read_right_before_it() {
        let known = Arc::new(Mutex::new(Vec::new()));
        let mut port = port_reading(
            vec![CacheRead::Missing { version: 5 }, CacheRead::Missing { version: 6 }],
            Arc::clone(&known),
        );
        port.expect_claim_load().never();
        port.expect_store().withf(|_, v, _, _| *v == 6).times(1).returning(|_, _, _, _| Ok(None));
        let settings = CacheSettings { single_loader: false, ..CacheSettings::default() };
        let cache = Cache::new(Arc::new(port), settings);
        let loads = AtomicUsize::new(0);

        assert_eq!(get(&cache, &loads, 1).await, Some(1), "a refused store still answers");
        assert_eq!(known.lock().unwrap().len(), 2, "the version was read again before loading");

        // A write marked between the first read and the load: loaded, nothing stored.
        let mut port =
            port_reading(vec![CacheRead::Missing { version: 6 }, CacheRead::Writing], Arc::default());
        port.expect_store().never();
        let cache = Cache::new(Arc::new(port), settings);
        assert_eq!(get(&cache, &loads, 2).await, Some(2));
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_store_that_cannot_be_reached_sends_every_read_to_the_loader_and_stores_nothing() {
        let mut port = MockCachePort::new();
        port.expect_read().returning(|_, _| Err(down()));
        port.expect_claim_load().never();
        port.expect_store().never();
        let cache = Cache::new(Arc::new(port), CacheSettings::default());
        let loads = AtomicUsize::new(0);

        assert_eq!(get(&cache, &loads, 1).await, Some(1));
        assert_eq!(get(&cache, &loads, 2).await, Some(2));
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn while_a_write_is_marked_reads_go_to_the_loader_and_store_nothing() {
        let known = Arc::default();
        let mut port = port_reading(vec![CacheRead::Writing, CacheRead::Writing], Arc::clone(&known));
        port.expect_store().never();
        port.expect_claim_load().never();
        let cache = Cache::new(Arc::new(port), CacheSettings::default());
        let loads = AtomicUsize::new(0);

        assert_eq!(get(&cache, &loads, 7).await, Some(7));
        assert_eq!(get(&cache, &loads, 8).await, Some(8));
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_stored_value_is_served_from_the_local_copy_while_its_version_holds() {
        let known = Arc::new(Mutex::new(Vec::new()));
        let mut port = leading_port_reading(
            vec![
                CacheRead::Missing { version: 0 },
                CacheRead::Missing { version: 0 },
                CacheRead::Unchanged { version: 41 },
                CacheRead::Missing { version: 42 },
                CacheRead::Missing { version: 42 },
            ],
            Arc::clone(&known),
        );
        let mut stored = VecDeque::from([41_u64, 42]);
        port.expect_store().times(2).returning(move |_, _, _, _| Ok(stored.pop_front()));
        let cache = Cache::new(Arc::new(port), CacheSettings::default());
        let loads = AtomicUsize::new(0);

        assert_eq!(get(&cache, &loads, 1).await, Some(1), "a miss loads and stores");
        assert_eq!(get(&cache, &loads, 2).await, Some(1), "the version held: the local copy, no load");
        assert_eq!(get(&cache, &loads, 3).await, Some(3), "the version moved: loaded again");

        assert_eq!(loads.load(Ordering::SeqCst), 2);
        assert_eq!(*known.lock().unwrap(), vec![None, None, Some(41), Some(41), None]);
    }

    #[tokio::test]
    async fn a_peek_answers_only_what_the_cache_holds_now_and_never_loads_or_stores() {
        let known = Arc::new(Mutex::new(Vec::new()));
        let entry = |version, value: u32| CacheRead::Entry {
            version,
            json: value.to_string(),
            ttl_left: Duration::from_secs(5),
        };
        let mut port = port_reading(
            vec![
                CacheRead::Missing { version: 7 },
                entry(7, 1),
                CacheRead::Unchanged { version: 7 },
                CacheRead::Writing,
                // A write moved the version on: the copy of 7 is not shown.
                CacheRead::Missing { version: 8 },
                CacheRead::Unchanged { version: 9 },
            ],
            Arc::clone(&known),
        );
        port.expect_store().never();
        port.expect_claim_load().never();
        let cache = Cache::new(Arc::new(port), CacheSettings::default());
        let peek = || async { cache.peek::<u32>(&SPEC, "s").await.ok() };

        assert_eq!(peek().await, None, "a miss: nothing, and nothing loaded");
        assert_eq!(peek().await.as_deref(), Some(&1), "the entry sent back");
        assert_eq!(peek().await.as_deref(), Some(&1), "the version held: this instance's copy");
        assert_eq!(peek().await, None, "a write is marked");
        assert_eq!(peek().await, None, "the version moved on");
        assert_eq!(peek().await, None, "a version this instance has no copy of");
        assert_eq!(*known.lock().unwrap(), vec![None, None, Some(7), Some(7), Some(7), Some(7)]);
        assert!(Cache::disabled().peek::<u32>(&SPEC, "s").await.is_err(), "no cache, nothing to peek at");
    }

    #[tokio::test]
    async fn a_read_after_a_peek_goes_on_from_its_check_without_sending_another() {
        let known = Arc::new(Mutex::new(Vec::new()));
        // One check per peek and none for the reads after them; the load's own look before
        // it loads (another request of this instance may have filled it meanwhile) stays.
        let mut port = leading_port_reading(
            vec![CacheRead::Missing { version: 7 }, CacheRead::Missing { version: 7 }, CacheRead::Writing],
            Arc::clone(&known),
        );
        port.expect_store().times(1).returning(|_, version, _, _| Ok(Some(version + 1)));
        let cache = Cache::new(Arc::new(port), CacheSettings::default());
        let loads = AtomicUsize::new(0);
        let after = |peeked| {
            cache.get_or_load_after(&SPEC, "s", peeked, || async {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(Some(5_u32))
            })
        };

        let missed = cache.peek::<u32>(&SPEC, "s").await.expect_err("a miss");
        assert_eq!(after(missed).await.unwrap().as_deref(), Some(&5), "loaded and stored at version 7");
        let writing = cache.peek::<u32>(&SPEC, "s").await.expect_err("a write is marked");
        assert_eq!(after(writing).await.unwrap().as_deref(), Some(&5), "loaded, not stored");
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        assert_eq!(
            known.lock().unwrap().len(),
            3,
            "the two peeks and the load's own look; no check after a peek"
        );
    }

    #[tokio::test]
    async fn a_local_copy_is_never_served_once_redis_lost_the_version() {
        let known = Arc::new(Mutex::new(Vec::new()));
        let mut port = leading_port_reading(
            vec![
                CacheRead::Missing { version: 0 },
                CacheRead::Missing { version: 0 },
                // The version key was evicted (maxmemory): no version at all.
                CacheRead::Missing { version: 0 },
                CacheRead::Missing { version: 0 },
            ],
            Arc::clone(&known),
        );
        let mut stored = VecDeque::from([41_u64, 50]);
        port.expect_store().times(2).returning(move |_, _, _, _| Ok(stored.pop_front()));
        let cache = Cache::new(Arc::new(port), CacheSettings::default());
        let loads = AtomicUsize::new(0);

        assert_eq!(get(&cache, &loads, 1).await, Some(1));
        assert_eq!(get(&cache, &loads, 2).await, Some(2), "the copy of version 41 was not shown");
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_value_whose_store_was_refused_answers_its_request_but_is_not_kept() {
        let known = Arc::new(Mutex::new(Vec::new()));
        let mut port = leading_port_reading(
            vec![
                CacheRead::Missing { version: 5 },
                CacheRead::Missing { version: 5 },
                CacheRead::Missing { version: 6 },
                CacheRead::Missing { version: 6 },
            ],
            Arc::clone(&known),
        );
        let mut stored = VecDeque::from([None, Some(6)]);
        port.expect_store().times(2).returning(move |_, _, _, _| Ok(stored.pop_front().flatten()));
        let cache = Cache::new(Arc::new(port), CacheSettings::default());
        let loads = AtomicUsize::new(0);

        assert_eq!(get(&cache, &loads, 1).await, Some(1));
        assert_eq!(get(&cache, &loads, 2).await, Some(2));

        assert_eq!(known.lock().unwrap()[2], None, "no local copy was kept of the refused value");
    }

    #[tokio::test]
    async fn an_entry_that_does_not_decode_is_reloaded_and_stored_over() {
        let known = Arc::new(Mutex::new(Vec::new()));
        let mut port = leading_port_reading(
            vec![
                CacheRead::Entry {
                    version: 9,
                    json: "\"not a number\"".into(),
                    ttl_left: Duration::from_secs(5),
                },
                CacheRead::Missing { version: 9 },
            ],
            known,
        );
        port.expect_store()
            .withf(|_, v, json, _| *v == 9 && json == "4")
            .times(1)
            .returning(|_, _, _, _| Ok(Some(9)));
        let cache = Cache::new(Arc::new(port), CacheSettings::default());
        let loads = AtomicUsize::new(0);

        assert_eq!(get(&cache, &loads, 4).await, Some(4));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_write_that_cannot_be_marked_is_refused_and_without_a_cache_there_is_nothing_to_mark() {
        let mut port = MockCachePort::new();
        port.expect_begin_write().returning(|_, _, _| Err(down()));
        let cache = Cache::new(Arc::new(port), CacheSettings::default());
        assert!(cache.begin_write(&SPEC, "s").await.is_err());
        assert!(Cache::disabled().begin_write(&SPEC, "s").await.expect("no cache").is_none());
    }

    #[tokio::test]
    async fn a_write_mark_is_lifted_after_the_commit_even_if_redis_refuses_it_then() {
        let mut port = MockCachePort::new();
        port.expect_begin_write().times(1).returning(|_, _, _| Ok(()));
        port.expect_end_write().times(1).returning(|_, _| Err(down()));
        let cache = Cache::new(Arc::new(port), CacheSettings::default());
        let mark = cache.begin_write(&SPEC, "s").await.expect("marked");
        cache.end_write(mark.into_iter().collect()).await;
    }

    /// A store whose version a test moves on, whose reads answer the version current when
    /// Redis would have run them (when called), and whose first read's answer is held
    /// back until the test lets it go.
    struct GatedStore {
        version: std::sync::atomic::AtomicU64,
        reads: AtomicUsize,
        first_answer: tokio::sync::watch::Receiver<bool>,
    }

    #[async_trait]
    impl CachePort for GatedStore {
        async fn read(&self, _key: &CacheKey, _known: Option<u64>) -> Result<CacheRead, CacheError> {
            let version = self.version.load(Ordering::SeqCst);
            if self.reads.fetch_add(1, Ordering::SeqCst) == 0 {
                let mut open = self.first_answer.clone();
                open.wait_for(|open| *open).await.expect("the test keeps the gate");
            }
            // An entry holding its own version, so that each answer tells which check it
            // came from.
            Ok(CacheRead::Entry { version, json: version.to_string(), ttl_left: Duration::from_secs(10) })
        }

        async fn store(
            &self,
            _: &CacheKey,
            _: u64,
            _: String,
            _: Duration,
        ) -> Result<Option<u64>, CacheError> {
            Ok(None)
        }

        async fn begin_write(&self, _: &CacheKey, _: u64, _: Duration) -> Result<(), CacheError> {
            unreachable!("no writes here")
        }

        async fn end_write(&self, _: &CacheKey, _: u64) -> Result<(), CacheError> {
            unreachable!("no writes here")
        }

        async fn claim_load(&self, _: &CacheKey, _: u64, _: Duration) -> Result<bool, CacheError> {
            Ok(true)
        }

        async fn release_load(&self, _: &CacheKey, _: u64) -> Result<(), CacheError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn requests_arriving_while_a_check_is_out_share_the_next_check_never_that_one() {
        let (open, first_answer) = tokio::sync::watch::channel(false);
        let store = Arc::new(GatedStore { version: 1.into(), reads: AtomicUsize::new(0), first_answer });
        let cache = Arc::new(Cache::new(Arc::clone(&store) as Arc<dyn CachePort>, CacheSettings::default()));
        // What each request gets: the entry of the check that answered it.
        let get = |cache: Arc<Cache>| async move {
            let found = cache
                .get_or_load(&SPEC, "s", || async move { Ok::<Option<u64>, String>(None) })
                .await
                .expect("never fails");
            found.map(|v| *v)
        };

        // The first request's check goes out and is read by the store at version 1...
        let first = tokio::spawn(get(Arc::clone(&cache)));
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.reads.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the first check never went out");
            tokio::task::yield_now().await;
        }
        // ... then a write moves the version on, and forty requests arrive.
        store.version.store(2, Ordering::SeqCst);
        let later: Vec<_> = (0..40).map(|_| tokio::spawn(get(Arc::clone(&cache)))).collect();
        let waiting = || cache.slot(&CacheKey::new(SPEC.name, "s")).checks.waiting();
        while waiting() < 40 {
            assert!(Instant::now() < deadline, "the requests never queued");
            tokio::task::yield_now().await;
        }
        assert_eq!(store.reads.load(Ordering::SeqCst), 1, "no check for them went out yet");
        open.send(true).unwrap();

        assert_eq!(first.await.unwrap(), Some(1), "the first request's check was read at version 1");
        for request in later {
            // Every one of them got the answer of a check sent after it arrived: version 2.
            assert_eq!(request.await.unwrap(), Some(2));
        }
        assert_eq!(store.reads.load(Ordering::SeqCst), 2, "forty requests, one check");
        assert!(!cache.slot(&CacheKey::new(SPEC.name, "s")).checks.is_sending(), "the task ended");
    }

    #[tokio::test]
    async fn a_check_that_hangs_does_not_hold_back_the_requests_after_it() {
        // The first check never comes back (the gate stays shut); the next request still
        // gets an answer, from a check of its own.
        let (_shut, first_answer) = tokio::sync::watch::channel(false);
        let store = Arc::new(GatedStore { version: 1.into(), reads: AtomicUsize::new(0), first_answer });
        let cache = Arc::new(Cache::new(Arc::clone(&store) as Arc<dyn CachePort>, CacheSettings::default()));
        let stuck = {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move {
                cache.get_or_load(&SPEC, "s", || async { Ok::<Option<u64>, String>(None) }).await
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.reads.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the first check never went out");
            tokio::task::yield_now().await;
        }
        store.version.store(2, Ordering::SeqCst);

        let next = tokio::time::timeout(
            Duration::from_secs(30),
            cache.get_or_load(&SPEC, "s", || async { Ok::<Option<u64>, String>(None) }),
        )
        .await
        .expect("held back by the check before it");

        assert_eq!(next.expect("never fails").map(|v| *v), Some(2));
        assert!(!stuck.is_finished(), "the first check is still out");
        stuck.abort();
    }

    #[tokio::test]
    async fn when_the_checking_task_dies_its_requests_read_the_database() {
        let mut port = MockCachePort::new();
        port.expect_read().returning(|_, _| panic!("a bug in the store's adapter"));
        let cache = Cache::new(Arc::new(port), CacheSettings::default());
        let loads = AtomicUsize::new(0);

        assert_eq!(get(&cache, &loads, 9).await, Some(9));
        assert_eq!(get(&cache, &loads, 9).await, Some(9), "the next request starts a new task");
        assert_eq!(loads.load(Ordering::SeqCst), 2);
    }
}
