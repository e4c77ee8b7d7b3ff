//! The hot statements, as the adapters run them (`?` for each bound value), and the list
//! [`EXPLAINED`] that `docs/explain.sh` (through `tests/src/bin/explain.rs`) explains on a
//! scratch database: the plans in `docs/report/explain.md` are of these very strings, so
//! they cannot drift from the code.
//!
//! Statements built with `format!` for a batch of values (the seats of a new date, the
//! outbox's `seq IN (...)`) and the admin writes stay inline in their adapters.

// --- Catalog (catalog.rs): the cache's loads and the hold's pre-check ---------------------

/// Every concert, by title.
pub const CONCERTS: &str = "SELECT id, title, venue FROM concerts ORDER BY title, id";

/// One concert: its id.
pub const CONCERT: &str = "SELECT id, title, venue FROM concerts WHERE id = ?";

/// A concert's dates: the concert's id.
pub const CONCERT_SCHEDULES: &str = "SELECT id, concert_id, starts_at, booking_opens_at, booking_closes_at FROM schedules \
     WHERE concert_id = ? ORDER BY starts_at, id";

/// One date: its id.
pub const SCHEDULE: &str =
    "SELECT id, concert_id, starts_at, booking_opens_at, booking_closes_at FROM schedules WHERE id = ?";

/// A date's seat map: the date's id.
pub const SEAT_MAP: &str = "SELECT seat_number, price, status, reservation_id, held_until FROM seats \
     WHERE schedule_id = ? ORDER BY seat_number";

// --- Identity (users.rs, signing_keys.rs) -------------------------------------------------

/// A new API key's digest: the digest, the user's id.
pub const ADD_API_KEY: &str =
    "INSERT INTO api_keys (key_digest, user_id, created_at) VALUES (?, ?, UTC_TIMESTAMP(6))";

/// Signing in: the user of an API key's digest.
pub const FIND_API_KEY: &str = "SELECT user_id FROM api_keys WHERE key_digest = ?";

// --- Booking (booking.rs) ----------------------------------------------------------------

/// A hold's seat row, locked: the date's id, the seat number.
pub const LOCK_SEAT: &str = "SELECT seat_number, price, status, reservation_id, held_until FROM seats \
     WHERE schedule_id = ? AND seat_number = ? FOR UPDATE";

/// The hold limit's serialisation point: the holder's row, locked (the user's id).
pub const LOCK_USER: &str = "SELECT id FROM users WHERE id = ? FOR UPDATE";

/// The hold limit's count: the user's id, the date's id.
///
/// A plain (consistent) read, and it must stay the **first** plain read of the hold's
/// transaction: under REPEATABLE READ the snapshot is taken at the first one, and the reads
/// before it (`LOCK_SEAT`, `LOCK_USER`) are locking reads, which take none. So the snapshot
/// is taken after the user's row lock was granted and sees every hold of this user that
/// committed while this one waited. (A locking read, `LOCK IN SHARE MODE`, would not need
/// that rule, but its gap locks on the (user, date) key block other users' reservation
/// inserts and deadlock concurrent holds: measured, 503s in the seat storms.)
pub const LIVE_HOLDS: &str = "SELECT COUNT(*) AS n FROM reservations \
     WHERE user_id = ? AND schedule_id = ? AND status = 'HELD' AND held_until > UTC_TIMESTAMP(6)";

/// A hold's conditional take of its seat (rows affected checked): the reservation's id, the
/// hold's length in microseconds, the seat lock's fencing number (or NULL), the date's id,
/// the seat number, the fencing number twice more. A number lower than the seat's `fence`
/// (a later holder of the seat lock wrote) matches nothing.
pub const TAKE_SEAT: &str = "UPDATE seats SET status = 'HELD', reservation_id = ?, \
       held_until = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, version = version + 1, fence = COALESCE(?, fence) \
     WHERE schedule_id = ? AND seat_number = ? \
       AND (status = 'AVAILABLE' OR (status = 'HELD' AND held_until <= UTC_TIMESTAMP(6))) \
       AND (? IS NULL OR fence <= ?)";

/// The run-out hold a new hold replaces, expired: the time, the old reservation's id.
pub const EXPIRE_REPLACED_HOLD: &str =
    "UPDATE reservations SET status = 'EXPIRED', updated_at = ? WHERE id = ? AND status = 'HELD'";

/// A hold's reservation, inserted only while its seat names it (the hold's end copied from
/// the seat): id, user, date, seat, price, created, updated; then the date, the seat and
/// the reservation's id the seat must name.
pub const INSERT_HOLD: &str = "INSERT INTO reservations (id, user_id, schedule_id, seat_number, price, status, held_until, created_at, updated_at) \
     SELECT ?, ?, ?, ?, ?, 'HELD', held_until, ?, ? FROM seats \
     WHERE schedule_id = ? AND seat_number = ? AND reservation_id = ?";

/// A new hold's end, as stored: the reservation's id.
pub const HOLD_END: &str = "SELECT held_until FROM reservations WHERE id = ?";

/// A reservation (a plain read): its id.
pub const RESERVATION: &str = "SELECT id, user_id, schedule_id, seat_number, price, status, held_until, created_at \
     FROM reservations WHERE id = ?";

/// A reservation inside a transaction: a locking read, the row as last committed: its id.
pub const RESERVATION_IN_TX: &str = "SELECT id, user_id, schedule_id, seat_number, price, status, held_until, created_at \
     FROM reservations WHERE id = ? LOCK IN SHARE MODE";

/// Before ending or confirming a hold, the seat it is for (a plain read): its id.
pub const RESERVATION_SEAT: &str = "SELECT schedule_id, seat_number FROM reservations WHERE id = ?";

/// Before ending or confirming a hold, its seat row locked: the date's id, the seat number.
pub const LOCK_RESERVATION_SEAT: &str =
    "SELECT seat_number FROM seats WHERE schedule_id = ? AND seat_number = ? FOR UPDATE";

/// Before ending or confirming a hold, its reservation row locked: its id.
pub const LOCK_RESERVATION: &str = "SELECT id FROM reservations WHERE id = ? FOR UPDATE";

/// Cancel: HELD to CANCELLED, only while the hold lasts: the time, the reservation's id.
pub const CANCEL_HOLD: &str = "UPDATE reservations SET status = 'CANCELLED', updated_at = ? \
     WHERE id = ? AND status = 'HELD' AND held_until > UTC_TIMESTAMP(6)";

/// Expiry: HELD to EXPIRED, only once the hold ran out: the time, the reservation's id.
pub const EXPIRE_HOLD: &str = "UPDATE reservations SET status = 'EXPIRED', updated_at = ? \
     WHERE id = ? AND status = 'HELD' AND held_until <= UTC_TIMESTAMP(6)";

/// A cancelled or expired hold's seat, freed if it still names that hold: the reservation's
/// id, twice.
pub const FREE_SEAT: &str = "UPDATE seats s JOIN reservations r ON r.schedule_id = s.schedule_id AND r.seat_number = s.seat_number \
     SET s.status = 'AVAILABLE', s.reservation_id = NULL, s.held_until = NULL, s.version = s.version + 1 \
     WHERE r.id = ? AND s.reservation_id = ?";

/// Pay: HELD to CONFIRMED, only while the hold lasts: the time, the reservation's id.
pub const CONFIRM: &str = "UPDATE reservations SET status = 'CONFIRMED', updated_at = ? \
     WHERE id = ? AND status = 'HELD' AND held_until > UTC_TIMESTAMP(6)";

/// Pay: the held seat sold: the date's id, the seat number, the reservation's id.
pub const SELL_SEAT: &str = "UPDATE seats SET status = 'SOLD', held_until = NULL, version = version + 1 \
     WHERE schedule_id = ? AND seat_number = ? AND reservation_id = ? AND status = 'HELD'";

/// The expiry job: run-out holds, oldest first: how many at most.
pub const RUN_OUT_HOLDS: &str = "SELECT id, user_id, schedule_id, seat_number, price, status, held_until, created_at \
     FROM reservations WHERE status = 'HELD' AND held_until <= UTC_TIMESTAMP(6) \
     ORDER BY held_until LIMIT ?";

// --- Points (points.rs) ------------------------------------------------------------------

/// A point account, locked: the user's id.
pub const LOCK_ACCOUNT: &str =
    "SELECT user_id, balance, version, updated_at FROM point_accounts WHERE user_id = ? FOR UPDATE";

/// The account read without locking, by the optimistic charge (`POINT_CHARGE_STRATEGY=optimistic`,
/// a benchmark's baseline): the user's id.
pub const READ_ACCOUNT: &str =
    "SELECT user_id, balance, version, updated_at FROM point_accounts WHERE user_id = ?";

/// A balance's compare-and-set (rows affected checked): the new balance, the new version,
/// the time, the point lock's fencing number (or NULL, unfenced), the user's id, the
/// version read, the fencing number twice more. A number lower than the account's `fence`
/// (a later holder of the point lock wrote) matches nothing.
pub const SAVE_BALANCE: &str = "UPDATE point_accounts SET balance = ?, version = ?, updated_at = ?, fence = COALESCE(?, fence) \
     WHERE user_id = ? AND version = ? AND (? IS NULL OR fence <= ?)";

/// After a refused [`SAVE_BALANCE`]: the account's fence, to tell a stale version from a
/// fenced-out holder (the user's id). A locking read: it must see the latest committed
/// fence, not the transaction's snapshot (a keyed charge's snapshot is taken before its
/// lock); the row is this transaction's already, so it waits for nothing.
pub const ACCOUNT_FENCE: &str = "SELECT fence FROM point_accounts WHERE user_id = ? LOCK IN SHARE MODE";

/// After a refused [`TAKE_SEAT`]: the seat's fence, to log a fenced-out holder (the date's
/// id, the seat number). Locking, for the same reason as [`ACCOUNT_FENCE`].
pub const SEAT_FENCE: &str =
    "SELECT fence FROM seats WHERE schedule_id = ? AND seat_number = ? LOCK IN SHARE MODE";

/// A point history entry: id, user, kind, amount, balance after, seq, time.
pub const APPEND_HISTORY: &str = "INSERT INTO point_history (id, user_id, kind, amount, balance_after, seq, created_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?)";

/// [`APPEND_HISTORY`] for `rows` entries in one statement (a batch of charges): the same
/// seven values per row, row after row.
#[must_use]
pub fn append_history_rows(rows: usize) -> String {
    let mut sql = String::from(APPEND_HISTORY);
    for _ in 1..rows {
        sql.push_str(", (?, ?, ?, ?, ?, ?, ?)");
    }
    sql
}

// --- Idempotency keys (idempotency.rs) ---------------------------------------------------

/// A stored answer, before the operation (a plain read): the user's id, the key.
pub const IDEMPOTENCY_FIND: &str = "SELECT fingerprint, response, created_at, expires_at FROM idempotency_keys \
     WHERE user_id = ? AND idem_key = ?";

/// Whether a key is recorded, inside the operation's transaction: the user's id, the key.
pub const IDEMPOTENCY_IS_RECORDED: &str =
    "SELECT 1 AS found FROM idempotency_keys WHERE user_id = ? AND idem_key = ?";

/// An answer recorded: user, key, fingerprint, response, created, expires.
pub const IDEMPOTENCY_INSERT: &str = "INSERT INTO idempotency_keys (user_id, idem_key, fingerprint, response, created_at, expires_at) \
     VALUES (?, ?, ?, ?, ?, ?)";

// --- Payments and their outbox (payments.rs, outbox.rs) ----------------------------------

/// A payment: id, reservation, user, amount, status, queue token, time.
pub const INSERT_PAYMENT: &str = "INSERT INTO payments (id, reservation_id, user_id, amount, status, queue_token, paid_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?)";

/// An outbox event, in the payment's transaction: id, aggregate, type, payload, time.
pub const APPEND_OUTBOX: &str =
    "INSERT INTO outbox_events (id, aggregate_id, event_type, payload, created_at) VALUES (?, ?, ?, ?, ?)";

/// The relay's claim of unsent events, oldest first, none of whose aggregate has an older
/// unsent one: how many at most.
pub const CLAIM_OUTBOX: &str = "SELECT o.seq, o.id, o.aggregate_id, o.event_type, o.payload, o.created_at FROM outbox_events o \
     WHERE o.sent_at IS NULL AND NOT EXISTS ( \
       SELECT 1 FROM outbox_events p \
       WHERE p.aggregate_id = o.aggregate_id AND p.sent_at IS NULL AND p.seq < o.seq) \
     ORDER BY o.seq LIMIT ? FOR UPDATE SKIP LOCKED";

// --- Coupons (coupons.rs) ----------------------------------------------------------------

/// A new campaign, nothing issued yet: id, name, discount, quantity, issue opens, issue
/// closes, valid until, created.
pub const INSERT_CAMPAIGN: &str = "INSERT INTO coupon_campaigns \
       (id, name, discount, quantity, issue_opens_at, issue_closes_at, valid_until, created_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?)";

/// One campaign: its id.
pub const CAMPAIGN: &str = "SELECT id, name, discount, quantity, issue_opens_at, issue_closes_at, valid_until, created_at \
     FROM coupon_campaigns WHERE id = ?";

/// How many coupons of a campaign are issued: its counter (a primary-key read).
pub const CAMPAIGN_ISSUED: &str = "SELECT issued FROM coupon_campaigns WHERE id = ?";

/// A campaign, its row locked until the transaction ends: the pessimistic baseline's first
/// statement (every request of a campaign queues here).
pub const LOCK_CAMPAIGN: &str = "SELECT id, name, discount, quantity, issue_opens_at, issue_closes_at, valid_until, created_at \
     FROM coupon_campaigns WHERE id = ? FOR UPDATE";

/// A coupon counted against its campaign (rows affected checked), first in the insert's
/// transaction: the campaign's id. The quantity guard is here, not in a count of
/// `coupons` rows: the row lock this takes queues the campaign's concurrent inserts one
/// behind the other, and each sees the count the one before it committed (an `UPDATE`
/// reads the latest row, not the transaction's snapshot). No row changed is "sold out".
pub const COUNT_COUPON: &str =
    "UPDATE coupon_campaigns SET issued = issued + 1 WHERE id = ? AND issued < quantity";

/// A coupon, after [`COUNT_COUPON`] counted it: id, campaign, user, discount, status,
/// valid until, issued. `uq_coupons_campaign_user` refuses a second coupon of the campaign
/// for the user; the caller then rolls back, and the count with it.
pub const INSERT_COUPON: &str = "INSERT INTO coupons (id, campaign_id, user_id, discount, status, valid_until, issued_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?)";

/// The users holding a coupon of a campaign, to rebuild the fast path from: the campaign's
/// id (a range of `uq_coupons_campaign_user`).
pub const CAMPAIGN_HOLDERS: &str = "SELECT user_id FROM coupons WHERE campaign_id = ?";

/// A coupon as a payment sees it, its row locked until the payment's transaction ends (so
/// that two payments cannot both read it AVAILABLE): the coupon's id.
pub const COUPON_FOR_PAYMENT: &str =
    "SELECT user_id, discount, status, valid_until FROM coupons WHERE id = ? FOR UPDATE";

/// Marks a coupon USED by a payment: when, by which payment, the coupon's id. Guarded by
/// its status again, so it cannot be used twice whatever read it before.
pub const USE_COUPON: &str =
    "UPDATE coupons SET status = 'USED', used_at = ?, payment_id = ? WHERE id = ? AND status = 'AVAILABLE'";

/// Whether a coupon exists: its id (a primary-key read).
pub const COUPON_EXISTS: &str = "SELECT 1 AS found FROM coupons WHERE id = ?";

/// Whether a user has a coupon of a campaign: the campaign's id, the user's id.
pub const HAS_COUPON: &str = "SELECT 1 AS found FROM coupons WHERE campaign_id = ? AND user_id = ?";

/// A user's coupons, newest first (`ix_coupons_user` read backwards; the id breaks ties
/// of one microsecond): the user's id, how many at most.
pub const USER_COUPONS: &str = "SELECT id, campaign_id, user_id, discount, status, valid_until, issued_at FROM coupons \
     WHERE user_id = ? ORDER BY issued_at DESC, id DESC LIMIT ?";

/// Campaigns the reconciler looks at, issuing now or closed lately: the earliest close
/// still of interest (now minus the grace), now.
pub const RECENT_CAMPAIGNS: &str = "SELECT id, name, discount, quantity, issue_opens_at, issue_closes_at, valid_until, created_at \
     FROM coupon_campaigns WHERE issue_closes_at > ? AND issue_opens_at <= ? ORDER BY issue_closes_at, id";

// --- What `docs/explain.sh` explains -----------------------------------------------------

use Sample::{Concert, Id, Limit, Micros, Number, Reservation, Schedule, Seat, Text, Time, User};

/// The kind of value bound to a `?` when a statement is explained; the explain program
/// picks a sample of each kind that exists in its scratch database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sample {
    /// A date's id.
    Schedule,
    /// A concert's id.
    Concert,
    /// A reservation's id.
    Reservation,
    /// A user's id.
    User,
    /// The id of a row being inserted (no row has it).
    Id,
    /// A seat number.
    Seat,
    /// A hold's length, in microseconds.
    Micros,
    /// A batch size (`LIMIT ?`).
    Limit,
    /// A point in time (now).
    Time,
    /// A string: an idempotency key, a kind, a status, a payload.
    Text,
    /// A number: an amount, a balance, a version, a seq.
    Number,
}

/// One hot statement to explain: what it is for, the SQL the adapter runs, and the kind of
/// each of its `?`, in order.
#[derive(Clone, Copy, Debug)]
pub struct Explained {
    pub title: &'static str,
    pub sql: &'static str,
    pub params: &'static [Sample],
}

/// Every hot statement, in the order of a booking's life: sign-in, the cache's loads, a hold, pay,
/// cancel, the expiry job, then points, idempotency keys and the outbox.
pub const EXPLAINED: &[Explained] = &[
    Explained { title: "Sign-in: the user of an API key", sql: FIND_API_KEY, params: &[Text] },
    Explained { title: "Every concert (cache load)", sql: CONCERTS, params: &[] },
    Explained { title: "A concert (cache load)", sql: CONCERT, params: &[Concert] },
    Explained { title: "A concert's dates (cache load)", sql: CONCERT_SCHEDULES, params: &[Concert] },
    Explained { title: "A date (cache load, hold pre-check)", sql: SCHEDULE, params: &[Schedule] },
    Explained { title: "Seat map (cache load)", sql: SEAT_MAP, params: &[Schedule] },
    Explained { title: "Hold: the seat row, locked", sql: LOCK_SEAT, params: &[Schedule, Seat] },
    Explained { title: "Hold limit: the holder's row, locked", sql: LOCK_USER, params: &[User] },
    Explained {
        title: "Hold limit: the holder's live holds of the date",
        sql: LIVE_HOLDS,
        params: &[User, Schedule],
    },
    Explained {
        title: "Hold: the conditional take",
        sql: TAKE_SEAT,
        params: &[Reservation, Micros, Number, Schedule, Seat, Number, Number],
    },
    Explained {
        title: "Hold: the run-out hold it replaces, expired",
        sql: EXPIRE_REPLACED_HOLD,
        params: &[Time, Reservation],
    },
    Explained {
        title: "Hold: the reservation, inserted while the seat names it",
        sql: INSERT_HOLD,
        params: &[Reservation, User, Schedule, Seat, Number, Time, Time, Schedule, Seat, Reservation],
    },
    Explained { title: "Hold: its end, as stored", sql: HOLD_END, params: &[Reservation] },
    Explained { title: "A reservation", sql: RESERVATION, params: &[Reservation] },
    Explained {
        title: "A reservation in a transaction (pay, cancel; locking read)",
        sql: RESERVATION_IN_TX,
        params: &[Reservation],
    },
    Explained {
        title: "Pay / cancel / expire: the reservation's seat",
        sql: RESERVATION_SEAT,
        params: &[Reservation],
    },
    Explained {
        title: "Pay / cancel / expire: the seat row, locked",
        sql: LOCK_RESERVATION_SEAT,
        params: &[Schedule, Seat],
    },
    Explained {
        title: "Pay / cancel / expire: the reservation row, locked",
        sql: LOCK_RESERVATION,
        params: &[Reservation],
    },
    Explained { title: "Pay: the conditional confirm", sql: CONFIRM, params: &[Time, Reservation] },
    Explained { title: "Pay: the seat sold", sql: SELL_SEAT, params: &[Schedule, Seat, Reservation] },
    Explained {
        title: "Pay: the payment",
        sql: INSERT_PAYMENT,
        params: &[Id, Reservation, User, Number, Text, Id, Time],
    },
    Explained { title: "Cancel: the conditional transition", sql: CANCEL_HOLD, params: &[Time, Reservation] },
    Explained {
        title: "Cancel / expire: free the seat if it is still this hold's",
        sql: FREE_SEAT,
        params: &[Reservation, Reservation],
    },
    Explained { title: "Expiry job: run-out holds, oldest first", sql: RUN_OUT_HOLDS, params: &[Limit] },
    Explained { title: "Expiry: the conditional transition", sql: EXPIRE_HOLD, params: &[Time, Reservation] },
    Explained { title: "Points: the account, locked", sql: LOCK_ACCOUNT, params: &[User] },
    Explained {
        title: "Points: the balance's compare-and-set",
        sql: SAVE_BALANCE,
        params: &[Number, Number, Time, Number, User, Number, Number, Number],
    },
    Explained {
        title: "Points: the history entry",
        sql: APPEND_HISTORY,
        params: &[Id, User, Text, Number, Number, Number, Time],
    },
    Explained {
        title: "Idempotency: the stored answer (before the operation)",
        sql: IDEMPOTENCY_FIND,
        params: &[User, Text],
    },
    Explained {
        title: "Idempotency: recorded already? (in the transaction)",
        sql: IDEMPOTENCY_IS_RECORDED,
        params: &[User, Text],
    },
    Explained {
        title: "Idempotency: the answer recorded",
        sql: IDEMPOTENCY_INSERT,
        params: &[User, Text, Text, Text, Time, Time],
    },
    Explained {
        title: "Outbox: the event, in the payment's transaction",
        sql: APPEND_OUTBOX,
        params: &[Id, Id, Text, Text, Time],
    },
    Explained { title: "Outbox relay: the claim", sql: CLAIM_OUTBOX, params: &[Limit] },
];

#[cfg(test)]
mod tests {
    use super::EXPLAINED;

    #[test]
    fn every_placeholder_has_a_sample() {
        for explained in EXPLAINED {
            assert_eq!(
                explained.sql.matches('?').count(),
                explained.params.len(),
                "{}: {}",
                explained.title,
                explained.sql
            );
        }
    }

    #[test]
    fn titles_are_distinct() {
        let mut titles: Vec<&str> = EXPLAINED.iter().map(|e| e.title).collect();
        titles.sort_unstable();
        titles.dedup();
        assert_eq!(titles.len(), EXPLAINED.len());
    }
}
