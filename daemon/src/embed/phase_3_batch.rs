//! Stage 3, batching: windows from many tracks share each forward pass, so an accelerator stays
//! busy and the per-call overhead is paid once per batch. A track's windows may straddle
//! batches; its embedding is settled when its last window comes back: the mean of its window
//! embeddings, L2-normalised. Rows of a forward pass are independent, so the result does not
//! depend on where the batch boundaries fall.
//!
//! Pure data structure (no threads, no torch): the inference thread drives it.

use std::collections::{HashMap, VecDeque};

/// One track waiting for (some of) its windows to be run.
struct Slot<T> {
    meta: T,
    samples: Vec<f32>,
    windows: usize,
    /// Sum of the window embeddings received so far.
    sum: Vec<f64>,
    received: usize,
}

/// A batch ready for the model: `rows × row_len` samples.
#[derive(Debug)]
pub struct Batch {
    pub input: Vec<f32>,
    pub rows: usize,
    /// (slot, window) of each row.
    origin: Vec<(u64, usize)>,
}

/// A track whose every window has been embedded.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished<T> {
    pub meta: T,
    /// Mean of the window embeddings, L2-normalised.
    pub embedding: Vec<f32>,
    pub windows: usize,
}

/// A track that could not be embedded.
#[derive(Debug, Clone, PartialEq)]
pub struct Failed<T> {
    pub meta: T,
    pub reason: String,
}

/// Collects windows of many tracks and hands out batches.
pub struct Batcher<T> {
    row_len: usize,
    dim: usize,
    queue: VecDeque<(u64, usize)>,
    slots: HashMap<u64, Slot<T>>,
    next_id: u64,
}

/// Mean of `sum / n`, L2-normalised; `None` when the vector is zero or not finite.
pub fn normalised_mean(sum: &[f64], n: usize) -> Option<Vec<f32>> {
    if n == 0 {
        return None;
    }
    let mean: Vec<f64> = sum.iter().map(|v| v / n as f64).collect();
    let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
    if !norm.is_finite() || norm <= f64::MIN_POSITIVE {
        return None;
    }
    Some(mean.iter().map(|v| (v / norm) as f32).collect())
}

impl<T> Batcher<T> {
    /// `row_len`: samples per window; `dim`: embedding length.
    pub fn new(row_len: usize, dim: usize) -> Self {
        Batcher {
            row_len,
            dim,
            queue: VecDeque::new(),
            slots: HashMap::new(),
            next_id: 0,
        }
    }

    pub fn row_len(&self) -> usize {
        self.row_len
    }

    /// Windows waiting for a batch.
    pub fn pending_windows(&self) -> usize {
        self.queue.len()
    }

    /// Tracks not settled yet (waiting or in a batch being run).
    pub fn tracks_in_flight(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Add a track: `samples` holds `windows × row_len` samples. A track with no windows, or
    /// with the wrong amount of audio, fails at once.
    pub fn push(&mut self, meta: T, samples: Vec<f32>, windows: usize) -> Result<(), Failed<T>> {
        if windows == 0 || samples.len() != windows * self.row_len {
            return Err(Failed {
                meta,
                reason: format!(
                    "internal: {} samples for {windows} windows of {}",
                    samples.len(),
                    self.row_len
                ),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        for w in 0..windows {
            self.queue.push_back((id, w));
        }
        self.slots.insert(
            id,
            Slot {
                meta,
                samples,
                windows,
                sum: vec![0.0; self.dim],
                received: 0,
            },
        );
        Ok(())
    }

    /// Drop every track for which `keep` is false (cancelled jobs), with their queued windows.
    /// Windows already in a batch are ignored when the batch comes back.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) -> Vec<T> {
        let drop_ids: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| !keep(&s.meta))
            .map(|(id, _)| *id)
            .collect();
        if drop_ids.is_empty() {
            return Vec::new();
        }
        self.queue.retain(|(id, _)| !drop_ids.contains(id));
        drop_ids
            .into_iter()
            .filter_map(|id| self.slots.remove(&id).map(|s| s.meta))
            .collect()
    }

    /// The next batch of at most `max_rows` windows, in arrival order.
    pub fn next_batch(&mut self, max_rows: usize) -> Option<Batch> {
        let rows = self.queue.len().min(max_rows.max(1));
        if rows == 0 {
            return None;
        }
        let mut input = Vec::with_capacity(rows * self.row_len);
        let mut origin = Vec::with_capacity(rows);
        for (id, w) in self.queue.drain(..rows) {
            if let Some(slot) = self.slots.get(&id) {
                let from = w * self.row_len;
                input.extend_from_slice(&slot.samples[from..from + self.row_len]);
                origin.push((id, w));
            }
        }
        // Free the audio of tracks whose windows are all in batches now.
        let queued: std::collections::HashSet<u64> = self.queue.iter().map(|(id, _)| *id).collect();
        for (id, _) in &origin {
            if !queued.contains(id)
                && let Some(slot) = self.slots.get_mut(id)
            {
                slot.samples = Vec::new();
            }
        }
        let rows = origin.len();
        Some(Batch {
            input,
            rows,
            origin,
        })
    }

    /// Take the model's output for `batch` (`rows × dim`) and return the tracks it settled.
    pub fn complete(&mut self, batch: Batch, output: &[f32]) -> (Vec<Finished<T>>, Vec<Failed<T>>) {
        let mut finished = Vec::new();
        let mut failed = Vec::new();
        if output.len() != batch.rows * self.dim {
            let reason = format!(
                "model returned {} values for {} windows of dimension {}",
                output.len(),
                batch.rows,
                self.dim
            );
            return (Vec::new(), self.fail(batch, &reason));
        }
        for (row, (id, _w)) in batch.origin.iter().enumerate() {
            let Some(slot) = self.slots.get_mut(id) else {
                continue; // dropped (cancelled or failed) meanwhile
            };
            let values = &output[row * self.dim..(row + 1) * self.dim];
            for (s, v) in slot.sum.iter_mut().zip(values) {
                *s += f64::from(*v);
            }
            slot.received += 1;
            if slot.received == slot.windows
                && let Some(slot) = self.slots.remove(id)
            {
                match normalised_mean(&slot.sum, slot.windows) {
                    Some(embedding) => finished.push(Finished {
                        meta: slot.meta,
                        embedding,
                        windows: slot.windows,
                    }),
                    None => failed.push(Failed {
                        meta: slot.meta,
                        reason: "the model returned a zero or non-finite embedding".into(),
                    }),
                }
            }
        }
        (finished, failed)
    }

    /// The batch could not be run: every track with a window in it fails.
    pub fn fail(&mut self, batch: Batch, reason: &str) -> Vec<Failed<T>> {
        let mut ids: Vec<u64> = batch.origin.iter().map(|(id, _)| *id).collect();
        ids.dedup();
        self.queue.retain(|(id, _)| !ids.contains(id));
        ids.into_iter()
            .filter_map(|id| self.slots.remove(&id))
            .map(|s| Failed {
                meta: s.meta,
                reason: reason.to_owned(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in model for the data structure: the embedding of a window is
    /// [first sample, last sample, 1].
    fn fake_forward(input: &[f32], rows: usize, row_len: usize) -> Vec<f32> {
        (0..rows)
            .flat_map(|r| {
                let w = &input[r * row_len..(r + 1) * row_len];
                [w[0], w[row_len - 1], 1.0]
            })
            .collect()
    }

    fn track(id: u32, windows: usize, row_len: usize) -> Vec<f32> {
        (0..windows * row_len)
            .map(|i| (id * 1000) as f32 + i as f32)
            .collect()
    }

    #[test]
    fn tracks_straddling_batches_get_the_same_embedding() {
        let row_len = 4;
        let run = |max_rows: usize| {
            let mut b = Batcher::new(row_len, 3);
            for id in 0..5u32 {
                b.push(id, track(id, 3, row_len), 3).expect("push");
            }
            let mut out = Vec::new();
            while let Some(batch) = b.next_batch(max_rows) {
                let y = fake_forward(&batch.input, batch.rows, row_len);
                let (done, failed) = b.complete(batch, &y);
                assert!(failed.is_empty());
                out.extend(done);
            }
            assert!(b.is_empty());
            out.sort_by_key(|f| f.meta);
            out
        };
        let alone = run(3);
        for max_rows in [1, 2, 4, 7, 100] {
            assert_eq!(run(max_rows), alone, "batch size {max_rows}");
        }
        let e = &alone[1].embedding;
        let norm: f32 = e.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-6);
    }

    #[test]
    fn cancelled_tracks_vanish_and_wrong_sizes_fail() {
        let mut b = Batcher::new(2, 3);
        b.push(1u32, vec![1.0; 4], 2).expect("push");
        b.push(2u32, vec![1.0; 4], 2).expect("push");
        assert!(b.push(3u32, vec![1.0; 3], 2).is_err());
        let batch = b.next_batch(3).expect("a batch");
        assert_eq!(b.retain(|m| *m != 1), vec![1]);
        let y = fake_forward(&batch.input, batch.rows, 2);
        let (done, failed) = b.complete(batch, &y);
        assert!(done.is_empty() && failed.is_empty());
        let batch = b.next_batch(3).expect("the rest of track 2");
        let y = fake_forward(&batch.input, batch.rows, 2);
        let (done, _) = b.complete(batch, &y);
        assert_eq!(done.len(), 1);
        assert!(b.is_empty());
    }

    #[test]
    fn a_failed_batch_fails_its_tracks_only() {
        let mut b = Batcher::new(1, 2);
        b.push("a", vec![1.0, 2.0], 2).expect("push");
        b.push("b", vec![3.0], 1).expect("push");
        let batch = b.next_batch(1).expect("batch");
        let failed = b.fail(batch, "boom");
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].meta, "a");
        assert_eq!(b.pending_windows(), 1);
        let batch = b.next_batch(8).expect("batch");
        let (done, failed) = b.complete(batch, &[0.0, 0.0]);
        assert!(done.is_empty());
        assert_eq!(failed[0].meta, "b", "zero embeddings are failures");
    }
}
