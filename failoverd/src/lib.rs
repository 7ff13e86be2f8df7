//! `failoverd`: runs beside the conode on each host of a live/standby pair.
//!
//! It ships verified snapshots of the live conode's database to the standby, and moves
//! the virtual IP and the conode between the hosts under epochs (design:
//! `../shared/DESIGN.md` §3); every decision is made by the `failoverd-core` crate beside
//! this one.
//!
//! # Layout
//! Modules depend only on those listed before them:
//! - [`config`]: `failoverd.toml` parsed and validated once into a [`config::Config`]
//!   (durations, addresses, keys), the key file, the template `setup` writes.
//! - [`error`]: one `#[non_exhaustive]` error enum per layer, and the metrics' causes.
//! - [`chunk`]: fixed, page-aligned chunks and their BLAKE3 hashes.
//! - [`manifest`]: the signed snapshot manifest (wire form documented there).
//! - [`epoch`]: the epoch on disk, written durably before the core uses it.
//! - [`wire`]: the failover core's peer messages as JSON.
//! - [`direct`]: the live host's mirror written with `O_DIRECT`, beside the take.
//! - [`standby`]: receive, verify, install atomically, keep N generations.
//! - [`status`]: role, last snapshot, last error; never waits for the store.
//! - [`metrics`]: Prometheus metrics (`prometheus-client`).
//! - [`hooks`]: the operator's notify hooks (role, health, conflict), run beside the
//!   decision loop with a timeout.
//! - [`event`]: what the failover driver is told, and its handle.
//! - [`peer`]: the HTTPS peer port (reqwest client, hyper server), pinned to the peer's
//!   key (API documented there).
//! - [`live`]: take a snapshot through the conode's admin socket and ship it.
//! - [`arp`]: ARP and IPv6 neighbour discovery messages (built and parsed, pure) and
//!   the raw `AF_PACKET` socket that carries them.
//! - [`vip`]: the virtual IP's IO shell: add/remove/look (rtnetlink, tagged with
//!   `IFA_PROTO`), probe, announce, watch for conflicts, `check`; decides nothing.
//! - [`conode_ctl`]: start and stop the conode (a child process or systemd), and bring
//!   a verified generation into its data directory.
//! - [`failover`]: the driver around the failover core (`failoverd-core`): feeds it
//!   events with the time, carries out its effects one at a time, health checks; reports
//!   changes to the hooks and the metrics and pings systemd's watchdog from its loop;
//!   drops the address and stops the conode when failoverd stops.
//! - [`accept`]: the one accept loop (connection limit, back-off on errors).
//! - [`daemon`]: `failoverd run`: supervised tasks, the state-directory lock, the
//!   control socket, `/metrics`.
//! - [`cli`]: `setup`, `check`, `status`, `snapshot`, the operator's commands,
//!   `release-vip`.

pub mod accept;
pub mod arp;
pub mod chunk;
pub mod cli;
pub mod config;
pub mod conode_ctl;
pub mod daemon;
pub mod direct;
pub mod epoch;
pub mod error;
pub mod event;
pub mod failover;
pub mod hooks;
pub mod live;
pub mod manifest;
pub mod metrics;
pub mod peer;
pub mod standby;
pub mod status;
pub mod unreach;
pub mod vip;
pub mod wire;
