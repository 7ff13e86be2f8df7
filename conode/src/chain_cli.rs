//! `conode chain`: the operator's client of the skipchain service (create a chain, append
//! a block, read blocks, follow the update chain), printing one line per block or, with
//! `--json`, JSON.
//!
//! # Phases
//! The command line as clap parses it ([`ChainCmd`]) is first validated into a request:
//! chain ids decoded, files read, block data checked against [`block::MAX_DATA`], the
//! contact servers chosen. A problem there is a usage error (exit 2) and nothing is sent.
//! The request then runs against the servers; a refusal (its text is shown, e.g. "not
//! the leader of this chain"), an unreachable server or an answer that fails
//! verification is a runtime failure (exit 1).
//!
//! # Which server is asked
//! Reads (`get`, `update`, and the look-up of the latest block before `add`) go to the
//! local conode named by `-c private.toml`, or with `--roster ROSTER.toml` to the
//! roster's servers in order until one answers (a server that refuses has answered; one
//! that cannot be reached or stays silent for `--timeout` has not). `create` goes to the
//! first server of the roster it is given, `add` to the leader (first server) named by
//! the latest block of the chain. Everything received is verified by
//! [`crate::skipchain::client`]: hashes, and the signed forward links of update chains.
//!
//! This module never writes a file and never holds more than one block's data.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::config::{PrivateConfig, Roster, ServerToml};
use crate::skipchain::block::{self, SkipBlock};
use crate::skipchain::client;

/// `conode chain …`, as parsed.
#[derive(Debug, Subcommand)]
pub enum ChainCmd {
    /// Create a chain led by the first server of ROSTER.toml; print its genesis block.
    Create {
        /// Roster file (one or more public.toml concatenated); its first server creates
        /// and leads the chain.
        #[arg(value_name = "ROSTER.toml")]
        roster: PathBuf,
        /// Data of the genesis block: a file, or - for standard input [default: none].
        #[arg(long, value_name = "FILE|-")]
        data: Option<PathBuf>,
        /// Skiplist base: block i links back to i - base^h [default: 4; 2..=256].
        #[arg(long, value_name = "N")]
        base_height: Option<i32>,
        /// Most forward links per block [default: 4; 1..=32].
        #[arg(long, value_name = "N")]
        max_height: Option<i32>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Append a block to a chain (sent to the leader its latest block names); print it.
    Add {
        /// The chain: its genesis block's hash, in hex.
        #[arg(value_name = "CHAIN_ID")]
        chain: String,
        /// The block's data: a file, or - for standard input (at most 4 MiB).
        #[arg(long, value_name = "FILE|-")]
        data: PathBuf,
        #[command(flatten)]
        contact: ContactArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Print the latest block of a chain, or the block at --index.
    Get {
        /// The chain: its genesis block's hash, in hex.
        #[arg(value_name = "CHAIN_ID")]
        chain: String,
        /// The block's index (0 is the genesis).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(..=i32::MAX as i64))]
        index: Option<u32>,
        #[command(flatten)]
        contact: ContactArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Print the verified update chain from the genesis to the latest block, one line per
    /// block.
    Update {
        /// The chain: its genesis block's hash, in hex.
        #[arg(value_name = "CHAIN_ID")]
        chain: String,
        #[command(flatten)]
        contact: ContactArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// Which server to read from.
#[derive(Debug, Args)]
pub struct ContactArgs {
    /// Ask the servers of this roster, in order, until one answers [default: the local
    /// conode of -c private.toml].
    #[arg(long, value_name = "ROSTER.toml")]
    roster: Option<PathBuf>,
}

/// How to print and how long to wait.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print JSON: one object per block (an array for `update`), ids and data in hex.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for each server's answer.
    #[arg(short = 't', long, value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
}

/// Why `conode chain` failed; [`ChainError::exit_code`] gives the exit status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// The command line, or a file it names, is wrong: a malformed chain id, an unreadable
    /// roster or private.toml, block data over the limit. Nothing was sent.
    #[error("{0}")]
    Usage(String),
    /// A server refused the request (its reason is shown), none could be reached, or an
    /// answer failed verification.
    #[error("{0}")]
    Failed(String),
}

impl ChainError {
    /// 2 for usage errors, 1 for failures, as `main.rs` documents.
    pub fn exit_code(&self) -> u8 {
        match self {
            ChainError::Usage(_) => 2,
            ChainError::Failed(_) => 1,
        }
    }
}

use ChainError::{Failed, Usage};

/// Run `conode chain`: validate `cmd` (with `private` the `-c` config, used when no
/// `--roster` is given), then send the request and print the result to `out`.
pub fn run(cmd: ChainCmd, private: &Path, out: &mut impl Write) -> Result<(), ChainError> {
    let req = Request::validate(cmd, private)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failed(format!("cannot start the runtime: {e}")))?;
    rt.block_on(req.execute(out))
}

// ---------------------------------------------------------------------------------------
// Phase 1: validation

enum Op {
    Create {
        roster: block::Roster,
        data: Vec<u8>,
        base_height: i32,
        max_height: i32,
    },
    Add {
        chain: [u8; 32],
        data: Vec<u8>,
    },
    Get {
        chain: [u8; 32],
        index: Option<u32>,
    },
    Update {
        chain: [u8; 32],
    },
}

/// Where reads go: servers tried in order, and how to name them in messages.
struct Contacts {
    servers: Vec<ServerToml>,
    origin: String,
}

struct Request {
    op: Op,
    contacts: Contacts,
    json: bool,
    timeout: Duration,
}

impl Request {
    fn validate(cmd: ChainCmd, private: &Path) -> Result<Request, ChainError> {
        let (op, contact, output) = match cmd {
            ChainCmd::Create {
                roster,
                data,
                base_height,
                max_height,
                output,
            } => {
                let r = Roster::load(&roster).map_err(|e| Usage(e.to_string()))?;
                let wire = block::roster_from_config(&r);
                block::roster_keys(&wire)
                    .map_err(|e| Usage(format!("{}: {e}", roster.display())))?;
                let base_height = check_range(
                    "--base-height",
                    base_height,
                    block::BASE_HEIGHTS,
                    block::DEFAULT_BASE_HEIGHT,
                )?;
                let max_height = check_range(
                    "--max-height",
                    max_height,
                    block::MAX_HEIGHTS,
                    block::DEFAULT_MAX_HEIGHT,
                )?;
                let data = match data {
                    Some(d) => read_data(&d)?,
                    None => Vec::new(),
                };
                let contacts = Contacts {
                    servers: r.servers,
                    origin: roster.display().to_string(),
                };
                let op = Op::Create {
                    roster: wire,
                    data,
                    base_height,
                    max_height,
                };
                return Ok(Request {
                    op,
                    contacts,
                    json: output.json,
                    timeout: Duration::from_secs(output.timeout),
                });
            }
            ChainCmd::Add {
                chain,
                data,
                contact,
                output,
            } => {
                let chain = parse_chain_id(&chain)?;
                let data = read_data(&data)?;
                (Op::Add { chain, data }, contact, output)
            }
            ChainCmd::Get {
                chain,
                index,
                contact,
                output,
            } => (
                Op::Get {
                    chain: parse_chain_id(&chain)?,
                    index,
                },
                contact,
                output,
            ),
            ChainCmd::Update {
                chain,
                contact,
                output,
            } => (
                Op::Update {
                    chain: parse_chain_id(&chain)?,
                },
                contact,
                output,
            ),
        };
        let contacts = match contact.roster {
            Some(path) => {
                let r = Roster::load(&path).map_err(|e| Usage(e.to_string()))?;
                Contacts {
                    servers: r.servers,
                    origin: format!("roster {}", path.display()),
                }
            }
            None => {
                let cfg = PrivateConfig::load(private).map_err(|e| {
                    Usage(format!(
                        "{e}; name the local conode with -c private.toml, or ask a roster's servers with --roster ROSTER.toml"
                    ))
                })?;
                Contacts {
                    servers: vec![cfg.server_toml()],
                    origin: format!("the local conode of {}", private.display()),
                }
            }
        };
        Ok(Request {
            op,
            contacts,
            json: output.json,
            timeout: Duration::from_secs(output.timeout),
        })
    }
}

/// A chain id: the genesis block's hash as 64 hex digits.
fn parse_chain_id(s: &str) -> Result<[u8; 32], ChainError> {
    let bytes = hex::decode(s.trim()).map_err(|e| {
        Usage(format!(
            "chain id {s:?} is not hex ({e}): give the genesis block's hash as 64 hex digits, as `conode chain create` printed it"
        ))
    })?;
    if bytes.len() != 32 {
        return Err(Usage(format!(
            "chain id {s:?} is {} bytes; a chain id is 32 bytes: give the genesis block's hash as 64 hex digits",
            bytes.len()
        )));
    }
    block::hash32(&bytes, "a chain id").map_err(Failed)
}

fn check_range(
    flag: &str,
    v: Option<i32>,
    range: std::ops::RangeInclusive<i32>,
    default: i32,
) -> Result<i32, ChainError> {
    let v = v.unwrap_or(default);
    if !range.contains(&v) {
        return Err(Usage(format!(
            "{flag} {v} is out of range: it must be from {} to {}",
            range.start(),
            range.end()
        )));
    }
    Ok(v)
}

/// Read block data from a file or `-` (standard input), refusing more than
/// [`block::MAX_DATA`] bytes without reading past the limit.
fn read_data(src: &Path) -> Result<Vec<u8>, ChainError> {
    let limit = format!(
        "the limit is {} bytes (4 MiB) per block; nothing was sent",
        block::MAX_DATA
    );
    let (name, reader): (String, Box<dyn Read>) = if src == Path::new("-") {
        ("standard input".into(), Box::new(std::io::stdin().lock()))
    } else {
        let f = std::fs::File::open(src)
            .map_err(|e| Usage(format!("cannot read block data {}: {e}", src.display())))?;
        if let Ok(m) = f.metadata() {
            if m.is_file() && m.len() > block::MAX_DATA as u64 {
                return Err(Usage(format!(
                    "block data {} is {} bytes: {limit}",
                    src.display(),
                    m.len()
                )));
            }
        }
        (src.display().to_string(), Box::new(f))
    };
    let mut data = Vec::new();
    reader
        .take(block::MAX_DATA as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| Usage(format!("cannot read block data from {name}: {e}")))?;
    if data.len() > block::MAX_DATA {
        return Err(Usage(format!(
            "block data from {name} is more than {} bytes: {limit}",
            block::MAX_DATA
        )));
    }
    Ok(data)
}

// ---------------------------------------------------------------------------------------
// Phase 2: the request

/// A read sent to the contact servers.
#[derive(Clone, Copy)]
enum Query {
    UpdateChain([u8; 32]),
    ByIndex([u8; 32], u32),
}

impl Request {
    async fn execute(self, out: &mut impl Write) -> Result<(), ChainError> {
        let printed = match &self.op {
            Op::Create {
                roster,
                data,
                base_height,
                max_height,
            } => {
                let leader = self
                    .contacts
                    .servers
                    .first()
                    .map_or_else(String::new, |s| s.address.to_string());
                let g = self
                    .within(client::create(
                        roster.clone(),
                        data.clone(),
                        *base_height,
                        *max_height,
                    ))
                    .await
                    .map_err(|e| Failed(format!("creating a chain at {leader}: {e}")))?;
                self.render(&[g], false)
            }
            Op::Add { chain, data } => {
                let up = self.ask(Query::UpdateChain(*chain)).await?;
                let latest = up
                    .last()
                    .ok_or_else(|| Failed("empty update chain".into()))?;
                let first = latest
                    .roster
                    .as_ref()
                    .and_then(|r| r.list.first())
                    .ok_or_else(|| Failed(format!("block {} has no roster", latest.index)))?;
                let leader = block::member_server(first).map_err(|e| {
                    Failed(format!(
                        "the leader named by block {} is unusable: {e}",
                        latest.index
                    ))
                })?;
                let r = self
                    .within(client::append(&leader, &latest.hash, data.clone()))
                    .await
                    .map_err(|e| {
                        Failed(format!(
                            "appending to chain {} at its leader {}: {e}",
                            block::short(chain),
                            leader.address
                        ))
                    })?;
                let b = r
                    .latest
                    .ok_or_else(|| Failed("the reply has no block".into()))?;
                same_chain(&b, chain)?;
                self.render(&[b], false)
            }
            Op::Get { chain, index } => {
                let b = match index {
                    Some(i) => {
                        let mut got = self.ask(Query::ByIndex(*chain, *i)).await?;
                        let b = got.pop().ok_or_else(|| Failed("no block".into()))?;
                        same_chain(&b, chain)?;
                        if b.index as i64 != *i as i64 {
                            return Err(Failed(format!(
                                "asked for block {i}, the server returned block {}",
                                b.index
                            )));
                        }
                        b
                    }
                    None => {
                        let mut up = self.ask(Query::UpdateChain(*chain)).await?;
                        up.pop()
                            .ok_or_else(|| Failed("empty update chain".into()))?
                    }
                };
                self.render(&[b], false)
            }
            Op::Update { chain } => {
                let up = self.ask(Query::UpdateChain(*chain)).await?;
                self.render(&up, true)
            }
        };
        out.write_all(printed.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| Failed(format!("cannot write the output: {e}")))
    }

    /// `fut`, or an error once the timeout has passed.
    async fn within<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {}s", self.timeout.as_secs_f32())))
    }

    /// Send `q` to the contact servers in order until one answers.
    async fn ask(&self, q: Query) -> Result<Vec<SkipBlock>, ChainError> {
        let what = match q {
            Query::UpdateChain(c) => format!("reading chain {}", block::short(&c)),
            Query::ByIndex(c, i) => format!("reading block {i} of chain {}", block::short(&c)),
        };
        let mut failures = Vec::new();
        for s in &self.contacts.servers {
            let r = match q {
                Query::UpdateChain(c) => self.within(client::update_chain(s, &c)).await,
                Query::ByIndex(c, i) => self
                    .within(client::get_by_index(s, &c, i as i32))
                    .await
                    .map(|b| vec![b]),
            };
            match r {
                Ok(blocks) => return Ok(blocks),
                Err(e) if crate::client::refused_by_server(&e) => {
                    return Err(Failed(format!("{what} at {}: {e}", s.address)));
                }
                Err(e) => failures.push(format!("{}: {e}", s.address)),
            }
        }
        Err(Failed(match &failures[..] {
            [one] => format!("{what} at {one}"),
            _ => format!(
                "{what}: no server of {} answered: {}",
                self.contacts.origin,
                failures.join("; ")
            ),
        }))
    }

    /// Blocks as text lines, or JSON (an array when `list`).
    fn render(&self, blocks: &[SkipBlock], list: bool) -> String {
        if self.json {
            let v: Vec<Value> = blocks.iter().map(block_json).collect();
            let v = if list {
                Value::Array(v)
            } else {
                v.into_iter().next().unwrap_or(Value::Null)
            };
            return format!("{v}\n");
        }
        let mut s = String::new();
        if let Some(b) = blocks.first() {
            s.push_str(&format!("chain {}\n", chain_hex(b)));
        }
        for b in blocks {
            s.push_str(&block_line(b));
            s.push('\n');
        }
        s
    }
}

fn same_chain(b: &SkipBlock, chain: &[u8; 32]) -> Result<(), ChainError> {
    match block::chain_id(b) {
        Ok(id) if id == *chain => Ok(()),
        _ => Err(Failed(format!(
            "the server returned block {} of another chain than {}",
            b.index,
            block::short(chain)
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// Output

/// Longest text preview, in characters.
const PREVIEW: usize = 60;

fn chain_hex(b: &SkipBlock) -> String {
    if b.index == 0 {
        hex::encode(&b.hash)
    } else {
        hex::encode(&b.genesis)
    }
}

/// `block <index> <hash> height <h> data <n> bytes ["preview"]`.
fn block_line(b: &SkipBlock) -> String {
    let mut s = format!(
        "block {} {} height {} data {} bytes",
        b.index,
        hex::encode(&b.hash),
        b.height,
        b.data.len()
    );
    if let Some(p) = preview(&b.data) {
        s.push(' ');
        s.push_str(&p);
    }
    s
}

/// The data quoted, when it is printable UTF-8 text; cut at [`PREVIEW`] characters.
fn preview(data: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(data).ok()?;
    if text.is_empty()
        || text
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return None;
    }
    let cut: String = text.chars().take(PREVIEW).collect();
    let more = if cut.len() < text.len() { "…" } else { "" };
    Some(format!("{cut:?}{more}"))
}

fn block_json(b: &SkipBlock) -> Value {
    let roster: Vec<Value> = b
        .roster
        .as_ref()
        .map(|r| {
            r.list
                .iter()
                .map(|s| {
                    let public = crate::proto::untag_point(&s.public)
                        .map(hex::encode)
                        .unwrap_or_else(|| hex::encode(&s.public));
                    json!({"address": s.address, "public": public, "url": s.url})
                })
                .collect()
        })
        .unwrap_or_default();
    let forward: Vec<Value> = b
        .forward
        .iter()
        .enumerate()
        .map(|(level, l)| json!({"level": level, "to": hex::encode(&l.to)}))
        .collect();
    json!({
        "chain": chain_hex(b),
        "index": b.index,
        "hash": hex::encode(&b.hash),
        "height": b.height,
        "max_height": b.max_height,
        "base_height": b.base_height,
        "backlinks": b.backlinks.iter().map(hex::encode).collect::<Vec<_>>(),
        "data_hex": hex::encode(&b.data),
        "data_len": b.data.len(),
        "roster": roster,
        "forward": forward,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_are_64_hex_digits() {
        let id = "ab".repeat(32);
        assert_eq!(parse_chain_id(&id).unwrap(), [0xab; 32]);
        let e = parse_chain_id("xyz").unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("is not hex"), "{e}");
        let e = parse_chain_id("abcd").unwrap_err();
        assert!(
            e.to_string().contains("is 2 bytes; a chain id is 32"),
            "{e}"
        );
    }

    #[test]
    fn preview_shows_printable_text_only() {
        assert_eq!(preview(b"block 3").as_deref(), Some("\"block 3\""));
        assert_eq!(preview(b"a\nb").as_deref(), Some("\"a\\nb\""));
        assert_eq!(preview(&[0, 1, 2]), None);
        assert_eq!(preview(&[0xff, 0xfe]), None);
        assert_eq!(preview(b""), None);
        let long = "x".repeat(100);
        let p = preview(long.as_bytes()).unwrap();
        assert!(p.ends_with("\"…") && p.len() < 70, "{p}");
    }

    #[test]
    fn data_over_the_limit_is_refused_naming_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("big");
        std::fs::write(&f, vec![0u8; block::MAX_DATA + 1]).unwrap();
        let e = read_data(&f).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("the limit is 4194304 bytes"), "{e}");
        std::fs::write(&f, vec![7u8; block::MAX_DATA]).unwrap();
        assert_eq!(read_data(&f).unwrap().len(), block::MAX_DATA);
    }

    #[test]
    fn block_json_names_every_field_in_hex() {
        let mut b = SkipBlock {
            index: 2,
            height: 1,
            max_height: 4,
            base_height: 4,
            backlinks: vec![vec![1; 32]],
            genesis: vec![9; 32],
            data: b"hi".to_vec(),
            ..Default::default()
        };
        b.hash = block::block_hash(&b).to_vec();
        let v = block_json(&b);
        assert_eq!(v["chain"], hex::encode([9u8; 32]));
        assert_eq!(v["data_hex"], "6869");
        assert_eq!(v["data_len"], 2);
        assert_eq!(v["backlinks"][0], hex::encode([1u8; 32]));
        assert!(v["roster"].as_array().unwrap().is_empty());
        assert_eq!(
            block_line(&b),
            format!(
                "block 2 {} height 1 data 2 bytes \"hi\"",
                hex::encode(&b.hash)
            )
        );
    }
}
