//! The sans-IO boundary of the core, checked three ways:
//!
//! 1. the crate is `#![no_std]` (only `core` and `alloc`): the compiler itself then
//!    refuses a clock, a file, a socket, a thread, the environment or a process;
//! 2. `Cargo.toml` lists no dependency (a dependency is a door for all of those);
//! 3. the sources name none of them, nor `std` at all, nor randomness or `unsafe`
//!    (a text scan, so that the reason is named even before the build fails).
//!
//! Each checker is itself tested on the forms it must catch: a check that cannot fail
//! would guard nothing.

use std::path::{Path, PathBuf};

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ---- 1 and 3: the sources ----

/// Forbidden as whole words (letters, digits and `_` delimit a word) in code outside
/// comments. `std` covers every path through it (`std::fs`, `::std::io`, `use std::{..}`,
/// `extern crate std`); the rest are what a `no_std` crate could still reach.
const FORBIDDEN: &[&str] = &[
    "std",
    "Instant",
    "SystemTime",
    "tokio",
    "rand",
    "getrandom",
    "libc",
    "unsafe",
    "asm",
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

/// The forbidden words in `text` (one file), as `line: word`.
fn forbidden_in(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for word in FORBIDDEN {
            if contains_word(code, word) {
                found.push(format!("{}: `{word}` in: {line}", n + 1));
            }
        }
    }
    found
}

/// `#![no_std]` as a line of its own in the crate root (not under a `cfg_attr`).
fn declares_no_std(lib_rs: &str) -> bool {
    lib_rs.lines().any(|l| l.trim() == "#![no_std]")
}

#[test]
fn the_core_is_no_std() {
    let lib = std::fs::read_to_string(crate_dir().join("src/lib.rs")).expect("src/lib.rs");
    assert!(
        declares_no_std(&lib),
        "src/lib.rs must start with `#![no_std]`: the core only uses `core` and `alloc`"
    );
}

#[test]
fn the_core_reads_no_clock_and_touches_no_io() {
    let src = crate_dir().join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() >= 5, "found only {files:?} under {src:?}");
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("a readable source file");
        let rel = file.strip_prefix(&src).expect("under src/");
        for f in forbidden_in(&text) {
            found.push(format!("{}:{f}", rel.display()));
        }
    }
    assert!(
        found.is_empty(),
        "the core must not read a clock, do IO, spawn threads or use randomness:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_source_scan_catches_every_form() {
    for bad in [
        "use std::fs;",
        "use std::io::Read;",
        "let s = std::net::TcpStream::connect(a);",
        "std::thread::spawn(f);",
        "let t = std::time::Instant::now();",
        "let t = Instant::now();",
        "let t = SystemTime::now();",
        "let v = std::env::var(\"X\");",
        "use std::os::unix::fs::PermissionsExt;",
        "std::process::exit(1);",
        "use std::sync::Mutex;",
        "use std::{fs, io};",
        "use ::std::collections::HashMap;",
        "extern crate std;",
        "let x = rand::random();",
        "getrandom::fill(&mut b);",
        "unsafe { f() }",
        "core::arch::asm!(\"nop\");",
        "tokio::spawn(f);",
        "libc::getpid()",
    ] {
        assert!(!forbidden_in(bad).is_empty(), "the scan misses: {bad}");
    }
    for fine in [
        "use core::fmt;",
        "use alloc::collections::VecDeque;",
        "let operand = a_random_operand; // std::fs in a comment",
        "#![forbid(unsafe_code)]",
        "let standby = Role::Standby;",
    ] {
        assert_eq!(
            forbidden_in(fine),
            Vec::<String>::new(),
            "a false alarm on: {fine}"
        );
    }
    assert!(declares_no_std("//! doc\n#![no_std]\n"));
    assert!(!declares_no_std("#![cfg_attr(not(test), no_std)]\n"));
    assert!(!declares_no_std("// #![no_std]\n"));
}

// ---- 2: the manifest ----

/// What `Cargo.toml` declares that the core may not have: any entry of
/// `[dependencies]`, and any other dependency table (`[build-dependencies]`,
/// `[target.'cfg(..)'.dependencies]`, `[dependencies.name]`) or a build script.
/// `[dev-dependencies]` (for the tests) is allowed.
fn manifest_doors(toml: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut section = String::new();
    for (n, raw) in toml.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string();
            let dependency_table = section.split('.').any(|part| {
                let part = part.trim().trim_matches(|c| c == '"' || c == '\'');
                part == "dependencies" || part == "build-dependencies"
            }) || section.ends_with("dependencies");
            if dependency_table && section != "dependencies" && section != "dev-dependencies" {
                found.push(format!("{}: a dependency table: {raw}", n + 1));
            }
            continue;
        }
        if section == "dependencies" {
            found.push(format!("{}: a dependency: {raw}", n + 1));
        }
        if section == "package" && (line.starts_with("build") || line.starts_with("links")) {
            found.push(format!("{}: a build script: {raw}", n + 1));
        }
    }
    found
}

#[test]
fn the_core_has_no_dependencies() {
    let path = crate_dir().join("Cargo.toml");
    let toml = std::fs::read_to_string(&path).expect("the core's Cargo.toml");
    assert!(
        toml.lines().any(|l| l.trim() == "[dependencies]"),
        "{path:?} has no [dependencies] section to check"
    );
    let found = manifest_doors(&toml);
    assert!(
        found.is_empty(),
        "the core must have no dependencies (the shell does the IO):\n{}",
        found.join("\n")
    );
    assert!(
        !crate_dir().join("build.rs").exists(),
        "the core must have no build script"
    );
}

#[test]
fn the_manifest_check_catches_every_form() {
    let clean = "[package]\nname = \"x\"\n\n# none, on purpose\n[dependencies]\n\n[dev-dependencies]\nproptest = \"1\"\n";
    assert_eq!(manifest_doors(clean), Vec::<String>::new());
    for bad in [
        "[dependencies]\ntokio = \"1\"\n",
        "[dependencies]\nconode.workspace = true\n",
        "[dependencies]\n# a comment, then\nlibc = { version = \"0.2\" }\n",
        "[dependencies.rand]\nversion = \"0.8\"\n",
        "[build-dependencies]\ncc = \"1\"\n",
        "[target.'cfg(unix)'.dependencies]\nnix = \"0.29\"\n",
        "[target.\"cfg(unix)\".dependencies]\nnix = \"0.29\"\n",
        "[package]\nname = \"x\"\nbuild = \"build.rs\"\n[dependencies]\n",
    ] {
        assert!(!manifest_doors(bad).is_empty(), "the check misses:\n{bad}");
    }
}
