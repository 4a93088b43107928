//! A real corald for tests: its own state directory (so its own managed PostgreSQL), its own
//! socket, started from the built binary and stopped (SIGTERM, then SIGKILL) on drop.
//!
//! As root, [`Daemon::start_hiding_owner`] runs corald in a user namespace where one uid/gid is
//! left unmapped, so files owned by it obey their permission bits even for root: tests of
//! unreadable files and directories then behave as they would for a service user.
//!
//! Tests that start corald their own way (through a wrapper such as `systemd-socket-activate`,
//! with a fake `NOTIFY_SOCKET`, a passed listening socket, a changed configuration and SIGHUP)
//! use the same type: [`Daemon::unstarted`], [`Daemon::command`], [`Daemon::spawn_command`],
//! [`Daemon::wait_answering`], [`Daemon::signal`].

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use jsonrpsee::async_client::Client;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

/// Directory holding the workspace's built binaries (next to the test executable's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn corald_bin() -> PathBuf {
    bin_dir().join("corald")
}

pub fn coralctl_bin() -> PathBuf {
    bin_dir().join("coralctl")
}

/// A `coralctl bridge` started on an ephemeral loopback port: the process (killed on drop),
/// its stdout (keep it open: the bridge must not get EPIPE on later prints) and the port.
pub struct StartedBridge {
    pub child: tokio::process::Child,
    pub stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
    pub port: u16,
}

/// `coralctl --socket SOCKET bridge --listen 127.0.0.1:0 EXTRA…`, its stderr to `stderr`, once
/// it has printed the address it listens on. `log`: the file `stderr` writes, shown when no
/// address comes.
pub async fn start_bridge(
    socket: &Path,
    extra: &[&str],
    stderr: Stdio,
    log: Option<&Path>,
) -> Result<StartedBridge> {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(coralctl_bin())
        .arg("--socket")
        .arg(socket)
        .args(["bridge", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env_remove("CORAL_BRIDGE_TOKEN")
        .env_remove("CORAL_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", coralctl_bin().display()))?;
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().context("no stdout")?);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line))
        .await
        .context("the bridge printed nothing within 30 s")??;
    // "coralctl bridge: listening on http://127.0.0.1:PORT/ (…)"
    let port = line
        .split("http://127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse::<u16>().ok())
        .with_context(|| {
            let log =
                log.map(|l| format!("; log:\n{}", std::fs::read_to_string(l).unwrap_or_default()));
            format!(
                "no listening address in {line:?}{}",
                log.unwrap_or_default()
            )
        })?;
    Ok(StartedBridge {
        child,
        stdout,
        port,
    })
}

/// A temporary directory an unprivileged PostgreSQL user can traverse (tests run as root in CI).
pub fn traversable_tempdir() -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("coral-test-").tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    Ok(dir)
}

/// Whether the test runs as root (some tests need it, others behave differently under it).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Variables a service manager may have set for the test runner itself: corald must not
/// inherit them (a test that wants them sets its own).
const SERVICE_MANAGER_ENV: [&str; 4] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "LISTEN_FDS",
    "JOURNAL_STREAM",
];

/// How long [`Daemon::terminate`] waits after SIGTERM before it kills.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

/// A corald process with its own temporary directory: state directory (so its own managed
/// PostgreSQL), socket, configuration file and log.
///
/// Most tests call [`Daemon::start`] (or a variant), which starts corald directly and waits
/// until it answers. Tests that start it their own way (through a wrapper program such as
/// `systemd-socket-activate` or `unshare`, with a fake `NOTIFY_SOCKET`, a passed file
/// descriptor, …) take [`Daemon::unstarted`], build the command with [`Daemon::command`],
/// adjust it, and hand it to [`Daemon::spawn_command`]. Either way the process is stopped
/// (SIGTERM, then SIGKILL) on drop, with its PostgreSQL.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// corald's stdout and stderr, appended to across restarts.
    pub log: PathBuf,
    /// The configuration file in `dir` (see [`Daemon::write_config`]); passed to corald unless
    /// the start arguments name their own `--config`.
    pub config: PathBuf,
    child: Option<Child>,
    extra_args: Vec<String>,
    /// Run corald in a user namespace where this uid and gid are unmapped (see
    /// [`Daemon::start_hiding_owner`]).
    hide_owner: Option<u32>,
    extra_env: Vec<(String, String)>,
}

impl Daemon {
    /// Start corald in a fresh temporary state directory and wait until it answers.
    pub async fn start() -> Result<Daemon> {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra_args: &[&str]) -> Result<Daemon> {
        Self::start_opts(extra_args, None, &[]).await
    }

    /// [`Daemon::start_with`], with extra environment variables for corald (test hooks).
    pub async fn start_with_env(extra_args: &[&str], env: &[(&str, &str)]) -> Result<Daemon> {
        Self::start_opts(extra_args, None, env).await
    }

    /// Start corald (the test must run as root) in a new user namespace that maps every uid
    /// and gid to itself except `id`: corald is still root there and runs as usual, but files
    /// and directories owned by `id` are foreign to it, so their permission bits apply (mode
    /// 000 means "permission denied", as for any non-root reader). Needs `unshare` (util-linux)
    /// and a kernel that allows user namespaces; the error says so when either is missing.
    pub async fn start_hiding_owner(extra_args: &[&str], id: u32) -> Result<Daemon> {
        ensure!(
            is_root(),
            "start_hiding_owner needs root (it writes another process's uid_map)"
        );
        ensure!(
            id > 0 && id < 65_534,
            "hidden id {id} must be between 1 and 65533"
        );
        Self::start_opts(extra_args, Some(id), &[]).await
    }

    /// A corald not started yet, for a test that starts it its own way: a fresh temporary
    /// directory with an empty configuration file (corald's defaults, file watching included)
    /// that [`Daemon::write_config`] replaces. Start it with [`Daemon::command`] and
    /// [`Daemon::spawn_command`].
    pub fn unstarted() -> Result<Daemon> {
        Self::in_new_dir(&[], "", None, &[])
    }

    async fn start_opts(
        extra_args: &[&str],
        hide_owner: Option<u32>,
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        // Tests assert exact scan counts: no watcher-triggered scans unless a test asks for
        // them with its own configuration.
        let mut d = Self::in_new_dir(extra_args, "[watch]\nenabled = false\n", hide_owner, env)?;
        d.spawn().await?;
        Ok(d)
    }

    /// The paths in a fresh traversable temporary directory; unless `extra_args` name a
    /// `--config`, `config` is written there and passed.
    fn in_new_dir(
        extra_args: &[&str],
        config: &str,
        hide_owner: Option<u32>,
        env: &[(&str, &str)],
    ) -> Result<Daemon> {
        let dir = traversable_tempdir()?;
        let config_path = dir.path().join("corald.toml");
        let mut extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        if !extra_args.iter().any(|a| a == "--config") {
            std::fs::write(&config_path, config)?;
            extra_args.push("--config".into());
            extra_args.push(config_path.to_string_lossy().into_owned());
        }
        Ok(Daemon {
            socket: dir.path().join("corald.sock"),
            state_dir: dir.path().join("state"),
            log: dir.path().join("corald.log"),
            config: config_path,
            dir,
            child: None,
            extra_args,
            hide_owner,
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    /// Replace the extra environment (test hooks) of the next [`Daemon::spawn`].
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.extra_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Replace the configuration file (corald rereads it on SIGHUP).
    pub fn write_config(&self, text: &str) -> Result<()> {
        std::fs::write(&self.config, text)?;
        Ok(())
    }

    /// `prefix` (a wrapper program and its arguments, or nothing) then corald with this
    /// instance's socket, state directory, arguments (configuration file included) and
    /// environment; stdin is `/dev/null`, and variables a service manager sets are removed.
    pub fn command(&self, prefix: &[&str]) -> Command {
        let mut cmd = match prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(corald_bin());
                c
            }
            None => Command::new(corald_bin()),
        };
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(&self.extra_args)
            .env_remove("CORAL_CONFIG");
        for var in SERVICE_MANAGER_ENV {
            cmd.env_remove(var);
        }
        cmd.env("RUST_LOG", "info,corald=debug")
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    /// Start `cmd` (from [`Daemon::command`], adjusted by the test) with its stdout and stderr
    /// appended to the log, and return at once: the test waits for what it needs (see
    /// [`Daemon::wait_answering`]).
    pub fn spawn_command(&mut self, cmd: Command) -> Result<()> {
        let what = format!("starting {}", cmd.get_program().to_string_lossy());
        self.child = Some(self.launch(cmd).context(what)?);
        Ok(())
    }

    /// `cmd` with stdout and stderr appended to the log.
    fn launch(&self, mut cmd: Command) -> std::io::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        cmd.stdout(log.try_clone()?).stderr(log).spawn()
    }

    /// (Re)start the process on the same state directory and socket, and wait until it
    /// answers.
    pub async fn spawn(&mut self) -> Result<()> {
        let child = match self.hide_owner {
            // `sh` waits for one line on stdin (sent once the id maps are written), then
            // becomes corald: the pid stays the same from `unshare` to corald.
            Some(id) => {
                let mut cmd = self.command(&[
                    "unshare",
                    "--user",
                    "--",
                    "sh",
                    "-c",
                    "read -r _ && exec \"$0\" \"$@\" </dev/null",
                ]);
                cmd.stdin(Stdio::piped());
                let mut child = self
                    .launch(cmd)
                    .context("starting corald through `unshare --user` (util-linux)")?;
                if let Err(e) = map_ids_except(&mut child, id) {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
                child
            }
            None => self
                .launch(self.command(&[]))
                .with_context(|| format!("starting {}", corald_bin().display()))?,
        };
        self.child = Some(child);
        let socket = self.socket.clone();
        self.wait_answering(&socket).await?;
        Ok(())
    }

    /// Wait until the API answers `daemon.status` on `socket` (this instance's own, or one
    /// passed to it by socket activation); fails if the process exits first or after 90 s.
    pub async fn wait_answering(&mut self, socket: &Path) -> Result<coral_proto::DaemonStatus> {
        use coral_proto::CoralApiClient;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(c) = coral_proto::client::connect(socket).await
                && let Ok(s) = c.daemon_status().await
            {
                return Ok(s);
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "corald exited with {status} during start-up:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!("corald did not answer within 90 s:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The process's pid (corald's, or that of the wrapper it was started through until the
    /// wrapper execs it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running (false once it exited or was killed).
    pub fn running(&mut self) -> Result<bool> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?.is_none()),
            None => Ok(false),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn client(&self) -> Result<Client> {
        Ok(coral_proto::client::connect(&self.socket).await?)
    }

    /// Send `signal` to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = self.pid().context("corald is not running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid)?), signal)?;
        Ok(())
    }

    /// SIGKILL the daemon (its PostgreSQL keeps running, as after a crash).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait for the exit (SIGKILL and fail after 40 s); returns the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        let mut c = self.child.take().context("corald is not running")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("corald did not stop within {STOP_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A direct connection to the daemon's managed database (for assertions on rows).
    pub async fn db(&self) -> Result<PgConnection> {
        Ok(PgConnection::connect_with(&self.db_options()?).await?)
    }

    /// A pool of up to `max` connections to the daemon's managed database (for driving
    /// corald's library code, e.g. the embedder, against it).
    pub async fn pool(&self, max: u32) -> Result<sqlx::PgPool> {
        Ok(sqlx::postgres::PgPoolOptions::new()
            .max_connections(max)
            .connect_with(self.db_options()?)
            .await?)
    }

    fn db_options(&self) -> Result<PgConnectOptions> {
        let pid_file = self.state_dir.join("postgres/postmaster.pid");
        let text = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))?;
        let socket_dir = text
            .lines()
            .nth(4)
            .context("postmaster.pid has no socket directory line")?;
        Ok(PgConnectOptions::new()
            .socket(socket_dir)
            .username("coral")
            .database("coral"))
    }

    /// Run coralctl against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new(coralctl_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("CORAL_SOCKET")
            .output()?)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.terminate();
        }
        // A SIGKILLed daemon leaves its PostgreSQL running: stop it so temp dirs can go.
        stop_leftover_postgres(&self.state_dir);
    }
}

/// Once `child` (`unshare --user … sh`) is in its new user namespace, map every uid and gid
/// below 65536 to itself except `hidden`, then let it go on to exec corald.
fn map_ids_except(child: &mut Child, hidden: u32) -> Result<()> {
    use std::io::Write;
    let pid = child.id();
    let ours = std::fs::read_link("/proc/self/ns/user")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("`unshare --user` exited with {status} (are user namespaces allowed here?)");
        }
        match std::fs::read_link(format!("/proc/{pid}/ns/user")) {
            Ok(ns) if ns != ours => break,
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("`unshare --user` did not enter a new user namespace within 10 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let above = hidden + 1;
    // One write per file: the kernel takes a map in a single write only.
    let map = format!("0 0 {hidden}\n{above} {above} {}\n", 65_536 - above);
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, &map).with_context(|| format!("writing {path}"))?;
    }
    let mut stdin = child
        .stdin
        .take()
        .context("no stdin pipe to release the child")?;
    stdin.write_all(b"go\n")?;
    Ok(())
}

/// Stop (SIGQUIT) the managed PostgreSQL of `state_dir` if a corald that did not stop cleanly
/// left it running, and wait up to 10 s for it to go.
pub fn stop_leftover_postgres(state_dir: &Path) {
    let data = state_dir.join("postgres");
    if let Ok(text) = std::fs::read_to_string(data.join("postmaster.pid"))
        && let Some(pid) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGQUIT,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while data.join("postmaster.pid").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// A WebSocket client on corald's Unix socket, written by hand, that sends `subscriptions`
/// `scan.subscribe` calls and then never reads another byte: the server's notifications pile
/// up against it.
pub fn stuck_subscriber(
    socket: &Path,
    subscriptions: usize,
) -> Result<std::os::unix::net::UnixStream> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )?;
    // The response head, byte by byte: nothing after it is consumed.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 101"),
        "no websocket upgrade: {}",
        String::from_utf8_lossy(&head)
    );
    for id in 0..subscriptions {
        let payload =
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"scan.subscribe","params":[]}}"#);
        let len = u16::try_from(payload.len()).context("frame too long")?;
        // One masked text frame.
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81u8];
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&len.to_be_bytes());
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        s.write_all(&frame)?;
    }
    Ok(s)
}

/// Poll `f` until it returns `Some`, or fail after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until scan `id` reaches a terminal phase; returns its final progress.
pub async fn wait_scan(client: &Client, id: uuid::Uuid) -> Result<coral_proto::ScanProgress> {
    use coral_proto::CoralApiClient;
    eventually(Duration::from_secs(180), "the scan to end", || async {
        client
            .scan_get(id)
            .await
            .ok()
            .filter(|p| p.phase.is_terminal())
    })
    .await
}

/// Add a library and wait for its first (library_added) scan to end.
pub async fn add_and_scan(
    client: &Client,
    root: &Path,
) -> Result<(i64, coral_proto::ScanProgress)> {
    use coral_proto::CoralApiClient;
    let lib = client
        .library_add(root.to_string_lossy().into_owned())
        .await?;
    let id = lib
        .last_scan
        .as_ref()
        .map(|s| s.scan.request_id)
        .context("library.add queued no scan")?;
    Ok((lib.id, wait_scan(client, id).await?))
}

/// Start a scan and wait for it.
pub async fn scan(
    client: &Client,
    library_id: i64,
    path: Option<&str>,
    full: bool,
) -> Result<coral_proto::ScanProgress> {
    use coral_proto::{CoralApiClient, LibrarySelector};
    let started = client
        .scan_start(
            LibrarySelector::Id(library_id),
            path.map(str::to_owned),
            Some(full),
        )
        .await?;
    wait_scan(client, started.request_id).await
}
