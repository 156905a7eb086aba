//! Exact row counts read from the dump stream as it passes through.
//!
//! pg_dump writes table data as COPY text, one line per row. In the custom
//! format (with pg_dump's own compression off) that text sits in length-
//! prefixed data blocks whose table is named by the archive's table of
//! contents; in the plain format it sits between `COPY … FROM stdin;` and
//! `\.`. Counting newlines there gives exact counts for the cost of a byte
//! scan, with no second pass over the database.
//!
//! Both counters are push parsers: they accept the stream in chunks of any
//! size. If the stream is not what they expect they stop counting and say so
//! ([`RowCounter::finish`] returns `None`) rather than guessing.
//!
//! Length: about 180 of its lines are the unit tests of the COPY parsers,
//! kept beside the state machines they pin down.

use std::collections::{BTreeMap, HashMap};

/// (schema, table) → rows.
pub type RowCountMap = BTreeMap<(String, String), u64>;

/// Counts rows in a pg_dump stream of either format.
pub enum RowCounter {
    Custom(CustomCounter),
    Plain(PlainCounter),
}

impl RowCounter {
    pub fn custom() -> Self {
        RowCounter::Custom(CustomCounter::default())
    }

    pub fn plain() -> Self {
        RowCounter::Plain(PlainCounter::default())
    }

    /// Rows counted so far (for progress; [`RowCounter::finish`] has the
    /// per-table counts).
    pub fn rows_so_far(&self) -> u64 {
        match self {
            RowCounter::Custom(c) => {
                let open = matches!(
                    c.state,
                    CState::ChunkLen { blobs: false } | CState::ChunkData { blobs: false, .. }
                ) && c.current.is_some();
                c.done + if open { c.lines.rows } else { 0 }
            }
            RowCounter::Plain(p) => p.done,
        }
    }

    /// Length: the COPY scanner's states for one chunk; kept together so a row
    /// split across chunks is handled in one place.
    pub fn feed(&mut self, chunk: &[u8]) {
        match self {
            RowCounter::Custom(c) => c.feed(chunk),
            RowCounter::Plain(p) => p.feed(chunk),
        }
    }

    /// The counts, or the reason the stream could not be understood.
    ///
    /// # Errors
    /// A description of what was unexpected in the stream.
    pub fn finish(self) -> Result<RowCountMap, String> {
        match self {
            RowCounter::Custom(c) => c.finish(),
            RowCounter::Plain(p) => p.finish(),
        }
    }
}

// ---------------------------------------------------------------------------
// Custom format

const BLK_DATA: u8 = 1;
const BLK_BLOBS: u8 = 3;
const MAX_HEADER: usize = 256 << 20;

fn vers(major: u8, minor: u8) -> u32 {
    (u32::from(major) << 16) | (u32::from(minor) << 8)
}

#[derive(Default)]
pub struct CustomCounter {
    state: CState,
    /// Bytes of the header and TOC, kept until the whole TOC has arrived.
    head: Vec<u8>,
    int_size: usize,
    /// dumpId → (schema, table) for TABLE DATA entries.
    tables: HashMap<i64, (String, String)>,
    counts: RowCountMap,
    /// Rows of the tables whose data has ended.
    done: u64,
    /// Pending bytes of a partly received integer.
    pending: Vec<u8>,
    current: Option<(String, String)>,
    lines: CopyLines,
    failed: Option<String>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum CState {
    #[default]
    Header,
    BlockType,
    DumpId {
        blobs: bool,
    },
    ChunkLen {
        blobs: bool,
    },
    ChunkData {
        blobs: bool,
        left: u64,
    },
    BlobOid,
    Failed,
}

/// Reads primitives from a fully buffered header; `None` means "need more".
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    int_size: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }

    fn int(&mut self) -> Option<i64> {
        let sign = self.byte()?;
        let raw = self.bytes(self.int_size)?;
        Some(decode_int(sign, raw))
    }

    /// `None` = need more; `Some(None)` = NULL string.
    fn string(&mut self) -> Option<Option<String>> {
        let len = self.int()?;
        if len < 0 {
            return Some(None);
        }
        let raw = self.bytes(usize::try_from(len).ok()?)?;
        Some(Some(String::from_utf8_lossy(raw).into_owned()))
    }
}

fn decode_int(sign: u8, raw: &[u8]) -> i64 {
    let mut v: i64 = 0;
    for (i, b) in raw.iter().enumerate().take(8) {
        v |= i64::from(*b) << (8 * i);
    }
    if sign != 0 { -v } else { v }
}

enum HeadResult {
    NeedMore,
    Done {
        consumed: usize,
        int_size: usize,
        tables: HashMap<i64, (String, String)>,
    },
    Unsupported(String),
}

fn parse_head(buf: &[u8]) -> HeadResult {
    macro_rules! need {
        ($e:expr) => {
            match $e {
                Some(v) => v,
                None => return HeadResult::NeedMore,
            }
        };
    }
    if buf.len() >= 5 && &buf[..5] != b"PGDMP" {
        return HeadResult::Unsupported("not a pg_dump custom-format archive".into());
    }
    let mut c = Cursor {
        buf,
        pos: 5,
        int_size: 4,
    };
    let vmaj = need!(c.byte());
    let vmin = need!(c.byte());
    let _vrev = need!(c.byte());
    let version = vers(vmaj, vmin);
    if version < vers(1, 12) || vmaj != 1 || vmin > 16 {
        return HeadResult::Unsupported(format!("archive version {vmaj}.{vmin} is not understood"));
    }
    c.int_size = usize::from(need!(c.byte()));
    if !(1..=8).contains(&c.int_size) {
        return HeadResult::Unsupported(format!("integer size {}", c.int_size));
    }
    let _off_size = need!(c.byte());
    let format = need!(c.byte());
    if format != 1 {
        return HeadResult::Unsupported(format!("archive format code {format} is not custom"));
    }
    let compressed = if version >= vers(1, 15) {
        need!(c.byte()) != 0
    } else {
        need!(c.int()) != 0
    };
    if compressed {
        return HeadResult::Unsupported(
            "pg_dump compressed the archive itself (expected -Z0)".into(),
        );
    }
    for _ in 0..7 {
        need!(c.int()); // creation time
    }
    need!(c.string()); // database name
    need!(c.string()); // server version
    need!(c.string()); // pg_dump version
    let toc_count = need!(c.int());
    let mut tables = HashMap::new();
    for _ in 0..toc_count {
        let dump_id = need!(c.int());
        need!(c.int()); // hadDumper
        need!(c.string()); // tableoid
        need!(c.string()); // oid
        let tag = need!(c.string()).unwrap_or_default();
        let desc = need!(c.string()).unwrap_or_default();
        need!(c.int()); // section
        need!(c.string()); // defn
        need!(c.string()); // dropStmt
        need!(c.string()); // copyStmt
        let namespace = need!(c.string()).unwrap_or_default();
        need!(c.string()); // tablespace
        need!(c.string()); // tableam
        if version >= vers(1, 16) {
            need!(c.int()); // relkind
        }
        need!(c.string()); // owner
        need!(c.string()); // "false" (WITH OIDS)
        // Dependencies: a NULL-terminated list of strings.
        while need!(c.string()).is_some() {}
        // Custom format's extra TOC data: data state + offset.
        need!(c.byte());
        need!(c.bytes(usize::from(_off_size)));
        if desc == "TABLE DATA" {
            tables.insert(dump_id, (namespace, tag));
        }
    }
    HeadResult::Done {
        consumed: c.pos,
        int_size: c.int_size,
        tables,
    }
}

impl CustomCounter {
    fn fail(&mut self, why: String) {
        self.state = CState::Failed;
        self.failed.get_or_insert(why);
        self.head = Vec::new();
    }

    /// Accumulates an integer that may straddle chunks.
    fn take_int(&mut self, data: &mut &[u8]) -> Option<i64> {
        let want = 1 + self.int_size;
        let n = (want - self.pending.len()).min(data.len());
        self.pending.extend_from_slice(&data[..n]);
        *data = &data[n..];
        if self.pending.len() < want {
            return None;
        }
        let v = decode_int(self.pending[0], &self.pending[1..]);
        self.pending.clear();
        Some(v)
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                CState::Failed => return,
                CState::Header => {
                    self.head.extend_from_slice(data);
                    data = &[];
                    match parse_head(&self.head) {
                        HeadResult::NeedMore if self.head.len() > MAX_HEADER => {
                            self.fail("archive table of contents is implausibly large".into());
                        }
                        HeadResult::NeedMore => {}
                        HeadResult::Unsupported(why) => self.fail(why),
                        HeadResult::Done {
                            consumed,
                            int_size,
                            tables,
                        } => {
                            self.int_size = int_size;
                            self.tables = tables;
                            let rest = self.head.split_off(consumed);
                            self.head = Vec::new();
                            self.state = CState::BlockType;
                            self.feed(&rest);
                        }
                    }
                }
                CState::BlockType => {
                    let t = data[0];
                    data = &data[1..];
                    self.state = match t {
                        BLK_DATA => CState::DumpId { blobs: false },
                        BLK_BLOBS => CState::DumpId { blobs: true },
                        other => {
                            self.fail(format!("unexpected data block type {other}"));
                            return;
                        }
                    };
                }
                CState::DumpId { blobs } => {
                    let Some(id) = self.take_int(&mut data) else {
                        return;
                    };
                    if blobs {
                        self.current = None;
                        self.state = CState::BlobOid;
                    } else {
                        self.current = self.tables.get(&id).cloned();
                        self.lines = CopyLines::default();
                        if let Some(key) = &self.current {
                            // A table with no rows still has a data block.
                            self.counts.entry(key.clone()).or_insert(0);
                        }
                        self.state = CState::ChunkLen { blobs: false };
                    }
                }
                CState::BlobOid => {
                    let Some(oid) = self.take_int(&mut data) else {
                        return;
                    };
                    self.state = if oid == 0 {
                        CState::BlockType
                    } else {
                        CState::ChunkLen { blobs: true }
                    };
                }
                CState::ChunkLen { blobs } => {
                    let Some(len) = self.take_int(&mut data) else {
                        return;
                    };
                    self.state = match (len, blobs) {
                        (0, false) => {
                            if let Some(key) = &self.current {
                                *self
                                    .counts
                                    .get_mut(key)
                                    .expect("entry created at block start") += self.lines.rows;
                                self.done += self.lines.rows;
                            }
                            CState::BlockType
                        }
                        (0, true) => CState::BlobOid,
                        (l, _) if l < 0 => {
                            self.fail(format!("negative chunk length {l}"));
                            return;
                        }
                        (l, blobs) => CState::ChunkData {
                            blobs,
                            left: l as u64,
                        },
                    };
                }
                CState::ChunkData { blobs, left } => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    if !blobs && self.current.is_some() {
                        self.lines.feed(&data[..n]);
                    }
                    data = &data[n..];
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        CState::ChunkLen { blobs }
                    } else {
                        CState::ChunkData { blobs, left }
                    };
                }
            }
        }
    }

    /// # Errors
    /// Why the stream could not be counted.
    pub fn finish(self) -> Result<RowCountMap, String> {
        if let Some(why) = self.failed {
            return Err(why);
        }
        match self.state {
            CState::BlockType => Ok(self.counts),
            CState::Header => Err("archive ended inside its table of contents".into()),
            other => Err(format!("archive ended mid-block ({other:?})")),
        }
    }
}

/// Counts COPY text rows: one per line, up to the `\.` terminator line that
/// pg_dump writes at the end of each table's data (followed by blank lines).
/// An empty line before it is a row (a single empty-string column).
#[derive(Default)]
struct CopyLines {
    /// Length of the current line so far and its first two bytes.
    len: usize,
    head: [u8; 2],
    ended: bool,
    rows: u64,
}

impl CopyLines {
    fn feed(&mut self, data: &[u8]) {
        if self.ended {
            return;
        }
        let mut start = 0;
        for nl in memchr::memchr_iter(b'\n', data) {
            self.absorb(&data[start..nl]);
            if self.len == 2 && self.head == *b"\\." {
                self.ended = true;
                return;
            }
            self.rows += 1;
            self.len = 0;
            start = nl + 1;
        }
        self.absorb(&data[start..]);
    }

    fn absorb(&mut self, part: &[u8]) {
        for (i, b) in part
            .iter()
            .take(2usize.saturating_sub(self.len))
            .enumerate()
        {
            self.head[self.len + i] = *b;
        }
        self.len += part.len();
    }
}

// ---------------------------------------------------------------------------
// Plain format

const LINE_KEEP: usize = 4096;

#[derive(Default)]
pub struct PlainCounter {
    /// The start of the current line (up to `LINE_KEEP` bytes).
    line: Vec<u8>,
    /// Whether the current line was longer than what is kept.
    truncated: bool,
    /// The table whose `-- Data for Name:` comment was seen last.
    announced: Option<(String, String)>,
    /// Inside a COPY block, for this table.
    copying: Option<(String, String)>,
    counts: RowCountMap,
    /// Rows counted.
    done: u64,
}

impl PlainCounter {
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.keep(&data[..i]);
                    self.end_line();
                    data = &data[i + 1..];
                }
                None => {
                    self.keep(data);
                    data = &[];
                }
            }
        }
    }

    fn keep(&mut self, part: &[u8]) {
        let room = LINE_KEEP.saturating_sub(self.line.len());
        if part.len() > room {
            self.truncated = true;
        }
        self.line.extend_from_slice(&part[..part.len().min(room)]);
    }

    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        let truncated = std::mem::replace(&mut self.truncated, false);
        if let Some(table) = &self.copying {
            if line == b"\\." {
                self.copying = None;
            } else {
                *self.counts.get_mut(table).expect("entry created at COPY") += 1;
                self.done += 1;
            }
            return;
        }
        if let Some(rest) = line.strip_prefix(b"-- Data for Name: ") {
            self.announced = parse_data_comment(&String::from_utf8_lossy(rest));
        } else if line.starts_with(b"COPY ")
            && !truncated
            && line.ends_with(b" FROM stdin;")
            && let Some(t) = self.announced.take()
        {
            self.counts.entry(t.clone()).or_insert(0);
            self.copying = Some(t);
        }
    }

    /// # Errors
    /// When the stream ended inside a COPY block.
    pub fn finish(mut self) -> Result<RowCountMap, String> {
        if !self.line.is_empty() {
            self.end_line();
        }
        match self.copying {
            Some((s, t)) => Err(format!("dump ended inside the data of {s}.{t}")),
            None => Ok(self.counts),
        }
    }
}

/// `users; Type: TABLE DATA; Schema: public; Owner: app` → (public, users).
fn parse_data_comment(rest: &str) -> Option<(String, String)> {
    let (name, rest) = rest.split_once("; Type: TABLE DATA; Schema: ")?;
    let schema = rest.split_once("; ").map_or(rest, |(s, _)| s);
    Some((schema.to_string(), name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a minimal custom-format archive the way pg_dump 1.14 lays it out.
    struct Archive {
        buf: Vec<u8>,
    }

    impl Archive {
        fn int(&mut self, v: i64) {
            self.buf.push(u8::from(v < 0));
            self.buf
                .extend_from_slice(&(v.unsigned_abs() as u32).to_le_bytes());
        }
        fn str(&mut self, s: Option<&str>) {
            match s {
                None => self.int(-1),
                Some(s) => {
                    self.int(s.len() as i64);
                    self.buf.extend_from_slice(s.as_bytes());
                }
            }
        }
        fn new(entries: &[(i64, &str, &str, &str)], compression: i64) -> Self {
            let mut a = Archive {
                buf: b"PGDMP".to_vec(),
            };
            a.buf.extend_from_slice(&[1, 14, 0, 4, 8, 1]);
            a.int(compression);
            for v in [1, 2, 3, 4, 5, 126, 0] {
                a.int(v);
            }
            a.str(Some("db"));
            a.str(Some("15.1"));
            a.str(Some("15.1"));
            a.int(entries.len() as i64);
            for (id, desc, ns, tag) in entries {
                a.int(*id);
                a.int(1);
                a.str(Some("0"));
                a.str(Some("0"));
                a.str(Some(tag));
                a.str(Some(desc));
                a.int(2);
                a.str(Some(""));
                a.str(Some(""));
                a.str(None);
                a.str(Some(ns));
                a.str(Some(""));
                a.str(Some("heap"));
                a.str(Some("owner"));
                a.str(Some("false"));
                a.str(Some("3"));
                a.str(None);
                a.buf.push(1);
                a.buf.extend_from_slice(&[0; 8]);
            }
            a
        }
        fn data(&mut self, id: i64, chunks: &[&str]) {
            self.buf.push(BLK_DATA);
            self.int(id);
            for c in chunks {
                self.int(c.len() as i64);
                self.buf.extend_from_slice(c.as_bytes());
            }
            self.int(0);
        }
        fn blobs(&mut self, id: i64, blobs: &[&[u8]]) {
            self.buf.push(BLK_BLOBS);
            self.int(id);
            for (i, b) in blobs.iter().enumerate() {
                self.int(i as i64 + 100);
                self.int(b.len() as i64);
                self.buf.extend_from_slice(b);
                self.int(0);
            }
            self.int(0);
        }
    }

    fn sample() -> Vec<u8> {
        let mut a = Archive::new(
            &[
                (1, "TABLE", "public", "users"),
                (2, "TABLE DATA", "public", "users"),
                (3, "TABLE DATA", "shop", "orders"),
                (4, "TABLE DATA", "public", "empty"),
                (5, "BLOBS", "", "BLOBS"),
            ],
            0,
        );
        a.data(
            2,
            &[
                "1\talice\n2\tbob\n",
                "3\tcarol\\nwith newline escaped\n",
                "\\.\n\n\n",
            ],
        );
        a.blobs(5, &[b"\n\n\n\n", b"x\n"]);
        // An empty line is a row (one empty-string column); split terminator.
        a.data(3, &["\n", "\\", ".\n\n\n"]);
        a.data(4, &["\\.\n\n\n"]);
        a.buf
    }

    fn expected() -> RowCountMap {
        [
            (("public".to_string(), "users".to_string()), 3),
            (("shop".to_string(), "orders".to_string()), 1),
            (("public".to_string(), "empty".to_string()), 0),
        ]
        .into_iter()
        .collect()
    }

    #[test]
    fn custom_counts_whole_and_byte_by_byte() {
        let bytes = sample();
        let mut whole = RowCounter::custom();
        whole.feed(&bytes);
        assert_eq!(whole.finish().unwrap(), expected());

        for step in [1, 2, 3, 7, 64] {
            let mut c = RowCounter::custom();
            let mut seen = 0;
            for chunk in bytes.chunks(step) {
                c.feed(chunk);
                // The running count never goes back, nor counts a blob's lines.
                assert!(c.rows_so_far() >= seen, "chunk size {step}");
                seen = c.rows_so_far();
            }
            assert_eq!(seen, 4, "chunk size {step}");
            assert_eq!(c.finish().unwrap(), expected(), "chunk size {step}");
        }
    }

    #[test]
    fn custom_truncated_stream_is_not_counted() {
        let bytes = sample();
        let mut c = RowCounter::custom();
        c.feed(&bytes[..bytes.len() - 3]);
        assert!(c.finish().unwrap_err().contains("mid-block"));
    }

    #[test]
    fn custom_compressed_archive_is_refused() {
        let a = Archive::new(&[(1, "TABLE DATA", "public", "t")], -1);
        let mut c = RowCounter::custom();
        c.feed(&a.buf);
        assert!(c.finish().unwrap_err().contains("-Z0"));
    }

    #[test]
    fn custom_rejects_non_archives() {
        let mut c = RowCounter::custom();
        c.feed(b"--\n-- PostgreSQL database dump\n");
        assert!(c.finish().is_err());
    }

    const PLAIN: &str = "--\n-- Data for Name: users; Type: TABLE DATA; Schema: public; Owner: app\n--\n\nCOPY public.users (id, name) FROM stdin;\n1\talice\n2\t\\\\.\n\\.\n\n\n--\n-- Data for Name: empty; Type: TABLE DATA; Schema: s; Owner: app\n--\n\nCOPY s.empty (id) FROM stdin;\n\\.\n\nSELECT 1;\n";

    #[test]
    fn plain_counts_whole_and_byte_by_byte() {
        let want: RowCountMap = [
            (("public".to_string(), "users".to_string()), 2),
            (("s".to_string(), "empty".to_string()), 0),
        ]
        .into_iter()
        .collect();
        for step in [1, 5, PLAIN.len()] {
            let mut c = RowCounter::plain();
            for chunk in PLAIN.as_bytes().chunks(step) {
                c.feed(chunk);
            }
            assert_eq!(c.rows_so_far(), 2, "chunk size {step}");
            assert_eq!(c.finish().unwrap(), want, "chunk size {step}");
        }
    }

    #[test]
    fn plain_truncated_inside_copy_is_an_error() {
        let cut = PLAIN.find("2\t").unwrap();
        let mut c = RowCounter::plain();
        c.feed(&PLAIN.as_bytes()[..cut]);
        assert!(c.finish().unwrap_err().contains("public.users"));
    }
}
