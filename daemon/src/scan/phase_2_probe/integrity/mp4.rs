//! MP4/M4A: every top-level atom ends inside the file and a `moov` index exists.

use super::super::source::{Source, be_u32, be_u64, human_bytes};
use super::super::{AudioFormat, ProbeError};

/// Every top-level atom must end inside the file, and the `moov` index must exist.
pub(crate) fn check_atoms(src: &Source<'_>) -> Result<(), ProbeError> {
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
