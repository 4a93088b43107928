//! The bridge's HTTP side: a TCP listener, routing (`/` and its assets, `/ws`, `/rpc`), the
//! `Origin` allow-list, the token (query parameter, WebSocket subprotocol or, on `/rpc`, an
//! `Authorization: Bearer` header; compared in constant time) and the hand-over of accepted
//! WebSocket handshakes and HTTP `POST /rpc` calls to jsonrpsee, with the same methods.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use jsonrpsee::server::{
    HttpBody, PingConfig, ServerConfig, ServerHandle, StopHandle, TowerServiceBuilder, stop_channel,
};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tower::Service;
use tower::layer::util::Identity;

use super::Config;
use super::rpc;
use super::upstream::Upstream;

/// The subprotocol the bridge speaks; browsers that offer it get it back in the handshake.
pub const SUBPROTOCOL: &str = "coral.jsonrpc";
/// Prefix of the subprotocol entry that carries the token (`coral.token.<TOKEN>`).
pub const TOKEN_SUBPROTOCOL_PREFIX: &str = "coral.token.";

/// Largest JSON-RPC message accepted from a browser.
const MAX_MESSAGE_BYTES: u32 = 1024 * 1024;
/// Messages queued per connection before sends wait (subscriptions coalesce meanwhile).
const CONNECTION_BUFFER: u32 = 32;
const MAX_CONNECTIONS: u32 = 256;

const INDEX_HTML: &str = include_str!("page/index.html");
const APP_JS: &str = include_str!("page/app.js");
const STYLE_CSS: &str = include_str!("page/style.css");
const FAVICON_SVG: &str = include_str!("page/favicon.svg");

/// Everything a request handler needs.
struct Ctx {
    origins: Vec<String>,
    token: Option<String>,
    /// Every method (reads too) needs the token.
    token_for_reads: bool,
    upstream: Arc<Upstream>,
    rpc: TowerServiceBuilder<Identity, Identity>,
    /// The same API as plain HTTP (`POST /rpc`).
    http_rpc: TowerServiceBuilder<Identity, Identity>,
    stop: StopHandle,
    /// Keeps `stop` from firing while the server runs.
    _handle: ServerHandle,
}

/// A bound, not yet serving, bridge.
pub struct Server {
    listener: TcpListener,
    ctx: Arc<Ctx>,
}

/// The origin of an http(s) URL as browsers send it in `Origin` (lower-case host, default port
/// left out), or None for anything else (other schemes, paths, credentials).
pub fn normalize_origin(s: &str) -> Option<String> {
    let url = url::Url::parse(s.trim()).ok()?;
    let ok = matches!(url.scheme(), "http" | "https")
        && url.host().is_some()
        && url.username().is_empty()
        && url.password().is_none()
        && url.path() == "/"
        && url.query().is_none()
        && url.fragment().is_none();
    ok.then(|| url.origin().ascii_serialization())
}

/// The bridge's own origins: what the page is loaded from.
fn own_origins(addr: SocketAddr) -> Vec<String> {
    let mut out: Vec<String> = normalize_origin(&format!("http://{addr}"))
        .into_iter()
        .collect();
    if addr.ip().is_loopback() {
        out.extend(normalize_origin(&format!(
            "http://localhost:{}",
            addr.port()
        )));
    }
    out
}

/// Constant-time comparison (the length may leak, the content does not).
fn token_matches(expected: &str, presented: &str) -> bool {
    bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}

/// Every entry of every `Sec-WebSocket-Protocol` header.
fn offered_subprotocols(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Tokens presented by a handshake: `?token=` and `coral.token.<TOKEN>` subprotocol entries.
fn presented_tokens<B>(req: &Request<B>, offered: &[String]) -> Vec<String> {
    let mut out: Vec<String> = req
        .uri()
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.extend(
        offered
            .iter()
            .filter_map(|p| p.strip_prefix(TOKEN_SUBPROTOCOL_PREFIX))
            .map(str::to_owned),
    );
    out
}

/// A response of `status` with `body` and these headers.
fn respond(
    status: StatusCode,
    body: HttpBody,
    headers: &[(header::HeaderName, &'static str)],
) -> Response<HttpBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let h = r.headers_mut();
    for (name, value) in headers {
        h.insert(name.clone(), HeaderValue::from_static(value));
    }
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<HttpBody> {
    respond(
        status,
        HttpBody::from(body.into()),
        &[(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response<HttpBody> {
    respond(
        StatusCode::OK,
        HttpBody::from(body),
        &[
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The page's URL may carry the token: never send it on.
            (header::REFERRER_POLICY, "no-referrer"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; connect-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
    )
}

impl Server {
    /// Bind the listener and prepare the JSON-RPC service.
    pub async fn bind(config: &Config, upstream: Arc<Upstream>) -> std::io::Result<Server> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let mut origins = own_origins(addr);
        for o in &config.extra_origins {
            if !origins.contains(o) {
                origins.push(o.clone());
            }
        }
        let server_config = ServerConfig::builder()
            .ws_only()
            .max_request_body_size(MAX_MESSAGE_BYTES)
            .max_response_body_size(16 * MAX_MESSAGE_BYTES)
            .max_subscriptions_per_connection(16)
            .set_message_buffer_capacity(CONNECTION_BUFFER)
            .enable_ws_ping(
                PingConfig::new()
                    .ping_interval(Duration::from_secs(15))
                    .inactive_limit(Duration::from_secs(60)),
            )
            .build();
        let rpc = jsonrpsee::server::Server::builder()
            .set_config(server_config)
            .to_service_builder()
            .max_connections(MAX_CONNECTIONS);
        let http_config = ServerConfig::builder()
            .http_only()
            .max_request_body_size(MAX_MESSAGE_BYTES)
            .max_response_body_size(16 * MAX_MESSAGE_BYTES)
            .build();
        let http_rpc = jsonrpsee::server::Server::builder()
            .set_config(http_config)
            .to_service_builder()
            .max_connections(MAX_CONNECTIONS);
        let (stop, handle) = stop_channel();
        Ok(Server {
            listener,
            ctx: Arc::new(Ctx {
                origins,
                token: config.token.clone(),
                token_for_reads: config.token_required_for_reads,
                upstream,
                rpc,
                http_rpc,
                stop,
                _handle: handle,
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Accept connections forever.
    pub async fn serve(self) {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    eprintln!("coralctl bridge: accept failed: {e}");
                    // Out of file descriptors and similar: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let ctx = Arc::clone(&self.ctx);
            let svc = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
                let ctx = Arc::clone(&ctx);
                async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
            });
            tokio::spawn(async move {
                // Errors here are a client's broken connection: nothing to report.
                let _ = jsonrpsee::server::serve(stream, svc).await;
            });
        }
    }
}

/// Route one HTTP request.
async fn handle(ctx: &Ctx, req: Request<hyper::body::Incoming>) -> Response<HttpBody> {
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    match req.uri().path() {
        "/ws" => websocket(ctx, req).await,
        "/rpc" if req.method() == Method::POST => http_rpc(ctx, req).await,
        "/rpc" => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "/rpc takes JSON-RPC 2.0 requests by POST (content-type: application/json)\n",
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            r
        }
        "/" | "/index.html" if get => asset("text/html; charset=utf-8", INDEX_HTML),
        "/app.js" if get => asset("text/javascript; charset=utf-8", APP_JS),
        "/style.css" if get => asset("text/css; charset=utf-8", STYLE_CSS),
        "/favicon.svg" | "/favicon.ico" if get => asset("image/svg+xml", FAVICON_SVG),
        "/" | "/index.html" | "/app.js" | "/style.css" | "/favicon.svg" | "/favicon.ico" => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Browsers always send Origin on WebSocket handshakes and cross-origin POSTs; other programs
/// (coralctl, scripts, media-server plugins) may not, and cannot be driven by a web page, so a
/// missing Origin is accepted. A present one must be allowed: otherwise the 403 response.
fn refused_origin<B>(ctx: &Ctx, req: &Request<B>) -> Option<Response<HttpBody>> {
    let origin = req.headers().get(header::ORIGIN)?;
    let normalized = origin.to_str().ok().and_then(normalize_origin);
    if normalized.is_some_and(|o| ctx.origins.contains(&o)) {
        return None;
    }
    let shown = origin.to_str().unwrap_or("(unreadable)");
    Some(text(
        StatusCode::FORBIDDEN,
        format!(
            "origin {shown} is not allowed; allowed: {} (add one with --allow-origin)\n",
            ctx.origins.join(", ")
        ),
    ))
}

/// Whether one of `presented` is the token.
fn authorized(ctx: &Ctx, presented: &[String]) -> bool {
    ctx.token.as_deref().is_some_and(|expected| {
        presented
            .iter()
            .fold(false, |ok, t| ok | token_matches(expected, t))
    })
}

/// The tokens of `Authorization: Bearer <TOKEN>` headers.
fn bearer_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        })
        .collect()
}

/// The refusal of a request without the token when every method needs it: HTTP 401 with a
/// JSON-RPC error object (code `UNAUTHORIZED`) as the body.
fn token_required() -> Response<HttpBody> {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {
            "code": rpc::bridge_codes::UNAUTHORIZED,
            "message": "this bridge needs its token for every method: send \
                        `Authorization: Bearer TOKEN` (or ?token=TOKEN)",
        },
    });
    respond(
        StatusCode::UNAUTHORIZED,
        HttpBody::from(body.to_string()),
        &[
            (header::CONTENT_TYPE, "application/json"),
            (header::WWW_AUTHENTICATE, "Bearer realm=\"coral\""),
        ],
    )
}

/// The forwarded API for one connection or request, or the 500 answer saying why not.
fn methods(
    ctx: &Ctx,
    authorized: bool,
) -> Result<jsonrpsee::RpcModule<rpc::Proxy>, Box<Response<HttpBody>>> {
    rpc::module(Arc::clone(&ctx.upstream), ctx.token.is_some(), authorized).map_err(|e| {
        Box::new(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot build the API: {e}\n"),
        ))
    })
}

/// One JSON-RPC request (or batch) over plain HTTP: the same methods, errors and token rules
/// as `/ws`, the token also taken from `Authorization: Bearer`.
async fn http_rpc(ctx: &Ctx, req: Request<hyper::body::Incoming>) -> Response<HttpBody> {
    if let Some(refused) = refused_origin(ctx, &req) {
        return refused;
    }
    let mut presented = presented_tokens(&req, &[]);
    presented.extend(bearer_tokens(req.headers()));
    let authorized = authorized(ctx, &presented);
    if ctx.token_for_reads && !authorized {
        return token_required();
    }
    let methods = match methods(ctx, authorized) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let mut svc = ctx.http_rpc.clone().build(methods, ctx.stop.clone());
    match svc.call(req).await {
        Ok(r) => r,
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// Check a WebSocket handshake and hand it to jsonrpsee.
async fn websocket(ctx: &Ctx, req: Request<hyper::body::Incoming>) -> Response<HttpBody> {
    if !jsonrpsee::server::ws::is_upgrade_request(&req) {
        let mut r = text(
            StatusCode::UPGRADE_REQUIRED,
            "/ws speaks JSON-RPC 2.0 over WebSocket (plain HTTP: POST /rpc)\n",
        );
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return r;
    }
    if let Some(refused) = refused_origin(ctx, &req) {
        return refused;
    }
    let offered = offered_subprotocols(req.headers());
    let authorized = authorized(ctx, &presented_tokens(&req, &offered));
    if ctx.token_for_reads && !authorized {
        return token_required();
    }
    let methods = match methods(ctx, authorized) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let mut svc = ctx.rpc.clone().build(methods, ctx.stop.clone());
    let mut resp = match svc.call(req).await {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // A malformed handshake (no key, wrong version): jsonrpsee explains it in the body.
        if resp.status().is_success() {
            *resp.status_mut() = StatusCode::BAD_REQUEST;
        }
        return resp;
    }
    if offered.iter().any(|p| p == SUBPROTOCOL) {
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_normalise_like_browsers_send_them() {
        assert_eq!(
            normalize_origin("http://LOCALHOST:7700/").as_deref(),
            Some("http://localhost:7700")
        );
        assert_eq!(
            normalize_origin("https://coral.example:443").as_deref(),
            Some("https://coral.example")
        );
        assert_eq!(
            normalize_origin("http://[::1]:7700").as_deref(),
            Some("http://[::1]:7700")
        );
        for bad in [
            "null",
            "file:///tmp/x.html",
            "http://a.example/path",
            "http://u:p@a.example",
            "ws://localhost:7700",
            "",
        ] {
            assert_eq!(normalize_origin(bad), None, "{bad}");
        }
        let own = own_origins(SocketAddr::from(([127, 0, 0, 1], 7700)));
        assert_eq!(own, vec!["http://127.0.0.1:7700", "http://localhost:7700"]);
    }

    #[test]
    fn tokens_come_from_the_query_or_the_subprotocol() {
        let req = Request::builder()
            .uri("/ws?x=1&token=s%20cret")
            .header(
                header::SEC_WEBSOCKET_PROTOCOL,
                "coral.jsonrpc, coral.token.abc",
            )
            .body(())
            .unwrap_or_default();
        let offered = offered_subprotocols(req.headers());
        assert_eq!(offered, vec!["coral.jsonrpc", "coral.token.abc"]);
        assert_eq!(presented_tokens(&req, &offered), vec!["s cret", "abc"]);
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abc", "abd"));
        assert!(!token_matches("abc", "abcd"));
        assert!(!token_matches("abc", ""));
        let mut h = HeaderMap::new();
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer  t1 "),
        );
        h.append(header::AUTHORIZATION, HeaderValue::from_static("basic xyz"));
        h.append(header::AUTHORIZATION, HeaderValue::from_static("bearer t2"));
        assert_eq!(bearer_tokens(&h), vec!["t1", "t2"]);
    }
}
