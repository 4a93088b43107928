//! The embedding queue between scans and the pipeline.
//!
//! - [`enqueue_and_follow`]: a request (a scan, the start-up sweep) sorts its tracks — already
//!   embedded, known bad, too short or long, or to embed — queues them all in `embed_queue`,
//!   then follows its rows: its counts are their counts, and it ends when none is queued.
//! - [`consume`]: this process's consumer. It leases queued rows (smallest requests first),
//!   checks that each file is still the one that was indexed, feeds the decode queue, and
//!   settles each row as its outcome comes back from the stages. A consumer that dies leaves its
//!   leases to expire; another consumer then takes the rows over.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::phase_5_store::{self, NewIssue};
use super::queue::{self, Claimed, QueueRow, QueueState, Tally};
use super::{EmbedError, EmbedTarget, Inner, JobCtx, Outcome, WorkItem, flush_issues, lock};
use crate::db::health::retry;
use crate::progress::ScanCounters;

/// How often a follower recounts its rows when no local outcome wakes it (rows settled by
/// consumers on other machines), and a consumer looks for rows when nothing wakes it.
const POLL: Duration = Duration::from_millis(400);
/// How often a consumer reports itself in `embed_workers`.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// Consumers not seen for this long are not listed.
pub const WORKER_SEEN_S: f64 = 60.0;
/// Rows queued per statement.
const ENQUEUE_CHUNK: usize = 5000;
/// Precheck reads per statement.
const PRECHECK_CHUNK: usize = 5000;

/// Sort `targets` (deduplicated) into queue rows; tracks already settled for their current file
/// start settled. Stale vectors of tracks now out of the duration limits are deleted.
pub(super) async fn plan(
    inner: &Inner,
    targets: Vec<EmbedTarget>,
    cancel: &CancellationToken,
) -> Result<Vec<QueueRow>, EmbedError> {
    let mut seen = std::collections::HashSet::with_capacity(targets.len());
    let targets: Vec<EmbedTarget> = targets
        .into_iter()
        .filter(|t| seen.insert(t.track_id))
        .collect();
    let ids: Vec<i64> = targets.iter().map(|t| t.track_id).collect();
    let mut states = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(PRECHECK_CHUNK) {
        if cancel.is_cancelled() {
            return Err(EmbedError::Cancelled);
        }
        let found = retry(&inner.db, "read embedding states", cancel, None, || {
            phase_5_store::target_states(&inner.pool, inner.model.id, chunk)
        })
        .await?;
        for s in found {
            states.insert(s.id, s);
        }
    }
    let mut rows = Vec::with_capacity(targets.len());
    let mut stale_skipped = Vec::new();
    for t in targets {
        let Some(s) = states.get(&t.track_id) else {
            // Deleted since: settled as skipped (no longer indexed).
            rows.push(row(t.track_id, QueueState::Skipped, 0, 0));
            continue;
        };
        let state = if t.duration_ms < inner.min_ms || t.duration_ms > inner.max_ms {
            if s.stale_embedding {
                stale_skipped.push(t.track_id);
            }
            QueueState::Skipped
        } else if s.embedded {
            QueueState::Unchanged
        } else {
            match s.issue_outcome.as_deref() {
                Some("skipped") => QueueState::Skipped,
                Some(_) => QueueState::Failed,
                None => QueueState::Queued,
            }
        };
        rows.push(row(t.track_id, state, s.size, s.mtime_ns));
    }
    if !stale_skipped.is_empty() {
        retry(&inner.db, "delete stale embeddings", cancel, None, || {
            phase_5_store::delete_embeddings(&inner.pool, inner.model.id, &stale_skipped)
        })
        .await?;
    }
    Ok(rows)
}

fn row(track_id: i64, state: QueueState, file_size: i64, file_mtime_ns: i64) -> QueueRow {
    QueueRow {
        track_id,
        state,
        file_size,
        file_mtime_ns,
    }
}

/// Queue `rows` for `request_id` at `priority` (see [`queue::priority`]), then follow them to
/// the end: see [`follow`].
pub(super) async fn enqueue_and_follow(
    inner: &Inner,
    request_id: Uuid,
    rows: Vec<QueueRow>,
    priority: i64,
    cancel: &CancellationToken,
    counters: Option<&ScanCounters>,
) -> Result<Tally, EmbedError> {
    // Registered before the rows exist, so this process's consumer cancels their work with
    // the request.
    let _registered = Registration::new(inner, request_id, cancel);
    for chunk in rows.chunks(ENQUEUE_CHUNK) {
        retry(&inner.db, "queue tracks to embed", cancel, None, || {
            queue::enqueue(&inner.pool, request_id, inner.model.id, priority, chunk)
        })
        .await?;
    }
    inner.wake.notify_one();
    tracing::debug!(priority, rows = rows.len(), "tracks queued for embedding");
    follow(inner, request_id, cancel, counters).await
}

/// The request's cancel token, known to the consumer while the request is followed.
struct Registration<'a> {
    inner: &'a Inner,
    request_id: Uuid,
}

impl<'a> Registration<'a> {
    fn new(inner: &'a Inner, request_id: Uuid, cancel: &CancellationToken) -> Self {
        lock(&inner.cancels).insert(request_id, cancel.clone());
        Registration { inner, request_id }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        lock(&self.inner.cancels).remove(&self.request_id);
    }
}

/// Count the request's rows onto `counters` until none is queued; then forget them. Cancelled:
/// its queued rows are dropped (no one else's) and `Cancelled` returned. A shutdown returns
/// `Stopped` and leaves the rows for the next start.
async fn follow(
    inner: &Inner,
    request_id: Uuid,
    cancel: &CancellationToken,
    counters: Option<&ScanCounters>,
) -> Result<Tally, EmbedError> {
    loop {
        let t = retry(&inner.db, "count embedded tracks", cancel, None, || {
            queue::tally(&inner.pool, request_id)
        })
        .await;
        let t = match t {
            Ok(t) => t,
            // Only the request's cancellation ends the retry: handled below.
            Err(crate::db::health::RetryError::Cancelled) => Tally::default(),
            Err(e) => return Err(e.into()),
        };
        if cancel.is_cancelled() {
            let dropped = retry(&inner.db, "drop queued tracks", &inner.stop, None, || {
                queue::drop_queued(&inner.pool, request_id)
            })
            .await?;
            tracing::info!(
                dropped,
                "embedding cancelled: its queued tracks were dropped"
            );
            let _ = retry(&inner.db, "forget queued tracks", &inner.stop, None, || {
                queue::forget(&inner.pool, request_id)
            })
            .await;
            return Err(EmbedError::Cancelled);
        }
        if let Some(c) = counters {
            c.set_embeddings_expected(t.total());
            c.embeddings_done
                .store(t.done + t.unchanged, Ordering::Relaxed);
            c.embeddings_skipped.store(t.skipped, Ordering::Relaxed);
            c.embeddings_failed.store(t.failed, Ordering::Relaxed);
        }
        if t.queued == 0 {
            retry(&inner.db, "forget embedded tracks", cancel, None, || {
                queue::forget(&inner.pool, request_id)
            })
            .await?;
            return Ok(t);
        }
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = inner.stop.cancelled() => return Err(EmbedError::Stopped),
            _ = inner.shared.broken.cancelled() => return Err(inner.broken_error()),
            _ = inner.settled.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// What the consumer keeps of a track between its claim and its outcome.
struct InFlight {
    path: PathBuf,
    file_size: i64,
    file_mtime_ns: i64,
}

/// This process's consumer of the queue; ends on shutdown or when the embedder is gone.
pub(super) async fn consume(inner: Weak<Inner>, stop: CancellationToken) {
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<(Uuid, Outcome)>();
    let mut jobs: HashMap<Uuid, Arc<JobCtx>> = HashMap::new();
    let mut in_flight: HashMap<(Uuid, i64), InFlight> = HashMap::new();
    let mut outcomes: Vec<(Uuid, Outcome)> = Vec::new();
    let mut reported: Option<std::time::Instant> = None;
    let mut renewed = std::time::Instant::now();
    loop {
        if reported.is_none_or(|t| t.elapsed() >= REPORT_EVERY)
            && let Some(i) = inner.upgrade()
        {
            report(&i).await;
            reported = Some(std::time::Instant::now());
        }
        {
            // Held while waiting (at most POLL): the embedder outlives the wait by that much.
            let Some(i) = inner.upgrade() else { return };
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    let _ = queue::remove_worker(&i.pool, &i.owner).await;
                    return;
                }
                o = out_rx.recv() => match o {
                    Some(o) => outcomes.push(o),
                    None => return,
                },
                _ = i.wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
            }
        }
        while let Ok(o) = out_rx.try_recv() {
            outcomes.push(o);
        }
        let Some(i) = inner.upgrade() else { return };
        if i.shared.broken.is_cancelled() {
            return;
        }
        if !outcomes.is_empty() {
            settle(&i, std::mem::take(&mut outcomes), &mut in_flight).await;
            i.settled.notify_waiters();
        }
        // Cancelled requests: their items are dropped by the stages without an outcome.
        jobs.retain(|_, j| !j.cancel.is_cancelled());
        in_flight.retain(|(r, _), _| jobs.contains_key(r));
        if renewed.elapsed().as_secs_f64() >= renew_every(i.lease_s) {
            renew(&i, &in_flight).await;
            renewed = std::time::Instant::now();
        }
        let Some(tx) = lock(&i.decode_tx).clone() else {
            return; // shutting down
        };
        let room = tx.capacity();
        if room == 0 {
            continue;
        }
        let room = crate::test_hooks::embed_claim_pace(room).await;
        let claimed = retry(&i.db, "claim tracks to embed", &stop, None, || {
            queue::claim(
                &i.pool,
                i.model.id,
                &i.owner,
                i.lease_s,
                i64::try_from(room).unwrap_or(1),
            )
        })
        .await;
        let claimed = match claimed {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "no tracks claimed");
                continue;
            }
        };
        if claimed.len() == room {
            i.wake.notify_one(); // there may be more
        }
        let mut settled_now = Vec::new();
        for c in claimed {
            if in_flight.contains_key(&(c.request_id, c.track_id)) {
                // Still in this pipeline: its lease ran out before a renewal (a stalled
                // database) and this consumer took it again. One copy is enough.
                continue;
            }
            match check(&c, &i.path_map) {
                Err(o) => settled_now.push((c.request_id, o)),
                Ok((path, duration_ms)) => {
                    let job = jobs.entry(c.request_id).or_insert_with(|| {
                        let cancel = lock(&i.cancels)
                            .get(&c.request_id)
                            .cloned()
                            .unwrap_or_default();
                        Arc::new(JobCtx {
                            request_id: c.request_id,
                            cancel,
                            outcomes: out_tx.clone(),
                        })
                    });
                    in_flight.insert(
                        (c.request_id, c.track_id),
                        InFlight {
                            path: path.clone(),
                            file_size: c.file_size,
                            file_mtime_ns: c.file_mtime_ns,
                        },
                    );
                    i.shared.decode_queue.fetch_add(1, Ordering::Relaxed);
                    let item = WorkItem {
                        job: Arc::clone(job),
                        track_id: c.track_id,
                        path,
                        duration_ms,
                        file_size: c.file_size,
                        file_mtime_ns: c.file_mtime_ns,
                    };
                    if tx.try_send(item).is_err() {
                        // Only this task sends; a full queue means shutdown is closing it.
                        i.shared.decode_queue.fetch_sub(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }
        if !settled_now.is_empty() {
            settle(&i, settled_now, &mut in_flight).await;
            i.settled.notify_waiters();
        }
    }
}

/// How often a consumer renews the leases of the rows it works on: a third of the lease, so
/// two renewals may fail before a lease runs out.
fn renew_every(lease_s: f64) -> f64 {
    (lease_s / 3.0).max(0.2)
}

/// Extend the leases of the rows in this consumer's pipeline (a failure waits for the next
/// renewal).
async fn renew(i: &Inner, in_flight: &HashMap<(Uuid, i64), InFlight>) {
    let rows: Vec<(Uuid, i64)> = in_flight.keys().copied().collect();
    if let Err(e) = queue::renew(&i.pool, &i.owner, i.lease_s, &rows).await {
        tracing::debug!(error = %e, "leases not renewed");
    }
}

/// Tell the workers table this consumer is alive (a failure waits for the next report).
async fn report(i: &Inner) {
    let rate = lock(&i.shared.rate).per_second();
    let r = queue::report_worker(
        &i.pool,
        &i.owner,
        &super::host_name(),
        &i.device,
        i.model.id,
        i64::try_from(i.shared.tracks_stored.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
        rate,
    )
    .await;
    if let Err(e) = r {
        tracing::debug!(error = %e, "consumer not reported");
    }
}

/// The file a claimed row names, if it is still the file that was queued: else the outcome.
fn check(c: &Claimed, path_map: &[(PathBuf, PathBuf)]) -> Result<(PathBuf, i64), Outcome> {
    let skipped = |reason: &str| Outcome::Skipped {
        track_id: c.track_id,
        reason: reason.to_owned(),
        record: false,
    };
    let (Some(root), Some(rel), Some(duration_ms)) = (&c.library_path, &c.rel_path, c.duration_ms)
    else {
        return Err(skipped("no longer indexed"));
    };
    if c.track_size != Some(c.file_size) || c.track_mtime_ns != Some(c.file_mtime_ns) {
        return Err(skipped(
            "re-indexed since it was queued (its newer scan embeds it)",
        ));
    }
    let path = map_path(Path::new(root), path_map).join(OsStr::from_bytes(rel));
    match std::fs::metadata(&path) {
        Ok(md) => {
            let size = i64::try_from(md.len()).unwrap_or(i64::MAX);
            if size != c.file_size || crate::file_stamp::mtime_ns(&md) != c.file_mtime_ns {
                return Err(skipped(
                    "the file changed since it was indexed (the next scan re-reads and embeds it)",
                ));
            }
            Ok((path, duration_ms))
        }
        Err(e) => Err(Outcome::Failed {
            track_id: c.track_id,
            reason: format!("cannot read {}: {e}", path.display()),
            record: false,
        }),
    }
}

/// The library root as this machine sees it: the first `FROM=TO` mapping whose FROM is a
/// leading part of `root` replaces that part.
pub fn map_path(root: &Path, path_map: &[(PathBuf, PathBuf)]) -> PathBuf {
    for (from, to) in path_map {
        if let Ok(rest) = root.strip_prefix(from) {
            return to.join(rest);
        }
    }
    root.to_path_buf()
}

/// Write outcomes: their rows' states, and the issues to remember for unchanged files.
async fn settle(
    i: &Inner,
    outcomes: Vec<(Uuid, Outcome)>,
    in_flight: &mut HashMap<(Uuid, i64), InFlight>,
) {
    let mut rows = Vec::with_capacity(outcomes.len());
    let mut issues: HashMap<Uuid, Vec<NewIssue>> = HashMap::new();
    for (request_id, o) in outcomes {
        let (track_id, state) = match &o {
            Outcome::Done(id) => (*id, QueueState::Done),
            Outcome::Skipped { track_id, .. } => (*track_id, QueueState::Skipped),
            Outcome::Failed { track_id, .. } => (*track_id, QueueState::Failed),
        };
        let flight = in_flight.remove(&(request_id, track_id));
        if let Outcome::Skipped { reason, record, .. } | Outcome::Failed { reason, record, .. } = &o
        {
            let failed = state == QueueState::Failed;
            let path = flight
                .as_ref()
                .map(|f| f.path.display().to_string())
                .unwrap_or_default();
            if failed {
                tracing::warn!(%request_id, track_id, path = %path, reason = %reason, "track not embedded");
            } else {
                tracing::info!(%request_id, track_id, path = %path, reason = %reason, "track skipped for embedding");
            }
            if *record && let Some(f) = &flight {
                issues.entry(request_id).or_default().push(NewIssue {
                    track_id,
                    file_size: f.file_size,
                    file_mtime_ns: f.file_mtime_ns,
                    outcome: if failed { "failed" } else { "skipped" },
                    reason: reason.clone(),
                });
            }
        }
        rows.push((request_id, track_id, state));
    }
    for (request_id, mut list) in issues {
        flush_issues(i, request_id, &mut list).await;
    }
    // Waits out a database outage; a shutdown leaves the rows leased, and the next start
    // releases them.
    if let Err(e) = retry(&i.db, "settle embedded tracks", &i.stop, None, || {
        queue::settle(&i.pool, &rows)
    })
    .await
    {
        tracing::debug!(error = %e, "queue rows not settled");
    }
}
