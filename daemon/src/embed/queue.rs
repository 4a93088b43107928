//! The embedding queue's SQL (`embed_queue`, migration 0004): requests queue their tracks,
//! consumers claim them under a lease and settle them, a request's counts are the counts of its
//! rows. Every statement on the table is here.

use sqlx::PgPool;
use uuid::Uuid;

/// How a queue row stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueState {
    /// Waiting for a consumer (or leased by one).
    Queued,
    /// Already embedded from the same file when queued: done without work.
    Unchanged,
    Done,
    Skipped,
    Failed,
}

impl QueueState {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueState::Queued => "queued",
            QueueState::Unchanged => "unchanged",
            QueueState::Done => "done",
            QueueState::Skipped => "skipped",
            QueueState::Failed => "failed",
        }
    }
}

/// A track a request queues, in the state it starts in.
#[derive(Debug, Clone)]
pub struct QueueRow {
    pub track_id: i64,
    pub state: QueueState,
    pub file_size: i64,
    pub file_mtime_ns: i64,
}

/// Priorities from here on are background work: a re-embed job after a model change. Larger
/// than any request's track count, so every scan's tracks are claimed first.
pub const BACKGROUND_PRIORITY: i64 = 1 << 40;

/// The priority of a request's rows (lower is claimed first): how many tracks it queues, so a
/// watcher scan's few tracks pass a big backlog; a background request (`background`) after
/// every other, and the smaller of two background requests first.
pub fn priority(rows: &[QueueRow], background: bool) -> i64 {
    let queued = rows
        .iter()
        .filter(|r| r.state == QueueState::Queued)
        .count();
    let queued = i64::try_from(queued)
        .unwrap_or(i64::MAX)
        .min(BACKGROUND_PRIORITY - 1);
    if background {
        BACKGROUND_PRIORITY + queued
    } else {
        queued
    }
}

/// Queue `rows` for `request_id`. Rows the request queued before (a resumed scan) keep the state
/// they reached. Returns the rows added.
pub async fn enqueue(
    pool: &PgPool,
    request_id: Uuid,
    model_id: i64,
    priority: i64,
    rows: &[QueueRow],
) -> Result<u64, sqlx::Error> {
    let ids: Vec<i64> = rows.iter().map(|r| r.track_id).collect();
    let states: Vec<&str> = rows.iter().map(|r| r.state.as_str()).collect();
    let sizes: Vec<i64> = rows.iter().map(|r| r.file_size).collect();
    let mtimes: Vec<i64> = rows.iter().map(|r| r.file_mtime_ns).collect();
    let done = sqlx::query(
        "INSERT INTO embed_queue
             (request_id, track_id, model_id, priority, state, file_size, file_mtime_ns)
         SELECT $1, u.track_id, $2, $3, u.state, u.file_size, u.file_mtime_ns
         FROM UNNEST($4::bigint[], $5::text[], $6::bigint[], $7::bigint[])
              AS u(track_id, state, file_size, file_mtime_ns)
         ON CONFLICT (request_id, track_id) DO NOTHING",
    )
    .bind(request_id)
    .bind(model_id)
    .bind(priority)
    .bind(&ids)
    .bind(&states)
    .bind(&sizes)
    .bind(&mtimes)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// A request's rows by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub queued: u64,
    pub unchanged: u64,
    pub done: u64,
    pub skipped: u64,
    pub failed: u64,
}

impl Tally {
    pub fn total(&self) -> u64 {
        self.queued + self.unchanged + self.done + self.skipped + self.failed
    }
}

pub async fn tally(pool: &PgPool, request_id: Uuid) -> Result<Tally, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM embed_queue WHERE request_id = $1 GROUP BY state",
    )
    .bind(request_id)
    .fetch_all(pool)
    .await?;
    let mut t = Tally::default();
    for (state, n) in rows {
        let n = u64::try_from(n).unwrap_or(0);
        match state.as_str() {
            "queued" => t.queued = n,
            "unchanged" => t.unchanged = n,
            "done" => t.done = n,
            "skipped" => t.skipped = n,
            _ => t.failed += n,
        }
    }
    Ok(t)
}

/// Drop a request's rows that no consumer has settled (it was cancelled). Returns how many.
pub async fn drop_queued(pool: &PgPool, request_id: Uuid) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM embed_queue WHERE request_id = $1 AND state = 'queued'")
            .bind(request_id)
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

/// Forget a request that has ended.
pub async fn forget(pool: &PgPool, request_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM embed_queue WHERE request_id = $1")
        .bind(request_id)
        .execute(pool)
        .await?;
    Ok(())
}

/// A row a consumer has leased, with what it needs to find and check the file. The track
/// columns are `None` when the track was deleted after it was queued.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claimed {
    pub request_id: Uuid,
    pub track_id: i64,
    pub file_size: i64,
    pub file_mtime_ns: i64,
    pub library_path: Option<String>,
    pub rel_path: Option<Vec<u8>>,
    pub duration_ms: Option<i64>,
    pub track_size: Option<i64>,
    pub track_mtime_ns: Option<i64>,
}

/// Lease up to `limit` queued rows of `model_id` to `owner` for `lease_s` seconds: rows nobody
/// holds, or whose lease has expired (their consumer died), smallest requests first, then
/// oldest. Concurrent consumers never get the same row (`SKIP LOCKED`).
pub async fn claim(
    pool: &PgPool,
    model_id: i64,
    owner: &str,
    lease_s: f64,
    limit: i64,
) -> Result<Vec<Claimed>, sqlx::Error> {
    sqlx::query_as(
        "WITH c AS (
             SELECT q.request_id, q.track_id FROM embed_queue q
             WHERE q.model_id = $1 AND q.state = 'queued'
               AND (q.lease_until IS NULL OR q.lease_until < now())
             ORDER BY q.priority, q.enqueued_at, q.track_id
             LIMIT $4
             FOR UPDATE SKIP LOCKED),
         leased AS (
             UPDATE embed_queue q SET leased_by = $2,
                                      lease_until = now() + make_interval(secs => $3)
             FROM c WHERE q.request_id = c.request_id AND q.track_id = c.track_id
             RETURNING q.request_id, q.track_id, q.file_size, q.file_mtime_ns)
         SELECT l.request_id, l.track_id, l.file_size, l.file_mtime_ns,
                lib.path AS library_path, t.rel_path, t.duration_ms,
                t.size AS track_size, t.mtime_ns AS track_mtime_ns
         FROM leased l
         LEFT JOIN tracks t ON t.id = l.track_id
         LEFT JOIN libraries lib ON lib.id = t.library_id",
    )
    .bind(model_id)
    .bind(owner)
    .bind(lease_s)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Settle leased rows: `(request_id, track_id, state)`. A row no longer queued (its request
/// was cancelled, or another consumer settled it after this one's lease expired) is left alone.
pub async fn settle(pool: &PgPool, rows: &[(Uuid, i64, QueueState)]) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let requests: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let ids: Vec<i64> = rows.iter().map(|r| r.1).collect();
    let states: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    Ok(sqlx::query(
        "UPDATE embed_queue q SET state = u.state, leased_by = NULL, lease_until = NULL
         FROM UNNEST($1::uuid[], $2::bigint[], $3::text[]) AS u(request_id, track_id, state)
         WHERE q.request_id = u.request_id AND q.track_id = u.track_id AND q.state = 'queued'",
    )
    .bind(&requests)
    .bind(&ids)
    .bind(&states)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Extend `owner`'s leases on `rows` (`(request_id, track_id)`: the rows it is still working on)
/// by `lease_s` seconds from now. A consumer renews while it works, so a lease expires only
/// when its consumer stops (dies, hangs or loses the database), not while a long backlog of
/// its own claims waits in its pipeline; rows it no longer holds are left alone.
pub async fn renew(
    pool: &PgPool,
    owner: &str,
    lease_s: f64,
    rows: &[(Uuid, i64)],
) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let requests: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let ids: Vec<i64> = rows.iter().map(|r| r.1).collect();
    Ok(sqlx::query(
        "UPDATE embed_queue q SET lease_until = now() + make_interval(secs => $2)
         FROM UNNEST($3::uuid[], $4::bigint[]) AS u(request_id, track_id)
         WHERE q.request_id = u.request_id AND q.track_id = u.track_id
           AND q.state = 'queued' AND q.leased_by = $1",
    )
    .bind(owner)
    .bind(lease_s)
    .bind(&requests)
    .bind(&ids)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Give up the leases of consumers whose id starts with `prefix` (a previous run of this
/// corald, which cannot be running: one corald serves a database).
pub async fn release_leases_of(pool: &PgPool, prefix: &str) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE embed_queue SET leased_by = NULL, lease_until = NULL
         WHERE state = 'queued' AND starts_with(leased_by, $1)",
    )
    .bind(prefix)
    .execute(pool)
    .await?
    .rows_affected())
}

/// A consumer as it last reported itself (`embed_workers`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkerRow {
    pub id: String,
    pub host: String,
    pub device: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub last_seen_at: chrono::DateTime<chrono::Utc>,
    pub tracks_done: i64,
    pub tracks_per_second: f64,
}

/// Record that consumer `id` is alive, with its throughput.
pub async fn report_worker(
    pool: &PgPool,
    id: &str,
    host: &str,
    device: &str,
    model_id: i64,
    tracks_done: i64,
    tracks_per_second: f64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO embed_workers (id, host, device, model_id, tracks_done, tracks_per_second)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO UPDATE
         SET last_seen_at = now(), device = EXCLUDED.device, model_id = EXCLUDED.model_id,
             tracks_done = EXCLUDED.tracks_done,
             tracks_per_second = EXCLUDED.tracks_per_second",
    )
    .bind(id)
    .bind(host)
    .bind(device)
    .bind(model_id)
    .bind(tracks_done)
    .bind(tracks_per_second)
    .execute(pool)
    .await?;
    Ok(())
}

/// Forget consumer `id` (it stopped).
pub async fn remove_worker(pool: &PgPool, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM embed_workers WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// The consumers seen in the last `within_s` seconds, most recent first (a killed consumer's
/// row stays behind, unseen).
pub async fn workers(pool: &PgPool, within_s: f64) -> Result<Vec<WorkerRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, host, device, started_at, last_seen_at, tracks_done, tracks_per_second
         FROM embed_workers
         WHERE last_seen_at > now() - make_interval(secs => $1)
         ORDER BY last_seen_at DESC, id",
    )
    .bind(within_s)
    .fetch_all(pool)
    .await
}

/// Delete the rows of requests that nobody follows any more: not a scan that is still to
/// finish (a start-up sweep, or a scan that failed, from an earlier run). Call before this
/// run queues anything. Returns how many rows went.
pub async fn forget_orphans(pool: &PgPool) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM embed_queue q
         WHERE NOT EXISTS (
             SELECT 1 FROM scans s
             WHERE s.request_id = q.request_id
               AND s.phase NOT IN ('completed', 'failed', 'cancelled'))",
    )
    .execute(pool)
    .await?
    .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(queued: usize, settled: usize) -> Vec<QueueRow> {
        let row = |state| QueueRow {
            track_id: 1,
            state,
            file_size: 0,
            file_mtime_ns: 0,
        };
        let mut v: Vec<QueueRow> = (0..queued).map(|_| row(QueueState::Queued)).collect();
        v.extend((0..settled).map(|_| row(QueueState::Unchanged)));
        v
    }

    #[test]
    fn small_requests_go_first_and_re_embedding_after_every_scan() {
        // Counted by the rows still to embed, not the rows already settled.
        assert_eq!(priority(&rows(3, 100), false), 3);
        assert!(priority(&rows(3, 0), false) < priority(&rows(40, 0), false));
        // A background request of one track still waits behind a scan of a million.
        let huge_scan = priority(&rows(1_000_000, 0), false);
        let small_reembed = priority(&rows(1, 0), true);
        assert!(huge_scan < small_reembed, "{huge_scan} vs {small_reembed}");
        assert!(priority(&rows(1, 0), true) < priority(&rows(50, 0), true));
    }
}
