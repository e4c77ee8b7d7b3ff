//! Users: who holds points, queue tokens and reservations.

use std::fmt;

use async_trait::async_trait;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::unit_of_work::Tx;

/// A user's identity: a UUID, v7 when this service makes it (time-ordered, so inserts
/// land at the end of the primary-key index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(Uuid);

impl UserId {
    /// A fresh, time-ordered id.
    #[must_use]
    pub fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    /// Wraps an id that came from storage or from a client.
    #[must_use]
    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    #[must_use]
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A display name: at most 50 characters as sent, not blank, stored with surrounding white
/// space trimmed, with no control characters (they break logs and terminals, and no name
/// needs them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserName(String);

impl UserName {
    /// The longest name, in characters (Unicode scalar values, not bytes).
    pub const MAX_CHARS: usize = 50;

    /// # Errors
    /// [`UserNameError`] when the name is longer than [`UserName::MAX_CHARS`], blank once
    /// trimmed, or contains a control character.
    pub fn new(raw: &str) -> Result<Self, UserNameError> {
        // Counted before trimming: the limit is on what the client sends, as the API states.
        let chars = raw.chars().count();
        if chars > Self::MAX_CHARS {
            return Err(UserNameError::TooLong { chars });
        }
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(UserNameError::Empty);
        }
        if trimmed.chars().any(char::is_control) {
            return Err(UserNameError::ControlCharacter);
        }
        Ok(Self(trimmed.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserNameError {
    #[error("name must not be empty")]
    Empty,
    #[error("name must be at most {max} characters, got {chars}", max = UserName::MAX_CHARS)]
    TooLong { chars: usize },
    #[error("name must not contain control characters")]
    ControlCharacter,
}

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    id: UserId,
    name: UserName,
    created_at: OffsetDateTime,
}

impl User {
    /// A new user, registered at `now`.
    #[must_use]
    pub fn register(name: UserName, now: OffsetDateTime) -> Self {
        Self { id: UserId::generate(), name, created_at: now }
    }

    /// A user read back from storage.
    #[must_use]
    pub fn restore(id: UserId, name: UserName, created_at: OffsetDateTime) -> Self {
        Self { id, name, created_at }
    }

    #[must_use]
    pub const fn id(&self) -> UserId {
        self.id
    }

    #[must_use]
    pub const fn name(&self) -> &UserName {
        &self.name
    }

    #[must_use]
    pub const fn created_at(&self) -> OffsetDateTime {
        self.created_at
    }
}

/// Where users are kept.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait UserRepository: Send + Sync {
    /// Stores a new user inside `tx`.
    ///
    /// # Errors
    /// [`UserRepositoryError::Duplicate`] when a user with this id exists;
    /// [`UserRepositoryError::Unexpected`] for any storage failure.
    async fn insert(&self, tx: &mut Tx, user: &User) -> Result<(), UserRepositoryError>;

    /// Reads a user outside any transaction (reads are never locked).
    ///
    /// # Errors
    /// [`UserRepositoryError::Unexpected`] for any storage failure; an unknown id is
    /// `Ok(None)`.
    async fn find(&self, id: UserId) -> Result<Option<User>, UserRepositoryError>;
}

#[derive(Debug, thiserror::Error)]
pub enum UserRepositoryError {
    #[error("user {0} already exists")]
    Duplicate(UserId),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_is_trimmed_and_kept() {
        let name = UserName::new("  kim  ").expect("valid name");
        assert_eq!(name.as_str(), "kim");
    }

    #[test]
    fn blank_name_is_rejected() {
        assert_eq!(UserName::new(""), Err(UserNameError::Empty));
        assert_eq!(UserName::new(" \t "), Err(UserNameError::Empty));
    }

    #[test]
    fn name_length_counts_characters_not_bytes() {
        let fifty_hangul = "김".repeat(50);
        assert!(UserName::new(&fifty_hangul).is_ok(), "50 three-byte characters fit");
        let fifty_one = "a".repeat(51);
        assert_eq!(UserName::new(&fifty_one), Err(UserNameError::TooLong { chars: 51 }));
    }

    #[test]
    fn name_with_control_character_is_rejected() {
        assert_eq!(UserName::new("kim\u{0}"), Err(UserNameError::ControlCharacter));
        assert_eq!(UserName::new("a\nb"), Err(UserNameError::ControlCharacter));
    }

    #[test]
    fn generated_ids_are_distinct_and_time_ordered() {
        let first = UserId::generate();
        let second = UserId::generate();
        assert_ne!(first, second);
        assert!(first < second, "v7 ids sort by creation time");
    }
}
