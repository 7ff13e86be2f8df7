//! `failoverd`: see the library's documentation and the README.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use failoverd::cli;

#[derive(Parser)]
#[command(
    name = "failoverd",
    version,
    about = "Live/standby failover for a conode: verified snapshots, a virtual IP held by at most one host",
    after_help = "Exit status: 0 the command was done, or `run` was stopped by SIGTERM/SIGINT; 1 a failure (a configuration error, a refused command, a task that died); 2 bad usage."
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

/// What `generate` prints.
#[derive(Subcommand)]
enum Generated {
    /// The manual page, in roff (e.g. `failoverd generate man > failoverd.1`).
    Man,
    /// Completions for a shell (e.g. `failoverd generate completions bash`).
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the manual page or shell completions, generated from these definitions.
    Generate {
        #[command(subcommand)]
        what: Generated,
    },
    /// Write a commented configuration and a new key file (0600); print the public key to pin on the peer.
    Setup(Box<cli::SetupArgs>),
    /// Check the configuration and the environment, field by field.
    Check,
    /// Run the daemon.
    #[command(
        after_help = "Environment: FAILOVERD_LOG the log filter (default info); FAILOVERD_IO_TIMEOUT_MS overrides timeouts.io_stall; NOTIFY_SOCKET and WATCHDOG_USEC systemd's notify socket and watchdog (READY=1 once serving, WATCHDOG=1 from the decision loop, STOPPING=1 at stop). Hooks ([hooks]) get FAILOVERD_EVENT, _ROLE, _PREVIOUS_ROLE, _EPOCH, _VIP, _PEER, _REASON, _CAUSE, _CHECK, _OK, _MAC, _CONFLICTS."
    )]
    Run,
    /// Show role, epoch and the last snapshot.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take and ship a snapshot now (on the live host); waits until the standby installed it.
    Snapshot,
    /// The planned move of the address and the conode to the other host (on either host):
    /// the live host stops its conode, ships a final snapshot and drops the address; the
    /// other installs it, claims the address under a new epoch and starts its conode.
    Switchover,
    /// Make this standby live: a switchover when the live peer answers; with the peer
    /// unreachable only with --force, and even then only when no host answers the ARP
    /// probe for the address and a verified generation is held.
    Promote {
        /// Go ahead although the peer is unreachable (the live host is down).
        #[arg(long)]
        force: bool,
    },
    /// Stop this live host's conode, drop the address, become standby.
    Demote,
    /// With the daemon stopped (or killed): remove the address if failoverd added it
    /// (tagged), then stop the conode unit. The unit's ExecStopPost; refused while a
    /// failoverd runs on the same state directory.
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
        Cmd::Generate { what } => generate(what),
        Cmd::Setup(a) => cli::setup(&cli.config, &a),
        Cmd::Check => rt.block_on(cli::check(&cli.config)),
        Cmd::Run => match failoverd::config::Config::load(&cli.config) {
            Ok(c) => rt.block_on(failoverd::daemon::run(c, stop_signal())),
            Err(e) => Err(e.to_string()),
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
            ExitCode::from(1)
        }
    }
}

/// Print the man page or completions of this command line.
fn generate(what: Generated) -> Result<(), String> {
    let mut cmd = Cli::command();
    // Rendered whole first: a reader that stops early (`| head`) is no error.
    let mut out = Vec::new();
    match what {
        Generated::Man => clap_mangen::Man::new(cmd)
            .render(&mut out)
            .map_err(|e| format!("cannot render the man page: {e}"))?,
        Generated::Completions { shell } => {
            clap_complete::generate(shell, &mut cmd, "failoverd", &mut out);
        }
    }
    cli::emit(&out)
}
