//! Embeddings: decode → mono + resample → windows batched across tracks → libtorch inference →
//! pgvector, for "similar tracks". (Being built; see the embedding issue.)

use serde::Deserialize;

/// The `[embed]` section of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedConfig {
    /// Compute embeddings for new and changed tracks.
    pub enabled: bool,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig { enabled: true }
    }
}
