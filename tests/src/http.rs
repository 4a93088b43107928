//! A plain HTTP/1.1 client for the bridge's tests: one request, its answer read up to
//! `Content-Length` (so keep-alive connections do not hang).

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long an answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// One exchange on `s`: writes `head` then `body`; returns the status code, the headers and the
/// body.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    head: &str,
    body: &str,
) -> Result<(u16, String, String)> {
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let headers = String::from_utf8_lossy(&buf[..end]).into_owned();
                let len: usize = headers
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                    return Ok::<_, anyhow::Error>((headers, body));
                }
            }
            let n = s.read(&mut chunk).await?;
            ensure!(
                n > 0,
                "connection closed mid-answer: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let (headers, body) = tokio::time::timeout(ANSWER_TIMEOUT, read)
        .await
        .with_context(|| format!("no HTTP answer within {ANSWER_TIMEOUT:?}"))??;
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    Ok((status, headers, body))
}

/// A request without a body to 127.0.0.1:`port`.
pub async fn request(port: u16, head: &str) -> Result<(u16, String, String)> {
    exchange(TcpStream::connect(("127.0.0.1", port)).await?, head, "").await
}
