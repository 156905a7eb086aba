//! Selecting the COPY blocks of some tables from a data artifact of a
//! backup in streams as it streams (`restore --table`): a pure transform
//! between reading the artifact back and the psql guard.

/// Selects from a data artifact's plaintext the COPY blocks of some
/// tables: every line outside a block passes (the artifact's settings and
/// comments), a block passes whole or not at all. It streams: it holds
/// only the line outside blocks it is reading, and no more than
/// [`MAX_LINE`] of that. Backstop writes each COPY line as one line of
/// ASCII ([`crate::backup::copy_name`]), whatever the names hold.
pub struct CopySelect {
    /// `COPY <name> ` and `COPY <name> (` for each table kept.
    keep: Vec<Vec<u8>>,
    line: Vec<u8>,
    state: State,
}

/// The longest line outside COPY blocks a data artifact may hold (a COPY
/// line with every column name of a wide table is far shorter).
const MAX_LINE: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Outside,
    /// Inside a block, passing it or not; `at`: how much of `\.\n` the
    /// current line has matched from its start (None: it is not that).
    Block {
        pass: bool,
        at: Option<usize>,
    },
}

impl CopySelect {
    /// Keeps the blocks of `names` (as [`crate::backup::copy_name`] writes them).
    pub fn new(names: &[String]) -> Self {
        let keep = names
            .iter()
            .flat_map(|n| [format!("COPY {n} "), format!("COPY {n} (")])
            .map(String::into_bytes)
            .collect();
        CopySelect {
            keep,
            line: Vec::new(),
            state: State::Outside,
        }
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        let line = std::mem::take(&mut self.line);
        if line.starts_with(b"COPY ") && line.ends_with(b" FROM stdin;\n") {
            let pass = self.keep.iter().any(|k| line.starts_with(k));
            self.state = State::Block { pass, at: Some(0) };
            if pass {
                out.extend_from_slice(&line);
            }
            return;
        }
        out.extend_from_slice(&line);
    }

    /// Appends to `out` what of `input` is kept.
    ///
    /// # Errors
    /// A line outside the COPY blocks longer than [`MAX_LINE`].
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        const END: &[u8] = b"\\.\n";
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Outside => {
                    let end = input[i..].iter().position(|&b| b == b'\n');
                    let upto = end.map_or(input.len(), |e| i + e + 1);
                    if self.line.len() + (upto - i) > MAX_LINE {
                        return Err(
                            "a line outside the COPY blocks is longer than any data artifact holds: not a backstop data artifact".into(),
                        );
                    }
                    self.line.extend_from_slice(&input[i..upto]);
                    i = upto;
                    if end.is_some() {
                        self.end_line(out);
                    }
                }
                State::Block { pass, mut at } => {
                    let start = i;
                    let mut ended = false;
                    while i < input.len() {
                        let b = input[i];
                        i += 1;
                        at = match at {
                            Some(m) if END[m] == b => Some(m + 1),
                            _ => None,
                        };
                        if at == Some(END.len()) {
                            ended = true;
                            break;
                        }
                        if b == b'\n' {
                            at = Some(0);
                        }
                    }
                    if pass {
                        out.extend_from_slice(&input[start..i]);
                    }
                    self.state = if ended {
                        State::Outside
                    } else {
                        State::Block { pass, at }
                    };
                }
            }
        }
        Ok(())
    }

    /// Appends what is left at the end (a last line without a line break).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.state == State::Outside {
            out.append(&mut self.line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: &str = "--\n-- backstop data stream 1 of 2\n--\nSET client_encoding = 'UTF8';\n\n--\n-- Data for Name: a; Type: TABLE DATA; Schema: s; Owner: -\n--\n\nCOPY \"s\".\"a\" (\"id\") FROM stdin;\n1\n\\\\.\n2\n\\.\n\n--\n-- Data for Name: A b; Type: TABLE DATA; Schema: s; Owner: -\n--\n\nCOPY \"s\".\"A b\" (\"x\", \"y\") FROM stdin;\n3\tz\n\\.\n\nCOPY \"s\".\"a\" (\"id\") FROM stdin;\n4\n\\.\n";

    fn filtered(names: &[&str], chunk: usize) -> String {
        let names: Vec<String> = names.iter().map(ToString::to_string).collect();
        let mut out = Vec::new();
        let mut f = CopySelect::new(&names);
        for c in DATA.as_bytes().chunks(chunk) {
            f.filter(c, &mut out).unwrap();
        }
        f.finish(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_filter_keeps_whole_blocks_of_the_tables_asked_for() {
        for chunk in [1, 2, 3, 7, 4096] {
            let a = filtered(&["\"s\".\"a\""], chunk);
            assert!(
                a.contains("COPY \"s\".\"a\" (\"id\") FROM stdin;\n1\n\\\\.\n2\n\\.\n"),
                "{a}"
            );
            assert!(
                a.contains("COPY \"s\".\"a\" (\"id\") FROM stdin;\n4\n\\.\n"),
                "{a}"
            );
            assert!(!a.contains("3\tz"), "{a}");
            assert!(!a.contains("COPY \"s\".\"A b\""), "{a}");
            assert!(a.contains("SET client_encoding"), "{a}");
            let b = filtered(&["\"s\".\"A b\""], chunk);
            assert!(
                b.contains("COPY \"s\".\"A b\" (\"x\", \"y\") FROM stdin;\n3\tz\n\\.\n"),
                "{b}"
            );
            assert!(!b.contains("\n1\n") && !b.contains("\n4\n"), "{b}");
            assert_eq!(filtered(&["\"s\".\"a\"", "\"s\".\"A b\""], chunk), DATA);
        }
    }
}
