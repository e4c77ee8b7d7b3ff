//! Points: the prepaid balance users pay seats with.
//!
//! The rules live on [`PointAccount`]: a charge adds 1..=10,000,000 points, a balance is
//! never negative and never passes [`MAX_BALANCE`]. Every change of balance leaves a
//! [`PointHistoryEntry`] stating the balance after it, so the history alone can be audited
//! against the account.
//!
//! Every change also bumps the account's *version*, and the entry carries it as its
//! sequence number (`seq`): a user's history is a gap-free sequence 1, 2, 3, ... in the
//! order the changes happened, whatever the clocks of the instances that made them said.

use std::fmt;

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::unit_of_work::Tx;
use crate::user::UserId;

/// The most points one account may hold. A ceiling keeps sums far from `i64` overflow and
/// bounds what a stolen account can be loaded with.
pub const MAX_BALANCE: i64 = 1_000_000_000;

/// A balance: `0..=MAX_BALANCE` points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Balance(i64);

impl Balance {
    pub const ZERO: Self = Self(0);

    /// # Errors
    /// [`PointError::BalanceOutOfRange`] outside `0..=MAX_BALANCE` (storage that holds such
    /// a value is corrupt, which must not be papered over).
    pub const fn new(points: i64) -> Result<Self, PointError> {
        if points < 0 || points > MAX_BALANCE {
            return Err(PointError::BalanceOutOfRange { points });
        }
        Ok(Self(points))
    }

    #[must_use]
    pub const fn points(self) -> i64 {
        self.0
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A positive number of points that moves in or out of an account (a charge, a payment, a
/// refund). At most [`MAX_BALANCE`], since no single movement can exceed what an account
/// may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PointAmount(i64);

impl PointAmount {
    /// # Errors
    /// [`PointError::AmountOutOfRange`] outside `1..=MAX_BALANCE`.
    pub const fn new(points: i64) -> Result<Self, PointError> {
        if points < 1 || points > MAX_BALANCE {
            return Err(PointError::AmountOutOfRange { points, min: 1, max: MAX_BALANCE });
        }
        Ok(Self(points))
    }

    #[must_use]
    pub const fn points(self) -> i64 {
        self.0
    }
}

/// What one charge may add: 1..=10,000,000 points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChargeAmount(PointAmount);

impl ChargeAmount {
    pub const MIN: i64 = 1;
    /// The most one charge may add; a larger top-up is a business decision, not a typo
    /// to let through.
    pub const MAX: i64 = 10_000_000;

    /// # Errors
    /// [`PointError::AmountOutOfRange`] outside `MIN..=MAX`.
    pub const fn new(points: i64) -> Result<Self, PointError> {
        if points < Self::MIN || points > Self::MAX {
            return Err(PointError::AmountOutOfRange { points, min: Self::MIN, max: Self::MAX });
        }
        Ok(Self(PointAmount(points)))
    }

    #[must_use]
    pub const fn points(self) -> i64 {
        self.0.0
    }

    #[must_use]
    pub const fn amount(self) -> PointAmount {
        self.0
    }
}

/// A user's point account. Its methods are the only way a balance changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointAccount {
    user_id: UserId,
    balance: Balance,
    /// How many changes the balance has seen; the `seq` of the latest history entry.
    version: u64,
}

impl PointAccount {
    /// The empty account every new user gets.
    #[must_use]
    pub const fn open(user_id: UserId) -> Self {
        Self { user_id, balance: Balance::ZERO, version: 0 }
    }

    /// An account read back from storage.
    #[must_use]
    pub const fn restore(user_id: UserId, balance: Balance, version: u64) -> Self {
        Self { user_id, balance, version }
    }

    #[must_use]
    pub const fn user_id(&self) -> UserId {
        self.user_id
    }

    #[must_use]
    pub const fn balance(&self) -> Balance {
        self.balance
    }

    /// How many changes the balance has seen (0 for a new account).
    #[must_use]
    pub const fn version(&self) -> u64 {
        self.version
    }

    /// Adds `amount`, returning the history entry that records it.
    ///
    /// # Errors
    /// [`PointError::BalanceLimitExceeded`] when the balance would pass [`MAX_BALANCE`];
    /// the account is then unchanged.
    pub fn charge(
        &mut self,
        amount: ChargeAmount,
        now: OffsetDateTime,
    ) -> Result<PointHistoryEntry, PointError> {
        let after = self.balance.0 + amount.points();
        if after > MAX_BALANCE {
            return Err(PointError::BalanceLimitExceeded {
                balance: self.balance.0,
                amount: amount.points(),
            });
        }
        self.balance = Balance(after);
        self.version += 1;
        Ok(self.entry(PointHistoryKind::Charge, amount.amount(), now))
    }

    /// Takes `amount` out, returning the history entry that records it.
    ///
    /// # Errors
    /// [`PointError::InsufficientBalance`] when the balance is smaller than `amount`; the
    /// account is then unchanged.
    pub fn deduct(
        &mut self,
        amount: PointAmount,
        now: OffsetDateTime,
    ) -> Result<PointHistoryEntry, PointError> {
        if amount.0 > self.balance.0 {
            return Err(PointError::InsufficientBalance { balance: self.balance.0, amount: amount.0 });
        }
        self.balance = Balance(self.balance.0 - amount.0);
        self.version += 1;
        Ok(self.entry(PointHistoryKind::Use, amount, now))
    }

    fn entry(&self, kind: PointHistoryKind, amount: PointAmount, now: OffsetDateTime) -> PointHistoryEntry {
        PointHistoryEntry {
            id: Uuid::now_v7(),
            user_id: self.user_id,
            kind,
            amount,
            balance_after: self.balance,
            seq: self.version,
            created_at: now,
        }
    }
}

/// Why a balance changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PointHistoryKind {
    Charge,
    Use,
    Refund,
}

impl PointHistoryKind {
    /// The stable name stored and shown to clients.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Charge => "CHARGE",
            Self::Use => "USE",
            Self::Refund => "REFUND",
        }
    }

    /// The inverse of [`PointHistoryKind::as_str`].
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "CHARGE" => Some(Self::Charge),
            "USE" => Some(Self::Use),
            "REFUND" => Some(Self::Refund),
            _ => None,
        }
    }
}

/// One change of a balance, with the balance it left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointHistoryEntry {
    id: Uuid,
    user_id: UserId,
    kind: PointHistoryKind,
    amount: PointAmount,
    balance_after: Balance,
    seq: u64,
    created_at: OffsetDateTime,
}

impl PointHistoryEntry {
    /// An entry read back from storage.
    #[must_use]
    pub const fn restore(
        id: Uuid,
        user_id: UserId,
        kind: PointHistoryKind,
        amount: PointAmount,
        balance_after: Balance,
        seq: u64,
        created_at: OffsetDateTime,
    ) -> Self {
        Self { id, user_id, kind, amount, balance_after, seq, created_at }
    }

    #[must_use]
    pub const fn id(&self) -> Uuid {
        self.id
    }

    #[must_use]
    pub const fn user_id(&self) -> UserId {
        self.user_id
    }

    #[must_use]
    pub const fn kind(&self) -> PointHistoryKind {
        self.kind
    }

    #[must_use]
    pub const fn amount(&self) -> PointAmount {
        self.amount
    }

    #[must_use]
    pub const fn balance_after(&self) -> Balance {
        self.balance_after
    }

    /// The account's version after this change: 1 for a user's first change, then 2, 3,
    /// ... with no gaps. This, not `created_at`, orders a history: instances' clocks differ.
    #[must_use]
    pub const fn seq(&self) -> u64 {
        self.seq
    }

    #[must_use]
    pub const fn created_at(&self) -> OffsetDateTime {
        self.created_at
    }
}

/// How many history entries one read returns: 1..=1000, 50 unless asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimit(u16);

impl HistoryLimit {
    pub const DEFAULT: Self = Self(50);
    /// A page bigger than this is an export, not a screen; it would also make one request
    /// hold a connection for long.
    pub const MAX: u16 = 1000;

    /// # Errors
    /// [`PointError::LimitOutOfRange`] outside `1..=MAX`.
    pub fn new(limit: i64) -> Result<Self, PointError> {
        u16::try_from(limit)
            .ok()
            .filter(|l| (1..=Self::MAX).contains(l))
            .map(Self)
            .ok_or(PointError::LimitOutOfRange { limit, max: Self::MAX })
    }

    #[must_use]
    pub const fn get(self) -> u16 {
        self.0
    }
}

impl Default for HistoryLimit {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PointError {
    #[error("amount must be between {min} and {max} points, got {points}")]
    AmountOutOfRange { points: i64, min: i64, max: i64 },
    #[error("a balance must be between 0 and {MAX_BALANCE} points, got {points}")]
    BalanceOutOfRange { points: i64 },
    #[error("charging {amount} points to a balance of {balance} would pass the limit of {MAX_BALANCE}")]
    BalanceLimitExceeded { balance: i64, amount: i64 },
    #[error("a balance of {balance} points cannot pay {amount}")]
    InsufficientBalance { balance: i64, amount: i64 },
    #[error("limit must be between 1 and {max}, got {limit}")]
    LimitOutOfRange { limit: i64, max: u16 },
}

/// Where point accounts and their history are kept.
///
/// Writes go through `tx`. Implementations must also guard each balance change in storage
/// (a conditional update, a non-negative, bounded column), so that a lost distributed lock
/// cannot corrupt a balance.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait PointRepository: Send + Sync {
    /// Creates `account` inside `tx`.
    ///
    /// # Errors
    /// [`PointRepositoryError::Unexpected`] for any storage failure, an existing account
    /// included.
    async fn open_account(&self, tx: &mut Tx, account: &PointAccount) -> Result<(), PointRepositoryError>;

    /// Reads the account inside `tx` without locking its row (a plain consistent read):
    /// only for the optimistic charge, whose write is a compare-and-set on the version
    /// read ([`PointRepository::save_balance`]) retried on conflict.
    ///
    /// # Errors
    /// [`PointRepositoryError::Unexpected`] for any storage failure; no account is `Ok(None)`.
    async fn read_account(
        &self,
        tx: &mut Tx,
        user_id: UserId,
    ) -> Result<Option<PointAccount>, PointRepositoryError>;

    /// Reads the account and locks its row until `tx` ends, so a concurrent writer that
    /// got past the distributed lock (an expired lease) waits here instead of racing.
    ///
    /// # Errors
    /// [`PointRepositoryError::Unexpected`] for any storage failure; no account is `Ok(None)`.
    async fn lock_account(
        &self,
        tx: &mut Tx,
        user_id: UserId,
    ) -> Result<Option<PointAccount>, PointRepositoryError>;

    /// Writes the account's balance and version inside `tx`, only if the stored version
    /// is still `expected_version` (the one it was read at): a compare-and-set.
    ///
    /// Under the account's lock, the write carries the lock's fencing number (the
    /// transaction's, see `application::tx::fence`): the store keeps the highest number it
    /// accepted for the account and refuses a lower one in the same conditional update.
    ///
    /// # Errors
    /// [`PointRepositoryError::StaleBalance`] when the stored version is not
    /// `expected_version` (someone changed the balance since it was read);
    /// [`PointRepositoryError::Fenced`] when a later holder of the account's lock wrote
    /// already (this one's lease ran out under it); [`PointRepositoryError::Unexpected`]
    /// for any storage failure.
    async fn save_balance(
        &self,
        tx: &mut Tx,
        account: &PointAccount,
        expected_version: u64,
    ) -> Result<(), PointRepositoryError>;

    /// Appends a history entry inside `tx`.
    ///
    /// # Errors
    /// [`PointRepositoryError::Unexpected`] for any storage failure.
    async fn append_history(
        &self,
        tx: &mut Tx,
        entry: &PointHistoryEntry,
    ) -> Result<(), PointRepositoryError>;

    /// Appends several history entries inside `tx`, in their order (a batch of charges
    /// applied in one transaction). The default inserts them one by one; an adapter may
    /// send them in one statement.
    ///
    /// # Errors
    /// [`PointRepositoryError::Unexpected`] for any storage failure.
    async fn append_histories(
        &self,
        tx: &mut Tx,
        entries: &[PointHistoryEntry],
    ) -> Result<(), PointRepositoryError> {
        for entry in entries {
            self.append_history(tx, entry).await?;
        }
        Ok(())
    }

    /// The committed balance of a user, read without locking.
    ///
    /// # Errors
    /// [`PointRepositoryError::Unexpected`] for any storage failure; no account is `Ok(None)`.
    async fn balance(&self, user_id: UserId) -> Result<Option<Balance>, PointRepositoryError>;

    /// The newest `limit` history entries of a user, newest first (by `seq`).
    ///
    /// # Errors
    /// [`PointRepositoryError::Unexpected`] for any storage failure.
    async fn history(
        &self,
        user_id: UserId,
        limit: HistoryLimit,
    ) -> Result<Vec<PointHistoryEntry>, PointRepositoryError>;
}

#[derive(Debug, thiserror::Error)]
pub enum PointRepositoryError {
    #[error("the balance of user {user_id} changed since it was read")]
    StaleBalance { user_id: UserId },
    /// The write carried a fencing number lower than one the store accepted already.
    #[error(
        "the account of user {user_id} was written under a later lock (fencing number {refused} < {stored})"
    )]
    Fenced { user_id: UserId, refused: u64, stored: u64 },
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2026-11-21 09:30 UTC);

    fn account_with(points: i64) -> PointAccount {
        PointAccount::restore(UserId::generate(), Balance::new(points).expect("valid balance"), 7)
    }

    #[test]
    fn charge_amount_accepts_its_bounds_and_nothing_outside() {
        assert!(ChargeAmount::new(1).is_ok());
        assert!(ChargeAmount::new(10_000_000).is_ok());
        for points in [0, -1, 10_000_001, i64::MIN, i64::MAX] {
            assert_eq!(
                ChargeAmount::new(points),
                Err(PointError::AmountOutOfRange { points, min: 1, max: 10_000_000 }),
            );
        }
    }

    #[test]
    fn charge_adds_to_the_balance_and_records_it() {
        let mut account = account_with(500);
        let entry = account.charge(ChargeAmount::new(1_000).expect("valid"), NOW).expect("under the ceiling");
        assert_eq!(account.balance().points(), 1_500);
        assert_eq!(entry.kind(), PointHistoryKind::Charge);
        assert_eq!(entry.amount().points(), 1_000);
        assert_eq!(entry.balance_after().points(), 1_500);
        assert_eq!(entry.user_id(), account.user_id());
        assert_eq!(entry.created_at(), NOW);
        assert_eq!((entry.seq(), account.version()), (8, 8), "the change is the account's eighth");
    }

    #[test]
    fn charge_may_reach_the_ceiling_exactly() {
        let mut account = account_with(MAX_BALANCE - 10);
        account.charge(ChargeAmount::new(10).expect("valid"), NOW).expect("reaches, does not pass");
        assert_eq!(account.balance().points(), MAX_BALANCE);
    }

    #[test]
    fn charge_is_rejected_when_balance_would_pass_the_ceiling() {
        let mut account = account_with(MAX_BALANCE - 10);
        let refused = account.charge(ChargeAmount::new(11).expect("valid"), NOW);
        assert_eq!(refused, Err(PointError::BalanceLimitExceeded { balance: MAX_BALANCE - 10, amount: 11 }));
        assert_eq!(account.balance().points(), MAX_BALANCE - 10, "unchanged");
        assert_eq!(account.version(), 7, "a refused change is not a change");
    }

    #[test]
    fn deduct_takes_points_and_records_a_use() {
        let mut account = account_with(300);
        let entry = account.deduct(PointAmount::new(300).expect("valid"), NOW).expect("enough");
        assert_eq!(account.balance(), Balance::ZERO);
        assert_eq!(entry.kind(), PointHistoryKind::Use);
        assert_eq!(entry.balance_after(), Balance::ZERO);
    }

    #[test]
    fn deduct_never_takes_a_balance_below_zero() {
        let mut account = account_with(299);
        let refused = account.deduct(PointAmount::new(300).expect("valid"), NOW);
        assert_eq!(refused, Err(PointError::InsufficientBalance { balance: 299, amount: 300 }));
        assert_eq!(account.balance().points(), 299, "unchanged");
        assert_eq!(account.version(), 7, "a refused change is not a change");
    }

    #[test]
    fn balance_rejects_values_storage_must_never_hold() {
        assert!(Balance::new(-1).is_err());
        assert!(Balance::new(MAX_BALANCE + 1).is_err());
        assert!(Balance::new(0).is_ok());
        assert!(Balance::new(MAX_BALANCE).is_ok());
    }

    #[test]
    fn history_limit_defaults_to_fifty_and_stays_in_range() {
        assert_eq!(HistoryLimit::default().get(), 50);
        assert_eq!(HistoryLimit::new(1).map(HistoryLimit::get), Ok(1));
        assert_eq!(HistoryLimit::new(1000).map(HistoryLimit::get), Ok(1000));
        for limit in [0, -5, 1001, 70_000] {
            assert_eq!(HistoryLimit::new(limit), Err(PointError::LimitOutOfRange { limit, max: 1000 }));
        }
    }

    #[test]
    fn history_kind_names_round_trip() {
        for kind in [PointHistoryKind::Charge, PointHistoryKind::Use, PointHistoryKind::Refund] {
            assert_eq!(PointHistoryKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(PointHistoryKind::parse("charge"), None);
    }
}
