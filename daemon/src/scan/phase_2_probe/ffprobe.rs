//! The FFmpeg fallback: formats lofty cannot read (WMA, DSF/DFF, TrueAudio, TAK, AC-3, DTS,
//! Shorten, Matroska/WebM, Ogg FLAC, RF64, stream-written WAV/AIFF, ADIF AAC) and files lofty
//! rejects although their audio is fine are read with `ffprobe -of json`.
//!
//! ffprobe runs as a child process: a crash or hang in its C code cannot take corald down. It
//! gets [`TIME_LIMIT`] (then it is killed), its output is read up to [`OUTPUT_LIMIT`], and
//! stderr up to a few kB for the error message. A file whose headers state no length (Shorten,
//! some WMA and WavPack files) is decoded once by `ffmpeg` to measure it, within
//! [`DECODE_TIME_LIMIT`]. The binaries are `ffprobe` and `ffmpeg` on `PATH`, or those named by
//! the environment variables `CORAL_FFPROBE` and `CORAL_FFMPEG`.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::tags::{TagsBuilder, ffmpeg_field};
use super::{AudioFormat, AudioProperties, ProbeError, ProbedTrack};

/// Longest an ffprobe run may take.
pub const TIME_LIMIT: Duration = Duration::from_secs(10);
/// Longest a decode to measure a file's length may take.
pub const DECODE_TIME_LIMIT: Duration = Duration::from_secs(60);
/// Most bytes of ffprobe's JSON read.
const OUTPUT_LIMIT: u64 = 1 << 20;
/// Most bytes of ffprobe's stderr kept for the error message.
const STDERR_LIMIT: u64 = 4096;

#[derive(Deserialize, Default)]
struct Output {
    #[serde(default)]
    streams: Vec<Stream>,
    format: Option<Format>,
}

#[derive(Deserialize, Default)]
struct Stream {
    codec_type: Option<String>,
    codec_name: Option<String>,
    sample_rate: Option<String>,
    channels: Option<i64>,
    bits_per_raw_sample: Option<String>,
    bits_per_sample: Option<i64>,
    bit_rate: Option<String>,
    duration: Option<String>,
    #[serde(default)]
    tags: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct Format {
    duration: Option<String>,
    bit_rate: Option<String>,
    #[serde(default)]
    tags: serde_json::Map<String, serde_json::Value>,
}

/// Whether the fallback runs at all (the fuzzing entry points turn it off: they test our own
/// parsing, and a child process per input would cut their rate sevenfold).
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the FFmpeg fallback on or off for this process (default: on).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

fn disabled(format: AudioFormat) -> Result<(), ProbeError> {
    if ENABLED.load(Ordering::Relaxed) {
        Ok(())
    } else {
        Err(ProbeError::Unsupported {
            reason: format!("{format} needs FFmpeg, which is turned off"),
        })
    }
}

fn ffprobe_binary() -> std::ffi::OsString {
    std::env::var_os("CORAL_FFPROBE").unwrap_or_else(|| "ffprobe".into())
}

fn ffmpeg_binary() -> std::ffi::OsString {
    std::env::var_os("CORAL_FFMPEG").unwrap_or_else(|| "ffmpeg".into())
}

/// Reads `path` with ffprobe. `format` is what the content sniff decided (it names the file's
/// format in messages and in the database).
pub fn probe(path: &Path, format: AudioFormat) -> Result<ProbedTrack, ProbeError> {
    disabled(format)?;
    let mut cmd = Command::new(ffprobe_binary());
    cmd.args([
        "-v",
        "error",
        "-hide_banner",
        "-of",
        "json",
        "-show_format",
        "-show_streams",
        "-select_streams",
        "a:0",
        "-i",
    ])
    .arg(path);
    let out = run(cmd, format, TIME_LIMIT)?;
    let parsed: Output = serde_json::from_slice(&out).map_err(|e| ProbeError::Corrupt {
        format,
        reason: format!("FFmpeg's report could not be read: {e}"),
    })?;
    track_from(path, format, parsed)
}

/// The length of the first audio stream of `path`, found by decoding it with FFmpeg (for files
/// whose headers state none: Shorten, WMA and WavPack written as streams).
pub fn decoded_duration(path: &Path, format: AudioFormat) -> Result<f64, ProbeError> {
    disabled(format)?;
    let mut cmd = Command::new(ffmpeg_binary());
    cmd.args(["-nostdin", "-v", "error", "-i"]).arg(path).args([
        "-map",
        "0:a:0",
        "-f",
        "null",
        "-progress",
        "pipe:1",
        "-",
    ]);
    let out = run(cmd, format, DECODE_TIME_LIMIT)?;
    let text = String::from_utf8_lossy(&out);
    text.lines()
        .filter_map(|l| l.strip_prefix("out_time_us="))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .next_back()
        .map(|us| us / 1e6)
        .filter(|s| s.is_finite() && *s > 0.0)
        .ok_or_else(|| ProbeError::Corrupt {
            format,
            reason: "FFmpeg decodes no audio from it".into(),
        })
}

fn run(mut cmd: Command, format: AudioFormat, limit: Duration) -> Result<Vec<u8>, ProbeError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ProbeError::Unsupported {
                    reason: format!(
                        "{format} needs FFmpeg, which is not installed (install the ffmpeg package)"
                    ),
                }
            } else {
                ProbeError::Unsupported {
                    reason: format!("{format}: could not start ffprobe: {e}"),
                }
            }
        })?;
    // Read both pipes on threads so a full pipe cannot stall the child; bounded reads.
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || read_bounded(stdout, OUTPUT_LIMIT));
    let err_reader = std::thread::spawn(move || read_bounded(stderr, STDERR_LIMIT));
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() >= limit => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let Some(status) = status else {
        return Err(ProbeError::Corrupt {
            format,
            reason: format!(
                "FFmpeg did not finish reading it within {} s",
                limit.as_secs()
            ),
        });
    };
    if !status.success() {
        let text = String::from_utf8_lossy(&err);
        let first = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("no reason given");
        // ffprobe names the file in its message: keep the reason only.
        let reason = first.rsplit(": ").next().unwrap_or(first).to_owned();
        return Err(ProbeError::Corrupt {
            format,
            reason: format!("FFmpeg cannot read it: {reason}"),
        });
    }
    Ok(out)
}

fn read_bounded<R: Read>(pipe: Option<R>, limit: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(p) = pipe {
        let mut limited = p.take(limit);
        let _ = limited.read_to_end(&mut buf);
        // Drain the rest so the child never blocks on a full pipe.
        let mut rest = limited.into_inner();
        let _ = std::io::copy(&mut rest, &mut std::io::sink());
    }
    buf
}

fn number<T: std::str::FromStr>(s: Option<&String>) -> Option<T> {
    s.and_then(|s| s.trim().parse::<T>().ok())
}

fn track_from(path: &Path, format: AudioFormat, out: Output) -> Result<ProbedTrack, ProbeError> {
    let Some(stream) = out
        .streams
        .into_iter()
        .find(|s| s.codec_type.as_deref() == Some("audio"))
    else {
        return Err(ProbeError::NotAudio {
            reason: format!("{format} container without an audio track"),
        });
    };
    let fmt = out.format.unwrap_or_default();
    let secs = number::<f64>(stream.duration.as_ref())
        .or_else(|| number::<f64>(fmt.duration.as_ref()))
        .filter(|d| d.is_finite() && *d > 0.0);
    let secs = match secs {
        Some(secs) => secs,
        None => decoded_duration(path, format)?,
    };
    let positive = |v: Option<i64>| v.filter(|v| *v > 0).and_then(|v| i32::try_from(v).ok());
    let bitrate = number::<i64>(stream.bit_rate.as_ref())
        .or_else(|| number::<i64>(fmt.bit_rate.as_ref()))
        .map(|b| b / 1000);
    let mut builder = TagsBuilder::default();
    // Container tags first, then the stream's (Ogg and Matroska keep them on the stream).
    for tags in [&fmt.tags, &stream.tags] {
        for (key, value) in tags {
            if let (Some(field), Some(text)) = (ffmpeg_field(&key.to_lowercase()), value.as_str()) {
                builder.add(field, text);
            }
        }
        builder.next_source();
    }
    if builder.truncated {
        tracing::warn!(track_path = %path.display(), "over-long tag value truncated");
    }
    Ok(ProbedTrack {
        format,
        audio: AudioProperties {
            codec: stream.codec_name.filter(|c| !c.is_empty() && c.len() < 64),
            duration_ms: (secs * 1000.0).round().min(i64::MAX as f64) as i64,
            sample_rate: positive(number::<i64>(stream.sample_rate.as_ref())),
            channels: positive(stream.channels),
            bit_depth: positive(number::<i64>(stream.bits_per_raw_sample.as_ref()))
                .or_else(|| positive(stream.bits_per_sample)),
            bitrate_kbps: positive(bitrate),
        },
        tags: builder.build(),
    })
}
