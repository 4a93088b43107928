//! `coralctl bridge`'s plain-HTTP JSON-RPC (`POST /rpc`) in front of a real corald, over real
//! TCP: answers and errors equal to corald's own on its Unix socket, the token on mutating
//! methods (`Authorization: Bearer`, `?token=`), `--token-required-for-reads` (401 without the
//! token), malformed JSON, unknown methods and bad parameters, wrong HTTP methods and origins.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use coral_proto::ScanPhase;
use coral_tests::daemon::{
    Daemon, StartedBridge, add_and_scan, eventually, start_bridge, traversable_tempdir,
};
use coral_tests::fixtures::{self, FixtureTrack};
use coral_tests::http::exchange;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UnixStream};
use tokio::process::Child;

const TOKEN: &str = "http-token-0123456789";
/// The bridge's error code for a missing token (ctl/src/bridge/rpc.rs).
const UNAUTHORIZED: i64 = 1100;

/// A running `coralctl bridge` on an ephemeral loopback port.
struct Bridge {
    _child: Child,
    port: u16,
}

async fn bridge(socket: &Path, extra: &[&str]) -> Result<Bridge> {
    let StartedBridge {
        child,
        mut stdout,
        port,
    } = start_bridge(socket, extra, Stdio::inherit(), None).await?;
    // Keep the pipe open: the bridge must not get EPIPE on later prints.
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = stdout.read_to_end(&mut sink).await;
    });
    // Answer only once the bridge holds its connection to corald.
    let info = call("bridge.info", json!([]));
    eventually(
        Duration::from_secs(30),
        "the bridge to reach corald",
        || async {
            let auth = format!("Authorization: Bearer {TOKEN}\r\n");
            let (_, _, body) = post(port, "/rpc", &info, &auth).await.ok()?;
            let v: Value = serde_json::from_str(&body).ok()?;
            v["result"]["connected"].as_bool().filter(|c| *c)
        },
    )
    .await?;
    Ok(Bridge {
        _child: child,
        port,
    })
}

fn post_head(path: &str, body: &str, extra_headers: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n",
        body.len()
    )
}

/// POST `body` to the bridge's `path`.
async fn post(port: u16, path: &str, body: &str, headers: &str) -> Result<(u16, String, String)> {
    let s = TcpStream::connect(("127.0.0.1", port)).await?;
    exchange(s, &post_head(path, body, headers), body).await
}

/// POST `body` to corald's own socket (JSON-RPC over plain HTTP there too).
async fn post_daemon(socket: &Path, body: &str) -> Result<(u16, String, String)> {
    let s = UnixStream::connect(socket).await?;
    exchange(s, &post_head("/", body, ""), body).await
}

fn call(method: &str, params: Value) -> String {
    json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).to_string()
}

fn error_code(body: &str) -> Result<i64> {
    let v: Value = serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))?;
    v["error"]["code"]
        .as_i64()
        .with_context(|| format!("no error in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_rpc_answers_like_the_socket_and_enforces_the_token() -> Result<()> {
    let lib = traversable_tempdir()?;
    fixtures::make_tracks(
        lib.path(),
        &[
            FixtureTrack::simple("a/one.flac", "flac", "Harbour Lights"),
            FixtureTrack::simple("a/two.mp3", "mp3", "Lantern"),
        ],
    )?;
    let dir = traversable_tempdir()?;
    let config = dir.path().join("corald.toml");
    std::fs::write(&config, "[embed]\nenabled = false\n")?;
    let d = Daemon::start_with(&["--config", &config.to_string_lossy()]).await?;
    let c = d.client().await?;
    let (lib_id, p) = add_and_scan(&c, lib.path()).await?;
    ensure!(p.phase == ScanPhase::Completed, "{p:?}");
    let socket: PathBuf = d.socket.clone();
    let b = bridge(&socket, &["--token", TOKEN]).await?;
    let mut db = d.db().await?;
    let (track_id,): (i64,) = sqlx::query_as("SELECT min(id) FROM tracks")
        .fetch_one(&mut db)
        .await?;

    // The same answers and errors as corald's socket, read methods open without the token.
    let same = [
        call("library.list", json!([])),
        call("track.get", json!([track_id])),
        call("track.get", json!({"id": track_id})),
        call("track.search", json!(["harbour"])),
        call(
            "track.lookup",
            json!([{"artist": "Fixture Artist", "title": "Lantern"}]),
        ),
        call("track.get", json!([999_999])),
        call("track.search", json!(["  "])),
        call("track.lookup", json!([{}])),
        call("track.similar", json!([{"id": track_id}])),
        call("track.similar", json!([{"id": 1, "path": "/x"}])),
        call("track.get", json!(["seven"])),
        call("no.such_method", json!([])),
    ];
    for body in &same {
        let (status, _, via_bridge) = post(b.port, "/rpc", body, "").await?;
        ensure!(status == 200, "{body}: HTTP {status} {via_bridge}");
        let (_, _, direct) = post_daemon(&socket, body).await?;
        let (x, y): (Value, Value) = (
            serde_json::from_str(&via_bridge)?,
            serde_json::from_str(&direct)?,
        );
        ensure!(x == y, "{body}:\n bridge {x}\n corald {y}");
        ensure!(x["id"] == 7, "{x}");
    }
    // Errors are the expected ones (so equality above is not two identical failures).
    let expect = [
        (call("track.get", json!([999_999])), 1005),
        (call("track.lookup", json!([{}])), 1009),
        (call("track.similar", json!([{"id": track_id}])), 1006),
        (
            call("track.similar", json!([{"id": 1, "path": "/x"}])),
            1009,
        ),
        (call("track.get", json!(["seven"])), -32602),
        (call("no.such_method", json!([])), -32601),
    ];
    for (body, code) in &expect {
        let (_, _, answer) = post(b.port, "/rpc", body, "").await?;
        ensure!(error_code(&answer)? == *code, "{body}: {answer}");
    }
    // Malformed JSON.
    let (status, _, answer) = post(b.port, "/rpc", "{\"jsonrpc\": \"2.0\", \"id\": 1,", "").await?;
    ensure!(error_code(&answer)? == -32700, "HTTP {status}: {answer}");

    // Mutating methods: refused without the token or with a wrong one, done with it.
    let other = traversable_tempdir()?;
    let add = call("library.add", json!([other.path().to_string_lossy()]));
    let (_, _, answer) = post(b.port, "/rpc", &add, "").await?;
    ensure!(error_code(&answer)? == UNAUTHORIZED, "{answer}");
    let (_, _, answer) = post(
        b.port,
        "/rpc",
        &add,
        "Authorization: Bearer wrong-token-000000\r\n",
    )
    .await?;
    ensure!(error_code(&answer)? == UNAUTHORIZED, "{answer}");
    let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
    let (_, _, answer) = post(b.port, "/rpc", &add, &bearer).await?;
    let added: Value = serde_json::from_str(&answer)?;
    ensure!(
        added["result"]["id"]
            .as_i64()
            .is_some_and(|id| id != lib_id),
        "{answer}"
    );
    let remove = call("library.remove", json!([added["result"]["id"]]));
    let (_, _, answer) = post(b.port, &format!("/rpc?token={TOKEN}"), &remove, "").await?;
    ensure!(
        serde_json::from_str::<Value>(&answer)?["result"].is_object(),
        "{answer}"
    );

    // Not POST, a foreign page's origin.
    let s = TcpStream::connect(("127.0.0.1", b.port)).await?;
    let (status, headers, _) = exchange(
        s,
        "GET /rpc HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        "",
    )
    .await?;
    ensure!(
        status == 405 && headers.to_ascii_lowercase().contains("allow: post"),
        "{headers}"
    );
    let list = call("library.list", json!([]));
    let (status, _, _) = post(b.port, "/rpc", &list, "Origin: http://evil.example\r\n").await?;
    ensure!(status == 403, "HTTP {status}");
    let own = format!("Origin: http://127.0.0.1:{}\r\n", b.port);
    let (status, _, _) = post(b.port, "/rpc", &list, &own).await?;
    ensure!(status == 200, "HTTP {status}");

    // --token-required-for-reads: 401 (with a JSON-RPC error) without the token.
    let strict = bridge(&socket, &["--token", TOKEN, "--token-required-for-reads"]).await?;
    let (status, headers, answer) = post(strict.port, "/rpc", &list, "").await?;
    ensure!(status == 401, "HTTP {status}: {answer}");
    ensure!(
        headers
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{headers}"
    );
    ensure!(error_code(&answer)? == UNAUTHORIZED, "{answer}");
    let (status, _, answer) = post(strict.port, "/rpc", &list, &bearer).await?;
    ensure!(status == 200, "HTTP {status}: {answer}");
    let libs: Value = serde_json::from_str(&answer)?;
    ensure!(
        libs["result"].as_array().is_some_and(|l| l.len() == 1),
        "{answer}"
    );
    Ok(())
}
