//! The `coral-proto` API served over any [`ApiService`]: each method runs the parameter checks
//! that need no database ([`params`]) in the order a client sees their errors, then hands the
//! checked values to the service, whose errors are already mapped to JSON-RPC codes. This is the
//! one place in corald that restates the trait's signatures; the daemon's service is
//! [`RpcContext`](super::service::RpcContext), the fuzz decoder's one that stops at the checks.

use std::path::Path;
use std::sync::Arc;

use coral_proto::{
    CoralApiServer, DaemonStatus, Library, LibrarySelector, MixSeeds, RpcResult, ScanFilter,
    ScanMode, ScanProgress, ScanStarted, SimilarOptions, SimilarTrack, Track, TrackLookup,
    TrackMatch, TrackRef,
};
use jsonrpsee::PendingSubscriptionSink;
use jsonrpsee::core::{SubscriptionResult, async_trait};
use uuid::Uuid;

use super::params::{self, Search};
use super::service::RpcContext;
use crate::lookup::{LookupQuery, Seeds, TrackWanted};
use crate::similarity::SimilarFilter;

/// `scan.start`'s parameters once checked; the subdirectory is resolved by the service, against
/// the library's root (see [`params::clean_subdir`]).
#[derive(Debug, Clone)]
pub struct ScanStart {
    pub library: LibrarySelector,
    pub path: Option<String>,
    pub mode: ScanMode,
}

/// `track.similar`'s parameters once checked.
#[derive(Debug, Clone)]
pub struct Similar {
    pub track: TrackWanted,
    pub limit: u32,
    pub filter: SimilarFilter,
}

/// `track.path`'s parameters once checked.
#[derive(Debug, Clone)]
pub struct SonicPath {
    pub from: TrackWanted,
    pub to: TrackWanted,
    pub count: u32,
    pub filter: SimilarFilter,
}

/// `track.mix`'s parameters once checked.
#[derive(Debug, Clone)]
pub struct Mix {
    pub seeds: Seeds,
    pub count: u32,
    pub filter: SimilarFilter,
}

/// What serves the API once the parameters passed the checks that need no database: one
/// method per method of `CoralApi`, taking the checked values and answering the wire types,
/// every failure already a JSON-RPC error with its code.
#[async_trait]
pub trait ApiService: Send + Sync + 'static {
    async fn daemon_status(&self) -> RpcResult<DaemonStatus>;
    async fn library_add(&self, path: &Path) -> RpcResult<Library>;
    async fn library_list(&self) -> RpcResult<Vec<Library>>;
    async fn library_remove(&self, library: LibrarySelector) -> RpcResult<Library>;
    async fn scan_start(&self, scan: ScanStart) -> RpcResult<ScanStarted>;
    async fn scan_get(&self, request_id: Uuid) -> RpcResult<ScanProgress>;
    async fn scan_active(&self) -> RpcResult<Vec<ScanProgress>>;
    async fn scan_list(&self, limit: i64) -> RpcResult<Vec<ScanProgress>>;
    async fn scan_cancel(&self, request_id: Uuid) -> RpcResult<ScanProgress>;
    /// Accepts (or rejects) the subscription and sends its notifications until it ends.
    async fn scan_subscribe(
        &self,
        sink: PendingSubscriptionSink,
        filter: ScanFilter,
    ) -> SubscriptionResult;
    async fn track_get(&self, id: i64) -> RpcResult<Track>;
    async fn track_search(&self, search: Search) -> RpcResult<Vec<Track>>;
    async fn track_similar(&self, q: Similar) -> RpcResult<Vec<SimilarTrack>>;
    async fn track_path(&self, q: SonicPath) -> RpcResult<Vec<SimilarTrack>>;
    async fn track_mix(&self, q: Mix) -> RpcResult<Vec<SimilarTrack>>;
    async fn track_lookup(&self, query: LookupQuery, limit: i64) -> RpcResult<Vec<TrackMatch>>;
}

/// The API object registered with the server: `CoralApi` over a service (the daemon's by
/// default).
pub struct CoralRpc<S = RpcContext>(pub Arc<S>);

impl<S> Clone for CoralRpc<S> {
    fn clone(&self) -> Self {
        CoralRpc(Arc::clone(&self.0))
    }
}

#[async_trait]
impl<S: ApiService> CoralApiServer for CoralRpc<S> {
    async fn daemon_status(&self) -> RpcResult<DaemonStatus> {
        self.0.daemon_status().await
    }

    async fn library_add(&self, path: String) -> RpcResult<Library> {
        self.0.library_add(params::library_path(&path)?).await
    }

    async fn library_list(&self) -> RpcResult<Vec<Library>> {
        self.0.library_list().await
    }

    async fn library_remove(&self, library: LibrarySelector) -> RpcResult<Library> {
        self.0.library_remove(library).await
    }

    async fn scan_start(
        &self,
        library: LibrarySelector,
        path: Option<String>,
        full: Option<bool>,
    ) -> RpcResult<ScanStarted> {
        let mode = params::scan_mode(full);
        let scan = ScanStart {
            library,
            path,
            mode,
        };
        self.0.scan_start(scan).await
    }

    async fn scan_get(&self, request_id: Uuid) -> RpcResult<ScanProgress> {
        self.0.scan_get(request_id).await
    }

    async fn scan_active(&self) -> RpcResult<Vec<ScanProgress>> {
        self.0.scan_active().await
    }

    async fn scan_list(&self, limit: Option<u32>) -> RpcResult<Vec<ScanProgress>> {
        self.0.scan_list(params::list_limit(limit)).await
    }

    async fn scan_cancel(&self, request_id: Uuid) -> RpcResult<ScanProgress> {
        self.0.scan_cancel(request_id).await
    }

    async fn scan_subscribe(
        &self,
        pending: PendingSubscriptionSink,
        filter: Option<ScanFilter>,
    ) -> SubscriptionResult {
        self.0
            .scan_subscribe(pending, filter.unwrap_or_default())
            .await
    }

    async fn track_get(&self, id: i64) -> RpcResult<Track> {
        self.0.track_get(id).await
    }

    async fn track_search(
        &self,
        query: String,
        limit: Option<u32>,
        offset: Option<u32>,
    ) -> RpcResult<Vec<Track>> {
        self.0
            .track_search(params::search(&query, limit, offset)?)
            .await
    }

    async fn track_similar(
        &self,
        track: TrackRef,
        limit: Option<u32>,
        options: Option<SimilarOptions>,
    ) -> RpcResult<Vec<SimilarTrack>> {
        let track = params::track_ref(&track)?;
        let filter = params::similar_options(options)?;
        let limit = params::similar_limit(limit);
        let q = Similar {
            track,
            limit,
            filter,
        };
        self.0.track_similar(q).await
    }

    async fn track_path(
        &self,
        from: TrackRef,
        to: TrackRef,
        count: Option<u32>,
        options: Option<SimilarOptions>,
    ) -> RpcResult<Vec<SimilarTrack>> {
        let (from, to) = (params::track_ref(&from)?, params::track_ref(&to)?);
        let filter = params::similar_options(options)?;
        let count = params::path_count(count);
        let q = SonicPath {
            from,
            to,
            count,
            filter,
        };
        self.0.track_path(q).await
    }

    async fn track_mix(
        &self,
        seeds: MixSeeds,
        count: Option<u32>,
        options: Option<SimilarOptions>,
    ) -> RpcResult<Vec<SimilarTrack>> {
        let seeds = params::mix_seeds(&seeds)?;
        let filter = params::similar_options(options)?;
        let count = params::mix_count(count);
        let q = Mix {
            seeds,
            count,
            filter,
        };
        self.0.track_mix(q).await
    }

    async fn track_lookup(
        &self,
        query: TrackLookup,
        limit: Option<u32>,
    ) -> RpcResult<Vec<TrackMatch>> {
        let query = params::lookup_query(&query)?;
        self.0.track_lookup(query, params::list_limit(limit)).await
    }
}
