//! The server's lock file, `postmaster.pid`: what it says checked against the live process
//! table (absent, stale, or our postmaster running), whether a process is alive (zombies count
//! as dead) and is this data directory's postmaster, and the removal of a lock left by a dead
//! server.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

use super::{Result, io_err};

/// What `postmaster.pid` says, checked against the live process table.
#[derive(Debug, PartialEq)]
pub(super) enum Postmaster {
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

pub(super) fn read_postmaster(data_dir: &Path) -> Postmaster {
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

pub(super) fn process_alive(pid: i32) -> bool {
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
pub(super) fn remove_stale_lock(data_dir: &Path, pid: i32) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::super::ManagedPostgres;
    use super::super::tests::{config, start_in_temp_dir, vector_version};

    #[tokio::test]
    async fn stale_pid_file_does_not_block_start() {
        let (_tmp, data, mut pg) = start_in_temp_dir().await;
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
}
