//! What is really inotify: the mask each directory is watched with, reading raw events in
//! batches, and the actor's handling of them (the watcher task itself is in `actor`).
//!
//! Event rules (names starting with `.` and NAS metadata folders are ignored, like the scanner
//! ignores them; only audio file names and directories matter):
//!
//! * `IN_MODIFY` of a file: open for writing (holds its directory); `IN_CREATE`: open for one
//!   quiet period unless a write follows (a hard link gets no write and no close);
//!   `IN_CLOSE_WRITE`: closed; `IN_DELETE`, `IN_ATTRIB` (mtime, permissions): the directory is
//!   pending.
//! * `IN_CREATE` of a directory (or a symbolic link to one), and a directory moved in: watches
//!   are added for its whole tree, then the directory is pending — its scan finds files that
//!   landed before the watches existed.
//! * `IN_MOVED_FROM` + `IN_MOVED_TO` with the same cookie inside one library: the rows move in
//!   the database (`phase_3_store::move_in_place`), watches below a moved directory are
//!   re-pathed, and no scan runs — unless nothing was known at the old path, the source still
//!   had pending changes, or a scan of that library is queued or running (a scan that read the
//!   old rows before the move could drop the moved row; the follow-up scan puts it back). A
//!   `IN_MOVED_FROM` left unpaired for 100 ms is a removal (the old directory is scanned), an
//!   unpaired `IN_MOVED_TO` an addition.
//! * `IN_DELETE_SELF`, `IN_MOVE_SELF`, `IN_UNMOUNT` or `IN_IGNORED` on a library root pause the
//!   library; `IN_UNMOUNT` of a directory below the root re-arms and scans that directory
//!   (an unmounted, now empty, directory deletes nothing: the scanner's empty-target rule).
//! * `IN_Q_OVERFLOW`: events were lost; every library re-adds missing watches and is rescanned.
//!
//! Events are read in batches of up to 64 KiB straight from the inotify descriptor through
//! tokio's `AsyncFd` (the crate's `EventStream` yields one event per poll; batches let a burst
//! of thousands of events be handled in a few wake-ups). Tree walks that add watches (`arm`)
//! run on the blocking pool; the task waits for them, so no event is read for a directory
//! before its watch is recorded.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Instant;

use coral_proto::WatchMode;
use inotify::{EventMask, Inotify, WatchMask};
use tokio::io::unix::AsyncFd;

use super::actor::Actor;
use super::debounce::join;
use super::moves::MoveFrom;
pub(super) use crate::relpath::abs_path;
use crate::scan::file_names::{is_audio_candidate, is_ignored_name};

/// Bytes read from the inotify descriptor at once.
pub(super) const EVENT_BUFFER: usize = 64 * 1024;

/// What is watched on each directory.
pub(super) fn watch_mask() -> WatchMask {
    WatchMask::CREATE
        | WatchMask::CLOSE_WRITE
        | WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
        | WatchMask::EXCL_UNLINK
}

/// Whether a raw file name is one the scanner indexes.
pub(super) fn is_audio(name: &[u8]) -> bool {
    is_audio_candidate(Path::new(OsStr::from_bytes(name)))
}

/// A raw relative path for the log.
pub(super) fn show(rel: &[u8]) -> String {
    if rel.is_empty() {
        "(root)".to_owned()
    } else {
        String::from_utf8_lossy(rel).into_owned()
    }
}

/// One event, owned, with the watch descriptor as a plain number.
#[derive(Debug, Clone)]
pub struct RawEvent {
    pub wd: i32,
    pub mask: EventMask,
    pub cookie: u32,
    pub name: Option<Vec<u8>>,
}

impl Actor {
    pub(super) async fn handle_events(&mut self, events: Vec<RawEvent>) {
        let now = Instant::now();
        let mut new_dirs: Vec<(i64, Vec<u8>)> = Vec::new();
        for ev in events {
            if ev.mask.contains(EventMask::Q_OVERFLOW) {
                tracing::warn!(
                    "inotify event queue overflowed: events were lost; rescanning every watched library"
                );
                for l in self.libs.values() {
                    if l.mode == WatchMode::Inotify {
                        new_dirs.push((l.id, Vec::new()));
                    }
                }
                continue;
            }
            let Some(entry) = self.wds.get(&ev.wd) else {
                continue;
            };
            let (id, dir) = (entry.lib, entry.rel.clone());
            if ev.mask.contains(EventMask::IGNORED) {
                self.wds.remove(&ev.wd);
                if let Some(l) = self.libs.get_mut(&id) {
                    l.dirs.remove(&dir);
                }
                if dir.is_empty() && self.mode(id) == Some(WatchMode::Inotify) {
                    self.pause(id, "its watch was removed (deleted or unmounted)");
                }
                continue;
            }
            if self.mode(id) != Some(WatchMode::Inotify) {
                continue;
            }
            match ev.name {
                None => self.self_event(id, &dir, ev.mask, now, &mut new_dirs),
                Some(name) => {
                    if is_ignored_name(&name) {
                        continue;
                    }
                    self.child_event(id, dir, name, ev.mask, ev.cookie, now, &mut new_dirs)
                        .await;
                }
            }
        }
        self.arm_new_dirs(new_dirs).await;
    }

    /// An event about a watched directory itself.
    fn self_event(
        &mut self,
        id: i64,
        dir: &[u8],
        mask: EventMask,
        now: Instant,
        new_dirs: &mut Vec<(i64, Vec<u8>)>,
    ) {
        let gone = mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF);
        let unmount = mask.contains(EventMask::UNMOUNT);
        if dir.is_empty() && (gone || unmount) {
            let why = if unmount {
                "its filesystem was unmounted"
            } else if mask.contains(EventMask::MOVE_SELF) {
                "it was moved away"
            } else {
                "it was deleted"
            };
            self.pause(id, why);
        } else if unmount {
            // A filesystem mounted below the root went away: watch what is there now and scan
            // it (an empty mount point deletes nothing).
            if let Some(lib) = self.noted(id) {
                lib.debounce.touch(dir, now);
            }
            new_dirs.push((id, dir.to_vec()));
        } else if mask.contains(EventMask::ATTRIB)
            && let Some(lib) = self.noted(id)
        {
            lib.debounce.touch(dir, now);
        }
    }

    /// An event about an entry of a watched directory.
    #[allow(clippy::too_many_arguments)]
    async fn child_event(
        &mut self,
        id: i64,
        dir: Vec<u8>,
        name: Vec<u8>,
        mask: EventMask,
        cookie: u32,
        now: Instant,
        new_dirs: &mut Vec<(i64, Vec<u8>)>,
    ) {
        let is_dir = mask.contains(EventMask::ISDIR);
        let path = join(&dir, &name);
        if mask.contains(EventMask::MOVED_FROM) {
            if is_dir || is_audio(&name) {
                self.moves.insert(
                    cookie,
                    MoveFrom {
                        lib: id,
                        dir,
                        name,
                        is_dir,
                        at: now,
                    },
                );
            }
            return;
        }
        if mask.contains(EventMask::MOVED_TO) {
            match self.moves.remove(&cookie) {
                Some(from) => {
                    self.paired_move(from, id, dir, name, is_dir, now, new_dirs)
                        .await
                }
                None => self.arrived(id, &dir, &name, is_dir, now, new_dirs),
            }
            return;
        }
        if is_dir {
            let Some(lib) = self.noted(id) else {
                return;
            };
            if mask.contains(EventMask::CREATE) {
                new_dirs.push((id, path));
            } else if mask.contains(EventMask::DELETE) {
                lib.debounce.remove_subtree(&path);
                lib.debounce.touch(&dir, now);
            } else if mask.contains(EventMask::ATTRIB) {
                lib.debounce.touch(&path, now);
            }
            return;
        }
        if !is_audio(&name) {
            // A symbolic link to a directory is followed like the scanner follows it.
            if mask.contains(EventMask::CREATE)
                && let Some(lib) = self.libs.get(&id)
                && abs_path(&lib.root, &path).is_dir()
            {
                new_dirs.push((id, path));
            }
            return;
        }
        let Some(lib) = self.noted(id) else {
            return;
        };
        if mask.contains(EventMask::CREATE) {
            lib.debounce.created(&path, now);
        } else if mask.contains(EventMask::MODIFY) {
            lib.debounce.write_activity(&path, now);
        } else if mask.contains(EventMask::CLOSE_WRITE) {
            lib.debounce.write_closed(&path, now);
        } else if mask.contains(EventMask::DELETE) {
            lib.debounce.forget_file(&path);
            lib.debounce.touch(&dir, now);
        } else if mask.contains(EventMask::ATTRIB) {
            lib.debounce.touch(&dir, now);
        }
    }
}

/// The next batch of events (waits until there is one; forever without inotify).
pub(super) async fn read_batch(
    fd: &mut Option<AsyncFd<Inotify>>,
    buf: &mut [u8],
) -> io::Result<Vec<RawEvent>> {
    let Some(fd) = fd.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        let mut guard = fd.readable_mut().await?;
        let result = guard.try_io(|inner| {
            let events = inner.get_mut().read_events(buf)?;
            Ok(events
                .map(|e| RawEvent {
                    wd: e.wd.get_watch_descriptor_id(),
                    mask: e.mask,
                    cookie: e.cookie,
                    name: e.name.map(|n| n.as_bytes().to_vec()),
                })
                .collect::<Vec<_>>())
        });
        match result {
            Ok(Ok(events)) => return Ok(events),
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use coral_proto::ScanTrigger;

    use super::*;
    use crate::watch::actor::tests::actor;

    /// A raw event (`name` empty: about the watched directory itself).
    pub(in crate::watch) fn event(wd: i32, mask: EventMask, cookie: u32, name: &str) -> RawEvent {
        RawEvent {
            wd,
            mask,
            cookie,
            name: (!name.is_empty()).then(|| name.as_bytes().to_vec()),
        }
    }

    #[tokio::test]
    async fn an_overflow_rearms_and_rescans_the_whole_library() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(dir.path()).expect("canonical");
        std::fs::create_dir(root.join("a")).expect("mkdir");
        let (mut a, mut jobs) = actor(100);
        a.add(7, root.clone()).await;
        assert_eq!(a.mode(7), Some(WatchMode::Inotify));
        assert_eq!(a.libs[&7].dirs.len(), 2);
        std::fs::create_dir(root.join("late")).expect("mkdir"); // its event is never read
        a.handle_events(vec![event(-1, EventMask::Q_OVERFLOW, 0, "")])
            .await;
        assert_eq!(a.libs[&7].dirs.len(), 3, "the missed directory is watched");
        a.tick(Instant::now() + Duration::from_millis(150)).await;
        let job = jobs.try_recv().expect("a scan was queued");
        assert_eq!(
            (job.library_id, job.subdir.clone(), job.trigger),
            (7, None, ScanTrigger::FileSystemEvent)
        );
        assert!(jobs.try_recv().is_err(), "one scan");
    }
}
