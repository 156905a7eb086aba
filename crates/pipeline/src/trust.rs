//! The edge between a store and everything that acts on what it holds.
//!
//! Anyone who can write to a bucket can write a manifest. Nothing read
//! from a store is restored, verified, counted by retention, shown as a
//! backup or imported into the catalog until it is a [`Trusted`] value,
//! and only this module makes those from stored bytes: a manifest (or a
//! verification record) is trusted when
//! - it is signed by a key in `trusted_keys` (once any is configured;
//!   minisign's format, the signature beside it as `<file>.minisig`,
//!   naming the object it was made for), and
//! - it says what its place says: its job (and cluster member) are the
//!   folder's, its backup id is its folder's name and matches its start
//!   time, it is not dated in the future, every artifact lies in its own
//!   folder under a name that matches its format, compression and
//!   encryption, a database backup has a database artifact, and a job
//!   that encrypts has every artifact encrypted.
//!
//! The second list holds without signatures too (for stores of a config
//! without `trusted_keys`, which are warned about). Everything else is
//! listed as [`Untrusted`] with the reason, so `list` can show it, a
//! metric can count it, and prune can leave it alone.

use std::collections::BTreeMap;

use backstop_config::{Config, Encryption, JobConfig};
use backstop_crypto::sign::{MAX_SIGNATURE_BYTES, SIGNATURE_SUFFIX, SigningKey, TrustedKeys};
use backstop_storage::{ObjectMeta, Storage, StorageError, is_valid_key};
use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, Utc};
use futures::StreamExt;
use serde::Serialize;

use crate::manifest::{self, ArtifactEncryption, Manifest};

/// How far in the future a stored time may lie (clocks of the backup host
/// and this one disagree a little).
pub const CLOCK_SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(5);
/// How far a backup's start may lie from the time in its id.
pub const ID_SKEW: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
/// The largest manifest read (one of 100,000 tables is ~15 MB): an object
/// posing as a manifest must not make a listing allocate without bound.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;
/// Manifests (and verification records) read at once while listing.
pub const READS_IN_FLIGHT: usize = 16;

/// What a reader trusts: the keys whose signatures count (none: signatures
/// are neither required nor checked) and the time it reads at.
#[derive(Debug, Clone)]
pub struct Trust {
    keys: TrustedKeys,
    now: DateTime<Utc>,
}

impl Trust {
    /// The keys `config` trusts (`daemon.trusted_keys` and the signing
    /// key's own), read now.
    pub fn from_config(config: &Config) -> Self {
        Self::new(config.daemon.trusted_keys.clone(), crate::now())
    }

    pub fn new(keys: TrustedKeys, now: DateTime<Utc>) -> Self {
        Self { keys, now }
    }

    /// Whether only signed objects are trusted.
    pub fn requires_signatures(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.now
    }

    /// Checks `body`, stored at `key`, against its signature (when
    /// signatures are required): the id of the key that signed it.
    pub(crate) fn signature(
        &self,
        key: &str,
        body: &[u8],
        sig: Option<&[u8]>,
    ) -> Result<Option<String>, String> {
        if !self.requires_signatures() {
            return Ok(None);
        }
        let Some(sig) = sig else {
            return Err(backstop_crypto::sign::SignatureProblem::Missing.to_string());
        };
        self.keys
            .verify(body, sig, key)
            .map(Some)
            .map_err(|p| p.to_string())
    }
}

/// How `config` signs and checks, in a line (`check-config`).
pub fn describe(config: &Config) -> String {
    let d = &config.daemon;
    let keys: Vec<String> = d.trusted_keys.keys().iter().map(|k| k.id()).collect();
    match (&d.signing_key, keys.is_empty()) {
        (_, true) => "OFF: nothing is signed or checked; anyone who can write to a store can add backups this host restores (set daemon.signing_key_file, see README \"Signed backups\")".into(),
        (Some(k), false) => format!(
            "this host signs with key {}; trusted: {}",
            k.public().id(),
            keys.join(", ")
        ),
        (None, false) => format!(
            "this host does not sign (no daemon.signing_key_file); trusted: {}",
            keys.join(", ")
        ),
    }
}

/// Warns (once per process) when `config` trusts no key: a store's
/// contents are then taken at their word, checked only against where they
/// lie.
pub fn warn_if_unsigned(config: &Config) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if config.daemon.trusted_keys.is_empty() {
        WARNED.call_once(|| {
            tracing::warn!(
                "daemon.trusted_keys is not set: backups are not signed, and anyone who can write to a store can add a backup this host would restore. Make a key with `backstop keygen --out FILE` and set daemon.signing_key_file (README: \"Signed backups\")."
            );
        });
    }
}

/// A value read from a store that passed every check of this module. Only
/// this module makes one from stored bytes; a backup this process wrote
/// itself is one by construction ([`Trusted::written_here`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Trusted<T> {
    inner: T,
    signed_by: Option<String>,
}

impl<T> std::ops::Deref for Trusted<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: Serialize> Serialize for Trusted<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.inner.serialize(s)
    }
}

/// The object of type `T` stored at `key` (a `what`), if its signature
/// holds where signatures are required and `problem` finds nothing wrong
/// with what it says: the edge for the formats whose rules live beside
/// them (verification records).
///
/// # Errors
/// Why not, in a sentence.
pub(crate) fn trust_object<T: serde::de::DeserializeOwned>(
    key: &str,
    body: &[u8],
    sig: Option<&[u8]>,
    trust: &Trust,
    what: &str,
    problem: impl FnOnce(&T) -> Option<String>,
) -> Result<Trusted<T>, String> {
    let signed_by = trust.signature(key, body, sig)?;
    let inner: T = serde_json::from_slice(body).map_err(|e| format!("it is not a {what} ({e})"))?;
    match problem(&inner) {
        Some(p) => Err(p),
        None => Ok(Trusted { inner, signed_by }),
    }
}

impl<T> Trusted<T> {
    /// A value made in a test as if it had passed the edge.
    #[cfg(test)]
    pub(crate) fn written_here(inner: T, signed_by: Option<String>) -> Self {
        Self { inner, signed_by }
    }

    /// The id of the key whose signature was checked, if signatures are
    /// required.
    pub fn signed_by(&self) -> Option<&str> {
        self.signed_by.as_deref()
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

/// Something in a store that is not trusted, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Untrusted {
    /// The object's key.
    pub key: String,
    /// The backup folder it lies in (its name), when it lies in one.
    pub backup_id: Option<String>,
    pub reason: String,
}

/// A series' backups in one store: the trusted ones, newest first, and what
/// else lies there posing as a backup.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub backups: Vec<Trusted<Manifest>>,
    pub untrusted: Vec<Untrusted>,
}

impl Listing {
    /// The trusted backup in folder `id`, if any.
    pub fn get(&self, id: &str) -> Option<&Trusted<Manifest>> {
        self.backups.iter().find(|m| m.backup_id == id)
    }

    /// Why the object in folder `id` is not trusted, if it is there.
    pub fn why_not(&self, id: &str) -> Option<&Untrusted> {
        self.untrusted
            .iter()
            .find(|u| u.backup_id.as_deref() == Some(id))
    }
}

/// The time in a backup id (`2026-01-22T02-15-00Z-7f3a`).
pub fn id_time(id: &str) -> Option<DateTime<Utc>> {
    let ts = id.get(..20)?;
    NaiveDateTime::parse_from_str(ts, "%Y-%m-%dT%H-%M-%SZ")
        .ok()
        .map(|t| t.and_utc())
}

/// Why manifest `m`, stored in folder `id` of series `job`, must not be
/// trusted, if it must not (the checks that hold without signatures).
/// `signed`: a trusted key vouched for it, so an unencrypted artifact of a
/// job that encrypts now is this host's own history (from before the job
/// encrypted), not a downgrade.
///
/// Length: one check per rule a manifest must meet (docs/manifest.md), each
/// with its reason.
pub fn manifest_problem(
    m: &Manifest,
    job: &JobConfig,
    id: &str,
    now: DateTime<Utc>,
    signed: bool,
) -> Option<String> {
    if m.format_version > manifest::FORMAT_VERSION {
        return Some(format!(
            "manifest format {} is newer than this backstop understands ({}); upgrade backstop to read it",
            m.format_version,
            manifest::FORMAT_VERSION
        ));
    }
    if m.series() != job.name || m.job.contains('/') {
        return Some(format!(
            "it names series \"{}\", but lies in \"{}\" (a manifest copied from elsewhere?)",
            m.series(),
            job.name
        ));
    }
    if m.backup_id != id {
        return Some(format!(
            "it names backup \"{}\", but lies in folder \"{id}\"",
            m.backup_id
        ));
    }
    let Some(at) = id_time(id) else {
        return Some(format!("its folder \"{id}\" is not a backup id"));
    };
    // A cluster job's databases share their run's id and start later.
    if m.started_at < at - ID_SKEW || (job.member.is_none() && m.started_at > at + ID_SKEW) {
        return Some(format!(
            "it says it started at {}, but its id says {}",
            m.started_at.to_rfc3339(),
            at.to_rfc3339()
        ));
    }
    if m.finished_at < m.started_at {
        return Some("it finished before it started".into());
    }
    if m.finished_at > now + CLOCK_SKEW || at > now + CLOCK_SKEW {
        return Some(format!(
            "it is dated in the future (finished {}, this host's clock says {})",
            m.finished_at.to_rfc3339(),
            now.to_rfc3339()
        ));
    }
    let folder = m.folder();
    let wanted = if job
        .name
        .ends_with(&format!("/{}", backstop_vocab::series::GLOBALS_SEGMENT))
    {
        "globals"
    } else {
        "database"
    };
    let mut kinds: Vec<&str> = Vec::new();
    let mut keys = std::collections::BTreeSet::new();
    for a in &m.artifacts {
        if !keys.insert(a.key.as_str()) {
            return Some(format!(
                "it lists artifact {:?} twice (was the manifest altered?)",
                a.key
            ));
        }
        if a.key != format!("{folder}{}", a.file) || a.file.contains('/') || a.file.starts_with('.')
        {
            return Some(format!(
                "its {} artifact {:?} lies outside the backup's folder {folder} (was the manifest altered?)",
                a.kind, a.key
            ));
        }
        let known = match a.kind.as_str() {
            "database" | "globals" => true,
            "pre-data" | "post-data" | "data-rest" | "data" => {
                m.format_version >= 2 && wanted == "database"
            }
            _ => false,
        };
        if !known || (a.kind != "data" && kinds.contains(&a.kind.as_str())) {
            return Some(format!(
                "it lists an artifact of kind {:?} twice or of no known kind",
                a.kind
            ));
        }
        if !a.tables.is_empty() && a.kind != "data" {
            return Some(format!(
                "its {} artifact lists tables; only data artifacts hold tables (was the manifest altered?)",
                a.kind
            ));
        }
        kinds.push(&a.kind);
        if let Some(p) = name_problem(a) {
            return Some(p);
        }
        if !signed
            && matches!(job.encryption, Encryption::Age { .. })
            && a.encryption == ArtifactEncryption::None
        {
            return Some(format!(
                "job \"{}\" encrypts its backups, but artifact {} is stored unencrypted: refused as an encryption downgrade (if the job really was unencrypted then, read it with a config whose job says encryption = \"none\")",
                job.name, a.file
            ));
        }
    }
    let sections = ["pre-data", "post-data"]
        .iter()
        .filter(|k| kinds.contains(k))
        .count();
    let in_streams = sections > 0 || kinds.contains(&"data") || kinds.contains(&"data-rest");
    if in_streams {
        if sections != 2 || !kinds.contains(&"data-rest") || kinds.contains(&"database") {
            return Some(
                "it mixes a backup in streams (pre-data, data, data-rest, post-data) with other artifacts, or lacks one of them: not a backup backstop wrote".into(),
            );
        }
        if m.dump.streams.is_none_or(|n| n == 0 || n > 64) {
            return Some(
                "a backup in streams must say how many streams (1 to 64) it was dumped with".into(),
            );
        }
        return parts_problem(m);
    }
    if !kinds.contains(&wanted) {
        return Some(format!("it lists no {wanted} artifact: not a backup"));
    }
    None
}

/// Why the data artifacts of a backup in streams do not hold each table
/// exactly once: every part of `of` in one artifact, none twice.
fn parts_problem(m: &Manifest) -> Option<String> {
    let mut seen: std::collections::BTreeMap<(&str, &str), (u64, Vec<u64>)> =
        std::collections::BTreeMap::new();
    for t in m.artifacts_of("data").flat_map(|a| &a.tables) {
        let entry = seen
            .entry((t.schema.as_str(), t.name.as_str()))
            .or_insert((t.of, Vec::new()));
        if entry.0 != t.of || t.of == 0 || t.parts.iter().any(|&p| p == 0 || p > t.of) {
            return Some(format!(
                "its data artifacts disagree on how many parts table {}.{} has (was the manifest altered?)",
                t.schema, t.name
            ));
        }
        entry.1.extend(&t.parts);
    }
    for ((schema, name), (of, mut parts)) in seen {
        parts.sort_unstable();
        if parts != (1..=of).collect::<Vec<_>>() {
            return Some(format!(
                "its data artifacts hold parts {parts:?} of table {schema}.{name}, which has {of}: a part is missing or listed twice (was the manifest altered?)"
            ));
        }
    }
    None
}

/// Why an artifact's file name does not say what its manifest entry says
/// (`database.dump.zst.age` is custom format, zstd, age).
fn name_problem(a: &manifest::Artifact) -> Option<String> {
    let mut rest = a.file.as_str();
    let encrypted = matches!(a.encryption, ArtifactEncryption::Age { .. });
    let age = rest.ends_with(".age");
    if age {
        rest = &rest[..rest.len() - 4];
    }
    let zst = rest.ends_with(".zst");
    if zst {
        rest = &rest[..rest.len() - 4];
    }
    // A data artifact is data-<n>: its stream's number.
    let kind_prefix = match a.kind.as_str() {
        "data" => rest
            .strip_prefix("data-")
            .and_then(|r| r.split_once('.'))
            .filter(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .map(|(n, _)| format!("data-{n}")),
        k => Some(k.to_string()),
    };
    let format = match kind_prefix
        .and_then(|k| rest.strip_prefix(k.as_str()))
        .and_then(|r| r.strip_prefix('.'))
    {
        Some("dump") => "custom",
        Some("sql") => "plain",
        _ => "",
    };
    let compressed = a.compression.starts_with("zstd");
    let ok = age == encrypted
        && zst == compressed
        && (compressed || a.compression == "none")
        && format == a.format
        && (a.kind != "globals" || format == "plain")
        && (a.kind != "data" || format == "plain")
        && (!matches!(a.kind.as_str(), "pre-data" | "post-data" | "data-rest")
            || format == "custom");
    (!ok).then(|| {
        format!(
            "its artifact {} is listed as {} format, compression {}, {}: the name says otherwise (was the manifest altered?)",
            a.file,
            a.format,
            a.compression,
            if encrypted { "encrypted" } else { "unencrypted" }
        )
    })
}

/// The key of the signature of the object at `key`.
pub fn signature_key(key: &str) -> String {
    format!("{key}{SIGNATURE_SUFFIX}")
}

/// Signs `body`, to be stored at `key`, with the config's signing key: the
/// signature file to store first and the key's id.
pub fn sign(
    signer: Option<&SigningKey>,
    key: &str,
    body: &[u8],
) -> Option<(String, Bytes, String)> {
    signer.map(|s| {
        (
            signature_key(key),
            Bytes::from(s.sign(body, key)),
            s.public().id(),
        )
    })
}

/// Stores `body` at `key`, its signature first when there is a signer (an
/// object is never visible unsigned where signatures are required).
///
/// # Errors
/// The store's error.
pub async fn put_signed(
    storage: &dyn Storage,
    signer: Option<&SigningKey>,
    key: &str,
    body: Bytes,
) -> Result<Option<String>, StorageError> {
    let signed = sign(signer, key, &body);
    let by = match signed {
        Some((sig_key, sig, by)) => {
            storage.put(&sig_key, sig).await?;
            Some(by)
        }
        None => None,
    };
    storage.put(key, body).await?;
    Ok(by)
}

/// How one stored object read: its body and signature, or why not.
pub(crate) enum Read {
    Body(Bytes, Option<Bytes>),
    /// It vanished since it was listed (a prune in between).
    Gone,
    /// It cannot be read for a reason that will not pass (too large, a key
    /// the store refuses, access denied, archived…): an untrusted object,
    /// not a failed listing.
    Refused(String),
}

/// The listed object at `key` of `size` bytes, at most `limit` of them.
async fn read_one(
    storage: &dyn Storage,
    key: &str,
    size: u64,
    limit: u64,
) -> Result<Read, StorageError> {
    if size > limit {
        return Ok(Read::Refused(format!(
            "{size} bytes, over the {limit} it may have; not read"
        )));
    }
    if size == 0 {
        // No ranged read of an empty object (S3 answers one with 416).
        return Ok(Read::Body(Bytes::new(), None));
    }
    match storage.get_capped(key, limit).await {
        Ok(b) => Ok(Read::Body(b, None)),
        Err(StorageError::NotFound(_)) => Ok(Read::Gone),
        Err(e) if e.is_retryable() => Err(e),
        Err(e) => Ok(Read::Refused(format!("it cannot be read: {e}"))),
    }
}

/// Reads the object at `key` (listed at `size` bytes; at most `limit`
/// read) and its signature, if the listing shows one (of `signature`
/// bytes).
///
/// # Errors
/// A transient store error: the caller's listing is not complete.
pub(crate) async fn read_signed(
    storage: &dyn Storage,
    key: &str,
    size: u64,
    limit: u64,
    signature: Option<u64>,
) -> Result<Read, StorageError> {
    let body = match read_one(storage, key, size, limit).await? {
        Read::Body(b, _) => b,
        other => return Ok(other),
    };
    let sig = match signature {
        None => None,
        Some(n) => match read_one(storage, &signature_key(key), n, MAX_SIGNATURE_BYTES).await? {
            Read::Body(s, _) => Some(s),
            Read::Gone => None,
            Read::Refused(why) => return Ok(Read::Refused(format!("its signature: {why}"))),
        },
    };
    Ok(Read::Body(body, sig))
}

/// Splits a series' listing into backup folders: folder name → objects.
/// Keys the store itself would refuse (a `.`-segment, an empty segment)
/// are returned apart: nothing here wrote them, and reading them would
/// fail the whole listing.
pub fn folders(
    prefix: &str,
    objects: Vec<ObjectMeta>,
) -> (BTreeMap<String, Vec<ObjectMeta>>, Vec<Untrusted>) {
    let mut out: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
    let mut refused = Vec::new();
    for o in objects {
        let Some(rest) = o.key.strip_prefix(prefix) else {
            continue;
        };
        let id = rest.split('/').next().unwrap_or("").to_string();
        if !is_valid_key(&o.key) {
            refused.push(Untrusted {
                backup_id: None,
                reason: "a key the store refuses to read (an empty or dot segment): not written by backstop".into(),
                key: o.key,
            });
            continue;
        }
        if rest.contains('/') {
            out.entry(id).or_default().push(o);
        }
    }
    (out, refused)
}

/// Every backup of series `job` in `storage`: the trusted ones (newest
/// first) and the untrusted ones with their reasons.
///
/// # Errors
/// A listing failure, or a read failure other than the object vanishing
/// or being refused: the caller must not treat it as "no backups".
pub async fn list_backups(
    storage: &dyn Storage,
    job: &JobConfig,
    trust: &Trust,
) -> Result<Listing, StorageError> {
    let prefix = format!("{}/", job.name);
    let (folders, refused) = folders(&prefix, storage.list(&prefix).await?);
    let mut listing = read_backups(storage, job, trust, &folders).await?;
    listing.untrusted.extend(refused);
    Ok(listing)
}

/// The backups of series `job` among `folders` (as [`folders`] made them
/// from one listing): every folder with a manifest is read and judged.
///
/// # Errors
/// As [`list_backups`].
pub async fn read_backups(
    storage: &dyn Storage,
    job: &JobConfig,
    trust: &Trust,
    folders: &BTreeMap<String, Vec<ObjectMeta>>,
) -> Result<Listing, StorageError> {
    let prefix = format!("{}/", job.name);
    let mut untrusted = Vec::new();
    let mut wanted = Vec::new();
    for (id, objs) in folders {
        let key = format!("{prefix}{id}/{}", manifest::MANIFEST_FILE);
        let Some(o) = objs.iter().find(|o| o.key == key) else {
            continue;
        };
        let signature = objs
            .iter()
            .find(|s| s.key == signature_key(&key))
            .map(|s| s.size);
        wanted.push((id.clone(), key, o.size, signature));
    }
    // Several reads in flight: a store's latency, not its bandwidth, is
    // what a listing of many small manifests waits for.
    let mut reads = futures::stream::iter(wanted.into_iter().map(
        |(id, key, size, signature)| async move {
            let read = read_signed(storage, &key, size, MAX_MANIFEST_BYTES, signature).await;
            (id, key, read)
        },
    ))
    .buffered(READS_IN_FLIGHT);
    let mut backups = Vec::new();
    while let Some((id, key, read)) = reads.next().await {
        match read? {
            Read::Gone => {}
            Read::Refused(reason) => untrusted.push(Untrusted {
                key,
                backup_id: Some(id),
                reason,
            }),
            Read::Body(body, sig) => {
                match trust_manifest(job, &id, &key, &body, sig.as_deref(), trust) {
                    Ok(m) => backups.push(m),
                    Err(reason) => untrusted.push(Untrusted {
                        key,
                        backup_id: Some(id),
                        reason,
                    }),
                }
            }
        }
    }
    // Newest first by start time (ids have one-second resolution and a random
    // suffix, so two backups in one second would otherwise sort by chance).
    backups.sort_by(|a, b| {
        b.started_at
            .cmp(&a.started_at)
            .then_with(|| b.backup_id.cmp(&a.backup_id))
    });
    Ok(Listing { backups, untrusted })
}

/// The manifest stored at `key` (folder `id` of series `job`), if it can be
/// trusted there.
///
/// # Errors
/// Why not, in a sentence.
pub fn trust_manifest(
    job: &JobConfig,
    id: &str,
    key: &str,
    body: &[u8],
    sig: Option<&[u8]>,
    trust: &Trust,
) -> Result<Trusted<Manifest>, String> {
    // The signature first: for a forgery, "not signed" is the news.
    let signed_by = trust.signature(key, body, sig)?;
    let m: Manifest = match serde_json::from_slice(body) {
        Ok(m) => m,
        Err(e) => {
            // A newer format may not parse at all; say which it is.
            let version = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("format_version").and_then(serde_json::Value::as_u64));
            return Err(match version {
                Some(v) if v > u64::from(manifest::FORMAT_VERSION) => format!(
                    "manifest format {v} is newer than this backstop understands ({}); upgrade backstop to read it",
                    manifest::FORMAT_VERSION
                ),
                _ => format!("it is not a manifest ({e})"),
            });
        }
    };
    match manifest_problem(&m, job, id, trust.now, signed_by.is_some()) {
        Some(p) => Err(p),
        None => Ok(Trusted {
            inner: m,
            signed_by,
        }),
    }
}

#[cfg(test)]
mod tests;
