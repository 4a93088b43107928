//! The `[embed]` section of the configuration: its keys, defaults and validation.

use serde::Deserialize;
use std::path::PathBuf;

use super::ConfigError;

/// Where inference runs, as configured (`embed.device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Option<DeviceChoice> {
        match s.trim() {
            "auto" => Some(DeviceChoice::Auto),
            "cpu" => Some(DeviceChoice::Cpu),
            "cuda" => Some(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(DeviceChoice::Cuda),
        }
    }
}

/// The `[embed]` section of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedConfig {
    /// Compute embeddings for new and changed tracks.
    pub enabled: bool,
    /// The TorchScript model: a `.pt` file (its manifest is the same name with `.json`), or a
    /// model name (no `/`, no `.pt`) looked up as `<name>.pt` next to the binary, in
    /// /usr/share/coral/models and in `${XDG_DATA_HOME:-~/.local/share}/coral/models`.
    /// Default: `musicnn-msd-mtt-int8` on a CPU, `musicnn-msd-mtt` on CUDA; a `corald worker`
    /// uses the model its server registered last.
    pub model: Option<PathBuf>,
    /// `auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// CPU threads for inference (0: one per CPU).
    pub threads: usize,
    /// Threads that decode and resample audio (0: a quarter of the CPUs, at least 1).
    pub decode_threads: usize,
    /// Windows per forward pass (0: 2 on CPU, 32 on CUDA). On CPU small batches run fastest
    /// per window (measured with musicnn on 2 cores: ≈80 windows/s at 1–2 windows per pass,
    /// ≈42 at 4, ≈29 at 8); accelerators want big ones.
    pub batch_size: usize,
    /// Run a partial batch when its oldest window has waited this long.
    pub batch_timeout_ms: u64,
    /// Windows per track, at the centres of equal slices of the track.
    pub windows: usize,
    /// Length of each window in model windows (musicnn: 1 ≈ 3 s).
    pub window_patches: usize,
    /// Tracks shorter than this are skipped (seconds).
    pub min_duration_s: f64,
    /// Tracks longer than this are skipped (seconds).
    pub max_duration_s: f64,
    /// Embed in this process. `false`: corald queues its scans' tracks and leaves all the
    /// embedding to `corald worker`s on other machines (the model is still loaded, to name the
    /// vectors' model and check stored ones).
    pub local: bool,
    /// How long a consumer holds the queued tracks it took (seconds). A consumer that dies
    /// (a killed `corald worker`) leaves them for another consumer after this long; a track
    /// takes seconds from its claim to its vector.
    pub lease_s: f64,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig {
            enabled: true,
            model: None,
            device: "auto".to_owned(),
            threads: 0,
            decode_threads: 0,
            batch_size: 0,
            batch_timeout_ms: 50,
            windows: 4,
            window_patches: 1,
            min_duration_s: 60.0,
            max_duration_s: 900.0,
            local: true,
            lease_s: 120.0,
        }
    }
}

impl EmbedConfig {
    /// Check the values; the error names the key (`embed.…`) and what is wrong. Called by
    /// `Config::validate`, and by the pipeline for a configuration made in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: String| Err(ConfigError::Invalid { key, problem });
        if DeviceChoice::parse(&self.device).is_none() {
            return invalid(
                "embed.device",
                format!("must be auto, cpu, cuda or cuda:N (got {:?})", self.device),
            );
        }
        if self.threads > 1024 {
            return invalid(
                "embed.threads",
                format!("must be at most 1024 (got {})", self.threads),
            );
        }
        if self.decode_threads > 256 {
            return invalid(
                "embed.decode_threads",
                format!("must be at most 256 (got {})", self.decode_threads),
            );
        }
        if self.batch_size > 4096 {
            return invalid(
                "embed.batch_size",
                format!("must be at most 4096 (got {})", self.batch_size),
            );
        }
        if self.batch_timeout_ms > 60_000 {
            return invalid(
                "embed.batch_timeout_ms",
                format!("must be at most 60000 (got {})", self.batch_timeout_ms),
            );
        }
        if !(1..=64).contains(&self.windows) {
            return invalid(
                "embed.windows",
                format!("must be between 1 and 64 (got {})", self.windows),
            );
        }
        if !(1..=32).contains(&self.window_patches) {
            return invalid(
                "embed.window_patches",
                format!("must be between 1 and 32 (got {})", self.window_patches),
            );
        }
        if !(self.min_duration_s.is_finite() && self.min_duration_s >= 0.0) {
            return invalid(
                "embed.min_duration_s",
                format!("must be a number ≥ 0 (got {})", self.min_duration_s),
            );
        }
        if !(self.max_duration_s.is_finite() && self.max_duration_s > self.min_duration_s) {
            return invalid(
                "embed.max_duration_s",
                format!(
                    "must be a number greater than embed.min_duration_s ({}) (got {})",
                    self.min_duration_s, self.max_duration_s
                ),
            );
        }
        if !(self.lease_s.is_finite() && (1.0..=86_400.0).contains(&self.lease_s)) {
            return invalid(
                "embed.lease_s",
                format!("must be between 1 and 86400 (got {})", self.lease_s),
            );
        }
        if let Some(m) = &self.model
            && m.as_os_str().is_empty()
        {
            return invalid("embed.model", "must not be empty".into());
        }
        Ok(())
    }

    fn cores() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }

    /// Inference threads on CPU.
    pub fn inference_threads(&self) -> usize {
        if self.threads == 0 {
            Self::cores()
        } else {
            self.threads
        }
    }

    /// Decode threads.
    pub fn decoder_threads(&self) -> usize {
        if self.decode_threads == 0 {
            (Self::cores() / 4).max(1)
        } else {
            self.decode_threads
        }
    }

    /// The window choice, as stored with the model (a change means new vectors).
    pub fn window_params(&self) -> String {
        format!("windows={},patches={}", self.windows, self.window_patches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = EmbedConfig::default();
        c.validate().expect("defaults are valid");
        assert_eq!(c.windows, 4);
        assert_eq!(c.min_duration_s, 60.0);
        assert_eq!(c.max_duration_s, 900.0);
        assert_eq!(c.window_params(), "windows=4,patches=1");
    }

    #[test]
    fn validation_names_the_key() {
        let bad = |f: &dyn Fn(&mut EmbedConfig)| {
            let mut c = EmbedConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(&|c| c.device = "gpu".into()).contains("embed.device"));
        assert!(bad(&|c| c.windows = 0).contains("embed.windows"));
        assert!(bad(&|c| c.window_patches = 0).contains("embed.window_patches"));
        assert!(bad(&|c| c.min_duration_s = -1.0).contains("embed.min_duration_s"));
        assert!(bad(&|c| c.max_duration_s = 10.0).contains("embed.max_duration_s"));
        assert!(bad(&|c| c.batch_size = 100_000).contains("embed.batch_size"));
        assert!(bad(&|c| c.lease_s = 0.5).contains("embed.lease_s"));
        assert!(bad(&|c| c.lease_s = f64::NAN).contains("embed.lease_s"));
        let c = EmbedConfig {
            device: "cuda:x".into(),
            ..EmbedConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                key: "embed.device",
                ..
            })
        ));
    }

    #[test]
    fn parses_from_toml_and_rejects_unknown_keys() {
        let c: EmbedConfig = toml::from_str(
            "device = \"cuda:1\"\nwindows = 6\nmin_duration_s = 30\nmodel = \"/m/x.pt\"",
        )
        .expect("parses");
        assert_eq!(c.device, "cuda:1");
        assert_eq!(c.windows, 6);
        assert_eq!(c.min_duration_s, 30.0);
        assert!(c.enabled);
        assert!(toml::from_str::<EmbedConfig>("window = 4").is_err());
    }
}
