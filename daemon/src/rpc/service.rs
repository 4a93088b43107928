//! The daemon's [`ApiService`]: the API's methods over the database, the scan queue and the
//! ScanReporter, every failure mapped to a JSON-RPC error with a stable code and a message a
//! person can act on. Parameters arrive checked by the adapter ([`super::api`]); the checks that
//! need the database or a library's root (a scan's subdirectory) are made here.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use coral_proto::{
    DaemonStatus, EmbeddingStatus, Library, LibrarySelector, RpcResult, ScanFilter, ScanPhase,
    ScanProgress, ScanStarted, ScanTrigger, SimilarTrack, Track, TrackMatch, codes, errors::error,
};
use jsonrpsee::core::{SubscriptionResult, async_trait};
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::{PendingSubscriptionSink, SubscriptionMessage};
use sqlx::PgPool;
use uuid::Uuid;

use super::api::{ApiService, Mix, ScanStart, Similar, SonicPath};
use super::params::{self, Search};
use crate::db::health::{self, DbHealth};
use crate::db::tracks::TrackRecord;
use crate::db::{libraries, scans, tracks};
use crate::library::{LibraryError, LibraryService};
use crate::lookup::{LookupQuery, TrackWanted};
use crate::progress::ScanReporter;
use crate::progress::fanout::ProgressSubscriber;
use crate::scan::queue::{QueueError, ScanQueue, ScanRequest};
use crate::similarity::{Similarity, SimilarityError};

/// What exists only once the database is ready (start-up may wait for it).
pub struct Services {
    /// The embedding pipeline, if it runs.
    pub embedder: Option<crate::embed::Embedder>,
    /// Why embeddings are unavailable, when they are.
    pub embed_unavailable: Option<String>,
}

/// Everything the API needs, shared by all connections.
pub struct RpcContext {
    pub pool: PgPool,
    pub reporter: Arc<ScanReporter>,
    pub queue: Arc<ScanQueue>,
    pub started_at: DateTime<Utc>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub database: String,
    /// The filesystem watcher: told about added and removed libraries, reports its state.
    pub watcher: Arc<crate::watch::Watcher>,
    /// Set once start-up finished (database ready, migrations run, workers started); until
    /// then methods that need the database answer `DATABASE_UNAVAILABLE`.
    pub services: std::sync::OnceLock<Services>,
    /// Database reachability, for `daemon.status` and to fail fast during an outage.
    pub db: Arc<DbHealth>,
    /// Library and track counts last read, shown by `daemon.status` while the database is down.
    pub last_counts: std::sync::Mutex<(i64, i64)>,
    /// Adding, finding and removing libraries.
    pub libraries: Arc<LibraryService>,
}

/// How long `daemon.status` waits for its counts before showing the last ones read.
const STATUS_QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

fn db_error(e: sqlx::Error) -> ErrorObjectOwned {
    if health::is_transient(&e) || matches!(e, sqlx::Error::PoolClosed) {
        tracing::debug!(error = %e, "database unavailable in RPC");
        error(
            codes::DATABASE_UNAVAILABLE,
            format!(
                "the database cannot be reached right now: {e}; corald retries, try again shortly"
            ),
        )
    } else {
        tracing::error!(error = %e, "database error in RPC");
        error(codes::INTERNAL, format!("database error: {e}"))
    }
}

fn queue_error(e: QueueError) -> ErrorObjectOwned {
    match e {
        QueueError::Full(_) => error(codes::QUEUE_FULL, e.to_string()),
        QueueError::Closed => error(codes::INTERNAL, e.to_string()),
    }
}

fn library_error(e: LibraryError) -> ErrorObjectOwned {
    let code = match &e {
        LibraryError::Missing(_)
        | LibraryError::Unreadable { .. }
        | LibraryError::NotADirectory(_) => codes::PATH_NOT_DIRECTORY,
        LibraryError::NotUtf8(_) => codes::INVALID_ARGUMENT,
        LibraryError::Exists { .. } | LibraryError::Overlaps { .. } => codes::LIBRARY_EXISTS,
        LibraryError::Unknown(_) => codes::LIBRARY_NOT_FOUND,
        LibraryError::Database(_) | LibraryError::Queue(_) => codes::INTERNAL,
    };
    match e {
        LibraryError::Database(e) => db_error(e),
        LibraryError::Queue(e) => queue_error(e),
        other => error(code, other.to_string()),
    }
}

fn to_library(row: libraries::LibraryRow, last_scan: Option<ScanProgress>) -> Library {
    Library {
        id: row.id,
        path: row.path,
        track_count: row.track_count,
        failed_count: row.failed_count,
        created_at: row.created_at,
        last_scan,
    }
}

/// Resolve a relative or absolute subdirectory to a clean path relative to `root` that exists.
fn resolve_subdir(root: &Path, path: &str) -> Result<Option<PathBuf>, ErrorObjectOwned> {
    let Some(clean) = params::clean_subdir(root, path)? else {
        return Ok(None);
    };
    let abs = root.join(&clean);
    if !abs.is_dir() {
        return Err(error(
            codes::PATH_NOT_DIRECTORY,
            format!("{} is not a directory", abs.display()),
        ));
    }
    Ok(Some(clean))
}

fn similar_tracks(scored: Vec<(TrackRecord, f64)>) -> Vec<SimilarTrack> {
    scored
        .into_iter()
        .map(|(r, score)| SimilarTrack {
            score,
            track: Track::from(r),
        })
        .collect()
}

/// The similarity of the model serving a query on `track` (its library's previous model
/// during a model change).
async fn serving(similarity: &Similarity, track: &TrackRecord) -> RpcResult<Similarity> {
    similarity.serving(track).await.map_err(similarity_error)
}

fn similarity_error(e: SimilarityError) -> ErrorObjectOwned {
    match e {
        SimilarityError::NoEmbedding(_) => error(codes::EMBEDDING_UNAVAILABLE, e.to_string()),
        SimilarityError::Invalid(_) => error(codes::INVALID_ARGUMENT, e.to_string()),
        SimilarityError::Database(e) => db_error(e),
    }
}

impl RpcContext {
    /// Similarity over the active model, once the database and the embedding pipeline are up.
    fn similarity(&self) -> RpcResult<Similarity> {
        self.need_db()?;
        let (embedder, unavailable) = self.embedder();
        let Some(embedder) = embedder else {
            let why = unavailable
                .unwrap_or("embeddings are not available")
                .to_owned();
            return Err(error(codes::EMBEDDING_UNAVAILABLE, why));
        };
        Ok(Similarity::new(self.pool.clone(), embedder.model()))
    }

    /// The track a `TrackRef` names, or `TRACK_NOT_FOUND` saying which key found nothing.
    async fn resolve(&self, wanted: &TrackWanted) -> RpcResult<TrackRecord> {
        self.need_db()?;
        crate::lookup::resolve(&self.pool, wanted)
            .await
            .map_err(db_error)?
            .ok_or_else(|| error(codes::TRACK_NOT_FOUND, wanted.to_string()))
    }

    /// The embedding pipeline and why it is missing (`None, None` during start-up).
    fn embedder(&self) -> (Option<&crate::embed::Embedder>, Option<&str>) {
        match self.services.get() {
            Some(s) => (s.embedder.as_ref(), s.embed_unavailable.as_deref()),
            None => (None, None),
        }
    }

    /// `Ok` when the database may be used: start-up is over and the last check or query
    /// succeeded. Otherwise a `DATABASE_UNAVAILABLE` error saying why, at once rather than
    /// after a connection timeout.
    fn need_db(&self) -> RpcResult<()> {
        let why = self
            .db
            .last_error()
            .unwrap_or_else(|| "not reachable yet".into());
        if self.services.get().is_none() {
            return Err(error(
                codes::DATABASE_UNAVAILABLE,
                format!(
                    "corald is waiting for its database ({}): {why}; it retries with back-off \
                     and completes start-up once the database answers",
                    self.db.target()
                ),
            ));
        }
        if !self.db.is_available() {
            return Err(error(
                codes::DATABASE_UNAVAILABLE,
                format!(
                    "the database ({}) is unavailable: {why}; corald retries with back-off, \
                     try again shortly",
                    self.db.target()
                ),
            ));
        }
        Ok(())
    }

    /// The database's state for `daemon.status`: unavailable until start-up is over too, so
    /// "ok" always means that the methods needing the database work.
    fn health(&self) -> coral_proto::DatabaseHealth {
        let mut h = self.db.snapshot();
        if self.services.get().is_none() && h.state == coral_proto::DatabaseState::Ok {
            h.state = coral_proto::DatabaseState::Unavailable;
            h.last_error = Some("the database answers; corald is completing start-up".into());
        }
        h
    }

    /// Library and track counts: read now when the database answers within a second, else
    /// the last ones read.
    async fn counts(&self) -> (i64, i64) {
        let cached = || {
            *self
                .last_counts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if self.need_db().is_err() {
            return cached();
        }
        let read = async {
            let libs = libraries::count(&self.pool).await?;
            let tracks = tracks::count(&self.pool).await?;
            Ok::<_, sqlx::Error>((libs, tracks))
        };
        match tokio::time::timeout(STATUS_QUERY_TIMEOUT, read).await {
            Ok(Ok(c)) => {
                *self
                    .last_counts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = c;
                c
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "daemon.status: counts unavailable");
                cached()
            }
            Err(_) => cached(),
        }
    }

    async fn find_library(&self, sel: &LibrarySelector) -> RpcResult<libraries::LibraryRow> {
        self.need_db()?;
        self.libraries.find(sel).await.map_err(library_error)
    }

    /// The live state of a scan if it is in memory, else what the database kept.
    async fn progress_of(&self, request_id: Uuid) -> RpcResult<Option<ScanProgress>> {
        if let Some(h) = self.reporter.get(request_id) {
            return Ok(Some((*h.latest()).clone()));
        }
        self.need_db()?;
        Ok(scans::get(&self.pool, request_id)
            .await
            .map_err(db_error)?
            .map(crate::progress::persist::read_back))
    }

    async fn last_scans(&self) -> RpcResult<std::collections::HashMap<i64, ScanProgress>> {
        self.need_db()?;
        let mut last: std::collections::HashMap<i64, ScanProgress> =
            scans::latest_per_library(&self.pool)
                .await
                .map_err(db_error)?
                .into_iter()
                .map(|r| (r.library_id, crate::progress::persist::read_back(r)))
                .collect();
        for h in self.reporter.handles() {
            let p = (*h.latest()).clone();
            let newer = last.get(&p.scan.library_id).is_none_or(|q| {
                q.scan.request_id == p.scan.request_id || q.scan.started_at <= p.scan.started_at
            });
            if newer {
                last.insert(p.scan.library_id, p);
            }
        }
        Ok(last)
    }
}

#[async_trait]
impl ApiService for RpcContext {
    async fn daemon_status(&self) -> RpcResult<DaemonStatus> {
        // Answers during an outage too: the counts are then the last ones read.
        let (libs, tracks) = self.counts().await;
        let (embedder, embed_unavailable) = self.embedder();
        Ok(DaemonStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            started_at: self.started_at,
            socket: self.socket.to_string_lossy().into_owned(),
            state_dir: self.state_dir.to_string_lossy().into_owned(),
            database: self.database.clone(),
            libraries: libs,
            tracks,
            active_scans: self
                .reporter
                .active()
                .iter()
                .map(|p| (**p).clone())
                .collect(),
            queued_scans: self.queue.waiting(),
            embedding: match embedder {
                Some(e) => {
                    let mut s = e.status();
                    // During an outage (or a slow answer): none listed, as the counts above
                    // wait at most STATUS_QUERY_TIMEOUT.
                    if self.db.is_available() {
                        s.workers = tokio::time::timeout(STATUS_QUERY_TIMEOUT, e.workers())
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .unwrap_or_default();
                    }
                    s
                }
                None => EmbeddingStatus::default(),
            },
            warnings: {
                let mut w = self.watcher.warnings();
                if let Some(reason) = embed_unavailable
                    && embedder.is_none()
                {
                    w.push(reason.to_owned());
                }
                w
            },
            watch: self.watcher.status(),
            database_health: Some(self.health()),
        })
    }

    async fn library_add(&self, path: &Path) -> RpcResult<Library> {
        self.need_db()?;
        let (row, handle) = self.libraries.add(path).await.map_err(library_error)?;
        Ok(to_library(row, Some((*handle.latest()).clone())))
    }

    async fn library_list(&self) -> RpcResult<Vec<Library>> {
        self.need_db()?;
        let rows = libraries::list(&self.pool).await.map_err(db_error)?;
        let mut last = self.last_scans().await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let l = last.remove(&r.id);
                to_library(r, l)
            })
            .collect())
    }

    async fn library_remove(&self, library: LibrarySelector) -> RpcResult<Library> {
        self.need_db()?;
        let row = self
            .libraries
            .remove(&library)
            .await
            .map_err(library_error)?;
        Ok(to_library(row, None))
    }

    async fn scan_start(&self, scan: ScanStart) -> RpcResult<ScanStarted> {
        let ScanStart {
            library,
            path,
            mode,
        } = scan;
        let row = self.find_library(&library).await?;
        let root = PathBuf::from(&row.path);
        let subdir = match path.as_deref() {
            Some(p) => resolve_subdir(&root, p)?,
            None => None,
        };
        let (handle, merged) = self
            .queue
            .submit(ScanRequest {
                library_id: row.id,
                library_root: root,
                subdir,
                mode,
                trigger: ScanTrigger::Manual,
            })
            .await
            .map_err(queue_error)?;
        Ok(ScanStarted {
            request_id: handle.request_id(),
            library_id: row.id,
            merged,
        })
    }

    async fn scan_get(&self, request_id: Uuid) -> RpcResult<ScanProgress> {
        self.progress_of(request_id).await?.ok_or_else(|| {
            error(
                codes::SCAN_NOT_FOUND,
                format!("no scan has request id {request_id}"),
            )
        })
    }

    async fn scan_active(&self) -> RpcResult<Vec<ScanProgress>> {
        Ok(self
            .reporter
            .active()
            .iter()
            .map(|p| (**p).clone())
            .collect())
    }

    async fn scan_list(&self, limit: i64) -> RpcResult<Vec<ScanProgress>> {
        self.need_db()?;
        let mut out: Vec<ScanProgress> = self.scan_active().await?;
        let mut seen: HashSet<Uuid> = out.iter().map(|p| p.scan.request_id).collect();
        for row in scans::recent(&self.pool, limit).await.map_err(db_error)? {
            if seen.insert(row.request_id) {
                let p = match self.reporter.get(row.request_id) {
                    Some(h) => (*h.latest()).clone(),
                    None => crate::progress::persist::read_back(row),
                };
                out.push(p);
            }
        }
        Ok(out)
    }

    async fn scan_cancel(&self, request_id: Uuid) -> RpcResult<ScanProgress> {
        let Some(h) = self.reporter.get(request_id) else {
            return match self.progress_of(request_id).await? {
                Some(p) if p.phase.is_terminal() => Err(error(
                    codes::SCAN_FINISHED,
                    format!("scan {request_id} already ended ({})", p.phase.as_str()),
                )),
                _ => Err(error(
                    codes::SCAN_NOT_FOUND,
                    format!("no scan has request id {request_id}"),
                )),
            };
        };
        let phase = h.phase();
        if phase.is_terminal() {
            return Err(error(
                codes::SCAN_FINISHED,
                format!("scan {request_id} already ended ({})", phase.as_str()),
            ));
        }
        h.cancel_token().cancel();
        if phase == ScanPhase::Queued {
            self.queue.forget(request_id);
            self.reporter.finish(
                &h,
                ScanPhase::Cancelled,
                Some("cancelled by request".into()),
            );
            crate::progress::persist::save_once(&self.pool, &h, "cancelled").await;
        }
        tracing::info!(%request_id, "scan cancellation requested");
        Ok((*h.latest()).clone())
    }

    async fn scan_subscribe(
        &self,
        pending: PendingSubscriptionSink,
        filter: ScanFilter,
    ) -> SubscriptionResult {
        let sink = pending.accept().await?;
        let mut sub = ProgressSubscriber::new(Arc::clone(&self.reporter), filter);
        for p in sub.snapshot() {
            sink.send(SubscriptionMessage::from(serde_json::value::to_raw_value(
                &*p,
            )?))
            .await?;
        }
        loop {
            tokio::select! {
                _ = sink.closed() => break,
                updates = sub.next_updates() => {
                    let Some(updates) = updates else { break };
                    for p in updates {
                        sink.send(SubscriptionMessage::from(serde_json::value::to_raw_value(&*p)?))
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn track_get(&self, id: i64) -> RpcResult<Track> {
        self.need_db()?;
        tracks::get(&self.pool, id)
            .await
            .map_err(db_error)?
            .map(Track::from)
            .ok_or_else(|| error(codes::TRACK_NOT_FOUND, format!("no track has id {id}")))
    }

    async fn track_search(&self, search: Search) -> RpcResult<Vec<Track>> {
        self.need_db()?;
        Ok(
            tracks::search(&self.pool, &search.tsquery, search.limit, search.offset)
                .await
                .map_err(db_error)?
                .into_iter()
                .map(Track::from)
                .collect(),
        )
    }

    async fn track_similar(&self, q: Similar) -> RpcResult<Vec<SimilarTrack>> {
        let Similar {
            track: wanted,
            limit,
            filter,
        } = q;
        let similarity = self.similarity()?;
        let record = self.resolve(&wanted).await?;
        let similarity = serving(&similarity, &record).await?;
        let near = similarity
            .similar(&record, &filter, limit)
            .await
            .map_err(similarity_error)?;
        Ok(similar_tracks(near))
    }

    async fn track_path(&self, q: SonicPath) -> RpcResult<Vec<SimilarTrack>> {
        let SonicPath {
            from,
            to,
            count,
            filter,
        } = q;
        let similarity = self.similarity()?;
        let (a, b) = (self.resolve(&from).await?, self.resolve(&to).await?);
        let similarity = serving(&similarity, &a).await?;
        let path = similarity
            .path(&a, &b, count, &filter)
            .await
            .map_err(similarity_error)?;
        Ok(similar_tracks(path))
    }

    async fn track_mix(&self, q: Mix) -> RpcResult<Vec<SimilarTrack>> {
        let Mix {
            seeds,
            count,
            filter,
        } = q;
        let similarity = self.similarity()?;
        let mut records = Vec::with_capacity(seeds.tracks.len());
        for wanted in &seeds.tracks {
            records.push(self.resolve(wanted).await?);
        }
        if seeds.album.is_some() || seeds.artist.is_some() {
            let group = crate::lookup::album_or_artist(
                &self.pool,
                seeds.album.as_deref(),
                seeds.artist.as_deref(),
                crate::similarity::MAX_SEEDS,
            )
            .await
            .map_err(db_error)?;
            if group.is_empty() {
                return Err(error(
                    codes::TRACK_NOT_FOUND,
                    "no track has that album or artist",
                ));
            }
            records.extend(group);
        }
        records.truncate(crate::similarity::MAX_SEEDS);
        let similarity = match records.first() {
            Some(first) => serving(&similarity, first).await?,
            None => similarity,
        };
        let mix = similarity
            .mix(&records, count, &filter)
            .await
            .map_err(similarity_error)?;
        Ok(similar_tracks(mix))
    }

    async fn track_lookup(&self, q: LookupQuery, limit: i64) -> RpcResult<Vec<TrackMatch>> {
        self.need_db()?;
        let found =
            crate::lookup::lookup(&self.pool, &q, usize::try_from(limit).unwrap_or(usize::MAX))
                .await
                .map_err(db_error)?;
        Ok(found
            .into_iter()
            .map(|(rule, r)| TrackMatch {
                rule,
                track: Track::from(r),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subdirs_stay_inside_the_library() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
        assert_eq!(
            resolve_subdir(root, "a/./b").expect("relative"),
            Some(PathBuf::from("a/b"))
        );
        let abs = root.join("a").to_string_lossy().into_owned();
        assert_eq!(
            resolve_subdir(root, &abs).expect("absolute"),
            Some(PathBuf::from("a"))
        );
        assert_eq!(resolve_subdir(root, ".").expect("root"), None);
        let e = resolve_subdir(root, "../etc").expect_err("escape");
        assert_eq!(e.code(), codes::PATH_OUTSIDE_LIBRARY);
        let e = resolve_subdir(root, "/etc").expect_err("outside");
        assert_eq!(e.code(), codes::PATH_OUTSIDE_LIBRARY);
        let e = resolve_subdir(root, "nope").expect_err("missing");
        assert_eq!(e.code(), codes::PATH_NOT_DIRECTORY);
    }
}
