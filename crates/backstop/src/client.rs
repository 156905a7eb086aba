//! `backstop backup --wait`: ask the running daemon to run a job and follow
//! the run to its end, over a minimal HTTP/1.1 client on the daemon's
//! loopback listener.

use std::net::SocketAddr;
use std::time::Duration;

use backstop_config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{CliError, CmdResult};

/// Where to reach the daemon: its listen address, with a wildcard IP
/// replaced by loopback.
fn daemon_addr(config: &Config) -> SocketAddr {
    let mut a = config.daemon.listen;
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    a
}

/// One request; returns the status code and body.
/// How long one API answer may take (each is a small JSON object).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of an API answer read.
const MAX_ANSWER_BYTES: u64 = 1024 * 1024;

async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
) -> std::io::Result<(u16, serde_json::Value)> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    // A daemon that accepts and then never answers (hung, or not backstop
    // at all) must not hold the caller forever, nor an endless answer fill
    // its memory: each answer is small and quick.
    let mut raw = Vec::new();
    let exchange = async {
        stream.write_all(req.as_bytes()).await?;
        (&mut stream)
            .take(MAX_ANSWER_BYTES)
            .read_to_end(&mut raw)
            .await
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer from the daemon at {addr} within {}s",
                    ANSWER_TIMEOUT.as_secs()
                ),
            )
        })??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // The body may be chunked; the JSON object sits between the outer braces.
    let json = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) if b >= a => serde_json::from_str(&body[a..=b]).unwrap_or_default(),
        _ => serde_json::Value::Null,
    };
    Ok((status, json))
}

/// Runs `job` through the daemon and waits for it. `None` when no daemon
/// answers (the caller then runs the backup itself).
///
/// Length: `backstop backup --wait` through the daemon's run API: trigger,
/// follow, print.
pub(crate) async fn backup_via_daemon(config: &Config, job: &str) -> Option<CmdResult> {
    config.job(job)?;
    let addr = daemon_addr(config);
    let Some(token) = config
        .daemon
        .api_token
        .as_ref()
        .map(|t| t.expose().to_string())
    else {
        eprintln!(
            "no daemon.api_token_file configured, so the daemon's API is off: running the backup here"
        );
        return None;
    };
    let (status, body) =
        match request(addr, "POST", &format!("/api/v1/jobs/{job}/run"), &token).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("no daemon answering on {addr} ({e}): running the backup here");
                return None;
            }
        };
    let id = match status {
        202 => body["run_id"].as_u64().unwrap_or(0),
        409 => {
            let id = body["run_id"].as_u64().unwrap_or(0);
            eprintln!(
                "a run of job \"{job}\" is already going in the daemon (run {id}); following it"
            );
            id
        }
        401 | 403 => {
            return Some(Err(CliError::usage(format!(
                "the daemon on {addr} refused the request ({status}): {}",
                body["error"].as_str().unwrap_or("unauthorized")
            ))));
        }
        _ => {
            return Some(Err(CliError::failed(format!(
                "the daemon on {addr} answered {status}: {}",
                body["error"].as_str().unwrap_or("no details")
            ))));
        }
    };
    eprintln!("daemon run {id} of job \"{job}\" queued");
    let mut last = String::from("queued");
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (status, run) = match request(addr, "GET", &format!("/api/v1/runs/{id}"), &token).await
        {
            Ok(r) => r,
            Err(e) => {
                return Some(Err(CliError::failed(format!(
                    "lost the daemon while waiting for run {id}: {e}"
                ))));
            }
        };
        if status != 200 {
            return Some(Err(CliError::failed(format!(
                "the daemon no longer knows run {id} ({status})"
            ))));
        }
        let state = run["state"].as_str().unwrap_or("unknown").to_string();
        if state != last {
            eprintln!("daemon run {id}: {state} (attempt {})", run["attempts"]);
            last = state.clone();
        }
        match state.as_str() {
            "success" | "suspect" => {
                println!(
                    "backup {} of job \"{job}\" complete (daemon run {id})",
                    run["backup_id"].as_str().unwrap_or("?")
                );
                if state == "suspect" {
                    println!(
                        "WARNING: the backup is SUSPECT: {}",
                        run["error"].as_str().unwrap_or("much smaller than usual")
                    );
                }
                return Some(Ok(()));
            }
            "failed" | "interrupted" => {
                return Some(Err(CliError::failed(format!(
                    "backup of job \"{job}\" {state} (daemon run {id}): {}",
                    run["error"].as_str().unwrap_or("no details")
                ))));
            }
            _ => {}
        }
    }
}
