//! The stages' loops: the decode threads (work item → model-rate windows), the inference thread
//! (owns the model, batches windows across tracks), the store task (vectors → pgvector, one
//! statement per batch) and the housekeeping task, and what starts the inference and decode
//! threads. Each reports a track's outcome to its request's consumer.

use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::model;
use super::phase_2_resample::{WindowMaker, WindowPlan};
use super::phase_3_batch::Finished;
use super::phase_4_infer::{self, DeviceChoice, InferInput, InferOutput, LoopConfig};
use super::phase_5_store::{self, NewEmbedding, RegisteredModel};
use super::{
    CancellationToken, EmbedConfig, EmbedError, Inner, Outcome, STORE_BATCH, Shared, WorkItem, lock,
};
use crate::db::health::{DbHealth, retry};
use crate::liveness::Heartbeat;

/// Decoding is a small share of the work on CPU; when it preempts one of libtorch's threads,
/// the others wait at the next barrier. A lower priority (nice +5, this thread only) lets the
/// decoder fill the gaps instead.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread; failure only leaves the priority as is.
        unsafe {
            let tid = libc::gettid();
            let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 5);
        }
    }
}

/// Decode thread: work items → model-rate windows → inference queue.
pub(super) fn decode_thread(
    rx: Arc<Mutex<mpsc::Receiver<WorkItem>>>,
    tx: std_mpsc::SyncSender<InferInput<WorkItem>>,
    plan: WindowPlan,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    lower_thread_priority();
    let mut maker = WindowMaker::new(plan);
    loop {
        let item = lock(&rx).blocking_recv();
        let Some(item) = item else { return };
        shared.decode_queue.fetch_sub(1, Ordering::Relaxed);
        if stop.is_cancelled() {
            return;
        }
        if item.job.cancel.is_cancelled() {
            continue;
        }
        let duration_s = item.duration_ms as f64 / 1000.0;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            maker.make(&item.path, duration_s)
        }));
        let outcome = match result {
            Ok(Ok(w)) => {
                shared.tracks_decoded.fetch_add(1, Ordering::Relaxed);
                shared
                    .decoded_ms
                    .fetch_add((w.decoded_seconds * 1000.0) as u64, Ordering::Relaxed);
                shared.infer.queued_tracks.fetch_add(1, Ordering::Relaxed);
                if tx
                    .send(InferInput {
                        meta: item,
                        samples: w.samples,
                        windows: w.count,
                    })
                    .is_err()
                {
                    return;
                }
                continue;
            }
            Ok(Err(e)) if e.is_unsupported() => Outcome::Skipped {
                track_id: item.track_id,
                reason: e.to_string(),
                record: true,
            },
            Ok(Err(e)) => Outcome::Failed {
                track_id: item.track_id,
                reason: e.to_string(),
                record: true,
            },
            Err(panic) => {
                maker = WindowMaker::new(plan);
                let what = crate::panic_text::panic_message(panic.as_ref()).unwrap_or_default();
                tracing::error!(request_id = %item.job.request_id, path = %item.path.display(), panic = %what, "decoder panicked on this file");
                Outcome::Failed {
                    track_id: item.track_id,
                    reason: format!("the decoder crashed on this file ({what})"),
                    record: true,
                }
            }
        };
        item.job.report(outcome);
    }
}

/// The inference thread: loads the model, reports readiness, runs the batching loop.
#[allow(clippy::too_many_arguments)]
pub(super) fn inference_thread(
    files: model::ModelFiles,
    choice: DeviceChoice,
    threads: usize,
    row_len: usize,
    (batch_size, flush_after): (usize, Duration),
    ready: oneshot::Sender<Result<(String, bool), EmbedError>>,
    rx: std_mpsc::Receiver<InferInput<WorkItem>>,
    store_tx: mpsc::Sender<Finished<WorkItem>>,
    stop: CancellationToken,
    shared: Arc<Shared>,
    heartbeat: Option<Arc<Heartbeat>>,
) {
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        phase_4_infer::load_model(&files, choice, threads, row_len)
    }));
    drop(files);
    let mut model = match loaded {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
        Err(_) => {
            let _ = ready.send(Err(EmbedError::Internal(
                "libtorch panicked while loading the model".into(),
            )));
            return;
        }
    };
    let accelerator = model.is_accelerator();
    let max_rows = match batch_size {
        0 if accelerator => 32,
        0 => 2,
        n => n,
    };
    if ready.send(Ok((model.device_label(), accelerator))).is_err() {
        return;
    }
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        phase_4_infer::run_loop(
            model.as_mut(),
            rx,
            |out| match out {
                InferOutput::Done(f) => send_to_store(&store_tx, f, &|| {
                    if let Some(h) = &heartbeat {
                        h.beat();
                    }
                }),
                InferOutput::Failed(f) => {
                    f.meta.job.report(Outcome::Failed {
                        track_id: f.meta.track_id,
                        reason: f.reason,
                        record: false,
                    });
                    true
                }
            },
            |item: &WorkItem| !item.job.cancel.is_cancelled(),
            LoopConfig {
                max_rows,
                flush_after,
            },
            &stop,
            &shared.infer,
            || {
                if let Some(h) = &heartbeat {
                    h.beat();
                }
            },
        );
    }));
    if let Some(h) = &heartbeat {
        // Ended (shutdown, or broken: reported through `daemon.status`): not a stall.
        h.retire();
    }
    let why = match run {
        Ok(()) => "the inference thread ended",
        Err(_) => "the inference thread panicked (libtorch error)",
    };
    shared.mark_broken(&stop, why.to_owned());
}

/// Hand a finished track to the store task (false once it is gone). A full queue means the
/// store task is waiting, for the database during an outage: the inference thread keeps
/// beating meanwhile, since waiting for the database is not a wedged model.
fn send_to_store<T>(tx: &mpsc::Sender<T>, mut item: T, beat: &dyn Fn()) -> bool {
    loop {
        match tx.try_send(item) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(back)) => {
                item = back;
                beat();
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Store task: finished tracks → `track_embeddings`, batched; reports each track.
/// Least time between two recounts of the model's stored vectors while vectors keep coming.
const RECOUNT_EVERY: Duration = Duration::from_secs(1);

/// Whether the store stage recounts the stored vectors (for `daemon.status`) after a batch:
/// when nothing else waits to be stored (the end of a burst: the count is exact at once), or
/// once a second during a stream. The count is an index scan of every vector of the model, 36 ms
/// at a million; after every batch it cost PostgreSQL a third of a core in a large library.
fn recount_due(last: Option<Instant>, now: Instant, more_waiting: bool) -> bool {
    !more_waiting || last.is_none_or(|t| now.duration_since(t) >= RECOUNT_EVERY)
}

pub(super) async fn store_task(
    shared: Arc<Shared>,
    pool: PgPool,
    db: Arc<DbHealth>,
    stop: CancellationToken,
    model: RegisteredModel,
    mut rx: mpsc::Receiver<Finished<WorkItem>>,
) {
    let mut counted: Option<Instant> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < STORE_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let rows: Vec<NewEmbedding> = batch
            .iter()
            .map(|f| NewEmbedding {
                track_id: f.meta.track_id,
                embedding: f.embedding.clone(),
                file_size: f.meta.file_size,
                file_mtime_ns: f.meta.file_mtime_ns,
                windows: i32::try_from(f.windows).unwrap_or(i32::MAX),
            })
            .collect();
        // While the database is down the batch waits (the pipeline behind it backs up) and is
        // written once it is back; only a shutdown gives up on it.
        let stored = retry(&db, "store embeddings", &stop, None, || {
            phase_5_store::store_embeddings(&pool, model.id, &rows)
        })
        .await;
        let results: Vec<Result<bool, String>> = match stored {
            Ok(stored) => {
                let stored: std::collections::HashSet<i64> = stored.into_iter().collect();
                rows.iter()
                    .map(|r| Ok(stored.contains(&r.track_id)))
                    .collect()
            }
            Err(e) => {
                // Find the row at fault: store one by one.
                tracing::warn!(error = %e, rows = rows.len(), "batch insert failed: storing one by one");
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    out.push(
                        phase_5_store::store_embeddings(&pool, model.id, std::slice::from_ref(r))
                            .await
                            .map(|s| !s.is_empty())
                            .map_err(|e| format!("database error: {e}")),
                    );
                }
                out
            }
        };
        let stored_now = results.iter().filter(|r| matches!(r, Ok(true))).count() as u64;
        shared
            .tracks_stored
            .fetch_add(stored_now, Ordering::Relaxed);
        let now = Instant::now();
        if recount_due(counted, now, !rx.is_empty())
            && let Ok(n) = phase_5_store::count_embedded(&pool, model.id).await
        {
            shared.embedded.store(n, Ordering::Relaxed);
            counted = Some(now);
        }
        for (f, r) in batch.into_iter().zip(results) {
            let o = match r {
                Ok(true) => Outcome::Done(f.meta.track_id),
                Ok(false) => Outcome::Skipped {
                    track_id: f.meta.track_id,
                    reason: "removed from the index while it was embedded".into(),
                    record: false,
                },
                Err(reason) => Outcome::Failed {
                    track_id: f.meta.track_id,
                    reason,
                    record: false,
                },
            };
            f.meta.job.report(o);
        }
    }
    shared.finished.cancel();
}

/// Closes the decode queue on shutdown and keeps the embedded-tracks count fresh (scans
/// delete tracks, and their vectors with them).
pub(super) async fn housekeeping(inner: Weak<Inner>, stop: CancellationToken) {
    let mut timer = tokio::time::interval(Duration::from_secs(30));
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rate_timer = tokio::time::interval(Duration::from_secs(2));
    rate_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = rate_timer.tick() => {
                let Some(inner) = inner.upgrade() else { return };
                let stored = inner.shared.tracks_stored.load(Ordering::Relaxed);
                lock(&inner.shared.rate).record(Instant::now(), stored);
            }
            _ = stop.cancelled() => {
                if let Some(inner) = inner.upgrade() {
                    lock(&inner.decode_tx).take();
                }
                return;
            }
            _ = timer.tick() => {
                let Some(inner) = inner.upgrade() else { return };
                if let Ok(n) = phase_5_store::count_embedded(&inner.pool, inner.model.id).await {
                    inner.shared.embedded.store(n, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Start the inference thread, which loads the model itself (libtorch's CPU threads are per
/// thread), and wait until it runs. Returns its input queue, the store stage's input and the
/// device it chose.
pub(super) async fn start_inference(
    cfg: &EmbedConfig,
    files: model::ModelFiles,
    choice: DeviceChoice,
    row_len: usize,
    shared: Arc<Shared>,
    heartbeat: Option<Arc<Heartbeat>>,
    stop: &CancellationToken,
) -> Result<
    (
        std_mpsc::SyncSender<InferInput<WorkItem>>,
        mpsc::Receiver<Finished<WorkItem>>,
        String,
    ),
    EmbedError,
> {
    let guess_rows = if cfg.batch_size == 0 {
        32
    } else {
        cfg.batch_size
    };
    let infer_capacity = (2 * guess_rows).div_ceil(cfg.windows).max(2) + cfg.decoder_threads();
    let threads = cfg.inference_threads();
    let (ready_tx, ready_rx) = oneshot::channel();
    let (infer_tx, infer_rx) = std_mpsc::sync_channel::<InferInput<WorkItem>>(infer_capacity);
    let (store_tx, store_rx) = mpsc::channel::<Finished<WorkItem>>(4 * STORE_BATCH);
    let loop_cfg = (cfg.batch_size, Duration::from_millis(cfg.batch_timeout_ms));
    let stop = stop.clone();
    std::thread::Builder::new()
        .name("coral-infer".into())
        .spawn(move || {
            inference_thread(
                files, choice, threads, row_len, loop_cfg, ready_tx, infer_rx, store_tx, stop,
                shared, heartbeat,
            )
        })
        .map_err(|e| EmbedError::Internal(format!("cannot start the inference thread: {e}")))?;
    let (device, _accelerator) = ready_rx
        .await
        .map_err(|_| EmbedError::Internal("the inference thread ended while loading".into()))??;
    Ok((infer_tx, store_rx, device))
}

/// Start the decode threads, which share the decode queue's receiving end.
pub(super) fn start_decoders(
    count: usize,
    decode_rx: mpsc::Receiver<WorkItem>,
    infer_tx: &std_mpsc::SyncSender<InferInput<WorkItem>>,
    plan: WindowPlan,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) -> Result<(), EmbedError> {
    let decode_rx = Arc::new(Mutex::new(decode_rx));
    for i in 0..count {
        let rx = Arc::clone(&decode_rx);
        let tx = infer_tx.clone();
        let shared = Arc::clone(shared);
        let stop = stop.clone();
        std::thread::Builder::new()
            .name(format!("coral-decode-{i}"))
            .spawn(move || decode_thread(rx, tx, plan, shared, stop))
            .map_err(|e| EmbedError::Internal(format!("cannot start a decode thread: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn stored_vectors_are_recounted_at_most_once_a_second_while_more_wait() {
        let t0 = Instant::now();
        // The first batch counts; then, while more wait, not again within a second.
        assert!(recount_due(None, t0, true));
        assert!(!recount_due(
            Some(t0),
            t0 + Duration::from_millis(999),
            true
        ));
        assert!(recount_due(Some(t0), t0 + RECOUNT_EVERY, true));
        // The end of a burst always counts, so the status is exact when the work is done.
        assert!(recount_due(Some(t0), t0 + Duration::from_millis(1), false));
    }

    #[test]
    fn a_full_store_queue_keeps_the_inference_heartbeat_beating() {
        let (tx, mut rx) = mpsc::channel::<u32>(1);
        tx.try_send(0).expect("room for one");
        let beats = Arc::new(AtomicU64::new(0));
        let sender = {
            let beats = Arc::clone(&beats);
            std::thread::spawn(move || {
                send_to_store(&tx, 1, &|| {
                    beats.fetch_add(1, Ordering::Relaxed);
                })
            })
        };
        // The queue stays full for a while (the store task waits for the database).
        std::thread::sleep(Duration::from_millis(300));
        assert!(beats.load(Ordering::Relaxed) >= 3, "beats while waiting");
        assert_eq!(rx.try_recv().ok(), Some(0));
        assert!(
            sender.join().expect("sender thread"),
            "delivered once there was room"
        );
        assert_eq!(rx.try_recv().ok(), Some(1));
        drop(rx);
        let (tx, rx) = mpsc::channel::<u32>(1);
        drop(rx);
        assert!(
            !send_to_store(&tx, 2, &|| {}),
            "a closed queue ends the loop"
        );
    }
}
