//! corald as a systemd service, with real processes and fake service-manager
//! endpoints.
//!
//! - A fake `NOTIFY_SOCKET` (`coral_tests::notify_socket`: a Unix datagram socket this test
//!   reads): `READY=1` only once the API socket accepts, `STATUS=` changing during a scan,
//!   `WATCHDOG=1` at half `WATCHDOG_USEC`, `RELOADING=1` then `READY=1` on SIGHUP with a
//!   library added to the configuration (and one removed), `STOPPING=1` on SIGTERM.
//! - An external database that cannot be reached at start-up: `READY=1` once the socket
//!   accepts, `STATUS=` saying what corald waits for, watchdog pings meanwhile.
//! - The watchdog stops pinging when the scan worker is really wedged (the debug-build hook
//!   `CORALD_TEST_WEDGE_WORKER` makes the worker block on a job without heartbeats).
//! - Socket activation: a socket this test binds, passed as fd 3 with `LISTEN_FDS`/`LISTEN_PID`
//!   (and, where installed, through `systemd-socket-activate`); corald serves on it and binds
//!   nothing.
//! - Peer credentials (as root: clients run as `nobody` through `setpriv`): refused outside the
//!   socket group with a 403, admitted with the group as a supplementary group.
//! - journald fields: corald in a private mount namespace whose `/run/systemd/journal/socket` is
//!   a fake journald (`coral_tests::journald`: a datagram socket this test parses).
//! - The packaged units pass `systemd-analyze verify`; the packaged default configuration parses.
//!
//! Tests that need root or a tool that is missing say so on stderr and pass without checking.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use coral_proto::CoralApiClient;
use coral_tests::daemon::{
    Daemon, coralctl_bin, corald_bin, eventually, is_root, traversable_tempdir,
};
use coral_tests::fixtures;
use coral_tests::journald::{JournalEntry, JournalSocket};
use coral_tests::notify_socket::NotifySocket;
use corald::config::Config;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

/// An existing group other than root's and nobody's, for the socket-group checks.
fn test_group() -> Option<(String, u32)> {
    ["audio", "users", "video", "staff"]
        .iter()
        .find_map(|name| {
            nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .filter(|g| g.gid.as_raw() != 0 && g.gid.as_raw() != 65534)
                .map(|g| (g.name, g.gid.as_raw()))
        })
}

fn toml_str(p: &Path) -> String {
    format!("{:?}", p.to_string_lossy())
}

/// Starts `d` with a fake `NOTIFY_SOCKET` in its directory and `WATCHDOG_USEC` = 1 s (`tweak`
/// adjusts the command further), then waits up to `timeout` for READY=1: the socket, and the
/// index of READY=1 among its notifications.
async fn start_notified(
    d: &mut Daemon,
    tweak: impl FnOnce(&mut Command),
    timeout: Duration,
) -> Result<(NotifySocket, usize)> {
    let notify = NotifySocket::bind(d.dir.path().join("notify"), d.socket.clone())?;
    let mut cmd = d.command(&[]);
    cmd.env("NOTIFY_SOCKET", notify.path())
        .env("WATCHDOG_USEC", "1000000");
    tweak(&mut cmd);
    d.spawn_command(cmd)?;
    let ready = notify
        .wait_for(0, "READY=1", timeout, |n| n.has("READY=1"))
        .await?;
    Ok((notify, ready))
}

/// How many WATCHDOG=1 notifications `notify` receives over the next `window`.
async fn watchdog_pings_during(notify: &NotifySocket, window: Duration) -> usize {
    let window_start = Instant::now();
    tokio::time::sleep(window).await;
    notify
        .all()
        .iter()
        .filter(|n| n.at >= window_start && n.has("WATCHDOG=1"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_notify_socket_sees_ready_status_watchdog_reload_and_stopping() -> Result<()> {
    fixtures::require_ffmpeg()?;
    let music = traversable_tempdir()?;
    let files = fixtures::big_library(music.path(), 1000)?;
    let lib = std::fs::canonicalize(music.path())?;

    let mut d = Daemon::unstarted()?;
    let group = test_group();
    let rpc = match &group {
        Some((name, _)) => format!("[rpc]\ngroup = \"{name}\"\n"),
        None => String::new(),
    };
    d.write_config(&format!("log = \"info\"\n{rpc}"))?;
    // READY=1 comes once the socket accepts (the reader connected when it arrived).
    let (notify, ready) = start_notified(
        &mut d,
        |cmd| {
            // The file's `log` applies, so a reload can change it.
            cmd.env_remove("RUST_LOG");
        },
        Duration::from_secs(120),
    )
    .await?;
    let n = &notify.all()[ready];
    assert_eq!(n.socket_accepted, Some(true), "{n:?}");
    assert_eq!(n.status(), Some("idle · 0 tracks"), "{n:?}");
    // Nothing announced readiness before (a child such as PostgreSQL must not either).
    assert!(
        notify.all()[..ready].iter().all(|n| !n.has("READY=1")),
        "{:?}",
        notify.texts()
    );
    let status = d.wait_answering(&d.socket.clone()).await?;
    assert_eq!(status.pid, d.pid().context("corald is not running")?);
    if let Some((_, gid)) = &group {
        let md = std::fs::metadata(&d.socket)?;
        assert_eq!(md.mode() & 0o777, 0o660, "socket mode");
        assert_eq!(md.gid(), *gid, "socket group");
    }

    // WATCHDOG=1 every half WATCHDOG_USEC (500 ms) while idle: about 8 in 4 s (a loaded
    // machine may delay a few).
    let pings = watchdog_pings_during(&notify, Duration::from_secs(4)).await;
    assert!(
        (5..=10).contains(&pings),
        "{pings} watchdog pings in 4 s; expected about 8"
    );

    // SIGHUP with a library added to the configuration: RELOADING=1, then READY=1, then the
    // scan of the new library shows in STATUS until it ends.
    d.write_config(&format!(
        "log = \"debug\"\nlibraries = [{}]\n{rpc}",
        toml_str(&lib)
    ))?;
    let before = notify.all().len();
    d.signal(nix::sys::signal::Signal::SIGHUP)?;
    let reloading = notify
        .wait_for(before, "RELOADING=1", Duration::from_secs(10), |n| {
            n.has("RELOADING=1")
        })
        .await?;
    assert!(
        notify.all()[reloading]
            .text
            .lines()
            .any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{:?}",
        notify.all()[reloading]
    );
    notify
        .wait_for(
            reloading + 1,
            "READY=1 after the reload",
            Duration::from_secs(10),
            |n| n.has("READY=1"),
        )
        .await?;
    let scanning = format!("scanning {}", lib.display());
    notify
        .wait_for(before, "a scanning STATUS", Duration::from_secs(60), |n| {
            n.status().is_some_and(|s| s.starts_with(&scanning))
        })
        .await?;
    let idle = format!("idle · {} tracks", coral_tests_thousands(files));
    notify
        .wait_for(
            before,
            "the idle STATUS after the scan",
            Duration::from_secs(180),
            |n| n.status() == Some(idle.as_str()),
        )
        .await?;
    let c = coral_proto::client::connect(&d.socket).await?;
    let libs = c.library_list().await?;
    assert_eq!(libs.len(), 1, "{libs:?}");
    assert_eq!(Path::new(&libs[0].path), lib);
    let log = d.log_text();
    assert!(log.contains("log filter changed"), "{log}");
    assert!(
        log.contains("library from the configuration added"),
        "{log}"
    );
    // The log filter really changed: debug lines appear after the reload.
    assert!(log.contains("DEBUG"), "{log}");

    // SIGHUP with the library removed from the list: it is forgotten.
    d.write_config(&format!("log = \"debug\"\n{rpc}"))?;
    let before = notify.all().len();
    d.signal(nix::sys::signal::Signal::SIGHUP)?;
    notify
        .wait_for(
            before,
            "READY=1 after the second reload",
            Duration::from_secs(10),
            |n| n.has("READY=1"),
        )
        .await?;
    eventually(
        Duration::from_secs(10),
        "the library to be removed",
        || async { c.library_list().await.ok().filter(|l| l.is_empty()) },
    )
    .await?;
    let statuses = notify.statuses(0);
    assert!(
        statuses.iter().any(|s| s.starts_with(&scanning)) && statuses.len() >= 3,
        "STATUS must change during the scan: {statuses:?}"
    );

    // SIGTERM: STOPPING=1, clean exit.
    let before = notify.all().len();
    let exit = d.terminate()?;
    assert!(exit.success(), "{exit}\n{}", d.log_text());
    let all = notify.all();
    assert!(
        all[before..].iter().any(|n| n.has("STOPPING=1")),
        "{:?}",
        notify.texts()
    );
    Ok(())
}

/// Same formatting as corald's STATUS line.
fn coral_tests_thousands(n: usize) -> String {
    corald::systemd::thousands(n as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_an_unreachable_database_is_ready_with_watchdog_pings() -> Result<()> {
    let mut d = Daemon::unstarted()?;
    // An external server that is not there: nothing listens in this directory.
    let nowhere = d.dir.path().join("no-server");
    d.write_config(&format!(
        "[watch]\nenabled = false\n[embed]\nenabled = false\n[database]\nurl = \"postgres://coral@localhost/coral?host={}\"\n",
        nowhere.display()
    ))?;
    // READY=1 once the socket accepts, although the database does not answer: a start timeout
    // must not turn a database outage into a restart loop. STATUS= says what corald waits for.
    let (notify, ready) = start_notified(&mut d, |_| {}, Duration::from_secs(60)).await?;
    let n = &notify.all()[ready];
    assert_eq!(n.socket_accepted, Some(true), "{n:?}");
    let status = n.status().unwrap_or_default();
    assert!(
        status.starts_with("waiting for the database: cannot connect to PostgreSQL at"),
        "{status}"
    );
    let s = d.wait_answering(&d.socket.clone()).await?;
    assert_eq!(
        s.database_health.map(|h| h.state),
        Some(coral_proto::DatabaseState::Unavailable)
    );

    // The watchdog keeps being fed while corald waits (every 500 ms: about 6 in 3 s).
    let pings = watchdog_pings_during(&notify, Duration::from_secs(3)).await;
    assert!(
        pings >= 3,
        "{pings} watchdog pings in 3 s: {:?}",
        notify.texts()
    );

    // SIGTERM while waiting: a clean, prompt stop.
    let began = Instant::now();
    let exit = d.terminate()?;
    assert!(exit.success(), "{exit:?}\n{}", d.log_text());
    assert!(began.elapsed() < Duration::from_secs(10));
    assert!(notify.all().iter().any(|n| n.has("STOPPING=1")));
    assert!(!d.socket.exists(), "the socket file is removed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_stop_when_the_scan_worker_is_wedged() -> Result<()> {
    fixtures::require_ffmpeg()?;
    let music = traversable_tempdir()?;
    let wedge_dir = music.path().join("wedge-the-worker-here");
    fixtures::make_track(
        &wedge_dir,
        &fixtures::FixtureTrack::simple("a.flac", "flac", "A"),
    )?;

    let mut d = Daemon::unstarted()?;
    let (notify, _) = start_notified(
        &mut d,
        |cmd| {
            cmd.env("CORALD_TEST_WEDGE_WORKER", "wedge-the-worker-here");
        },
        Duration::from_secs(120),
    )
    .await?;
    let ready_at = Instant::now();
    notify
        .wait_for(0, "watchdog pings", Duration::from_secs(5), |n| {
            n.has("WATCHDOG=1") && n.at > ready_at + Duration::from_millis(1200)
        })
        .await?;

    // Queue a scan of the library the hook wedges the worker on.
    let c = coral_proto::client::connect(&d.socket).await?;
    c.library_add(wedge_dir.to_string_lossy().into_owned())
        .await?;
    let wedged_at = Instant::now();
    // The worker stops beating; after the 1 s stall limit the pings stop.
    eventually(Duration::from_secs(10), "the pings to stop", || async {
        let last_ping = notify
            .all()
            .iter()
            .filter(|n| n.has("WATCHDOG=1"))
            .map(|n| n.at)
            .max()?;
        (Instant::now().duration_since(last_ping) > Duration::from_millis(2500)).then_some(())
    })
    .await?;
    let log = d.log_text();
    assert!(log.contains("wedging the scan worker"), "{log}");
    assert!(log.contains("withholding watchdog pings"), "{log}");
    // Before the wedge the pings were regular (about every 500 ms).
    let before: Vec<Instant> = notify
        .all()
        .iter()
        .filter(|n| n.has("WATCHDOG=1") && n.at < wedged_at)
        .map(|n| n.at)
        .collect();
    assert!(
        before
            .windows(2)
            .all(|w| w[1].duration_since(w[0]) < Duration::from_millis(1500)),
        "irregular pings before the wedge: {before:?}"
    );
    let exit = d.terminate()?;
    assert!(exit.success(), "{exit}\n{}", d.log_text());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_with_a_passed_fd_serves_without_binding() -> Result<()> {
    let mut d = Daemon::unstarted()?;
    let passed = d.dir.path().join("activated.sock");
    let listener = UnixListener::bind(&passed)?;
    let inode = std::fs::metadata(&passed)?.ino();
    let fd = listener.as_raw_fd();
    // LISTEN_PID must be corald's own pid: the shell exports its pid, then execs corald.
    let mut cmd = d.command(&[
        "/bin/sh",
        "-c",
        r#"LISTEN_PID=$$; LISTEN_FDS=1; export LISTEN_PID LISTEN_FDS; exec "$0" "$@""#,
    ]);
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    d.spawn_command(cmd)?;
    let status = d.wait_answering(&passed).await?;
    assert_eq!(Path::new(&status.socket), passed, "{status:?}");
    assert!(
        !d.socket.exists(),
        "corald bound its configured socket too: {}",
        d.socket.display()
    );
    assert_eq!(
        std::fs::metadata(&passed)?.ino(),
        inode,
        "socket file replaced"
    );
    assert!(
        d.log_text().contains("socket activation"),
        "{}",
        d.log_text()
    );
    let exit = d.terminate()?;
    assert!(exit.success(), "{exit}\n{}", d.log_text());
    // The socket belongs to the service manager: corald leaves it in place.
    assert!(passed.exists());
    drop(listener);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_through_systemd_socket_activate() -> Result<()> {
    if !have("systemd-socket-activate") {
        skip(
            "socket_activation_through_systemd_socket_activate",
            "systemd-socket-activate is not installed (apt package systemd)",
        );
        return Ok(());
    }
    let mut d = Daemon::unstarted()?;
    let passed = d.dir.path().join("activated.sock");
    let listen = format!("--listen={}", passed.display());
    let cmd = d.command(&[
        "systemd-socket-activate",
        &listen,
        "-E",
        "RUST_LOG=info,corald=debug",
        "-E",
        "PATH",
        "-E",
        "HOME",
    ]);
    d.spawn_command(cmd)?;
    eventually(Duration::from_secs(10), "the activation socket", || async {
        passed.exists().then_some(())
    })
    .await?;
    // The first connection makes systemd-socket-activate start corald; it waits in the queue.
    let first = UnixStream::connect(&passed)?;
    let status = d.wait_answering(&passed).await?;
    assert_eq!(Path::new(&status.socket), passed, "{status:?}");
    assert!(!d.socket.exists(), "corald bound its configured socket too");
    drop(first);
    let exit = d.terminate()?;
    assert!(exit.success(), "{exit}\n{}", d.log_text());
    Ok(())
}

/// Run coralctl as `nobody` with the given supplementary groups.
fn ctl_as_nobody(ctl: &Path, socket: &Path, groups: Option<u32>) -> Result<std::process::Output> {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534"]);
    match groups {
        Some(g) => cmd.arg(format!("--groups={g}")),
        None => cmd.arg("--clear-groups"),
    };
    Ok(cmd
        .arg("--")
        .arg(ctl)
        .arg("--socket")
        .arg(socket)
        .arg("status")
        .env_remove("CORAL_SOCKET")
        .output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_credentials_as_root_refuse_nobody_outside_the_group_and_admit_a_member() -> Result<()>
{
    let name = "peer_credentials_as_root_refuse_nobody_outside_the_group_and_admit_a_member";
    if !is_root() {
        skip(name, "needs root to run clients as another user");
        return Ok(());
    }
    if !have("setpriv") {
        skip(name, "setpriv (util-linux) is not installed");
        return Ok(());
    }
    let Some((group, gid)) = test_group() else {
        skip(
            name,
            "no suitable existing group (audio, users, video, staff)",
        );
        return Ok(());
    };
    let mut d = Daemon::unstarted()?;
    // Mode 0666 lets everyone reach the socket, so the peer-credential check is what decides.
    d.write_config(&format!(
        "[rpc]\ngroup = \"{group}\"\nsocket_mode = \"0666\"\n"
    ))?;
    let cmd = d.command(&[]);
    d.spawn_command(cmd)?;
    d.wait_answering(&d.socket.clone()).await?;
    // A copy of coralctl that `nobody` can execute whatever the checkout's permissions.
    let ctl = d.dir.path().join("coralctl");
    std::fs::copy(coralctl_bin(), &ctl)?;
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755))?;

    let refused = ctl_as_nobody(&ctl, &d.socket, None)?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "nobody was admitted: {stderr}");
    assert!(
        stderr.contains("403") || stderr.contains("permission denied"),
        "no clear refusal: {stderr}"
    );
    let log = eventually(Duration::from_secs(5), "the refusal in the log", || async {
        let log = d.log_text();
        log.contains("refused a connection").then_some(log)
    })
    .await?;
    assert!(log.contains("uid=65534"), "{log}");
    assert!(log.contains("pid="), "{log}");

    let admitted = ctl_as_nobody(&ctl, &d.socket, Some(gid))?;
    assert!(
        admitted.status.success(),
        "a member of `{group}` was refused: {}",
        String::from_utf8_lossy(&admitted.stderr)
    );

    // Raw HTTP: the refusal is a 403 with an explanation.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg("sh")
        .arg("-c")
        .arg("command -v curl >/dev/null || exit 99; curl -s -i --unix-socket \"$0\" -d '{}' http://localhost/")
        .arg(&d.socket)
        .output()?;
    if out.status.code() != Some(99) {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("HTTP/1.1 403"), "{text}");
        assert!(text.contains(&format!("`{group}`")), "{text}");
    }
    let exit = d.terminate()?;
    assert!(exit.success(), "{exit}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_journald_receives_request_id_library_track_path_and_phase_fields() -> Result<()> {
    let name = "fake_journald_receives_request_id_library_track_path_and_phase_fields";
    if !is_root() || !have("unshare") {
        skip(
            name,
            "needs root and unshare for a private /run/systemd/journal",
        );
        return Ok(());
    }
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        skip(name, "cannot create a mount namespace here");
        return Ok(());
    }
    fixtures::require_ffmpeg()?;
    let music = traversable_tempdir()?;
    fixtures::make_track(
        music.path(),
        &fixtures::FixtureTrack::simple("good.flac", "flac", "Good"),
    )?;
    let corrupt = fixtures::corrupt_files(music.path())?;
    ensure!(!corrupt.is_empty());
    let lib = std::fs::canonicalize(music.path())?;

    let mut d = Daemon::unstarted()?;
    let journal = JournalSocket::bind(d.dir.path().join("journal"))?;
    // corald's stderr is the journal: JOURNAL_STREAM names it (device:inode), as systemd does.
    let cmd = journal.command(&d)?;
    d.spawn_command(cmd)?;
    d.wait_answering(&d.socket.clone()).await?;
    let c = coral_proto::client::connect(&d.socket).await?;
    let (_, p) = coral_tests::daemon::add_and_scan(&c, &lib).await?;
    let request_id = p.scan.request_id.to_string();
    let exit = d.terminate()?;
    assert!(exit.success(), "{exit}\n{}", d.log_text());

    let entries = journal.entries()?;
    ensure!(
        !entries.is_empty(),
        "no journal entries; corald log:\n{}",
        d.log_text()
    );
    let one =
        |e: &JournalEntry, k: &str| -> Option<String> { e.get(k).and_then(|v| v.first().cloned()) };
    assert!(
        entries
            .iter()
            .any(|e| one(e, "MESSAGE").as_deref() == Some("corald ready")
                && one(e, "SYSLOG_IDENTIFIER").as_deref() == Some("corald")),
        "{entries:?}"
    );
    // Span fields of the scan (request_id, library) on the scan's events, without prefix.
    let finished = entries
        .iter()
        .find(|e| one(e, "MESSAGE").as_deref() == Some("scan finished"))
        .with_context(|| format!("no `scan finished` entry: {entries:?}"))?;
    assert_eq!(
        one(finished, "REQUEST_ID").as_deref(),
        Some(request_id.as_str())
    );
    assert_eq!(
        one(finished, "LIBRARY").as_deref(),
        Some(lib.to_string_lossy().as_ref())
    );
    assert_eq!(one(finished, "PHASE").as_deref(), Some("completed"));
    assert!(!finished.contains_key("F_REQUEST_ID"), "{finished:?}");
    // A file that could not be indexed: TRACK_PATH and PHASE on the event itself.
    let failed = entries
        .iter()
        .find(|e| one(e, "MESSAGE").as_deref() == Some("file not indexed"))
        .with_context(|| format!("no `file not indexed` entry: {entries:?}"))?;
    let track_path = one(failed, "TRACK_PATH").context("no TRACK_PATH")?;
    assert!(
        corrupt
            .iter()
            .any(|c| Path::new(&track_path).file_name() == c.file_name()),
        "{track_path} is not one of {corrupt:?}"
    );
    assert!(Path::new(&track_path).starts_with(&lib), "{track_path}");
    assert_eq!(one(failed, "PHASE").as_deref(), Some("indexing"));
    assert_eq!(
        one(failed, "REQUEST_ID").as_deref(),
        Some(request_id.as_str())
    );
    // Phase changes are entries of their own.
    assert!(
        entries
            .iter()
            .any(|e| one(e, "PHASE").as_deref() == Some("discovering")
                && one(e, "REQUEST_ID").as_deref() == Some(request_id.as_str())),
        "{entries:?}"
    );
    Ok(())
}

#[test]
fn systemd_analyze_verify_accepts_the_packaged_units() -> Result<()> {
    if !have("systemd-analyze") {
        skip(
            "systemd_analyze_verify_accepts_the_packaged_units",
            "systemd-analyze is not installed (apt package systemd)",
        );
        return Ok(());
    }
    // The units name /usr/bin binaries; verify checks that they exist, so point them at the
    // freshly built ones (installed-package verification is the .deb check's job).
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd");
    let dir = tempfile::tempdir()?;
    let mut paths = Vec::new();
    for name in ["corald.service", "corald.socket", "coral-bridge.service"] {
        let text = std::fs::read_to_string(units.join(name))?
            .replace("/usr/bin/corald", &corald_bin().to_string_lossy())
            .replace("/usr/bin/coralctl", &coralctl_bin().to_string_lossy());
        let p = dir.path().join(name);
        std::fs::write(&p, text)?;
        paths.push(p);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.trim().is_empty(), "warnings: {stderr}");
    Ok(())
}

/// The commented default configuration: parses as shipped, and with every `# key = value`
/// line uncommented it still equals the built-in defaults (every documented default is true).
#[test]
fn packaged_default_config_parses_and_documents_the_defaults() -> Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/corald.toml");
    let text = std::fs::read_to_string(&path)?;
    let as_shipped = Config::from_toml(&text, &path)?;
    assert_eq!(as_shipped, Config::default());
    let mut uncommented = 0;
    let active: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                }) =>
            {
                uncommented += 1;
                rest.to_owned()
            }
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(uncommented >= 20, "only {uncommented} settings documented");
    let parsed = Config::from_toml(&active, &path)?;
    assert_eq!(parsed, Config::default(), "a documented default is wrong");
    Ok(())
}

#[test]
fn rpc_settings_are_validated_and_name_their_key() {
    let parse = |t: &str| Config::from_toml(t, Path::new("/etc/coral/corald.toml"));
    let c = parse("[rpc]\ngroup = \"audio\"\nsocket_mode = \"0640\"\n").expect("valid");
    assert_eq!(c.rpc.socket_mode_bits().ok(), Some(0o640));
    for bad in ["\"0888\"", "\"1660\"", "\"0440\"", "\"rw\"", "\"\""] {
        let err = parse(&format!("[rpc]\nsocket_mode = {bad}\n"))
            .expect_err(bad)
            .to_string();
        assert!(err.contains("rpc.socket_mode"), "{err}");
    }
    let err = parse("[rpc]\ngroup = \"a:b\"\n")
        .expect_err("bad group")
        .to_string();
    assert!(err.contains("rpc.group"), "{err}");
    let err = parse("libraries = [\"music\"]\n")
        .expect_err("relative library")
        .to_string();
    assert!(err.contains("libraries"), "{err}");
    let c = parse("libraries = [\"/srv/music\"]\n").expect("valid");
    assert_eq!(c.libraries, vec![PathBuf::from("/srv/music")]);
}
