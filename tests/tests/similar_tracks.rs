//! `track.similar` through a real corald, its socket and PostgreSQL with pgvector, on generated
//! music (`coral_tests::music`) and transcodes of it made by ffmpeg, tagged by mutagen: other
//! files of the same recording are left out (by MusicBrainz id, and by artist + title +
//! duration), scores are centred (they spread below zero), the duration, library and artist
//! filters hold on both candidate searches (exact scan and HNSW index), tracks are named by id,
//! path or recording id, the model's mean vector follows every write, and `coralctl similar
//! --m3u` prints a playlist a strict parser accepts.
//!
//! Needs corald built with `--features corald/embed`; without it the tests stop early.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use coral_proto::{
    CoralApiClient, ScanPhase, SimilarOptions, SimilarTrack, TrackKey, TrackRef, codes,
};
use coral_tests::daemon::{Daemon, add_and_scan, traversable_tempdir};
use coral_tests::fixtures;
use coral_tests::music::{self, MusicKind};
use coral_tests::tagger::{self, Flavour};
use jsonrpsee::core::client::Error as ClientError;
use pgvector::Vector;

const MBID: &str = "6f1b3c2e-1d5a-4c3b-9a51-0c6e2f0d7a11";

/// One file to make: where, what music, which tags; `transcode_of` makes it from another
/// file of the list with ffmpeg instead of from the synthesiser.
struct Spec {
    rel: &'static str,
    kind: MusicKind,
    variant: u32,
    seconds: f64,
    artist: &'static str,
    title: &'static str,
    mbid: Option<&'static str>,
    transcode_of: Option<&'static str>,
}

#[allow(clippy::too_many_arguments)]
fn spec(
    rel: &'static str,
    kind: MusicKind,
    variant: u32,
    seconds: f64,
    artist: &'static str,
    title: &'static str,
    mbid: Option<&'static str>,
    transcode_of: Option<&'static str>,
) -> Spec {
    Spec {
        rel,
        kind,
        variant,
        seconds,
        artist,
        title,
        mbid,
        transcode_of,
    }
}

fn flavour(rel: &str) -> Flavour {
    if rel.ends_with(".mp3") {
        Flavour::Id3v24
    } else {
        Flavour::Vorbis
    }
}

/// Make and tag the files of `specs` under `root`.
fn make(root: &Path, specs: &[Spec]) -> Result<()> {
    for s in specs {
        let path = match s.transcode_of {
            None => music::make_music(root, s.rel, s.kind, s.variant, s.seconds)?,
            Some(src) => {
                let src = root.join(src);
                fixtures::encode_into_place(root, s.rel, &[OsStr::new("-i"), src.as_os_str()])?
            }
        };
        let mut tags: Vec<(&str, &[&str])> = vec![
            ("artist", std::slice::from_ref(&s.artist)),
            ("title", std::slice::from_ref(&s.title)),
        ];
        if let Some(m) = &s.mbid {
            tags.push(("musicbrainz_trackid", std::slice::from_ref(m)));
        }
        tagger::tag(&path, flavour(s.rel), &tags)?;
    }
    Ok(())
}

/// A daemon that embeds tracks from 10 s on, with extra environment (test hooks).
async fn daemon(env: &[(&str, &str)]) -> Result<(Daemon, tempfile::TempDir)> {
    let dir = traversable_tempdir()?;
    let config = dir.path().join("corald.toml");
    std::fs::write(&config, "[embed]\nmin_duration_s = 10\n")?;
    let d = Daemon::start_with_env(&["--config", &config.to_string_lossy()], env).await?;
    Ok((d, dir))
}

/// False (and the test ends) when corald was built without embeddings.
async fn embeddings_on(d: &Daemon) -> Result<bool> {
    let s = d.client().await?.daemon_status().await?;
    if !s.embedding.enabled {
        eprintln!(
            "corald runs without embeddings ({:?}): stopping",
            s.warnings
        );
    }
    Ok(s.embedding.enabled)
}

async fn scan_all(d: &Daemon, root: &Path, files: u64) -> Result<i64> {
    let c = d.client().await?;
    let (id, p) = add_and_scan(&c, root).await?;
    ensure!(p.phase == ScanPhase::Completed, "{p:?}");
    ensure!(p.embeddings_done == files, "every file embedded: {p:?}");
    Ok(id)
}

/// Track id by path relative to the library it is in.
async fn ids(d: &Daemon) -> Result<HashMap<String, i64>> {
    let mut db = d.db().await?;
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, rel_path_text FROM tracks")
        .fetch_all(&mut db)
        .await?;
    Ok(rows.into_iter().map(|(id, rel)| (rel, id)).collect())
}

fn by_path(p: &Path) -> TrackRef {
    TrackRef::Key(TrackKey {
        path: Some(p.to_string_lossy().into_owned()),
        ..TrackKey::default()
    })
}

fn rels(list: &[SimilarTrack]) -> Vec<&str> {
    list.iter()
        .map(|s| s.track.relative_path.as_str())
        .collect()
}

fn code(r: Result<Vec<SimilarTrack>, ClientError>) -> Result<i32> {
    match r {
        Err(ClientError::Call(e)) => Ok(e.code()),
        other => bail!("expected a JSON-RPC error, got {other:?}"),
    }
}

fn keep_all() -> Option<SimilarOptions> {
    Some(SimilarOptions {
        exclude_same_recording: Some(false),
        ..SimilarOptions::default()
    })
}

/// Exact scan (a small collection): the same recording in other encodings, by artist + title
/// + duration and by recording id; centred scores; duration and artist filters; the ways of
/// naming a track; errors; the M3U8 playlist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_files_of_the_same_recording_are_not_neighbours() -> Result<()> {
    use MusicKind::*;
    let lib = traversable_tempdir()?;
    let specs = [
        spec(
            "d0.flac",
            Drums,
            0,
            22.0,
            "Drum Crew",
            "Kick Start",
            None,
            None,
        ),
        // The same recording: an MP3 transcode with the same artist and title.
        spec(
            "d0.mp3",
            Drums,
            0,
            22.0,
            "Drum Crew",
            "Kick Start",
            None,
            Some("d0.flac"),
        ),
        spec(
            "d1.flac",
            Drums,
            1,
            26.0,
            "Drum Crew",
            "Backbeat",
            None,
            None,
        ),
        spec(
            "d2.ogg",
            Drums,
            2,
            30.0,
            "Other Drums",
            "Rimshot",
            None,
            None,
        ),
        spec(
            "c0.flac",
            Chords,
            0,
            24.0,
            "Pad Choir",
            "Sunrise",
            Some(MBID),
            None,
        ),
        // The same recording by MusicBrainz id, titled differently.
        spec(
            "c0 remaster.mp3",
            Chords,
            0,
            24.0,
            "Pad Choir",
            "Sunrise (2024)",
            Some(MBID),
            Some("c0.flac"),
        ),
        spec("c1.flac", Chords, 1, 28.0, "Pad Choir", "Dusk", None, None),
        spec(
            "s0.flac",
            DistortedSaw,
            0,
            23.0,
            "Fuzz",
            "Grind",
            None,
            None,
        ),
        spec("s1.mp3", DistortedSaw, 1, 27.0, "Fuzz", "Buzz", None, None),
    ];
    make(lib.path(), &specs)?;
    let (d, _config) = daemon(&[]).await?;
    if !embeddings_on(&d).await? {
        return Ok(());
    }
    scan_all(&d, lib.path(), specs.len() as u64).await?;
    let c = d.client().await?;
    let id = ids(&d).await?;
    let d0 = lib.path().join("d0.flac");

    // By path, the default: the MP3 of the same recording is not a neighbour.
    let near = c.track_similar(by_path(&d0), Some(20), None).await?;
    ensure!(
        near.len() == 6,
        "every other recording, once: {:?}",
        rels(&near)
    );
    ensure!(!rels(&near).contains(&"d0.mp3"), "{:?}", rels(&near));
    ensure!(
        !rels(&near).contains(&"d0.flac"),
        "not itself: {:?}",
        rels(&near)
    );
    // Of the two files of the Sunrise recording, only the closer is listed.
    let sunrise = rels(&near).iter().filter(|r| r.starts_with("c0")).count();
    ensure!(sunrise == 1, "one file per recording: {:?}", rels(&near));

    // Kept when asked: then it is the nearest by far.
    let all = c
        .track_similar(TrackRef::Id(id["d0.flac"]), Some(20), keep_all())
        .await?;
    ensure!(all.len() == 8, "{:?}", rels(&all));
    ensure!(all[0].track.relative_path == "d0.mp3", "{:?}", rels(&all));
    ensure!(
        all[0].score > 0.9,
        "a transcode is the same sound: {}",
        all[0].score
    );
    // Centred scores: best first, within [-1, 1], and the mean's removal leaves some below
    // zero (the centred vectors sum to zero, so another track's score is negative).
    for w in all.windows(2) {
        ensure!(w[0].score >= w[1].score, "best first: {:?}", rels(&all));
    }
    ensure!(all.iter().all(|s| (-1.0..=1.0).contains(&s.score)));
    let lowest = all.last().map(|s| s.score).unwrap_or(1.0);
    ensure!(lowest < 0.0, "scores spread below zero, lowest {lowest}");
    // The nearest other recording is drums too.
    ensure!(
        near[0].track.relative_path.starts_with('d'),
        "nearest to drums: {:?}",
        rels(&near)
    );

    // By recording id: the file chosen is one of the two, and the other is left out.
    let by_mbid = TrackRef::Key(TrackKey {
        mbid: Some(MBID.to_uppercase()),
        ..TrackKey::default()
    });
    let near = c.track_similar(by_mbid.clone(), Some(20), None).await?;
    ensure!(
        !rels(&near).iter().any(|r| r.starts_with("c0")),
        "{:?}",
        rels(&near)
    );
    ensure!(near.len() == 6, "{:?}", rels(&near));
    let kept = c.track_similar(by_mbid, Some(20), keep_all()).await?;
    ensure!(
        kept[0].track.relative_path.starts_with("c0"),
        "{:?}",
        rels(&kept)
    );

    // Duration bounds and one track per artist.
    let opts = SimilarOptions {
        min_duration_s: Some(25.0),
        max_duration_s: Some(29.0),
        ..SimilarOptions::default()
    };
    let near = c
        .track_similar(TrackRef::Id(id["d0.flac"]), Some(20), Some(opts))
        .await?;
    ensure!(
        near.iter()
            .all(|s| (25.0..=29.0).contains(&s.track.duration_seconds)),
        "{:?}",
        rels(&near)
    );
    ensure!(near.len() == 3, "d1, c1, s1: {:?}", rels(&near));
    let opts = SimilarOptions {
        max_per_artist: Some(1),
        ..SimilarOptions::default()
    };
    let near = c
        .track_similar(TrackRef::Id(id["d1.flac"]), Some(20), Some(opts))
        .await?;
    let mut artists: Vec<_> = near
        .iter()
        .filter_map(|s| s.track.tags.artist.clone())
        .collect();
    artists.sort();
    ensure!(
        artists == ["Drum Crew", "Fuzz", "Other Drums", "Pad Choir"],
        "one per artist: {artists:?}"
    );

    // Errors name the problem.
    let missing = lib.path().join("nope.flac");
    ensure!(code(c.track_similar(by_path(&missing), None, None).await)? == codes::TRACK_NOT_FOUND);
    ensure!(
        code(c.track_similar(TrackRef::Id(999_999), None, None).await)? == codes::TRACK_NOT_FOUND
    );
    let two = TrackRef::Key(TrackKey {
        id: Some(id["d0.flac"]),
        mbid: Some(MBID.into()),
        ..TrackKey::default()
    });
    ensure!(code(c.track_similar(two, None, None).await)? == codes::INVALID_ARGUMENT);
    let bad = SimilarOptions {
        min_duration_s: Some(-3.0),
        ..SimilarOptions::default()
    };
    ensure!(
        code(c.track_similar(TrackRef::Id(1), None, Some(bad)).await)? == codes::INVALID_ARGUMENT
    );

    // coralctl: by path, as an M3U8 playlist.
    let out = d.ctl(&["similar", &d0.to_string_lossy(), "--limit", "3", "--m3u"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries = parse_m3u8(&String::from_utf8(out.stdout)?)?;
    ensure!(entries.len() == 3, "{entries:?}");
    for (seconds, path) in &entries {
        ensure!(path.is_file(), "{} is a file", path.display());
        ensure!((20..=32).contains(seconds), "{seconds}");
    }
    Ok(())
}

/// A strict M3U8 reader: `#EXTM3U` first, then for each entry an `#EXTINF:<seconds>,<name>`
/// line followed by an absolute path; nothing else, no empty lines, valid UTF-8.
fn parse_m3u8(text: &str) -> Result<Vec<(i64, PathBuf)>> {
    let mut lines = text.lines();
    ensure!(lines.next() == Some("#EXTM3U"), "header: {text:?}");
    let mut out = Vec::new();
    while let Some(info) = lines.next() {
        let rest = info
            .strip_prefix("#EXTINF:")
            .with_context(|| format!("expected #EXTINF, got {info:?}"))?;
        let (secs, name) = rest.split_once(',').context("no name after the duration")?;
        ensure!(!name.is_empty(), "empty name in {info:?}");
        let path = lines.next().context("an #EXTINF without a path")?;
        ensure!(path.starts_with('/'), "not absolute: {path:?}");
        out.push((secs.parse::<i64>()?, PathBuf::from(path)));
    }
    ensure!(text.ends_with('\n'), "ends with a line break");
    Ok(out)
}

/// The HNSW candidate search (forced by the test hook): library scoping keeps another
/// library's tracks out while enough remain, and the model's mean vector (sum and count) stays
/// equal to a fresh sum over the stored vectors when vectors are added and a library's are
/// deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_scoping_keeps_other_libraries_out() -> Result<()> {
    use MusicKind::*;
    let a = traversable_tempdir()?;
    let b = traversable_tempdir()?;
    make(
        a.path(),
        &[
            spec("a0.flac", Drums, 0, 21.0, "A", "a0", None, None),
            spec("a1.flac", Drums, 1, 23.0, "A", "a1", None, None),
            spec("a2.flac", Chords, 0, 25.0, "A", "a2", None, None),
            spec("a3.flac", DistortedSaw, 0, 27.0, "A", "a3", None, None),
        ],
    )?;
    make(
        b.path(),
        &[
            spec("b0.flac", Drums, 2, 22.0, "B", "b0", None, None),
            spec("b1.flac", Drums, 3, 24.0, "B", "b1", None, None),
        ],
    )?;
    let (d, _config) = daemon(&[("CORALD_TEST_SIMILAR_EXACT_MAX", "0")]).await?;
    if !embeddings_on(&d).await? {
        return Ok(());
    }
    let lib_a = scan_all(&d, a.path(), 4).await?;
    let lib_b = scan_all(&d, b.path(), 2).await?;
    centroid_matches(&d, 6).await?;
    let c = d.client().await?;
    let id = ids(&d).await?;
    let a0 = TrackRef::Id(id["a0.flac"]);

    let everywhere = c.track_similar(a0.clone(), Some(10), None).await?;
    ensure!(everywhere.len() == 5, "{:?}", rels(&everywhere));
    ensure!(
        everywhere.iter().any(|s| s.track.library_id == lib_b),
        "the other library's drums are near: {:?}",
        rels(&everywhere)
    );
    let scoped = |libs: Vec<i64>| SimilarOptions {
        library_ids: Some(libs),
        ..SimilarOptions::default()
    };
    let only_a = c
        .track_similar(a0.clone(), Some(10), Some(scoped(vec![lib_a])))
        .await?;
    ensure!(only_a.len() == 3, "{:?}", rels(&only_a));
    ensure!(
        only_a.iter().all(|s| s.track.library_id == lib_a),
        "{:?}",
        rels(&only_a)
    );
    let only_b = c
        .track_similar(a0, Some(10), Some(scoped(vec![lib_b])))
        .await?;
    ensure!(only_b.len() == 2, "{:?}", rels(&only_b));
    ensure!(
        only_b.iter().all(|s| s.track.library_id == lib_b),
        "{:?}",
        rels(&only_b)
    );

    // `coralctl similar --library PATH`.
    let out = d.ctl(&[
        "--json",
        "similar",
        &id["a0.flac"].to_string(),
        "--library",
        &b.path().canonicalize()?.to_string_lossy(),
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<SimilarTrack> = serde_json::from_slice(&out.stdout)?;
    ensure!(listed.len() == 2 && listed.iter().all(|s| s.track.library_id == lib_b));

    // Removing a library deletes its vectors (a cascade): the mean follows.
    c.library_remove(coral_proto::LibrarySelector::Id(lib_b))
        .await?;
    centroid_matches(&d, 4).await?;
    Ok(())
}

/// `model_centroids` holds `count` vectors and a sum within float rounding of the stored ones.
async fn centroid_matches(d: &Daemon, count: i64) -> Result<()> {
    let mut db = d.db().await?;
    let (sum, n): (Vector, i64) =
        sqlx::query_as("SELECT sum, count FROM model_centroids ORDER BY model_id DESC LIMIT 1")
            .fetch_one(&mut db)
            .await?;
    let (fresh, m): (Vector, i64) = sqlx::query_as(
        "SELECT sum(embedding), count(*) FROM track_embeddings
         WHERE model_id = (SELECT max(model_id) FROM model_centroids)",
    )
    .fetch_one(&mut db)
    .await?;
    ensure!(
        n == count && m == count,
        "count {n}, stored {m}, expected {count}"
    );
    let off = sum
        .as_slice()
        .iter()
        .zip(fresh.as_slice())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    ensure!(off < 1e-4, "the kept sum is off by {off}");
    Ok(())
}
