//! FLAC: metadata blocks inside the file, a minimum audio size from STREAMINFO, and the last
//! frame ending at the declared sample count.

use super::super::source::{Source, be_u16, be_u32, be_u64, human_bytes};
use super::super::{AudioFormat, ProbeError};

/// STREAMINFO fields used by the checks.
#[derive(Clone, Copy)]
pub(crate) struct StreamInfo {
    pub(crate) max_block: u32,
    pub(crate) min_frame: u32,
    pub(crate) max_frame: u32,
    pub(crate) sample_rate: u32,
    pub(crate) channels: u32,
    pub(crate) bits: u32,
    pub(crate) total_samples: u64,
}

pub(crate) fn check(src: &Source<'_>, start: u64) -> Result<(), ProbeError> {
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

pub(crate) fn parse_streaminfo(b: &[u8]) -> Option<StreamInfo> {
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
pub(crate) struct FlacFrame {
    pub(crate) pos: usize,
    pub(crate) start: u64,
    pub(crate) samples: u64,
}

/// The last frame header in `tail` whose predecessor is also found, exactly where the
/// numbering says it should be (two consistent, CRC-checked headers: not a false sync).
pub(crate) fn last_confirmed_flac_frame(tail: &[u8], info: &StreamInfo) -> Option<FlacFrame> {
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
pub(crate) fn parse_flac_frame_header(b: &[u8], info: &StreamInfo) -> Option<(u64, u64)> {
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
pub(crate) fn flac_utf8_number(b: &[u8]) -> Option<(u64, usize)> {
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

pub(crate) fn crc8(data: &[u8]) -> u8 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flac_crc8_and_utf8_numbers() {
        // CRC-8 (poly 0x07) of "123456789" is 0xF4.
        assert_eq!(crc8(b"123456789"), 0xF4);
        assert_eq!(flac_utf8_number(&[0x7F]), Some((0x7F, 1)));
        assert_eq!(flac_utf8_number(&[0xC2, 0x80]), Some((0x80, 2)));
        assert_eq!(flac_utf8_number(&[0xC2, 0x00]), None);
        assert_eq!(flac_utf8_number(&[0xFF]), None);
    }
}
