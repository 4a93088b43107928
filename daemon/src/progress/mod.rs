//! Live progress of every scan: cache-padded counters the pipeline bumps, the ScanReporter that
//! turns them into `ScanProgress` snapshots (rates, ETA, monotonic percentages), and the fan-out
//! that delivers coalesced snapshots to any number of subscribers without ever blocking the
//! pipeline.

pub mod counters;
pub mod fanout;
pub mod persist;
pub mod reporter;

pub use counters::ScanCounters;
pub use reporter::{ScanHandle, ScanReporter};
