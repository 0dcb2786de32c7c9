//! Token verification for `connect`, `refresh` and `subscribe`
//! (client-protocol.md section 6): HS256/384/512 with a shared secret,
//! RS256/384/512 and ES256 with public keys. An expired token is error 109;
//! anything else wrong (bad signature, an algorithm with no key configured,
//! malformed claims, wrong channel or user) closes the connection with 3500.

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use proto::client::claims::{ConnectionClaims, SubscriptionClaims, TimeClaims};
use serde::de::DeserializeOwned;

use crate::config::AuthConfig;

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// `exp` is in the past: reply error 109, the SDK fetches a new token.
    #[error("token expired")]
    Expired,
    /// Anything else: close 3500 (invalid token).
    #[error("invalid token")]
    Invalid,
}

/// The keys a gateway verifies tokens with.
pub struct Verifier {
    hmac: Option<DecodingKey>,
    rsa: Option<DecodingKey>,
    ec: Option<DecodingKey>,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("hmac", &self.hmac.is_some())
            .field("rsa", &self.rsa.is_some())
            .field("ec", &self.ec.is_some())
            .finish()
    }
}

impl Verifier {
    /// Loads the configured keys.
    pub fn new(cfg: &AuthConfig) -> anyhow::Result<Self> {
        if !cfg.hmac_secret.is_empty() && cfg.hmac_secret.len() < crate::config::MIN_HMAC_SECRET {
            anyhow::bail!(
                "auth.hmac_secret is {} bytes; it must be at least {} (a short secret is guessed offline from one token)",
                cfg.hmac_secret.len(),
                crate::config::MIN_HMAC_SECRET
            );
        }
        let hmac =
            (!cfg.hmac_secret.is_empty()).then(|| DecodingKey::from_secret(cfg.hmac_secret.as_bytes()));
        let rsa = match &cfg.rsa_public_key {
            Some(p) => Some(DecodingKey::from_rsa_pem(&std::fs::read(p)?)?),
            None => None,
        };
        let ec = match &cfg.ec_public_key {
            Some(p) => Some(DecodingKey::from_ec_pem(&std::fs::read(p)?)?),
            None => None,
        };
        Ok(Verifier { hmac, rsa, ec, audience: cfg.audience.clone(), issuer: cfg.issuer.clone() })
    }

    /// Verifies `token` at Unix time `now` (the caller's clock: the
    /// gateway's state machine never reads one): an `exp` at or before
    /// `now` is [`TokenError::Expired`], an `nbf` after it is invalid.
    fn verify<T: DeserializeOwned + TimeClaims>(&self, token: &str, now: u64) -> Result<T, TokenError> {
        let header = decode_header(token).map_err(|_| TokenError::Invalid)?;
        let key = match header.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => self.hmac.as_ref(),
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => self.rsa.as_ref(),
            Algorithm::ES256 => self.ec.as_ref(),
            _ => None,
        }
        .ok_or(TokenError::Invalid)?;
        let mut v = Validation::new(header.alg);
        // Tokens without `exp` never expire; time claims are checked below
        // against the caller's time.
        v.required_spec_claims.clear();
        v.validate_aud = false;
        if let Some(aud) = &self.audience {
            v.set_audience(&[aud]);
            v.validate_aud = true;
            v.required_spec_claims.insert("aud".into());
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".into());
        }
        v.validate_exp = false;
        v.validate_nbf = false;
        v.leeway = 0;
        let claims: T = decode::<T>(token, key, &v).map_err(|_| TokenError::Invalid)?.claims;
        if claims.nbf().is_some_and(|nbf| nbf > now) {
            return Err(TokenError::Invalid);
        }
        if claims.exp().is_some_and(|exp| exp <= now) {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// Verifies a connection token at Unix time `now`.
    pub fn connection(&self, token: &str, now: u64) -> Result<ConnectionClaims, TokenError> {
        self.verify(token, now)
    }

    /// Verifies a subscription token for `channel` held by `user` on
    /// `client`, at Unix time `now`.
    pub fn subscription(
        &self,
        token: &str,
        channel: &str,
        user: &str,
        client: &str,
        now: u64,
    ) -> Result<SubscriptionClaims, TokenError> {
        let claims: SubscriptionClaims = self.verify(token, now)?;
        if claims.channel != channel || claims.sub != user {
            return Err(TokenError::Invalid);
        }
        if claims.client.as_deref().is_some_and(|c| !c.is_empty() && c != client) {
            return Err(TokenError::Invalid);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn hs(claims: serde_json::Value, secret: &str, alg: Algorithm) -> String {
        encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";

    fn verifier() -> Verifier {
        Verifier::new(&AuthConfig { hmac_secret: SECRET.into(), ..AuthConfig::default() }).unwrap()
    }

    #[test]
    fn short_secrets_are_refused_at_start() {
        let e =
            Verifier::new(&AuthConfig { hmac_secret: "secret".into(), ..AuthConfig::default() }).unwrap_err();
        assert!(e.to_string().contains("at least 32"), "{e}");
    }

    #[test]
    fn audience_and_issuer_are_enforced_when_configured() {
        let cfg = AuthConfig {
            hmac_secret: SECRET.into(),
            audience: Some("chat".into()),
            issuer: Some("backend".into()),
            ..AuthConfig::default()
        };
        let v = Verifier::new(&cfg).unwrap();
        let t = |c| hs(c, SECRET, Algorithm::HS256);
        assert!(v.connection(&t(json!({"sub":"1","aud":"chat","iss":"backend"})), 1).is_ok());
        assert_eq!(
            v.connection(&t(json!({"sub":"1","aud":"other","iss":"backend"})), 1).unwrap_err(),
            TokenError::Invalid
        );
        assert_eq!(
            v.connection(&t(json!({"sub":"1","aud":"chat","iss":"x"})), 1).unwrap_err(),
            TokenError::Invalid
        );
        assert_eq!(
            v.connection(&t(json!({"sub":"1"})), 1).unwrap_err(),
            TokenError::Invalid,
            "missing aud and iss"
        );
        // Not configured: not checked.
        assert!(verifier().connection(&t(json!({"sub":"1","aud":"other"})), 1).is_ok());
    }

    #[test]
    fn connection_tokens() {
        let v = verifier();
        let now = 2_000_000_000u64;
        let c = v
            .connection(
                &hs(json!({"sub":"42","exp":now + 1,"info":{"name":"A"}}), SECRET, Algorithm::HS256),
                now,
            )
            .unwrap();
        assert_eq!(c.sub, "42");
        assert_eq!(c.info.unwrap().get(), r#"{"name":"A"}"#);
        // No exp, anonymous (the centrifuge-js suite's token).
        assert_eq!(v.connection(&hs(json!({"iat":1}), SECRET, Algorithm::HS512), now).unwrap().sub, "");
        assert_eq!(
            v.connection(&hs(json!({"sub":"1","exp":1000}), SECRET, Algorithm::HS256), now).unwrap_err(),
            TokenError::Expired
        );
        assert_eq!(
            v.connection(&hs(json!({"sub":"1","exp":now}), SECRET, Algorithm::HS256), now).unwrap_err(),
            TokenError::Expired,
            "an exp at the current second has passed"
        );
        assert_eq!(
            v.connection(&hs(json!({"sub":"1","nbf":now + 60}), SECRET, Algorithm::HS256), now).unwrap_err(),
            TokenError::Invalid,
            "not valid yet"
        );
        assert!(v.connection(&hs(json!({"sub":"1","nbf":now}), SECRET, Algorithm::HS256), now).is_ok());
        assert_eq!(
            v.connection(&hs(json!({"sub":"1"}), "wrong", Algorithm::HS256), now).unwrap_err(),
            TokenError::Invalid
        );
        assert_eq!(v.connection("not.a.token", now).unwrap_err(), TokenError::Invalid);
        // Claims of the wrong type.
        assert_eq!(
            v.connection(&hs(json!({"sub":5}), SECRET, Algorithm::HS256), now).unwrap_err(),
            TokenError::Invalid
        );
        // An algorithm family with no key configured.
        let none = Verifier::new(&AuthConfig::default()).unwrap();
        assert_eq!(
            none.connection(&hs(json!({"sub":"1"}), SECRET, Algorithm::HS256), now).unwrap_err(),
            TokenError::Invalid
        );
    }

    #[test]
    fn subscription_tokens_are_bound() {
        let v = verifier();
        let t = hs(json!({"sub":"42","channel":"chat:x"}), SECRET, Algorithm::HS256);
        let now = 1_000;
        assert!(v.subscription(&t, "chat:x", "42", "c", now).is_ok());
        assert_eq!(v.subscription(&t, "chat:y", "42", "c", now).unwrap_err(), TokenError::Invalid);
        assert_eq!(v.subscription(&t, "chat:x", "43", "c", now).unwrap_err(), TokenError::Invalid);
        let bound = hs(json!({"sub":"42","channel":"chat:x","client":"c1"}), SECRET, Algorithm::HS256);
        assert_eq!(v.subscription(&bound, "chat:x", "42", "c2", now).unwrap_err(), TokenError::Invalid);
    }
}

/// The `sub` claim of a JWT, read WITHOUT verifying it: only to pick the
/// core the connection should live on (the token is verified there). `None`
/// for anything that is not a readable JWT with a string `sub`.
pub fn peek_user(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    if payload.len() > 8192 {
        return None;
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    #[derive(serde::Deserialize)]
    struct Sub {
        sub: String,
    }
    serde_json::from_slice::<Sub>(&raw).ok().map(|s| s.sub)
}

#[cfg(test)]
mod peek_tests {
    use super::peek_user;

    #[test]
    fn reads_the_subject_without_trusting_it() {
        // {"alg":"HS256"} . {"sub":"42","exp":1} . (any signature)
        assert_eq!(peek_user("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiIsImV4cCI6MX0.x").as_deref(), Some("42"));
        assert_eq!(peek_user("not a token"), None);
        assert_eq!(peek_user("a.!!!.c"), None);
        assert_eq!(peek_user("a.eyJmb28iOjF9.c"), None, "no sub");
    }
}
