//! WAV (RIFF) and AIFF/AIFC (IFF): the audio chunk must fit in the file.

use super::super::source::{Source, be_u16, be_u32, be_u64, human_bytes, le_u16, le_u32};
use super::super::{AudioFormat, ProbeError};
use super::slack;

/// The `data` chunk must fit in the file.
pub(crate) fn check_wav(src: &Source<'_>) -> Result<(), ProbeError> {
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
pub(crate) fn check_aiff(src: &Source<'_>, aifc: bool) -> Result<(), ProbeError> {
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
pub(crate) fn ieee_extended(b: &[u8]) -> f64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_float_sample_rate() {
        let rate_44100 = [0x40, 0x0E, 0xAC, 0x44, 0, 0, 0, 0, 0, 0];
        assert!((ieee_extended(&rate_44100) - 44_100.0).abs() < 1e-6);
    }
}
