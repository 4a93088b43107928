//! Phase 2 of a scan: probe one file — decide its audio format from its content, check cheaply
//! that it is complete, then read its tags and audio properties with lofty.
//!
//! [`probe_file`] is called from the scan worker's rayon threads, many files at once; it opens
//! the file once, sniffs the first bytes itself (the extension is never trusted: a FLAC stream
//! named `.mp3` is indexed as FLAC), runs the format's integrity checks with positioned reads on
//! the same descriptor, and then hands that descriptor to lofty's parser for the detected type.
//! Any panic inside lofty is caught and reported as a [`ProbeError`]; nothing here panics on
//! file contents.
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
//! encoders count their ID3v2 tag in it); WAV/AIFF missing less than 0.1 % of the data size;
//! an Ogg stream cut exactly at a page boundary (indistinguishable from a stream capture
//! without an end-of-stream page; its duration comes from the last page, so it is honest);
//! a FLAC file cut inside its very last frame, or one whose STREAMINFO leaves the total
//! sample count at 0 (written to a pipe); raw ADTS AAC, APE, WavPack and Musepack files (no
//! declared length is checked).
//!
//! WAV/AIFF files written to a pipe (data size left at 0 or 0xFFFFFFFF) are reported as
//! unsupported: lofty cannot read them. When lofty fails on a file's tags but reads its audio
//! properties, the file is kept without tags and a warning is logged.

use std::borrow::Cow;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use lofty::aac::AacFile;
use lofty::ape::ApeFile;
use lofty::config::{ParseOptions, ParsingMode};
use lofty::error::FileParseError;
use lofty::file::{AudioFile, TaggedFile, TaggedFileExt};
use lofty::flac::FlacFile;
use lofty::iff::aiff::{AiffCompressionType, AiffFile};
use lofty::iff::wav::{WavFile, WavFormat};
use lofty::mp4::{Mp4Codec, Mp4File};
use lofty::mpeg::{Layer, MpegFile};
use lofty::musepack::MpcFile;
use lofty::ogg::{OpusFile, SpeexFile, VorbisFile};
use lofty::tag::{ItemKey, Tag};
use lofty::wavpack::WavPackFile;

/// Bytes read from the start of the file (and again after a leading ID3v2 tag) to sniff it.
const SNIFF_LEN: usize = 4096;
/// Junk allowed before the first MPEG/ADTS frame sync (lofty's default `max_junk_bytes`).
const MAX_JUNK: usize = 1024;
/// Buffer handed to lofty around the file descriptor.
const LOFTY_BUF: usize = 8 * 1024;
/// Longest tag string kept (bytes, cut at a character boundary): protects index limits in
/// the database from absurd tag values.
const MAX_TAG_BYTES: usize = 1024;

/// The container/stream format of an audio file, decided from its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AudioFormat {
    /// MPEG-1/2/2.5 audio (layer III, or layer I/II with the same framing).
    Mp3,
    Flac,
    OggVorbis,
    Opus,
    /// Speex in Ogg.
    Speex,
    /// MPEG-4 container (m4a, m4b, mp4): AAC, ALAC, …
    Mp4,
    /// Raw ADTS AAC stream (`.aac`).
    Aac,
    Wav,
    /// AIFF and AIFC.
    Aiff,
    /// Monkey's Audio.
    Ape,
    WavPack,
    Musepack,
}

impl AudioFormat {
    /// Stable lower-case name, as stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mp3 => "mp3",
            Self::Flac => "flac",
            Self::OggVorbis => "ogg_vorbis",
            Self::Opus => "opus",
            Self::Speex => "speex",
            Self::Mp4 => "mp4",
            Self::Aac => "aac",
            Self::Wav => "wav",
            Self::Aiff => "aiff",
            Self::Ape => "ape",
            Self::WavPack => "wavpack",
            Self::Musepack => "musepack",
        }
    }
}

impl fmt::Display for AudioFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a probe learns about one audio file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbedTrack {
    pub format: AudioFormat,
    /// Codec inside the container, e.g. "mp3", "flac", "vorbis", "opus", "aac", "alac",
    /// "pcm_s16le", "pcm_s16be".
    pub codec: Option<String>,
    pub duration_ms: i64,
    pub sample_rate: Option<i32>,
    pub channels: Option<i32>,
    pub bit_depth: Option<i32>,
    pub bitrate_kbps: Option<i32>,
    pub title: Option<String>,
    pub artist: Option<String>,
    pub album: Option<String>,
    pub album_artist: Option<String>,
    pub genre: Option<String>,
    pub track_number: Option<i32>,
    pub disc_number: Option<i32>,
    pub year: Option<i32>,
}

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
    /// Audio, but a variant we cannot read (e.g. FLAC inside Ogg, RF64).
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

/// Whether a path looks like audio by its extension (case-insensitive). The content decides
/// the format later; this only chooses which files the walker hands to [`probe_file`].
pub fn is_audio_candidate(path: &Path) -> bool {
    const EXTS: &[&str] = &[
        "mp3", "flac", "ogg", "oga", "opus", "m4a", "m4b", "mp4", "aac", "alac", "wav", "wave",
        "aif", "aiff", "aifc",
    ];
    let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
        return false;
    };
    EXTS.iter().any(|e| e.eq_ignore_ascii_case(ext))
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
    let src = Source::new(&file, len)?;
    let sniffed = sniff(&src)?;
    precheck(&src, &sniffed)?;
    let parsed = parse_with_lofty(path, &file, &sniffed)?;
    postcheck(&src, &sniffed, &parsed)?;
    Ok(build_track(sniffed.format, parsed))
}

// ---------------------------------------------------------------------------------------------
// Reading

/// The open file plus its first bytes, read once.
struct Source<'a> {
    file: &'a File,
    len: u64,
    head: Vec<u8>,
}

impl<'a> Source<'a> {
    fn new(file: &'a File, len: u64) -> Result<Self, ProbeError> {
        let mut src = Source {
            file,
            len,
            head: Vec::new(),
        };
        src.head = src.read_at(0, SNIFF_LEN)?;
        Ok(src)
    }

    /// Reads up to `want` bytes at `offset` (fewer at end of file).
    fn read_at(&self, offset: u64, want: usize) -> Result<Vec<u8>, ProbeError> {
        let avail = self.len.saturating_sub(offset);
        let want = want.min(usize::try_from(avail).unwrap_or(usize::MAX));
        let mut buf = vec![0u8; want];
        let mut done = 0;
        while done < want {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(ProbeError::ReadFailed {
                        reason: io_reason(&e),
                    });
                }
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// `len` bytes at `offset`, from the cached head when possible; fewer at end of file.
    fn bytes(&self, offset: u64, len: usize) -> Result<Cow<'_, [u8]>, ProbeError> {
        if let Ok(start) = usize::try_from(offset)
            && let Some(end) = start.checked_add(len)
            && (end <= self.head.len()
                || (start <= self.head.len() && self.head.len() as u64 == self.len))
        {
            return Ok(Cow::Borrowed(&self.head[start..end.min(self.head.len())]));
        }
        self.read_at(offset, len).map(Cow::Owned)
    }
}

fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "file not found".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        io::ErrorKind::IsADirectory => "is a directory".into(),
        _ => {
            // "Input/output error (os error 5)" → "input/output error"
            let text = e.to_string();
            let text = match text.find(" (os error") {
                Some(i) => &text[..i],
                None => &text,
            };
            let mut chars = text.chars();
            match chars.next() {
                Some(first) => first.to_lowercase().chain(chars).collect(),
                None => "unknown I/O error".into(),
            }
        }
    }
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// "3000 bytes", "360.0 kB", "1.4 MB".
fn human_bytes(n: u64) -> String {
    let f = n as f64;
    if n < 10_000 {
        format!("{n} bytes")
    } else if n < 1_000_000 {
        format!("{:.1} kB", f / 1e3)
    } else if n < 1_000_000_000 {
        format!("{:.1} MB", f / 1e6)
    } else {
        format!("{:.1} GB", f / 1e9)
    }
}

// ---------------------------------------------------------------------------------------------
// Sniffing

/// The format and what the sniff learned about its layout.
struct Sniffed {
    format: AudioFormat,
    /// Offset of the stream after any leading ID3v2 tag(s).
    start: u64,
    layout: Layout,
}

enum Layout {
    Mpeg(MpegInfo),
    Flac,
    Ogg,
    Mp4,
    Wav,
    Aiff { aifc: bool },
    Other,
}

struct MpegInfo {
    frame_offset: u64,
    header: MpegHeader,
    /// Frame and byte counts from a Xing/Info or VBRI header.
    vbr_frames: Option<u32>,
    vbr_bytes: Option<u32>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum MpegVersion {
    V1,
    V2,
    V25,
}

#[derive(Clone, Copy)]
struct MpegHeader {
    version: MpegVersion,
    /// 1, 2 or 3.
    layer: u8,
    bitrate_kbps: u32,
    sample_rate: u32,
    padding: bool,
    mono: bool,
}

const BITRATES_V1: [[u32; 14]; 3] = [
    [
        32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448,
    ],
    [
        32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
    ],
    [
        32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
    ],
];
const BITRATES_V2: [[u32; 14]; 2] = [
    [
        32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256,
    ],
    [8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
];

impl MpegHeader {
    fn parse(b: &[u8]) -> Option<Self> {
        let (b0, b1, b2, b3) = (*b.first()?, *b.get(1)?, *b.get(2)?, *b.get(3)?);
        if b0 != 0xFF || b1 & 0xE0 != 0xE0 {
            return None;
        }
        let version = match (b1 >> 3) & 3 {
            0 => MpegVersion::V25,
            2 => MpegVersion::V2,
            3 => MpegVersion::V1,
            _ => return None,
        };
        let layer = match (b1 >> 1) & 3 {
            1 => 3,
            2 => 2,
            3 => 1,
            _ => return None,
        };
        let br_idx = usize::from(b2 >> 4);
        if br_idx == 0 || br_idx == 15 {
            return None; // free format or invalid
        }
        let table = Self::bitrate_table(version, layer);
        let bitrate_kbps = table[br_idx - 1];
        let sr_idx = usize::from((b2 >> 2) & 3);
        let base = [44_100, 48_000, 32_000].get(sr_idx)?;
        let sample_rate = match version {
            MpegVersion::V1 => *base,
            MpegVersion::V2 => base / 2,
            MpegVersion::V25 => base / 4,
        };
        Some(Self {
            version,
            layer,
            bitrate_kbps,
            sample_rate,
            padding: (b2 >> 1) & 1 == 1,
            mono: b3 >> 6 == 3,
        })
    }

    fn bitrate_table(version: MpegVersion, layer: u8) -> &'static [u32; 14] {
        match (version, layer) {
            (MpegVersion::V1, 1) => &BITRATES_V1[0],
            (MpegVersion::V1, 2) => &BITRATES_V1[1],
            (MpegVersion::V1, _) => &BITRATES_V1[2],
            (_, 1) => &BITRATES_V2[0],
            _ => &BITRATES_V2[1],
        }
    }

    /// The smallest bitrate this version/layer allows (kbit/s).
    fn min_bitrate_kbps(&self) -> u32 {
        Self::bitrate_table(self.version, self.layer)[0]
    }

    fn samples_per_frame(&self) -> u32 {
        match (self.layer, self.version) {
            (1, _) => 384,
            (3, MpegVersion::V2 | MpegVersion::V25) => 576,
            _ => 1152,
        }
    }

    fn frame_len(&self) -> u64 {
        let br = u64::from(self.bitrate_kbps) * 1000;
        let sr = u64::from(self.sample_rate);
        let pad = u64::from(self.padding);
        if self.layer == 1 {
            (12 * br / sr + pad) * 4
        } else {
            u64::from(self.samples_per_frame()) / 8 * br / sr + pad
        }
    }

    fn compatible(&self, other: &Self) -> bool {
        self.version == other.version
            && self.layer == other.layer
            && self.sample_rate == other.sample_rate
    }

    /// Offset of a Xing/Info header inside a layer III frame.
    fn xing_offset(&self) -> usize {
        4 + match (self.version, self.mono) {
            (MpegVersion::V1, false) => 32,
            (MpegVersion::V1, true) | (_, false) => 17,
            (_, true) => 9,
        }
    }
}

/// An ADTS (raw AAC) frame header: returns the frame length.
fn adts_frame_len(b: &[u8]) -> Option<u64> {
    let (b0, b1, b2, b3, b4, b5) = (
        *b.first()?,
        *b.get(1)?,
        *b.get(2)?,
        *b.get(3)?,
        *b.get(4)?,
        *b.get(5)?,
    );
    if b0 != 0xFF || b1 & 0xF6 != 0xF0 || (b2 >> 2) & 0xF >= 13 {
        return None;
    }
    let len = (u64::from(b3 & 3) << 11) | (u64::from(b4) << 3) | u64::from(b5 >> 5);
    (len >= 7).then_some(len)
}

fn sniff(src: &Source<'_>) -> Result<Sniffed, ProbeError> {
    let head = &src.head[..];

    // Leading ID3v2 tag(s): skip them (MP3 mostly, sometimes FLAC/APE/MPC/AAC).
    let mut start = 0u64;
    let mut id3 = false;
    for _ in 0..4 {
        let b = src.bytes(start, 10)?;
        let Some(size) = id3v2_len(&b) else { break };
        id3 = true;
        start += size;
    }
    if start > src.len {
        return Err(ProbeError::Truncated {
            format: AudioFormat::Mp3,
            reason: format!(
                "the ID3v2 tag declares {} but the file holds {}",
                human_bytes(start),
                human_bytes(src.len)
            ),
        });
    }
    if id3 && start == src.len {
        return Err(ProbeError::NotAudio {
            reason: "the file holds only an ID3v2 tag, no audio".into(),
        });
    }
    let window = src.bytes(start, SNIFF_LEN)?;
    let w = &window[..];
    let at = |off: usize, magic: &[u8]| w.get(off..off + magic.len()) == Some(magic);
    let simple = |format| Sniffed {
        format,
        start,
        layout: Layout::Other,
    };

    if at(0, b"fLaC") {
        return Ok(Sniffed {
            format: AudioFormat::Flac,
            start,
            layout: Layout::Flac,
        });
    }
    if at(0, b"MAC ") {
        return Ok(simple(AudioFormat::Ape));
    }
    if at(0, b"MPCK") || at(0, b"MP+") {
        return Ok(simple(AudioFormat::Musepack));
    }
    if !id3 {
        if at(0, b"OggS") {
            return sniff_ogg(w).map(|format| Sniffed {
                format,
                start,
                layout: Layout::Ogg,
            });
        }
        if at(0, b"RIFF") && at(8, b"WAVE") {
            return Ok(Sniffed {
                format: AudioFormat::Wav,
                start,
                layout: Layout::Wav,
            });
        }
        if at(0, b"RF64") || at(0, b"BW64") {
            return Err(ProbeError::Unsupported {
                reason: "RF64/BW64 (64-bit WAV)".into(),
            });
        }
        if at(0, b"FORM") && (at(8, b"AIFF") || at(8, b"AIFC")) {
            return Ok(Sniffed {
                format: AudioFormat::Aiff,
                start,
                layout: Layout::Aiff {
                    aifc: at(8, b"AIFC"),
                },
            });
        }
        if at(4, b"ftyp") {
            return Ok(Sniffed {
                format: AudioFormat::Mp4,
                start,
                layout: Layout::Mp4,
            });
        }
        if at(0, b"wvpk") {
            return Ok(simple(AudioFormat::WavPack));
        }
    }
    if let Some(sniffed) = sniff_mpeg_or_adts(src, start, w)? {
        return Ok(sniffed);
    }
    Err(ProbeError::NotAudio {
        reason: describe_non_audio(head),
    })
}

/// Size of an ID3v2 tag (header, body and footer) at the start of `b`, if one is there.
fn id3v2_len(b: &[u8]) -> Option<u64> {
    if b.get(0..3) != Some(b"ID3") {
        return None;
    }
    let version = *b.get(3)?;
    let flags = *b.get(5)?;
    let size = b.get(6..10)?;
    if !(2..=4).contains(&version) || size.iter().any(|s| s & 0x80 != 0) {
        return None;
    }
    let body = size.iter().fold(0u64, |acc, s| (acc << 7) | u64::from(*s));
    let footer = if version == 4 && flags & 0x10 != 0 {
        10
    } else {
        0
    };
    Some(10 + body + footer)
}

/// Vorbis, Opus or Speex, from the first packet of the first Ogg page.
fn sniff_ogg(w: &[u8]) -> Result<AudioFormat, ProbeError> {
    let body = w
        .get(26)
        .map(|n| 27 + usize::from(*n))
        .and_then(|start| w.get(start..));
    let Some(body) = body else {
        return Err(ProbeError::Truncated {
            format: AudioFormat::OggVorbis,
            reason: "the file ends inside the first Ogg page".into(),
        });
    };
    if body.starts_with(b"\x01vorbis") {
        Ok(AudioFormat::OggVorbis)
    } else if body.starts_with(b"OpusHead") {
        Ok(AudioFormat::Opus)
    } else if body.starts_with(b"Speex   ") {
        Ok(AudioFormat::Speex)
    } else if body.starts_with(b"\x7fFLAC") {
        Err(ProbeError::Unsupported {
            reason: "FLAC inside an Ogg container".into(),
        })
    } else if body.starts_with(b"\x80theora") {
        Err(ProbeError::NotAudio {
            reason: "Ogg video (Theora)".into(),
        })
    } else {
        Err(ProbeError::Unsupported {
            reason: "Ogg stream that is neither Vorbis, Opus nor Speex".into(),
        })
    }
}

/// Finds an MPEG audio or ADTS frame sync within the first [`MAX_JUNK`] bytes at `start`, and
/// accepts it only if the next frame header follows where the first one says it ends (or the
/// file ends there): random bytes rarely survive that.
fn sniff_mpeg_or_adts(
    src: &Source<'_>,
    start: u64,
    w: &[u8],
) -> Result<Option<Sniffed>, ProbeError> {
    let limit = w.len().min(MAX_JUNK + 4);
    for i in 0..limit {
        if w[i] != 0xFF {
            continue;
        }
        let here = start + i as u64;
        if let Some(h) = MpegHeader::parse(&w[i..]) {
            let next = here + h.frame_len();
            let ok = next >= src.len || {
                let nb = src.bytes(next, 4)?;
                nb.len() < 4 || MpegHeader::parse(&nb).is_some_and(|n| n.compatible(&h))
            };
            if ok {
                let (vbr_frames, vbr_bytes) = vbr_header(src, here, &h)?;
                return Ok(Some(Sniffed {
                    format: AudioFormat::Mp3,
                    start,
                    layout: Layout::Mpeg(MpegInfo {
                        frame_offset: here,
                        header: h,
                        vbr_frames,
                        vbr_bytes,
                    }),
                }));
            }
        } else if let Some(len) = adts_frame_len(&w[i..]) {
            let next = here + len;
            let ok = next >= src.len || {
                let nb = src.bytes(next, 6)?;
                nb.len() < 6 || adts_frame_len(&nb).is_some()
            };
            if ok {
                return Ok(Some(Sniffed {
                    format: AudioFormat::Aac,
                    start,
                    layout: Layout::Other,
                }));
            }
        }
    }
    Ok(None)
}

/// Frame and byte counts from a Xing/Info (layer III) or VBRI header in the first frame.
fn vbr_header(
    src: &Source<'_>,
    frame_offset: u64,
    h: &MpegHeader,
) -> Result<(Option<u32>, Option<u32>), ProbeError> {
    let b = src.bytes(frame_offset, 64)?;
    if h.layer == 3 {
        let x = h.xing_offset();
        if matches!(b.get(x..x + 4), Some(b"Xing" | b"Info")) {
            let flags = be_u32(&b, x + 4).unwrap_or(0);
            let mut pos = x + 8;
            let mut frames = None;
            let mut bytes = None;
            if flags & 1 != 0 {
                frames = be_u32(&b, pos);
                pos += 4;
            }
            if flags & 2 != 0 {
                bytes = be_u32(&b, pos);
            }
            return Ok((frames.filter(|f| *f > 0), bytes.filter(|b| *b > 0)));
        }
    }
    if b.get(36..40) == Some(b"VBRI") {
        let bytes = be_u32(&b, 46).filter(|b| *b > 0);
        let frames = be_u32(&b, 50).filter(|f| *f > 0);
        return Ok((frames, bytes));
    }
    Ok((None, None))
}

fn describe_non_audio(head: &[u8]) -> String {
    let kind = if head.starts_with(b"\x89PNG") {
        Some("a PNG image")
    } else if head.starts_with(b"\xFF\xD8\xFF") {
        Some("a JPEG image")
    } else if head.starts_with(b"%PDF") {
        Some("a PDF document")
    } else if head.starts_with(b"PK\x03\x04") {
        Some("a ZIP archive")
    } else if head.starts_with(b"\x1F\x8B") {
        Some("gzip-compressed data")
    } else if head.starts_with(b"\x7FELF") {
        Some("an executable")
    } else if looks_like_text(head) {
        Some("text")
    } else {
        None
    };
    match kind {
        Some(kind) => format!("content is {kind}, not a recognised audio format"),
        None => "content is not a recognised audio format".into(),
    }
}

fn looks_like_text(b: &[u8]) -> bool {
    let b = &b[..b.len().min(512)];
    // A multi-byte character may be cut at the end of the sample.
    let valid = match std::str::from_utf8(b) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none() && e.valid_up_to() + 4 > b.len(),
    };
    valid
        && !b.is_empty()
        && b.iter()
            .all(|c| *c >= 0x20 || matches!(c, b'\n' | b'\r' | b'\t' | 0x0C))
}

// ---------------------------------------------------------------------------------------------
// Integrity checks before lofty

fn precheck(src: &Source<'_>, s: &Sniffed) -> Result<(), ProbeError> {
    match &s.layout {
        Layout::Mpeg(info) => check_mpeg_vbr_bytes(src, info),
        Layout::Flac => check_flac(src, s.start),
        Layout::Ogg => check_ogg_tail(src, s.format),
        Layout::Mp4 => check_mp4_atoms(src),
        Layout::Wav => check_wav(src),
        Layout::Aiff { aifc } => check_aiff(src, *aifc),
        Layout::Other => Ok(()),
    }
}

/// Tolerated shortfall for exact container sizes: buggy writers are off by a little.
fn slack(declared: u64, unit: u64) -> u64 {
    (declared / 1000).max(unit)
}

fn check_mpeg_vbr_bytes(src: &Source<'_>, info: &MpegInfo) -> Result<(), ProbeError> {
    let Some(declared) = info.vbr_bytes.map(u64::from) else {
        return Ok(());
    };
    let audio = src.len - info.frame_offset;
    // Some encoders count the ID3v2 tag or omit the header frame: allow 10 %.
    if audio < declared / 10 * 9 {
        let secs = info.vbr_frames.map(|f| {
            f64::from(f) * f64::from(info.header.samples_per_frame())
                / f64::from(info.header.sample_rate)
        });
        return Err(ProbeError::Truncated {
            format: AudioFormat::Mp3,
            reason: match secs {
                Some(secs) => format!(
                    "header declares {secs:.1} s of audio (~{}) but the file holds {}",
                    human_bytes(declared),
                    human_bytes(audio)
                ),
                None => format!(
                    "header declares ~{} of audio but the file holds {}",
                    human_bytes(declared),
                    human_bytes(audio)
                ),
            },
        });
    }
    Ok(())
}

/// STREAMINFO fields used by the checks.
#[derive(Clone, Copy)]
struct StreamInfo {
    max_block: u32,
    min_frame: u32,
    max_frame: u32,
    sample_rate: u32,
    channels: u32,
    bits: u32,
    total_samples: u64,
}

fn check_flac(src: &Source<'_>, start: u64) -> Result<(), ProbeError> {
    let flac = AudioFormat::Flac;
    let mut pos = start + 4;
    let mut info = None;
    for index in 0.. {
        if index > 1024 {
            return Err(ProbeError::Corrupt {
                format: flac,
                reason: "more than 1024 metadata blocks".into(),
            });
        }
        let h = src.bytes(pos, 4)?;
        if h.len() < 4 {
            return Err(ProbeError::Truncated {
                format: flac,
                reason: "the file ends inside the metadata, before any audio".into(),
            });
        }
        let kind = h[0] & 0x7F;
        let last = h[0] & 0x80 != 0;
        let len = (u64::from(h[1]) << 16) | (u64::from(h[2]) << 8) | u64::from(h[3]);
        let end = pos + 4 + len;
        if index == 0 && (kind != 0 || len < 34) {
            return Err(ProbeError::Corrupt {
                format: flac,
                reason: "the first metadata block is not a valid STREAMINFO".into(),
            });
        }
        if end > src.len {
            let name = match kind {
                0 => "STREAMINFO",
                1 => "PADDING",
                2 => "APPLICATION",
                3 => "SEEKTABLE",
                4 => "VORBIS_COMMENT",
                5 => "CUESHEET",
                6 => "PICTURE",
                _ => "a",
            };
            return Err(ProbeError::Truncated {
                format: flac,
                reason: format!(
                    "the {name} metadata block declares {} but the file ends {} into it, before any audio",
                    human_bytes(len),
                    human_bytes(src.len - (pos + 4).min(src.len))
                ),
            });
        }
        if kind == 0 && info.is_none() {
            let b = src.bytes(pos + 4, 18)?;
            info = parse_streaminfo(&b);
        }
        pos = end;
        if last {
            break;
        }
    }
    let Some(info) = info else {
        return Err(ProbeError::Corrupt {
            format: flac,
            reason: "unreadable STREAMINFO block".into(),
        });
    };
    if info.total_samples == 0 || info.sample_rate == 0 {
        return Ok(()); // length unknown (streamed encoder output): nothing to check against
    }
    let audio_start = pos;
    let audio = src.len - audio_start;
    let secs = info.total_samples as f64 / f64::from(info.sample_rate);

    // Each frame holds at most max_block samples and takes at least min_frame bytes.
    if info.max_block > 0 && info.min_frame > 0 {
        let frames = info.total_samples.div_ceil(u64::from(info.max_block));
        let min_bytes = frames.saturating_mul(u64::from(info.min_frame));
        if audio < min_bytes {
            return Err(ProbeError::Truncated {
                format: flac,
                reason: format!(
                    "STREAMINFO declares {secs:.1} s of audio (at least {}) but the file holds {}",
                    human_bytes(min_bytes),
                    human_bytes(audio)
                ),
            });
        }
    }

    // The last frame must end at the declared sample count.
    let window: u64 = if info.max_frame > 0 {
        (2 * u64::from(info.max_frame) + 64).clamp(16 * 1024, 1024 * 1024)
    } else {
        256 * 1024
    };
    let tail_start = audio_start.max(src.len.saturating_sub(window));
    let tail = src.read_at(tail_start, (src.len - tail_start) as usize)?;
    if let Some(last) = last_confirmed_flac_frame(&tail, &info)
        && last.start + last.samples < info.total_samples
    {
        return Err(ProbeError::Truncated {
            format: flac,
            reason: format!(
                "STREAMINFO declares {secs:.1} s of audio but the file stops in the frame at {:.1} s",
                last.start as f64 / f64::from(info.sample_rate)
            ),
        });
    }
    Ok(())
}

fn parse_streaminfo(b: &[u8]) -> Option<StreamInfo> {
    let x = be_u64(b, 10)?;
    Some(StreamInfo {
        max_block: u32::from(be_u16(b, 2)?),
        min_frame: be_u32(b, 3)? & 0xFF_FFFF,
        max_frame: be_u32(b, 6)? & 0xFF_FFFF,
        sample_rate: (x >> 44) as u32,
        channels: ((x >> 41) & 7) as u32 + 1,
        bits: ((x >> 36) & 0x1F) as u32 + 1,
        total_samples: x & 0xF_FFFF_FFFF,
    })
}

/// A FLAC frame header found in the tail of the file.
#[derive(Clone, Copy)]
struct FlacFrame {
    pos: usize,
    start: u64,
    samples: u64,
}

/// The last frame header in `tail` whose predecessor is also found, exactly where the
/// numbering says it should be (two consistent, CRC-checked headers: not a false sync).
fn last_confirmed_flac_frame(tail: &[u8], info: &StreamInfo) -> Option<FlacFrame> {
    let mut later: Vec<FlacFrame> = Vec::new();
    for i in (0..tail.len().saturating_sub(1)).rev() {
        if tail[i] != 0xFF || tail[i + 1] & 0xFE != 0xF8 {
            continue;
        }
        let Some(frame) =
            parse_flac_frame_header(&tail[i..], info).map(|(start, samples)| FlacFrame {
                pos: i,
                start,
                samples,
            })
        else {
            continue;
        };
        let end = frame.start + frame.samples;
        if let Some(next) = later.iter().find(|n| {
            n.start == end
                && n.pos > frame.pos
                && (info.max_frame == 0 || n.pos - frame.pos <= info.max_frame as usize)
        }) {
            return Some(*next);
        }
        if later.len() >= 64 {
            return None; // too many unconfirmed candidates: give up, inconclusive
        }
        later.push(frame);
    }
    None
}

/// Parses and validates a frame header: (first sample, sample count).
fn parse_flac_frame_header(b: &[u8], info: &StreamInfo) -> Option<(u64, u64)> {
    let variable = b.get(1)? & 1 == 1;
    let bs_code = b.get(2)? >> 4;
    let sr_code = b.get(2)? & 0xF;
    let ch_code = b.get(3)? >> 4;
    let ss_code = (b.get(3)? >> 1) & 7;
    if b.get(3)? & 1 != 0 || bs_code == 0 || sr_code == 15 || ch_code > 10 || ss_code == 3 {
        return None;
    }
    let channels = if ch_code < 8 {
        u32::from(ch_code) + 1
    } else {
        2
    };
    if channels != info.channels {
        return None;
    }
    let bits = [0, 8, 12, 0, 16, 20, 24, 32][usize::from(ss_code)];
    if bits != 0 && bits != info.bits {
        return None;
    }
    let (number, n_len) = flac_utf8_number(b.get(4..)?)?;
    let mut p = 4 + n_len;
    let block = match bs_code {
        1 => 192,
        2..=5 => 576u64 << (bs_code - 2),
        6 => {
            p += 1;
            u64::from(*b.get(p - 1)?) + 1
        }
        7 => {
            p += 2;
            u64::from(be_u16(b, p - 2)?) + 1
        }
        _ => 256u64 << (bs_code - 8),
    };
    let rate = match sr_code {
        0 => info.sample_rate,
        1..=11 => [
            88_200, 176_400, 192_000, 8_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000, 96_000,
        ][usize::from(sr_code - 1)],
        12 => {
            p += 1;
            u32::from(*b.get(p - 1)?) * 1000
        }
        13 => {
            p += 2;
            u32::from(be_u16(b, p - 2)?)
        }
        _ => {
            p += 2;
            u32::from(be_u16(b, p - 2)?) * 10
        }
    };
    if rate != info.sample_rate || (info.max_block > 0 && block > u64::from(info.max_block)) {
        return None;
    }
    let crc = *b.get(p)?;
    if crc8(&b[..p]) != crc {
        return None;
    }
    let start = if variable {
        number
    } else {
        number.checked_mul(u64::from(info.max_block))?
    };
    (start < info.total_samples).then_some((start, block))
}

/// FLAC's UTF-8-like coded frame/sample number: (value, bytes used).
fn flac_utf8_number(b: &[u8]) -> Option<(u64, usize)> {
    let b0 = *b.first()?;
    let (len, mut value) = match b0 {
        0x00..=0x7F => (1, u64::from(b0)),
        0xC0..=0xDF => (2, u64::from(b0 & 0x1F)),
        0xE0..=0xEF => (3, u64::from(b0 & 0x0F)),
        0xF0..=0xF7 => (4, u64::from(b0 & 0x07)),
        0xF8..=0xFB => (5, u64::from(b0 & 0x03)),
        0xFC..=0xFD => (6, u64::from(b0 & 0x01)),
        0xFE => (7, 0),
        _ => return None,
    };
    for i in 1..len {
        let c = *b.get(i)?;
        if c & 0xC0 != 0x80 {
            return None;
        }
        value = (value << 6) | u64::from(c & 0x3F);
    }
    Some((value, len))
}

fn crc8(data: &[u8]) -> u8 {
    let mut crc = 0u8;
    for byte in data {
        crc ^= byte;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 {
                (crc << 1) ^ 0x07
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The last Ogg page must be complete.
fn check_ogg_tail(src: &Source<'_>, format: AudioFormat) -> Result<(), ProbeError> {
    // A page is at most 27 + 255 + 255 × 255 bytes; most are a few kB.
    for window in [8 * 1024u64, 27 + 255 + 255 * 255 + 4] {
        let tail_start = src.len.saturating_sub(window);
        let tail = src.read_at(tail_start, (src.len - tail_start) as usize)?;
        let found = (0..tail.len().saturating_sub(5))
            .rev()
            .find(|&i| &tail[i..i + 4] == b"OggS" && tail[i + 4] == 0 && tail[i + 5] <= 7);
        let Some(i) = found else {
            if tail_start == 0 {
                break;
            }
            continue;
        };
        let page = &tail[i..];
        let header_end = page.get(26).map(|n| 27 + usize::from(*n));
        let body_len = header_end.and_then(|h| {
            page.get(27..h)
                .map(|lacing| lacing.iter().map(|l| usize::from(*l)).sum::<usize>())
        });
        let (Some(header_end), Some(body_len)) = (header_end, body_len) else {
            return Err(ProbeError::Truncated {
                format,
                reason: "the file ends inside the header of its last Ogg page".into(),
            });
        };
        let need = header_end + body_len;
        if need > page.len() {
            return Err(ProbeError::Truncated {
                format,
                reason: format!(
                    "the last Ogg page is incomplete ({} of {} present)",
                    human_bytes(page.len() as u64),
                    human_bytes(need as u64)
                ),
            });
        }
        let rest = &page[need..];
        // A cut inside the capture pattern or the 27-byte header of one more page.
        let capture = &rest[..rest.len().min(4)];
        if !rest.is_empty() && rest.len() < 27 && b"OggS".starts_with(capture) {
            return Err(ProbeError::Truncated {
                format,
                reason: "the file ends inside the header of its last Ogg page".into(),
            });
        }
        return Ok(());
    }
    Err(ProbeError::Corrupt {
        format,
        reason: "no Ogg page found near the end of the file".into(),
    })
}

/// Every top-level atom must end inside the file, and the `moov` index must exist.
fn check_mp4_atoms(src: &Source<'_>) -> Result<(), ProbeError> {
    let mp4 = AudioFormat::Mp4;
    let mut pos = 0u64;
    let mut moov = false;
    let mut mdat = false;
    for _ in 0..256 {
        if pos >= src.len {
            break;
        }
        let h = src.bytes(pos, 16)?;
        let kind = h.get(4..8).unwrap_or_default();
        // Bytes after the last atom that are no atom (a few stray bytes, an ID3v1 tag that
        // some taggers append, junk): not audio, so not a truncation. A missing `moov` is
        // still caught below.
        let is_atom_type =
            kind.len() == 4 && kind.iter().all(|c| (0x20..=0x7E).contains(c) || *c == 0xA9);
        let id3v1 = src.len - pos == 128 && h.starts_with(b"TAG");
        if !is_atom_type || id3v1 {
            break;
        }
        let name = String::from_utf8_lossy(kind).into_owned();
        let size = match be_u32(&h, 0).unwrap_or(0) {
            0 => src.len - pos, // extends to end of file
            1 => match be_u64(&h, 8) {
                Some(s) => s,
                None => break,
            },
            s => u64::from(s),
        };
        if size < 8 {
            return Err(ProbeError::Corrupt {
                format: mp4,
                reason: format!("invalid size {size} for the '{name}' atom"),
            });
        }
        moov |= kind == b"moov";
        mdat |= kind == b"mdat";
        let end = pos.saturating_add(size);
        if end > src.len {
            return Err(ProbeError::Truncated {
                format: mp4,
                reason: format!(
                    "the '{name}' atom declares {} but the file ends {} into it",
                    human_bytes(size),
                    human_bytes(src.len - pos)
                ),
            });
        }
        pos = end;
    }
    if !moov {
        return Err(if mdat {
            ProbeError::Truncated {
                format: mp4,
                reason: "the file ends before its 'moov' index atom".into(),
            }
        } else {
            ProbeError::Corrupt {
                format: mp4,
                reason: "no 'moov' atom".into(),
            }
        });
    }
    Ok(())
}

/// The `data` chunk must fit in the file.
fn check_wav(src: &Source<'_>) -> Result<(), ProbeError> {
    let wav = AudioFormat::Wav;
    let mut pos = 12u64;
    let mut byte_rate = 0u32;
    let mut block_align = 1u16;
    for _ in 0..256 {
        let h = src.bytes(pos, 8)?;
        if h.len() < 8 {
            break;
        }
        let size = le_u32(&h, 4).unwrap_or(0);
        let body = pos + 8;
        if &h[0..4] == b"fmt " {
            let f = src.bytes(body, 16)?;
            byte_rate = le_u32(&f, 8).unwrap_or(0);
            block_align = le_u16(&f, 12).unwrap_or(1).max(1);
        } else if &h[0..4] == b"data" {
            let declared = u64::from(size);
            let avail = src.len - body.min(src.len);
            if (size == 0 || size == u32::MAX) && avail > 0 {
                // lofty refuses these (it needs the size to find the audio).
                return Err(ProbeError::Unsupported {
                    reason: "WAV written as a stream (its data chunk size was never filled in)"
                        .into(),
                });
            }
            if avail >= declared {
                return Ok(());
            }
            if declared - avail > slack(declared, u64::from(block_align)) {
                let what = if byte_rate > 0 {
                    format!(
                        "{:.1} s of audio ({})",
                        declared as f64 / f64::from(byte_rate),
                        human_bytes(declared)
                    )
                } else {
                    human_bytes(declared)
                };
                return Err(ProbeError::Truncated {
                    format: wav,
                    reason: format!(
                        "the data chunk declares {what} but the file holds {}",
                        human_bytes(avail)
                    ),
                });
            }
            return Ok(());
        }
        pos = body + u64::from(size) + u64::from(size & 1);
        if pos > src.len {
            let name = String::from_utf8_lossy(&h[0..4]).into_owned();
            return Err(ProbeError::Truncated {
                format: wav,
                reason: format!("the file ends inside the '{name}' chunk, before any audio"),
            });
        }
    }
    Err(ProbeError::Corrupt {
        format: wav,
        reason: "no 'data' chunk".into(),
    })
}

/// The `SSND` chunk must fit in the file, and hold the frames `COMM` declares.
fn check_aiff(src: &Source<'_>, aifc: bool) -> Result<(), ProbeError> {
    let aiff = AudioFormat::Aiff;
    let mut pos = 12u64;
    // (frames, bytes per frame or 0 when compressed, sample rate)
    let mut comm: Option<(u64, u64, f64)> = None;
    // (declared size, bytes present after the 8-byte offset/block-size prefix)
    let mut ssnd: Option<(u64, u64, u64)> = None;
    for _ in 0..256 {
        let h = src.bytes(pos, 8)?;
        if h.len() < 8 {
            break;
        }
        let size = be_u32(&h, 4).unwrap_or(0);
        let body = pos + 8;
        if &h[0..4] == b"COMM" {
            let c = src.bytes(body, 22)?;
            let channels = u64::from(be_u16(&c, 0).unwrap_or(0));
            let frames = u64::from(be_u32(&c, 2).unwrap_or(0));
            let bits = u64::from(be_u16(&c, 6).unwrap_or(0));
            let rate = c.get(8..18).map(ieee_extended).unwrap_or(0.0);
            let compression = if aifc { c.get(18..22) } else { None };
            let sample_bytes = match compression {
                None | Some(b"NONE" | b"twos" | b"sowt" | b"raw " | b"in24" | b"in32") => {
                    bits.div_ceil(8)
                }
                Some(b"fl32" | b"FL32") => 4,
                Some(b"fl64" | b"FL64") => 8,
                Some(_) => 0,
            };
            comm = Some((frames, channels * sample_bytes, rate));
        } else if &h[0..4] == b"SSND" {
            let prefix = src.bytes(body, 4)?;
            let offset = u64::from(be_u32(&prefix, 0).unwrap_or(0));
            let avail = src.len - body.min(src.len);
            if size == 0 && avail > 8 {
                // lofty refuses these (it needs the size to find the audio).
                return Err(ProbeError::Unsupported {
                    reason: "AIFF written as a stream (its SSND chunk size was never filled in)"
                        .into(),
                });
            }
            let audio = avail.min(u64::from(size)).saturating_sub(8 + offset);
            ssnd = Some((u64::from(size), avail, audio));
        }
        if comm.is_some() && ssnd.is_some() {
            break;
        }
        pos = body + u64::from(size) + u64::from(size & 1);
        if pos > src.len && ssnd.is_none() {
            let name = String::from_utf8_lossy(&h[0..4]).into_owned();
            return Err(ProbeError::Truncated {
                format: aiff,
                reason: format!("the file ends inside the '{name}' chunk, before any audio"),
            });
        }
    }
    let Some((declared, avail, audio)) = ssnd else {
        return Err(ProbeError::Corrupt {
            format: aiff,
            reason: "no 'SSND' chunk".into(),
        });
    };
    let rate = comm.map_or(0.0, |c| c.2);
    let secs = |bytes: u64, frame_bytes: u64| {
        if rate > 0.0 && frame_bytes > 0 {
            format!(
                "{:.1} s of audio ({})",
                bytes as f64 / frame_bytes as f64 / rate,
                human_bytes(bytes)
            )
        } else {
            human_bytes(bytes)
        }
    };
    let frame_bytes = comm.map_or(0, |c| c.1);
    if let Some((frames, frame_bytes, _)) = comm
        && frame_bytes > 0
    {
        let expected = frames.saturating_mul(frame_bytes);
        if expected > audio && expected - audio > slack(expected, frame_bytes) {
            return Err(ProbeError::Truncated {
                format: aiff,
                reason: format!(
                    "the COMM chunk declares {} but the file holds {}",
                    secs(expected, frame_bytes),
                    human_bytes(audio)
                ),
            });
        }
    }
    if declared > avail && declared - avail > slack(declared, frame_bytes.max(1)) {
        return Err(ProbeError::Truncated {
            format: aiff,
            reason: format!(
                "the SSND chunk declares {} but the file holds {}",
                secs(declared, frame_bytes),
                human_bytes(avail)
            ),
        });
    }
    Ok(())
}

/// 80-bit IEEE 754 extended float (AIFF sample rate).
fn ieee_extended(b: &[u8]) -> f64 {
    let (Some(se), Some(mantissa)) = (be_u16(b, 0), be_u64(b, 2)) else {
        return 0.0;
    };
    let exponent = i32::from(se & 0x7FFF);
    if exponent == 0 || exponent == 0x7FFF {
        return 0.0;
    }
    let value = mantissa as f64 * 2f64.powi(exponent - 16383 - 63);
    if se & 0x8000 != 0 { -value } else { value }
}

// ---------------------------------------------------------------------------------------------
// lofty

struct Parsed {
    tagged: TaggedFile,
    codec: Option<String>,
}

fn parse_options(read_tags: bool) -> ParseOptions {
    ParseOptions::new()
        .parsing_mode(ParsingMode::BestAttempt)
        .read_cover_art(false)
        .read_tags(read_tags)
}

/// Reads the file with lofty. When that fails (or panics) but the audio properties alone can
/// be read, the file is kept without tags: a damaged tag frame must not hide a playable file.
fn parse_with_lofty(path: &Path, file: &File, s: &Sniffed) -> Result<Parsed, ProbeError> {
    let format = s.format;
    let first = lofty_attempt(file, format, true);
    let Err(first_error) = first else {
        return first;
    };
    match lofty_attempt(file, format, false) {
        Ok(parsed) => {
            tracing::warn!(track_path = %path.display(), error = %first_error, "tags unreadable; indexing the file without them");
            Ok(parsed)
        }
        Err(_) => Err(first_error),
    }
}

fn lofty_attempt(file: &File, format: AudioFormat, read_tags: bool) -> Result<Parsed, ProbeError> {
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
        Ok(Ok(parsed)) => Ok(parsed),
        Ok(Err(e)) => Err(lofty_error(format, &e)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            tracing::warn!(format = format.as_str(), panic = %what, "tag reader panicked");
            Err(ProbeError::Corrupt {
                format,
                reason: "the tag reader failed on malformed data".into(),
            })
        }
    }
}

fn read_concrete(
    reader: &mut BufReader<&File>,
    format: AudioFormat,
    opts: ParseOptions,
) -> Result<Parsed, FileParseError> {
    let named = |tagged: TaggedFile, codec: &str| Parsed {
        tagged,
        codec: Some(codec.to_owned()),
    };
    Ok(match format {
        AudioFormat::Mp3 => {
            let f = MpegFile::read_from(reader, opts)?;
            let codec = match f.properties().layer() {
                Layer::Layer1 => "mp1",
                Layer::Layer2 => "mp2",
                Layer::Layer3 => "mp3",
            };
            named(f.into(), codec)
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
            }
        }
    })
}

/// Turns lofty's error chain into a reason: "failed to parse Flac file" is dropped, the
/// causes under it are kept ("file does not contain a \"moov\" atom").
fn lofty_error(format: AudioFormat, e: &FileParseError) -> ProbeError {
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

// ---------------------------------------------------------------------------------------------
// Checks that need lofty's results, and building the track

fn postcheck(src: &Source<'_>, s: &Sniffed, parsed: &Parsed) -> Result<(), ProbeError> {
    let props = parsed.tagged.properties();
    if s.format == AudioFormat::Mp4 && props.sample_rate().unwrap_or(0) == 0 {
        return Err(ProbeError::NotAudio {
            reason: "MP4 container without an audio track".into(),
        });
    }
    if let Layout::Mpeg(info) = &s.layout {
        // Every MPEG frame is at least as long as an unpadded frame at the version/layer's
        // minimum bitrate (one frame of slack for the header frame and rounding).
        let h = &info.header;
        let secs = props.duration().as_secs_f64();
        let frames = (secs * f64::from(h.sample_rate) / f64::from(h.samples_per_frame())) as u64;
        let smallest = MpegHeader {
            bitrate_kbps: h.min_bitrate_kbps(),
            padding: false,
            ..*h
        };
        let min_bytes = frames
            .saturating_sub(1)
            .saturating_mul(smallest.frame_len());
        let audio = src.len - info.frame_offset;
        if audio < min_bytes {
            return Err(ProbeError::Truncated {
                format: AudioFormat::Mp3,
                reason: format!(
                    "header declares {secs:.1} s of audio (at least {} at the minimum MPEG bitrate) but the file holds {}",
                    human_bytes(min_bytes),
                    human_bytes(audio)
                ),
            });
        }
    }
    Ok(())
}

fn build_track(format: AudioFormat, parsed: Parsed) -> ProbedTrack {
    let tf = &parsed.tagged;
    let props = tf.properties();
    let nonzero = |v: Option<u32>| v.filter(|v| *v > 0).and_then(|v| i32::try_from(v).ok());
    let tags = ordered_tags(tf);
    ProbedTrack {
        format,
        codec: parsed.codec,
        duration_ms: i64::try_from(props.duration().as_millis()).unwrap_or(i64::MAX),
        sample_rate: nonzero(props.sample_rate()),
        channels: nonzero(props.channels().map(u32::from)),
        bit_depth: nonzero(props.bit_depth().map(u32::from)),
        bitrate_kbps: nonzero(props.audio_bitrate()).or_else(|| nonzero(props.overall_bitrate())),
        title: first_text(&tags, &[ItemKey::TrackTitle]),
        artist: joined_text(&tags, ItemKey::TrackArtist),
        album: first_text(&tags, &[ItemKey::AlbumTitle]),
        album_artist: joined_text(&tags, ItemKey::AlbumArtist),
        genre: joined_text(&tags, ItemKey::Genre),
        track_number: first_number(&tags, ItemKey::TrackNumber),
        disc_number: first_number(&tags, ItemKey::DiscNumber),
        year: first_year(&tags),
    }
}

/// The primary tag first, then every other tag, so a field missing from the primary tag is
/// taken from another one.
fn ordered_tags(tf: &TaggedFile) -> Vec<&Tag> {
    let primary = tf.primary_tag();
    let mut tags: Vec<&Tag> = primary.into_iter().collect();
    tags.extend(
        tf.tags()
            .iter()
            .filter(|t| primary.is_none_or(|p| p.tag_type() != t.tag_type())),
    );
    tags
}

fn first_text(tags: &[&Tag], keys: &[ItemKey]) -> Option<String> {
    tags.iter().find_map(|tag| {
        keys.iter()
            .find_map(|key| tag.get_strings(*key).find_map(clean_text))
    })
}

/// All values of a multi-valued field (several artists, genres) from the first tag that has
/// one, joined with "; ".
fn joined_text(tags: &[&Tag], key: ItemKey) -> Option<String> {
    tags.iter().find_map(|tag| {
        let mut values: Vec<String> = Vec::new();
        for value in tag.get_strings(key).filter_map(clean_text) {
            if !values.contains(&value) {
                values.push(value);
            }
        }
        (!values.is_empty()).then(|| cap_len(values.join("; ")))
    })
}

fn first_number(tags: &[&Tag], key: ItemKey) -> Option<i32> {
    tags.iter()
        .find_map(|tag| tag.get_strings(key).find_map(leading_number))
}

fn first_year(tags: &[&Tag]) -> Option<i32> {
    const KEYS: [ItemKey; 4] = [
        ItemKey::RecordingDate,
        ItemKey::Year,
        ItemKey::ReleaseDate,
        ItemKey::OriginalReleaseDate,
    ];
    tags.iter().find_map(|tag| {
        KEYS.iter()
            .find_map(|key| tag.get_strings(*key).find_map(parse_year))
    })
}

/// Trims, removes NUL padding (NUL-separated values become "a; b"), replaces other control
/// characters by spaces, caps the length; empty → None.
fn clean_text(raw: &str) -> Option<String> {
    let joined = raw
        .split('\0')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let cleaned: String = joined
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let cleaned = cleaned.trim();
    (!cleaned.is_empty()).then(|| cap_len(cleaned.to_owned()))
}

fn cap_len(mut s: String) -> String {
    if s.len() > MAX_TAG_BYTES {
        let mut cut = MAX_TAG_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        let trimmed = s.trim_end().len();
        s.truncate(trimmed);
    }
    s
}

/// "3", "03", "3/12", " 7 of 9" → the leading number; 0 or none → None.
fn leading_number(raw: &str) -> Option<i32> {
    let digits: String = raw
        .trim()
        .chars()
        .take_while(char::is_ascii_digit)
        .take(9)
        .collect();
    digits.parse::<i32>().ok().filter(|n| *n > 0)
}

/// "2019", "2019-05-01", "2019-05-01T10:00:00Z" → 2019.
fn parse_year(raw: &str) -> Option<i32> {
    let raw = raw.trim();
    let digits = raw.get(..4)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if raw.as_bytes().get(4).is_some_and(u8::is_ascii_digit) {
        return None; // not a 4-digit year
    }
    digits.parse::<i32>().ok().filter(|y| *y > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_by_extension_ignore_case() {
        for name in [
            "a.mp3", "b.FLAC", "c.Ogg", "d.m4b", "e.WAVE", "f.aifc", "g.opus",
        ] {
            assert!(is_audio_candidate(Path::new(name)), "{name}");
        }
        for name in ["a.txt", "b", "c.mp3.part", "d.jpg", ".mp3"] {
            assert!(!is_audio_candidate(Path::new(name)), "{name}");
        }
    }

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
        assert_eq!((track.format, track.duration_ms), (AudioFormat::Wav, 500));
    }

    #[test]
    fn numbers_and_years() {
        assert_eq!(leading_number("3/12"), Some(3));
        assert_eq!(leading_number(" 07 "), Some(7));
        assert_eq!(leading_number("0"), None);
        assert_eq!(leading_number("x"), None);
        assert_eq!(leading_number("99999999999999"), Some(999_999_999));
        assert_eq!(parse_year("2019-05-01"), Some(2019));
        assert_eq!(parse_year(" 1999 "), Some(1999));
        assert_eq!(parse_year("20190"), None);
        assert_eq!(parse_year("19"), None);
        assert_eq!(parse_year("0000"), None);
    }

    #[test]
    fn text_is_cleaned() {
        assert_eq!(clean_text("  Title\0\0\0"), Some("Title".into()));
        assert_eq!(clean_text("A\0B"), Some("A; B".into()));
        assert_eq!(clean_text(" \0 "), None);
        assert_eq!(clean_text("a\u{1}b"), Some("a b".into()));
        let long = "é".repeat(2000);
        let capped = clean_text(&long).unwrap_or_default();
        assert!(capped.len() <= MAX_TAG_BYTES && capped.chars().all(|c| c == 'é'));
    }

    #[test]
    fn flac_crc8_and_utf8_numbers() {
        // CRC-8 (poly 0x07) of "123456789" is 0xF4.
        assert_eq!(crc8(b"123456789"), 0xF4);
        assert_eq!(flac_utf8_number(&[0x7F]), Some((0x7F, 1)));
        assert_eq!(flac_utf8_number(&[0xC2, 0x80]), Some((0x80, 2)));
        assert_eq!(flac_utf8_number(&[0xC2, 0x00]), None);
        assert_eq!(flac_utf8_number(&[0xFF]), None);
    }

    #[test]
    fn mpeg_header_frame_length() {
        // MPEG-1 layer III, 128 kbit/s, 44.1 kHz, no padding: 417 bytes.
        let h = MpegHeader::parse(&[0xFF, 0xFB, 0x90, 0x00]).map(|h| h.frame_len());
        assert_eq!(h, Some(417));
        // Free-format bitrate is refused.
        assert!(MpegHeader::parse(&[0xFF, 0xFB, 0x00, 0x00]).is_none());
    }

    #[test]
    fn extended_float_sample_rate() {
        let rate_44100 = [0x40, 0x0E, 0xAC, 0x44, 0, 0, 0, 0, 0, 0];
        assert!((ieee_extended(&rate_44100) - 44_100.0).abs() < 1e-6);
    }

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
