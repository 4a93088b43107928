//! The checks every API method runs on its decoded parameters before it touches the database
//! or the filesystem: pure functions, shared by `api.rs` and the fuzzing entry points
//! (`fuzz_entry.rs`), so what is fuzzed is what the daemon runs.

use std::path::{Component, Path, PathBuf};

use coral_proto::{
    MixSeeds, ScanMode, SimilarOptions, TrackLookup, TrackRef, codes, errors::error,
};
use jsonrpsee::types::ErrorObjectOwned;

use crate::lookup::{LookupQuery, Seeds, TrackWanted};
use crate::similarity::SimilarFilter;

/// Default and largest page of `scan.list` and `track.search`.
const DEFAULT_LIST_LIMIT: u32 = 20;
const MAX_LIST_LIMIT: u32 = 1000;
/// Default and largest neighbour count of `track.similar`.
const DEFAULT_SIMILAR_LIMIT: u32 = 10;
const MAX_SIMILAR_LIMIT: u32 = 1000;
/// Default length of `track.path` and `track.mix`.
const DEFAULT_PLAYLIST_LEN: u32 = 25;

/// `library.add`: the path must be absolute (it is canonicalised afterwards).
pub fn library_path(path: &str) -> Result<&Path, ErrorObjectOwned> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(error(
            codes::INVALID_ARGUMENT,
            format!("library path {path} must be absolute"),
        ));
    }
    Ok(p)
}

/// `scan.start`'s `path`: a relative or absolute subdirectory, turned into a clean path
/// relative to `root` (lexically: no `..`, nothing outside the root). `None` is the root itself.
/// Whether the directory exists is checked by the caller.
pub fn clean_subdir(root: &Path, path: &str) -> Result<Option<PathBuf>, ErrorObjectOwned> {
    let p = Path::new(path);
    let rel = if p.is_absolute() {
        match p.strip_prefix(root) {
            Ok(r) => r,
            Err(_) => {
                return Err(error(
                    codes::PATH_OUTSIDE_LIBRARY,
                    format!("{path} is not inside the library {}", root.display()),
                ));
            }
        }
    } else {
        p
    };
    let mut clean = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => clean.push(n),
            Component::CurDir => {}
            _ => {
                return Err(error(
                    codes::PATH_OUTSIDE_LIBRARY,
                    format!("{path} must stay inside the library (no `..`)"),
                ));
            }
        }
    }
    Ok((!clean.as_os_str().is_empty()).then_some(clean))
}

/// `scan.start`'s `full` flag.
pub fn scan_mode(full: Option<bool>) -> ScanMode {
    if full.unwrap_or(false) {
        ScanMode::Full
    } else {
        ScanMode::Incremental
    }
}

/// Page size of `scan.list` and `track.search`: default 20, clamped to 1..=1000.
pub fn list_limit(limit: Option<u32>) -> i64 {
    i64::from(limit.unwrap_or(DEFAULT_LIST_LIMIT).clamp(1, MAX_LIST_LIMIT))
}

/// Neighbours asked of `track.similar`: default 10, clamped to 1..=1000.
pub fn similar_limit(limit: Option<u32>) -> u32 {
    limit
        .unwrap_or(DEFAULT_SIMILAR_LIMIT)
        .clamp(1, MAX_SIMILAR_LIMIT)
}

/// `track.search`'s parameters, ready for the query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Search {
    /// A `to_tsquery('simple', …)` expression of prefix terms (see [`crate::text_fold`]).
    pub tsquery: String,
    pub limit: i64,
    pub offset: i64,
}

/// `track.search`: the query must have at least one word after folding.
pub fn search(
    query: &str,
    limit: Option<u32>,
    offset: Option<u32>,
) -> Result<Search, ErrorObjectOwned> {
    let Some(tsquery) = crate::text_fold::prefix_tsquery(query) else {
        return Err(error(
            codes::INVALID_ARGUMENT,
            "the search query has no words to look for",
        ));
    };
    Ok(Search {
        tsquery,
        limit: list_limit(limit),
        offset: i64::from(offset.unwrap_or(0)),
    })
}

/// A `TrackRef`: exactly one of id, absolute path, MusicBrainz recording id.
pub fn track_ref(r: &TrackRef) -> Result<TrackWanted, ErrorObjectOwned> {
    let key = match r {
        TrackRef::Id(id) => return Ok(TrackWanted::Id(*id)),
        TrackRef::Key(k) => k,
    };
    let given = [key.id.is_some(), key.path.is_some(), key.mbid.is_some()]
        .iter()
        .filter(|g| **g)
        .count();
    if given != 1 {
        return Err(error(
            codes::INVALID_ARGUMENT,
            format!(
                "a track is given by exactly one of `id`, `path` or `mbid` ({given} were given)"
            ),
        ));
    }
    if let Some(id) = key.id {
        return Ok(TrackWanted::Id(id));
    }
    if let Some(p) = &key.path {
        if !Path::new(p).is_absolute() {
            return Err(error(
                codes::INVALID_ARGUMENT,
                format!("track path {p:?} must be absolute"),
            ));
        }
        return Ok(TrackWanted::Path(PathBuf::from(p)));
    }
    match key.mbid.as_deref().map(str::trim) {
        Some(m) if !m.is_empty() => Ok(TrackWanted::Mbid(m.to_owned())),
        _ => Err(error(
            codes::INVALID_ARGUMENT,
            "the track's `mbid` is empty",
        )),
    }
}

/// Seconds → milliseconds for a duration bound: finite and not negative.
fn duration_ms(name: &str, seconds: f64) -> Result<i64, ErrorObjectOwned> {
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(error(
            codes::INVALID_ARGUMENT,
            format!("`{name}` must be a number of seconds, 0 or more (got {seconds})"),
        ));
    }
    // Saturating: anything past i64::MAX ms is "no bound".
    Ok((seconds * 1000.0).round().min(i64::MAX as f64) as i64)
}

/// `track.similar`'s options.
pub fn similar_options(o: Option<SimilarOptions>) -> Result<SimilarFilter, ErrorObjectOwned> {
    let o = o.unwrap_or_default();
    let mut f = SimilarFilter::default();
    if let Some(s) = o.min_duration_s {
        f.min_ms = duration_ms("min_duration_s", s)?;
    }
    if let Some(s) = o.max_duration_s {
        f.max_ms = duration_ms("max_duration_s", s)?;
    }
    if f.min_ms > f.max_ms {
        return Err(error(
            codes::INVALID_ARGUMENT,
            "`min_duration_s` is greater than `max_duration_s`",
        ));
    }
    if let Some(ids) = &o.library_ids
        && ids.is_empty()
    {
        return Err(error(
            codes::INVALID_ARGUMENT,
            "`library_ids` is empty: leave it out to search every library",
        ));
    }
    if o.max_per_artist == Some(0) {
        return Err(error(
            codes::INVALID_ARGUMENT,
            "`max_per_artist` must be at least 1",
        ));
    }
    f.library_ids = o.library_ids;
    f.exclude_same_recording = o.exclude_same_recording.unwrap_or(true);
    f.max_per_artist = o.max_per_artist;
    Ok(f)
}

/// `track.path`'s length: default 25, clamped to 2..=200.
pub fn path_count(count: Option<u32>) -> u32 {
    count
        .unwrap_or(DEFAULT_PLAYLIST_LEN)
        .clamp(2, crate::similarity::MAX_PATH_LEN)
}

/// `track.mix`'s length: default 25, clamped to 1..=1000.
pub fn mix_count(count: Option<u32>) -> u32 {
    count
        .unwrap_or(DEFAULT_PLAYLIST_LEN)
        .clamp(1, MAX_SIMILAR_LIMIT)
}

/// `track.mix`'s seeds: 1 to 20 tracks and/or an album or artist with words in it.
pub fn mix_seeds(seeds: &MixSeeds) -> Result<Seeds, ErrorObjectOwned> {
    let (tracks, album, artist) = match seeds {
        MixSeeds::Tracks(t) => (t.as_slice(), None, None),
        MixSeeds::Group(g) => (g.tracks.as_slice(), g.album.as_deref(), g.artist.as_deref()),
    };
    let max = crate::similarity::MAX_SEEDS;
    if tracks.len() > max {
        return Err(error(
            codes::INVALID_ARGUMENT,
            format!(
                "a mix takes at most {max} seed tracks ({} given)",
                tracks.len()
            ),
        ));
    }
    let folded = |s: Option<&str>| s.map(crate::text_fold::fold).filter(|s| !s.is_empty());
    let out = Seeds {
        tracks: tracks.iter().map(track_ref).collect::<Result<_, _>>()?,
        album: folded(album),
        artist: folded(artist),
    };
    if out.tracks.is_empty() && out.album.is_none() && out.artist.is_none() {
        return Err(error(
            codes::INVALID_ARGUMENT,
            "a mix needs seeds: tracks, an album or an artist",
        ));
    }
    Ok(out)
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// `track.lookup`'s query: at least one rule must be able to run (a path, an mbid, an ISRC, or
/// both artist and title with words in them).
pub fn lookup_query(q: &TrackLookup) -> Result<LookupQuery, ErrorObjectOwned> {
    let path = match non_empty(&q.path) {
        Some(p) if !Path::new(&p).is_absolute() => {
            return Err(error(
                codes::INVALID_ARGUMENT,
                format!("lookup path {p:?} must be absolute"),
            ));
        }
        p => p.map(PathBuf::from),
    };
    let folded = |s: &Option<String>| {
        s.as_deref()
            .map(crate::text_fold::fold)
            .filter(|s| !s.is_empty())
    };
    let duration_ms = match q.duration_s {
        Some(s) => Some(duration_ms("duration_s", s)?),
        None => None,
    };
    let out = LookupQuery {
        path,
        mbid: non_empty(&q.mbid),
        isrc: non_empty(&q.isrc),
        artist_title: folded(&q.artist).zip(folded(&q.title)),
        duration_ms,
        album: folded(&q.album),
    };
    if out.path.is_none() && out.mbid.is_none() && out.isrc.is_none() && out.artist_title.is_none()
    {
        return Err(error(
            codes::INVALID_ARGUMENT,
            "nothing to look up by: give `path`, `mbid`, `isrc`, or both `artist` and `title`",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_paths_must_be_absolute() {
        assert!(library_path("/music").is_ok());
        let e = library_path("music").expect_err("relative");
        assert_eq!(e.code(), codes::INVALID_ARGUMENT);
        assert!(library_path("").is_err());
    }

    #[test]
    fn subdirs_are_cleaned_lexically() {
        let root = Path::new("/music");
        assert_eq!(
            clean_subdir(root, "a/./b/").expect("relative"),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(
            clean_subdir(root, "/music/a").expect("absolute"),
            Some(PathBuf::from("a"))
        );
        assert_eq!(clean_subdir(root, "").expect("empty"), None);
        assert_eq!(clean_subdir(root, "/music").expect("root"), None);
        for bad in ["../x", "a/../../x", "/musicx/a", "/etc"] {
            let e = clean_subdir(root, bad).expect_err(bad);
            assert_eq!(e.code(), codes::PATH_OUTSIDE_LIBRARY, "{bad}");
        }
    }

    #[test]
    fn limits_have_defaults_and_bounds() {
        assert_eq!(list_limit(None), 20);
        assert_eq!(list_limit(Some(0)), 1);
        assert_eq!(list_limit(Some(u32::MAX)), 1000);
        assert_eq!(similar_limit(None), 10);
        assert_eq!(similar_limit(Some(5000)), 1000);
    }

    #[test]
    fn a_track_ref_names_exactly_one_key() {
        use coral_proto::TrackKey;
        assert_eq!(track_ref(&TrackRef::Id(3)).ok(), Some(TrackWanted::Id(3)));
        let path = TrackRef::Key(TrackKey {
            path: Some("/m/a.flac".into()),
            ..TrackKey::default()
        });
        assert_eq!(
            track_ref(&path).ok(),
            Some(TrackWanted::Path("/m/a.flac".into()))
        );
        let two = TrackRef::Key(TrackKey {
            id: Some(1),
            mbid: Some("x".into()),
            ..TrackKey::default()
        });
        assert_eq!(
            track_ref(&two).map_err(|e| e.code()),
            Err(codes::INVALID_ARGUMENT)
        );
        let none = TrackRef::Key(TrackKey::default());
        assert!(track_ref(&none).is_err());
        let relative = TrackRef::Key(TrackKey {
            path: Some("a.flac".into()),
            ..TrackKey::default()
        });
        assert!(track_ref(&relative).is_err());
    }

    #[test]
    fn similar_options_are_checked() {
        let f = similar_options(None).expect("defaults");
        assert!(f.exclude_same_recording);
        let bad = |o: SimilarOptions| similar_options(Some(o)).map_err(|e| e.code());
        for o in [
            SimilarOptions {
                min_duration_s: Some(-1.0),
                ..SimilarOptions::default()
            },
            SimilarOptions {
                max_duration_s: Some(f64::NAN),
                ..SimilarOptions::default()
            },
            SimilarOptions {
                min_duration_s: Some(10.0),
                max_duration_s: Some(5.0),
                ..SimilarOptions::default()
            },
            SimilarOptions {
                library_ids: Some(vec![]),
                ..SimilarOptions::default()
            },
            SimilarOptions {
                max_per_artist: Some(0),
                ..SimilarOptions::default()
            },
        ] {
            assert_eq!(bad(o.clone()), Err(codes::INVALID_ARGUMENT), "{o:?}");
        }
        let f = similar_options(Some(SimilarOptions {
            min_duration_s: Some(1.5),
            max_duration_s: Some(1e300),
            ..SimilarOptions::default()
        }))
        .expect("valid");
        assert_eq!((f.min_ms, f.max_ms), (1500, i64::MAX));
    }

    #[test]
    fn mixes_need_seeds_and_at_most_twenty_tracks() {
        use coral_proto::SeedGroup;
        assert!(mix_seeds(&MixSeeds::Tracks(vec![])).is_err());
        let many = MixSeeds::Tracks((0..21).map(TrackRef::Id).collect());
        assert_eq!(
            mix_seeds(&many).map_err(|e| e.code()).err(),
            Some(codes::INVALID_ARGUMENT)
        );
        let twenty = MixSeeds::Tracks((0..20).map(TrackRef::Id).collect());
        assert_eq!(mix_seeds(&twenty).map(|s| s.tracks.len()).ok(), Some(20));
        let album = MixSeeds::Group(SeedGroup {
            album: Some(" Nuit Blanche! ".into()),
            ..SeedGroup::default()
        });
        assert_eq!(
            mix_seeds(&album).ok().and_then(|s| s.album),
            Some("nuit blanche".into())
        );
        let blank = MixSeeds::Group(SeedGroup {
            artist: Some("--".into()),
            ..SeedGroup::default()
        });
        assert!(mix_seeds(&blank).is_err());
        assert_eq!(
            (path_count(None), path_count(Some(1)), path_count(Some(900))),
            (25, 2, 200)
        );
        assert_eq!((mix_count(None), mix_count(Some(0))), (25, 1));
    }

    #[test]
    fn a_lookup_needs_a_usable_key() {
        assert!(lookup_query(&TrackLookup::default()).is_err());
        let title_only = TrackLookup {
            title: Some("x".into()),
            ..TrackLookup::default()
        };
        assert!(lookup_query(&title_only).is_err());
        let q = lookup_query(&TrackLookup {
            artist: Some(" Zoë ".into()),
            title: Some("Café-Noir".into()),
            ..TrackLookup::default()
        })
        .expect("artist + title");
        assert_eq!(q.artist_title, Some(("zoe".into(), "cafe noir".into())));
        assert_eq!(scan_mode(Some(true)), ScanMode::Full);
        assert_eq!(scan_mode(None), ScanMode::Incremental);
    }

    #[test]
    fn search_needs_a_word() {
        let s = search("Zoë", None, Some(40)).expect("a word");
        assert_eq!(s.tsquery, "zoe:*");
        assert_eq!((s.limit, s.offset), (20, 40));
        let e = search(" -- ", None, None).expect_err("no word");
        assert_eq!(e.code(), codes::INVALID_ARGUMENT);
    }
}
