//! The transaction port on sea-orm.
//!
//! [`MySqlTransactionManager::begin`] hands out a boxed [`SeaOrmUnitOfWork`]; repositories
//! get it back as `&mut Tx` and downcast it with `connection`. Dropping a unit of work
//! without commit rolls it back (sea-orm's `DatabaseTransaction` does so on drop).

use std::any::Any;

use anyhow::Context as _;
use async_trait::async_trait;
use domain::unit_of_work::{Tx, TxError, UnitOfWork};
use sea_orm::{DatabaseConnection, DatabaseTransaction, TransactionTrait};

use application::tx::TransactionManager;

use crate::{DbContext as _, commit_error};

/// Begins transactions on a connection pool.
#[derive(Clone, Debug)]
pub struct MySqlTransactionManager {
    db: DatabaseConnection,
}

impl MySqlTransactionManager {
    #[must_use]
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }
}

#[async_trait]
impl TransactionManager for MySqlTransactionManager {
    async fn begin(&self) -> Result<Box<Tx>, TxError> {
        let txn = self.db.begin().await.db_context("failed to begin a transaction")?;
        Ok(Box::new(SeaOrmUnitOfWork { txn }))
    }

    async fn begin_read_committed(&self) -> Result<Box<Tx>, TxError> {
        let txn = self
            .db
            .begin_with_config(Some(sea_orm::IsolationLevel::ReadCommitted), None)
            .await
            .db_context("failed to begin a transaction")?;
        Ok(Box::new(SeaOrmUnitOfWork { txn }))
    }
}

/// A live sea-orm transaction.
#[derive(Debug)]
pub struct SeaOrmUnitOfWork {
    txn: DatabaseTransaction,
}

#[async_trait]
impl UnitOfWork for SeaOrmUnitOfWork {
    async fn commit(self: Box<Self>) -> Result<(), TxError> {
        self.txn.commit().await.map_err(|e| commit_error(e, "failed to commit"))?;
        Ok(())
    }

    async fn rollback(self: Box<Self>) -> Result<(), TxError> {
        self.txn.rollback().await.db_context("failed to roll back")?;
        Ok(())
    }
}

/// The sea-orm transaction behind a unit of work made by [`MySqlTransactionManager`].
///
/// # Errors
/// When `tx` came from another adapter: a wiring mistake, reported rather than panicking.
pub(crate) fn connection(tx: &mut Tx) -> anyhow::Result<&DatabaseTransaction> {
    let any: &mut dyn Any = tx;
    any.downcast_mut::<SeaOrmUnitOfWork>()
        .map(|uow| &uow.txn)
        .context("the unit of work is not a sea-orm transaction (wired to another adapter?)")
}
