//! `failoverd`: see the library's documentation and the README.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use failoverd::cli;

#[derive(Parser)]
#[command(
    name = "failoverd",
    version,
    about = "Live/standby failover for a conode: verified snapshot shipping"
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
    /// Write a commented configuration and a new key file (0600); print the public key to pin on the peer.
    Setup(Box<cli::SetupArgs>),
    /// Check the configuration and the environment, field by field.
    Check,
    /// Run the daemon.
    Run,
    /// Show role, epoch and the last snapshot.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take and ship a snapshot now (on the live host); waits until the standby installed it.
    Snapshot,
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
        Cmd::Setup(a) => cli::setup(&cli.config, &a),
        Cmd::Check => rt.block_on(cli::check(&cli.config)),
        Cmd::Run => match failoverd::config::Config::load(&cli.config) {
            Ok(c) => rt.block_on(failoverd::daemon::run(c, stop_signal())),
            Err(e) => Err(e.to_string()),
        },
        Cmd::Status { json } => rt.block_on(cli::status(&cli.config, json)),
        Cmd::Snapshot => rt.block_on(cli::snapshot(&cli.config)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failoverd: {e}");
            ExitCode::from(1)
        }
    }
}
