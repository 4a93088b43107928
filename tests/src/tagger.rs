//! Tags fixture files with a real tagger: PyPI `mutagen` (installed by `scripts/setup` into
//! `${XDG_CACHE_HOME:-$HOME/.cache}/coral/venv-tagger`), driven by `tests/tagger/tag.py`. It
//! writes what taggers write: multi-valued ID3v2.4 frames (NUL-separated), ID3v2.3 with "/",
//! repeated Vorbis comments, multi-value MP4 atoms, APEv2 and ASF attributes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};

/// How the tags are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    Id3v24,
    Id3v23,
    /// FLAC, Ogg Vorbis and Opus comments.
    Vorbis,
    Mp4,
    Ape,
    Asf,
}

impl Flavour {
    fn as_str(self) -> &'static str {
        match self {
            Self::Id3v24 => "id3v24",
            Self::Id3v23 => "id3v23",
            Self::Vorbis => "vorbis",
            Self::Mp4 => "mp4",
            Self::Ape => "ape",
            Self::Asf => "asf",
        }
    }
}

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("CORAL_TAGGER_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    cache.join("coral/venv-tagger/bin/python")
}

/// Writes `tags` (key → values; keys as in `tests/tagger/tag.py`) into `path`.
pub fn tag(path: &Path, flavour: Flavour, tags: &[(&str, &[&str])]) -> Result<()> {
    let map: serde_json::Map<String, serde_json::Value> = tags
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::json!(v)))
        .collect();
    let request = serde_json::json!({
        "path": path.to_string_lossy(),
        "flavour": flavour.as_str(),
        "tags": map,
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tagger/tag.py");
    let py = python();
    let mut child = Command::new(&py)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "cannot run the tagger {} (run scripts/setup to install mutagen)",
                py.display()
            )
        })?;
    child
        .stdin
        .take()
        .context("tagger stdin")?
        .write_all(request.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "tagging {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
