//! The daemon's socket, held up against slow and greedy clients. A scrape
//! of /metrics is what pages on-call, and the daemon's file descriptors
//! are what its backups need: neither may be used up by a client that
//! opens connections and sends nothing (slowloris), sends headers a byte at
//! a time, never reads its answers, or posts a large body.
//!
//! - at most [`Limits::max_connections`] connections at once, and
//!   [`Limits::max_per_peer`] from one address: one more is closed at once
//!   (a clear failure, rather than a wait in the kernel's backlog);
//! - a request's headers must arrive within [`Limits::header_read`], which
//!   also closes a kept-alive connection that sends no next request;
//! - a client that stops reading its answer for [`Limits::idle`] is cut
//!   off (a handler still working is never cut: only writes time out);
//! - a request body over [`Limits::max_body`] (the API takes none) is
//!   answered 413 without being read.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// What a client may take of the listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_per_peer: usize,
    pub header_read: Duration,
    pub idle: Duration,
    pub max_body: u64,
}

/// The daemon's limits: ample for Prometheus, a browser and the CLI.
pub const LIMITS: Limits = Limits {
    max_connections: 128,
    max_per_peer: 32,
    header_read: Duration::from_secs(10),
    idle: Duration::from_secs(60),
    max_body: 64 * 1024,
};

/// Serves `app` on `listener` within `limits` until `stop` fires; then
/// stops accepting and lets open requests finish (up to five seconds).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    stop: CancellationToken,
    limits: Limits,
) {
    let app = app.layer(axum::middleware::from_fn(move |req, next| {
        refuse_bodies(req, next, limits.max_body)
    }));
    let open = Arc::new(Open::default());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut refused_logged = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: wait a little instead of spinning.
                    warn!(error = %e, "The HTTP listener cannot accept a connection.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(slot) = open.take(peer.ip(), &limits) else {
            if refused_logged.elapsed() > Duration::from_secs(10) {
                refused_logged = std::time::Instant::now();
                warn!(peer = %peer.ip(), max = limits.max_connections, per_peer = limits.max_per_peer, "Too many HTTP connections; closing new ones until some end.");
            }
            drop(stream);
            continue;
        };
        let io = TokioIo::new(Idle::new(stream, limits.idle));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read)
            .serve_connection(io, TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

/// 413 for a request with a body over `max` (or of unknown length): the
/// API takes none, and it is never read.
async fn refuse_bodies(req: Request, next: Next, max: u64) -> Response {
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    if chunked || length.is_some_and(|n| n > max) {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            [(header::CONNECTION, "close")],
            "request body too large: this API takes no body\n",
        )
            .into_response();
    }
    next.run(req).await
}

/// Connections open, in all and per address.
#[derive(Default)]
struct Open {
    by_peer: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Open {
    fn take(self: &Arc<Self>, peer: IpAddr, limits: &Limits) -> Option<Slot> {
        let mut g = self
            .by_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, peers) = &mut *g;
        let mine = peers.entry(peer).or_default();
        if *total >= limits.max_connections || *mine >= limits.max_per_peer {
            if *mine == 0 {
                peers.remove(&peer);
            }
            return None;
        }
        *mine += 1;
        *total += 1;
        Some(Slot {
            open: self.clone(),
            peer,
        })
    }
}

/// One open connection's place; freed when dropped.
struct Slot {
    open: Arc<Open>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self
            .open
            .by_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, peers) = &mut *g;
        *total -= 1;
        if let Some(n) = peers.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

/// A stream whose writes fail once none moved for `idle`: a client that
/// stops reading what it asked for lets go of its connection.
struct Idle<S> {
    inner: S,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<S> Idle<S> {
    fn new(inner: S, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn moved(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn idle_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "connection idle for too long")
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    /// Reads are the header timeout's business: hyper reads on while a
    /// handler works (to see the client leave), and a slow handler must
    /// not be cut off.
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, data) {
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    self.moved();
                }
                Poll::Ready(r)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(idle_error())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(idle_error())),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let app = Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
        tokio::spawn(serve(listener, app, stop.clone(), limits));
        (addr, stop)
    }

    async fn get(addr: std::net::SocketAddr) -> io::Result<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    const SMALL: Limits = Limits {
        max_connections: 4,
        max_per_peer: 4,
        header_read: Duration::from_millis(300),
        idle: Duration::from_millis(300),
        max_body: 16,
    };

    /// Slowloris: the cap is reached by clients that send nothing; after
    /// the header timeout their places are free again and a scrape works.
    #[tokio::test]
    async fn clients_that_send_nothing_let_go_and_a_scrape_gets_through() {
        let (addr, stop) = server(SMALL).await;
        let mut idle = Vec::new();
        for _ in 0..SMALL.max_connections {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost:")
                .await
                .unwrap();
            idle.push(s);
        }
        // While they hold every place, one more is closed at once.
        let refused = get(addr).await.unwrap_or_default();
        assert!(!refused.contains("200 OK"), "{refused}");
        // Each slow client is cut off at the header timeout.
        for s in &mut idle {
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("the server closes a slow client")
                .unwrap_or(0);
            let _ = n;
        }
        let ok = get(addr).await.unwrap();
        assert!(ok.contains("200 OK") && ok.ends_with("ok\n"), "{ok}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_large_or_chunked_body_is_refused_unread() {
        let (addr, stop) = server(SMALL).await;
        for head in [
            "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n",
            "POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            let mut out = String::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
                .await
                .unwrap()
                .unwrap();
            assert!(out.starts_with("HTTP/1.1 413"), "{out}");
        }
        stop.cancel();
    }

    /// A client that connects and sends nothing at all.
    #[tokio::test]
    async fn a_silent_client_is_closed_at_the_header_timeout() {
        let (addr, stop) = server(SMALL).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed within the header timeout")
            .unwrap_or(0);
        assert_eq!(n, 0);
        stop.cancel();
    }

    /// A handler slower than the idle limit still answers.
    #[tokio::test]
    async fn a_slow_handler_is_not_cut_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let app = Router::new().route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(900)).await;
                "done\n"
            }),
        );
        tokio::spawn(serve(listener, app, stop.clone(), SMALL));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.contains("200 OK") && out.ends_with("done\n"), "{out}");
        stop.cancel();
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed() {
        let (addr, stop) = server(SMALL).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
        // Kept alive, then nothing: the server closes it.
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed within the idle timeout")
            .unwrap_or(0);
        assert_eq!(n, 0);
        stop.cancel();
    }
}
