//! The man pages and shell completions that both programs generate from their command-line
//! definitions (`generate man`, `generate completions SHELL`) name every command.

use std::process::Command;

use system_tests::bin;

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(bin(program)).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn check(program: &str, commands: &[&str]) {
    let man = run(program, &["generate", "man"]);
    assert!(man.contains(&format!(".TH {program} 1")), "{man}");
    assert!(man.contains("Exit status: 0"), "the exit statuses:\n{man}");
    for c in commands {
        assert!(
            // roff writes every '-' as "\-".
            man.contains(&format!("{program}\\-{}(1)", c.replace('-', "\\-"))),
            "{c} in:\n{man}"
        );
    }
    for shell in ["bash", "zsh", "fish"] {
        let comp = run(program, &["generate", "completions", shell]);
        for c in commands {
            assert!(comp.contains(c), "{shell} completions lack {c}:\n{comp}");
        }
    }
}

/// The commands `--help` lists (the first word of each line under "Commands:"), but
/// `help`.
fn commands(program: &str) -> Vec<String> {
    let help = run(program, &["--help"]);
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn man_pages_and_completions_name_every_command() {
    for (program, known) in [
        (
            "conode",
            &[
                "setup", "server", "check", "backup", "restore", "chain", "generate",
            ][..],
        ),
        (
            "failoverd",
            &[
                "setup",
                "check",
                "run",
                "status",
                "snapshot",
                "switchover",
                "promote",
                "demote",
                "release-vip",
                "generate",
            ][..],
        ),
    ] {
        let all = commands(program);
        for c in known {
            assert!(
                all.iter().any(|a| a == c),
                "{program} --help lacks {c}: {all:?}"
            );
        }
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        check(program, &all);
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
