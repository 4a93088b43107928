//! Test harness shared by the integration tests.

pub mod daemon;
pub mod fixtures;
pub mod hostile_corpus;
pub mod http;
pub mod journald;
pub mod music;
pub mod notify_socket;
pub mod similarity;
pub mod tagger;
