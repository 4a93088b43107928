//! `track.path`: a sonic path from A to B. Waypoints are spaced evenly on the straight line
//! between A's and B's centred vectors; at each, the candidate nearest the waypoint is taken,
//! provided it is unused, not another file of a recording already on the path, and closer to
//! B (centred cosine) than the track before it (and, with `max_per_artist`, of an artist not
//! yet at the cap, A and B counted). So the path starts at A, ends at B, never
//! repeats, and its similarity to B rises strictly at every step; it is shorter than asked
//! when a waypoint has no such track.

use super::rank;
use super::{SimilarFilter, Similarity, SimilarityError, vectors};
use crate::db::tracks::TrackRecord;

/// Longest path asked (tracks, both ends included).
pub const MAX_PATH_LEN: u32 = 200;

/// Candidates read per waypoint.
const PER_WAYPOINT: u32 = 40;

impl Similarity {
    /// The path from `from` to `to`, both included, at most `count` tracks: each with its
    /// centred cosine to `to`.
    pub async fn path(
        &self,
        from: &TrackRecord,
        to: &TrackRecord,
        count: u32,
        filter: &SimilarFilter,
    ) -> Result<Vec<(TrackRecord, f64)>, SimilarityError> {
        if from.id == to.id {
            return Err(SimilarityError::Invalid(
                "a path needs two different tracks".into(),
            ));
        }
        let (va, vb) = (self.vector(from).await?, self.vector(to).await?);
        let centroid = vectors::centroid(&self.pool, self.model).await?;
        let mean = &centroid.mean;
        let to_b = |v: &[f32]| rank::centred_cosine(v, &vb, mean);
        let (Some(a), Some(b)) = (rank::centred_unit(&va, mean), rank::centred_unit(&vb, mean))
        else {
            // A track at the mean has no direction: nothing lies "between".
            return Ok(vec![(from.clone(), to_b(&va)), (to.clone(), 1.0)]);
        };
        let mut used: Vec<i64> = vec![from.id, to.id];
        // The ends count: no other file of their recordings, and their artists towards the cap.
        let mut chosen = rank::Chosen::new(filter.thinning(), &[]);
        chosen.add(from);
        chosen.add(to);
        let mut out: Vec<(TrackRecord, f64)> = vec![(from.clone(), to_b(&va))];
        let mut last = to_b(&va);
        let steps = count.clamp(2, MAX_PATH_LEN) - 1;
        for i in 1..steps {
            let t = f64::from(i) / f64::from(steps);
            let mid: Vec<f64> = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (1.0 - t) * f64::from(*x) + t * f64::from(*y))
                .collect();
            // Opposite ends: the line passes through the mean; aim at B's side.
            let waypoint = rank::unit(&mid).unwrap_or_else(|| b.clone());
            let scope = vectors::Scope {
                exclude: used.clone(),
                library_ids: filter.library_ids.clone(),
                min_ms: filter.min_ms,
                max_ms: filter.max_ms,
            };
            let near = self
                .around(&waypoint, &centroid, &scope, PER_WAYPOINT)
                .await?;
            let pick = near.into_iter().find_map(|(t, _, v)| {
                let closer = to_b(&v);
                (closer > last && chosen.admits(&t)).then_some((t, closer))
            });
            if let Some((t, closer)) = pick {
                chosen.add(&t);
                last = closer;
                used.push(t.id);
                out.push((t, closer));
            }
        }
        out.push((to.clone(), 1.0));
        Ok(out)
    }
}
