//! The probe on files as real encoders and taggers write them: multi-valued tags of every
//! flavour (mutagen writes them the way MusicBrainz Picard does), MusicBrainz ids and ISRC,
//! and every format a music server indexes, including those only FFmpeg reads.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;
use coral_tests::fixtures::encode_into_place_with;
use coral_tests::tagger::{self, Flavour};
use corald::scan::phase_2_probe::{AudioFormat, ProbeError, ProbedTrack, probe_file};
use tempfile::TempDir;

const RECORDING: &str = "7f3a2b1c-0d4e-4f5a-8b6c-1d2e3f4a5b6c";
const RELEASE_TRACK: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const RELEASE: &str = "11111111-2222-4333-8444-555555555555";
const ARTIST_A: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const ARTIST_B: &str = "bbbbbbbb-0000-4000-8000-000000000002";

/// `seconds` of a 440 Hz tone encoded into `dir/name` with `codec` arguments.
fn encode(dir: &Path, name: &str, seconds: f64, codec: &[&str]) -> Result<PathBuf> {
    let src = format!("sine=frequency=440:duration={seconds}:sample_rate=44100");
    let args = ["-f", "lavfi", "-i", src.as_str(), "-ac", "2"];
    let input: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    encode_into_place_with(dir, name, &input, codec)
}

fn probe_ok(path: &Path) -> ProbedTrack {
    match probe_file(path) {
        Ok(t) => t,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

/// Picard's tags for a track by two artists.
fn picard_tags() -> Vec<(&'static str, &'static [&'static str])> {
    vec![
        ("title", &["Duet"]),
        ("artist", &["Alpha feat. Beta"]),
        ("artists", &["Alpha", "Beta"]),
        ("album", &["Together"]),
        ("albumartist", &["Alpha"]),
        ("genre", &["Jazz", "Soul"]),
        ("composer", &["Gamma", "Delta"]),
        ("tracknumber", &["3"]),
        ("date", &["2021-04-01"]),
        ("musicbrainz_trackid", &[RECORDING]),
        ("musicbrainz_releasetrackid", &[RELEASE_TRACK]),
        ("musicbrainz_albumid", &[RELEASE]),
        ("musicbrainz_artistid", &[ARTIST_A, ARTIST_B]),
        ("isrc", &["USRC17607839"]),
    ]
}

fn assert_picard(t: &ProbedTrack, what: &str) {
    let g = &t.tags;
    assert_eq!(g.title.as_deref(), Some("Duet"), "{what}");
    assert_eq!(g.artist.as_deref(), Some("Alpha feat. Beta"), "{what}");
    assert_eq!(g.artists, ["Alpha", "Beta"], "{what}");
    assert_eq!(g.album.as_deref(), Some("Together"), "{what}");
    assert_eq!(g.album_artists, ["Alpha"], "{what}");
    assert_eq!(g.genres, ["Jazz", "Soul"], "{what}");
    assert_eq!(g.genre.as_deref(), Some("Jazz; Soul"), "{what}");
    assert_eq!(g.composers, ["Gamma", "Delta"], "{what}");
    assert_eq!(g.track_number, Some(3), "{what}");
    assert_eq!(g.year, Some(2021), "{what}");
    assert_eq!(
        g.musicbrainz_recording_id.as_deref(),
        Some(RECORDING),
        "{what}"
    );
    assert_eq!(
        g.musicbrainz_track_id.as_deref(),
        Some(RELEASE_TRACK),
        "{what}"
    );
    assert_eq!(g.musicbrainz_release_id.as_deref(), Some(RELEASE), "{what}");
    assert_eq!(g.musicbrainz_artist_ids, [ARTIST_A, ARTIST_B], "{what}");
    assert_eq!(g.isrc.as_deref(), Some("USRC17607839"), "{what}");
}

#[test]
fn picard_style_multi_valued_tags_are_lists_in_every_flavour() -> Result<()> {
    let dir = TempDir::new()?;
    let cases: [(&str, &[&str], Flavour); 5] = [
        (
            "v24.mp3",
            &["-c:a", "libmp3lame", "-b:a", "128k"],
            Flavour::Id3v24,
        ),
        ("vorbis.flac", &["-c:a", "flac"], Flavour::Vorbis),
        (
            "vorbis.opus",
            &["-c:a", "libopus", "-f", "ogg"],
            Flavour::Vorbis,
        ),
        ("atoms.m4a", &["-c:a", "aac", "-b:a", "128k"], Flavour::Mp4),
        ("ape.wv", &["-c:a", "wavpack"], Flavour::Ape),
    ];
    for (name, codec, flavour) in cases {
        let path = encode(dir.path(), name, 2.0, codec)?;
        tagger::tag(&path, flavour, &picard_tags())?;
        assert_picard(&probe_ok(&path), name);
    }
    Ok(())
}

#[test]
fn id3v23_keeps_slashes_in_names_and_splits_the_artists_list() -> Result<()> {
    let dir = TempDir::new()?;
    let path = encode(dir.path(), "v23.mp3", 2.0, &["-c:a", "libmp3lame"])?;
    tagger::tag(
        &path,
        Flavour::Id3v23,
        &[
            ("title", &["Back in Black"]),
            ("artist", &["AC/DC"]),
            ("artists", &["AC/DC"]),
            ("genre", &["Hard Rock"]),
        ],
    )?;
    let t = probe_ok(&path);
    assert_eq!(t.tags.artist.as_deref(), Some("AC/DC"));
    // ID3v2.3's ARTISTS is a "/"-joined list: a real name with a slash cannot be told apart.
    assert_eq!(t.tags.artists, ["AC", "DC"]);

    tagger::tag(
        &path,
        Flavour::Id3v23,
        &[
            ("artist", &["Alpha feat. Beta"]),
            ("artists", &["Alpha", "Beta"]),
        ],
    )?;
    let t = probe_ok(&path);
    assert_eq!(t.tags.artist.as_deref(), Some("Alpha feat. Beta"));
    assert_eq!(t.tags.artists, ["Alpha", "Beta"]);
    Ok(())
}

#[test]
fn repeated_and_nul_separated_values_without_an_artists_field_become_the_list() -> Result<()> {
    let dir = TempDir::new()?;
    let flac = encode(dir.path(), "two.flac", 2.0, &["-c:a", "flac"])?;
    tagger::tag(
        &flac,
        Flavour::Vorbis,
        &[("artist", &["Alpha", "Beta", "Alpha"])],
    )?;
    let t = probe_ok(&flac);
    assert_eq!(t.tags.artists, ["Alpha", "Beta"]);
    assert_eq!(t.tags.artist.as_deref(), Some("Alpha; Beta"));

    let mp3 = encode(dir.path(), "two.mp3", 2.0, &["-c:a", "libmp3lame"])?;
    tagger::tag(&mp3, Flavour::Id3v24, &[("artist", &["Alpha", "Beta"])])?;
    let t = probe_ok(&mp3);
    assert_eq!(t.tags.artists, ["Alpha", "Beta"]);
    Ok(())
}

#[test]
fn formats_only_ffmpeg_reads_are_indexed_with_duration_and_tags() -> Result<()> {
    let dir = TempDir::new()?;
    let cases: [(&str, &[&str], AudioFormat, &str); 7] = [
        (
            "a.wma",
            &["-c:a", "wmav2", "-b:a", "128k"],
            AudioFormat::Wma,
            "wmav2",
        ),
        ("a.tta", &["-c:a", "tta"], AudioFormat::TrueAudio, "tta"),
        (
            "a.ac3",
            &["-c:a", "ac3", "-b:a", "192k"],
            AudioFormat::Ac3,
            "ac3",
        ),
        ("a.mka", &["-c:a", "flac"], AudioFormat::Matroska, "flac"),
        (
            "a.webm",
            &["-c:a", "libopus"],
            AudioFormat::Matroska,
            "opus",
        ),
        (
            "a.oga",
            &["-c:a", "flac", "-f", "ogg"],
            AudioFormat::OggFlac,
            "flac",
        ),
        (
            "rf64.wav",
            &["-c:a", "pcm_s16le", "-rf64", "always"],
            AudioFormat::Wav,
            "pcm_s16le",
        ),
    ];
    for (name, codec, format, want_codec) in cases {
        let path = encode(dir.path(), name, 5.0, codec)?;
        let t = probe_ok(&path);
        assert_eq!(t.format, format, "{name}");
        assert_eq!(t.audio.codec.as_deref(), Some(want_codec), "{name}");
        let secs = t.audio.duration_ms as f64 / 1000.0;
        assert!((secs - 5.0).abs() < 0.1, "{name}: {secs} s");
        assert!(
            t.audio.sample_rate.is_some() && t.audio.channels == Some(2),
            "{name}: {t:?}"
        );
        // The title ffmpeg wrote is read back through FFmpeg's reader too (raw AC-3 has no
        // tags).
        if format != AudioFormat::Ac3 {
            assert_eq!(t.tags.title.as_deref(), Some(name), "{name}");
        }
    }

    let wma = dir.path().join("a.wma");
    tagger::tag(&wma, Flavour::Asf, &picard_tags())?;
    let t = probe_ok(&wma);
    assert_eq!(t.tags.title.as_deref(), Some("Duet"));
    assert_eq!(t.tags.artist.as_deref(), Some("Alpha feat. Beta"), "{t:?}");
    // FFmpeg reports the first value of a repeated ASF attribute only.
    assert_eq!(t.tags.artists, ["Alpha"], "{t:?}");
    assert_eq!(t.tags.album.as_deref(), Some("Together"));
    assert_eq!(t.tags.musicbrainz_release_id.as_deref(), Some(RELEASE));
    Ok(())
}

#[test]
fn a_wav_written_to_a_pipe_is_read_with_ffmpeg() -> Result<()> {
    let dir = TempDir::new()?;
    let src = "sine=frequency=440:duration=3:sample_rate=44100";
    let out = std::process::Command::new("ffmpeg")
        .args([
            "-nostdin", "-v", "error", "-f", "lavfi", "-i", src, "-f", "wav", "pipe:1",
        ])
        .output()?;
    assert!(out.status.success());
    let path = dir.path().join("piped.wav");
    fs::write(&path, &out.stdout)?;
    let t = probe_ok(&path);
    assert_eq!(t.format, AudioFormat::Wav);
    let secs = t.audio.duration_ms as f64 / 1000.0;
    assert!((secs - 3.0).abs() < 0.1, "{secs}");
    Ok(())
}

#[test]
fn tracker_modules_and_midi_are_counted_as_out_of_scope() -> Result<()> {
    let dir = TempDir::new()?;
    for name in ["song.xm", "song.mod", "song.mid"] {
        let path = dir.path().join(name);
        fs::write(&path, b"Extended Module: not really")?;
        match probe_file(&path) {
            Err(e @ ProbeError::Unsupported { .. }) => {
                assert!(e.to_string().contains("out of scope"), "{name}: {e}")
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn missing_ffmpeg_is_named_in_the_reason() -> Result<()> {
    let dir = TempDir::new()?;
    let path = encode(dir.path(), "a.tta", 2.0, &["-c:a", "tta"])?;
    let out = std::process::Command::new(coral_tests::daemon::corald_bin())
        .arg("--probe")
        .arg(&path)
        .env("CORAL_FFPROBE", "/nonexistent/ffprobe")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("needs FFmpeg, which is not installed"),
        "{text}"
    );
    Ok(())
}

#[test]
fn adts_aac_and_headerless_vbr_mpeg_durations_are_within_one_percent() -> Result<()> {
    let dir = TempDir::new()?;
    let noise = |rate: u32| format!("anoisesrc=duration=60:sample_rate={rate}:amplitude=0.3");
    let cases: [(&str, String, &[&str]); 3] = [
        (
            "vbr.aac",
            noise(44_100),
            &["-c:a", "aac", "-q:a", "1", "-f", "adts"],
        ),
        (
            "cbr.aac",
            noise(44_100),
            &["-c:a", "aac", "-b:a", "128k", "-f", "adts"],
        ),
        // MPEG-2.5 (8 kHz), VBR, no Xing header: only the frames tell the length.
        (
            "mpeg25.mp3",
            noise(8_000),
            &["-c:a", "libmp3lame", "-q:a", "5", "-write_xing", "0"],
        ),
    ];
    for (name, src, codec) in cases {
        let args = ["-f", "lavfi", "-i", src.as_str()];
        let input: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let path = encode_into_place_with(dir.path(), name, &input, codec)?;
        let secs = probe_ok(&path).audio.duration_ms as f64 / 1000.0;
        assert!((secs - 60.0).abs() < 0.6, "{name}: {secs} s");
    }
    Ok(())
}

#[test]
fn a_broken_rating_or_year_frame_loses_only_that_frame() -> Result<()> {
    use coral_tests::hostile_corpus::{id3_frame, id3_tag, id3_text, strip_id3};
    let dir = TempDir::new()?;
    let clean = encode(dir.path(), "clean.mp3", 3.0, &["-c:a", "libmp3lame"])?;
    let audio = fs::read(&clean)?;
    let frames = [
        id3_frame(b"TIT2", &id3_text("Broken Rating"), None),
        // POPM: the e-mail's terminator, the rating and the counter are missing.
        id3_frame(b"POPM", b"no-terminator", None),
        // TYER: an encoding byte and no text.
        id3_frame(b"TYER", &[3u8], None),
        id3_frame(b"TPE1", &id3_text("Still Read"), None),
    ]
    .concat();
    let path = dir.path().join("broken.mp3");
    fs::write(
        &path,
        [id3_tag(&frames, None), strip_id3(&audio).to_vec()].concat(),
    )?;
    let t = probe_ok(&path);
    assert_eq!(t.tags.title.as_deref(), Some("Broken Rating"));
    assert_eq!(t.tags.artists, ["Still Read"]);
    assert!(
        (t.audio.duration_ms as f64 / 1000.0 - 3.0).abs() < 0.1,
        "{t:?}"
    );
    Ok(())
}
