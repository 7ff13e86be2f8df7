//! Helpers shared by conode's integration tests: in-process servers on free loopback ports.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;

use conode::config::{Address, PrivateConfig, Scheme};
use conode::keys::KeyPair;
use conode::server::Server;

/// A port `p` with `p` and `p+1` free on 127.0.0.1 a moment ago.
pub fn free_port_pair() -> u16 {
    free_port_pair_on("127.0.0.1")
}

/// A port `p` with `p` and `p+1` free on loopback address `host` a moment ago.
pub fn free_port_pair_on(host: &str) -> u16 {
    for _ in 0..200 {
        let a = TcpListener::bind((host, 0)).expect("bind loopback");
        let p = a.local_addr().unwrap().port();
        if p < 65000 && TcpListener::bind((host, p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free pair of adjacent ports on {host}");
}

pub struct TestNode {
    pub cfg: PrivateConfig,
    pub dir: tempfile::TempDir,
}

impl TestNode {
    pub fn new(desc: &str) -> TestNode {
        Self::with_host(desc, "127.0.0.1")
    }

    pub fn with_host(desc: &str, host: &str) -> TestNode {
        // Test hosts are loopback IPs or `localhost`; ports are checked where they bind.
        let bind_host = if host.parse::<std::net::IpAddr>().is_ok() {
            host
        } else {
            "127.0.0.1"
        };
        let port = free_port_pair_on(bind_host);
        let keys = KeyPair::generate().unwrap();
        let address = Address {
            scheme: Scheme::Tls,
            host: host.into(),
            port,
        };
        let mut cfg = PrivateConfig::new(keys, address, desc.into());
        cfg.listen_address = "127.0.0.1".into();
        TestNode {
            cfg,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.db", self.cfg.keys.public_hex()))
    }

    pub async fn start(&self) -> Server {
        Server::start(self.cfg.clone(), self.db_path())
            .await
            .expect("server starts")
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.cfg.address.port + 1)
    }
}
