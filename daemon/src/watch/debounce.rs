//! Debouncing and coalescing of one library's changes into a few path-targeted scans.
//!
//! Every event marks its directory pending (a relative path, raw bytes; the empty path is the
//! library root). A file seen written to and not yet closed is *open for writing*. A file
//! only seen created is open for one quiet period: `open(O_CREAT)` is followed by writes at
//! once, while a hard link or `mknod` never gets a write nor a close.
//! The pending set is released as scans:
//!
//! * when the whole library has been quiet for `quiet` (no event at all): every pending
//!   subtree with no file open for writing in it — so an album being copied is indexed once,
//!   complete, and a burst of thousands of files becomes one flush;
//! * during a long, continuous burst (a multi-album copy), every `max_delay`: the subtrees that
//!   are individually quiet and have nothing open, so finished albums appear while the copy
//!   goes on.
//!
//! A file open for writing holds its directory (and pending ancestors) back until it is closed
//! or has seen no write for `write_timeout` (a copier that died leaves it open forever).
//! A pending directory inside another pending directory is covered by it. When more than
//! `max_jobs` subtrees are ready at once, the deepest are replaced by their parents (never a
//! parent with a file open for writing below it) until few enough remain; if that is not
//! possible, `max_jobs` go now and the rest after the next quiet period.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Whether `path` is `dir` or below it (`dir` empty: the root, which holds everything).
pub fn is_under(path: &[u8], dir: &[u8]) -> bool {
    dir.is_empty()
        || (path.starts_with(dir) && (path.len() == dir.len() || path[dir.len()] == b'/'))
}

/// The directory part of a relative path (`""` for a top-level entry).
pub fn parent_of(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => &[],
    }
}

pub use crate::relpath::join;

/// `path` with its leading `old` replaced by `new` (caller checked `is_under(path, old)`).
pub fn rebase(path: &[u8], old: &[u8], new: &[u8]) -> Vec<u8> {
    let rest = &path[old.len()..];
    let rest = rest.strip_prefix(b"/").unwrap_or(rest);
    if rest.is_empty() {
        new.to_vec()
    } else {
        join(new, rest)
    }
}

fn depth(path: &[u8]) -> usize {
    if path.is_empty() {
        0
    } else {
        path.iter().filter(|&&b| b == b'/').count() + 1
    }
}

/// Entries of `map` at or below `dir`.
fn subtree<'a, V>(
    map: &'a BTreeMap<Vec<u8>, V>,
    dir: &'a [u8],
) -> impl Iterator<Item = (&'a Vec<u8>, &'a V)> + 'a {
    map.range(dir.to_vec()..)
        .take_while(move |(k, _)| k.starts_with(dir))
        .filter(move |(k, _)| is_under(k, dir))
}

/// Whether one of `path`'s proper ancestors (or the root) is in `set`.
fn has_pending_ancestor<V>(map: &BTreeMap<Vec<u8>, V>, path: &[u8]) -> bool {
    if path.is_empty() {
        return false;
    }
    let mut p = path;
    loop {
        p = parent_of(p);
        if map.contains_key(p) {
            return true;
        }
        if p.is_empty() {
            return false;
        }
    }
}

/// Keep only entries not below another entry.
fn top_level(set: BTreeSet<Vec<u8>>) -> BTreeSet<Vec<u8>> {
    let all: BTreeMap<Vec<u8>, ()> = set.into_iter().map(|k| (k, ())).collect();
    all.keys()
        .filter(|k| !has_pending_ancestor(&all, k))
        .cloned()
        .collect()
}

/// The pending changes of one library.
#[derive(Debug)]
pub struct Debouncer {
    quiet: Duration,
    max_delay: Duration,
    write_timeout: Duration,
    max_jobs: usize,
    /// Pending directory → time of its last event.
    dirs: BTreeMap<Vec<u8>, Instant>,
    /// File open for writing → when it stops holding its directory back (last write plus
    /// `write_timeout`, or creation plus `quiet` until a write is seen).
    open: BTreeMap<Vec<u8>, Instant>,
    last_event: Option<Instant>,
    burst_start: Option<Instant>,
    /// The last `take_ready` left ready subtrees behind (more than `max_jobs`).
    backlog: bool,
}

impl Debouncer {
    pub fn new(
        quiet: Duration,
        max_delay: Duration,
        write_timeout: Duration,
        max_jobs: usize,
    ) -> Self {
        Debouncer {
            quiet,
            max_delay: max_delay.max(quiet),
            write_timeout,
            max_jobs: max_jobs.max(1),
            dirs: BTreeMap::new(),
            open: BTreeMap::new(),
            last_event: None,
            burst_start: None,
            backlog: false,
        }
    }

    /// Something changed in directory `dir`.
    pub fn touch(&mut self, dir: &[u8], now: Instant) {
        let t = self.dirs.entry(dir.to_vec()).or_insert(now);
        *t = (*t).max(now);
        self.last_event = Some(self.last_event.map_or(now, |l| l.max(now)));
        self.burst_start.get_or_insert(now);
    }

    /// `file` was written to and is not closed yet.
    pub fn write_activity(&mut self, file: &[u8], now: Instant) {
        self.open.insert(file.to_vec(), now + self.write_timeout);
        self.touch(parent_of(file), now);
    }

    /// `file` was created (its writes, if any, come next).
    pub fn created(&mut self, file: &[u8], now: Instant) {
        let until = now + self.quiet;
        let e = self.open.entry(file.to_vec()).or_insert(until);
        *e = (*e).max(until);
        self.touch(parent_of(file), now);
    }

    /// `file` was closed after writing.
    pub fn write_closed(&mut self, file: &[u8], now: Instant) {
        self.open.remove(file);
        self.touch(parent_of(file), now);
    }

    /// `file` is gone: it no longer holds its directory back.
    pub fn forget_file(&mut self, file: &[u8]) {
        self.open.remove(file);
    }

    /// Whether `file` is open for writing.
    pub fn is_open(&self, file: &[u8]) -> bool {
        self.open.contains_key(file)
    }

    /// Whether `dir` itself is pending or has a file open for writing below it.
    pub fn has_pending(&self, dir: &[u8]) -> bool {
        self.dirs.contains_key(dir) || subtree(&self.open, dir).next().is_some()
    }

    /// A directory (or file) moved from `old` to `new`: pending state below it moves along.
    pub fn rebase(&mut self, old: &[u8], new: &[u8]) {
        for map in [&mut self.dirs, &mut self.open] {
            let moved: Vec<(Vec<u8>, Instant)> =
                subtree(map, old).map(|(k, t)| (k.clone(), *t)).collect();
            for (k, t) in moved {
                map.remove(&k);
                map.insert(rebase(&k, old, new), t);
            }
        }
    }

    /// Drop pending state at or below `dir` (it left the library; its parent is pending).
    pub fn remove_subtree(&mut self, dir: &[u8]) {
        for map in [&mut self.dirs, &mut self.open] {
            let gone: Vec<Vec<u8>> = subtree(map, dir).map(|(k, _)| k.clone()).collect();
            for k in gone {
                map.remove(&k);
            }
        }
        if self.dirs.is_empty() {
            self.burst_start = None;
        }
    }

    /// Forget everything (the library was paused or removed).
    pub fn clear(&mut self) {
        self.dirs.clear();
        self.open.clear();
        self.burst_start = None;
    }

    pub fn pending_dirs(&self) -> usize {
        self.dirs.len()
    }

    pub fn open_files(&self) -> usize {
        self.open.len()
    }

    /// When `take_ready` may next release something, if anything is pending.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if self.dirs.is_empty() {
            return None;
        }
        let mut candidates: Vec<Instant> = Vec::new();
        // While the library is quiet only a write going stale can release more; during a
        // burst, the end of the quiet period or the forced release.
        if let Some(l) = self.last_event
            && l + self.quiet > now
        {
            candidates.push(l + self.quiet);
            if let Some(b) = self.burst_start {
                candidates.push(b + self.max_delay);
            }
        }
        candidates.extend(self.open.values().copied());
        if self.backlog {
            candidates.push(now + self.quiet);
        }
        candidates.into_iter().filter(|t| *t > now).min()
    }

    /// Take the subtrees ready to scan now (already coalesced, at most `max_jobs`), removing
    /// what they cover from the pending set. Ready subtrees beyond `max_jobs` stay pending for
    /// the next call (after another quiet period), so the scan queue is never flooded.
    pub fn take_ready(&mut self, now: Instant) -> Vec<Vec<u8>> {
        self.backlog = false;
        if self.dirs.is_empty() {
            self.burst_start = None;
            return Vec::new();
        }
        self.open.retain(|_, until| *until > now);
        let lib_quiet = self
            .last_event
            .is_none_or(|l| now.saturating_duration_since(l) >= self.quiet);
        let forced = self
            .burst_start
            .is_some_and(|b| now.saturating_duration_since(b) >= self.max_delay);
        if !lib_quiet && !forced {
            return Vec::new();
        }
        if forced {
            self.burst_start = Some(now);
        }
        let tops = top_level(self.dirs.keys().cloned().collect());
        let mut ready = BTreeSet::new();
        for t in tops {
            let hot = !lib_quiet
                && subtree(&self.dirs, &t)
                    .any(|(_, last)| now.saturating_duration_since(*last) < self.quiet);
            let writing = subtree(&self.open, &t).next().is_some();
            if !hot && !writing {
                ready.insert(t);
            }
        }
        let mut jobs = self.coalesce(ready);
        if jobs.len() > self.max_jobs {
            jobs.truncate(self.max_jobs);
            self.backlog = true;
        }
        for t in &jobs {
            let gone: Vec<Vec<u8>> = subtree(&self.dirs, t).map(|(k, _)| k.clone()).collect();
            for k in gone {
                self.dirs.remove(&k);
            }
        }
        if self.dirs.is_empty() {
            self.burst_start = None;
        }
        jobs
    }

    /// Lift the deepest ready subtrees to their parents until at most `max_jobs` remain,
    /// never onto a parent with a file open for writing below it (a lifted parent's scan also
    /// covers pending directories below it that were not ready yet: their files are closed).
    fn coalesce(&self, mut set: BTreeSet<Vec<u8>>) -> Vec<Vec<u8>> {
        let held_back = |p: &[u8]| subtree(&self.open, p).next().is_some();
        while set.len() > self.max_jobs {
            let liftable: Vec<&Vec<u8>> = set
                .iter()
                .filter(|e| !e.is_empty() && !held_back(parent_of(e)))
                .collect();
            let Some(d) = liftable.iter().map(|e| depth(e)).max() else {
                break;
            };
            let lifted: BTreeSet<Vec<u8>> = set
                .iter()
                .map(|e| {
                    if depth(e) == d && liftable.contains(&e) {
                        parent_of(e).to_vec()
                    } else {
                        e.clone()
                    }
                })
                .collect();
            set = top_level(lifted);
        }
        set.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Duration = Duration::from_millis(300);

    fn deb() -> Debouncer {
        Debouncer::new(Q, Q * 10, Duration::from_secs(60), 8)
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    fn strs(v: Vec<Vec<u8>>) -> Vec<String> {
        v.into_iter()
            .map(|p| String::from_utf8_lossy(&p).into_owned())
            .collect()
    }

    #[test]
    fn path_helpers() {
        assert!(is_under(b"a/b", b"a"));
        assert!(is_under(b"a", b"a"));
        assert!(!is_under(b"ab", b"a"));
        assert!(!is_under(b"a-b/c", b"a"));
        assert!(is_under(b"x", b""));
        assert_eq!(parent_of(b"a/b/c.mp3"), b"a/b");
        assert_eq!(parent_of(b"c.mp3"), b"");
        assert_eq!(join(b"", b"x"), b"x");
        assert_eq!(join(b"a", b"x"), b"a/x");
        assert_eq!(rebase(b"a/b/c", b"a/b", b"z"), b"z/c");
        assert_eq!(rebase(b"a/b", b"a/b", b"z/y"), b"z/y");
        assert_eq!(rebase(b"a/b", b"a", b""), b"b");
    }

    #[test]
    fn waits_for_the_quiet_period_then_releases_once() {
        let t0 = Instant::now();
        let mut d = deb();
        d.touch(b"Album", t0);
        d.write_closed(b"Album/1.flac", ms(t0, 100));
        d.write_closed(b"Album/2.flac", ms(t0, 200));
        assert!(d.take_ready(ms(t0, 400)).is_empty(), "not quiet yet");
        assert_eq!(d.next_deadline(ms(t0, 400)), Some(ms(t0, 500)));
        assert_eq!(strs(d.take_ready(ms(t0, 500))), ["Album"]);
        assert!(d.take_ready(ms(t0, 5000)).is_empty());
        assert_eq!(d.next_deadline(ms(t0, 5000)), None);
    }

    #[test]
    fn an_open_file_holds_its_directory_until_closed_or_stale() {
        let t0 = Instant::now();
        let mut d = deb();
        d.write_activity(b"A/big.flac", t0);
        d.write_closed(b"B/done.flac", t0);
        // Quiet, but A/big.flac is still open: only B goes.
        assert_eq!(strs(d.take_ready(ms(t0, 400))), ["B"]);
        assert_eq!(d.open_files(), 1);
        assert!(d.take_ready(ms(t0, 2000)).is_empty());
        d.write_closed(b"A/big.flac", ms(t0, 3000));
        assert!(d.take_ready(ms(t0, 3100)).is_empty());
        assert_eq!(strs(d.take_ready(ms(t0, 3300))), ["A"]);

        // A file left open forever stops holding after the write timeout.
        d.write_activity(b"C/stuck.mp3", ms(t0, 4000));
        assert_eq!(d.next_deadline(ms(t0, 4400)), Some(ms(t0, 64_000)));
        assert!(d.take_ready(ms(t0, 63_000)).is_empty());
        assert_eq!(strs(d.take_ready(ms(t0, 64_000))), ["C"]);
        assert_eq!(d.open_files(), 0);
    }

    #[test]
    fn a_file_only_created_holds_its_directory_for_one_quiet_period() {
        let t0 = Instant::now();
        let mut d = deb();
        // Hard links: created, never written or closed.
        d.created(b"links/a.mp3", t0);
        d.created(b"links/b.mp3", ms(t0, 100));
        assert!(d.take_ready(ms(t0, 300)).is_empty());
        assert_eq!(d.next_deadline(ms(t0, 300)), Some(ms(t0, 400)));
        assert_eq!(strs(d.take_ready(ms(t0, 400))), ["links"]);
        // A copy: created, then written: open until closed.
        d.created(b"copy/a.mp3", ms(t0, 1000));
        d.write_activity(b"copy/a.mp3", ms(t0, 1001));
        assert!(d.take_ready(ms(t0, 2000)).is_empty());
        d.write_closed(b"copy/a.mp3", ms(t0, 2100));
        assert_eq!(strs(d.take_ready(ms(t0, 2400))), ["copy"]);
    }

    #[test]
    fn an_open_file_below_a_pending_directory_holds_the_ancestor() {
        let t0 = Instant::now();
        let mut d = deb();
        d.touch(b"New", t0); // a new directory: its whole subtree will be scanned
        d.write_activity(b"New/CD2/03.flac", t0);
        assert!(d.take_ready(ms(t0, 1000)).is_empty());
        d.write_closed(b"New/CD2/03.flac", ms(t0, 1100));
        assert_eq!(strs(d.take_ready(ms(t0, 1400))), ["New"]);
    }

    #[test]
    fn a_long_burst_releases_finished_directories_every_max_delay() {
        let t0 = Instant::now();
        let mut d = deb(); // max_delay 3 s
        d.write_closed(b"Album1/1.flac", t0);
        // Album2 keeps getting events every 100 ms for 5 s.
        let mut released = Vec::new();
        for i in 1..=50 {
            let now = ms(t0, i * 100);
            d.write_activity(b"Album2/x.flac", now);
            released.extend(strs(d.take_ready(now)));
        }
        assert_eq!(
            released,
            ["Album1"],
            "released at the 3 s mark, Album2 still busy"
        );
        d.write_closed(b"Album2/x.flac", ms(t0, 5000));
        assert_eq!(strs(d.take_ready(ms(t0, 5300))), ["Album2"]);
    }

    #[test]
    fn nested_pending_directories_are_covered_by_their_ancestor() {
        let t0 = Instant::now();
        let mut d = deb();
        d.touch(b"a", t0);
        d.touch(b"a/b", t0);
        d.touch(b"a/b/c", t0);
        d.touch(b"a-b", t0);
        assert_eq!(strs(d.take_ready(ms(t0, 300))), ["a", "a-b"]);
    }

    #[test]
    fn many_siblings_are_lifted_to_their_parent() {
        let t0 = Instant::now();
        let mut d = deb();
        for i in 0..100 {
            d.write_closed(format!("burst/copy_{i:04}/t.mp3").as_bytes(), t0);
        }
        d.write_closed(b"other/x.mp3", t0);
        assert_eq!(strs(d.take_ready(ms(t0, 300))), ["burst", "other"]);

        for i in 0..100 {
            d.write_closed(format!("copy_{i:04}/t.mp3").as_bytes(), t0);
        }
        assert_eq!(strs(d.take_ready(ms(t0, 300))), [""], "the library root");
    }

    #[test]
    fn lifting_never_sweeps_in_a_file_still_being_written() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(Q, Q * 10, Duration::from_secs(60), 2);
        d.write_closed(b"x/a/1.mp3", t0);
        d.write_closed(b"x/b/1.mp3", t0);
        d.write_closed(b"x/c/1.mp3", t0);
        d.write_activity(b"x/d/1.mp3", t0);
        // x holds x/d/1.mp3 open, so no lift to x: two now, the third after a quiet period.
        assert_eq!(strs(d.take_ready(ms(t0, 300))), ["x/a", "x/b"]);
        assert_eq!(d.next_deadline(ms(t0, 300)), Some(ms(t0, 600)));
        assert_eq!(strs(d.take_ready(ms(t0, 600))), ["x/c"]);
        assert!(d.has_pending(b"x/d"));
        assert!(d.take_ready(ms(t0, 900)).is_empty());
    }

    #[test]
    fn a_forced_release_during_a_burst_is_capped_and_lifted() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(Q, Q * 10, Duration::from_secs(60), 8);
        // 100 finished directories, and a copy still writing one more, for 3 s.
        for i in 0..100 {
            d.write_closed(format!("lib/copy_{i:04}/t.mp3").as_bytes(), t0);
        }
        d.write_activity(b"lib/copy_0100/t.mp3", ms(t0, 3000));
        let got = d.take_ready(ms(t0, 3000));
        assert_eq!(got.len(), 8, "capped: {:?}", strs(got));
        d.write_closed(b"lib/copy_0100/t.mp3", ms(t0, 3100));
        // Quiet now and nothing open: everything left goes as one scan of the parent.
        assert_eq!(strs(d.take_ready(ms(t0, 3400))), ["lib"]);
        assert_eq!(d.pending_dirs(), 0);
    }

    #[test]
    fn moves_carry_pending_state() {
        let t0 = Instant::now();
        let mut d = deb();
        d.write_activity(b"old/sub/f.mp3", t0);
        d.touch(b"old", t0);
        d.rebase(b"old", b"new/place");
        assert!(d.is_open(b"new/place/sub/f.mp3"));
        assert!(d.has_pending(b"new/place"));
        assert!(!d.has_pending(b"old"));
        d.remove_subtree(b"new/place");
        assert_eq!((d.pending_dirs(), d.open_files()), (0, 0));
    }
}
