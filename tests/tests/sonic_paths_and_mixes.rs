//! `track.path` and `track.mix` through a real corald, its socket and PostgreSQL with
//! pgvector, on generated music (`coral_tests::music`) and an ffmpeg transcode, tagged by
//! mutagen.
//!
//! The path property tested, exactly: the first track is A, the last is B, no track appears
//! twice and no other file of A's or B's recording appears, and each track's centred cosine
//! to B (computed here from the stored vectors and a fresh mean, not taken from the answer)
//! is strictly greater than the previous track's; with `max_per_artist`, the cap holds with
//! the ends counted. Mixes: no seed, no other file of a seed's
//! recording, no repeats, at most `count` tracks, at most `max_per_artist` per artist; an
//! album as seeds. `--m3u` playlists of both parse strictly.
//!
//! Needs corald built with `--features corald/embed`; without it the tests stop early.

use std::collections::{HashMap, HashSet};

use anyhow::{Result, bail, ensure};
use coral_proto::{
    CoralApiClient, MixSeeds, SeedGroup, SimilarOptions, SimilarTrack, TrackRef, codes,
};
use coral_tests::daemon::{Daemon, traversable_tempdir};
use coral_tests::music::MusicKind::{self, *};
use coral_tests::similarity::{Spec, one_embedded_library, parse_m3u8, spec, track_ids};
use jsonrpsee::core::client::Error as ClientError;
use pgvector::Vector;

fn library() -> Vec<Spec> {
    let s = |rel, kind: MusicKind, v, artist, album| {
        spec(rel, kind, v, 20.0 + f64::from(v), artist, rel).album(album)
    };
    vec![
        s("d0.flac", Drums, 0, "Drum Crew", "Drums"),
        // The same recording (same artist and title, same length), as an MP3.
        spec("d0.mp3", Drums, 0, 20.0, "Drum Crew", "d0.flac")
            .album("Drums")
            .transcode_of("d0.flac"),
        s("d1.flac", Drums, 1, "Drum Crew", "Drums"),
        s("d2.flac", Drums, 2, "Beat Unit", "Drums"),
        s("d3.ogg", Drums, 3, "Beat Unit", "Drums"),
        s("c0.flac", Chords, 0, "Pad Choir", "Chords"),
        s("c1.flac", Chords, 1, "Pad Choir", "Chords"),
        s("c2.mp3", Chords, 2, "Keys", "Chords"),
        s("c3.flac", Chords, 3, "Keys", "Chords"),
        s("s0.flac", DistortedSaw, 0, "Fuzz", "Saw"),
        s("s1.flac", DistortedSaw, 1, "Fuzz", "Saw"),
        s("s2.mp3", DistortedSaw, 2, "Fuzz", "Saw"),
    ]
}

/// Every stored vector and the fresh mean of them all.
async fn vectors(d: &Daemon) -> Result<(HashMap<i64, Vec<f32>>, Vec<f64>)> {
    let mut db = d.db().await?;
    let rows: Vec<(i64, Vector)> =
        sqlx::query_as("SELECT track_id, embedding FROM track_embeddings")
            .fetch_all(&mut db)
            .await?;
    let n = rows.len() as f64;
    let dim = rows.first().map(|(_, v)| v.as_slice().len()).unwrap_or(0);
    let mut mean = vec![0f64; dim];
    for (_, v) in &rows {
        for (m, x) in mean.iter_mut().zip(v.as_slice()) {
            *m += f64::from(*x) / n;
        }
    }
    Ok((
        rows.into_iter().map(|(id, v)| (id, v.to_vec())).collect(),
        mean,
    ))
}

fn centred_cosine(a: &[f32], b: &[f32], mean: &[f64]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for ((x, y), m) in a.iter().zip(b).zip(mean) {
        let (x, y) = (f64::from(*x) - m, f64::from(*y) - m);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa * bb).sqrt()
}

fn rels(list: &[SimilarTrack]) -> Vec<&str> {
    list.iter()
        .map(|s| s.track.relative_path.as_str())
        .collect()
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Result<i32> {
    match r {
        Err(ClientError::Call(e)) => Ok(e.code()),
        other => bail!("expected a JSON-RPC error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_rise_towards_the_end_and_mixes_stay_varied() -> Result<()> {
    let lib = traversable_tempdir()?;
    let specs = library();
    let Some((d, _config)) = one_embedded_library(lib.path(), &specs).await? else {
        return Ok(());
    };
    let c = d.client().await?;
    let id = track_ids(&d).await?;
    let (vecs, mean) = vectors(&d).await?;
    let (a, b) = (id["d0.flac"], id["c0.flac"]);

    // Path: A first, B last, no repeats, no other file of A's recording, strictly closer to B.
    let path = c
        .track_path(TrackRef::Id(a), TrackRef::Id(b), Some(8), None)
        .await?;
    let names = rels(&path);
    ensure!((3..=8).contains(&path.len()), "{names:?}");
    ensure!(path.first().map(|s| s.track.id) == Some(a), "{names:?}");
    ensure!(path.last().map(|s| s.track.id) == Some(b), "{names:?}");
    let distinct: HashSet<i64> = path.iter().map(|s| s.track.id).collect();
    ensure!(distinct.len() == path.len(), "no repeats: {names:?}");
    ensure!(!names.contains(&"d0.mp3"), "{names:?}");
    let to_b: Vec<f64> = path
        .iter()
        .map(|s| centred_cosine(&vecs[&s.track.id], &vecs[&b], &mean))
        .collect();
    for (i, w) in to_b.windows(2).enumerate() {
        ensure!(
            w[1] > w[0],
            "step {i}: {:.4} → {:.4} in {names:?}",
            w[0],
            w[1]
        );
    }
    for (s, mine) in path.iter().zip(&to_b) {
        ensure!((s.score - mine).abs() < 1e-3, "score {} vs {mine}", s.score);
    }
    eprintln!("path: {names:?}, centred cosine to B {to_b:.3?}");
    // One per artist, the ends counted: nothing else by Drum Crew or Pad Choir in between.
    let capped = SimilarOptions {
        max_per_artist: Some(1),
        ..SimilarOptions::default()
    };
    let path = c
        .track_path(TrackRef::Id(a), TrackRef::Id(b), Some(8), Some(capped))
        .await?;
    let mut artists: Vec<_> = path
        .iter()
        .filter_map(|s| s.track.tags.artist.clone())
        .collect();
    let n = artists.len();
    artists.sort();
    artists.dedup();
    ensure!(artists.len() == n && n == path.len(), "{:?}", rels(&path));
    ensure!(
        path.last().map(|s| s.track.id) == Some(b),
        "{:?}",
        rels(&path)
    );
    let ends = c
        .track_path(TrackRef::Id(a), TrackRef::Id(b), Some(2), None)
        .await?;
    ensure!(rels(&ends) == ["d0.flac", "c0.flac"], "{:?}", rels(&ends));
    let same = c
        .track_path(TrackRef::Id(a), TrackRef::Id(a), None, None)
        .await;
    ensure!(code(same)? == codes::INVALID_ARGUMENT);

    // Mix: no seeds, no other file of a seed's recording, no repeats, `count` respected.
    let seeds = MixSeeds::Tracks(vec![TrackRef::Id(a), TrackRef::Id(id["d1.flac"])]);
    let mix = c.track_mix(seeds.clone(), Some(5), None).await?;
    let names = rels(&mix);
    ensure!(mix.len() == 5, "{names:?}");
    ensure!(
        !names
            .iter()
            .any(|n| ["d0.flac", "d0.mp3", "d1.flac"].contains(n)),
        "{names:?}"
    );
    let distinct: HashSet<i64> = mix.iter().map(|s| s.track.id).collect();
    ensure!(distinct.len() == mix.len(), "no repeats: {names:?}");
    ensure!(
        names[0].starts_with('d'),
        "drums nearest drum seeds: {names:?}"
    );
    // One per artist: Drum Crew has nothing left, so four artists, four tracks.
    let capped = SimilarOptions {
        max_per_artist: Some(1),
        ..SimilarOptions::default()
    };
    let mix = c.track_mix(seeds, Some(5), Some(capped)).await?;
    let mut artists: Vec<_> = mix
        .iter()
        .filter_map(|s| s.track.tags.artist.clone())
        .collect();
    artists.sort();
    ensure!(
        artists == ["Beat Unit", "Fuzz", "Keys", "Pad Choir"],
        "{artists:?} from {:?}",
        rels(&mix)
    );
    // An album as seeds: none of its tracks come back.
    let album = MixSeeds::Group(SeedGroup {
        album: Some("DRUMS".into()),
        ..SeedGroup::default()
    });
    let mix = c.track_mix(album, Some(3), None).await?;
    ensure!(mix.len() == 3, "{:?}", rels(&mix));
    ensure!(
        mix.iter()
            .all(|s| s.track.tags.album.as_deref() != Some("Drums")),
        "{:?}",
        rels(&mix)
    );
    // Errors.
    let many = MixSeeds::Tracks((0..21).map(TrackRef::Id).collect());
    ensure!(code(c.track_mix(many, None, None).await)? == codes::INVALID_ARGUMENT);
    let none = MixSeeds::Group(SeedGroup::default());
    ensure!(code(c.track_mix(none, None, None).await)? == codes::INVALID_ARGUMENT);
    let unknown = MixSeeds::Group(SeedGroup {
        album: Some("No Such Album".into()),
        ..SeedGroup::default()
    });
    ensure!(code(c.track_mix(unknown, None, None).await)? == codes::TRACK_NOT_FOUND);

    // coralctl, as playlists.
    let (pa, pb) = (lib.path().join("d0.flac"), lib.path().join("c0.flac"));
    let out = d.ctl(&[
        "path",
        &pa.to_string_lossy(),
        &pb.to_string_lossy(),
        "--count",
        "5",
        "--m3u",
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries = parse_m3u8(&String::from_utf8(out.stdout)?)?;
    let real = lib.path().canonicalize()?;
    ensure!(
        entries.first().map(|e| &e.1) == Some(&real.join("d0.flac")),
        "{entries:?}"
    );
    ensure!(
        entries.last().map(|e| &e.1) == Some(&real.join("c0.flac")),
        "{entries:?}"
    );
    let out = d.ctl(&["mix", &a.to_string(), "--count", "3", "--m3u"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries = parse_m3u8(&String::from_utf8(out.stdout)?)?;
    ensure!(
        entries.len() == 3 && entries.iter().all(|e| e.1.is_file()),
        "{entries:?}"
    );
    Ok(())
}
