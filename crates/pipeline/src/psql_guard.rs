//! psql never runs a meta-command from a backup.
//!
//! A plain-SQL artifact and a globals artifact are applied with psql, and
//! psql obeys backslash commands wherever they stand outside quotes and
//! comments: `\! cmd` runs a shell command on the restoring host, `\o FILE`
//! writes files, backticks in any meta-command's arguments run commands.
//! Whoever can write to the store could plant them, so the stream psql
//! reads passes through [`PsqlGuard`] first: it lexes the SQL as psql does
//! (quotes, dollar quotes, comments, parentheses, `BEGIN ATOMIC` bodies,
//! `COPY … FROM stdin` data up to `\.`) and refuses every backslash
//! command but pg_dump's own `\restrict` and `\unrestrict`, naming the
//! line, before psql has seen any of it. (`\connect` is refused too:
//! backstop runs pg_dump without `--create`, so a genuine artifact never
//! holds one.)
//!
//! A second wall where psql has one (13.22, 14.19, 15.14, 16.10, 17.6 and
//! later): the stream starts with `\restrict KEY`, a random key the
//! artifact cannot know, so psql itself refuses every backslash command
//! (pg_dump's own `\restrict`/`\unrestrict` pair is dropped by the guard,
//! as psql would refuse it inside ours). psql decides what is a command by
//! its own lexer and by the server's `standard_conforming_strings`, which
//! a script can change; the guard assumes pg_dump's `on`, so with an older
//! psql it is the only wall, and a crafted script that flips the setting
//! could make the two disagree about where a string ends (docs/SECURITY.md).

use std::fmt;

/// The longest meta-command line the guard reads (pg_dump's are under 100
/// bytes).
const MAX_META_LINE: usize = 4096;
/// The longest `COPY … FROM stdin;` line accepted (one of a table of 1,600
/// columns with 63-byte names is about 100 KiB).
const MAX_COPY_LINE: usize = 4 * 1024 * 1024;

/// Why the guard stopped the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// 1-based line of the artifact's plaintext.
    pub line: u64,
    pub reason: String,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: {}; nothing from that line on reached psql (pg_dump writes no such line: the artifact was altered or is not a backstop backup)",
            self.line, self.reason
        )
    }
}

impl std::error::Error for Refused {}

/// Where the lexer stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Normal,
    /// After `-`: a second one starts a line comment.
    Dash,
    /// After `/`: `*` starts a block comment.
    Slash,
    LineComment,
    /// A block comment at this nesting depth; `star`/`slash`: the last byte
    /// was `*` or `/` inside it.
    Block {
        depth: u32,
        star: bool,
        slash: bool,
    },
    /// A single-quoted string; `escapes` for `E'…'` (backslash escapes the
    /// next byte); `pending`: a quote was just seen (`''` stays inside).
    Quote {
        escapes: bool,
        backslash: bool,
        pending: bool,
    },
    DoubleQuote,
    /// After `$` outside an identifier: the tag read so far.
    DollarOpen(Vec<u8>),
    /// Inside `$tag$ … $tag$`; `matched`: how much of the closing `$tag$`
    /// the last bytes were.
    Dollar {
        tag: Vec<u8>,
        matched: usize,
    },
    /// A backslash command line being read (from the backslash to the end
    /// of the line).
    Meta(Vec<u8>),
    /// `COPY … FROM stdin` data: lines pass until one that is exactly
    /// `\.` (psql's end of data); `end`: how much of it the current line
    /// has been so far.
    Copy {
        end: EndOfData,
    },
}

/// How far the current COPY data line matches psql's end of data, `\.`
/// alone on its line (`\.\r` too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndOfData {
    LineStart,
    Backslash,
    Dot,
    DotCr,
    No,
}

/// The filter between an artifact's plaintext and psql. Feed it the stream
/// in pieces with [`PsqlGuard::filter`], then call [`PsqlGuard::finish`].
pub struct PsqlGuard {
    state: State,
    /// The `\restrict` key this restore gave psql, if psql has the command.
    restrict_key: Option<String>,
    started: bool,
    line: u64,
    /// Bytes of the current line seen so far.
    column: usize,
    /// No token since the last statement-ending `;`.
    stmt_empty: bool,
    paren_depth: u32,
    /// psql's `BEGIN ATOMIC … END` depth heuristic (PostgreSQL 14+).
    begin_depth: u32,
    identifier_count: u32,
    identifiers: [u8; 4],
    /// The identifier being read.
    ident: Vec<u8>,
    /// The identifier being read follows a number with nothing between
    /// (`1e5`, `1end`): psql 15 lexes those as one token, older ones as
    /// two, so anything that could change is refused.
    glued: bool,
    /// The last byte outside a word was a digit.
    after_digit: bool,
    /// The statement being read started with the word COPY.
    copy_stmt: bool,
    /// The current line, while it may be a `COPY … FROM stdin;` statement.
    copy_line: Option<Vec<u8>>,
    /// Top-level `;` seen on the current line.
    semis_on_line: u32,
}

impl PsqlGuard {
    /// A guard; with `restrict_key`, psql's own `\restrict` is used too
    /// (only for a psql that has it: see [`psql_has_restrict`]).
    pub fn new(restrict_key: Option<String>) -> Self {
        PsqlGuard {
            state: State::Normal,
            restrict_key,
            started: false,
            line: 1,
            column: 0,
            stmt_empty: true,
            paren_depth: 0,
            begin_depth: 0,
            identifier_count: 0,
            identifiers: [0; 4],
            ident: Vec::new(),
            glued: false,
            after_digit: false,
            copy_stmt: false,
            copy_line: Some(Vec::new()),
            semis_on_line: 0,
        }
    }

    /// A guard with a fresh random `\restrict` key when `psql_version`
    /// (`psql --version`'s output) has the command, else the guard alone.
    pub fn for_psql(psql_version: &str) -> Self {
        let key = psql_has_restrict(psql_version).then(|| hex::encode(rand::random::<[u8; 24]>()));
        Self::new(key)
    }

    /// Whether psql's own `\restrict` wall is up for this stream.
    pub fn restricts(&self) -> bool {
        self.restrict_key.is_some()
    }

    /// Appends to `out` what of `input` may reach psql.
    ///
    /// # Errors
    /// [`Refused`] at the first backslash command that is not pg_dump's;
    /// `out` then holds everything before that line's backslash.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), Refused> {
        if !self.started {
            self.started = true;
            if let Some(k) = &self.restrict_key {
                out.extend_from_slice(format!("\\restrict {k}\n").as_bytes());
            }
        }
        for &b in input {
            self.byte(b, out)?;
        }
        Ok(())
    }

    /// Ends the stream: a backslash command on the last line without a
    /// newline is judged now.
    ///
    /// # Errors
    /// [`Refused`] as [`PsqlGuard::filter`].
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), Refused> {
        if !self.started {
            self.filter(&[], out)?;
        }
        if let State::Meta(line) = std::mem::replace(&mut self.state, State::Normal) {
            self.meta_line(&line, out)?;
        }
        Ok(())
    }

    fn refuse(&self, reason: impl Into<String>) -> Refused {
        Refused {
            line: self.line,
            reason: reason.into(),
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<u8>) -> Result<(), Refused> {
        if b == 0 {
            // psql reads lines as C strings: it would not see what follows
            // a NUL, and the guard must see what psql sees.
            return Err(self.refuse("a NUL byte (pg_dump never writes one)"));
        }
        match &mut self.state {
            State::Meta(buf) => {
                if b == b'\n' {
                    let line = std::mem::take(buf);
                    self.state = State::Normal;
                    self.meta_line(&line, out)?;
                    self.newline(out)?;
                    return Ok(());
                }
                if buf.len() >= MAX_META_LINE {
                    return Err(self.refuse(format!(
                        "a psql backslash command line longer than {MAX_META_LINE} bytes"
                    )));
                }
                buf.push(b);
                return Ok(());
            }
            State::Copy { end } => {
                out.push(b);
                if b == b'\n' {
                    let ended = matches!(*end, EndOfData::Dot | EndOfData::DotCr);
                    self.line += 1;
                    self.column = 0;
                    if ended {
                        // psql's end of data: a line that is exactly `\.`.
                        self.state = State::Normal;
                        self.after_statement();
                        self.copy_line = Some(Vec::new());
                    } else {
                        *end = EndOfData::LineStart;
                    }
                    return Ok(());
                }
                *end = match (*end, b) {
                    (EndOfData::LineStart, b'\\') => EndOfData::Backslash,
                    (EndOfData::Backslash, b'.') => EndOfData::Dot,
                    (EndOfData::Dot, b'\r') => EndOfData::DotCr,
                    _ => EndOfData::No,
                };
                self.column += 1;
                return Ok(());
            }
            _ => {}
        }
        self.lex(b, out)
    }

    /// One byte outside meta lines and COPY data.
    fn lex(&mut self, b: u8, out: &mut Vec<u8>) -> Result<(), Refused> {
        let line = self.line;
        self.lex_inside(b, out)?;
        if b == b'\n' && self.line == line {
            // A line break inside a string or comment (one outside them
            // went through `newline`): the statement goes on, so the next
            // line cannot start a COPY.
            self.line += 1;
            self.column = 0;
            self.semis_on_line = 0;
            self.copy_line = None;
        }
        Ok(())
    }

    /// Length: one arm per lexer state of psql's own lexer (quotes, dollar
    /// quotes, comments, COPY data); kept together so it can be read against
    /// psql's.
    fn lex_inside(&mut self, b: u8, out: &mut Vec<u8>) -> Result<(), Refused> {
        match std::mem::replace(&mut self.state, State::Normal) {
            State::Normal => self.normal(b, out),
            State::Dash => {
                if b == b'-' {
                    self.end_word()?;
                    self.state = State::LineComment;
                    self.emit(b, out);
                    Ok(())
                } else {
                    self.token();
                    self.normal(b, out)
                }
            }
            State::Slash => {
                if b == b'*' {
                    self.end_word()?;
                    self.state = State::Block {
                        depth: 1,
                        star: false,
                        slash: false,
                    };
                    self.emit(b, out);
                    Ok(())
                } else {
                    self.token();
                    self.normal(b, out)
                }
            }
            State::LineComment => {
                if b == b'\n' {
                    self.newline(out)?;
                } else {
                    self.state = State::LineComment;
                    self.emit(b, out);
                }
                Ok(())
            }
            State::Block {
                mut depth,
                star,
                slash,
            } => {
                let mut next = (false, false);
                if star && b == b'/' {
                    depth -= 1;
                } else if slash && b == b'*' {
                    depth += 1;
                } else {
                    next = (b == b'*', b == b'/');
                }
                if depth > 0 {
                    self.state = State::Block {
                        depth,
                        star: next.0,
                        slash: next.1,
                    };
                }
                self.emit(b, out);
                Ok(())
            }
            State::Quote {
                escapes,
                backslash,
                pending,
            } => {
                if pending {
                    if b == b'\'' {
                        // `''`: a quote inside the string.
                        self.state = State::Quote {
                            escapes,
                            backslash: false,
                            pending: false,
                        };
                        self.emit(b, out);
                        return Ok(());
                    }
                    return self.normal(b, out);
                }
                if backslash {
                    self.state = State::Quote {
                        escapes,
                        backslash: false,
                        pending: false,
                    };
                } else if escapes && b == b'\\' {
                    self.state = State::Quote {
                        escapes,
                        backslash: true,
                        pending: false,
                    };
                } else {
                    self.state = State::Quote {
                        escapes,
                        backslash: false,
                        pending: b == b'\'',
                    };
                }
                self.emit(b, out);
                Ok(())
            }
            State::DoubleQuote => {
                if b != b'"' {
                    self.state = State::DoubleQuote;
                }
                self.emit(b, out);
                Ok(())
            }
            State::DollarOpen(mut tag) => {
                if b == b'$' {
                    self.state = State::Dollar { tag, matched: 0 };
                    self.emit(b, out);
                    Ok(())
                } else if is_ident_start(b) || (!tag.is_empty() && b.is_ascii_digit()) {
                    tag.push(b);
                    self.state = State::DollarOpen(tag);
                    self.emit(b, out);
                    Ok(())
                } else {
                    // `$1` and the like: not a quote after all.
                    self.normal(b, out)
                }
            }
            State::Dollar { tag, matched } => {
                // The closing delimiter is `$` + tag + `$`; `matched`
                // counts its bytes seen so far.
                let want = |i: usize| {
                    if i == 0 || i == tag.len() + 1 {
                        b'$'
                    } else {
                        tag[i - 1]
                    }
                };
                let matched = if b == want(matched) {
                    matched + 1
                } else if b == b'$' {
                    1
                } else {
                    0
                };
                self.emit(b, out);
                if matched < tag.len() + 2 {
                    self.state = State::Dollar { tag, matched };
                }
                Ok(())
            }
            State::Meta(_) | State::Copy { .. } => unreachable!("handled in byte()"),
        }
    }

    /// Length: the lexer's normal state: one arm per character class psql treats
    /// specially.
    fn normal(&mut self, b: u8, out: &mut Vec<u8>) -> Result<(), Refused> {
        let was_word = !self.ident.is_empty();
        let continues_word = was_word && (is_ident_start(b) || b.is_ascii_digit() || b == b'$');
        if !continues_word {
            let glued = self.glued;
            let word = self.end_word()?;
            if glued && let Some(w) = &word {
                self.check_glued(w, b)?;
            }
            if b == b'\'' {
                // E'…' (one letter E right before the quote) takes
                // backslash escapes; B'…', X'…', N'…', U&'…' do not.
                let escapes = word.is_some_and(|w| w.eq_ignore_ascii_case(b"e"));
                self.token();
                self.state = State::Quote {
                    escapes,
                    backslash: false,
                    pending: false,
                };
                self.emit(b, out);
                return Ok(());
            }
        }
        match b {
            b'\\' => {
                if self.column != 0 || !self.stmt_empty {
                    return Err(self.refuse(
                        "a psql backslash command inside a line or a statement (pg_dump writes its few at the start of a line, between statements)",
                    ));
                }
                self.state = State::Meta(vec![b]);
                Ok(())
            }
            b'\n' => {
                self.after_digit = false;
                self.newline(out)
            }
            b' ' | b'\t' | b'\r' | b'\x0c' => {
                self.emit(b, out);
                Ok(())
            }
            b'-' => {
                self.state = State::Dash;
                self.emit(b, out);
                Ok(())
            }
            b'/' => {
                self.state = State::Slash;
                self.emit(b, out);
                Ok(())
            }
            b'"' => {
                self.token();
                self.state = State::DoubleQuote;
                self.emit(b, out);
                Ok(())
            }
            b'$' if !continues_word => {
                self.token();
                self.state = State::DollarOpen(Vec::new());
                self.emit(b, out);
                Ok(())
            }
            b'(' => {
                self.token();
                self.paren_depth += 1;
                self.emit(b, out);
                Ok(())
            }
            b')' => {
                self.token();
                self.paren_depth = self.paren_depth.saturating_sub(1);
                self.emit(b, out);
                Ok(())
            }
            b';' => {
                self.emit(b, out);
                if self.paren_depth == 0 && self.begin_depth == 0 {
                    self.semis_on_line += 1;
                    self.after_statement();
                } else {
                    self.token();
                }
                Ok(())
            }
            _ => {
                if continues_word {
                    self.ident.push(b);
                } else {
                    self.token();
                    if is_ident_start(b) {
                        self.glued = self.after_digit;
                        self.ident.push(b);
                    }
                }
                self.after_digit = !continues_word && b.is_ascii_digit();
                self.emit(b, out);
                Ok(())
            }
        }
    }

    /// Writes `b` and keeps the line's copy for the COPY check.
    fn emit(&mut self, b: u8, out: &mut Vec<u8>) {
        out.push(b);
        self.column += 1;
        if let Some(l) = &mut self.copy_line {
            if l.len() < MAX_COPY_LINE {
                l.push(b);
            } else {
                self.copy_line = None;
            }
        }
    }

    /// A token other than whitespace and comments was seen.
    fn token(&mut self) {
        self.stmt_empty = false;
    }

    fn after_statement(&mut self) {
        self.stmt_empty = true;
        self.identifier_count = 0;
    }

    /// Ends the identifier being read (tracking psql's `BEGIN ATOMIC`
    /// heuristic and COPY statements) and returns it.
    fn end_word(&mut self) -> Result<Option<Vec<u8>>, Refused> {
        self.glued = false;
        if self.ident.is_empty() {
            return Ok(None);
        }
        self.token();
        let word = std::mem::take(&mut self.ident);
        let lower = word.to_ascii_lowercase();
        if self.identifier_count == 0 && lower == b"copy" {
            // psql sends COPY data from the lines after a COPY the server
            // answers: the guard must know exactly when, so the only COPY
            // it lets through is pg_dump's, whole on a line of its own.
            if self.column != word.len() || self.copy_line.is_none() {
                return Err(self.refuse(
                    "a COPY statement that does not start a line (pg_dump writes `COPY table (columns) FROM stdin;` alone on a line)",
                ));
            }
            self.copy_stmt = true;
        }
        if self.identifier_count == 0 {
            self.identifiers = [0; 4];
        }
        if matches!(
            lower.as_slice(),
            b"create" | b"function" | b"procedure" | b"or" | b"replace"
        ) && (self.identifier_count as usize) < self.identifiers.len()
        {
            self.identifiers[self.identifier_count as usize] = lower[0];
        }
        self.identifier_count = self.identifier_count.saturating_add(1);
        let ids = self.identifiers;
        let routine = ids[0] == b'c'
            && (ids[1] == b'f'
                || ids[1] == b'p'
                || (ids[1] == b'o' && ids[2] == b'r' && (ids[3] == b'f' || ids[3] == b'p')));
        if routine && self.paren_depth == 0 {
            match lower.as_slice() {
                b"begin" => self.begin_depth += 1,
                b"case" if self.begin_depth >= 1 => self.begin_depth += 1,
                b"end" => self.begin_depth = self.begin_depth.saturating_sub(1),
                _ => {}
            }
        }
        Ok(Some(word))
    }

    /// A word right after a number (`1e5`): psql 15 and later lex the two
    /// as one token, older ones as two, so a word that would change where
    /// a string or a `BEGIN ATOMIC` body ends is refused (`next`: the byte
    /// after the word).
    fn check_glued(&self, word: &[u8], next: u8) -> Result<(), Refused> {
        let lower = word.to_ascii_lowercase();
        let risky = (lower == b"e" && next == b'\'')
            || matches!(
                lower.as_slice(),
                b"begin"
                    | b"case"
                    | b"end"
                    | b"create"
                    | b"or"
                    | b"replace"
                    | b"function"
                    | b"procedure"
                    | b"copy"
            );
        if risky {
            return Err(self.refuse(format!(
                "a number followed directly by {:?}, which psql versions read differently (pg_dump never writes it)",
                String::from_utf8_lossy(word)
            )));
        }
        Ok(())
    }

    /// A newline outside quotes and COPY data: the COPY check of the line
    /// that ends here, and the next line's start.
    ///
    /// # Errors
    /// [`Refused`] for a COPY statement other than pg_dump's.
    fn newline(&mut self, out: &mut Vec<u8>) -> Result<(), Refused> {
        let glued = self.glued;
        if let Some(w) = self.end_word()?
            && glued
        {
            self.check_glued(&w, b'\n')?;
        }
        out.push(b'\n');
        let line = self.copy_line.take();
        let is_copy = self.state == State::Normal
            && self.stmt_empty
            && self.paren_depth == 0
            && self.begin_depth == 0
            && self.semis_on_line == 1
            && line.as_deref().is_some_and(is_copy_from_stdin);
        if self.copy_stmt && !is_copy {
            return Err(self.refuse(
                "a COPY statement other than pg_dump's `COPY table (columns) FROM stdin;` alone on its line",
            ));
        }
        self.copy_stmt = false;
        self.line += 1;
        self.column = 0;
        self.semis_on_line = 0;
        if is_copy {
            self.state = State::Copy {
                end: EndOfData::LineStart,
            };
        }
        // Only a line that starts a statement may be a COPY.
        self.copy_line = (self.stmt_empty && self.state == State::Normal).then(Vec::new);
        Ok(())
    }

    /// Judges one backslash command line (without its newline) and writes
    /// what psql may see of it.
    fn meta_line(&mut self, line: &[u8], out: &mut Vec<u8>) -> Result<(), Refused> {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        let body = &text[1..];
        let (cmd, args) = body
            .split_once(|c: char| c.is_ascii_whitespace())
            .unwrap_or((body, ""));
        let args = args.trim();
        let shown: String = cmd.chars().take(24).collect();
        if args.contains('`') {
            return Err(self.refuse(format!(
                "psql backslash command \\{shown} with a backquoted argument (psql would run it as a shell command)"
            )));
        }
        if args.contains('\\') {
            return Err(self.refuse(format!(
                "a second psql backslash command on the line of \\{shown}"
            )));
        }
        match cmd {
            "restrict" | "unrestrict" => {
                if args.is_empty() || !args.bytes().all(|c| c.is_ascii_alphanumeric()) {
                    return Err(self.refuse(format!(
                        "psql \\{cmd} with an argument pg_dump never writes"
                    )));
                }
                // Inside this restore's own \restrict, psql refuses
                // pg_dump's pair: the outer wall holds for the whole stream.
                if self.restrict_key.is_none() {
                    out.extend_from_slice(line);
                }
                Ok(())
            }
            _ => Err(self.refuse(format!("psql backslash command \\{shown} refused"))),
        }
    }
}

/// `COPY <table> [(<columns>)] FROM stdin;` as pg_dump writes it.
fn is_copy_from_stdin(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line);
    let t = text.trim().to_ascii_lowercase();
    t.starts_with("copy ") && t.ends_with(" from stdin;")
}

/// psql's identifier start: letters, `_` and any non-ASCII byte.
fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

/// Refuses a psql without `\restrict`: the guard alone cannot follow every
/// way a script can make psql read a backslash where the guard sees a
/// string (a script may change `standard_conforming_strings` or the client
/// encoding where no lexer sees it), so a backup's SQL is applied only by a
/// psql that refuses backslash commands itself.
///
/// # Errors
/// What to install, naming the psql found.
pub fn require_restrict(psql: &backstop_dump::PgTool) -> Result<(), String> {
    if psql_has_restrict(&psql.version) {
        return Ok(());
    }
    Err(format!(
        "{} ({}) cannot refuse backslash commands itself (\\restrict came with PostgreSQL 13.22, 14.19, 15.14, 16.10 and 17.6), and backstop applies a backup's SQL only with a psql that can: install a current postgresql-client (or point pg_bin_dir at one), or restore this plain-SQL artifact by hand after reading it (`backstop download --decrypt`)",
        psql.version,
        psql.path.display()
    ))
}

/// Whether psql (by `psql --version`'s output) has `\restrict`: 13.22,
/// 14.19, 15.14, 16.10, 17.6 and every later release (18's betas did not).
pub fn psql_has_restrict(version: &str) -> bool {
    let Some(v) = version
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
    else {
        return false;
    };
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    match major {
        0..=12 => false,
        13 => minor >= 22,
        14 => minor >= 19,
        15 => minor >= 14,
        16 => minor >= 10,
        17 => minor >= 6,
        18 => !v.contains("beta"),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `input` through a guard in pieces of `step` bytes.
    fn run(input: &str, key: Option<&str>, step: usize) -> Result<String, Refused> {
        let mut g = PsqlGuard::new(key.map(str::to_string));
        let mut out = Vec::new();
        for chunk in input.as_bytes().chunks(step.max(1)) {
            g.filter(chunk, &mut out)?;
        }
        g.finish(&mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    fn all_steps(input: &str, key: Option<&str>) -> Result<String, Refused> {
        let whole = run(input, key, usize::MAX);
        for step in [1, 2, 3, 7] {
            assert_eq!(run(input, key, step), whole, "step {step}: {input:?}");
        }
        whole
    }

    const DUMP: &str = "--\n-- PostgreSQL database dump\n--\n\n\\restrict abc123\n\nSET standard_conforming_strings = on;\nCREATE TABLE public.\"Order Items\" (id integer, note text DEFAULT '\\');\nCREATE FUNCTION public.f() RETURNS text LANGUAGE sql\nBEGIN ATOMIC\n SELECT 'a;b';\n SELECT CASE WHEN true THEN 'x' END;\nEND;\nCREATE FUNCTION public.g() RETURNS trigger AS $_$\nbegin\n  raise notice 'x\\y'; -- \\! not a command\nend $_$ LANGUAGE plpgsql;\nCOPY public.\"Order Items\" (id, note) FROM stdin;\n1\t\\N\n2\t\\\\! echo pwned\n\\! looks like a command but is data\n\\.\n/* a \\! comment /* nested */ still */\nSELECT E'it\\'s \\\\ fine', $1 FROM t;\n\n\\unrestrict abc123\n";

    #[test]
    fn a_pg_dump_script_passes_whole_without_its_own_restrict_when_ours_is_up() {
        assert_eq!(all_steps(DUMP, None).unwrap(), DUMP);
        let ours = all_steps(DUMP, Some("K")).unwrap();
        assert!(ours.starts_with("\\restrict K\n--\n"));
        assert!(!ours.contains("abc123"), "{ours}");
        // Line numbers stay those of the artifact (one line added on top).
        assert_eq!(ours.lines().count(), DUMP.lines().count() + 1);
    }

    /// Each case: a script and the line the guard must stop at.
    #[test]
    fn meta_commands_are_refused_with_their_line() {
        let cases: &[(&str, u64, &str)] = &[
            ("\\! touch /tmp/pwned\n", 1, "\\!"),
            ("SELECT 1;\n\\o /tmp/x\n", 2, "\\o"),
            ("SELECT 1 \\g /tmp/x\n", 1, "inside a line"),
            (
                "SELECT 1;\nSELECT 2 -- x\n\\gexec\n",
                3,
                "inside a line or a statement",
            ),
            ("\\connect `touch /tmp/p`\n", 1, "backquoted"),
            ("\\connect db \\! id\n", 1, "second"),
            ("\\restrict k`id`\n", 1, "backquoted"),
            ("\\unrestrict a-b\n", 1, "argument"),
            ("\\set ON_ERROR_STOP off\n", 1, "\\set"),
            ("SELECT 'a''b';\n\\copy t to '/tmp/x'\n", 2, "\\copy"),
            ("SELECT $$ x $$;\n\\i /etc/passwd", 2, "\\i"),
            // The data ends at `\.`; what follows is SQL again.
            ("COPY t (a) FROM stdin;\n1\n\\.\n\\! id\n", 4, "\\!"),
            // A COPY other than pg_dump's is refused outright: psql could
            // take the lines after it as data where the guard does not.
            (
                "COPY t FROM stdin; SELECT 1;\n\\! id\n",
                1,
                "COPY statement other",
            ),
            (
                "SELECT 1; COPY t FROM stdin;\n\\! id\n",
                1,
                "does not start a line",
            ),
            (
                "COPY t FROM stdin ;\n'\n\\.\n\\! id\n'\n",
                1,
                "COPY statement other",
            ),
            (
                "COPY t\nFROM stdin;\n'\n\\.\n\\! id\n",
                1,
                "COPY statement other",
            ),
            (
                "COPY t FROM stdin; -- x\n'\n\\.\n\\! id\n",
                1,
                "COPY statement other",
            ),
            ("  COPY t FROM stdin;\n\\! id\n", 1, "does not start a line"),
            // Only a line that is exactly `\.` ends the data (psql's rule).
            ("COPY t (a) FROM stdin;\n\\\n'\n\\.\n\\! id\n'\n", 5, "\\!"),
            ("COPY t (a) FROM stdin;\n\\.x\n\\.\n\\! id\n", 4, "\\!"),
            // psql would not see past a NUL; the guard must not either.
            ("SELECT 1;\0'\n\\! id\n';\n", 1, "NUL"),
            // psql 15 lexes `1E` as one token, older ones as 1 and E'…'.
            ("SELECT 1E'\\'\n\\! id\n';\n", 1, "number followed directly"),
            (
                "CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1; 1end;\nCOPY t FROM stdin;\n\\! id\n",
                1,
                "number followed directly",
            ),
            // pg_dump without --create and pg_dumpall -g never connect.
            (
                "\\connect \"host=attacker.example dbname=x\"\n",
                1,
                "\\connect",
            ),
            ("SELECT (1;\nCOPY t FROM stdin;\n\\! id\n", 3, "statement"),
            ("SELECT 'COPY t FROM stdin;\n';\n\\! id\n", 3, "\\!"),
            // Inside a BEGIN ATOMIC body a `;` ends nothing (psql agrees).
            (
                "CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1;\nCOPY t FROM stdin;\n\\! id\nEND;\n",
                3,
                "statement",
            ),
            ("SELECT 1;\n  \\! id\n", 2, "inside a line"),
            // Line numbers count the lines inside strings and comments.
            ("SELECT 'a\nb\nc';\n\\! id\n", 4, "\\!"),
            ("/* a\nb */\n-- c\n\\! id\n", 4, "\\!"),
            // A line that ends right after a closing quote or a lone `$`
            // is one line.
            ("SELECT 'a'\n, $\n, 1;\n\\! id\n", 4, "\\!"),
            (
                &"\\connect x\n".replace('x', &"y".repeat(5000)),
                1,
                "longer",
            ),
        ];
        for (script, line, says) in cases {
            let err = run(script, None, usize::MAX).unwrap_err();
            assert_eq!(err.line, *line, "{script:?}: {err}");
            assert!(err.to_string().contains(says), "{script:?}: {err}");
            for step in [1, 2, 5] {
                assert_eq!(
                    run(script, None, step).unwrap_err(),
                    err,
                    "{script:?} step {step}"
                );
            }
        }
    }

    #[test]
    fn nothing_of_a_refused_line_reaches_psql() {
        let mut g = PsqlGuard::new(None);
        let mut out = Vec::new();
        let err = g
            .filter(b"SELECT 1;\n\\! touch /tmp/pwned\nSELECT 2;\n", &mut out)
            .unwrap_err();
        assert_eq!(err.line, 2);
        assert_eq!(out, b"SELECT 1;\n");
    }

    #[test]
    fn backslashes_in_quotes_comments_and_data_are_not_commands() {
        for ok in [
            "SELECT '\\! x';\n",
            "SELECT \"a\\b\" FROM t;\n",
            "SELECT E'\\'\\! x';\n",
            "SELECT $tag$ \\! x $ta $tag$;\n",
            "SELECT $a$ $b$ \\! $b$ $a$;\n",
            "-- \\! x\nSELECT 1;\n",
            "/* \\! /* \\! */ \\! */ SELECT 1;\n",
            "COPY t (a) FROM stdin;\n\\!\n\\\\\n\\.\n",
            "copy \"x;y\" (a) from stdin;\n\\N\n\\.\r\n",
            "SELECT a$b$c FROM t;\n",
            // Float exponents are numbers, not words.
            "CREATE TABLE t (x float DEFAULT 1e-05, y float DEFAULT 2E+10);\n",
            // After a number, `$x$` opens a quote (psql lexes it so).
            "SELECT 1$x$ \\! x $x$;\n",
            "SELECT '\n\\! x\n';\n",
        ] {
            assert_eq!(all_steps(ok, None).unwrap(), ok, "{ok:?}");
        }
        // A `$` inside a word starts no quote, so the backslash after it
        // is a command.
        for bad in ["SELECT a$b$ \\! x\n", "SELECT $1 \\! x\n"] {
            assert!(run(bad, None, 1).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_command_on_the_last_line_without_newline_is_judged() {
        assert_eq!(run("SELECT 1;\n\\! id", None, 4).unwrap_err().line, 2);
        assert_eq!(
            run("SELECT 1;\n\\unrestrict abc", None, 4).unwrap(),
            "SELECT 1;\n\\unrestrict abc"
        );
    }

    #[test]
    fn restrict_is_known_by_version() {
        for (v, has) in [
            ("psql (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)", true),
            ("psql (PostgreSQL) 15.13", false),
            ("psql (PostgreSQL) 17.6", true),
            ("psql (PostgreSQL) 17.5", false),
            ("psql (PostgreSQL) 18.1", true),
            ("psql (PostgreSQL) 18beta1", false),
            ("psql (PostgreSQL) 18rc1", true),
            ("psql (PostgreSQL) 13.22", true),
            ("psql (PostgreSQL) 12.22", false),
            ("psql (PostgreSQL) 16.10", true),
            ("nonsense", false),
        ] {
            assert_eq!(psql_has_restrict(v), has, "{v}");
        }
    }
}
