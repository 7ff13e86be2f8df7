//! `conode`: the command line. Thin: parse, validate, call the library.
//!
//! Exit status: 0 success; 1 the command ran and failed (e.g. `check`: a server did not
//! answer; `server`: a runtime error; `backup`: no running conode answered; `restore`: the
//! backup failed a check or the conode runs); 2 bad usage or configuration. Each command's
//! `after_help` states its own, and the man pages (`conode generate man`) show them.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use conode::config::{self, PrivateConfig, Roster};
use conode::{backup, client, server, setup};

#[derive(Parser)]
#[command(
    name = "conode",
    version,
    about = "run a cothority server",
    after_help = "Exit status: 0 success; 1 the command ran and failed (check: a server did not answer; server: a runtime error; backup: no running conode answered; restore: the backup failed a check or the conode runs); 2 bad usage or configuration (each command's --help and man page give its own)."
)]
struct Cli {
    /// Debug level: 0-1 info, 2 debug, 3+ trace (RUST_LOG overrides).
    #[arg(short = 'd', long = "debug", default_value_t = 0, global = true)]
    debug: u8,
    /// The private.toml to use [default: $XDG_CONFIG_HOME/conode/private.toml].
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
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
    /// Create a key pair and write private.toml and public.toml.
    #[command(
        alias = "s",
        after_help = "Exit status: 0 both files were written; 2 bad usage or any failure (private.toml exists and --force was not given, a bad answer or flag value, a file that cannot be written)."
    )]
    Setup {
        /// Take everything from the flags instead of asking.
        #[arg(long)]
        non_interactive: bool,
        /// Host (IP or DNS name) other nodes use to reach this one.
        #[arg(long, default_value = "")]
        host: String,
        /// Conode-to-conode port; clients use port+1.
        #[arg(long, default_value_t = 6879)]
        port: u16,
        /// The server's description in public.toml, shown to clients and in rosters.
        #[arg(long, default_value = "configured in non-interactive mode")]
        description: String,
        /// Replace an existing private.toml (non-interactive only).
        #[arg(long)]
        force: bool,
    },
    /// Run the conode.
    #[command(
        after_help = "Exit status: 0 stopped by SIGTERM or SIGINT (in-flight requests finished); 1 a runtime failure (e.g. a port in use, the database cannot be opened); 2 bad usage or configuration: run as root without --allow-root, an unreadable or invalid private.toml, a bad --metrics, CONODE_METRICS, CONODE_ADMIN_GROUP or CONODE_MIN_FREE_MB. conode.service does not restart on 2 (RestartPreventExitStatus=2).

Environment: CONODE_SERVICE_PATH the data directory (else $XDG_DATA_HOME/conode, else ~/.local/share/conode); CONODE_MIN_FREE_MB the free-space floor below which new blocks are refused (default 64, 0 off); CONODE_METRICS the metrics address (--metrics wins); CONODE_ADMIN_GROUP a group also served on the admin socket (0660); NOTIFY_SOCKET systemd's notify socket (READY=1 once both ports listen, STOPPING=1 at shutdown); RUST_LOG the log filter (overrides -d)."
    )]
    Server {
        /// Run even as root (containers). A conode should run as an unprivileged user.
        #[arg(long)]
        allow_root: bool,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9102); off by
        /// default. Overrides $CONODE_METRICS.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
    },
    /// Ask every server of a roster for its status; exit 0 only if all answered.
    #[command(
        alias = "c",
        after_help = "Exit status: 0 every server answered; 1 a server did not answer within the timeout (each is listed); 2 bad usage: no roster, or one that cannot be read."
    )]
    Check {
        /// Roster file (one or more public.toml concatenated).
        roster: Option<PathBuf>,
        /// Roster file (the Go conode's flag).
        #[arg(short = 'g', long = "group")]
        group: Option<PathBuf>,
        /// Seconds to wait for each server.
        #[arg(short = 't', long, default_value_t = 10)]
        timeout: u64,
    },
    /// Create, extend and read skipchains: conode chain create|add|get|update.
    #[command(
        after_help = "Exit status: 0 success; 1 a server refused (its reason is shown), none could be reached, or an answer failed verification; 2 bad usage: a malformed chain id, an unreadable roster, private.toml or data file, block data over the limit (nothing was sent)."
    )]
    Chain {
        #[command(subcommand)]
        cmd: conode::chain_cli::ChainCmd,
    },
    /// Copy the running conode's database (a consistent snapshot, no downtime) and its
    /// private.toml into DIR.
    #[command(
        after_help = "Exit status: 0 the backup in DIR is complete; 1 the backup failed (no running conode answered on its admin socket, DIR cannot be written); 2 bad usage or an unreadable private.toml."
    )]
    Backup {
        /// Directory for `<Public hex>.db` and `private.toml` (created 0700 if missing).
        dir: PathBuf,
    },
    /// Put a backup made by `conode backup` in place, for a stopped conode.
    #[command(
        after_help = "Exit status: 0 restored; 1 the restore failed: the backup failed a check, the conode runs, or (without --force) the current database is ahead of the backup or unreadable; 2 bad usage or an unreadable private.toml."
    )]
    Restore {
        /// Directory holding the backup.
        dir: PathBuf,
        /// Restore even if the current database is ahead of the backup or unreadable
        /// (it is kept as <hex>.db.before-restore-<time> either way).
        #[arg(long)]
        force: bool,
    },
}

fn init_logs(debug: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match debug {
        0 | 1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("conode: error: {msg}");
    ExitCode::from(code)
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Raise the soft open-files limit to the hard one, as the Go conode does: every client
/// connection is a descriptor.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.debug);
    let private_path = cli
        .config
        .clone()
        .unwrap_or_else(|| config::default_config_dir().join("private.toml"));
    match cli.cmd {
        Cmd::Generate { what } => match conode::clidoc::generate(Cli::command(), what) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e.exit_code(), e),
        },
        Cmd::Chain { cmd } => {
            match conode::chain_cli::run(cmd, &private_path, &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e.exit_code(), e),
            }
        }
        Cmd::Setup {
            non_interactive: true,
            host,
            port,
            description,
            force,
        } => match setup::non_interactive(&private_path, &host, port, &description, force) {
            Ok(public) => {
                eprintln!(
                    "Wrote config file to {} and {}",
                    private_path.display(),
                    public.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(2, e),
        },
        Cmd::Setup { .. } => {
            let stdin = std::io::stdin();
            let mut input = stdin.lock();
            let mut out = std::io::stdout();
            match setup::interactive(&mut input, &mut out, &config::default_config_dir()) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => fail(2, e),
            }
        }
        Cmd::Server {
            allow_root,
            metrics,
        } => {
            if is_root() && !allow_root {
                return fail(
                    2,
                    "refusing to run as root: run the conode as an unprivileged user (pass --allow-root only inside a container)",
                );
            }
            let opts = match conode::metrics::listen_addr_from_env(metrics.as_deref()) {
                Ok(metrics) => server::Options { metrics },
                Err(e) => return fail(2, e),
            };
            let cfg = match PrivateConfig::load(&private_path) {
                Ok(c) => c,
                Err(e) => return fail(2, e),
            };
            // A configuration error: exit status 2, which the unit does not restart on.
            if let Err(e) = conode::admin::admin_group() {
                return fail(2, e);
            }
            if let Err(e) = conode::db::free_floor_from_env() {
                return fail(2, e);
            }
            raise_fd_limit();
            let db_path = config::db_path(&cfg.keys.public_bytes());
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
            };
            rt.block_on(async move {
                let srv = match server::Server::start_opts(cfg, db_path, opts).await {
                    Ok(s) => s,
                    Err(e) => return fail(1, e),
                };
                // Both ports listen now (Type=notify units start their dependents here).
                conode::sd_notify::notify("READY=1");
                match server::signal().await {
                    Ok(sig) => {
                        tracing::info!("{sig} received: stopping (in-flight requests finish)")
                    }
                    Err(e) => tracing::error!("cannot wait for signals: {e}; stopping"),
                }
                conode::sd_notify::notify("STOPPING=1");
                srv.stop().await;
                ExitCode::SUCCESS
            })
        }
        Cmd::Backup { dir } => backup_cmd(&private_path, &dir),
        Cmd::Restore { dir, force } => restore_cmd(&private_path, &dir, force),
        Cmd::Check {
            roster,
            group,
            timeout,
        } => {
            let Some(path) = roster.or(group) else {
                return fail(2, "check needs a roster file: conode check ROSTER.toml");
            };
            let roster = match Roster::load(&path) {
                Ok(r) => r,
                Err(e) => return fail(2, e),
            };
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
            };
            let ok = rt.block_on(client::check(
                &roster,
                Duration::from_secs(timeout),
                &mut std::io::stdout(),
            ));
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// `conode backup DIR`.
fn backup_cmd(private_path: &std::path::Path, dir: &std::path::Path) -> ExitCode {
    let cfg = match PrivateConfig::load(private_path) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    let db_path = config::db_path(&cfg.keys.public_bytes());
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
    };
    match rt.block_on(backup::backup(private_path, &cfg, &db_path, dir)) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, format!("backup failed: {e}")),
    }
}

/// `conode restore DIR [--force]`.
fn restore_cmd(private_path: &std::path::Path, dir: &std::path::Path, force: bool) -> ExitCode {
    let cfg = match PrivateConfig::load(private_path) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    let db_path = config::db_path(&cfg.keys.public_bytes());
    match backup::restore(&cfg, &db_path, dir, force) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(1, format!("restore failed: {e}")),
    }
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
