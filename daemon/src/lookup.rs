//! Finding indexed tracks from what other programs know of them: `track.lookup` (a media
//! server's path, MusicBrainz recording id, ISRC, or artist + title + duration, best match
//! first with the rule that matched) and the resolution of a `TrackRef` (id, path or
//! recording id) for the similarity methods.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use coral_proto::LookupRule;
use sqlx::PgPool;

use crate::db::libraries;
use crate::db::tracks::{self, TrackRecord};
use crate::text_fold::fold;

/// Durations of an artist + title match may differ from the one asked by this much.
pub const DURATION_TOLERANCE_MS: i64 = 3_000;

/// Candidates read per rule before they are checked and ranked.
const CANDIDATES: i64 = 200;

/// A track asked for by one key (a checked `TrackRef`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackWanted {
    Id(i64),
    /// An absolute path.
    Path(PathBuf),
    /// A MusicBrainz recording id.
    Mbid(String),
}

impl std::fmt::Display for TrackWanted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrackWanted::Id(id) => write!(f, "no track has id {id}"),
            TrackWanted::Path(p) => write!(f, "no indexed track has the path {}", p.display()),
            TrackWanted::Mbid(m) => write!(f, "no track has the MusicBrainz recording id {m}"),
        }
    }
}

/// `track.mix`'s checked seeds: tracks, and an album and/or artist (folded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seeds {
    pub tracks: Vec<TrackWanted>,
    pub album: Option<String>,
    pub artist: Option<String>,
}

/// A checked `track.lookup` query: at least one rule can run. Text keys are trimmed; artist,
/// title and album are folded (accents, case, punctuation).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LookupQuery {
    pub path: Option<PathBuf>,
    pub mbid: Option<String>,
    pub isrc: Option<String>,
    /// Folded artist and title, both non-empty.
    pub artist_title: Option<(String, String)>,
    pub duration_ms: Option<i64>,
    pub album: Option<String>,
}

/// The track `wanted` names. By recording id: the lowest id with a vector of the model serving
/// its library (`embed::serving`), else the lowest id.
pub async fn resolve(pool: &PgPool, wanted: &TrackWanted) -> sqlx::Result<Option<TrackRecord>> {
    match wanted {
        TrackWanted::Id(id) => tracks::get(pool, *id).await,
        TrackWanted::Path(p) => by_path(pool, p).await,
        TrackWanted::Mbid(m) => Ok(tracks::by_recording_mbid(pool, m, 1)
            .await?
            .into_iter()
            .next()),
    }
}

/// The track at an absolute path: as given, else canonicalised (symbolic links, `..`).
async fn by_path(pool: &PgPool, path: &Path) -> sqlx::Result<Option<TrackRecord>> {
    let roots = libraries::roots(pool).await?;
    if let Some(t) = in_roots(pool, &roots, path).await? {
        return Ok(Some(t));
    }
    // Off the runtime's threads: a path on a hung network mount must not stall other requests.
    match tokio::fs::canonicalize(path).await {
        Ok(real) if real != path => in_roots(pool, &roots, &real).await,
        _ => Ok(None),
    }
}

async fn in_roots(
    pool: &PgPool,
    roots: &[(i64, String)],
    path: &Path,
) -> sqlx::Result<Option<TrackRecord>> {
    for (id, root) in roots {
        if let Ok(rel) = path.strip_prefix(root)
            && !rel.as_os_str().is_empty()
            && let Some(t) = tracks::by_rel_path(pool, *id, rel.as_os_str().as_bytes()).await?
        {
            return Ok(Some(t));
        }
    }
    Ok(None)
}

/// `track.lookup`: every rule the query allows, strongest first (path, recording id, ISRC,
/// artist + title); a track appears once, under the first rule that found it. Within a rule:
/// tracks with a vector first, then by id; for artist + title, the same album first, then
/// the closest duration, then tracks with a vector, then by id.
pub async fn lookup(
    pool: &PgPool,
    q: &LookupQuery,
    limit: usize,
) -> sqlx::Result<Vec<(LookupRule, TrackRecord)>> {
    let mut out: Vec<(LookupRule, TrackRecord)> = Vec::new();
    let mut seen: HashSet<i64> = HashSet::new();
    let mut add = |rule: LookupRule, found: Vec<TrackRecord>, out: &mut Vec<_>| {
        for t in found {
            if seen.insert(t.id) {
                out.push((rule, t));
            }
        }
    };
    if let Some(p) = &q.path {
        add(
            LookupRule::Path,
            by_path(pool, p).await?.into_iter().collect(),
            &mut out,
        );
    }
    if let Some(m) = &q.mbid {
        add(
            LookupRule::Mbid,
            tracks::by_recording_mbid(pool, m, CANDIDATES).await?,
            &mut out,
        );
    }
    if let Some(i) = &q.isrc {
        add(
            LookupRule::Isrc,
            tracks::by_isrc(pool, i, CANDIDATES).await?,
            &mut out,
        );
    }
    if let Some((artist, title)) = &q.artist_title {
        let words: Vec<&str> = artist.split(' ').chain(title.split(' ')).collect();
        let found = tracks::with_words(pool, &words.join(" & "), CANDIDATES).await?;
        let rule = if q.duration_ms.is_some() {
            LookupRule::ArtistTitleDuration
        } else {
            LookupRule::ArtistTitle
        };
        add(rule, by_artist_title(found, q), &mut out);
    }
    out.truncate(limit);
    Ok(out)
}

/// Whether `folded` is the track's display credit, one of its artists or its album artist
/// (folded).
fn credits(t: &TrackRecord, folded: &str) -> bool {
    t.tags
        .artist
        .iter()
        .chain(t.tags.artists.iter())
        .chain(t.tags.album_artist.iter())
        .any(|a| fold(a) == folded)
}

/// Of the tracks holding the words, those whose folded title and one folded artist credit are
/// the ones asked (and whose duration is within [`DURATION_TOLERANCE_MS`] when one was given),
/// ranked.
fn by_artist_title(found: Vec<TrackRecord>, q: &LookupQuery) -> Vec<TrackRecord> {
    let Some((artist, title)) = &q.artist_title else {
        return Vec::new();
    };
    let mut hits: Vec<(bool, i64, TrackRecord)> = found
        .into_iter()
        .filter(|t| t.tags.title.as_deref().map(fold).as_ref() == Some(title))
        .filter(|t| credits(t, artist))
        .filter_map(|t| {
            let off = q.duration_ms.map_or(0, |d| (t.audio.duration_ms - d).abs());
            if off > DURATION_TOLERANCE_MS {
                return None;
            }
            let same_album = q.album.is_some() && t.tags.album.as_deref().map(fold) == q.album;
            Some((same_album, off, t))
        })
        .collect();
    hits.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(b.2.has_embedding.cmp(&a.2.has_embedding))
            .then(a.2.id.cmp(&b.2.id))
    });
    hits.into_iter().map(|(_, _, t)| t).collect()
}

/// Up to `limit` tracks of an album and/or artist (folded: the album's name, any artist
/// credit or the album artist), those with a vector first, in album order.
pub async fn album_or_artist(
    pool: &PgPool,
    album: Option<&str>,
    artist: Option<&str>,
    limit: usize,
) -> sqlx::Result<Vec<TrackRecord>> {
    let words: Vec<&str> = album
        .into_iter()
        .chain(artist)
        .flat_map(|s| s.split(' '))
        .collect();
    if words.is_empty() {
        return Ok(Vec::new());
    }
    let found = tracks::with_words(pool, &words.join(" & "), 10 * CANDIDATES).await?;
    let mut hits: Vec<TrackRecord> = found
        .into_iter()
        .filter(|t| album.is_none_or(|a| t.tags.album.as_deref().map(fold).as_deref() == Some(a)))
        .filter(|t| artist.is_none_or(|a| credits(t, a)))
        .collect();
    hits.sort_by(|a, b| {
        b.has_embedding
            .cmp(&a.has_embedding)
            .then(a.tags.album.cmp(&b.tags.album))
            .then(a.tags.disc_number.cmp(&b.tags.disc_number))
            .then(a.tags.track_number.cmp(&b.tags.track_number))
            .then(a.id.cmp(&b.id))
    });
    hits.truncate(limit);
    Ok(hits)
}
