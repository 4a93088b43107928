//! corald: the Coral indexer daemon as a library, so tests and benches drive the same code the
//! binary runs. `daemon` wires the pieces; each module owns one stage of the pipeline.

pub mod app;
pub mod config;
pub mod db;
pub mod embed;
#[cfg(feature = "fuzz-entry")]
pub mod fuzz_entry;
pub mod library;
pub mod liveness;
pub mod logging;
pub mod panic_text;
pub mod progress;
pub mod relpath;
pub mod rpc;
pub mod scan;
pub mod systemd;
pub mod test_hooks;
pub mod text_fold;
pub mod watch;
pub mod worker;
