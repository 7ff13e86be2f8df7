//! `failoverd`: live/standby failover for a conode (snapshot shipping, a virtual IP held
//! by at most one host).
//!
//! Not built yet: this crate holds the workspace's place for it. The design is in
//! `../shared/DESIGN.md` §3; the work is tracked in the project's issues. Until then the
//! binary says so and exits with status 2, so no script can mistake it for a working
//! daemon.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "failoverd: not available in this release (conode {}): snapshot shipping and virtual-IP failover are not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
