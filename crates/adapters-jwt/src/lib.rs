//! Access tokens as JWTs signed with HMAC-SHA256 (RFC 7519, RFC 7518 §3.2), behind the
//! `application::identity` ports.
//!
//! A token names its key in the header (`kid`); the verifier looks the key up in the
//! [`Keyring`] in memory, checks the signature, the algorithm (HS256 only: `none` and
//! every other `alg` are refused), the issuer, the audience and the expiry. No store is
//! asked, so verification costs a few microseconds on every request.
//!
//! An identity provider that signs with public keys (RS256/ES256, a JWKS URL) would be
//! another adapter of `TokenVerifier`, with the same claims checks.

use std::sync::Arc;
use std::time::Duration;

use application::identity::{AccessToken, Keyring, TokenIssuer, TokenVerifier, Unauthenticated};
use domain::user::UserId;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The `iss` of every token this service signs.
pub const ISSUER: &str = "concert-server";
/// The `aud` of every token this service signs: its API.
pub const AUDIENCE: &str = "concert-api";
/// Clock skew tolerated on `exp` between the instance that signed and the one verifying.
const LEEWAY_SECONDS: u64 = 5;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    iss: String,
    aud: String,
    iat: i64,
    exp: i64,
}

/// Signs and verifies access tokens with the keys of a [`Keyring`].
#[derive(Debug, Clone)]
pub struct JwtTokens {
    keyring: Arc<Keyring>,
    lifetime: Duration,
    validation: Validation,
}

impl JwtTokens {
    /// Tokens that live `lifetime`, signed and verified with `keyring`'s keys.
    #[must_use]
    pub fn new(keyring: Arc<Keyring>, lifetime: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECONDS;
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        Self { keyring, lifetime, validation }
    }
}

impl TokenIssuer for JwtTokens {
    fn issue(&self, user: UserId) -> anyhow::Result<AccessToken> {
        let now = OffsetDateTime::now_utc();
        let keys = self.keyring.current();
        let key = keys.signing(now).ok_or_else(|| anyhow::anyhow!("no signing key is loaded"))?;
        let expires_at = now + self.lifetime;
        let claims = Claims {
            sub: user.to_string(),
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now.unix_timestamp(),
            exp: expires_at.unix_timestamp(),
        };
        let header = Header { kid: Some(key.kid.clone()), ..Header::new(Algorithm::HS256) };
        let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(key.secret.as_bytes()))
            .map_err(|e| anyhow::anyhow!("failed to sign an access token: {e}"))?;
        Ok(AccessToken { token, expires_at: expires_at.replace_nanosecond(0).unwrap_or(expires_at) })
    }
}

impl TokenVerifier for JwtTokens {
    fn verify(&self, token: &str) -> Result<UserId, Unauthenticated> {
        // Bounded before any parsing: a real token is a few hundred bytes.
        if token.len() > 4_096 {
            return Err(Unauthenticated::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| Unauthenticated::Malformed)?;
        if header.alg != Algorithm::HS256 {
            return Err(Unauthenticated::BadSignature);
        }
        let kid = header.kid.ok_or(Unauthenticated::UnknownKey)?;
        let keys = self.keyring.current();
        let key = keys.verifying(&kid).ok_or(Unauthenticated::UnknownKey)?;
        let data = jsonwebtoken::decode::<Claims>(
            token,
            &DecodingKey::from_secret(key.secret.as_bytes()),
            &self.validation,
        )
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => Unauthenticated::Expired,
            ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                Unauthenticated::Malformed
            }
            _ => Unauthenticated::BadSignature,
        })?;
        uuid::Uuid::try_parse(&data.claims.sub)
            .map(UserId::from_uuid)
            .map_err(|_| Unauthenticated::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use application::identity::{KeySet, Secret, SigningKey};

    use super::*;

    fn key(kid: &str, byte: u8, activates: OffsetDateTime) -> SigningKey {
        SigningKey { kid: kid.into(), secret: Secret::new(vec![byte; 32]), activates_at: activates }
    }

    fn tokens(keys: Vec<SigningKey>, lifetime: Duration) -> JwtTokens {
        JwtTokens::new(Arc::new(Keyring::new(KeySet::new(keys))), lifetime)
    }

    fn old() -> OffsetDateTime {
        OffsetDateTime::now_utc() - Duration::from_secs(3_600)
    }

    #[test]
    fn a_token_verifies_to_its_subject() {
        let jwt = tokens(vec![key("k1", 1, old())], Duration::from_secs(900));
        let user = UserId::generate();
        let token = jwt.issue(user).expect("signed");
        assert_eq!(jwt.verify(&token.token), Ok(user));
        assert!(token.expires_at > OffsetDateTime::now_utc() + Duration::from_secs(890));
    }

    #[test]
    fn a_token_of_the_previous_key_verifies_after_rotation_and_one_of_an_unknown_key_does_not() {
        let keyring = Arc::new(Keyring::new(KeySet::new(vec![key("k1", 1, old())])));
        let jwt = JwtTokens::new(Arc::clone(&keyring), Duration::from_secs(900));
        let user = UserId::generate();
        let before = jwt.issue(user).expect("signed").token;
        keyring.replace(KeySet::new(vec![key("k1", 1, old()), key("k2", 2, OffsetDateTime::now_utc())]));
        let after = jwt.issue(user).expect("signed").token;
        assert_eq!(jsonwebtoken::decode_header(&after).expect("header").kid.as_deref(), Some("k2"));
        assert_eq!(jwt.verify(&before), Ok(user), "the previous key still verifies");
        assert_eq!(jwt.verify(&after), Ok(user));

        let stranger = tokens(vec![key("k9", 9, old())], Duration::from_secs(900));
        assert_eq!(
            jwt.verify(&stranger.issue(user).expect("signed").token),
            Err(Unauthenticated::UnknownKey)
        );
        // The right kid with another secret: a forgery.
        let forger = tokens(vec![key("k2", 7, old())], Duration::from_secs(900));
        assert_eq!(
            jwt.verify(&forger.issue(user).expect("signed").token),
            Err(Unauthenticated::BadSignature)
        );
    }

    #[test]
    fn expired_malformed_and_unsigned_tokens_are_refused() {
        let jwt = tokens(vec![key("k1", 1, old())], Duration::from_secs(900));
        let user = UserId::generate();
        let expired = tokens(vec![key("k1", 1, old())], Duration::ZERO);
        // Issued with no lifetime: past the 5 s leeway only later, so sign one by hand.
        let claims = Claims {
            sub: user.to_string(),
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
            iat: 0,
            exp: OffsetDateTime::now_utc().unix_timestamp() - 60,
        };
        let header = Header { kid: Some("k1".into()), ..Header::new(Algorithm::HS256) };
        let stale =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&[1; 32])).expect("signed");
        assert_eq!(jwt.verify(&stale), Err(Unauthenticated::Expired));
        assert!(expired.issue(user).is_ok());

        for garbage in ["", "abc", "a.b.c", &"x".repeat(5_000)] {
            assert_eq!(jwt.verify(garbage), Err(Unauthenticated::Malformed), "{garbage:.20}");
        }
        // alg "none": header {"alg":"none","kid":"k1"}, the same claims, no signature.
        let body = jwt.issue(user).expect("signed").token;
        let payload = body.split('.').nth(1).expect("payload");
        let none = format!("eyJhbGciOiJub25lIiwia2lkIjoiazEifQ.{payload}.");
        assert!(jwt.verify(&none).is_err());
        // Another audience, signed with the right key.
        let claims = Claims { aud: "someone-else".into(), exp: claims.exp + 3_600, ..claims };
        let other =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&[1; 32])).expect("signed");
        assert_eq!(jwt.verify(&other), Err(Unauthenticated::BadSignature));
    }
}
