//! The `[watch]` section of the configuration: its keys, defaults and validation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// The `[watch]` section of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WatchConfig {
    /// Watch libraries for changes and scan what changed.
    pub enabled: bool,
    /// Quiet period before changes are scanned, in milliseconds.
    pub debounce_ms: u64,
    /// Seconds between incremental scans of libraries that cannot use inotify (network or
    /// FUSE filesystems, or the watch limit was reached).
    pub poll_interval_s: u64,
    /// A file open for writing holds its directory back until closed, or until it has seen no
    /// write for this many seconds.
    pub write_timeout_s: u64,
    /// How often a paused library's root is checked for its return (and a watched root for
    /// having been replaced or mounted over), in seconds.
    pub root_check_s: u64,
    /// Run an incremental scan of every watched library when corald starts.
    pub scan_on_start: bool,
    /// Library roots (or folders containing them) that are never watched.
    pub exclude_libraries: Vec<PathBuf>,
    /// Most inotify watches corald may hold in all (0: only the kernel's
    /// `fs.inotify.max_user_watches` limits). Reaching it acts exactly like the kernel's limit.
    pub max_watches: u64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            enabled: true,
            debounce_ms: 2000,
            poll_interval_s: 300,
            write_timeout_s: 60,
            root_check_s: 10,
            scan_on_start: true,
            exclude_libraries: Vec::new(),
            max_watches: 0,
        }
    }
}

impl WatchConfig {
    /// Check ranges; called by `Config::validate`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| {
            Err(ConfigError::Invalid {
                key,
                problem: problem.to_owned(),
            })
        };
        if !(10..=600_000).contains(&self.debounce_ms) {
            return invalid("watch.debounce_ms", "must be between 10 and 600000");
        }
        if !(1..=604_800).contains(&self.poll_interval_s) {
            return invalid("watch.poll_interval_s", "must be between 1 and 604800");
        }
        if !(1..=86_400).contains(&self.write_timeout_s) {
            return invalid("watch.write_timeout_s", "must be between 1 and 86400");
        }
        if !(1..=3600).contains(&self.root_check_s) {
            return invalid("watch.root_check_s", "must be between 1 and 3600");
        }
        if let Some(p) = self.exclude_libraries.iter().find(|p| !p.is_absolute()) {
            return Err(ConfigError::Invalid {
                key: "watch.exclude_libraries",
                problem: format!("must list absolute paths ({} is not)", p.display()),
            });
        }
        Ok(())
    }

    pub fn debounce(&self) -> Duration {
        Duration::from_millis(self.debounce_ms)
    }

    /// Whether the library at `root` (canonical) is opted out.
    pub fn is_excluded(&self, root: &Path) -> bool {
        self.exclude_libraries.iter().any(|e| {
            let e = std::fs::canonicalize(e).unwrap_or_else(|_| e.clone());
            root.starts_with(&e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_validation() {
        let c = WatchConfig::default();
        assert!(c.validate().is_ok());
        assert_eq!(c.debounce(), Duration::from_secs(2));
        let bad = WatchConfig {
            debounce_ms: 0,
            ..WatchConfig::default()
        };
        let e = bad.validate().expect_err("zero debounce").to_string();
        assert!(e.contains("watch.debounce_ms"), "{e}");
        let bad = WatchConfig {
            exclude_libraries: vec![PathBuf::from("relative/music")],
            ..WatchConfig::default()
        };
        let e = bad.validate().expect_err("relative").to_string();
        assert!(e.contains("watch.exclude_libraries"), "{e}");
    }

    #[test]
    fn exclusions_cover_the_folder_and_below() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(dir.path()).expect("canonical");
        let c = WatchConfig {
            exclude_libraries: vec![root.join("nas")],
            ..WatchConfig::default()
        };
        assert!(c.is_excluded(&root.join("nas")));
        assert!(c.is_excluded(&root.join("nas/music")));
        assert!(!c.is_excluded(&root.join("nasx")));
        assert!(!c.is_excluded(&root));
    }
}
