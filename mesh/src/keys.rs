//! WireGuard keys: Curve25519, written as standard base64 the way `wg genkey` and `wg pubkey`
//! write them. A node makes its private key itself and never sends it anywhere.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use x25519_dalek::{PublicKey, StaticSecret};

use crate::files::load_or_make;
use crate::token::random_bytes;

/// A WireGuard private key.
pub struct WireguardKey {
    secret: StaticSecret,
}

impl fmt::Debug for WireguardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireguardKey")
            .field("public", &self.public_base64())
            .finish_non_exhaustive()
    }
}

impl WireguardKey {
    /// A new random key.
    pub fn generate() -> Self {
        WireguardKey {
            secret: StaticSecret::from(random_bytes()),
        }
    }

    /// The key written as `text` (base64 of 32 bytes).
    pub fn from_base64(text: &str) -> Option<Self> {
        let bytes: [u8; 32] = STANDARD.decode(text.trim()).ok()?.try_into().ok()?;
        Some(WireguardKey {
            secret: StaticSecret::from(bytes),
        })
    }

    /// The key kept in `path`, made and written there (mode 0600) if the file does not exist.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        load_or_make(
            path,
            "a WireGuard private key (base64)",
            Self::from_base64,
            || {
                let key = Self::generate();
                let text = format!("{}\n", key.private_base64());
                (key, text)
            },
        )
    }

    /// The private key as base64 (for the key file only).
    pub fn private_base64(&self) -> String {
        STANDARD.encode(self.secret.to_bytes())
    }

    /// The public key as base64.
    pub fn public_base64(&self) -> String {
        STANDARD.encode(PublicKey::from(&self.secret).as_bytes())
    }

    /// The secret, for the tunnel.
    pub fn secret(&self) -> &StaticSecret {
        &self.secret
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_wireguard_tools() {
        // RFC 7748 section 6.1: Alice's private key and the public key it gives.
        let private = [
            0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2,
            0x66, 0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5,
            0x1d, 0xb9, 0x2c, 0x2a,
        ];
        let public = [
            0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e,
            0xf7, 0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e,
            0xaa, 0x9b, 0x4e, 0x6a,
        ];
        let key = WireguardKey::from_base64(&STANDARD.encode(private)).unwrap();
        assert_eq!(key.public_base64(), STANDARD.encode(public));
        assert!(WireguardKey::from_base64("too short").is_none());
    }

    #[test]
    fn the_key_file_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wireguard.key");
        let made = WireguardKey::load_or_create(&path).unwrap();
        let read = WireguardKey::load_or_create(&path).unwrap();
        assert_eq!(made.public_base64(), read.public_base64());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
