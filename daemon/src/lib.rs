//! corald: the Coral indexer daemon as a library, so tests and benches drive the same code the
//! binary runs. `app` wires the pieces; each other module owns one stage or one service.
//!
//! # Layout
//!
//! The data flows top to bottom:
//!
//! - [`config`]: the configuration and every section of it; imports nothing else of corald.
//! - [`app`]: the composition root (start-up, the API socket, status line, reload, shutdown).
//! - [`rpc`]: the JSON-RPC API on the Unix socket; thin: parameters → service → error code.
//! - [`library`]: `LibraryService` (add, find, remove, follow the configured list).
//! - [`watch`]: inotify (or polling) → debounced scans on the scan channel.
//! - [`scan`]: the scan channel and worker; a job is discover → probe → store
//!   (`scan/job.rs`, `scan/discover.rs`, `scan/phase_*`).
//! - [`embed`]: the embedding queue in PostgreSQL and its consumers; decode → resample →
//!   batch → infer → store (`embed/phase_*`). [`worker`]: `corald worker`, the pipeline alone.
//! - [`similarity`]: `track.similar` (centred cosine, filters); [`lookup`]: tracks found by
//!   path, MusicBrainz id, ISRC, or artist + title (`track.lookup`, `TrackRef`).
//! - [`progress`]: counters, the ScanReporter, subscriber fan-out, and `persist` (the only
//!   writer of `scans` rows).
//! - [`track`]: the one shape of a probed track, from the probe to the `tracks` row.
//! - [`db`]: every SQL statement, the managed cluster, database health and retries.
//! - [`liveness`], [`systemd`], [`logging`]: heartbeats, the service manager, logs.
//! - [`relpath`], [`file_stamp`], [`text_fold`], [`panic_text`]: small shared rules (one home
//!   each).
//! - [`test_hooks`] and `fuzz_entry`: compiled for tests and fuzzing only (features
//!   `test-hooks`, `fuzz-entry`).

pub mod app;
pub mod config;
pub mod db;
pub mod embed;
pub mod file_stamp;
#[cfg(feature = "fuzz-entry")]
pub mod fuzz_entry;
pub mod library;
pub mod liveness;
pub mod logging;
pub mod lookup;
pub mod panic_text;
pub mod progress;
pub mod relpath;
pub mod rpc;
pub mod scan;
pub mod similarity;
pub mod systemd;
pub mod test_hooks;
pub mod text_fold;
pub mod track;
pub mod watch;
pub mod worker;
