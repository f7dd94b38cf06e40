//! Who is calling: bearer JWTs (HS256, as the platform issues them) and static API tokens.
//!
//! A JWT carries `user_id`, `tenant_id`, `role` and `exp`; it is accepted when its signature
//! matches the shared secret, its algorithm is HS256 and it has not expired. Static tokens come
//! from configuration, each bound to a tenant (or to the admin role). The tenant of a request
//! comes from its token and nothing else; the `admin` role sees every tenant.
//!
//! ```
//! use keel_api::auth::{Auth, Claims, Scope};
//! let auth = Auth::new(Some("a-secret-of-16-bytes-or-more".into()), vec![]).unwrap();
//! let tenant = "5eed517e-ba5e-da7a-517e-ba5eda7a0001".parse().unwrap();
//! let token = auth.issue(&Claims::member("u1", tenant, 4_102_444_800)).unwrap();
//! let who = auth.authenticate(&token, 1_800_000_000).unwrap();
//! assert_eq!(who.scope, Scope::Tenant(tenant));
//! assert!(auth.authenticate(&token, 4_102_444_801).is_err(), "expired");
//! ```

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

/// What a caller may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every tenant's rows.
    Admin,
    /// Its own tenant's rows.
    #[serde(other)]
    Member,
}

/// The claims Keel reads from a JWT.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// User id (informational).
    #[serde(default)]
    pub user_id: String,
    /// Tenant UUID; required unless the role is admin.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Role name; anything but `admin` is a member.
    #[serde(default = "member")]
    pub role: Role,
    /// Expiry, seconds since the epoch (RFC 7519 lets it have a fraction, which is dropped: the
    /// token then ends less than a second early, never late).
    #[serde(deserialize_with = "numeric_date")]
    pub exp: i64,
}

/// A NumericDate: seconds since the epoch, whole or not, as whole seconds rounded down.
fn numeric_date<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    if let Some(seconds) = number.as_i64() {
        return Ok(seconds);
    }
    match number.as_f64() {
        Some(seconds) if seconds.is_finite() && seconds.abs() < 9.0e18 => {
            Ok(seconds.floor() as i64)
        }
        _ => Err(serde::de::Error::custom("exp is not a time in seconds")),
    }
}

fn member() -> Role {
    Role::Member
}

impl Claims {
    /// Claims of a member of `tenant`.
    pub fn member(user: &str, tenant: Uuid, exp: i64) -> Self {
        Claims {
            user_id: user.to_owned(),
            tenant_id: Some(tenant.to_string()),
            role: Role::Member,
            exp,
        }
    }

    /// Claims of an administrator.
    pub fn admin(user: &str, exp: i64) -> Self {
        Claims {
            user_id: user.to_owned(),
            tenant_id: None,
            role: Role::Admin,
            exp,
        }
    }
}

/// Whose rows a caller sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every tenant's (the admin role).
    All,
    /// One tenant's.
    Tenant(Uuid),
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Who (user id or token name).
    pub subject: String,
    /// Whose rows it sees.
    pub scope: Scope,
    /// When its token expires, seconds since the epoch (a JWT's `exp`; none for static
    /// tokens). Live connections end then.
    pub expires: Option<i64>,
}

impl Principal {
    /// How long until its token expires, from `now` seconds: none for a token that does not.
    pub fn expires_in(&self, now: i64) -> Option<std::time::Duration> {
        self.expires
            .map(|exp| std::time::Duration::from_secs(u64::try_from(exp - now).unwrap_or(0)))
    }
}

/// A static API token from configuration.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct StaticToken {
    /// Name shown in logs.
    pub name: String,
    /// The token itself.
    pub token: String,
    /// Its tenant (required unless the role is admin).
    #[serde(default)]
    pub tenant_id: Option<Uuid>,
    /// Its role.
    #[serde(default = "member")]
    pub role: Role,
}

impl fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticToken")
            .field("name", &self.name)
            .field("token", &"***")
            .field("tenant_id", &self.tenant_id)
            .field("role", &self.role)
            .finish()
    }
}

/// Why a token was refused. Every variant is the caller's to fix; none says more than needed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer …` at all.
    #[error("missing bearer token")]
    Missing,
    /// Not a token this server issued or knows.
    #[error("invalid token")]
    Invalid,
    /// A JWT past its `exp`.
    #[error("token expired")]
    Expired,
}

/// The authenticator: a JWT secret and static tokens.
#[derive(Clone)]
pub struct Auth {
    secret: Option<Vec<u8>>,
    tokens: Vec<StaticToken>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("tokens", &self.tokens)
            .finish()
    }
}

type HmacSha256 = Hmac<Sha256>;

fn scope_of(role: Role, tenant: Option<Uuid>) -> Option<Scope> {
    match (role, tenant) {
        (Role::Admin, _) => Some(Scope::All),
        (Role::Member, Some(tenant)) => Some(Scope::Tenant(tenant)),
        (Role::Member, None) => None,
    }
}

impl Auth {
    /// An authenticator with an optional JWT secret and static tokens; refuses member tokens
    /// without a tenant and secrets shorter than 16 bytes, naming every problem at once.
    pub fn new(secret: Option<String>, tokens: Vec<StaticToken>) -> Result<Self, String> {
        let mut problems = Vec::new();
        if secret.as_ref().is_some_and(|s| s.len() < 16) {
            problems.push("the JWT secret must be at least 16 bytes".to_owned());
        }
        for token in &tokens {
            if scope_of(token.role, token.tenant_id).is_none() {
                problems.push(format!(
                    "token {} has no tenant_id and is not an admin token",
                    token.name
                ));
            }
            if token.token.len() < 16 {
                problems.push(format!(
                    "token {} is shorter than 16 characters",
                    token.name
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(Auth {
            secret: secret.map(String::into_bytes),
            tokens,
        })
    }

    fn mac(&self) -> Option<HmacSha256> {
        let secret = self.secret.as_ref()?;
        Some(HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length"))
    }

    /// Signs `claims` as an HS256 JWT (for development tokens and tests).
    pub fn issue(&self, claims: &Claims) -> Option<String> {
        let mut mac = self.mac()?;
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).ok()?);
        let signing_input = format!("{header}.{body}");
        mac.update(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        Some(format!("{signing_input}.{signature}"))
    }

    /// The caller behind `token` (without the `Bearer ` prefix), at `now` seconds.
    pub fn authenticate(&self, token: &str, now: i64) -> Result<Principal, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if let Some(found) = self
            .tokens
            .iter()
            .find(|t| constant_time_eq(&t.token, token))
        {
            return Ok(Principal {
                subject: found.name.clone(),
                scope: scope_of(found.role, found.tenant_id).ok_or(AuthError::Invalid)?,
                expires: None,
            });
        }
        self.verify_jwt(token, now)
    }

    fn verify_jwt(&self, token: &str, now: i64) -> Result<Principal, AuthError> {
        let mut parts = token.split('.');
        let (Some(header), Some(body), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Invalid);
        };
        let mut mac = self.mac().ok_or(AuthError::Invalid)?;
        let header_json = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| AuthError::Invalid)?;
        let header: serde_json::Value =
            serde_json::from_slice(&header_json).map_err(|_| AuthError::Invalid)?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            return Err(AuthError::Invalid);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| AuthError::Invalid)?;
        mac.update(header_part(token).as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| AuthError::Invalid)?;
        let body = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| AuthError::Invalid)?;
        let claims: Claims = serde_json::from_slice(&body).map_err(|_| AuthError::Invalid)?;
        if claims.exp <= now {
            return Err(AuthError::Expired);
        }
        let tenant = match &claims.tenant_id {
            Some(tenant) if claims.role == Role::Member => {
                Some(Uuid::try_parse(tenant).map_err(|_| AuthError::Invalid)?)
            }
            _ => None,
        };
        Ok(Principal {
            subject: claims.user_id,
            scope: scope_of(claims.role, tenant).ok_or(AuthError::Invalid)?,
            expires: Some(claims.exp),
        })
    }
}

/// The signed part of a JWT: everything before the last dot.
fn header_part(token: &str) -> &str {
    token.rsplit_once('.').map_or(token, |(signed, _)| signed)
}

/// Compares secrets without stopping at the first difference.
fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The token of an `Authorization` value: the `Bearer` scheme, in any case (RFC 7235 makes
/// schemes case-insensitive), then the token.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
        .filter(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_in_any_case() {
        for value in ["Bearer abc", "bearer abc", "BEARER abc", "Bearer   abc"] {
            assert_eq!(bearer(value), Some("abc"), "{value}");
        }
        for value in ["Basic abc", "Bearer", "Bearer ", "Bearerabc", "abc"] {
            assert_eq!(bearer(value), None, "{value}");
        }
    }

    const NOW: i64 = 1_800_000_000;

    fn tenant() -> Uuid {
        Uuid::parse_str("5eed517e-ba5e-da7a-517e-ba5eda7a0001").unwrap()
    }

    #[test]
    fn tampered_wrong_key_and_wrong_algorithm_tokens_are_refused() {
        let auth = Auth::new(Some("one-one-one-one-one".into()), vec![]).unwrap();
        let other = Auth::new(Some("two-two-two-two-two".into()), vec![]).unwrap();
        let token = auth
            .issue(&Claims::member("u", tenant(), NOW + 60))
            .unwrap();
        assert!(auth.authenticate(&token, NOW).is_ok());
        assert_eq!(other.authenticate(&token, NOW), Err(AuthError::Invalid));
        // Swap the body for an admin one, keeping the signature.
        let admin_body =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&Claims::admin("u", NOW + 60)).unwrap());
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!("{}.{admin_body}.{}", parts[0], parts[2]);
        assert_eq!(auth.authenticate(&forged, NOW), Err(AuthError::Invalid));
        // alg "none" is never accepted.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            admin_body
        );
        assert_eq!(auth.authenticate(&none, NOW), Err(AuthError::Invalid));
        for junk in ["", "a.b", "a.b.c.d", "not a token", "...."] {
            assert!(auth.authenticate(junk, NOW).is_err(), "{junk}");
        }
        assert_eq!(auth.authenticate("  ", NOW), Err(AuthError::Missing));
    }

    /// A token signed over `body` as it is (any claims, any JSON).
    fn signed(auth: &Auth, body: &serde_json::Value) -> String {
        let mut mac = auth.mac().unwrap();
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(body).unwrap());
        mac.update(format!("{header}.{body}").as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{header}.{body}.{signature}")
    }

    #[test]
    fn an_expiry_with_a_fraction_of_a_second_is_read_rounded_down() {
        let auth = Auth::new(Some("f-f-f-f-f-f-f-f-f".into()), vec![]).unwrap();
        let body = |exp: serde_json::Value| serde_json::json!({"user_id": "u", "tenant_id": tenant().to_string(), "exp": exp});
        let token = signed(&auth, &body(serde_json::json!(NOW as f64 + 10.5)));
        let who = auth.authenticate(&token, NOW).unwrap();
        assert_eq!(who.expires, Some(NOW + 10));
        assert_eq!(auth.authenticate(&token, NOW + 10), Err(AuthError::Expired));
        for bad in [
            serde_json::json!("soon"),
            serde_json::json!(1e300),
            serde_json::json!(null),
        ] {
            let token = signed(&auth, &body(bad.clone()));
            assert_eq!(
                auth.authenticate(&token, NOW),
                Err(AuthError::Invalid),
                "{bad}"
            );
        }
    }

    #[test]
    fn members_need_a_uuid_tenant_and_admins_see_all() {
        let auth = Auth::new(Some("k-k-k-k-k-k-k-k-k".into()), vec![]).unwrap();
        let mut claims = Claims::member("u", tenant(), NOW + 1);
        claims.tenant_id = Some("acme".into());
        let token = auth.issue(&claims).unwrap();
        assert_eq!(auth.authenticate(&token, NOW), Err(AuthError::Invalid));
        let admin = auth.issue(&Claims::admin("root", NOW + 1)).unwrap();
        let who = auth.authenticate(&admin, NOW).unwrap();
        assert_eq!(who.scope, Scope::All);
    }

    #[test]
    fn static_tokens_and_no_secret() {
        let auth = Auth::new(
            None,
            vec![StaticToken {
                name: "grafana".into(),
                token: "kt_0123456789abcdef".into(),
                tenant_id: Some(tenant()),
                role: Role::Member,
            }],
        )
        .unwrap();
        let who = auth.authenticate("kt_0123456789abcdef", NOW).unwrap();
        assert_eq!(
            (who.subject.as_str(), who.scope),
            ("grafana", Scope::Tenant(tenant()))
        );
        assert_eq!(
            auth.authenticate("kt_0123456789abcde", NOW),
            Err(AuthError::Invalid)
        );
        assert!(
            auth.issue(&Claims::admin("x", NOW)).is_none(),
            "no secret, no JWTs"
        );
        assert!(
            !format!("{auth:?}").contains("kt_0123456789"),
            "secrets stay out of Debug"
        );
    }

    #[test]
    fn configuration_mistakes_are_all_reported() {
        let bad = StaticToken {
            name: "orphan".into(),
            token: "short".into(),
            tenant_id: None,
            role: Role::Member,
        };
        let error = Auth::new(Some("tiny".into()), vec![bad]).unwrap_err();
        assert_eq!(
            error,
            "the JWT secret must be at least 16 bytes; token orphan has no tenant_id and is not an admin token; token orphan is shorter than 16 characters"
        );
    }
}
