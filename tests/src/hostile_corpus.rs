//! A library of hostile files for the chaos tests, generated deterministically from a seed:
//! truncated files of every fixture format, random bytes and empty files with audio
//! extensions, real audio under the wrong extension, absurd ID3v2 tags written byte by byte,
//! non-UTF-8, control-character and 255-byte names, unreadable files and directories, symlink
//! loops, special files (FIFO, socket, device node), files rewritten while a scan reads them,
//! and a few tracks long enough to embed — some whose headers are fine but whose audio is
//! garbage, so they index but fail to decode.
//!
//! [`build`] returns one [`Entry`] per path the scan may see, with what the daemon must do with
//! it, so a test can check every row (and every missing row) against the list.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::fixtures::{self, FORMATS, FixtureTrack};

/// A small deterministic generator (xorshift64*), so a seed reproduces a run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Spread small seeds; never zero.
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15).max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `[lo, hi)`.
    pub fn range_f64(&mut self, lo: f64, hi: f64) -> f64 {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + (hi - lo) * unit
    }
}

/// What kind of hostile entry a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Real audio long enough to embed.
    Valid,
    /// A real file of one format cut short.
    Truncated,
    /// Random bytes under an audio extension.
    RandomBytes,
    /// Zero bytes.
    Empty,
    /// Real audio whose extension names another format.
    WrongExtension,
    /// Real audio behind a multi-MB frame, thousands of frames, or sizes that lie.
    AbsurdTags,
    /// Non-UTF-8, control characters, 255-byte components.
    OddName,
    /// A file the daemon may not read (mode 000).
    Unreadable,
    /// A directory the daemon may not list (mode 000).
    UnreadableDir,
    /// A directory symlink pointing back up the tree.
    SymlinkLoop,
    /// A file symlink that cannot be resolved (dangling, itself, a two-link cycle).
    BrokenSymlink,
    Fifo,
    Socket,
    DeviceNode,
    /// Rewritten, truncated and appended to by a background thread during the scan.
    Changing,
    /// Valid headers (the probe accepts it), garbage audio (decoding fails).
    Undecodable,
}

/// What the scan must do with a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A `tracks` row.
    Indexed,
    /// A `scan_errors` row with a reason, counted as failed.
    Failed,
    /// One or the other (content changing under the scan, tags that lie), never both or none.
    Either,
    /// A `scan_errors` row for a directory (not counted as a failed track).
    DirIssue,
    /// Nothing at all (a directory loop: each directory is visited once).
    Unseen,
}

/// What the embedding stage must do with an indexed path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedExpect {
    /// Not indexed, or outside the duration limits: no vector, no recorded issue.
    Nothing,
    /// One vector.
    Done,
    /// A `track_embedding_issues` row with outcome `failed` and a reason.
    Failed,
    /// Anything (a file changing under the scan and the embedder); counted all the same.
    Any,
}

/// One path of the corpus.
#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: Kind,
    /// Relative to the library root, raw bytes.
    pub rel_path: Vec<u8>,
    pub expect: Expect,
    pub embed: EmbedExpect,
}

/// How to build the corpus.
#[derive(Debug, Clone, Copy)]
pub struct CorpusOptions {
    pub seed: u64,
    /// Owner (uid and gid) given to the unreadable entries. `None`: they stay owned by the
    /// current user, which only keeps them unreadable when that user is not root.
    pub unreadable_owner: Option<u32>,
    /// Whether the daemon is denied access to the unreadable entries (not root, or root with
    /// the owner hidden from it); otherwise it reads them like any other file.
    pub permissions_enforced: bool,
}

/// The generated corpus.
#[derive(Debug)]
pub struct Corpus {
    pub entries: Vec<Entry>,
    /// Files for a [`Mutator`]: (path, the valid content it keeps rewriting).
    pub changing: Vec<(PathBuf, Vec<u8>)>,
    /// Sub-cases left out or changed, and why (e.g. no device node without root).
    pub notes: Vec<String>,
    /// Directories and files made unreadable (their modes are restored by [`Corpus::unlock`]).
    locked: Vec<PathBuf>,
}

impl Corpus {
    /// Count of entries per kind.
    pub fn counts(&self) -> std::collections::BTreeMap<Kind, usize> {
        let mut m = std::collections::BTreeMap::new();
        for e in &self.entries {
            *m.entry(e.kind).or_default() += 1;
        }
        m
    }

    /// Give the unreadable entries their modes back (so a non-root run can delete them).
    pub fn unlock(&self) {
        for p in &self.locked {
            let mode = if p.is_dir() { 0o755 } else { 0o644 };
            let _ = fs::set_permissions(p, fs::Permissions::from_mode(mode));
        }
    }
}

fn ext_of(format: &str) -> &'static str {
    match format {
        "mp3" => "mp3",
        "flac" => "flac",
        "ogg_vorbis" => "ogg",
        "opus" => "opus",
        "m4a_aac" | "m4a_alac" => "m4a",
        "wav" => "wav",
        _ => "aiff",
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn rel(p: &str) -> Vec<u8> {
    p.as_bytes().to_vec()
}

/// An ID3v2.4 syncsafe integer (7 bits per byte; at most 2^28 − 1).
pub fn syncsafe(n: u32) -> [u8; 4] {
    let n = n.min((1 << 28) - 1);
    [
        ((n >> 21) & 0x7f) as u8,
        ((n >> 14) & 0x7f) as u8,
        ((n >> 7) & 0x7f) as u8,
        (n & 0x7f) as u8,
    ]
}

/// One ID3v2.4 frame; `declared` overrides the size field (to make it lie).
pub fn id3_frame(id: &[u8; 4], body: &[u8], declared: Option<u32>) -> Vec<u8> {
    let mut f = Vec::with_capacity(10 + body.len());
    f.extend_from_slice(id);
    f.extend_from_slice(&syncsafe(declared.unwrap_or(body.len() as u32)));
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(body);
    f
}

/// A UTF-8 text frame body.
pub fn id3_text(text: &str) -> Vec<u8> {
    let mut b = vec![3u8];
    b.extend_from_slice(text.as_bytes());
    b
}

/// A TXXX (user text) frame body.
pub fn id3_txxx(description: &str, value: &[u8]) -> Vec<u8> {
    let mut b = vec![3u8];
    b.extend_from_slice(description.as_bytes());
    b.push(0);
    b.extend_from_slice(value);
    b
}

/// A TXXX frame.
fn id3_txxx_frame(description: &str, value: &[u8]) -> Vec<u8> {
    id3_frame(b"TXXX", &id3_txxx(description, value), None)
}

/// An ID3v2.4 tag around `frames`; `declared` overrides the tag size field.
pub fn id3_tag(frames: &[u8], declared: Option<u32>) -> Vec<u8> {
    let mut t = b"ID3\x04\x00\x00".to_vec();
    t.extend_from_slice(&syncsafe(declared.unwrap_or(frames.len() as u32)));
    t.extend_from_slice(frames);
    t
}

/// The bytes of an MP3 file after its leading ID3v2 tag, if it has one.
pub fn strip_id3(mp3: &[u8]) -> &[u8] {
    if mp3.len() >= 10 && &mp3[..3] == b"ID3" {
        let size = mp3[6..10]
            .iter()
            .fold(0usize, |acc, b| (acc << 7) | usize::from(b & 0x7f));
        let footer = if mp3[5] & 0x10 != 0 { 10 } else { 0 };
        let end = (10 + size + footer).min(mp3.len());
        return &mp3[end..];
    }
    mp3
}

/// Builds the corpus under `root` (created). Encodes its audio with ffmpeg (a few seconds).
pub fn build(root: &Path, opts: CorpusOptions) -> Result<Corpus> {
    fixtures::require_ffmpeg()?;
    fs::create_dir_all(root)?;
    let mut rng = Rng::new(opts.seed);
    let mut entries = Vec::new();
    let mut notes = Vec::new();
    let mut locked = Vec::new();
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let s = scratch.path();

    // Sources, encoded once: one 10 s file per format, short and long tracks.
    let mut sources: Vec<FixtureTrack> = FORMATS
        .iter()
        .map(|f| {
            let mut t =
                FixtureTrack::simple(format!("src/{f}.{}", ext_of(f)), f, &format!("Source {f}"));
            t.duration_s = 10.0;
            t
        })
        .collect();
    let long = |name: &str, format: &'static str, seconds: f64| {
        let mut t = FixtureTrack::simple(
            format!("long/{name}.{}", ext_of(format)),
            format,
            &format!("Long {name}"),
        );
        t.duration_s = seconds;
        t
    };
    let longs = [
        long("valid-1", "mp3", rng.range_f64(60.5, 70.0)),
        long("valid-2", "flac", rng.range_f64(60.5, 70.0)),
        long("valid-3", "ogg_vorbis", rng.range_f64(60.5, 70.0)),
        long("garbled-1", "mp3", 65.0),
        long("garbled-2", "mp3", 66.0),
        long("tagged", "mp3", 61.0),
        long("changing", "mp3", 64.0),
    ];
    sources.extend(longs.iter().cloned());
    let mut short = FixtureTrack::simple("short/plain.mp3", "mp3", "Plain Short");
    short.duration_s = 2.0;
    sources.push(short);
    let paths = fixtures::make_tracks(s, &sources)?;
    let read = |i: usize| fs::read(&paths[i]).with_context(|| format!("reading {:?}", paths[i]));
    let by_format: Vec<Vec<u8>> = (0..FORMATS.len()).map(read).collect::<Result<_>>()?;
    let long_bytes: Vec<Vec<u8>> = (0..longs.len())
        .map(|i| read(FORMATS.len() + i))
        .collect::<Result<_>>()?;
    let short_mp3 = read(FORMATS.len() + longs.len())?;

    // Valid tracks long enough to embed, and two whose audio is garbage behind good headers.
    for (i, name) in [
        "valid/track-1.mp3",
        "valid/track-2.flac",
        "valid/track-3.ogg",
    ]
    .iter()
    .enumerate()
    {
        write(&root.join(name), &long_bytes[i])?;
        entries.push(Entry {
            kind: Kind::Valid,
            rel_path: rel(name),
            expect: Expect::Indexed,
            embed: EmbedExpect::Done,
        });
    }
    write(&root.join("valid/short.mp3"), &short_mp3)?;
    entries.push(Entry {
        kind: Kind::Valid,
        rel_path: rel("valid/short.mp3"),
        expect: Expect::Indexed,
        embed: EmbedExpect::Nothing,
    });
    for (i, name) in ["undecodable/garbled-1.mp3", "undecodable/garbled-2.mp3"]
        .iter()
        .enumerate()
    {
        let mut bytes = long_bytes[3 + i].clone();
        let keep = 8192.min(bytes.len());
        let noise = fixtures::pseudo_random_bytes(rng.next_u64(), bytes.len() - keep);
        bytes[keep..].copy_from_slice(&noise);
        write(&root.join(name), &bytes)?;
        entries.push(Entry {
            kind: Kind::Undecodable,
            rel_path: rel(name),
            expect: Expect::Indexed,
            embed: EmbedExpect::Failed,
        });
    }

    // Truncated: every format cut at a seeded point in the first half, and cut to its first
    // 200 bytes.
    for (i, f) in FORMATS.iter().enumerate() {
        let bytes = &by_format[i];
        let ext = ext_of(f);
        let lo = bytes.len() / 10;
        let cut = lo + rng.below((bytes.len() / 2 - lo) as u64) as usize;
        for (name, keep) in [
            (format!("truncated/{f}-cut.{ext}"), cut),
            (
                format!("truncated/{f}-head.{ext}"),
                200.min(bytes.len() / 2),
            ),
        ] {
            write(&root.join(&name), &bytes[..keep])?;
            entries.push(Entry {
                kind: Kind::Truncated,
                rel_path: rel(&name),
                expect: Expect::Failed,
                embed: EmbedExpect::Nothing,
            });
        }
    }

    // Random bytes and empty files under audio extensions.
    for ext in ["mp3", "flac", "ogg", "opus", "m4a", "wav", "aiff", "aac"] {
        let name = format!("random/noise.{ext}");
        let len = 1 + rng.below(64 * 1024) as usize;
        write(
            &root.join(&name),
            &fixtures::pseudo_random_bytes(rng.next_u64(), len),
        )?;
        entries.push(Entry {
            kind: Kind::RandomBytes,
            rel_path: rel(&name),
            expect: Expect::Failed,
            embed: EmbedExpect::Nothing,
        });
    }
    for ext in ["mp3", "flac", "m4a", "wav"] {
        let name = format!("empty/zero.{ext}");
        write(&root.join(&name), b"")?;
        entries.push(Entry {
            kind: Kind::Empty,
            rel_path: rel(&name),
            expect: Expect::Failed,
            embed: EmbedExpect::Nothing,
        });
    }

    // Real audio under another format's extension: indexed by content.
    for (format, ext) in [
        ("flac", "mp3"),
        ("ogg_vorbis", "m4a"),
        ("mp3", "flac"),
        ("wav", "ogg"),
        ("m4a_aac", "wav"),
    ] {
        let i = FORMATS.iter().position(|f| *f == format).unwrap_or(0);
        let name = format!("misnamed/{format}-as.{ext}");
        write(&root.join(&name), &by_format[i])?;
        entries.push(Entry {
            kind: Kind::WrongExtension,
            rel_path: rel(&name),
            expect: Expect::Indexed,
            embed: EmbedExpect::Nothing,
        });
    }

    // Absurd ID3v2 tags in front of real MP3 audio.
    let tagged_audio = strip_id3(&long_bytes[5]);
    let short_audio = strip_id3(&short_mp3);
    let huge = fixtures::pseudo_random_bytes(rng.next_u64(), 12 * 1024 * 1024)
        .into_iter()
        .map(|b| b'a' + b % 26)
        .collect::<Vec<u8>>();
    let mut frames = id3_frame(b"TIT2", &id3_text("Huge Frame"), None);
    frames.extend(id3_frame(b"TXXX", &id3_txxx("blob", &huge), None));
    let huge_frame = [id3_tag(&frames, None), tagged_audio.to_vec()].concat();
    let mut frames = id3_frame(b"TIT2", &id3_text("Many Frames"), None);
    for n in 0..5000 {
        frames.extend(id3_frame(
            b"TXXX",
            &id3_txxx(&format!("k{n}"), format!("value {n} ").repeat(8).as_bytes()),
            None,
        ));
    }
    let many_frames = [id3_tag(&frames, None), short_audio.to_vec()].concat();
    let title = "Long Title ".repeat(200_000); // 2.2 MB
    let huge_title = [
        id3_tag(&id3_frame(b"TIT2", &id3_text(&title), None), None),
        short_audio.to_vec(),
    ]
    .concat();
    let mut frames = id3_frame(b"TIT2", &id3_text("Lying Frame"), None);
    frames.extend(id3_frame(
        b"TXXX",
        &id3_txxx("liar", b"short"),
        Some(200_000_000),
    ));
    let lying_frame = [id3_tag(&frames, None), short_audio.to_vec()].concat();
    let lying_tag = [
        id3_tag(
            &id3_frame(b"TIT2", &id3_text("Lying Tag"), None),
            Some((1 << 28) - 1),
        ),
        short_audio.to_vec(),
    ]
    .concat();
    // What real taggers and damaged files put in tags: NUL-separated values (ID3v2.4, as
    // Picard writes several artists), NUL and control bytes inside text, two ID3v2 tags,
    // duplicate frames, a broken rating (POPM) frame and a TYER frame cut short. Each indexes.
    let nul_artists = [
        id3_tag(
            &[
                id3_frame(b"TIT2", &id3_text("Two Artists"), None),
                id3_frame(b"TPE1", &id3_text("Alpha\0Beta"), None),
                id3_frame(b"TCON", &id3_text("Rock\0Jazz\0"), None),
            ]
            .concat(),
            None,
        ),
        short_audio.to_vec(),
    ]
    .concat();
    let control_bytes = [
        id3_tag(
            &[
                id3_frame(b"TIT2", &id3_text("Bell\u{7}\0\u{1b}[31mRed"), None),
                id3_frame(b"TALB", &[0u8, 0, 0, 0], None),
                id3_txxx_frame("MusicBrainz Album Id", b"\0\0id\0"),
            ]
            .concat(),
            None,
        ),
        short_audio.to_vec(),
    ]
    .concat();
    let two_tags = [
        id3_tag(&id3_frame(b"TIT2", &id3_text("First Tag"), None), None),
        id3_tag(&id3_frame(b"TIT2", &id3_text("Second Tag"), None), None),
        short_audio.to_vec(),
    ]
    .concat();
    let duplicate_frames = [
        id3_tag(
            &[
                id3_frame(b"TIT2", &id3_text("Once"), None),
                id3_frame(b"TIT2", &id3_text("Twice"), None),
                id3_frame(b"TPE1", &id3_text("Same"), None),
                id3_frame(b"TPE1", &id3_text("Same"), None),
            ]
            .concat(),
            None,
        ),
        short_audio.to_vec(),
    ]
    .concat();
    let broken_frames = [
        id3_tag(
            &[
                id3_frame(b"TIT2", &id3_text("Broken Rating"), None),
                // POPM: e-mail, then the rating byte and counter are missing.
                id3_frame(b"POPM", b"no-terminator", None),
                // TYER with an encoding byte only.
                id3_frame(b"TYER", &[3u8], None),
                id3_frame(b"TPE1", &id3_text("Still Read"), None),
            ]
            .concat(),
            None,
        ),
        short_audio.to_vec(),
    ]
    .concat();
    for (name, bytes, expect, embed) in [
        (
            "tags/nul-separated-artists.mp3",
            nul_artists,
            Expect::Indexed,
            EmbedExpect::Nothing,
        ),
        (
            "tags/control-bytes.mp3",
            control_bytes,
            Expect::Indexed,
            EmbedExpect::Nothing,
        ),
        (
            "tags/two-id3v2-tags.mp3",
            two_tags,
            Expect::Indexed,
            EmbedExpect::Nothing,
        ),
        (
            "tags/duplicate-frames.mp3",
            duplicate_frames,
            Expect::Indexed,
            EmbedExpect::Nothing,
        ),
        (
            "tags/broken-popm-and-tyer.mp3",
            broken_frames,
            Expect::Indexed,
            EmbedExpect::Nothing,
        ),
        (
            "tags/huge-frame.mp3",
            huge_frame,
            Expect::Indexed,
            EmbedExpect::Done,
        ),
        (
            "tags/many-frames.mp3",
            many_frames,
            Expect::Indexed,
            EmbedExpect::Nothing,
        ),
        (
            "tags/huge-title.mp3",
            huge_title,
            Expect::Indexed,
            EmbedExpect::Nothing,
        ),
        (
            "tags/lying-frame.mp3",
            lying_frame,
            Expect::Either,
            EmbedExpect::Nothing,
        ),
        (
            "tags/lying-tag.mp3",
            lying_tag,
            Expect::Either,
            EmbedExpect::Nothing,
        ),
    ] {
        write(&root.join(name), &bytes)?;
        entries.push(Entry {
            kind: Kind::AbsurdTags,
            rel_path: rel(name),
            expect,
            embed,
        });
    }

    // Names: non-UTF-8 bytes, control characters, a 255-byte component, a deep long path.
    let odd: Vec<(Vec<u8>, Vec<u8>, Expect)> = vec![
        (
            b"names/caf\xe9 \xff\xfe.mp3".to_vec(),
            short_mp3.clone(),
            Expect::Indexed,
        ),
        (
            b"names/line\nbreak\ttab.mp3".to_vec(),
            short_mp3.clone(),
            Expect::Indexed,
        ),
        (
            [b"names/".as_slice(), &[b'L'; 251], b".mp3"].concat(),
            short_mp3.clone(),
            Expect::Indexed,
        ),
        (
            [
                b"names/".as_slice(),
                &[b'd'; 200],
                b"/",
                &[b'e'; 200],
                b"/",
                &[b'f'; 200],
                b"/",
                &[b'n'; 251],
                b".mp3",
            ]
            .concat(),
            short_mp3.clone(),
            Expect::Indexed,
        ),
        (
            b"names/\xfe\xfd broken.flac".to_vec(),
            fixtures::pseudo_random_bytes(rng.next_u64(), 3000),
            Expect::Failed,
        ),
    ];
    for (name, bytes, expect) in odd {
        let path = root.join(std::ffi::OsStr::from_bytes(&name));
        ensure!(
            path.file_name().map_or(0, |n| n.len()) <= 255,
            "component too long"
        );
        write(&path, &bytes)?;
        entries.push(Entry {
            kind: Kind::OddName,
            rel_path: name,
            expect,
            embed: EmbedExpect::Nothing,
        });
    }

    // Unreadable file and directory.
    let secret = root.join("locked/secret.mp3");
    write(&secret, &short_mp3)?;
    let dir = root.join("locked-dir");
    write(&dir.join("inside.mp3"), &short_mp3)?;
    for p in [&secret, &dir] {
        if let Some(id) = opts.unreadable_owner {
            let owner = Some(nix::unistd::Uid::from_raw(id));
            let group = Some(nix::unistd::Gid::from_raw(id));
            nix::unistd::chown(p.as_path(), owner, group)
                .with_context(|| format!("chown {}", p.display()))?;
        }
        fs::set_permissions(p, fs::Permissions::from_mode(0o000))?;
        locked.push(p.clone());
    }
    if opts.permissions_enforced {
        entries.push(Entry {
            kind: Kind::Unreadable,
            rel_path: rel("locked/secret.mp3"),
            expect: Expect::Failed,
            embed: EmbedExpect::Nothing,
        });
        entries.push(Entry {
            kind: Kind::UnreadableDir,
            rel_path: rel("locked-dir"),
            expect: Expect::DirIssue,
            embed: EmbedExpect::Nothing,
        });
    } else {
        notes.push(
            "unreadable file and directory: the daemon runs as root with no way to hide their \
             owner from it (no user namespaces), so mode 000 does not stop it; they are \
             expected to be indexed"
                .into(),
        );
        for p in ["locked/secret.mp3", "locked-dir/inside.mp3"] {
            entries.push(Entry {
                kind: if p.starts_with("locked-dir") {
                    Kind::UnreadableDir
                } else {
                    Kind::Unreadable
                },
                rel_path: rel(p),
                expect: Expect::Indexed,
                embed: EmbedExpect::Nothing,
            });
        }
    }

    // Symlinks: directory loops (visited once, so unseen), and file links that never resolve.
    let loops = root.join("loops");
    fs::create_dir_all(loops.join("a/b"))?;
    std::os::unix::fs::symlink(".", loops.join("self"))?;
    std::os::unix::fs::symlink("../..", loops.join("a/b/up"))?;
    entries.push(Entry {
        kind: Kind::SymlinkLoop,
        rel_path: rel("loops/self"),
        expect: Expect::Unseen,
        embed: EmbedExpect::Nothing,
    });
    entries.push(Entry {
        kind: Kind::SymlinkLoop,
        rel_path: rel("loops/a/b/up"),
        expect: Expect::Unseen,
        embed: EmbedExpect::Nothing,
    });
    for (link, target) in [
        ("loops/selfref.mp3", "selfref.mp3"),
        ("loops/dangling.flac", "nowhere.flac"),
        ("loops/ping.mp3", "pong.mp3"),
        ("loops/pong.mp3", "ping.mp3"),
    ] {
        std::os::unix::fs::symlink(target, root.join(link))?;
        entries.push(Entry {
            kind: Kind::BrokenSymlink,
            rel_path: rel(link),
            expect: Expect::Failed,
            embed: EmbedExpect::Nothing,
        });
    }

    // Special files with audio names.
    let special = root.join("special");
    fs::create_dir_all(&special)?;
    nix::unistd::mkfifo(
        &special.join("pipe.mp3"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )?;
    entries.push(Entry {
        kind: Kind::Fifo,
        rel_path: rel("special/pipe.mp3"),
        expect: Expect::Failed,
        embed: EmbedExpect::Nothing,
    });
    drop(std::os::unix::net::UnixListener::bind(
        special.join("socket.wav"),
    )?);
    entries.push(Entry {
        kind: Kind::Socket,
        rel_path: rel("special/socket.wav"),
        expect: Expect::Failed,
        embed: EmbedExpect::Nothing,
    });
    match nix::sys::stat::mknod(
        &special.join("null.mp3"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        nix::sys::stat::makedev(1, 3),
    ) {
        Ok(()) => entries.push(Entry {
            kind: Kind::DeviceNode,
            rel_path: rel("special/null.mp3"),
            expect: Expect::Failed,
            embed: EmbedExpect::Nothing,
        }),
        Err(e) => notes.push(format!(
            "device node: mknod failed ({e}; it needs root), sub-case skipped"
        )),
    }

    // Files rewritten while the scan reads them (see `Mutator`).
    let mut changing = Vec::new();
    for (name, bytes, embed) in [
        ("changing/flux.mp3", short_mp3.clone(), EmbedExpect::Nothing),
        (
            "changing/flux.flac",
            by_format[1].clone(),
            EmbedExpect::Nothing,
        ),
        (
            "changing/flux-long.mp3",
            long_bytes[6].clone(),
            EmbedExpect::Any,
        ),
    ] {
        let path = root.join(name);
        write(&path, &bytes)?;
        changing.push((path, bytes));
        entries.push(Entry {
            kind: Kind::Changing,
            rel_path: rel(name),
            expect: Expect::Either,
            embed,
        });
    }

    Ok(Corpus {
        entries,
        changing,
        notes,
        locked,
    })
}

/// A background thread that keeps rewriting files while a scan runs: truncate to nothing,
/// write a prefix, append random bytes, write the whole valid content back, replace it by
/// rename. Stops (and restores the valid content) when dropped or [`Mutator::stop`]ped.
pub struct Mutator {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Mutator {
    pub fn start(files: Vec<(PathBuf, Vec<u8>)>, seed: u64) -> Mutator {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let (s, o) = (Arc::clone(&stop), Arc::clone(&ops));
        let thread = std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            while !s.load(Ordering::Relaxed) && !files.is_empty() {
                let (path, good) = &files[rng.below(files.len() as u64) as usize];
                let _ = mutate_once(path, good, &mut rng);
                o.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200 + rng.below(3000)));
            }
            for (path, good) in &files {
                let _ = fs::write(path, good);
            }
        });
        Mutator {
            stop,
            ops,
            thread: Some(thread),
        }
    }

    /// Stop, restore every file's valid content, and return how many changes were made.
    pub fn stop(mut self) -> u64 {
        self.halt();
        self.ops.load(Ordering::Relaxed)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Mutator {
    fn drop(&mut self) {
        self.halt();
    }
}

fn mutate_once(path: &Path, good: &[u8], rng: &mut Rng) -> std::io::Result<()> {
    use std::io::Write;
    match rng.below(5) {
        0 => {
            fs::File::create(path)?;
        }
        1 => {
            let keep = rng.below(good.len() as u64 + 1) as usize;
            fs::write(path, &good[..keep])?;
        }
        2 => {
            let mut f = fs::OpenOptions::new().append(true).open(path)?;
            f.write_all(&fixtures::pseudo_random_bytes(
                rng.next_u64(),
                1 + rng.below(8192) as usize,
            ))?;
        }
        3 => fs::write(path, good)?,
        _ => {
            let tmp = path.with_extension("swap-tmp");
            fs::write(&tmp, good)?;
            fs::rename(&tmp, path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id3_sizes_are_syncsafe_and_tags_strip() {
        assert_eq!(syncsafe(0), [0, 0, 0, 0]);
        assert_eq!(syncsafe(257), [0, 0, 2, 1]);
        assert_eq!(syncsafe(u32::MAX), [0x7f; 4]);
        let frame = id3_frame(b"TIT2", &id3_text("Hi"), None);
        assert_eq!(frame, b"TIT2\x00\x00\x00\x03\x00\x00\x03Hi");
        let audio = b"\xff\xfb\x90\x64rest";
        let file = [id3_tag(&frame, None), audio.to_vec()].concat();
        assert_eq!(strip_id3(&file), audio);
        assert_eq!(strip_id3(audio), audio);
    }

    #[test]
    fn the_generator_is_deterministic() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(7).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut r = Rng::new(7);
        let (x, y) = (r.next_u64(), r.next_u64());
        assert_ne!(x, y);
        assert!((0..1000).all(|_| r.below(10) < 10));
        assert!((0..1000).all(|_| (1.0..2.0).contains(&r.range_f64(1.0, 2.0))));
    }
}
