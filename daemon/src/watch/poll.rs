//! What the watcher checks without inotify: whether a library root is there (and is the same
//! filesystem as before), the kernel's watch limit, and the wording of the fallback warnings.
//!
//! A root counts as *back* when it is a readable directory and either sits on the device it was
//! on when it was last watched or is not empty. An empty directory on another device is the
//! bare mount point of an unmounted disk: the library stays paused, so nothing is scanned (and
//! nothing deleted) until the disk is mounted again.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Where the kernel keeps the per-user inotify watch limit.
pub const MAX_USER_WATCHES: &str = "/proc/sys/fs/inotify/max_user_watches";

/// The state of a library root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootState {
    /// A readable directory: its device and inode, and whether it has any entry.
    Present { dev: u64, ino: u64, empty: bool },
    /// Missing, not a directory or unreadable, with the reason.
    Unavailable(String),
}

impl RootState {
    pub fn identity(&self) -> Option<(u64, u64)> {
        match self {
            RootState::Present { dev, ino, .. } => Some((*dev, *ino)),
            RootState::Unavailable(_) => None,
        }
    }
}

/// Look at `root` (following symbolic links).
pub fn check_root(root: &Path) -> RootState {
    let md = match std::fs::metadata(root) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return RootState::Unavailable(format!(
                "{} does not exist (unmounted or removed?)",
                root.display()
            ));
        }
        Err(e) => {
            return RootState::Unavailable(format!("{} cannot be read: {e}", root.display()));
        }
    };
    if !md.is_dir() {
        return RootState::Unavailable(format!("{} is not a directory", root.display()));
    }
    match std::fs::read_dir(root) {
        Ok(mut entries) => RootState::Present {
            dev: md.dev(),
            ino: md.ino(),
            empty: entries.next().is_none(),
        },
        Err(e) => RootState::Unavailable(format!("{} cannot be read: {e}", root.display())),
    }
}

/// Whether a paused library's root is back (see the module doc).
pub fn root_is_back(state: &RootState, last_dev: Option<u64>) -> bool {
    match state {
        RootState::Present { dev, empty, .. } => !*empty || last_dev.is_none_or(|d| d == *dev),
        RootState::Unavailable(_) => false,
    }
}

/// The kernel's per-user watch limit, if readable.
pub fn max_user_watches() -> Option<u64> {
    std::fs::read_to_string(MAX_USER_WATCHES)
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The warning for a library that hit the watch limit.
pub fn watch_limit_warning(
    root: &Path,
    needed: u64,
    held_elsewhere: u64,
    configured_limit: Option<u64>,
    kernel_limit: Option<u64>,
    poll_interval_s: u64,
) -> String {
    let want = needed + held_elsewhere;
    let kernel = kernel_limit.map_or_else(|| "unknown".to_owned(), |v| v.to_string());
    let which = match configured_limit {
        Some(c) => format!(
            "the configured limit watch.max_watches = {c} was reached \
             (the kernel's fs.inotify.max_user_watches is {kernel})"
        ),
        None => format!("fs.inotify.max_user_watches ({kernel}) was reached"),
    };
    let fix = match configured_limit {
        Some(_) => format!("raise watch.max_watches to at least {want}"),
        None => format!(
            "raise it to at least {want} plus what other programs of this user hold \
             (e.g. `sysctl fs.inotify.max_user_watches={}` and the same line in \
             /etc/sysctl.d/), then restart corald",
            suggested(want, kernel_limit)
        ),
    };
    format!(
        "inotify watch limit: watching {} needs {needed} watches (one per directory) and \
         corald holds {held_elsewhere} for other libraries, but {which}; {fix}. Until then \
         this library is polled every {poll_interval_s} s",
        root.display()
    )
}

/// A round number comfortably above both `want` and the current limit.
fn suggested(want: u64, current: Option<u64>) -> u64 {
    let floor = want
        .saturating_mul(2)
        .max(current.unwrap_or(0).saturating_mul(2));
    floor.max(524_288).next_power_of_two()
}

/// The note for a library on a network or FUSE filesystem.
pub fn remote_fs_note(fs_type: &str, mount_point: &Path, poll_interval_s: u64) -> String {
    format!(
        "on a {fs_type} filesystem ({}): inotify does not see changes made by other machines \
         there, so this library is polled every {poll_interval_s} s",
        mount_point.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_present_missing_and_mount_points() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("music");
        assert!(
            matches!(check_root(&root), RootState::Unavailable(m) if m.contains("does not exist"))
        );
        std::fs::create_dir(&root).expect("mkdir");
        let st = check_root(&root);
        let RootState::Present { dev, empty, .. } = st else {
            panic!("present expected: {st:?}");
        };
        assert!(empty);
        assert!(root_is_back(&st, Some(dev)), "same device, empty: back");
        assert!(
            !root_is_back(&st, Some(dev + 1)),
            "empty on another device: an unmounted mount point"
        );
        std::fs::write(root.join("a.mp3"), b"x").expect("write");
        let st = check_root(&root);
        assert!(root_is_back(&st, Some(dev + 1)), "not empty: back");
        std::fs::remove_file(root.join("a.mp3")).expect("rm");
        std::fs::remove_dir(&root).expect("rmdir");
        std::fs::write(&root, b"x").expect("file");
        assert!(
            matches!(check_root(&root), RootState::Unavailable(m) if m.contains("not a directory"))
        );
    }

    #[test]
    fn the_limit_warning_names_the_sysctl_and_the_numbers() {
        let w = watch_limit_warning(Path::new("/music"), 1200, 34, None, Some(8192), 300);
        assert!(w.contains("fs.inotify.max_user_watches"), "{w}");
        assert!(w.contains("8192"), "{w}");
        assert!(w.contains("needs 1200 watches"), "{w}");
        assert!(w.contains("at least 1234"), "{w}");
        assert!(w.contains("polled every 300 s"), "{w}");
        let w = watch_limit_warning(Path::new("/music"), 12, 0, Some(5), Some(8192), 60);
        assert!(w.contains("watch.max_watches = 5"), "{w}");
        assert!(w.contains("fs.inotify.max_user_watches is 8192"), "{w}");
        assert_eq!(suggested(1000, Some(8192)), 524_288);
        assert_eq!(suggested(400_000, Some(8192)), 1_048_576);
    }
}
