//! Generated music of a few distinct kinds (drum patterns, chord progressions, distorted
//! sawtooth riffs), for the similarity tests and the embedding benchmarks: tracks that a
//! listener, and a music model, would group by kind while every variant differs in tempo, key,
//! pattern and noise.
//!
//! Synthesised here (deterministic from the variant number) and encoded by ffmpeg into any
//! container [`fixtures::encode_into_place`] knows, so the embedding pipeline decodes real compressed audio.

use std::f32::consts::TAU;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::fixtures;

/// Sample rate of the generated audio.
pub const SAMPLE_RATE: u32 = 44_100;

/// A kind of music; tracks of one kind should be each other's nearest neighbours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MusicKind {
    /// Kick, snare and hi-hat patterns, no pitched instruments.
    Drums,
    /// Sustained chords of a four-chord progression on soft harmonic tones.
    Chords,
    /// A 16th-note sawtooth riff through hard distortion.
    DistortedSaw,
}

impl MusicKind {
    pub const ALL: [MusicKind; 3] = [MusicKind::Drums, MusicKind::Chords, MusicKind::DistortedSaw];
}

/// Small deterministic generator (xorshift64*) for noise and pattern choices.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn noise(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn midi_hz(note: f32) -> f32 {
    440.0 * 2f32.powf((note - 69.0) / 12.0)
}

/// Mono samples in [-1, 1] at [`SAMPLE_RATE`]: `seconds` of `kind`, variant `v`.
pub fn synthesize(kind: MusicKind, v: u32, seconds: f64) -> Vec<f32> {
    let sr = SAMPLE_RATE as f32;
    let n = (seconds * f64::from(SAMPLE_RATE)) as usize;
    let mut out = vec![0f32; n];
    let mut rng = Rng::new(u64::from(v) * 7919 + kind as u64 * 104_729 + 1);
    match kind {
        MusicKind::Drums => {
            let bpm = 88.0 + 9.0 * (v % 5) as f32;
            let step = 60.0 / bpm / 4.0; // 16th notes
            // Kick on a pattern that differs per variant, snare on 2 and 4, hats on 8ths.
            let kick_patterns: [[bool; 16]; 3] = [
                [
                    true, false, false, false, false, false, false, false, true, false, true,
                    false, false, false, false, false,
                ],
                [
                    true, false, false, true, false, false, false, false, true, false, false,
                    false, false, false, true, false,
                ],
                [
                    true, false, false, false, false, false, true, false, false, false, true,
                    false, false, false, false, false,
                ],
            ];
            let kicks = kick_patterns[v as usize % 3];
            let steps = (seconds as f32 / step) as usize;
            for s in 0..steps {
                let start = (s as f32 * step * sr) as usize;
                let pos = s % 16;
                if kicks[pos] {
                    let len = (0.35 * sr) as usize;
                    let mut phase = 0f32;
                    for i in 0..len.min(n.saturating_sub(start)) {
                        let t = i as f32 / sr;
                        let f = 50.0 + 110.0 * (-t * 25.0).exp();
                        phase += TAU * f / sr;
                        out[start + i] += 0.9 * phase.sin() * (-t * 9.0).exp();
                    }
                }
                if pos == 4 || pos == 12 {
                    let len = (0.25 * sr) as usize;
                    for i in 0..len.min(n.saturating_sub(start)) {
                        let t = i as f32 / sr;
                        let tone = (TAU * 190.0 * t).sin() * (-t * 30.0).exp();
                        out[start + i] +=
                            0.5 * (0.7 * rng.noise() + 0.3 * tone) * (-t * 16.0).exp();
                    }
                }
                if pos % 2 == 0 || (v % 2 == 1 && rng.below(4) == 0) {
                    let len = (0.06 * sr) as usize;
                    let mut prev = 0f32;
                    for i in 0..len.min(n.saturating_sub(start)) {
                        let t = i as f32 / sr;
                        let x = rng.noise();
                        // First difference: a crude high-pass for a metallic hiss.
                        out[start + i] += 0.25 * (x - prev) * (-t * 70.0).exp();
                        prev = x;
                    }
                }
            }
        }
        MusicKind::Chords => {
            let root = 48.0 + (v % 7) as f32 * 2.0; // C3 upwards, a different key per variant
            let progressions: [[[f32; 3]; 4]; 2] = [
                // I – V – vi – IV
                [
                    [0.0, 4.0, 7.0],
                    [7.0, 11.0, 14.0],
                    [9.0, 12.0, 16.0],
                    [5.0, 9.0, 12.0],
                ],
                // i – VI – III – VII
                [
                    [0.0, 3.0, 7.0],
                    [8.0, 12.0, 15.0],
                    [3.0, 7.0, 10.0],
                    [10.0, 14.0, 17.0],
                ],
            ];
            let prog = progressions[v as usize % 2];
            let chord_len = 1.8 + 0.2 * (v % 3) as f32;
            let chords = (seconds as f32 / chord_len).ceil() as usize;
            for c in 0..chords {
                let start = (c as f32 * chord_len * sr) as usize;
                let len = ((chord_len + 0.6) * sr) as usize;
                let notes = prog[c % 4];
                for (k, semis) in notes.iter().chain(std::iter::once(&-12.0)).enumerate() {
                    let f = midi_hz(root + semis);
                    let amp = if k == 3 { 0.22 } else { 0.14 };
                    for i in 0..len.min(n.saturating_sub(start)) {
                        let t = i as f32 / sr;
                        let env = (t / 0.04).min(1.0) * (-t * 1.1).exp();
                        // A few decaying harmonics: a soft electric-piano-like tone.
                        let x = (TAU * f * t).sin()
                            + 0.35 * (TAU * 2.0 * f * t).sin() * (-t * 2.0).exp()
                            + 0.12 * (TAU * 3.0 * f * t).sin() * (-t * 3.0).exp();
                        out[start + i] += amp * env * x;
                    }
                }
            }
        }
        MusicKind::DistortedSaw => {
            let bpm = 110.0 + 8.0 * (v % 5) as f32;
            let step = 60.0 / bpm / 4.0;
            let root = 40.0 + (v % 5) as f32; // E2 and up
            let riff: [f32; 16] = [
                0.0, 0.0, 12.0, 0.0, 3.0, 0.0, 5.0, 0.0, 0.0, 0.0, 7.0, 6.0, 5.0, 3.0, 0.0, -2.0,
            ];
            let drive = 6.0 + (v % 3) as f32 * 3.0;
            let steps = (seconds as f32 / step) as usize;
            let mut phase = 0f32;
            let mut phase2 = 0f32;
            let mut lp = 0f32;
            for s in 0..steps {
                let start = (s as f32 * step * sr) as usize;
                let end = (((s + 1) as f32 * step * sr) as usize).min(n);
                let note = root + riff[(s + v as usize) % 16];
                let f = midi_hz(note);
                for (i, sample) in out[start.min(n)..end].iter_mut().enumerate() {
                    let t = i as f32 / sr;
                    phase = (phase + f / sr).fract();
                    phase2 = (phase2 + f * 1.007 / sr).fract();
                    let saw = (2.0 * phase - 1.0) + 0.7 * (2.0 * phase2 - 1.0);
                    let env = (t / 0.005).min(1.0) * (0.6 + 0.4 * (-t * 8.0).exp());
                    let driven = (drive * saw * env).tanh();
                    // One-pole low-pass: a speaker cabinet's roll-off.
                    lp += 0.35 * (driven - lp);
                    *sample += 0.45 * lp + 0.01 * rng.noise();
                }
            }
        }
    }
    let peak = out.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let gain = 0.8 / peak;
    out.iter_mut().for_each(|x| *x *= gain);
    out
}

/// Write `samples` (mono, [`SAMPLE_RATE`]) as a 16-bit stereo WAV file.
pub fn write_wav(path: &Path, samples: &[f32]) -> Result<()> {
    let data_len = u32::try_from(samples.len() * 4).context("clip too long for WAV")?;
    let mut b = Vec::with_capacity(44 + samples.len() * 4);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes()); // PCM
    b.extend_from_slice(&2u16.to_le_bytes()); // channels
    b.extend_from_slice(&SAMPLE_RATE.to_le_bytes());
    b.extend_from_slice(&(SAMPLE_RATE * 4).to_le_bytes());
    b.extend_from_slice(&4u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for x in samples {
        let s = (x.clamp(-1.0, 1.0) * 32767.0).round() as i16;
        b.extend_from_slice(&s.to_le_bytes());
        b.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, b).with_context(|| format!("writing {}", path.display()))
}

/// Encode `seconds` of `kind` (variant `v`) at `root/rel` with
/// [`fixtures::encode_into_place`] (codec from the extension, title tag `rel`).
pub fn make_music(
    root: &Path,
    rel: &str,
    kind: MusicKind,
    v: u32,
    seconds: f64,
) -> Result<PathBuf> {
    let scratch = tempfile::tempdir()?;
    let wav = scratch.path().join("source.wav");
    write_wav(&wav, &synthesize(kind, v, seconds))?;
    fixtures::encode_into_place(root, rel, &["-i".as_ref(), wav.as_os_str()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_are_deterministic_normalised_and_differ_by_kind_and_variant() {
        let a = synthesize(MusicKind::Drums, 1, 2.0);
        assert_eq!(a.len(), 2 * SAMPLE_RATE as usize);
        assert_eq!(a, synthesize(MusicKind::Drums, 1, 2.0));
        assert_ne!(a, synthesize(MusicKind::Drums, 2, 2.0));
        for kind in MusicKind::ALL {
            let x = synthesize(kind, 0, 2.0);
            let peak = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!((peak - 0.8).abs() < 1e-3, "{kind:?} peak {peak}");
            let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
            assert!(rms > 0.03, "{kind:?} is nearly silent: rms {rms}");
        }
    }
}
