//! Test-only: keeps the core free of clocks, IO, threads and randomness.
//!
//! Reads the crate's own sources and fails on any forbidden name outside comments. This
//! file is the one excluded from the scan (it has to spell the names); it must never be
//! compiled outside `cfg(test)`.

use std::path::{Path, PathBuf};

/// Files skipped by the scan, by name relative to `src/`.
const EXCLUDED: &[&str] = &["boundary.rs"];

/// Forbidden as whole words (letters, digits and `_` delimit a word).
const FORBIDDEN: &[&str] = &[
    "std::time",
    "Instant",
    "SystemTime",
    "std::thread",
    "std::net",
    "std::fs",
    "std::process",
    "std::io",
    "tokio",
    "rand",
    "unsafe",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).expect("src/ is readable");
    for entry in entries {
        let path = entry.expect("a readable directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether `word` occurs in `code` delimited by non-word characters.
fn contains_word(code: &str, word: &str) -> bool {
    code.match_indices(word).any(|(i, _)| {
        let before = code[..i].chars().next_back();
        let after = code[i + word.len()..].chars().next();
        !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char)
    })
}

#[test]
fn the_core_reads_no_clock_and_touches_no_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() >= 5, "found only {files:?} under {src:?}");
    let mut found = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src/");
        if EXCLUDED.iter().any(|e| rel == Path::new(e)) {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("a readable source file");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in FORBIDDEN {
                if contains_word(code, word) {
                    found.push(format!("{}:{}: `{word}` in: {line}", rel.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "the core must not read a clock, do IO, spawn threads or use randomness:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_boundary_check_sees_what_it_forbids() {
    assert!(contains_word("let t = Instant::now();", "Instant"));
    assert!(contains_word("use std::io::Read;", "std::io"));
    assert!(contains_word("rand::random()", "rand"));
    assert!(!contains_word("a random operand", "rand"));
    assert!(!contains_word("#![forbid(unsafe_code)]", "unsafe"));
}
