//! Stage 1, decode: open a file with symphonia and decode only the stretches of audio the
//! embedding windows need, seeking from one to the next (a few seconds per window instead of
//! the whole track). Streams that cannot seek fall back to reading the whole file, still
//! decoding only the packets near a window. Output: one mono (channel mean) `f32` buffer per
//! requested region, at the file's own sample rate.
//!
//! Codecs: symphonia's own decoders (MP3, AAC, ALAC, FLAC, Vorbis, PCM, ADPCM) and Opus
//! through libopus (`symphonia-adapter-libopus`), in the containers symphonia reads (MP3,
//! MP4/M4A, Ogg, FLAC, WAV, AIFF, Matroska/WebM). What symphonia cannot open, or has no
//! decoder for, goes to FFmpeg as a child process ([`super::phase_1_decode_ffmpeg`]: WMA,
//! APE, WavPack, Musepack, TrueAudio, DSF/DFF, TAK, Shorten, AC-3, Speex, …), with the same
//! output and rules; without FFmpeg such a track is reported as unsupported (skipped).
//!
//! Never panics on input: damaged packets are skipped (up to a limit), and a file that ends long
//! before its header says is reported as truncated.

use std::fs::File;
use std::path::Path;
use std::sync::LazyLock;

use symphonia::core::codecs::audio::well_known::CODEC_ID_OPUS;
use symphonia::core::codecs::audio::{AudioCodecId, AudioDecoder, AudioDecoderOptions};
use symphonia::core::codecs::registry::CodecRegistry;
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, FormatReader, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::units::TimeBase;
use symphonia_adapter_libopus::OpusDecoder;

use super::phase_1_decode_ffmpeg;
use reader::{RegionFill, RegionReader};

mod reader;

/// Seek instead of decoding through when the next region starts this far ahead.
const SEEK_GAP_S: f64 = 3.0;
/// Decode this much before a region after a seek or a skip, so decoders with state (MP3's bit
/// reservoir, Vorbis/AAC overlap) have settled when the region starts.
const WARMUP_S: f64 = 0.5;
/// Damaged packets tolerated per file before giving up.
const MAX_DAMAGED_PACKETS: u64 = 200;
/// A region needs at least this share of real audio; less means the file is truncated.
pub(super) const MIN_REGION_COVERAGE: f64 = 0.5;
/// The highest sample rate believed: FLAC's limit (20 bits), above every PCM rate in use
/// (768 kHz) and the PCM FFmpeg makes of DSD. A header stating more is damaged; believing it
/// would size each region's buffer by it (4 GHz × a 10 s window is 160 GB).
pub const MAX_SAMPLE_RATE: u32 = 1_048_575;

/// symphonia's decoders and libopus for Opus.
static CODECS: LazyLock<CodecRegistry> = LazyLock::new(|| {
    let mut registry = CodecRegistry::new();
    symphonia::default::register_enabled_codecs(&mut registry);
    registry.register_audio_decoder::<OpusDecoder>();
    registry
});

/// A stretch of audio to decode, in seconds from the start of the track. May start before 0
/// (that part is silence).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Region {
    pub start_s: f64,
    pub len_s: f64,
}

/// How to reach the regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeekPolicy {
    /// Seek to each region when the stream allows it (the default).
    Seek,
    /// Read the stream from the start, decoding only near the regions (what happens anyway
    /// when seeking fails).
    Sequential,
    /// Read and decode everything from the start (a reference for comparisons).
    DecodeAll,
}

/// Which decoder produced a [`DecodedRegions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodedBy {
    /// symphonia (libopus for Opus), in-process.
    Symphonia,
    /// The FFmpeg fallback, a child process.
    Ffmpeg,
}

/// The decoded regions, mono, at `sample_rate`, in the order requested.
#[derive(Debug, Clone)]
pub struct DecodedRegions {
    pub sample_rate: u32,
    pub regions: Vec<Vec<f32>>,
    /// Seeks performed.
    pub seeks: u32,
    /// Frames that went through the decoder (for throughput figures).
    pub decoded_frames: u64,
    /// Damaged packets skipped.
    pub damaged_packets: u64,
    pub decoded_by: DecodedBy,
}

/// Why a file could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("cannot open: {0}")]
    Open(std::io::Error),
    #[error("unrecognised or unsupported container: {0}")]
    Format(String),
    #[error("no audio track")]
    NoAudioTrack,
    #[error("no decoder for {0}")]
    NoDecoder(String),
    #[error("the stream does not state its sample rate")]
    NoSampleRate,
    #[error("the stream states a sample rate of {0} Hz, over {max} Hz (a damaged header?)", max = MAX_SAMPLE_RATE)]
    ImplausibleSampleRate(u32),
    #[error("cannot decode: {0}")]
    Stream(String),
    #[error("too many damaged packets ({0})")]
    Damaged(u64),
    #[error("the audio ends at {ends_s:.1} s but a window needs {needed_s:.1} s (truncated file?)")]
    Truncated { ends_s: f64, needed_s: f64 },
    #[error("invalid window request: {0}")]
    Request(String),
    /// symphonia cannot decode the file and FFmpeg, which might, is not installed.
    #[error("ffmpeg not found; install ffmpeg to embed {0} files")]
    FfmpegMissing(String),
    #[error("ffmpeg: {0}")]
    Ffmpeg(String),
    #[error("{symphonia}; ffmpeg cannot decode it either: {ffmpeg}")]
    Fallback { symphonia: String, ffmpeg: String },
}

impl DecodeError {
    /// True when the file is fine but corald cannot decode its codec: the track is skipped,
    /// not failed.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            DecodeError::NoDecoder(_) | DecodeError::FfmpegMissing(_)
        )
    }

    /// True when FFmpeg may read what symphonia could not: an unknown container, a codec
    /// without a decoder, no audio track or sample rate that symphonia can see.
    fn ffmpeg_may_help(&self) -> bool {
        matches!(
            self,
            DecodeError::Format(_)
                | DecodeError::NoDecoder(_)
                | DecodeError::NoAudioTrack
                | DecodeError::NoSampleRate
        )
    }
}

fn codec_name(id: AudioCodecId) -> String {
    match CODECS.get_audio_decoder(id) {
        Some(d) => d.codec.info.short_name.to_owned(),
        None => format!("codec {id}"),
    }
}

/// Conversions between a track's timestamps and frame indices.
#[derive(Debug, Clone, Copy)]
struct Clock {
    rate: u32,
    time_base: Option<TimeBase>,
}

impl Clock {
    fn ts_to_frame(&self, ts: i64) -> i64 {
        match self.time_base {
            None => ts,
            Some(tb) => {
                let v = i128::from(ts) * i128::from(tb.numer.get()) * i128::from(self.rate)
                    / i128::from(tb.denom.get());
                i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
            }
        }
    }

    fn frame_to_ts(&self, frame: i64) -> i64 {
        match self.time_base {
            None => frame,
            Some(tb) => {
                let den = i128::from(tb.numer.get()) * i128::from(self.rate);
                let v = i128::from(frame) * i128::from(tb.denom.get()) / den.max(1);
                i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
            }
        }
    }
}

/// A file ready to decode.
struct Opened {
    format: Box<dyn FormatReader>,
    decoder: Box<dyn AudioDecoder>,
    track_id: u32,
    clock: Clock,
    /// Opus: the pre-skip, in frames. Ogg Opus timestamps count it (the granule position
    /// includes it) and libopus drops it from the first packet it decodes, so packet times
    /// are corrected by it (see `decode_regions_symphonia`).
    opus_pre_skip: Option<i64>,
}

/// The pre-skip of an Opus stream: from its identification header (`OpusHead`, the codec's
/// extra data in Ogg and Matroska), else the track's delay.
fn opus_pre_skip(extra_data: Option<&[u8]>, track_delay: Option<u32>) -> i64 {
    match extra_data {
        Some(head) if head.len() >= 12 && head.starts_with(b"OpusHead") => {
            i64::from(u16::from_le_bytes([head[10], head[11]]))
        }
        _ => i64::from(track_delay.unwrap_or(0)),
    }
}

/// Open, probe and set up a decoder for the default audio track.
fn open(path: &Path) -> Result<Opened, DecodeError> {
    let file = File::open(path).map_err(DecodeError::Open)?;
    let mss = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    let format = symphonia::default::get_probe()
        .probe(
            &hint,
            mss,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(|e| DecodeError::Format(e.to_string()))?;
    let track = format
        .default_track(TrackType::Audio)
        .ok_or(DecodeError::NoAudioTrack)?;
    let track_id = track.id;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or(DecodeError::NoAudioTrack)?
        .clone();
    let rate = params.sample_rate.ok_or(DecodeError::NoSampleRate)?;
    check_sample_rate(rate)?;
    let clock = Clock {
        rate,
        time_base: track.time_base,
    };
    let opus_pre_skip = (params.codec == CODEC_ID_OPUS)
        .then(|| opus_pre_skip(params.extra_data.as_deref(), track.delay));
    let registry = &*CODECS;
    if registry.get_audio_decoder(params.codec).is_none() {
        return Err(DecodeError::NoDecoder(codec_name(params.codec)));
    }
    let decoder = registry
        .make_audio_decoder(&params, &AudioDecoderOptions::default())
        .map_err(|e| match e {
            SymError::Unsupported(_) => DecodeError::NoDecoder(codec_name(params.codec)),
            other => DecodeError::Stream(other.to_string()),
        })?;
    Ok(Opened {
        format,
        decoder,
        track_id,
        clock,
        opus_pre_skip,
    })
}

/// Every region finite, positive and under an hour long.
/// A sample rate that can size a buffer: not zero, not over [`MAX_SAMPLE_RATE`].
pub(super) fn check_sample_rate(rate: u32) -> Result<(), DecodeError> {
    match rate {
        0 => Err(DecodeError::NoSampleRate),
        r if r > MAX_SAMPLE_RATE => Err(DecodeError::ImplausibleSampleRate(r)),
        _ => Ok(()),
    }
}

pub(super) fn check_request(regions: &[Region]) -> Result<(), DecodeError> {
    for r in regions {
        if !(r.start_s.is_finite() && r.len_s.is_finite() && r.len_s > 0.0 && r.len_s < 3600.0) {
            return Err(DecodeError::Request(format!("{r:?}")));
        }
    }
    Ok(())
}

/// Extensions of formats symphonia has no reader for. Such files go to FFmpeg directly:
/// symphonia's probe, which scans for any format's sync pattern, can take one for MP3 and then
/// fail on "damaged packets".
const FFMPEG_ONLY_EXTENSIONS: [&str; 22] = [
    "wma", "asf", "wv", "ape", "mpc", "mp+", "mpp", "tta", "dsf", "dff", "tak", "ofr", "ofs",
    "shn", "ac3", "eac3", "dts", "spx", "w64", "caf", "amr", "ra",
];

fn ffmpeg_only(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        FFMPEG_ONLY_EXTENSIONS
            .iter()
            .any(|x| x.eq_ignore_ascii_case(e))
    })
}

/// Decode `regions` (sorted by start or not) of the file at `path`: with symphonia, and with
/// FFmpeg when symphonia cannot open the file or has no decoder for its codec, or when the
/// file's extension names a format symphonia has no reader for. `policy` applies to symphonia;
/// FFmpeg always seeks to each region.
pub fn decode_regions(
    path: &Path,
    regions: &[Region],
    policy: SeekPolicy,
) -> Result<DecodedRegions, DecodeError> {
    if ffmpeg_only(path) {
        check_request(regions)?;
        File::open(path).map_err(DecodeError::Open)?;
        return phase_1_decode_ffmpeg::decode_regions(path, regions);
    }
    match decode_regions_symphonia(path, regions, policy) {
        Err(e) if e.ffmpeg_may_help() => {
            tracing::debug!(path = %path.display(), error = %e, "symphonia cannot decode: ffmpeg");
            match phase_1_decode_ffmpeg::decode_regions(path, regions) {
                Err(DecodeError::Ffmpeg(ffmpeg)) => Err(DecodeError::Fallback {
                    symphonia: e.to_string(),
                    ffmpeg,
                }),
                other => other,
            }
        }
        other => other,
    }
}

/// Like [`decode_regions`], with symphonia only (no FFmpeg fallback).
pub fn decode_regions_symphonia(
    path: &Path,
    regions: &[Region],
    policy: SeekPolicy,
) -> Result<DecodedRegions, DecodeError> {
    check_request(regions)?;
    let mut reader = RegionReader::new(path, open(path)?, policy);
    let rate = f64::from(reader.clock.rate);
    let mut fill = RegionFill::new(regions, rate);
    let warmup = (WARMUP_S * rate) as i64;

    while let Some(need) = fill.next_needed_frame() {
        reader.seek_near(need - warmup);
        let Some(packet) = reader.next_packet()? else {
            break;
        };
        let p0 = reader.clock.ts_to_frame(
            packet
                .pts
                .get()
                .saturating_add(packet.trim_start.get() as i64),
        );
        let p_len = reader
            .clock
            .ts_to_frame(packet.dur.get().min(i64::MAX as u64) as i64);
        if reader.rewound_after_late_landing(p0, need)? {
            continue;
        }
        // Far before the next region: demux only (no decode), and reset the decoder before
        // decoding again, as after a seek.
        if policy != SeekPolicy::DecodeAll && p0.saturating_add(p_len) < need - warmup {
            reader.skip_to(p0.saturating_add(p_len));
            continue;
        }
        if let Some(p0) = reader.decode_mono(&packet, p0, p_len)? {
            fill.copy(p0, &reader.mono);
        }
    }
    let regions = fill.finish(reader.last_frame_seen, rate)?;
    Ok(DecodedRegions {
        sample_rate: reader.clock.rate,
        regions,
        seeks: reader.seeks,
        decoded_frames: reader.decoded_frames,
        damaged_packets: reader.damaged,
        decoded_by: DecodedBy::Symphonia,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_an_open_error() {
        let e = decode_regions(
            Path::new("/nonexistent/a.flac"),
            &[Region {
                start_s: 0.0,
                len_s: 1.0,
            }],
            SeekPolicy::Seek,
        )
        .unwrap_err();
        assert!(matches!(e, DecodeError::Open(_)), "{e}");
    }

    #[test]
    fn garbage_is_a_format_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.mp3");
        let bytes: Vec<u8> = (0..20_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(&p, bytes).expect("write");
        let r = decode_regions(
            &p,
            &[Region {
                start_s: 0.0,
                len_s: 1.0,
            }],
            SeekPolicy::Seek,
        );
        assert!(r.is_err());
    }

    #[test]
    fn bad_requests_are_rejected() {
        let e = decode_regions(
            Path::new("/nonexistent"),
            &[Region {
                start_s: f64::NAN,
                len_s: 1.0,
            }],
            SeekPolicy::Seek,
        )
        .unwrap_err();
        assert!(matches!(e, DecodeError::Request(_)), "{e}");
    }

    /// A 16-bit mono WAV of `n` frames at 8 kHz holding a ramp, written by hand, whose header
    /// states `stated_rate`.
    fn ramp_wav(n: u32, stated_rate: u32) -> Vec<u8> {
        let rate = 8000u32;
        let mut data = Vec::new();
        for i in 0..n {
            let v = ((i % 30000) as i16).to_le_bytes();
            data.extend_from_slice(&v);
        }
        let mut f = Vec::new();
        f.extend_from_slice(b"RIFF");
        f.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
        f.extend_from_slice(b"WAVEfmt ");
        f.extend_from_slice(&16u32.to_le_bytes());
        f.extend_from_slice(&1u16.to_le_bytes());
        f.extend_from_slice(&1u16.to_le_bytes());
        f.extend_from_slice(&stated_rate.to_le_bytes());
        f.extend_from_slice(&(rate * 2).to_le_bytes());
        f.extend_from_slice(&2u16.to_le_bytes());
        f.extend_from_slice(&16u16.to_le_bytes());
        f.extend_from_slice(b"data");
        f.extend_from_slice(&(data.len() as u32).to_le_bytes());
        f.extend_from_slice(&data);
        f
    }

    #[test]
    fn a_header_stating_a_gigahertz_sample_rate_is_refused_before_any_buffer_is_sized() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("damaged.wav");
        std::fs::write(&p, ramp_wav(8000, 0xFFFF_FFF0)).expect("write");
        let regions = [Region {
            start_s: 0.0,
            len_s: 10.0,
        }];
        let e = decode_regions_symphonia(&p, &regions, SeekPolicy::Seek).unwrap_err();
        assert!(
            matches!(e, DecodeError::ImplausibleSampleRate(0xFFFF_FFF0)),
            "{e}"
        );
        assert!(e.to_string().contains("4294967280 Hz"), "{e}");
        // The limit itself is a rate like any other.
        std::fs::write(&p, ramp_wav(8000, MAX_SAMPLE_RATE)).expect("write");
        let short = [Region {
            start_s: 0.0,
            len_s: 0.001,
        }];
        let d = decode_regions_symphonia(&p, &short, SeekPolicy::Seek).expect("decodes");
        assert_eq!(d.sample_rate, MAX_SAMPLE_RATE);
    }

    #[test]
    fn wav_regions_are_exact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("ramp.wav");
        let rate = 8000u32;
        std::fs::write(&p, ramp_wav(rate * 20, rate)).expect("write");

        let regions = [
            Region {
                start_s: 12.0,
                len_s: 0.5,
            },
            Region {
                start_s: 1.0,
                len_s: 0.5,
            },
            Region {
                start_s: -0.25,
                len_s: 0.5,
            },
        ];
        for policy in [SeekPolicy::Seek, SeekPolicy::Sequential] {
            let d = decode_regions(&p, &regions, policy).expect("decodes");
            assert_eq!(d.sample_rate, rate);
            for (r, got) in regions.iter().zip(&d.regions) {
                assert_eq!(got.len(), 4000);
                for (k, v) in got.iter().enumerate() {
                    let frame = (r.start_s * f64::from(rate)).round() as i64 + k as i64;
                    let expected = if frame < 0 {
                        0.0
                    } else {
                        f32::from((frame % 30000) as i16) / 32768.0
                    };
                    assert!(
                        (v - expected).abs() < 1e-6,
                        "{policy:?} {r:?} frame {frame}: {v} vs {expected}"
                    );
                }
            }
        }
        let e = decode_regions(
            &p,
            &[Region {
                start_s: 19.9,
                len_s: 2.0,
            }],
            SeekPolicy::Seek,
        )
        .unwrap_err();
        assert!(matches!(e, DecodeError::Truncated { .. }), "{e}");
    }
}
