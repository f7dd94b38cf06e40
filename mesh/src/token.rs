//! Join tokens: compact JWTs signed with Ed25519 (`alg` `EdDSA`, a key id in `kid`).
//!
//! A token says which cluster (and tenant, for a tenant's dedicated node) the bearer may join,
//! until when, and how to reach the bootstrap peer (its WireGuard public key and endpoint), so a
//! fresh node needs nothing but the token. The control plane stores only a hash of the token id
//! (`jti`); the signature makes the claims tamper-proof, the registry makes the token single-use
//! and revocable (see [`crate::registry`]).

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::files::load_or_make;

/// The audience join tokens are issued for; a token for anything else is refused.
pub const AUDIENCE: &str = "keel-mesh-join";

/// Seconds of clock difference tolerated on `nbf` and `exp`.
pub const LEEWAY_S: i64 = 30;

/// How to reach the peer a joining node talks to first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrap {
    /// Its WireGuard public key, standard base64 as `wg` prints it.
    pub public_key: String,
    /// Its UDP endpoint, `host:port`.
    pub endpoint: String,
    /// The control plane's URL, where the node redeems the token.
    pub control: String,
}

/// What a join token says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinClaims {
    /// The audience, [`AUDIENCE`].
    pub aud: String,
    /// The token id; the registry keeps only its hash.
    pub jti: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Not valid before, Unix seconds.
    pub nbf: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
    /// The cluster the node joins.
    pub cluster: String,
    /// The tenant whose dedicated node this is; none for a shared platform node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// How many nodes may join with it (1 unless issued as reusable).
    pub uses: u32,
    /// The bootstrap peer.
    pub bootstrap: Bootstrap,
}

/// Why a token was refused before the registry was asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not three base64url parts of JSON.
    #[error("not a join token: {0}")]
    Malformed(&'static str),
    /// Signed with something other than EdDSA (including `none`).
    #[error("join tokens are signed with EdDSA, not {0:?}")]
    Algorithm(String),
    /// Signed by a key this control plane does not have.
    #[error("join token signed by unknown key {0:?}")]
    UnknownKey(String),
    /// The signature does not match the contents: the token was altered or forged.
    #[error("join token signature does not match: the token was altered")]
    Signature,
    /// Issued for another audience.
    #[error("join token is for {found:?}, not {expected:?}")]
    Audience {
        /// What this verifier accepts.
        expected: String,
        /// What the token says.
        found: String,
    },
    /// Used before its `nbf`.
    #[error("join token is not valid until {nbf} (Unix seconds)")]
    NotYetValid {
        /// Its not-before time.
        nbf: i64,
    },
    /// Used after its `exp`.
    #[error("join token expired at {exp} (Unix seconds)")]
    Expired {
        /// Its expiry.
        exp: i64,
    },
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default)]
    kid: String,
}

/// The control plane's signing key.
pub struct TokenKey {
    signing: SigningKey,
    kid: String,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// The key id of a public key: the first eight bytes of its SHA-256, hex.
fn key_id(key: &VerifyingKey) -> String {
    hex(&Sha256::digest(key.as_bytes())[..8])
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// 32 bytes from the operating system's random source.
pub(crate) fn random_bytes() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system has no random source");
    bytes
}

impl TokenKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self::from_seed(random_bytes())
    }

    /// The key with this 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(&seed);
        let kid = key_id(&signing.verifying_key());
        TokenKey { signing, kid }
    }

    /// The key kept in `path` (64 hex digits), made and written there (mode 0600) if the file
    /// does not exist yet.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        load_or_make(
            path,
            "a mesh signing key (64 hex digits)",
            |text| {
                let seed: [u8; 32] = unhex(text)?.try_into().ok()?;
                Some(Self::from_seed(seed))
            },
            || {
                let key = Self::generate();
                let text = hex(key.signing.as_bytes());
                (key, text)
            },
        )
    }

    /// The key id tokens carry in `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A verifier that accepts this key's tokens.
    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier {
            keys: vec![(self.kid.clone(), self.signing.verifying_key())],
            audience: AUDIENCE.to_owned(),
        }
    }

    /// The signed token for `claims`.
    pub fn sign(&self, claims: &JoinClaims) -> String {
        let header = Header {
            alg: "EdDSA".into(),
            typ: Some("JWT".into()),
            kid: self.kid.clone(),
        };
        let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("header"));
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims"));
        let signed = format!("{header}.{body}");
        let signature = self.signing.sign(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }
}

/// Checks join tokens' signatures, audience and validity window.
#[derive(Clone, Debug)]
pub struct TokenVerifier {
    keys: Vec<(String, VerifyingKey)>,
    audience: String,
}

impl TokenVerifier {
    /// This verifier, accepting only tokens for `audience` instead of [`AUDIENCE`].
    pub fn with_audience(mut self, audience: &str) -> Self {
        self.audience = audience.to_owned();
        self
    }

    /// This verifier, also accepting `key`'s tokens (a key being rotated out).
    pub fn with_key(mut self, key: &TokenKey) -> Self {
        self.keys
            .push((key.kid.clone(), key.signing.verifying_key()));
        self
    }

    /// The claims of `token` if it is genuine, for this audience and valid at `now` (Unix
    /// seconds). Single use and revocation are the registry's to check.
    pub fn verify(&self, token: &str, now: i64) -> Result<JoinClaims, TokenError> {
        let mut parts = token.trim().split('.');
        let (Some(header), Some(body), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed(
                "a token has three dot-separated parts",
            ));
        };
        let decode = |part: &str| URL_SAFE_NO_PAD.decode(part);
        let header: Header = decode(header)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(TokenError::Malformed("the header is not base64url JSON"))?;
        if header.alg != "EdDSA" {
            return Err(TokenError::Algorithm(header.alg));
        }
        let key = self
            .keys
            .iter()
            .find(|(kid, _)| *kid == header.kid)
            .map(|(_, key)| key)
            .ok_or_else(|| TokenError::UnknownKey(header.kid.clone()))?;
        let signature = decode(signature)
            .ok()
            .and_then(|bytes| Signature::from_slice(&bytes).ok())
            .ok_or(TokenError::Malformed(
                "the signature is not 64 base64url bytes",
            ))?;
        let signed = &token.trim()[..token.trim().rfind('.').expect("three parts")];
        key.verify(signed.as_bytes(), &signature)
            .map_err(|_| TokenError::Signature)?;
        let claims: JoinClaims = decode(body)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(TokenError::Malformed("the claims are not join-token JSON"))?;
        if claims.aud != self.audience {
            return Err(TokenError::Audience {
                expected: self.audience.clone(),
                found: claims.aud,
            });
        }
        if now + LEEWAY_S < claims.nbf {
            return Err(TokenError::NotYetValid { nbf: claims.nbf });
        }
        if now >= claims.exp + LEEWAY_S {
            return Err(TokenError::Expired { exp: claims.exp });
        }
        Ok(claims)
    }
}

/// What the registry stores for a token id: its SHA-256, hex.
pub fn token_hash(jti: &str) -> String {
    hex(&Sha256::digest(jti.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: i64) -> JoinClaims {
        JoinClaims {
            aud: AUDIENCE.into(),
            jti: "4b1c0a8e-9d7f-4c56-8f0e-1d2c3b4a5e6f".into(),
            iat: now,
            nbf: now,
            exp: now + 3600,
            cluster: "prod".into(),
            tenant: None,
            uses: 1,
            bootstrap: Bootstrap {
                public_key: "AAAA".into(),
                endpoint: "203.0.113.1:51820".into(),
                control: "http://203.0.113.1:18012".into(),
            },
        }
    }

    fn flip_claims(token: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let parts: Vec<&str> = token.split('.').collect();
        let mut body: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        edit(&mut body);
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&body).unwrap());
        format!("{}.{body}.{}", parts[0], parts[2])
    }

    #[test]
    fn a_signed_token_verifies_and_round_trips_its_claims() {
        let key = TokenKey::from_seed([7; 32]);
        let token = key.sign(&claims(1_000));
        assert_eq!(key.verifier().verify(&token, 1_000), Ok(claims(1_000)));
        let header: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header["alg"], "EdDSA");
        assert_eq!(header["kid"], key.kid());
        assert_eq!(key.kid().len(), 16);
    }

    #[test]
    fn tampered_forged_and_foreign_tokens_are_refused() {
        let key = TokenKey::from_seed([7; 32]);
        let verifier = key.verifier();
        let token = key.sign(&claims(1_000));
        // A changed claim breaks the signature.
        let widened = flip_claims(&token, |c| c["uses"] = 1000.into());
        assert_eq!(verifier.verify(&widened, 1_000), Err(TokenError::Signature));
        let moved = flip_claims(&token, |c| c["tenant"] = "someone-else".into());
        assert_eq!(verifier.verify(&moved, 1_000), Err(TokenError::Signature));
        // Another key with the same kid cannot sign for this one.
        let mut forged = TokenKey::from_seed([8; 32]);
        forged.kid = key.kid().to_owned();
        assert_eq!(
            verifier.verify(&forged.sign(&claims(1_000)), 1_000),
            Err(TokenError::Signature)
        );
        // A key the verifier does not know.
        let other = TokenKey::from_seed([9; 32]);
        assert_eq!(
            verifier.verify(&other.sign(&claims(1_000)), 1_000),
            Err(TokenError::UnknownKey(other.kid().to_owned()))
        );
        // alg none, and garbage.
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":""}"#);
        let mut parts = token.split('.');
        parts.next();
        let unsigned = format!("{none_header}.{}.", parts.next().unwrap());
        assert_eq!(
            verifier.verify(&unsigned, 1_000),
            Err(TokenError::Algorithm("none".into()))
        );
        assert!(matches!(
            verifier.verify("not.a-token", 1_000),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            verifier.verify("", 1_000),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn audience_and_validity_window_are_checked() {
        let key = TokenKey::from_seed([7; 32]);
        let token = key.sign(&claims(1_000));
        assert_eq!(
            key.verifier()
                .with_audience("keel-api")
                .verify(&token, 1_000),
            Err(TokenError::Audience {
                expected: "keel-api".into(),
                found: AUDIENCE.into()
            })
        );
        assert_eq!(
            key.verifier().verify(&token, 1_000 - LEEWAY_S - 1),
            Err(TokenError::NotYetValid { nbf: 1_000 })
        );
        assert!(key.verifier().verify(&token, 1_000 - LEEWAY_S).is_ok());
        assert!(key.verifier().verify(&token, 4_600 + LEEWAY_S - 1).is_ok());
        assert_eq!(
            key.verifier().verify(&token, 4_600 + LEEWAY_S),
            Err(TokenError::Expired { exp: 4_600 })
        );
    }

    #[test]
    fn the_key_file_is_made_once_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let made = TokenKey::load_or_create(&path).unwrap();
        let read = TokenKey::load_or_create(&path).unwrap();
        assert_eq!(made.kid(), read.kid());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "not hex").unwrap();
        let error = TokenKey::load_or_create(&path).unwrap_err();
        assert!(
            error.to_string().contains("not a mesh signing key"),
            "{error}"
        );
    }
}
