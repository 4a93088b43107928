//! Shared by the similarity tests: libraries of generated music ([`crate::music`]) and ffmpeg
//! transcodes of it, tagged by mutagen ([`crate::tagger`]); a daemon that embeds short tracks;
//! and a strict M3U8 reader.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use coral_proto::{CoralApiClient, ScanPhase};

use crate::daemon::{Daemon, add_and_scan, traversable_tempdir};
use crate::fixtures;
use crate::music::{self, MusicKind};
use crate::tagger::{self, Flavour};

/// One file to make: where, what music, which tags; `transcode_of` makes it from another
/// file of the list with ffmpeg instead of from the synthesiser.
#[derive(Debug, Clone)]
pub struct Spec {
    pub rel: &'static str,
    pub kind: MusicKind,
    pub variant: u32,
    pub seconds: f64,
    pub artist: &'static str,
    pub title: &'static str,
    pub album: Option<&'static str>,
    pub mbid: Option<&'static str>,
    pub transcode_of: Option<&'static str>,
}

/// A file of `seconds` of `kind` (variant `variant`) tagged with artist and title.
pub fn spec(
    rel: &'static str,
    kind: MusicKind,
    variant: u32,
    seconds: f64,
    artist: &'static str,
    title: &'static str,
) -> Spec {
    Spec {
        rel,
        kind,
        variant,
        seconds,
        artist,
        title,
        album: None,
        mbid: None,
        transcode_of: None,
    }
}

impl Spec {
    pub fn mbid(mut self, mbid: &'static str) -> Spec {
        self.mbid = Some(mbid);
        self
    }

    pub fn album(mut self, album: &'static str) -> Spec {
        self.album = Some(album);
        self
    }

    /// Made by ffmpeg from the file `rel` of the same library (made earlier in the list).
    pub fn transcode_of(mut self, rel: &'static str) -> Spec {
        self.transcode_of = Some(rel);
        self
    }
}

fn flavour(rel: &str) -> Flavour {
    if rel.ends_with(".mp3") {
        Flavour::Id3v24
    } else {
        Flavour::Vorbis
    }
}

/// Make and tag the files of `specs` under `root`, in order.
pub fn make(root: &Path, specs: &[Spec]) -> Result<()> {
    for s in specs {
        let path = match s.transcode_of {
            None => music::make_music(root, s.rel, s.kind, s.variant, s.seconds)?,
            Some(src) => {
                let src = root.join(src);
                fixtures::encode_into_place(root, s.rel, &[OsStr::new("-i"), src.as_os_str()])?
            }
        };
        let mut tags: Vec<(&str, &[&str])> = vec![
            ("artist", std::slice::from_ref(&s.artist)),
            ("title", std::slice::from_ref(&s.title)),
        ];
        if let Some(a) = &s.album {
            tags.push(("album", std::slice::from_ref(a)));
        }
        if let Some(m) = &s.mbid {
            tags.push(("musicbrainz_trackid", std::slice::from_ref(m)));
        }
        tagger::tag(&path, flavour(s.rel), &tags)?;
    }
    Ok(())
}

/// A daemon that embeds tracks from 10 s on, with extra environment (test hooks); keep the
/// directory (its configuration) as long as the daemon.
pub async fn daemon(env: &[(&str, &str)]) -> Result<(Daemon, tempfile::TempDir)> {
    let dir = traversable_tempdir()?;
    let config = dir.path().join("corald.toml");
    std::fs::write(&config, "[embed]\nmin_duration_s = 10\n")?;
    let d = Daemon::start_with_env(&["--config", &config.to_string_lossy()], env).await?;
    Ok((d, dir))
}

/// `specs` made in `root`, and a [`daemon`] that indexed and embedded them as one library;
/// `None` (the test should end) when corald was built without embeddings. Keep the directory
/// as long as the daemon.
pub async fn one_embedded_library(
    root: &Path,
    specs: &[Spec],
) -> Result<Option<(Daemon, tempfile::TempDir)>> {
    make(root, specs)?;
    let (d, config) = daemon(&[]).await?;
    if !embeddings_on(&d).await? {
        return Ok(None);
    }
    scan_all(&d, root, specs.len() as u64).await?;
    Ok(Some((d, config)))
}

/// False (and the test should end) when corald was built without embeddings.
pub async fn embeddings_on(d: &Daemon) -> Result<bool> {
    let s = d.client().await?.daemon_status().await?;
    if !s.embedding.enabled {
        eprintln!(
            "corald runs without embeddings ({:?}): stopping",
            s.warnings
        );
    }
    Ok(s.embedding.enabled)
}

/// Add `root` as a library, wait for its scan, check that all `files` were embedded.
pub async fn scan_all(d: &Daemon, root: &Path, files: u64) -> Result<i64> {
    let c = d.client().await?;
    let (id, p) = add_and_scan(&c, root).await?;
    ensure!(p.phase == ScanPhase::Completed, "{p:?}");
    ensure!(
        p.counts.embeddings_done == files,
        "every file embedded: {p:?}"
    );
    Ok(id)
}

/// Track id by path relative to the library it is in.
pub async fn track_ids(d: &Daemon) -> Result<HashMap<String, i64>> {
    let mut db = d.db().await?;
    let rows: Vec<(i64, String)> = sqlx::query_as("SELECT id, rel_path_text FROM tracks")
        .fetch_all(&mut db)
        .await?;
    Ok(rows.into_iter().map(|(id, rel)| (rel, id)).collect())
}

/// A strict M3U8 reader: `#EXTM3U` first, then for each entry an `#EXTINF:<seconds>,<name>`
/// line followed by an absolute path; nothing else, no empty lines, a final line break.
pub fn parse_m3u8(text: &str) -> Result<Vec<(i64, PathBuf)>> {
    let mut lines = text.lines();
    ensure!(lines.next() == Some("#EXTM3U"), "header: {text:?}");
    let mut out = Vec::new();
    while let Some(info) = lines.next() {
        let rest = info
            .strip_prefix("#EXTINF:")
            .with_context(|| format!("expected #EXTINF, got {info:?}"))?;
        let (secs, name) = rest.split_once(',').context("no name after the duration")?;
        ensure!(!name.is_empty(), "empty name in {info:?}");
        let path = lines.next().context("an #EXTINF without a path")?;
        ensure!(path.starts_with('/'), "not absolute: {path:?}");
        out.push((secs.parse::<i64>()?, PathBuf::from(path)));
    }
    ensure!(text.ends_with('\n'), "ends with a line break");
    Ok(out)
}
