//! Libraries as real users have them, through a real corald: a Picard-tagged collection
//! (multi-valued ID3v2.4 frames, MusicBrainz ids, ISRC) indexes completely and is found by
//! each artist; formats only FFmpeg reads are indexed; and a batch in which the database
//! refuses one row writes every other row and records that one file.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::Result;
use coral_proto::{CoralApiClient, ScanPhase};
use coral_tests::daemon::{Daemon, add_and_scan, traversable_tempdir};
use coral_tests::fixtures::encode_into_place_with;
use coral_tests::tagger::{self, Flavour};
use corald::db::tracks::TrackRow;
use corald::scan::phase_3_store;
use corald::track::{AudioFormat, AudioProperties, ProbedTrack};
use sqlx::Row;

fn encode(dir: &Path, name: &str, codec: &[&str]) -> Result<PathBuf> {
    let src = "sine=frequency=330:duration=2:sample_rate=44100";
    let args = ["-f", "lavfi", "-i", src, "-ac", "2"];
    let input: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    encode_into_place_with(dir, name, &input, codec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picard_tagged_library_indexes_completely_and_is_found_by_each_artist() -> Result<()> {
    let lib = traversable_tempdir()?;
    let mp3 = ["-c:a", "libmp3lame", "-b:a", "128k"];
    let albums = [
        (
            "Alpha & Beta/Duets/01 First.mp3",
            "First",
            ["Alpha", "Beta"],
        ),
        (
            "Alpha & Beta/Duets/02 Second.mp3",
            "Second",
            ["Alpha", "Beta"],
        ),
        ("Gamma/Solo/01 Third.mp3", "Third", ["Gamma", "Zoë Kéating"]),
    ];
    for (i, (rel, title, artists)) in albums.iter().enumerate() {
        let path = encode(lib.path(), rel, &mp3)?;
        let credit = artists.join(" & ");
        let isrc = format!("USRC1760783{i}");
        let recording = format!("00000000-0000-4000-8000-00000000000{i}");
        tagger::tag(
            &path,
            Flavour::Id3v24,
            &[
                ("title", &[title]),
                ("artist", &[credit.as_str()]),
                ("artists", artists),
                ("album", &["Duets"]),
                ("genre", &["Jazz", "Soul"]),
                ("musicbrainz_trackid", &[recording.as_str()]),
                (
                    "musicbrainz_artistid",
                    &["aaaaaaaa-0000-4000-8000-000000000001"],
                ),
                ("isrc", &[isrc.as_str()]),
            ],
        )?;
    }
    // Formats only FFmpeg reads sit in the same library.
    encode(lib.path(), "Other/wma.wma", &["-c:a", "wmav2"])?;
    encode(lib.path(), "Other/tta.tta", &["-c:a", "tta"])?;

    let d = Daemon::start().await?;
    let c = d.client().await?;
    let (_, p) = add_and_scan(&c, lib.path()).await?;
    assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
    assert_eq!(
        (p.counts.tracks_indexed, p.counts.tracks_failed),
        (5, 0),
        "{p:?}"
    );

    // Each artist finds the tracks it is one of several artists of (accents folded).
    for (query, artist) in [
        ("Alpha", "Alpha"),
        ("Beta", "Beta"),
        ("Gamma", "Gamma"),
        ("zoe keating", "Zoë Kéating"),
    ] {
        let hits = c.track_search(query.into(), None, None).await?;
        assert!(!hits.is_empty(), "{query}: no hit");
        assert!(
            hits.iter()
                .all(|t| t.tags.artists.iter().any(|a| a == artist)),
            "{query}: {hits:?}"
        );
    }
    let beta = c.track_search("Beta".into(), None, None).await?;
    assert_eq!(beta.len(), 2, "{beta:?}");
    let first = beta
        .iter()
        .find(|t| t.tags.title.as_deref() == Some("First"))
        .expect("First is found by its second artist");
    let got = c.track_get(first.id).await?;
    assert_eq!(got.tags.artists, ["Alpha", "Beta"]);
    assert_eq!(got.tags.artist.as_deref(), Some("Alpha & Beta"));
    assert_eq!(got.tags.genres, ["Jazz", "Soul"]);
    assert_eq!(got.tags.isrc.as_deref(), Some("USRC17607830"));
    assert_eq!(
        got.tags.musicbrainz_recording_id.as_deref(),
        Some("00000000-0000-4000-8000-000000000000")
    );
    assert_eq!(
        got.tags.musicbrainz_artist_ids,
        ["aaaaaaaa-0000-4000-8000-000000000001"]
    );

    let wma = c.track_search("wma".into(), None, None).await?;
    assert_eq!(wma.len(), 1, "{wma:?}");
    assert_eq!(wma[0].format, "wma");
    assert!((wma[0].duration_seconds - 2.0).abs() < 0.1, "{:?}", wma[0]);
    Ok(())
}

/// A track row as the probe would produce it, with `title` as given.
fn row(rel: &str, title: &str) -> TrackRow {
    TrackRow {
        rel_path: rel.as_bytes().to_vec(),
        rel_path_text: rel.to_owned(),
        size: 1000,
        mtime_ns: 1,
        probed: ProbedTrack {
            format: AudioFormat::Mp3,
            audio: AudioProperties {
                codec: Some("mp3".into()),
                duration_ms: 1000,
                ..Default::default()
            },
            tags: coral_proto::TrackTags {
                title: Some(title.to_owned()),
                ..Default::default()
            },
        },
        search_text: title.to_lowercase(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_one_refused_row_writes_all_the_others_and_records_that_one() -> Result<()> {
    let lib = traversable_tempdir()?;
    let d = Daemon::start().await?;
    let c = d.client().await?;
    let library = c.library_add(lib.path().to_string_lossy().into()).await?;
    let pool = d.pool(2).await?;

    // A NUL byte is what PostgreSQL refuses in text ("invalid byte sequence"); the probe cleans
    // tags, so this row is built by hand, as a reader bug would leave it.
    let rows = vec![
        row("a.mp3", "Fine A"),
        row("poisoned.mp3", "Bad\0Title"),
        row("b.mp3", "Fine B"),
    ];
    let request = uuid::Uuid::new_v4();
    let written = phase_3_store::write_batch(&pool, library.id, request, &rows, &[]).await?;
    assert_eq!((written.indexed, written.failed), (2, 1));

    let mut db = d.db().await?;
    let titles: Vec<String> =
        sqlx::query_scalar("SELECT title FROM tracks WHERE library_id = $1 ORDER BY rel_path_text")
            .bind(library.id)
            .fetch_all(&mut db)
            .await?;
    assert_eq!(titles, ["Fine A", "Fine B"]);
    let err = sqlx::query("SELECT stage, message FROM scan_errors WHERE rel_path_text = $1")
        .bind("poisoned.mp3")
        .fetch_one(&mut db)
        .await?;
    assert_eq!(err.get::<String, _>("stage"), "store");
    let message: String = err.get("message");
    assert!(
        message.contains("the database refused its data") && message.contains("0x00"),
        "{message}"
    );
    Ok(())
}
