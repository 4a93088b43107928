//! `probe_file` on real files encoded by ffmpeg: tags and properties of every format, content
//! over extension, damaged and truncated files, odd file names, and inputs built to break
//! parsers (no panic, always a result).

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use coral_tests::fixtures::{self, FixtureTrack};
use corald::scan::phase_2_probe::{AudioFormat, ProbeError, ProbedTrack, probe_file};
use tempfile::TempDir;

/// The every-format library, generated once for all tests of this binary.
fn library() -> &'static (TempDir, Vec<FixtureTrack>) {
    static LIB: OnceLock<(TempDir, Vec<FixtureTrack>)> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = TempDir::new().expect("temp dir");
        let tracks = fixtures::every_format_library(dir.path()).expect("generate fixtures");
        (dir, tracks)
    })
}

fn probe_ok(path: &Path) -> ProbedTrack {
    match probe_file(path) {
        Ok(t) => t,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

fn assert_matches_fixture(got: &ProbedTrack, want: &FixtureTrack) {
    let name = want.rel_path.display();
    assert_eq!(
        got.format.as_str(),
        want.expected_format(),
        "{name}: format"
    );
    assert_eq!(
        got.audio.codec.as_deref(),
        Some(want.expected_codec()),
        "{name}: codec"
    );
    assert_eq!(
        got.audio.sample_rate,
        Some(want.sample_rate() as i32),
        "{name}: rate"
    );
    assert_eq!(got.audio.channels, Some(2), "{name}: channels");
    assert_eq!(
        got.audio.bit_depth,
        want.bit_depth().map(|b| b as i32),
        "{name}: bit depth"
    );
    // Lossy encoders add a frame or two of padding (MP3 ~30 ms, AAC ~23 ms).
    let want_ms = (want.duration_s * 1000.0).round() as i64;
    assert!(
        (got.audio.duration_ms - want_ms).abs() <= 60,
        "{name}: duration {} ms, want {want_ms} ms",
        got.audio.duration_ms
    );
    let bitrate = got.audio.bitrate_kbps.unwrap_or(0);
    assert!(
        (16..=1500).contains(&bitrate),
        "{name}: bitrate {bitrate} kbit/s"
    );
    assert_eq!(
        got.tags.title.as_deref(),
        Some(want.title.as_str()),
        "{name}"
    );
    assert_eq!(
        got.tags.artist.as_deref(),
        Some(want.artist.as_str()),
        "{name}"
    );
    assert_eq!(
        got.tags.album.as_deref(),
        Some(want.album.as_str()),
        "{name}"
    );
    assert_eq!(
        got.tags.album_artist.as_deref(),
        want.album_artist.as_deref(),
        "{name}: album artist"
    );
    assert_eq!(
        got.tags.track_number,
        want.track_number.map(|n| n as i32),
        "{name}"
    );
    assert_eq!(
        got.tags.disc_number,
        want.disc_number.map(|n| n as i32),
        "{name}"
    );
    assert_eq!(got.tags.year, want.year, "{name}: year");
    assert_eq!(
        got.tags.genre.as_deref(),
        want.genre.as_deref(),
        "{name}: genre"
    );
}

#[test]
fn every_format_reports_exact_tags_and_properties() {
    let (dir, tracks) = library();
    assert_eq!(tracks.len(), fixtures::FORMATS.len());
    for t in tracks {
        let got = probe_ok(&dir.path().join(&t.rel_path));
        assert_matches_fixture(&got, t);
    }
}

#[test]
fn lossless_bitrates_are_plausible_for_pcm() {
    let (dir, tracks) = library();
    for t in tracks
        .iter()
        .filter(|t| t.format == "wav" || t.format == "aiff")
    {
        let got = probe_ok(&dir.path().join(&t.rel_path));
        // 44.1 kHz × 16 bit × 2 channels
        assert_eq!(
            got.audio.bitrate_kbps,
            Some(1411),
            "{}",
            t.rel_path.display()
        );
    }
}

#[test]
fn content_decides_the_format_not_the_extension() {
    let dir = TempDir::new().expect("temp dir");
    let cases = [
        ("flac", "mislabeled/flac data.mp3", AudioFormat::Flac),
        ("mp3", "mislabeled/mp3 data.ogg", AudioFormat::Mp3),
        ("wav", "mislabeled/wav data.flac", AudioFormat::Wav),
        ("opus", "mislabeled/opus data.ogg", AudioFormat::Opus),
        (
            "ogg_vorbis",
            "mislabeled/vorbis data.opus",
            AudioFormat::OggVorbis,
        ),
        ("m4a_alac", "mislabeled/alac data.aiff", AudioFormat::Mp4),
        ("aiff", "mislabeled/aiff data.wav", AudioFormat::Aiff),
    ];
    for (format, rel, want) in cases {
        let t = FixtureTrack::simple(rel, format, rel);
        let path = fixtures::make_track(dir.path(), &t).expect("encode");
        let got = probe_ok(&path);
        assert_eq!(got.format, want, "{rel}");
        assert_eq!(got.tags.title.as_deref(), Some(rel), "{rel}");
    }
}

#[test]
fn corrupt_files_are_errors_with_reasons() {
    let dir = TempDir::new().expect("temp dir");
    let paths = fixtures::corrupt_files(dir.path()).expect("corrupt fixtures");
    assert_eq!(paths.len(), 5);
    for path in &paths {
        let name = path.file_name().and_then(OsStr::to_str).unwrap_or("");
        let err = match probe_file(path) {
            Ok(t) => panic!("{name}: expected an error, got {t:?}"),
            Err(e) => e,
        };
        assert_eq!(err.stage(), "probe", "{name}: {err}");
        let text = err.to_string();
        match name {
            fixtures::CORRUPT_EMPTY => {
                assert!(matches!(err, ProbeError::Empty), "{name}: {err:?}");
                assert_eq!(text, "empty file (0 bytes)");
            }
            fixtures::CORRUPT_RANDOM => {
                assert!(
                    matches!(err, ProbeError::NotAudio { .. }),
                    "{name}: {err:?}"
                );
                assert!(text.starts_with("not an audio file: "), "{text}");
            }
            fixtures::CORRUPT_TRUNCATED_MP3 => {
                assert!(
                    matches!(
                        err,
                        ProbeError::Truncated {
                            format: AudioFormat::Mp3,
                            ..
                        }
                    ),
                    "{name}: {err:?}"
                );
                // "truncated: header declares 30.0 s of audio (~480.4 kB) but the file holds …"
                assert!(text.starts_with("truncated: header declares 30."), "{text}");
                assert!(text.contains("but the file holds"), "{text}");
            }
            fixtures::CORRUPT_TRUNCATED_FLAC => {
                assert!(
                    matches!(
                        err,
                        ProbeError::Truncated {
                            format: AudioFormat::Flac,
                            ..
                        }
                    ),
                    "{name}: {err:?}"
                );
                assert!(
                    text.starts_with("truncated: STREAMINFO declares 10.0 s"),
                    "{text}"
                );
            }
            fixtures::CORRUPT_TEXT => {
                assert!(
                    matches!(err, ProbeError::NotAudio { .. }),
                    "{name}: {err:?}"
                );
                assert!(text.contains("content is text"), "{text}");
            }
            other => panic!("unexpected corrupt fixture {other}"),
        }
    }
}

/// Every format, cut to half its size and to its first 3000 bytes: all detected, cheaply.
#[test]
fn truncated_files_of_every_format_are_detected() {
    let (dir, tracks) = library();
    let out = TempDir::new().expect("temp dir");
    for t in tracks {
        let bytes = fs::read(dir.path().join(&t.rel_path)).expect("read fixture");
        for (label, keep) in [("half", bytes.len() / 2), ("3000 bytes", 3000)] {
            assert!(keep < bytes.len());
            let path = out.path().join(format!("{}-{keep}", t.format));
            fs::write(&path, &bytes[..keep]).expect("write");
            match probe_file(&path) {
                Err(ProbeError::Truncated { format, reason }) => {
                    assert_eq!(format.as_str(), t.expected_format(), "{label} {}", t.format);
                    assert!(!reason.is_empty());
                }
                other => panic!(
                    "{} cut to {label}: expected Truncated, got {other:?}",
                    t.format
                ),
            }
        }
    }
}

#[test]
fn non_utf8_file_names_work() {
    let (dir, tracks) = library();
    let out = TempDir::new().expect("temp dir");
    // "caf\xe9 \xff.flac": Latin-1 bytes, not valid UTF-8.
    let name = OsStr::from_bytes(b"caf\xe9 \xff.flac");
    assert!(name.to_str().is_none());
    let path = out.path().join(name);
    let flac = tracks
        .iter()
        .find(|t| t.format == "flac")
        .expect("flac fixture");
    fs::copy(dir.path().join(&flac.rel_path), &path).expect("copy");
    let got = probe_ok(&path);
    assert_eq!(got.format, AudioFormat::Flac);
    assert_eq!(got.tags.title.as_deref(), Some(flac.title.as_str()));
}

#[test]
fn unopenable_paths_fail_at_the_open_stage() {
    let dir = TempDir::new().expect("temp dir");
    let missing = probe_file(&dir.path().join("missing.mp3")).expect_err("missing file");
    assert_eq!(missing.stage(), "open");
    assert_eq!(missing.to_string(), "unreadable: file not found");

    let sub = dir.path().join("folder.mp3");
    fs::create_dir(&sub).expect("mkdir");
    let err = probe_file(&sub).expect_err("directory");
    assert_eq!(err.stage(), "open");
    assert_eq!(err.to_string(), "unreadable: is a directory");
}

/// An ID3v2.3 tag with NUL padding, a NUL-separated pair of artists, surrounding spaces, an
/// empty album and a "3/12" track number, in front of real MP3 frames.
#[test]
fn tag_text_is_trimmed_and_cleaned() {
    let dir = TempDir::new().expect("temp dir");
    let mut t = FixtureTrack::simple("plain.mp3", "mp3", "x");
    t.duration_s = 1.0;
    let encoded = fixtures::make_track(dir.path(), &t).expect("encode");
    let bytes = fs::read(&encoded).expect("read");
    let audio = &bytes[id3_len(&bytes)..];

    let frames = [
        id3_frame(b"TIT2", b"Padded Title\0\0\0"),
        id3_frame(b"TPE1", b"Alpha\0Beta"),
        id3_frame(b"TPE2", b"   Spaced Artist   "),
        id3_frame(b"TALB", b"   "),
        id3_frame(b"TRCK", b"3/12"),
        id3_frame(b"TYER", b"1999"),
    ]
    .concat();
    let mut file = b"ID3\x03\x00\x00".to_vec();
    file.extend_from_slice(&syncsafe(frames.len() as u32));
    file.extend_from_slice(&frames);
    file.extend_from_slice(audio);
    let path = dir.path().join("tagged.mp3");
    fs::write(&path, file).expect("write");

    let got = probe_ok(&path);
    assert_eq!(got.format, AudioFormat::Mp3);
    assert_eq!(got.tags.title.as_deref(), Some("Padded Title"));
    assert_eq!(got.tags.artist.as_deref(), Some("Alpha; Beta"));
    assert_eq!(got.tags.album_artist.as_deref(), Some("Spaced Artist"));
    assert_eq!(got.tags.album, None);
    assert_eq!(got.tags.track_number, Some(3));
    assert_eq!(got.tags.year, Some(1999));
    assert_eq!(got.tags.genre, None);
}

/// A FLAC whose Vorbis comment carries NUL bytes, a tab and blank values.
#[test]
fn nul_and_control_characters_in_vorbis_comments_are_cleaned() {
    let dir = TempDir::new().expect("temp dir");
    let mut t = FixtureTrack::simple("plain.flac", "flac", "x");
    t.duration_s = 1.0;
    let encoded = fixtures::make_track(dir.path(), &t).expect("encode");
    let bytes = fs::read(&encoded).expect("read");

    let comments: [&[u8]; 5] = [
        b"TITLE=Nul\0Inside",
        b"ARTIST=   ",
        b"ALBUM=Tab\tAlbum",
        b"GENRE=Rock\0\0",
        b"DATE=2003-11-30",
    ];
    let mut body = Vec::new();
    body.extend_from_slice(&4u32.to_le_bytes());
    body.extend_from_slice(b"test");
    body.extend_from_slice(&(comments.len() as u32).to_le_bytes());
    for c in comments {
        body.extend_from_slice(&(c.len() as u32).to_le_bytes());
        body.extend_from_slice(c);
    }
    let path = dir.path().join("nul.flac");
    fs::write(&path, replace_flac_comments(&bytes, &body)).expect("write");

    let got = probe_ok(&path);
    assert_eq!(got.format, AudioFormat::Flac);
    assert_eq!(got.tags.title.as_deref(), Some("Nul; Inside"));
    assert_eq!(got.tags.artist, None);
    assert_eq!(got.tags.album.as_deref(), Some("Tab Album"));
    assert_eq!(got.tags.genre.as_deref(), Some("Rock"));
    assert_eq!(got.tags.year, Some(2003));
}

/// Rebuilds a FLAC file's metadata: STREAMINFO, then the given VORBIS_COMMENT body as the last
/// block, then the original audio frames.
fn replace_flac_comments(flac: &[u8], comment: &[u8]) -> Vec<u8> {
    assert_eq!(&flac[..4], b"fLaC");
    let mut pos = 4;
    let mut streaminfo = None;
    loop {
        let header = &flac[pos..pos + 4];
        let len =
            (usize::from(header[1]) << 16) | (usize::from(header[2]) << 8) | usize::from(header[3]);
        if header[0] & 0x7F == 0 {
            streaminfo = Some(flac[pos + 4..pos + 4 + len].to_vec());
        }
        pos += 4 + len;
        if header[0] & 0x80 != 0 {
            break;
        }
    }
    let streaminfo = streaminfo.expect("STREAMINFO");
    let mut out = b"fLaC".to_vec();
    out.push(0);
    out.extend_from_slice(&(streaminfo.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&streaminfo);
    out.push(0x80 | 4);
    out.extend_from_slice(&(comment.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(comment);
    out.extend_from_slice(&flac[pos..]);
    out
}

fn id3_len(b: &[u8]) -> usize {
    if b.len() < 10 || &b[..3] != b"ID3" {
        return 0;
    }
    10 + b[6..10]
        .iter()
        .fold(0usize, |acc, s| (acc << 7) | usize::from(*s))
}

fn id3_frame(id: &[u8; 4], latin1: &[u8]) -> Vec<u8> {
    let mut f = id.to_vec();
    f.extend_from_slice(&(latin1.len() as u32 + 1).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0]); // flags, then encoding 0 (Latin-1)
    f.extend_from_slice(latin1);
    f
}

fn syncsafe(n: u32) -> [u8; 4] {
    [
        ((n >> 21) & 0x7F) as u8,
        ((n >> 14) & 0x7F) as u8,
        ((n >> 7) & 0x7F) as u8,
        (n & 0x7F) as u8,
    ]
}

#[test]
fn parallel_probes_agree() {
    let (dir, tracks) = library();
    let paths: Vec<PathBuf> = tracks
        .iter()
        .map(|t| dir.path().join(&t.rel_path))
        .collect();
    let serial: Vec<ProbedTrack> = paths.iter().map(|p| probe_ok(p)).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    (0..10)
                        .flat_map(|_| paths.iter().map(|p| probe_ok(p)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            let results = h.join().expect("probe thread panicked");
            for chunk in results.chunks(paths.len()) {
                assert_eq!(chunk, serial.as_slice());
            }
        }
    });
}

/// Hundreds of hostile inputs: audio magic followed by random bytes, real files cut at random
/// lengths, and real files with random bytes overwritten. `probe_file` must return for each,
/// never panic; files cut to under half their size must be errors.
#[test]
fn hostile_inputs_never_panic() {
    let (dir, tracks) = library();
    let out = TempDir::new().expect("temp dir");
    let path = out.path().join("hostile.bin");
    let real: Vec<Vec<u8>> = tracks
        .iter()
        .map(|t| fs::read(dir.path().join(&t.rel_path)).expect("read fixture"))
        .collect();
    let magics: [&[u8]; 12] = [
        b"ID3\x04\x00\x00\x00\x00\x02\x00",
        b"ID3\x03\x00\x00\x7f\x7f\x7f\x7f",
        b"\xff\xfb\x90\x64",
        b"\xff\xf1\x50\x80",
        b"fLaC\x00\x00\x00\x22",
        b"OggS\x00\x02",
        b"RIFF\xff\xff\xff\xffWAVEfmt ",
        b"FORM\x00\x00\x10\x00AIFFCOMM",
        b"\x00\x00\x00\x20ftypM4A ",
        b"MAC \x96\x0f",
        b"wvpk",
        b"MPCK",
    ];
    let mut rng = fixtures::pseudo_random_bytes(42, 64 * 1024).into_iter();
    let mut next = move || -> usize {
        let mut v = 0usize;
        for _ in 0..4 {
            v = (v << 8) | usize::from(rng.next().unwrap_or(7));
        }
        v
    };

    let mut cases: Vec<(String, Vec<u8>, bool)> = Vec::new();
    for (i, magic) in magics.iter().enumerate() {
        for j in 0..20 {
            let mut data = magic.to_vec();
            data.extend(fixtures::pseudo_random_bytes(
                (i * 100 + j) as u64,
                next() % 5000,
            ));
            cases.push((format!("magic {i} #{j}"), data, false));
        }
    }
    for (i, bytes) in real.iter().enumerate() {
        for _ in 0..20 {
            let keep = next() % bytes.len();
            let must_fail = keep <= bytes.len() / 2;
            cases.push((
                format!("{} cut at {keep}", tracks[i].format),
                bytes[..keep].to_vec(),
                must_fail,
            ));
        }
        for j in 0..15 {
            let mut data = bytes.clone();
            let span = if j % 2 == 0 {
                600.min(data.len())
            } else {
                data.len()
            };
            for _ in 0..(1 + next() % 16) {
                let at = next() % span;
                data[at] = next() as u8;
            }
            cases.push((format!("{} mutated #{j}", tracks[i].format), data, false));
        }
    }
    assert!(cases.len() >= 400, "{} cases", cases.len());

    for (label, data, must_fail) in cases {
        fs::write(&path, &data).expect("write");
        let result = std::panic::catch_unwind(|| probe_file(&path));
        let Ok(result) = result else {
            let keep = std::env::temp_dir().join("coral-probe-panicked-input.bin");
            let _ = fs::copy(&path, &keep);
            panic!(
                "probe_file panicked on {label} (input kept at {})",
                keep.display()
            );
        };
        if must_fail {
            assert!(result.is_err(), "{label}: accepted {result:?}");
        }
        if let Err(e) = result {
            assert!(!e.to_string().is_empty());
        }
    }
}
