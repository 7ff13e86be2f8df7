//! `failoverd`: see the library's documentation and the README.
//!
//! Exit status: 0 done (or `run` stopped by a signal); 1 the command ran and failed; 2 bad
//! usage or a configuration error, on which failoverd.service does not restart. Each
//! command's `after_help` states its own; the man pages (`failoverd generate man`) show
//! them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use conode::clidoc::GenerateError;
use failoverd::cli::{self, Failure};
use failoverd::config::Config;

/// The exit statuses of the commands that ask the running daemon.
const ASK_DAEMON_EXIT: &str = "Exit status: 0 done; 1 the daemon refused (its reason is shown) or did not answer on its control socket (is `failoverd run` running?); 2 bad usage, or a failoverd.toml that cannot be read or parsed.";

#[derive(Parser)]
#[command(
    name = "failoverd",
    version,
    about = "Live/standby failover for a conode: verified snapshots, a virtual IP held by at most one host",
    after_help = "Exit status: 0 the command was done, or `run` was stopped by SIGTERM/SIGINT; 1 the command ran and failed (a refused command, a daemon that does not answer, a task that died); 2 bad usage or a configuration error (failoverd.toml missing, unreadable or invalid, a bad FAILOVERD_IO_TIMEOUT_MS): restarting will not help, and failoverd.service does not restart on it. Each command's --help and man page give its own.

See also: conode(1)."
)]
struct Cli {
    /// The configuration file.
    #[arg(
        short = 'c',
        long = "config",
        default_value = "/etc/failoverd/failoverd.toml",
        global = true
    )]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the manual pages or shell completions, generated from these definitions.
    #[command(
        after_help = "Exit status: 0 written; 1 the output cannot be written; 2 bad usage (e.g. no such COMMAND)."
    )]
    Generate {
        #[command(subcommand)]
        what: conode::clidoc::Generated,
    },
    /// Write a commented configuration and a new key file (0600); print the public key to pin on the peer.
    #[command(
        after_help = "Exit status: 0 both files were written (what is left to fill in is listed); 1 the configuration or the key file exists (give --force to replace them) or cannot be written; 2 bad usage, or flag values that make an invalid configuration (nothing is written)."
    )]
    Setup(Box<cli::SetupArgs>),
    /// Check the configuration and the environment, field by field.
    #[command(
        after_help = "Exit status: 0 the configuration is usable (warnings aside); 1 problems were found, each printed on an `error:` line (a file that cannot be read or parsed is one); 2 bad usage."
    )]
    Check,
    /// Run the daemon.
    #[command(
        after_help = "Exit status: 0 stopped by SIGTERM or SIGINT; 1 a runtime failure (another failoverd holds the state directory, a task died); 2 a configuration error: failoverd.toml missing, unreadable or invalid, a bad FAILOVERD_IO_TIMEOUT_MS, a key_file or conode.config that cannot be read, peer.public_key equal to this host's key. failoverd.service does not restart on 2 (RestartPreventExitStatus=2).

Environment: FAILOVERD_LOG the log filter (default info); FAILOVERD_IO_TIMEOUT_MS overrides timeouts.io_stall; NOTIFY_SOCKET and WATCHDOG_USEC systemd's notify socket and watchdog (READY=1 once serving, WATCHDOG=1 from the decision loop, STOPPING=1 at stop). Hooks ([hooks]) get FAILOVERD_EVENT, _ROLE, _PREVIOUS_ROLE, _EPOCH, _VIP, _PEER, _REASON, _CAUSE, _CHECK, _OK, _MAC, _CONFLICTS."
    )]
    Run,
    /// Show role, epoch and the last snapshot.
    #[command(after_help = ASK_DAEMON_EXIT)]
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take and ship a snapshot now (on the live host); waits until the standby installed it.
    #[command(after_help = ASK_DAEMON_EXIT)]
    Snapshot,
    /// The planned move of the address and the conode to the other host (on either host):
    /// the live host stops its conode, ships a final snapshot and drops the address; the
    /// other installs it, claims the address under a new epoch and starts its conode.
    #[command(after_help = ASK_DAEMON_EXIT)]
    Switchover,
    /// Make this standby live: a switchover when the live peer answers; with the peer
    /// unreachable only with --force, and even then only when no host answers the ARP
    /// probe for the address and a verified generation is held.
    #[command(after_help = ASK_DAEMON_EXIT)]
    Promote {
        /// Go ahead although the peer is unreachable (the live host is down).
        #[arg(long)]
        force: bool,
    },
    /// Stop this live host's conode, drop the address, become standby.
    #[command(after_help = ASK_DAEMON_EXIT)]
    Demote,
    /// With the daemon stopped (or killed): remove the address if failoverd added it
    /// (tagged), then stop the conode unit. The unit's ExecStopPost; refused while a
    /// failoverd runs on the same state directory.
    #[command(
        after_help = "Exit status: 0 done: the address removed or not there (and the conode unit stopped), or another host's untagged copy (both left alone); 1 a failoverd runs on this state directory, or removing the address or stopping the conode failed; 2 bad usage or a configuration error (failoverd.toml, or the conode's private.toml, missing, unreadable or invalid)."
    )]
    ReleaseVip,
}

/// SIGINT or SIGTERM (or, if SIGTERM cannot be watched, SIGINT alone).
async fn stop_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot watch SIGTERM ({e}): only SIGINT stops failoverd");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FAILOVERD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("failoverd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let r = match cli.cmd {
        Cmd::Generate { what } => {
            conode::clidoc::generate(Cli::command(), what).map_err(|e| match e {
                GenerateError::NoSuchCommand(_) => Failure::Config(e.to_string()),
                _ => Failure::Failed(e.to_string()),
            })
        }
        Cmd::Setup(a) => cli::setup(&cli.config, &a),
        Cmd::Check => rt.block_on(cli::check(&cli.config)),
        Cmd::Run => match Config::load(&cli.config) {
            Ok(c) => match preflight(&c) {
                Ok(()) => rt
                    .block_on(failoverd::daemon::run(c, stop_signal()))
                    .map_err(Failure::Failed),
                Err(e) => Err(e),
            },
            Err(e) => Err(e.into()),
        },
        Cmd::Status { json } => rt.block_on(cli::status(&cli.config, json)),
        Cmd::Snapshot => rt.block_on(cli::snapshot(&cli.config)),
        Cmd::Switchover => rt.block_on(cli::command(&cli.config, "switchover")),
        Cmd::Promote { force } => rt.block_on(cli::command(
            &cli.config,
            if force { "promote --force" } else { "promote" },
        )),
        Cmd::Demote => rt.block_on(cli::command(&cli.config, "demote")),
        Cmd::ReleaseVip => rt.block_on(cli::release_vip(&cli.config)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failoverd: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// What `run` reads from files beside failoverd.toml, checked before it starts: a missing
/// or unreadable key file or conode configuration is a configuration error (exit status
/// 2, not restarted) rather than a failure that failoverd.service would restart on every
/// 2 s. The daemon reads them again as it starts.
fn preflight(cfg: &Config) -> Result<(), Failure> {
    let key = failoverd::config::load_key(&cfg.key_file).map_err(Failure::Config)?;
    if cfg.peer.public_key == key.public_bytes() {
        return Err(Failure::Config(
            "peer.public_key is this host's own key: pin the other host's key".into(),
        ));
    }
    cfg.conode_paths().map_err(Failure::Config)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command and argument has a help text (what `--help` and the man pages show).
    #[test]
    fn every_command_and_argument_has_help() {
        let missing = conode::clidoc::undocumented(Cli::command());
        assert!(missing.is_empty(), "without help: {missing:?}");
    }

    /// The definitions pass clap's own consistency checks.
    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
