//! The open file under probe: its length, its first bytes (read once) and positioned reads on
//! the same descriptor, plus the small byte and wording helpers every check shares.

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::{ProbeError, SNIFF_LEN};

/// The open file plus its first bytes, read once.
pub(crate) struct Source<'a> {
    pub(crate) file: &'a File,
    pub(crate) len: u64,
    pub(crate) head: Vec<u8>,
}

impl<'a> Source<'a> {
    pub(crate) fn new(file: &'a File, len: u64) -> Result<Self, ProbeError> {
        let mut src = Source {
            file,
            len,
            head: Vec::new(),
        };
        src.head = src.read_at(0, SNIFF_LEN)?;
        Ok(src)
    }

    /// Reads up to `want` bytes at `offset` (fewer at end of file).
    pub(crate) fn read_at(&self, offset: u64, want: usize) -> Result<Vec<u8>, ProbeError> {
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
    pub(crate) fn bytes(&self, offset: u64, len: usize) -> Result<Cow<'_, [u8]>, ProbeError> {
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

pub(crate) fn io_reason(e: &io::Error) -> String {
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

pub(crate) fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
pub(crate) fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
pub(crate) fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
pub(crate) fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
pub(crate) fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// "3000 bytes", "360.0 kB", "1.4 MB".
pub(crate) fn human_bytes(n: u64) -> String {
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
