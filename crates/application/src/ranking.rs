//! The popular-concert ranking: concerts by confirmed reservations (completed payments)
//! over about the last day, most first. See `docs/ranking.md`.
//!
//! **The window** is the current hour, so far, and the 24 whole hours before it (UTC, by
//! a payment's `paid_at`): between 24 and 25 hours, never a sliding 24 hours to the second.
//!
//! **Counts live in Redis** ([`RankingStore`]): one bucket per hour (concert -> payments
//! paid in that hour), each kept until its hour leaves the window. A read adds up the
//! window's buckets (that sum is kept for [`TOP_TTL`]: the ranking is cached briefly), takes
//! the first entries, and names them from the catalog ([`Catalog::concerts`], itself
//! cached); a concert the catalog does not list is left out.
//!
//! **Counts arrive from the outbox.** The relay tells [`Ranking`] of the events it
//! published before it marks them sent ([`AfterPublish`]), so a payment reaches the ranking
//! at least once; the store remembers the payments it counted, per hour, and counts each
//! once. A failure to record is logged and counted (`ranking_records_total{outcome="failed"}`),
//! never a failure of the relay: the payment is then missing from the ranking until its next
//! rebuild.
//!
//! **Rebuilt from MySQL** when Redis lost it: the store keeps a *built* marker, missing
//! after a restart or a flush, and gone on its own a day after the last rebuild (which
//! also corrects any drift). Then one instance at a time, under `lock:{ranking:concerts}`:
//! opens a rebuild (from then on, recordings are parked), reads the window's payments from
//! MySQL with their ids, loads them, replays the parked recordings MySQL did not count,
//! and marks the ranking built. So a payment committed while a rebuild runs is counted once,
//! whichever side saw it. A request that cannot have the ranking from Redis (the rebuild lock
//! stayed busy for [`REBUILD_WAIT`], or Redis fails) is answered from MySQL directly; that
//! answer is kept on this instance for [`TOP_TTL`], so an outage does not send every request
//! to MySQL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use domain::booking::{ConcertId, ScheduleId};
use domain::payment::PaymentId;
use time::OffsetDateTime;
use tokio::time::Instant;
use uuid::Uuid;

use crate::catalog::{Catalog, CatalogError};
use crate::clock;
use crate::failure::Failure;
use crate::lock::{DistributedLock, LockError, LockKey, WaitPolicy};
use crate::outbox::{AfterPublish, PendingEvent};
use crate::pay::{PAYMENT_COMPLETED, PaymentCompleted};

/// Whole hours before the current one that the window covers.
pub const WINDOW_HOURS: i64 = 24;

/// How long a summed-up window is reused (in Redis, and on an instance answering from
/// MySQL): a ranking a few seconds old is as good as a fresh one, and a busy front page
/// then costs one union per 10 s rather than one per request.
pub const TOP_TTL: Duration = Duration::from_secs(10);

/// How long a request waits for another instance's rebuild before answering from MySQL:
/// a rebuild is one query and a few Redis calls.
pub const REBUILD_WAIT: Duration = Duration::from_secs(3);

/// The most schedule -> concert pairs an instance remembers (a date never changes concert,
/// so they never go stale; the map is emptied when full).
const CONCERTS_OF_CAP: usize = 10_000;

/// After a rebuild failed (MySQL too slow, Redis failing), this instance does not try
/// another for this long: it answers from MySQL's count meanwhile. Without it, every
/// anonymous read would start a rebuild that fails the same way.
const REBUILD_BACKOFF: Duration = Duration::from_secs(30);

/// After MySQL failed to count, this instance answers 503 for this long without asking it
/// again, and a read waits at most this long for the count another read is making: the
/// anonymous route cannot pile requests onto a failing database.
const FALLBACK_BACKOFF: Duration = Duration::from_secs(5);

/// An hour of UTC time, counted from 1970: the bucket a payment counts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hour(i64);

impl Hour {
    /// The hour `at` falls in.
    #[must_use]
    pub fn of(at: OffsetDateTime) -> Self {
        Self(at.unix_timestamp().div_euclid(3_600))
    }

    /// The hour with this number (hours since 1970).
    #[must_use]
    pub const fn from_index(index: i64) -> Self {
        Self(index)
    }

    /// Hours since 1970.
    #[must_use]
    pub const fn index(self) -> i64 {
        self.0
    }

    /// Where the hour begins.
    #[must_use]
    pub fn starts_at(self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(self.0.saturating_mul(3_600))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// The hour `hours` after this one (before it, when negative).
    #[must_use]
    pub const fn plus(self, hours: i64) -> Self {
        Self(self.0 + hours)
    }

    /// The oldest hour of the window that ends with this one.
    #[must_use]
    pub const fn window_start(self) -> Self {
        self.plus(-WINDOW_HOURS)
    }

    /// The hours of the window that ends with this one, oldest first.
    pub fn window(self) -> impl Iterator<Item = Self> {
        (self.0 - WINDOW_HOURS..=self.0).map(Self)
    }

    /// When this hour's bucket is no longer read: when it leaves the window, 25 hours
    /// after it began.
    #[must_use]
    pub fn leaves_window_at(self) -> OffsetDateTime {
        self.plus(WINDOW_HOURS + 1).starts_at()
    }
}

/// One completed payment, as the ranking counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sale {
    pub payment: PaymentId,
    pub concert: ConcertId,
    pub paid_at: OffsetDateTime,
}

impl Sale {
    /// The hour it counts in.
    #[must_use]
    pub fn hour(&self) -> Hour {
        Hour::of(self.paid_at)
    }
}

/// A concert's count in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcertCount {
    pub concert: ConcertId,
    pub reservations: u64,
}

/// What recording a sale did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Counted in its hour's bucket.
    Counted,
    /// Counted before (a redelivery): nothing changed.
    Duplicate,
    /// A rebuild is running: parked, replayed by the rebuild unless MySQL gave it the sale.
    Parked,
    /// The ranking is not built: the rebuild that builds it counts the sale from MySQL.
    Unbuilt,
}

impl Recorded {
    /// For metric labels.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Counted => "counted",
            Self::Duplicate => "duplicate",
            Self::Parked => "parked",
            Self::Unbuilt => "unbuilt",
        }
    }
}

/// Names one rebuild: loads carrying another token change nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildToken(pub String);

/// Where the counts live (Redis): hourly buckets, the payments each counted, a *built*
/// marker, the summed-up window.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait RankingStore: Send + Sync + std::fmt::Debug {
    /// Counts `sale` once in the bucket of its hour: a sale counted before is a
    /// [`Recorded::Duplicate`]; without the built marker nothing is counted (parked while
    /// a rebuild runs, else left to the next rebuild).
    ///
    /// # Errors
    /// When the store cannot be reached or answers nonsense.
    async fn record(&self, sale: &Sale) -> anyhow::Result<Recorded>;

    /// The concerts with the most sales in the window ending with hour `now`, most first:
    /// the first `limit` and every one tied with the last of them (the caller breaks
    /// ties). The sum of the window is reused for [`TOP_TTL`]. `None` when the ranking is
    /// not built: rebuild it.
    ///
    /// # Errors
    /// When the store cannot be reached or answers nonsense.
    async fn top(&self, now: Hour, limit: u32) -> anyhow::Result<Option<Vec<ConcertCount>>>;

    /// Opens a rebuild of the window ending with hour `now`, unless the ranking is built
    /// (`None`): clears the window and parks every recording from now on, until
    /// [`RankingStore::finish_rebuild`] with the token returned, or until the token runs out.
    ///
    /// # Errors
    /// When the store cannot be reached.
    async fn begin_rebuild(&self, now: Hour) -> anyhow::Result<Option<RebuildToken>>;

    /// Loads `sales` (every sale of the window, from MySQL, read after the rebuild began),
    /// replays the parked recordings they do not include, and marks the ranking built
    /// until a day after `now`. `false` when the rebuild is no longer `token`'s (it ran out,
    /// or another began): then nothing was marked.
    ///
    /// # Errors
    /// When the store cannot be reached.
    async fn finish_rebuild(&self, token: &RebuildToken, now: Hour, sales: &[Sale]) -> anyhow::Result<bool>;
}

/// What the ranking reads from the truth (MySQL).
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait RankingSource: Send + Sync + std::fmt::Debug {
    /// Every completed payment paid at or after `since`, with its concert.
    ///
    /// # Errors
    /// When the database fails.
    async fn sales_since(&self, since: OffsetDateTime) -> anyhow::Result<Vec<Sale>>;

    /// Completed payments paid at or after `since`, per concert (in no order).
    ///
    /// # Errors
    /// When the database fails.
    async fn counts_since(&self, since: OffsetDateTime) -> anyhow::Result<Vec<ConcertCount>>;

    /// The concert of a date; `None` for an unknown date.
    ///
    /// # Errors
    /// When the database fails.
    async fn concert_of(&self, schedule: ScheduleId) -> anyhow::Result<Option<ConcertId>>;
}

/// How many concerts a ranking lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankingLimit(u8);

impl RankingLimit {
    pub const DEFAULT: Self = Self(10);
    pub const MAX: u8 = 100;

    /// # Errors
    /// [`LimitOutOfRange`] outside `1..=MAX`.
    pub fn new(limit: i64) -> Result<Self, LimitOutOfRange> {
        u8::try_from(limit)
            .ok()
            .filter(|l| (1..=Self::MAX).contains(l))
            .map(Self)
            .ok_or(LimitOutOfRange(limit))
    }

    #[must_use]
    pub const fn get(self) -> u8 {
        self.0
    }
}

impl Default for RankingLimit {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("limit must be a whole number in 1..={max}, got {got}", max = RankingLimit::MAX, got = .0)]
pub struct LimitOutOfRange(pub i64);

/// Whether `at` holds a time less than `within` ago.
fn recently(at: &Mutex<Option<Instant>>, within: Duration) -> bool {
    lock_ignoring_poison(at).is_some_and(|at| at.elapsed() < within)
}

fn lock_ignoring_poison<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A concert as ranked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankedConcert {
    pub concert_id: Uuid,
    pub title: String,
    pub reservations: u64,
}

/// An answer counted in MySQL, kept briefly on this instance.
#[derive(Debug)]
struct Counted {
    hour: Hour,
    at: Instant,
    counts: Vec<ConcertCount>,
}

/// The ranking's read, rebuild and recording. Cheap to clone.
#[derive(Clone)]
pub struct Ranking {
    store: Arc<dyn RankingStore>,
    source: Arc<dyn RankingSource>,
    catalog: Catalog,
    lock: Arc<dyn DistributedLock>,
    concerts_of: Arc<Mutex<HashMap<ScheduleId, ConcertId>>>,
    /// Held across the MySQL query: one query per instance at a time.
    from_mysql: Arc<tokio::sync::Mutex<Option<Counted>>>,
    /// When the last rebuild, or the last count in MySQL, failed on this instance.
    rebuild_failed_at: Arc<Mutex<Option<Instant>>>,
    count_failed_at: Arc<Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for Ranking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ranking").field("store", &self.store).finish_non_exhaustive()
    }
}

impl Ranking {
    #[must_use]
    pub fn new(
        store: Arc<dyn RankingStore>,
        source: Arc<dyn RankingSource>,
        catalog: Catalog,
        lock: Arc<dyn DistributedLock>,
    ) -> Self {
        Self {
            store,
            source,
            catalog,
            lock,
            concerts_of: Arc::default(),
            from_mysql: Arc::new(tokio::sync::Mutex::new(None)),
            rebuild_failed_at: Arc::default(),
            count_failed_at: Arc::default(),
        }
    }

    /// The concerts with the most confirmed reservations in the window, most first; ties by
    /// title, then id.
    ///
    /// # Errors
    /// A failure of MySQL when the answer had to come from there (or from the catalog).
    #[tracing::instrument(name = "ranking.top", skip_all, fields(limit = limit.get()))]
    pub async fn top(&self, limit: RankingLimit) -> Result<Vec<RankedConcert>, Failure> {
        let now = Hour::of(clock::now_utc());
        let counts = match self.counts_in_redis(now, u32::from(limit.get())).await {
            Ok(Some(counts)) => {
                metrics::counter!("ranking_reads_total", "source" => "redis").increment(1);
                counts
            }
            Ok(None) => {
                metrics::counter!("ranking_reads_total", "source" => "mysql").increment(1);
                self.counted_in_mysql(now).await?
            }
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "ranking unavailable in Redis; counted in MySQL"
                );
                metrics::counter!("ranking_reads_total", "source" => "mysql").increment(1);
                self.counted_in_mysql(now).await?
            }
        };
        self.named(counts, limit).await
    }

    /// The top from Redis, rebuilding it first when it is not built; `None` when the
    /// rebuild lock stayed busy or the rebuild was cut short.
    async fn counts_in_redis(&self, now: Hour, limit: u32) -> anyhow::Result<Option<Vec<ConcertCount>>> {
        if let Some(counts) = self.store.top(now, limit).await? {
            return Ok(Some(counts));
        }
        if recently(&self.rebuild_failed_at, REBUILD_BACKOFF) {
            return Ok(None);
        }
        let rebuilt = self.rebuild(now).await;
        if !matches!(rebuilt, Ok(true)) {
            *lock_ignoring_poison(&self.rebuild_failed_at) = Some(Instant::now());
        }
        if !rebuilt? {
            return Ok(None);
        }
        self.store.top(now, limit).await
    }

    /// Rebuilds the ranking from MySQL under its lock, unless another instance did while
    /// this one waited. `false` when it could not be done now.
    async fn rebuild(&self, now: Hour) -> anyhow::Result<bool> {
        let key = LockKey::new("ranking", "concerts");
        let guard = match self.lock.acquire(&key, WaitPolicy::WaitUpTo(REBUILD_WAIT)).await {
            Ok(guard) => guard,
            Err(LockError::Busy { .. } | LockError::Timeout { .. }) => {
                tracing::info!("another instance is rebuilding the ranking; answering from MySQL");
                return Ok(false);
            }
            Err(error) => return Err(anyhow::Error::new(error).context("failed to take the ranking's lock")),
        };
        let rebuilt = self.rebuild_locked(now).await;
        if let Err(error) = guard.release().await {
            tracing::debug!(error = %error, "ranking lock not released; its lease frees it");
        }
        rebuilt
    }

    async fn rebuild_locked(&self, now: Hour) -> anyhow::Result<bool> {
        let Some(token) = self.store.begin_rebuild(now).await? else {
            return Ok(true);
        };
        let started = Instant::now();
        let sales = self
            .source
            .sales_since(now.window_start().starts_at())
            .await
            .context("failed to read the ranking's payments")?;
        let finished = self.store.finish_rebuild(&token, now, &sales).await?;
        if finished {
            tracing::info!(payments = sales.len(), "ranking rebuilt from MySQL");
            metrics::counter!("ranking_rebuilds_total").increment(1);
            metrics::histogram!("ranking_rebuild_seconds").record(started.elapsed().as_secs_f64());
        } else {
            tracing::warn!("ranking rebuild ran out or was overtaken by another; not marked built");
        }
        Ok(finished)
    }

    /// The window counted in MySQL, reused on this instance for [`TOP_TTL`].
    async fn counted_in_mysql(&self, now: Hour) -> Result<Vec<ConcertCount>, Failure> {
        let busy = || {
            Failure::Unexpected(anyhow::Error::new(domain::unavailable::Unavailable {
                reason: "ranking count failing",
                source: "the ranking could not be counted in MySQL a moment ago".into(),
            }))
        };
        if recently(&self.count_failed_at, FALLBACK_BACKOFF) {
            return Err(busy());
        }
        let Ok(mut kept) = tokio::time::timeout(FALLBACK_BACKOFF, self.from_mysql.lock()).await else {
            return Err(busy());
        };
        if let Some(counted) = kept.as_ref().filter(|c| c.hour == now && c.at.elapsed() < TOP_TTL) {
            return Ok(counted.counts.clone());
        }
        let counts = match self.source.counts_since(now.window_start().starts_at()).await {
            Ok(counts) => counts,
            Err(error) => {
                *lock_ignoring_poison(&self.count_failed_at) = Some(Instant::now());
                return Err(error.context("failed to count the ranking in MySQL").into());
            }
        };
        *kept = Some(Counted { hour: now, at: Instant::now(), counts: counts.clone() });
        Ok(counts)
    }

    /// `counts` named from the catalog, most first, ties by title then id, `limit` of them.
    async fn named(
        &self,
        counts: Vec<ConcertCount>,
        limit: RankingLimit,
    ) -> Result<Vec<RankedConcert>, Failure> {
        let concerts = self.catalog.concerts().await.map_err(|error| match error {
            CatalogError::Failure(failure) => failure,
            other => Failure::Unexpected(anyhow::Error::new(other).context("failed to list the concerts")),
        })?;
        let titles: HashMap<Uuid, &str> = concerts.iter().map(|c| (c.id, c.title.as_str())).collect();
        let mut ranked: Vec<RankedConcert> = counts
            .into_iter()
            .filter_map(|count| {
                let id = *count.concert.as_uuid();
                titles.get(&id).map(|title| RankedConcert {
                    concert_id: id,
                    title: (*title).to_owned(),
                    reservations: count.reservations,
                })
            })
            .collect();
        ranked.sort_by(|a, b| {
            b.reservations
                .cmp(&a.reservations)
                .then_with(|| a.title.cmp(&b.title))
                .then_with(|| a.concert_id.cmp(&b.concert_id))
        });
        ranked.truncate(usize::from(limit.get()));
        Ok(ranked)
    }

    /// Records the completed payments among `events` (others are not the ranking's). Never
    /// fails: what cannot be recorded is logged and counted, and missing from the ranking
    /// until its next rebuild.
    pub async fn record(&self, events: &[PendingEvent]) {
        let now = Hour::of(clock::now_utc());
        for event in events.iter().filter(|event| event.event_type == PAYMENT_COMPLETED) {
            let outcome = match self.record_one(event, now).await {
                Ok(outcome) => outcome,
                Err(error) => {
                    tracing::warn!(
                        event = %event.id,
                        error = format!("{error:#}"),
                        "a payment was not recorded in the ranking; it is missing until the next rebuild"
                    );
                    "failed"
                }
            };
            metrics::counter!("ranking_records_total", "outcome" => outcome).increment(1);
        }
    }

    async fn record_one(&self, event: &PendingEvent, now: Hour) -> anyhow::Result<&'static str> {
        let paid: PaymentCompleted =
            serde_json::from_str(&event.payload).context("a PaymentCompleted event that does not parse")?;
        if Hour::of(paid.paid_at) < now.window_start() {
            return Ok("too_old");
        }
        let schedule = ScheduleId::from_uuid(paid.schedule_id);
        let Some(concert) = self.concert_of(schedule).await? else {
            tracing::warn!(%schedule, "a payment for an unknown date; not ranked");
            return Ok("unknown_schedule");
        };
        let sale = Sale { payment: PaymentId::from_uuid(paid.payment_id), concert, paid_at: paid.paid_at };
        Ok(self.store.record(&sale).await?.as_str())
    }

    /// The concert of `schedule`, remembered: a date never moves to another concert.
    async fn concert_of(&self, schedule: ScheduleId) -> anyhow::Result<Option<ConcertId>> {
        let known = self.concerts_of.lock().unwrap_or_else(PoisonError::into_inner).get(&schedule).copied();
        if known.is_some() {
            return Ok(known);
        }
        let found = self.source.concert_of(schedule).await.context("failed to find a date's concert")?;
        if let Some(concert) = found {
            let mut memo = self.concerts_of.lock().unwrap_or_else(PoisonError::into_inner);
            if memo.len() >= CONCERTS_OF_CAP {
                memo.clear();
            }
            memo.insert(schedule, concert);
        }
        Ok(found)
    }
}

#[async_trait]
impl AfterPublish for Ranking {
    async fn published(&self, events: &[PendingEvent]) {
        self.record(events).await;
    }
}

#[cfg(test)]
mod tests {
    use domain::booking::{Concert, Label, MockCatalogRepository};
    use mockall::Sequence;
    use mockall::predicate::eq;

    use super::*;
    use crate::cache::Cache;
    use crate::lock::MockDistributedLock;
    use crate::mocks::released_guard;

    fn concert(id: ConcertId, title: &str) -> Concert {
        Concert {
            id,
            title: Label::new("title", title).unwrap(),
            venue: Label::new("venue", "Hall").unwrap(),
        }
    }

    fn catalog_of(concerts: Vec<Concert>) -> Catalog {
        let mut repository = MockCatalogRepository::new();
        repository.expect_concerts().returning(move || Ok(concerts.clone()));
        Catalog::new(Arc::new(repository), Arc::new(Cache::disabled()))
    }

    fn ranking(
        store: MockRankingStore,
        source: MockRankingSource,
        catalog: Catalog,
        lock: MockDistributedLock,
    ) -> Ranking {
        Ranking::new(Arc::new(store), Arc::new(source), catalog, Arc::new(lock))
    }

    fn count(concert: ConcertId, reservations: u64) -> ConcertCount {
        ConcertCount { concert, reservations }
    }

    fn limit(n: i64) -> RankingLimit {
        RankingLimit::new(n).unwrap()
    }

    /// Whether `since` is the start of the window ending with the current hour.
    fn is_window_start(since: OffsetDateTime) -> bool {
        let age = clock::now_utc() - since;
        since.unix_timestamp() % 3_600 == 0
            && age >= time::Duration::hours(WINDOW_HOURS)
            && age <= time::Duration::hours(WINDOW_HOURS + 1)
    }

    fn payment_event(schedule: ScheduleId, paid_at: OffsetDateTime) -> (PendingEvent, PaymentId) {
        let payment = PaymentId::generate();
        let payload = PaymentCompleted {
            event_id: Uuid::now_v7(),
            payment_id: *payment.as_uuid(),
            reservation_id: Uuid::now_v7(),
            user_id: Uuid::now_v7(),
            schedule_id: *schedule.as_uuid(),
            seat_number: 7,
            amount: 1_000,
            paid_at,
        };
        let event = PendingEvent {
            seq: 1,
            id: payload.event_id,
            aggregate_id: payload.reservation_id,
            event_type: PAYMENT_COMPLETED.into(),
            payload: serde_json::to_string(&payload).unwrap(),
            created_at: paid_at,
        };
        (event, payment)
    }

    #[test]
    fn a_limit_is_one_to_a_hundred() {
        assert_eq!(RankingLimit::default().get(), 10);
        assert_eq!(limit(1).get(), 1);
        assert_eq!(limit(100).get(), 100);
        for bad in [0, 101, -1, 256, i64::MAX] {
            assert_eq!(RankingLimit::new(bad), Err(LimitOutOfRange(bad)));
        }
    }

    #[test]
    fn an_hour_leaves_the_window_twenty_five_hours_after_it_began() {
        let at = OffsetDateTime::from_unix_timestamp(1_800_000_000 + 1_234).unwrap();
        let hour = Hour::of(at);

        // 1,800,000,000 s since 1970 is a whole hour (500,000 of them).
        assert_eq!(hour.starts_at().unix_timestamp(), 1_800_000_000);
        assert_eq!(hour.leaves_window_at() - hour.starts_at(), time::Duration::hours(25));
        let window: Vec<Hour> = hour.window().collect();
        assert_eq!((window.len(), window[0], window[24]), (25, hour.window_start(), hour));
    }

    #[tokio::test]
    async fn the_top_is_named_from_the_catalog_most_first_then_by_title_then_id() {
        let [a, b, c, d, gone] = std::array::from_fn(|_| ConcertId::generate());
        let mut store = MockRankingStore::new();
        // Ties at the limit come back whole; a concert the catalog lost is left out.
        store.expect_top().withf(|_, limit| *limit == 3).times(1).returning(move |_, _| {
            Ok(Some(vec![count(gone, 9), count(c, 5), count(b, 2), count(a, 2), count(d, 2)]))
        });
        store.expect_begin_rebuild().never();
        let (low, high) = if a.as_uuid() < d.as_uuid() { (a, d) } else { (d, a) };
        let catalog = catalog_of(vec![
            concert(a, "Same"),
            concert(b, "Zebra"),
            concert(c, "Opera"),
            concert(d, "Same"),
        ]);
        let ranking = ranking(store, MockRankingSource::new(), catalog, MockDistributedLock::new());

        let top = ranking.top(limit(3)).await.unwrap();

        let got: Vec<(Uuid, &str, u64)> =
            top.iter().map(|r| (r.concert_id, r.title.as_str(), r.reservations)).collect();
        assert_eq!(
            got,
            vec![(*c.as_uuid(), "Opera", 5), (*low.as_uuid(), "Same", 2), (*high.as_uuid(), "Same", 2)],
            "Zebra is tied but sorts after both Same; the lost concert is not listed"
        );
    }

    #[tokio::test]
    async fn a_ranking_redis_lost_is_rebuilt_from_mysql_under_its_lock_then_read() {
        let concert_id = ConcertId::generate();
        let sales =
            vec![Sale { payment: PaymentId::generate(), concert: concert_id, paid_at: clock::now_utc() }];
        let loaded = sales.clone();
        let mut seq = Sequence::new();
        let mut store = MockRankingStore::new();
        let mut source = MockRankingSource::new();
        let mut lock = MockDistributedLock::new();
        store.expect_top().times(1).in_sequence(&mut seq).returning(|_, _| Ok(None));
        let key = LockKey::new("ranking", "concerts");
        lock.expect_acquire()
            .withf(move |k, wait| *k == key && *wait == WaitPolicy::WaitUpTo(REBUILD_WAIT))
            .times(1)
            .in_sequence(&mut seq)
            .returning(|k, _| Ok(Box::new(released_guard(k.clone()))));
        store
            .expect_begin_rebuild()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_| Ok(Some(RebuildToken("t".into()))));
        source
            .expect_sales_since()
            .withf(|since| is_window_start(*since))
            .times(1)
            .in_sequence(&mut seq)
            .returning(move |_| Ok(sales.clone()));
        store
            .expect_finish_rebuild()
            .withf(move |token, _, got| token.0 == "t" && got == loaded.as_slice())
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _, _| Ok(true));
        store
            .expect_top()
            .times(1)
            .in_sequence(&mut seq)
            .returning(move |_, _| Ok(Some(vec![count(concert_id, 1)])));
        source.expect_counts_since().never();
        let ranking = ranking(store, source, catalog_of(vec![concert(concert_id, "Live")]), lock);

        let top = ranking.top(RankingLimit::DEFAULT).await.unwrap();

        assert_eq!(
            top,
            vec![RankedConcert { concert_id: *concert_id.as_uuid(), title: "Live".into(), reservations: 1 }]
        );
    }

    #[tokio::test]
    async fn a_failed_rebuild_is_not_tried_again_at_once_and_a_failing_count_is_not_asked_again_at_once() {
        let mut store = MockRankingStore::new();
        // Unbuilt on both reads.
        store.expect_top().times(2).returning(|_, _| Ok(None));
        store.expect_begin_rebuild().times(1).returning(|_| Ok(Some(RebuildToken("t".into()))));
        store.expect_finish_rebuild().never();
        let mut source = MockRankingSource::new();
        // The rebuild's read fails (MySQL too slow), once: the second read does not rebuild.
        source.expect_sales_since().times(1).returning(|_| Err(anyhow::anyhow!("statement timeout")));
        // The count fails too, once: the second read is refused without asking MySQL.
        source.expect_counts_since().times(1).returning(|_| Err(anyhow::anyhow!("statement timeout")));
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire().times(1).returning(|k, _| Ok(Box::new(released_guard(k.clone()))));
        let ranking = ranking(store, source, catalog_of(Vec::new()), lock);

        assert!(ranking.top(RankingLimit::DEFAULT).await.is_err(), "MySQL failed");
        let again = ranking.top(RankingLimit::DEFAULT).await.expect_err("still refused");
        let Failure::Unexpected(error) = again else { panic!("{again:?}") };
        assert!(domain::unavailable::is_unavailable(&error), "a 503, not a 500: {error:#}");
    }

    #[tokio::test]
    async fn a_rebuild_another_instance_made_while_this_one_waited_is_not_made_again() {
        let mut store = MockRankingStore::new();
        let mut seq = Sequence::new();
        store.expect_top().times(1).in_sequence(&mut seq).returning(|_, _| Ok(None));
        store.expect_begin_rebuild().times(1).in_sequence(&mut seq).returning(|_| Ok(None));
        store.expect_top().times(1).in_sequence(&mut seq).returning(|_, _| Ok(Some(Vec::new())));
        store.expect_finish_rebuild().never();
        let mut source = MockRankingSource::new();
        source.expect_sales_since().never();
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire().times(1).returning(|k, _| Ok(Box::new(released_guard(k.clone()))));

        let top = ranking(store, source, catalog_of(Vec::new()), lock).top(RankingLimit::DEFAULT).await;

        assert_eq!(top.unwrap(), Vec::new());
    }

    #[tokio::test]
    async fn while_another_instance_rebuilds_past_the_wait_the_answer_is_counted_in_mysql() {
        let concert_id = ConcertId::generate();
        let mut store = MockRankingStore::new();
        store.expect_top().times(1).returning(|_, _| Ok(None));
        store.expect_begin_rebuild().never();
        let mut lock = MockDistributedLock::new();
        lock.expect_acquire()
            .returning(|k, _| Err(LockError::Timeout { key: k.clone(), waited: REBUILD_WAIT }));
        let mut source = MockRankingSource::new();
        source
            .expect_counts_since()
            .withf(|since| is_window_start(*since))
            .times(1)
            .returning(move |_| Ok(vec![count(concert_id, 4)]));
        let ranking = ranking(store, source, catalog_of(vec![concert(concert_id, "Live")]), lock);

        let top = ranking.top(RankingLimit::DEFAULT).await.unwrap();

        assert_eq!(top.iter().map(|r| r.reservations).collect::<Vec<_>>(), vec![4]);
    }

    #[tokio::test(start_paused = true)]
    async fn with_redis_down_the_answer_is_counted_in_mysql_once_per_ten_seconds() {
        let concert_id = ConcertId::generate();
        let mut store = MockRankingStore::new();
        store.expect_top().returning(|_, _| Err(anyhow::anyhow!("connection refused")));
        let mut source = MockRankingSource::new();
        source.expect_counts_since().times(2).returning(move |_| Ok(vec![count(concert_id, 2)]));
        let ranking =
            ranking(store, source, catalog_of(vec![concert(concert_id, "Live")]), MockDistributedLock::new());

        for _ in 0..3 {
            assert_eq!(ranking.top(RankingLimit::DEFAULT).await.unwrap().len(), 1);
        }
        tokio::time::advance(TOP_TTL).await;
        assert_eq!(ranking.top(RankingLimit::DEFAULT).await.unwrap().len(), 1, "counted again");
    }

    #[tokio::test]
    async fn with_redis_and_mysql_down_the_read_fails() {
        let mut store = MockRankingStore::new();
        store.expect_top().returning(|_, _| Err(anyhow::anyhow!("connection refused")));
        let mut source = MockRankingSource::new();
        source.expect_counts_since().returning(|_| Err(anyhow::anyhow!("no connection")));
        let ranking = ranking(store, source, catalog_of(Vec::new()), MockDistributedLock::new());

        let top = ranking.top(RankingLimit::DEFAULT).await;

        assert!(matches!(top, Err(Failure::Unexpected(_))), "{top:?}");
    }

    #[tokio::test]
    async fn a_completed_payment_is_recorded_under_its_concert_and_hour_and_the_date_looked_up_once() {
        let (schedule, concert_id) = (ScheduleId::generate(), ConcertId::generate());
        let now = clock::now_utc();
        let (first, paid_first) = payment_event(schedule, now);
        let (second, paid_second) = payment_event(schedule, now - time::Duration::hours(2));
        let other = PendingEvent { event_type: "SomethingElse".into(), ..first.clone() };
        let mut source = MockRankingSource::new();
        source.expect_concert_of().with(eq(schedule)).times(1).returning(move |_| Ok(Some(concert_id)));
        let mut store = MockRankingStore::new();
        for (payment, paid_at, answer) in [
            (paid_first, now, Recorded::Counted),
            (paid_second, now - time::Duration::hours(2), Recorded::Duplicate),
        ] {
            store
                .expect_record()
                .withf(move |sale| {
                    sale.payment == payment && sale.concert == concert_id && sale.paid_at == paid_at
                })
                .times(1)
                .returning(move |_| Ok(answer));
        }
        let ranking = ranking(store, source, catalog_of(Vec::new()), MockDistributedLock::new());

        ranking.published(&[first, other, second]).await;
    }

    #[tokio::test]
    async fn a_failure_to_record_is_swallowed_and_the_next_event_still_recorded() {
        let (schedule, concert_id) = (ScheduleId::generate(), ConcertId::generate());
        let (first, _) = payment_event(schedule, clock::now_utc());
        let (second, paid_second) = payment_event(schedule, clock::now_utc());
        let garbled = PendingEvent { payload: "{".into(), ..first.clone() };
        let mut source = MockRankingSource::new();
        source.expect_concert_of().returning(move |_| Ok(Some(concert_id)));
        let mut store = MockRankingStore::new();
        let mut seq = Sequence::new();
        store
            .expect_record()
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_| Err(anyhow::anyhow!("redis timed out")));
        store
            .expect_record()
            .withf(move |sale| sale.payment == paid_second)
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_| Ok(Recorded::Counted));
        let ranking = ranking(store, source, catalog_of(Vec::new()), MockDistributedLock::new());

        ranking.published(&[garbled, first, second]).await;
    }

    #[tokio::test]
    async fn a_payment_older_than_the_window_or_of_an_unknown_date_is_not_recorded() {
        let (known, unknown) = (ScheduleId::generate(), ScheduleId::generate());
        let (old, _) = payment_event(known, clock::now_utc() - time::Duration::hours(WINDOW_HOURS + 2));
        let (stray, _) = payment_event(unknown, clock::now_utc());
        let mut source = MockRankingSource::new();
        source.expect_concert_of().with(eq(unknown)).times(1).returning(|_| Ok(None));
        let mut store = MockRankingStore::new();
        store.expect_record().never();
        let ranking = ranking(store, source, catalog_of(Vec::new()), MockDistributedLock::new());

        ranking.published(&[old, stray]).await;
    }
}
