//! The API the bridge serves on each browser connection: every method of corald's `CoralApi`
//! that `coral_proto::METHODS` lists, forwarded upstream as raw JSON-RPC (the caller's params
//! as they are, corald's result or error as it is), the token check on the methods that change
//! the daemon's state, and the bridge's additions (`bridge.info`, and the `bridge.subscribe`
//! subscription whose notifications are `bridge.status`).
//!
//! `scan.subscribe` is served from the bridge's cache and broadcast (one upstream subscription
//! for all browsers); each browser subscription keeps at most one pending update per scan, so a
//! client that reads slowly skips intermediate states instead of building a backlog.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use coral_proto::{Access, ApiMethod, Kind, METHODS, RpcResult, ScanFilter, errors::error};
use jsonrpsee::core::client::{ClientT, Error as ClientError};
use jsonrpsee::core::traits::ToRpcParams;
use jsonrpsee::core::{SubscriptionResult, async_trait};
use jsonrpsee::proc_macros::rpc;
use jsonrpsee::types::{ErrorObjectOwned, Params};
use jsonrpsee::{PendingSubscriptionSink, RpcModule, SubscriptionMessage, SubscriptionSink};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{Notify, broadcast};
use uuid::Uuid;

use super::upstream::{Update, Upstream};

/// Error codes the bridge adds to corald's (`coral_proto::codes`); same positive range, never
/// reused.
pub mod bridge_codes {
    /// The method changes the daemon's state and the connection carries no valid token.
    pub const UNAUTHORIZED: i32 = 1100;
    /// corald cannot be reached right now; the bridge is reconnecting.
    pub const DAEMON_UNAVAILABLE: i32 = 1101;
}

/// Returned by `bridge.info`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BridgeInfo {
    /// coralctl's version.
    pub version: String,
    /// True while the bridge holds a working connection to corald.
    pub connected: bool,
    /// True when the bridge was started with a token (mutating methods can be unlocked).
    pub token_configured: bool,
    /// True when this connection presented the right token.
    pub authorized: bool,
    /// The methods that need the token.
    pub mutating_methods: Vec<String>,
}

/// What the bridge adds to corald's API.
#[rpc(server)]
pub trait BridgeApi {
    /// The bridge's version, its connection to corald and this connection's rights.
    #[method(name = "bridge.info")]
    async fn bridge_info(&self) -> RpcResult<BridgeInfo>;

    /// The state of the connection to corald: first the current state, then every change.
    #[subscription(name = "bridge.subscribe" => "bridge.status", unsubscribe = "bridge.unsubscribe", item = super::upstream::BridgeStatus)]
    async fn bridge_subscribe(&self) -> SubscriptionResult;
}

/// One browser connection's view of the API.
#[derive(Clone)]
pub struct Proxy {
    upstream: Arc<Upstream>,
    token_configured: bool,
    authorized: bool,
}

/// Why the bridge could not build its API.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error(transparent)]
    Register(#[from] jsonrpsee::core::RegisterMethodError),
    #[error("the bridge does not serve the subscription {0}")]
    UnservedSubscription(&'static str),
}

/// Every method the bridge serves, for one connection.
pub fn module(
    upstream: Arc<Upstream>,
    token_configured: bool,
    authorized: bool,
) -> Result<RpcModule<Proxy>, ModuleError> {
    let proxy = Proxy {
        upstream,
        token_configured,
        authorized,
    };
    let mut module = RpcModule::new(proxy.clone());
    for method in METHODS {
        match method.kind {
            Kind::Call => {
                module.register_async_method(method.name, move |params, proxy, _| async move {
                    proxy.forward(method, params).await
                })?;
            }
            Kind::Subscription {
                notification,
                unsubscribe,
            } if method.name == "scan.subscribe" => {
                module.register_subscription(
                    method.name,
                    notification,
                    unsubscribe,
                    |params, pending, proxy, _| async move {
                        proxy.scan_subscribe(params, pending).await
                    },
                )?;
            }
            Kind::Subscription { .. } => {
                return Err(ModuleError::UnservedSubscription(method.name));
            }
        }
    }
    module.merge(BridgeApiServer::into_rpc(proxy))?;
    Ok(module)
}

/// The methods that need the token.
fn write_methods() -> impl Iterator<Item = &'static str> {
    METHODS
        .iter()
        .filter(|m| m.access == Access::Write)
        .map(|m| m.name)
}

fn upstream_error(e: ClientError) -> ErrorObjectOwned {
    match e {
        // corald answered: pass its error through unchanged.
        ClientError::Call(obj) => obj,
        ClientError::RequestTimeout => error(
            bridge_codes::DAEMON_UNAVAILABLE,
            "corald did not answer in time",
        ),
        e => error(
            bridge_codes::DAEMON_UNAVAILABLE,
            format!("corald is not reachable ({e}); the bridge keeps trying to reconnect"),
        ),
    }
}

/// A call's params exactly as the caller sent them (an array, an object or none), for corald.
struct RawParams(Option<Box<RawValue>>);

impl RawParams {
    fn of(params: &Params<'_>) -> RpcResult<RawParams> {
        params
            .as_str()
            .map(|json| RawValue::from_string(json.to_owned()))
            .transpose()
            .map(RawParams)
            .map_err(|e| {
                ErrorObjectOwned::owned(
                    jsonrpsee::types::error::INVALID_PARAMS_CODE,
                    format!("params are not JSON: {e}"),
                    None::<()>,
                )
            })
    }
}

impl ToRpcParams for RawParams {
    fn to_rpc_params(self) -> Result<Option<Box<RawValue>>, serde_json::Error> {
        Ok(self.0)
    }
}

impl Proxy {
    fn require_token(&self, method: &str) -> RpcResult<()> {
        if self.authorized {
            return Ok(());
        }
        let message = if self.token_configured {
            format!(
                "{method} changes the daemon's state and needs the bridge's token: connect with ?token=TOKEN or the WebSocket subprotocol coral.token.TOKEN (on POST /rpc: Authorization: Bearer TOKEN)"
            )
        } else {
            format!(
                "{method} changes the daemon's state and this bridge is read-only: restart it with --token (or CORAL_BRIDGE_TOKEN) to allow it"
            )
        };
        Err(error(bridge_codes::UNAUTHORIZED, message))
    }

    /// Forward one call over the current upstream connection: the token check for a write,
    /// then the params as they are to corald and its result or error back as they are.
    async fn forward(&self, method: &ApiMethod, params: Params<'_>) -> RpcResult<Box<RawValue>> {
        if method.access == Access::Write {
            self.require_token(method.name)?;
        }
        let params = RawParams::of(&params)?;
        let client = self
            .upstream
            .client()
            .map_err(|e| error(bridge_codes::DAEMON_UNAVAILABLE, e.to_string()))?;
        client
            .request(method.name, params)
            .await
            .map_err(upstream_error)
    }

    /// `scan.subscribe`, served from the bridge's cache. The params are decoded as corald
    /// decodes them: `[filter]`, `{"filter": …}` or none.
    async fn scan_subscribe(
        &self,
        params: Params<'_>,
        pending: PendingSubscriptionSink,
    ) -> SubscriptionResult {
        let filter = if params.is_object() {
            #[derive(Deserialize)]
            struct Named {
                filter: Option<ScanFilter>,
            }
            params.parse::<Named>().map(|n| n.filter)
        } else {
            params.sequence().optional_next::<ScanFilter>()
        };
        let filter = match filter {
            Ok(f) => f.unwrap_or_default(),
            Err(e) => {
                pending.reject(e).await;
                return Ok(());
            }
        };
        let sink = pending.accept().await?;
        pump_progress(sink, &self.upstream, filter).await
    }
}

#[async_trait]
impl BridgeApiServer for Proxy {
    async fn bridge_info(&self) -> RpcResult<BridgeInfo> {
        Ok(BridgeInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            connected: self.upstream.status().borrow().connected,
            token_configured: self.token_configured,
            authorized: self.authorized,
            mutating_methods: write_methods().map(str::to_owned).collect(),
        })
    }

    async fn bridge_subscribe(&self, pending: PendingSubscriptionSink) -> SubscriptionResult {
        let sink = pending.accept().await?;
        let mut rx = self.upstream.status();
        loop {
            let status = rx.borrow_and_update().clone();
            sink.send(SubscriptionMessage::from(serde_json::value::to_raw_value(
                &status,
            )?))
            .await?;
            tokio::select! {
                _ = sink.closed() => return Ok(()),
                changed = rx.changed() => if changed.is_err() { return Ok(()) },
            }
        }
    }
}

/// The updates one subscription still has to send: at most one per scan, the latest.
#[derive(Debug, Default)]
pub struct Pending {
    waiting: HashMap<Uuid, Update>,
    /// Sequence number of the last state sent per scan (stale copies are dropped).
    sent: HashMap<Uuid, u64>,
}

/// Forget what was sent once this many scans were seen (only memory; a stale copy arriving
/// after that is still ordered by the daemon's own coalescing).
const MAX_REMEMBERED: usize = 4096;

impl Pending {
    /// Queue `u` unless an equal or newer state of the same scan is queued or was sent.
    pub fn offer(&mut self, u: Update) {
        let id = u.progress.scan.request_id;
        if self.sent.get(&id).is_some_and(|s| *s >= u.seq)
            || self.waiting.get(&id).is_some_and(|w| w.seq >= u.seq)
        {
            return;
        }
        self.waiting.insert(id, u);
    }

    /// The oldest queued update, marked as sent.
    pub fn take(&mut self) -> Option<Update> {
        let id = self
            .waiting
            .values()
            .min_by_key(|u| u.seq)
            .map(|u| u.progress.scan.request_id)?;
        let u = self.waiting.remove(&id)?;
        if self.sent.len() >= MAX_REMEMBERED {
            self.sent.clear();
        }
        self.sent.insert(id, u.seq);
        Some(u)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.waiting.len()
    }
}

/// Send queued updates as fast as the client reads them.
async fn send_pending(
    sink: &SubscriptionSink,
    pending: &Mutex<Pending>,
    wake: &Notify,
) -> SubscriptionResult {
    loop {
        let next = pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match next {
            Some(u) => {
                let msg = serde_json::value::to_raw_value(&*u.progress)?;
                // Waits while the connection's bounded buffer is full; meanwhile newer states
                // replace older ones in `pending`.
                sink.send(SubscriptionMessage::from(msg)).await?;
            }
            None => wake.notified().await,
        }
    }
}

/// Serve one `scan.subscribe`: the snapshot of matching active scans, then every change, with
/// updates of the same scan coalesced while the client is not reading.
async fn pump_progress(
    sink: SubscriptionSink,
    upstream: &Upstream,
    filter: ScanFilter,
) -> SubscriptionResult {
    let pending = Mutex::new(Pending::default());
    let wake = Notify::new();
    let offer = |u: Update| {
        if filter.matches(&u.progress) {
            pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .offer(u);
            wake.notify_one();
        }
    };
    // Subscribe before reading the snapshot so nothing falls between the two.
    let mut rx = upstream.subscribe_updates();
    let mut last_seq = 0;
    for u in upstream.snapshot(None) {
        last_seq = last_seq.max(u.seq);
        offer(u);
    }
    let collect = async {
        loop {
            match rx.recv().await {
                Ok(u) => {
                    last_seq = last_seq.max(u.seq);
                    offer(u);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    for u in upstream.snapshot(Some(last_seq)) {
                        last_seq = last_seq.max(u.seq);
                        offer(u);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    };
    let send = send_pending(&sink, &pending, &wake);
    tokio::select! {
        () = collect => Ok(()),
        r = send => r,
        () = sink.closed() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use coral_proto::ScanPhase;

    fn update(seq: u64, id: Uuid, indexed: u64) -> Update {
        let mut p = super::super::upstream::tests::progress(id, ScanPhase::Indexing, indexed);
        p.counts.tracks_indexed = indexed;
        Update {
            seq,
            progress: Arc::new(p),
        }
    }

    #[test]
    fn pending_keeps_one_latest_state_per_scan_in_order() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut p = Pending::default();
        for seq in 1..=1000 {
            p.offer(update(seq, a, seq));
        }
        p.offer(update(1001, b, 1));
        p.offer(update(500, a, 500)); // stale
        assert_eq!(p.len(), 2, "a slow reader holds one state per scan");
        let first = p.take().map(|u| (u.seq, u.progress.counts.tracks_indexed));
        assert_eq!(first, Some((1000, 1000)));
        assert_eq!(p.take().map(|u| u.seq), Some(1001));
        assert!(p.take().is_none());
        p.offer(update(999, a, 999)); // older than what was sent
        assert!(p.take().is_none());
        p.offer(update(1002, a, 1002));
        assert_eq!(p.take().map(|u| u.seq), Some(1002));
    }

    #[test]
    fn mutating_methods_need_the_token_with_a_clear_message() {
        let up = Upstream::new(std::path::PathBuf::from("/nonexistent"));
        let open = Proxy {
            upstream: Arc::clone(&up),
            token_configured: true,
            authorized: false,
        };
        let err = open.require_token("scan.start").err();
        assert_eq!(
            err.as_ref().map(|e| e.code()),
            Some(bridge_codes::UNAUTHORIZED)
        );
        assert!(err.is_some_and(|e| e.message().contains("needs the bridge's token")));
        let ro = Proxy {
            upstream: Arc::clone(&up),
            token_configured: false,
            authorized: false,
        };
        assert!(
            ro.require_token("library.add")
                .err()
                .is_some_and(|e| e.message().contains("read-only"))
        );
        let ok = Proxy {
            upstream: up,
            token_configured: true,
            authorized: true,
        };
        assert!(ok.require_token("scan.cancel").is_ok());
    }

    #[test]
    fn every_method_is_served() {
        let up = Upstream::new(std::path::PathBuf::from("/nonexistent"));
        let m = module(up, false, false).map_err(|e| e.to_string());
        let names: Vec<String> = m
            .map(|m| m.method_names().map(str::to_owned).collect())
            .unwrap_or_default();
        let bridge = ["bridge.info", "bridge.subscribe", "bridge.unsubscribe"];
        for name in coral_proto::registered_names().chain(bridge) {
            assert!(
                names.iter().any(|n| n == name),
                "{name} missing from {names:?}"
            );
        }
    }

    /// The error code of one call to a fresh module whose upstream is down.
    async fn code_of(authorized: bool, request: &str) -> Option<i64> {
        let up = Upstream::new(std::path::PathBuf::from("/nonexistent"));
        let m = module(up, true, authorized).ok()?;
        let (answer, _) = m.raw_json_request(request, 1).await.ok()?;
        let v: serde_json::Value = serde_json::from_str(answer.get()).ok()?;
        v["error"]["code"].as_i64()
    }

    #[tokio::test]
    async fn writes_check_the_token_before_reaching_corald() {
        let add = r#"{"jsonrpc":"2.0","id":1,"method":"library.add","params":["/srv/music"]}"#;
        let get = r#"{"jsonrpc":"2.0","id":1,"method":"track.get","params":{"id":1}}"#;
        let unauthorized = i64::from(bridge_codes::UNAUTHORIZED);
        let unavailable = i64::from(bridge_codes::DAEMON_UNAVAILABLE);
        assert_eq!(code_of(false, add).await, Some(unauthorized));
        assert_eq!(code_of(true, add).await, Some(unavailable));
        assert_eq!(code_of(false, get).await, Some(unavailable));
    }

    #[tokio::test]
    async fn a_bad_scan_filter_is_refused_like_corald_refuses_it() {
        let bad = r#"{"jsonrpc":"2.0","id":1,"method":"scan.subscribe","params":[{"library_id":"seven"}]}"#;
        assert_eq!(code_of(false, bad).await, Some(-32602));
    }
}
