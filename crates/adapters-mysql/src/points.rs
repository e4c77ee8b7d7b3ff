//! `PointRepository` on MySQL.
//!
//! A balance changes only through [`MySqlPointRepository::save_balance`], an `UPDATE ...
//! SET balance = ?, version = ? WHERE user_id = ? AND version = ?` (the next version, where
//! the one read is still there) whose affected rows are checked, inside a transaction that
//! read the row with `SELECT ... FOR UPDATE`. The hot statements (the lock, the
//! compare-and-set, the history insert) are plain SQL from [`crate::sql`], the ones
//! `docs/explain.sh` explains.
//! The tables' CHECKs keep the balance in range and `UNIQUE (user_id, seq)` keeps each change
//! recorded once, whatever the code does. Together these keep every balance exact even
//! with the distributed lock gone.

use anyhow::Context as _;
use async_trait::async_trait;
use domain::point::{
    Balance, HistoryLimit, PointAccount, PointAmount, PointHistoryEntry, PointHistoryKind, PointRepository,
    PointRepositoryError,
};
use domain::unit_of_work::Tx;
use domain::user::UserId;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter, QueryOrder,
    QueryResult, QuerySelect, Set, Statement,
};

use application::lock::LockKey;

use crate::DbContext as _;
use crate::entities::{point_account, point_history};
use crate::tx::connection;
use crate::{column, from_db_time, sql, to_db_time};

#[derive(Clone, Debug)]
pub struct MySqlPointRepository {
    db: DatabaseConnection,
}

impl MySqlPointRepository {
    #[must_use]
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// [`sql::append_history_rows`] for `entries`, in one statement.
    async fn insert_history_rows(
        &self,
        tx: &mut Tx,
        entries: &[PointHistoryEntry],
    ) -> Result<(), PointRepositoryError> {
        let mut values = Vec::with_capacity(entries.len() * 7);
        for entry in entries {
            values.extend(history_values(entry)?);
        }
        let inserted = connection(tx)?
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::append_history_rows(entries.len()),
                values,
            ))
            .await
            .db_context("failed to insert the point history entries")?;
        match usize::try_from(inserted.rows_affected()) {
            Ok(n) if n == entries.len() => Ok(()),
            _ => Err(anyhow::anyhow!(
                "inserting {} history entries inserted {}",
                entries.len(),
                inserted.rows_affected()
            )
            .into()),
        }
    }
}

fn account_from(row: point_account::Model) -> anyhow::Result<PointAccount> {
    let balance = Balance::new(row.balance).context("a stored balance is out of range")?;
    let version = u64::try_from(row.version).context("a stored account version is negative")?;
    Ok(PointAccount::restore(UserId::from_uuid(row.user_id), balance, version))
}

/// A `point_accounts` row read with [`sql::LOCK_ACCOUNT`].
fn account_row(row: &QueryResult) -> anyhow::Result<point_account::Model> {
    Ok(point_account::Model {
        user_id: column(row, "user_id")?,
        balance: column(row, "balance")?,
        version: column(row, "version")?,
        updated_at: column(row, "updated_at")?,
    })
}

/// The seven values of one history row, in [`sql::APPEND_HISTORY`]'s order.
fn history_values(entry: &PointHistoryEntry) -> anyhow::Result<[sea_orm::Value; 7]> {
    Ok([
        entry.id().into(),
        (*entry.user_id().as_uuid()).into(),
        entry.kind().as_str().into(),
        entry.amount().points().into(),
        entry.balance_after().points().into(),
        db_version(entry.seq())?.into(),
        to_db_time(entry.created_at()).into(),
    ])
}

/// One account read inside `tx` by `sql` ([`sql::LOCK_ACCOUNT`] or [`sql::READ_ACCOUNT`]),
/// its failure described as `what`.
async fn read_account_with(
    tx: &mut Tx,
    sql: &'static str,
    user_id: UserId,
    what: &'static str,
) -> Result<Option<PointAccount>, PointRepositoryError> {
    let row = connection(tx)?
        .query_one_raw(Statement::from_sql_and_values(DbBackend::MySql, sql, [(*user_id.as_uuid()).into()]))
        .await
        .db_context(what)?;
    Ok(row.map(|row| account_row(&row).and_then(account_from)).transpose()?)
}

fn entry_from(row: point_history::Model) -> anyhow::Result<PointHistoryEntry> {
    let kind = PointHistoryKind::parse(&row.kind)
        .with_context(|| format!("unknown point history kind {:?}", row.kind))?;
    Ok(PointHistoryEntry::restore(
        row.id,
        UserId::from_uuid(row.user_id),
        kind,
        PointAmount::new(row.amount).context("a stored history amount is out of range")?,
        Balance::new(row.balance_after).context("a stored balance_after is out of range")?,
        u64::try_from(row.seq).context("a stored history seq is negative")?,
        from_db_time(row.created_at),
    ))
}

/// Versions are `u64` in the domain and `BIGINT` (signed) in MySQL; 2^63 changes is
/// out of reach, but the conversion is checked anyway.
fn db_version(version: u64) -> anyhow::Result<i64> {
    i64::try_from(version).context("an account version does not fit a BIGINT")
}

#[async_trait]
impl PointRepository for MySqlPointRepository {
    #[tracing::instrument(name = "points.open_account", skip_all, fields(user_id = %account.user_id()))]
    async fn open_account(&self, tx: &mut Tx, account: &PointAccount) -> Result<(), PointRepositoryError> {
        let row = point_account::ActiveModel {
            user_id: Set(*account.user_id().as_uuid()),
            balance: Set(account.balance().points()),
            version: Set(db_version(account.version())?),
            updated_at: Set(to_db_time(application::clock::now_utc())),
        };
        point_account::Entity::insert(row)
            .exec_without_returning(connection(tx)?)
            .await
            .db_context("failed to insert the point account")?;
        Ok(())
    }

    #[tracing::instrument(name = "points.lock_account", skip(self, tx))]
    async fn lock_account(
        &self,
        tx: &mut Tx,
        user_id: UserId,
    ) -> Result<Option<PointAccount>, PointRepositoryError> {
        read_account_with(tx, sql::LOCK_ACCOUNT, user_id, "failed to lock the point account").await
    }

    #[tracing::instrument(name = "points.read_account", skip(self, tx))]
    async fn read_account(
        &self,
        tx: &mut Tx,
        user_id: UserId,
    ) -> Result<Option<PointAccount>, PointRepositoryError> {
        read_account_with(tx, sql::READ_ACCOUNT, user_id, "failed to read the point account").await
    }

    #[tracing::instrument(name = "points.save_balance", skip_all, fields(user_id = %account.user_id()))]
    async fn save_balance(
        &self,
        tx: &mut Tx,
        account: &PointAccount,
        expected_version: u64,
    ) -> Result<(), PointRepositoryError> {
        // The point lock's fencing number, when this transaction holds it (under
        // `locked_tx`); unfenced writes (the lock turned off for tests) carry none.
        let fence = application::tx::fence(&LockKey::point(account.user_id())).map(|token| token.0);
        let conn = connection(tx)?;
        let updated = match conn
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::SAVE_BALANCE,
                [
                    account.balance().points().into(),
                    db_version(account.version())?.into(),
                    to_db_time(application::clock::now_utc()).into(),
                    fence.into(),
                    (*account.user_id().as_uuid()).into(),
                    db_version(expected_version)?.into(),
                    fence.into(),
                    fence.into(),
                ],
            ))
            .await
        {
            // Changed since this transaction's snapshot (a plain read, the optimistic
            // charge's, on MariaDB 11.6+): the same as a version that moved on.
            Err(error) if crate::server_error_number(&error) == Some(crate::SNAPSHOT_CONFLICT) => {
                return Err(PointRepositoryError::StaleBalance { user_id: account.user_id() });
            }
            other => other.db_context("failed to update the balance")?,
        };
        match updated.rows_affected() {
            1 => Ok(()),
            0 => {
                let stored = crate::stored_fence(
                    conn,
                    sql::ACCOUNT_FENCE,
                    vec![(*account.user_id().as_uuid()).into()],
                    "failed to read the account's fence",
                )
                .await?;
                match fence {
                    Some(refused) if refused < stored => {
                        metrics::counter!("fenced_writes_total", "kind" => "point").increment(1);
                        Err(PointRepositoryError::Fenced { user_id: account.user_id(), refused, stored })
                    }
                    _ => Err(PointRepositoryError::StaleBalance { user_id: account.user_id() }),
                }
            }
            n => Err(anyhow::anyhow!("a balance update matched {n} accounts").into()),
        }
    }

    #[tracing::instrument(name = "points.append_history", skip_all, fields(user_id = %entry.user_id()))]
    async fn append_history(
        &self,
        tx: &mut Tx,
        entry: &PointHistoryEntry,
    ) -> Result<(), PointRepositoryError> {
        connection(tx)?
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                sql::APPEND_HISTORY,
                history_values(entry)?,
            ))
            .await
            .db_context("failed to insert the point history entry")?;
        Ok(())
    }

    #[tracing::instrument(name = "points.append_histories", skip_all, fields(rows = entries.len()))]
    async fn append_histories(
        &self,
        tx: &mut Tx,
        entries: &[PointHistoryEntry],
    ) -> Result<(), PointRepositoryError> {
        // In chunks whose sizes are powers of two (100 rows: 64 + 32 + 4), so that a
        // connection prepares at most a handful of statement shapes, not one per size.
        let mut rest = entries;
        while !rest.is_empty() {
            let size = 1 << rest.len().ilog2();
            let (chunk, after) = rest.split_at(size);
            self.insert_history_rows(tx, chunk).await?;
            rest = after;
        }
        Ok(())
    }

    #[tracing::instrument(name = "points.balance", skip(self))]
    async fn balance(&self, user_id: UserId) -> Result<Option<Balance>, PointRepositoryError> {
        let row = point_account::Entity::find_by_id(*user_id.as_uuid())
            .one(&self.db)
            .await
            .db_context("failed to read the balance")?;
        Ok(row.map(|row| account_from(row).map(|account| account.balance())).transpose()?)
    }

    #[tracing::instrument(name = "points.history", skip(self), fields(limit = limit.get()))]
    async fn history(
        &self,
        user_id: UserId,
        limit: HistoryLimit,
    ) -> Result<Vec<PointHistoryEntry>, PointRepositoryError> {
        let rows = point_history::Entity::find()
            .filter(point_history::Column::UserId.eq(*user_id.as_uuid()))
            .order_by_desc(point_history::Column::Seq)
            .limit(u64::from(limit.get()))
            .all(&self.db)
            .await
            .db_context("failed to read the point history")?;
        Ok(rows.into_iter().map(entry_from).collect::<anyhow::Result<_>>()?)
    }
}
