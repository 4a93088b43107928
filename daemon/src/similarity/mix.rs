//! `track.mix`: tracks around several seeds. The target is the seeds' centroid in centred
//! space (the mean of their centred unit vectors), and the candidates near it are chosen by
//! maximal marginal relevance: each next track maximises `λ·(closeness to the centroid) −
//! (1−λ)·(closeness to the closest track already chosen)`, so the mix stays near the seeds
//! without filling up with near-copies of one another. Seeds, other files of their
//! recordings (and of chosen ones) are left out; `max_per_artist` caps artists.

use super::rank::{self, RecordingKey};
use super::{MAX_CANDIDATES, SimilarFilter, Similarity, SimilarityError, vectors};
use crate::db::tracks::TrackRecord;

/// Most seeds a mix takes.
pub const MAX_SEEDS: usize = 20;

/// Weight of closeness to the seeds against distance from what is already chosen.
const LAMBDA: f64 = 0.7;

impl Similarity {
    /// Up to `count` tracks around `seeds` (tracks without a vector are skipped; at least one
    /// must have one), each with its centred cosine to the seeds' centroid, in the order
    /// chosen.
    pub async fn mix(
        &self,
        seeds: &[TrackRecord],
        count: u32,
        filter: &SimilarFilter,
    ) -> Result<Vec<(TrackRecord, f64)>, SimilarityError> {
        let centroid = vectors::centroid(&self.pool, self.model).await?;
        let mean = &centroid.mean;
        let ids: Vec<i64> = seeds.iter().map(|s| s.id).collect();
        let seed_vectors = vectors::embeddings(&self.pool, self.model, &ids).await?;
        let mut sum = vec![0f64; self.model.dim];
        for v in seed_vectors.values() {
            if let Some(u) = rank::centred_unit(v, mean) {
                sum.iter_mut().zip(u).for_each(|(s, x)| *s += f64::from(x));
            }
        }
        let Some(target) = rank::unit(&sum) else {
            return match seeds.first() {
                Some(s) if seed_vectors.is_empty() => Err(SimilarityError::NoEmbedding(s.id)),
                // Seeds cancelling out, or all at the mean: no direction to look in.
                _ => Ok(Vec::new()),
            };
        };
        let scope = vectors::Scope {
            exclude: ids,
            library_ids: filter.library_ids.clone(),
            min_ms: filter.min_ms,
            max_ms: filter.max_ms,
        };
        let k = count.saturating_mul(5).clamp(100, MAX_CANDIDATES);
        let pool = self.around(&target, &centroid, &scope, k).await?;
        let seed_keys: Vec<RecordingKey> = seeds.iter().map(RecordingKey::of).collect();
        let mut rules = rank::Chosen::new(filter.thinning(), &seed_keys);
        let mut chosen: Vec<(TrackRecord, f64, Vec<f32>)> = Vec::new();
        let mut left: Vec<Option<(TrackRecord, f64, Vec<f32>)>> =
            pool.into_iter().map(Some).collect();
        let want = usize::try_from(count).unwrap_or(usize::MAX);
        while chosen.len() < want {
            let mut best: Option<(usize, f64)> = None;
            for (i, c) in left.iter().enumerate() {
                let Some((t, relevance, v)) = c else { continue };
                if !rules.admits(t) {
                    continue;
                }
                let redundancy = chosen
                    .iter()
                    .map(|(_, _, w)| rank::centred_cosine(v, w, mean))
                    .fold(f64::NEG_INFINITY, f64::max);
                let redundancy = if redundancy.is_finite() {
                    redundancy
                } else {
                    0.0
                };
                let gain = LAMBDA * relevance - (1.0 - LAMBDA) * redundancy;
                if best.is_none_or(|(_, g)| gain > g) {
                    best = Some((i, gain));
                }
            }
            let Some((i, _)) = best else { break };
            let Some((t, relevance, v)) = left[i].take() else {
                break;
            };
            rules.add(&t);
            chosen.push((t, relevance, v));
        }
        Ok(chosen.into_iter().map(|(t, r, _)| (t, r)).collect())
    }
}
