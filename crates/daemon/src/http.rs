//! The daemon's HTTP listener: /metrics, /healthz, /readyz, the run API
//! (`POST /api/v1/jobs/{name}/run`, `GET /api/v1/runs/{id}`) behind a bearer
//! token and disabled when none is configured, and the read-only status
//! page (`/`, `/jobs/{name}`, `/api/v1/status`) when `daemon.status_page`
//! is on: open on a loopback listener, behind the read or API token
//! elsewhere.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::{Daemon, TriggerError};

pub async fn serve(
    listener: tokio::net::TcpListener,
    daemon: Arc<Daemon>,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/jobs/{name}/run", post(run_job))
        .route("/api/v1/runs/{id}", get(run_state))
        .route("/", get(overview))
        .route("/jobs/{name}", get(job_page))
        .route("/api/v1/status", get(status_json))
        .route(crate::page::CSS_PATH, get(stylesheet))
        .with_state(daemon);
    crate::listener::serve(listener, app, stop, crate::listener::LIMITS).await;
}

async fn metrics(State(d): State<Arc<Daemon>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        d.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(d): State<Arc<Daemon>>) -> Response {
    // A fleet node that cannot trust its lease takes no work.
    if let Some(node) = &d.fleet
        && !node.trusted()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: this fleet node's lease is not renewed (catalog unreachable?); its runs are stopped\n",
        )
            .into_response();
    }
    match d.catalog.ping().await {
        Ok(()) => (StatusCode::OK, "ready: config loaded, catalog reachable\n").into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: catalog unreachable: {e}\n"),
        )
            .into_response(),
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// Checks the bearer token; compares digests so timing reveals nothing.
/// Returns the refusal to send, if any.
fn refusal(d: &Daemon, headers: &HeaderMap) -> Option<Response> {
    let config = d.config();
    let Some(token) = &config.daemon.api_token else {
        return Some(json(
            StatusCode::FORBIDDEN,
            serde_json::json!({ "error": "the run API is disabled: set daemon.api_token_file to enable it" }),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    (Sha256::digest(given.as_bytes()) != Sha256::digest(token.expose().as_bytes())).then(|| {
        json(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({ "error": "missing or wrong bearer token" }),
        )
    })
}

async fn run_job(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = refusal(&d, &headers) {
        return r;
    }
    match d.trigger(&name).await {
        Ok(id) => json(
            StatusCode::ACCEPTED,
            serde_json::json!({ "run_id": id, "job": name, "state": "queued" }),
        ),
        Err(TriggerError::UnknownJob) => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": format!("no job named {name:?}") }),
        ),
        Err(TriggerError::AlreadyRunning(id)) => json(
            StatusCode::CONFLICT,
            serde_json::json!({ "error": "a run of this job is already queued or going", "run_id": id }),
        ),
        Err(TriggerError::ShuttingDown) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "error": "the daemon is shutting down" }),
        ),
    }
}

async fn run_state(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<u64>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = refusal(&d, &headers) {
        return r;
    }
    match d.run_state(id) {
        Some(r) => json(StatusCode::OK, serde_json::to_value(r).unwrap_or_default()),
        None => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": format!("no run {id} here: the daemon answers for runs going and its last 1000 finished ones until it restarts, except a fleet's scheduled run that another node claimed (see `backstop status` for who runs what)") }),
        ),
    }
}

/// The status page's headers: no script, styles from this origin only, no
/// framing, no referrer, no caching.
const PAGE_HEADERS: [(header::HeaderName, &str); 5] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
    (header::CACHE_CONTROL, "no-store"),
];

/// Whether the status page may be shown: 404 when it is off; 401 without
/// the read or API token when the listener is not loopback or a read token
/// is set. A browser sends the token as the password of Basic auth (any
/// user name), a script as `Authorization: Bearer`.
fn page_refusal(d: &Daemon, headers: &HeaderMap) -> Option<Response> {
    let config = d.config();
    let daemon = &config.daemon;
    if !daemon.status_page {
        return Some(
            (
                StatusCode::NOT_FOUND,
                "not found: the status page is off (set daemon.status_page = true)\n",
            )
                .into_response(),
        );
    }
    let tokens = daemon.status_tokens();
    // The socket actually bound decides, not the config (a reload cannot
    // move the socket, and must not open the page on it).
    if d.bound.is_some_and(|b| b.ip().is_loopback()) && daemon.status_token.is_none() {
        return None;
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(presented_token)
        .unwrap_or_default();
    let digest = Sha256::digest(given.as_bytes());
    // Every token is compared (no early exit), by digest.
    let matched = tokens.iter().fold(false, |m, t| {
        m | (Sha256::digest(t.expose().as_bytes()) == digest)
    });
    (given.is_empty() || !matched).then(|| {
        (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Basic realm=\"backstop status\", charset=\"UTF-8\"",
            )],
            "unauthorized: send the status or API token (Authorization: Bearer TOKEN, or as the password of Basic auth)\n",
        )
            .into_response()
    })
}

/// The token of an `Authorization` header: a bearer token, or the password
/// of Basic credentials.
fn presented_token(value: &str) -> Option<String> {
    if let Some(t) = value.strip_prefix("Bearer ") {
        return Some(t.trim().to_string());
    }
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64_decode(encoded.trim())?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(_, p)| p.to_string())
}

/// Standard base64 (with or without padding); `None` if malformed.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    Some(out)
}

fn html_page(status: StatusCode, body: String) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response();
    for (k, v) in PAGE_HEADERS {
        r.headers_mut()
            .insert(k, header::HeaderValue::from_static(v));
    }
    r
}

fn hostname() -> String {
    backstop_vocab::hostname().unwrap_or_else(|| "this host".into())
}

fn page_error(e: &anyhow::Error) -> Response {
    tracing::warn!(error = %format!("{e:#}"), "The status page could not be rendered.");
    html_page(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "<!DOCTYPE html><title>backstop: status unavailable</title><p>The status could not be read: {}</p>",
            crate::page::escape(&format!("{e:#}"))
        ),
    )
}

async fn overview(State(d): State<Arc<Daemon>>, headers: HeaderMap) -> Response {
    if let Some(r) = page_refusal(&d, &headers) {
        return r;
    }
    let config = d.config();
    let now = chrono::Utc::now();
    match d.status.collect(&config, &d.catalog, now).await {
        Ok(rows) => {
            let host = hostname();
            let origin = crate::page::Origin {
                host: &host,
                version: backstop_vocab::build::version(),
                now,
            };
            html_page(StatusCode::OK, crate::page::overview(&rows, &origin))
        }
        Err(e) => page_error(&e),
    }
}

async fn job_page(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = page_refusal(&d, &headers) {
        return r;
    }
    let config = d.config();
    let now = chrono::Utc::now();
    let host = hostname();
    let origin = crate::page::Origin {
        host: &host,
        version: backstop_vocab::build::version(),
        now,
    };
    let Some(job) = config.job(&name) else {
        return html_page(
            StatusCode::NOT_FOUND,
            crate::page::not_found(&name, &origin),
        );
    };
    match crate::status::job_detail(&config, &d.catalog, job, now).await {
        Ok(detail) => html_page(StatusCode::OK, crate::page::job(&detail, &origin)),
        Err(e) => page_error(&e),
    }
}

async fn status_json(State(d): State<Arc<Daemon>>, headers: HeaderMap) -> Response {
    if let Some(r) = page_refusal(&d, &headers) {
        return r;
    }
    let config = d.config();
    let report = match d
        .status
        .collect(&config, &d.catalog, chrono::Utc::now())
        .await
    {
        Ok(jobs) => crate::status::report_with(jobs, &config, &d.catalog).await,
        Err(e) => Err(e),
    };
    match report {
        Ok(report) => {
            let mut r = json(
                StatusCode::OK,
                serde_json::to_value(report).unwrap_or_default(),
            );
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            r
        }
        Err(e) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "error": format!("the status could not be read: {e:#}") }),
        ),
    }
}

async fn stylesheet(State(d): State<Arc<Daemon>>, headers: HeaderMap) -> Response {
    if let Some(r) = page_refusal(&d, &headers) {
        return r;
    }
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        crate::page::CSS,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_read_from_bearer_or_basic_credentials() {
        assert_eq!(presented_token("Bearer abc "), Some("abc".into()));
        // "anyone:s3cret-token" in base64, with and without padding.
        assert_eq!(
            presented_token("Basic YW55b25lOnMzY3JldC10b2tlbg=="),
            Some("s3cret-token".into())
        );
        assert_eq!(
            presented_token("Basic YW55b25lOnMzY3JldC10b2tlbg"),
            Some("s3cret-token".into())
        );
        // A password may hold colons.
        assert_eq!(presented_token("Basic dTphOmI="), Some("a:b".into()));
        assert_eq!(presented_token("Basic !!!"), None);
        assert_eq!(presented_token("Basic bm9jb2xvbg=="), None);
        assert_eq!(presented_token("Digest x"), None);
    }
}
