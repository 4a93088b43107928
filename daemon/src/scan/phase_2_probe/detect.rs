//! Content detection: the format of a file from its first bytes (the extension is never
//! trusted), skipping leading ID3v2 tags, and what the sniff learned of its layout.

use super::integrity::mpeg::{MpegHeader, adts_frame_len};
use super::source::{Source, be_u32, human_bytes};
use super::{AudioFormat, MAX_JUNK, ProbeError, SNIFF_LEN};

/// The format and what the sniff learned about its layout.
pub(crate) struct Sniffed {
    pub(crate) format: AudioFormat,
    /// Offset of the stream after any leading ID3v2 tag(s).
    pub(crate) start: u64,
    pub(crate) layout: Layout,
}

impl Sniffed {
    /// Whether lofty reads this file; otherwise FFmpeg does.
    pub(crate) fn lofty_reads(&self) -> bool {
        !matches!(self.layout, Layout::FfmpegOnly) && self.format.lofty_reads()
    }
}

pub(crate) enum Layout {
    Mpeg(MpegInfo),
    Flac,
    Ogg,
    Mp4,
    Wav,
    Aiff {
        aifc: bool,
    },
    /// Raw ADTS AAC: the first frame header is at `frame_offset`.
    Adts {
        frame_offset: u64,
    },
    /// A format lofty has no reader for, or a variant of one it refuses (RF64): no integrity
    /// check of ours, read with FFmpeg.
    FfmpegOnly,
    Other,
}

pub(crate) struct MpegInfo {
    pub(crate) frame_offset: u64,
    pub(crate) header: MpegHeader,
    /// Frame and byte counts from a Xing/Info or VBRI header.
    pub(crate) vbr_frames: Option<u32>,
    pub(crate) vbr_bytes: Option<u32>,
}

pub(crate) fn sniff(src: &Source<'_>) -> Result<Sniffed, ProbeError> {
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
    let found = |format, layout| Sniffed {
        format,
        start,
        layout,
    };
    let simple = |format| found(format, Layout::Other);
    let ffmpeg = |format| found(format, Layout::FfmpegOnly);

    if at(0, b"fLaC") {
        return Ok(found(AudioFormat::Flac, Layout::Flac));
    }
    if at(0, b"MAC ") {
        return Ok(simple(AudioFormat::Ape));
    }
    if at(0, b"MPCK") || at(0, b"MP+") {
        return Ok(simple(AudioFormat::Musepack));
    }
    if !id3 {
        if at(0, b"OggS") {
            return sniff_ogg(w).map(|format| found(format, Layout::Ogg));
        }
        if at(0, b"RIFF") && at(8, b"WAVE") {
            return Ok(found(AudioFormat::Wav, Layout::Wav));
        }
        if at(0, b"RF64") || at(0, b"BW64") {
            // 64-bit WAV: lofty refuses it.
            return Ok(ffmpeg(AudioFormat::Wav));
        }
        if at(0, b"FORM") && (at(8, b"AIFF") || at(8, b"AIFC")) {
            let aifc = at(8, b"AIFC");
            return Ok(found(AudioFormat::Aiff, Layout::Aiff { aifc }));
        }
        if at(4, b"ftyp") {
            return Ok(found(AudioFormat::Mp4, Layout::Mp4));
        }
        if at(0, b"wvpk") {
            return Ok(simple(AudioFormat::WavPack));
        }
        if let Some(format) = sniff_ffmpeg_only(w) {
            return Ok(ffmpeg(format));
        }
    }
    if at(0, b"TTA1") {
        return Ok(ffmpeg(AudioFormat::TrueAudio)); // may follow an ID3v2 tag
    }
    if at(0, b"ADIF") {
        return Ok(ffmpeg(AudioFormat::Aac));
    }
    if let Some(sniffed) = sniff_mpeg_or_adts(src, start, w)? {
        return Ok(sniffed);
    }
    Err(ProbeError::NotAudio {
        reason: describe_non_audio(head),
    })
}

/// Formats only FFmpeg reads, by their magic numbers at the start of the file.
fn sniff_ffmpeg_only(w: &[u8]) -> Option<AudioFormat> {
    const ASF_HEADER: [u8; 16] = [
        0x30, 0x26, 0xB2, 0x75, 0x8E, 0x66, 0xCF, 0x11, 0xA6, 0xD9, 0x00, 0xAA, 0x00, 0x62, 0xCE,
        0x6C,
    ];
    let at = |off: usize, magic: &[u8]| w.get(off..off + magic.len()) == Some(magic);
    Some(if at(0, &ASF_HEADER) {
        AudioFormat::Wma
    } else if at(0, b"DSD ") {
        AudioFormat::Dsf
    } else if at(0, b"FRM8") {
        AudioFormat::Dff
    } else if at(0, b"tBaK") {
        AudioFormat::Tak
    } else if at(0, b"OFR ") {
        AudioFormat::OptimFrog
    } else if at(0, b"ajkg") {
        AudioFormat::Shorten
    } else if at(0, &[0x1A, 0x45, 0xDF, 0xA3]) {
        AudioFormat::Matroska
    } else if at(0, &[0x7F, 0xFE, 0x80, 0x01]) {
        AudioFormat::Dts
    } else if at(0, &[0x0B, 0x77]) {
        AudioFormat::Ac3
    } else {
        return None;
    })
}

/// Size of an ID3v2 tag (header, body and footer) at the start of `b`, if one is there.
pub(crate) fn id3v2_len(b: &[u8]) -> Option<u64> {
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
pub(crate) fn sniff_ogg(w: &[u8]) -> Result<AudioFormat, ProbeError> {
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
        Ok(AudioFormat::OggFlac)
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
pub(crate) fn sniff_mpeg_or_adts(
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
                    layout: Layout::Adts { frame_offset: here },
                }));
            }
        }
    }
    Ok(None)
}

/// Frame and byte counts from a Xing/Info (layer III) or VBRI header in the first frame.
pub(crate) fn vbr_header(
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

pub(crate) fn describe_non_audio(head: &[u8]) -> String {
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

pub(crate) fn looks_like_text(b: &[u8]) -> bool {
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
