//! The embedding decode (stage 1) on every format corald indexes: real files encoded by ffmpeg
//! from a 440 Hz sine (amplitude 1/8, both channels), decoded region by region as the pipeline
//! asks. symphonia decodes MP3, FLAC, Vorbis, AAC, ALAC and (through libopus) Opus in Ogg and
//! WebM in-process; WMA, WavPack, TrueAudio, AC-3 in Matroska and Speex go to the FFmpeg
//! fallback. APE and Musepack are not here: Debian's ffmpeg cannot encode them.
//!
//! Needs no `embed` feature (no model runs).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail, ensure};
use coral_tests::fixtures;
use corald::embed::phase_1_decode::{self, DecodeError, DecodedBy, Region, SeekPolicy};
use corald::embed::phase_1_decode_ffmpeg;
use corald::embed::phase_2_resample::WindowPlan;

const TONE_HZ: f64 = 440.0;
/// ffmpeg's `sine` source has amplitude 1/8; `-ac 2` spreads it at -3 dB to both channels,
/// so each channel, and their mean, has 1/8 / √2.
const TONE_AMPLITUDE: f64 = 0.125 * std::f64::consts::FRAC_1_SQRT_2;
const SECONDS: f64 = 70.0;

/// One fixture format.
struct Format {
    name: &'static str,
    rel: &'static str,
    /// Codec arguments when the extension alone does not choose them.
    codec: Option<&'static [&'static str]>,
    decoded_by: DecodedBy,
    rate: u32,
    /// Lossy speech codecs keep the tone less faithfully.
    amplitude_tolerance: f64,
}

const fn format(name: &'static str, rel: &'static str, decoded_by: DecodedBy, rate: u32) -> Format {
    Format {
        name,
        rel,
        codec: None,
        decoded_by,
        rate,
        amplitude_tolerance: 0.1,
    }
}

const FORMATS: [Format; 12] = [
    format("mp3", "tone.mp3", DecodedBy::Symphonia, 44_100),
    format("flac", "tone.flac", DecodedBy::Symphonia, 44_100),
    format("ogg vorbis", "tone.ogg", DecodedBy::Symphonia, 44_100),
    format("aac in m4a", "tone-aac.m4a", DecodedBy::Symphonia, 44_100),
    Format {
        codec: Some(&["-c:a", "alac"]),
        ..format("alac in m4a", "tone-alac.m4a", DecodedBy::Symphonia, 44_100)
    },
    format("opus in ogg", "tone.opus", DecodedBy::Symphonia, 48_000),
    format("opus in webm", "tone.webm", DecodedBy::Symphonia, 48_000),
    format("wma", "tone.wma", DecodedBy::Ffmpeg, 44_100),
    format("wavpack", "tone.wv", DecodedBy::Ffmpeg, 44_100),
    format("tta", "tone.tta", DecodedBy::Ffmpeg, 44_100),
    format("ac3 in matroska", "tone.mka", DecodedBy::Ffmpeg, 44_100),
    Format {
        amplitude_tolerance: 0.3,
        ..format("speex", "tone.spx", DecodedBy::Ffmpeg, 32_000)
    },
];

fn format_named(name: &str) -> Result<&'static Format> {
    FORMATS
        .iter()
        .find(|f| f.name == name)
        .with_context(|| format!("no fixture format {name:?}"))
}

/// The fixture library: one 70 s tone per format, encoded once per build directory (in
/// parallel, two at a time) and reused.
fn library() -> Result<&'static Path> {
    static LIB: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let lib = LIB.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("embed-formats-v1");
        let source = format!("sine=frequency={TONE_HZ}:duration={SECONDS}:sample_rate=44100");
        let input = ["-f", "lavfi", "-i", &source, "-ac", "2"].map(OsStr::new);
        let make = |f: &Format| -> Result<()> {
            if root.join(f.rel).is_file() {
                return Ok(());
            }
            match f.codec {
                Some(codec) => fixtures::encode_into_place_with(&root, f.rel, &input, codec),
                None => fixtures::encode_into_place(&root, f.rel, &input),
            }
            .map(|_| ())
            .with_context(|| format!("encoding {}", f.name))
        };
        let (a, b) = FORMATS.split_at(FORMATS.len() / 2);
        std::thread::scope(|s| {
            let h = s.spawn(|| a.iter().try_for_each(make));
            let rest = b.iter().try_for_each(make);
            h.join()
                .map_err(|_| anyhow::anyhow!("encoding thread panicked"))
                .and_then(|r| r)
                .and(rest)
        })
        .map(|()| root.clone())
        .map_err(|e| format!("{e:#}"))
    });
    match lib {
        Ok(p) => Ok(p.as_path()),
        Err(e) => bail!("{e}"),
    }
}

fn path_of(f: &Format) -> Result<PathBuf> {
    Ok(library()?.join(f.rel))
}

/// The pipeline's regions for a 70 s track (8 windows of musicnn's 2.976 s with 50 ms margins).
fn plan_regions() -> Vec<Region> {
    WindowPlan {
        count: 8,
        window_samples: 47_616,
        sample_rate: 16_000,
    }
    .regions(SECONDS)
}

/// Least-squares fit of `a·sin(ωt) + b·cos(ωt)` (t in seconds from the track's start, the
/// region starting at `start_s`): the tone's amplitude, its phase error in radians (0 when the
/// region sits exactly where it should) and the RMS of what the tone does not explain.
fn tone_fit(x: &[f32], rate: u32, start_s: f64) -> (f64, f64, f64) {
    let w = 2.0 * std::f64::consts::PI * TONE_HZ;
    let (mut ss, mut sc, mut cc, mut xs, mut xc) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (k, v) in x.iter().enumerate() {
        let t = start_s + k as f64 / f64::from(rate);
        let (s, c) = (w * t).sin_cos();
        let v = f64::from(*v);
        ss += s * s;
        sc += s * c;
        cc += c * c;
        xs += v * s;
        xc += v * c;
    }
    let det = ss * cc - sc * sc;
    let a = (xs * cc - xc * sc) / det;
    let b = (xc * ss - xs * sc) / det;
    let mut residual = 0.0;
    for (k, v) in x.iter().enumerate() {
        let t = start_s + k as f64 / f64::from(rate);
        let (s, c) = (w * t).sin_cos();
        residual += (f64::from(*v) - a * s - b * c).powi(2);
    }
    (
        a.hypot(b),
        b.atan2(a),
        (residual / x.len().max(1) as f64).sqrt(),
    )
}

fn frames(s: f64, rate: u32) -> usize {
    (s * f64::from(rate)).ceil() as usize
}

/// Everything one format must satisfy; returns a line of figures for the log.
fn check_format(f: &Format) -> Result<String> {
    let path = path_of(f)?;
    let mut regions = plan_regions();
    // One region starting before the track, one running past its end.
    regions.push(Region {
        start_s: -0.25,
        len_s: 1.0,
    });
    regions.push(Region {
        start_s: SECONDS - 0.6,
        len_s: 1.0,
    });
    let d = phase_1_decode::decode_regions(&path, &regions, SeekPolicy::Seek)?;
    ensure!(
        d.decoded_by == f.decoded_by,
        "decoded by {:?}, expected {:?}",
        d.decoded_by,
        f.decoded_by
    );
    ensure!(d.sample_rate == f.rate, "sample rate {}", d.sample_rate);
    ensure!(
        d.regions.len() == regions.len(),
        "{} regions",
        d.regions.len()
    );
    for (r, got) in regions.iter().zip(&d.regions) {
        ensure!(
            got.len() == frames(r.len_s, f.rate),
            "{r:?}: {} frames, expected {}",
            got.len(),
            frames(r.len_s, f.rate)
        );
    }
    let plan = regions.len() - 2;
    let mut worst_amp = 0.0f64;
    let mut worst_phase = 0.0f64;
    let mut worst_residual = 0.0f64;
    for (r, got) in regions[..plan].iter().zip(&d.regions) {
        let (amp, phase, residual) = tone_fit(got, f.rate, r.start_s);
        let rel = (amp / TONE_AMPLITUDE - 1.0).abs();
        ensure!(
            rel <= f.amplitude_tolerance,
            "{r:?}: tone amplitude {amp:.4} (expected {TONE_AMPLITUDE})"
        );
        ensure!(
            residual < 0.25 * TONE_AMPLITUDE,
            "{r:?}: {residual:.4} RMS besides the tone"
        );
        worst_amp = worst_amp.max(rel);
        worst_phase = worst_phase.max(phase.abs());
        worst_residual = worst_residual.max(residual);
    }

    // Before the start: exact silence, then the tone from t = 0.
    let early = &d.regions[plan];
    let prefix = (0.25 * f64::from(f.rate)).round() as usize;
    ensure!(
        early[..prefix].iter().all(|v| *v == 0.0),
        "the part before the track is not silent"
    );
    let (amp, _, _) = tone_fit(&early[prefix + f.rate as usize / 10..], f.rate, 0.1);
    ensure!(
        (amp / TONE_AMPLITUDE - 1.0).abs() <= f.amplitude_tolerance,
        "the tone after t = 0 has amplitude {amp:.4}"
    );
    // Past the end: the tone up to shortly before the end, exact silence from shortly after.
    let late = &d.regions[plan + 1];
    let rate = f64::from(f.rate);
    let before_end = (0.5 * rate) as usize;
    let after_end = (0.7 * rate) as usize;
    let (amp, _, _) = tone_fit(&late[..before_end], f.rate, SECONDS - 0.6);
    ensure!(
        (amp / TONE_AMPLITUDE - 1.0).abs() <= f.amplitude_tolerance,
        "the tone before the end has amplitude {amp:.4}"
    );
    ensure!(
        late[after_end..].iter().all(|v| *v == 0.0),
        "samples 0.1 s after the end are not silence"
    );
    Ok(format!(
        "{:<16} {:?} {} Hz: amplitude within {:.1} %, phase error up to {:.3} rad, residual {:.4}, {:.1} audio-s decoded",
        f.name,
        d.decoded_by,
        d.sample_rate,
        100.0 * worst_amp,
        worst_phase,
        worst_residual,
        d.decoded_frames as f64 / rate
    ))
}

#[test]
fn every_format_decodes_to_the_source_tone_in_regions_of_exact_length() -> Result<()> {
    library()?;
    let mut failures = Vec::new();
    for f in &FORMATS {
        match check_format(f) {
            Ok(line) => eprintln!("{line}"),
            Err(e) => failures.push(format!("{}: {e:#}", f.name)),
        }
    }
    ensure!(failures.is_empty(), "\n{}", failures.join("\n"));
    Ok(())
}

#[test]
fn lossless_and_opus_regions_sit_exactly_where_the_tone_is() -> Result<()> {
    // The phase of the fitted tone tells where a region really starts (modulo one period of
    // 2.3 ms): a region shifted by Opus's pre-skip (6.5 ms) or an encoder delay shows. Not
    // Opus in WebM: ffmpeg's muxer writes its block times 5 ms off what CodecDelay says (the
    // source is 240 frames later than the timestamps claim; ffmpeg's own decoder is off by
    // 384 frames the other way), so no decoder can place it exactly.
    for name in ["flac", "alac in m4a", "wavpack", "tta", "opus in ogg"] {
        let f = format_named(name)?;
        let regions = plan_regions();
        let d = phase_1_decode::decode_regions(&path_of(f)?, &regions, SeekPolicy::Seek)?;
        for (r, got) in regions.iter().zip(&d.regions) {
            let (_, phase, _) = tone_fit(got, d.sample_rate, r.start_s);
            let shift_ms = phase / (2.0 * std::f64::consts::PI * TONE_HZ) * 1000.0;
            ensure!(
                shift_ms.abs() < 0.1,
                "{name} {r:?}: the tone is {shift_ms:.3} ms off"
            );
        }
    }
    Ok(())
}

#[test]
fn opus_seeking_gives_the_same_audio_as_reading_from_the_start() -> Result<()> {
    for name in ["opus in ogg", "opus in webm"] {
        let path = path_of(format_named(name)?)?;
        let mut regions = plan_regions();
        regions.push(Region {
            start_s: 0.0,
            len_s: 1.0,
        });
        let seek = phase_1_decode::decode_regions(&path, &regions, SeekPolicy::Seek)?;
        let all = phase_1_decode::decode_regions(&path, &regions, SeekPolicy::DecodeAll)?;
        ensure!(seek.seeks > 0, "{name}: no seek");
        for (r, (a, b)) in regions.iter().zip(seek.regions.iter().zip(&all.regions)) {
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            eprintln!("{name} {r:?}: seek vs read-all max difference {diff:e}");
            ensure!(diff < 1e-3, "{name} {r:?}: seeking differs by {diff}");
        }
    }
    Ok(())
}

#[test]
fn libopus_and_ffmpeg_decode_the_same_opus_regions() -> Result<()> {
    // Ogg only: in WebM the two place the audio differently (see the test above).
    for name in ["opus in ogg"] {
        let path = path_of(format_named(name)?)?;
        let regions = plan_regions();
        let ours = phase_1_decode::decode_regions(&path, &regions, SeekPolicy::Seek)?;
        let theirs = phase_1_decode_ffmpeg::decode_regions(&path, &regions)?;
        ensure!(ours.decoded_by == DecodedBy::Symphonia);
        ensure!(theirs.decoded_by == DecodedBy::Ffmpeg);
        ensure!(ours.sample_rate == theirs.sample_rate);
        for (r, (a, b)) in regions.iter().zip(ours.regions.iter().zip(&theirs.regions)) {
            ensure!(
                a.len() == b.len(),
                "{name} {r:?}: {} vs {}",
                a.len(),
                b.len()
            );
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            eprintln!("{name} {r:?}: libopus vs ffmpeg max difference {diff:e}");
            ensure!(
                diff < 2e-2,
                "{name} {r:?}: libopus and ffmpeg differ by {diff}"
            );
        }
    }
    Ok(())
}

#[test]
fn formats_sent_to_ffmpeg_are_ones_symphonia_cannot_decode() -> Result<()> {
    for f in FORMATS.iter().filter(|f| f.decoded_by == DecodedBy::Ffmpeg) {
        let e = phase_1_decode::decode_regions_symphonia(
            &path_of(f)?,
            &plan_regions(),
            SeekPolicy::Seek,
        )
        .err()
        .with_context(|| format!("symphonia decoded {}", f.name))?;
        eprintln!("{}: symphonia alone says {e}", f.name);
    }
    Ok(())
}

#[test]
fn a_region_after_the_end_is_a_truncation_for_both_decoders() -> Result<()> {
    for name in ["flac", "wavpack"] {
        let path = path_of(format_named(name)?)?;
        let regions = [
            Region {
                start_s: 10.0,
                len_s: 3.0,
            },
            Region {
                start_s: SECONDS + 5.0,
                len_s: 3.0,
            },
        ];
        match phase_1_decode::decode_regions(&path, &regions, SeekPolicy::Seek) {
            Err(DecodeError::Truncated { ends_s, needed_s }) => {
                ensure!(
                    (needed_s - (SECONDS + 8.0)).abs() < 0.01,
                    "{name}: {needed_s}"
                );
                ensure!(ends_s <= SECONDS + 0.1, "{name}: ends at {ends_s}");
            }
            other => bail!("{name}: expected a truncation, got {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn a_wma_cut_in_half_decodes_its_first_half_and_reports_truncation_after() -> Result<()> {
    let whole = std::fs::read(path_of(format_named("wma")?)?)?;
    let dir = tempfile::tempdir()?;
    let cut = dir.path().join("cut.wma");
    std::fs::write(&cut, &whole[..whole.len() / 2])?;
    let early = Region {
        start_s: 20.0,
        len_s: 3.0,
    };
    let d = phase_1_decode::decode_regions(&cut, &[early], SeekPolicy::Seek)?;
    let (amp, _, _) = tone_fit(&d.regions[0], d.sample_rate, 20.0);
    ensure!((amp / TONE_AMPLITUDE - 1.0).abs() < 0.1, "amplitude {amp}");
    // The pipeline's windows: the ones in the second half are missing.
    match phase_1_decode::decode_regions(&cut, &plan_regions(), SeekPolicy::Seek) {
        Err(e @ DecodeError::Truncated { ends_s, .. }) => {
            eprintln!("cut wma: {e}");
            ensure!(ends_s > 30.0 && ends_s < 40.0, "{e}");
        }
        other => bail!("expected a truncation, got {other:?}"),
    }
    // A window in the second half alone: no audio at all there, an error either way.
    let late = Region {
        start_s: 50.0,
        len_s: 3.0,
    };
    let e = phase_1_decode::decode_regions(&cut, &[late], SeekPolicy::Seek)
        .err()
        .context("decoded a window after the cut")?;
    eprintln!("cut wma, late window alone: {e}");
    Ok(())
}

#[test]
fn garbage_fails_with_the_reasons_of_the_decoders_that_tried() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let noise = fixtures::pseudo_random_bytes(0x5EED, 64 * 1024);
    // A format symphonia reads: symphonia tries, then ffmpeg.
    let flac = dir.path().join("noise.flac");
    std::fs::write(&flac, &noise)?;
    let e = phase_1_decode::decode_regions(&flac, &plan_regions(), SeekPolicy::Seek)
        .err()
        .context("random bytes decoded")?;
    let text = e.to_string();
    eprintln!("garbage flac: {text}");
    ensure!(matches!(e, DecodeError::Fallback { .. }), "{e:?}");
    ensure!(!e.is_unsupported(), "counted as unsupported: {text}");
    let (symphonia, ffmpeg) = text
        .split_once("; ffmpeg cannot decode it either: ")
        .with_context(|| format!("not both reasons: {text}"))?;
    ensure!(
        symphonia.starts_with("unrecognised or unsupported container") && ffmpeg.len() > 10,
        "{text}"
    );
    // A format only ffmpeg reads: ffmpeg's reason.
    let wma = dir.path().join("noise.wma");
    std::fs::write(&wma, &noise)?;
    let e = phase_1_decode::decode_regions(&wma, &plan_regions(), SeekPolicy::Seek)
        .err()
        .context("random bytes decoded")?;
    let text = e.to_string();
    eprintln!("garbage wma: {text}");
    ensure!(!e.is_unsupported(), "counted as unsupported: {text}");
    ensure!(
        text.starts_with("ffmpeg: ") && text.contains("Invalid data"),
        "{text}"
    );
    // A missing file is an open error, whichever decoder would take it.
    for name in ["absent.wma", "absent.flac"] {
        let e = phase_1_decode::decode_regions(
            &dir.path().join(name),
            &plan_regions(),
            SeekPolicy::Seek,
        )
        .err()
        .context("a missing file decoded")?;
        ensure!(matches!(e, DecodeError::Open(_)), "{name}: {e}");
    }
    Ok(())
}

const CHILD_ENV: &str = "CORAL_EMBED_FORMATS_CHILD_FILE";

/// Run by [`without_ffmpeg_on_path_a_wma_is_unsupported_and_says_to_install_ffmpeg`] in a
/// child process whose `PATH` holds no ffmpeg; does nothing when run otherwise.
#[test]
#[ignore = "helper: runs in a child process started by another test"]
fn child_decodes_with_the_path_it_was_given() -> Result<()> {
    let Some(file) = std::env::var_os(CHILD_ENV) else {
        return Ok(());
    };
    match phase_1_decode::decode_regions(Path::new(&file), &plan_regions(), SeekPolicy::Seek) {
        Ok(d) => println!(
            "child decoded: {} regions by {:?}",
            d.regions.len(),
            d.decoded_by
        ),
        Err(e) => {
            println!("child error: {e}");
            println!("child unsupported: {}", e.is_unsupported());
        }
    }
    Ok(())
}

/// Runs [`child_decodes_with_the_path_it_was_given`] on `file` with a `PATH` that holds no
/// ffmpeg; returns its stdout.
fn decode_in_child_without_ffmpeg(file: &Path) -> Result<String> {
    let empty = tempfile::tempdir()?;
    let out = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "child_decodes_with_the_path_it_was_given",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PATH", empty.path())
        .env(CHILD_ENV, file)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

#[test]
fn without_ffmpeg_on_path_a_wma_is_unsupported_and_says_to_install_ffmpeg() -> Result<()> {
    let stdout = decode_in_child_without_ffmpeg(&path_of(format_named("wma")?)?)?;
    ensure!(
        stdout.contains("child error: ffmpeg not found; install ffmpeg to embed wma files\n"),
        "{stdout}"
    );
    ensure!(stdout.contains("child unsupported: true"), "{stdout}");
    // What symphonia reads needs no ffmpeg, Opus included.
    for name in ["flac", "opus in ogg"] {
        let stdout = decode_in_child_without_ffmpeg(&path_of(format_named(name)?)?)?;
        ensure!(
            stdout.contains("child decoded: 8 regions by Symphonia"),
            "{name}: {stdout}"
        );
    }
    Ok(())
}
