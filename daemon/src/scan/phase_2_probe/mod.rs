//! Phase 2 of a scan: probe one file — decide its audio format from its content, check cheaply
//! that it is complete, then read its tags and audio properties.
//!
//! [`probe_file`] is called from the scan worker's rayon threads, many files at once; it opens
//! the file once, and:
//! 1. `detect` sniffs the first bytes (the extension is never trusted: a FLAC stream named
//!    `.mp3` is indexed as FLAC);
//! 2. `integrity` runs the format's truncation checks with positioned reads on the same
//!    descriptor;
//! 3. `lofty_reader` hands that descriptor to lofty's parser for the detected type (any panic
//!    inside lofty is caught), or, for formats lofty has no reader for (WMA, DSF/DFF, TrueAudio,
//!    TAK, AC-3, DTS, Shorten, Matroska/WebM, Ogg FLAC, RF64), `ffprobe` reads the file in a
//!    time-limited child process. A file lofty refuses as corrupt is given to FFmpeg as well
//!    before it is called corrupt: a damaged tag frame is not damaged audio;
//! 4. `tags` cleans every tag value where it enters (NUL splits values, control characters,
//!    length) and builds the lists (artists, genres, …).
//!
//! Nothing here panics on file contents. Tracker modules and MIDI files are counted as out of
//! scope (an `Unsupported` error that names them), never silently skipped.

mod detect;
pub mod ffprobe;
mod integrity;
mod lofty_reader;
mod source;
mod tags;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub use super::file_names::is_audio_candidate;
pub use crate::track::{AudioFormat, AudioProperties, ProbedTrack};
pub use tags::TrackTags;

use source::{Source, io_reason};

/// Bytes read from the start of the file (and again after a leading ID3v2 tag) to sniff it.
const SNIFF_LEN: usize = 4096;
/// Junk allowed before the first MPEG/ADTS frame sync (lofty's default `max_junk_bytes`).
const MAX_JUNK: usize = 1024;

/// Why a file could not be probed. Each message is meant for a person reading a scan report.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The file could not be opened (or is not a regular file).
    #[error("unreadable: {reason}")]
    Unreadable { reason: String },
    /// Reading failed after the file was opened (I/O error).
    #[error("read error: {reason}")]
    ReadFailed { reason: String },
    #[error("empty file (0 bytes)")]
    Empty,
    /// The content is not an audio format we know.
    #[error("not an audio file: {reason}")]
    NotAudio { reason: String },
    /// Audio, but a variant no reader here reads (an Ogg stream of another codec), or out of
    /// scope (tracker modules, MIDI), or a format that needs FFmpeg where it is missing.
    #[error("unsupported audio format: {reason}")]
    Unsupported { reason: String },
    /// The headers declare more audio than the file holds.
    #[error("truncated: {reason}")]
    Truncated { format: AudioFormat, reason: String },
    /// The headers are damaged or inconsistent.
    #[error("corrupt {format} file: {reason}")]
    Corrupt { format: AudioFormat, reason: String },
}

impl ProbeError {
    /// Which scan stage failed: "open" (could not open the file) or "probe" (its content).
    pub fn stage(&self) -> &'static str {
        match self {
            Self::Unreadable { .. } => "open",
            _ => "probe",
        }
    }
}

/// Probes one file: format from content, integrity checks, tags and audio properties.
pub fn probe_file(path: &Path) -> Result<ProbedTrack, ProbeError> {
    // O_NONBLOCK: opening a FIFO must not block the scan; no effect on regular files.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| ProbeError::Unreadable {
            reason: io_reason(&e),
        })?;
    let meta = file.metadata().map_err(|e| ProbeError::Unreadable {
        reason: io_reason(&e),
    })?;
    if meta.is_dir() {
        return Err(ProbeError::Unreadable {
            reason: "is a directory".into(),
        });
    }
    if !meta.is_file() {
        return Err(ProbeError::Unreadable {
            reason: "not a regular file".into(),
        });
    }
    let len = meta.len();
    if len == 0 {
        return Err(ProbeError::Empty);
    }
    if let Some(kind) = super::file_names::out_of_scope_kind(path) {
        return Err(ProbeError::Unsupported {
            reason: format!("{kind}: out of scope, not indexed"),
        });
    }
    let src = Source::new(&file, len)?;
    let sniffed = detect::sniff(&src)?;
    let mut track = match integrity::precheck(&src, &sniffed) {
        // A variant of a known container that lofty refuses (a WAV written as a stream):
        // FFmpeg may read it.
        Err(e @ ProbeError::Unsupported { .. }) => ffmpeg_or(path, sniffed.format, e)?,
        Err(e) => return Err(e),
        Ok(()) if !sniffed.lofty_reads() => ffprobe::probe(path, sniffed.format)?,
        Ok(()) => match read_with_lofty(path, &file, sniffed.format) {
            // lofty refuses some valid files (odd metadata blocks, damaged frames lofty cannot
            // skip): the audio decides, so FFmpeg gets a say before the file is called corrupt.
            Err(e @ (ProbeError::Corrupt { .. } | ProbeError::Unsupported { .. })) => {
                ffmpeg_or(path, sniffed.format, e)?
            }
            other => other?,
        },
    };
    if let Some(secs) = integrity::counted_duration(&src, &sniffed)? {
        track.audio.duration_ms = (secs * 1000.0).round() as i64;
    }
    integrity::postcheck(&src, &sniffed, &track)?;
    Ok(track)
}

/// lofty's reading of a file, completed by FFmpeg where lofty left gaps: the tags when lofty
/// refused them (FFmpeg skips a damaged frame and reads the others), the length when the
/// headers state none (a WavPack or APE file written as a stream).
fn read_with_lofty(
    path: &Path,
    file: &std::fs::File,
    format: AudioFormat,
) -> Result<ProbedTrack, ProbeError> {
    let (parsed, tags_dropped) = lofty_reader::parse_with_lofty(path, file, format)?;
    let mut track = lofty_reader::build_track(path, format, parsed);
    if tags_dropped {
        match ffprobe::probe(path, format) {
            Ok(ff) => track.tags = ff.tags,
            Err(e) => {
                tracing::warn!(track_path = %path.display(), error = %e, "indexing the file without tags")
            }
        }
    }
    if track.audio.duration_ms == 0 {
        match ffprobe::decoded_duration(path, format) {
            Ok(secs) => track.audio.duration_ms = (secs * 1000.0).round() as i64,
            Err(e) => tracing::debug!(track_path = %path.display(), error = %e, "length unknown"),
        }
    }
    Ok(track)
}

/// FFmpeg's reading of a file the primary path refused with `first`; `first` when FFmpeg
/// cannot read it either.
fn ffmpeg_or(
    path: &Path,
    format: AudioFormat,
    first: ProbeError,
) -> Result<ProbedTrack, ProbeError> {
    match ffprobe::probe(path, format) {
        Ok(track) => {
            tracing::warn!(track_path = %path.display(), error = %first, "read with FFmpeg after the tag reader refused it");
            Ok(track)
        }
        Err(e) => {
            tracing::debug!(track_path = %path.display(), error = %e, "FFmpeg cannot read it either");
            Err(first)
        }
    }
}

impl AudioFormat {
    /// Whether lofty has a reader for the format.
    fn lofty_reads(self) -> bool {
        matches!(
            self,
            Self::Mp3
                | Self::Flac
                | Self::OggVorbis
                | Self::Opus
                | Self::Speex
                | Self::Mp4
                | Self::Aac
                | Self::Wav
                | Self::Aiff
                | Self::Ape
                | Self::WavPack
                | Self::Musepack
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_stages() {
        assert_eq!(
            ProbeError::Unreadable {
                reason: "permission denied".into()
            }
            .stage(),
            "open"
        );
        assert_eq!(ProbeError::Empty.stage(), "probe");
        assert_eq!(ProbeError::Empty.to_string(), "empty file (0 bytes)");
    }
}
