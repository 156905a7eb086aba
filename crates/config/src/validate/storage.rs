//! `[storage.NAME]`: a local directory or an S3 bucket.

use toml::Spanned;

use crate::raw::RawStorage;
use crate::{MAX_PART_SIZE, MIN_PART_SIZE, S3Config, S3Credentials, Secret, StorageConfig};

use crate::check::*;

const LOCAL_ONLY: &str = "path";
const S3_ONLY: &str = "bucket, prefix, region, endpoint, force_path_style, storage_class, sse, kms_key_id, access_key_id, access_key_id_env, secret_access_key_file, secret_access_key_env, part_size, max_in_flight_parts, max_parts, equal_parts";

/// Length: one check per key of a store, by type (local, s3), each with its
/// own message.
pub(crate) fn validate_storage(
    c: &mut Checker<'_>,
    name: &Spanned<String>,
    st: &RawStorage,
) -> Option<StorageConfig> {
    let before = c.diagnostics.len();
    let s3_keys = [
        st.bucket.as_ref().map(|v| v.span()),
        st.prefix.as_ref().map(|v| v.span()),
        st.region.as_ref().map(|v| v.span()),
        st.endpoint.as_ref().map(|v| v.span()),
        st.storage_class.as_ref().map(|v| v.span()),
        st.sse.as_ref().map(|v| v.span()),
        st.kms_key_id.as_ref().map(|v| v.span()),
        st.access_key_id.as_ref().map(|v| v.span()),
        st.access_key_id_env.as_ref().map(|v| v.span()),
        st.secret_access_key_file.as_ref().map(|v| v.span()),
        st.secret_access_key_env.as_ref().map(|v| v.span()),
        st.part_size.as_ref().map(|v| v.span()),
        st.max_in_flight_parts.as_ref().map(|v| v.span()),
        st.max_parts.as_ref().map(|v| v.span()),
        st.equal_parts.as_ref().map(|v| v.span()),
    ];
    match st.kind.get_ref().as_str() {
        "local" => {
            if let Some(span) = s3_keys.into_iter().flatten().next() {
                c.error(
                    span,
                    format!(
                        "this key belongs to S3 stores ({S3_ONLY}); storage \"{}\" is local",
                        name.get_ref()
                    ),
                );
            }
            match &st.path {
                Some(p) if !p.get_ref().is_empty() => Some(StorageConfig::Local {
                    path: c.resolve(p.get_ref()),
                }),
                _ => {
                    c.error(
                        st.kind.span(),
                        format!(
                            "storage \"{}\" of type \"local\" needs a path, e.g. path = \"/var/lib/backstop/backups\"",
                            name.get_ref()
                        ),
                    );
                    None
                }
            }
        }
        "s3" => {
            if let Some(p) = &st.path {
                c.error(
                    p.span(),
                    format!(
                        "`{LOCAL_ONLY}` belongs to local stores; S3 stores use bucket and prefix"
                    ),
                );
            }
            let bucket = match &st.bucket {
                Some(b) if valid_bucket(b.get_ref()) => b.get_ref().clone(),
                Some(b) => {
                    c.error(
                        b.span(),
                        format!(
                            "invalid bucket name {:?}: 3–63 lowercase letters, digits, '.' and '-'",
                            b.get_ref()
                        ),
                    );
                    String::new()
                }
                None => {
                    c.error(
                        st.kind.span(),
                        format!(
                            "S3 storage \"{}\" needs a bucket, e.g. bucket = \"acme-db-backups\"",
                            name.get_ref()
                        ),
                    );
                    String::new()
                }
            };
            let prefix = match &st.prefix {
                None => String::new(),
                Some(p) => {
                    let v = p.get_ref().trim_start_matches('/');
                    if v.split('/').any(|seg| seg == ".." || seg == ".") {
                        c.error(p.span(), "prefix must not contain '.' or '..' segments");
                    }
                    if v.is_empty() || v.ends_with('/') {
                        v.to_string()
                    } else {
                        format!("{v}/")
                    }
                }
            };
            let region = st
                .region
                .as_ref()
                .map_or_else(|| "us-east-1".to_string(), |r| r.get_ref().clone());
            let endpoint = st
                .endpoint
                .as_ref()
                .and_then(|e| match url::Url::parse(e.get_ref()) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                        Some(e.get_ref().trim_end_matches('/').to_string())
                    }
                    _ => {
                        c.error(
                            e.span(),
                            format!(
                                "invalid endpoint {:?}: expected http(s)://host[:port]",
                                e.get_ref()
                            ),
                        );
                        None
                    }
                });
            let sse = st.sse.as_ref().and_then(|s| match s.get_ref().as_str() {
                "AES256" | "aws:kms" => Some(s.get_ref().clone()),
                other => {
                    c.error(
                        s.span(),
                        format!("unknown sse {other:?}: use \"AES256\" or \"aws:kms\""),
                    );
                    None
                }
            });
            if let Some(k) = &st.kms_key_id
                && sse.as_deref() != Some("aws:kms")
            {
                c.error(k.span(), "kms_key_id needs sse = \"aws:kms\"");
            }
            let key_id = match (&st.access_key_id, &st.access_key_id_env) {
                (Some(_), Some(env)) => {
                    c.error(
                        env.span(),
                        "set either access_key_id or access_key_id_env, not both",
                    );
                    None
                }
                (Some(k), None) => Some((k.span(), k.get_ref().clone())),
                (None, Some(env)) => c.env_value(env).map(|v| (env.span(), v)),
                (None, None) => None,
            };
            let secret = match (&st.secret_access_key_file, &st.secret_access_key_env) {
                (Some(_), Some(env)) => {
                    c.error(
                        env.span(),
                        "set either secret_access_key_file or secret_access_key_env, not both",
                    );
                    None
                }
                (Some(f), None) => c
                    .read_secret_file("secret_access_key_file", f)
                    .map(|v| (f.span(), v)),
                (None, Some(env)) => c.env_value(env).map(|v| (env.span(), v)),
                (None, None) => None,
            };
            let credentials = match (key_id, secret) {
                (Some((_, id)), Some((_, secret))) => Some(S3Credentials {
                    access_key_id: id,
                    secret_access_key: Secret::new(secret),
                }),
                (Some((span, _)), None) => {
                    c.error(span, "an access key id needs its secret: set secret_access_key_file (or secret_access_key_env)");
                    None
                }
                (None, Some((span, _))) => {
                    c.error(span, "a secret access key needs its id: set access_key_id_env (or access_key_id)");
                    None
                }
                (None, None) => None,
            };
            let part_size = match &st.part_size {
                None => None,
                Some(p) => match parse_size(p.get_ref()) {
                    Ok(n) if (MIN_PART_SIZE..=MAX_PART_SIZE).contains(&n) => Some(n),
                    Ok(_) => {
                        c.error(
                            p.span(),
                            "part_size must be between 5MiB and 5GiB (S3's limits)",
                        );
                        None
                    }
                    Err(e) => {
                        c.error(
                            p.span(),
                            format!("invalid part_size {:?}: {e}", p.get_ref()),
                        );
                        None
                    }
                },
            };
            let max_in_flight_parts = match &st.max_in_flight_parts {
                None => None,
                Some(n) if (1..=64).contains(n.get_ref()) => Some(*n.get_ref() as usize),
                Some(n) => {
                    c.error(n.span(), "max_in_flight_parts must be between 1 and 64");
                    None
                }
            };
            let max_parts = match &st.max_parts {
                None => 10_000,
                Some(n) if (1..=10_000).contains(n.get_ref()) => *n.get_ref() as u32,
                Some(n) => {
                    c.error(
                        n.span(),
                        "max_parts must be between 1 and 10000 (S3's limit; some providers take 1000)",
                    );
                    10_000
                }
            };
            (c.diagnostics.len() == before).then(|| {
                StorageConfig::S3(S3Config {
                    bucket,
                    prefix,
                    region,
                    endpoint,
                    force_path_style: st.force_path_style.unwrap_or(false),
                    storage_class: st.storage_class.as_ref().map(|s| s.get_ref().clone()),
                    sse,
                    kms_key_id: st.kms_key_id.as_ref().map(|s| s.get_ref().clone()),
                    credentials,
                    part_size,
                    max_in_flight_parts,
                    max_parts,
                    equal_parts: st.equal_parts.as_ref().is_none_or(|e| *e.get_ref()),
                })
            })
        }
        other => {
            c.error(
                st.kind.span(),
                format!("unknown storage type {other:?} (expected \"local\" or \"s3\")"),
            );
            None
        }
    }
}

pub(crate) fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '.' || ch == '-')
        && b.starts_with(|ch: char| ch.is_ascii_alphanumeric())
        && b.ends_with(|ch: char| ch.is_ascii_alphanumeric())
}
