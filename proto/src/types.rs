//! Wire types: every object that crosses the socket, serialised snake_case.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::scan::ScanProgress;

/// A library given either by id or by its root path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LibrarySelector {
    Id(i64),
    Path(String),
}

impl LibrarySelector {
    /// Parse a command-line argument: all digits is an id, anything else a path.
    pub fn parse_arg(arg: &str) -> Self {
        match arg.parse::<i64>() {
            Ok(id) if !arg.is_empty() => LibrarySelector::Id(id),
            _ => LibrarySelector::Path(arg.to_owned()),
        }
    }
}

impl std::fmt::Display for LibrarySelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LibrarySelector::Id(id) => write!(f, "{id}"),
            LibrarySelector::Path(p) => f.write_str(p),
        }
    }
}

/// A registered library.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Library {
    pub id: i64,
    pub path: String,
    pub track_count: i64,
    pub failed_count: i64,
    pub created_at: DateTime<Utc>,
    pub last_scan: Option<ScanProgress>,
}

/// One indexed track. `path` is absolute; `relative_path` is below the library root.
/// Non-UTF-8 file names are shown with U+FFFD in place of the bad bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Track {
    pub id: i64,
    pub library_id: i64,
    pub path: String,
    pub relative_path: String,
    pub size: i64,
    pub modified_at: DateTime<Utc>,
    pub format: String,
    pub codec: Option<String>,
    pub duration_seconds: f64,
    pub sample_rate: Option<i32>,
    pub channels: Option<i32>,
    pub bit_depth: Option<i32>,
    pub bitrate_kbps: Option<i32>,
    /// The track's tags (flattened into the track object on the wire).
    #[serde(flatten)]
    pub tags: TrackTags,
    pub has_embedding: bool,
    pub indexed_at: DateTime<Utc>,
}

/// The tags of a track, as indexed. Text is cleaned (no control characters, trimmed, at most
/// 1024 bytes a value). Artists, album artists, genres and composers are lists of every value
/// the file holds; `artist`, `album_artist`, `genre` and `composer` are their display strings:
/// the credit as tagged ("A feat. B"), or the values joined with "; ".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "sqlx", derive(sqlx::FromRow))]
pub struct TrackTags {
    pub title: Option<String>,
    pub album: Option<String>,
    pub artist: Option<String>,
    #[serde(default)]
    pub artists: Vec<String>,
    pub album_artist: Option<String>,
    #[serde(default)]
    pub album_artists: Vec<String>,
    pub genre: Option<String>,
    #[serde(default)]
    pub genres: Vec<String>,
    #[serde(default)]
    pub composer: Option<String>,
    #[serde(default)]
    pub composers: Vec<String>,
    pub track_number: Option<i32>,
    pub disc_number: Option<i32>,
    pub year: Option<i32>,
    /// MusicBrainz recording id (`MUSICBRAINZ_TRACKID`, ID3v2 `UFID`).
    #[serde(default)]
    pub musicbrainz_recording_id: Option<String>,
    /// MusicBrainz release track id (`MUSICBRAINZ_RELEASETRACKID`).
    #[serde(default)]
    pub musicbrainz_track_id: Option<String>,
    /// MusicBrainz release id (`MUSICBRAINZ_ALBUMID`).
    #[serde(default)]
    pub musicbrainz_release_id: Option<String>,
    /// MusicBrainz artist ids, one per artist.
    #[serde(default)]
    pub musicbrainz_artist_ids: Vec<String>,
    #[serde(default)]
    pub isrc: Option<String>,
}

/// A neighbour returned by `track.similar`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimilarTrack {
    /// Centred cosine similarity in [-1, 1]: the cosine of the two tracks' vectors after the
    /// model's mean vector over the collection is subtracted from both. 1 is the same sound,
    /// 0 is as related as two tracks picked at random, negative is less alike than that.
    pub score: f64,
    pub track: Track,
}

/// A track given by its Coral id (a bare integer is accepted too), its absolute path, or its
/// MusicBrainz recording id: exactly one of the fields. Anything else is refused with what
/// was expected (an unknown field is named).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TrackRef {
    Id(i64),
    Key(TrackKey),
}

impl<'de> Deserialize<'de> for TrackRef {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TrackRef;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a track id, or an object with one of `id`, `path`, `mbid`")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<TrackRef, E> {
                Ok(TrackRef::Id(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<TrackRef, E> {
                i64::try_from(v)
                    .map(TrackRef::Id)
                    .map_err(|_| E::custom(format!("track id {v} is out of range")))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<TrackRef, A::Error> {
                TrackKey::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(TrackRef::Key)
            }
        }
        d.deserialize_any(V)
    }
}

/// The object form of [`TrackRef`]: exactly one field set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// An absolute path below a library root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A MusicBrainz recording id; when several files share it, the lowest id with an
    /// embedding is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mbid: Option<String>,
}

impl TrackRef {
    /// Parse a command-line argument: all digits is an id, anything else a path.
    pub fn parse_arg(arg: &str) -> Self {
        match arg.parse::<i64>() {
            Ok(id) => TrackRef::Id(id),
            Err(_) => TrackRef::Key(TrackKey {
                path: Some(arg.to_owned()),
                ..TrackKey::default()
            }),
        }
    }
}

impl std::fmt::Display for TrackRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrackRef::Id(id) | TrackRef::Key(TrackKey { id: Some(id), .. }) => write!(f, "{id}"),
            TrackRef::Key(TrackKey { path: Some(p), .. }) => f.write_str(p),
            TrackRef::Key(TrackKey { mbid: Some(m), .. }) => write!(f, "mbid {m}"),
            TrackRef::Key(_) => f.write_str("(no track)"),
        }
    }
}

/// Filters of `track.similar` (every field optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimilarOptions {
    /// Only tracks of these libraries (default: every library).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub library_ids: Option<Vec<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_duration_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_s: Option<f64>,
    /// Default true: other files of the same recording as the track asked about (same
    /// MusicBrainz recording id, or same folded artist and title with durations within 2 s)
    /// are left out, and of several files of one recording among the neighbours only the
    /// closest is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_same_recording: Option<bool>,
    /// At most this many tracks of one artist (folded display artist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_artist: Option<u32>,
}

/// The seeds of `track.mix`: a list of tracks, or an object naming tracks, an album and/or an
/// artist (folded comparison; up to 20 of their tracks become seeds). At most 20 tracks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum MixSeeds {
    Tracks(Vec<TrackRef>),
    Group(SeedGroup),
}

impl<'de> Deserialize<'de> for MixSeeds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MixSeeds;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of tracks, or an object with `tracks`, `album`, `artist`")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<MixSeeds, A::Error> {
                Vec::<TrackRef>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(MixSeeds::Tracks)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<MixSeeds, A::Error> {
                SeedGroup::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(MixSeeds::Group)
            }
        }
        d.deserialize_any(V)
    }
}

/// The object form of [`MixSeeds`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedGroup {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tracks: Vec<TrackRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub album: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artist: Option<String>,
}

/// What a media server knows of a track, for `track.lookup`: any of the fields. Rules are
/// tried in this order: `path`, `mbid`, `isrc`, then `artist` + `title` (+ `duration_s`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackLookup {
    /// Absolute path of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// MusicBrainz recording id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mbid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isrc: Option<String>,
    /// One artist name (any of a track's artists, or its display credit, matches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artist: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Used to prefer (and, when given, require within 3 s) the right length by artist + title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    /// Preferred among artist + title matches when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub album: Option<String>,
}

/// The rule by which `track.lookup` matched a track, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LookupRule {
    Path,
    Mbid,
    Isrc,
    /// Folded artist and title equal, duration within 3 s of the one given.
    ArtistTitleDuration,
    /// Folded artist and title equal (no duration given).
    ArtistTitle,
}

/// One answer of `track.lookup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrackMatch {
    pub rule: LookupRule,
    pub track: Track,
}

/// Returned by `daemon.status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub version: String,
    pub pid: u32,
    pub started_at: DateTime<Utc>,
    pub socket: String,
    pub state_dir: String,
    /// "managed" (a private cluster under the state directory) or "external".
    pub database: String,
    pub libraries: i64,
    pub tracks: i64,
    pub active_scans: Vec<ScanProgress>,
    pub queued_scans: usize,
    pub embedding: EmbeddingStatus,
    pub warnings: Vec<String>,
    /// How each library is watched for changes (absent from daemons that predate it).
    #[serde(default)]
    pub watch: Vec<LibraryWatch>,
    /// Whether the database answers right now (absent from daemons that predate it). While it
    /// is unavailable, `libraries` and `tracks` are the last counts read.
    #[serde(default)]
    pub database_health: Option<DatabaseHealth>,
}

/// Whether corald can reach its database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatabaseState {
    /// The last query or health check succeeded.
    Ok,
    /// Queries fail or get no answer; corald retries with back-off and loses nothing meanwhile
    /// (scans wait, their batches are written once the database is back).
    Unavailable,
}

impl DatabaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            DatabaseState::Ok => "ok",
            DatabaseState::Unavailable => "unavailable",
        }
    }
}

/// `daemon.status` → `database_health`: the database's reachability and its outage history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatabaseHealth {
    pub state: DatabaseState,
    /// When the current state began.
    pub since: DateTime<Utc>,
    /// The last error seen (kept after recovery, to say what the last outage was).
    pub last_error: Option<String>,
    /// Outages since corald started (each a change from ok to unavailable).
    #[serde(default)]
    pub outages: u64,
    /// Failed attempts retried since corald started (queries, health checks, reconnects).
    #[serde(default)]
    pub retries: u64,
    /// Times corald restarted its managed PostgreSQL after it died.
    #[serde(default)]
    pub restarts: u64,
}

/// How corald notices changes in a library.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchMode {
    /// inotify watches on every directory; changes are scanned after a quiet period.
    Inotify,
    /// Periodic incremental scans (network/FUSE filesystem, or the watch limit was reached).
    Polling,
    /// The library root is missing or unmounted: nothing is scanned or deleted until it is back.
    Paused,
    /// Not watched (`watch.enabled = false` or `watch.exclude_libraries`).
    Disabled,
}

impl WatchMode {
    pub fn as_str(self) -> &'static str {
        match self {
            WatchMode::Inotify => "inotify",
            WatchMode::Polling => "polling",
            WatchMode::Paused => "paused",
            WatchMode::Disabled => "disabled",
        }
    }
}

/// The watcher's state for one library (`daemon.status` → `watch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LibraryWatch {
    pub library_id: i64,
    pub path: String,
    pub mode: WatchMode,
    /// inotify watches held for this library (one per directory).
    pub watches: u64,
    /// When the last relevant change was seen.
    pub last_event_at: Option<DateTime<Utc>>,
    /// Directories with changes waiting for the quiet period.
    pub pending_paths: u64,
    /// Files seen open for writing; they hold their directory back until closed.
    pub open_files: u64,
    /// Seconds between incremental scans while polling.
    pub poll_interval_seconds: Option<u64>,
    /// Filesystem type of the library root, from the mount table.
    pub filesystem: Option<String>,
    /// Why the library is polled, paused or disabled, or what limit it hit.
    pub warning: Option<String>,
}

/// State of the embedding pipeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingStatus {
    pub enabled: bool,
    pub model: Option<String>,
    pub device: Option<String>,
    /// Tracks with a vector of the active model.
    pub tracks_embedded: i64,
    /// Tracks waiting for a decode thread.
    #[serde(default)]
    pub decode_queue: u64,
    /// Decoded tracks waiting for the inference thread.
    #[serde(default)]
    pub inference_queue: u64,
    /// Tracks stored per second over the last minute (0 when idle).
    #[serde(default)]
    pub tracks_per_second: f64,
    /// Model windows per second of forward-pass time since start (the model's own speed).
    #[serde(default)]
    pub windows_per_inference_second: f64,
    /// Tracks embedded since corald started.
    #[serde(default)]
    pub tracks_embedded_since_start: u64,
    /// The queue's consumers seen in the last minute: this corald's own pipeline and every
    /// `corald worker` on the same database.
    #[serde(default)]
    pub workers: Vec<EmbedWorker>,
}

/// A consumer of the embedding queue, as it last reported itself (every few seconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedWorker {
    /// `corald@HOST:PID` or `worker@HOST:PID`.
    pub id: String,
    pub host: String,
    pub device: String,
    pub started_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    /// Tracks it has embedded since it started.
    pub tracks_done: u64,
    /// Tracks stored per second over its last minute.
    pub tracks_per_second: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn track_refs_and_seeds_decode_or_say_what_was_expected() {
        let r = |j: &str| serde_json::from_str::<TrackRef>(j).map_err(|e| e.to_string());
        assert_eq!(r("7"), Ok(TrackRef::Id(7)));
        assert_eq!(
            r(r#"{"path": "/m/a.flac"}"#),
            Ok(TrackRef::Key(TrackKey {
                path: Some("/m/a.flac".into()),
                ..TrackKey::default()
            }))
        );
        let e = r(r#"{"paht": "/m/a.flac"}"#).err().unwrap_or_default();
        assert!(e.contains("unknown field `paht`"), "{e}");
        let e = r(r#""a.flac""#).err().unwrap_or_default();
        assert!(e.contains("a track id, or an object"), "{e}");
        assert!(r("18446744073709551615").is_err());
        let m = |j: &str| serde_json::from_str::<MixSeeds>(j).map_err(|e| e.to_string());
        assert_eq!(
            m(r#"[1, {"mbid": "x"}]"#).map(|s| matches!(s, MixSeeds::Tracks(t) if t.len() == 2)),
            Ok(true)
        );
        let e = m(r#"{"albun": "x"}"#).err().unwrap_or_default();
        assert!(e.contains("unknown field `albun`"), "{e}");
        assert!(m("3").is_err());
        // Serialised as decoded: a bare id stays a bare id.
        assert_eq!(
            serde_json::to_string(&TrackRef::Id(3)).ok().as_deref(),
            Some("3")
        );
    }
}
