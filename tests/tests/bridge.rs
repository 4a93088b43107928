//! `coralctl bridge` in front of a real corald, through real WebSocket
//! clients over TCP: methods forwarded with the proto types, subscription notifications, the
//! token on mutating methods (query parameter and subprotocol), the Origin allow-list, malformed
//! frames answered with JSON-RPC errors, a corald restart the browser side survives, and the
//! live progress page driven in headless Chromium (tests/browser/progress.mjs).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use coral_proto::{CoralApiClient, LibrarySelector, ScanPhase, ScanProgress, codes};
use coral_tests::daemon::{
    Daemon, StartedBridge, add_and_scan, eventually, start_bridge, traversable_tempdir,
};
use coral_tests::fixtures;
use coral_tests::http::request;
use jsonrpsee::async_client::{Client, ClientBuilder};
use jsonrpsee::client_transport::ws::{
    HeaderMap, HeaderValue, Url, WsHandshakeError, WsTransportClientBuilder,
};
use jsonrpsee::core::client::{ClientT, Error as ClientError, Subscription, SubscriptionClientT};
use jsonrpsee::rpc_params;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdout, Command};

const TOKEN: &str = "test-token-0123456789";
/// The bridge's own error codes (ctl/src/bridge/rpc.rs).
const UNAUTHORIZED: i32 = 1100;
const DAEMON_UNAVAILABLE: i32 = 1101;

/// Scans in many small steps, so progress has a visible middle.
fn slow_config(dir: &Path) -> Result<String> {
    let p = dir.join("corald.toml");
    std::fs::write(
        &p,
        "[scan]\nbatch_size = 5\nthreads = 1\n[progress]\nnotify_interval_ms = 100\n",
    )?;
    Ok(p.to_string_lossy().into_owned())
}

/// A running `coralctl bridge` on an ephemeral loopback port.
struct Bridge {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    port: u16,
    log: PathBuf,
}

impl Bridge {
    async fn start(socket: &Path, log_dir: &Path, extra: &[&str]) -> Result<Bridge> {
        let log = log_dir.join("bridge.log");
        let stderr = std::fs::File::create(&log)?;
        let StartedBridge {
            child,
            stdout,
            port,
        } = start_bridge(socket, extra, stderr.into(), Some(&log)).await?;
        Ok(Bridge {
            child,
            _stdout: stdout,
            port,
            log,
        })
    }

    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn ws_url(&self, query: &str) -> String {
        format!("ws://127.0.0.1:{}/ws{query}", self.port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the bridge exited with {status}:\n{}", self.log_text());
        }
        Ok(())
    }
}

/// A jsonrpsee WebSocket client over TCP, with an `Origin` header like a browser's.
async fn ws_client(url: &str, origin: Option<&str>) -> Result<Client, WsHandshakeError> {
    let mut headers = HeaderMap::new();
    if let Some(o) = origin {
        headers.insert(
            "origin",
            HeaderValue::from_str(o).map_err(|e| WsHandshakeError::Url(e.to_string().into()))?,
        );
    }
    let url = Url::parse(url).map_err(|e| WsHandshakeError::Url(e.to_string().into()))?;
    let (tx, rx) = WsTransportClientBuilder::default()
        .set_headers(headers)
        .build(url)
        .await?;
    Ok(ClientBuilder::default()
        .request_timeout(Duration::from_secs(60))
        .build_with_tokio(tx, rx))
}

fn call_error(r: Result<impl std::fmt::Debug, ClientError>) -> Result<(i32, String)> {
    match r {
        Err(ClientError::Call(e)) => Ok((e.code(), e.message().to_owned())),
        other => bail!("expected a JSON-RPC error, got {other:?}"),
    }
}

/// A raw WebSocket connection, for what well-behaved clients never send.
struct RawWs {
    stream: TcpStream,
}

impl RawWs {
    /// Handshake; returns the connection and the response head.
    async fn connect(port: u16, path: &str, extra_headers: &str) -> Result<(RawWs, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let b = tokio::time::timeout(Duration::from_secs(10), stream.read_u8())
                .await
                .context("handshake timed out")??;
            head.push(b);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        ensure!(
            head.starts_with("HTTP/1.1 101"),
            "handshake refused:\n{head}"
        );
        Ok((RawWs { stream }, head))
    }

    /// Send one masked text frame.
    async fn send_text(&mut self, text: &str) -> Result<()> {
        let payload = text.as_bytes();
        let mut frame = vec![0x81u8];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(u16::try_from(n)?).to_be_bytes());
            }
        }
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await?;
        Ok(())
    }

    /// The next text frame (control frames are skipped).
    async fn recv_text(&mut self) -> Result<String> {
        loop {
            let b0 = self.stream.read_u8().await?;
            let b1 = self.stream.read_u8().await?;
            let len = match b1 & 0x7f {
                126 => u64::from(self.stream.read_u16().await?),
                127 => self.stream.read_u64().await?,
                n => u64::from(n),
            };
            ensure!(len < 1 << 24, "frame of {len} bytes");
            let mut payload = vec![0u8; usize::try_from(len)?];
            self.stream.read_exact(&mut payload).await?;
            if b0 & 0x0f == 0x1 {
                return Ok(String::from_utf8(payload)?);
            }
        }
    }

    async fn recv_json(&mut self) -> Result<Value> {
        let text = tokio::time::timeout(Duration::from_secs(10), self.recv_text())
            .await
            .context("no frame within 10 s")??;
        Ok(serde_json::from_str(&text)?)
    }
}

async fn next_progress(sub: &mut Subscription<ScanProgress>) -> Result<ScanProgress> {
    tokio::time::timeout(Duration::from_secs(120), sub.next())
        .await
        .context("no progress notification within 120 s")?
        .context("the subscription ended")?
        .context("unreadable progress notification")
}

async fn next_status(sub: &mut Subscription<Value>) -> Result<Value> {
    tokio::time::timeout(Duration::from_secs(60), sub.next())
        .await
        .context("no bridge.status notification within 60 s")?
        .context("the bridge.status subscription ended")?
        .context("unreadable bridge.status notification")
}

/// Wait for a `bridge.status` notification with `connected == want`.
async fn wait_connected(sub: &mut Subscription<Value>, want: bool) -> Result<Value> {
    loop {
        let s = next_status(sub).await?;
        if s["connected"] == Value::Bool(want) {
            return Ok(s);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_forwards_calls_and_guards_tokens_origins_and_input() -> Result<()> {
    let lib = traversable_tempdir()?;
    let n = fixtures::big_library(lib.path(), 200)? as u64;
    let d = Daemon::start().await?;
    let mut b = Bridge::start(&d.socket, d.dir.path(), &["--token", TOKEN]).await?;
    let origin = b.origin();

    // The page and its assets, with a strict content security policy.
    let (status, headers, body) = request(
        b.port,
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(status, 200, "{headers}");
    assert!(body.contains("<title>Coral"), "{body}");
    let lower = headers.to_ascii_lowercase();
    assert!(
        lower.contains("content-security-policy: default-src 'self'"),
        "{headers}"
    );
    assert!(lower.contains("referrer-policy: no-referrer"), "{headers}");
    for asset in ["/app.js", "/style.css", "/favicon.svg"] {
        let (status, _, body) = request(
            b.port,
            &format!("GET {asset} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
        )
        .await?;
        assert_eq!(status, 200, "{asset}");
        assert!(!body.is_empty(), "{asset}");
        assert!(
            !body.contains("http://") || asset == "/favicon.svg",
            "{asset} links out"
        );
    }
    let (status, _, _) = request(
        b.port,
        "GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(status, 404);
    let (status, _, _) = request(
        b.port,
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(status, 426, "/ws without an upgrade");
    let (status, _, body) = request(
        b.port,
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await?;
    assert_eq!(status, 400, "a handshake without a key: {body}");

    // A page of another origin is refused before the upgrade; so is `null` (file://, sandboxes).
    for bad in ["http://evil.example", "null", "http://127.0.0.1:1"] {
        match ws_client(&b.ws_url(""), Some(bad)).await {
            Err(WsHandshakeError::Rejected { status_code }) => {
                assert_eq!(status_code, 403, "{bad}")
            }
            Err(e) => bail!("origin {bad}: expected 403, got {e}"),
            Ok(_) => bail!("origin {bad} was accepted"),
        }
    }
    let (status, _, body) = request(
        b.port,
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://evil.example\r\n\r\n",
    )
    .await?;
    assert_eq!(status, 403);
    assert!(body.contains("not allowed"), "{body}");

    // Allowed origin, no token: read-only methods are forwarded with the proto types.
    let ro = ws_client(&b.ws_url(""), Some(&origin)).await?;
    let st = ro.daemon_status().await?;
    assert_eq!(Some(st.pid), d.pid(), "daemon.status comes from corald");
    assert!(ro.library_list().await?.is_empty());
    assert!(ro.scan_list(Some(5)).await?.is_empty());
    assert!(ro.scan_active().await?.is_empty());
    let (code, _) = call_error(ro.track_get(987_654).await)?;
    assert_eq!(
        code,
        codes::TRACK_NOT_FOUND,
        "corald's own errors pass through"
    );
    let info: Value = ro.request("bridge.info", rpc_params![]).await?;
    assert_eq!(info["authorized"], false, "{info}");
    assert_eq!(info["token_configured"], true, "{info}");
    assert_eq!(info["connected"], true, "{info}");

    // Mutating methods without the token: a JSON-RPC error that says what to do.
    let (code, msg) = call_error(ro.scan_start(LibrarySelector::Id(1), None, None).await)?;
    assert_eq!(code, UNAUTHORIZED, "{msg}");
    assert!(msg.contains("scan.start") && msg.contains("token"), "{msg}");
    let (code, _) = call_error(
        ro.library_add(lib.path().to_string_lossy().into_owned())
            .await,
    )?;
    assert_eq!(code, UNAUTHORIZED);
    let (code, _) = call_error(ro.scan_cancel(uuid::Uuid::new_v4()).await)?;
    assert_eq!(code, UNAUTHORIZED);
    let (code, _) = call_error(ro.library_remove(LibrarySelector::Id(1)).await)?;
    assert_eq!(code, UNAUTHORIZED);
    // Bad parameters and unknown methods: standard JSON-RPC errors.
    let (code, _) = call_error(
        ro.request::<Value, _>("scan.get", rpc_params!["not-a-uuid"])
            .await,
    )?;
    assert_eq!(code, -32602);
    let (code, _) = call_error(
        ro.request::<Value, _>("daemon.shutdown", rpc_params![])
            .await,
    )?;
    assert_eq!(code, -32601);

    // A wrong token unlocks nothing.
    let wrong = ws_client(&b.ws_url("?token=not-the-token"), Some(&origin)).await?;
    let (code, _) = call_error(wrong.scan_start(LibrarySelector::Id(1), None, None).await)?;
    assert_eq!(code, UNAUTHORIZED);

    // The right token as a query parameter: add a library, subscribe, scan.
    let rw = ws_client(&b.ws_url(&format!("?token={TOKEN}")), Some(&origin)).await?;
    let info: Value = rw.request("bridge.info", rpc_params![]).await?;
    assert_eq!(info["authorized"], true, "{info}");
    let mut sub = rw.scan_subscribe(None).await?;
    let added = rw
        .library_add(lib.path().to_string_lossy().into_owned())
        .await?;
    let first = added
        .last_scan
        .context("library.add queued no scan")?
        .scan
        .request_id;
    let mut last = None;
    while last.is_none() {
        let p = next_progress(&mut sub).await?;
        if p.scan.request_id == first && p.phase.is_terminal() {
            last = Some(p);
        }
    }
    let last = last.context("no final state")?;
    assert_eq!(last.phase, ScanPhase::Completed, "{last:?}");
    assert_eq!(last.counts.tracks_indexed, n, "{last:?}");
    let started = rw
        .scan_start(LibrarySelector::Id(added.id), None, Some(false))
        .await?;
    let mut seen = Vec::new();
    loop {
        let p = next_progress(&mut sub).await?;
        if p.scan.request_id != started.request_id {
            continue;
        }
        let end = p.phase.is_terminal();
        seen.push(p);
        if end {
            break;
        }
    }
    let fin = seen.last().context("no updates")?;
    assert_eq!(fin.phase, ScanPhase::Completed, "{fin:?}");
    assert_eq!(fin.counts.tracks_unchanged, n, "{fin:?}");
    assert_eq!(rw.scan_get(started.request_id).await?, *fin);
    // Read-only clients see the same notifications.
    let libs = ro.library_list().await?;
    assert_eq!(libs.len(), 1);
    assert_eq!(libs[0].track_count as u64, n);

    // The token as a subprotocol entry (what the page sends), over a raw connection that also
    // sends what a broken client would.
    let (mut raw, head) = RawWs::connect(
        b.port,
        "/ws",
        &format!(
            "Origin: http://localhost:{}\r\nSec-WebSocket-Protocol: coral.jsonrpc, coral.token.{TOKEN}\r\n",
            b.port
        ),
    )
    .await?;
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: coral.jsonrpc"),
        "{head}"
    );
    raw.send_text(r#"{"jsonrpc":"2.0","id":1,"method":"bridge.info"}"#)
        .await?;
    let info = raw.recv_json().await?;
    assert_eq!(info["result"]["authorized"], true, "{info}");
    raw.send_text("{this is not json").await?;
    let err = raw.recv_json().await?;
    assert_eq!(err["error"]["code"], -32700, "{err}");
    raw.send_text(r#"{"jsonrpc":"2.0","id":2,"method":"scan.get","params":{"request_id":17}}"#)
        .await?;
    let err = raw.recv_json().await?;
    assert_eq!(err["error"]["code"], -32602, "{err}");
    raw.send_text(r#"[]"#).await?;
    let err = raw.recv_json().await?;
    assert!(err["error"]["code"].is_i64(), "{err}");
    // Still alive and still answering after all that.
    raw.send_text(r#"{"jsonrpc":"2.0","id":3,"method":"scan.list","params":[1]}"#)
        .await?;
    let ok = raw.recv_json().await?;
    assert_eq!(ok["id"], 3, "{ok}");
    assert!(ok["result"].is_array(), "{ok}");
    b.assert_running()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_resume_after_corald_restarts() -> Result<()> {
    let lib = traversable_tempdir()?;
    let n = fixtures::big_library(lib.path(), 2000)? as u64;
    let cfgdir = traversable_tempdir()?;
    let mut d = Daemon::start_with(&["--config", &slow_config(cfgdir.path())?]).await?;
    let mut b = Bridge::start(&d.socket, d.dir.path(), &[]).await?;
    let c = ws_client(&b.ws_url(""), Some(&b.origin())).await?;
    let mut status: Subscription<Value> = c
        .subscribe("bridge.subscribe", rpc_params![], "bridge.unsubscribe")
        .await?;
    wait_connected(&mut status, true).await?;
    let mut sub = c.scan_subscribe(None).await?;

    let direct = d.client().await?;
    let added = direct
        .library_add(lib.path().to_string_lossy().into_owned())
        .await?;
    let id = added.last_scan.context("no scan queued")?.scan.request_id;
    // Mid-indexing, as seen through the bridge…
    loop {
        let p = next_progress(&mut sub).await?;
        if p.scan.request_id == id && p.phase == ScanPhase::Indexing && p.counts.tracks_indexed > 50
        {
            break;
        }
        ensure!(
            !p.phase.is_terminal(),
            "the scan ended before it could be interrupted: {p:?}"
        );
    }
    // …corald dies.
    drop(direct);
    d.kill()?;
    let down = wait_connected(&mut status, false).await?;
    assert!(down["error"].is_string(), "{down}");
    let (code, msg) = call_error(c.daemon_status().await)?;
    assert_eq!(code, DAEMON_UNAVAILABLE, "{msg}");
    assert!(msg.contains("not reachable"), "{msg}");
    assert!(c.is_connected(), "the browser side stays connected");

    // It comes back: the same subscriptions carry on, from a fresh snapshot.
    d.spawn().await?;
    wait_connected(&mut status, true).await?;
    let mut resumed = None;
    while resumed.is_none() {
        let p = next_progress(&mut sub).await?;
        if p.scan.request_id == id && p.phase.is_terminal() {
            resumed = Some(p);
        }
    }
    let p = resumed.context("no final state")?;
    assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
    assert!(p.scan.resumed, "{p:?}");
    assert_eq!(
        p.counts.tracks_indexed + p.counts.tracks_unchanged,
        n,
        "{p:?}"
    );
    // Calls work again over the same browser connection.
    let st = c.daemon_status().await?;
    assert_eq!(Some(st.pid), d.pid());
    b.assert_running()?;
    Ok(())
}

/// Where the browser test's script lives, and what it needs; a clear failure when missing.
fn browser_prerequisites() -> Result<(PathBuf, PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    let chromium = std::env::var_os("CORAL_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let mut missing = Vec::new();
    if !chromium.exists() {
        missing.push(format!(
            "Chromium at {} (Debian package `chromium`)",
            chromium.display()
        ));
    }
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        missing.push("node on PATH (Debian package `nodejs`)".to_owned());
    }
    if !dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        missing.push(format!(
            "playwright-core in {} (npm ci there)",
            dir.join("node_modules").display()
        ));
    }
    if !missing.is_empty() {
        bail!(
            "the browser test needs {}; run scripts/setup, which installs them",
            missing.join(", ")
        );
    }
    Ok((dir.join("progress.mjs"), chromium))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_page_in_headless_chromium() -> Result<()> {
    let (script, chromium) = browser_prerequisites()?;
    let out_dir = coral_tests::daemon::bin_dir()
        .parent()
        .map(|p| p.join("browser"))
        .context("no target directory")?;
    std::fs::create_dir_all(&out_dir)?;

    let lib = traversable_tempdir()?;
    let n = fixtures::big_library(lib.path(), 2000)?;
    let cfgdir = traversable_tempdir()?;
    let mut d = Daemon::start_with(&["--config", &slow_config(cfgdir.path())?]).await?;
    {
        let c = d.client().await?;
        let (_, first) = add_and_scan(&c, lib.path()).await?;
        ensure!(first.phase == ScanPhase::Completed, "{first:?}");
    }
    let mut b = Bridge::start(&d.socket, d.dir.path(), &["--token", TOKEN]).await?;
    let url = format!("http://127.0.0.1:{}/?token={TOKEN}", b.port);

    let node_log = d.dir.path().join("node.log");
    let mut node = Command::new("node")
        .arg(&script)
        .arg(&url)
        .arg(&out_dir)
        .arg(n.to_string())
        .env("CORAL_CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&node_log)?)
        .kill_on_drop(true)
        .spawn()
        .context("starting node")?;
    let mut lines = BufReader::new(node.stdout.take().context("no stdout")?).lines();
    let diagnostics = |what: &str, b: &Bridge, d: &Daemon| {
        format!(
            "{what}\n--- browser script ---\n{}\n--- bridge ---\n{}\n--- corald (tail) ---\n{}",
            std::fs::read_to_string(&node_log).unwrap_or_default(),
            b.log_text(),
            d.log_text()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(420);
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(l))) => l,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => bail!(diagnostics(
                &format!("reading the script's output: {e}"),
                &b,
                &d
            )),
            Err(_) => bail!(diagnostics(
                "the browser script did not finish within 7 minutes",
                &b,
                &d
            )),
        };
        match line.trim() {
            // The page has shown the scan reach 100 %: take corald away.
            "STEP kill-corald" => d.kill()?,
            // The page shows corald as unreachable: bring it back.
            "STEP start-corald" => d.spawn().await?,
            other => println!("browser: {other}"),
        }
    }
    let status = tokio::time::timeout_at(deadline, node.wait())
        .await
        .context("node did not exit")??;
    if !status.success() {
        bail!(diagnostics(
            &format!("the browser script failed ({status})"),
            &b,
            &d
        ));
    }
    let shot = out_dir.join("progress.png");
    let size = std::fs::metadata(&shot)
        .with_context(|| format!("no screenshot at {}", shot.display()))?
        .len();
    ensure!(size > 10_000, "{} is only {size} bytes", shot.display());
    println!(
        "{}screenshot: {}",
        std::fs::read_to_string(&node_log).unwrap_or_default(),
        shot.display()
    );
    b.assert_running()?;
    // The page's scans really happened.
    let c = d.client().await?;
    let libs = c.library_list().await?;
    assert_eq!(libs[0].track_count as usize, n);
    eventually(Duration::from_secs(10), "no active scans", || async {
        c.scan_active().await.ok().filter(|a| a.is_empty())
    })
    .await?;
    Ok(())
}

/// The bridge serves the methods its table lists (`coral_proto::METHODS`); the table must name
/// every method of the `CoralApi` trait, and nothing else.
#[test]
fn the_bridge_method_table_lists_every_method_of_the_api() {
    let mut from_trait = corald::fuzz_entry::api_method_names();
    let mut from_table: Vec<&str> = coral_proto::registered_names().collect();
    from_trait.sort_unstable();
    from_table.sort_unstable();
    assert_eq!(
        from_table, from_trait,
        "a method of CoralApi is missing from coral_proto::METHODS, or the table names one the trait lacks"
    );
}
