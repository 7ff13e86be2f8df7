//! The command-line documentation of both programs, from the built binaries: every
//! command (nested ones too) has a man page of its own (`generate man --dir DIR`), every
//! page a SUBCOMMANDS or SEE ALSO section refers to exists, every flag and argument of
//! every command's `--help` appears in its page, every page states its exit statuses, and
//! the shell completions name every command. Then failoverd's exit status 2 on a
//! configuration error (failoverd.service does not restart on 2).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

use system_tests::bin;

fn output(program: &str, args: &[&str]) -> Output {
    Command::new(bin(program))
        .args(args)
        .env_remove("FAILOVERD_IO_TIMEOUT_MS")
        .output()
        .unwrap()
}

fn run(program: &str, args: &[&str]) -> String {
    let out = output(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// The lines of a `--help` section ("Commands:", "Options:", "Arguments:"), up to the
/// blank line that ends it.
fn section<'a>(help: &'a str, title: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|l| *l != title)
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect()
}

/// The entries of a `-h` section ("Options:", "Arguments:"): (flags, help text). clap
/// puts the help after two spaces on the same line, or, when the lines are long, on the
/// lines below, indented deeper than the flags.
fn entries(lines: &[&str]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for l in lines {
        let indent = l.len() - l.trim_start().len();
        let t = l.trim();
        if indent <= 6 && t.starts_with(['-', '<', '[']) {
            let (spec, doc) = t.split_once("  ").unwrap_or((t, ""));
            out.push((spec.to_string(), doc.trim().to_string()));
        } else if let Some((_, doc)) = out.last_mut() {
            doc.push_str(t);
        } else {
            panic!("a help line before any flag: {l:?}");
        }
    }
    out
}

/// What one command's `-h` lists: its commands (but `help`), and its flags and
/// arguments as they would appear in a man page (`--force`, `-c`, `COMMAND`).
struct Help {
    commands: Vec<String>,
    args: Vec<String>,
}

fn help(program: &str, path: &[String]) -> Help {
    let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
    args.push("-h");
    let text = run(program, &args);
    let commands = section(&text, "Commands:")
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(|c| c.trim_end_matches(',').to_string())
        .collect();
    let mut names = Vec::new();
    for (title, is_flag) in [("Options:", true), ("Arguments:", false)] {
        for (spec, doc) in entries(&section(&text, title)) {
            // Every argument has a help text, not only its default.
            assert!(
                !doc.is_empty() && !doc.starts_with('['),
                "{program} {}: {spec:?} has no help text:\n{text}",
                path.join(" ")
            );
            if is_flag {
                // "-c, --config <CONFIG>": -c and --config.
                names.extend(
                    spec.split([',', ' '])
                        .filter(|w| w.starts_with('-'))
                        .map(str::to_string),
                );
            } else {
                // "<SHELL>", "[COMMAND]...": SHELL, COMMAND.
                names.push(
                    spec.trim_end_matches("...")
                        .trim_matches(['<', '>', '[', ']'])
                        .to_string(),
                );
            }
        }
    }
    Help {
        commands,
        args: names,
    }
}

/// Every command path of `program` (the program itself as the empty path), depth first,
/// with what its `-h` lists.
fn command_tree(program: &str) -> Vec<(Vec<String>, Help)> {
    let mut out = Vec::new();
    let mut todo = vec![Vec::new()];
    while let Some(path) = todo.pop() {
        let h = help(program, &path);
        for c in h.commands.iter().rev() {
            let mut p = path.clone();
            p.push(c.clone());
            todo.push(p);
        }
        out.push((path, h));
    }
    out
}

/// A page's roff as a reader sees its words: "\-" is '-', font escapes gone.
fn plain(roff: &str) -> String {
    roff.replace("\\-", "-")
        .replace("\\fB", "")
        .replace("\\fI", "")
        .replace("\\fR", "")
        .replace("\\fP", "")
}

/// The lines of a roff section (`.SH NAME` or `.SH "TWO WORDS"`) up to the next `.SH`.
fn roff_section(page: &str, name: &str) -> Option<String> {
    let heads = [format!(".SH {name}"), format!(".SH \"{name}\"")];
    let mut lines = page.lines().skip_while(|l| !heads.iter().any(|h| h == l));
    lines.next()?;
    Some(
        lines
            .take_while(|l| !l.starts_with(".SH"))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// The pages `generate man --dir` writes for `program`, by name ("failoverd-promote").
fn pages(program: &str, dir: &Path) -> BTreeMap<String, String> {
    let listed = run(
        program,
        &[
            "generate",
            "man",
            "--dir",
            dir.to_str().expect("UTF-8 path"),
        ],
    );
    let mut pages = BTreeMap::new();
    for path in listed.lines() {
        let path = Path::new(path);
        assert_eq!(path.parent(), Some(dir), "{listed}");
        let name = path
            .file_name()
            .and_then(|f| f.to_str())
            .and_then(|f| f.strip_suffix(".1"))
            .unwrap_or_else(|| panic!("not a section 1 page: {}", path.display()))
            .to_string();
        let text = std::fs::read_to_string(path).unwrap();
        pages.insert(name, plain(&text));
    }
    pages
}

#[test]
fn every_command_has_a_man_page_with_its_flags_and_exit_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let mut all = BTreeMap::new();
    for program in ["conode", "failoverd"] {
        let pages = pages(program, dir.path());
        let tree = command_tree(program);
        let names: BTreeSet<String> = tree
            .iter()
            .map(|(p, _)| std::iter::once(program.to_string()).chain(p.iter().cloned()))
            .map(|p| p.collect::<Vec<_>>().join("-"))
            .collect();
        // One page per command, no more, no fewer.
        assert_eq!(
            pages.keys().cloned().collect::<BTreeSet<_>>(),
            names,
            "{program}'s pages and commands"
        );
        for (path, h) in &tree {
            let name = std::iter::once(program.to_string())
                .chain(path.iter().cloned())
                .collect::<Vec<_>>()
                .join("-");
            let page = &pages[&name];
            assert!(
                page.lines()
                    .any(|l| l.starts_with(&format!(".TH {name} 1 "))),
                "{name}:\n{page}"
            );
            for a in &h.args {
                assert!(page.contains(a.as_str()), "{name}.1 lacks {a}:\n{page}");
            }
            let exit = roff_section(page, "EXIT STATUS")
                .unwrap_or_else(|| panic!("{name}.1 has no EXIT STATUS:\n{page}"));
            for code in ["0 ", "2 "] {
                assert!(
                    exit.contains(code),
                    "{name}.1's exit statuses lack {code:?}:\n{exit}"
                );
            }
            let subs = roff_section(page, "SUBCOMMANDS").unwrap_or_default();
            for c in &h.commands {
                assert!(
                    subs.contains(&format!("{name}-{c}(1)")),
                    "{name}.1 does not name {c}'s page:\n{page}"
                );
            }
            // `generate man COMMAND…` prints the same page.
            let mut args = vec!["generate", "man"];
            args.extend(path.iter().map(String::as_str));
            assert_eq!(plain(&run(program, &args)), *page, "{args:?}");
        }
        // The top page keeps its program-wide exit statuses, and every command's own
        // statuses are on its page (e.g. run's configuration errors).
        assert!(pages[program].contains("2 bad usage"), "{}", pages[program]);
        all.extend(pages);
    }
    assert!(
        all["failoverd-run"].contains("2 a configuration error"),
        "{}",
        all["failoverd-run"]
    );
    assert!(all["failoverd-promote"].contains("--force"));
    assert!(
        all["failoverd-setup"].contains("--vip") && all["failoverd-setup"].contains("--metrics")
    );
    assert!(all["failoverd-status"].contains("--json"));
    assert!(all["conode-chain-get"].contains("--json"));
    assert!(all["conode-server"].contains("--metrics"));
    // Every page a page refers to (SUBCOMMANDS, SEE ALSO) exists.
    for (name, page) in &all {
        let refs: String = ["SUBCOMMANDS", "SEE ALSO"]
            .iter()
            .filter_map(|s| roff_section(page, s))
            .collect::<Vec<_>>()
            .join("\n");
        let mut found = 0;
        for word in refs.split(|c: char| c.is_whitespace() || c == ',') {
            if let Some(target) = word.strip_suffix("(1)") {
                assert!(
                    all.contains_key(target),
                    "{name}.1 refers to {word}, which does not exist"
                );
                found += 1;
            }
        }
        assert!(found > 0, "{name}.1 refers to no page:\n{page}");
    }
}

#[test]
fn completions_name_every_command() {
    for program in ["conode", "failoverd"] {
        let tree = command_tree(program);
        for shell in ["bash", "zsh", "fish"] {
            let comp = run(program, &["generate", "completions", shell]);
            for (path, h) in &tree {
                for c in &h.commands {
                    assert!(
                        comp.contains(c.as_str()),
                        "{shell} completions lack {program} {} {c}",
                        path.join(" ")
                    );
                }
                for a in h.args.iter().filter(|a| a.starts_with("--")) {
                    assert!(
                        comp.contains(a.trim_start_matches('-')),
                        "{shell} completions lack {program} {} {a}",
                        path.join(" ")
                    );
                }
            }
        }
    }
}

/// `generate man NO-SUCH-COMMAND` is bad usage (2), named.
#[test]
fn a_man_page_of_no_command_is_bad_usage() {
    for program in ["conode", "failoverd"] {
        let out = output(program, &["generate", "man", "nosuch"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{program}: {err}");
        assert!(err.contains("no command \"nosuch\""), "{program}: {err}");
    }
}

/// `conode generate man | head -1`: a reader that went away is no error (no panic, exit
/// 0). The pipe's read end is closed before the program starts, so every write fails
/// with EPIPE.
#[test]
fn output_into_a_closed_pipe_is_no_error() {
    for program in ["conode", "failoverd"] {
        for args in [
            &["generate", "man"][..],
            &["generate", "completions", "bash"][..],
        ] {
            let (reader, writer) = std::io::pipe().unwrap();
            drop(reader);
            let out = Command::new(bin(program))
                .args(args)
                .stdout(writer)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && !err.contains("panicked"),
                "{program} {args:?}: {}: {err}",
                out.status
            );
        }
    }
}

/// failoverd exits 2 on a configuration error, with a line naming the problem, so that
/// failoverd.service (RestartPreventExitStatus=2) does not restart it every 2 s: a
/// missing file, a malformed one, an invalid one, a bad FAILOVERD_IO_TIMEOUT_MS, a key
/// file or conode configuration that cannot be read.
#[test]
fn failoverd_exits_2_on_a_configuration_error() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("failoverd.toml");
    let c = cfg.to_str().expect("UTF-8 path");
    let fo = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(bin("failoverd"))
            .arg("-c")
            .arg(&cfg)
            .args(args)
            .env_remove("FAILOVERD_IO_TIMEOUT_MS")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let expect_2 = |args: &[&str], env: &[(&str, &str)], names: &[&str]| {
        let (code, err) = fo(args, env);
        assert_eq!(code, Some(2), "failoverd {args:?} {env:?}: {err}");
        for n in names {
            assert!(
                err.contains(n),
                "failoverd {args:?} {env:?}: {n:?} in {err}"
            );
        }
    };

    // Missing.
    for cmd in ["run", "release-vip", "status", "demote"] {
        expect_2(&[cmd], &[], &[c, "cannot read", "No such file"]);
    }

    // A valid configuration (the peer's key pinned), but the conode's private.toml is
    // nowhere: `run` stops before it starts anything.
    let peer_key = "ab".repeat(32);
    let state = d.path().join("state");
    let nowhere = d.path().join("nowhere/private.toml");
    let (code, err) = fo(
        &[
            "setup",
            "--state-dir",
            state.to_str().unwrap(),
            "--conode-config",
            nowhere.to_str().unwrap(),
            "--conode-data-dir",
            d.path().to_str().unwrap(),
            "--peer",
            "127.0.0.1:1",
            "--peer-key",
            &peer_key,
            "--listen",
            "127.0.0.1:2",
            "--metrics",
            "",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "setup: {err}");
    expect_2(&["run"], &[], &["conode.config", "nowhere/private.toml"]);
    assert!(!state.exists(), "run created its state directory");

    // A bad environment value.
    expect_2(
        &["run"],
        &[("FAILOVERD_IO_TIMEOUT_MS", "soon")],
        &["FAILOVERD_IO_TIMEOUT_MS"],
    );

    // A key file others can read.
    let key = d.path().join("failoverd.key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    expect_2(&["run"], &[], &["key_file", "chmod 600"]);

    // Invalid: a value out of range, named by its field.
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        good.replace(&format!("\"{peer_key}\""), "\"not hex\""),
    )
    .unwrap();
    expect_2(&["run"], &[], &[c, "peer.public_key"]);
    expect_2(&["release-vip"], &[], &["peer.public_key"]);

    // Malformed: an unknown key, named with its line.
    std::fs::write(&cfg, good.clone() + "bogus = 1\n").unwrap();
    for cmd in ["run", "release-vip", "status", "snapshot", "switchover"] {
        expect_2(&[cmd], &[], &[c, "bogus"]);
    }
    // `check` reports it as a problem it found: 1.
    let (code, err) = fo(&["check"], &[]);
    assert_eq!(code, Some(1), "check: {err}");
}
