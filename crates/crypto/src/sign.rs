//! Signatures on what the backup host writes to a store (manifests and
//! verification records), in minisign's format: Ed25519 over a BLAKE2b
//! prehash, with a signed ("trusted") comment naming the object. Debian's
//! stock `minisign -Vm manifest.json -p key.pub` verifies them with no
//! backstop.
//!
//! The backup host holds a [`SigningKey`] (a minisign secret key without
//! a password: it signs unattended); hosts that only read hold
//! [`TrustedKeys`]. Several trusted keys make rotation possible.

use std::fmt;
use std::io::Cursor;

/// The signature file's suffix beside the object it signs.
pub const SIGNATURE_SUFFIX: &str = ".minisig";
/// The largest signature file read (minisign's are about 330 bytes).
pub const MAX_SIGNATURE_BYTES: u64 = 4096;
/// What every trusted comment starts with; the object's key follows.
const COMMENT_PREFIX: &str = "backstop object:";

/// Why a key or signature could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not a minisign secret key ({0}); make one with `backstop keygen --out FILE`")]
    BadSecretKey(String),
    #[error(
        "the signing key is protected by a password, and backstop signs unattended: make a key with `backstop keygen --out FILE` (or `minisign -G -W`)"
    )]
    Encrypted,
    #[error(
        "{shown:?} is not a minisign public key ({reason}); it is the `RW…` line `backstop keygen` prints"
    )]
    BadPublicKey { shown: String, reason: String },
    #[error("cannot make a key pair: {0}")]
    Generate(String),
}

/// A public key: what `trusted_keys` lists.
#[derive(Clone)]
pub struct PublicKey {
    key: minisign::PublicKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.id())
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.key.to_base64() == other.key.to_base64()
    }
}

impl PublicKey {
    /// Parses the one-line base64 form (`RW…`, as minisign's `.pub` file's
    /// second line).
    ///
    /// # Errors
    /// [`KeyError::BadPublicKey`].
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let bad = |reason: &str| KeyError::BadPublicKey {
            shown: s.chars().take(12).collect::<String>()
                + if s.chars().count() > 12 { "…" } else { "" },
            reason: reason.to_string(),
        };
        let key = minisign::PublicKey::from_base64(s.trim())
            .map_err(|_| bad("56 base64 characters starting RW expected"))?;
        if !s.trim().starts_with("RW") {
            return Err(bad("not an Ed25519 key"));
        }
        Ok(Self { key })
    }

    /// The key id as minisign prints it (16 hex digits).
    pub fn id(&self) -> String {
        key_id(self.key.keynum())
    }

    /// The one-line base64 form.
    pub fn to_base64(&self) -> String {
        self.key.to_base64()
    }

    /// The content of a minisign `.pub` file.
    pub fn to_file(&self) -> String {
        format!(
            "untrusted comment: minisign public key {}\n{}\n",
            self.id(),
            self.to_base64()
        )
    }
}

fn key_id(keynum: &[u8]) -> String {
    let mut b = [0u8; 8];
    let n = keynum.len().min(8);
    b[..n].copy_from_slice(&keynum[..n]);
    format!("{:016X}", u64::from_le_bytes(b))
}

/// The backup host's key. `Debug` never shows the secret.
pub struct SigningKey {
    secret: minisign::SecretKey,
    public: PublicKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}, secret hidden)", self.public.id())
    }
}

impl SigningKey {
    /// Parses a minisign secret key file's content (without a password).
    ///
    /// # Errors
    /// [`KeyError::Encrypted`] for a password-protected key,
    /// [`KeyError::BadSecretKey`] otherwise.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let b = minisign::SecretKeyBox::from_string(text)
            .map_err(|e| KeyError::BadSecretKey(e.to_string()))?;
        let secret = b.into_unencrypted_secret_key().map_err(|e| {
            if e.to_string().contains("encrypted") {
                KeyError::Encrypted
            } else {
                KeyError::BadSecretKey(e.to_string())
            }
        })?;
        if secret.is_encrypted() {
            return Err(KeyError::Encrypted);
        }
        let public = minisign::PublicKey::from_secret_key(&secret)
            .map_err(|e| KeyError::BadSecretKey(e.to_string()))?;
        Ok(Self {
            secret,
            public: PublicKey { key: public },
        })
    }

    /// A new key pair: the secret key file's content and the key.
    ///
    /// # Errors
    /// [`KeyError::Generate`] when the system's randomness fails.
    pub fn generate() -> Result<(String, Self), KeyError> {
        let pair = minisign::KeyPair::generate_unencrypted_keypair()
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        let text = pair
            .sk
            .to_box(Some(
                "backstop signing key (no password: it signs unattended)",
            ))
            .map_err(|e| KeyError::Generate(e.to_string()))?
            .into_string();
        let key = Self::parse(&text)?;
        Ok((text, key))
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The signature file for `data` stored at `key`: its trusted comment
    /// names the key, so a signature vouches for that object there.
    pub fn sign(&self, data: &[u8], key: &str) -> String {
        let comment = trusted_comment(key);
        minisign::sign(
            Some(&self.public.key),
            &self.secret,
            Cursor::new(data),
            Some(&comment),
            Some(&format!("signature from backstop key {}", self.public.id())),
        )
        .expect("signing with an unencrypted key in memory does not fail")
        .into_string()
    }
}

fn trusted_comment(key: &str) -> String {
    // Keys are printable and never hold line breaks (the stores refuse
    // them), but a comment must stay one line whatever it is given.
    let key: String = key.chars().filter(|c| !c.is_control()).collect();
    format!("{COMMENT_PREFIX}{key}")
}

/// Why a signature does not vouch for an object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureProblem {
    #[error("it is not signed (no {SIGNATURE_SUFFIX} beside it)")]
    Missing,
    #[error("its signature cannot be read ({0})")]
    Unreadable(String),
    #[error("it is signed by key {0}, which is not in trusted_keys")]
    UnknownKey(String),
    #[error("its signature by key {0} does not match it: it was altered after signing")]
    Bad(String),
    #[error("its signature by key {key} was made for {signed_for:?}, not for this object")]
    OtherObject { key: String, signed_for: String },
}

/// The public keys a reader trusts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrustedKeys(Vec<PublicKey>);

impl TrustedKeys {
    pub fn new(keys: Vec<PublicKey>) -> Self {
        let mut out: Vec<PublicKey> = Vec::new();
        for k in keys {
            if !out.contains(&k) {
                out.push(k);
            }
        }
        Self(out)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.0
    }

    /// Checks that `signature` (a `.minisig` file's content) is a trusted
    /// key's signature of `data` stored at `key`, and returns that key's id.
    ///
    /// # Errors
    /// Why it does not vouch for it.
    pub fn verify(
        &self,
        data: &[u8],
        signature: &[u8],
        key: &str,
    ) -> Result<String, SignatureProblem> {
        let text = std::str::from_utf8(signature)
            .map_err(|_| SignatureProblem::Unreadable("not text".into()))?;
        let sig = minisign::SignatureBox::from_string(text)
            .map_err(|e| SignatureProblem::Unreadable(e.to_string()))?;
        let id = key_id(sig.keynum());
        let Some(pk) = self.0.iter().find(|k| k.key.keynum() == sig.keynum()) else {
            return Err(SignatureProblem::UnknownKey(id));
        };
        minisign::verify(&pk.key, &sig, Cursor::new(data), true, false, false)
            .map_err(|_| SignatureProblem::Bad(id.clone()))?;
        let comment = sig
            .trusted_comment()
            .map_err(|e| SignatureProblem::Unreadable(e.to_string()))?;
        if comment != trusted_comment(key) {
            return Err(SignatureProblem::OtherObject {
                key: id,
                signed_for: comment
                    .strip_prefix(COMMENT_PREFIX)
                    .unwrap_or(&comment)
                    .chars()
                    .take(200)
                    .collect(),
            });
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_for_its_object_and_nothing_else() {
        let (text, key) = SigningKey::generate().unwrap();
        assert!(!format!("{key:?}").contains(&text[40..80]));
        let trusted = TrustedKeys::new(vec![key.public().clone()]);
        let sig = key.sign(b"{\"a\":1}", "job/id/manifest.json");
        assert_eq!(
            trusted.verify(b"{\"a\":1}", sig.as_bytes(), "job/id/manifest.json"),
            Ok(key.public().id())
        );
        assert_eq!(
            trusted.verify(b"{\"a\":2}", sig.as_bytes(), "job/id/manifest.json"),
            Err(SignatureProblem::Bad(key.public().id()))
        );
        assert!(matches!(
            trusted.verify(b"{\"a\":1}", sig.as_bytes(), "other/id/manifest.json"),
            Err(SignatureProblem::OtherObject { .. })
        ));
        let (_, stranger) = SigningKey::generate().unwrap();
        let theirs = stranger.sign(b"{\"a\":1}", "job/id/manifest.json");
        assert_eq!(
            trusted.verify(b"{\"a\":1}", theirs.as_bytes(), "job/id/manifest.json"),
            Err(SignatureProblem::UnknownKey(stranger.public().id()))
        );
        assert!(matches!(
            trusted.verify(b"x", b"garbage", "k"),
            Err(SignatureProblem::Unreadable(_))
        ));
        // A flipped byte in the signature line.
        let mut lines: Vec<String> = sig.lines().map(str::to_string).collect();
        let mut l1: Vec<char> = lines[1].chars().collect();
        l1[20] = if l1[20] == 'A' { 'B' } else { 'A' };
        lines[1] = l1.into_iter().collect();
        let tampered = lines.join("\n");
        assert!(
            trusted
                .verify(b"{\"a\":1}", tampered.as_bytes(), "job/id/manifest.json")
                .is_err()
        );
    }

    #[test]
    fn keys_round_trip_and_bad_ones_are_named() {
        let (text, key) = SigningKey::generate().unwrap();
        let again = SigningKey::parse(&text).unwrap();
        assert_eq!(again.public(), key.public());
        let pk = PublicKey::parse(&key.public().to_base64()).unwrap();
        assert_eq!(&pk, key.public());
        assert!(key.public().to_file().contains(&key.public().id()));
        let e = PublicKey::parse("RWnotakey").unwrap_err().to_string();
        assert!(e.contains("not a minisign public key"), "{e}");
        assert!(SigningKey::parse("nonsense").is_err());
    }
}
