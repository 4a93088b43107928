//! MPEG audio (and ADTS) framing: frame headers, and the size checks that catch a cut MP3.

use super::super::detect::MpegInfo;
use super::super::source::{Source, human_bytes};
use super::super::{AudioFormat, ProbeError};

/// Bytes read at a time while walking frame headers.
const WALK_CHUNK: usize = 256 * 1024;
/// Frames walked at most (≈ 7 h of 44.1 kHz AAC): a bound on a hostile file's cost.
const MAX_FRAMES: u64 = 1 << 20;
/// Frames looked at to tell a variable from a constant bitrate.
const VBR_SAMPLE_FRAMES: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MpegVersion {
    V1,
    V2,
    V25,
}

#[derive(Clone, Copy)]
pub(crate) struct MpegHeader {
    pub(crate) version: MpegVersion,
    /// 1, 2 or 3.
    pub(crate) layer: u8,
    pub(crate) bitrate_kbps: u32,
    pub(crate) sample_rate: u32,
    pub(crate) padding: bool,
    pub(crate) mono: bool,
}

pub(crate) const BITRATES_V1: [[u32; 14]; 3] = [
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
pub(crate) const BITRATES_V2: [[u32; 14]; 2] = [
    [
        32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256,
    ],
    [8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
];

impl MpegHeader {
    pub(crate) fn parse(b: &[u8]) -> Option<Self> {
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

    pub(crate) fn bitrate_table(version: MpegVersion, layer: u8) -> &'static [u32; 14] {
        match (version, layer) {
            (MpegVersion::V1, 1) => &BITRATES_V1[0],
            (MpegVersion::V1, 2) => &BITRATES_V1[1],
            (MpegVersion::V1, _) => &BITRATES_V1[2],
            (_, 1) => &BITRATES_V2[0],
            _ => &BITRATES_V2[1],
        }
    }

    /// The smallest bitrate this version/layer allows (kbit/s).
    pub(crate) fn min_bitrate_kbps(&self) -> u32 {
        Self::bitrate_table(self.version, self.layer)[0]
    }

    pub(crate) fn samples_per_frame(&self) -> u32 {
        match (self.layer, self.version) {
            (1, _) => 384,
            (3, MpegVersion::V2 | MpegVersion::V25) => 576,
            _ => 1152,
        }
    }

    pub(crate) fn frame_len(&self) -> u64 {
        let br = u64::from(self.bitrate_kbps) * 1000;
        let sr = u64::from(self.sample_rate);
        let pad = u64::from(self.padding);
        if self.layer == 1 {
            (12 * br / sr + pad) * 4
        } else {
            u64::from(self.samples_per_frame()) / 8 * br / sr + pad
        }
    }

    pub(crate) fn compatible(&self, other: &Self) -> bool {
        self.version == other.version
            && self.layer == other.layer
            && self.sample_rate == other.sample_rate
    }

    /// Offset of a Xing/Info header inside a layer III frame.
    pub(crate) fn xing_offset(&self) -> usize {
        4 + match (self.version, self.mono) {
            (MpegVersion::V1, false) => 32,
            (MpegVersion::V1, true) | (_, false) => 17,
            (_, true) => 9,
        }
    }
}

/// An ADTS (raw AAC) frame header: returns the frame length.
pub(crate) fn adts_frame_len(b: &[u8]) -> Option<u64> {
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
pub(crate) fn check_vbr_bytes(src: &Source<'_>, info: &MpegInfo) -> Result<(), ProbeError> {
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

/// Every MPEG frame is at least as long as an unpadded frame at the version/layer's minimum
/// bitrate (one frame of slack for the header frame and rounding).
pub(crate) fn check_min_bitrate(
    src: &Source<'_>,
    info: &MpegInfo,
    secs: f64,
) -> Result<(), ProbeError> {
    let h = &info.header;
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
    Ok(())
}

/// Walks frames from `start`: `frame(bytes) → (length, samples, sample rate)` of a frame header
/// at the start of `bytes`. Stops at the end of the file or at the first non-frame (a trailing
/// ID3v1/APE tag). Returns the seconds of the frames found, `None` when there are none.
fn walk_frames(
    src: &Source<'_>,
    start: u64,
    frame: impl Fn(&[u8]) -> Option<(u64, u64, u32)>,
) -> Result<Option<f64>, ProbeError> {
    let mut pos = start;
    let mut buf_start = start;
    let mut buf: Vec<u8> = Vec::new();
    let (mut samples, mut rate, mut frames) = (0u64, 0u32, 0u64);
    while pos < src.len && frames < MAX_FRAMES {
        let mut at = (pos - buf_start) as usize;
        if at + 8 > buf.len() {
            buf = src.read_at(pos, WALK_CHUNK)?;
            buf_start = pos;
            at = 0;
        }
        // Every iteration stops or moves `pos` forward.
        let Some((len, n, r)) = buf.get(at..).and_then(&frame) else {
            break;
        };
        samples += n;
        rate = r;
        frames += 1;
        pos += len.max(1);
    }
    Ok((rate > 0 && samples > 0).then(|| samples as f64 / f64::from(rate)))
}

/// Length of a raw ADTS AAC stream from its frames.
pub(crate) fn adts_duration(src: &Source<'_>, start: u64) -> Result<Option<f64>, ProbeError> {
    const RATES: [u32; 13] = [
        96_000, 88_200, 64_000, 48_000, 44_100, 32_000, 24_000, 22_050, 16_000, 12_000, 11_025,
        8_000, 7_350,
    ];
    walk_frames(src, start, |b| {
        let len = adts_frame_len(b)?;
        let rate = *RATES.get(usize::from((b.get(2)? >> 2) & 0xF))?;
        let blocks = u64::from(b.get(6)? & 3) + 1;
        Some((len, 1024 * blocks, rate))
    })
}

/// Length of an MPEG audio stream from its frames.
pub(crate) fn mpeg_duration(src: &Source<'_>, info: &MpegInfo) -> Result<Option<f64>, ProbeError> {
    let first = info.header;
    walk_frames(src, info.frame_offset, |b| {
        let h = MpegHeader::parse(b).filter(|h| h.compatible(&first))?;
        Some((
            h.frame_len(),
            u64::from(h.samples_per_frame()),
            h.sample_rate,
        ))
    })
}

/// Whether the first frames of an MPEG stream have different bitrates (VBR).
pub(crate) fn starts_variable(src: &Source<'_>, info: &MpegInfo) -> Result<bool, ProbeError> {
    let b = src.bytes(info.frame_offset, 8 * 1024)?;
    let mut at = 0usize;
    let mut seen: Option<u32> = None;
    for _ in 0..VBR_SAMPLE_FRAMES {
        let Some(h) = b.get(at..).and_then(MpegHeader::parse) else {
            break;
        };
        match seen {
            Some(rate) if rate != h.bitrate_kbps => return Ok(true),
            _ => seen = Some(h.bitrate_kbps),
        }
        at += h.frame_len().max(1) as usize;
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpeg_header_frame_length() {
        // MPEG-1 layer III, 128 kbit/s, 44.1 kHz, no padding: 417 bytes.
        let h = MpegHeader::parse(&[0xFF, 0xFB, 0x90, 0x00]).map(|h| h.frame_len());
        assert_eq!(h, Some(417));
        // Free-format bitrate is refused.
        assert!(MpegHeader::parse(&[0xFF, 0xFB, 0x00, 0x00]).is_none());
    }
}
