//! Phase 1 of a scan: walk the library (or one subtree) in parallel and list every candidate
//! audio file with its size and mtime, without opening any file.
//!
//! Choices: the traversal rules are `dir_tree`'s (the watcher's walk uses them too):
//! directories reached through symlinks are followed, but each directory (by device and inode)
//! is visited once, so symlink loops end; hidden entries (`.name`) and NAS metadata folders
//! (`@eaDir`, `#recycle`) are skipped. File names are kept as raw bytes, so non-UTF-8
//! names work; FIFOs, sockets and device nodes with audio extensions are reported, never opened.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::dir_tree::{self, Entry, Visited, skip_name};
use super::file_names::is_audio_candidate;
use crate::file_stamp::mtime_ns;

/// A candidate audio file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundFile {
    /// Path below the library root, as raw bytes.
    pub rel_path: Vec<u8>,
    pub size: u64,
    pub mtime_ns: i64,
}

/// A file or directory the walk could not use, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkIssue {
    pub rel_path: Vec<u8>,
    pub size: u64,
    pub mtime_ns: i64,
    pub is_dir: bool,
    pub message: String,
}

/// Everything the walk found.
#[derive(Debug, Default)]
pub struct WalkOutcome {
    pub files: Vec<FoundFile>,
    pub issues: Vec<WalkIssue>,
    /// Directories that could not be read: nothing below them may be deleted.
    pub unreadable_dirs: Vec<Vec<u8>>,
}

/// Why the walk could not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WalkError {
    #[error("{0} does not exist (is the disk mounted?)")]
    Missing(PathBuf),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("{path} cannot be read: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("cancelled")]
    Cancelled,
}

/// Hooks the walk calls while it runs.
pub trait WalkObserver: Sync {
    /// `n` more candidate files were found.
    fn discovered(&self, n: u64);
    /// Whether to stop early.
    fn cancelled(&self) -> bool;
}

struct Shared<'a> {
    root: &'a Path,
    visited: Mutex<Visited>,
    out: Mutex<WalkOutcome>,
    observer: &'a dyn WalkObserver,
}

impl Shared<'_> {
    fn first_visit(&self, md: &fs::Metadata) -> bool {
        self.visited
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .first_visit(md)
    }

    fn out(&self) -> std::sync::MutexGuard<'_, WalkOutcome> {
        self.out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Walk `root/subdir` (or all of `root`) on the current rayon pool.
pub fn walk(
    root: &Path,
    subdir: Option<&Path>,
    observer: &dyn WalkObserver,
) -> Result<WalkOutcome, WalkError> {
    let start = match subdir {
        Some(s) => root.join(s),
        None => root.to_owned(),
    };
    let md = match fs::metadata(&start) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(WalkError::Missing(start));
        }
        Err(e) => {
            return Err(WalkError::Unreadable {
                path: start,
                reason: e.to_string(),
            });
        }
    };
    if !md.is_dir() {
        return Err(WalkError::NotADirectory(start));
    }
    if let Err(e) = fs::read_dir(&start) {
        return Err(WalkError::Unreadable {
            path: start,
            reason: e.to_string(),
        });
    }
    let shared = Shared {
        root,
        visited: Mutex::new(Visited::default()),
        out: Mutex::new(WalkOutcome::default()),
        observer,
    };
    shared.first_visit(&md);
    let start_rel = subdir
        .map(|s| s.as_os_str().as_bytes().to_vec())
        .unwrap_or_default();
    rayon::scope(|scope| visit_dir(scope, &shared, start_rel));
    if observer.cancelled() {
        return Err(WalkError::Cancelled);
    }
    let mut out = shared
        .out
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    out.files
        .sort_unstable_by(|a, b| a.rel_path.cmp(&b.rel_path));
    Ok(out)
}

fn visit_dir<'s>(scope: &rayon::Scope<'s>, shared: &'s Shared<'s>, rel: Vec<u8>) {
    if shared.observer.cancelled() {
        return;
    }
    let abs = shared.root.join(OsStr::from_bytes(&rel));
    let entries = match fs::read_dir(&abs) {
        Ok(e) => e,
        Err(e) => {
            let mut out = shared.out();
            out.issues.push(WalkIssue {
                rel_path: rel.clone(),
                size: 0,
                mtime_ns: 0,
                is_dir: true,
                message: format!("directory cannot be read: {e}"),
            });
            out.unreadable_dirs.push(rel);
            return;
        }
    };
    let mut files = Vec::new();
    let mut issues = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                issues.push(WalkIssue {
                    rel_path: rel.clone(),
                    size: 0,
                    mtime_ns: 0,
                    is_dir: true,
                    message: format!("directory listing failed part-way: {e}"),
                });
                continue;
            }
        };
        let name = entry.file_name();
        if skip_name(&name) {
            continue;
        }
        let Some(resolved) = dir_tree::resolve(&entry) else {
            continue;
        };
        let child_rel = crate::relpath::join(&rel, name.as_bytes());
        let (ft, md) = match resolved {
            Entry::Dir(m) => {
                if shared.first_visit(&m) {
                    scope.spawn(move |s| visit_dir(s, shared, child_rel));
                }
                continue;
            }
            // A dangling link is reported only if it looks like audio.
            Entry::BrokenLink(e) => {
                if is_audio_candidate(Path::new(&name)) {
                    issues.push(WalkIssue {
                        rel_path: child_rel,
                        size: 0,
                        mtime_ns: 0,
                        is_dir: false,
                        message: format!("broken symbolic link: {e}"),
                    });
                }
                continue;
            }
            Entry::Other(ft, md) => (ft, md),
        };
        if !is_audio_candidate(Path::new(&name)) {
            continue;
        }
        let m = match md {
            Some(m) => m,
            None => match entry.metadata() {
                Ok(m) => m,
                Err(e) => {
                    issues.push(WalkIssue {
                        rel_path: child_rel,
                        size: 0,
                        mtime_ns: 0,
                        is_dir: false,
                        message: format!("cannot stat file: {e}"),
                    });
                    continue;
                }
            },
        };
        if ft.is_file() {
            files.push(FoundFile {
                rel_path: child_rel,
                size: m.len(),
                mtime_ns: mtime_ns(&m),
            });
        } else {
            let kind = if ft.is_fifo() {
                "a named pipe (FIFO)"
            } else if ft.is_block_device() || ft.is_char_device() {
                "a device node"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            };
            issues.push(WalkIssue {
                rel_path: child_rel,
                size: 0,
                mtime_ns: mtime_ns(&m),
                is_dir: false,
                message: format!("not a regular file: {kind}; skipped without opening"),
            });
        }
    }
    shared.observer.discovered(files.len() as u64);
    if files.is_empty() && issues.is_empty() {
        return;
    }
    let mut out = shared.out();
    out.files.append(&mut files);
    out.issues.append(&mut issues);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Count(AtomicU64);
    impl WalkObserver for Count {
        fn discovered(&self, n: u64) {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
        fn cancelled(&self) -> bool {
            false
        }
    }

    #[test]
    fn finds_candidates_follows_links_once_and_keeps_raw_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).expect("mkdir");
        fs::write(root.join("a/one.mp3"), b"x").expect("write");
        fs::write(root.join("a/b/two.FLAC"), b"xy").expect("write");
        fs::write(root.join("a/cover.jpg"), b"x").expect("write");
        fs::write(root.join(".hidden.mp3"), b"x").expect("write");
        let odd = OsStr::from_bytes(b"caf\xe9.ogg");
        fs::write(root.join(odd), b"x").expect("write");
        std::os::unix::fs::symlink(root, root.join("a/b/loop")).expect("symlink");
        nix::unistd::mkfifo(&root.join("pipe.mp3"), nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");

        let count = Count(AtomicU64::new(0));
        let out = walk(root, None, &count).expect("walk");
        let names: Vec<_> = out.files.iter().map(|f| f.rel_path.clone()).collect();
        assert_eq!(
            names,
            vec![
                b"a/b/two.FLAC".to_vec(),
                b"a/one.mp3".to_vec(),
                b"caf\xe9.ogg".to_vec()
            ]
        );
        assert_eq!(out.files[0].size, 2);
        assert_eq!(count.0.load(Ordering::Relaxed), 3);
        assert_eq!(out.issues.len(), 1, "{:?}", out.issues);
        assert!(out.issues[0].message.contains("FIFO"));

        fs::remove_file(root.join("a/b/loop")).expect("unlink");
        let sub = walk(root, Some(Path::new("a/b")), &count).expect("walk subtree");
        assert_eq!(sub.files.len(), 1);
        assert_eq!(sub.files[0].rel_path, b"a/b/two.FLAC".to_vec());
    }

    #[test]
    fn missing_root_is_an_error_not_an_empty_library() {
        let count = Count(AtomicU64::new(0));
        let err = walk(Path::new("/nonexistent/coral"), None, &count).expect_err("missing");
        assert!(matches!(err, WalkError::Missing(_)));
    }
}
