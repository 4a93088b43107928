//! Logging: `tracing` with a `RUST_LOG`-style filter, to journald when stderr is the journal
//! (systemd sets `JOURNAL_STREAM`), else human-readable lines on stderr.
//!
//! In the journal, span and event fields become journal fields named after the field,
//! upper-cased and without prefix (`request_id` → `REQUEST_ID`, `library` → `LIBRARY`,
//! `track_path` → `TRACK_PATH`, `phase` → `PHASE`), so `journalctl -u corald REQUEST_ID=…`
//! finds every line of one scan. The filter can be replaced at run time ([`set_filter`], used
//! on SIGHUP).

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Whether stderr is connected to the journal (`JOURNAL_STREAM` names stderr's device:inode).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(md) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse::<u64>() == Ok(md.dev()) && ino.parse::<u64>() == Ok(md.ino())
}

/// Handle to the installed filter, for [`set_filter`].
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Why the log filter could not be replaced.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("`RUST_LOG` is set; it wins over the configured `log` filter")]
    EnvOverride,
    #[error("logging is not initialised")]
    NotInitialised,
    #[error("invalid log filter {filter:?}: {message}")]
    Invalid { filter: String, message: String },
    #[error("cannot replace the log filter: {0}")]
    Reload(String),
}

pub use crate::config::log_filter::parse_filter;

/// Install the global subscriber. `default_filter` applies when `RUST_LOG` is unset.
pub fn init(default_filter: &str) {
    let from_env = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty());
    let filter = from_env
        .ok_or(())
        .and_then(|v| parse_filter(&v).map_err(|_| ()))
        .or_else(|_| parse_filter(default_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    if stderr_is_journal()
        && let Ok(journald) = tracing_journald::layer()
    {
        // No `F_` prefix: `journalctl REQUEST_ID=…` rather than `F_REQUEST_ID=…`.
        let journald = journald.with_field_prefix(None);
        if tracing_subscriber::registry()
            .with(filter)
            .with(journald)
            .try_init()
            .is_ok()
        {
            let _ = FILTER.set(handle);
        }
        return;
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
}

/// Replace the log filter of the running process (the configuration's `log` after a reload).
/// Refused while `RUST_LOG` is set, which always wins.
pub fn set_filter(filter: &str) -> Result<(), LogError> {
    if std::env::var_os("RUST_LOG").is_some_and(|v| !v.is_empty()) {
        return Err(LogError::EnvOverride);
    }
    let new = parse_filter(filter).map_err(|e| LogError::Invalid {
        filter: filter.to_owned(),
        message: e.to_string(),
    })?;
    let handle = FILTER.get().ok_or(LogError::NotInitialised)?;
    handle
        .reload(new)
        .map_err(|e| LogError::Reload(e.to_string()))
}
