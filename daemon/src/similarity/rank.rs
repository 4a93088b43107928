//! The filters applied to scored candidates in Rust: other files of the same recording, and a
//! cap per artist. Pure functions over track rows.

use std::collections::HashMap;

use crate::db::tracks::TrackRecord;
use crate::text_fold::fold;

/// Two files whose folded artist and title agree are one recording when their durations
/// differ by at most this much.
pub const SAME_RECORDING_MS: i64 = 2_000;

/// What identifies a recording across files: its MusicBrainz recording id, else folded artist
/// and title with the duration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingKey {
    mbid: Option<String>,
    artist_title: Option<(String, String)>,
    duration_ms: i64,
}

impl RecordingKey {
    pub fn of(t: &TrackRecord) -> RecordingKey {
        let artist = artist_key(t);
        let title = t.tags.title.as_deref().map(fold).filter(|s| !s.is_empty());
        RecordingKey {
            mbid: t
                .tags
                .musicbrainz_recording_id
                .as_deref()
                .map(|m| m.trim().to_ascii_lowercase())
                .filter(|m| !m.is_empty()),
            artist_title: artist.zip(title),
            duration_ms: t.audio.duration_ms,
        }
    }

    /// Same recording id, or same folded artist and title with durations within
    /// [`SAME_RECORDING_MS`].
    pub fn same(&self, other: &RecordingKey) -> bool {
        if let (Some(a), Some(b)) = (&self.mbid, &other.mbid)
            && a == b
        {
            return true;
        }
        matches!((&self.artist_title, &other.artist_title), (Some(a), Some(b)) if a == b)
            && (self.duration_ms - other.duration_ms).abs() <= SAME_RECORDING_MS
    }
}

/// The folded artist a cap per artist counts by: the display credit, else the first artist.
pub fn artist_key(t: &TrackRecord) -> Option<String> {
    t.tags
        .artist
        .as_deref()
        .or(t.tags.artists.first().map(String::as_str))
        .map(fold)
        .filter(|s| !s.is_empty())
}

/// How candidates are thinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thinning {
    /// Drop files of the seeds' recordings, and keep one file per recording.
    pub distinct_recordings: bool,
    pub max_per_artist: Option<u32>,
}

/// The tracks chosen so far, for the rules a next one must pass: with `distinct_recordings`,
/// no other file of a recording already chosen (or of a seed); at most `max_per_artist` per
/// folded artist.
#[derive(Debug, Clone)]
pub struct Chosen {
    how: Thinning,
    recordings: Vec<RecordingKey>,
    per_artist: HashMap<String, u32>,
}

impl Chosen {
    /// Nothing chosen yet; the recordings of `seeds` are never chosen (seeds do not count
    /// towards the artist cap).
    pub fn new(how: Thinning, seeds: &[RecordingKey]) -> Chosen {
        Chosen {
            how,
            recordings: seeds.to_vec(),
            per_artist: HashMap::new(),
        }
    }

    /// Whether `t` may be chosen next.
    pub fn admits(&self, t: &TrackRecord) -> bool {
        if self.how.distinct_recordings {
            let key = RecordingKey::of(t);
            if self.recordings.iter().any(|r| r.same(&key)) {
                return false;
            }
        }
        match (self.how.max_per_artist, artist_key(t)) {
            (Some(cap), Some(a)) => self.per_artist.get(&a).copied().unwrap_or(0) < cap,
            _ => true,
        }
    }

    /// Counts `t` as chosen: its recording and its artist.
    pub fn add(&mut self, t: &TrackRecord) {
        self.recordings.push(RecordingKey::of(t));
        if let Some(a) = artist_key(t) {
            *self.per_artist.entry(a).or_insert(0) += 1;
        }
    }
}

/// Keep, best first, up to `limit` of `scored` (already best first) that [`Chosen`] admits in
/// turn, starting from `seeds`.
pub fn thin(
    seeds: &[RecordingKey],
    scored: Vec<(TrackRecord, f64)>,
    how: Thinning,
    limit: usize,
) -> Vec<(TrackRecord, f64)> {
    let mut chosen = Chosen::new(how, seeds);
    let mut kept: Vec<(TrackRecord, f64)> = Vec::with_capacity(limit);
    for (t, score) in scored {
        if kept.len() >= limit {
            break;
        }
        if chosen.admits(&t) {
            chosen.add(&t);
            kept.push((t, score));
        }
    }
    kept
}

/// Cosine of `a - mean` and `b - mean` (0 when either has no direction).
pub fn centred_cosine(a: &[f32], b: &[f32], mean: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for ((x, y), m) in a.iter().zip(b).zip(mean) {
        let (x, y) = (f64::from(x - m), f64::from(y - m));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    let n = (aa * bb).sqrt();
    if n > 0.0 && n.is_finite() {
        ab / n
    } else {
        0.0
    }
}

/// `v - mean`, scaled to length 1 (`None` when it has no direction).
pub fn centred_unit(v: &[f32], mean: &[f32]) -> Option<Vec<f32>> {
    let c: Vec<f64> = v.iter().zip(mean).map(|(x, m)| f64::from(x - m)).collect();
    unit(&c)
}

/// `v` scaled to length 1, as f32 (`None` for a zero or non-finite vector).
pub fn unit(v: &[f64]) -> Option<Vec<f32>> {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    (n > 0.0 && n.is_finite()).then(|| v.iter().map(|x| (x / n) as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::AudioProperties;
    use chrono::Utc;
    use coral_proto::TrackTags;

    fn track(id: i64, artist: &str, title: &str, ms: i64, mbid: Option<&str>) -> TrackRecord {
        TrackRecord {
            id,
            library_id: 1,
            library_path: "/m".into(),
            rel_path_text: format!("{id}.flac"),
            size: 1,
            mtime_ns: 0,
            format: "flac".into(),
            audio: AudioProperties {
                duration_ms: ms,
                ..AudioProperties::default()
            },
            tags: TrackTags {
                title: Some(title.into()),
                artist: Some(artist.into()),
                artists: vec![artist.into()],
                musicbrainz_recording_id: mbid.map(str::to_owned),
                ..TrackTags::default()
            },
            has_embedding: true,
            indexed_at: Utc::now(),
        }
    }

    #[test]
    fn a_recording_is_its_mbid_or_its_folded_artist_title_and_length() {
        let a = RecordingKey::of(&track(1, "Zoë", "Café Noir", 200_000, None));
        assert!(a.same(&RecordingKey::of(&track(
            2,
            "zoe",
            "CAFE-NOIR",
            201_900,
            None
        ))));
        assert!(!a.same(&RecordingKey::of(&track(
            3,
            "zoe",
            "cafe noir",
            202_500,
            None
        ))));
        assert!(!a.same(&RecordingKey::of(&track(4, "zoe", "other", 200_000, None))));
        let m = RecordingKey::of(&track(5, "x", "y", 1_000, Some("ABC")));
        assert!(m.same(&RecordingKey::of(&track(6, "p", "q", 9_000, Some("abc")))));
    }

    #[test]
    fn thinning_drops_seed_recordings_duplicates_and_caps_artists() {
        let seed = RecordingKey::of(&track(1, "a", "one", 100_000, None));
        let scored = vec![
            (track(2, "a", "one", 100_500, None), 0.9),
            (track(3, "b", "two", 90_000, None), 0.8),
            (track(4, "b", "two", 90_000, None), 0.7),
            (track(5, "b", "three", 80_000, None), 0.6),
            (track(6, "c", "four", 80_000, None), 0.5),
        ];
        let how = Thinning {
            distinct_recordings: true,
            max_per_artist: Some(1),
        };
        let ids: Vec<i64> = thin(std::slice::from_ref(&seed), scored.clone(), how, 10)
            .iter()
            .map(|(t, _)| t.id)
            .collect();
        assert_eq!(ids, vec![3, 6]);
        let all = Thinning {
            distinct_recordings: false,
            max_per_artist: None,
        };
        assert_eq!(thin(&[seed], scored, all, 3).len(), 3);
    }

    #[test]
    fn centred_cosine_removes_the_shared_direction() {
        let mean = [1.0, 0.0];
        assert!((centred_cosine(&[1.0, 0.1], &[1.0, -0.1], &mean) + 1.0).abs() < 1e-6);
        assert!((centred_cosine(&[1.0, 0.1], &[1.0, 0.2], &mean) - 1.0).abs() < 1e-6);
        assert_eq!(centred_cosine(&[1.0, 0.0], &[1.0, 0.2], &mean), 0.0);
    }
}
