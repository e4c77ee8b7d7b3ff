//! Concerts, their schedules (dates) and seats, and the reservation state machine.
//!
//! A schedule has 50 seats, numbered 1..=50, and a booking window. A seat is held by at
//! most one live reservation at a time; a hold lasts a few minutes and then counts as
//! expired whether or not a job has cleaned it up yet. A reservation moves only forward:
//!
//! ```text
//! HELD --confirm (paid in time)--> CONFIRMED
//!  |---cancel (by its user)-----> CANCELLED
//!  `---expire (hold ran out)----> EXPIRED
//! ```

use std::fmt;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::unit_of_work::Tx;
use crate::user::UserId;

uuid_id!(
    /// A concert's id.
    ConcertId
);
uuid_id!(
    /// A schedule's (a concert date's) id.
    ScheduleId
);
uuid_id!(
    /// A reservation's id.
    ReservationId
);

/// Seats per schedule.
pub const SEATS_PER_SCHEDULE: u8 = 50;

/// A seat number: 1..=50.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeatNumber(u8);

impl SeatNumber {
    /// # Errors
    /// [`BookingError::SeatOutOfRange`] outside 1..=50 (any integer a client may send).
    pub fn new(number: i64) -> Result<Self, BookingError> {
        u8::try_from(number)
            .ok()
            .filter(|n| (1..=SEATS_PER_SCHEDULE).contains(n))
            .map(Self)
            .ok_or(BookingError::SeatOutOfRange { number })
    }

    #[must_use]
    pub const fn get(self) -> u8 {
        self.0
    }

    /// Every seat of a schedule, ascending.
    pub fn all() -> impl Iterator<Item = Self> {
        (1..=SEATS_PER_SCHEDULE).map(Self)
    }
}

impl fmt::Display for SeatNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A seat's price in points: 0..=10,000,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Price(i64);

impl Price {
    pub const MAX: i64 = 10_000_000;

    /// # Errors
    /// [`BookingError::PriceOutOfRange`].
    pub const fn new(points: i64) -> Result<Self, BookingError> {
        if points < 0 || points > Self::MAX {
            return Err(BookingError::PriceOutOfRange { points });
        }
        Ok(Self(points))
    }

    #[must_use]
    pub const fn points(self) -> i64 {
        self.0
    }
}

/// When a schedule can be booked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BookingWindow {
    opens_at: OffsetDateTime,
    closes_at: OffsetDateTime,
}

impl BookingWindow {
    /// A window that opens before it closes, and closes no later than the show starts.
    ///
    /// # Errors
    /// [`BookingError::InvalidWindow`].
    pub fn new(
        opens_at: OffsetDateTime,
        closes_at: OffsetDateTime,
        starts_at: OffsetDateTime,
    ) -> Result<Self, BookingError> {
        if opens_at >= closes_at || closes_at > starts_at {
            return Err(BookingError::InvalidWindow);
        }
        Ok(Self { opens_at, closes_at })
    }

    /// Whether booking is open at `now` (opening instant included, closing excluded).
    #[must_use]
    pub fn is_open(&self, now: OffsetDateTime) -> bool {
        self.opens_at <= now && now < self.closes_at
    }

    #[must_use]
    pub const fn opens_at(&self) -> OffsetDateTime {
        self.opens_at
    }

    #[must_use]
    pub const fn closes_at(&self) -> OffsetDateTime {
        self.closes_at
    }
}

/// Where a reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReservationStatus {
    Held,
    Confirmed,
    Expired,
    Cancelled,
}

impl ReservationStatus {
    /// What a reservation is, from its stored status, once the store refused to confirm or
    /// end it as a live hold: one still stored HELD ran out by the store's clock (the
    /// refusing statement's judge, the expiry job not having run yet); one gone counts as
    /// expired.
    #[must_use]
    pub fn after_refusal(stored: Option<Self>) -> Self {
        match stored {
            Some(Self::Held) | None => Self::Expired,
            Some(other) => other,
        }
    }

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Held => "HELD",
            Self::Confirmed => "CONFIRMED",
            Self::Expired => "EXPIRED",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// Reads a stored status.
    #[must_use]
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "HELD" => Some(Self::Held),
            "CONFIRMED" => Some(Self::Confirmed),
            "EXPIRED" => Some(Self::Expired),
            "CANCELLED" => Some(Self::Cancelled),
            _ => None,
        }
    }

    /// HELD -> CONFIRMED, while the hold lasts (`now` before `held_until`).
    ///
    /// # Errors
    /// [`BookingError::HoldExpired`] once the hold ran out; [`BookingError::NotHeld`] from
    /// any other state.
    pub fn confirm(self, held_until: OffsetDateTime, now: OffsetDateTime) -> Result<Self, BookingError> {
        match self {
            Self::Held if now < held_until => Ok(Self::Confirmed),
            Self::Held => Err(BookingError::HoldExpired),
            other => Err(BookingError::NotHeld { status: other }),
        }
    }

    /// HELD -> CANCELLED, by the user who holds it, while the hold lasts. A hold that ran
    /// out counts as EXPIRED (whether or not the expiry job has run), so it cannot be
    /// cancelled any more: the seat is free already.
    ///
    /// # Errors
    /// [`BookingError::NotHeld`] from any other state, a run-out hold included (as
    /// EXPIRED).
    pub fn cancel(self, held_until: OffsetDateTime, now: OffsetDateTime) -> Result<Self, BookingError> {
        match self.at(held_until, now) {
            Self::Held => Ok(Self::Cancelled),
            other => Err(BookingError::NotHeld { status: other }),
        }
    }

    /// What a reservation in this stored state shows at `now`: a HELD whose hold ran out
    /// shows EXPIRED at once, whether or not the expiry job has run.
    #[must_use]
    pub fn at(self, held_until: OffsetDateTime, now: OffsetDateTime) -> Self {
        match self {
            Self::Held if now >= held_until => Self::Expired,
            other => other,
        }
    }

    /// HELD -> EXPIRED, once the hold ran out (`now` at or past `held_until`).
    ///
    /// # Errors
    /// [`BookingError::HoldStillLive`] before that; [`BookingError::NotHeld`] from any
    /// other state.
    pub fn expire(self, held_until: OffsetDateTime, now: OffsetDateTime) -> Result<Self, BookingError> {
        match self {
            Self::Held if now >= held_until => Ok(Self::Expired),
            Self::Held => Err(BookingError::HoldStillLive),
            other => Err(BookingError::NotHeld { status: other }),
        }
    }
}

/// What a seat shows on the seat map at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeatStatus {
    Available,
    Held,
    Sold,
}

impl SeatStatus {
    /// A seat's status from its live reservation, if any: a hold that ran out shows
    /// AVAILABLE at once, whether or not the expiry job has run.
    #[must_use]
    pub fn of(reservation: Option<(ReservationStatus, OffsetDateTime)>, now: OffsetDateTime) -> Self {
        match reservation {
            Some((ReservationStatus::Confirmed, _)) => Self::Sold,
            Some((ReservationStatus::Held, held_until)) => Self::Held.shown(Some(held_until), now),
            _ => Self::Available,
        }
    }

    /// What a seat stored as `self`, whose hold (if any) ends at `held_until`, shows at
    /// `now`: the one rule every reader goes by (the seat row, the cached seat map, a
    /// reservation's seat). A hold that ran out shows AVAILABLE at once; a HELD seat with
    /// no end recorded (which the schema refuses) shows HELD: never free while it may be
    /// someone's.
    #[must_use]
    pub fn shown(self, held_until: Option<OffsetDateTime>, now: OffsetDateTime) -> Self {
        match (self, held_until) {
            (Self::Held, Some(until)) if now >= until => Self::Available,
            (status, _) => status,
        }
    }

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Available => "AVAILABLE",
            Self::Held => "HELD",
            Self::Sold => "SOLD",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookingError {
    #[error("seat number must be between 1 and {SEATS_PER_SCHEDULE}, got {number}")]
    SeatOutOfRange { number: i64 },
    #[error("price must be between 0 and {}, got {points}", Price::MAX)]
    PriceOutOfRange { points: i64 },
    #[error("a booking window must open before it closes, and close no later than the show starts")]
    InvalidWindow,
    #[error("the reservation is {}, not HELD", status.as_str())]
    NotHeld { status: ReservationStatus },
    #[error("the hold has run out")]
    HoldExpired,
    #[error("the hold has not run out yet")]
    HoldStillLive,
    #[error("{what} must be 1 to 200 characters without control characters")]
    InvalidLabel { what: &'static str },
}

/// A concert's title or venue: 1..=200 characters as sent, not only spaces, no control
/// characters; kept trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label(String);

impl Label {
    pub const MAX_CHARS: usize = 200;

    /// # Errors
    /// [`BookingError::InvalidLabel`], naming `what` (`title`, `venue`).
    pub fn new(what: &'static str, raw: &str) -> Result<Self, BookingError> {
        // U+FEFF counts as a space too, as JSON Schema's (ECMAScript's) `\s` has it.
        let trimmed = raw.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
        if trimmed.is_empty() || raw.chars().count() > Self::MAX_CHARS || raw.chars().any(char::is_control) {
            return Err(BookingError::InvalidLabel { what });
        }
        Ok(Self(trimmed.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A concert: what is played where. Its dates are [`Schedule`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concert {
    pub id: ConcertId,
    pub title: Label,
    pub venue: Label,
}

/// A concert date.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub id: ScheduleId,
    pub concert_id: ConcertId,
    pub starts_at: OffsetDateTime,
    pub window: BookingWindow,
}

/// A seat as stored: its own status, which may be a HELD whose hold has run out (see
/// [`SeatStatus::of`] for what it shows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seat {
    pub schedule_id: ScheduleId,
    pub number: SeatNumber,
    pub price: Price,
    pub status: SeatStatus,
    pub reservation_id: Option<ReservationId>,
    pub held_until: Option<OffsetDateTime>,
}

impl Seat {
    /// What the seat shows at `now`.
    #[must_use]
    pub fn status_at(&self, now: OffsetDateTime) -> SeatStatus {
        self.status.shown(self.held_until, now)
    }
}

/// A seat hold and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: ReservationId,
    pub user_id: UserId,
    pub schedule_id: ScheduleId,
    pub seat_number: SeatNumber,
    pub price: Price,
    pub status: ReservationStatus,
    pub held_until: OffsetDateTime,
    pub created_at: OffsetDateTime,
}

impl Reservation {
    /// What the reservation shows at `now` (a run-out hold is EXPIRED).
    #[must_use]
    pub fn status_at(&self, now: OffsetDateTime) -> ReservationStatus {
        self.status.at(self.held_until, now)
    }

    /// A new hold of `seat` for `user_id`, from `now` for `hold`.
    #[must_use]
    pub fn hold(user_id: UserId, seat: &Seat, now: OffsetDateTime, hold: time::Duration) -> Self {
        Self {
            id: ReservationId::generate(),
            user_id,
            schedule_id: seat.schedule_id,
            seat_number: seat.number,
            price: seat.price,
            status: ReservationStatus::Held,
            held_until: now + hold,
            created_at: now,
        }
    }
}

/// A new concert date to add: its seats all get `seat_price`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSchedule {
    pub schedule: Schedule,
    pub seat_price: Price,
}

/// Where concerts, their dates and seats are kept: the reads of the catalog (all outside
/// any transaction) and its admin writes (each one transaction of its own, no lock: they
/// create rows or change labels, never a seat's state).
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait CatalogRepository: Send + Sync {
    /// Every concert, by title.
    async fn concerts(&self) -> Result<Vec<Concert>, BookingRepositoryError>;

    /// One concert.
    async fn concert(&self, id: ConcertId) -> Result<Option<Concert>, BookingRepositoryError>;

    /// Every date of a concert, by start time.
    async fn schedules_of(&self, concert: ConcertId) -> Result<Vec<Schedule>, BookingRepositoryError>;

    /// One date.
    async fn schedule(&self, id: ScheduleId) -> Result<Option<Schedule>, BookingRepositoryError>;

    /// The seats of a date as stored, ascending (a run-out hold still says HELD here).
    async fn seats(&self, schedule: ScheduleId) -> Result<Vec<Seat>, BookingRepositoryError>;

    async fn insert_concert(&self, concert: &Concert) -> Result<(), BookingRepositoryError>;

    /// Changes a concert's title and venue; `false` when there is no such concert.
    async fn update_concert(&self, concert: &Concert) -> Result<bool, BookingRepositoryError>;

    /// Inserts a date and its 50 seats, in one transaction; `false` when the concert does
    /// not exist.
    async fn insert_schedule(&self, new: &NewSchedule) -> Result<bool, BookingRepositoryError>;
}

/// Where seat holds are taken and settled, inside the transactions the use cases open.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait BookingRepository: Send + Sync {
    /// A seat, its row locked in `tx` (`SELECT ... FOR UPDATE`).
    async fn lock_seat(
        &self,
        tx: &mut Tx,
        schedule_id: ScheduleId,
        number: SeatNumber,
    ) -> Result<Option<Seat>, BookingRepositoryError>;

    /// How many live holds (HELD, not run out on the database's clock) `user` has on
    /// `schedule`, counted after locking the user's row in `tx`: two holds of one user
    /// (on any seats, through any instances) count one after the other, so a limit checked
    /// on this count cannot be passed by racing.
    async fn lock_live_holds(
        &self,
        tx: &mut Tx,
        user: UserId,
        schedule: ScheduleId,
    ) -> Result<u32, BookingRepositoryError>;

    /// Takes the seat for `reservation` in `tx`: the seat goes HELD only if it is
    /// AVAILABLE or its hold has run out (rows affected checked); a run-out hold it
    /// replaces (`replaces`) becomes EXPIRED; the reservation row is inserted. The hold
    /// lasts `reservation.held_until - now`, counted **on the database's clock** (as every
    /// "has this hold run out" of the store is), and the end it stored is returned: the
    /// one to tell the client.
    ///
    /// # Errors
    /// [`BookingRepositoryError::SeatTaken`] when the seat is not free (the SQL guards:
    /// the conditional update, the unique live-seat key).
    async fn hold_seat(
        &self,
        tx: &mut Tx,
        reservation: &Reservation,
        replaces: Option<ReservationId>,
        now: OffsetDateTime,
    ) -> Result<OffsetDateTime, BookingRepositoryError>;

    /// A reservation, outside any transaction.
    async fn reservation(&self, id: ReservationId) -> Result<Option<Reservation>, BookingRepositoryError>;

    /// A reservation as last committed, read in `tx` (on its connection: a transaction
    /// never waits for a second one from the pool).
    async fn reservation_in(
        &self,
        tx: &mut Tx,
        id: ReservationId,
    ) -> Result<Option<Reservation>, BookingRepositoryError>;

    /// Ends a hold in `tx`: the reservation goes HELD -> `to` (CANCELLED only while the
    /// hold lasts at `now`, EXPIRED only once it ran out: both conditions are in the SQL,
    /// rows affected checked) and its seat AVAILABLE again if the seat still names it.
    /// `false` when the reservation was not in that state any more (nothing changed).
    async fn end_hold(
        &self,
        tx: &mut Tx,
        reservation: ReservationId,
        to: ReservationStatus,
        now: OffsetDateTime,
    ) -> Result<bool, BookingRepositoryError>;

    /// Confirms a paid hold in `tx`: the reservation HELD -> CONFIRMED only while the
    /// hold lasts at `now`, and its seat SOLD only if the seat still names it (both in the
    /// SQL, rows affected checked). `false` when the reservation was not a live hold any
    /// more (nothing changed).
    async fn confirm(
        &self,
        tx: &mut Tx,
        reservation: &Reservation,
        now: OffsetDateTime,
    ) -> Result<bool, BookingRepositoryError>;

    /// Up to `limit` holds that ran out by `now` and are still HELD, oldest first.
    async fn run_out_holds(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<Reservation>, BookingRepositoryError>;
}

#[derive(Debug, thiserror::Error)]
pub enum BookingRepositoryError {
    /// The seat was not free when the write reached the database.
    #[error("the seat is taken")]
    SeatTaken,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[cfg(test)]
mod tests {
    use time::Duration;
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2026-11-22 10:00 UTC);

    #[test]
    fn seat_numbers_are_one_to_fifty() {
        assert_eq!(SeatNumber::new(1).map(SeatNumber::get), Ok(1));
        assert_eq!(SeatNumber::new(50).map(SeatNumber::get), Ok(50));
        for bad in [0, 51, -5, 1 << 40, i64::MIN, 256 + 1] {
            assert_eq!(SeatNumber::new(bad), Err(BookingError::SeatOutOfRange { number: bad }));
        }
        assert_eq!(SeatNumber::all().count(), 50);
    }

    #[test]
    fn prices_are_never_negative_nor_above_the_ceiling() {
        assert!(Price::new(0).is_ok() && Price::new(Price::MAX).is_ok());
        assert!(Price::new(-1).is_err() && Price::new(Price::MAX + 1).is_err());
    }

    #[test]
    fn a_window_opens_before_it_closes_and_closes_by_the_show() {
        let show = NOW + Duration::days(10);
        let window = BookingWindow::new(NOW, NOW + Duration::days(9), show).unwrap();
        assert!(window.is_open(NOW) && window.is_open(NOW + Duration::days(8)));
        assert!(!window.is_open(NOW - Duration::seconds(1)) && !window.is_open(NOW + Duration::days(9)));
        assert_eq!(BookingWindow::new(NOW, NOW, show), Err(BookingError::InvalidWindow));
        assert_eq!(
            BookingWindow::new(NOW, show + Duration::hours(1), show),
            Err(BookingError::InvalidWindow)
        );
    }

    #[test]
    fn a_hold_is_confirmed_only_while_it_lasts() {
        let until = NOW + Duration::minutes(5);
        assert_eq!(ReservationStatus::Held.confirm(until, NOW), Ok(ReservationStatus::Confirmed));
        assert_eq!(ReservationStatus::Held.confirm(until, until), Err(BookingError::HoldExpired));
        for settled in
            [ReservationStatus::Confirmed, ReservationStatus::Expired, ReservationStatus::Cancelled]
        {
            assert_eq!(settled.confirm(until, NOW), Err(BookingError::NotHeld { status: settled }));
        }
    }

    #[test]
    fn only_a_hold_is_cancelled_and_only_a_run_out_hold_expires() {
        let until = NOW + Duration::minutes(5);
        assert_eq!(ReservationStatus::Held.cancel(until, NOW), Ok(ReservationStatus::Cancelled));
        assert_eq!(
            ReservationStatus::Held.cancel(until, until),
            Err(BookingError::NotHeld { status: ReservationStatus::Expired }),
            "a run-out hold is EXPIRED, not cancellable"
        );
        assert_eq!(
            ReservationStatus::Confirmed.cancel(until, NOW),
            Err(BookingError::NotHeld { status: ReservationStatus::Confirmed })
        );
        assert_eq!(ReservationStatus::Held.at(until, until), ReservationStatus::Expired);
        assert_eq!(ReservationStatus::Confirmed.at(until, until), ReservationStatus::Confirmed);
        assert_eq!(ReservationStatus::Held.expire(until, until), Ok(ReservationStatus::Expired));
        assert_eq!(ReservationStatus::Held.expire(until, NOW), Err(BookingError::HoldStillLive));
        assert_eq!(
            ReservationStatus::Cancelled.expire(until, until),
            Err(BookingError::NotHeld { status: ReservationStatus::Cancelled })
        );
        for status in [
            ReservationStatus::Held,
            ReservationStatus::Confirmed,
            ReservationStatus::Expired,
            ReservationStatus::Cancelled,
        ] {
            assert_eq!(ReservationStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(ReservationStatus::parse("held"), None);
    }

    #[test]
    fn a_stored_hold_that_ran_out_shows_available() {
        let seat = Seat {
            schedule_id: ScheduleId::generate(),
            number: SeatNumber::new(3).unwrap(),
            price: Price::new(100).unwrap(),
            status: SeatStatus::Held,
            reservation_id: Some(ReservationId::generate()),
            held_until: Some(NOW),
        };
        assert_eq!(seat.status_at(NOW - Duration::seconds(1)), SeatStatus::Held);
        assert_eq!(seat.status_at(NOW), SeatStatus::Available);
        let held = Reservation::hold(UserId::generate(), &seat, NOW, Duration::minutes(5));
        assert_eq!(
            (held.status, held.held_until, held.price),
            (ReservationStatus::Held, NOW + Duration::minutes(5), seat.price)
        );
    }

    #[test]
    fn a_hold_that_ran_out_shows_available_at_once() {
        let until = NOW + Duration::minutes(5);
        assert_eq!(SeatStatus::of(None, NOW), SeatStatus::Available);
        assert_eq!(SeatStatus::of(Some((ReservationStatus::Held, until)), NOW), SeatStatus::Held);
        // A hold the store refused to confirm or end while still stored HELD ran out.
        assert_eq!(
            ReservationStatus::after_refusal(Some(ReservationStatus::Held)),
            ReservationStatus::Expired
        );
        assert_eq!(ReservationStatus::after_refusal(None), ReservationStatus::Expired);
        assert_eq!(
            ReservationStatus::after_refusal(Some(ReservationStatus::Confirmed)),
            ReservationStatus::Confirmed
        );
        // One rule for every reader: a HELD seat with no recorded end is never shown free.
        assert_eq!(SeatStatus::Held.shown(None, NOW), SeatStatus::Held);
        assert_eq!(SeatStatus::Held.shown(Some(NOW), NOW), SeatStatus::Available);
        assert_eq!(SeatStatus::Sold.shown(Some(NOW - Duration::days(1)), NOW), SeatStatus::Sold);
        assert_eq!(SeatStatus::of(Some((ReservationStatus::Held, until)), until), SeatStatus::Available);
        assert_eq!(SeatStatus::of(Some((ReservationStatus::Confirmed, until)), until), SeatStatus::Sold);
        assert_eq!(SeatStatus::of(Some((ReservationStatus::Cancelled, until)), NOW), SeatStatus::Available);
    }
}
