//! Ogg (Vorbis, Opus, Speex): the last page must be complete.

use super::super::source::{Source, human_bytes};
use super::super::{AudioFormat, ProbeError};

/// The last Ogg page must be complete.
pub(crate) fn check_tail(src: &Source<'_>, format: AudioFormat) -> Result<(), ProbeError> {
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
