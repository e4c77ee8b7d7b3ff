//! The waiting queue on MySQL: the baseline the Redis queue is measured against, and a
//! fallback where Redis is not wanted for it (`QUEUE_BACKEND=mysql`).
//!
//! Correct under concurrency by the database alone: `UNIQUE (user_id)` makes re-issue
//! idempotent, `seq` orders the line, and each admission step locks the single
//! `queue_admission` row, so steps from every instance run one at a time and the cap and
//! the once-per-interval batch hold. A position is a `COUNT(*)` over an index range
//! (O(position)), which is what the Redis sorted set improves on.

use std::time::Duration;

use anyhow::Context as _;
use application::queue::{Issued, QueueConfig, WaitingQueue};
use async_trait::async_trait;
use domain::queue::{Admission, AdmitPolicy, QueueStatus, QueueTokenId, TokenState};
use domain::user::UserId;
use futures::{StreamExt as _, TryStreamExt as _};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, ExecResult, SqlErr, Statement, TransactionTrait,
};
use time::OffsetDateTime;

use crate::{DbContext as _, column, commit_error, db_error};

/// MySQL's error number for a transaction chosen as a deadlock's victim (rolled back).
const DEADLOCK: u16 = 1213;

/// How many times one statement of its own (autocommitted) is run when InnoDB keeps
/// choosing it as a deadlock's victim, before the request is answered 503.
const DEADLOCK_TRIES: usize = 5;

/// The most expired or abandoned tokens one step deletes (bounds a step's time).
const CLEANUP_BATCH: u64 = 1_000;

/// The most token lookups of one [`WaitingQueue::states`] call in flight at once: a few
/// of the pool's connections, never all of them.
const DESCRIBE_CONCURRENCY: usize = 4;
/// The most tokens one step admits (the next steps admit the rest).
const MAX_ADMIT_PER_STEP: u64 = 5_000;

/// Now, on the database's clock, in milliseconds.
const NOW_MS: &str = "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000 AS SIGNED)";

#[derive(Clone, Debug)]
pub struct MySqlQueue {
    db: DatabaseConnection,
    config: QueueConfig,
}

impl MySqlQueue {
    #[must_use]
    pub fn new(db: DatabaseConnection, config: QueueConfig) -> Self {
        Self { db, config }
    }

    fn idle_ms(&self) -> i64 {
        millis(self.config.waiting_idle)
    }

    /// Runs `sql` with `values` as a statement of its own (autocommitted), up to
    /// [`DEADLOCK_TRIES`] times in all while InnoDB chooses it as a deadlock's victim: it
    /// was rolled back whole, so running it again is what a client retrying would do,
    /// without the 503. Concurrent issues, status reads and every instance's admission step
    /// lock the same rows and index entries in different orders (a seen-mark holds a
    /// token's row and then needs its new `(status, seen_ms)` entry; a step's locking count
    /// and admission lock that index's range, and its admission wants the row), so a
    /// deadlock is an ordinary event under a burst, not a failure. A lock-wait timeout is
    /// not run again: the request has waited long enough.
    async fn execute_retrying(&self, sql: &str, values: Vec<sea_orm::Value>) -> Result<ExecResult, DbErr> {
        let mut tries = 1;
        loop {
            let statement = Statement::from_sql_and_values(DbBackend::MySql, sql, values.clone());
            match self.db.execute_raw(statement).await {
                Err(e) if tries < DEADLOCK_TRIES && crate::server_error_number(&e) == Some(DEADLOCK) => {
                    tracing::debug!(tries, "a queue statement was a deadlock's victim; running it again");
                    metrics::counter!("queue_mysql_deadlock_retries_total").increment(1);
                    tries += 1;
                }
                answer => return answer,
            }
        }
    }

    /// The state of `token` if live. A waiting one is marked seen when `mark` (a status
    /// read), not when the token was issued a moment ago (its insert set `seen_ms`).
    async fn describe(&self, token: QueueTokenId, mark: bool) -> anyhow::Result<Option<TokenState>> {
        let state = self.read(token).await?;
        let waiting = state.as_ref().is_some_and(|s| s.status == QueueStatus::Waiting);
        if mark && waiting && !self.mark_seen(token).await? {
            // Admitted (or removed) by an admission step since the read, typically the step
            // the mark deadlocked with: read again rather than answer with the state it left.
            return self.read(token).await;
        }
        Ok(state)
    }

    /// Marks waiting `token` seen now; `false` when it is no longer waiting (the connection
    /// counts matched rows, so a mark within the same millisecond still counts).
    async fn mark_seen(&self, token: QueueTokenId) -> anyhow::Result<bool> {
        let marked = self
            .execute_retrying(
                &format!("UPDATE queue_tokens SET seen_ms = {NOW_MS} WHERE id = ? AND status = 'WAITING'"),
                vec![(*token.as_uuid()).into()],
            )
            .await
            .db_context("failed to mark a queue token seen")?;
        Ok(marked.rows_affected() > 0)
    }

    /// The state of `token` if live, as stored now.
    async fn read(&self, token: QueueTokenId) -> anyhow::Result<Option<TokenState>> {
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                format!(
                    "SELECT t.user_id, t.status, t.seen_ms, t.expires_ms, \
                       (SELECT COUNT(*) FROM queue_tokens w WHERE w.status = 'WAITING' AND w.seq <= t.seq) AS position, \
                       (SELECT rate FROM queue_admission WHERE id = 1) AS rate, \
                       {NOW_MS} AS now_ms \
                     FROM queue_tokens t WHERE t.id = ?"
                ),
                [(*token.as_uuid()).into()],
            ))
            .await
            .db_context("failed to read a queue token")?;
        let Some(row) = row else { return Ok(None) };
        let now: i64 = column(&row, "now_ms")?;
        let status: String = column(&row, "status")?;
        let user_id = UserId::from_uuid(column(&row, "user_id")?);
        let rate: f64 = column(&row, "rate")?;
        if status == "ACTIVE" {
            let expires: i64 = row.try_get::<Option<i64>>("", "expires_ms")?.unwrap_or(0);
            if expires <= now {
                return Ok(None);
            }
            return Ok(Some(TokenState {
                token,
                user_id,
                status: QueueStatus::Active,
                position: None,
                expires_at: Some(from_ms(expires)?),
                admissions_per_second: rate,
            }));
        }
        let seen: i64 = column(&row, "seen_ms")?;
        if seen < now - self.idle_ms() {
            return Ok(None);
        }
        let position: i64 = column(&row, "position")?;
        Ok(Some(TokenState {
            token,
            user_id,
            status: QueueStatus::Waiting,
            position: u64::try_from(position).ok().filter(|p| *p > 0),
            expires_at: None,
            admissions_per_second: rate,
        }))
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

fn from_ms(ms: i64) -> anyhow::Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .context("a stored time is out of range")
}

#[async_trait]
impl WaitingQueue for MySqlQueue {
    #[tracing::instrument(name = "queue.mysql.issue", skip(self))]
    async fn issue(&self, user_id: UserId) -> anyhow::Result<Issued> {
        // Two rounds at most: a token found dead is removed, then the insert may meet one
        // that another instance issued a moment earlier (and that one is returned), or the
        // new token may be gone before it is read. Each write is a statement of its own,
        // run again when it was a deadlock's victim.
        for _ in 0..2 {
            let existing = self
                .db
                .query_one_raw(Statement::from_sql_and_values(
                    DbBackend::MySql,
                    "SELECT id FROM queue_tokens WHERE user_id = ?",
                    [(*user_id.as_uuid()).into()],
                ))
                .await
                .db_context("failed to look up a user's queue token")?;
            if let Some(row) = existing {
                let token = QueueTokenId::from_uuid(column(&row, "id")?);
                if let Some(state) = self.describe(token, true).await? {
                    return Ok(Issued { state, created: false });
                }
                self.execute_retrying(
                    "DELETE FROM queue_tokens WHERE id = ?",
                    vec![(*token.as_uuid()).into()],
                )
                .await
                .db_context("failed to remove a dead queue token")?;
            }
            let token = QueueTokenId::generate();
            let inserted = self
                .execute_retrying(
                    &format!(
                        "INSERT INTO queue_tokens (id, user_id, status, issued_ms, seen_ms) \
                         VALUES (?, ?, 'WAITING', {NOW_MS}, {NOW_MS})"
                    ),
                    vec![(*token.as_uuid()).into(), (*user_id.as_uuid()).into()],
                )
                .await;
            match inserted {
                Ok(_) => {
                    if let Some(state) = self.describe(token, false).await? {
                        return Ok(Issued { state, created: true });
                    }
                    // Admitted and run out before it could be answered (the request stalled
                    // for longer than a lifetime): the next round removes it and issues
                    // another, which its user can still use.
                }
                Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {}
                Err(e) => return Err(db_error(e, "failed to issue a queue token")),
            }
        }
        anyhow::bail!("could not issue a queue token for {user_id}: it kept changing")
    }

    async fn state(&self, token: QueueTokenId) -> anyhow::Result<Option<TokenState>> {
        self.describe(token, true).await
    }

    async fn states(&self, tokens: Vec<QueueTokenId>) -> anyhow::Result<Vec<Option<TokenState>>> {
        // One query per token, a few side by side, answers in order: the gate's shared
        // lookups (`application::queue::QueueReader`, up to 256 tokens) and the event
        // streams (1,000) come here in batches, which must not take the whole pool.
        futures::stream::iter(tokens)
            .map(|token| self.describe(token, true))
            .buffered(DESCRIBE_CONCURRENCY)
            .try_collect()
            .await
    }

    #[tracing::instrument(name = "queue.mysql.admit", skip(self))]
    async fn admit(&self) -> anyhow::Result<Admission> {
        let config = self.config;
        let txn = self.db.begin().await.db_context("failed to begin an admission step")?;
        let step = async {
            // One step at a time, across every instance.
            let row = txn
                .query_one_raw(Statement::from_string(
                    DbBackend::MySql,
                    format!(
                        "SELECT last_batch_ms, {NOW_MS} AS now_ms FROM queue_admission WHERE id = 1 FOR UPDATE"
                    ),
                ))
                .await
                .db_context("failed to lock the admission row")?
                .context("the queue_admission row is missing")?;
            let now: i64 = column(&row, "now_ms")?;
            let last_batch_ms: i64 = column(&row, "last_batch_ms")?;
            let exec = |sql: String, values: Vec<sea_orm::Value>| {
                let txn = &txn;
                async move {
                    txn.execute_raw(Statement::from_sql_and_values(DbBackend::MySql, sql, values))
                        .await
                        .db_context("an admission statement failed")
                }
            };
            exec(
                format!("DELETE FROM queue_tokens WHERE status = 'ACTIVE' AND expires_ms <= ? LIMIT {CLEANUP_BATCH}"),
                vec![now.into()],
            )
            .await?;
            exec(
                format!(
                    "DELETE FROM queue_tokens WHERE status = 'WAITING' AND seen_ms < ? LIMIT {CLEANUP_BATCH}"
                ),
                vec![(now - self.idle_ms()).into()],
            )
            .await?;
            let count = |status: &'static str, locking: bool| {
                let txn = &txn;
                async move {
                    // Before this step's writes, a locking read: it sees the rows as they
                    // are now, not a snapshot (MariaDB 11.6+ refuses an update of rows
                    // changed after a snapshot the step took). After them, a plain read:
                    // nothing is written past it, and it locks nothing.
                    let sql = if locking {
                        "SELECT COUNT(*) AS n FROM queue_tokens WHERE status = ? LOCK IN SHARE MODE"
                    } else {
                        "SELECT COUNT(*) AS n FROM queue_tokens WHERE status = ?"
                    };
                    let row = txn
                        .query_one_raw(Statement::from_sql_and_values(DbBackend::MySql, sql, [status.into()]))
                        .await
                        .db_context("failed to count queue tokens")?
                        .context("COUNT(*) answered no row")?;
                    anyhow::Ok(u64::try_from(column::<i64>(&row, "n")?).unwrap_or(0))
                }
            };
            let active = count("ACTIVE", true).await?;
            // The policy's arithmetic is the domain's, shared with the Redis script: one
            // `rate` batch per interval, whichever instance comes first, the mark moving by
            // whole intervals.
            let interval = match config.policy {
                AdmitPolicy::MaxActive { .. } => config.admit_interval,
                AdmitPolicy::Rate { interval, .. } => interval,
            };
            let interval_ms = millis(interval).max(1);
            let mark = match config.policy {
                AdmitPolicy::Rate { .. } => domain::queue::next_batch_mark(last_batch_ms, now, interval_ms),
                AdmitPolicy::MaxActive { .. } => None,
            };
            let room = config.policy.to_admit(active, mark.is_some(), MAX_ADMIT_PER_STEP);
            let admitted = if room > 0 {
                exec(
                    // Skips abandoned tokens that the cleanup above has not reached yet.
                    "UPDATE queue_tokens SET status = 'ACTIVE', expires_ms = ? \
                     WHERE status = 'WAITING' AND seen_ms >= ? ORDER BY seq LIMIT ?"
                        .to_owned(),
                    vec![
                        (now + millis(config.active_lifetime)).into(),
                        (now - self.idle_ms()).into(),
                        room.into(),
                    ],
                )
                .await?
                .rows_affected()
            } else {
                0
            };
            if admitted > 0 {
                exec(
                    "INSERT INTO queue_admission_log (at_ms, admitted) VALUES (?, ?)".to_owned(),
                    vec![now.into(), admitted.into()],
                )
                .await?;
            }
            let new_batch_ms = mark.unwrap_or(last_batch_ms);
            let window_start = now - millis(config.rate_window);
            exec("DELETE FROM queue_admission_log WHERE at_ms < ?".to_owned(), vec![window_start.into()])
                .await?;
            // As the Redis adapter: what was admitted after the oldest step in the window,
            // over the time since it; a single step over at least one interval.
            let log = txn
                .query_all_raw(Statement::from_sql_and_values(
                    DbBackend::MySql,
                    "SELECT at_ms, admitted FROM queue_admission_log WHERE at_ms >= ? ORDER BY at_ms \
                     LOCK IN SHARE MODE",
                    [window_start.into()],
                ))
                .await
                .db_context("failed to read the admission log")?;
            let steps: Vec<(i64, i64)> = log
                .iter()
                .map(|row| Ok((column::<i64>(row, "at_ms")?, i64::from(column::<i32>(row, "admitted")?))))
                .collect::<anyhow::Result<_>>()?;
            let sum: i64 = steps.iter().map(|(_, n)| n).sum();
            #[allow(clippy::cast_precision_loss, reason = "counts and spans far below 2^52")]
            let rate = match steps.as_slice() {
                [] => 0.0,
                [(at, n)] => *n as f64 * 1_000.0 / (now - at).max(interval_ms) as f64,
                [(oldest, oldest_n), ..] if now > *oldest => {
                    (sum - oldest_n) as f64 * 1_000.0 / (now - oldest) as f64
                }
                _ => 0.0,
            };
            exec(
                "UPDATE queue_admission SET last_batch_ms = ?, rate = ? WHERE id = 1".to_owned(),
                vec![new_batch_ms.into(), rate.into()],
            )
            .await?;
            let waiting = count("WAITING", false).await?;
            let active = count("ACTIVE", false).await?;
            anyhow::Ok(Admission { admitted, active, waiting })
        };
        let admission = step.await?;
        txn.commit().await.map_err(|e| commit_error(e, "failed to commit an admission step"))?;
        Ok(admission)
    }

    async fn expire(&self, token: QueueTokenId) -> anyhow::Result<bool> {
        let live = self.describe(token, false).await?.is_some();
        self.execute_retrying("DELETE FROM queue_tokens WHERE id = ?", vec![(*token.as_uuid()).into()])
            .await
            .db_context("failed to expire a queue token")?;
        Ok(live)
    }
}
