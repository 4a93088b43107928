//! Cheap integrity checks, per container, with positioned reads and no decoding.
//!
//! # Truncation checks (no decoding)
//!
//! lofty alone reports a 90 s duration for the first 3000 bytes of a 90 s MP3 (it trusts the
//! Xing header), so each format gets a size check derived from its own headers:
//!
//! | format | check |
//! |---|---|
//! | MP3 (MPEG audio) | audio bytes (file size minus the leading ID3v2 tag) must be ≥ duration × the smallest bitrate the stream's MPEG version/layer allows (8–32 kbit/s), and ≥ 90 % of the byte count in a Xing/Info or VBRI header when one is present |
//! | FLAC | every metadata block must lie inside the file; audio bytes ≥ ⌈total samples ÷ max block size⌉ × min frame size (STREAMINFO); and the last frame header found near the end of the file (confirmed by its predecessor, CRC-8 checked, consistent with STREAMINFO) must end at the total sample count |
//! | WAV | the `data` chunk's declared size must fit in the file |
//! | AIFF/AIFC | the `SSND` chunk's declared size must fit in the file, and for PCM the frame count in `COMM` must fit in the bytes present |
//! | MP4/M4A | every top-level atom (`mdat` included) must end inside the file, and a `moov` atom must exist (with `moov` written last, a cut file loses it); non-atom bytes after the last atom (an appended ID3v1 tag) end the walk |
//! | Ogg Vorbis/Opus/Speex | the last Ogg page (header, segment table and body) must be complete |
//!
//! Not detected (cheaply, or at all): an MP3 without a Xing/VBRI header cut at a frame
//! boundary (it is simply a shorter CBR stream, and lofty's duration is then computed from
//! the size, so it is honest); an MP3 missing less than 10 % of its Xing byte count (some
//! encoders count their ID3v2 tag in it); WAV/AIFF missing less than 1 % of the data size;
//! an Ogg stream cut exactly at a page boundary (indistinguishable from a stream capture
//! without an end-of-stream page; its duration comes from the last page, so it is honest);
//! a FLAC file cut inside its very last frame, or one whose STREAMINFO leaves the total
//! sample count at 0 (written to a pipe); raw ADTS AAC, APE, WavPack and Musepack files (no
//! declared length is checked).
//!
//! A file shorter than its headers declare is reported as truncated, whatever reads it: that is
//! what a half-copied album looks like, and indexing it would show a length it cannot play.
//! WAV/AIFF files written to a pipe (data size left at 0 or 0xFFFFFFFF) are handed to FFmpeg,
//! which reads them (lofty cannot).

pub(crate) mod flac;
pub(crate) mod mp4;
pub(crate) mod mpeg;
pub(crate) mod ogg;
pub(crate) mod riff;

use super::detect::{Layout, Sniffed};
use super::source::Source;
use super::{AudioFormat, ProbeError, ProbedTrack};

/// The checks that need only the file: run before any reader.
pub(crate) fn precheck(src: &Source<'_>, s: &Sniffed) -> Result<(), ProbeError> {
    match &s.layout {
        Layout::Mpeg(info) => mpeg::check_vbr_bytes(src, info),
        Layout::Flac => flac::check(src, s.start),
        Layout::Ogg => ogg::check_tail(src, s.format),
        Layout::Mp4 => mp4::check_atoms(src),
        Layout::Wav => riff::check_wav(src),
        Layout::Aiff { aifc } => riff::check_aiff(src, *aifc),
        Layout::Adts { .. } | Layout::FfmpegOnly | Layout::Other => Ok(()),
    }
}

/// Tolerated shortfall for exact container sizes: buggy writers are off by a little, and a file
/// missing up to 1 % of its declared audio (or one sample frame) still plays.
pub(crate) fn slack(declared: u64, unit: u64) -> u64 {
    (declared / 100).max(unit)
}

/// The length of a stream whose headers cannot give it exactly, from its frames: raw ADTS AAC
/// (lofty estimates it from the first frames' bitrate, several % off) and MPEG audio without a
/// Xing/VBRI header whose first frames' bitrates differ (VBR: an estimate from the first
/// frame can be off by half). Reads the frame headers to the end of the file; `None` for
/// every other stream, where the header's length is kept.
pub(crate) fn counted_duration(src: &Source<'_>, s: &Sniffed) -> Result<Option<f64>, ProbeError> {
    match &s.layout {
        Layout::Adts { frame_offset } => mpeg::adts_duration(src, *frame_offset),
        Layout::Mpeg(info) if info.vbr_frames.is_none() && mpeg::starts_variable(src, info)? => {
            mpeg::mpeg_duration(src, info)
        }
        _ => Ok(None),
    }
}

/// The checks that need the reader's results.
pub(crate) fn postcheck(
    src: &Source<'_>,
    s: &Sniffed,
    track: &ProbedTrack,
) -> Result<(), ProbeError> {
    if s.format == AudioFormat::Mp4 && track.audio.sample_rate.is_none() {
        return Err(ProbeError::NotAudio {
            reason: "MP4 container without an audio track".into(),
        });
    }
    if let Layout::Mpeg(info) = &s.layout {
        mpeg::check_min_bitrate(src, info, track.audio.duration_ms as f64 / 1000.0)?;
    }
    Ok(())
}
