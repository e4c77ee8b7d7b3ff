//! `BookingRepository` on MySQL, in plain SQL.
//!
//! A hold is guarded twice in SQL, whatever the lock did: the seat row changes only
//! `WHERE status = 'AVAILABLE' OR (status = 'HELD' AND held_until <= now)` (rows affected
//! checked), and the reservation's insert meets `UNIQUE (schedule_id, live_seat)`.

use anyhow::Context as _;
use async_trait::async_trait;
use domain::booking::{
    BookingRepository, BookingRepositoryError, Price, Reservation, ReservationId, ReservationStatus,
    ScheduleId, Seat, SeatNumber, SeatStatus,
};
use domain::unit_of_work::Tx;
use domain::user::UserId;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, QueryResult, SqlErr, Statement};
use time::{OffsetDateTime, PrimitiveDateTime};

use crate::tx::connection;
use crate::{DbContext as _, column, db_error, from_db_time, sql, to_db_time};

#[derive(Clone, Debug)]
pub struct MySqlBookingRepository {
    db: DatabaseConnection,
}

impl MySqlBookingRepository {
    #[must_use]
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

pub(crate) fn seat_from(row: &QueryResult, schedule_id: ScheduleId) -> anyhow::Result<Seat> {
    let status = match column::<String>(row, "status")?.as_str() {
        "AVAILABLE" => SeatStatus::Available,
        "HELD" => SeatStatus::Held,
        "SOLD" => SeatStatus::Sold,
        other => anyhow::bail!("unknown seat status {other:?}"),
    };
    Ok(Seat {
        schedule_id,
        number: SeatNumber::new(i64::from(column::<u8>(row, "seat_number")?))
            .context("a stored seat number")?,
        price: Price::new(column(row, "price")?).context("a stored price")?,
        status,
        reservation_id: column::<Option<uuid::Uuid>>(row, "reservation_id")?.map(ReservationId::from_uuid),
        held_until: column::<Option<PrimitiveDateTime>>(row, "held_until")?.map(from_db_time),
    })
}

fn reservation_from(row: &QueryResult) -> anyhow::Result<Reservation> {
    let status = column::<String>(row, "status")?;
    Ok(Reservation {
        id: ReservationId::from_uuid(column(row, "id")?),
        user_id: UserId::from_uuid(column(row, "user_id")?),
        schedule_id: ScheduleId::from_uuid(column(row, "schedule_id")?),
        seat_number: SeatNumber::new(i64::from(column::<u8>(row, "seat_number")?))
            .context("a stored seat number")?,
        price: Price::new(column(row, "price")?).context("a stored price")?,
        status: ReservationStatus::parse(&status)
            .with_context(|| format!("unknown reservation status {status:?}"))?,
        held_until: from_db_time(column(row, "held_until")?),
        created_at: from_db_time(column(row, "created_at")?),
    })
}

/// Locks a reservation's seat row, then the reservation's row, by their primary keys,
/// before a conditional update of the reservation: the same order as a hold (seat row, then
/// reservations), so that a payment or cancel never waits for a hold in the other order
/// (a deadlock, otherwise possible around a hold's end). Locking by primary key first also
/// keeps the conditional update from locking a range of `ix_reservations_expiry`, where two
/// updates of one row (possible only without the distributed lock) would deadlock.
async fn lock_seat_and_reservation(
    conn: &sea_orm::DatabaseTransaction,
    id: ReservationId,
) -> Result<(), BookingRepositoryError> {
    // The seat a reservation is for never changes: a plain read finds it.
    let seat = conn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            sql::RESERVATION_SEAT,
            [(*id.as_uuid()).into()],
        ))
        .await
        .db_context("failed to read a reservation")?;
    let Some(seat) = seat else { return Ok(()) };
    conn.query_one_raw(Statement::from_sql_and_values(
        DbBackend::MySql,
        sql::LOCK_RESERVATION_SEAT,
        [column::<uuid::Uuid>(&seat, "schedule_id")?.into(), column::<u8>(&seat, "seat_number")?.into()],
    ))
    .await
    .db_context("failed to lock a seat")?;
    conn.query_one_raw(Statement::from_sql_and_values(
        DbBackend::MySql,
        sql::LOCK_RESERVATION,
        [(*id.as_uuid()).into()],
    ))
    .await
    .db_context("failed to lock a reservation")?;
    Ok(())
}

#[async_trait]
impl BookingRepository for MySqlBookingRepository {
    #[tracing::instrument(name = "bookings.lock_live_holds", skip(self, tx))]
    async fn lock_live_holds(
        &self,
        tx: &mut Tx,
        user: UserId,
        schedule: ScheduleId,
    ) -> Result<u32, BookingRepositoryError> {
        let conn = connection(tx)?;
        conn.query_one_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            sql::LOCK_USER,
            [(*user.as_uuid()).into()],
        ))
        .await
        .db_context("failed to lock the user")?;
        let row = conn
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::LIVE_HOLDS,
                [(*user.as_uuid()).into(), (*schedule.as_uuid()).into()],
            ))
            .await
            .db_context("failed to count the user's holds")?
            .ok_or_else(|| anyhow::anyhow!("COUNT(*) returned no row"))?;
        Ok(u32::try_from(column::<i64>(&row, "n")?).unwrap_or(u32::MAX))
    }

    async fn lock_seat(
        &self,
        tx: &mut Tx,
        schedule_id: ScheduleId,
        number: SeatNumber,
    ) -> Result<Option<Seat>, BookingRepositoryError> {
        let row = connection(tx)?
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::LOCK_SEAT,
                [(*schedule_id.as_uuid()).into(), number.get().into()],
            ))
            .await
            .db_context("failed to lock a seat")?;
        Ok(row.map(|row| seat_from(&row, schedule_id)).transpose()?)
    }

    async fn hold_seat(
        &self,
        tx: &mut Tx,
        reservation: &Reservation,
        replaces: Option<ReservationId>,
        now: time::OffsetDateTime,
    ) -> Result<time::OffsetDateTime, BookingRepositoryError> {
        let conn = connection(tx)?;
        // The hold's end on the database's clock, so that every instance (whatever its
        // own clock says) and every guard below agree on when it runs out.
        let hold_micros = i64::try_from((reservation.held_until - now).whole_microseconds())
            .map_err(|_| anyhow::anyhow!("a hold of {} is out of range", reservation.held_until - now))?;
        // The seat lock's fencing number (see `application::tx::fence`): a hold whose lease ran
        // out under it carries a lower one than the holder after it, and takes nothing.
        let fence = application::tx::fence(&application::lock::LockKey::seat(
            reservation.schedule_id,
            reservation.seat_number,
        ))
        .map(|token| token.0);
        let taken = conn
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::TAKE_SEAT,
                [
                    (*reservation.id.as_uuid()).into(),
                    hold_micros.into(),
                    fence.into(),
                    (*reservation.schedule_id.as_uuid()).into(),
                    reservation.seat_number.get().into(),
                    fence.into(),
                    fence.into(),
                ],
            ))
            .await
            .db_context("failed to hold a seat")?;
        if taken.rows_affected() != 1 {
            if let Some(refused) = fence {
                // Told apart for the logs only: to the client, a later holder of this
                // seat's lock exists, so the seat is not this request's to take.
                let stored = crate::stored_fence(
                    conn,
                    sql::SEAT_FENCE,
                    vec![(*reservation.schedule_id.as_uuid()).into(), reservation.seat_number.get().into()],
                    "failed to read the seat's fence",
                )
                .await?;
                if refused < stored {
                    tracing::warn!(refused, stored, "a seat take under a lost seat lock was fenced out");
                    metrics::counter!("fenced_writes_total", "kind" => "seat").increment(1);
                }
            }
            return Err(BookingRepositoryError::SeatTaken);
        }
        if let Some(old) = replaces {
            conn.execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::EXPIRE_REPLACED_HOLD,
                [to_db_time(now).into(), (*old.as_uuid()).into()],
            ))
            .await
            .db_context("failed to expire a run-out hold")?;
        }
        let inserted = conn
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::INSERT_HOLD,
                [
                    (*reservation.id.as_uuid()).into(),
                    (*reservation.user_id.as_uuid()).into(),
                    (*reservation.schedule_id.as_uuid()).into(),
                    reservation.seat_number.get().into(),
                    reservation.price.points().into(),
                    to_db_time(reservation.created_at).into(),
                    to_db_time(reservation.created_at).into(),
                    (*reservation.schedule_id.as_uuid()).into(),
                    reservation.seat_number.get().into(),
                    (*reservation.id.as_uuid()).into(),
                ],
            ))
            .await;
        match inserted {
            Ok(done) if done.rows_affected() == 1 => {
                let row = conn
                    .query_one_raw(Statement::from_sql_and_values(
                        DbBackend::MySql,
                        sql::HOLD_END,
                        [(*reservation.id.as_uuid()).into()],
                    ))
                    .await
                    .db_context("failed to read a hold's end")?
                    .context("the hold just inserted is not there")?;
                Ok(from_db_time(column(&row, "held_until")?))
            }
            Ok(_) => {
                Err(anyhow::anyhow!("the seat held for reservation {} does not name it", reservation.id)
                    .into())
            }
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                Err(BookingRepositoryError::SeatTaken)
            }
            Err(e) => Err(db_error(e, "failed to insert a reservation").into()),
        }
    }

    async fn reservation(&self, id: ReservationId) -> Result<Option<Reservation>, BookingRepositoryError> {
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::RESERVATION,
                [(*id.as_uuid()).into()],
            ))
            .await
            .db_context("failed to read a reservation")?;
        Ok(row.map(|row| reservation_from(&row)).transpose()?)
    }

    async fn reservation_in(
        &self,
        tx: &mut Tx,
        id: ReservationId,
    ) -> Result<Option<Reservation>, BookingRepositoryError> {
        let row = connection(tx)?
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                // A locking read: the row as last committed, not as this transaction's
                // snapshot saw it (the callers hold its lock already, so it never waits).
                sql::RESERVATION_IN_TX,
                [(*id.as_uuid()).into()],
            ))
            .await
            .db_context("failed to read a reservation")?;
        Ok(row.map(|row| reservation_from(&row)).transpose()?)
    }

    async fn end_hold(
        &self,
        tx: &mut Tx,
        reservation: ReservationId,
        to: ReservationStatus,
        now: OffsetDateTime,
    ) -> Result<bool, BookingRepositoryError> {
        // CANCELLED only while the hold lasts, EXPIRED only once it ran out: the state
        // machine's rule, in the statement itself.
        let transition = match to {
            ReservationStatus::Cancelled => sql::CANCEL_HOLD,
            ReservationStatus::Expired => sql::EXPIRE_HOLD,
            other => {
                return Err(anyhow::anyhow!("a hold cannot end as {}", other.as_str()).into());
            }
        };
        let conn = connection(tx)?;
        lock_seat_and_reservation(conn, reservation).await?;
        let ended = conn
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                transition,
                [to_db_time(now).into(), (*reservation.as_uuid()).into()],
            ))
            .await
            .db_context("failed to end a hold")?;
        if ended.rows_affected() != 1 {
            return Ok(false);
        }
        // The seat may already name a newer hold (a run-out hold is replaced by the next
        // one without waiting for this job): then it is not ours to free.
        conn.execute_raw(Statement::from_sql_and_values(
            DbBackend::MySql,
            sql::FREE_SEAT,
            [(*reservation.as_uuid()).into(), (*reservation.as_uuid()).into()],
        ))
        .await
        .db_context("failed to free a seat")?;
        Ok(true)
    }

    async fn confirm(
        &self,
        tx: &mut Tx,
        reservation: &Reservation,
        now: OffsetDateTime,
    ) -> Result<bool, BookingRepositoryError> {
        let conn = connection(tx)?;
        lock_seat_and_reservation(conn, reservation.id).await?;
        let confirmed = conn
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::CONFIRM,
                [to_db_time(now).into(), (*reservation.id.as_uuid()).into()],
            ))
            .await
            .db_context("failed to confirm a reservation")?;
        if confirmed.rows_affected() != 1 {
            return Ok(false);
        }
        let sold = conn
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::SELL_SEAT,
                [
                    (*reservation.schedule_id.as_uuid()).into(),
                    reservation.seat_number.get().into(),
                    (*reservation.id.as_uuid()).into(),
                ],
            ))
            .await
            .db_context("failed to sell a seat")?;
        if sold.rows_affected() != 1 {
            // A live hold always names its seat (the unique live-seat key): this is a broken
            // invariant, and the transaction is rolled back.
            return Err(anyhow::anyhow!("seat of reservation {} does not name it", reservation.id).into());
        }
        Ok(true)
    }

    async fn run_out_holds(
        &self,
        // Run out by the database's clock, as every other guard of a hold.
        _now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<Reservation>, BookingRepositoryError> {
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::RUN_OUT_HOLDS,
                [limit.into()],
            ))
            .await
            .db_context("failed to find run-out holds")?;
        Ok(rows.iter().map(reservation_from).collect::<anyhow::Result<_>>()?)
    }
}
