//! POSTing a body to a webhook over HTTP or HTTPS (rustls, the system's
//! roots plus an optional private CA).

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::{SendError, delivery_reason};

/// `scheme://host[:port]`: where a URL points, without the path and query
/// that a webhook uses as its credential.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("?");
            match u.port() {
                Some(p) => format!("{}://{host}:{p}", u.scheme()),
                None => format!("{}://{host}", u.scheme()),
            }
        }
        Err(_) => "(invalid URL)".into(),
    }
}

/// The system's trust roots, loaded once per process.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        if found.certs.is_empty() {
            tracing::warn!(errors = ?found.errors, "No system CA certificates found; HTTPS notifications will fail unless ca_file is set.");
        }
        found.certs
    })
}

fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, SendError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(system_roots().iter().cloned());
    if let Some(path) = ca_file {
        let pem = crate::read_pem(path)?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert =
                cert.map_err(|e| SendError::permanent(format!("ca_file {}: {e}", path.display())))?;
            roots
                .add(cert)
                .map_err(|e| SendError::permanent(format!("ca_file {}: {e}", path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SendError::permanent(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// One POST. 2xx is success; 408, 429 and 5xx (and any connection trouble)
/// are worth retrying; other answers are not.
pub(crate) async fn post(
    url: &str,
    ca_file: Option<&Path>,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<(), SendError> {
    request(hyper::Method::POST, url, ca_file, headers, body).await
}

/// One request of `method` (a GET sends no body), answered as [`post`] is.
pub(crate) async fn request(
    method: hyper::Method,
    url: &str,
    ca_file: Option<&Path>,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<(), SendError> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(ca_file)?)
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("user-agent", user_agent());
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|_| SendError::permanent("the URL cannot be used in a request"))?;
    let resp = client.request(req).await.map_err(|e| {
        // A certificate this host refuses stays refused, as does an address
        // this host's filter blocks: not worth a retry.
        if crate::is_certificate_error(&e) || crate::filter_explains(&e).is_some_and(|x| x.certain)
        {
            SendError::permanent(delivery_reason(&e, true))
        } else {
            SendError::transient(delivery_reason(&e, true))
        }
    })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    // A few hundred bytes of the answer say why (Slack: "invalid_token").
    let text = match Limited::new(resp.into_body(), 4096).collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    let text: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(200)
        .collect();
    let message = if text.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text}")
    };
    let message = if status.is_redirection() {
        format!("{message} (redirects are not followed: configure the final URL)")
    } else {
        message
    };
    let retryable = status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429;
    Err(SendError {
        message,
        retryable,
        retry_after,
    })
}

/// `backstop/VERSION (commit …, built …)`: what the receiver's logs say
/// sent it, exactly as `backstop --version` says it.
fn user_agent() -> String {
    format!("backstop/{}", backstop_vocab::build::version())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_keeps_only_scheme_host_port() {
        assert_eq!(
            redact("https://hooks.slack.com/services/T000/B000/XXXXSECRET"),
            "https://hooks.slack.com"
        );
        assert_eq!(
            redact("http://127.0.0.1:8080/hook?token=abc"),
            "http://127.0.0.1:8080"
        );
        assert_eq!(redact("not a url"), "(invalid URL)");
    }
}
