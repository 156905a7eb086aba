//! An HTTP proxy in front of s3s-fs that forwards every request unchanged
//! (headers included, so SigV4 signatures stay valid) except those a test's
//! rule answers itself: the way AWS answers a delete of an Object-Locked
//! object, a 500 on one call, or no answer at all (a stall). Every request
//! it saw is recorded with the status it got, so a test can assert how
//! often a call was tried.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = BoxBody<Bytes, hyper::Error>;

/// One request as the rules see it.
pub struct Req<'a> {
    pub method: &'a str,
    /// The raw path, `/<bucket>/<key>` (path-style).
    pub path: &'a str,
    pub query: &'a str,
    /// The request body, read only for `POST ?delete` (DeleteObjects).
    pub body: Option<&'a str>,
    /// The payload's length (`x-amz-decoded-content-length` when the body
    /// is aws-chunked, else `content-length`).
    pub len: Option<u64>,
}

impl Req<'_> {
    /// Whether the query has parameter `name` (with or without a value).
    pub fn has(&self, name: &str) -> bool {
        self.query
            .split('&')
            .any(|p| p == name || p.starts_with(&format!("{name}=")))
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .split('&')
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
    }

    /// The `prefix` of a ListObjectsV2 request, decoded.
    pub fn list_prefix(&self) -> Option<String> {
        self.has("list-type")
            .then(|| self.param("prefix").unwrap_or("").replace("%2F", "/"))
    }

    /// The keys a DeleteObjects body names.
    pub fn delete_keys(&self) -> Vec<String> {
        let Some(b) = self.body else { return vec![] };
        b.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split_once("</Key>").map(|(k, _)| k.to_string()))
            .collect()
    }
}

/// What the proxy does with a request.
pub enum Answer {
    Forward,
    /// Answer with this status and body (an S3 XML document).
    Respond(u16, String),
    /// Never answer (and stop reading the request body).
    Stall,
}

pub type Rule = Box<dyn Fn(&Req) -> Answer + Send + Sync>;

/// A request the proxy saw and the status it answered (0: stalled).
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
    /// The request's `x-amz-*` headers.
    pub amz: Vec<(String, String)>,
}

pub struct S3Proxy {
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    rule: Arc<Mutex<Rule>>,
    task: tokio::task::JoinHandle<()>,
}

/// An S3 error document.
pub fn s3_error(code: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>proxy</RequestId><HostId>proxy</HostId></Error>"
    )
}

/// The message AWS sends when a delete hits an object under Object Lock.
pub const LOCKED_MESSAGE: &str = "Access Denied because object protected by object lock.";

/// A DeleteObjects result that refuses every key the way AWS refuses locked
/// versions (HTTP 200, one `<Error>` per key).
pub fn locked_delete_result(keys: &[String]) -> String {
    let errors: String = keys
        .iter()
        .map(|k| {
            format!("<Error><Key>{k}</Key><Code>AccessDenied</Code><Message>{LOCKED_MESSAGE}</Message></Error>")
        })
        .collect();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DeleteResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">{errors}</DeleteResult>"
    )
}

impl S3Proxy {
    /// Starts a proxy to s3s-fs on `upstream` that forwards everything until
    /// [`S3Proxy::set_rule`] says otherwise.
    pub async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rule: Arc<Mutex<Rule>> = Arc::new(Mutex::new(Box::new(|_: &Req| Answer::Forward)));
        let client: Client<HttpConnector, Body> =
            Client::builder(TokioExecutor::new()).build_http();
        let (s, r) = (seen.clone(), rule.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (seen, rule, client) = (s.clone(), r.clone(), client.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        handle(req, upstream, seen.clone(), rule.clone(), client.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        S3Proxy {
            port,
            seen,
            rule,
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_rule(&self, rule: impl Fn(&Req) -> Answer + Send + Sync + 'static) {
        *self.rule.lock().unwrap() = Box::new(rule);
    }

    /// Forgets the requests seen so far.
    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests seen that match `f`.
    pub fn count(&self, f: impl Fn(&Seen) -> bool) -> usize {
        self.seen().iter().filter(|s| f(s)).count()
    }
}

impl Drop for S3Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    req: Request<Incoming>,
    upstream: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    rule: Arc<Mutex<Rule>>,
    client: Client<HttpConnector, Body>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let (parts, incoming) = req.into_parts();
    let is_batch_delete =
        method == "POST" && query.split('&').any(|p| p == "delete" || p == "delete=");
    // Only a DeleteObjects body is read (it names the keys); every other body
    // streams through untouched.
    let (body_text, body): (Option<String>, Body) = if is_batch_delete {
        let bytes = incoming
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        (
            Some(String::from_utf8_lossy(&bytes).into_owned()),
            Full::new(bytes).map_err(|never| match never {}).boxed(),
        )
    } else {
        (None, incoming.boxed())
    };
    let header_len = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    let len = header_len("x-amz-decoded-content-length").or_else(|| header_len("content-length"));
    let answer = {
        let r = rule.lock().unwrap();
        r(&Req {
            method: &method,
            path: &path,
            query: &query,
            body: body_text.as_deref(),
            len,
        })
    };
    let amz: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("x-amz-"))
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let record = |status: u16| {
        seen.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            status,
            amz: amz.clone(),
        })
    };
    match answer {
        Answer::Respond(status, xml) => {
            // Read the whole request first, as S3 does: answering while the
            // client is still sending makes hyper close the connection, and
            // the client sees a reset instead of this answer (a flaky row).
            let _ = body.collect().await;
            record(status);
            Ok(Response::builder()
                .status(status)
                .header("content-type", "application/xml")
                .header("x-amz-request-id", "proxy")
                .body(
                    Full::new(Bytes::from(xml))
                        .map_err(|never| match never {})
                        .boxed(),
                )
                .unwrap())
        }
        Answer::Stall => {
            record(0);
            // Hold the request (and its unread body) until the client gives
            // up or the test ends.
            std::future::pending::<()>().await;
            unreachable!()
        }
        Answer::Forward => {
            let pq = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            let mut out = Request::from_parts(parts, body);
            *out.uri_mut() = format!("http://127.0.0.1:{upstream}{pq}").parse().unwrap();
            match client.request(out).await {
                Ok(resp) => {
                    record(resp.status().as_u16());
                    Ok(resp.map(|b| b.boxed()))
                }
                Err(e) => {
                    record(502);
                    Ok(Response::builder()
                        .status(502)
                        .body(
                            Full::new(Bytes::from(format!("proxy: {e}")))
                                .map_err(|never| match never {})
                                .boxed(),
                        )
                        .unwrap())
                }
            }
        }
    }
}
