//! How a backup's table data is spread over `streams` connections reading
//! one snapshot, and what each connection runs. A table larger than the
//! split threshold is cut into parts of about the threshold each (ranges
//! of its heap's blocks, by ctid); then parts and whole tables are dealt,
//! largest first, to the stream holding the fewest bytes so far (greedy
//! longest-processing-time), so the largest table no longer bounds the
//! wall time. Each stream is one psql session in the exported snapshot
//! whose output is a plain-SQL data file: a `COPY … FROM stdin;` block per
//! piece, which psql (or backstop's restore) loads as it is. Pure: the same
//! tables give the same plan and the same script.

use std::collections::BTreeMap;
use std::time::Duration;

use backstop_dump::DataTable;

/// Most parts a table is cut into, per stream: beyond it a part is bigger
/// than the threshold rather than the backup holding thousands of
/// artifacts (a 2 TB table at 1 GiB would be 2,000 ranges).
pub const PARTS_PER_STREAM: u64 = 4;

/// One table's data, or one part of it, as a stream dumps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub schema: String,
    pub name: String,
    /// Which part (1-based) of how many; `1 of 1` is the whole table.
    pub part: u64,
    pub parts: u64,
    /// Its share of the table's size at the snapshot.
    pub bytes: u64,
}

/// What one connection dumps, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamPlan {
    pub pieces: Vec<Piece>,
    pub bytes: u64,
}

/// The plan for `tables` over `streams` connections (at least one), tables
/// larger than `split_larger_than` bytes cut into parts (0: never; with one
/// stream nothing is cut, since one connection gains nothing by it). Every
/// table is in exactly one stream, or its parts across streams; a stream
/// with nothing to dump is left out.
pub fn plan(tables: &[DataTable], streams: usize, split_larger_than: u64) -> Vec<StreamPlan> {
    let streams = streams.max(1);
    let mut pieces: Vec<Piece> = tables
        .iter()
        .flat_map(|t| pieces_of(t, streams, split_larger_than))
        .collect();
    // Largest first; ties in name order, so the plan does not depend on
    // the order the inventory listed the tables in.
    pieces.sort_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then_with(|| (&a.schema, &a.name, a.part).cmp(&(&b.schema, &b.name, b.part)))
    });
    let mut plans = vec![StreamPlan::default(); streams];
    for p in pieces {
        let least = (0..streams)
            .min_by_key(|&i| (plans[i].bytes, i))
            .expect("at least one stream");
        plans[least].bytes += p.bytes;
        plans[least].pieces.push(p);
    }
    plans.retain(|s| !s.pieces.is_empty());
    plans
}

/// `t` whole, or cut into parts of about `split_larger_than` bytes (at
/// most [`PARTS_PER_STREAM`] per stream), the bytes shared out exactly.
fn pieces_of(t: &DataTable, streams: usize, split_larger_than: u64) -> Vec<Piece> {
    let parts = if streams > 1 && split_larger_than > 0 && t.bytes > split_larger_than {
        t.bytes
            .div_ceil(split_larger_than)
            .min(PARTS_PER_STREAM * streams as u64)
    } else {
        1
    };
    (1..=parts)
        .map(|part| Piece {
            schema: t.schema.clone(),
            name: t.name.clone(),
            part,
            parts,
            // The first parts take the remainder, so the shares add up.
            bytes: t.bytes / parts + u64::from(part <= t.bytes % parts),
        })
        .collect()
}

/// The header of every data artifact: the settings pg_dump's own plain
/// output starts with, so psql loads the COPY blocks the same way.
fn artifact_header(stream: usize, streams: usize, encoding: &str) -> String {
    format!(
        "--\n-- backstop data stream {stream} of {streams}: COPY blocks read in the backup's snapshot.\n-- Load after pre-data and before post-data: psql --single-transaction -v ON_ERROR_STOP=1 -f FILE\n--\n\n\
         SET statement_timeout = 0;\nSET lock_timeout = 0;\nSET idle_in_transaction_session_timeout = 0;\n\
         SET client_encoding = {};\nSET standard_conforming_strings = on;\n\
         SELECT pg_catalog.set_config('search_path', '', false);\nSET check_function_bodies = false;\n\
         SET xmloption = content;\nSET client_min_messages = warning;\nSET row_security = off;\n",
        sql_literal(encoding)
    )
}

/// An SQL string literal that is plain ASCII whatever it holds (with
/// standard_conforming_strings on): `'it''s'`, or with anything outside
/// printable ASCII `U&'d\00E9j\00E0\000A'`. A script made only of ASCII
/// means the same in every client encoding: the server reads the escapes
/// as the characters, and prints them back in the session's encoding.
pub fn sql_literal(s: &str) -> String {
    escaped(s, '\'')
}

/// An identifier, quoted as [`sql_literal`] quotes a string: `"Order Items"`,
/// `"a""b"`, `U&"d\00E9j\00E0"`. Always quoted; one line, in ASCII.
pub fn sql_ident(s: &str) -> String {
    escaped(s, '"')
}

fn escaped(s: &str, quote: char) -> String {
    let plain = s.chars().all(|c| (' '..='~').contains(&c));
    let mut out = String::with_capacity(s.len() + 2);
    if !plain {
        out.push_str("U&");
    }
    out.push(quote);
    for c in s.chars() {
        match c {
            c if c == quote => {
                out.push(c);
                out.push(c);
            }
            '\\' if !plain => out.push_str("\\\\"),
            c if (' '..='~').contains(&c) => out.push(c),
            c if (c as u32) <= 0xFFFF => out.push_str(&format!("\\{:04X}", c as u32)),
            c => out.push_str(&format!("\\+{:06X}", c as u32)),
        }
    }
    out.push(quote);
    out
}

/// How a table is named in a data artifact's COPY line: [`sql_ident`]s,
/// so the line is one line of ASCII whatever the names hold.
pub fn copy_name(schema: &str, name: &str) -> String {
    format!("{}.{}", sql_ident(schema), sql_ident(name))
}

/// The name under which the row counter counts a table's COPY block: the
/// `-- Data for Name:` comment's, where schema and name are written as
/// [`sql_ident`]s, one line of ASCII that reads back the same whatever
/// the database's encoding.
pub fn counted_as(schema: &str, name: &str) -> (String, String) {
    (sql_ident(schema), sql_ident(name))
}

/// Where a piece's rows are: the whole table, or part `part` of `parts` of
/// its heap's `blocks` by ctid (the first part from the start, the last
/// to the end, so rows in blocks added since the size was read are in it).
fn range(part: u64, parts: u64, blocks: u64) -> String {
    if parts <= 1 {
        return String::new();
    }
    let at = |p: u64| blocks * p / parts;
    let mut conds = Vec::new();
    if part > 1 {
        conds.push(format!("ctid >= '({},0)'::pg_catalog.tid", at(part - 1)));
    }
    if part < parts {
        conds.push(format!("ctid < '({},0)'::pg_catalog.tid", at(part)));
    }
    format!(" WHERE {}", conds.join(" AND "))
}

/// What one data stream's psql session runs: join the exported
/// `snapshot`, then for each piece print its `COPY … FROM stdin;` line,
/// its rows (`COPY (SELECT …) TO STDOUT`) and the end-of-data line.
/// `tables` holds every table of the plan. psql runs it with
/// `--no-align --tuples-only --quiet`, so its output is exactly the data
/// artifact.
pub fn copy_script(
    plan: &StreamPlan,
    (stream, streams): (usize, usize),
    tables: &BTreeMap<(String, String), DataTable>,
    snapshot: &str,
    encoding: &str,
    lock_timeout: Option<Duration>,
) -> String {
    let lock = lock_timeout.map_or(0, |t| t.as_millis().max(1));
    let mut script = format!(
        "SET client_encoding = {};\nSET standard_conforming_strings = on;\n\
         SET statement_timeout = 0;\nSET lock_timeout = {lock};\n\
         SET idle_in_transaction_session_timeout = 0;\nSET DateStyle = ISO;\n\
         SET IntervalStyle = postgres;\nSET extra_float_digits = 3;\nSET row_security = off;\n\
         BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;\nSET TRANSACTION SNAPSHOT {};\n",
        sql_literal(encoding),
        sql_literal(snapshot)
    );
    let pieces: Vec<(&Piece, &DataTable)> = plan
        .pieces
        .iter()
        .filter_map(|p| {
            tables
                .get(&(p.schema.clone(), p.name.clone()))
                .map(|t| (p, t))
        })
        .collect();
    // Every table this stream copies, locked now, as pg_dump locks its
    // tables at its start: a DDL statement that comes later queues behind
    // these locks instead of this stream queueing behind it.
    let mut locked: Vec<String> = pieces
        .iter()
        .map(|(_, t)| copy_name(&t.schema, &t.name))
        .collect();
    locked.sort();
    locked.dedup();
    for chunk in locked.chunks(500) {
        let only: Vec<String> = chunk.iter().map(|n| format!("ONLY {n}")).collect();
        script.push_str(&format!(
            "LOCK TABLE {} IN ACCESS SHARE MODE;\n",
            only.join(", ")
        ));
    }
    script.push_str(&format!(
        "SELECT {};\n",
        sql_literal(artifact_header(stream, streams, encoding).trim_end_matches('\n'))
    ));
    for (p, t) in pieces {
        let name = copy_name(&t.schema, &t.name);
        let cols: Vec<String> = t.columns.iter().map(|c| sql_ident(c)).collect();
        let (list, select) = if cols.is_empty() {
            (String::new(), String::new())
        } else {
            (format!(" ({})", cols.join(", ")), cols.join(", "))
        };
        let (schema, table) = counted_as(&t.schema, &t.name);
        // pg_dump's comment before each table's data (row counting reads it).
        let text = format!(
            "\n--\n-- Data for Name: {table}; Type: TABLE DATA; Schema: {schema}; Owner: -\n--\n\nCOPY {name}{list} FROM stdin;"
        );
        script.push_str(&format!(
            "SELECT {};\nCOPY (SELECT {select} FROM ONLY {name}{}) TO STDOUT;\nSELECT '\\.';\n",
            sql_literal(&text),
            range(p.part, p.parts, t.blocks)
        ));
    }
    script.push_str("COMMIT;\n");
    script
}

/// psql's arguments for [`copy_script`]: no psqlrc, rows printed bare.
pub fn copy_args() -> Vec<String> {
    [
        "--no-psqlrc",
        "--quiet",
        "--no-align",
        "--tuples-only",
        "--set=ON_ERROR_STOP=1",
        "--no-password",
    ]
    .iter()
    .map(ToString::to_string)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn table(schema: &str, name: &str, bytes: u64) -> DataTable {
        DataTable {
            schema: schema.into(),
            name: name.into(),
            columns: vec!["id".into()],
            bytes,
            blocks: bytes / 8192,
        }
    }

    /// A database like the benchmark's: one table much larger than the
    /// rest, a partitioned table's partitions, small ones, an empty one.
    fn mixed() -> Vec<DataTable> {
        let mut t = vec![
            table("public", "events", 40 * GIB + 7),
            table("public", "orders", 3 * GIB),
            table("Sales", "Order Items", 2 * GIB),
            table("public", "empty", 0),
        ];
        for m in 1..=12 {
            t.push(table(
                "public",
                &format!("metrics_2026_{m:02}"),
                GIB / 3 + m,
            ));
        }
        t
    }

    /// Every table is dumped exactly once: whole, or every part of it, the
    /// parts' bytes adding up to the table's.
    fn assert_covers(tables: &[DataTable], plans: &[StreamPlan]) {
        for t in tables {
            let mut parts: Vec<&Piece> = plans
                .iter()
                .flat_map(|s| &s.pieces)
                .filter(|p| p.schema == t.schema && p.name == t.name)
                .collect();
            parts.sort_by_key(|p| p.part);
            let n = parts.len() as u64;
            assert!(n >= 1, "{}.{} is in no stream", t.schema, t.name);
            assert!(parts.iter().all(|p| p.parts == n), "{parts:?}");
            assert_eq!(
                parts.iter().map(|p| p.part).collect::<Vec<_>>(),
                (1..=n).collect::<Vec<_>>()
            );
            assert_eq!(parts.iter().map(|p| p.bytes).sum::<u64>(), t.bytes);
        }
        for s in plans {
            assert_eq!(s.bytes, s.pieces.iter().map(|p| p.bytes).sum::<u64>());
        }
    }

    #[test]
    fn one_stream_dumps_every_table_whole() {
        let tables = mixed();
        let plans = plan(&tables, 1, GIB);
        assert_eq!(plans.len(), 1);
        assert!(plans[0].pieces.iter().all(|p| p.parts == 1));
        assert_eq!(plans[0].pieces.len(), tables.len());
        assert_covers(&tables, &plans);
    }

    #[test]
    fn the_largest_table_is_cut_and_the_streams_come_out_even() {
        let tables = mixed();
        let total: u64 = tables.iter().map(|t| t.bytes).sum();
        for streams in [2, 4, 8] {
            let plans = plan(&tables, streams, GIB);
            assert_eq!(plans.len(), streams);
            assert_covers(&tables, &plans);
            let events = plans
                .iter()
                .flat_map(|s| &s.pieces)
                .find(|p| p.name == "events")
                .unwrap();
            assert_eq!(events.parts, PARTS_PER_STREAM * streams as u64);
            // Greedy largest-first: no stream holds more than an even
            // share plus the largest piece.
            let largest = plans
                .iter()
                .flat_map(|s| &s.pieces)
                .map(|p| p.bytes)
                .max()
                .unwrap();
            for s in &plans {
                assert!(
                    s.bytes <= total / streams as u64 + largest,
                    "{streams} streams: {} > {} + {largest}",
                    s.bytes,
                    total / streams as u64
                );
            }
            // Without cutting, the largest table alone would bound it.
            let whole = plan(&tables, streams, 0);
            assert_covers(&tables, &whole);
            let most = |p: &[StreamPlan]| p.iter().map(|s| s.bytes).max().unwrap();
            assert!(most(&plans) < most(&whole), "{streams} streams");
            assert_eq!(most(&whole), 40 * GIB + 7);
        }
    }

    #[test]
    fn a_table_at_the_threshold_is_not_cut_and_small_cuts_stay_near_it() {
        let tables = [
            table("public", "at", GIB),
            table("public", "over", 2 * GIB + 1),
        ];
        let plans = plan(&tables, 4, GIB);
        assert_covers(&tables, &plans);
        let parts = |name: &str| {
            plans
                .iter()
                .flat_map(|s| &s.pieces)
                .find(|p| p.name == name)
                .unwrap()
                .parts
        };
        assert_eq!((parts("at"), parts("over")), (1, 3));
    }

    #[test]
    fn fewer_tables_than_streams_open_fewer_connections() {
        let tables = [table("public", "a", 10), table("public", "b", 20)];
        let plans = plan(&tables, 8, GIB);
        assert_eq!(plans.len(), 2);
        assert_covers(&tables, &plans);
        assert_eq!(plan(&[], 4, GIB), Vec::<StreamPlan>::new());
    }

    #[test]
    fn the_plan_does_not_depend_on_the_inventorys_order() {
        let tables = mixed();
        let mut reversed = tables.clone();
        reversed.reverse();
        assert_eq!(plan(&tables, 4, GIB), plan(&reversed, 4, GIB));
        // Equal sizes go in name order, quoted mixed-case names included.
        let same = [
            table("b", "t", 5),
            table("Sales", "Order Items", 5),
            table("a", "t", 5),
        ];
        let order: Vec<String> = plan(&same, 1, 0)[0]
            .pieces
            .iter()
            .map(|p| format!("{}.{}", p.schema, p.name))
            .collect();
        assert_eq!(order, ["Sales.Order Items", "a.t", "b.t"]);
    }
}

#[cfg(test)]
mod script_tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn names_are_quoted_as_one_line_of_ascii() {
        assert_eq!(sql_ident("Order Items"), r#""Order Items""#);
        assert_eq!(sql_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(sql_ident(r"back\slash"), r#""back\slash""#);
        assert_eq!(sql_ident("d\u{e9}j\u{e0}"), r#"U&"d\00E9j\00E0""#);
        assert_eq!(sql_ident("a\\b\n\"c"), r#"U&"a\\b\000A""c""#);
        assert_eq!(sql_ident("\u{1F600}"), r#"U&"\+01F600""#);
        assert_eq!(sql_literal("it's"), "'it''s'");
        assert_eq!(sql_literal("\u{e9}'"), r"U&'\00E9'''");
        assert_eq!(copy_name("S\u{e9}", "t"), r#"U&"S\00E9"."t""#);
    }

    #[test]
    fn the_copy_script_is_ascii_locks_first_and_copies_every_piece() {
        let odd = DataTable {
            schema: "Gr\u{f6}\u{df}e".into(),
            name: "line\nbreak \"q\"".into(),
            columns: vec!["na\u{ef}ve".into(), "id".into()],
            bytes: 3 * GIB,
            blocks: 300,
        };
        let empty = DataTable {
            schema: "public".into(),
            name: "no columns".into(),
            columns: vec![],
            bytes: 10,
            blocks: 1,
        };
        let tables: BTreeMap<(String, String), DataTable> = [odd.clone(), empty.clone()]
            .into_iter()
            .map(|t| ((t.schema.clone(), t.name.clone()), t))
            .collect();
        let plans = plan(&[odd, empty], 2, GIB);
        let scripts: Vec<String> = plans
            .iter()
            .enumerate()
            .map(|(i, p)| {
                copy_script(
                    p,
                    (i + 1, 2),
                    &tables,
                    "00000003-0000001B-1",
                    "LATIN1",
                    None,
                )
            })
            .collect();
        for s in &scripts {
            assert!(s.is_ascii(), "{s}");
            let lock = s.find("LOCK TABLE ONLY").unwrap();
            assert!(lock < s.find("COPY (").unwrap(), "{s}");
            assert!(s.contains("SET client_encoding = 'LATIN1';"), "{s}");
        }
        let all = scripts.concat();
        // The split table's parts (3 GiB at 1 GiB: 3), ranges by block,
        // the first and the last open-ended; the table without columns
        // copied whole.
        assert_eq!(
            all.matches(r#"FROM ONLY U&"Gr\00F6\00DFe""#).count(),
            3,
            "{all}"
        );
        assert!(
            all.contains("WHERE ctid < '(100,0)'::pg_catalog.tid) TO STDOUT"),
            "{all}"
        );
        assert!(all.contains("WHERE ctid >= '(100,0)'::pg_catalog.tid AND ctid < '(200,0)'::pg_catalog.tid) TO STDOUT"), "{all}");
        assert!(
            all.contains("WHERE ctid >= '(200,0)'::pg_catalog.tid) TO STDOUT"),
            "{all}"
        );
        assert!(
            all.contains(r#"COPY (SELECT  FROM ONLY "public"."no columns") TO STDOUT;"#),
            "{all}"
        );
        assert!(
            all.contains(r#"COPY "public"."no columns" FROM stdin;"#),
            "{all}"
        );
    }
}
