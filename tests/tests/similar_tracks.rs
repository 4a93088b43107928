//! `track.similar` through a real corald, its socket and PostgreSQL with pgvector, on generated
//! music (`coral_tests::music`) and transcodes of it made by ffmpeg, tagged by mutagen: other
//! files of the same recording are left out (by MusicBrainz id, and by artist + title +
//! duration), scores are centred (they spread below zero), the duration, library and artist
//! filters hold on both candidate searches (exact scan and HNSW index), tracks are named by id,
//! path or recording id, the model's mean vector follows every write, and `coralctl similar
//! --m3u` prints a playlist a strict parser accepts.
//!
//! Needs corald built with `--features corald/embed`; without it the tests stop early.

use std::path::Path;

use anyhow::{Result, bail, ensure};
use coral_proto::{CoralApiClient, SimilarOptions, SimilarTrack, TrackKey, TrackRef, codes};
use coral_tests::daemon::{Daemon, traversable_tempdir};
use coral_tests::music::MusicKind;
use coral_tests::similarity::{
    daemon, embeddings_on, make, one_embedded_library, parse_m3u8, scan_all, spec, track_ids,
};
use jsonrpsee::core::client::Error as ClientError;
use pgvector::Vector;

const MBID: &str = "6f1b3c2e-1d5a-4c3b-9a51-0c6e2f0d7a11";

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
        spec("d0.flac", Drums, 0, 22.0, "Drum Crew", "Kick Start"),
        // The same recording: an MP3 transcode with the same artist and title.
        spec("d0.mp3", Drums, 0, 22.0, "Drum Crew", "Kick Start").transcode_of("d0.flac"),
        spec("d1.flac", Drums, 1, 26.0, "Drum Crew", "Backbeat"),
        spec("d2.ogg", Drums, 2, 30.0, "Other Drums", "Rimshot"),
        spec("c0.flac", Chords, 0, 24.0, "Pad Choir", "Sunrise").mbid(MBID),
        // The same recording by MusicBrainz id, titled differently.
        spec(
            "c0 remaster.mp3",
            Chords,
            0,
            24.0,
            "Pad Choir",
            "Sunrise (2024)",
        )
        .mbid(MBID)
        .transcode_of("c0.flac"),
        spec("c1.flac", Chords, 1, 28.0, "Pad Choir", "Dusk"),
        spec("s0.flac", DistortedSaw, 0, 23.0, "Fuzz", "Grind"),
        spec("s1.mp3", DistortedSaw, 1, 27.0, "Fuzz", "Buzz"),
    ];
    let Some((d, _config)) = one_embedded_library(lib.path(), &specs).await? else {
        return Ok(());
    };
    let c = d.client().await?;
    let id = track_ids(&d).await?;
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
            spec("a0.flac", Drums, 0, 21.0, "A", "a0"),
            spec("a1.flac", Drums, 1, 23.0, "A", "a1"),
            spec("a2.flac", Chords, 0, 25.0, "A", "a2"),
            spec("a3.flac", DistortedSaw, 0, 27.0, "A", "a3"),
        ],
    )?;
    make(
        b.path(),
        &[
            spec("b0.flac", Drums, 2, 22.0, "B", "b0"),
            spec("b1.flac", Drums, 3, 24.0, "B", "b1"),
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
    let id = track_ids(&d).await?;
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

/// An upgrade from a release that did not keep the mean: a database that already holds vectors
/// gets migration 0005, which fills the mean from them, and centred scores work at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_a_database_with_vectors_fills_the_mean() -> Result<()> {
    use MusicKind::*;
    let lib = traversable_tempdir()?;
    let specs = [
        spec("a0.flac", Drums, 0, 21.0, "A", "a0"),
        spec("a1.flac", Chords, 0, 23.0, "B", "a1"),
        spec("a2.flac", DistortedSaw, 0, 25.0, "C", "a2"),
    ];
    let Some((mut d, _config)) = one_embedded_library(lib.path(), &specs).await? else {
        return Ok(());
    };
    // Back to the schema of migration 0004, the vectors kept: what an older release left.
    {
        let mut db = d.db().await?;
        for statement in [
            "DROP TRIGGER track_embeddings_centroid_insert ON track_embeddings",
            "DROP TRIGGER track_embeddings_centroid_delete ON track_embeddings",
            "DROP TRIGGER track_embeddings_centroid_update ON track_embeddings",
            "DROP FUNCTION coral_centroid_inserted()",
            "DROP FUNCTION coral_centroid_deleted()",
            "DROP FUNCTION coral_centroid_updated()",
            "DROP FUNCTION coral_centroid_apply(INTEGER, BIGINT, vector, BIGINT)",
            "DROP TABLE model_centroids",
            "DROP INDEX tracks_recording_mbid_idx",
            "DROP INDEX tracks_isrc_idx",
            "DELETE FROM _sqlx_migrations WHERE version = 5",
        ] {
            sqlx::query(statement).execute(&mut db).await?;
        }
        let vectors: i64 = sqlx::query_scalar("SELECT count(*) FROM track_embeddings")
            .fetch_one(&mut db)
            .await?;
        ensure!(vectors == 3, "the vectors stay: {vectors}");
    }
    d.terminate()?;
    d.spawn().await?;
    centroid_matches(&d, 3).await?;
    let id = track_ids(&d).await?;
    let near = d
        .client()
        .await?
        .track_similar(TrackRef::Id(id["a0.flac"]), Some(5), None)
        .await?;
    ensure!(near.len() == 2, "{:?}", rels(&near));
    Ok(())
}
