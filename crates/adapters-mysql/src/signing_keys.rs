//! `SigningKeyStore` on MySQL: the table `auth_signing_keys`, one row per key generation.
//!
//! Every write is a single statement that cannot make two keys of one generation: the first
//! key is `INSERT IGNORE` of generation 1, a rotation `INSERT IGNORE` of the highest
//! generation plus one, so instances racing to do either store one key between them.

use std::time::Duration;

use application::identity::{Secret, SigningKey, SigningKeyStore};
use async_trait::async_trait;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use time::PrimitiveDateTime;

use crate::DbContext as _;
use crate::{column, from_db_time};

const KEYS: &str = "SELECT generation, kid, secret, activates_at FROM auth_signing_keys";

/// The first key, active now on the database's clock (every time of this table is the
/// database's, so no instance's clock can order two keys wrongly).
const CREATE_FIRST: &str = "INSERT IGNORE INTO auth_signing_keys (generation, kid, secret, activates_at, created_at) \
     VALUES (1, ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))";

/// The next generation, activating `?` microseconds from now on the database's clock, and
/// never before the newest key already there: generations and activations keep one order.
const ROTATE: &str = "INSERT IGNORE INTO auth_signing_keys (generation, kid, secret, activates_at, created_at) \
     SELECT COALESCE(MAX(generation), 0) + 1, ?, ?, \
       GREATEST(COALESCE(MAX(activates_at), UTC_TIMESTAMP(6)), UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND), \
       UTC_TIMESTAMP(6) \
     FROM auth_signing_keys";

const BY_KID: &str = "SELECT generation, kid, secret, activates_at FROM auth_signing_keys WHERE kid = ?";

const NEWEST: &str =
    "SELECT generation, kid, secret, activates_at FROM auth_signing_keys ORDER BY generation DESC LIMIT 1";

/// Keys replaced (a later generation active) for longer than `?` microseconds.
const PRUNE: &str = "DELETE old FROM auth_signing_keys AS old \
     JOIN auth_signing_keys AS successor ON successor.generation > old.generation \
     WHERE successor.activates_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND";

#[derive(Clone, Debug)]
pub struct MySqlSigningKeyStore {
    db: DatabaseConnection,
}

impl MySqlSigningKeyStore {
    #[must_use]
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

fn key_from(row: &sea_orm::QueryResult) -> anyhow::Result<SigningKey> {
    Ok(SigningKey {
        kid: column(row, "kid")?,
        secret: Secret::new(column(row, "secret")?),
        activates_at: from_db_time(column::<PrimitiveDateTime>(row, "activates_at")?),
    })
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

#[async_trait]
impl SigningKeyStore for MySqlSigningKeyStore {
    async fn keys(&self) -> anyhow::Result<Vec<SigningKey>> {
        let rows = self
            .db
            .query_all_raw(Statement::from_string(DbBackend::MySql, KEYS))
            .await
            .db_context("failed to read the signing keys")?;
        rows.iter().map(key_from).collect()
    }

    async fn create_first(&self, key: &SigningKey) -> anyhow::Result<()> {
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                CREATE_FIRST,
                [key.kid.clone().into(), key.secret.as_bytes().to_vec().into()],
            ))
            .await
            .db_context("failed to store the first signing key")?;
        Ok(())
    }

    async fn rotate(&self, kid: &str, secret: &Secret, delay: Duration) -> anyhow::Result<SigningKey> {
        let stored = self
            .db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::MySql,
                ROTATE,
                [kid.into(), secret.as_bytes().to_vec().into(), micros(delay).into()],
            ))
            .await
            .db_context("failed to store a new signing key")?;
        // Ignored when another rotation took the generation first: that key is the new one.
        let (sql, values): (&str, Vec<sea_orm::Value>) =
            if stored.rows_affected() == 1 { (BY_KID, vec![kid.into()]) } else { (NEWEST, vec![]) };
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(DbBackend::MySql, sql, values))
            .await
            .db_context("failed to read the new signing key")?
            .ok_or_else(|| anyhow::anyhow!("the new signing key is not there"))?;
        key_from(&row)
    }

    async fn prune(&self, after: Duration) -> anyhow::Result<u64> {
        let done = self
            .db
            .execute_raw(Statement::from_sql_and_values(DbBackend::MySql, PRUNE, [micros(after).into()]))
            .await
            .db_context("failed to delete replaced signing keys")?;
        Ok(done.rows_affected())
    }
}
