//! The service's systemd unit as systemd reads it: backstop.service and its
//! drop-ins, from the folders systemd looks in. Read back by backstop
//! itself: a one-shot command finds the service's credentials' sources
//! (LoadCredential=), and a failed connection is compared with the unit's
//! IP address filter.

use std::path::PathBuf;

/// Where systemd looks for the unit and its drop-ins, most important first
/// (a test build: `BACKSTOP_TEST_UNIT_DIRS`, colon-separated).
pub fn dirs() -> Vec<PathBuf> {
    if let Some(dirs) = crate::test_env("BACKSTOP_TEST_UNIT_DIRS") {
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
pub fn files(dirs: &[PathBuf]) -> Vec<PathBuf> {
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

/// The `[Service]` settings of the unit's files in order, as (key, value)
/// with surrounding spaces trimmed (comments, other sections and blank
/// lines left out; a line ending in `\\` continues on the next).
pub fn service_settings() -> Vec<(String, String)> {
    let texts: Vec<String> = files(&dirs())
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .collect();
    settings(&texts)
}

/// [`service_settings`] of these texts.
pub fn settings(texts: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for text in texts {
        let mut section = String::new();
        let mut pending = String::new();
        for raw in text.lines() {
            let line = raw.trim();
            if pending.is_empty() && (line.starts_with('#') || line.starts_with(';')) {
                continue;
            }
            if let Some(cont) = line.strip_suffix('\\') {
                pending.push_str(cont);
                pending.push(' ');
                continue;
            }
            let whole = std::mem::take(&mut pending) + line;
            if whole.starts_with('[') {
                section = whole;
                continue;
            }
            if section != "[Service]" {
                continue;
            }
            if let Some((k, v)) = whole.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_then_its_drop_ins_by_name_are_read() {
        let root = std::env::temp_dir().join(format!("backstop-unit-test-{}", std::process::id()));
        let etc = root.join("etc");
        let lib = root.join("lib");
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
        let found = files(&[etc.clone(), lib.clone()]);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            found,
            [
                lib.join("backstop.service"),
                etc.join("backstop.service.d/a.conf"),
                etc.join("backstop.service.d/b.conf"),
            ]
        );
    }

    #[test]
    fn only_service_settings_are_read_with_continuations() {
        let texts = [
            "[Unit]\nDescription=x\n[Service]\n# IPAddressDeny=any\n; also a comment\nIPAddressAllow = 10.0.0.5 \\\n  10.0.0.6\nUser=backstop\n[Install]\nWantedBy=multi-user.target\n".to_string(),
            "[Service]\nIPAddressDeny=any\n".to_string(),
        ];
        assert_eq!(
            settings(&texts),
            [
                (
                    "IPAddressAllow".to_string(),
                    "10.0.0.5  10.0.0.6".to_string()
                ),
                ("User".to_string(), "backstop".to_string()),
                ("IPAddressDeny".to_string(), "any".to_string()),
            ]
        );
    }
}
