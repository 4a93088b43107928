//! Stage 1, decode, fallback: FFmpeg as a child process, for what symphonia cannot read (a
//! container it has no reader for: WMA/ASF, APE, WavPack, Musepack, TrueAudio, DSF/DFF, TAK,
//! Shorten, raw AC-3, …) or a codec it has no decoder for (AC-3 in Matroska, Speex, …).
//!
//! One `ffmpeg` process per file decodes every region: each region is an input of its own
//! (`-ss START -t LENGTH -i FILE`, so FFmpeg seeks to it), written as 32-bit float WAV at the
//! stream's own sample rate and channels into a private scratch directory, one file per region;
//! corald downmixes it (channel mean, as for symphonia). The result has the same shape and
//! rules as symphonia's ([`super::phase_1_decode::decode_regions`]): regions in the order asked,
//! each exactly `ceil(len × rate)` frames starting at `round(start × rate)`, silence before the
//! start of the track and after its end, and a region with less than half of it real audio is a
//! truncated file. Where the audio sits is FFmpeg's view of the file: for codecs whose encoder
//! delay FFmpeg does not remove (WMA, AC-3), that is up to ≈50 ms later than the source.
//!
//! Limits: the process gets [`TIMEOUT_PER_REGION`] per region in all and is killed after that;
//! each output file is capped (`-fs`) at one second more than its region at 384 kHz and 8
//! channels; stderr is kept up to 4 KiB and goes into the error message. Only the `file`
//! protocol is allowed, so a file cannot make FFmpeg open a network address. `ffmpeg` is looked
//! up on `PATH` at each call (an FFmpeg installed later is used without a restart).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::phase_1_decode::{
    DecodeError, DecodedBy, DecodedRegions, MIN_REGION_COVERAGE, Region, check_request,
    check_sample_rate,
};

/// Time the `ffmpeg` process gets per region; it is killed when all of it is spent.
pub const TIMEOUT_PER_REGION: Duration = Duration::from_secs(30);
/// Asked for beyond each region, so that rounding in FFmpeg's resampler never leaves a region
/// a few frames short in the middle of a track (the excess is dropped).
const EXTRA_S: f64 = 0.05;
/// Stderr kept for the error message.
const STDERR_KEEP: usize = 4096;
/// Where to look for `ffmpeg` when `PATH` is not set.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The `ffmpeg` executable on `path_var` (a `PATH` value; `None`: the default system path).
pub fn find_ffmpeg(path_var: Option<&OsStr>) -> Option<PathBuf> {
    let search = path_var.unwrap_or(OsStr::new(DEFAULT_PATH));
    std::env::split_paths(search)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join("ffmpeg"))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// What to call the files of `path` in "install ffmpeg to embed … files".
fn kind_of(path: &Path) -> String {
    match path.extension().and_then(|e| e.to_str()) {
        Some(ext) if !ext.is_empty() && ext.len() <= 8 => ext.to_ascii_lowercase(),
        _ => "such".to_owned(),
    }
}

/// Decode `regions` of the file at `path` with the `ffmpeg` found on `PATH`.
pub fn decode_regions(path: &Path, regions: &[Region]) -> Result<DecodedRegions, DecodeError> {
    check_request(regions)?;
    let path_var = std::env::var_os("PATH");
    let ffmpeg = find_ffmpeg(path_var.as_deref())
        .ok_or_else(|| DecodeError::FfmpegMissing(kind_of(path)))?;
    decode_regions_with(&ffmpeg, path, regions)
}

/// Where FFmpeg reads a region from and for how long (seconds): the part after the track's
/// start, if there is one.
fn input_span(r: &Region) -> Option<(f64, f64)> {
    let end = r.start_s + r.len_s;
    (end > 0.0).then(|| (r.start_s.max(0.0), end - r.start_s.max(0.0)))
}

/// Decode `regions` of the file at `path` with the `ffmpeg` executable `ffmpeg`.
pub fn decode_regions_with(
    ffmpeg: &Path,
    path: &Path,
    regions: &[Region],
) -> Result<DecodedRegions, DecodeError> {
    check_request(regions)?;
    let scratch = tempfile::Builder::new()
        .prefix("corald-ffmpeg-")
        .tempdir()
        .map_err(|e| DecodeError::Ffmpeg(format!("cannot create a scratch directory: {e}")))?;
    let out_path = |k: usize| scratch.path().join(format!("{k}.wav"));
    // `file:` keeps a name such as `concat:…` or `http:…` a plain file name.
    let mut url = OsString::from("file:");
    url.push(path.as_os_str());

    let mut cmd = Command::new(ffmpeg);
    cmd.args([
        "-nostdin",
        "-hide_banner",
        "-nostats",
        "-loglevel",
        "error",
        "-y",
    ]);
    // (region, seconds asked) per input; a region wholly before the track needs none.
    let mut inputs: Vec<(Option<usize>, f64)> = Vec::new();
    for (i, r) in regions.iter().enumerate() {
        let Some((from, seconds)) = input_span(r) else {
            continue;
        };
        cmd.args(["-protocol_whitelist", "file", "-ss"])
            .arg(format!("{from:.6}"))
            .arg("-t")
            .arg(format!("{:.6}", seconds + EXTRA_S))
            .arg("-i")
            .arg(&url);
        inputs.push((Some(i), seconds + EXTRA_S));
    }
    // Nothing to decode (every region lies before the track): still open the file, as
    // symphonia does, so an undecodable file fails either way, and learn its sample rate.
    if inputs.is_empty() {
        cmd.args(["-protocol_whitelist", "file", "-t", "0.1", "-i"])
            .arg(&url);
        inputs.push((None, 0.1));
    }
    let caps: Vec<u64> = inputs.iter().map(|&(_, s)| output_cap(s)).collect();
    for (k, cap) in caps.iter().enumerate() {
        cmd.arg("-map")
            .arg(format!("{k}:a:0"))
            .args([
                "-map_metadata",
                "-1",
                "-c:a",
                "pcm_f32le",
                "-f",
                "wav",
                "-fs",
            ])
            .arg(cap.to_string())
            .arg(out_path(k));
    }
    let timeout = TIMEOUT_PER_REGION * u32::try_from(inputs.len()).unwrap_or(u32::MAX);
    let (status, stderr) = run(&mut cmd, path, timeout)?;
    if !status.success() {
        return Err(DecodeError::Ffmpeg(if stderr.is_empty() {
            format!("ffmpeg exited with {status}")
        } else {
            stderr
        }));
    }
    if !stderr.is_empty() {
        tracing::debug!(path = %path.display(), stderr = %stderr, "ffmpeg decoded with complaints");
    }

    // Every output, downmixed; all at one sample rate.
    let mut decoded: Vec<Option<Vec<f32>>> = vec![None; regions.len()];
    let mut sample_rate = None;
    for (k, (&(region, _), &cap)) in inputs.iter().zip(&caps).enumerate() {
        let pcm = read_wav_f32(&out_path(k), cap)?;
        match sample_rate {
            None => sample_rate = Some(pcm.rate),
            Some(r) if r != pcm.rate => {
                return Err(DecodeError::Stream(format!(
                    "sample rate changes between regions ({r} → {} Hz)",
                    pcm.rate
                )));
            }
            Some(_) => {}
        }
        if let Some(slot) = region.and_then(|i| decoded.get_mut(i)) {
            *slot = Some(pcm.mono);
        }
    }
    let rate_hz = sample_rate.ok_or(DecodeError::NoSampleRate)?;
    check_sample_rate(rate_hz)?;
    let rate = f64::from(rate_hz);

    // Place each region as symphonia's decoder does: silence before frame 0 and after the end.
    let mut out = Vec::with_capacity(regions.len());
    let mut decoded_frames = 0u64;
    let mut last_frame_seen = 0i64;
    let mut seeks = 0u32;
    for (r, mono) in regions.iter().zip(&decoded) {
        let start = (r.start_s * rate).round() as i64;
        let len = (r.len_s * rate).ceil() as usize;
        let prefix = usize::try_from(-start.min(0)).unwrap_or(0).min(len);
        let mut buf = vec![0.0f32; len];
        let got = match mono {
            Some(m) => {
                let n = m.len().min(len - prefix);
                buf[prefix..prefix + n].copy_from_slice(&m[..n]);
                n
            }
            None => 0,
        };
        decoded_frames += mono.as_ref().map_or(0, |m| m.len() as u64);
        if start > 0 {
            seeks += 1;
        }
        if got > 0 {
            last_frame_seen = last_frame_seen.max(start.max(0) + got as i64);
        }
        if ((prefix + got) as f64) < len as f64 * MIN_REGION_COVERAGE {
            return Err(DecodeError::Truncated {
                ends_s: last_frame_seen as f64 / rate,
                needed_s: (start + len as i64) as f64 / rate,
            });
        }
        out.push(buf);
    }
    Ok(DecodedRegions {
        sample_rate: rate_hz,
        regions: out,
        seeks,
        decoded_frames,
        damaged_packets: 0,
        decoded_by: DecodedBy::Ffmpeg,
    })
}

/// The most bytes an output of `seconds` may take: a second more at 384 kHz, 8 channels.
fn output_cap(seconds: f64) -> u64 {
    const BYTES_PER_SECOND: f64 = 384_000.0 * 8.0 * 4.0;
    ((seconds + 1.0) * BYTES_PER_SECOND) as u64 + 4096
}

/// One output: mono (channel mean, non-finite samples silenced) at `rate`.
#[derive(Debug)]
struct Pcm {
    rate: u32,
    mono: Vec<f32>,
}

/// Read FFmpeg's 32-bit float WAV output at `path` (at most `cap` bytes) and downmix it.
fn read_wav_f32(path: &Path, cap: u64) -> Result<Pcm, DecodeError> {
    let file = File::open(path)
        .map_err(|e| DecodeError::Ffmpeg(format!("ffmpeg wrote no output ({e})")))?;
    let mut bytes = Vec::new();
    file.take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| DecodeError::Ffmpeg(format!("cannot read ffmpeg's output: {e}")))?;
    if bytes.len() as u64 > cap {
        return Err(DecodeError::Ffmpeg(format!(
            "ffmpeg wrote more than the {cap} bytes expected"
        )));
    }
    parse_wav_f32(&bytes).map_err(|e| DecodeError::Ffmpeg(format!("unexpected output: {e}")))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// A RIFF/WAVE file of 32-bit IEEE float samples (format 3, or extensible with that
/// sub-format), downmixed to mono.
fn parse_wav_f32(b: &[u8]) -> Result<Pcm, String> {
    if b.get(0..4) != Some(b"RIFF") || b.get(8..12) != Some(b"WAVE") {
        return Err("not a WAV file".into());
    }
    let mut at = 12usize;
    let mut fmt: Option<(u16, u32)> = None; // (channels, rate)
    while let (Some(id), Some(size)) = (b.get(at..at + 4), u32_at(b, at + 4)) {
        let body = at + 8;
        let rest = b.len().saturating_sub(body);
        // An unfinished size (0 or 0xFFFFFFFF) or one past the end: the rest of the file.
        let size = match usize::try_from(size) {
            Ok(s) if s > 0 && s <= rest => s,
            _ => rest,
        };
        match id {
            b"fmt " => {
                let tag = u16_at(b, body).ok_or("short fmt chunk")?;
                let channels = u16_at(b, body + 2).ok_or("short fmt chunk")?;
                let rate = u32_at(b, body + 4).ok_or("short fmt chunk")?;
                let bits = u16_at(b, body + 14).ok_or("short fmt chunk")?;
                let float = match tag {
                    3 => true,
                    // WAVE_FORMAT_EXTENSIBLE: the sub-format GUID starts with the format tag.
                    0xFFFE => u16_at(b, body + 24) == Some(3),
                    _ => false,
                };
                if !float || bits != 32 {
                    return Err(format!(
                        "format {tag:#x} with {bits} bits, not 32-bit float"
                    ));
                }
                if channels == 0 || rate == 0 {
                    return Err(format!("{channels} channels at {rate} Hz"));
                }
                fmt = Some((channels, rate));
            }
            b"data" => {
                let (channels, rate) = fmt.ok_or("data before fmt")?;
                let data = b.get(body..body + size).ok_or("short data chunk")?;
                let ch = usize::from(channels);
                let scale = 1.0 / f32::from(channels);
                let mono = data
                    .chunks_exact(4 * ch)
                    .map(|frame| {
                        let sum: f32 = frame
                            .chunks_exact(4)
                            .map(|s| f32::from_le_bytes([s[0], s[1], s[2], s[3]]))
                            .sum();
                        if sum.is_finite() { sum * scale } else { 0.0 }
                    })
                    .collect();
                return Ok(Pcm { rate, mono });
            }
            _ => {}
        }
        at = body.saturating_add(size).saturating_add(size & 1);
    }
    Err("no audio data".into())
}

/// Kills and reaps the child unless it was waited for.
struct Reaper(Option<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Run `cmd` to its end or `timeout`; returns its status and a one-line digest of its stderr.
fn run(
    cmd: &mut Command,
    path: &Path,
    timeout: Duration,
) -> Result<(ExitStatus, String), DecodeError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => DecodeError::FfmpegMissing(kind_of(path)),
            _ => DecodeError::Ffmpeg(format!("cannot run ffmpeg: {e}")),
        })?;
    // Read stderr as it comes, so a chatty process never blocks on a full pipe.
    let reader = child.stderr.take().map(|mut err| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                match err.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        let room = STDERR_KEEP.saturating_sub(kept.len());
                        kept.extend_from_slice(&chunk[..n.min(room)]);
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            kept
        })
    });
    let mut reaper = Reaper(Some(child));
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        let Some(c) = reaper.0.as_mut() else {
            return Err(DecodeError::Ffmpeg("lost the ffmpeg process".into()));
        };
        match c.try_wait() {
            Ok(Some(status)) => {
                reaper.0 = None;
                break Some(status);
            }
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(DecodeError::Ffmpeg(format!("cannot wait for ffmpeg: {e}"))),
        }
    };
    // Killed (on timeout) by the reaper before stderr is collected: its pipe then closes.
    drop(reaper);
    let stderr = reader
        .and_then(|r| r.join().ok())
        .map(|bytes| digest(&bytes))
        .unwrap_or_default();
    match status {
        Some(status) => Ok((status, stderr)),
        None => Err(DecodeError::Ffmpeg(format!(
            "no result within {} s, killed{}",
            timeout.as_secs(),
            if stderr.is_empty() {
                String::new()
            } else {
                format!(" ({stderr})")
            }
        ))),
    }
}

/// Stderr as one line: its non-empty lines joined by "; ".
fn digest(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut line = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if bytes.len() >= STDERR_KEEP {
        line.push_str(" …");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffmpeg_is_not_found_on_a_path_without_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path_var = std::env::join_paths([dir.path()]).expect("path");
        assert_eq!(find_ffmpeg(Some(&path_var)), None);
        assert_eq!(find_ffmpeg(Some(OsStr::new(""))), None);
    }

    #[test]
    fn a_non_executable_file_named_ffmpeg_is_not_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("ffmpeg");
        std::fs::write(&fake, b"#!/bin/sh\n").expect("write");
        let path_var = std::env::join_paths([dir.path()]).expect("path");
        assert_eq!(find_ffmpeg(Some(&path_var)), None);
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(find_ffmpeg(Some(&path_var)), Some(fake));
    }

    #[test]
    fn the_missing_ffmpeg_message_names_the_format() {
        let e = DecodeError::FfmpegMissing(kind_of(Path::new("/music/a/Track.WMA")));
        assert_eq!(
            e.to_string(),
            "ffmpeg not found; install ffmpeg to embed wma files"
        );
        assert!(e.is_unsupported());
    }

    #[test]
    fn impossible_regions_are_refused_before_anything_runs() {
        for r in [
            Region {
                start_s: f64::NAN,
                len_s: 1.0,
            },
            Region {
                start_s: 0.0,
                len_s: 1e300,
            },
        ] {
            let e = decode_regions_with(Path::new("/nonexistent/ffmpeg"), Path::new("x.wma"), &[r])
                .unwrap_err();
            assert!(matches!(e, DecodeError::Request(_)), "{e}");
        }
    }

    #[test]
    fn stderr_becomes_one_line() {
        assert_eq!(digest(b"\n a: bad\r\n\nb: worse \n"), "a: bad; b: worse");
        assert!(digest(&[b'x'; STDERR_KEEP]).ends_with(" …"));
    }

    #[test]
    fn a_hanging_child_is_killed_at_the_deadline() {
        // A stand-in that never finishes: `sleep` (present on every system that runs corald).
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let t = Instant::now();
        let e = run(&mut cmd, Path::new("x.wma"), Duration::from_millis(200)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(e.to_string().contains("killed"), "{e}");
    }

    fn wav(tag: u16, channels: u16, rate: u32, samples: &[f32]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"RIFF\0\0\0\0WAVE");
        b.extend_from_slice(b"LIST\x03\0\0\0abc\0"); // odd size, padded
        b.extend_from_slice(b"fmt \x10\0\0\0");
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&channels.to_le_bytes());
        b.extend_from_slice(&rate.to_le_bytes());
        b.extend_from_slice(&(rate * 4 * u32::from(channels)).to_le_bytes());
        b.extend_from_slice(&(4 * channels).to_le_bytes());
        b.extend_from_slice(&32u16.to_le_bytes());
        b.extend_from_slice(b"data");
        b.extend_from_slice(&(4 * samples.len() as u32).to_le_bytes());
        for v in samples {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    #[test]
    fn wav_output_is_downmixed_to_the_channel_mean_and_non_finite_frames_silenced() {
        let b = wav(3, 2, 44_100, &[0.5, 0.25, f32::NAN, 1.0, -1.0, -0.5]);
        let pcm = parse_wav_f32(&b).expect("parses");
        assert_eq!(pcm.rate, 44_100);
        assert_eq!(pcm.mono, [0.375, 0.0, -0.75]);
        // A partial last frame is dropped; an unfinished data size means "to the end".
        let mut b = wav(3, 2, 8_000, &[0.5, 0.5, 0.25]);
        let data = b.len() - 16;
        b[data..data + 4].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(parse_wav_f32(&b).expect("parses").mono, [0.5]);
    }

    #[test]
    fn wav_output_that_is_not_32_bit_float_is_refused() {
        assert!(parse_wav_f32(&wav(1, 1, 8_000, &[0.0])).is_err());
        assert!(parse_wav_f32(&wav(3, 0, 8_000, &[0.0])).is_err());
        assert!(parse_wav_f32(b"RIFF").is_err());
        assert!(parse_wav_f32(&[0u8; 64]).is_err());
    }

    #[test]
    fn output_over_the_cap_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("o.wav");
        let b = wav(3, 1, 8_000, &[0.0; 100]);
        std::fs::write(&p, &b).expect("write");
        assert!(read_wav_f32(&p, b.len() as u64).is_ok());
        assert!(read_wav_f32(&p, b.len() as u64 - 1).is_err());
    }
}
