//! The discover phase's decisions: what is on disk (the walk's outcome) against what the
//! database holds under the scanned tree — which files are new or changed (to probe), unchanged,
//! already written by this scan before a restart, or still failing — and which rows belong to
//! files that are gone.
//!
//! The never-delete rule lives here: a library root (or targeted subtree) that is missing, not a
//! directory or unreadable fails the scan before anything is compared ([`walked`]); a tree that
//! is suddenly empty while the database holds tracks under it deletes nothing, and neither does
//! anything below a directory that could not be read ([`removal`]).
//!
//! Pure functions of the walk's outcome and the database's rows: no I/O, no database.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use coral_proto::ScanMode;
use uuid::Uuid;

use super::job::ScanFailure;
use super::phase_1_walk::{FoundFile, WalkError, WalkOutcome};
use crate::db::scan_errors::ExistingError;
use crate::db::tracks::ExistingTrack;

/// The walk's result as the scan takes it: a root (or subtree) that is missing, not a
/// directory or unreadable fails the scan, so nothing is compared and nothing deleted.
pub fn walked(result: Result<WalkOutcome, WalkError>) -> Result<WalkOutcome, ScanFailure> {
    match result {
        Ok(w) => Ok(w),
        Err(WalkError::Cancelled) => Err(ScanFailure::Cancelled),
        Err(e) => Err(ScanFailure::RootUnavailable(e.to_string())),
    }
}

/// Files on disk against the rows of the database.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Files to probe: new, changed, or (in a full scan) not yet written by this scan.
    pub to_probe: Vec<FoundFile>,
    /// Same size and mtime as their track (incremental scans only).
    pub unchanged: u64,
    /// Written by this very scan before a restart.
    pub already_indexed: u64,
    /// Unchanged and still bad: not re-read.
    pub known_bad: u64,
}

/// Sort `files` by what the database knows of them: a track of the same size and mtime is
/// unchanged (incremental) or already indexed (written by `request_id`); an error row of the
/// same size and mtime is a known bad file (incremental, or recorded by `request_id`).
pub fn compare(
    files: &[FoundFile],
    tracks: &[ExistingTrack],
    errors: &[ExistingError],
    mode: ScanMode,
    request_id: Uuid,
) -> Comparison {
    let by_path: HashMap<&[u8], &ExistingTrack> =
        tracks.iter().map(|t| (t.rel_path.as_slice(), t)).collect();
    let errors_by_path: HashMap<&[u8], &ExistingError> =
        errors.iter().map(|e| (e.rel_path.as_slice(), e)).collect();
    let mut out = Comparison::default();
    for f in files {
        let size = i64::try_from(f.size).unwrap_or(i64::MAX);
        if let Some(t) = by_path.get(f.rel_path.as_slice())
            && t.size == size
            && t.mtime_ns == f.mtime_ns
        {
            if t.last_scan_id == Some(request_id) {
                out.already_indexed += 1; // this scan wrote it before a restart
                continue;
            }
            if mode == ScanMode::Incremental {
                out.unchanged += 1;
                continue;
            }
        }
        if let Some(e) = errors_by_path.get(f.rel_path.as_slice())
            && e.size == size
            && e.mtime_ns == f.mtime_ns
            && (mode == ScanMode::Incremental || e.request_id == Some(request_id))
        {
            out.known_bad += 1; // unchanged and still bad: not re-read
            continue;
        }
        out.to_probe.push(f.clone());
    }
    out
}

/// What the scan may delete once it has walked the tree.
#[derive(Debug, PartialEq, Eq)]
pub enum Removal {
    /// The tree holds no file and no issue while the database holds `indexed` tracks under it:
    /// it looks unmounted, so nothing is deleted.
    SuddenlyEmpty { indexed: usize },
    /// The rows of files that are gone, except below directories that could not be read (and
    /// error rows of paths the walk reported as issues).
    Vanished {
        track_ids: Vec<i64>,
        error_paths: Vec<Vec<u8>>,
    },
}

/// What vanished, unless the tree looks unmounted or a directory was unreadable.
pub fn removal(
    walked: &WalkOutcome,
    tracks: &[ExistingTrack],
    errors: &[ExistingError],
) -> Removal {
    if walked.files.is_empty() && walked.issues.is_empty() && !tracks.is_empty() {
        return Removal::SuddenlyEmpty {
            indexed: tracks.len(),
        };
    }
    let found: HashSet<&[u8]> = walked.files.iter().map(|f| f.rel_path.as_slice()).collect();
    let unreadable = &walked.unreadable_dirs;
    let track_ids = tracks
        .iter()
        .filter(|t| {
            !found.contains(t.rel_path.as_slice()) && !under_unreadable(unreadable, &t.rel_path)
        })
        .map(|t| t.id)
        .collect();
    let issue_paths: HashSet<&[u8]> = walked
        .issues
        .iter()
        .map(|i| i.rel_path.as_slice())
        .collect();
    let error_paths = errors
        .iter()
        .filter(|e| {
            !found.contains(e.rel_path.as_slice())
                && !issue_paths.contains(e.rel_path.as_slice())
                && !under_unreadable(unreadable, &e.rel_path)
        })
        .map(|e| e.rel_path.clone())
        .collect();
    Removal::Vanished {
        track_ids,
        error_paths,
    }
}

/// Whether `path` lies below one of the unreadable directories (`""` is the root itself).
fn under_unreadable(dirs: &[Vec<u8>], path: &[u8]) -> bool {
    dirs.iter()
        .any(|d| d.is_empty() || (path.starts_with(d) && path.get(d.len()) == Some(&b'/')))
}

/// The scan's warnings about what it did not delete; `scanned` is the directory walked (the
/// root, or the subtree below it).
pub fn warnings(removal: &Removal, walked: &WalkOutcome, scanned: &Path) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Removal::SuddenlyEmpty { indexed } = removal {
        warnings.push(format!(
            "{} is empty but {} tracks are indexed under it (unmounted disk?): nothing was deleted",
            scanned.display(),
            indexed
        ));
    }
    let dir_issues = walked.issues.iter().filter(|i| i.is_dir).count();
    if dir_issues != 0 {
        warnings.push(format!(
            "{} director{} could not be read; nothing below {} was deleted",
            dir_issues,
            if dir_issues == 1 { "y" } else { "ies" },
            if dir_issues == 1 { "it" } else { "them" },
        ));
    }
    warnings
}

/// Files the walk found but could not use (special files, broken links): each counts as a
/// failed track.
pub fn file_issues(walked: &WalkOutcome) -> u64 {
    walked.issues.iter().filter(|i| !i.is_dir).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::phase_1_walk::{self, WalkIssue, WalkObserver};

    struct Quiet;
    impl WalkObserver for Quiet {
        fn discovered(&self, _: u64) {}
        fn cancelled(&self) -> bool {
            false
        }
    }

    fn track(id: i64, path: &str) -> ExistingTrack {
        ExistingTrack {
            id,
            rel_path: path.as_bytes().to_vec(),
            size: 1,
            mtime_ns: 7,
            last_scan_id: None,
        }
    }

    fn error(path: &str) -> ExistingError {
        ExistingError {
            rel_path: path.as_bytes().to_vec(),
            size: 1,
            mtime_ns: 7,
            request_id: None,
        }
    }

    fn file(path: &str) -> FoundFile {
        FoundFile {
            rel_path: path.as_bytes().to_vec(),
            size: 1,
            mtime_ns: 7,
        }
    }

    fn dir_issue(path: &str) -> WalkIssue {
        WalkIssue {
            rel_path: path.as_bytes().to_vec(),
            size: 0,
            mtime_ns: 0,
            is_dir: true,
            message: "directory cannot be read: denied".into(),
        }
    }

    fn nothing() -> Removal {
        Removal::Vanished {
            track_ids: vec![],
            error_paths: vec![],
        }
    }

    #[test]
    fn missing_root_fails_the_scan_before_anything_is_deleted() {
        let result = phase_1_walk::walk(Path::new("/nonexistent/coral"), None, &Quiet);
        let err = walked(result).expect_err("missing root");
        assert!(matches!(err, ScanFailure::RootUnavailable(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("does not exist"), "{text}");
        assert!(text.ends_with("nothing was deleted"), "{text}");
    }

    #[test]
    fn missing_subtree_fails_the_scan_before_anything_is_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.mp3"), b"x").expect("write");
        let result = phase_1_walk::walk(dir.path(), Some(Path::new("gone")), &Quiet);
        let err = walked(result).expect_err("missing subtree");
        assert!(matches!(err, ScanFailure::RootUnavailable(_)), "{err:?}");
        assert!(err.to_string().contains("gone"), "{err}");
    }

    #[test]
    fn unreadable_or_cancelled_walks_are_not_an_empty_tree() {
        let unreadable = WalkError::Unreadable {
            path: "/music".into(),
            reason: "denied".into(),
        };
        assert!(matches!(
            walked(Err(unreadable)),
            Err(ScanFailure::RootUnavailable(_))
        ));
        assert!(matches!(
            walked(Err(WalkError::NotADirectory("/music".into()))),
            Err(ScanFailure::RootUnavailable(_))
        ));
        assert!(matches!(
            walked(Err(WalkError::Cancelled)),
            Err(ScanFailure::Cancelled)
        ));
    }

    #[test]
    fn empty_root_while_the_database_holds_tracks_deletes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = walked(phase_1_walk::walk(dir.path(), None, &Quiet)).expect("walk");
        let tracks = [track(1, "a.mp3"), track(2, "b/c.flac")];
        let removal = removal(&out, &tracks, &[error("d.mp3")]);
        assert_eq!(removal, Removal::SuddenlyEmpty { indexed: 2 });
        assert_eq!(
            warnings(&removal, &out, Path::new("/music/sub")),
            vec![
                "/music/sub is empty but 2 tracks are indexed under it (unmounted disk?): \
                 nothing was deleted"
                    .to_owned()
            ]
        );
    }

    #[test]
    fn empty_root_with_an_empty_database_is_no_warning() {
        let out = WalkOutcome::default();
        let removal = removal(&out, &[], &[error("d.mp3")]);
        assert_eq!(
            removal,
            Removal::Vanished {
                track_ids: vec![],
                error_paths: vec![b"d.mp3".to_vec()],
            }
        );
        assert!(warnings(&removal, &out, Path::new("/music")).is_empty());
    }

    #[test]
    fn vanished_files_are_removed() {
        let out = WalkOutcome {
            files: vec![file("a.mp3")],
            issues: vec![WalkIssue {
                is_dir: false,
                message: "not a regular file".into(),
                ..dir_issue("pipe.mp3")
            }],
            unreadable_dirs: vec![],
        };
        let tracks = [track(1, "a.mp3"), track(2, "b.mp3")];
        let errors = [error("a.mp3"), error("c.mp3"), error("pipe.mp3")];
        let removal = removal(&out, &tracks, &errors);
        assert_eq!(
            removal,
            Removal::Vanished {
                track_ids: vec![2],
                error_paths: vec![b"c.mp3".to_vec()],
            }
        );
        assert!(warnings(&removal, &out, Path::new("/music")).is_empty());
        assert_eq!(file_issues(&out), 1);
    }

    #[test]
    fn nothing_below_an_unreadable_directory_is_removed() {
        let out = WalkOutcome {
            files: vec![file("a.mp3")],
            issues: vec![dir_issue("x")],
            unreadable_dirs: vec![b"x".to_vec()],
        };
        let tracks = [
            track(1, "x/1.mp3"),
            track(2, "xy.mp3"),
            track(3, "x/y/2.mp3"),
        ];
        let removal = removal(&out, &tracks, &[error("x/3.mp3"), error("y.mp3")]);
        assert_eq!(
            removal,
            Removal::Vanished {
                track_ids: vec![2],
                error_paths: vec![b"y.mp3".to_vec()],
            }
        );
        assert_eq!(
            warnings(&removal, &out, Path::new("/music")),
            vec!["1 directory could not be read; nothing below it was deleted".to_owned()]
        );
        assert_eq!(file_issues(&out), 0);

        let two = WalkOutcome {
            issues: vec![dir_issue("x"), dir_issue("y")],
            ..WalkOutcome::default()
        };
        assert_eq!(
            warnings(&nothing(), &two, Path::new("/music")),
            vec!["2 directories could not be read; nothing below them was deleted".to_owned()]
        );
    }

    #[test]
    fn an_unreadable_root_directory_keeps_everything() {
        let out = WalkOutcome {
            files: vec![],
            issues: vec![dir_issue("")],
            unreadable_dirs: vec![Vec::new()],
        };
        let removal = removal(&out, &[track(1, "a.mp3")], &[error("b.mp3")]);
        assert_eq!(removal, nothing());
    }

    #[test]
    fn compare_sorts_files_by_what_the_database_knows() {
        let this_scan = Uuid::new_v4();
        let files = [
            file("same.mp3"),
            file("written.mp3"),
            file("changed.mp3"),
            file("new.mp3"),
            file("bad.mp3"),
        ];
        let mut changed = track(3, "changed.mp3");
        changed.mtime_ns = 8;
        let tracks = [
            track(1, "same.mp3"),
            ExistingTrack {
                last_scan_id: Some(this_scan),
                ..track(2, "written.mp3")
            },
            changed,
        ];
        let errors = [error("bad.mp3")];
        let inc = compare(&files, &tracks, &errors, ScanMode::Incremental, this_scan);
        assert_eq!(
            (inc.unchanged, inc.already_indexed, inc.known_bad),
            (1, 1, 1)
        );
        assert_eq!(inc.to_probe, vec![file("changed.mp3"), file("new.mp3")]);

        // A full scan re-reads what it has not written itself, bad files included (unless
        // this scan recorded them before a restart).
        let full = compare(&files, &tracks, &errors, ScanMode::Full, this_scan);
        assert_eq!(
            (full.unchanged, full.already_indexed, full.known_bad),
            (0, 1, 0)
        );
        assert_eq!(full.to_probe.len(), 4);
        let mine = [ExistingError {
            request_id: Some(this_scan),
            ..error("bad.mp3")
        }];
        let resumed = compare(&files, &tracks, &mine, ScanMode::Full, this_scan);
        assert_eq!(resumed.known_bad, 1);
    }
}
