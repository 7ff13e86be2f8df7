//! The signed snapshot manifest: what a snapshot is, how it was cut into chunks, and the
//! hash of every chunk, signed with the live host's failoverd key.
//!
//! # Wire form
//!
//! An envelope, one JSON object:
//! `{"manifest":"<body>","signature":"<hex>"}` where `body` is the manifest's JSON text
//! and `signature` the Ed25519 signature of `"failoverd manifest v1\n" ‖ body`. The body:
//!
//! ```text
//! {"version":2,"generation":7,"conode":"<hex>","signer":"<hex>",
//!  "positions":[{"chain":"<hex>","index":41,"hash":"<hex>"}],
//!  "taken_unix_ms":…,"created_unix_ms":…,"bytes":N,
//!  "chunking":{"size":16384},
//!  "chunks":"<hex of (len u32 little-endian ‖ BLAKE3 32 bytes) per chunk>",
//!  "file":"snapshot.db" | null, "transport":"https"|"rsync"|"scp"}
//! ```
//!
//! Chunk offsets are implied (each chunk starts where the previous one ended) and the
//! lengths must add up to `bytes`; a chunk is at most `size` bytes (version 1 had
//! content-defined chunks of 4–64 KiB and is refused by its version). `file` names the
//! file in the standby's inbox for the rsync and scp transports: a plain name, never a
//! path.

use conode::db::ChainPosition;
use serde::{Deserialize, Serialize};

use crate::chunk::{Chunk, Params};
use crate::config::Transport;
use crate::error::ManifestError;

const DOMAIN: &[u8] = b"failoverd manifest v1\n";
/// The body's version: 2 since chunks are fixed (the signing domain above is unchanged, so
/// a version 1 manifest is refused for its version, not as a bad signature).
const VERSION: u32 = 2;
/// Longest envelope accepted (a 64 GiB snapshot at 4 KiB chunks would be far larger; at
/// the default size a 1 GiB snapshot is about 5 MB).
pub const MAX_ENVELOPE: u64 = 256 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub generation: u64,
    /// The conode's identity: a snapshot of another conode is refused.
    pub conode: [u8; 32],
    /// The failoverd key that signed it.
    pub signer: [u8; 32],
    pub positions: Vec<ChainPosition>,
    pub taken_unix_ms: u64,
    pub created_unix_ms: u64,
    pub bytes: u64,
    pub params: Params,
    pub chunks: Vec<Chunk>,
    pub file: Option<String>,
    pub transport: Transport,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WirePosition {
    chain: String,
    index: u32,
    hash: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireBody {
    version: u32,
    generation: u64,
    conode: String,
    signer: String,
    positions: Vec<WirePosition>,
    taken_unix_ms: u64,
    created_unix_ms: u64,
    bytes: u64,
    chunking: Params,
    chunks: String,
    file: Option<String>,
    transport: Transport,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEnvelope {
    manifest: String,
    signature: String,
}

fn hex32(what: &str, s: &str) -> Result<[u8; 32], ManifestError> {
    conode::keys::parse_hex32(s).map_err(|e| ManifestError::Malformed(format!("{what}: {e}")))
}

/// A file name in the inbox: letters, digits, `.`, `_`, `-`; not starting with `.`; at
/// most 128 bytes. Anything else (`../x`, `/etc/passwd`, `a/b`) is refused.
pub fn check_file_name(name: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ManifestError::FileName(name.to_string()))
    }
}

impl Manifest {
    /// Hash of the chunk list, for telling two offers of the same generation apart.
    pub fn chunks_digest(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        for c in &self.chunks {
            h.update(&c.len.to_le_bytes());
            h.update(&c.hash);
        }
        *h.finalize().as_bytes()
    }

    fn body(&self) -> String {
        let mut chunks = Vec::with_capacity(self.chunks.len() * 36);
        for c in &self.chunks {
            chunks.extend_from_slice(&c.len.to_le_bytes());
            chunks.extend_from_slice(&c.hash);
        }
        let w = WireBody {
            version: VERSION,
            generation: self.generation,
            conode: hex::encode(self.conode),
            signer: hex::encode(self.signer),
            positions: self
                .positions
                .iter()
                .map(|p| WirePosition {
                    chain: hex::encode(p.chain),
                    index: p.index,
                    hash: hex::encode(p.hash),
                })
                .collect(),
            taken_unix_ms: self.taken_unix_ms,
            created_unix_ms: self.created_unix_ms,
            bytes: self.bytes,
            chunking: self.params,
            chunks: hex::encode(chunks),
            file: self.file.clone(),
            transport: self.transport,
        };
        serde_json::to_string(&w).expect("a manifest always serializes")
    }

    /// Sign with `key` (whose public half must be `self.signer`) into the envelope.
    pub fn seal(&self, key: &conode::keys::KeyPair) -> Vec<u8> {
        let body = self.body();
        let mut msg = DOMAIN.to_vec();
        msg.extend_from_slice(body.as_bytes());
        let env = WireEnvelope {
            manifest: body,
            signature: hex::encode(key.sign(&msg)),
        };
        serde_json::to_vec(&env).expect("an envelope always serializes")
    }

    /// Check an envelope: signed by `pinned`, well formed, chunks adding up. Says what is
    /// wrong in words.
    pub fn open(envelope: &[u8], pinned: &[u8; 32]) -> Result<Manifest, ManifestError> {
        use ManifestError::Malformed;
        if envelope.len() as u64 > MAX_ENVELOPE {
            return Err(ManifestError::TooLarge {
                len: envelope.len() as u64,
                max: MAX_ENVELOPE,
            });
        }
        let env: WireEnvelope = serde_json::from_slice(envelope)
            .map_err(|e| Malformed(format!("envelope is malformed: {e}")))?;
        let sig = hex::decode(&env.signature)
            .map_err(|_| Malformed("signature is not hex".to_string()))?;
        let mut msg = DOMAIN.to_vec();
        msg.extend_from_slice(env.manifest.as_bytes());
        if !conode::keys::verify(pinned, &msg, &sig) {
            return Err(ManifestError::BadSignature { pinned: *pinned });
        }
        // The version first: another version's fields would read as malformed.
        #[derive(Deserialize)]
        struct WireVersion {
            version: u32,
        }
        let v: WireVersion = serde_json::from_str(&env.manifest)
            .map_err(|e| Malformed(format!("body is malformed: {e}")))?;
        if v.version != VERSION {
            return Err(ManifestError::Version {
                got: v.version,
                ours: VERSION,
            });
        }
        let w: WireBody = serde_json::from_str(&env.manifest)
            .map_err(|e| Malformed(format!("body is malformed: {e}")))?;
        let signer = hex32("signer", &w.signer)?;
        if &signer != pinned {
            return Err(ManifestError::WrongSigner);
        }
        w.chunking.check().map_err(Malformed)?;
        let raw =
            hex::decode(&w.chunks).map_err(|_| Malformed("chunks are not hex".to_string()))?;
        if raw.len() % 36 != 0 {
            return Err(Malformed("chunk list is cut short".into()));
        }
        let mut chunks = Vec::with_capacity(raw.len() / 36);
        let mut offset = 0u64;
        for (i, rec) in raw.chunks_exact(36).enumerate() {
            let len = u32::from_le_bytes(rec[..4].try_into().expect("4 bytes"));
            if len == 0 || len > w.chunking.size {
                return Err(Malformed(format!(
                    "chunk {i} is {len} bytes, outside 1..={}",
                    w.chunking.size
                )));
            }
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&rec[4..]);
            chunks.push(Chunk { offset, len, hash });
            offset += len as u64;
        }
        if offset != w.bytes {
            return Err(Malformed(format!(
                "chunks add up to {offset} bytes but the snapshot is {} bytes",
                w.bytes
            )));
        }
        if let Some(f) = &w.file {
            check_file_name(f)?;
        }
        let positions = w
            .positions
            .into_iter()
            .map(|p| {
                Ok(ChainPosition {
                    chain: hex32("position chain", &p.chain)?,
                    index: p.index,
                    hash: hex32("position hash", &p.hash)?,
                })
            })
            .collect::<Result<Vec<_>, ManifestError>>()?;
        Ok(Manifest {
            generation: w.generation,
            conode: hex32("conode", &w.conode)?,
            signer,
            positions,
            taken_unix_ms: w.taken_unix_ms,
            created_unix_ms: w.created_unix_ms,
            bytes: w.bytes,
            params: w.chunking,
            chunks,
            file: w.file,
            transport: w.transport,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use conode::keys::KeyPair;

    pub fn sample(key: &KeyPair, data: &[u8], generation: u64) -> Manifest {
        let params = Params::DEFAULT;
        Manifest {
            generation,
            conode: [9; 32],
            signer: key.public_bytes(),
            positions: vec![ChainPosition {
                chain: [1; 32],
                index: 4,
                hash: [2; 32],
            }],
            taken_unix_ms: 1,
            created_unix_ms: 2,
            bytes: data.len() as u64,
            params,
            chunks: crate::chunk::chunk_slice(data, &params),
            file: None,
            transport: Transport::Https,
        }
    }

    #[test]
    fn seal_open_round_trip() {
        let k = KeyPair::generate().unwrap();
        let data = vec![7u8; 200_000];
        let m = sample(&k, &data, 3);
        let env = m.seal(&k);
        assert_eq!(Manifest::open(&env, &k.public_bytes()).unwrap(), m);
    }

    #[test]
    fn another_key_or_an_altered_body_is_refused() {
        let k = KeyPair::generate().unwrap();
        let other = KeyPair::generate().unwrap();
        let m = sample(&other, &[1u8; 5000], 3);
        let e = Manifest::open(&m.seal(&other), &k.public_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does not verify with the pinned peer key"),
            "{e}"
        );

        let env = String::from_utf8(sample(&k, &[1u8; 5000], 3).seal(&k)).unwrap();
        let altered = env.replace("\\\"generation\\\":3", "\\\"generation\\\":4");
        assert_ne!(env, altered);
        let e = Manifest::open(altered.as_bytes(), &k.public_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not verify"), "{e}");
        let e = Manifest::open(b"{\"manifest\":", &k.public_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("malformed"), "{e}");
    }

    #[test]
    fn file_names_outside_the_inbox_are_refused() {
        let k = KeyPair::generate().unwrap();
        for bad in ["../x.db", "/etc/passwd", "a/b", ".hidden", "", "x\0y"] {
            let mut m = sample(&k, &[1u8; 100], 1);
            m.file = Some(bad.into());
            let e = Manifest::open(&m.seal(&k), &k.public_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains("only a plain file name"), "{bad}: {e}");
        }
        let mut m = sample(&k, &[1u8; 100], 1);
        m.file = Some("snapshot.db".into());
        assert!(Manifest::open(&m.seal(&k), &k.public_bytes()).is_ok());
    }

    #[test]
    fn a_version_1_manifest_is_refused_by_its_version() {
        let k = KeyPair::generate().unwrap();
        let body =
            r#"{"version":1,"generation":1,"chunking":{"min":4096,"avg":16384,"max":65536}}"#;
        let mut msg = DOMAIN.to_vec();
        msg.extend_from_slice(body.as_bytes());
        let env = serde_json::to_vec(&WireEnvelope {
            manifest: body.into(),
            signature: hex::encode(k.sign(&msg)),
        })
        .unwrap();
        let e = Manifest::open(&env, &k.public_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("version 1 is not supported"), "{e}");
    }

    #[test]
    fn chunks_must_add_up() {
        let k = KeyPair::generate().unwrap();
        let mut m = sample(&k, &[1u8; 100_000], 1);
        m.bytes += 1;
        let e = Manifest::open(&m.seal(&k), &k.public_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("add up"), "{e}");
    }
}
