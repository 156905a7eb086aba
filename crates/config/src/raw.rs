//! The TOML schema exactly as written by the operator, with source spans kept
//! so validation can point at the offending line and column.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub daemon: RawDaemon,
    #[serde(default)]
    pub storage: BTreeMap<Spanned<String>, RawStorage>,
    #[serde(default)]
    pub encryption: BTreeMap<Spanned<String>, RawEncryption>,
    #[serde(default, rename = "job")]
    pub jobs: Vec<RawJob>,
    /// The default retention of jobs without their own.
    pub retention: Option<Spanned<RawRetention>>,
    #[serde(default)]
    pub notify: BTreeMap<Spanned<String>, RawNotify>,
}

/// One `[notify.NAME]`: where and when to send notifications.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNotify {
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    pub on: Option<Spanned<Vec<Spanned<String>>>>,
    pub timeout: Option<Spanned<String>>,
    pub retries: Option<Spanned<i64>>,
    pub retry_backoff: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
    // webhook, slack
    pub url: Option<Spanned<String>>,
    pub url_file: Option<Spanned<String>>,
    pub url_env: Option<Spanned<String>>,
    pub secret_file: Option<Spanned<String>>,
    pub secret_env: Option<Spanned<String>>,
    // heartbeat
    pub method: Option<Spanned<String>>,
    // email
    pub host: Option<Spanned<String>>,
    pub port: Option<Spanned<i64>>,
    pub tls: Option<Spanned<String>>,
    pub username: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
    pub password_env: Option<Spanned<String>>,
    pub from: Option<Spanned<String>>,
    pub to: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetention {
    pub keep_last: Option<Spanned<i64>>,
    pub keep_hourly: Option<Spanned<i64>>,
    pub keep_daily: Option<Spanned<i64>>,
    pub keep_weekly: Option<Spanned<i64>>,
    pub keep_monthly: Option<Spanned<i64>>,
    pub keep_yearly: Option<Spanned<i64>>,
    pub keep_within: Option<Spanned<String>>,
    pub min_keep: Option<Spanned<i64>>,
    pub orphan_grace: Option<Spanned<String>>,
    pub keep_gone_for: Option<Spanned<String>>,
    pub schedule: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDaemon {
    pub catalog: Option<Spanned<String>>,
    pub catalog_password_file: Option<Spanned<String>>,
    pub catalog_password_env: Option<Spanned<String>>,
    pub catalog_connections: Option<Spanned<i64>>,
    pub catalog_history: Option<Spanned<String>>,
    pub lease: Option<Spanned<String>>,
    pub heartbeat: Option<Spanned<String>>,
    pub listen: Option<Spanned<String>>,
    pub max_concurrent_jobs: Option<Spanned<i64>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub api_token_file: Option<Spanned<String>>,
    pub status_page: Option<Spanned<bool>>,
    pub status_token_file: Option<Spanned<String>>,
    pub signing_key_file: Option<Spanned<String>>,
    pub trusted_keys: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStorage {
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    // local
    pub path: Option<Spanned<String>>,
    // s3
    pub bucket: Option<Spanned<String>>,
    pub prefix: Option<Spanned<String>>,
    pub region: Option<Spanned<String>>,
    pub endpoint: Option<Spanned<String>>,
    pub force_path_style: Option<bool>,
    pub storage_class: Option<Spanned<String>>,
    pub sse: Option<Spanned<String>>,
    pub kms_key_id: Option<Spanned<String>>,
    pub access_key_id: Option<Spanned<String>>,
    pub access_key_id_env: Option<Spanned<String>>,
    pub secret_access_key_file: Option<Spanned<String>>,
    pub secret_access_key_env: Option<Spanned<String>>,
    pub part_size: Option<Spanned<String>>,
    pub max_in_flight_parts: Option<Spanned<i64>>,
    pub max_parts: Option<Spanned<i64>>,
    pub equal_parts: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEncryption {
    pub recipients: Option<Vec<Spanned<String>>>,
    pub recipients_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJob {
    pub name: Spanned<String>,
    pub database: Spanned<RawDatabase>,
    pub schedule: Option<Spanned<String>>,
    pub timezone: Option<Spanned<String>>,
    #[serde(default)]
    pub format: crate::DumpFormat,
    #[serde(default)]
    pub scope: crate::Scope,
    #[serde(default)]
    pub globals: bool,
    #[serde(default)]
    pub no_role_passwords: bool,
    #[serde(default)]
    pub include_schemas: Vec<String>,
    #[serde(default)]
    pub exclude_schemas: Vec<String>,
    #[serde(default)]
    pub include_tables: Vec<String>,
    #[serde(default)]
    pub exclude_tables: Vec<String>,
    pub compression: Option<Spanned<String>>,
    pub compression_threads: Option<Spanned<toml::Value>>,
    pub compression_share: Option<Spanned<toml::Value>>,
    pub memory_budget: Option<Spanned<String>>,
    pub encryption: Option<Spanned<String>>,
    pub storage: Spanned<Vec<Spanned<String>>>,
    pub timeout: Option<Spanned<String>>,
    pub starting_deadline: Option<Spanned<String>>,
    pub rpo: Option<Spanned<String>>,
    pub rto: Option<Spanned<String>>,
    pub parallel: Option<Spanned<i64>>,
    pub streams: Option<Spanned<i64>>,
    pub split_tables_larger_than: Option<Spanned<String>>,
    pub max_source_connections: Option<Spanned<i64>>,
    pub lock_wait_timeout: Option<Spanned<String>>,
    pub lock_guard: Option<Spanned<RawLockGuard>>,
    pub stall_timeout: Option<Spanned<String>>,
    pub max_snapshot_age: Option<Spanned<String>>,
    pub expected_size: Option<Spanned<String>>,
    pub standby: Option<Spanned<String>>,
    #[serde(default)]
    pub row_counts: crate::RowCounts,
    pub pg_dump_path: Option<Spanned<String>>,
    pub pg_bin_dir: Option<Spanned<String>>,
    pub identity_file: Option<Spanned<String>>,
    pub verify: Option<Spanned<RawVerify>>,
    pub retries: Option<Spanned<i64>>,
    pub retry_backoff: Option<Spanned<String>>,
    #[serde(default = "yes")]
    pub catch_up: bool,
    pub retention: Option<Spanned<RawRetention>>,
    pub anomaly: Option<RawAnomaly>,
    pub notify: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLockGuard {
    pub mode: Option<Spanned<String>>,
    pub max_block: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAnomaly {
    pub min_ratio: Option<Spanned<f64>>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVerify {
    pub schedule: Spanned<String>,
    #[serde(default)]
    pub level: crate::VerifyLevel,
    pub target: Option<Spanned<String>>,
    pub target_password_file: Option<Spanned<String>>,
    pub target_password_env: Option<Spanned<String>>,
    pub identity_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDatabase {
    pub url: Option<Spanned<String>>,
    pub url_env: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
    pub password_env: Option<Spanned<String>>,
    /// A cluster job: every database of the server the URL points at.
    pub all: Option<Spanned<bool>>,
    /// Databases a cluster job leaves out (shell patterns).
    pub exclude: Option<Spanned<Vec<Spanned<String>>>>,
}
