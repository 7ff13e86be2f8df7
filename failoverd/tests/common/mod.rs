//! Helpers shared by the failoverd crate's integration tests: a live conode database
//! that grows, its snapshots, and their manifests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use conode::db::{ChainPosition, Db, SKIPCHAIN_BLOCKS, SKIPCHAIN_CHAINS};
use conode::keys::KeyPair;
use failoverd::chunk::{self, Params};
use failoverd::config::Transport;
use failoverd::manifest::Manifest;

pub struct Live {
    pub db: Db,
    pub public: [u8; 32],
    pub dir: PathBuf,
    n: u32,
}

impl Live {
    pub fn new(dir: &Path) -> Live {
        let public = KeyPair::generate().unwrap().public_bytes();
        let db = Db::open(&dir.join("live.db"), &public).unwrap();
        Live {
            db,
            public,
            dir: dir.to_path_buf(),
            n: 0,
        }
    }

    /// Append `blocks` blocks of `size` pseudo-random bytes to chain [7; 32].
    pub fn append(&mut self, blocks: u32, size: usize) {
        let w = self.db.db().begin_write().unwrap();
        {
            let mut b = w.open_table(SKIPCHAIN_BLOCKS).unwrap();
            for _ in 0..blocks {
                self.n += 1;
                let key = blake3::hash(&self.n.to_le_bytes());
                let mut v = Vec::with_capacity(size);
                let mut h = blake3::Hasher::new();
                h.update(key.as_bytes());
                let mut r = h.finalize_xof();
                v.resize(size, 0);
                r.fill(&mut v);
                b.insert(&key.as_bytes()[..], &v[..]).unwrap();
            }
            let mut c = w.open_table(SKIPCHAIN_CHAINS).unwrap();
            let pos = conode::db::encode_position(self.n, &[self.n as u8; 32]);
            c.insert(&[7u8; 32][..], &pos[..]).unwrap();
        }
        w.commit().unwrap();
    }

    pub fn snapshot(&self, name: &str) -> (PathBuf, Vec<ChainPosition>) {
        let p = self.dir.join(name);
        let _ = std::fs::remove_file(&p);
        let info = self.db.snapshot_to(&p).unwrap();
        (p, info.positions)
    }
}

pub fn manifest(
    key: &KeyPair,
    conode: [u8; 32],
    generation: u64,
    file: &Path,
    positions: Vec<ChainPosition>,
) -> Manifest {
    let data = std::fs::read(file).unwrap();
    Manifest {
        generation,
        conode,
        signer: key.public_bytes(),
        positions,
        taken_unix_ms: 1,
        created_unix_ms: 2,
        bytes: data.len() as u64,
        params: Params::DEFAULT,
        chunks: chunk::chunk_slice(&data, &Params::DEFAULT),
        file: None,
        transport: Transport::Https,
    }
}
