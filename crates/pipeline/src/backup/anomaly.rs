//! The size-anomaly guard: a backup much smaller than the job's recent ones
//! (a truncated table, the wrong database, an empty schema) is kept but
//! marked suspect, so it is reported and retention does not let it replace
//! good backups.

use crate::manifest::Manifest;
use crate::trust::Trusted;

/// How many recent complete backups the median is taken over.
pub const WINDOW: usize = 7;

/// Why `new` looks too small compared with `previous` (newest first), or
/// `None`. `min_ratio` is the fraction of the median below which a backup is
/// suspect.
pub fn check(new: &Manifest, previous: &[Trusted<Manifest>], min_ratio: f64) -> Option<String> {
    let recent: Vec<&Manifest> = previous
        .iter()
        .map(|m| &**m)
        .filter(|m| m.backup_id != new.backup_id)
        .take(WINDOW)
        .collect();
    let last = recent.first()?;
    if new.inventory.tables == 0 && last.inventory.tables > 0 {
        return Some(format!(
            "no tables, where the previous backup {} had {}",
            last.backup_id, last.inventory.tables
        ));
    }
    let median_dump = median(recent.iter().map(|m| m.dump_bytes()).collect())?;
    let mut reasons = Vec::new();
    if (new.dump_bytes() as f64) < min_ratio * median_dump as f64 {
        reasons.push(format!(
            "dump is {} bytes, {:.0}% of the median {} of the last {} backups",
            new.dump_bytes(),
            new.dump_bytes() as f64 * 100.0 / median_dump.max(1) as f64,
            median_dump,
            recent.len()
        ));
    }
    if let Some(rows) = new.total_rows() {
        let counted: Vec<u64> = recent.iter().filter_map(|m| m.total_rows()).collect();
        if let Some(median_rows) = median(counted)
            && (rows as f64) < min_ratio * median_rows as f64
        {
            reasons.push(format!(
                "{rows} rows, {:.0}% of the median {median_rows}",
                rows as f64 * 100.0 / median_rows.max(1) as f64
            ));
        }
    }
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[v.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backup of `tables` tables holding `rows` rows in all (None: not
    /// counted) whose dump is `dump` bytes.
    fn m(id: &str, dump: u64, rows: Option<u64>, tables: u64) -> Manifest {
        let at = chrono::DateTime::UNIX_EPOCH;
        let mut m = crate::testkit::manifest_for(id, at, &[("database", dump as usize)]);
        m.inventory.tables = tables;
        m.inventory.per_table = (0..tables)
            .map(|i| backstop_dump::TableInfo {
                schema: "public".into(),
                name: format!("t{i}"),
                rows: rows.map(|r| r / tables.max(1)),
                bytes: 0,
            })
            .collect();
        m.row_counts = if rows.is_some() { "exact" } else { "off" }.into();
        m
    }

    fn history() -> Vec<Trusted<Manifest>> {
        (0..10)
            .map(|i| m(&format!("b{i}"), 1000 + i * 10, Some(800 + i * 8), 8))
            .map(|m| Trusted::written_here(m, None))
            .collect()
    }

    #[test]
    fn normal_backups_pass() {
        assert_eq!(check(&m("new", 1050, Some(840), 8), &history(), 0.5), None);
        // Growth is never suspect; a modest shrink is not either.
        assert_eq!(check(&m("new", 5000, Some(9000), 9), &history(), 0.5), None);
        assert_eq!(check(&m("new", 600, Some(500), 8), &history(), 0.5), None);
    }

    #[test]
    fn a_much_smaller_dump_or_row_count_is_suspect() {
        let s = check(&m("new", 400, Some(840), 8), &history(), 0.5).unwrap();
        assert!(
            s.starts_with("dump is 400 bytes, 39% of the median 1030 of the last 7 backups"),
            "{s}"
        );
        let s = check(&m("new", 1000, Some(100), 8), &history(), 0.5).unwrap();
        assert!(s.contains("96 rows, 12% of the median 824"), "{s}");
    }

    #[test]
    fn zero_tables_after_some_is_suspect() {
        let s = check(&m("new", 2000, None, 0), &history(), 0.5).unwrap();
        assert_eq!(s, "no tables, where the previous backup b0 had 8");
    }

    #[test]
    fn no_history_no_verdict() {
        assert_eq!(check(&m("new", 1, Some(0), 0), &[], 0.5), None);
        // The backup itself in the listing does not count.
        assert_eq!(check(&m("b0", 1, Some(0), 8), &history()[..1], 0.5), None);
    }
}
