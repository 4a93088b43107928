//! Default locations shared by corald and its clients, following systemd and XDG conventions.

use std::path::PathBuf;

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn is_root() -> bool {
    // The owner of /proc/self is the process's effective uid; no libc needed.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// First entry of a systemd `*_DIRECTORY` variable (it may list several, colon-separated).
fn systemd_dir(name: &str) -> Option<PathBuf> {
    let v = std::env::var(name).ok()?;
    v.split(':').find(|s| !s.is_empty()).map(PathBuf::from)
}

/// The daemon's socket: `$RUNTIME_DIRECTORY/corald.sock` under systemd, `/run/coral/corald.sock`
/// for root, else `$XDG_RUNTIME_DIR/coral/corald.sock` (or `/tmp/coral-$USER/corald.sock`).
pub fn default_socket_path() -> PathBuf {
    if let Some(dir) = systemd_dir("RUNTIME_DIRECTORY") {
        return dir.join("corald.sock");
    }
    if is_root() {
        return PathBuf::from("/run/coral/corald.sock");
    }
    if let Some(dir) = env_path("XDG_RUNTIME_DIR") {
        return dir.join("coral").join("corald.sock");
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "user".to_owned());
    PathBuf::from(format!("/tmp/coral-{user}/corald.sock"))
}

/// The socket a client should try when none is named: the daemon's default for this user, or
/// the system daemon's `/run/coral/corald.sock` when the former does not exist (a member of the
/// `coral` group talking to the system service).
pub fn default_client_socket_path() -> PathBuf {
    let own = default_socket_path();
    let system = PathBuf::from("/run/coral/corald.sock");
    if !own.exists() && system.exists() {
        system
    } else {
        own
    }
}

/// The daemon's state directory: `$STATE_DIRECTORY` under systemd, `/var/lib/coral` for root,
/// else `${XDG_STATE_HOME:-~/.local/state}/coral`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = systemd_dir("STATE_DIRECTORY") {
        return dir;
    }
    if is_root() {
        return PathBuf::from("/var/lib/coral");
    }
    if let Some(dir) = env_path("XDG_STATE_HOME") {
        return dir.join("coral");
    }
    match env_path("HOME") {
        Some(home) => home.join(".local/state/coral"),
        None => PathBuf::from("/tmp/coral-state"),
    }
}

/// The system-wide configuration file read when no other is named.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/coral/corald.toml";
