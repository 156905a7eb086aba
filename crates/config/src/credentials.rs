//! Secrets the service reads as systemd credentials, found by one-shot
//! commands too. `LoadCredential=NAME:SOURCE` in the unit puts SOURCE at
//! `/run/credentials/backstop.service/NAME`, which exists only inside the
//! service. A command run from a shell (`check-config`, `backup`,
//! `ip-allow` …) reads SOURCE instead, as the unit and its drop-ins name
//! it, so a config that points at credentials works there too.

use std::path::{Path, PathBuf};

/// Where systemd puts the service's credentials.
pub const DIR: &str = "/run/credentials/backstop.service";

/// Where systemd looks for the unit and its drop-ins, most important first
/// (a test build: `BACKSTOP_TEST_UNIT_DIRS`, colon-separated).
fn unit_dirs() -> Vec<PathBuf> {
    if let Some(dirs) = backstop_vocab::test_env("BACKSTOP_TEST_UNIT_DIRS") {
        return dirs.split(':').map(PathBuf::from).collect();
    }
    [
        "/etc/systemd/system",
        "/run/systemd/system",
        "/lib/systemd/system",
        "/usr/lib/systemd/system",
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect()
}

/// The unit's files in the order systemd applies them: the first
/// backstop.service found, then every drop-in by file name (a later one
/// overrides an earlier one of the same name in a less important folder).
fn unit_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .map(|d| d.join("backstop.service"))
        .find(|p| p.is_file())
        .into_iter()
        .collect();
    let mut drop_ins: std::collections::BTreeMap<std::ffi::OsString, PathBuf> =
        std::collections::BTreeMap::new();
    for d in dirs.iter().rev() {
        let Ok(entries) = std::fs::read_dir(d.join("backstop.service.d")) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "conf") {
                drop_ins.insert(e.file_name(), p);
            }
        }
    }
    files.extend(drop_ins.into_values());
    files
}

/// The source `LoadCredential=` gives credential `name` in `texts` (the
/// unit's files in order): the last one wins, an empty `LoadCredential=`
/// clears the list, a relative source is looked up where systemd looks
/// (the credential stores).
fn source_in(texts: &[String], name: &str) -> Option<PathBuf> {
    let mut found = None;
    for text in texts {
        for line in text.lines().map(str::trim) {
            let Some(value) = line.strip_prefix("LoadCredential=") else {
                continue;
            };
            if value.trim().is_empty() {
                found = None;
                continue;
            }
            if let Some((id, src)) = value.trim().split_once(':')
                && id == name
            {
                found = Some(src.to_string());
            }
        }
    }
    let src = found?;
    if Path::new(&src).is_absolute() {
        return Some(PathBuf::from(src));
    }
    ["/etc/credstore", "/run/credstore", "/usr/lib/credstore"]
        .iter()
        .map(|d| Path::new(d).join(&src))
        .find(|p| p.exists())
}

/// Where a one-shot command reads the secret file `path`: the credential's
/// source when `path` is one of the service's credentials and this process
/// is not the service (no `CREDENTIALS_DIRECTORY`); `None` otherwise.
pub fn outside_the_service(path: &Path) -> Option<PathBuf> {
    if std::env::var_os("CREDENTIALS_DIRECTORY").is_some() || path.exists() {
        return None;
    }
    let name = path.strip_prefix(DIR).ok()?.to_str()?;
    if name.is_empty() || name.contains('/') {
        return None;
    }
    let texts: Vec<String> = unit_files(&unit_dirs())
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .collect();
    source_in(&texts, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_load_credential_of_a_name_wins_and_an_empty_one_clears() {
        let unit = "[Service]\nLoadCredential=db-password:/etc/backstop/secrets/db-password\n#LoadCredential=api-token:/nope\nLoadCredential=api-token:/etc/backstop/secrets/api-token\n".to_string();
        let drop_in = "[Service]\nLoadCredential=db-password:/srv/secrets/db\n".to_string();
        let texts = [unit.clone(), drop_in];
        assert_eq!(
            source_in(&texts, "db-password"),
            Some("/srv/secrets/db".into())
        );
        assert_eq!(
            source_in(&texts, "api-token"),
            Some("/etc/backstop/secrets/api-token".into())
        );
        assert_eq!(source_in(&texts, "signing-key"), None);
        let cleared = [unit, "[Service]\nLoadCredential=\n".to_string()];
        assert_eq!(source_in(&cleared, "db-password"), None);
    }

    #[test]
    fn the_unit_then_its_drop_ins_by_name_are_read() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        let lib = root.path().join("lib");
        for d in [
            etc.join("backstop.service.d"),
            lib.join("backstop.service.d"),
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(lib.join("backstop.service"), "lib unit").unwrap();
        std::fs::write(lib.join("backstop.service.d/b.conf"), "lib b").unwrap();
        std::fs::write(etc.join("backstop.service.d/b.conf"), "etc b").unwrap();
        std::fs::write(etc.join("backstop.service.d/a.conf"), "etc a").unwrap();
        std::fs::write(etc.join("backstop.service.d/notes.txt"), "no").unwrap();
        let files = unit_files(&[etc.clone(), lib.clone()]);
        assert_eq!(
            files,
            [
                lib.join("backstop.service"),
                etc.join("backstop.service.d/a.conf"),
                etc.join("backstop.service.d/b.conf"),
            ]
        );
    }
}
