//! The `tracks` table: bulk upserts and deletes for the scanner (one statement per batch via
//! `UNNEST`), lookups and full-text search for the API.

use chrono::{DateTime, TimeZone, Utc};
use coral_proto::Track;
use sqlx::{FromRow, PgConnection, PgPool};
use uuid::Uuid;

/// What the scanner needs to know of a track already in the database.
#[derive(Debug, Clone, FromRow)]
pub struct ExistingTrack {
    pub id: i64,
    pub rel_path: Vec<u8>,
    pub size: i64,
    pub mtime_ns: i64,
    pub last_scan_id: Option<Uuid>,
}

/// A row to insert or update.
#[derive(Debug, Clone, Default)]
pub struct TrackRow {
    pub rel_path: Vec<u8>,
    pub rel_path_text: String,
    pub size: i64,
    pub mtime_ns: i64,
    pub format: String,
    pub codec: Option<String>,
    pub duration_ms: i64,
    pub sample_rate: Option<i32>,
    pub channels: Option<i32>,
    pub bit_depth: Option<i32>,
    pub bitrate_kbps: Option<i32>,
    pub title: Option<String>,
    pub artist: Option<String>,
    pub album: Option<String>,
    pub album_artist: Option<String>,
    pub track_number: Option<i32>,
    pub disc_number: Option<i32>,
    pub year: Option<i32>,
    pub genre: Option<String>,
    pub search_text: String,
}

/// The byte range `[lo, hi)` of relative paths under `subdir` (`subdir/` … `subdir0`, since
/// '0' follows '/'), for range scans on the `(library_id, rel_path)` index.
pub fn subtree_range(subdir: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut lo = subdir.to_vec();
    lo.push(b'/');
    let mut hi = subdir.to_vec();
    hi.push(b'0');
    (lo, hi)
}

/// Tracks of a library, or of one subtree of it.
pub async fn existing(
    pool: &PgPool,
    library_id: i64,
    subdir: Option<&[u8]>,
) -> sqlx::Result<Vec<ExistingTrack>> {
    match subdir {
        None => sqlx::query_as(
            "SELECT id, rel_path, size, mtime_ns, last_scan_id FROM tracks WHERE library_id = $1",
        )
        .bind(library_id)
        .fetch_all(pool)
        .await,
        Some(dir) => {
            let (lo, hi) = subtree_range(dir);
            sqlx::query_as(
                "SELECT id, rel_path, size, mtime_ns, last_scan_id FROM tracks
                 WHERE library_id = $1 AND rel_path >= $2 AND rel_path < $3",
            )
            .bind(library_id)
            .bind(lo)
            .bind(hi)
            .fetch_all(pool)
            .await
        }
    }
}

/// Insert or update a batch of tracks in one statement.
pub async fn upsert_batch(
    conn: &mut PgConnection,
    library_id: i64,
    request_id: Uuid,
    rows: &[TrackRow],
) -> sqlx::Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    macro_rules! col {
        ($f:ident) => {
            rows.iter().map(|r| r.$f.clone()).collect::<Vec<_>>()
        };
    }
    let done = sqlx::query(
        "INSERT INTO tracks (library_id, last_scan_id, rel_path, rel_path_text, size, mtime_ns,
            format, codec, duration_ms, sample_rate, channels, bit_depth, bitrate_kbps, title,
            artist, album, album_artist, track_number, disc_number, year, genre, search_text)
         SELECT $1, $2, * FROM UNNEST($3::bytea[], $4::text[], $5::int8[], $6::int8[],
            $7::text[], $8::text[], $9::int8[], $10::int4[], $11::int4[], $12::int4[],
            $13::int4[], $14::text[], $15::text[], $16::text[], $17::text[], $18::int4[],
            $19::int4[], $20::int4[], $21::text[], $22::text[])
         ON CONFLICT (library_id, rel_path) DO UPDATE SET
            last_scan_id = EXCLUDED.last_scan_id, rel_path_text = EXCLUDED.rel_path_text,
            size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns, format = EXCLUDED.format,
            codec = EXCLUDED.codec, duration_ms = EXCLUDED.duration_ms,
            sample_rate = EXCLUDED.sample_rate, channels = EXCLUDED.channels,
            bit_depth = EXCLUDED.bit_depth, bitrate_kbps = EXCLUDED.bitrate_kbps,
            title = EXCLUDED.title, artist = EXCLUDED.artist, album = EXCLUDED.album,
            album_artist = EXCLUDED.album_artist, track_number = EXCLUDED.track_number,
            disc_number = EXCLUDED.disc_number, year = EXCLUDED.year, genre = EXCLUDED.genre,
            search_text = EXCLUDED.search_text, indexed_at = now()",
    )
    .bind(library_id)
    .bind(request_id)
    .bind(col!(rel_path))
    .bind(col!(rel_path_text))
    .bind(col!(size))
    .bind(col!(mtime_ns))
    .bind(col!(format))
    .bind(col!(codec))
    .bind(col!(duration_ms))
    .bind(col!(sample_rate))
    .bind(col!(channels))
    .bind(col!(bit_depth))
    .bind(col!(bitrate_kbps))
    .bind(col!(title))
    .bind(col!(artist))
    .bind(col!(album))
    .bind(col!(album_artist))
    .bind(col!(track_number))
    .bind(col!(disc_number))
    .bind(col!(year))
    .bind(col!(genre))
    .bind(col!(search_text))
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Delete tracks by id.
pub async fn delete_ids(conn: &mut PgConnection, ids: &[i64]) -> sqlx::Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query("DELETE FROM tracks WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// A track row joined with its library's path, as the API returns it.
#[derive(Debug, Clone, FromRow)]
pub struct TrackRecord {
    pub id: i64,
    pub library_id: i64,
    pub library_path: String,
    pub rel_path_text: String,
    pub size: i64,
    pub mtime_ns: i64,
    pub format: String,
    pub codec: Option<String>,
    pub duration_ms: i64,
    pub sample_rate: Option<i32>,
    pub channels: Option<i32>,
    pub bit_depth: Option<i32>,
    pub bitrate_kbps: Option<i32>,
    pub title: Option<String>,
    pub artist: Option<String>,
    pub album: Option<String>,
    pub album_artist: Option<String>,
    pub track_number: Option<i32>,
    pub disc_number: Option<i32>,
    pub year: Option<i32>,
    pub genre: Option<String>,
    pub has_embedding: bool,
    pub indexed_at: DateTime<Utc>,
}

impl From<TrackRecord> for Track {
    fn from(r: TrackRecord) -> Track {
        let path = std::path::Path::new(&r.library_path)
            .join(&r.rel_path_text)
            .to_string_lossy()
            .into_owned();
        Track {
            id: r.id,
            library_id: r.library_id,
            path,
            relative_path: r.rel_path_text,
            size: r.size,
            modified_at: Utc.timestamp_nanos(r.mtime_ns),
            format: r.format,
            codec: r.codec,
            duration_seconds: r.duration_ms as f64 / 1000.0,
            sample_rate: r.sample_rate,
            channels: r.channels,
            bit_depth: r.bit_depth,
            bitrate_kbps: r.bitrate_kbps,
            title: r.title,
            artist: r.artist,
            album: r.album,
            album_artist: r.album_artist,
            track_number: r.track_number,
            disc_number: r.disc_number,
            year: r.year,
            genre: r.genre,
            has_embedding: r.has_embedding,
            indexed_at: r.indexed_at,
        }
    }
}

/// Columns of `TrackRecord`. `has_embedding`: the track has a vector of its current file (same
/// size and mtime) for the active model, the one corald registered last (`models.last_used_at`
/// is bumped at every start with embeddings on).
macro_rules! record_columns {
    () => {
        "t.id, t.library_id, l.path AS library_path, t.rel_path_text,
    t.size, t.mtime_ns, t.format, t.codec, t.duration_ms, t.sample_rate, t.channels, t.bit_depth,
    t.bitrate_kbps, t.title, t.artist, t.album, t.album_artist, t.track_number, t.disc_number,
    t.year, t.genre,
            EXISTS (SELECT 1 FROM track_embeddings e
                    WHERE e.track_id = t.id AND e.file_size = t.size AND e.file_mtime_ns = t.mtime_ns
                      AND e.model_id = (SELECT m.id FROM models m
                                        ORDER BY m.last_used_at DESC, m.id DESC LIMIT 1))
                AS has_embedding,
            t.indexed_at"
    };
}

pub async fn get(pool: &PgPool, id: i64) -> sqlx::Result<Option<TrackRecord>> {
    sqlx::query_as(concat!(
        "SELECT ",
        record_columns!(),
        " FROM tracks t JOIN libraries l ON l.id = t.library_id WHERE t.id = $1"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Ranked full-text search. `tsquery` comes from `text_fold::prefix_tsquery`.
pub async fn search(
    pool: &PgPool,
    tsquery: &str,
    limit: i64,
    offset: i64,
) -> sqlx::Result<Vec<TrackRecord>> {
    sqlx::query_as(concat!(
        "SELECT ",
        record_columns!(),
        " FROM tracks t JOIN libraries l ON l.id = t.library_id,
             to_tsquery('simple', $1) q
         WHERE t.search @@ q
         ORDER BY ts_rank(t.search, q) DESC, t.artist, t.album, t.disc_number, t.track_number, t.id
         LIMIT $2 OFFSET $3"
    ))
    .bind(tsquery)
    .bind(limit)
    .bind(offset)
    .fetch_all(pool)
    .await
}

pub async fn count(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM tracks")
        .fetch_one(pool)
        .await
}

/// Apply a rename or move inside one library to the database: the file `from` (with `is_dir`,
/// every file below the directory `from`) is now at `to`. Track ids stay, and with them their
/// embeddings; scan-error rows move along. Rows already at the destination describe files the
/// move replaced (rename(2) replaces a file, and only an empty directory) and are deleted —
/// for a single file only when the source row exists, so an unknown file renamed over a known
/// one keeps the known row for the rescan to update. Returns the number of tracks moved.
pub async fn move_path(
    pool: &PgPool,
    library_id: i64,
    from: &[u8],
    to: &[u8],
    is_dir: bool,
) -> sqlx::Result<u64> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let mut tx = pool.begin().await?;
    let mut moved = 0;
    if is_dir {
        let (lo, hi) = subtree_range(from);
        let (to_lo, to_hi) = subtree_range(to);
        let from_text = format!("{}/", text(from));
        let to_text = format!("{}/", text(to));
        // 1-based positions just past the old prefix (bytes for rel_path, characters for text).
        let cut_bytes = i32::try_from(lo.len() + 1).unwrap_or(i32::MAX);
        let cut_chars = i32::try_from(from_text.chars().count() + 1).unwrap_or(i32::MAX);
        for table in ["tracks", "scan_errors"] {
            // `table` is one of two literals above: nothing outside reaches the SQL text.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE library_id = $1 AND rel_path >= $2 AND rel_path < $3"
            )))
            .bind(library_id)
            .bind(&to_lo)
            .bind(&to_hi)
            .execute(&mut *tx)
            .await?;
            let done = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE {table} SET
                    rel_path = $4::bytea || substring(rel_path FROM $5::int4),
                    rel_path_text = $6::text || substring(rel_path_text FROM $7::int4)
                 WHERE library_id = $1 AND rel_path >= $2 AND rel_path < $3"
            )))
            .bind(library_id)
            .bind(&lo)
            .bind(&hi)
            .bind(&to_lo)
            .bind(cut_bytes)
            .bind(&to_text)
            .bind(cut_chars)
            .execute(&mut *tx)
            .await?;
            if table == "tracks" {
                moved = done.rows_affected();
            }
        }
    } else {
        for table in ["tracks", "scan_errors"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE library_id = $1 AND rel_path = $2
                   AND EXISTS (SELECT 1 FROM {table} WHERE library_id = $1 AND rel_path = $3)"
            )))
            .bind(library_id)
            .bind(to)
            .bind(from)
            .execute(&mut *tx)
            .await?;
            let done = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE {table} SET rel_path = $3, rel_path_text = $4
                 WHERE library_id = $1 AND rel_path = $2"
            )))
            .bind(library_id)
            .bind(from)
            .bind(to)
            .bind(text(to))
            .execute(&mut *tx)
            .await?;
            if table == "tracks" {
                moved = done.rows_affected();
            }
        }
    }
    tx.commit().await?;
    Ok(moved)
}

/// `(id, rel_path, duration_ms)` of every track a scan wrote: the embedding phase's work.
pub async fn written_by_scan(
    pool: &PgPool,
    library_id: i64,
    request_id: Uuid,
) -> sqlx::Result<Vec<(i64, Vec<u8>, i64)>> {
    sqlx::query_as(
        "SELECT id, rel_path, duration_ms FROM tracks
         WHERE library_id = $1 AND last_scan_id = $2 ORDER BY id",
    )
    .bind(library_id)
    .bind(request_id)
    .fetch_all(pool)
    .await
}
