//! Generated audio libraries for tests and benches: real files encoded by ffmpeg (a sine tone
//! per track, short by default), tagged with known values, plus damaged files and a cheap way
//! to multiply a library into thousands of files.
//!
//! Every tag a [`FixtureTrack`] carries is one the container really stores through ffmpeg, so
//! tests can compare probe results field by field: WAV (RIFF INFO) has no album-artist or
//! disc-number field, and [`make_track`] refuses to pretend otherwise.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail, ensure};

/// Every format key [`make_track`] can encode.
pub const FORMATS: [&str; 8] = [
    "mp3",
    "flac",
    "ogg_vorbis",
    "opus",
    "m4a_aac",
    "m4a_alac",
    "wav",
    "aiff",
];

/// One track to generate: where, in which format, with which tags.
#[derive(Debug, Clone, PartialEq)]
pub struct FixtureTrack {
    /// Path relative to the library root; the extension is not used to pick the format.
    pub rel_path: PathBuf,
    /// One of [`FORMATS`].
    pub format: &'static str,
    pub title: String,
    pub artist: String,
    pub album: String,
    pub album_artist: Option<String>,
    pub track_number: Option<u32>,
    pub disc_number: Option<u32>,
    /// Written as the date "YYYY-05-01", so readers must take the year from a full date.
    pub year: Option<i32>,
    pub genre: Option<String>,
    pub duration_s: f64,
}

impl FixtureTrack {
    /// A 2-second track with only title, artist and album set.
    pub fn simple(rel_path: impl Into<PathBuf>, format: &'static str, title: &str) -> Self {
        Self {
            rel_path: rel_path.into(),
            format,
            title: title.to_owned(),
            artist: "Fixture Artist".to_owned(),
            album: "Fixture Album".to_owned(),
            album_artist: None,
            track_number: None,
            disc_number: None,
            year: None,
            genre: None,
            duration_s: 2.0,
        }
    }

    /// The format name the probe reports for this track (`AudioFormat::as_str`).
    pub fn expected_format(&self) -> &'static str {
        match self.format {
            "m4a_aac" | "m4a_alac" => "mp4",
            other => other,
        }
    }

    /// The codec name the probe reports for this track.
    pub fn expected_codec(&self) -> &'static str {
        match self.format {
            "ogg_vorbis" => "vorbis",
            "m4a_aac" => "aac",
            "m4a_alac" => "alac",
            "wav" => "pcm_s16le",
            "aiff" => "pcm_s16be",
            other => other,
        }
    }

    /// Sample rate of the encoded stream (Opus always runs at 48 kHz).
    pub fn sample_rate(&self) -> u32 {
        if self.format == "opus" {
            48_000
        } else {
            44_100
        }
    }

    /// Bits per sample for lossless formats; `None` for lossy ones.
    pub fn bit_depth(&self) -> Option<u32> {
        match self.format {
            "flac" | "m4a_alac" | "wav" | "aiff" => Some(16),
            _ => None,
        }
    }
}

/// Fails with a clear message when ffmpeg cannot be run (checked once per process).
pub fn require_ffmpeg() -> Result<()> {
    static CHECK: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let check = CHECK.get_or_init(|| {
        match Command::new("ffmpeg")
            .arg("-version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
        {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!("`ffmpeg -version` failed ({status})")),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(
                "ffmpeg is not installed (not found on PATH); the audio fixtures are encoded \
                 with it: install the ffmpeg package and rerun"
                    .to_owned(),
            ),
            Err(e) => Err(format!("cannot run ffmpeg: {e}")),
        }
    });
    check.clone().map_err(anyhow::Error::msg)
}

/// Encodes `t` under `root` (parent directories created) and returns the file's path.
pub fn make_track(root: &Path, t: &FixtureTrack) -> Result<PathBuf> {
    require_ffmpeg()?;
    let (muxer, codec_args): (&str, &[&str]) = match t.format {
        "mp3" => ("mp3", &["-c:a", "libmp3lame", "-b:a", "128k"]),
        "flac" => ("flac", &["-c:a", "flac"]),
        "ogg_vorbis" => ("ogg", &["-c:a", "libvorbis", "-q:a", "3"]),
        "opus" => ("ogg", &["-c:a", "libopus", "-b:a", "96k"]),
        "m4a_aac" => ("ipod", &["-c:a", "aac", "-b:a", "128k"]),
        "m4a_alac" => ("ipod", &["-c:a", "alac"]),
        "wav" => ("wav", &["-c:a", "pcm_s16le"]),
        // ID3v2 in the AIFF: its own text chunks hold no album, track or genre.
        "aiff" => ("aiff", &["-c:a", "pcm_s16be", "-write_id3v2", "1"]),
        other => bail!("unknown fixture format {other:?} (known: {FORMATS:?})"),
    };
    if t.format == "wav" {
        ensure!(
            t.album_artist.is_none() && t.disc_number.is_none(),
            "{}: WAV (RIFF INFO) cannot store album artist or disc number",
            t.rel_path.display()
        );
    }
    ensure!(
        t.duration_s > 0.0 && t.duration_s.is_finite(),
        "{}: duration must be positive",
        t.rel_path.display()
    );
    let out = root.join(&t.rel_path);
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }

    let mut meta: Vec<(&str, String)> = vec![
        ("title", t.title.clone()),
        ("artist", t.artist.clone()),
        ("album", t.album.clone()),
    ];
    if let Some(v) = &t.album_artist {
        meta.push(("album_artist", v.clone()));
    }
    if let Some(v) = t.track_number {
        meta.push(("track", v.to_string()));
    }
    if let Some(v) = t.disc_number {
        meta.push(("disc", v.to_string()));
    }
    if let Some(v) = t.year {
        meta.push(("date", format!("{v:04}-05-01")));
    }
    if let Some(v) = &t.genre {
        meta.push(("genre", v.clone()));
    }

    let source = format!(
        "sine=frequency={}:duration={}:sample_rate={}",
        tone_for(&t.title),
        t.duration_s,
        t.sample_rate()
    );
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y"])
        .args(["-f", "lavfi", "-i", &source, "-ac", "2"])
        .args(["-map_metadata", "-1"]);
    for (key, value) in &meta {
        cmd.arg("-metadata").arg(format!("{key}={value}"));
    }
    cmd.args(codec_args)
        .args(["-f", muxer])
        .arg(&out)
        .stdin(Stdio::null());
    run(cmd, &out)?;
    Ok(out)
}

/// Encode what the ffmpeg `input` arguments produce into `root/rel`, the codec chosen by the
/// extension (mp3, flac, ogg, opus, m4a, wav; wma, wv, tta, webm, mka, ac3, spx), with `rel` as
/// the title tag. Encoded in a scratch directory and renamed into place, so a watching daemon
/// never sees half a file.
pub fn encode_into_place(root: &Path, rel: &str, input: &[&std::ffi::OsStr]) -> Result<PathBuf> {
    let codec: &[&str] = match Path::new(rel).extension().and_then(|e| e.to_str()) {
        Some("mp3") => &["-c:a", "libmp3lame", "-b:a", "160k"],
        Some("flac") => &["-c:a", "flac"],
        Some("ogg") => &["-c:a", "libvorbis", "-q:a", "4"],
        Some("opus") => &["-c:a", "libopus", "-b:a", "96k", "-f", "ogg"],
        Some("m4a") => &["-c:a", "aac", "-b:a", "160k"],
        Some("wav") => &["-c:a", "pcm_s16le"],
        // Formats whose embedding decode goes through FFmpeg (or libopus in Matroska).
        Some("wma") => &["-c:a", "wmav2", "-b:a", "128k"],
        Some("wv") => &["-c:a", "wavpack"],
        Some("tta") => &["-c:a", "tta"],
        Some("webm") => &["-c:a", "libopus", "-b:a", "96k"],
        Some("mka") => &["-c:a", "ac3", "-b:a", "192k"],
        Some("ac3") => &["-c:a", "ac3", "-b:a", "192k"],
        Some("spx") => &["-c:a", "libspeex", "-ar", "32000"],
        other => bail!("no encoder for {other:?}"),
    };
    encode_into_place_with(root, rel, input, codec)
}

/// Like [`encode_into_place`], with the codec arguments given (`-c:a alac` for ALAC in an
/// `.m4a`, which [`encode_into_place`] fills with AAC); the container still follows the
/// extension.
pub fn encode_into_place_with(
    root: &Path,
    rel: &str,
    input: &[&std::ffi::OsStr],
    codec: &[&str],
) -> Result<PathBuf> {
    require_ffmpeg()?;
    let out = root.join(rel);
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    let scratch = tempfile::tempdir()?;
    let tmp = scratch.path().join(out.file_name().context("file name")?);
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-nostdin", "-hide_banner", "-loglevel", "error", "-y"])
        .args(input)
        .args(["-metadata", &format!("title={rel}")])
        .args(codec)
        .arg(&tmp)
        .stdin(Stdio::null());
    run(cmd, &out)?;
    fs::rename(&tmp, &out)?;
    Ok(out)
}

/// A tone between 220 and 880 Hz chosen from the title, so tracks sound different.
fn tone_for(title: &str) -> u32 {
    let hash = title.bytes().fold(2_166_136_261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    });
    220 + hash % 661
}

fn run(mut cmd: Command, out: &Path) -> Result<()> {
    let output = cmd
        .output()
        .with_context(|| format!("running ffmpeg for {}", out.display()))?;
    ensure!(
        output.status.success(),
        "ffmpeg failed for {} ({}): {}",
        out.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// One track per supported format (mp3, flac, ogg vorbis, opus, m4a/aac, m4a/alac, wav,
/// aiff), each with distinct tags (accented words, numbers, years, genres) in nested
/// `Artist/Album/NN Title.ext` directories. Encodes in parallel; returns the tracks in
/// [`FORMATS`] order.
pub fn every_format_library(root: &Path) -> Result<Vec<FixtureTrack>> {
    let s = |v: &str| v.to_owned();
    let track = |format: &'static str,
                 ext: &str,
                 artist: &str,
                 album: &str,
                 title: &str,
                 album_artist: Option<&str>,
                 numbers: (Option<u32>, Option<u32>),
                 year: i32,
                 genre: &str| {
        let number = numbers.0.map_or(String::new(), |n| format!("{n:02} "));
        FixtureTrack {
            rel_path: PathBuf::from(artist)
                .join(album)
                .join(format!("{number}{title}.{ext}")),
            format,
            title: s(title),
            artist: s(artist),
            album: s(album),
            album_artist: album_artist.map(s),
            track_number: numbers.0,
            disc_number: numbers.1,
            year: Some(year),
            genre: Some(s(genre)),
            duration_s: 0.0,
        }
    };
    let mut tracks = vec![
        track(
            "mp3",
            "mp3",
            "Zoë Ardent",
            "Sunset Terraces",
            "Café del Mar",
            Some("Zoë Ardent"),
            (Some(1), Some(1)),
            2019,
            "Chillout",
        ),
        track(
            "flac",
            "flac",
            "Björg Ísold",
            "Jökull",
            "Jökulsárlón",
            Some("Björg Ísold"),
            (Some(2), Some(1)),
            2004,
            "Ambient",
        ),
        track(
            "ogg_vorbis",
            "ogg",
            "Les Élèves",
            "Hiver",
            "Noël à Paris",
            None,
            (Some(3), Some(2)),
            1998,
            "Chanson",
        ),
        track(
            "opus",
            "opus",
            "Günther Maß",
            "Nachtfahrt",
            "Straße der Sterne",
            Some("Various Artists"),
            (Some(4), Some(1)),
            2021,
            "Electronic",
        ),
        track(
            "m4a_aac",
            "m4a",
            "Ñandú Trío",
            "Días de Sol",
            "Señorita Lluvia",
            Some("Ñandú Trío"),
            (Some(5), Some(1)),
            1987,
            "Latin",
        ),
        track(
            "m4a_alac",
            "m4a",
            "Åsa Öberg",
            "Fika",
            "Smörgåsbord",
            Some("Åsa Öberg"),
            (Some(6), Some(2)),
            2010,
            "Jazz",
        ),
        track(
            "wav",
            "wav",
            "Chloé Dubois",
            "Dessert",
            "Crème Brûlée",
            None,
            (Some(7), None),
            2015,
            "Classical",
        ),
        track(
            "aiff",
            "aiff",
            "Þór Ragnarsson",
            "Norður",
            "Fjörður",
            Some("Þór Ragnarsson"),
            (Some(8), Some(1)),
            2001,
            "Folk",
        ),
    ];
    for (i, t) in tracks.iter_mut().enumerate() {
        t.duration_s = 2.0 + 0.25 * i as f64;
    }
    make_tracks(root, &tracks)?;
    Ok(tracks)
}

/// Encodes several tracks, two ffmpeg processes at a time.
pub fn make_tracks(root: &Path, tracks: &[FixtureTrack]) -> Result<Vec<PathBuf>> {
    require_ffmpeg()?;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
    let chunk = tracks.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = tracks
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|t| make_track(root, t))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut paths = Vec::with_capacity(tracks.len());
        for handle in handles {
            match handle.join() {
                Ok(part) => paths.extend(part?),
                Err(_) => bail!("a fixture encoding thread panicked"),
            }
        }
        Ok(paths)
    })
}

/// File names [`corrupt_files`] writes under `root/corrupt/`, in the order it returns them.
pub const CORRUPT_EMPTY: &str = "empty.mp3";
pub const CORRUPT_RANDOM: &str = "random.flac";
pub const CORRUPT_TRUNCATED_MP3: &str = "truncated.mp3";
pub const CORRUPT_TRUNCATED_FLAC: &str = "truncated.flac";
pub const CORRUPT_TEXT: &str = "notes.mp3";

/// Damaged files under `root/corrupt/`: a zero-length `.mp3`, random bytes named `.flac`, the
/// first 3000 bytes of a 30 s MP3, the first half of a 10 s FLAC, and a text file named
/// `.mp3`. Returned in that order (names: the `CORRUPT_*` constants).
pub fn corrupt_files(root: &Path) -> Result<Vec<PathBuf>> {
    require_ffmpeg()?;
    let dir = root.join("corrupt");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;

    let empty = dir.join(CORRUPT_EMPTY);
    fs::write(&empty, b"").with_context(|| format!("writing {}", empty.display()))?;

    let random = dir.join(CORRUPT_RANDOM);
    fs::write(&random, pseudo_random_bytes(0x00C0_FFEE, 16 * 1024))
        .with_context(|| format!("writing {}", random.display()))?;

    let mut long_mp3 = FixtureTrack::simple("long.mp3", "mp3", "Long MP3");
    long_mp3.duration_s = 30.0;
    let mut long_flac = FixtureTrack::simple("long.flac", "flac", "Long FLAC");
    long_flac.duration_s = 10.0;
    let sources = make_tracks(scratch.path(), &[long_mp3, long_flac])?;

    let truncated_mp3 = dir.join(CORRUPT_TRUNCATED_MP3);
    let mp3 = fs::read(&sources[0]).context("reading the long mp3")?;
    ensure!(mp3.len() > 3000, "the long mp3 is unexpectedly small");
    fs::write(&truncated_mp3, &mp3[..3000])
        .with_context(|| format!("writing {}", truncated_mp3.display()))?;

    let truncated_flac = dir.join(CORRUPT_TRUNCATED_FLAC);
    let flac = fs::read(&sources[1]).context("reading the long flac")?;
    fs::write(&truncated_flac, &flac[..flac.len() / 2])
        .with_context(|| format!("writing {}", truncated_flac.display()))?;

    let text = dir.join(CORRUPT_TEXT);
    fs::write(
        &text,
        "Playlist notes\nThis is a text file with an audio extension.\n".repeat(8),
    )
    .with_context(|| format!("writing {}", text.display()))?;

    Ok(vec![empty, random, truncated_mp3, truncated_flac, text])
}

/// Deterministic pseudo-random bytes (xorshift64*), for corrupt inputs.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Replicates the directory tree `src` into `dst` (created), hard-linking every file (copying
/// when a link is impossible, e.g. across file systems). Returns the number of files.
///
/// Hard links share their content and mtime with the template: replace such a file (write a
/// new one and rename it over) rather than modifying it in place.
pub fn copy_template(src: &Path, dst: &Path) -> Result<usize> {
    fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
    let mut files = 0;
    for entry in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry.with_context(|| format!("reading {}", src.display()))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let kind = entry
            .file_type()
            .with_context(|| format!("inspecting {}", from.display()))?;
        if kind.is_dir() {
            files += copy_template(&from, &to)?;
        } else if kind.is_file() {
            if fs::hard_link(&from, &to).is_err() {
                fs::copy(&from, &to)
                    .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
            }
            files += 1;
        }
    }
    Ok(files)
}

/// `copies` replicas of `template` under `root/copy_NNNN/`: a library of
/// `copies × (files in template)` files for large-scan tests and benches.
pub fn replicate_template(template: &Path, root: &Path, copies: usize) -> Result<usize> {
    let mut files = 0;
    for i in 0..copies {
        files += copy_template(template, &root.join(format!("copy_{i:04}")))?;
    }
    Ok(files)
}

/// A library of `files` real audio files under `root` (a 10-file template of mp3/flac/ogg/wav
/// tracks replicated with hard links), for tests that need scans long enough to interrupt.
pub fn big_library(root: &Path, files: usize) -> Result<usize> {
    let template = root.join(".template");
    let formats = ["mp3", "flac", "ogg_vorbis", "wav", "mp3"];
    let tracks: Vec<FixtureTrack> = (0..10)
        .map(|i| {
            let f = formats[i % formats.len()];
            let ext = if f == "ogg_vorbis" { "ogg" } else { f };
            let mut t =
                FixtureTrack::simple(format!("t{i:02}.{ext}"), f, &format!("Bulk Track {i}"));
            t.duration_s = 1.0;
            t
        })
        .collect();
    make_tracks(&template, &tracks)?;
    let copies = files.div_ceil(tracks.len());
    let made = replicate_template(&template, root, copies)?;
    Ok(made)
}
