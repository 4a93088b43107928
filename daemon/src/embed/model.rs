//! The embedding model on disk: where corald looks for it, its manifest (`<name>.json` next to
//! the TorchScript `<name>.pt`), and the integrity check (sha256 of the `.pt` against the
//! manifest) done before libtorch ever sees the bytes.
//!
//! `embed.model` is a path to a `.pt` file, or a model name (`musicnn-msd-int8`) looked up as
//! `<name>.pt` in the model folders: `<exe dir>/../../model/` (a development checkout:
//! `target/release/corald` → `model/`), `/usr/share/coral/models/` (the package),
//! `${XDG_DATA_HOME:-~/.local/share}/coral/models/`. Unset, the name is chosen by device
//! (`default_model_name`): the int8 fused model on a CPU, its fp32 twin on CUDA.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The default model on a CPU: musicnn's MSD and MTT networks side by side (400-d), their big
/// convolutions in int8 (model/README.md). Two networks per window at 2.5× the speed of the
/// original fp32 one: 4 windows per track (the default) cost what 8 windows of that network
/// did, and rank neighbours clearly better (BENCHMARKS.md).
pub const DEFAULT_CPU_MODEL: &str = "musicnn-msd-mtt-int8";
/// The default model on CUDA (int8 convolutions exist only for CPUs), and the fp32 choice
/// on a CPU.
pub const DEFAULT_ACCELERATOR_MODEL: &str = "musicnn-msd-mtt";

/// The default model's name for a device.
pub fn default_model_name(accelerator: bool) -> &'static str {
    if accelerator {
        DEFAULT_ACCELERATOR_MODEL
    } else {
        DEFAULT_CPU_MODEL
    }
}
/// Where the package installs models.
pub const SYSTEM_MODEL_DIR: &str = "/usr/share/coral/models";
/// HNSW indexes on `vector` columns support at most this many dimensions (pgvector).
pub const MAX_EMBEDDING_DIM: usize = 2000;

/// Why the model cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("no embedding model found (looked for {searched}); set `embed.model` to a .pt file")]
    NotFound { searched: String },
    #[error("cannot read model file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid model manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error(
        "model file {path} does not match its manifest (sha256 {actual}, manifest says {expected}): \
         the file is damaged or belongs to another manifest"
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

/// The manifest: what the model expects and produces. Unknown fields are allowed (they
/// describe the model for people).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ModelManifest {
    /// Model id, also the file stem.
    pub name: String,
    /// Bumped whenever the numbers change; embeddings of another version are recomputed.
    #[serde(deserialize_with = "string_or_number")]
    pub version: String,
    /// Input sample rate in Hz.
    pub sample_rate: u32,
    /// Samples per model window (the module averages whole windows of a row).
    pub window_samples: usize,
    /// Length of the output vector.
    pub embedding_dim: usize,
    /// sha256 of the `.pt` file, lowercase hex.
    pub sha256: String,
    /// The module holds CPU-only kernels (quantized int8): it cannot run on CUDA.
    #[serde(default)]
    pub cpu_only: bool,
}

fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        S(String),
        N(u64),
    }
    Ok(match V::deserialize(d)? {
        V::S(s) => s,
        V::N(n) => n.to_string(),
    })
}

impl ModelManifest {
    /// Parse and check a manifest; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<ModelManifest, ModelError> {
        let bad = |message: String| ModelError::Manifest {
            path: path.to_owned(),
            message,
        };
        let m: ModelManifest = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if m.name.is_empty()
            || !m
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(bad(format!(
                "`name` must be non-empty ASCII letters, digits, '-', '_' or '.' (got {:?})",
                m.name
            )));
        }
        if m.version.is_empty() || m.version.len() > 64 {
            return Err(bad("`version` must be 1 to 64 characters".into()));
        }
        if !(1000..=384_000).contains(&m.sample_rate) {
            return Err(bad(format!(
                "`sample_rate` must be between 1000 and 384000 Hz (got {})",
                m.sample_rate
            )));
        }
        if !(256..=10_000_000).contains(&m.window_samples) {
            return Err(bad(format!(
                "`window_samples` must be between 256 and 10000000 (got {})",
                m.window_samples
            )));
        }
        if !(1..=MAX_EMBEDDING_DIM).contains(&m.embedding_dim) {
            return Err(bad(format!(
                "`embedding_dim` must be between 1 and {MAX_EMBEDDING_DIM} (got {})",
                m.embedding_dim
            )));
        }
        if m.sha256.len() != 64 || !m.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad("`sha256` must be 64 hexadecimal digits".into()));
        }
        Ok(ModelManifest {
            sha256: m.sha256.to_ascii_lowercase(),
            ..m
        })
    }

    /// Seconds of audio in one model window.
    pub fn window_seconds(&self) -> f64 {
        self.window_samples as f64 / f64::from(self.sample_rate)
    }
}

/// A verified model: the manifest and the bytes of the TorchScript file.
#[derive(Clone)]
pub struct ModelFiles {
    pub path: PathBuf,
    pub manifest_path: PathBuf,
    pub manifest: ModelManifest,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for ModelFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFiles")
            .field("path", &self.path)
            .field("manifest", &self.manifest)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// The manifest that belongs to a model file: same name, `.json`.
pub fn manifest_path(model: &Path) -> PathBuf {
    model.with_extension("json")
}

/// Where corald looks for the model named `name`, in order.
pub fn search_paths(name: &str) -> Vec<PathBuf> {
    let file = format!("{name}.pt");
    let mut paths = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        paths.push(dir.join("../../model").join(&file));
    }
    paths.push(Path::new(SYSTEM_MODEL_DIR).join(&file));
    let data_home = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")));
    if let Some(d) = data_home {
        paths.push(d.join("coral/models").join(&file));
    }
    paths
}

/// Whether an `embed.model` value names a model (looked up in the model folders) rather than
/// a file: no `/` and no `.pt` ending.
pub fn is_model_name(value: &Path) -> bool {
    let text = value.to_string_lossy();
    !text.contains('/') && !text.ends_with(".pt")
}

/// The model file of `model`: a path to a `.pt` file, or a model name looked up in the model
/// folders (`embed.model`, or the default's name).
pub fn locate(model: &Path) -> Result<PathBuf, ModelError> {
    if !is_model_name(model) {
        if model.is_file() {
            return Ok(model.to_owned());
        }
        return Err(ModelError::NotFound {
            searched: format!("{} (from `embed.model`)", model.display()),
        });
    }
    let candidates = search_paths(&model.to_string_lossy());
    for c in &candidates {
        if c.is_file() {
            // Tidy `bin/../../model` for logs and status.
            return Ok(std::fs::canonicalize(c).unwrap_or_else(|_| c.clone()));
        }
    }
    Err(ModelError::NotFound {
        searched: candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Read the manifest and the model, and check the model's sha256.
pub fn load(path: &Path) -> Result<ModelFiles, ModelError> {
    let manifest_path = manifest_path(path);
    let text = std::fs::read_to_string(&manifest_path).map_err(|source| ModelError::Read {
        path: manifest_path.clone(),
        source,
    })?;
    let manifest = ModelManifest::parse(&text, &manifest_path)?;
    let bytes = std::fs::read(path).map_err(|source| ModelError::Read {
        path: path.to_owned(),
        source,
    })?;
    let actual = sha256_hex(&bytes);
    if actual != manifest.sha256 {
        return Err(ModelError::Checksum {
            path: path.to_owned(),
            expected: manifest.sha256,
            actual,
        });
    }
    Ok(ModelFiles {
        path: path.to_owned(),
        manifest_path,
        manifest,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_json(sha: &str) -> String {
        format!(
            r#"{{"name": "tiny", "version": 3, "sample_rate": 16000, "window_samples": 1024,
                "embedding_dim": 4, "sha256": "{sha}", "source": "test"}}"#
        )
    }

    #[test]
    fn manifest_accepts_numeric_versions_and_extra_fields() {
        let m = ModelManifest::parse(&manifest_json(&"A".repeat(64)), Path::new("m.json"))
            .expect("valid manifest");
        assert_eq!(m.version, "3");
        assert_eq!(m.sha256, "a".repeat(64));
    }

    #[test]
    fn manifest_errors_name_the_field() {
        let text =
            manifest_json(&"a".repeat(64)).replace("\"embedding_dim\": 4", "\"embedding_dim\": 0");
        let e = ModelManifest::parse(&text, Path::new("m.json")).unwrap_err();
        assert!(e.to_string().contains("embedding_dim"), "{e}");
        let e = ModelManifest::parse("{", Path::new("m.json")).unwrap_err();
        assert!(e.to_string().contains("m.json"), "{e}");
    }

    #[test]
    fn checksum_mismatch_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pt = dir.path().join("tiny.pt");
        std::fs::write(&pt, b"not the model").expect("write");
        std::fs::write(dir.path().join("tiny.json"), manifest_json(&"0".repeat(64)))
            .expect("write");
        let e = load(&pt).unwrap_err();
        assert!(matches!(e, ModelError::Checksum { .. }), "{e}");
        assert!(e.to_string().contains("tiny.pt"), "{e}");

        std::fs::write(
            dir.path().join("tiny.json"),
            manifest_json(&sha256_hex(b"not the model")),
        )
        .expect("write");
        let files = load(&pt).expect("checksum matches now");
        assert_eq!(files.manifest.name, "tiny");
    }

    #[test]
    fn missing_configured_model_is_named() {
        let e = locate(Path::new("/nonexistent/x.pt")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.pt"), "{e}");
        let e = locate(Path::new("no-such-model")).unwrap_err();
        assert!(e.to_string().contains("no-such-model.pt"), "{e}");
    }

    #[test]
    fn names_and_paths_are_told_apart() {
        assert!(is_model_name(Path::new("musicnn-msd")));
        assert!(is_model_name(Path::new("musicnn-msd-int8")));
        assert!(!is_model_name(Path::new("musicnn-msd.pt")));
        assert!(!is_model_name(Path::new("./musicnn-msd")));
        assert!(!is_model_name(Path::new(
            "/usr/share/coral/models/musicnn-msd.pt"
        )));
    }

    #[test]
    fn the_default_is_int8_on_a_cpu_and_fp32_on_cuda() {
        assert_eq!(default_model_name(false), "musicnn-msd-mtt-int8");
        assert_eq!(default_model_name(true), "musicnn-msd-mtt");
    }

    /// Both shipped models are found by name from this checkout (`model/`), and their
    /// manifests say which one can only run on a CPU.
    #[test]
    fn the_shipped_models_are_found_by_name() {
        let repo_model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model");
        for (name, cpu_only) in [
            (DEFAULT_CPU_MODEL, true),
            (DEFAULT_ACCELERATOR_MODEL, false),
            ("musicnn-msd", false),
            ("musicnn-msd-int8", true),
        ] {
            let pt = repo_model.join(format!("{name}.pt"));
            let files = load(&pt).expect("the shipped model loads");
            assert_eq!(files.manifest.name, name);
            assert_eq!(files.manifest.cpu_only, cpu_only, "{name}");
        }
    }
}
