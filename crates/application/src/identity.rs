//! Who is calling: API keys, access tokens, and the keys that sign them.
//!
//! - A user gets an [`ApiKey`] once, at sign-up; only its digest is stored.
//! - [`SignIn`] exchanges an API key for a short-lived [`AccessToken`] (one store lookup).
//! - Every other request carries the access token, checked by the [`TokenVerifier`] port
//!   with no store round trip: the JWT adapter verifies a signature against the keys it
//!   holds in memory. An external identity provider (issuer, audience, its public keys) is
//!   one more adapter of the same port.
//! - The signing keys ([`SigningKeys`]) are kept in a store every instance shares (or set
//!   by the operator), refreshed in the background, and rotated without logging anyone
//!   out: a new key is published first and signs only once every instance has had time to
//!   learn it; the key it replaces verifies until the tokens it signed have run out.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use domain::user::{ApiKeyDigest, UserId, UserRepository};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;

use crate::clock;
use crate::failure::Failure;

/// The prefix every API key starts with, so that a leaked one is recognisable (secret
/// scanners key on such prefixes) and a bearer that is plainly not one is refused without
/// a lookup.
pub const API_KEY_PREFIX: &str = "ck_";

/// Characters of an API key: the prefix and 32 random bytes, base64url without padding.
const API_KEY_LEN: usize = API_KEY_PREFIX.len() + 43;

/// 32 random bytes from the operating system's CSPRNG.
fn random_bytes() -> anyhow::Result<[u8; 32]> {
    let mut bytes = [0_u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("no randomness from the operating system: {e}"))?;
    Ok(bytes)
}

/// A user's API key: shown once, at sign-up, then only its digest exists.
#[derive(Clone)]
pub struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

impl ApiKey {
    /// A new random key (256 bits).
    ///
    /// # Errors
    /// When the operating system gives no randomness.
    pub fn generate() -> anyhow::Result<Self> {
        Ok(Self(format!("{API_KEY_PREFIX}{}", base64url(&random_bytes()?))))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    #[must_use]
    pub fn digest(&self) -> ApiKeyDigest {
        digest(&self.0)
    }

    /// Whether `raw` has the shape of an API key (prefix, length, alphabet): what is not
    /// is refused without a lookup.
    #[must_use]
    pub fn well_formed(raw: &str) -> bool {
        raw.len() == API_KEY_LEN
            && raw.starts_with(API_KEY_PREFIX)
            && raw[API_KEY_PREFIX.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }
}

fn digest(raw: &str) -> ApiKeyDigest {
    ApiKeyDigest(Sha256::digest(raw.as_bytes()).into())
}

/// Base64url without padding (RFC 4648 §5), for keys and key ids.
#[must_use]
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0_u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// A signed access token and when it stops being valid.
#[derive(Clone)]
pub struct AccessToken {
    pub token: String,
    pub expires_at: OffsetDateTime,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

/// Why a bearer token was refused. Every reason is the same 401 to the client; the reason
/// is for the logs (never the token itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unauthenticated {
    #[error("no bearer token")]
    Missing,
    #[error("the bearer token is malformed")]
    Malformed,
    #[error("the bearer token is signed by an unknown key")]
    UnknownKey,
    #[error("the bearer token's signature or claims do not verify")]
    BadSignature,
    #[error("the bearer token has expired")]
    Expired,
}

/// The check every user route makes: who does this access token speak for? Answered from
/// memory, with no store round trip (the seat-map path pays for it on every request).
pub trait TokenVerifier: Send + Sync {
    /// The token's subject.
    ///
    /// # Errors
    /// [`Unauthenticated`] for a token that is malformed, expired, or not signed by a key
    /// this verifier trusts.
    fn verify(&self, token: &str) -> Result<UserId, Unauthenticated>;
}

/// Issues access tokens for users who proved who they are.
pub trait TokenIssuer: Send + Sync {
    /// A token for `user`, signed with the current key.
    ///
    /// # Errors
    /// When no key can sign.
    fn issue(&self, user: UserId) -> anyhow::Result<AccessToken>;
}

/// A signing secret; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The shortest secret taken: 256 bits, as HS256 asks (RFC 7518 §3.2).
    pub const MIN_LEN: usize = 32;

    #[must_use]
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// A new random secret of 256 bits.
    ///
    /// # Errors
    /// When the operating system gives no randomness.
    pub fn generate() -> anyhow::Result<Self> {
        Ok(Self(random_bytes()?.to_vec()))
    }

    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// One signing key: its id (the JWT `kid`), its secret, and from when it signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKey {
    pub kid: String,
    pub secret: Secret,
    pub activates_at: OffsetDateTime,
}

impl SigningKey {
    /// A key given by the operator: its id is derived from the secret (so every instance
    /// given the same secret names it alike, and the id reveals nothing of it).
    #[must_use]
    pub fn from_operator(secret: Secret, activates_at: OffsetDateTime) -> Self {
        let kid = base64url(&Sha256::digest(secret.as_bytes())[..12]);
        Self { kid, secret, activates_at }
    }
}

/// The keys an instance knows, oldest activation first.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<SigningKey>,
}

impl KeySet {
    #[must_use]
    pub fn new(mut keys: Vec<SigningKey>) -> Self {
        keys.sort_by_key(|key| key.activates_at);
        Self { keys }
    }

    /// The key that signs at `now`: the latest one already active; before any is active,
    /// the first (a fresh deployment signs with its only key at once).
    #[must_use]
    pub fn signing(&self, now: OffsetDateTime) -> Option<&SigningKey> {
        self.keys.iter().rev().find(|key| key.activates_at <= now).or_else(|| self.keys.first())
    }

    /// The key named `kid`, if this instance trusts it.
    #[must_use]
    pub fn verifying(&self, kid: &str) -> Option<&SigningKey> {
        self.keys.iter().find(|key| key.kid == kid)
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The keys in memory that the token adapter signs and verifies with, swapped whole when
/// the store says they changed.
#[derive(Debug, Default)]
pub struct Keyring(RwLock<Arc<KeySet>>);

impl Keyring {
    #[must_use]
    pub fn new(keys: KeySet) -> Self {
        Self(RwLock::new(Arc::new(keys)))
    }

    /// The keys now (a cheap clone of an `Arc`).
    #[must_use]
    pub fn current(&self) -> Arc<KeySet> {
        Arc::clone(&self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    pub fn replace(&self, keys: KeySet) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
    }
}

/// Where the shared signing keys are kept (MySQL): every instance reads the same ones, so
/// a token from one verifies on all.
#[cfg_attr(any(test, feature = "mocks"), mockall::automock)]
#[async_trait]
pub trait SigningKeyStore: Send + Sync {
    /// Every key kept, in any order.
    async fn keys(&self) -> anyhow::Result<Vec<SigningKey>>;

    /// Stores `key` as the first key, active now on the store's clock (its `activates_at`
    /// is not used), unless a key exists already (instances starting together agree on
    /// one).
    async fn create_first(&self, key: &SigningKey) -> anyhow::Result<()>;

    /// Adds a key that starts signing `delay` after now (the store's clock): the next
    /// generation, once, however many instances ask at the same moment. Returns the key
    /// that holds that generation (this one, or the one another request stored first).
    async fn rotate(&self, kid: &str, secret: &Secret, delay: Duration) -> anyhow::Result<SigningKey>;

    /// Deletes every key that a later key replaced more than `after` ago (its tokens have
    /// all run out). Returns how many went.
    async fn prune(&self, after: Duration) -> anyhow::Result<u64>;
}

/// The shared signing keys: loaded at start, refreshed by a background job, rotated by an
/// admin. Keys set by the operator (`AUTH_SIGNING_KEY`) are not this: they are fixed for
/// the life of the process.
#[derive(Clone)]
pub struct SigningKeys {
    store: Arc<dyn SigningKeyStore>,
    keyring: Arc<Keyring>,
    /// How long a new key waits before it signs: every instance refreshes within it.
    activation_delay: Duration,
    /// How long a replaced key still verifies: the longest an access token lives, and a
    /// margin for clocks.
    retention: Duration,
}

impl fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeys")
            .field("activation_delay", &self.activation_delay)
            .finish_non_exhaustive()
    }
}

/// A new key id: 12 random bytes.
fn new_kid() -> anyhow::Result<String> {
    Ok(base64url(&random_bytes()?[..12]))
}

impl SigningKeys {
    /// `refresh_every` is how often the background job reloads the keys: a new key waits
    /// two of those (and a margin) before it signs. `token_lifetime` is how long access
    /// tokens live: a replaced key verifies that long after its successor took over.
    #[must_use]
    pub fn new(
        store: Arc<dyn SigningKeyStore>,
        keyring: Arc<Keyring>,
        refresh_every: Duration,
        token_lifetime: Duration,
    ) -> Self {
        Self {
            store,
            keyring,
            activation_delay: refresh_every * 2 + Duration::from_secs(5),
            retention: token_lifetime + Duration::from_secs(60),
        }
    }

    /// Loads the keys, creating the first one when the store has none.
    ///
    /// # Errors
    /// When the store fails.
    pub async fn load(&self) -> anyhow::Result<()> {
        if self.store.keys().await?.is_empty() {
            let first =
                SigningKey { kid: new_kid()?, secret: Secret::generate()?, activates_at: clock::now_utc() };
            self.store.create_first(&first).await?;
        }
        self.refresh().await
    }

    /// Reloads the keys from the store (and prunes those whose tokens have all run out).
    /// A store that answers no key leaves the keys in memory as they were: an instance
    /// never drops to verifying nothing.
    ///
    /// # Errors
    /// When the store fails; the keys in memory are kept.
    pub async fn refresh(&self) -> anyhow::Result<()> {
        // Best effort: a prune that fails (a lock wait against another instance's) must not
        // keep this instance from learning a new key.
        match self.store.prune(self.retention).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "signing keys whose tokens have all expired were deleted"),
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "replaced signing keys not pruned; next time")
            }
        }
        let keys = self.store.keys().await?;
        if keys.is_empty() {
            anyhow::bail!(
                "the signing-key store has no key; keeping the {} in memory",
                self.keyring.current().len()
            );
        }
        self.keyring.replace(KeySet::new(keys));
        Ok(())
    }

    /// Publishes a new key that signs after the activation delay; until then, and for the
    /// retention after, the key it replaces still signs and verifies. Returns the new key
    /// (its secret stays inside).
    ///
    /// # Errors
    /// When the store fails.
    pub async fn rotate(&self) -> Result<SigningKey, Failure> {
        let key = self.store.rotate(&new_kid()?, &Secret::generate()?, self.activation_delay).await?;
        tracing::info!(kid = %key.kid, activates_at = %key.activates_at, "signing key rotated");
        // The key is stored: the rotation happened. This instance learns it now or at its
        // next refresh, well before the key signs.
        if let Err(error) = self.refresh().await {
            tracing::warn!(
                error = format!("{error:#}"),
                "signing keys not reloaded after the rotation; the job will"
            );
        }
        Ok(key)
    }
}

/// Signing in: an API key for an access token.
#[derive(Clone)]
pub struct SignIn {
    users: Arc<dyn UserRepository>,
    issuer: Arc<dyn TokenIssuer>,
}

impl fmt::Debug for SignIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignIn").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    /// No user has this API key (or it is not one).
    #[error("the API key is not valid")]
    Unauthenticated,
    #[error(transparent)]
    Failure(Failure),
}

crate::failure_conversions!(SignInError);

impl SignIn {
    #[must_use]
    pub fn new(users: Arc<dyn UserRepository>, issuer: Arc<dyn TokenIssuer>) -> Self {
        Self { users, issuer }
    }

    /// An access token for the user whose API key `raw` is.
    ///
    /// # Errors
    /// [`SignInError::Unauthenticated`] for a key no user has; a failure of the store.
    #[tracing::instrument(name = "sign_in", skip_all)]
    pub async fn execute(&self, raw: &str) -> Result<(UserId, AccessToken), SignInError> {
        if !ApiKey::well_formed(raw) {
            return Err(SignInError::Unauthenticated);
        }
        let user = self
            .users
            .find_by_api_key(&digest(raw))
            .await
            .map_err(|e| anyhow::Error::new(e).context("failed to look up the API key"))?
            .ok_or(SignInError::Unauthenticated)?;
        let token = self.issuer.issue(user)?;
        tracing::info!(user_id = %user, "access token issued");
        Ok((user, token))
    }
}

#[cfg(test)]
mod tests {
    use domain::user::MockUserRepository;

    use super::*;

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(secs).expect("a time")
    }

    fn key(kid: &str, activates: i64) -> SigningKey {
        SigningKey { kid: kid.into(), secret: Secret::new(vec![1; 32]), activates_at: at(activates) }
    }

    #[test]
    fn base64url_matches_rfc_4648_vectors() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(b"fooba"), "Zm9vYmE");
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn api_keys_are_random_well_formed_and_never_printed() {
        let (a, b) = (ApiKey::generate().expect("key"), ApiKey::generate().expect("key"));
        assert_ne!(a.as_str(), b.as_str());
        assert!(ApiKey::well_formed(a.as_str()), "{}", a.as_str().len());
        assert_ne!(a.digest(), b.digest());
        assert!(!format!("{a:?}").contains(&a.as_str()[3..]));
        for bad in
            ["", "ck_", "xx_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", &format!("{}!", &a.as_str()[..45])]
        {
            assert!(!ApiKey::well_formed(bad), "{bad}");
        }
    }

    #[test]
    fn the_latest_active_key_signs_and_every_kept_key_verifies() {
        let keys = KeySet::new(vec![key("new", 200), key("old", 100)]);
        assert_eq!(
            keys.signing(at(150)).map(|k| k.kid.as_str()),
            Some("old"),
            "the new key is not active yet"
        );
        assert_eq!(keys.signing(at(250)).map(|k| k.kid.as_str()), Some("new"));
        assert_eq!(
            keys.signing(at(50)).map(|k| k.kid.as_str()),
            Some("old"),
            "before any is active, the first"
        );
        assert!(keys.verifying("old").is_some() && keys.verifying("new").is_some());
        assert!(keys.verifying("other").is_none());
        assert!(KeySet::default().signing(at(0)).is_none());
    }

    #[test]
    fn an_operator_key_id_is_stable_and_reveals_nothing() {
        let a = SigningKey::from_operator(Secret::new(b"0123456789abcdef0123456789abcdef".to_vec()), at(0));
        let b = SigningKey::from_operator(Secret::new(b"0123456789abcdef0123456789abcdef".to_vec()), at(5));
        assert_eq!(a.kid, b.kid);
        assert!(!a.kid.contains("0123"));
        assert!(!format!("{a:?}").contains("0123"));
    }

    #[tokio::test]
    async fn the_first_key_is_created_once_and_an_empty_store_keeps_the_keys_in_memory() {
        let mut store = MockSigningKeyStore::new();
        let mut calls = 0;
        store.expect_keys().returning(move || {
            calls += 1;
            Ok(if calls == 1 {
                vec![]
            } else if calls == 2 {
                vec![key("k1", 0)]
            } else {
                vec![]
            })
        });
        store.expect_create_first().times(1).returning(|_| Ok(()));
        store.expect_prune().returning(|_| Ok(0));
        let keyring = Arc::new(Keyring::default());
        let keys = SigningKeys::new(
            Arc::new(store),
            Arc::clone(&keyring),
            Duration::from_secs(1),
            Duration::from_secs(60),
        );

        keys.load().await.expect("loaded");
        assert_eq!(keyring.current().len(), 1);
        assert!(keys.refresh().await.is_err(), "a store with no key is an error");
        assert_eq!(keyring.current().len(), 1, "and the keys in memory are kept");
    }

    #[tokio::test]
    async fn a_failed_prune_does_not_keep_a_new_key_from_being_learned() {
        let mut store = MockSigningKeyStore::new();
        store.expect_prune().returning(|_| Err(anyhow::anyhow!("lock wait timeout")));
        store.expect_keys().returning(|| Ok(vec![key("k1", 0), key("k2", 100)]));
        let keyring = Arc::new(Keyring::default());
        let keys = SigningKeys::new(
            Arc::new(store),
            Arc::clone(&keyring),
            Duration::from_secs(1),
            Duration::from_secs(60),
        );

        keys.refresh().await.expect("refreshed");

        assert!(keyring.current().verifying("k2").is_some());
    }

    struct FixedIssuer;

    impl TokenIssuer for FixedIssuer {
        fn issue(&self, _: UserId) -> anyhow::Result<AccessToken> {
            Ok(AccessToken { token: "t".into(), expires_at: at(0) })
        }
    }

    #[tokio::test]
    async fn sign_in_looks_up_the_key_by_digest_and_refuses_unknown_or_malformed_keys() {
        let key = ApiKey::generate().expect("key");
        let owner = UserId::generate();
        let expected = key.digest();
        let mut users = MockUserRepository::new();
        users.expect_find_by_api_key().returning(move |digest| Ok((*digest == expected).then_some(owner)));
        let sign_in = SignIn::new(Arc::new(users), Arc::new(FixedIssuer));

        let (user, _) = sign_in.execute(key.as_str()).await.expect("signed in");
        assert_eq!(user, owner);
        let other = ApiKey::generate().expect("key");
        assert!(matches!(sign_in.execute(other.as_str()).await, Err(SignInError::Unauthenticated)));
        // Malformed: refused before any lookup (the mock would answer None anyway).
        assert!(matches!(sign_in.execute("hunter2").await, Err(SignInError::Unauthenticated)));
    }
}
