//! How a backup's table data is spread over `streams` connections reading
//! one snapshot (issue 30; not yet wired into a backup). A table larger
//! than the split threshold is cut into parts of about the threshold each
//! (key or ctid ranges, chosen when the part is dumped); then parts and
//! whole tables are dealt, largest first, to the stream holding the fewest
//! bytes so far (greedy longest-processing-time), so the largest table no
//! longer bounds the wall time. Pure: the same tables give the same plan.

use backstop_dump::TableInfo;

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
pub fn plan(tables: &[TableInfo], streams: usize, split_larger_than: u64) -> Vec<StreamPlan> {
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
fn pieces_of(t: &TableInfo, streams: usize, split_larger_than: u64) -> Vec<Piece> {
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

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn table(schema: &str, name: &str, bytes: u64) -> TableInfo {
        TableInfo {
            schema: schema.into(),
            name: name.into(),
            rows: None,
            bytes,
        }
    }

    /// A database like the benchmark's: one table much larger than the
    /// rest, a partitioned table's partitions, small ones, an empty one.
    fn mixed() -> Vec<TableInfo> {
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
    fn assert_covers(tables: &[TableInfo], plans: &[StreamPlan]) {
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
