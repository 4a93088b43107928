//! The Coral JSON-RPC API: the one definition of every method, notification and wire type that
//! `corald`, `coralctl` and the WebSocket bridge share, so they cannot drift apart.
//!
//! Transport: JSON-RPC 2.0 over WebSocket framing on a Unix socket (plain HTTP POST works too).
//! Field names are snake_case; `coralctl --json` prints these same objects.

pub mod client;
pub mod errors;
pub mod paths;
pub mod scan;
pub mod types;

pub use errors::codes;
pub use scan::*;
pub use types::*;

use jsonrpsee::core::SubscriptionResult;
use jsonrpsee::proc_macros::rpc;
use jsonrpsee::types::ErrorObjectOwned;
use uuid::Uuid;

/// Result type of every RPC method.
pub type RpcResult<T> = Result<T, ErrorObjectOwned>;

/// The daemon's API. Method names are namespaced with a dot (`library.add`, `scan.start` …).
///
/// A new method goes in this trait and in [`METHODS`] (with its [`Access`]): the bridge serves
/// what the table lists, and a test keeps the two equal.
#[rpc(server, client)]
pub trait CoralApi {
    /// Daemon version, database, libraries and worker state.
    #[method(name = "daemon.status")]
    async fn daemon_status(&self) -> RpcResult<DaemonStatus>;

    /// Register a library root (an existing directory). Queues a `library_added` scan.
    #[method(name = "library.add")]
    async fn library_add(&self, path: String) -> RpcResult<Library>;

    /// Every library with its track count, failed-file count and last scan.
    #[method(name = "library.list")]
    async fn library_list(&self) -> RpcResult<Vec<Library>>;

    /// Forget a library and its tracks (files on disk are never touched).
    #[method(name = "library.remove")]
    async fn library_remove(&self, library: LibrarySelector) -> RpcResult<Library>;

    /// Queue a scan. `path` restricts it to a subdirectory (relative to the library root or an
    /// absolute path inside it); `full` re-reads every file instead of skipping unchanged ones.
    #[method(name = "scan.start")]
    async fn scan_start(
        &self,
        library: LibrarySelector,
        path: Option<String>,
        full: Option<bool>,
    ) -> RpcResult<ScanStarted>;

    /// Progress of one scan, active or finished.
    #[method(name = "scan.get")]
    async fn scan_get(&self, request_id: Uuid) -> RpcResult<ScanProgress>;

    /// Every scan that is queued or running (the reconnect snapshot).
    #[method(name = "scan.active")]
    async fn scan_active(&self) -> RpcResult<Vec<ScanProgress>>;

    /// Active scans first, then the most recent finished ones (`limit`, default 20).
    #[method(name = "scan.list")]
    async fn scan_list(&self, limit: Option<u32>) -> RpcResult<Vec<ScanProgress>>;

    /// Ask a queued or running scan to stop; returns its progress at the time of the request.
    #[method(name = "scan.cancel")]
    async fn scan_cancel(&self, request_id: Uuid) -> RpcResult<ScanProgress>;

    /// Live progress: first a snapshot of every matching active scan, then coalesced updates.
    #[subscription(name = "scan.subscribe" => "scan.progress", unsubscribe = "scan.unsubscribe", item = ScanProgress)]
    async fn scan_subscribe(&self, filter: Option<ScanFilter>) -> SubscriptionResult;

    /// One track by id.
    #[method(name = "track.get")]
    async fn track_get(&self, id: i64) -> RpcResult<Track>;

    /// Full-text search over title, artist, album, album artist and genre; accent- and
    /// case-insensitive, every word a prefix, best match first.
    #[method(name = "track.search")]
    async fn track_search(
        &self,
        query: String,
        limit: Option<u32>,
        offset: Option<u32>,
    ) -> RpcResult<Vec<Track>>;

    /// Tracks that sound most like this one, best first: centred cosine similarity of their
    /// embeddings (see `SimilarTrack::score`), with `options`' filters.
    #[method(name = "track.similar")]
    async fn track_similar(
        &self,
        track: TrackRef,
        limit: Option<u32>,
        options: Option<SimilarOptions>,
    ) -> RpcResult<Vec<SimilarTrack>>;

    /// A sonic path from `from` to `to`: `from` first, `to` last, at most `count` tracks
    /// (default 25), no repeats; each step lies near the straight line between the two in
    /// centred embedding space and is closer to `to` than the one before. `score` is each
    /// track's centred cosine to `to`, rising strictly along the path.
    #[method(name = "track.path")]
    async fn track_path(
        &self,
        from: TrackRef,
        to: TrackRef,
        count: Option<u32>,
        options: Option<SimilarOptions>,
    ) -> RpcResult<Vec<SimilarTrack>>;

    /// Up to `count` tracks (default 25) around up to 20 seeds (tracks, or an album or
    /// artist), no seeds and no repeats, diversified; `score` is each track's centred cosine
    /// to the seeds' centroid. `options.max_per_artist` caps artists.
    #[method(name = "track.mix")]
    async fn track_mix(
        &self,
        seeds: MixSeeds,
        count: Option<u32>,
        options: Option<SimilarOptions>,
    ) -> RpcResult<Vec<SimilarTrack>>;

    /// Find indexed tracks from what a media server knows of one (path, MusicBrainz recording
    /// id, ISRC, artist + title + duration): best match first, each with the rule it matched.
    #[method(name = "track.lookup")]
    async fn track_lookup(
        &self,
        query: TrackLookup,
        limit: Option<u32>,
    ) -> RpcResult<Vec<TrackMatch>>;
}

/// Who may call a method through the bridge (`coralctl bridge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads the daemon's state: open to every allowed client.
    Read,
    /// Changes the daemon's state: needs the bridge's token.
    Write,
}

/// How a method of [`CoralApi`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One call, one result.
    Call,
    /// A subscription: its notifications' method and the method that ends it.
    Subscription {
        notification: &'static str,
        unsubscribe: &'static str,
    },
}

/// One method of [`CoralApi`], as the bridge serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiMethod {
    /// The JSON-RPC method name.
    pub name: &'static str,
    pub access: Access,
    pub kind: Kind,
}

impl ApiMethod {
    const fn read(name: &'static str) -> ApiMethod {
        ApiMethod {
            name,
            access: Access::Read,
            kind: Kind::Call,
        }
    }

    const fn write(name: &'static str) -> ApiMethod {
        ApiMethod {
            name,
            access: Access::Write,
            kind: Kind::Call,
        }
    }
}

/// Every method of [`CoralApi`], in the trait's order. A new method goes in the trait and in
/// this table.
pub const METHODS: &[ApiMethod] = &[
    ApiMethod::read("daemon.status"),
    ApiMethod::write("library.add"),
    ApiMethod::read("library.list"),
    ApiMethod::write("library.remove"),
    ApiMethod::write("scan.start"),
    ApiMethod::read("scan.get"),
    ApiMethod::read("scan.active"),
    ApiMethod::read("scan.list"),
    ApiMethod::write("scan.cancel"),
    ApiMethod {
        name: "scan.subscribe",
        access: Access::Read,
        kind: Kind::Subscription {
            notification: "scan.progress",
            unsubscribe: "scan.unsubscribe",
        },
    },
    ApiMethod::read("track.get"),
    ApiMethod::read("track.search"),
    ApiMethod::read("track.similar"),
    ApiMethod::read("track.path"),
    ApiMethod::read("track.mix"),
    ApiMethod::read("track.lookup"),
];

/// The method names a server of [`CoralApi`] registers: every entry of [`METHODS`] and the
/// unsubscribe method of each subscription.
pub fn registered_names() -> impl Iterator<Item = &'static str> {
    METHODS.iter().flat_map(|m| {
        let unsubscribe = match m.kind {
            Kind::Call => None,
            Kind::Subscription { unsubscribe, .. } => Some(unsubscribe),
        };
        std::iter::once(m.name).chain(unsubscribe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_method_table_names_each_method_once() {
        let mut names: Vec<&str> = registered_names().collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "{names:?}");
    }

    #[test]
    fn only_the_methods_that_change_state_need_the_token() {
        let writes: Vec<&str> = METHODS
            .iter()
            .filter(|m| m.access == Access::Write)
            .map(|m| m.name)
            .collect();
        assert_eq!(
            writes,
            ["library.add", "library.remove", "scan.start", "scan.cancel"]
        );
    }
}
