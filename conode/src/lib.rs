//! A conode (cothority server) operated like the Go one, storing its data in redb.
//!
//! # Layout
//! Bottom-up, one concern per module:
//! - [`keys`]: the Ed25519 identity in the Go format (raw little-endian scalar).
//! - [`config`]: `private.toml`, `public.toml`/rosters, default paths; errors name
//!   file, line and key.
//! - [`proto`]: client wire messages (Status), field numbers as the Go conode.
//! - [`ws`]: the client WebSocket port (`/ok`, `/<Service>/<Method>`, close codes).
//! - [`tls`]: built-in TLS for clients, with certificate renewal without restart.
//! - [`peer`]: the conode-to-conode port: TLS pinned to roster keys, length-prefixed
//!   frames.
//! - [`db`]: the redb file, its figures, and consistent snapshots of it.
//! - [`dirty`]: the pages written since each recent page image (its storage backend).
//! - [`admin`]: the local admin socket (owner-only Unix socket): snapshot streams for
//!   `conode backup` and `failoverd`; its protocol is documented there.
//! - [`backup`]: `conode backup` and `conode restore`.
//! - [`status`]: the Status service.
//! - [`metrics`]: Prometheus metrics and their `GET /metrics` endpoint (off by default).
//! - [`server`]: wiring, start and graceful stop.
//! - [`client`]: the client side of the WebSocket protocol (`conode check`).
//! - [`chain_cli`]: `conode chain`, the operator's skipchain client (create, add, get,
//!   update; text or JSON).
//! - [`setup`]: `conode setup`.
//! - [`clidoc`]: the man pages (one per command) and shell completions of both programs.
//! - [`sd_notify`]: the systemd notify protocol (READY, STOPPING, watchdog).
//!
//! The binary (`main.rs`) only parses the command line and calls these.

pub mod admin;
pub mod backup;
pub mod chain_cli;
pub mod clidoc;
pub mod client;
pub mod config;
pub mod db;
pub mod dirty;
pub mod gate;
pub mod keys;
pub mod metrics;
pub mod peer;
pub mod proto;
pub mod sd_notify;
pub mod server;
pub mod setup;
pub mod skipchain;
pub mod status;
pub mod tls;
pub mod ws;
