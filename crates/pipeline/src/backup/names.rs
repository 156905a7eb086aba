//! How a backup and its artifacts are named: the backup id (sortable by
//! time), the artifact's file name (what it holds, its format, compression
//! and encryption), and its key in a store (`<series>/<backup-id>/<file>`).

use backstop_config::{Compression, DumpFormat, Encryption, JobConfig};
use chrono::{DateTime, Utc};

/// `database.dump.zst.age`, `globals.sql.zst.age`, `database.sql` …
pub fn artifact_file(
    kind: &str,
    format: DumpFormat,
    compression: Compression,
    enc: &Encryption,
) -> String {
    let mut name = format!(
        "{kind}.{}",
        match format {
            DumpFormat::Custom => "dump",
            DumpFormat::Plain => "sql",
        }
    );
    if compression.is_zstd() {
        name.push_str(".zst");
    }
    if let Encryption::Age { .. } = enc {
        name.push_str(".age");
    }
    name
}

pub(crate) fn artifact_key(job: &JobConfig, backup_id: &str, file: &str) -> String {
    format!("{}/{}/{}", job.name, backup_id, file)
}

/// Sortable by time, unique enough to never collide: `2026-01-22T02-15-00Z-7f3a`.
pub fn new_backup_id(at: DateTime<Utc>) -> String {
    format!(
        "{}-{:04x}",
        at.format("%Y-%m-%dT%H-%M-%SZ"),
        rand::random::<u16>()
    )
}
