//! Test harness shared by the integration tests.

pub mod daemon;
pub mod fixtures;
pub mod hostile_corpus;
pub mod music;
pub mod tagger;
