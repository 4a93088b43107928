//! Who runs the cluster and how its programs are run: the unprivileged user PostgreSQL runs as
//! (PostgreSQL refuses root), the checks that this user can reach the install and the data
//! directory, PostgreSQL's programs started as that user with a clean environment, their
//! failures reported with the end of their output, and files written as that user.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use nix::unistd::{Gid, Uid, User};
use tokio::process::Command;

use super::{ManagedPostgresError, Result, io_err};

/// Fallback unprivileged users when corald runs as root and `run_as` is unset.
const DEFAULT_USERS: [&str; 2] = ["coral", "nobody"];
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

/// The user PostgreSQL's processes run as; `switch` when that needs setuid (corald is root).
#[derive(Debug, Clone)]
pub(super) struct Runner {
    pub(super) name: String,
    pub(super) uid: u32,
    gid: u32,
    switch: bool,
}

fn lookup_user(name: &str) -> Result<Option<User>> {
    User::from_name(name).map_err(|error| ManagedPostgresError::UserLookup {
        user: name.to_string(),
        error,
    })
}

pub(super) fn resolve_runner(run_as: Option<&str>, data_dir: &Path) -> Result<Runner> {
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
    pub(super) fn check_traversable(&self, target: &Path, include_self: bool) -> Result<()> {
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

    pub(super) fn check_executable(&self, path: &Path) -> Result<()> {
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
    pub(super) fn own(&self, path: &Path) -> Result<()> {
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

pub(super) fn pg_command(install: &Path, program: &str, runner: &Runner) -> Command {
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

pub(super) async fn run(mut cmd: Command, what: &str, log: Option<&Path>) -> Result<Output> {
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

/// Replaces `path` atomically with `contents`, owned by the runner, mode 0600.
pub(super) fn write_file(path: &Path, contents: &str, runner: &Runner) -> Result<()> {
    let tmp = path.with_extension("corald-tmp");
    std::fs::write(&tmp, contents).map_err(io_err("write", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("set the mode of", &tmp))?;
    runner.own(&tmp)?;
    std::fs::rename(&tmp, path).map_err(io_err("replace", path))
}

#[cfg(test)]
mod tests {
    use super::super::ManagedPostgres;
    use super::super::tests::{config, start_in_temp_dir};
    use super::*;

    #[tokio::test]
    async fn start_failure_quotes_the_server_log() {
        let (_tmp, data, mut pg) = start_in_temp_dir().await;
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
}
