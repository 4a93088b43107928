//! `corald`: the Coral indexer daemon. Parses flags, loads the configuration and runs the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use corald::app::Service;
use corald::config::{Config, Overrides};
use corald::systemd::SystemdEnv;
use tokio_util::sync::CancellationToken;

/// Coral indexer daemon: indexes music libraries into PostgreSQL and serves a JSON-RPC API on a
/// Unix socket. Without a configuration file it uses built-in defaults, including its own
/// private PostgreSQL under the state directory.
#[derive(Debug, Parser)]
#[command(name = "corald", version)]
struct Args {
    /// Configuration file (TOML). Default: /etc/coral/corald.toml if it exists.
    #[arg(long, env = "CORAL_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Unix socket to listen on.
    #[arg(long, env = "CORAL_SOCKET")]
    socket: Option<PathBuf>,
    /// State directory (the managed database lives here).
    #[arg(long, env = "CORAL_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// External PostgreSQL URL (needs the `vector` extension). Default: a managed cluster.
    #[arg(long, env = "CORAL_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Check the configuration, print the settings in effect and exit.
    #[arg(long)]
    check_config: bool,
    /// Read FILEs as a scan would, print what would be indexed (one JSON object a line: the
    /// format, audio properties and tags, or the reason it would fail) and exit: 0 when every
    /// file would be indexed, 1 otherwise. Needs no database.
    #[arg(long, value_name = "FILE", num_args = 1.., conflicts_with = "check_config")]
    probe: Vec<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run only the embedding pipeline, for another machine (a GPU box): take tracks from the
    /// embedding queue of the corald that owns DATABASE_URL (an external PostgreSQL server),
    /// read them through a shared mount and store their vectors. The `[embed]` and `[log]`
    /// settings of the configuration file apply.
    Worker {
        /// The PostgreSQL server corald uses.
        #[arg(long, env = "CORAL_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// A library root under FROM (as corald sees it) is under TO on this machine; the
        /// first matching mapping applies. Repeatable.
        #[arg(long = "path-map", value_name = "FROM=TO", value_parser = corald::worker::parse_path_map)]
        path_map: Vec<(PathBuf, PathBuf)>,
        /// `auto`, `cpu`, `cuda` or `cuda:N` (overrides `embed.device`).
        #[arg(long)]
        device: Option<String>,
    },
}

fn main() -> ExitCode {
    // SAFETY: first thing in main, before any thread exists.
    let systemd = match unsafe { SystemdEnv::take() } {
        Ok(s) => s,
        Err(e) => {
            eprintln!("corald: {e}");
            return ExitCode::from(2);
        }
    };
    let args = Args::parse();
    if !args.probe.is_empty() {
        return probe_files(&args.probe);
    }
    raise_fd_limit();
    let mut config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("corald: {e}");
            return ExitCode::from(2);
        }
    };
    let overrides = Overrides {
        socket: args.socket,
        state_dir: args.state_dir,
        database_url: args.database_url,
    };
    config.apply(overrides.clone());
    if args.check_config {
        println!("configuration OK");
        println!("socket    = {}", config.socket_path().display());
        println!("state_dir = {}", config.state_dir().display());
        println!(
            "database  = {}",
            if config.database.url.is_some() {
                "external (database.url)"
            } else {
                "managed"
            }
        );
        return ExitCode::SUCCESS;
    }
    corald::logging::init(&config.log);
    let worker = args.command.map(
        |Command::Worker {
             database_url,
             path_map,
             device,
         }| {
            corald::worker::WorkerOptions {
                database_url,
                path_map,
                device,
            }
        },
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("corald: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(opts) = worker {
        return match runtime.block_on(corald::worker::run_worker(
            config,
            opts,
            CancellationToken::new(),
        )) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("corald worker: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let service = Service {
        config_path: args.config,
        overrides,
        systemd,
    };
    match runtime.block_on(corald::app::run_service(
        config,
        service,
        CancellationToken::new(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("corald: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Raise the soft open-files limit to the hard limit: every client connection is a descriptor,
/// and the usual soft limit of 1024 is too low for a busy socket. Failure is not fatal.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        eprintln!("corald: cannot raise the open-files limit from {soft} to {hard}: {e}");
    }
}

/// `--probe`: the scan's probe on each file, reported as JSON lines on stdout.
fn probe_files(paths: &[PathBuf]) -> ExitCode {
    let mut all_ok = true;
    for path in paths {
        let line = match corald::scan::phase_2_probe::probe_file(path) {
            Ok(t) => serde_json::json!({
                "path": path.to_string_lossy(),
                "format": t.format.as_str(),
                "codec": t.audio.codec,
                "duration_seconds": t.audio.duration_ms as f64 / 1000.0,
                "sample_rate": t.audio.sample_rate,
                "channels": t.audio.channels,
                "bit_depth": t.audio.bit_depth,
                "bitrate_kbps": t.audio.bitrate_kbps,
                "tags": t.tags,
            }),
            Err(e) => {
                all_ok = false;
                serde_json::json!({
                    "path": path.to_string_lossy(),
                    "error": e.to_string(),
                    "stage": e.stage(),
                })
            }
        };
        println!("{line}");
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
