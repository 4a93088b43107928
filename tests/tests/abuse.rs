//! Hostile clients on the real socket: malformed and oversized requests get JSON-RPC errors,
//! a thousand idle connections and byte-a-second clients do not starve a normal client, a
//! flood of subscriptions on connections that never read keeps the daemon's memory bounded,
//! and the daemon gives back their file descriptors.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use coral_proto::CoralApiClient;
use coral_tests::daemon::{Daemon, eventually, rss_kib, stuck_subscriber};

/// One plain HTTP POST of `body`; returns (status code, response body).
fn post(socket: &Path, body: &[u8]) -> Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    // The server may answer (and close) before reading an oversized body to its end.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn error_code(body: &str) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    v.get("error")?.get("code")?.as_i64()
}

fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_wrong_and_oversized_requests_get_json_rpc_errors() -> Result<()> {
    let d = Daemon::start().await?;
    let sock = d.socket.clone();
    let cases: Vec<(&str, Vec<u8>, i64)> = vec![
        (
            "malformed JSON",
            b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":".to_vec(),
            -32700,
        ),
        ("not JSON at all", b"\x00\xff garbage".to_vec(), -32700),
        (
            "unknown method",
            br#"{"jsonrpc":"2.0","id":1,"method":"daemon.explode","params":[]}"#.to_vec(),
            -32601,
        ),
        (
            "wrong parameter type",
            br#"{"jsonrpc":"2.0","id":1,"method":"track.get","params":{"id":"seven"}}"#.to_vec(),
            -32602,
        ),
        (
            "missing parameter",
            br#"{"jsonrpc":"2.0","id":1,"method":"library.add","params":{}}"#.to_vec(),
            -32602,
        ),
    ];
    for (what, body, want) in cases {
        let s = sock.clone();
        let (status, text) = tokio::task::spawn_blocking(move || post(&s, &body)).await??;
        assert_eq!(
            error_code(&text),
            Some(want),
            "{what}: HTTP {status} {text}"
        );
    }
    // Beyond the 4 MiB limit: refused, and the daemon carries on.
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"track.search","params":{{"query":"{}"}}}}"#,
        "a".repeat(5 * 1024 * 1024)
    );
    let s = sock.clone();
    let (status, text) = tokio::task::spawn_blocking(move || post(&s, big.as_bytes())).await??;
    assert!(
        status == 413 || error_code(&text) == Some(-32007),
        "oversized request: HTTP {status} {}",
        &text[..text.len().min(200)]
    );
    let c = d.client().await?;
    c.daemon_status().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_and_slow_clients_do_not_starve_others() -> Result<()> {
    let d = Daemon::start().await?;
    let pid = d.pid().context("no pid")?;
    let c = d.client().await?;
    c.daemon_status().await?;
    let fds_before = open_fds(pid)?;

    // 1,000 connections that never send a byte, plus 20 that send a request a byte a second.
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(UnixStream::connect(&d.socket)?);
    }
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = UnixStream::connect(&d.socket)?;
        s.write_all(b"POST / HTTP/1.1\r\nHo")?;
        slow.push(s);
    }
    let dribble = std::thread::spawn(move || {
        for _ in 0..3 {
            std::thread::sleep(Duration::from_secs(1));
            for s in slow.iter_mut() {
                let _ = s.write_all(b"s");
            }
        }
        slow
    });
    // A normal client keeps its latency meanwhile.
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        c.daemon_status().await?;
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = d.client().await?;
    fresh.library_list().await?;
    assert!(
        worst < Duration::from_secs(1),
        "daemon.status took {worst:?} under load"
    );
    let held = open_fds(pid)?;
    assert!(
        held >= fds_before + 1000,
        "expected the idle connections to be open: {held}"
    );

    // Everyone leaves: the descriptors come back.
    drop(idle);
    drop(
        dribble
            .join()
            .map_err(|_| anyhow::anyhow!("dribble thread panicked"))?,
    );
    drop(fresh);
    eventually(
        Duration::from_secs(20),
        "file descriptors to be released",
        || async { open_fds(pid).ok().filter(|n| *n <= fds_before + 5) },
    )
    .await?;
    c.daemon_status().await?;
    Ok(())
}

/// `rpc.max_request_bytes` is the limit: a request above it gets an error, one below it an
/// answer, on the same daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_size_limit_is_configurable() -> Result<()> {
    let dir = coral_tests::daemon::traversable_tempdir()?;
    let config = dir.path().join("corald.toml");
    std::fs::write(&config, "[rpc]\nmax_request_bytes = 65536\n")?;
    let d = Daemon::start_with(&["--config", &config.to_string_lossy()]).await?;
    let search = |len: usize| {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"track.search","params":{{"query":"{}"}}}}"#,
            "a".repeat(len)
        )
    };
    let (s, body) = (d.socket.clone(), search(100_000));
    let (status, text) = tokio::task::spawn_blocking(move || post(&s, body.as_bytes())).await??;
    assert!(
        status == 413 || error_code(&text) == Some(-32007),
        "100 kB over a 64 KiB limit: HTTP {status} {}",
        &text[..text.len().min(200)]
    );
    let (s, body) = (d.socket.clone(), search(50_000));
    let (status, text) = tokio::task::spawn_blocking(move || post(&s, body.as_bytes())).await??;
    assert_eq!(status, 200, "{}", &text[..text.len().min(200)]);
    assert_eq!(error_code(&text), None, "{}", &text[..text.len().min(200)]);
    Ok(())
}

/// RPC abuse: a flood of subscriptions, many on connections that never read, while
/// scans publish progress. Memory stays bounded, the reading subscriber and a plain client keep
/// getting answers, and everything is given back when the clients leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_flood_with_clients_that_never_read_keeps_memory_bounded() -> Result<()> {
    use coral_proto::ScanPhase;

    let lib = coral_tests::daemon::traversable_tempdir()?;
    coral_tests::fixtures::big_library(lib.path(), 3000)?;
    let d = Daemon::start().await?;
    let pid = d.pid().context("no pid")?;
    let c = d.client().await?;
    let (library_id, first) = coral_tests::daemon::add_and_scan(&c, lib.path()).await?;
    assert_eq!(first.phase, ScanPhase::Completed, "{first:?}");
    let fds_before = open_fds(pid)?;
    let rss_before = rss_kib(pid)?;

    // 100 connections × 10 subscriptions that are never read, and one reading client with 200.
    let mut stuck = Vec::new();
    for _ in 0..100 {
        stuck.push(stuck_subscriber(&d.socket, 10)?);
    }
    let reader = d.client().await?;
    let mut subs = Vec::new();
    for _ in 0..200 {
        subs.push(reader.scan_subscribe(None).await?);
    }

    let mut rss_peak = rss_before;
    let mut worst = Duration::ZERO;
    // Enough scans that each stuck connection is owed more notifications (≈ 5 per scan per
    // subscription) than the server queues per connection.
    let scans = 3;
    let mut finals = 0usize;
    for _ in 0..scans {
        let started = c
            .scan_start(
                coral_proto::LibrarySelector::Id(library_id),
                None,
                Some(true),
            )
            .await?;
        // Poll the plain client's latency and the daemon's memory until the scan ends.
        loop {
            let t = Instant::now();
            let p = c.scan_get(started.request_id).await?;
            worst = worst.max(t.elapsed());
            rss_peak = rss_peak.max(rss_kib(pid)?);
            if p.phase.is_terminal() {
                assert_eq!(p.phase, ScanPhase::Completed, "{p:?}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Every reading subscription sees this scan's final notification.
        for sub in subs.iter_mut() {
            loop {
                let n = tokio::time::timeout(Duration::from_secs(30), sub.next())
                    .await
                    .context("a reading subscriber stopped getting notifications")?
                    .context("subscription closed")??;
                if n.scan.request_id == started.request_id && n.phase.is_terminal() {
                    finals += 1;
                    break;
                }
            }
        }
    }
    assert_eq!(finals, scans * subs.len());
    let grown_mib = rss_peak.saturating_sub(rss_before) as f64 / 1024.0;
    eprintln!(
        "subscriber flood: 1,000 stuck + 200 reading subscriptions, {scans} full scans of 3,000 \
         files: RSS {} MiB before, peak {} MiB (+{grown_mib:.1} MiB); worst scan.get {worst:?}",
        rss_before / 1024,
        rss_peak / 1024
    );
    assert!(
        grown_mib < 32.0,
        "memory grew by {grown_mib:.1} MiB with clients that never read"
    );
    assert!(
        worst < Duration::from_secs(1),
        "scan.get took {worst:?} during the flood"
    );

    drop(subs);
    drop(reader);
    drop(stuck);
    eventually(
        Duration::from_secs(20),
        "file descriptors to be released",
        || async { open_fds(pid).ok().filter(|n| *n <= fds_before + 2) },
    )
    .await?;
    eprintln!("after the clients left: RSS {} MiB", rss_kib(pid)? / 1024);
    c.daemon_status().await?;
    Ok(())
}
