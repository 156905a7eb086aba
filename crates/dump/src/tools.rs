//! Finding the PostgreSQL client programs and their versions.

use std::path::{Path, PathBuf};

use crate::DumpError;

/// A PostgreSQL client program and its major version.
#[derive(Debug, Clone)]
pub struct PgTool {
    pub path: PathBuf,
    pub major: u32,
    /// The program's own `--version` line.
    pub version: String,
}

impl PgTool {
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map_or_else(|| "pg_dump".into(), |n| n.to_string_lossy().into_owned())
    }
}

/// Locates `name` (pg_dump, pg_dumpall, pg_restore, psql): next to
/// `pg_dump_path`, in `pg_bin_dir`, else the newest `/usr/lib/postgresql/*/bin`
/// (Debian's layout), else `PATH`.
///
/// # Errors
/// [`DumpError::Tool`] saying where it looked and how to point backstop at it.
pub async fn find_tool(
    name: &str,
    pg_dump_path: Option<&Path>,
    pg_bin_dir: Option<&Path>,
) -> Result<PgTool, DumpError> {
    let explicit = match (pg_dump_path, pg_bin_dir) {
        (Some(p), _) if name == "pg_dump" => Some(p.to_path_buf()),
        (Some(p), _) => Some(p.parent().unwrap_or(Path::new(".")).join(name)),
        (None, Some(dir)) => Some(dir.join(name)),
        (None, None) => None,
    };
    let path = match explicit {
        Some(p) => p,
        None => newest_debian(name).unwrap_or_else(|| PathBuf::from(name)),
    };
    let mut cmd = tokio::process::Command::new(&path);
    crate::client_env(&mut cmd, true);
    let out = cmd
        .arg("--version")
        .output()
        .await
        .map_err(|e| {
            DumpError::Tool(format!(
                "cannot run {} ({e}); install the PostgreSQL client (Debian: postgresql-client) or set pg_bin_dir / pg_dump_path in the job",
                path.display()
            ))
        })?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let major = parse_major(&version).ok_or_else(|| {
        DumpError::Tool(format!(
            "{} --version printed {version:?}, which is not a PostgreSQL version",
            path.display()
        ))
    })?;
    Ok(PgTool {
        path,
        major,
        version,
    })
}

fn newest_debian(name: &str) -> Option<PathBuf> {
    let mut best: Option<(u32, PathBuf)> = None;
    for entry in std::fs::read_dir("/usr/lib/postgresql").ok()?.flatten() {
        let Ok(v) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let p = entry.path().join("bin").join(name);
        if p.is_file() && best.as_ref().is_none_or(|(b, _)| v > *b) {
            best = Some((v, p));
        }
    }
    best.map(|(_, p)| p)
}

/// `pg_dump (PostgreSQL) 15.19 (Debian 15.19-0+deb12u1)` → 15; `9.6.24` → 9.
pub fn parse_major(version_line: &str) -> Option<u32> {
    let after = version_line
        .split_once(')')
        .map_or(version_line, |(_, rest)| rest);
    let token = after.split_whitespace().next()?;
    token
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majors() {
        assert_eq!(
            parse_major("pg_dump (PostgreSQL) 15.19 (Debian 15.19-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_major("pg_dump (PostgreSQL) 17beta1"), Some(17));
        assert_eq!(parse_major("pg_dump (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_major("bash: not found"), None);
    }
}
