//! Reading a stored artifact back: store → (size, sha256) → age decrypt →
//! zstd → (size, sha256) → a consumer (pg_restore, psql, a file, nothing).
//!
//! The whole chain runs on one blocking thread with fixed-size buffers; the
//! store's async reader is bridged into it. Both ends are measured so the
//! result can be held against the manifest once the stream has been read to
//! its end. age authenticates every 64 KiB chunk and the final one, so a
//! flipped or missing byte in an encrypted artifact stops the stream before
//! any of its plaintext reaches the consumer.

use std::io::{self, BufReader, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use backstop_crypto::Identities;
use backstop_storage::Storage;
use sha2::{Digest, Sha256};
use tokio::io::AsyncRead;
use tokio_util::io::SyncIoBridge;

use crate::manifest::{Artifact, ArtifactEncryption};
use crate::psql_guard::PsqlGuard;
use crate::read::copy_select::CopySelect;

/// Size of the buffer between the plain reader and the consumer.
const COPY_BUF: usize = 256 * 1024;

/// Counts and hashes the bytes passing one point of the chain.
#[derive(Default)]
pub struct Meter {
    bytes: AtomicU64,
    hasher: Mutex<Sha256>,
}

impl Meter {
    fn add(&self, data: &[u8]) {
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.hasher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .update(data);
    }

    /// Bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn sha256(&self) -> String {
        let h = self
            .hasher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        hex::encode(h.finalize())
    }
}

struct Metered<R> {
    inner: R,
    meter: Arc<Meter>,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.meter.add(&buf[..n]);
        Ok(n)
    }
}

/// Why reading an artifact back failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadbackError {
    #[error("{0}")]
    Open(String),
    #[error(
        "artifact {0} is age-encrypted and no identity was given: pass --identity FILE (the age identity matching the job's recipients) or set identity_file in the job"
    )]
    NoIdentity(String),
    #[error(transparent)]
    Decrypt(#[from] backstop_crypto::CryptoError),
    #[error("reading {key} failed after {stored_bytes} stored bytes")]
    Read {
        key: String,
        stored_bytes: u64,
        /// The store's client often wraps the real cause (e.g. a response
        /// checksum mismatch) in a generic "streaming error": its sources
        /// are kept, not flattened.
        #[source]
        error: io::Error,
    },
    #[error("writing to {consumer} failed: {reason}")]
    Write { consumer: String, reason: String },
    #[error("{0}")]
    Mismatch(String),
    /// The psql guard stopped a plain-SQL stream at a backslash command.
    #[error("refused to pass the artifact to psql")]
    Refused(#[source] crate::psql_guard::Refused),
}

/// The two meters of one read.
#[derive(Clone, Default)]
pub struct Meters {
    pub stored: Arc<Meter>,
    pub plain: Arc<Meter>,
}

impl Meters {
    /// Compares what was read with the manifest; call only after reading to the end.
    ///
    /// # Errors
    /// [`ReadbackError::Mismatch`] naming every difference.
    pub fn check(&self, a: &Artifact) -> Result<(), ReadbackError> {
        let mut problems = Vec::new();
        let (sb, ss) = (self.stored.bytes(), self.stored.sha256());
        if sb != a.stored_bytes {
            problems.push(format!(
                "stored size {sb} bytes, manifest says {}",
                a.stored_bytes
            ));
        } else if ss != a.stored_sha256 {
            problems.push(format!(
                "stored sha256 {ss}, manifest says {}",
                a.stored_sha256
            ));
        }
        let (pb, ps) = (self.plain.bytes(), self.plain.sha256());
        if pb != a.plain_bytes {
            problems.push(format!(
                "plain size {pb} bytes, manifest says {}",
                a.plain_bytes
            ));
        } else if ps != a.plain_sha256 {
            problems.push(format!(
                "plain sha256 {ps}, manifest says {}",
                a.plain_sha256
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ReadbackError::Mismatch(format!(
                "{}: {}",
                a.key,
                problems.join("; ")
            )))
        }
    }
}

impl Meters {
    /// Compares the stored bytes read with the manifest (for as-stored downloads).
    ///
    /// # Errors
    /// [`ReadbackError::Mismatch`].
    pub fn check_stored(&self, a: &Artifact) -> Result<(), ReadbackError> {
        let (sb, ss) = (self.stored.bytes(), self.stored.sha256());
        if sb != a.stored_bytes {
            Err(ReadbackError::Mismatch(format!(
                "{}: stored size {sb} bytes, manifest says {}",
                a.key, a.stored_bytes
            )))
        } else if ss != a.stored_sha256 {
            Err(ReadbackError::Mismatch(format!(
                "{}: stored sha256 {ss}, manifest says {}",
                a.key, a.stored_sha256
            )))
        } else {
            Ok(())
        }
    }
}

/// An artifact opened for reading; turn it into the plaintext with
/// [`Opened::plain`] on a blocking thread.
pub struct Opened {
    raw: Box<dyn AsyncRead + Send + Unpin>,
    handle: tokio::runtime::Handle,
    pub artifact: Artifact,
    pub meters: Meters,
    identities: Option<Arc<Identities>>,
}

/// Opens `artifact` in `storage`. Fails early when it is encrypted and no
/// identity was given.
///
/// # Errors
/// [`ReadbackError::NoIdentity`] or [`ReadbackError::Open`].
pub async fn open(
    storage: &dyn Storage,
    artifact: &Artifact,
    identities: Option<Arc<Identities>>,
) -> Result<Opened, ReadbackError> {
    if matches!(artifact.encryption, ArtifactEncryption::Age { .. }) && identities.is_none() {
        return Err(ReadbackError::NoIdentity(artifact.key.clone()));
    }
    let mut opened = open_raw(storage, artifact).await?;
    opened.identities = identities;
    Ok(opened)
}

/// Opens `artifact` for reading its stored bytes as they are.
///
/// # Errors
/// [`ReadbackError::Open`].
pub async fn open_raw(storage: &dyn Storage, artifact: &Artifact) -> Result<Opened, ReadbackError> {
    let raw = storage
        .open(&artifact.key)
        .await
        .map_err(|e| ReadbackError::Open(format!("cannot open {}: {e}", artifact.key)))?;
    Ok(Opened {
        raw,
        handle: tokio::runtime::Handle::current(),
        artifact: artifact.clone(),
        meters: Meters::default(),
        identities: None,
    })
}

impl Opened {
    /// The stored bytes as they are (for downloads of the artifact itself).
    /// Blocking: call on a blocking thread.
    pub fn raw(self) -> PlainReader {
        let stored = Metered {
            inner: SyncIoBridge::new_with_handle(self.raw, self.handle),
            meter: self.meters.stored.clone(),
        };
        PlainReader {
            inner: Metered {
                inner: Box::new(BufReader::with_capacity(COPY_BUF, stored)),
                meter: self.meters.plain.clone(),
            },
            key: self.artifact.key,
            stored: self.meters.stored,
        }
    }

    /// The plaintext reader. Blocking: call on a blocking thread. Reading the
    /// age header happens here, so a wrong identity fails here.
    ///
    /// # Errors
    /// [`ReadbackError::Decrypt`] when no identity matches.
    pub fn plain(self) -> Result<PlainReader, ReadbackError> {
        let stored = Metered {
            inner: SyncIoBridge::new_with_handle(self.raw, self.handle),
            meter: self.meters.stored.clone(),
        };
        let input = BufReader::with_capacity(COPY_BUF, stored);
        let decrypted: Box<dyn Read + Send> = match (&self.artifact.encryption, &self.identities) {
            (ArtifactEncryption::Age { .. }, Some(ids)) => Box::new(ids.decrypt(input)?),
            (ArtifactEncryption::Age { .. }, None) => {
                return Err(ReadbackError::NoIdentity(self.artifact.key));
            }
            (ArtifactEncryption::None, _) => Box::new(input),
        };
        let decompressed: Box<dyn Read + Send> = if self.artifact.compression.starts_with("zstd") {
            Box::new(zstd::stream::read::Decoder::new(decrypted).map_err(|e| {
                ReadbackError::Open(format!("cannot start zstd decompression: {e}"))
            })?)
        } else {
            decrypted
        };
        Ok(PlainReader {
            inner: Metered {
                inner: decompressed,
                meter: self.meters.plain.clone(),
            },
            key: self.artifact.key,
            stored: self.meters.stored,
        })
    }
}

/// The decrypted, decompressed artifact.
pub struct PlainReader {
    inner: Metered<Box<dyn Read + Send>>,
    key: String,
    stored: Arc<Meter>,
}

impl Read for PlainReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

/// How a copy into a consumer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// Every byte was read and handed over.
    All,
    /// The consumer closed its input first (pg_restore stops reading once it
    /// has what it was asked for); the rest was not read.
    ConsumerClosed,
}

impl PlainReader {
    fn read_err(&self, error: io::Error) -> ReadbackError {
        ReadbackError::Read {
            key: self.key.clone(),
            stored_bytes: self.stored.bytes(),
            error,
        }
    }

    /// Copies the plaintext into `out`: only the COPY blocks `select` keeps
    /// (a table restore from a backup in streams), then through `guard`
    /// when psql reads it, so the guard sees exactly what psql will.
    /// A consumer that closes its end early is reported as
    /// [`Copied::ConsumerClosed`], not as an error: whether that was fine is
    /// for its exit status to say. With `drain`, the rest is still read (and
    /// measured) after the consumer closed.
    ///
    /// # Errors
    /// A read failure (store, decryption, decompression), the guard's
    /// refusal (nothing of the refused line was written), or a write
    /// failure other than a closed pipe.
    pub fn copy_to(
        &mut self,
        out: &mut dyn Write,
        consumer: &str,
        drain: bool,
        (mut select, mut guard): (Option<&mut CopySelect>, Option<&mut PsqlGuard>),
    ) -> Result<Copied, ReadbackError> {
        let mut buf = vec![0u8; COPY_BUF];
        let mut selected = Vec::new();
        let mut filtered = Vec::new();
        loop {
            let n = match self.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_err(e)),
            };
            let data = match select.as_deref_mut() {
                Some(s) => {
                    selected.clear();
                    s.filter(&buf[..n], &mut selected)
                        .map_err(|e| ReadbackError::Mismatch(format!("{}: {e}", self.key)))?;
                    &selected[..]
                }
                None => &buf[..n],
            };
            let data = match guard.as_deref_mut() {
                Some(g) => {
                    filtered.clear();
                    g.filter(data, &mut filtered)
                        .map_err(ReadbackError::Refused)?;
                    &filtered[..]
                }
                None => data,
            };
            match out.write_all(data) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    if drain {
                        self.drain()?;
                    }
                    return Ok(Copied::ConsumerClosed);
                }
                Err(e) => {
                    return Err(ReadbackError::Write {
                        consumer: consumer.to_string(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        // What the stages still hold at the end.
        let mut tail = Vec::new();
        if let Some(s) = select {
            s.finish(&mut tail);
        }
        if let Some(g) = guard {
            filtered.clear();
            g.filter(&tail, &mut filtered)
                .map_err(ReadbackError::Refused)?;
            g.finish(&mut filtered).map_err(ReadbackError::Refused)?;
            tail = std::mem::take(&mut filtered);
        }
        if let Err(e) = out.write_all(&tail)
            && e.kind() != io::ErrorKind::BrokenPipe
        {
            return Err(ReadbackError::Write {
                consumer: consumer.to_string(),
                reason: e.to_string(),
            });
        }
        out.flush().map_err(|e| ReadbackError::Write {
            consumer: consumer.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Copied::All)
    }

    /// Reads the rest, only measuring it.
    ///
    /// # Errors
    /// A read failure.
    pub fn drain(&mut self) -> Result<(), ReadbackError> {
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            match self.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_err(e)),
            }
        }
    }
}
