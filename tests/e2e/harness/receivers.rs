//! Local receivers for notifications: an HTTP(S) endpoint that records what
//! it is sent and answers as scripted, an SMTP sink that speaks enough
//! ESMTP (STARTTLS, implicit TLS, AUTH PLAIN) for a real client, and a
//! throwaway CA made with `openssl` for both.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A CA and a server certificate for 127.0.0.1 signed by it.
pub struct TestCa {
    pub ca_pem: PathBuf,
    cert_pem: PathBuf,
    key_pem: PathBuf,
}

impl TestCa {
    pub fn create(dir: &Path) -> Self {
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=backstop test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ]);
        run(&a);
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        run(&a);
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        TestCa {
            ca_pem: dir.join("ca.pem"),
            cert_pem: dir.join("server.pem"),
            key_pem: dir.join("server.key"),
        }
    }

    fn acceptor(&self) -> TlsAcceptor {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert_pem)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(&self.key_pem).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }
}

/// Polls `f` until it returns `Some`, failing after `limit`.
async fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One request the HTTP receiver got.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When it arrived, to measure the pauses between retries.
    pub at: Instant,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Status(u16),
    /// This status with `Retry-After: <seconds>`.
    RetryAfter(u16, u64),
    /// Read the request, then never answer.
    Hang,
}

/// An HTTP/1.1 endpoint on 127.0.0.1 recording every request; answers from
/// its script, then 200. Stops when dropped.
pub struct HttpReceiver {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    /// Connections accepted (a TLS client that refuses the certificate
    /// connects but never sends a request).
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpReceiver {
    pub async fn start(script: &[Reply]) -> Self {
        Self::start_inner(script, None).await
    }

    /// The same over TLS with `ca`'s server certificate.
    pub async fn start_tls(script: &[Reply], ca: &TestCa) -> Self {
        Self::start_inner(script, Some(ca.acceptor())).await
    }

    async fn start_inner(script: &[Reply], tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
        let (reqs, task_script) = (requests.clone(), script.clone());
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (reqs, script, tls) = (reqs.clone(), task_script.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            // A client that refuses the certificate ends here.
                            if let Ok(s) = acceptor.accept(sock).await {
                                serve_http(s, reqs, script).await;
                            }
                        }
                        None => serve_http(sock, reqs, script).await,
                    }
                });
            }
        });
        HttpReceiver {
            addr,
            requests,
            connections,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn https_url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived; returns them all.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Request> {
        poll(&format!("{n} request(s) at {}", self.addr), limit, || {
            let r = self.requests();
            (r.len() >= n).then_some(r)
        })
        .await
    }
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    reqs: Arc<Mutex<Vec<Request>>>,
    script: Arc<Mutex<VecDeque<Reply>>>,
) {
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
        return;
    }
    let method = line.split_whitespace().next().unwrap_or("").to_string();
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    if r.read_exact(&mut body).await.is_err() {
        return;
    }
    reqs.lock().unwrap().push(Request {
        method,
        path,
        headers,
        body,
        at: Instant::now(),
    });
    let reply = script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Reply::Status(200));
    match reply {
        Reply::Status(_) | Reply::RetryAfter(..) => {
            let (code, extra) = match reply {
                Reply::RetryAfter(code, secs) => (code, format!("Retry-After: {secs}\r\n")),
                Reply::Status(code) => (code, String::new()),
                Reply::Hang => unreachable!(),
            };
            let text = format!("answer {code}");
            let resp = format!(
                "HTTP/1.1 {code} X\r\nContent-Type: text/plain\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
            let mut s = r.into_inner();
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        }
        Reply::Hang => {
            // Keep the connection open, unanswered, until the client gives up.
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest).await;
        }
    }
}

/// How the SMTP sink protects its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpMode {
    /// Plain, no AUTH (a local relay).
    Plain,
    /// Plain until STARTTLS; AUTH PLAIN offered only after it.
    StartTls,
    /// TLS from the first byte.
    Tls,
}

/// One message the sink accepted.
#[derive(Debug, Clone, Default)]
pub struct Mail {
    /// Whether the message (and any AUTH) went over TLS.
    pub tls: bool,
    /// (user, password) from AUTH PLAIN.
    pub auth: Option<(String, String)>,
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
}

impl Mail {
    /// The value of a header of the message (unfolded).
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self.data.split("\r\n\r\n").next().unwrap_or("");
        let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
        unfolded.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// The body (after the headers), with quoted-printable soft breaks removed.
    pub fn body(&self) -> String {
        let body = self.data.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        body.replace("=\r\n", "").replace("=3D", "=")
    }
}

/// An SMTP server on 127.0.0.1 that accepts every message (or rejects
/// recipients when told to) and records it. Stops when dropped.
pub struct SmtpSink {
    pub port: u16,
    mails: Arc<Mutex<Vec<Mail>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SmtpSink {
    /// `reject_rcpt`: answer every RCPT TO with 550.
    pub async fn start(mode: SmtpMode, ca: Option<&TestCa>, reject_rcpt: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mails = Arc::new(Mutex::new(Vec::new()));
        let acceptor = ca.map(TestCa::acceptor);
        let m = mails.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (m, acceptor) = (m.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let cfg = Session {
                        mode,
                        reject_rcpt,
                        mails: m,
                    };
                    if mode == SmtpMode::Tls {
                        let Ok(s) = acceptor.expect("TLS needs a CA").accept(sock).await else {
                            return;
                        };
                        cfg.run(s, true, true).await;
                    } else if let Some(plain) = cfg.run(sock, false, true).await {
                        // STARTTLS: the same connection, now encrypted.
                        let Ok(s) = acceptor.expect("STARTTLS needs a CA").accept(plain).await
                        else {
                            return;
                        };
                        cfg.run(s, true, false).await;
                    }
                });
            }
        });
        SmtpSink { port, mails, task }
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }

    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Mail> {
        poll(&format!("{n} mail(s) at port {}", self.port), limit, || {
            let m = self.mails();
            (m.len() >= n).then_some(m)
        })
        .await
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Session {
    mode: SmtpMode,
    reject_rcpt: bool,
    mails: Arc<Mutex<Vec<Mail>>>,
}

impl Session {
    /// Speaks SMTP on `s`. Returns the stream when the client asked for
    /// STARTTLS (the caller upgrades it and calls again).
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: S,
        tls: bool,
        greet: bool,
    ) -> Option<S> {
        let mut r = BufReader::new(s);
        if greet {
            r.get_mut()
                .write_all(b"220 sink ESMTP ready\r\n")
                .await
                .ok()?;
        }
        let mut mail = Mail {
            tls,
            ..Mail::default()
        };
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            let cmd = line.trim_end().to_string();
            let upper = cmd.to_ascii_uppercase();
            let reply: String = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                let mut caps = vec!["250-sink".to_string()];
                if self.mode == SmtpMode::StartTls && !tls {
                    caps.push("250-STARTTLS".into());
                }
                if tls {
                    caps.push("250-AUTH PLAIN".into());
                }
                caps.push("250 8BITMIME".into());
                caps.join("\r\n") + "\r\n"
            } else if upper == "STARTTLS" && self.mode == SmtpMode::StartTls && !tls {
                r.get_mut().write_all(b"220 go ahead\r\n").await.ok()?;
                return Some(r.into_inner());
            } else if let Some(arg) = upper.strip_prefix("AUTH PLAIN") {
                let b64 = if arg.trim().is_empty() {
                    r.get_mut().write_all(b"334 \r\n").await.ok()?;
                    line.clear();
                    r.read_line(&mut line).await.ok()?;
                    line.trim().to_string()
                } else {
                    cmd["AUTH PLAIN".len()..].trim().to_string()
                };
                let raw = decode_base64(&b64);
                let parts: Vec<String> = raw
                    .split(|b| *b == 0)
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
                mail.auth = Some((parts[1].clone(), parts[2].clone()));
                "235 authenticated\r\n".into()
            } else if upper.starts_with("MAIL FROM:") {
                mail.from = addr(&cmd);
                "250 ok\r\n".into()
            } else if upper.starts_with("RCPT TO:") {
                if self.reject_rcpt {
                    "550 5.1.1 no such user here\r\n".into()
                } else {
                    mail.to.push(addr(&cmd));
                    "250 ok\r\n".into()
                }
            } else if upper == "DATA" {
                r.get_mut().write_all(b"354 end with .\r\n").await.ok()?;
                let mut data = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.ok()? == 0 {
                        return None;
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                mail.data = data;
                self.mails.lock().unwrap().push(mail.clone());
                "250 queued\r\n".into()
            } else if upper == "QUIT" {
                let _ = r.get_mut().write_all(b"221 bye\r\n").await;
                return None;
            } else if upper == "RSET" || upper == "NOOP" {
                "250 ok\r\n".into()
            } else {
                "502 not implemented\r\n".into()
            };
            r.get_mut().write_all(reply.as_bytes()).await.ok()?;
        }
    }
}

fn addr(cmd: &str) -> String {
    let start = cmd.find('<').map_or(0, |i| i + 1);
    let end = cmd.rfind('>').unwrap_or(cmd.len());
    cmd[start..end].to_string()
}

fn decode_base64(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let Some(v) = ALPHABET.iter().position(|a| *a == c) else {
            continue;
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
