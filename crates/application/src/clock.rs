//! The current time, as the service stores it.

use time::OffsetDateTime;

/// Now, in UTC, truncated to whole microseconds: the precision MySQL `DATETIME(6)` keeps,
/// so what a use case returns equals what a later read gives back.
#[must_use]
pub fn now_utc() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    let micros = now.nanosecond() / 1_000 * 1_000;
    now.replace_nanosecond(micros).unwrap_or(now)
}
