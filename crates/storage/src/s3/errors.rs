//! What an S3 error means for backstop: retryable or not, Object Lock,
//! and a hint for the operator naming what to check.

use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

use super::S3Options;
use crate::StorageError;

/// Length: the table of S3 error codes and HTTP statuses to retryable or
/// permanent, each with its hint.
pub(super) fn classify<E, R>(
    op: &'static str,
    location: String,
    opts: &S3Options,
    e: SdkError<E, R>,
) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let store = &opts.name;
    let (message, retryable) = match &e {
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or("");
            let msg = se.err().message().unwrap_or("");
            let status = format!("{:?}", se.raw());
            if crate::is_object_lock_refusal(code, msg) {
                return StorageError::Locked {
                    op,
                    location,
                    code: code.to_string(),
                    message: msg.to_string(),
                };
            }
            let hint = match code {
                "NoSuchBucket" => format!(
                    "bucket \"{}\" does not exist (check storage.{store}.bucket, region and endpoint)",
                    opts.bucket
                ),
                "InvalidAccessKeyId" | "NotSignedUp" => format!(
                    "the access key id is not known to the store (check storage.{store}'s credentials)"
                ),
                "SignatureDoesNotMatch" => format!(
                    "the secret access key is wrong (check storage.{store}.secret_access_key_file)"
                ),
                // The store's own words stay: they say which policy refused.
                "AccessDenied" | "Forbidden" => format!(
                    "access denied{} (check the credentials and the bucket policy; needed: s3:PutObject, s3:GetObject, s3:ListBucket, s3:DeleteObject, s3:AbortMultipartUpload)",
                    if msg.is_empty() {
                        String::new()
                    } else {
                        format!(": {msg}")
                    }
                ),
                "InvalidStorageClass" => format!(
                    "the store does not offer storage class {:?} (check storage.{store}.storage_class)",
                    opts.storage_class.as_deref().unwrap_or("")
                ),
                "NoSuchKey" | "NotFound" => "no such object".to_string(),
                _ if code.is_empty() && status.contains("403") => format!(
                    "access denied (HTTP 403): check storage.{store}'s credentials and the bucket policy"
                ),
                _ if code.is_empty() && status.contains("404") => {
                    "not found (HTTP 404)".to_string()
                }
                _ => format!("{code}: {msg}"),
            };
            let transient = matches!(
                code,
                "SlowDown"
                    | "InternalError"
                    | "ServiceUnavailable"
                    | "RequestTimeout"
                    | "Throttling"
            );
            (hint, transient)
        }
        SdkError::DispatchFailure(d) => {
            let at = opts
                .endpoint
                .as_deref()
                .map(|e| format!(" at {e}"))
                .unwrap_or_default();
            let connector = d.as_connector_error();
            let reason = connector
                .map(|c| c.to_string())
                .unwrap_or_else(|| "connection failed".into());
            let refused =
                connector.is_some_and(|c| backstop_vocab::ipfilter::refused_by_this_host(c));
            with_filter_hint(
                opts,
                format!("cannot reach the store{at}: {reason}"),
                refused,
            )
        }
        // A connection this host's filter drops times out.
        SdkError::TimeoutError(_) => with_filter_hint(opts, "timed out".into(), false),
        SdkError::ResponseError(_) => (
            format!(
                "bad response: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            ),
            true,
        ),
        _ => (
            format!("{}", aws_sdk_s3::error::DisplayErrorContext(&e)),
            false,
        ),
    };
    StorageError::Remote {
        op,
        location,
        message,
        retryable,
    }
}

/// A connection failure's message and whether to retry it, with what this
/// host's packet filter has to do with it (the ip-allow drop-in does not
/// allow the endpoint, or EPERM): then it is not retried.
fn with_filter_hint(opts: &S3Options, message: String, refused: bool) -> (String, bool) {
    let (what, addrs) = match &opts.endpoint {
        Some(e) => {
            let ip = url::Url::parse(e)
                .ok()
                .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()))
                .and_then(|h| h.parse::<std::net::IpAddr>().ok());
            (
                format!("store {} ({e})", opts.name),
                ip.into_iter().collect(),
            )
        }
        None => (format!("store {} (AWS S3)", opts.name), Vec::new()),
    };
    match backstop_vocab::ipfilter::explain(&what, &addrs, refused) {
        Some(x) => (format!("{message}; {}", x.hint), !x.certain),
        None => (message, true),
    }
}

pub(super) fn flatten<T>(
    r: Result<Result<T, StorageError>, tokio::task::JoinError>,
) -> Result<T, StorageError> {
    r.unwrap_or_else(|e| {
        Err(StorageError::Aborted {
            key: String::new(),
            reason: format!("a part upload task failed: {e}"),
        })
    })
}

pub(super) fn is_not_found<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    matches!(e, SdkError::ServiceError(se) if matches!(se.err().code(), Some("NoSuchKey" | "NotFound")))
}

#[cfg(test)]
mod tests {
    use aws_sdk_s3::error::{ConnectorError, SdkError};
    use aws_sdk_s3::operation::get_object::GetObjectError;

    use super::*;

    fn opts() -> S3Options {
        S3Options {
            name: "offsite".into(),
            bucket: "b".into(),
            prefix: String::new(),
            region: "eu-west-1".into(),
            endpoint: Some("http://10.20.0.9:9000".into()),
            force_path_style: true,
            storage_class: None,
            sse: None,
            kms_key_id: None,
            credentials: None,
            part_size: None,
            max_in_flight_parts: None,
            max_parts: 10_000,
            equal_parts: true,
        }
    }

    fn dispatch(e: std::io::Error) -> StorageError {
        let e: SdkError<GetObjectError, ()> =
            SdkError::dispatch_failure(ConnectorError::io(Box::new(e)));
        classify("get", "offsite:k".into(), &opts(), e)
    }

    /// A connection this host's packet filter refused (EPERM) is not
    /// retried and says what to do; a refusal by the store is retried as
    /// before.
    #[test]
    fn a_connection_this_host_refused_names_ip_allow_and_is_not_retried() {
        let blocked = dispatch(std::io::Error::from_raw_os_error(1));
        assert!(!blocked.is_retryable());
        let text = blocked.to_string();
        assert!(
            text.contains("store offsite (http://10.20.0.9:9000)")
                && text.contains("Operation not permitted")
                && text.contains("backstop ip-allow"),
            "{text}"
        );
        let refused = dispatch(std::io::Error::from_raw_os_error(111));
        assert!(refused.is_retryable());
        assert!(!refused.to_string().contains("ip-allow"), "{refused}");
    }
}
