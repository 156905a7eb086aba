//! Encryption stage of the flow: age streaming encryption to public recipients
//! (and decryption with an identity, for verify and restore).
//!
//! The only crate that imports `age`. Backing up needs public keys only; an
//! identity (private key) is read solely by decrypting verify and restore.

pub mod sign;

use std::io::{self, BufRead, Read, Write};
use std::path::Path;
use std::str::FromStr;

use age::secrecy::ExposeSecret;

/// Why a cryptographic step failed.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("malformed age recipient {shown:?}: {reason}")]
    BadRecipient { shown: String, reason: String },
    #[error("no age recipients given")]
    NoRecipients,
    #[error("cannot start age encryption: {0}")]
    Encrypt(String),
    #[error("cannot read age identity file {path}: {reason}")]
    Identity { path: String, reason: String },
    #[error("cannot decrypt: {0} (is this the identity matching the job's recipients?)")]
    Decrypt(String),
    /// Self-contained: the I/O error's text is in the message.
    #[error("age stream I/O failed: {0}")]
    Io(io::Error),
}

impl From<io::Error> for CryptoError {
    fn from(e: io::Error) -> Self {
        CryptoError::Io(e)
    }
}

/// Parses one age X25519 recipient (`age1…`).
///
/// # Errors
/// [`CryptoError::BadRecipient`] naming (a prefix of) what was given.
pub fn parse_recipient(s: &str) -> Result<age::x25519::Recipient, CryptoError> {
    age::x25519::Recipient::from_str(s.trim()).map_err(|reason| CryptoError::BadRecipient {
        shown: s.chars().take(16).collect::<String>()
            + if s.chars().count() > 16 { "…" } else { "" },
        reason: reason.to_string(),
    })
}

/// A writer that encrypts everything written to it to the given recipients.
///
/// Completion is explicit: [`EncryptWriter::finish`] writes the final
/// authenticated chunk; dropping the writer without it leaves a truncated,
/// undecryptable stream.
#[must_use = "call finish() or the age stream is truncated"]
pub struct EncryptWriter<W: Write> {
    inner: age::stream::StreamWriter<W>,
}

impl<W: Write> EncryptWriter<W> {
    /// Starts an age stream on `out` encrypted to `recipients`.
    ///
    /// # Errors
    /// A malformed recipient, none at all, or a write error on the header.
    pub fn new(recipients: &[String], out: W) -> Result<Self, CryptoError> {
        if recipients.is_empty() {
            return Err(CryptoError::NoRecipients);
        }
        let parsed = recipients
            .iter()
            .map(|r| parse_recipient(r))
            .collect::<Result<Vec<_>, _>>()?;
        let encryptor =
            age::Encryptor::with_recipients(parsed.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| CryptoError::Encrypt(e.to_string()))?;
        let inner = encryptor.wrap_output(out)?;
        Ok(Self { inner })
    }

    /// Writes the last chunk and returns the underlying writer.
    ///
    /// # Errors
    /// A write error from the underlying writer.
    pub fn finish(self) -> Result<W, CryptoError> {
        Ok(self.inner.finish()?)
    }
}

impl<W: Write> Write for EncryptWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Identities (private keys) loaded from an age identity file.
pub struct Identities(Vec<Box<dyn age::Identity + Send + Sync>>);

impl Identities {
    /// Reads an age identity file (`AGE-SECRET-KEY-1…` lines, comments allowed).
    ///
    /// # Errors
    /// [`CryptoError::Identity`] when it cannot be read or parsed.
    pub fn from_file(path: &Path) -> Result<Self, CryptoError> {
        let err = |reason: String| CryptoError::Identity {
            path: path.display().to_string(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
        let ids = age::IdentityFile::from_buffer(io::BufReader::new(file))
            .map_err(|e| err(e.to_string()))?
            .into_identities()
            .map_err(|e| err(e.to_string()))?;
        if ids.is_empty() {
            return Err(err("no identities in file".into()));
        }
        Ok(Self(ids))
    }

    /// Wraps `input` (an age file) in a reader yielding the plaintext.
    ///
    /// # Errors
    /// [`CryptoError::Decrypt`] when no identity matches or the header is bad.
    pub fn decrypt<R: BufRead>(&self, input: R) -> Result<impl Read + use<R>, CryptoError> {
        let d =
            age::Decryptor::new_buffered(input).map_err(|e| CryptoError::Decrypt(e.to_string()))?;
        d.decrypt(self.0.iter().map(|i| i.as_ref() as &dyn age::Identity))
            .map_err(|e| CryptoError::Decrypt(e.to_string()))
    }
}

/// A freshly generated X25519 key pair: (identity file line, recipient).
/// Used by the demo and tests; production keys come from `age-keygen`.
pub fn generate_keypair() -> (String, String) {
    let id = age::x25519::Identity::generate();
    let recipient = id.to_public().to_string();
    (id.to_string().expose_secret().to_string(), recipient)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let (secret, public) = generate_keypair();
        let mut w = EncryptWriter::new(&[public], Vec::new()).unwrap();
        w.write_all(b"hello backstop").unwrap();
        let ct = w.finish().unwrap();
        let dir = tempfile_dir();
        let idp = dir.join("id.txt");
        std::fs::write(&idp, format!("{secret}\n")).unwrap();
        let ids = Identities::from_file(&idp).unwrap();
        let mut out = String::new();
        ids.decrypt(&ct[..])
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "hello backstop");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_recipient_is_named_not_echoed_in_full() {
        let e = parse_recipient("age1thisisnotakeyatallbutlong").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("malformed age recipient \"age1thisisnotake…\""),
            "{msg}"
        );
    }

    #[test]
    fn no_recipients_is_an_error() {
        assert!(matches!(
            EncryptWriter::new(&[], Vec::new()),
            Err(CryptoError::NoRecipients)
        ));
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("backstop-crypto-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
