//! The parsing entry points that the fuzz targets (`fuzz/`) and the regression-input test drive,
//! each on arbitrary bytes: configuration text, one JSON-RPC request as the server decodes it,
//! a file through the scan probe, and a file through the embedding decoder.
//!
//! Each returns whether the input was accepted or rejected (with the daemon's own wording), or
//! a [`Violation`] when the daemon's contract is broken: a configuration error that does not
//! name the file, line and key, an RPC answer other than a result or a documented error, a probe
//! or decode result that breaks its invariants. A panic is always a failure and is not caught
//! here.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use coral_proto::{
    CoralApiServer, DaemonStatus, Library, LibrarySelector, RpcResult, ScanFilter, ScanProgress,
    ScanStarted, SimilarTrack, Track, TrackMatch, codes, errors::error,
};
use jsonrpsee::core::{SubscriptionResult, async_trait};
use jsonrpsee::{PendingSubscriptionSink, RpcModule};
use uuid::Uuid;

use crate::config::{Config, ConfigError};
use crate::embed::phase_2_resample::{WindowMaker, WindowPlan};
use crate::lookup::LookupQuery;
use crate::rpc::api::{ApiService, CoralRpc, Mix, ScanStart, Similar, SonicPath};
use crate::rpc::params::{self, Search};
use crate::scan::phase_2_probe::{self, ProbedTrack};

/// What an entry point made of an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Parsed and valid.
    Accepted(String),
    /// Refused with an error the daemon is allowed to give.
    Rejected(String),
}

/// The daemon broke its contract on an input.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Violation(pub String);

fn violation<T>(what: impl Into<String>) -> Result<T, Violation> {
    Err(Violation(what.into()))
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// The name configuration errors must carry.
const CONFIG_ORIGIN: &str = "/etc/coral/fuzz.toml";

/// A configuration file's text (invalid UTF-8 replaced, as the parser never sees it) through
/// [`Config::from_toml`]. Every error must name the file; a parse error or a bad value also
/// the line (within the document) and the key.
pub fn config_text(data: &[u8]) -> Result<Outcome, Violation> {
    let text = String::from_utf8_lossy(data);
    let lines = text.matches('\n').count() + 1;
    let err = match Config::from_toml(&text, Path::new(CONFIG_ORIGIN)) {
        Ok(_) => return Ok(Outcome::Accepted("valid configuration".into())),
        Err(e) => e,
    };
    let message = err.to_string();
    let prefix = format!("invalid configuration file {CONFIG_ORIGIN}: ");
    let Some(rest) = message.strip_prefix(&prefix) else {
        return violation(format!("error does not name the file: {message}"));
    };
    let line_ok = |rest: &str| -> bool {
        rest.strip_prefix("line ")
            .and_then(|r| r.split([',', ':']).next())
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|n| (1..=lines).contains(&n))
    };
    match &err {
        ConfigError::Parse { .. } if !line_ok(rest) => violation(format!(
            "parse error without a line in the document: {message}"
        )),
        ConfigError::Value { key, line, .. } => {
            if line.is_none() || !line_ok(rest) {
                violation(format!("bad value without its line: {message}"))
            } else if !rest.contains(&format!("key `{key}`")) {
                violation(format!("bad value without its key: {message}"))
            } else {
                Ok(Outcome::Rejected(message))
            }
        }
        ConfigError::Parse { .. } => Ok(Outcome::Rejected(message)),
        ConfigError::Read { .. } | ConfigError::Invalid { .. } => {
            violation(format!("unexpected kind of error: {message}"))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RPC parameters

/// Code of the answer the parameter-checking server gives when a call would go on to the
/// database: the parameters decoded and passed every check.
const ACCEPTED: i32 = 1;
/// Code it gives when a check's result breaks an invariant.
const BROKEN: i32 = 2;
/// The library root that `scan.start` paths are resolved against.
const LIBRARY_ROOT: &str = "/srv/music";

fn accepted<T>(method: &str) -> RpcResult<T> {
    Err(error(ACCEPTED, method))
}

fn broken(what: String) -> jsonrpsee::types::ErrorObjectOwned {
    error(BROKEN, what)
}

/// The service behind corald's own `CoralApi` adapter ([`CoralRpc`]) for fuzzing: every call is
/// decoded by the same generated code and goes through the same parameter checks ([`params`]);
/// the service checks invariants of their results, then stops where corald would reach the
/// database or the filesystem.
struct ParamsOnly;

#[async_trait]
impl ApiService for ParamsOnly {
    async fn daemon_status(&self) -> RpcResult<DaemonStatus> {
        accepted("daemon.status")
    }

    async fn library_add(&self, path: &Path) -> RpcResult<Library> {
        if !path.is_absolute() {
            return Err(broken(format!(
                "accepted a relative library path {}",
                path.display()
            )));
        }
        accepted("library.add")
    }

    async fn library_list(&self) -> RpcResult<Vec<Library>> {
        accepted("library.list")
    }

    async fn library_remove(&self, _library: LibrarySelector) -> RpcResult<Library> {
        accepted("library.remove")
    }

    async fn scan_start(&self, scan: ScanStart) -> RpcResult<ScanStarted> {
        if let Some(path) = scan.path {
            let root = Path::new(LIBRARY_ROOT);
            if let Some(sub) = params::clean_subdir(root, &path)? {
                let inside = sub
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
                if !inside || !root.join(&sub).starts_with(root) {
                    return Err(broken(format!(
                        "subdirectory {path:?} resolved to {} outside the library",
                        sub.display()
                    )));
                }
            }
        }
        accepted("scan.start")
    }

    async fn scan_get(&self, _request_id: Uuid) -> RpcResult<ScanProgress> {
        accepted("scan.get")
    }

    async fn scan_active(&self) -> RpcResult<Vec<ScanProgress>> {
        accepted("scan.active")
    }

    async fn scan_list(&self, limit: i64) -> RpcResult<Vec<ScanProgress>> {
        if !(1..=1000).contains(&limit) {
            return Err(broken(format!("list limit {limit}")));
        }
        accepted("scan.list")
    }

    async fn scan_cancel(&self, _request_id: Uuid) -> RpcResult<ScanProgress> {
        accepted("scan.cancel")
    }

    async fn scan_subscribe(
        &self,
        pending: PendingSubscriptionSink,
        _filter: ScanFilter,
    ) -> SubscriptionResult {
        pending.reject(error(ACCEPTED, "scan.subscribe")).await;
        Ok(())
    }

    async fn track_get(&self, _id: i64) -> RpcResult<Track> {
        accepted("track.get")
    }

    async fn track_search(&self, s: Search) -> RpcResult<Vec<Track>> {
        // Only prefix terms of letters and digits: no tsquery syntax can come from a user.
        let clean = s.tsquery.split(" & ").all(|term| {
            term.strip_suffix(":*")
                .is_some_and(|w| !w.is_empty() && w.chars().all(char::is_alphanumeric))
        });
        if !clean || !(1..=1000).contains(&s.limit) || s.offset < 0 {
            return Err(broken(format!("search became {s:?}")));
        }
        accepted("track.search")
    }

    async fn track_similar(&self, q: Similar) -> RpcResult<Vec<SimilarTrack>> {
        if !(1..=1000).contains(&q.limit) {
            return Err(broken(format!("similar limit {}", q.limit)));
        }
        let f = &q.filter;
        if f.min_ms < 0 || f.min_ms > f.max_ms || f.max_per_artist == Some(0) {
            return Err(broken(format!("similar options became {f:?}")));
        }
        accepted("track.similar")
    }

    async fn track_path(&self, q: SonicPath) -> RpcResult<Vec<SimilarTrack>> {
        if !(2..=200).contains(&q.count) {
            return Err(broken(format!("path count {}", q.count)));
        }
        accepted("track.path")
    }

    async fn track_mix(&self, q: Mix) -> RpcResult<Vec<SimilarTrack>> {
        let n = q.count;
        if q.seeds.tracks.len() > 20 || !(1..=1000).contains(&n) {
            return Err(broken(format!(
                "mix of {} seeds, count {n}",
                q.seeds.tracks.len()
            )));
        }
        accepted("track.mix")
    }

    async fn track_lookup(&self, q: LookupQuery, _limit: i64) -> RpcResult<Vec<TrackMatch>> {
        // Only letters and digits between single spaces reach the tsquery.
        if let Some((a, t)) = &q.artist_title {
            let clean = |s: &str| {
                s.split(' ')
                    .all(|w| !w.is_empty() && w.chars().all(char::is_alphanumeric))
            };
            if !clean(a) || !clean(t) {
                return Err(broken(format!("lookup became {q:?}")));
            }
        }
        accepted("track.lookup")
    }
}

/// The `CoralApi` server the fuzzing drives: corald's adapter over [`ParamsOnly`].
fn params_only() -> CoralRpc<ParamsOnly> {
    CoralRpc(Arc::new(ParamsOnly))
}

/// Every method name a `CoralApi` server registers (subscriptions with their unsubscribe
/// method), from the generated code: what `coral_proto::registered_names` must list.
pub fn api_method_names() -> Vec<&'static str> {
    params_only().into_rpc().method_names().collect()
}

struct RpcHarness {
    runtime: tokio::runtime::Runtime,
    module: RpcModule<CoralRpc<ParamsOnly>>,
}

thread_local! {
    static RPC: RefCell<Option<RpcHarness>> = const { RefCell::new(None) };
}

/// One JSON-RPC call: the first line of `data` is the method name, the rest its `params`
/// (JSON text, inserted as is; nothing means no `params`). The answer must be the parameters'
/// acceptance, `-32700`/`-32600`/`-32601`/`-32602`, or one of the application errors the
/// parameter checks give (invalid argument, path outside the library).
pub fn rpc_request(data: &[u8]) -> Result<Outcome, Violation> {
    let text = String::from_utf8_lossy(data);
    let (method, params) = text.split_once('\n').unwrap_or((&text, ""));
    let method = serde_json::to_string(method).map_err(|e| Violation(e.to_string()))?;
    let request = if params.trim().is_empty() {
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":{method}}}"#)
    } else {
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":{method},"params":{params}}}"#)
    };
    let answer = RPC.with(|cell| -> Result<Option<String>, Violation> {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Violation(format!("no runtime: {e}")))?;
            *slot = Some(RpcHarness {
                runtime,
                module: params_only().into_rpc(),
            });
        }
        let Some(h) = slot.as_ref() else {
            return violation("no RPC harness");
        };
        Ok(h.runtime
            .block_on(h.module.raw_json_request(&request, 1))
            .ok()
            .map(|(resp, _rx)| resp.get().to_owned()))
    })?;
    // Not a JSON-RPC request at all: the server answers a parse error before any method.
    let Some(answer) = answer else {
        return Ok(Outcome::Rejected("not a JSON-RPC request".into()));
    };
    let v: serde_json::Value = serde_json::from_str(&answer)
        .map_err(|e| Violation(format!("answer is not JSON ({e}): {answer}")))?;
    if v.get("jsonrpc").and_then(|j| j.as_str()) != Some("2.0") {
        return violation(format!("answer is not JSON-RPC 2.0: {answer}"));
    }
    if let Some(result) = v.get("result") {
        // The only method that returns here: unsubscribing an unknown subscription.
        return if method == r#""scan.unsubscribe""# && result.is_boolean() {
            Ok(Outcome::Accepted("scan.unsubscribe".into()))
        } else {
            violation(format!("unexpected result: {answer}"))
        };
    }
    let Some(err) = v.get("error") else {
        return violation(format!("neither result nor error: {answer}"));
    };
    let code = err.get("code").and_then(|c| c.as_i64());
    let message = err
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_owned();
    match code.and_then(|c| i32::try_from(c).ok()) {
        Some(ACCEPTED) => Ok(Outcome::Accepted(message)),
        Some(BROKEN) => violation(message),
        Some(
            -32700
            | -32600
            | -32601
            | -32602
            | codes::INVALID_ARGUMENT
            | codes::PATH_OUTSIDE_LIBRARY,
        ) if !message.is_empty() => Ok(Outcome::Rejected(message)),
        _ => violation(format!("unexpected error: {answer}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Files

/// A scratch file per thread: the probe and the decoder take paths, as in the daemon.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Result<Self, Violation> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("coral-fuzz-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Violation(format!("cannot create {}: {e}", dir.display())))?;
        Ok(Scratch { dir })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

thread_local! {
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

/// Writes `data` to this thread's scratch file (no extension: content decides) and runs `f`.
fn with_file<T>(data: &[u8], f: impl FnOnce(&Path) -> T) -> Result<T, Violation> {
    let path = SCRATCH.with(|cell| -> Result<PathBuf, Violation> {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(Scratch::new()?);
        }
        match slot.as_ref() {
            Some(s) => Ok(s.dir.join("input")),
            None => violation("no scratch directory"),
        }
    })?;
    std::fs::write(&path, data)
        .map_err(|e| Violation(format!("cannot write {}: {e}", path.display())))?;
    Ok(f(&path))
}

/// Longest tag value the probe keeps (see `phase_2_probe`).
const MAX_TAG_BYTES: usize = 1024;

fn check_track(t: &ProbedTrack) -> Result<(), Violation> {
    let a = &t.audio;
    if a.duration_ms < 0 {
        return violation(format!("negative duration: {t:?}"));
    }
    let g = &t.tags;
    let single = [
        &g.title,
        &g.artist,
        &g.album,
        &g.album_artist,
        &g.genre,
        &g.composer,
        &g.musicbrainz_recording_id,
        &g.musicbrainz_track_id,
        &g.musicbrainz_release_id,
        &g.isrc,
    ];
    let lists = [
        &g.artists,
        &g.album_artists,
        &g.genres,
        &g.composers,
        &g.musicbrainz_artist_ids,
    ];
    let mut texts = single
        .iter()
        .filter_map(|s| s.as_deref())
        .chain(lists.iter().flat_map(|l| l.iter().map(String::as_str)));
    if texts.any(|s| s.is_empty() || s.len() > MAX_TAG_BYTES || s.chars().any(char::is_control)) {
        return violation(format!("tag text not cleaned: {t:?}"));
    }
    let positive = [a.sample_rate, a.channels, a.bit_depth, a.bitrate_kbps];
    if positive.iter().flatten().any(|v| *v <= 0) {
        return violation(format!("non-positive audio property: {t:?}"));
    }
    Ok(())
}

/// A file's bytes through the scan's probe ([`phase_2_probe::probe_file`]): sniffing, the
/// truncation checks and lofty. A probed track must have a non-negative duration, positive
/// audio properties and cleaned tag text; an error must say something.
pub fn probe_bytes(data: &[u8]) -> Result<Outcome, Violation> {
    phase_2_probe::ffprobe::set_enabled(false);
    match with_file(data, phase_2_probe::probe_file)? {
        Ok(t) => {
            check_track(&t)?;
            Ok(Outcome::Accepted(format!(
                "{} {} ms",
                t.format.as_str(),
                t.audio.duration_ms
            )))
        }
        Err(e) => {
            let message = e.to_string();
            if message.trim().is_empty() {
                return violation(format!("empty probe error: {e:?}"));
            }
            Ok(Outcome::Rejected(message))
        }
    }
}

/// Windows of the embedding decode target: 2 windows of 0.1 s at 16 kHz, so tiny inputs
/// reach the resampler (the daemon's windows are longer; the code path is the same).
const FUZZ_PLAN: WindowPlan = WindowPlan {
    count: 2,
    window_samples: 1600,
    sample_rate: 16_000,
};

/// A file's bytes through the embedding pipeline's decode and resample stages, as the daemon
/// runs them: the probe gives the duration (1 s when it refuses the file, so the decoder still
/// sees every input), then [`WindowMaker::make`] decodes and resamples the windows under
/// `catch_unwind`, as in the daemon. The windows must have the planned length and hold finite
/// samples. The FFmpeg fallback is off: most fuzz inputs are files symphonia refuses, and a
/// child process for each would slow fuzzing a hundredfold while testing FFmpeg, not corald
/// (the fallback's own handling of FFmpeg's output is covered by the embed format tests).
pub fn embed_decode_bytes(data: &[u8]) -> Result<Outcome, Violation> {
    phase_2_probe::ffprobe::set_enabled(false);
    let result = with_file(data, |path| {
        let duration_s = match phase_2_probe::probe_file(path) {
            Ok(t) => t.audio.duration_ms as f64 / 1000.0,
            Err(_) => 1.0,
        };
        // As the daemon's decode threads do: a panic fails the track, not the daemon.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            WindowMaker::new(FUZZ_PLAN)
                .with_ffmpeg_fallback(false)
                .make(path, duration_s)
        }))
    })?;
    let Ok(result) = result else {
        return Ok(Outcome::Rejected(
            "the decoder panicked (the daemon counts the track as failed)".into(),
        ));
    };
    match result {
        Ok(w) => {
            let want = FUZZ_PLAN.count * FUZZ_PLAN.window_samples;
            if w.count != FUZZ_PLAN.count || w.samples.len() != want {
                return violation(format!(
                    "{} windows, {} samples (want {want})",
                    w.count,
                    w.samples.len()
                ));
            }
            if w.samples.iter().any(|s| !s.is_finite()) {
                return violation("non-finite samples in the windows");
            }
            Ok(Outcome::Accepted(format!(
                "{} windows, {:.2} s decoded",
                w.count, w.decoded_seconds
            )))
        }
        Err(e) => Ok(Outcome::Rejected(e.to_string())),
    }
}

/// For the fuzz targets, called once at start: a panic raised inside one of `crates` (a
/// dependency the daemon only calls under `catch_unwind`: lofty in the probe, symphonia and the
/// resampler in the embedding decode) is reported once per place on stderr and unwinds to the
/// daemon's handler, which turns it into an error. Any other panic goes to the previous hook
/// (libFuzzer's, which aborts: a crash), wherever it would be caught.
pub fn tolerate_caught_panics_in(crates: &'static [&'static str]) {
    let previous = std::panic::take_hook();
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    std::panic::set_hook(Box::new(move |info| {
        let place = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
        let in_dependency = place.as_deref().is_some_and(|p| {
            crates
                .iter()
                .any(|c| p.contains(&format!("/{c}-")) && p.contains("/src/"))
        });
        if !in_dependency {
            return previous(info);
        }
        let first = seen
            .lock()
            .map(|mut s| s.insert(place.clone()))
            .unwrap_or(false);
        if first {
            let what = crate::panic_text::panic_message(info.payload()).unwrap_or_default();
            eprintln!(
                "coral-fuzz: panic in a dependency, caught by the daemon: {what} at {}",
                place.unwrap_or_default()
            );
        }
    }));
}

/// An entry point: bytes in, what the daemon made of them or the contract it broke.
pub type Entry = fn(&[u8]) -> Result<Outcome, Violation>;

/// The entry point of a fuzz target, by the target's name (`fuzz/fuzz_targets/<name>.rs`).
pub fn by_target(name: &str) -> Option<Entry> {
    Some(match name {
        "config" => config_text,
        "rpc_params" => rpc_request,
        "probe" => probe_bytes,
        "embed_decode" => embed_decode_bytes,
        _ => return None,
    })
}
