//! Stage 2, windows at the model's rate: choose the windows of a track (by default 8 windows of
//! one model patch, ≈3 s, at the centres of 8 equal slices of the track), have stage 1 decode
//! them (with a small margin each side), and resample each to the model's sample rate with
//! rubato's FFT resampler (mono). The margins absorb the resampler's edge effects; each window
//! is then cut to exactly the model's length.
//!
//! A `WindowMaker` lives on one decode thread and keeps one resampler per source rate.

use std::collections::HashMap;
use std::path::Path;

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

use super::phase_1_decode::{self, DecodeError, Region, SeekPolicy};

/// Audio decoded each side of a window, so resampling edge effects fall outside it.
const MARGIN_S: f64 = 0.05;
/// The FFT resampler's input chunk.
const RESAMPLE_CHUNK: usize = 1024;

/// Where the windows of a track go.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowPlan {
    /// Windows per track.
    pub count: usize,
    /// Samples per window at the model rate.
    pub window_samples: usize,
    /// The model's sample rate.
    pub sample_rate: u32,
}

impl WindowPlan {
    pub fn window_seconds(&self) -> f64 {
        self.window_samples as f64 / f64::from(self.sample_rate)
    }

    /// Start times (seconds) of the windows of a track of `duration_s`: centred in `count` equal
    /// slices, kept inside the track. Tracks shorter than a window get windows from 0 (the
    /// stream's end is padded with silence by stage 1, within its coverage rule).
    pub fn starts(&self, duration_s: f64) -> Vec<f64> {
        let len = self.window_seconds();
        let n = self.count.max(1);
        let latest = (duration_s - len).max(0.0);
        (0..n)
            .map(|i| {
                let centre = (i as f64 + 0.5) * duration_s / n as f64;
                (centre - len / 2.0).clamp(0.0, latest)
            })
            .collect()
    }

    /// What stage 1 decodes for a track of `duration_s`: each window with a short margin on
    /// both sides (the resampler's edges are trimmed off).
    pub fn regions(&self, duration_s: f64) -> Vec<Region> {
        let len = self.window_seconds();
        self.starts(duration_s)
            .into_iter()
            .map(|s| Region {
                start_s: s - MARGIN_S,
                len_s: len + 2.0 * MARGIN_S,
            })
            .collect()
    }
}

/// Why a track's windows could not be made.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("cannot resample from {from} Hz: {message}")]
    Resample { from: u32, message: String },
}

impl WindowError {
    pub fn is_unsupported(&self) -> bool {
        matches!(self, WindowError::Decode(d) if d.is_unsupported())
    }
}

/// The windows of one track, concatenated: `count × window_samples` samples at the model rate.
#[derive(Debug, Clone)]
pub struct TrackWindows {
    pub samples: Vec<f32>,
    pub count: usize,
    /// Seconds of audio decoded (windows, margins and warm-up), for throughput figures.
    pub decoded_seconds: f64,
}

/// Decodes and resamples windows; one per decode thread.
pub struct WindowMaker {
    plan: WindowPlan,
    policy: SeekPolicy,
    ffmpeg_fallback: bool,
    resamplers: HashMap<u32, Fft<f32>>,
}

impl WindowMaker {
    pub fn new(plan: WindowPlan) -> Self {
        WindowMaker {
            plan,
            policy: SeekPolicy::Seek,
            ffmpeg_fallback: true,
            resamplers: HashMap::new(),
        }
    }

    /// Read the whole stream instead of seeking (for comparisons and measurements).
    pub fn with_policy(mut self, policy: SeekPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Whether files symphonia cannot decode go to FFmpeg (the default: yes).
    pub fn with_ffmpeg_fallback(mut self, on: bool) -> Self {
        self.ffmpeg_fallback = on;
        self
    }

    pub fn plan(&self) -> &WindowPlan {
        &self.plan
    }

    /// The windows of the track at `path`, whose duration is `duration_s`.
    pub fn make(&mut self, path: &Path, duration_s: f64) -> Result<TrackWindows, WindowError> {
        let regions = self.plan.regions(duration_s);
        let decoded = if self.ffmpeg_fallback {
            phase_1_decode::decode_regions(path, &regions, self.policy)?
        } else {
            phase_1_decode::decode_regions_symphonia(path, &regions, self.policy)?
        };
        let from = decoded.sample_rate;
        let n = self.plan.window_samples;
        let mut samples = Vec::with_capacity(n * regions.len());
        let offset = (MARGIN_S * f64::from(self.plan.sample_rate)).round() as usize;
        for region in &decoded.regions {
            let resampled = self.resample(region, from)?;
            let end = (offset + n).min(resampled.len());
            let have = resampled.get(offset..end).unwrap_or(&[]);
            samples.extend_from_slice(have);
            samples.resize(samples.len() + (n - have.len()), 0.0);
        }
        Ok(TrackWindows {
            samples,
            count: regions.len(),
            decoded_seconds: decoded.decoded_frames as f64 / f64::from(from.max(1)),
        })
    }

    /// Resample mono `input` at `from` Hz to the model rate (whole clip, delay trimmed).
    pub fn resample(&mut self, input: &[f32], from: u32) -> Result<Vec<f32>, WindowError> {
        let to = self.plan.sample_rate;
        if from == to || input.is_empty() {
            return Ok(input.to_vec());
        }
        let err = |message: String| WindowError::Resample { from, message };
        let resampler = match self.resamplers.entry(from) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(
                Fft::<f32>::new(
                    from as usize,
                    to as usize,
                    RESAMPLE_CHUNK,
                    1,
                    FixedSync::Input,
                )
                .map_err(|e| err(e.to_string()))?,
            ),
        };
        let adapter =
            InterleavedSlice::new(input, 1, input.len()).map_err(|e| err(e.to_string()))?;
        let out = resampler
            .process_all(&adapter, input.len(), None)
            .map_err(|e| err(e.to_string()))?;
        Ok(out.take_data())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> WindowPlan {
        WindowPlan {
            count: 8,
            window_samples: 47_616,
            sample_rate: 16_000,
        }
    }

    #[test]
    fn windows_sit_at_slice_centres_inside_the_track() {
        let p = plan();
        let len = p.window_seconds();
        let starts = p.starts(160.0);
        assert_eq!(starts.len(), 8);
        for (i, s) in starts.iter().enumerate() {
            let centre = s + len / 2.0;
            assert!(
                (centre - (i as f64 + 0.5) * 20.0).abs() < 1e-9,
                "{i}: {centre}"
            );
        }
        // Short track: clamped into [0, duration - len].
        let starts = p.starts(10.0);
        assert!(starts.iter().all(|s| *s >= 0.0 && *s + len <= 10.0 + 1e-9));
        // Shorter than one window: all from 0.
        assert!(p.starts(1.0).iter().all(|s| *s == 0.0));
    }

    #[test]
    fn resampling_keeps_a_tone_and_its_timing() {
        let mut maker = WindowMaker::new(plan());
        let from = 44_100u32;
        let f = 440.0f64;
        let input: Vec<f32> = (0..from as usize * 2)
            .map(|n| {
                (2.0 * std::f64::consts::PI * f * n as f64 / f64::from(from)).sin() as f32 * 0.5
            })
            .collect();
        let out = maker.resample(&input, from).expect("resamples");
        assert!((out.len() as i64 - 32_000).abs() <= 1, "{}", out.len());
        // Away from the edges the output is the same tone at 16 kHz, same amplitude, in time
        // (rubato's FFT resampler lags by half an input sample: 11 µs, irrelevant here).
        let (mut s, mut c, mut n_used) = (0f64, 0f64, 0f64);
        for (n, v) in out.iter().enumerate().take(31_000).skip(1000) {
            let ph = 2.0 * std::f64::consts::PI * f * n as f64 / 16_000.0;
            s += f64::from(*v) * ph.sin();
            c += f64::from(*v) * ph.cos();
            n_used += 1.0;
        }
        let amplitude = 2.0 * (s * s + c * c).sqrt() / n_used;
        let lag_samples = -c.atan2(s) / (2.0 * std::f64::consts::PI * f / 16_000.0);
        assert!((amplitude - 0.5).abs() < 1e-3, "amplitude {amplitude}");
        assert!(lag_samples.abs() < 0.25, "lag {lag_samples} output samples");
    }
}
