//! The schema inventory read inside the dump's snapshot: what a restore of
//! this backup must contain.

use backstop_config::Filters;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnection;

/// Tables of one schema that the dump would include but the role cannot
/// read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub schema: String,
    /// The role has no USAGE on the schema.
    pub no_usage: bool,
    /// Unreadable tables in it, and how many tables the dump has there.
    pub unreadable: u64,
    pub tables: u64,
    /// The first few of them.
    pub examples: Vec<String>,
}

/// Object counts and per-table details, restricted to the dumped objects.
/// Extension-owned objects are not counted: `CREATE EXTENSION` recreates them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub tables: u64,
    pub indexes: u64,
    pub functions: u64,
    pub triggers: u64,
    pub policies: u64,
    pub extensions: u64,
    pub per_table: Vec<TableInfo>,
}

/// One table in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableInfo {
    pub schema: String,
    pub name: String,
    /// Rows in the backup: exact, estimated or absent per the manifest's `row_counts`.
    pub rows: Option<u64>,
    /// `pg_total_relation_size` at the snapshot (table, indexes and TOAST).
    pub bytes: u64,
}

/// The tables pg_dump selects, given the same filters. `$1` include-schema
/// regexes, `$2` exclude-schema regexes, `$3`/`$4` include-table (schema
/// regex or NULL, name regex), `$5`/`$6` the same for excluded tables.
const DUMPED_TABLES: &str = r"
    SELECT c.oid, n.nspname, c.relname, c.reltuples, c.relnamespace, c.relkind
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p')
      AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
      AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                      WHERE d.classid = 'pg_catalog.pg_class'::regclass
                        AND d.objid = c.oid AND d.deptype = 'e')
      AND (cardinality($1::text[]) = 0 OR n.nspname ~ ANY($1::text[]))
      AND NOT (n.nspname ~ ANY($2::text[]))
      AND (cardinality($4::text[]) = 0 OR EXISTS (
            SELECT 1 FROM unnest($3::text[], $4::text[]) AS p(s, r)
            WHERE (CASE WHEN p.s IS NULL THEN pg_catalog.pg_table_is_visible(c.oid)
                        ELSE n.nspname ~ p.s END) AND c.relname ~ p.r))
      AND NOT EXISTS (
            SELECT 1 FROM unnest($5::text[], $6::text[]) AS p(s, r)
            WHERE (CASE WHEN p.s IS NULL THEN pg_catalog.pg_table_is_visible(c.oid)
                        ELSE n.nspname ~ p.s END) AND c.relname ~ p.r)";

/// Per schema, the tables the dump includes that the role cannot read: no
/// USAGE on the schema, no SELECT on the table, or row security it is not
/// exempt from (pg_dump runs with row_security off and fails on such a
/// table). At most five names each.
pub(crate) async fn unreadable(
    conn: &mut PgConnection,
    filters: &Filters,
) -> Result<Vec<Unreadable>, sqlx::Error> {
    let f = Patterns::of(filters);
    let sql = format!(
        "WITH t AS ({DUMPED_TABLES}),
         r AS (SELECT t.nspname, t.relname,
                      pg_catalog.has_schema_privilege(t.relnamespace, 'USAGE') AS usage,
                      pg_catalog.has_schema_privilege(t.relnamespace, 'USAGE')
                        AND pg_catalog.has_table_privilege(t.oid, 'SELECT')
                        AND (NOT c.relrowsecurity
                             OR pg_catalog.pg_has_role(c.relowner, 'USAGE')
                             OR (SELECT rolbypassrls OR rolsuper FROM pg_catalog.pg_roles
                                  WHERE rolname = current_user)) AS ok
                 FROM t JOIN pg_catalog.pg_class c ON c.oid = t.oid)
         SELECT nspname, NOT bool_and(usage), count(*) FILTER (WHERE NOT ok), count(*),
                (array_agg(relname ORDER BY relname) FILTER (WHERE NOT ok))[1:5]
           FROM r GROUP BY nspname HAVING count(*) FILTER (WHERE NOT ok) > 0 ORDER BY nspname"
    );
    let rows: Vec<(String, bool, i64, i64, Vec<String>)> = f
        .bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)))
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(
            |(schema, no_usage, unreadable, tables, examples)| Unreadable {
                schema,
                no_usage,
                unreadable: unreadable as u64,
                tables: tables as u64,
                examples,
            },
        )
        .collect())
}

/// The job's filters as the regexes [`DUMPED_TABLES`] binds.
struct Patterns {
    inc_s: Vec<String>,
    exc_s: Vec<String>,
    inc_ts: Vec<Option<String>>,
    inc_tr: Vec<String>,
    exc_ts: Vec<Option<String>>,
    exc_tr: Vec<String>,
}

impl Patterns {
    fn of(filters: &Filters) -> Self {
        let (inc_ts, inc_tr) = filters
            .include_tables
            .iter()
            .map(|p| table_regex(p))
            .unzip();
        let (exc_ts, exc_tr) = filters
            .exclude_tables
            .iter()
            .map(|p| table_regex(p))
            .unzip();
        Self {
            inc_s: filters
                .include_schemas
                .iter()
                .map(|p| name_regex(p))
                .collect(),
            exc_s: filters
                .exclude_schemas
                .iter()
                .map(|p| name_regex(p))
                .collect(),
            inc_ts,
            inc_tr,
            exc_ts,
            exc_tr,
        }
    }

    /// Binds `$1`–`$6`.
    fn bind<'q, O>(
        &'q self,
        q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        q.bind(&self.inc_s)
            .bind(&self.exc_s)
            .bind(&self.inc_ts)
            .bind(&self.inc_tr)
            .bind(&self.exc_ts)
            .bind(&self.exc_tr)
    }
}

pub(crate) async fn read(
    conn: &mut PgConnection,
    filters: &Filters,
) -> Result<Inventory, sqlx::Error> {
    let f = Patterns::of(filters);
    let tables_sql = format!(
        "WITH t AS ({DUMPED_TABLES})
         SELECT t.nspname, t.relname,
                -- A partitioned parent holds no rows of its own (its
                -- partitions are listed on their own); reltuples = -1 means
                -- never analyzed: unknown, not empty.
                CASE WHEN t.relkind = 'p' THEN 0::int8
                     WHEN t.reltuples < 0 THEN NULL
                     ELSE t.reltuples::int8 END,
                pg_catalog.pg_total_relation_size(t.oid)
         FROM t ORDER BY 1, 2"
    );
    let rows: Vec<(String, String, Option<i64>, i64)> = f
        .bind(sqlx::query_as(sqlx::AssertSqlSafe(tables_sql)))
        .fetch_all(&mut *conn)
        .await?;

    // Functions and extensions are not dumped at all when tables are selected
    // with --table, and extensions not when schemas are selected with --schema.
    let counts_sql = format!(
        "WITH t AS ({DUMPED_TABLES})
         SELECT
           (SELECT count(*) FROM pg_catalog.pg_index i JOIN t ON t.oid = i.indrelid),
           (SELECT count(*) FROM pg_catalog.pg_trigger tr JOIN t ON t.oid = tr.tgrelid
              WHERE NOT tr.tgisinternal),
           (SELECT count(*) FROM pg_catalog.pg_policy p JOIN t ON t.oid = p.polrelid),
           CASE WHEN cardinality($4::text[]) > 0 THEN 0 ELSE
           (SELECT count(*) FROM pg_catalog.pg_proc f
              JOIN pg_catalog.pg_namespace n ON n.oid = f.pronamespace
              WHERE n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
                AND (cardinality($1::text[]) = 0 OR n.nspname ~ ANY($1::text[]))
                AND NOT (n.nspname ~ ANY($2::text[]))
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                                WHERE d.classid = 'pg_catalog.pg_proc'::regclass
                                  AND d.objid = f.oid AND d.deptype = 'e')) END,
           CASE WHEN cardinality($4::text[]) > 0 OR cardinality($1::text[]) > 0 THEN 0 ELSE
           (SELECT count(*) FROM pg_catalog.pg_extension) END"
    );
    let (indexes, triggers, policies, functions, extensions): (i64, i64, i64, i64, i64) = f
        .bind(sqlx::query_as(sqlx::AssertSqlSafe(counts_sql)))
        .fetch_one(&mut *conn)
        .await?;

    let per_table: Vec<TableInfo> = rows
        .into_iter()
        .map(|(schema, name, est, bytes)| TableInfo {
            schema,
            name,
            rows: est.map(|n| n.max(0) as u64),
            bytes: bytes.max(0) as u64,
        })
        .collect();
    Ok(Inventory {
        tables: per_table.len() as u64,
        indexes: indexes as u64,
        functions: functions as u64,
        triggers: triggers as u64,
        policies: policies as u64,
        extensions: extensions as u64,
        per_table,
    })
}

/// A table whose rows a backup in streams copies itself (`COPY … TO
/// STDOUT` in the dump's snapshot), as pg_dump would dump its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataTable {
    pub schema: String,
    pub name: String,
    /// The columns COPY writes, in order: not dropped, not generated.
    pub columns: Vec<String>,
    /// `pg_table_size` (heap and TOAST) at the snapshot: what the balance weighs.
    pub bytes: u64,
    /// Blocks of the heap at the snapshot: where ctid ranges cut it.
    pub blocks: u64,
}

/// The plain tables of the dump whose data it holds (partitioned parents
/// hold none), largest first. `generated` says whether the server has
/// generated columns (PostgreSQL 12 or later).
pub(crate) async fn data_tables(
    conn: &mut PgConnection,
    filters: &Filters,
    generated: bool,
) -> Result<Vec<DataTable>, sqlx::Error> {
    let f = Patterns::of(filters);
    let not_generated = if generated {
        "AND a.attgenerated = ''"
    } else {
        ""
    };
    let sql = format!(
        "WITH t AS ({DUMPED_TABLES})
         SELECT t.nspname, t.relname,
                ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
                       WHERE a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
                             {not_generated}
                       ORDER BY a.attnum),
                pg_catalog.pg_table_size(t.oid),
                pg_catalog.pg_relation_size(t.oid)
                  / pg_catalog.current_setting('block_size')::int8
         FROM t WHERE t.relkind = 'r' ORDER BY 4 DESC, 1, 2"
    );
    let rows: Vec<(String, String, Vec<String>, i64, i64)> = f
        .bind(sqlx::query_as(sqlx::AssertSqlSafe(sql)))
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(schema, name, columns, bytes, blocks)| DataTable {
            schema,
            name,
            columns,
            bytes: bytes.max(0) as u64,
            blocks: blocks.max(0) as u64,
        })
        .collect())
}

/// Converts one pg_dump name pattern (`*`, `?`, double quotes for case and
/// literal characters) to an anchored POSIX regex, as pg_dump does.
fn name_regex(pattern: &str) -> String {
    let mut re = String::from("^(");
    let mut quoted = false;
    let mut chars = pattern.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                re.push('"');
            }
            '"' => quoted = !quoted,
            '*' if !quoted => re.push_str(".*"),
            '?' if !quoted => re.push('.'),
            c => {
                let c = if quoted { c } else { c.to_ascii_lowercase() };
                if "\\.^$|()[]{}+*?".contains(c) {
                    re.push('\\');
                }
                re.push(c);
            }
        }
    }
    re.push_str(")$");
    re
}

/// Splits `schema.table` at the first unquoted dot.
fn table_regex(pattern: &str) -> (Option<String>, String) {
    let mut quoted = false;
    for (i, ch) in pattern.char_indices() {
        match ch {
            '"' => quoted = !quoted,
            '.' if !quoted => {
                return (
                    Some(name_regex(&pattern[..i])),
                    name_regex(&pattern[i + 1..]),
                );
            }
            _ => {}
        }
    }
    (None, name_regex(pattern))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_follow_pg_dump() {
        assert_eq!(name_regex("Audit"), "^(audit)$");
        assert_eq!(name_regex("\"Audit\""), "^(Audit)$");
        assert_eq!(name_regex("log_*"), "^(log_.*)$");
        assert_eq!(name_regex("a?c"), "^(a.c)$");
        assert_eq!(name_regex("\"a.b\""), "^(a\\.b)$");
        assert_eq!(
            table_regex("public.orders"),
            (Some("^(public)$".into()), "^(orders)$".into())
        );
        assert_eq!(
            table_regex("\"x.y\".z"),
            (Some("^(x\\.y)$".into()), "^(z)$".into())
        );
        assert_eq!(table_regex("orders"), (None, "^(orders)$".into()));
    }
}
