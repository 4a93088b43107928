//! Similar tracks: `track.similar`'s neighbours of one track, by centred cosine.
//!
//! A score is the cosine of two tracks' vectors after the model's mean vector over the whole
//! collection (`model_centroids`, kept up to date by triggers on every write of
//! `track_embeddings`) is subtracted from both. Raw embeddings of one model share a large
//! common direction, so raw cosines bunch near 1 (0.91–0.97 between unrelated tracks);
//! centred, an unrelated pair scores near 0, a near-identical one near 1, and the scores
//! spread over [-1, 1]. Candidates come from [`vectors::candidates`] (an exact scan while the
//! model has at most [`EXACT_SCAN_MAX`] vectors, the HNSW index with over-fetch beyond), then
//! [`rank::thin`] drops other files of the same recording and caps artists.

pub mod rank;
pub mod vectors;

use sqlx::PgPool;

use crate::db::tracks::{self, TrackRecord};
use crate::embed::phase_5_store::{self, RegisteredModel};

/// Up to this many vectors of a model, candidates are found by an exact scan.
pub const EXACT_SCAN_MAX: i64 = 5_000;

/// Candidates read per neighbour asked (the filters in Rust drop some), and at least this many.
const OVERFETCH: u32 = 4;
const MIN_CANDIDATES: u32 = 100;
const MAX_CANDIDATES: u32 = 4_000;

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
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Similarity over one model's vectors.
#[derive(Debug, Clone)]
pub struct Similarity {
    pool: PgPool,
    model: RegisteredModel,
}

impl Similarity {
    pub fn new(pool: PgPool, model: RegisteredModel) -> Similarity {
        Similarity { pool, model }
    }

    /// The neighbours of `track`, best first, at most `limit`, with `filter` applied.
    pub async fn similar(
        &self,
        track: &TrackRecord,
        filter: &SimilarFilter,
        limit: u32,
    ) -> Result<Vec<(TrackRecord, f64)>, SimilarityError> {
        let query = phase_5_store::embedding_of(&self.pool, self.model.id, track.id)
            .await?
            .ok_or(SimilarityError::NoEmbedding(track.id))?;
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
        let exact = centroid.count <= crate::test_hooks::similar_exact_scan_max(EXACT_SCAN_MAX);
        let scored = vectors::candidates(
            &self.pool,
            self.model,
            &query,
            &centroid.mean,
            &scope,
            k,
            exact,
        )
        .await?;
        let ids: Vec<i64> = scored.iter().map(|(id, _)| *id).collect();
        let mut records: std::collections::HashMap<i64, TrackRecord> =
            tracks::get_many(&self.pool, &ids)
                .await?
                .into_iter()
                .map(|r| (r.id, r))
                .collect();
        let ordered: Vec<(TrackRecord, f64)> = scored
            .into_iter()
            .filter_map(|(id, s)| records.remove(&id).map(|r| (r, s)))
            .collect();
        let how = rank::Thinning {
            distinct_recordings: filter.exclude_same_recording,
            max_per_artist: filter.max_per_artist,
        };
        Ok(rank::thin(
            &[rank::RecordingKey::of(track)],
            ordered,
            how,
            usize::try_from(limit).unwrap_or(usize::MAX),
        ))
    }
}
