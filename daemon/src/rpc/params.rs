//! The checks every API method runs on its decoded parameters before it touches the database
//! or the filesystem: pure functions, shared by `api.rs` and the fuzzing entry points
//! (`fuzz_entry.rs`), so what is fuzzed is what the daemon runs.

use std::path::{Component, Path, PathBuf};

use coral_proto::{ScanMode, codes, errors::error};
use jsonrpsee::types::ErrorObjectOwned;

/// Default and largest page of `scan.list` and `track.search`.
const DEFAULT_LIST_LIMIT: u32 = 20;
const MAX_LIST_LIMIT: u32 = 1000;
/// Default and largest neighbour count of `track.similar`.
const DEFAULT_SIMILAR_LIMIT: u32 = 10;
const MAX_SIMILAR_LIMIT: u32 = 1000;

/// `library.add`: the path must be absolute (it is canonicalised afterwards).
pub fn library_path(path: &str) -> Result<&Path, ErrorObjectOwned> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(error(
            codes::INVALID_ARGUMENT,
            format!("library path {path} must be absolute"),
        ));
    }
    Ok(p)
}

/// `scan.start`'s `path`: a relative or absolute subdirectory, turned into a clean path
/// relative to `root` (lexically: no `..`, nothing outside the root). `None` is the root itself.
/// Whether the directory exists is checked by the caller.
pub fn clean_subdir(root: &Path, path: &str) -> Result<Option<PathBuf>, ErrorObjectOwned> {
    let p = Path::new(path);
    let rel = if p.is_absolute() {
        match p.strip_prefix(root) {
            Ok(r) => r,
            Err(_) => {
                return Err(error(
                    codes::PATH_OUTSIDE_LIBRARY,
                    format!("{path} is not inside the library {}", root.display()),
                ));
            }
        }
    } else {
        p
    };
    let mut clean = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => clean.push(n),
            Component::CurDir => {}
            _ => {
                return Err(error(
                    codes::PATH_OUTSIDE_LIBRARY,
                    format!("{path} must stay inside the library (no `..`)"),
                ));
            }
        }
    }
    Ok((!clean.as_os_str().is_empty()).then_some(clean))
}

/// `scan.start`'s `full` flag.
pub fn scan_mode(full: Option<bool>) -> ScanMode {
    if full.unwrap_or(false) {
        ScanMode::Full
    } else {
        ScanMode::Incremental
    }
}

/// Page size of `scan.list` and `track.search`: default 20, clamped to 1..=1000.
pub fn list_limit(limit: Option<u32>) -> i64 {
    i64::from(limit.unwrap_or(DEFAULT_LIST_LIMIT).clamp(1, MAX_LIST_LIMIT))
}

/// Neighbours asked of `track.similar`: default 10, clamped to 1..=1000.
pub fn similar_limit(limit: Option<u32>) -> u32 {
    limit
        .unwrap_or(DEFAULT_SIMILAR_LIMIT)
        .clamp(1, MAX_SIMILAR_LIMIT)
}

/// `track.search`'s parameters, ready for the query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Search {
    /// A `to_tsquery('simple', …)` expression of prefix terms (see [`crate::text_fold`]).
    pub tsquery: String,
    pub limit: i64,
    pub offset: i64,
}

/// `track.search`: the query must have at least one word after folding.
pub fn search(
    query: &str,
    limit: Option<u32>,
    offset: Option<u32>,
) -> Result<Search, ErrorObjectOwned> {
    let Some(tsquery) = crate::text_fold::prefix_tsquery(query) else {
        return Err(error(
            codes::INVALID_ARGUMENT,
            "the search query has no words to look for",
        ));
    };
    Ok(Search {
        tsquery,
        limit: list_limit(limit),
        offset: i64::from(offset.unwrap_or(0)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_paths_must_be_absolute() {
        assert!(library_path("/music").is_ok());
        let e = library_path("music").expect_err("relative");
        assert_eq!(e.code(), codes::INVALID_ARGUMENT);
        assert!(library_path("").is_err());
    }

    #[test]
    fn subdirs_are_cleaned_lexically() {
        let root = Path::new("/music");
        assert_eq!(
            clean_subdir(root, "a/./b/").expect("relative"),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(
            clean_subdir(root, "/music/a").expect("absolute"),
            Some(PathBuf::from("a"))
        );
        assert_eq!(clean_subdir(root, "").expect("empty"), None);
        assert_eq!(clean_subdir(root, "/music").expect("root"), None);
        for bad in ["../x", "a/../../x", "/musicx/a", "/etc"] {
            let e = clean_subdir(root, bad).expect_err(bad);
            assert_eq!(e.code(), codes::PATH_OUTSIDE_LIBRARY, "{bad}");
        }
    }

    #[test]
    fn limits_have_defaults_and_bounds() {
        assert_eq!(list_limit(None), 20);
        assert_eq!(list_limit(Some(0)), 1);
        assert_eq!(list_limit(Some(u32::MAX)), 1000);
        assert_eq!(similar_limit(None), 10);
        assert_eq!(similar_limit(Some(5000)), 1000);
        assert_eq!(scan_mode(Some(true)), ScanMode::Full);
        assert_eq!(scan_mode(None), ScanMode::Incremental);
    }

    #[test]
    fn search_needs_a_word() {
        let s = search("Zoë", None, Some(40)).expect("a word");
        assert_eq!(s.tsquery, "zoe:*");
        assert_eq!((s.limit, s.offset), (20, 40));
        let e = search(" -- ", None, None).expect_err("no word");
        assert_eq!(e.code(), codes::INVALID_ARGUMENT);
    }
}
