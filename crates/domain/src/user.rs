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

/// A display name: at most 50 characters as sent, stored with surrounding white space
/// trimmed; with at least one visible character (not only white space or invisible ones
/// such as zero-width spaces: a name nobody can see lets one user pass for another), no
/// control characters (they break logs and terminals) and no bidirectional controls (an
/// override such as U+202E makes `abc\u{202e}txt` display as another text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserName(String);

impl UserName {
    /// The longest name, in characters (Unicode scalar values, not bytes).
    pub const MAX_CHARS: usize = 50;

    /// # Errors
    /// [`UserNameError`] when the name is longer than [`UserName::MAX_CHARS`], blank once
    /// trimmed, only invisible characters, or contains a control or bidirectional
    /// control character.
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
        if trimmed.chars().any(is_bidi_control) {
            return Err(UserNameError::BidiControl);
        }
        if trimmed.chars().all(|c| c.is_whitespace() || is_invisible(c)) {
            return Err(UserNameError::Invisible);
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// A name as stored, accepted as it is: the rules apply when a name is given, and a
    /// name stored under older rules must still read back.
    #[must_use]
    pub fn restore(stored: String) -> Self {
        Self(stored)
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
    #[error(
        "name must not contain bidirectional control characters (U+061C, U+200E, U+200F, U+202A..U+202E, U+2066..U+2069)"
    )]
    BidiControl,
    #[error("name must have at least one visible character, not only white space or invisible characters")]
    Invisible,
}

/// Characters that change the direction text is shown in: with them a name can display
/// as another text (`abc\u{202e}txt` shows as `abctxt` reversed at the override).
const BIDI_CONTROLS: &[(char, char)] =
    &[('\u{061C}', '\u{061C}'), ('\u{200E}', '\u{200F}'), ('\u{202A}', '\u{202E}'), ('\u{2066}', '\u{2069}')];

/// Characters that show nothing (format characters, fillers, variation selectors), besides
/// white space: a name of only these looks empty. Kept in step with the `name` pattern of
/// the OpenAPI document (`bootstrap::routes::users`).
const INVISIBLES: &[(char, char)] = &[
    ('\u{00AD}', '\u{00AD}'),
    ('\u{034F}', '\u{034F}'),
    ('\u{115F}', '\u{1160}'),
    ('\u{17B4}', '\u{17B5}'),
    ('\u{180B}', '\u{180E}'),
    ('\u{200B}', '\u{200F}'),
    ('\u{202A}', '\u{202E}'),
    ('\u{2060}', '\u{206F}'),
    ('\u{3164}', '\u{3164}'),
    ('\u{FE00}', '\u{FE0F}'),
    ('\u{FEFF}', '\u{FEFF}'),
    ('\u{FFA0}', '\u{FFA0}'),
];

fn in_ranges(c: char, ranges: &[(char, char)]) -> bool {
    ranges.iter().any(|(from, to)| (*from..=*to).contains(&c))
}

/// Whether `c` is a bidirectional control.
#[must_use]
pub fn is_bidi_control(c: char) -> bool {
    in_ranges(c, BIDI_CONTROLS)
}

/// Whether `c` shows nothing (white space aside).
#[must_use]
pub fn is_invisible(c: char) -> bool {
    in_ranges(c, INVISIBLES)
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

    /// Stores the digest of a new API key of `user` inside `tx` (the key itself is never
    /// stored).
    ///
    /// # Errors
    /// [`UserRepositoryError::Unexpected`] for any storage failure.
    async fn add_api_key(
        &self,
        tx: &mut Tx,
        user: UserId,
        key: &ApiKeyDigest,
    ) -> Result<(), UserRepositoryError>;

    /// The user whose API key has this digest, outside any transaction.
    ///
    /// # Errors
    /// [`UserRepositoryError::Unexpected`] for any storage failure; no such key is
    /// `Ok(None)`.
    async fn find_by_api_key(&self, key: &ApiKeyDigest) -> Result<Option<UserId>, UserRepositoryError>;
}

/// The SHA-256 digest of an API key: what is stored and looked up. An API key is a random
/// secret of 256 bits, so a fast hash is the right one (nothing to brute-force, unlike a
/// password), and the lookup by digest leaks nothing through its timing.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ApiKeyDigest(pub [u8; 32]);

impl fmt::Debug for ApiKeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKeyDigest(..)")
    }
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
    fn names_of_only_invisible_characters_or_with_bidi_controls_are_rejected() {
        for invisible in
            ["\u{200B}", "\u{200B}\u{200C}\u{200D}", " \u{2060} ", "\u{FEFF}\u{00AD}", "\u{3164}"]
        {
            assert_eq!(UserName::new(invisible), Err(UserNameError::Invisible), "{invisible:?}");
        }
        for bidi in ["abc\u{202E}txt", "\u{2066}kim\u{2069}", "kim\u{200F}", "a\u{061C}b"] {
            assert_eq!(UserName::new(bidi), Err(UserNameError::BidiControl), "{bidi:?}");
        }
        // Visible text with a joiner inside (emoji sequences, some scripts) is a name.
        assert!(UserName::new("kim\u{200D}lee").is_ok());
        assert!(UserName::new("\u{D55C}\u{AE00}").is_ok());
        // A name stored under older rules still reads back.
        assert_eq!(UserName::restore("abc\u{202E}txt".into()).as_str(), "abc\u{202E}txt");
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
