//! `failoverd`: runs beside the conode on each host of a live/standby pair.
//!
//! This release ships verified snapshots of the live conode's database to the standby
//! (design: `../shared/DESIGN.md` §3). The virtual IP, epochs and promotion come next.
//!
//! # Layout
//! - [`config`]: `failoverd.toml`, the key file, the template `setup` writes, field checks.
//! - [`chunk`]: fixed, page-aligned chunks and their BLAKE3 hashes.
//! - [`manifest`]: the signed snapshot manifest (wire form documented there).
//! - [`standby`]: receive, verify, install atomically, keep N generations.
//! - [`direct`]: the live host's mirror written with `O_DIRECT`, beside the take.
//! - [`live`]: take a snapshot through the conode's admin socket and ship it.
//! - [`peer`]: the HTTPS peer port, pinned to the peer's key (API documented there).
//! - [`http`]: the minimal HTTP/1.1 used by the peer port and `/metrics`.
//! - [`state`]: status and Prometheus metrics.
//! - [`daemon`]: `failoverd run` and its control socket.
//! - [`cli`]: `setup`, `check`, `status`, `snapshot`.

pub mod chunk;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod direct;
pub mod http;
pub mod live;
pub mod manifest;
pub mod peer;
pub mod standby;
pub mod state;
