//! The private PostgreSQL cluster corald owns when no `database.url` is configured: finds the
//! bundled PostgreSQL + pgvector install, creates the cluster on first start (database `coral`,
//! extension `vector`), starts it listening only on a Unix socket (or adopts one left running),
//! runs it as an unprivileged user when corald is root, and stops it.
//!
//! This file holds the configuration, the error type and the cluster's lifecycle (start or
//! adopt, create on first use, restart, stop, drop); `install` finds the PostgreSQL install,
//! `runner` the user it runs as and how its programs are run, `postmaster` reads the server's
//! lock file, `settings` prepares the socket directory and the settings file.

mod install;
mod postmaster;
mod runner;
mod settings;

pub use install::{LookedAt, POSTGRES_DIR_ENV, POSTGRES_VERSION, find_install};

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};

use install::{install_major, not_found_message};
use postmaster::{Postmaster, process_alive, read_postmaster, remove_stale_lock};
use runner::{Runner, pg_command, resolve_runner, run};
use settings::{prepare_socket_dir, write_settings};

/// Database and superuser name inside the cluster.
const DATABASE: &str = "coral";
const SUPERUSER: &str = "coral";
/// Only names the socket file (`.s.PGSQL.5432`); the cluster never listens on TCP.
const PORT: u16 = 5432;
/// pg_ctl start/stop wait limit.
const PG_CTL_TIMEOUT_S: u64 = 120;
const LOG_FILE: &str = "postgres.log";

/// Where and how to run the private cluster.
#[derive(Debug, Clone)]
pub struct ManagedPostgresConfig {
    /// The cluster's data directory (created on first start).
    pub data_dir: PathBuf,
    /// PostgreSQL install (`database.postgres_dir`); searched for when `None`.
    pub install_dir: Option<PathBuf>,
    /// Unprivileged user to run PostgreSQL as when corald runs as root.
    pub run_as: Option<String>,
}

/// A running private cluster. Stop it with [`ManagedPostgres::stop`]; dropping it without
/// stopping shuts the server down on a best-effort basis.
#[derive(Debug)]
pub struct ManagedPostgres {
    data_dir: PathBuf,
    install_dir: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    runner: Runner,
    stopped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ManagedPostgresError {
    #[error("{}", not_found_message(.looked))]
    NotFound { looked: Vec<LookedAt> },
    #[error(
        "PostgreSQL refuses to run as root, so corald runs it as an unprivileged user, but user \
         `{user}` does not exist: create it (e.g. `useradd --system --home-dir /var/lib/coral \
         coral`) or set database.managed_user to an existing unprivileged user"
    )]
    UnknownUser { user: String },
    #[error(
        "user `{user}` has uid 0; PostgreSQL refuses to run as root: choose an unprivileged user"
    )]
    RunAsRoot { user: String },
    #[error(
        "cannot run PostgreSQL as `{user}`: switching users needs root and corald runs as uid \
         {uid}; leave database.managed_user unset to run it as yourself"
    )]
    CannotSwitchUser { user: String, uid: u32 },
    #[error(
        "PostgreSQL runs as `{user}` (it refuses root), and `{user}` cannot enter {} (mode {mode:04o}, \
         owner uid {owner}) on the way to {}. Fix: `chmod o+x {}`, or choose a --state-dir \
         (and a PostgreSQL install) outside it",
        .dir.display(), .target.display(), .dir.display()
    )]
    NotTraversable {
        user: String,
        dir: PathBuf,
        mode: u32,
        owner: u32,
        target: PathBuf,
    },
    #[error(
        "`{user}` (the user PostgreSQL runs as) cannot execute {} (mode {mode:04o}); rerun \
         scripts/setup or `chmod 755` it",
        .path.display()
    )]
    NotExecutable {
        user: String,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "{} cannot be used by PostgreSQL's start-up script: it contains {ch:?}; choose a path \
         without quotes, `$`, backquotes, backslashes or line breaks",
        .path.display()
    )]
    UnsupportedPath { path: PathBuf, ch: char },
    #[error(
        "{} is not empty but holds no PostgreSQL cluster (no PG_VERSION file); move its contents \
         away or choose another --state-dir",
        .dir.display()
    )]
    NotACluster { dir: PathBuf },
    #[error(
        "the PostgreSQL data directory {} belongs to uid {owner}, but PostgreSQL would run as \
         `{user}` (uid {uid}); fix with `chown -R {user} {}`, or set database.managed_user to its owner",
        .dir.display(), .dir.display()
    )]
    WrongOwner {
        dir: PathBuf,
        owner: u32,
        user: String,
        uid: u32,
    },
    #[error(
        "the cluster in {} was made by PostgreSQL {cluster}, but {} is PostgreSQL {installed}; \
         point database.postgres_dir at a PostgreSQL {cluster} install, or move the data \
         directory away to start a new, empty cluster",
        .dir.display(), .install.display()
    )]
    VersionMismatch {
        dir: PathBuf,
        cluster: String,
        install: PathBuf,
        installed: String,
    },
    #[error("no usable directory for PostgreSQL's Unix socket: {0}")]
    SocketDir(String),
    #[error("could not {action} {}: {error}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("could not look up user `{user}`: {error}")]
    UserLookup { user: String, error: Errno },
    #[error(
        "could not run {}: {error}; is the PostgreSQL install complete? (rerun scripts/setup)",
        .program.display()
    )]
    Spawn { program: PathBuf, error: io::Error },
    #[error("{what} failed ({status}){details}")]
    Failed {
        what: String,
        status: String,
        details: String,
    },
    #[error(
        "a PostgreSQL server (pid {pid}) is running in {} but did not become ready within \
         {secs} s; see {}",
        .dir.display(), .log.display()
    )]
    NotReady {
        pid: i32,
        dir: PathBuf,
        secs: u64,
        log: PathBuf,
    },
    #[error(
        "could not set up database \"coral\" in the managed cluster (socket in {}): {error}",
        .socket_dir.display()
    )]
    Database {
        socket_dir: PathBuf,
        error: sqlx::Error,
    },
}

type Result<T, E = ManagedPostgresError> = std::result::Result<T, E>;

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ManagedPostgresError {
    let path = path.to_path_buf();
    move |error| ManagedPostgresError::Io {
        action,
        path,
        error,
    }
}

impl ManagedPostgres {
    /// Starts the private cluster in `cfg.data_dir` (creating it on first use, adopting a
    /// server left running there) and makes sure database `coral` with extension `vector`
    /// exists.
    pub async fn start(cfg: ManagedPostgresConfig) -> Result<Self> {
        let began = Instant::now();
        let install = find_install(cfg.install_dir.as_deref())?;
        let install = std::fs::canonicalize(&install).map_err(io_err("resolve", &install))?;
        let data_dir = absolute_data_dir(&cfg.data_dir)?;
        check_shell_safe(&install)?;
        check_shell_safe(&data_dir)?;
        let runner = resolve_runner(cfg.run_as.as_deref(), &data_dir)?;

        // The runner must reach the programs and the data directory.
        runner.check_traversable(&install.join("bin"), true)?;
        runner.check_traversable(&install.join("lib"), true)?;
        runner.check_traversable(&install.join("share"), true)?;
        for bin in ["postgres", "initdb", "pg_ctl"] {
            runner.check_executable(&install.join("bin").join(bin))?;
        }
        runner.check_traversable(&data_dir, false)?;

        let mut pg = ManagedPostgres {
            data_dir: data_dir.clone(),
            install_dir: install.clone(),
            socket_dir: PathBuf::new(),
            port: PORT,
            runner,
            stopped: true,
        };

        if let Some((pid, port, socket_dir)) = pg.wait_for_running().await? {
            tracing::info!(
                pid,
                data_dir = %data_dir.display(),
                "adopting the PostgreSQL server already running in the data directory"
            );
            pg.port = port;
            pg.socket_dir = socket_dir;
            pg.stopped = false;
        } else {
            if !data_dir.join("PG_VERSION").exists() {
                pg.init_cluster().await?;
            }
            pg.check_cluster_dir(&install).await?;
            pg.launch().await?;
            tracing::info!(
                data_dir = %data_dir.display(),
                socket_dir = %pg.socket_dir.display(),
                user = %pg.runner.name,
                "private PostgreSQL cluster started"
            );
        }

        pg.bootstrap_database().await?;
        tracing::debug!(
            elapsed_ms = began.elapsed().as_millis() as u64,
            "managed PostgreSQL ready"
        );
        Ok(pg)
    }

    /// Whether this cluster's postmaster is alive (running, starting or stopping).
    pub fn is_running(&self) -> bool {
        matches!(read_postmaster(&self.data_dir), Postmaster::Running { .. })
    }

    /// Start the server again after its postmaster died (killed, crashed, stopped behind
    /// corald's back), on the same socket directory; nothing when it runs. PostgreSQL recovers
    /// from its write-ahead log by itself.
    pub async fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.launch().await
    }

    /// Socket directory, settings, stale lock, then `pg_ctl start -w`.
    async fn launch(&mut self) -> Result<()> {
        let data_dir = self.data_dir.clone();
        let log = data_dir.join(LOG_FILE);
        self.socket_dir = prepare_socket_dir(&data_dir, &self.runner)?;
        write_settings(&data_dir, &self.socket_dir, &self.runner)?;
        if let Postmaster::Stale { pid } = read_postmaster(&data_dir) {
            remove_stale_lock(&data_dir, pid)?;
        }
        if log.exists() {
            self.runner.own(&log)?;
        }
        let mut cmd = pg_command(&self.install_dir, "pg_ctl", &self.runner);
        cmd.arg("start")
            .arg("-w")
            .arg("-t")
            .arg(PG_CTL_TIMEOUT_S.to_string())
            .arg("-D")
            .arg(&data_dir)
            .arg("-l")
            .arg(&log);
        run(cmd, "starting PostgreSQL (pg_ctl start)", Some(&log)).await?;
        self.stopped = false;
        Ok(())
    }

    /// Connection options for database `coral` over the cluster's Unix socket.
    pub fn connect_options(&self) -> PgConnectOptions {
        PgConnectOptions::new_without_pgpass()
            .socket(&self.socket_dir)
            .port(self.port)
            .username(SUPERUSER)
            .database(DATABASE)
            .ssl_mode(PgSslMode::Disable)
            .application_name("corald")
    }

    /// The PostgreSQL install in use (holding `bin/`, `lib/`, `share/`).
    pub fn install_dir(&self) -> &Path {
        &self.install_dir
    }

    /// The cluster's data directory (absolute).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The server's log file.
    pub fn log_file(&self) -> PathBuf {
        self.data_dir.join(LOG_FILE)
    }

    /// Shuts the server down (`pg_ctl stop -m fast`). Stopping twice is fine.
    pub async fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        let Postmaster::Running { pid, .. } = read_postmaster(&self.data_dir) else {
            self.stopped = true;
            return Ok(());
        };
        let log = self.log_file();
        let mut cmd = pg_command(&self.install_dir, "pg_ctl", &self.runner);
        cmd.arg("stop")
            .arg("-m")
            .arg("fast")
            .arg("-w")
            .arg("-t")
            .arg(PG_CTL_TIMEOUT_S.to_string())
            .arg("-D")
            .arg(&self.data_dir);
        let result = run(cmd, "stopping PostgreSQL (pg_ctl stop)", Some(&log)).await;
        if result.is_err() && !matches!(read_postmaster(&self.data_dir), Postmaster::Running { .. })
        {
            // It went away on its own meanwhile.
            self.stopped = true;
            return Ok(());
        }
        result?;
        self.stopped = true;
        // pg_ctl returns once the lock file is gone; the postmaster exits a moment later.
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.remove_fallback_socket_dir();
        tracing::info!(data_dir = %self.data_dir.display(), "private PostgreSQL cluster stopped");
        Ok(())
    }

    /// Removes the short socket directory outside the data directory, if one was used (the
    /// server has removed its socket by now; a non-empty directory stays).
    fn remove_fallback_socket_dir(&self) {
        let ours = self
            .socket_dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("coral-pg-"));
        if ours && !self.socket_dir.starts_with(&self.data_dir) {
            let _ = std::fs::remove_dir(&self.socket_dir);
        }
    }

    /// If our postmaster is running (or starting), waits until it is ready and returns its pid,
    /// port and socket directory; `None` when none runs (any more).
    async fn wait_for_running(&self) -> Result<Option<(i32, u16, PathBuf)>> {
        let deadline = Instant::now() + Duration::from_secs(PG_CTL_TIMEOUT_S);
        loop {
            match read_postmaster(&self.data_dir) {
                Postmaster::Absent | Postmaster::Stale { .. } => return Ok(None),
                Postmaster::Running {
                    pid,
                    port,
                    socket_dir,
                    status,
                } => {
                    if status == "ready" {
                        let Some(socket_dir) = socket_dir else {
                            return Err(ManagedPostgresError::SocketDir(format!(
                                "the PostgreSQL server running in {} (pid {pid}) has no Unix \
                                 socket; stop it (`kill {pid}`) and start corald again",
                                self.data_dir.display()
                            )));
                        };
                        return Ok(Some((pid, port.unwrap_or(PORT), socket_dir)));
                    }
                    if Instant::now() >= deadline {
                        return Err(ManagedPostgresError::NotReady {
                            pid,
                            dir: self.data_dir.clone(),
                            secs: PG_CTL_TIMEOUT_S,
                            log: self.log_file(),
                        });
                    }
                    // "starting" or "stopping": wait for it to settle.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Creates the cluster: initdb into a scratch directory beside the data directory, then
    /// renames it into place, so an interrupted first start leaves nothing half-made.
    async fn init_cluster(&self) -> Result<()> {
        let data_dir = &self.data_dir;
        if data_dir.exists() && !dir_is_empty(data_dir)? {
            return Err(ManagedPostgresError::NotACluster {
                dir: data_dir.clone(),
            });
        }
        let Some(name) = data_dir.file_name() else {
            return Err(ManagedPostgresError::NotACluster {
                dir: data_dir.clone(),
            });
        };
        let mut scratch_name = name.to_os_string();
        scratch_name.push(".initdb-tmp");
        let scratch = data_dir.with_file_name(scratch_name);
        if scratch.exists() {
            std::fs::remove_dir_all(&scratch).map_err(io_err("remove", &scratch))?;
        }
        make_private_dir(&scratch)?;
        self.runner.own(&scratch)?;

        tracing::info!(data_dir = %data_dir.display(), user = %self.runner.name, "creating the private PostgreSQL cluster (initdb)");
        let mut cmd = pg_command(&self.install_dir, "initdb", &self.runner);
        cmd.arg("-D")
            .arg(&scratch)
            .arg("-U")
            .arg(SUPERUSER)
            .arg("--auth=trust")
            .arg("-E")
            .arg("UTF8")
            .arg("--locale=C")
            // One syncfs() instead of an fsync() per file: seconds faster, just as durable.
            .arg("--sync-method=syncfs")
            .arg("--no-instructions");
        if let Err(e) = run(cmd, "creating the cluster (initdb)", None).await {
            let _ = std::fs::remove_dir_all(&scratch);
            return Err(e);
        }
        if data_dir.exists() {
            std::fs::remove_dir(data_dir).map_err(io_err("remove", data_dir))?;
        }
        std::fs::rename(&scratch, data_dir).map_err(io_err("move the new cluster to", data_dir))
    }

    /// Checks an existing data directory: owner, mode and PostgreSQL major version.
    async fn check_cluster_dir(&self, install: &Path) -> Result<()> {
        let dir = &self.data_dir;
        let meta = std::fs::metadata(dir).map_err(io_err("inspect", dir))?;
        if meta.uid() != self.runner.uid {
            return Err(ManagedPostgresError::WrongOwner {
                dir: dir.clone(),
                owner: meta.uid(),
                user: self.runner.name.clone(),
                uid: self.runner.uid,
            });
        }
        if meta.mode() & 0o027 != 0 {
            // PostgreSQL insists on 0700 (or 0750).
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err("set the mode of", dir))?;
        }
        let version_file = dir.join("PG_VERSION");
        let cluster = std::fs::read_to_string(&version_file)
            .map_err(io_err("read", &version_file))?
            .trim()
            .to_string();
        let installed = install_major(install).await?;
        if cluster != installed {
            return Err(ManagedPostgresError::VersionMismatch {
                dir: dir.clone(),
                cluster,
                install: install.to_path_buf(),
                installed,
            });
        }
        Ok(())
    }

    /// Creates database `coral` and extension `vector` when missing.
    async fn bootstrap_database(&self) -> Result<()> {
        let db_err = |error| ManagedPostgresError::Database {
            socket_dir: self.socket_dir.clone(),
            error,
        };
        let mut admin = PgConnection::connect_with(&self.connect_options().database("postgres"))
            .await
            .map_err(db_err)?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(DATABASE)
                .fetch_one(&mut admin)
                .await
                .map_err(db_err)?;
        if !exists {
            // Must match DATABASE.
            sqlx::raw_sql("CREATE DATABASE coral ENCODING 'UTF8' TEMPLATE template0")
                .execute(&mut admin)
                .await
                .map_err(db_err)?;
        }
        admin.close().await.map_err(db_err)?;

        let mut conn = PgConnection::connect_with(&self.connect_options())
            .await
            .map_err(db_err)?;
        sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS vector")
            .execute(&mut conn)
            .await
            .map_err(db_err)?;
        conn.close().await.map_err(db_err)?;
        Ok(())
    }

    /// Synchronous, best-effort fast shutdown: SIGINT to the postmaster, then wait a little.
    fn stop_blocking(&mut self) {
        self.stopped = true;
        let Postmaster::Running { pid, .. } = read_postmaster(&self.data_dir) else {
            return;
        };
        if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGINT) {
            tracing::warn!(pid, error = %e, "could not stop the private PostgreSQL cluster");
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if !process_alive(pid) {
                self.remove_fallback_socket_dir();
                tracing::info!("private PostgreSQL cluster stopped");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(pid, "private PostgreSQL cluster still shutting down");
    }
}

impl Drop for ManagedPostgres {
    fn drop(&mut self) {
        if !self.stopped {
            self.stop_blocking();
        }
    }
}

/// Rejects paths pg_ctl's shell command line (`"..."` quoting) cannot carry.
fn check_shell_safe(path: &Path) -> Result<()> {
    let s = path.to_string_lossy();
    match s
        .chars()
        .find(|c| matches!(c, '"' | '$' | '`' | '\\' | '\n' | '\r'))
    {
        Some(ch) => Err(ManagedPostgresError::UnsupportedPath {
            path: path.to_path_buf(),
            ch,
        }),
        None => Ok(()),
    }
}

fn make_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create", dir))
}

fn dir_is_empty(dir: &Path) -> Result<bool> {
    Ok(std::fs::read_dir(dir)
        .map_err(io_err("read", dir))?
        .next()
        .is_none())
}

/// `data_dir` made absolute with its parent resolved (the parent is created when missing).
fn absolute_data_dir(data_dir: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(data_dir).map_err(io_err("resolve", data_dir))?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Err(ManagedPostgresError::NotACluster { dir: abs });
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)
        .map_err(io_err("create", parent))?;
    let parent = std::fs::canonicalize(parent).map_err(io_err("resolve", parent))?;
    let dir = parent.join(name);
    // A symlinked data directory: follow it.
    match std::fs::canonicalize(&dir) {
        Ok(real) => Ok(real),
        Err(_) => Ok(dir),
    }
}

#[cfg(test)]
mod tests {
    use nix::unistd::Uid;

    use super::*;

    /// The bundled install, which `scripts/setup` provides; the tests need it.
    fn install() -> PathBuf {
        find_install(None).unwrap_or_else(|e| {
            panic!("the managed PostgreSQL tests need PostgreSQL; run scripts/setup first.\n{e}")
        })
    }

    /// A temporary directory the unprivileged cluster user can enter when we are root.
    pub(super) fn temp_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        if Uid::effective().is_root() {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod temp dir");
        }
        dir
    }

    pub(super) fn config(data_dir: PathBuf) -> ManagedPostgresConfig {
        ManagedPostgresConfig {
            data_dir,
            install_dir: Some(install()),
            run_as: None,
        }
    }

    pub(super) async fn vector_version(pg: &ManagedPostgres) -> String {
        let mut conn = PgConnection::connect_with(&pg.connect_options())
            .await
            .expect("connect");
        sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            .fetch_one(&mut conn)
            .await
            .expect("vector extension")
    }

    fn postmaster_pid(data_dir: &Path) -> i32 {
        match read_postmaster(data_dir) {
            Postmaster::Running { pid, .. } => pid,
            other => panic!("no running postmaster: {other:?}"),
        }
    }

    /// A cluster started in a new temporary directory: that directory (keep it until the end
    /// of the test), the data directory given to `start`, and the running server.
    pub(super) async fn start_in_temp_dir() -> (tempfile::TempDir, PathBuf, ManagedPostgres) {
        let tmp = temp_dir();
        let data = tmp.path().join("pg");
        let pg = ManagedPostgres::start(config(data.clone()))
            .await
            .expect("start");
        (tmp, data, pg)
    }

    #[tokio::test]
    async fn start_connect_stop_and_reuse() {
        let tmp = temp_dir();
        let data = tmp.path().join("pg");
        let t = Instant::now();
        let mut pg = ManagedPostgres::start(config(data.clone()))
            .await
            .expect("first start");
        eprintln!("initdb + first start: {:?}", t.elapsed());
        assert!(vector_version(&pg).await.starts_with("0.8"));
        let mut conn = PgConnection::connect_with(&pg.connect_options())
            .await
            .expect("connect");
        sqlx::raw_sql("CREATE TABLE kept (v vector(3)); INSERT INTO kept VALUES ('[1,2,3]')")
            .execute(&mut conn)
            .await
            .expect("create table");
        conn.close().await.expect("close");
        pg.stop().await.expect("stop");
        pg.stop().await.expect("second stop is a no-op");
        assert_eq!(read_postmaster(pg.data_dir()), Postmaster::Absent);

        let t = Instant::now();
        let mut pg = ManagedPostgres::start(config(data.clone()))
            .await
            .expect("second start");
        eprintln!("reuse start: {:?}", t.elapsed());
        let mut conn = PgConnection::connect_with(&pg.connect_options())
            .await
            .expect("connect again");
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM kept")
            .fetch_one(&mut conn)
            .await
            .expect("table survived");
        assert_eq!(n, 1);
        conn.close().await.expect("close");
        pg.stop().await.expect("stop again");
    }

    #[tokio::test]
    async fn adopts_a_server_left_running() {
        let (_tmp, data, pg) = start_in_temp_dir().await;
        let pid = postmaster_pid(pg.data_dir());
        // As if corald were killed: the server keeps running.
        std::mem::forget(pg);

        let t = Instant::now();
        let mut pg = ManagedPostgres::start(config(data)).await.expect("adopt");
        eprintln!("adopt: {:?}", t.elapsed());
        assert_eq!(postmaster_pid(pg.data_dir()), pid, "adopted, not restarted");
        assert!(vector_version(&pg).await.starts_with("0.8"));
        pg.stop().await.expect("stop");
        assert!(!process_alive(pid));
    }

    #[tokio::test]
    async fn drop_stops_the_server() {
        let (_tmp, _data, pg) = start_in_temp_dir().await;
        let pid = postmaster_pid(pg.data_dir());
        let data_dir = pg.data_dir().to_path_buf();
        drop(pg);
        assert_eq!(read_postmaster(&data_dir), Postmaster::Absent);
        assert!(!process_alive(pid));
    }

    #[tokio::test]
    async fn non_empty_dir_without_cluster_is_refused() {
        let tmp = temp_dir();
        let data = tmp.path().join("pg");
        std::fs::create_dir(&data).expect("mkdir");
        std::fs::write(data.join("precious.txt"), "x").expect("write");
        let err = ManagedPostgres::start(config(data))
            .await
            .expect_err("must refuse");
        assert!(
            matches!(err, ManagedPostgresError::NotACluster { .. }),
            "{err}"
        );
        assert!(tmp.path().join("pg/precious.txt").exists());
    }
}
