//! What the server is started with: its Unix socket directory (`<data_dir>/run`, or a short
//! private fallback when that path is too long for a socket) and the settings corald rewrites
//! into `coral.conf` at every start, included from `postgresql.conf`.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::unistd::Uid;

use super::runner::{Runner, write_file};
use super::{ManagedPostgresError, PORT, Result, io_err, make_private_dir};

/// `sun_path` holds 108 bytes including the terminating NUL.
pub(super) const MAX_SOCKET_PATH: usize = 107;
const SETTINGS_FILE: &str = "coral.conf";
const INCLUDE_LINE: &str = "include_if_exists 'coral.conf'";

/// The socket file path for a socket directory.
pub(super) fn socket_file(dir: &Path) -> PathBuf {
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
pub(super) fn prepare_socket_dir(data_dir: &Path, runner: &Runner) -> Result<PathBuf> {
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

fn quote_conf(value: &Path) -> String {
    format!("'{}'", value.to_string_lossy().replace('\'', "''"))
}

/// Writes the settings corald manages (rewritten at every start) and makes sure
/// `postgresql.conf` includes them.
pub(super) fn write_settings(data_dir: &Path, socket_dir: &Path, runner: &Runner) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::super::ManagedPostgres;
    use super::super::tests::{config, temp_dir, vector_version};
    use super::*;

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

    #[test]
    fn socket_dir_rules() {
        assert!(socket_dir_usable(Path::new("/var/lib/coral/postgres/run")));
        assert!(!socket_dir_usable(Path::new("/a,b/run")));
        let long = PathBuf::from(format!("/{}", "x".repeat(100)));
        assert!(!socket_dir_usable(&long));
        assert_eq!(quote_conf(Path::new("/it's")), "'/it''s'");
    }
}
