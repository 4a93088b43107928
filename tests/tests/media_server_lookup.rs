//! `track.lookup` through a real corald and its socket, on files encoded by ffmpeg and tagged
//! by mutagen: a media server finds Coral's track by path (also through a symbolic link), by
//! MusicBrainz recording id, by ISRC, and by artist + title (+ duration, + album), best match
//! first with the rule that matched, each track once; empty or unusable queries are refused
//! with the problem named.

use std::path::Path;

use anyhow::{Result, bail, ensure};
use coral_proto::{CoralApiClient, LookupRule, ScanPhase, TrackLookup, TrackMatch, codes};
use coral_tests::daemon::{Daemon, add_and_scan, traversable_tempdir};
use coral_tests::fixtures::{self, FixtureTrack};
use coral_tests::tagger::{self, Flavour};
use jsonrpsee::core::client::{ClientT, Error as ClientError};
use jsonrpsee::rpc_params;
use serde_json::{Value, json};

const MBID: &str = "0d4f9a3e-8f5e-4b4e-9d43-3f0c2a7b5e21";

struct Made {
    rel: &'static str,
    format: &'static str,
    seconds: f64,
    artist: &'static str,
    title: &'static str,
    album: &'static str,
    mbid: Option<&'static str>,
    isrc: Option<&'static str>,
}

fn make(root: &Path, m: &Made) -> Result<()> {
    let mut t = FixtureTrack::simple(m.rel, m.format, m.title);
    t.duration_s = m.seconds;
    let path = fixtures::make_track(root, &t)?;
    let mut tags: Vec<(&str, &[&str])> = vec![
        ("artist", std::slice::from_ref(&m.artist)),
        ("title", std::slice::from_ref(&m.title)),
        ("album", std::slice::from_ref(&m.album)),
    ];
    if let Some(x) = &m.mbid {
        tags.push(("musicbrainz_trackid", std::slice::from_ref(x)));
    }
    if let Some(x) = &m.isrc {
        tags.push(("isrc", std::slice::from_ref(x)));
    }
    let flavour = if m.format == "mp3" {
        Flavour::Id3v24
    } else {
        Flavour::Vorbis
    };
    tagger::tag(&path, flavour, &tags)
}

fn found(list: &[TrackMatch]) -> Vec<(LookupRule, &str)> {
    list.iter()
        .map(|m| (m.rule, m.track.relative_path.as_str()))
        .collect()
}

fn q() -> TrackLookup {
    TrackLookup::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_media_server_finds_tracks_by_each_key() -> Result<()> {
    use LookupRule::*;
    let lib = traversable_tempdir()?;
    let root = lib.path();
    let files = [
        Made {
            rel: "zoe/cafe.flac",
            format: "flac",
            seconds: 4.0,
            artist: "Zoë",
            title: "Café Noir",
            album: "Nuit",
            mbid: Some(MBID),
            isrc: Some("GB-ABC-24-00001"),
        },
        Made {
            rel: "zoe/cafe.mp3",
            format: "mp3",
            seconds: 4.0,
            artist: "Zoë",
            title: "Café Noir",
            album: "Best Of",
            mbid: Some(MBID),
            isrc: None,
        },
        Made {
            rel: "zoe/cafe live.flac",
            format: "flac",
            seconds: 12.0,
            artist: "ZOE",
            title: "cafe noir",
            album: "Live",
            mbid: None,
            isrc: None,
        },
        Made {
            rel: "other/cafe.flac",
            format: "flac",
            seconds: 4.0,
            artist: "Someone Else",
            title: "Café Noir",
            album: "Nuit",
            mbid: None,
            isrc: None,
        },
    ];
    for m in &files {
        make(root, m)?;
    }
    let dir = traversable_tempdir()?;
    let config = dir.path().join("corald.toml");
    std::fs::write(&config, "[embed]\nenabled = false\n")?;
    let d = Daemon::start_with(&["--config", &config.to_string_lossy()]).await?;
    let c = d.client().await?;
    let (_, p) = add_and_scan(&c, root).await?;
    ensure!(
        p.phase == ScanPhase::Completed && p.counts.tracks_indexed == 4,
        "{p:?}"
    );
    let real = root.canonicalize()?;
    let abs = |rel: &str| real.join(rel).to_string_lossy().into_owned();

    // Path: the file itself, as given or through a symbolic link to the library.
    let r = c
        .track_lookup(
            TrackLookup {
                path: Some(abs("zoe/cafe.flac")),
                ..q()
            },
            None,
        )
        .await?;
    ensure!(found(&r) == [(Path, "zoe/cafe.flac")], "{:?}", found(&r));
    let link = dir.path().join("music");
    std::os::unix::fs::symlink(&real, &link)?;
    let via_link = link.join("zoe/cafe.mp3").to_string_lossy().into_owned();
    let r = c
        .track_lookup(
            TrackLookup {
                path: Some(via_link),
                ..q()
            },
            None,
        )
        .await?;
    ensure!(found(&r) == [(Path, "zoe/cafe.mp3")], "{:?}", found(&r));

    // Recording id, in any case: both files of the recording.
    let r = c
        .track_lookup(
            TrackLookup {
                mbid: Some(MBID.to_uppercase()),
                ..q()
            },
            None,
        )
        .await?;
    let mut got = found(&r);
    got.sort();
    ensure!(
        got == [(Mbid, "zoe/cafe.flac"), (Mbid, "zoe/cafe.mp3")],
        "{got:?}"
    );

    // ISRC, without hyphens and in lower case.
    let r = c
        .track_lookup(
            TrackLookup {
                isrc: Some("gbabc2400001".into()),
                ..q()
            },
            None,
        )
        .await?;
    ensure!(found(&r) == [(Isrc, "zoe/cafe.flac")], "{:?}", found(&r));

    // Artist + title + duration: folded text; the 12 s live take is too long, another
    // artist's song of the same title is not it; the album given comes first.
    let by_name = |duration_s: Option<f64>, album: Option<&str>| TrackLookup {
        artist: Some("ZOE".into()),
        title: Some("cafe-noir".into()),
        duration_s,
        album: album.map(str::to_owned),
        ..q()
    };
    let r = c
        .track_lookup(by_name(Some(4.4), Some("best of")), None)
        .await?;
    ensure!(
        found(&r)
            == [
                (ArtistTitleDuration, "zoe/cafe.mp3"),
                (ArtistTitleDuration, "zoe/cafe.flac")
            ],
        "{:?}",
        found(&r)
    );
    let r = c
        .track_lookup(by_name(Some(4.4), Some("Nuit")), None)
        .await?;
    ensure!(r.first().map(|m| m.track.relative_path.as_str()) == Some("zoe/cafe.flac"));
    let r = c.track_lookup(by_name(Some(11.0), None), None).await?;
    ensure!(
        found(&r) == [(ArtistTitleDuration, "zoe/cafe live.flac")],
        "{:?}",
        found(&r)
    );
    let r = c.track_lookup(by_name(None, None), None).await?;
    ensure!(
        r.len() == 3 && r.iter().all(|m| m.rule == ArtistTitle),
        "{:?}",
        found(&r)
    );

    // Several keys: strongest rule first, each track once; `limit` cuts the list.
    let all = TrackLookup {
        path: Some(abs("zoe/cafe.mp3")),
        mbid: Some(MBID.into()),
        ..by_name(Some(4.0), None)
    };
    let r = c.track_lookup(all.clone(), None).await?;
    ensure!(
        found(&r) == [(Path, "zoe/cafe.mp3"), (Mbid, "zoe/cafe.flac")],
        "{:?}",
        found(&r)
    );
    ensure!(c.track_lookup(all, Some(1)).await?.len() == 1);

    // Nothing known: an empty answer, not an error.
    let r = c
        .track_lookup(
            TrackLookup {
                isrc: Some("XX0000000000".into()),
                artist: Some("Nobody".into()),
                title: Some("Nothing".into()),
                ..q()
            },
            None,
        )
        .await?;
    ensure!(r.is_empty(), "{:?}", found(&r));

    // Unusable queries.
    for bad in [
        json!({}),
        json!({"title": "Café Noir"}),
        json!({"artist": "  ", "title": "x"}),
        json!({"path": "zoe/cafe.flac"}),
        json!({"isrc": "x", "duration_s": -1.0}),
    ] {
        let e = error_of(
            c.request::<Value, _>("track.lookup", rpc_params![bad.clone()])
                .await,
        )?;
        ensure!(e.0 == codes::INVALID_ARGUMENT, "{bad}: {e:?}");
    }
    let e = error_of(
        c.request::<Value, _>("track.lookup", rpc_params![json!({"name": "x"})])
            .await,
    )?;
    ensure!(e.0 == -32602 && e.1.contains("name"), "{e:?}");

    // coralctl.
    let out = d.ctl(&["--json", "lookup", "--mbid", MBID])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<TrackMatch> = serde_json::from_slice(&out.stdout)?;
    ensure!(listed.len() == 2, "{listed:?}");
    let out = d.ctl(&[
        "lookup",
        "--artist",
        "zoë",
        "--title",
        "CAFÉ NOIR",
        "--duration",
        "4",
    ])?;
    let text = String::from_utf8(out.stdout)?;
    ensure!(
        text.contains("artist_title_duration") && text.contains("cafe.mp3"),
        "{text}"
    );
    Ok(())
}

fn error_of(r: Result<Value, ClientError>) -> Result<(i32, String)> {
    match r {
        Err(ClientError::Call(e)) => Ok((
            e.code(),
            format!(
                "{} {}",
                e.message(),
                e.data().map(|d| d.get()).unwrap_or("")
            ),
        )),
        other => bail!("expected a JSON-RPC error, got {other:?}"),
    }
}
