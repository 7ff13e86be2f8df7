//! The peer protocol between the two failoverds: one message type, every message
//! carrying the sender's epoch and state.
//!
//! The shell encodes these on the pinned-TLS peer port; this module only defines what
//! they mean. It must never trust ordering: any message may be delayed, duplicated,
//! reordered or stale, and the core decides with epochs, not with arrival order.

use alloc::string::String;

/// The highest epoch a host ever takes or claims: 2^53 − 1.
///
/// Unreachable by legitimate claims (one per millisecond for 285 000 years), exact in
/// every consumer of the number (JSON read as a double, Prometheus' float64 gauges), and
/// far enough below `u64::MAX` that `highest seen + 1` never overflows. A claim that would
/// need a higher one is refused, never saturated. See `DESIGN.md` §4.
pub const MAX_EPOCH: u64 = (1 << 53) - 1;

/// How far above the highest epoch a host has seen a peer's epoch may be: 2^32.
///
/// A legitimate peer can be far ahead (every claim it made while this host was down, cut
/// off, or not yet installed), but never by 2^32 claims (one a second for 136 years); a
/// larger jump is a corrupt epoch file or a bug, and the message is refused whole.
pub const MAX_EPOCH_STEP: u64 = 1 << 32;

/// One message from the peer. The header fields ride on every message, so any message
/// is also a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerMessage {
    /// The sender's persisted epoch (never one it has not yet written to disk).
    pub epoch: u64,
    /// The sender holds the address (or is past its probe and adding it), by its
    /// own belief.
    pub live: bool,
    /// The sender may have the address on its interface (live, releasing, or a
    /// leftover not yet decided). A host that says `false` has no copy of it.
    pub may_hold: bool,
    /// The newest verified generation the sender holds.
    pub newest_generation: Option<u64>,
    /// What the message asks or answers.
    pub body: Body,
}

/// The kinds of peer message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// Periodic state; nothing asked.
    Heartbeat,
    /// A standby asks the live host to hand over (promote with the peer reachable, or
    /// switchover asked on the standby). `ask` names the request so copies are
    /// recognised.
    HandoverRequest {
        /// The asking side's id for this request.
        ask: u64,
    },
    /// The old live host stopped its conode, shipped `generation` as its final
    /// snapshot and removed the address; the receiver may take over. The handover's
    /// epoch is the header's `epoch`.
    Handover {
        /// The final generation; taking over onto anything older would lose blocks.
        generation: u64,
    },
    /// The standby took over the handover of `from_epoch` and is live.
    HandoverAck {
        /// The epoch of the handover this acknowledges.
        from_epoch: u64,
    },
    /// A request or handover was refused; nothing was changed by the refuser.
    Refused {
        /// What was refused.
        of: Refusal,
        /// The epoch the refused message carried.
        request_epoch: u64,
        /// Why, in plain words.
        reason: String,
    },
}

/// Which message a [`Body::Refused`] answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A [`Body::HandoverRequest`].
    HandoverRequest,
    /// A [`Body::Handover`].
    Handover,
    /// Any message, refused whole for its header: a future epoch (above [`MAX_EPOCH`], or
    /// more than [`MAX_EPOCH_STEP`] above the highest the refuser has seen).
    Message,
}
