//! The daemon's HTTP listener: /metrics, /healthz, /readyz and the run API
//! (`POST /api/v1/jobs/{name}/run`, `GET /api/v1/runs/{id}`), the latter
//! behind a bearer token and disabled when none is configured.

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
        .with_state(daemon);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "The HTTP listener failed.");
    }
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
            serde_json::json!({ "error": format!("no run {id} (run ids are kept until the daemon restarts)") }),
        ),
    }
}
