//! Every `warn` and `error` log line of conode and failoverd is explained in the
//! operator's guide (`docs/operators-guide.md`, "Log lines: what they mean and what to
//! do").
//!
//! The test reads the sources, not the binaries: in `conode/src`, `failoverd/src` and
//! `failoverd/core/src` it finds the format string of every `warn!`/`error!` (tracing)
//! call and the text of every failover-core log at `Level::Warn`/`Level::Error`, takes
//! its stable prefix (the text before its first `{` placeholder, trimmed) and requires
//! the guide to contain it. Prefixes shorter than [`MIN_PREFIX`] characters (a line that
//! is only `{e}`, say: its text comes from an error type) say too little to look for and
//! are skipped. Whitespace is compared collapsed, so a wrapped line in the guide or a
//! `\` continuation in the source does not matter.
//!
//! When this test fails, a log line was added or reworded: add a row for it to the
//! guide's table (message, meaning, what to do).

use std::path::{Path, PathBuf};

/// The guide, relative to the repository root.
const GUIDE: &str = "docs/operators-guide.md";
/// Where the log lines are.
const SOURCES: [&str; 3] = ["conode/src", "failoverd/src", "failoverd/core/src"];
/// Shorter prefixes are not looked for.
const MIN_PREFIX: usize = 12;

/// One log line found in the sources.
#[derive(Debug, Clone)]
struct LogLine {
    file: String,
    line: usize,
    /// The format string, unescaped (`{{` and `}}` kept as written).
    format: String,
}

impl LogLine {
    /// The text before the first placeholder, whitespace collapsed and trimmed.
    fn prefix(&self) -> String {
        let mut out = String::new();
        let mut chars = self.format.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    out.push('{');
                }
                '{' => break,
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    out.push('}');
                }
                c => out.push(c),
            }
        }
        collapse(&out)
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

/// Runs of whitespace as one space, trimmed.
fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A source file prepared for scanning.
struct Code {
    /// The text, comments blanked out (same length, so offsets and line numbers stay
    /// right); string literals left as they are.
    text: String,
    /// Where the string literals are (start, end): a macro name inside one is not a call.
    strings: Vec<(usize, usize)>,
}

impl Code {
    fn in_string(&self, at: usize) -> bool {
        self.strings.iter().any(|&(s, e)| s <= at && at < e)
    }
}

/// The source without its test module (`#[cfg(test)]` to the end: test helpers may
/// log at any level) and with comments blanked out.
fn code_only(src: &str) -> Code {
    let src = match src.find("#[cfg(test)]") {
        Some(i) => &src[..i],
        None => src,
    };
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let mut strings = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let end = skip_string(b, i);
                strings.push((i, end));
                i = end;
            }
            b'r' if is_raw_string_start(b, i) => {
                let end = skip_string(b, i);
                strings.push((i, end));
                i = end;
            }
            b'\'' => {
                // A char literal ('"' or '\'') must not start a string; a lifetime is
                // left alone.
                if b.get(i + 1) == Some(&b'\\') {
                    i += 2;
                    while i < b.len() && b[i] != b'\'' {
                        i += 1;
                    }
                    i += 1;
                } else if b.get(i + 2) == Some(&b'\'') {
                    i += 3;
                } else {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    out[i] = b' ';
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    if b[i] != b'\n' {
                        out[i] = b' ';
                    }
                    i += 1;
                }
                for c in &mut out[i..(i + 2).min(b.len())] {
                    *c = b' ';
                }
                i += 2;
            }
            _ => i += 1,
        }
    }
    Code {
        text: String::from_utf8_lossy(&out).into_owned(),
        strings,
    }
}

/// `r"` or `r#"` (also after `b`) starting a raw string at `i`, not the end of an
/// identifier.
fn is_raw_string_start(b: &[u8], i: usize) -> bool {
    let ident = |k: usize| b[k].is_ascii_alphanumeric() || b[k] == b'_';
    if i > 0 && ident(i - 1) && !(b[i - 1] == b'b' && (i < 2 || !ident(i - 2))) {
        return false;
    }
    let mut j = i + 1;
    while b.get(j) == Some(&b'#') {
        j += 1;
    }
    b.get(j) == Some(&b'"')
}

/// The index just past the string literal (plain or raw) that starts at `i`.
fn skip_string(b: &[u8], i: usize) -> usize {
    if b[i] == b'r' {
        let mut j = i + 1;
        let mut hashes = 0;
        while b[j] == b'#' {
            hashes += 1;
            j += 1;
        }
        j += 1; // the opening quote
        while j < b.len() {
            if b[j] == b'"'
                && b[j + 1..]
                    .iter()
                    .take(hashes)
                    .filter(|&&c| c == b'#')
                    .count()
                    == hashes
            {
                return j + 1 + hashes;
            }
            j += 1;
        }
        return b.len();
    }
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return j + 1,
            _ => j += 1,
        }
    }
    b.len()
}

/// The value of the string literal starting at `i`: escapes resolved, a `\` at the end
/// of a line eating the line break and the next line's leading whitespace.
fn literal_at(src: &str, i: usize) -> String {
    let b = src.as_bytes();
    let end = skip_string(b, i);
    if b[i] == b'r' {
        let open = src[i..].find('"').expect("raw string quote") + i + 1;
        let hashes = open - i - 2;
        return src[open..end - 1 - hashes].to_string();
    }
    let body = &src[i + 1..end - 1];
    let mut out = String::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\n') => {
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
            }
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some(c) => out.push(c),
            None => {}
        }
    }
    out
}

/// The top-level arguments of the call whose `(` is at `open`, as (start, end) byte
/// ranges, trimmed; strings and nested brackets are skipped over.
fn arguments(src: &str, open: usize) -> Vec<(usize, usize)> {
    let b = src.as_bytes();
    let mut args = Vec::new();
    let mut depth = 0usize;
    let mut start = open + 1;
    let mut i = open + 1;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = skip_string(b, i);
                continue;
            }
            b'r' if is_raw_string_start(b, i) => {
                i = skip_string(b, i);
                continue;
            }
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' if depth > 0 => depth -= 1,
            b')' => {
                args.push((start, i));
                break;
            }
            b',' if depth == 0 => {
                args.push((start, i));
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    args.into_iter()
        .map(|(s, e)| {
            let text = &src[s..e];
            let lead = text.len() - text.trim_start().len();
            (s + lead, s + lead + text.trim().len())
        })
        .filter(|(s, e)| s < e)
        .collect()
}

fn starts_literal(src: &str, at: usize) -> bool {
    let b = src.as_bytes();
    b.get(at) == Some(&b'"') || (b.get(at) == Some(&b'r') && is_raw_string_start(b, at))
}

fn line_of(src: &str, at: usize) -> usize {
    src[..at].matches('\n').count() + 1
}

/// `warn!(`/`error!(` (also `tracing::…`): the first argument that is a string literal
/// is the format string; the arguments before it are fields (`vip = %vip`) or `target:`.
fn tracing_lines(file: &str, code: &Code, out: &mut Vec<LogLine>) {
    let src = code.text.as_str();
    let b = src.as_bytes();
    for mac in ["warn!", "error!"] {
        for (at, _) in src.match_indices(mac) {
            if code.in_string(at)
                || (at > 0 && (b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_'))
            {
                continue;
            }
            let mut open = at + mac.len();
            while b.get(open).is_some_and(|c| c.is_ascii_whitespace()) {
                open += 1;
            }
            if b.get(open) != Some(&b'(') {
                continue;
            }
            let format = arguments(src, open)
                .into_iter()
                .find(|&(s, _)| starts_literal(src, s))
                .map(|(s, _)| literal_at(src, s));
            match format {
                Some(format) => out.push(LogLine {
                    file: file.to_string(),
                    line: line_of(src, at),
                    format,
                }),
                None => panic!(
                    "{file}:{}: a {mac} call without a format string literal: this scanner needs teaching",
                    line_of(src, at)
                ),
            }
        }
    }
}

/// The failover core's `self.log(Level::Warn|Error, TEXT)`: TEXT is `format!("…")`,
/// `"…".into()`, or a variable set by `let VAR = format!("…")` shortly before. A level
/// chosen elsewhere (`let level = if ok { … } else { Level::Warn }`) or a variable
/// holding an error from elsewhere has no literal here and is skipped.
fn core_lines(file: &str, code: &Code, out: &mut Vec<LogLine>) {
    let src = code.text.as_str();
    let b = src.as_bytes();
    for level in ["Level::Warn", "Level::Error"] {
        for (at, _) in src.match_indices(level) {
            if code.in_string(at) {
                continue;
            }
            let mut i = at + level.len();
            while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
                i += 1;
            }
            if b.get(i) != Some(&b',') {
                continue;
            }
            i += 1;
            while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
                i += 1;
            }
            let rest = &src[i..];
            let format = if starts_literal(src, i) {
                Some(literal_at(src, i))
            } else if let Some(after) = rest.strip_prefix("format!") {
                let open = i + rest.len() - after.len() + (after.len() - after.trim_start().len());
                arguments(src, open)
                    .first()
                    .filter(|&&(s, _)| starts_literal(src, s))
                    .map(|&(s, _)| literal_at(src, s))
            } else {
                let var: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let window = &src[at.saturating_sub(3000)..at];
                let decl = format!("let {var} = format!(");
                match (var.is_empty(), window.rfind(&decl)) {
                    (false, Some(d)) => {
                        let open = at.saturating_sub(3000) + d + decl.len() - 1;
                        arguments(src, open)
                            .first()
                            .filter(|&&(s, _)| starts_literal(src, s))
                            .map(|&(s, _)| literal_at(src, s))
                    }
                    _ => None,
                }
            };
            if let Some(format) = format {
                out.push(LogLine {
                    file: file.to_string(),
                    line: line_of(src, at),
                    format,
                });
            }
        }
    }
}

fn log_lines() -> Vec<LogLine> {
    let root = repo();
    let mut lines = Vec::new();
    for dir in SOURCES {
        let mut files = Vec::new();
        rust_files(&root.join(dir), &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", f.display()));
            let code = code_only(&text);
            let name = f.strip_prefix(&root).unwrap_or(&f).display().to_string();
            if dir == "failoverd/core/src" {
                core_lines(&name, &code, &mut lines);
            } else {
                tracing_lines(&name, &code, &mut lines);
            }
        }
    }
    lines.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    lines
}

#[test]
fn every_warn_and_error_log_line_is_explained_in_the_operators_guide() {
    let guide_path = repo().join(GUIDE);
    let guide = std::fs::read_to_string(&guide_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", guide_path.display()));
    let guide = collapse(&guide);
    let lines = log_lines();
    // A scanner that finds nothing would pass: there are dozens of such lines.
    assert!(
        lines.len() >= 40,
        "found only {} warn/error log lines in {SOURCES:?}: the scanner is broken",
        lines.len()
    );
    let mut missing: Vec<String> = Vec::new();
    for l in &lines {
        let p = l.prefix();
        if p.chars().count() < MIN_PREFIX || guide.contains(&p) {
            continue;
        }
        missing.push(format!(
            "  {}:{}: {:?}\n      (the guide must contain: {:?})",
            l.file, l.line, l.format, p
        ));
    }
    assert!(
        missing.is_empty(),
        "{} warn/error log line(s) are not explained in {GUIDE}; add a row for each to its \
         table \"Log lines: what they mean and what to do\" (the message as the operator sees \
         it, what it means, what to do):\n{}",
        missing.len(),
        missing.join("\n")
    );
}

#[test]
fn the_scanner_reads_multi_line_calls_fields_and_continuations() {
    let src = r#"
        // tracing::warn!("in a comment: {x}");
        tracing::warn!(
            vip = %vip,
            over_limit = n,
            "left {} connection attempts for {} unanswered: more than \
             {MAX} in a period",
            n
        );
        error!("cannot wait for signals: {e}; stopping");
        let s = "warn!(\"inside a string\")";
    "#;
    let mut out = Vec::new();
    tracing_lines("x.rs", &code_only(src), &mut out);
    let formats: Vec<String> = out.iter().map(|l| l.prefix()).collect();
    assert_eq!(formats, vec!["left", "cannot wait for signals:"]);
    assert_eq!(
        out[0].format,
        "left {} connection attempts for {} unanswered: more than {MAX} in a period"
    );

    let core = r#"
        self.log(Level::Warn, format!("claim of the address abandoned: {reason}"));
        let text = format!("peer unreachable: not heard for {}", self.silence());
        self.log(Level::Warn, text);
        self.log(
            Level::Error,
            "a second Started input for one process: ignored; this is a bug in the shell"
                .into(),
        );
        let level = if ok { Level::Info } else { Level::Warn };
        self.log(Level::Warn, e);
    "#;
    let mut out = Vec::new();
    core_lines("core.rs", &code_only(core), &mut out);
    let mut formats: Vec<String> = out.iter().map(|l| l.prefix()).collect();
    formats.sort();
    assert_eq!(
        formats,
        vec![
            "a second Started input for one process: ignored; this is a bug in the shell",
            "claim of the address abandoned:",
            "peer unreachable: not heard for",
        ]
    );
}
