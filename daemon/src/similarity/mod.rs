//! Similar tracks: `track.similar`'s neighbours of one track, by centred cosine.
//!
//! A score is the cosine of two tracks' vectors after the model's mean vector over the whole
//! collection (`model_centroids`, kept up to date by triggers on every write of
//! `track_embeddings`) is subtracted from both. Raw embeddings of one model share a large
//! common direction, so raw cosines bunch near 1 (0.91–0.97 between unrelated tracks);
//! centred, an unrelated pair scores near 0, a near-identical one near 1, and the scores
//! spread over [-1, 1]. Candidates come from [`vectors::candidates`] (an exact scan while the
//! model has at most [`EXACT_SCAN_MAX`] vectors, the HNSW index with over-fetch beyond), then
//! [`rank::thin`] drops other files of the same recording and caps artists. `path.rs` and
//! `mix.rs` build sonic paths and mixes from the same candidates. Across a model change a
//! query reads the model that serves its library ([`Similarity::serving`]).

mod mix;
mod path;
pub mod rank;
pub mod vectors;

pub use mix::MAX_SEEDS;
pub use path::MAX_PATH_LEN;

use sqlx::PgPool;

use crate::db::tracks::{self, TrackRecord};
use crate::embed::phase_5_store::{self, RegisteredModel};
use crate::embed::serving;

/// Up to this many vectors of a model, candidates are found by an exact scan.
pub const EXACT_SCAN_MAX: i64 = 5_000;

/// Candidates read per neighbour asked (the filters in Rust drop some), and at least this many.
const OVERFETCH: u32 = 4;
const MIN_CANDIDATES: u32 = 100;
pub(crate) const MAX_CANDIDATES: u32 = 4_000;

/// `track.similar`'s checked filters.
#[derive(Debug, Clone, PartialEq)]
pub struct SimilarFilter {
    pub library_ids: Option<Vec<i64>>,
    pub min_ms: i64,
    pub max_ms: i64,
    pub exclude_same_recording: bool,
    pub max_per_artist: Option<u32>,
}

impl Default for SimilarFilter {
    fn default() -> Self {
        SimilarFilter {
            library_ids: None,
            min_ms: 0,
            max_ms: i64::MAX,
            exclude_same_recording: true,
            max_per_artist: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimilarityError {
    #[error(
        "track {0} has no embedding yet (not embedded, skipped, or failed); `coralctl scans` \
         shows embedding progress"
    )]
    NoEmbedding(i64),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Similarity over one model's vectors.
#[derive(Debug, Clone)]
pub struct Similarity {
    pool: PgPool,
    model: RegisteredModel,
}

impl SimilarFilter {
    /// The rules on recordings and artists.
    pub fn thinning(&self) -> rank::Thinning {
        rank::Thinning {
            distinct_recordings: self.exclude_same_recording,
            max_per_artist: self.max_per_artist,
        }
    }
}

impl Similarity {
    /// Similarity over `model`'s vectors (the active model: see [`Similarity::serving`]).
    pub fn new(pool: PgPool, model: RegisteredModel) -> Similarity {
        Similarity { pool, model }
    }

    /// Similarity for a query on `track` (its first track): over the model that serves the
    /// track's library (`crate::embed::serving`: its previous model while a model change
    /// re-embeds it), unless the track has no vector of that model (a file added or changed
    /// during the change, embedded under the new model only): then over this one's, the
    /// active model. Candidates are the tracks with a vector of the model chosen.
    pub async fn serving(&self, track: &TrackRecord) -> Result<Similarity, SimilarityError> {
        let complete = serving::completions(&self.pool, track.library_id).await?;
        let mut model = serving::serving(self.model, &complete);
        if model != self.model
            && phase_5_store::embedding_of(&self.pool, model.id, track.id)
                .await?
                .is_none()
        {
            model = self.model;
        }
        Ok(Similarity {
            pool: self.pool.clone(),
            model,
        })
    }

    /// The model whose vectors this similarity reads.
    pub fn model(&self) -> RegisteredModel {
        self.model
    }

    /// The stored vector of `track`.
    async fn vector(&self, track: &TrackRecord) -> Result<Vec<f32>, SimilarityError> {
        phase_5_store::embedding_of(&self.pool, self.model.id, track.id)
            .await?
            .ok_or(SimilarityError::NoEmbedding(track.id))
    }

    /// Candidates near the raw vector `raw`, with their rows, best first.
    async fn scored(
        &self,
        raw: &[f32],
        centroid: &vectors::Centroid,
        scope: &vectors::Scope,
        k: u32,
    ) -> Result<Vec<(TrackRecord, f64)>, SimilarityError> {
        let exact = centroid.count <= crate::test_hooks::similar_exact_scan_max(EXACT_SCAN_MAX);
        let scored =
            vectors::candidates(&self.pool, self.model, raw, &centroid.mean, scope, k, exact)
                .await?;
        let ids: Vec<i64> = scored.iter().map(|(id, _)| *id).collect();
        let mut records: std::collections::HashMap<i64, TrackRecord> =
            tracks::get_many(&self.pool, &ids)
                .await?
                .into_iter()
                .map(|r| (r.id, r))
                .collect();
        Ok(scored
            .into_iter()
            .filter_map(|(id, s)| Some((records.remove(&id)?, s)))
            .collect())
    }

    /// Candidates around the centred direction `centred` (a unit vector after the mean is
    /// subtracted), with their rows and vectors, best first.
    async fn around(
        &self,
        centred: &[f32],
        centroid: &vectors::Centroid,
        scope: &vectors::Scope,
        k: u32,
    ) -> Result<Vec<(TrackRecord, f64, Vec<f32>)>, SimilarityError> {
        // A raw query whose centred part is `centred` (the index path searches raw vectors).
        let raw: Vec<f32> = centred
            .iter()
            .zip(&centroid.mean)
            .map(|(c, m)| c + m)
            .collect();
        let scored = self.scored(&raw, centroid, scope, k).await?;
        let ids: Vec<i64> = scored.iter().map(|(t, _)| t.id).collect();
        let mut vecs = vectors::embeddings(&self.pool, self.model, &ids).await?;
        Ok(scored
            .into_iter()
            .filter_map(|(t, s)| {
                let v = vecs.remove(&t.id)?;
                Some((t, s, v))
            })
            .collect())
    }

    /// The neighbours of `track`, best first, at most `limit`, with `filter` applied.
    pub async fn similar(
        &self,
        track: &TrackRecord,
        filter: &SimilarFilter,
        limit: u32,
    ) -> Result<Vec<(TrackRecord, f64)>, SimilarityError> {
        let query = self.vector(track).await?;
        let centroid = vectors::centroid(&self.pool, self.model).await?;
        let scope = vectors::Scope {
            exclude: vec![track.id],
            library_ids: filter.library_ids.clone(),
            min_ms: filter.min_ms,
            max_ms: filter.max_ms,
        };
        let k = limit
            .saturating_mul(OVERFETCH)
            .clamp(MIN_CANDIDATES, MAX_CANDIDATES);
        let ordered = self.scored(&query, &centroid, &scope, k).await?;
        Ok(rank::thin(
            &[rank::RecordingKey::of(track)],
            ordered,
            filter.thinning(),
            usize::try_from(limit).unwrap_or(usize::MAX),
        ))
    }
}
