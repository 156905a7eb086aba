//! Secrets the service reads as systemd credentials, found by one-shot
//! commands too. `LoadCredential=NAME:SOURCE` in the unit puts SOURCE at
//! `/run/credentials/backstop.service/NAME`, which exists only inside the
//! service. A command run from a shell (`check-config`, `backup`,
//! `ip-allow` …) reads SOURCE instead, as the unit and its drop-ins name
//! it, so a config that points at credentials works there too.

use std::path::{Path, PathBuf};

use backstop_vocab::unit;

/// Where systemd puts the service's credentials.
pub const DIR: &str = "/run/credentials/backstop.service";

/// Where a credential of the service comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file (`LoadCredential=NAME:PATH`, or NAME in a credential store).
    File(PathBuf),
    /// `LoadCredentialEncrypted=`: only the service can decrypt it.
    Encrypted,
}

/// The source the unit's `[Service]` settings give credential `name`:
/// `LoadCredential=` and `LoadCredentialEncrypted=` share one list, the
/// last line for a name wins, an empty one clears the list, and a source
/// that is not an absolute path (or missing: `LoadCredential=NAME`) is
/// looked up in the credential stores, as systemd does.
fn source_in(settings: &[(String, String)], name: &str) -> Option<Source> {
    let mut found = None;
    for (key, value) in settings {
        let encrypted = match key.as_str() {
            "LoadCredential" => false,
            "LoadCredentialEncrypted" => true,
            _ => continue,
        };
        if value.is_empty() {
            found = None;
            continue;
        }
        let (id, src) = value.split_once(':').unwrap_or((value.as_str(), ""));
        if id == name {
            found = Some((encrypted, src.to_string()));
        }
    }
    let (encrypted, src) = found?;
    if encrypted {
        return Some(Source::Encrypted);
    }
    if Path::new(&src).is_absolute() {
        return Some(Source::File(PathBuf::from(src)));
    }
    // A credential store name: no folders, no "..".
    let stored = if src.is_empty() { name } else { src.as_str() };
    if stored.contains('/') || stored == ".." {
        return None;
    }
    ["/etc/credstore", "/run/credstore", "/usr/lib/credstore"]
        .iter()
        .map(|d| Path::new(d).join(stored))
        .find(|p| p.exists())
        .map(Source::File)
}

/// Where a one-shot command reads the secret file `path`: the credential's
/// source when `path` is one of the service's credentials and this process
/// is not the service (its `CREDENTIALS_DIRECTORY` is not this folder);
/// `None` otherwise.
pub fn outside_the_service(path: &Path) -> Option<Source> {
    let inside =
        std::env::var_os("CREDENTIALS_DIRECTORY").is_some_and(|d| Path::new(&d) == Path::new(DIR));
    if inside || path.exists() {
        return None;
    }
    let name = path.strip_prefix(DIR).ok()?.to_str()?;
    if name.is_empty() || name.contains('/') {
        return None;
    }
    source_in(&unit::service_settings(), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(texts: &[&str]) -> Vec<(String, String)> {
        unit::settings(&texts.iter().map(|t| t.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn the_last_load_credential_of_a_name_wins_and_an_empty_one_clears() {
        let unit = "[Service]\nLoadCredential=db-password:/etc/backstop/secrets/db-password\n#LoadCredential=api-token:/nope\nLoadCredential=api-token:/etc/backstop/secrets/api-token\n";
        let drop_in = "[Service]\nLoadCredential=db-password:/srv/secrets/db\n";
        let s = settings(&[unit, drop_in]);
        let file = |p: &str| Some(Source::File(p.into()));
        assert_eq!(source_in(&s, "db-password"), file("/srv/secrets/db"));
        assert_eq!(
            source_in(&s, "api-token"),
            file("/etc/backstop/secrets/api-token")
        );
        assert_eq!(source_in(&s, "signing-key"), None);
        assert_eq!(
            source_in(
                &settings(&[unit, "[Service]\nLoadCredential=\n"]),
                "db-password"
            ),
            None
        );
        // An encrypted one replaces a plain one of the same name, and the
        // other way round; an empty LoadCredentialEncrypted= clears both.
        let enc = "[Service]\nLoadCredentialEncrypted=db-password:/etc/credstore.encrypted/db\n";
        assert_eq!(
            source_in(&settings(&[unit, enc]), "db-password"),
            Some(Source::Encrypted)
        );
        assert_eq!(
            source_in(&settings(&[enc, unit]), "db-password"),
            file("/etc/backstop/secrets/db-password")
        );
        assert_eq!(
            source_in(
                &settings(&[unit, "[Service]\nLoadCredentialEncrypted=\n"]),
                "api-token"
            ),
            None
        );
        // Not in [Service], or a store name that climbs out: nothing.
        assert_eq!(
            source_in(&settings(&["[Unit]\nLoadCredential=x:/etc/x\n"]), "x"),
            None
        );
        assert_eq!(
            source_in(
                &settings(&["[Service]\nLoadCredential=x:../../etc/shadow\n"]),
                "x"
            ),
            None
        );
    }
}
