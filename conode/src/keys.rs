//! The conode's Ed25519 identity, in the Go conode's key format.
//!
//! The Go conode stores `Private` as a 32-byte **little-endian scalar** (kyber's
//! marshalling), not as an RFC 8032 seed, and `Public` as the compressed point
//! `Private · B`. We keep exactly that format so a `private.toml` moves between the
//! two implementations unchanged.
//!
//! Signatures are standard Ed25519 (verifiable by any Ed25519 verifier). Because a raw
//! scalar has no RFC 8032 seed, the nonce prefix is derived deterministically from the
//! scalar with SHA-512 under a domain separator. This module must never sign with a
//! verifying key other than the one computed from its own scalar (that would leak the
//! key; see `ed25519_dalek::hazmat`).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use curve25519_dalek::constants::ED25519_BASEPOINT_TABLE;
use curve25519_dalek::Scalar;
use ed25519_dalek::hazmat::{raw_sign, ExpandedSecretKey};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use sha2::{Digest, Sha512};

/// Problems with key material read from a file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The hex string is not 64 hex digits.
    #[error("expected 64 hex digits (32 bytes), got {0}")]
    BadHex(String),
    /// The scalar is not reduced modulo the group order (not a Go-written key).
    #[error("not a canonical Ed25519 scalar (not reduced modulo the group order)")]
    NonCanonicalScalar,
    /// The point does not decode.
    #[error("not a valid compressed Ed25519 point")]
    BadPoint,
    /// `Public` is not `Private · B`.
    #[error(
        "Public does not match Private (expected {expected}); the file was edited or mixed up"
    )]
    Mismatch { expected: String },
}

/// Parse 64 hex digits into 32 bytes.
pub fn parse_hex32(s: &str) -> Result<[u8; 32], KeyError> {
    let shown = if s.len() > 20 {
        format!("{} chars", s.len())
    } else {
        format!("{s:?}")
    };
    let v = hex::decode(s.trim()).map_err(|_| KeyError::BadHex(shown.clone()))?;
    v.try_into().map_err(|_| KeyError::BadHex(shown))
}

/// Parse a public key (compressed Ed25519 point) from hex.
pub fn parse_public(s: &str) -> Result<VerifyingKey, KeyError> {
    let b = parse_hex32(s)?;
    VerifyingKey::from_bytes(&b).map_err(|_| KeyError::BadPoint)
}

/// Decoded verifying keys kept at most (then the cache starts again empty).
const KEY_CACHE: usize = 4096;

/// `public` decoded, from a process-wide cache: decoding a point (a square root) costs
/// about a tenth of a verification, and a conode verifies the same few roster keys over
/// and over. Only keys that decode are kept.
fn verifying_key(public: &[u8; 32]) -> Option<VerifyingKey> {
    static CACHE: OnceLock<Mutex<HashMap<[u8; 32], VerifyingKey>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(vk) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(public) {
        return Some(*vk);
    }
    let vk = VerifyingKey::from_bytes(public).ok()?;
    let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
    if c.len() >= KEY_CACHE {
        c.clear();
    }
    c.insert(*public, vk);
    Some(vk)
}

/// Verify an Ed25519 signature by `public` over `msg`.
pub fn verify(public: &[u8; 32], msg: &[u8], sig: &[u8]) -> bool {
    let Some(vk) = verifying_key(public) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(sig) else {
        return false;
    };
    vk.verify(msg, &sig).is_ok()
}

/// A conode's key pair.
#[derive(Clone)]
pub struct KeyPair {
    scalar: Scalar,
    hash_prefix: [u8; 32],
    public: VerifyingKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair(public={})", self.public_hex())
    }
}

impl KeyPair {
    /// A fresh key pair from the operating system's randomness.
    pub fn generate() -> std::io::Result<KeyPair> {
        let mut wide = [0u8; 64];
        getrandom::getrandom(&mut wide).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self::from_scalar(Scalar::from_bytes_mod_order_wide(&wide)))
    }

    /// From the Go format: `Private` hex (little-endian scalar), checked against `Public`.
    pub fn from_go_hex(private: &str, public: &str) -> Result<KeyPair, KeyError> {
        let b = parse_hex32(private)?;
        let scalar = Option::<Scalar>::from(Scalar::from_canonical_bytes(b))
            .ok_or(KeyError::NonCanonicalScalar)?;
        let kp = Self::from_scalar(scalar);
        let claimed = parse_hex32(public)?;
        if claimed != kp.public_bytes() {
            return Err(KeyError::Mismatch {
                expected: kp.public_hex(),
            });
        }
        Ok(kp)
    }

    fn from_scalar(scalar: Scalar) -> KeyPair {
        let point = (ED25519_BASEPOINT_TABLE * &scalar).compress();
        // The point is computed from the scalar, so it always decodes.
        let public = VerifyingKey::from_bytes(point.as_bytes())
            .expect("a point computed from a scalar decodes");
        let mut h = Sha512::new();
        h.update(b"conode ed25519 nonce prefix v1");
        h.update(scalar.as_bytes());
        let digest = h.finalize();
        let mut hash_prefix = [0u8; 32];
        hash_prefix.copy_from_slice(&digest[..32]);
        KeyPair {
            scalar,
            hash_prefix,
            public,
        }
    }

    /// Sign `msg` (standard Ed25519 signature, 64 bytes).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let esk = ExpandedSecretKey {
            scalar: self.scalar,
            hash_prefix: self.hash_prefix,
        };
        raw_sign::<Sha512>(&esk, msg, &self.public).to_bytes()
    }

    pub fn public_bytes(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.public_bytes())
    }

    /// `Private` as the Go conode writes it.
    pub fn private_hex(&self) -> String {
        hex::encode(self.scalar.as_bytes())
    }
}

/// UUIDv5 in the URL namespace, as Go's `uuid.NewV5(uuid.NamespaceURL, name)`.
pub fn uuid_v5_url(name: &str) -> [u8; 16] {
    use sha1::{Digest as _, Sha1};
    const NAMESPACE_URL: [u8; 16] = [
        0x6b, 0xa7, 0xb8, 0x11, 0x9d, 0xad, 0x11, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4, 0x30,
        0xc8,
    ];
    let mut h = Sha1::new();
    h.update(NAMESPACE_URL);
    h.update(name.as_bytes());
    let d = h.finalize();
    let mut u = [0u8; 16];
    u.copy_from_slice(&d[..16]);
    u[6] = (u[6] & 0x0f) | 0x50;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// The `ServerIdentity.ID` of a conode: UUIDv5(URL, "https://dedis.epfl.ch/id/" + hex(public)).
pub fn server_identity_id(public: &[u8; 32]) -> [u8; 16] {
    uuid_v5_url(&format!("https://dedis.epfl.ch/id/{}", hex::encode(public)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_id_matches_go_vector() {
        // From the Go conode: key 67e30e16…0d gives 17960e5b-9823-50f3-8941-46ac4b79a8fb.
        let pk = parse_hex32("67e30e168f83c4d4614e277cefba42dbc1fb5886b3945364ea5dae3f4e4fbc0d")
            .unwrap();
        assert_eq!(
            hex::encode(server_identity_id(&pk)),
            "17960e5b982350f3894146ac4b79a8fb"
        );
    }

    #[test]
    fn go_hex_round_trips_and_signatures_verify() {
        let kp = KeyPair::generate().unwrap();
        let again = KeyPair::from_go_hex(&kp.private_hex(), &kp.public_hex()).unwrap();
        assert_eq!(again.public_bytes(), kp.public_bytes());
        let sig = again.sign(b"hello");
        assert!(verify(&kp.public_bytes(), b"hello", &sig));
        assert!(!verify(&kp.public_bytes(), b"hellO", &sig));
    }

    #[test]
    fn scalar_one_gives_the_base_point() {
        // Little-endian scalar 1 → the Ed25519 base point, 5866…66.
        let mut one = [0u8; 32];
        one[0] = 1;
        let kp = KeyPair::from_go_hex(
            &hex::encode(one),
            "5866666666666666666666666666666666666666666666666666666666666666",
        )
        .unwrap();
        assert!(verify(&kp.public_bytes(), b"m", &kp.sign(b"m")));
    }

    #[test]
    fn mismatched_public_is_refused() {
        let a = KeyPair::generate().unwrap();
        let b = KeyPair::generate().unwrap();
        let err = KeyPair::from_go_hex(&a.private_hex(), &b.public_hex()).unwrap_err();
        assert!(matches!(err, KeyError::Mismatch { .. }));
    }

    #[test]
    fn non_canonical_scalar_is_refused() {
        let err = KeyPair::from_go_hex(&"ff".repeat(32), &"00".repeat(32)).unwrap_err();
        assert_eq!(err, KeyError::NonCanonicalScalar);
    }
}
