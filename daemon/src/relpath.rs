//! Paths below a library root as raw bytes (file names need not be UTF-8): the one joining rule
//! the walker and the watcher share.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// `dir/name`, or `name` at the root (`dir` empty).
pub fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(dir.len() + 1 + name.len());
    if !dir.is_empty() {
        v.extend_from_slice(dir);
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

/// `root/rel` (`rel` empty: the root itself).
pub fn abs_path(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_owned()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_below_the_root_and_at_it() {
        assert_eq!(join(b"", b"a.flac"), b"a.flac");
        assert_eq!(join(b"Artist/Album", b"\xff.mp3"), b"Artist/Album/\xff.mp3");
    }
}
