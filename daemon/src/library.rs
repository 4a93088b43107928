//! Library registration, for the API (`library.add`, `library.remove`) and the configuration's
//! `libraries` list alike: a library is a canonical, readable, UTF-8 directory that neither holds
//! nor lies inside another library. Adding one watches it and queues its first scan; removing
//! one cancels its scans, stops watching it and forgets its rows (files are never touched).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use coral_proto::{LibrarySelector, ScanMode, ScanTrigger};
use sqlx::PgPool;

use crate::db::libraries::{self, LibraryRow};
use crate::progress::{ScanHandle, ScanReporter};
use crate::scan::queue::{QueueError, ScanQueue, ScanRequest};
use crate::watch::Watcher;

/// Why a library could not be added, found or removed.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("library path {0} does not exist")]
    Missing(String),
    #[error("library path {path} cannot be read: {error}")]
    Unreadable { path: String, error: String },
    #[error("library path {0} is not a directory")]
    NotADirectory(String),
    #[error("library path {0} is not valid UTF-8")]
    NotUtf8(String),
    #[error("{path} is already library {id}")]
    Exists { path: String, id: i64 },
    #[error("{path} overlaps library {id} ({other}); libraries may not nest")]
    Overlaps {
        path: String,
        id: i64,
        other: String,
    },
    #[error("no library {0}; `coralctl library list` shows the registered ones")]
    Unknown(LibrarySelector),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Adds, finds and removes libraries.
pub struct LibraryService {
    pub pool: PgPool,
    pub queue: Arc<ScanQueue>,
    pub reporter: Arc<ScanReporter>,
    pub watcher: Arc<Watcher>,
}

impl LibraryService {
    /// Register the directory at `path`, watch it, and queue its first (incremental) scan.
    pub async fn add(&self, path: &Path) -> Result<(LibraryRow, Arc<ScanHandle>), LibraryError> {
        let shown = path.display().to_string();
        let canonical = match std::fs::canonicalize(path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LibraryError::Missing(shown));
            }
            Err(e) => {
                return Err(LibraryError::Unreadable {
                    path: shown,
                    error: e.to_string(),
                });
            }
        };
        if !canonical.is_dir() {
            return Err(LibraryError::NotADirectory(shown));
        }
        let Some(text) = canonical.to_str().map(str::to_owned) else {
            return Err(LibraryError::NotUtf8(canonical.display().to_string()));
        };
        for other in libraries::list(&self.pool).await? {
            let o = Path::new(&other.path);
            if o == canonical {
                return Err(LibraryError::Exists {
                    path: text,
                    id: other.id,
                });
            }
            if canonical.starts_with(o) || o.starts_with(&canonical) {
                return Err(LibraryError::Overlaps {
                    path: text,
                    id: other.id,
                    other: other.path,
                });
            }
        }
        let Some(row) = libraries::insert(&self.pool, &text).await? else {
            // Registered meanwhile by a concurrent request.
            let id = libraries::get_by_path(&self.pool, &text)
                .await?
                .map_or(0, |r| r.id);
            return Err(LibraryError::Exists { path: text, id });
        };
        tracing::info!(library = %text, id = row.id, "library added");
        // Watches first, so the scan below cannot miss a file written in between.
        self.watcher.add_library(row.id, &canonical).await;
        let (handle, _) = self
            .queue
            .submit(ScanRequest {
                library_id: row.id,
                library_root: canonical,
                subdir: None,
                mode: ScanMode::Incremental,
                trigger: ScanTrigger::LibraryAdded,
            })
            .await?;
        Ok((row, handle))
    }

    /// The library `sel` names: by id, or by path as registered or as it canonicalizes.
    pub async fn find(&self, sel: &LibrarySelector) -> Result<LibraryRow, LibraryError> {
        let row = match sel {
            LibrarySelector::Id(id) => libraries::get(&self.pool, *id).await?,
            LibrarySelector::Path(p) => match libraries::get_by_path(&self.pool, p).await? {
                Some(r) => Some(r),
                None => match std::fs::canonicalize(p) {
                    Ok(c) => libraries::get_by_path(&self.pool, &c.to_string_lossy()).await?,
                    Err(_) => None,
                },
            },
        };
        row.ok_or_else(|| LibraryError::Unknown(sel.clone()))
    }

    /// Forget the library `sel` names: its running scans are cancelled, its watches dropped,
    /// its rows deleted.
    pub async fn remove(&self, sel: &LibrarySelector) -> Result<LibraryRow, LibraryError> {
        let row = self.find(sel).await?;
        for h in self.reporter.handles() {
            if h.info().library_id == row.id && !h.phase().is_terminal() {
                h.cancel_token().cancel();
            }
        }
        self.watcher.remove_library(row.id);
        libraries::delete(&self.pool, row.id).await?;
        tracing::info!(library = %row.path, id = row.id, "library removed");
        Ok(row)
    }

    /// Make the registered libraries follow the configuration's `libraries` list: add each path
    /// of `new` not yet registered; when `remove` (a reload), forget the paths of `old` no
    /// longer in `new`. Problems are logged; they never stop the daemon.
    pub async fn sync(&self, old: &[PathBuf], new: &[PathBuf], remove: bool) {
        for path in new.iter().filter(|p| !old.contains(p)) {
            match self.add(path).await {
                Ok((row, _)) => {
                    tracing::info!(library = %row.path, id = row.id, "library from the configuration added")
                }
                Err(LibraryError::Exists { .. }) => {
                    tracing::debug!(library = %path.display(), "configured library already registered")
                }
                Err(e) => {
                    tracing::warn!(library = %path.display(), error = %e, "cannot add the configured library")
                }
            }
        }
        if !remove {
            return;
        }
        for path in old.iter().filter(|p| !new.contains(p)) {
            let sel = LibrarySelector::Path(path.to_string_lossy().into_owned());
            match self.remove(&sel).await {
                Ok(row) => tracing::info!(
                    library = %row.path,
                    id = row.id,
                    "library no longer in the configuration: removed from the index (files untouched)"
                ),
                Err(LibraryError::Unknown(_)) => {
                    tracing::debug!(library = %path.display(), "library dropped from the configuration was not registered")
                }
                Err(e) => {
                    tracing::warn!(library = %path.display(), error = %e, "cannot remove the library dropped from the configuration")
                }
            }
        }
    }
}
