//! `backstop keygen --out FILE`: this host's signing key (a minisign
//! secret key without a password) and its public half.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use backstop_crypto::sign::SigningKey;

use crate::error::{CliError, CmdResult};

pub fn run(out: &Path) -> CmdResult {
    let public = {
        let mut p = out.as_os_str().to_owned();
        p.push(".pub");
        std::path::PathBuf::from(p)
    };
    for p in [out, public.as_path()] {
        if p.exists() {
            return Err(CliError::usage(format!(
                "{} exists already; keygen never overwrites a key (move it away first, or choose another --out)",
                p.display()
            )));
        }
    }
    let (secret, key) = SigningKey::generate().map_err(CliError::failed)?;
    let write = |path: &Path, mode: u32, body: &str| -> Result<(), CliError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| CliError::failed(format!("cannot create {}: {e}", path.display())))?;
        f.write_all(body.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| CliError::failed(format!("cannot write {}: {e}", path.display())))
    };
    write(out, 0o600, &secret)?;
    if let Err(e) = write(&public, 0o644, &key.public().to_file()) {
        let _ = std::fs::remove_file(out);
        return Err(e);
    }
    eprintln!(
        "Wrote the signing key to {} (mode 0600; keep it on the backup host only) and its public key to {}.",
        out.display(),
        public.display()
    );
    eprintln!(
        "On this host: daemon.signing_key_file = \"{}\". On every host that reads the stores (restore, verify, drill): add the public key below to daemon.trusted_keys.",
        out.display()
    );
    println!("{}", key.public().to_base64());
    Ok(())
}
