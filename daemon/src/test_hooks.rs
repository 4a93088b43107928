//! Hooks the integration tests drive through environment variables, compiled in only for debug
//! builds with the `test-hooks` feature (which the test harness crate, `coral-tests`, enables).
//! Elsewhere each hook is a constant no-op, so the service's code paths carry none of them.

use std::path::Path;

/// `CORALD_TEST_WEDGE_WORKER=1` wedges the scan worker on its first job; any other value wedges
/// it on a job whose library root contains that text (the watchdog test).
#[cfg(all(feature = "test-hooks", debug_assertions))]
pub fn wedge_worker_requested(library_root: &Path) -> bool {
    match std::env::var("CORALD_TEST_WEDGE_WORKER") {
        Ok(v) if v == "1" => true,
        Ok(v) if !v.is_empty() => library_root.to_string_lossy().contains(v.as_str()),
        _ => false,
    }
}

/// Without the hooks: never.
#[cfg(not(all(feature = "test-hooks", debug_assertions)))]
pub fn wedge_worker_requested(_library_root: &Path) -> bool {
    false
}

/// `CORALD_TEST_BATCH_PAUSE_MS=N` pauses N ms after each written batch, so tests can act while a
/// scan is indexing.
#[cfg(all(feature = "test-hooks", debug_assertions))]
pub async fn batch_pause() {
    let ms = std::env::var("CORALD_TEST_BATCH_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(ms) = ms {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

/// Without the hooks: nothing.
#[cfg(not(all(feature = "test-hooks", debug_assertions)))]
pub async fn batch_pause() {}

/// `CORALD_TEST_SIMILAR_EXACT_MAX=N` replaces the vector count up to which `track.similar`
/// scans exactly (0: always the HNSW index), so tests reach both ways with a few tracks.
#[cfg(all(feature = "test-hooks", debug_assertions))]
pub fn similar_exact_scan_max(default: i64) -> i64 {
    std::env::var("CORALD_TEST_SIMILAR_EXACT_MAX")
        .ok()
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(default)
}

/// Without the hooks: the default.
#[cfg(not(all(feature = "test-hooks", debug_assertions)))]
pub fn similar_exact_scan_max(default: i64) -> i64 {
    default
}

/// `CORALD_TEST_EMBED_PAUSE_MS=N` makes the embedding consumer wait N ms before each claim and
/// claim one track at a time, so tests can act while tracks are being embedded (a re-embed job
/// after a model change). Returns how many rows to claim.
#[cfg(all(feature = "test-hooks", debug_assertions))]
pub async fn embed_claim_pace(room: usize) -> usize {
    let ms = std::env::var("CORALD_TEST_EMBED_PAUSE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    match ms {
        Some(ms) => {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            room.min(1)
        }
        None => room,
    }
}

/// Without the hooks: as many as there is room for.
#[cfg(not(all(feature = "test-hooks", debug_assertions)))]
pub async fn embed_claim_pace(room: usize) -> usize {
    room
}
