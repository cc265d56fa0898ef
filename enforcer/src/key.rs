//! API keys and their hashes.
//!
//! A raw API key lives only in the request being decided. Everything that is stored, logged or
//! exported uses [`KeyHash`], the SHA-256 of the key: Redis key names, audit rows, log fields.
//! [`ApiKey`]'s `Debug` is redacted so a stray `{:?}` cannot leak it either.
use sha2::{Digest, Sha256};
use std::fmt;

/// Longest API key accepted (bytes). Longer values are bad input, not keys.
pub const MAX_KEY_LEN: usize = 1024;
/// Longest request id accepted (bytes).
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Why a key or request id was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// The key is empty.
    #[error("api key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`].
    #[error("api key is longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    /// The key contains control characters or whitespace.
    #[error("api key contains whitespace or control characters")]
    BadCharacters,
    /// The request id is empty, too long or not printable ASCII without spaces.
    #[error("request_id must be 1-{MAX_REQUEST_ID_LEN} printable ASCII characters without spaces")]
    BadRequestId,
}

/// A raw API key as presented by a client. Never stored, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Validates a raw key.
    pub fn parse(raw: &str) -> Result<Self, KeyError> {
        if raw.is_empty() {
            return Err(KeyError::Empty);
        }
        if raw.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong);
        }
        if raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(KeyError::BadCharacters);
        }
        Ok(Self(raw.to_owned()))
    }

    /// The 64-bit id the kernel gate computes from the key header (FNV-1a, shared with the
    /// kernel through `enforcer-common`). It never leaves the node.
    pub fn kernel_id(&self) -> u64 {
        enforcer_common::key_id(self.0.as_bytes())
    }

    /// The raw key, for the one place it is sent on: the CLI to the daemon, over the admin
    /// socket ([`crate::cli::admin`]). Never log or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The key's SHA-256, the only form of it that leaves the request.
    pub fn hash(&self) -> KeyHash {
        KeyHash(Sha256::digest(self.0.as_bytes()).into())
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// SHA-256 of an API key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Parses 64 hex digits (either case); `None` for anything else.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }

    /// Lower-case hex, as used in Redis key names and audit rows.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A caller's idempotency token for one request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    /// Validates a caller-supplied request id.
    pub fn parse(raw: &str) -> Result<Self, KeyError> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_REQUEST_ID_LEN
            && raw.bytes().all(|b| b.is_ascii_graphic());
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(KeyError::BadRequestId)
        }
    }

    /// A fresh random id, for requests that came without one.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_hex() {
        let key = ApiKey::parse("abc").expect("valid key");
        assert_eq!(
            key.hash().to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = ApiKey::parse("super-secret-key").expect("valid key");
        assert!(!format!("{key:?}").contains("super-secret"));
    }

    #[test]
    fn bad_keys_and_ids_are_refused() {
        assert_eq!(ApiKey::parse(""), Err(KeyError::Empty));
        assert_eq!(ApiKey::parse("a b"), Err(KeyError::BadCharacters));
        assert_eq!(ApiKey::parse(&"k".repeat(2000)), Err(KeyError::TooLong));
        assert!(RequestId::parse("ok-123").is_ok());
        assert!(RequestId::parse("has space").is_err());
        assert!(RequestId::parse(&"r".repeat(129)).is_err());
    }
}
