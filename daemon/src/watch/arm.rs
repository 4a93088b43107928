//! Arming: adding inotify watches. `arm_tree` walks a tree with the scan's traversal rules
//! (`scan::dir_tree::walk_dirs`: hidden `.name` directories and NAS metadata folders skipped;
//! symbolic links to directories followed, each directory once), adds one watch per directory,
//! and when the limit is hit goes on only to count what watching it all needs. The actor's side
//! arms a library from its root (inotify where it works, polling where it cannot, paused when
//! the root is not there), records the watches a walk added (falling back to polling at the
//! watch limit), removes and re-paths watches, and arms the directories that events reported
//! new. Walks run on the blocking pool; the task waits for them, so no event is read for a
//! directory before its watch is recorded.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use coral_proto::WatchMode;
use inotify::{WatchDescriptor, Watches};

use super::actor::{Actor, PollReason, WatchEntry};
use super::debounce::{is_under, rebase};
use super::inotify::watch_mask;
use super::{mounts, poll};
use crate::scan::dir_tree::walk_dirs;

/// What adding watches to a tree found.
#[derive(Debug, Default)]
pub struct ArmOutcome {
    pub added: Vec<(Vec<u8>, WatchDescriptor)>,
    /// Directories in the tree (what watching it all needs).
    pub needed: u64,
    /// ENOSPC, or the configured `max_watches`, was reached.
    pub limit_hit: bool,
    /// The starting directory does not exist (any more).
    pub missing: bool,
    /// Directories that could not be watched for another reason.
    pub skipped: Vec<String>,
}

/// Add a watch to `root/start` and every directory below it (blocking; run on the blocking
/// pool). `held` watches are already in use; `limit` is the configured cap, if any. After the
/// limit is hit the walk goes on only to count the directories.
pub fn arm_tree(
    watches: &mut Watches,
    root: &Path,
    start: &[u8],
    held: u64,
    limit: Option<u64>,
) -> ArmOutcome {
    let mut out = ArmOutcome::default();
    let found = walk_dirs(root, start, |rel, abs, _| {
        out.needed += 1;
        if out.limit_hit {
            return true;
        }
        if limit.is_some_and(|l| held + out.added.len() as u64 >= l) {
            out.limit_hit = true;
            return true;
        }
        match watches.add(abs, watch_mask()) {
            Ok(wd) => out.added.push((rel.to_vec(), wd)),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => out.limit_hit = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
            Err(e) => {
                out.skipped.push(format!("{}: {e}", abs.display()));
                return false;
            }
        }
        true
    });
    out.missing = !found;
    out
}

impl Actor {
    /// Watch a library from its root: inotify where it works, polling where it cannot, paused
    /// when the root is not there.
    pub(super) async fn arm(&mut self, id: i64) {
        self.unwatch_all(id);
        let poll_s = self.cfg.poll_interval_s;
        let inotify_error = self.inotify_error.clone();
        let Some(lib) = self.libs.get_mut(&id) else {
            return;
        };
        let state = poll::check_root(&lib.root);
        if let poll::RootState::Unavailable(reason) = &state {
            let reason = reason.clone();
            self.pause(id, &reason);
            return;
        }
        lib.root_identity = state.identity();
        let mount = mounts::current_mount_of(&lib.root);
        lib.filesystem = mount.as_ref().map(|m| m.fs_type.clone());
        if let Some(m) = mount.filter(mounts::MountEntry::is_remote) {
            let note = poll::remote_fs_note(&m.fs_type, &m.mount_point, poll_s);
            self.start_polling(id, PollReason::Remote, note, false, false);
            return;
        }
        if let Some(err) = inotify_error {
            self.start_polling(id, PollReason::NoInotify, err, true, false);
            return;
        }
        let root = lib.root.clone();
        let span = lib.span.clone();
        let started = Instant::now();
        let Some(outcome) = self.arm_tree(root, Vec::new()).await else {
            return;
        };
        if outcome.missing {
            self.pause(
                id,
                "the library root vanished while its watches were being added",
            );
            return;
        }
        let (n, skipped) = (outcome.added.len(), outcome.skipped.len());
        let limit_hit = outcome.limit_hit;
        self.register(id, outcome, false);
        if limit_hit {
            return;
        }
        if let Some(lib) = self.libs.get_mut(&id) {
            lib.mode = WatchMode::Inotify;
            lib.poll_reason = None;
            lib.warning = (skipped > 0)
                .then(|| format!("{skipped} directories could not be watched (see the log)"));
            lib.alarm = false;
            lib.next_poll = None;
            lib.limit_at_fallback = None;
        }
        span.in_scope(|| {
            tracing::info!(
                watches = n,
                took_ms = started.elapsed().as_millis() as u64,
                "watching with inotify"
            )
        });
    }

    /// Run `arm_tree` for `start` of library `id` on the blocking pool.
    async fn arm_tree(&mut self, root: PathBuf, start: Vec<u8>) -> Option<ArmOutcome> {
        let mut watches = self.watches.clone()?;
        let held = self.wds.len() as u64;
        let limit = (self.cfg.max_watches > 0).then_some(self.cfg.max_watches);
        match tokio::task::spawn_blocking(move || {
            arm_tree(&mut watches, &root, &start, held, limit)
        })
        .await
        {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::error!(error = %e, "adding watches failed");
                None
            }
        }
    }

    /// Record the watches an arm added; on the watch limit, fall back to polling (scanning at
    /// once with `scan_now`, when events may have been missed).
    fn register(&mut self, id: i64, outcome: ArmOutcome, scan_now: bool) {
        let Some(lib) = self.libs.get(&id) else {
            // Removed meanwhile: give the watches back.
            if let Some(w) = self.watches.as_mut() {
                for (_, wd) in outcome.added {
                    let _ = w.remove(wd);
                }
            }
            return;
        };
        let span = lib.span.clone();
        for s in &outcome.skipped {
            span.in_scope(|| tracing::warn!(directory = %s, "cannot watch directory"));
        }
        if outcome.limit_hit {
            let held_by_lib = lib.dirs.len() as u64;
            let held_elsewhere = (self.wds.len() as u64).saturating_sub(held_by_lib);
            let needed = held_by_lib + outcome.needed;
            let configured = (self.cfg.max_watches > 0).then_some(self.cfg.max_watches);
            let kernel = poll::max_user_watches();
            let warning = poll::watch_limit_warning(
                &lib.root,
                needed,
                held_elsewhere,
                configured,
                kernel,
                self.cfg.poll_interval_s,
            );
            if let Some(w) = self.watches.as_mut() {
                for (_, wd) in outcome.added {
                    let _ = w.remove(wd);
                }
            }
            span.in_scope(|| tracing::warn!("{warning}"));
            self.start_polling(id, PollReason::WatchLimit, warning, true, scan_now);
            if let Some(lib) = self.libs.get_mut(&id) {
                lib.limit_at_fallback = configured.or(kernel);
            }
            return;
        }
        for (rel, wd) in outcome.added {
            let n = wd.get_watch_descriptor_id();
            // The same inode reached again (a moved directory whose old path we still knew):
            // the newest path is the true one.
            if let Some(old) = self.wds.remove(&n)
                && let Some(l) = self.libs.get_mut(&old.lib)
            {
                l.dirs.remove(&old.rel);
            }
            if let Some(lib) = self.libs.get_mut(&id) {
                lib.dirs.insert(rel.clone(), n);
            }
            self.wds.insert(n, WatchEntry { wd, lib: id, rel });
        }
    }

    /// Remove every watch of a library.
    pub(super) fn unwatch_all(&mut self, id: i64) {
        self.unwatch_subtree(id, &[]);
    }

    /// Remove the watches of `dir` and below in library `id`.
    pub(super) fn unwatch_subtree(&mut self, id: i64, dir: &[u8]) {
        let Some(lib) = self.libs.get_mut(&id) else {
            return;
        };
        let gone: Vec<(Vec<u8>, i32)> = lib
            .dirs
            .range(dir.to_vec()..)
            .take_while(|(k, _)| k.starts_with(dir))
            .filter(|(k, _)| is_under(k, dir))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (rel, n) in gone {
            lib.dirs.remove(&rel);
            if let Some(entry) = self.wds.remove(&n)
                && let Some(w) = self.watches.as_mut()
            {
                let _ = w.remove(entry.wd);
            }
        }
    }

    /// Re-path the watches of a directory that moved inside its library.
    pub(super) fn rebase_watches(&mut self, id: i64, old: &[u8], new: &[u8]) {
        let Some(lib) = self.libs.get_mut(&id) else {
            return;
        };
        let moved: Vec<(Vec<u8>, i32)> = lib
            .dirs
            .range(old.to_vec()..)
            .take_while(|(k, _)| k.starts_with(old))
            .filter(|(k, _)| is_under(k, old))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (rel, n) in moved {
            lib.dirs.remove(&rel);
            let to = rebase(&rel, old, new);
            lib.dirs.insert(to.clone(), n);
            if let Some(e) = self.wds.get_mut(&n) {
                e.rel = to;
            }
        }
    }

    /// Add watches below new directories, then mark them pending (their scan finds what
    /// landed before the watches existed).
    pub(super) async fn arm_new_dirs(&mut self, mut new_dirs: Vec<(i64, Vec<u8>)>) {
        new_dirs.sort();
        new_dirs.dedup();
        for (id, rel) in new_dirs {
            if self.mode(id) != Some(WatchMode::Inotify) {
                continue;
            }
            let Some(root) = self.libs.get(&id).map(|l| l.root.clone()) else {
                continue;
            };
            let Some(outcome) = self.arm_tree(root, rel.clone()).await else {
                continue;
            };
            let limit_hit = outcome.limit_hit;
            self.register(id, outcome, true);
            if limit_hit {
                continue;
            }
            if let Some(lib) = self.noted(id) {
                lib.debounce.touch(&rel, Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use inotify::Inotify;

    use super::*;

    #[test]
    fn arming_watches_every_directory_once_and_honours_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        for d in ["a/b/c", "a/d", "e", ".hidden/x", "@eaDir/y"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        std::os::unix::fs::symlink(root.join("a"), root.join("e/link")).expect("symlink");
        let inotify = Inotify::init().expect("inotify");
        let mut w = inotify.watches();
        let out = arm_tree(&mut w, root, b"", 0, None);
        assert!(!out.limit_hit && !out.missing);
        // root, a, a/b, a/b/c, a/d, e — the link reaches a/ again and is not counted twice.
        assert_eq!(out.needed, 6, "{:?}", out.added);
        assert_eq!(out.added.len(), 6);

        let out = arm_tree(&mut w, root, b"", 0, Some(3));
        assert!(out.limit_hit);
        assert_eq!(out.added.len(), 3);
        assert_eq!(out.needed, 6, "the walk goes on to count what is needed");

        let out = arm_tree(&mut w, root, b"nope", 0, None);
        assert!(out.missing);
    }
}
