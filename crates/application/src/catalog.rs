//! The catalog: concerts, their dates with seat counts, and seat maps, read through the
//! cache; and the admin writes that change them.
//!
//! What is cached, and for how long (see `docs/caching.md` for the reasons):
//! | answer | key | TTL | evicted by |
//! |---|---|---|---|
//! | concerts | `cache:concerts:all` | 1 h | admin create/update |
//! | a concert's dates | `cache:schedules:{concertId}` | 30 min | admin create date/update |
//! | a date's seats | `cache:seats:{scheduleId}` | 10 s | hold, cancel, expiry, payment (after commit) |
//!
//! Nothing cached depends on the clock: dates are cached whatever their booking window and
//! filtered when read; seats are cached as stored (a hold with its end) and their status
//! is worked out when read. So a hold that ran out shows AVAILABLE in the very first answer
//! after its end, cached or not, and a window opens or closes on time. A date's
//! `availableSeats` is counted from its (fresh) seat map, not cached on its own.

use std::sync::Arc;
use std::time::Duration;

use domain::booking::{
    BookingError, BookingRepositoryError, BookingWindow, CatalogRepository, Concert, ConcertId, Label,
    NewSchedule, Price, Schedule, ScheduleId, Seat, SeatNumber, SeatStatus,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::cache::{Cache, CacheError, CacheSpec, Peeked, WriteMark};
use crate::clock;

pub const CONCERTS: CacheSpec = CacheSpec { name: "concerts", ttl: Duration::from_secs(60 * 60) };
pub const SCHEDULES: CacheSpec = CacheSpec { name: "schedules", ttl: Duration::from_secs(30 * 60) };
pub const SEATS: CacheSpec = CacheSpec { name: "seats", ttl: Duration::from_secs(10) };

/// A concert as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConcertView {
    pub id: Uuid,
    pub title: String,
    pub venue: String,
}

impl From<&Concert> for ConcertView {
    fn from(concert: &Concert) -> Self {
        Self {
            id: *concert.id.as_uuid(),
            title: concert.title.as_str().to_owned(),
            venue: concert.venue.as_str().to_owned(),
        }
    }
}

/// A date as cached: its times, not whether it is open (that depends on when it is read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleView {
    pub id: Uuid,
    pub concert_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub starts_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub booking_opens_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub booking_closes_at: OffsetDateTime,
}

impl ScheduleView {
    /// Whether booking is open at `now` (opening included, closing excluded).
    #[must_use]
    pub fn is_open(&self, now: OffsetDateTime) -> bool {
        self.booking_opens_at <= now && now < self.booking_closes_at
    }
}

impl From<&Schedule> for ScheduleView {
    fn from(schedule: &Schedule) -> Self {
        Self {
            id: *schedule.id.as_uuid(),
            concert_id: *schedule.concert_id.as_uuid(),
            starts_at: schedule.starts_at,
            booking_opens_at: schedule.window.opens_at(),
            booking_closes_at: schedule.window.closes_at(),
        }
    }
}

/// A seat's stored state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StoredSeat {
    Available,
    Held,
    Sold,
}

/// A seat as cached: as stored, with the end of its hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatView {
    pub number: u8,
    pub price: i64,
    pub stored: StoredSeat,
    #[serde(with = "time::serde::rfc3339::option")]
    pub held_until: Option<OffsetDateTime>,
}

impl SeatView {
    /// What the seat shows at `now`, by the one rule ([`SeatStatus::shown`]).
    #[must_use]
    pub fn status_at(&self, now: OffsetDateTime) -> SeatStatus {
        let stored = match self.stored {
            StoredSeat::Available => SeatStatus::Available,
            StoredSeat::Held => SeatStatus::Held,
            StoredSeat::Sold => SeatStatus::Sold,
        };
        stored.shown(self.held_until, now)
    }
}

impl From<&Seat> for SeatView {
    fn from(seat: &Seat) -> Self {
        Self {
            number: seat.number.get(),
            price: seat.price.points(),
            stored: match seat.status {
                SeatStatus::Available => StoredSeat::Available,
                SeatStatus::Held => StoredSeat::Held,
                SeatStatus::Sold => StoredSeat::Sold,
            },
            held_until: seat.held_until,
        }
    }
}

/// A date and its 50 seats, ascending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatMap {
    pub schedule: ScheduleView,
    pub seats: Vec<SeatView>,
}

impl SeatMap {
    /// Seats AVAILABLE at `now`.
    #[must_use]
    pub fn available_at(&self, now: OffsetDateTime) -> usize {
        self.seats.iter().filter(|seat| seat.status_at(now) == SeatStatus::Available).count()
    }

    #[must_use]
    pub fn seat(&self, number: SeatNumber) -> Option<&SeatView> {
        self.seats.iter().find(|seat| seat.number == number.get())
    }
}

/// A date open for booking now, with its seat counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSchedule {
    pub schedule: ScheduleView,
    pub total_seats: usize,
    pub available_seats: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("concert {0} not found")]
    ConcertNotFound(ConcertId),
    #[error("schedule {0} not found")]
    ScheduleNotFound(ScheduleId),
    #[error(transparent)]
    Invalid(#[from] BookingError),
    /// MySQL failed, or a write could not mark the cached answers it changes (not done:
    /// nothing changed).
    #[error(transparent)]
    Failure(crate::failure::Failure),
}

crate::failure_conversions!(CatalogError);

impl From<BookingRepositoryError> for CatalogError {
    fn from(error: BookingRepositoryError) -> Self {
        anyhow::Error::new(error).context("catalog storage failed").into()
    }
}

/// Runs `seed`, a write of the catalog made outside [`Catalog`] (the demo data seeded at
/// start-up, under the migration lock), through the same invalidation as every catalog
/// write: the cached concert list is marked before it and the mark lifted after, whatever
/// `seed` returns. A seed only ever adds concerts, so their dates and seat maps have no
/// cached answer yet.
///
/// # Errors
/// [`CatalogError::Failure`] when the mark cannot be set (nothing is seeded: a seed that
/// could not be announced could leave a stale list cached), or `seed`'s own error.
pub async fn seeding<T>(
    cache: &Cache,
    seed: impl std::future::Future<Output = anyhow::Result<T>>,
) -> Result<T, CatalogError> {
    let mark = cache.begin_write(&CONCERTS, "all").await?;
    let seeded = seed.await;
    cache.end_write(mark.into_iter().collect()).await;
    Ok(seeded?)
}

/// A new date, as an admin describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleDraft {
    pub starts_at: OffsetDateTime,
    pub booking_opens_at: OffsetDateTime,
    pub booking_closes_at: OffsetDateTime,
    pub seat_price: i64,
}

/// Reads and admin writes of the catalog.
#[derive(Clone)]
pub struct Catalog {
    repository: Arc<dyn CatalogRepository>,
    cache: Arc<Cache>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog").field("cache", &self.cache).finish_non_exhaustive()
    }
}

impl Catalog {
    #[must_use]
    pub fn new(repository: Arc<dyn CatalogRepository>, cache: Arc<Cache>) -> Self {
        Self { repository, cache }
    }

    /// Every concert.
    ///
    /// # Errors
    /// [`CatalogError::Failure`] when MySQL fails (the cache's failures are bypassed).
    pub async fn concerts(&self) -> Result<Arc<Vec<ConcertView>>, CatalogError> {
        let repository = Arc::clone(&self.repository);
        let concerts = self
            .cache
            .get_or_load(&CONCERTS, "all", || async move {
                let concerts = repository.concerts().await?;
                Ok::<_, CatalogError>(Some(concerts.iter().map(ConcertView::from).collect::<Vec<_>>()))
            })
            .await?;
        Ok(concerts.unwrap_or_default())
    }

    /// The dates of `concert` whose booking window is open now, with their seat counts.
    ///
    /// # Errors
    /// [`CatalogError::ConcertNotFound`], or [`CatalogError::Failure`].
    pub async fn open_schedules(&self, concert: ConcertId) -> Result<Vec<OpenSchedule>, CatalogError> {
        let repository = Arc::clone(&self.repository);
        let schedules = self
            .cache
            .get_or_load(&SCHEDULES, &concert.to_string(), || async move {
                if repository.concert(concert).await?.is_none() {
                    return Ok::<_, CatalogError>(None);
                }
                let schedules = repository.schedules_of(concert).await?;
                Ok(Some(schedules.iter().map(ScheduleView::from).collect::<Vec<_>>()))
            })
            .await?
            .ok_or(CatalogError::ConcertNotFound(concert))?;
        let now = clock::now_utc();
        let open: Vec<&ScheduleView> = schedules.iter().filter(|s| s.is_open(now)).collect();
        let maps =
            futures::future::join_all(open.iter().map(|s| self.seat_map(ScheduleId::from_uuid(s.id)))).await;
        let mut answer = Vec::with_capacity(open.len());
        for (schedule, map) in open.into_iter().zip(maps) {
            match map {
                Ok(map) => answer.push(OpenSchedule {
                    schedule: schedule.clone(),
                    total_seats: map.seats.len(),
                    available_seats: map.available_at(now),
                }),
                // Gone since the list was cached (no route deletes dates today).
                Err(CatalogError::ScheduleNotFound(_)) => {}
                Err(other) => return Err(other),
            }
        }
        Ok(answer)
    }

    /// A date's seats as stored (see [`SeatView::status_at`] for what each shows).
    ///
    /// # Errors
    /// [`CatalogError::ScheduleNotFound`], or [`CatalogError::Failure`].
    pub async fn seat_map(&self, schedule: ScheduleId) -> Result<Arc<SeatMap>, CatalogError> {
        self.seat_map_after(schedule, Peeked::NOTHING).await
    }

    /// A date's seats if the cache can give them now ([`Cache::peek`]: as fresh as
    /// [`Catalog::seat_map`], never loading); without them, what to hand
    /// [`Catalog::seat_map_after`].
    ///
    /// # Errors
    /// [`Peeked`]: not in the cache now.
    pub async fn cached_seat_map(&self, schedule: ScheduleId) -> Result<Arc<SeatMap>, Peeked> {
        self.cache.peek(&SEATS, &schedule.to_string()).await
    }

    /// [`Catalog::seat_map`] going on from what [`Catalog::cached_seat_map`] found (its
    /// version check, not sent again).
    ///
    /// # Errors
    /// [`CatalogError::ScheduleNotFound`], or [`CatalogError::Failure`].
    pub async fn seat_map_after(
        &self,
        schedule: ScheduleId,
        peeked: Peeked,
    ) -> Result<Arc<SeatMap>, CatalogError> {
        let repository = Arc::clone(&self.repository);
        self.cache
            .get_or_load_after(&SEATS, &schedule.to_string(), peeked, || async move {
                let Some(found) = repository.schedule(schedule).await? else {
                    return Ok::<_, CatalogError>(None);
                };
                let seats = repository.seats(schedule).await?;
                Ok(Some(SeatMap {
                    schedule: ScheduleView::from(&found),
                    seats: seats.iter().map(SeatView::from).collect(),
                }))
            })
            .await?
            .ok_or(CatalogError::ScheduleNotFound(schedule))
    }

    /// Marks a change to a date's seats (inside the change's lock, before its commit):
    /// until [`Catalog::changes_done`], every instance reads that seat map from MySQL.
    ///
    /// # Errors
    /// [`CacheError`]: the change must not be committed (it could leave a stale map).
    pub async fn seats_changing(&self, schedule: ScheduleId) -> Result<Option<WriteMark>, CacheError> {
        self.cache.begin_write(&SEATS, &schedule.to_string()).await
    }

    /// After the commit of the changes `marks` were taken for, before answering: every
    /// instance reads the new state from here on.
    pub async fn changes_done(&self, marks: impl IntoIterator<Item = Option<WriteMark>>) {
        self.cache.end_write(marks.into_iter().flatten().collect()).await;
    }

    async fn marking(
        &self,
        answers: &[(&CacheSpec, String)],
    ) -> Result<Vec<Option<WriteMark>>, CatalogError> {
        let mut marks = Vec::with_capacity(answers.len());
        for (spec, id) in answers {
            marks.push(self.cache.begin_write(spec, id).await.map_err(CatalogError::from)?);
        }
        Ok(marks)
    }

    /// Adds a concert.
    ///
    /// # Errors
    /// [`CatalogError::Invalid`] for a bad title or venue; [`CatalogError::Failure`].
    pub async fn create_concert(&self, title: &str, venue: &str) -> Result<ConcertView, CatalogError> {
        let concert = Concert {
            id: ConcertId::generate(),
            title: Label::new("title", title)?,
            venue: Label::new("venue", venue)?,
        };
        let marks = self.marking(&[(&CONCERTS, "all".to_owned())]).await?;
        self.repository.insert_concert(&concert).await?;
        self.changes_done(marks).await;
        tracing::info!(concert = %concert.id, "concert created");
        Ok(ConcertView::from(&concert))
    }

    /// Renames a concert or moves it to another venue.
    ///
    /// # Errors
    /// [`CatalogError::ConcertNotFound`], [`CatalogError::Invalid`],
    /// [`CatalogError::Failure`].
    pub async fn update_concert(
        &self,
        id: ConcertId,
        title: &str,
        venue: &str,
    ) -> Result<ConcertView, CatalogError> {
        let concert = Concert { id, title: Label::new("title", title)?, venue: Label::new("venue", venue)? };
        let marks = self.marking(&[(&CONCERTS, "all".to_owned()), (&SCHEDULES, id.to_string())]).await?;
        let found = self.repository.update_concert(&concert).await?;
        self.changes_done(marks).await;
        if !found {
            return Err(CatalogError::ConcertNotFound(id));
        }
        Ok(ConcertView::from(&concert))
    }

    /// Adds a date with 50 seats at `seat_price`.
    ///
    /// # Errors
    /// [`CatalogError::ConcertNotFound`], [`CatalogError::Invalid`] (window, price),
    /// [`CatalogError::Failure`].
    pub async fn add_schedule(
        &self,
        concert: ConcertId,
        draft: &ScheduleDraft,
    ) -> Result<ScheduleView, CatalogError> {
        let schedule = Schedule {
            id: ScheduleId::generate(),
            concert_id: concert,
            starts_at: clock::to_micros(draft.starts_at),
            window: BookingWindow::new(
                clock::to_micros(draft.booking_opens_at),
                clock::to_micros(draft.booking_closes_at),
                clock::to_micros(draft.starts_at),
            )?,
        };
        let new = NewSchedule { schedule, seat_price: Price::new(draft.seat_price)? };
        let marks = self.marking(&[(&SCHEDULES, concert.to_string())]).await?;
        let inserted = self.repository.insert_schedule(&new).await?;
        self.changes_done(marks).await;
        if !inserted {
            return Err(CatalogError::ConcertNotFound(concert));
        }
        tracing::info!(%concert, schedule = %new.schedule.id, "schedule added");
        Ok(ScheduleView::from(&new.schedule))
    }
}

#[cfg(test)]
mod tests {
    use domain::booking::{MockCatalogRepository, ReservationId};

    use super::*;
    use crate::failure::Failure;

    fn schedule(concert: ConcertId, opens: time::Duration, closes: time::Duration) -> Schedule {
        let now = clock::now_utc();
        Schedule {
            id: ScheduleId::generate(),
            concert_id: concert,
            starts_at: now + time::Duration::days(10),
            window: BookingWindow::new(now + opens, now + closes, now + time::Duration::days(10)).unwrap(),
        }
    }

    fn catalog(repository: MockCatalogRepository) -> Catalog {
        Catalog::new(Arc::new(repository), Arc::new(Cache::disabled()))
    }

    #[tokio::test]
    async fn seeding_marks_the_cached_concert_list_before_and_lifts_it_after_even_when_it_fails() {
        for fails in [false, true] {
            let mut seq = mockall::Sequence::new();
            let mut port = crate::cache::MockCachePort::new();
            let (seeded_tx, seeded_rx) = std::sync::mpsc::channel::<()>();
            port.expect_begin_write()
                .withf(|key, _, _| key.name() == "concerts" && key.id() == "all")
                .times(1)
                .in_sequence(&mut seq)
                .returning(|_, _, _| Ok(()));
            port.expect_end_write()
                .withf(move |key, _| key.name() == "concerts" && seeded_rx.try_recv().is_ok())
                .times(1)
                .in_sequence(&mut seq)
                .returning(|_, _| Ok(()));
            let cache = Cache::new(Arc::new(port), crate::cache::CacheSettings::default());

            let result = seeding(&cache, async move {
                let _ = seeded_tx.send(());
                if fails { Err(anyhow::anyhow!("migration failed")) } else { Ok(3) }
            })
            .await;

            assert_eq!(result.is_err(), fails, "{result:?}");
        }
    }

    #[tokio::test]
    async fn a_seed_whose_mark_cannot_be_set_does_not_run() {
        let mut port = crate::cache::MockCachePort::new();
        port.expect_begin_write()
            .returning(|_, _, _| Err(CacheError::Unavailable(anyhow::anyhow!("redis down"))));
        port.expect_end_write().never();
        let cache = Cache::new(Arc::new(port), crate::cache::CacheSettings::default());

        let result: Result<(), _> = seeding(&cache, async { panic!("must not seed") }).await;

        assert!(matches!(result, Err(CatalogError::Failure(Failure::Unavailable { .. }))), "{result:?}");
    }

    #[tokio::test]
    async fn open_dates_only_with_seat_counts_where_a_run_out_hold_counts_as_available() {
        let concert = ConcertId::generate();
        let open = schedule(concert, -time::Duration::hours(1), time::Duration::days(1));
        let later = schedule(concert, time::Duration::hours(1), time::Duration::days(1));
        let (open_id, dates) = (open.id, vec![open.clone(), later]);
        let mut repository = MockCatalogRepository::new();
        repository.expect_concert().returning(move |id| {
            Ok(Some(Concert {
                id,
                title: Label::new("title", "t").unwrap(),
                venue: Label::new("venue", "v").unwrap(),
            }))
        });
        repository.expect_schedules_of().returning(move |_| Ok(dates.clone()));
        repository
            .expect_schedule()
            .withf(move |id| *id == open_id)
            .returning(move |_| Ok(Some(open.clone())));
        repository.expect_seats().returning(|id| {
            let now = clock::now_utc();
            Ok(SeatNumber::all()
                .map(|number| {
                    let (status, held_until) = match number.get() {
                        1 => (SeatStatus::Sold, None),
                        2 => (SeatStatus::Held, Some(now + time::Duration::minutes(3))),
                        3 => (SeatStatus::Held, Some(now - time::Duration::seconds(1))),
                        _ => (SeatStatus::Available, None),
                    };
                    Seat {
                        schedule_id: id,
                        number,
                        price: Price::new(100).unwrap(),
                        status,
                        reservation_id: (status != SeatStatus::Available).then(ReservationId::generate),
                        held_until,
                    }
                })
                .collect())
        });

        let listed = catalog(repository).open_schedules(concert).await.unwrap();

        assert_eq!(listed.len(), 1, "the date not open yet is not listed");
        assert_eq!(
            (listed[0].schedule.id, listed[0].total_seats, listed[0].available_seats),
            (*open_id.as_uuid(), 50, 48)
        );
    }

    #[tokio::test]
    async fn unknown_ids_and_bad_admin_input_are_refused_and_write_nothing() {
        let mut repository = MockCatalogRepository::new();
        repository.expect_concert().returning(|_| Ok(None));
        repository.expect_schedule().returning(|_| Ok(None));
        repository.expect_insert_concert().never();
        repository.expect_insert_schedule().never();
        let catalog = catalog(repository);

        assert!(matches!(
            catalog.open_schedules(ConcertId::generate()).await,
            Err(CatalogError::ConcertNotFound(_))
        ));
        assert!(matches!(
            catalog.seat_map(ScheduleId::generate()).await,
            Err(CatalogError::ScheduleNotFound(_))
        ));
        assert!(matches!(catalog.create_concert(" ", "Hall").await, Err(CatalogError::Invalid(_))));
        assert!(matches!(catalog.create_concert("Show", "\u{7}").await, Err(CatalogError::Invalid(_))));
        let now = clock::now_utc();
        let backwards = ScheduleDraft {
            starts_at: now + time::Duration::days(3),
            booking_opens_at: now + time::Duration::days(2),
            booking_closes_at: now + time::Duration::days(1),
            seat_price: 10,
        };
        assert!(matches!(
            catalog.add_schedule(ConcertId::generate(), &backwards).await,
            Err(CatalogError::Invalid(_))
        ));
        let priced = ScheduleDraft { booking_opens_at: now, seat_price: -1, ..backwards };
        assert!(matches!(
            catalog.add_schedule(ConcertId::generate(), &priced).await,
            Err(CatalogError::Invalid(_))
        ));
    }
}
