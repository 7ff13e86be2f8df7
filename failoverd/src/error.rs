//! failoverd's errors, one `#[non_exhaustive]` enum per layer: the standby's store
//! ([`StoreError`]), the signed manifest ([`ManifestError`]), the peer protocol
//! ([`PeerError`]) and the live host's shipper ([`ShipError`]). Each variant says its
//! likely cause; `Display` gives the operator the numbers. The metrics' `cause` label
//! ([`Cause`]) and the decision to retry ([`PeerError::is_permanent`],
//! [`ShipError::is_permanent`]) come from the variant, never from the words.
//!
//! A broken invariant is [`StoreError::Bug`] / [`ShipError::Bug`]: logged at `error` with
//! "this is a bug".

use std::path::PathBuf;

/// Why a snapshot failed or was refused, as the `cause` label of
/// `failoverd_snapshot_failures_total`. Stable names: dashboards use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    /// The standby's disk is full.
    DiskFull,
    /// A manifest not signed by the pinned key, or malformed.
    Signature,
    /// A chunk damaged in transit.
    Hash,
    /// Bytes on the standby's own disk changed since they were verified.
    Corruption,
    /// An old or replayed generation, or one behind on a chain.
    OldGeneration,
    /// The file failed redb's integrity check, or its chains differ from the manifest.
    Integrity,
    /// The conode's admin socket failed or does not answer.
    Conode,
    /// rsync or scp failed.
    Transport,
    /// The peer cannot be reached, broke the connection, or refused the request.
    Peer,
    /// The peer does not trust this host's key (or the other way round).
    Unauthenticated,
    /// A local file operation failed (other than a full disk).
    Io,
    /// A broken invariant: a bug.
    Bug,
}

impl Cause {
    pub const ALL: [Cause; 12] = [
        Cause::DiskFull,
        Cause::Signature,
        Cause::Hash,
        Cause::Corruption,
        Cause::OldGeneration,
        Cause::Integrity,
        Cause::Conode,
        Cause::Transport,
        Cause::Peer,
        Cause::Unauthenticated,
        Cause::Io,
        Cause::Bug,
    ];

    /// The cause a label names (as the standby sends it with a refusal).
    pub fn from_label(label: &str) -> Option<Cause> {
        Cause::ALL.into_iter().find(|c| c.label() == label)
    }

    pub fn label(self) -> &'static str {
        match self {
            Cause::DiskFull => "disk_full",
            Cause::Signature => "signature",
            Cause::Hash => "hash",
            Cause::Corruption => "corruption",
            Cause::OldGeneration => "old_generation",
            Cause::Integrity => "integrity",
            Cause::Conode => "conode",
            Cause::Transport => "transport",
            Cause::Peer => "peer",
            Cause::Unauthenticated => "unauthenticated",
            Cause::Io => "io",
            Cause::Bug => "bug",
        }
    }
}

/// A signed manifest that cannot be accepted.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// Signed by another key than the pinned one, or altered on the way.
    #[error("manifest signature does not verify with the pinned peer key {}: signed by another key, or altered", hex::encode(.pinned))]
    BadSignature { pinned: [u8; 32] },
    /// The manifest names a signer other than the pinned key.
    #[error("manifest names a signer other than the pinned peer key")]
    WrongSigner,
    /// The two hosts run different failoverd releases.
    #[error("manifest version {got} is not supported (this failoverd reads version {ours}): run the same failoverd release on both hosts")]
    Version { got: u32, ours: u32 },
    /// Larger than any manifest the live host writes.
    #[error("manifest is {len} bytes, more than the {max} accepted")]
    TooLarge { len: u64, max: u64 },
    /// Not the JSON failoverd writes, or inconsistent (chunks not adding up, bad hex).
    #[error("manifest {0}")]
    Malformed(String),
    /// A file name that is not a plain name inside the inbox (`../x`, `/etc/passwd`).
    #[error("manifest names the file {0:?}: only a plain file name inside the inbox is accepted")]
    FileName(String),
}

/// What the standby's store refuses or fails at. The previous generations are untouched
/// by every one of these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The pair is configured with two different conode identities.
    #[error("snapshot is of conode {} but this host's conode is {}: refusing", hex::encode(.got), hex::encode(.ours))]
    OtherConode { got: [u8; 32], ours: [u8; 32] },
    /// An old or replayed snapshot (or a live host whose generation counter went back).
    #[error("generation {offered} is not newer than generation {installed} already installed: refusing an old or replayed snapshot")]
    NotNewer { offered: u64, installed: u64 },
    /// The live host lost data that the standby holds: never replace newer with older.
    #[error("the snapshot has chain {} at index {}, behind index {installed} in the installed generation: refusing to go back", hex::encode(.chain), .offered.map_or("none (chain missing)".to_string(), |i| i.to_string()))]
    Behind {
        chain: [u8; 32],
        offered: Option<u32>,
        installed: u32,
    },
    /// Chunks or a commit for a generation whose manifest was not offered (or another one
    /// replaced it).
    #[error("generation {generation} is not being received{}: offer its manifest first", .receiving.map(|g| format!(" (generation {g} is)")).unwrap_or_default())]
    NotReceiving {
        generation: u64,
        receiving: Option<u64>,
    },
    /// Stream frames for a generation that is not being streamed.
    #[error("generation {generation} is not being streamed")]
    NotStreaming { generation: u64 },
    /// A stream for a generation whose manifest came already.
    #[error(
        "generation {generation}'s manifest is offered already: send the chunks it lacks instead"
    )]
    AlreadyOffered { generation: u64 },
    /// A chunk index the manifest does not have.
    #[error("chunk {index} of generation {generation} does not exist (the manifest has {count})")]
    NoSuchChunk {
        generation: u64,
        index: u32,
        count: usize,
    },
    /// A frame that does not fit the generation's size.
    #[error("a streamed frame of {len} bytes at offset {offset} is empty or ends past the {size} bytes of generation {generation}")]
    FrameOutOfRange {
        generation: u64,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// Bytes damaged in transit (network, a bad NIC, a transport bug).
    #[error("chunk {index} of generation {generation} (offset {offset}) does not match its hash in the signed manifest: damaged in transit; not stored")]
    ChunkHash {
        generation: u64,
        index: usize,
        offset: u64,
    },
    /// A file delivered by rsync or scp whose bytes do not match the manifest.
    #[error("{}: chunk {index} at offset {offset} does not match its hash in the signed manifest: the file was damaged in transit; not installed", path.display())]
    FileHash {
        path: PathBuf,
        index: usize,
        offset: u64,
    },
    /// Bytes kept from an older generation changed on this host's disk since they were
    /// verified: the disk or the filesystem is corrupting data.
    #[error("{}: chunk {index} at offset {offset} kept from an older generation no longer matches its hash: that file changed on this disk since it was installed; not installed", path.display())]
    DiskCorruption {
        path: PathBuf,
        index: usize,
        offset: u64,
    },
    /// A commit before every chunk arrived.
    #[error("generation {generation} is missing {missing} chunks: send them first")]
    Incomplete { generation: u64, missing: usize },
    /// rsync or scp delivered a file of another size (cut short, or another snapshot).
    #[error("{} is {len} bytes but the manifest says {expected}: truncated or not the snapshot of generation {generation}", path.display())]
    WrongSize {
        path: PathBuf,
        len: u64,
        expected: u64,
        generation: u64,
    },
    /// The manifest names no inbox file.
    #[error("manifest names no inbox file: send chunks over HTTPS instead")]
    NoInboxFile,
    /// redb's integrity check failed on the assembled file.
    #[error("generation {generation} failed the integrity check: {reason}")]
    Integrity { generation: u64, reason: String },
    /// The file's chains are not those the signed manifest claims.
    #[error("generation {generation}: the chains in the file differ from the signed manifest's positions: refusing")]
    ChainsDiffer { generation: u64 },
    /// The standby's disk is full.
    #[error("{what} {}: no space left on the standby's disk: free space or lower snapshot.keep; the previous generations are kept", path.display())]
    DiskFull { what: String, path: PathBuf },
    /// Another file operation failed (permissions, a vanished directory).
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// An installed generation that does not match its manifest, or a manifest the
    /// pinned key no longer opens (the peer key changed): only a person can sort it out.
    #[error("{}: {reason}", path.display())]
    Installed { path: PathBuf, reason: String },
    /// A broken invariant.
    #[error("{0}: this is a bug")]
    Bug(String),
}

impl StoreError {
    /// A file operation's error: a full disk is [`StoreError::DiskFull`].
    pub fn io(what: &str, path: &std::path::Path, e: std::io::Error) -> StoreError {
        if e.kind() == std::io::ErrorKind::StorageFull {
            StoreError::DiskFull {
                what: what.to_string(),
                path: path.to_path_buf(),
            }
        } else {
            StoreError::Io {
                what: what.to_string(),
                path: path.to_path_buf(),
                source: e,
            }
        }
    }

    pub fn cause(&self) -> Cause {
        use StoreError as E;
        match self {
            E::Manifest(_) | E::OtherConode { .. } => Cause::Signature,
            E::NotNewer { .. } | E::Behind { .. } => Cause::OldGeneration,
            E::ChunkHash { .. } | E::FileHash { .. } => Cause::Hash,
            E::DiskCorruption { .. } => Cause::Corruption,
            E::Integrity { .. } | E::ChainsDiffer { .. } | E::WrongSize { .. } => Cause::Integrity,
            E::DiskFull { .. } => Cause::DiskFull,
            E::Io { .. } | E::Installed { .. } => Cause::Io,
            E::Bug(_) => Cause::Bug,
            E::NotReceiving { .. }
            | E::NotStreaming { .. }
            | E::AlreadyOffered { .. }
            | E::NoSuchChunk { .. }
            | E::FrameOutOfRange { .. }
            | E::Incomplete { .. }
            | E::NoInboxFile => Cause::Peer,
        }
    }
}

/// A request to the peer that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The TLS handshake was refused: the peer does not pin this host's key, or presents
    /// a key other than the one pinned here. Permanent until someone fixes a key.
    #[error("peer {address}: the TLS handshake failed ({reason}): the peer does not trust this host's key, or presents another key than peer.public_key; check the pinned keys on both hosts")]
    Unauthenticated { address: String, reason: String },
    /// Connection refused, reset, timed out: worth trying again.
    #[error("{what} to {address}: {reason}")]
    Unreachable {
        what: String,
        address: String,
        reason: String,
    },
    /// The peer answered with a refusal (4xx/5xx), its reason and its cause.
    #[error("{what}: the peer refused: {reason}")]
    Refused {
        what: String,
        status: u16,
        reason: String,
        cause: Cause,
    },
    /// The peer's answer is not what the protocol says (bad JSON, a missing field, an
    /// index out of range): a peer running another release, or a bug.
    #[error("{what}: the peer's answer is malformed: {reason}")]
    Malformed { what: String, reason: String },
}

impl PeerError {
    /// Retrying will not help (a refusal, a key that is not trusted, a malformed answer).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, PeerError::Unreachable { .. })
    }

    pub fn cause(&self) -> Cause {
        match self {
            PeerError::Unauthenticated { .. } => Cause::Unauthenticated,
            PeerError::Refused { cause, .. } => *cause,
            _ => Cause::Peer,
        }
    }
}

/// Why the live host could not ship a snapshot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShipError {
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// Transfers kept breaking.
    #[error("peer {address}: gave up generation {generation} after {attempts} attempts: {last}")]
    GaveUp {
        address: String,
        generation: u64,
        attempts: u32,
        last: PeerError,
    },
    /// The conode's admin socket failed or did not answer.
    #[error("conode admin socket {}: {reason}", path.display())]
    Conode { path: PathBuf, reason: String },
    /// This host is not the live one.
    #[error("this host is the standby (its conode is not running: {reason}): only the live host takes snapshots")]
    NotLive { reason: String },
    /// rsync or scp failed or timed out.
    #[error("{tool} to {dest} failed: {reason}")]
    Transport {
        tool: &'static str,
        dest: String,
        reason: String,
    },
    /// A local file operation on the live host failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A broken invariant.
    #[error("{0}: this is a bug")]
    Bug(String),
}

impl ShipError {
    pub fn io(what: &str, path: &std::path::Path, source: std::io::Error) -> ShipError {
        ShipError::Io {
            what: what.to_string(),
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn cause(&self) -> Cause {
        match self {
            ShipError::Peer(p) | ShipError::GaveUp { last: p, .. } => p.cause(),
            ShipError::Conode { .. } | ShipError::NotLive { .. } => Cause::Conode,
            ShipError::Transport { .. } => Cause::Transport,
            ShipError::Io { .. } => Cause::Io,
            ShipError::Bug(_) => Cause::Bug,
        }
    }
}
