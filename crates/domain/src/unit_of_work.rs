//! The handle of a live transaction, as repositories see it.
//!
//! The application decides where a transaction begins and ends (see
//! `application::tx`); adapters decide what a transaction is. Repository methods that
//! write take `tx: &mut Tx` and the adapter downcasts it to its own type, so no port names
//! a driver type. The shape is recorded in `docs/adr/0001-transaction-port.md`.

use std::any::Any;

use async_trait::async_trait;

/// A transaction that has begun and not yet ended.
///
/// Dropping one without calling [`UnitOfWork::commit`] or [`UnitOfWork::rollback`] must
/// roll it back (this is what happens when a request is cancelled mid-way).
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait UnitOfWork: Any + Send {
    /// Makes every write done through this transaction durable.
    ///
    /// # Errors
    /// [`TxError::Unexpected`] when the database refuses or cannot be reached; the
    /// transaction's writes are then not applied.
    async fn commit(self: Box<Self>) -> Result<(), TxError>;

    /// Discards every write done through this transaction.
    ///
    /// # Errors
    /// [`TxError::Unexpected`] when the database cannot be reached; the database rolls
    /// the transaction back on its own when the connection ends.
    async fn rollback(self: Box<Self>) -> Result<(), TxError>;
}

/// What ports take: `tx: &mut Tx`. The explicit `'static` keeps mockall's generated
/// signatures in step with ours (an elided object lifetime trips E0195).
pub type Tx = dyn UnitOfWork + 'static;

/// A transaction could not begin, commit or roll back.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// The database failed; the cause chain says how.
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}
