//! Cookie-paired moves. An `IN_MOVED_FROM` waits up to `MOVE_PAIR_GRACE` for the
//! `IN_MOVED_TO` with its cookie. A pair inside one library moves the rows in the database
//! through the scan's store stage (`phase_3_store::move_in_place`: same track id, so the same
//! embedding) and re-paths the watches below a moved directory, with no scan unless one is
//! needed (the rules are in `inotify`); a half left unpaired is a removal (`departed`) or an
//! addition (`arrived`).

use std::time::{Duration, Instant};

use coral_proto::WatchMode;

use super::actor::Actor;
use super::debounce::join;
use super::inotify::{is_audio, show};
use crate::scan::phase_3_store;

/// How long an `IN_MOVED_FROM` waits for its `IN_MOVED_TO`.
pub(super) const MOVE_PAIR_GRACE: Duration = Duration::from_millis(100);

/// The first half of a move, waiting for its pair.
pub(super) struct MoveFrom {
    pub(super) lib: i64,
    pub(super) dir: Vec<u8>,
    pub(super) name: Vec<u8>,
    pub(super) is_dir: bool,
    pub(super) at: Instant,
}

impl Actor {
    /// Something appeared by a move from outside (or from another library).
    pub(super) fn arrived(
        &mut self,
        id: i64,
        dir: &[u8],
        name: &[u8],
        is_dir: bool,
        now: Instant,
        new_dirs: &mut Vec<(i64, Vec<u8>)>,
    ) {
        let path = join(dir, name);
        if is_dir {
            // Armed, then scanned as a whole (see `arm_new_dirs`).
            self.noted(id);
            new_dirs.push((id, path));
        } else if is_audio(name)
            && let Some(lib) = self.noted(id)
        {
            lib.debounce.touch(dir, now);
        }
    }

    /// Something left by a move to outside the library (or its pair never came).
    pub(super) fn departed(&mut self, m: MoveFrom, now: Instant) {
        let old = join(&m.dir, &m.name);
        if m.is_dir {
            self.unwatch_subtree(m.lib, &old);
        }
        if self.mode(m.lib) != Some(WatchMode::Inotify) {
            return;
        }
        if let Some(lib) = self.noted(m.lib) {
            if m.is_dir {
                lib.debounce.remove_subtree(&old);
            } else {
                lib.debounce.forget_file(&old);
            }
            lib.debounce.touch(&m.dir, now);
        }
    }

    /// A rename or move with both halves seen.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn paired_move(
        &mut self,
        from: MoveFrom,
        id: i64,
        dir: Vec<u8>,
        name: Vec<u8>,
        is_dir: bool,
        now: Instant,
        new_dirs: &mut Vec<(i64, Vec<u8>)>,
    ) {
        if from.lib != id || (!is_dir && !is_audio(&name)) {
            // Between libraries, or renamed to a name the scanner ignores.
            let arrived_here = from.lib != id;
            self.departed(from, now);
            if arrived_here {
                self.arrived(id, &dir, &name, is_dir, now, new_dirs);
            }
            return;
        }
        let old = join(&from.dir, &from.name);
        let new = join(&dir, &name);
        let busy = self.scan_active(id);
        if is_dir {
            self.rebase_watches(id, &old, &new);
        }
        let moved = phase_3_store::move_in_place(&self.pool, id, &old, &new, is_dir).await;
        let Some(lib) = self.noted(id) else {
            return;
        };
        let was_pending = if is_dir {
            let p = lib.debounce.has_pending(&old);
            lib.debounce.rebase(&old, &new);
            p || lib.debounce.has_pending(&from.dir)
        } else {
            let open = lib.debounce.is_open(&old);
            if open {
                lib.debounce.forget_file(&old);
                lib.debounce.write_activity(&new, now);
            }
            open || lib.debounce.has_pending(&from.dir)
        };
        let rows = match &moved {
            Ok(n) => *n,
            Err(e) => {
                lib.span.in_scope(|| {
                    tracing::warn!(from = %show(&old), to = %show(&new), error = %e, "could not apply a move to the database; rescanning")
                });
                0
            }
        };
        lib.span.in_scope(
            || tracing::debug!(from = %show(&old), to = %show(&new), rows, "moved in place"),
        );
        if rows == 0 || was_pending || busy {
            lib.debounce.touch(if is_dir { &new } else { &dir }, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use inotify::EventMask;

    use super::*;
    use crate::watch::actor::tests::actor;
    use crate::watch::inotify::tests::event;

    #[tokio::test]
    async fn moves_pair_by_cookie_and_unpaired_halves_are_removals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(dir.path()).expect("canonical");
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        std::fs::create_dir_all(root.join("x")).expect("mkdir");
        let (mut a, mut jobs) = actor(100);
        a.add(7, root.clone()).await;
        let wd = |a: &Actor, rel: &str| a.libs[&7].dirs[rel.as_bytes()];
        let (root_wd, b_wd) = (wd(&a, ""), wd(&a, "a/b"));

        // a → x/z: watches below follow; the database is unreachable here, so the new
        // place is scanned instead of being moved in place.
        std::fs::rename(root.join("a"), root.join("x/z")).expect("rename");
        let x_wd = wd(&a, "x");
        a.handle_events(vec![
            event(root_wd, EventMask::MOVED_FROM | EventMask::ISDIR, 42, "a"),
            event(x_wd, EventMask::MOVED_TO | EventMask::ISDIR, 42, "z"),
        ])
        .await;
        assert!(a.moves.is_empty());
        assert_eq!(wd(&a, "x/z/b"), b_wd, "same watch, new path");
        assert!(!a.libs[&7].dirs.contains_key(b"a".as_slice()));
        assert_eq!(a.wds[&b_wd].rel, b"x/z/b".to_vec());
        a.tick(Instant::now() + Duration::from_millis(150)).await;
        let job = jobs.try_recv().expect("a scan");
        assert_eq!(job.subdir, Some(PathBuf::from("x/z")));

        // x/z moved out of the library: its watches go, x is scanned.
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::rename(root.join("x/z"), outside.path().join("z")).expect("rename");
        a.handle_events(vec![event(
            x_wd,
            EventMask::MOVED_FROM | EventMask::ISDIR,
            43,
            "z",
        )])
        .await;
        a.tick(Instant::now()).await;
        assert_eq!(a.moves.len(), 1, "waiting for its pair");
        a.tick(Instant::now() + MOVE_PAIR_GRACE).await;
        assert!(a.moves.is_empty());
        assert!(!a.wds.contains_key(&b_wd), "watches below were removed");
        a.tick(Instant::now() + MOVE_PAIR_GRACE + Duration::from_millis(150))
            .await;
        let job = jobs.try_recv().expect("a scan");
        assert_eq!(job.subdir, Some(PathBuf::from("x")));

        // The root deleted: paused, nothing queued, no watches left.
        a.handle_events(vec![event(root_wd, EventMask::DELETE_SELF, 0, "")])
            .await;
        assert_eq!(a.mode(7), Some(WatchMode::Paused));
        assert!(a.wds.is_empty());
        a.tick(Instant::now() + Duration::from_secs(1)).await;
        assert!(jobs.try_recv().is_err());
    }
}
