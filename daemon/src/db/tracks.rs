//! The `tracks` table: bulk upserts and deletes for the scanner (one statement per batch via
//! `UNNEST`), lookups and full-text search for the API.

use chrono::{DateTime, TimeZone, Utc};
use coral_proto::{Track, TrackTags};

use crate::track::{AudioProperties, ProbedTrack};
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

/// A row to insert or update: the file, what the probe read from it, and its search document.
#[derive(Debug, Clone)]
pub struct TrackRow {
    pub rel_path: Vec<u8>,
    pub rel_path_text: String,
    pub size: i64,
    pub mtime_ns: i64,
    pub probed: ProbedTrack,
    pub search_text: String,
}

/// Separates the values of a list inside one `text` parameter of the bulk upsert (PostgreSQL
/// has no arrays of arrays of different lengths). Tag text never holds control characters:
/// the probe replaced them.
const LIST_SEPARATOR: char = '\u{1F}';

fn packed(values: &[String]) -> String {
    values.join(&LIST_SEPARATOR.to_string())
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
    in_library(
        pool,
        "SELECT id, rel_path, size, mtime_ns, last_scan_id FROM tracks",
        library_id,
        subdir,
    )
    .await
}

/// The rows `select` (a `SELECT … FROM table` of a table keyed by `(library_id, rel_path)`)
/// reads for a library, or for one subtree of it (a range scan on that key).
pub(super) async fn in_library<T>(
    pool: &PgPool,
    select: &'static str,
    library_id: i64,
    subdir: Option<&[u8]>,
) -> sqlx::Result<Vec<T>>
where
    T: for<'r> FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    match subdir {
        None => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "{select} WHERE library_id = $1"
            )))
            .bind(library_id)
            .fetch_all(pool)
            .await
        }
        Some(dir) => {
            let (lo, hi) = subtree_range(dir);
            // `select` is one of this module's constant statements.
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "{select} WHERE library_id = $1 AND rel_path >= $2 AND rel_path < $3"
            )))
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
    macro_rules! audio {
        ($f:ident) => {
            rows.iter()
                .map(|r| r.probed.audio.$f.clone())
                .collect::<Vec<_>>()
        };
    }
    macro_rules! tag {
        ($f:ident) => {
            rows.iter()
                .map(|r| r.probed.tags.$f.clone())
                .collect::<Vec<_>>()
        };
    }
    macro_rules! list {
        ($f:ident) => {
            rows.iter()
                .map(|r| packed(&r.probed.tags.$f))
                .collect::<Vec<_>>()
        };
    }
    let formats: Vec<&str> = rows.iter().map(|r| r.probed.format.as_str()).collect();
    let done = sqlx::query(
        "INSERT INTO tracks (library_id, last_scan_id, rel_path, rel_path_text, size, mtime_ns,
            format, codec, duration_ms, sample_rate, channels, bit_depth, bitrate_kbps, title,
            artist, album, album_artist, track_number, disc_number, year, genre, search_text,
            artists, album_artists, genres, composer, composers, musicbrainz_recording_id,
            musicbrainz_track_id, musicbrainz_release_id, musicbrainz_artist_ids, isrc)
         SELECT $1, $2, u.rel_path, u.rel_path_text, u.size, u.mtime_ns, u.format, u.codec,
            u.duration_ms, u.sample_rate, u.channels, u.bit_depth, u.bitrate_kbps, u.title,
            u.artist, u.album, u.album_artist, u.track_number, u.disc_number, u.year, u.genre,
            u.search_text, string_to_array(u.artists, E'\\x1F'),
            string_to_array(u.album_artists, E'\\x1F'), string_to_array(u.genres, E'\\x1F'),
            u.composer, string_to_array(u.composers, E'\\x1F'), u.mb_recording, u.mb_track,
            u.mb_release, string_to_array(u.mb_artists, E'\\x1F'), u.isrc
         FROM UNNEST($3::bytea[], $4::text[], $5::int8[], $6::int8[],
            $7::text[], $8::text[], $9::int8[], $10::int4[], $11::int4[], $12::int4[],
            $13::int4[], $14::text[], $15::text[], $16::text[], $17::text[], $18::int4[],
            $19::int4[], $20::int4[], $21::text[], $22::text[], $23::text[], $24::text[],
            $25::text[], $26::text[], $27::text[], $28::text[], $29::text[], $30::text[],
            $31::text[], $32::text[])
            AS u(rel_path, rel_path_text, size, mtime_ns, format, codec, duration_ms,
                 sample_rate, channels, bit_depth, bitrate_kbps, title, artist, album,
                 album_artist, track_number, disc_number, year, genre, search_text, artists,
                 album_artists, genres, composer, composers, mb_recording, mb_track,
                 mb_release, mb_artists, isrc)
         ON CONFLICT (library_id, rel_path) DO UPDATE SET
            last_scan_id = EXCLUDED.last_scan_id, rel_path_text = EXCLUDED.rel_path_text,
            size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns, format = EXCLUDED.format,
            codec = EXCLUDED.codec, duration_ms = EXCLUDED.duration_ms,
            sample_rate = EXCLUDED.sample_rate, channels = EXCLUDED.channels,
            bit_depth = EXCLUDED.bit_depth, bitrate_kbps = EXCLUDED.bitrate_kbps,
            title = EXCLUDED.title, artist = EXCLUDED.artist, album = EXCLUDED.album,
            album_artist = EXCLUDED.album_artist, track_number = EXCLUDED.track_number,
            disc_number = EXCLUDED.disc_number, year = EXCLUDED.year, genre = EXCLUDED.genre,
            search_text = EXCLUDED.search_text, artists = EXCLUDED.artists,
            album_artists = EXCLUDED.album_artists, genres = EXCLUDED.genres,
            composer = EXCLUDED.composer, composers = EXCLUDED.composers,
            musicbrainz_recording_id = EXCLUDED.musicbrainz_recording_id,
            musicbrainz_track_id = EXCLUDED.musicbrainz_track_id,
            musicbrainz_release_id = EXCLUDED.musicbrainz_release_id,
            musicbrainz_artist_ids = EXCLUDED.musicbrainz_artist_ids, isrc = EXCLUDED.isrc,
            indexed_at = now()",
    )
    .bind(library_id)
    .bind(request_id)
    .bind(col!(rel_path))
    .bind(col!(rel_path_text))
    .bind(col!(size))
    .bind(col!(mtime_ns))
    .bind(&formats)
    .bind(audio!(codec))
    .bind(audio!(duration_ms))
    .bind(audio!(sample_rate))
    .bind(audio!(channels))
    .bind(audio!(bit_depth))
    .bind(audio!(bitrate_kbps))
    .bind(tag!(title))
    .bind(tag!(artist))
    .bind(tag!(album))
    .bind(tag!(album_artist))
    .bind(tag!(track_number))
    .bind(tag!(disc_number))
    .bind(tag!(year))
    .bind(tag!(genre))
    .bind(col!(search_text))
    .bind(list!(artists))
    .bind(list!(album_artists))
    .bind(list!(genres))
    .bind(tag!(composer))
    .bind(list!(composers))
    .bind(tag!(musicbrainz_recording_id))
    .bind(tag!(musicbrainz_track_id))
    .bind(tag!(musicbrainz_release_id))
    .bind(list!(musicbrainz_artist_ids))
    .bind(tag!(isrc))
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
    /// `AudioFormat::as_str` of the probe that wrote the row, as stored.
    pub format: String,
    #[sqlx(flatten)]
    pub audio: AudioProperties,
    #[sqlx(flatten)]
    pub tags: TrackTags,
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
            codec: r.audio.codec,
            duration_seconds: r.audio.duration_ms as f64 / 1000.0,
            sample_rate: r.audio.sample_rate,
            channels: r.audio.channels,
            bit_depth: r.audio.bit_depth,
            bitrate_kbps: r.audio.bitrate_kbps,
            tags: r.tags,
            has_embedding: r.has_embedding,
            indexed_at: r.indexed_at,
        }
    }
}

/// Columns of `TrackRecord`. `has_embedding`: the track has a vector of its current file (same
/// size and mtime) for the model serving its library (`embed::serving`: the model the library
/// became complete under last, else the active model, the one corald registered last —
/// `models.last_used_at` is bumped at every start with embeddings on).
macro_rules! record_columns {
    () => {
        "t.id, t.library_id, l.path AS library_path, t.rel_path_text,
    t.size, t.mtime_ns, t.format, t.codec, t.duration_ms, t.sample_rate, t.channels, t.bit_depth,
    t.bitrate_kbps, t.title, t.artist, t.album, t.album_artist, t.track_number, t.disc_number,
    t.year, t.genre, t.artists, t.album_artists, t.genres, t.composer, t.composers,
    t.musicbrainz_recording_id, t.musicbrainz_track_id, t.musicbrainz_release_id,
    t.musicbrainz_artist_ids, t.isrc,
            EXISTS (SELECT 1 FROM track_embeddings e
                    WHERE e.track_id = t.id AND e.file_size = t.size AND e.file_mtime_ns = t.mtime_ns
                      AND e.model_id = COALESCE(
                          (SELECT lm.model_id FROM library_models lm
                           WHERE lm.library_id = t.library_id
                           ORDER BY lm.complete_at DESC, lm.model_id DESC LIMIT 1),
                          (SELECT m.id FROM models m
                           ORDER BY m.last_used_at DESC, m.id DESC LIMIT 1)))
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

/// The tracks of `ids` that exist, in no particular order.
pub async fn get_many(pool: &PgPool, ids: &[i64]) -> sqlx::Result<Vec<TrackRecord>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as(concat!(
        "SELECT ",
        record_columns!(),
        " FROM tracks t JOIN libraries l ON l.id = t.library_id WHERE t.id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(pool)
    .await
}

/// The track at `rel_path` (raw bytes) in a library.
pub async fn by_rel_path(
    pool: &PgPool,
    library_id: i64,
    rel_path: &[u8],
) -> sqlx::Result<Option<TrackRecord>> {
    sqlx::query_as(concat!(
        "SELECT ",
        record_columns!(),
        " FROM tracks t JOIN libraries l ON l.id = t.library_id
         WHERE t.library_id = $1 AND t.rel_path = $2"
    ))
    .bind(library_id)
    .bind(rel_path)
    .fetch_optional(pool)
    .await
}

/// Tracks tagged with this MusicBrainz recording id (any case): those with a vector of the
/// model serving their library first, then by id.
pub async fn by_recording_mbid(
    pool: &PgPool,
    mbid: &str,
    limit: i64,
) -> sqlx::Result<Vec<TrackRecord>> {
    sqlx::query_as(concat!(
        "SELECT * FROM (SELECT ",
        record_columns!(),
        " FROM tracks t JOIN libraries l ON l.id = t.library_id
         WHERE lower(t.musicbrainz_recording_id) = lower($1)) r
         ORDER BY r.has_embedding DESC, r.id LIMIT $2"
    ))
    .bind(mbid)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Tracks tagged with this ISRC (compared without case and hyphens), ordered like
/// [`by_recording_mbid`].
pub async fn by_isrc(pool: &PgPool, isrc: &str, limit: i64) -> sqlx::Result<Vec<TrackRecord>> {
    sqlx::query_as(concat!(
        "SELECT * FROM (SELECT ",
        record_columns!(),
        " FROM tracks t JOIN libraries l ON l.id = t.library_id
         WHERE upper(replace(t.isrc, '-', '')) = upper(replace($1, '-', ''))) r
         ORDER BY r.has_embedding DESC, r.id LIMIT $2"
    ))
    .bind(isrc)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Tracks whose search document holds every word of `tsquery` (a `to_tsquery('simple', …)`
/// conjunction of whole folded words), by id; the caller checks which field holds them.
pub async fn with_words(
    pool: &PgPool,
    tsquery: &str,
    limit: i64,
) -> sqlx::Result<Vec<TrackRecord>> {
    sqlx::query_as(concat!(
        "SELECT ",
        record_columns!(),
        " FROM tracks t JOIN libraries l ON l.id = t.library_id
         WHERE t.search @@ to_tsquery('simple', $1)
         ORDER BY t.id LIMIT $2"
    ))
    .bind(tsquery)
    .bind(limit)
    .fetch_all(pool)
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
