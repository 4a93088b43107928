//! The lofty reader: tags and audio properties of every container lofty parses. Any panic
//! inside lofty is caught and reported as a [`ProbeError`].

use std::fs::File;
use std::io::{self, BufReader, Seek, SeekFrom};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use lofty::aac::AacFile;
use lofty::ape::ApeFile;
use lofty::config::{ParseOptions, ParsingMode};
use lofty::error::FileParseError;
use lofty::file::{AudioFile, TaggedFile};
use lofty::flac::FlacFile;
use lofty::id3::v2::Id3v2Version;
use lofty::iff::aiff::{AiffCompressionType, AiffFile};
use lofty::iff::wav::{WavFile, WavFormat};
use lofty::mp4::{Mp4Codec, Mp4File};
use lofty::mpeg::{Layer, MpegFile};
use lofty::musepack::MpcFile;
use lofty::ogg::{OpusFile, SpeexFile, VorbisFile};
use lofty::wavpack::WavPackFile;

use super::source::io_reason;
use super::{AudioFormat, AudioProperties, ProbeError, ProbedTrack, tags};

/// Buffer handed to lofty around the file descriptor.
const LOFTY_BUF: usize = 8 * 1024;

pub(crate) struct Parsed {
    pub(crate) tagged: TaggedFile,
    pub(crate) codec: Option<String>,
    /// The file's ID3v2 tag is version 2.3 or older ("/" separates the values of a list).
    pub(crate) id3v2_3: bool,
}

pub(crate) fn parse_options(read_tags: bool) -> ParseOptions {
    ParseOptions::new()
        .parsing_mode(ParsingMode::BestAttempt)
        .read_cover_art(false)
        .read_tags(read_tags)
}

/// Reads the file with lofty. When that fails (or panics) but the audio properties alone can
/// be read, the file is kept (a damaged tag frame must not hide a playable file) and
/// `tags_dropped` is set, so the caller can get the tags elsewhere.
pub(crate) fn parse_with_lofty(
    path: &Path,
    file: &File,
    format: AudioFormat,
) -> Result<(Parsed, bool), ProbeError> {
    let first_error = match lofty_attempt(file, format, true) {
        Ok(parsed) => return Ok((parsed, false)),
        Err(e) => e,
    };
    match lofty_attempt(file, format, false) {
        Ok(parsed) => {
            tracing::warn!(track_path = %path.display(), error = %first_error, "the tag reader refused the tags; the audio is fine");
            Ok((parsed, true))
        }
        Err(_) => Err(first_error),
    }
}

pub(crate) fn lofty_attempt(
    file: &File,
    format: AudioFormat,
    read_tags: bool,
) -> Result<Parsed, ProbeError> {
    // lofty reads from the reader's current position, and a failed attempt leaves the shared
    // file offset anywhere (even past the end): every attempt starts at byte 0.
    let mut start = file;
    start
        .seek(SeekFrom::Start(0))
        .map_err(|e| ProbeError::ReadFailed {
            reason: io_reason(&e),
        })?;
    let mut reader = BufReader::with_capacity(LOFTY_BUF, file);
    let result = catch_unwind(AssertUnwindSafe(|| {
        read_concrete(&mut reader, format, parse_options(read_tags))
    }));
    match result {
        Ok(Ok(Some(parsed))) => Ok(parsed),
        Ok(Ok(None)) => Err(ProbeError::Unsupported {
            reason: format!("{format} is not read by the tag reader"),
        }),
        Ok(Err(e)) => Err(lofty_error(format, &e)),
        Err(panic) => {
            let what = crate::panic_text::panic_message(panic.as_ref())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::warn!(format = format.as_str(), panic = %what, "tag reader panicked");
            Err(ProbeError::Corrupt {
                format,
                reason: "the tag reader failed on malformed data".into(),
            })
        }
    }
}

pub(crate) fn read_concrete(
    reader: &mut BufReader<&File>,
    format: AudioFormat,
    opts: ParseOptions,
) -> Result<Option<Parsed>, FileParseError> {
    let named = |tagged: TaggedFile, codec: &str| Parsed {
        tagged,
        codec: Some(codec.to_owned()),
        id3v2_3: false,
    };
    Ok(Some(match format {
        AudioFormat::Mp3 => {
            let f = MpegFile::read_from(reader, opts)?;
            let codec = match f.properties().layer() {
                Layer::Layer1 => "mp1",
                Layer::Layer2 => "mp2",
                Layer::Layer3 => "mp3",
            };
            let id3v2_3 = f
                .id3v2()
                .is_some_and(|t| t.original_version() != Id3v2Version::V4);
            Parsed {
                id3v2_3,
                ..named(f.into(), codec)
            }
        }
        AudioFormat::Flac => named(FlacFile::read_from(reader, opts)?.into(), "flac"),
        AudioFormat::OggVorbis => named(VorbisFile::read_from(reader, opts)?.into(), "vorbis"),
        AudioFormat::Opus => named(OpusFile::read_from(reader, opts)?.into(), "opus"),
        AudioFormat::Speex => named(SpeexFile::read_from(reader, opts)?.into(), "speex"),
        AudioFormat::Aac => named(AacFile::read_from(reader, opts)?.into(), "aac"),
        AudioFormat::Ape => named(ApeFile::read_from(reader, opts)?.into(), "ape"),
        AudioFormat::WavPack => named(WavPackFile::read_from(reader, opts)?.into(), "wavpack"),
        AudioFormat::Musepack => named(MpcFile::read_from(reader, opts)?.into(), "musepack"),
        AudioFormat::Mp4 => {
            let f = Mp4File::read_from(reader, opts)?;
            let codec = match f.properties().codec() {
                Some(Mp4Codec::AAC) => Some("aac"),
                Some(Mp4Codec::ALAC) => Some("alac"),
                Some(Mp4Codec::MP3) => Some("mp3"),
                Some(Mp4Codec::FLAC) => Some("flac"),
                _ => None,
            };
            Parsed {
                tagged: f.into(),
                codec: codec.map(str::to_owned),
                id3v2_3: false,
            }
        }
        AudioFormat::Wav => {
            let f = WavFile::read_from(reader, opts)?;
            let p = f.properties();
            let bits = p.bit_depth();
            let codec = match p.format() {
                WavFormat::PCM if bits == 8 => Some("pcm_u8".to_owned()),
                WavFormat::PCM if bits > 0 => Some(format!("pcm_s{bits}le")),
                WavFormat::IEEE_FLOAT if bits == 32 || bits == 64 => Some(format!("pcm_f{bits}le")),
                WavFormat::Other(0x0006) => Some("pcm_alaw".to_owned()),
                WavFormat::Other(0x0007) => Some("pcm_mulaw".to_owned()),
                WavFormat::Other(0x0002) => Some("adpcm_ms".to_owned()),
                WavFormat::Other(0x0011) => Some("adpcm_ima_wav".to_owned()),
                WavFormat::Other(0x0055) => Some("mp3".to_owned()),
                _ => None,
            };
            Parsed {
                tagged: f.into(),
                codec,
                id3v2_3: false,
            }
        }
        AudioFormat::Aiff => {
            let f = AiffFile::read_from(reader, opts)?;
            let p = f.properties();
            let bits = p.sample_size();
            let pcm_be = || Some(format!("pcm_s{bits}be"));
            let codec = match p.compression_type() {
                None | Some(AiffCompressionType::None) => pcm_be(),
                Some(AiffCompressionType::sowt) => Some(format!("pcm_s{bits}le")),
                Some(AiffCompressionType::fl32 | AiffCompressionType::FL32) => {
                    Some("pcm_f32be".to_owned())
                }
                Some(AiffCompressionType::fl64) => Some("pcm_f64be".to_owned()),
                Some(AiffCompressionType::alaw | AiffCompressionType::ALAW) => {
                    Some("pcm_alaw".to_owned())
                }
                Some(AiffCompressionType::ulaw | AiffCompressionType::ULAW) => {
                    Some("pcm_mulaw".to_owned())
                }
                Some(AiffCompressionType::Other {
                    compression_type, ..
                }) => match compression_type {
                    b"twos" | b"in24" | b"in32" => pcm_be(),
                    b"raw " => Some("pcm_u8".to_owned()),
                    b"ima4" => Some("adpcm_ima_qt".to_owned()),
                    _ => None,
                },
                Some(_) => None,
            };
            Parsed {
                tagged: f.into(),
                codec,
                id3v2_3: false,
            }
        }
        AudioFormat::OggFlac
        | AudioFormat::Wma
        | AudioFormat::Dsf
        | AudioFormat::Dff
        | AudioFormat::TrueAudio
        | AudioFormat::Tak
        | AudioFormat::OptimFrog
        | AudioFormat::Ac3
        | AudioFormat::Dts
        | AudioFormat::Shorten
        | AudioFormat::Matroska => return Ok(None),
    }))
}

/// Turns lofty's error chain into a reason: "failed to parse Flac file" is dropped, the
/// causes under it are kept ("file does not contain a \"moov\" atom").
pub(crate) fn lofty_error(format: AudioFormat, e: &FileParseError) -> ProbeError {
    use std::error::Error as _;
    let mut parts: Vec<String> = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.starts_with("failed to parse") && !parts.contains(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    if let Some(io) = e.source().and_then(|s| s.downcast_ref::<io::Error>())
        && io.kind() != io::ErrorKind::UnexpectedEof
    {
        return ProbeError::ReadFailed {
            reason: io_reason(io),
        };
    }
    let reason = if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    };
    if format == AudioFormat::Mp4 && reason.contains("no audio track") {
        return ProbeError::NotAudio {
            reason: "MP4 container without an audio track".into(),
        };
    }
    let reason = if reason.contains("fill whole buffer") {
        "the file ends inside a header".to_owned()
    } else {
        reason
    };
    ProbeError::Corrupt { format, reason }
}
pub(crate) fn build_track(path: &Path, format: AudioFormat, parsed: Parsed) -> ProbedTrack {
    let tf = &parsed.tagged;
    let props = tf.properties();
    let nonzero = |v: Option<u32>| v.filter(|v| *v > 0).and_then(|v| i32::try_from(v).ok());
    let (tags, truncated) = tags::from_lofty(tf, parsed.id3v2_3);
    if truncated {
        tracing::warn!(track_path = %path.display(), max_bytes = tags::MAX_TAG_BYTES, "over-long tag value truncated");
    }
    ProbedTrack {
        format,
        audio: AudioProperties {
            codec: parsed.codec,
            duration_ms: i64::try_from(props.duration().as_millis()).unwrap_or(i64::MAX),
            sample_rate: nonzero(props.sample_rate()),
            channels: nonzero(props.channels().map(u32::from)),
            bit_depth: nonzero(props.bit_depth().map(u32::from)),
            bitrate_kbps: nonzero(props.audio_bitrate())
                .or_else(|| nonzero(props.overall_bitrate())),
        },
        tags,
    }
}

#[cfg(test)]
mod tests {
    use super::super::probe_file;
    use super::*;

    /// A minimal PCM WAV: 16-bit mono, 8 kHz, `frames` frames of silence.
    fn tiny_wav(frames: u32) -> Vec<u8> {
        let data_len = frames * 2;
        let mut w = Vec::new();
        w.extend_from_slice(b"RIFF");
        w.extend_from_slice(&(36 + data_len).to_le_bytes());
        w.extend_from_slice(b"WAVEfmt ");
        w.extend_from_slice(&16u32.to_le_bytes());
        w.extend_from_slice(&1u16.to_le_bytes()); // PCM
        w.extend_from_slice(&1u16.to_le_bytes()); // mono
        w.extend_from_slice(&8000u32.to_le_bytes());
        w.extend_from_slice(&16000u32.to_le_bytes());
        w.extend_from_slice(&2u16.to_le_bytes());
        w.extend_from_slice(&16u16.to_le_bytes());
        w.extend_from_slice(b"data");
        w.extend_from_slice(&data_len.to_le_bytes());
        w.resize(w.len() + data_len as usize, 0);
        w
    }

    #[test]
    fn a_retry_reads_from_the_start_wherever_the_last_attempt_left_the_file() {
        // Found by fuzzing: after a failed first attempt the tag-less retry read from wherever
        // lofty had left the shared file offset (here past the end), not from byte 0.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.wav");
        std::fs::write(&path, tiny_wav(4000)).expect("write");
        let mut file = File::open(&path).expect("open");
        file.seek(SeekFrom::Start(1 << 20)).expect("seek");
        let parsed = lofty_attempt(&file, AudioFormat::Wav, false).expect("retry reads the file");
        assert_eq!(parsed.tagged.properties().sample_rate(), Some(8000));
        assert_eq!(parsed.tagged.properties().duration().as_millis(), 500);
        let track = probe_file(&path).expect("probe");
        assert_eq!(
            (track.format, track.audio.duration_ms),
            (AudioFormat::Wav, 500)
        );
    }
}
