//! How the backups of a cluster job's databases are addressed: each
//! database's backups are a *series* of their own, `<job>/<segment>`, where
//! the segment is the database name with every byte outside
//! `[A-Za-z0-9_.-]` percent-encoded (so any name PostgreSQL allows, quoted
//! mixed case, spaces and slashes included, is one path segment). The run's
//! roles and tablespaces are the series `<job>/@globals`: `@` is always
//! encoded in a database's segment, so no database can collide with it.
//! A single-database job is the series `<job>` itself.

/// The segment of the roles-and-tablespaces series of a cluster job.
pub const GLOBALS_SEGMENT: &str = "@globals";

/// The path segment of database `name`.
pub fn segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && !out.is_empty()) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The database name a segment encodes; `None` for a segment no database
/// has (the globals series, or text [`segment`] never produces).
pub fn database_of(segment_text: &str) -> Option<String> {
    if segment_text.is_empty() || segment_text == GLOBALS_SEGMENT {
        return None;
    }
    let bytes = segment_text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment_text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let name = String::from_utf8(out).ok()?;
    (segment(&name) == segment_text).then_some(name)
}

/// `<job>/<segment>` of database `name` of cluster job `job`.
pub fn of_database(job: &str, name: &str) -> String {
    format!("{job}/{}", segment(name))
}

/// `<job>/@globals`.
pub fn of_globals(job: &str) -> String {
    format!("{job}/{GLOBALS_SEGMENT}")
}

/// A series name split into its job and, for a cluster job's series, the
/// segment.
pub fn split(series: &str) -> (&str, Option<&str>) {
    match series.split_once('/') {
        Some((job, seg)) => (job, Some(seg)),
        None => (series, None),
    }
}

/// Shell-style pattern matching of a database name: `*` is any run of
/// characters, `?` one character, everything else itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_round_trip_every_name_and_never_collide_with_globals() {
        for name in [
            "app",
            "Sales DB",
            "a/b",
            "..",
            ".hidden",
            "x.y",
            "100%",
            "@globals",
            "Ünïcode",
            "we\"ird",
        ] {
            let s = segment(name);
            assert!(!s.contains('/'), "{s}");
            assert_ne!(s, GLOBALS_SEGMENT);
            assert_ne!(s, "..");
            assert_ne!(s, ".");
            assert_eq!(database_of(&s).as_deref(), Some(name), "{s}");
        }
        assert_eq!(segment("Sales DB"), "Sales%20DB");
        assert_eq!(database_of(GLOBALS_SEGMENT), None);
        assert_eq!(database_of("%zz"), None);
        // Only the canonical spelling is a database's segment.
        assert_eq!(database_of("%61pp"), None);
    }

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob_match("template*", "template0"));
        assert!(glob_match("scratch_*", "scratch_"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("*_tmp_*", "x_tmp_y"));
        assert!(!glob_match("scratch_*", "prod"));
        assert!(!glob_match("a?c", "ac"));
        assert!(!glob_match("app", "app2"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
    }
}
