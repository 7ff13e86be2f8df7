//! The manual pages and shell completions of both programs (`conode generate …`,
//! `failoverd generate …`), generated from their clap definitions.
//!
//! One page per command and nested subcommand: `conode.1`, `conode-chain.1`,
//! `conode-chain-create.1`, … A page's SUBCOMMANDS section names the pages of its
//! subcommands and its SEE ALSO the page of its parent (and a program's own page, the
//! pages its `after_help` names under `See also:`), so every page referred to exists.
//! The paragraphs of a command's `after_help` (separated by a blank line) that begin
//! with `Exit status:` or `Environment:` become the sections EXIT STATUS and
//! ENVIRONMENT; a command without exit statuses of its own shows its nearest
//! ancestor's, so every page has an EXIT STATUS section.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Command, Subcommand};
use clap_mangen::roff::{roman, Roff};
use clap_mangen::Man;

/// `generate …`: what is generated.
#[derive(Debug, Subcommand)]
pub enum Generated {
    /// Manual pages in roff: the program's page (or COMMAND's) on standard output, or
    /// with --dir every page, one per command.
    Man {
        /// Write every page (PROGRAM.1, PROGRAM-COMMAND.1, PROGRAM-COMMAND-SUBCOMMAND.1,
        /// …) into DIR (created if missing) and print their paths.
        #[arg(long, value_name = "DIR", conflicts_with = "command")]
        dir: Option<PathBuf>,
        /// Print the page of this command instead of the program's (e.g. `chain create`).
        #[arg(value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Completions for a shell (e.g. `generate completions bash`).
    Completions {
        /// The shell to complete the program's commands and flags in.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

/// One manual page.
pub struct Page {
    /// The page's name, as other pages refer to it: `conode-chain-create`.
    pub name: String,
    /// Its roff source.
    pub roff: Vec<u8>,
}

impl Page {
    /// The file name in section 1: `conode-chain-create.1`.
    pub fn file_name(&self) -> String {
        format!("{}.1", self.name)
    }
}

/// Why `generate` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    /// `generate man COMMAND…` names no command: bad usage (exit status 2).
    #[error("no command {0:?}: see --help")]
    NoSuchCommand(String),
    /// A page could not be rendered or written (exit status 1).
    #[error("{0}")]
    Output(String),
}

impl GenerateError {
    /// 2 for bad usage, 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            GenerateError::NoSuchCommand(_) => 2,
            GenerateError::Output(_) => 1,
        }
    }
}

/// Carry out `generate …` for the program `cmd`, writing to standard output (a reader
/// that went away, e.g. `| head`, is no error).
pub fn generate(cmd: Command, what: Generated) -> Result<(), GenerateError> {
    let mut out = Vec::new();
    match what {
        Generated::Man { dir: Some(dir), .. } => {
            for path in write_man_pages(cmd, &dir).map_err(GenerateError::Output)? {
                let _ = writeln!(out, "{}", path.display());
            }
        }
        Generated::Man { dir: None, command } => {
            let want = std::iter::once(cmd.get_name().to_string())
                .chain(command.iter().cloned())
                .collect::<Vec<_>>()
                .join("-");
            let pages = man_pages(cmd)
                .map_err(|e| GenerateError::Output(format!("cannot render the man pages: {e}")))?;
            let Some(page) = pages.into_iter().find(|p| p.name == want) else {
                return Err(GenerateError::NoSuchCommand(command.join(" ")));
            };
            out = page.roff;
        }
        Generated::Completions { shell } => {
            let mut cmd = cmd;
            let name = cmd.get_name().to_string();
            clap_complete::generate(shell, &mut cmd, name, &mut out);
        }
    }
    match std::io::stdout().write_all(&out) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(GenerateError::Output(
            format!("cannot write to standard output: {e}"),
        )),
        _ => Ok(()),
    }
}

/// Write every page of `cmd` into `dir` (created if missing); their paths.
pub fn write_man_pages(cmd: Command, dir: &Path) -> Result<Vec<PathBuf>, String> {
    let pages = man_pages(cmd).map_err(|e| format!("cannot render the man pages: {e}"))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut paths = Vec::new();
    for p in pages {
        let path = dir.join(p.file_name());
        std::fs::write(&path, &p.roff)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

/// Every page of the program `cmd`: its own first, then its commands, depth first.
pub fn man_pages(cmd: Command) -> std::io::Result<Vec<Page>> {
    fn no_help_command(c: Command) -> Command {
        c.disable_help_subcommand(true)
            .mut_subcommands(no_help_command)
    }
    let mut cmd = no_help_command(cmd);
    cmd.build();
    let source = format!(
        "{} {}",
        cmd.get_name(),
        cmd.get_version().unwrap_or_default()
    );
    let mut pages = Vec::new();
    walk(&cmd, &mut Vec::new(), &source, &mut pages)?;
    Ok(pages)
}

fn walk<'a>(
    c: &'a Command,
    ancestors: &mut Vec<&'a Command>,
    source: &str,
    pages: &mut Vec<Page>,
) -> std::io::Result<()> {
    pages.push(page(c, ancestors, source)?);
    ancestors.push(c);
    for sub in visible_subcommands(c) {
        walk(sub, ancestors, source, pages)?;
    }
    ancestors.pop();
    Ok(())
}

fn visible_subcommands(c: &Command) -> impl Iterator<Item = &Command> {
    c.get_subcommands().filter(|s| !s.is_hide_set())
}

fn page_name(c: &Command) -> &str {
    c.get_display_name().unwrap_or_else(|| c.get_name())
}

/// The paragraphs of `c`'s after_help: (heading, lines).
fn sections(c: &Command) -> Vec<(String, String)> {
    let Some(text) = c.get_after_long_help().or_else(|| c.get_after_help()) else {
        return Vec::new();
    };
    text.to_string()
        .split("\n\n")
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            for (prefix, heading) in [
                ("Exit status:", "EXIT STATUS"),
                ("Environment:", "ENVIRONMENT"),
                ("See also:", "SEE ALSO"),
            ] {
                if let Some(rest) = p.strip_prefix(prefix) {
                    return (heading.to_string(), rest.trim().to_string());
                }
            }
            ("NOTES".to_string(), p.trim().to_string())
        })
        .collect()
}

fn page(c: &Command, ancestors: &[&Command], source: &str) -> std::io::Result<Page> {
    let man = Man::new(c.clone()).source(source);
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if c.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    let mut roff = Roff::new();
    let subs: Vec<&Command> = visible_subcommands(c).collect();
    if !subs.is_empty() {
        roff.control("SH", ["SUBCOMMANDS"]);
        for sub in &subs {
            roff.control("TP", []);
            roff.text([roman(format!("{}(1)", page_name(sub)))]);
            if let Some(about) = sub.get_about().or_else(|| sub.get_long_about()) {
                roff.text([roman(about.to_string())]);
            }
        }
    }
    let own = sections(c);
    let mut text_sections: Vec<(String, String)> = own
        .iter()
        .filter(|(h, _)| h != "SEE ALSO")
        .cloned()
        .collect();
    if !own.iter().any(|(h, _)| h == "EXIT STATUS") {
        // The nearest ancestor's exit statuses hold for this command too.
        if let Some(inherited) = ancestors.iter().rev().find_map(|a| {
            sections(a)
                .into_iter()
                .find(|(h, _)| h == "EXIT STATUS")
                .map(|(_, t)| t)
        }) {
            text_sections.insert(0, ("EXIT STATUS".to_string(), inherited));
        }
    }
    for (heading, text) in &text_sections {
        roff.control("SH", [heading.as_str()]);
        for line in text.lines() {
            roff.text([roman(line.trim())]);
        }
    }
    let mut see_also: Vec<String> = ancestors
        .last()
        .map(|p| format!("{}(1)", page_name(p)))
        .into_iter()
        .collect();
    see_also.extend(
        own.iter()
            .filter(|(h, _)| h == "SEE ALSO")
            .map(|(_, t)| t.trim_end_matches('.').to_string()),
    );
    if !see_also.is_empty() {
        roff.control("SH", ["SEE ALSO"]);
        roff.text([roman(see_also.join(", "))]);
    }
    roff.to_writer(&mut out)?;
    if c.get_version().is_some() {
        man.render_version_section(&mut out)?;
    }
    Ok(Page {
        name: page_name(c).to_string(),
        roff: once_preamble(&out),
    })
}

/// `roff` with the lines each rendered part starts with (the definition of `\*(Aq`, the
/// apostrophe) kept only the first time.
fn once_preamble(roff: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(roff);
    let mut seen = std::collections::HashSet::new();
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if line.contains(".ds Aq ") && !seen.insert(line) {
            continue;
        }
        out.push_str(line);
    }
    out.into_bytes()
}

/// Every argument of `cmd` and of its commands that has no help text, as
/// `"PROGRAM COMMAND --flag"`; and every command without one. Empty when complete.
pub fn undocumented(cmd: Command) -> Vec<String> {
    fn walk(c: &Command, path: &str, missing: &mut Vec<String>) {
        for a in c.get_arguments().filter(|a| !a.is_hide_set()) {
            if a.get_help().is_none() && a.get_long_help().is_none() {
                let name = match (a.get_long(), a.get_short()) {
                    (Some(l), _) => format!("--{l}"),
                    (None, Some(s)) => format!("-{s}"),
                    (None, None) => format!("<{}>", a.get_id()),
                };
                missing.push(format!("{path} {name}"));
            }
        }
        for sub in visible_subcommands(c) {
            let p = format!("{path} {}", sub.get_name());
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                missing.push(p.clone());
            }
            walk(sub, &p, missing);
        }
    }
    let mut cmd = cmd;
    cmd.build();
    let mut missing = Vec::new();
    walk(&cmd, cmd.get_name(), &mut missing);
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program() -> Command {
        Command::new("prog")
            .version("1.0")
            .about("a program")
            .after_help("Exit status: 0 fine; 1 not.\n\nSee also: other(1).")
            .arg(clap::Arg::new("config").long("config").help("the file"))
            .subcommand(
                Command::new("run")
                    .about("run it")
                    .arg(
                        clap::Arg::new("force")
                            .long("force")
                            .action(clap::ArgAction::SetTrue),
                    )
                    .after_help("Environment: X the x."),
            )
            .subcommand(
                Command::new("nest")
                    .about("nested")
                    .subcommand(Command::new("deep").about("deep down"))
                    .after_help("Exit status: 3 deep trouble."),
            )
    }

    fn text(p: &Page) -> String {
        String::from_utf8_lossy(&p.roff).replace("\\-", "-")
    }

    #[test]
    fn one_page_per_command_with_references_that_exist() {
        let pages = man_pages(program()).unwrap();
        let names: Vec<&str> = pages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["prog", "prog-run", "prog-nest", "prog-nest-deep"]);
        let top = text(&pages[0]);
        assert!(
            top.contains("prog-run(1)") && top.contains("prog-nest(1)"),
            "{top}"
        );
        assert!(!top.contains("prog-help"), "{top}");
        assert!(top.contains(".SH \"SEE ALSO\"\nother(1)"), "{top}");
        assert_eq!(
            top.matches(".ds Aq").count(),
            2,
            "the preamble once:\n{top}"
        );
        let run = text(&pages[1]);
        // The program's exit statuses, inherited; its own environment and flags.
        assert!(run.contains(".SH \"EXIT STATUS\"\n0 fine; 1 not."), "{run}");
        assert!(run.contains(".SH ENVIRONMENT\nX the x."), "{run}");
        assert!(run.contains("--force"), "{run}");
        assert!(run.contains(".SH \"SEE ALSO\"\nprog(1)"), "{run}");
        let deep = text(&pages[3]);
        assert!(deep.contains("3 deep trouble."), "{deep}");
        assert!(deep.contains("prog-nest(1)"), "{deep}");
    }

    #[test]
    fn undocumented_names_what_lacks_help() {
        assert_eq!(undocumented(program()), ["prog run --force"]);
    }
}
