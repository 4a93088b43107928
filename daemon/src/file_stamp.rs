//! A file's modification time as corald stores it (nanoseconds since the epoch, saturating):
//! the walker records it with each track, and the embedding consumer compares it before it
//! decodes, so both read it the same way.

use std::os::unix::fs::MetadataExt;

/// `md`'s modification time in nanoseconds since the epoch.
pub fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec())
}
