//! The shared checker every section's validation reports to (diagnostics
//! with line and column), and the value parsers they share.

use std::ops::Range;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::{Diagnostic, Schedule};

/// Collects diagnostics against one source text.
pub(crate) struct Checker<'a> {
    pub(crate) path: &'a Path,
    pub(crate) text: &'a str,
    pub(crate) diagnostics: Vec<Diagnostic>,
}

impl Checker<'_> {
    pub(crate) fn error(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.diagnostics.push(Diagnostic {
            line,
            column,
            message: message.into(),
        });
    }

    /// Resolves a path from the config relative to the config file's directory.
    pub(crate) fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or_else(|| Path::new(".")).join(p)
        }
    }

    /// The value of the environment variable `env` names; an error if unset or empty.
    pub(crate) fn env_value(&mut self, env: &Spanned<String>) -> Option<String> {
        match std::env::var(env.get_ref()) {
            Ok(v) if !v.is_empty() => Some(v),
            _ => {
                self.error(
                    env.span(),
                    format!("environment variable {} is not set", env.get_ref()),
                );
                None
            }
        }
    }

    /// Reads a secret file, insisting that it is not readable by everyone.
    pub(crate) fn read_secret_file(
        &mut self,
        key: &str,
        value: &Spanned<String>,
    ) -> Option<String> {
        let path = self.check_secret_file(key, value)?;
        match std::fs::read_to_string(&path) {
            Ok(s) => Some(s.trim_end_matches(['\n', '\r']).to_string()),
            Err(e) => {
                self.error(
                    value.span(),
                    format!("cannot read {key} {}: {e}", path.display()),
                );
                None
            }
        }
    }

    /// The path of a secret file that exists and is not readable by everyone.
    pub(crate) fn check_secret_file(
        &mut self,
        key: &str,
        value: &Spanned<String>,
    ) -> Option<PathBuf> {
        let given = self.resolve(value.get_ref());
        // A credential of the service, read from a shell: its source.
        let path = match crate::credentials::outside_the_service(&given) {
            Some(crate::credentials::Source::File(p)) => p,
            Some(crate::credentials::Source::Encrypted) => {
                self.error(
                    value.span(),
                    format!(
                        "cannot read {key} {}: the unit loads it with LoadCredentialEncrypted=, which only the service can decrypt; outside it, point {key} at a readable copy or run the command inside the service's context (systemd-run -p LoadCredentialEncrypted=… --pipe --wait)",
                        given.display()
                    ),
                );
                return None;
            }
            None => given.clone(),
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if path != given => {
                self.error(
                    value.span(),
                    format!(
                        "cannot read {key} {}: {e} (its source, as the unit's LoadCredential= names it for {})",
                        path.display(),
                        given.display()
                    ),
                );
                return None;
            }
            Err(e) if given.starts_with(crate::credentials::DIR) => {
                self.error(
                    value.span(),
                    format!(
                        "cannot read {key} {}: {e} (a credential of the service: outside it, backstop reads the source the unit's LoadCredential= names, and no backstop.service or drop-in names one it can find)",
                        path.display()
                    ),
                );
                return None;
            }
            Err(e) => {
                self.error(
                    value.span(),
                    format!(
                        "cannot read {key} {}: {e} (create the file or fix the path)",
                        path.display()
                    ),
                );
                return None;
            }
        };
        if meta.permissions().mode() & 0o004 != 0 {
            self.error(
                value.span(),
                format!(
                    "{key} {} is readable by every user; run `chmod 600 {}` (or 640 with a dedicated group)",
                    path.display(),
                    path.display()
                ),
            );
            return None;
        }
        Some(path)
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Parses a size such as `"16MiB"`, `"5 MB"`, `"1GiB"` or `"1048576"` (bytes).
///
/// # Errors
/// A message saying what is accepted.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "write a number with a unit, e.g. \"16MiB\"".to_string())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?}; use B, KiB, MiB, GiB, KB, MB or GB"
            ));
        }
    };
    n.checked_mul(mult).ok_or_else(|| "too large".to_string())
}

/// Names become directory names and metric labels: keep them tame.
pub(crate) fn check_name(c: &mut Checker<'_>, what: &str, name: &Spanned<String>) {
    let n = name.get_ref();
    let ok = !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        && !n.starts_with('-');
    if !ok {
        c.error(
            name.span(),
            format!(
                "invalid {what} name {n:?}: use 1–64 letters, digits, '-' or '_' (it becomes a directory name and a metric label)"
            ),
        );
    }
}

pub(crate) fn parse_schedule(c: &mut Checker<'_>, s: &Spanned<String>) -> Option<Schedule> {
    match crate::parse_schedule(s.get_ref()) {
        Ok(schedule) => Some(schedule),
        Err(e) => {
            c.error(
                s.span(),
                format!(
                    "invalid cron expression {:?}: {e} (five fields \"minute hour day-of-month month day-of-week\", e.g. \"15 2 * * *\", or six with seconds first)",
                    s.get_ref()
                ),
            );
            None
        }
    }
}

pub(crate) fn known<'a>(what: &str, names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<_> = names.map(|n| format!("\"{n}\"")).collect();
    if names.is_empty() {
        String::new()
    } else {
        format!(" (defined {what}: {})", names.join(", "))
    }
}

/// An integer setting within `range` (an error naming the range otherwise),
/// or `default` when unset.
pub(crate) fn int_in(
    c: &mut Checker<'_>,
    key: &str,
    value: Option<&Spanned<i64>>,
    range: std::ops::RangeInclusive<i64>,
    default: i64,
) -> i64 {
    match value {
        Some(n) if range.contains(n.get_ref()) => *n.get_ref(),
        Some(n) => {
            c.error(
                n.span(),
                format!("{key} must be from {} to {}", range.start(), range.end()),
            );
            *range.start()
        }
        None => default,
    }
}

pub(crate) fn duration(
    c: &mut Checker<'_>,
    key: &str,
    value: &Spanned<String>,
) -> Option<Duration> {
    match parse_duration(value.get_ref()) {
        Ok(d) => Some(d),
        Err(e) => {
            c.error(
                value.span(),
                format!("invalid {key} {:?}: {e}", value.get_ref()),
            );
            None
        }
    }
}

/// Parses a positive duration such as `"90s"`, `"5m"`, `"2h"`, `"1d 12h"`.
///
/// # Errors
/// A message saying what is accepted.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be greater than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!(
            "{e}; write a number with a unit, e.g. \"90s\", \"30m\", \"2h\", \"1d\""
        )),
    }
}
