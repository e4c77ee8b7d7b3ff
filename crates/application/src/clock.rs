//! The current time, as the service stores it.

use time::OffsetDateTime;

/// Now, in UTC, truncated to whole microseconds: the precision MySQL `DATETIME(6)` keeps,
/// so what a use case returns equals what a later read gives back.
#[must_use]
pub fn now_utc() -> OffsetDateTime {
    to_micros(OffsetDateTime::now_utc())
}

/// `at` in UTC, truncated to whole microseconds (what MySQL keeps of it).
#[must_use]
pub fn to_micros(at: OffsetDateTime) -> OffsetDateTime {
    let at = at.to_offset(time::UtcOffset::UTC);
    let micros = at.nanosecond() / 1_000 * 1_000;
    at.replace_nanosecond(micros).unwrap_or(at)
}
