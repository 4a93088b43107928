//! The directory traversal rules, in one place: entries with ignored names (hidden `.name`
//! entries, NAS metadata and recycle folders: `file_names::is_ignored_name`) are skipped; a
//! symbolic link is followed to its target, so a directory reached through a link is walked;
//! each directory, by device and inode, is walked once, so symlink loops end. The scan's
//! parallel walk (`phase_1_walk`) applies these rules entry by entry; `walk_dirs` is a
//! sequential walk of a tree's directories alone, for the watcher (one watch per directory).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::file_names::is_ignored_name;
use crate::relpath::{abs_path, join};

/// Whether a walk skips an entry of this name.
#[inline]
pub fn skip_name(name: &OsStr) -> bool {
    is_ignored_name(name.as_bytes())
}

/// The directories a walk has reached, by (device, inode).
#[derive(Debug, Default)]
pub struct Visited(HashSet<(u64, u64)>);

impl Visited {
    /// Record the directory `md` describes; whether this is the first time.
    #[inline]
    pub fn first_visit(&mut self, md: &fs::Metadata) -> bool {
        self.0.insert((md.dev(), md.ino()))
    }
}

/// A directory entry, a symbolic link followed to its target.
#[derive(Debug)]
pub enum Entry {
    /// A directory, or a link to one: its metadata (the target's), which keys [`Visited`].
    Dir(fs::Metadata),
    /// Anything else: its type (the target's, for a link) and, for a link, the target's
    /// metadata.
    Other(fs::FileType, Option<fs::Metadata>),
    /// A symbolic link whose target cannot be reached.
    BrokenLink(io::Error),
}

/// What `entry` is, with a symbolic link followed; `None` when its type, or a directory's
/// metadata, cannot be read (the entry is passed over). A file's metadata is not read here.
#[inline]
pub fn resolve(entry: &fs::DirEntry) -> Option<Entry> {
    let mut ft = entry.file_type().ok()?;
    let mut md = None;
    if ft.is_symlink() {
        match fs::metadata(entry.path()) {
            Ok(m) => {
                ft = m.file_type();
                md = Some(m);
            }
            Err(e) => return Some(Entry::BrokenLink(e)),
        }
    }
    if ft.is_dir() {
        return Some(Entry::Dir(match md {
            Some(m) => m,
            None => entry.metadata().ok()?,
        }));
    }
    Some(Entry::Other(ft, md))
}

/// Walk the directories of `root/start` (`start` relative, as raw bytes; empty for the root)
/// one at a time, depth first, by the rules above. `visit` gets each directory once — its path
/// relative to `root`, its absolute path, its metadata — and answers whether to go below it; a
/// directory that cannot be listed is visited, with nothing below it. Returns `false`, having
/// visited nothing, when `start` is missing or not a directory.
pub fn walk_dirs(
    root: &Path,
    start: &[u8],
    mut visit: impl FnMut(&[u8], &Path, &fs::Metadata) -> bool,
) -> bool {
    let md = match fs::metadata(abs_path(root, start)) {
        Ok(md) if md.is_dir() => md,
        _ => return false,
    };
    let mut visited = Visited::default();
    visited.first_visit(&md);
    let mut stack = vec![(start.to_vec(), md)];
    while let Some((rel, md)) = stack.pop() {
        let abs = abs_path(root, &rel);
        if !visit(&rel, &abs, &md) {
            continue;
        }
        let Ok(entries) = fs::read_dir(&abs) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if skip_name(&name) {
                continue;
            }
            if let Some(Entry::Dir(m)) = resolve(&entry)
                && visited.first_visit(&m)
            {
                stack.push((join(&rel, name.as_bytes()), m));
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(root: &Path, start: &[u8]) -> Option<Vec<String>> {
        let mut seen = Vec::new();
        walk_dirs(root, start, |rel, abs, md| {
            assert!(md.is_dir() && abs.is_dir());
            seen.push(String::from_utf8_lossy(rel).into_owned());
            true
        })
        .then(|| {
            seen.sort();
            seen
        })
    }

    #[test]
    fn walks_each_directory_once_skipping_ignored_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for d in ["a/b", "c", ".hidden/x", "@eaDir/y", "#recycle"] {
            fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        fs::write(root.join("a/f.mp3"), b"x").expect("write");
        std::os::unix::fs::symlink(root, root.join("a/b/loop")).expect("symlink");
        std::os::unix::fs::symlink(root.join("gone"), root.join("c/dangling")).expect("symlink");
        assert_eq!(
            dirs(root, b"").expect("root"),
            ["", "a", "a/b", "c"],
            "the link back to the root is not walked again"
        );
        assert_eq!(
            dirs(root, b"a/b").expect("subtree"),
            ["a/b", "a/b/loop", "a/b/loop/a", "a/b/loop/c"],
            "a link out of the start is followed, each directory once"
        );
        assert!(dirs(root, b"nope").is_none());
        assert!(dirs(root, b"a/f.mp3").is_none());
    }

    #[test]
    fn a_refused_directory_is_not_descended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).expect("mkdir");
        fs::create_dir_all(root.join("c")).expect("mkdir");
        let mut seen = Vec::new();
        assert!(walk_dirs(root, b"", |rel, _, _| {
            seen.push(rel.to_vec());
            rel != b"a"
        }));
        seen.sort();
        assert_eq!(seen, [b"".to_vec(), b"a".to_vec(), b"c".to_vec()]);
    }
}
