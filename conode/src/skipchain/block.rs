//! Skipblocks: wire messages, the block hash, forward-link signatures and the skiplist
//! arithmetic. Pure functions; no I/O.
//!
//! # Block hash
//! `hash = SHA-256` over, in this order (integers little-endian; every variable-length
//! field preceded by its length as `u32`, every list by its count as `u32`):
//!
//! 1. `index`, `height`, `max_height`, `base_height` (`i32` each);
//! 2. `backlinks` (count, then each with its length);
//! 3. `verifiers` (count, then each with its length);
//! 4. `genesis` (length, bytes; empty for the genesis block);
//! 5. `data` (length, bytes);
//! 6. the roster: count, then for each server its 32-byte public key, its `Address`
//!    (length, bytes) and its `URL` (length, bytes);
//! 7. `signature_scheme` (`u32`).
//!
//! This follows the Go conode's field order, with two deliberate differences: lengths
//! are prefixed (Go concatenates, so two different blocks can share a hash), and the
//! roster's addresses are covered (followers dial the leader at the `Address` the block
//! names, so it must not be alterable). `forward` and `payload` are not hashed.
//!
//! # Forward links
//! A forward link from block `a` to block `b` signs `SHA-256(a.hash ‖ b.hash)`. Its
//! `signature.sig` is the 64-byte Ed25519 signatures of the signers, in roster order,
//! followed by a participation mask over `a`'s roster (bit `i` at byte `i/8`, bit `i%8`,
//! least significant first, as kyber's masks). A link is valid with at least
//! `n − (n−1)/3` valid signatures from distinct members of `a`'s roster.
//!
//! # Skiplist
//! Block `i` has height `1 + #{h ≥ 1 : h < max_height, i mod base^h = 0}`; the genesis
//! has `max_height`. Its backlink at level `h` is block `i − base^h`, which receives a
//! forward link at level `h` when block `i` is stored.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::keys;
use crate::proto::{untag_point, ServerIdentity};

/// Signature scheme of blocks made here: Ed25519 multi-signatures (Go uses 0 = BLS and
/// 1 = BDN on bn256, which we do not implement).
pub const SCHEME_ED25519: u32 = 2;
/// Largest `data` of a block: 4 MiB (a block travels in one 10 MiB peer frame or client
/// message with its roster and links).
pub const MAX_DATA: usize = 4 << 20;
/// Allowed `base_height` values.
pub const BASE_HEIGHTS: std::ops::RangeInclusive<i32> = 2..=256;
/// Allowed `max_height` values.
pub const MAX_HEIGHTS: std::ops::RangeInclusive<i32> = 1..=32;
/// Defaults for new chains.
pub const DEFAULT_BASE_HEIGHT: i32 = 4;
pub const DEFAULT_MAX_HEIGHT: i32 = 4;
/// Most servers in a roster.
pub const MAX_ROSTER: usize = 1024;

// ---------------------------------------------------------------------------------------
// Wire messages (field numbers as cothority's external/proto/skipchain.proto)

/// `onet.Roster`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Roster {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    #[prost(message, repeated, tag = "2")]
    pub list: Vec<ServerIdentity>,
    #[prost(bytes = "vec", tag = "3")]
    pub aggregate: Vec<u8>,
}

/// `skipchain.SkipBlock`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SkipBlock {
    #[prost(sint32, tag = "1")]
    pub index: i32,
    #[prost(sint32, tag = "2")]
    pub height: i32,
    #[prost(sint32, tag = "3")]
    pub max_height: i32,
    #[prost(sint32, tag = "4")]
    pub base_height: i32,
    #[prost(bytes = "vec", repeated, tag = "5")]
    pub backlinks: Vec<Vec<u8>>,
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub verifiers: Vec<Vec<u8>>,
    #[prost(bytes = "vec", tag = "7")]
    pub genesis: Vec<u8>,
    #[prost(bytes = "vec", tag = "8")]
    pub data: Vec<u8>,
    #[prost(message, optional, tag = "9")]
    pub roster: Option<Roster>,
    #[prost(bytes = "vec", tag = "10")]
    pub hash: Vec<u8>,
    #[prost(message, repeated, tag = "11")]
    pub forward: Vec<ForwardLink>,
    #[prost(bytes = "vec", optional, tag = "12")]
    pub payload: Option<Vec<u8>>,
    #[prost(uint32, tag = "13")]
    pub signature_scheme: u32,
}

/// `skipchain.ForwardLink`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ForwardLink {
    #[prost(bytes = "vec", tag = "1")]
    pub from: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub to: Vec<u8>,
    #[prost(message, optional, tag = "3")]
    pub new_roster: Option<Roster>,
    #[prost(message, optional, tag = "4")]
    pub signature: Option<ByzcoinSig>,
}

/// `byzcoinx.FinalSignature`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ByzcoinSig {
    #[prost(bytes = "vec", tag = "1")]
    pub msg: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub sig: Vec<u8>,
}

/// `StoreSkipBlock`: an empty target creates a chain from `new_block` (roster, data,
/// heights); otherwise `new_block.data` is appended to the chain of the target block.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoreSkipBlock {
    #[prost(bytes = "vec", tag = "1")]
    pub target_skip_chain_id: Vec<u8>,
    #[prost(message, optional, tag = "2")]
    pub new_block: Option<SkipBlock>,
    #[prost(bytes = "vec", optional, tag = "3")]
    pub signature: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StoreSkipBlockReply {
    #[prost(message, optional, tag = "1")]
    pub previous: Option<SkipBlock>,
    #[prost(message, optional, tag = "2")]
    pub latest: Option<SkipBlock>,
}

/// `GetSingleBlock`: the reply is the `SkipBlock` itself.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetSingleBlock {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetSingleBlockByIndex {
    #[prost(bytes = "vec", tag = "1")]
    pub genesis: Vec<u8>,
    #[prost(sint32, tag = "2")]
    pub index: i32,
}

/// The block, and the forward links leading to it from the genesis.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetSingleBlockByIndexReply {
    #[prost(message, optional, tag = "1")]
    pub skipblock: Option<SkipBlock>,
    #[prost(message, repeated, tag = "2")]
    pub links: Vec<ForwardLink>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetUpdateChain {
    #[prost(bytes = "vec", tag = "1")]
    pub latest_id: Vec<u8>,
    #[prost(sint32, optional, tag = "2")]
    pub max_height: Option<i32>,
    #[prost(sint32, optional, tag = "3")]
    pub max_blocks: Option<i32>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetUpdateChainReply {
    #[prost(message, repeated, tag = "1")]
    pub update: Vec<SkipBlock>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetAllSkipChainIDs {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GetAllSkipChainIDsReply {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub skip_chain_ids: Vec<Vec<u8>>,
}

// ---------------------------------------------------------------------------------------
// Hashes

/// 32 bytes, or an error naming `what`.
pub fn hash32(b: &[u8], what: &str) -> Result<[u8; 32], String> {
    b.try_into()
        .map_err(|_| format!("{what} must be 32 bytes, not {}", b.len()))
}

fn put_bytes(h: &mut Sha256, b: &[u8]) {
    h.update((b.len() as u32).to_le_bytes());
    h.update(b);
}

/// The block hash, as documented in the module header.
pub fn block_hash(b: &SkipBlock) -> [u8; 32] {
    let mut h = Sha256::new();
    for v in [b.index, b.height, b.max_height, b.base_height] {
        h.update(v.to_le_bytes());
    }
    for list in [&b.backlinks, &b.verifiers] {
        h.update((list.len() as u32).to_le_bytes());
        for x in list {
            put_bytes(&mut h, x);
        }
    }
    put_bytes(&mut h, &b.genesis);
    put_bytes(&mut h, &b.data);
    let servers: &[ServerIdentity] = b.roster.as_ref().map_or(&[], |r| &r.list[..]);
    h.update((servers.len() as u32).to_le_bytes());
    for s in servers {
        match untag_point(&s.public) {
            Some(p) => h.update(p),
            None => put_bytes(&mut h, &s.public),
        }
        put_bytes(&mut h, s.address.as_bytes());
        put_bytes(&mut h, s.url.as_bytes());
    }
    h.update(b.signature_scheme.to_le_bytes());
    h.finalize().into()
}

/// What a forward link from `from` to `to` signs.
pub fn link_hash(from: &[u8; 32], to: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(from);
    h.update(to);
    h.finalize().into()
}

/// The chain a block belongs to: its genesis hash.
pub fn chain_id(b: &SkipBlock) -> Result<[u8; 32], String> {
    if b.index == 0 {
        hash32(&b.hash, "block hash")
    } else {
        hash32(&b.genesis, "genesis")
    }
}

// ---------------------------------------------------------------------------------------
// Rosters and signatures

/// Signatures needed out of `n`: `n − (n−1)/3`.
pub fn threshold(n: usize) -> usize {
    n - n.saturating_sub(1) / 3
}

/// The members' public keys, in roster order.
pub fn roster_keys(r: &Roster) -> Result<Vec<[u8; 32]>, String> {
    if r.list.is_empty() {
        return Err("the roster is empty".into());
    }
    if r.list.len() > MAX_ROSTER {
        return Err(format!(
            "the roster has {} servers; at most {MAX_ROSTER}",
            r.list.len()
        ));
    }
    let mut keys = Vec::with_capacity(r.list.len());
    for (i, s) in r.list.iter().enumerate() {
        let k = untag_point(&s.public)
            .ok_or_else(|| format!("roster server {i}: public key is not an Ed25519 point"))?;
        if keys.contains(&k) {
            return Err(format!(
                "roster server {i}: key {} appears twice",
                hex::encode(k)
            ));
        }
        crate::config::Address::parse(&s.address).map_err(|e| format!("roster server {i}: {e}"))?;
        keys.push(k);
    }
    Ok(keys)
}

/// A roster from a roster file's servers.
pub fn roster_from_config(r: &crate::config::Roster) -> Roster {
    let list: Vec<ServerIdentity> = r
        .servers
        .iter()
        .map(|s| ServerIdentity {
            public: crate::proto::tagged_point(&s.public),
            service_identities: Vec::new(),
            id: keys::server_identity_id(&s.public).to_vec(),
            address: s.address.to_string(),
            description: s.description.clone(),
            url: s.url.clone(),
        })
        .collect();
    let mut h = Sha256::new();
    for s in &r.servers {
        h.update(s.public);
    }
    let digest: [u8; 32] = h.finalize().into();
    Roster {
        id: digest[..16].to_vec(),
        list,
        aggregate: Vec::new(),
    }
}

/// The `ServerToml` a client uses to reach roster member `s`.
pub fn member_server(s: &ServerIdentity) -> Result<crate::config::ServerToml, String> {
    Ok(crate::config::ServerToml {
        address: crate::config::Address::parse(&s.address)?,
        public: untag_point(&s.public).ok_or("roster key is not an Ed25519 point")?,
        description: s.description.clone(),
        url: s.url.clone(),
        services: None,
    })
}

/// Whether two rosters name the same servers (keys, addresses, URLs) in the same order.
pub fn same_roster(a: &Roster, b: &Roster) -> bool {
    a.list.len() == b.list.len()
        && a.list.iter().zip(&b.list).all(|(x, y)| {
            untag_point(&x.public) == untag_point(&y.public)
                && x.address == y.address
                && x.url == y.url
        })
}

/// Combine `(member position, signature)` pairs into `sigs ‖ mask`.
pub fn combine_signatures(n: usize, mut sigs: Vec<(usize, [u8; 64])>) -> Vec<u8> {
    sigs.sort_by_key(|(i, _)| *i);
    sigs.dedup_by_key(|(i, _)| *i);
    let mut mask = vec![0u8; n.div_ceil(8)];
    let mut out = Vec::with_capacity(sigs.len() * 64 + mask.len());
    for (i, s) in &sigs {
        mask[i / 8] |= 1 << (i % 8);
        out.extend_from_slice(s);
    }
    out.extend_from_slice(&mask);
    out
}

/// Check a forward link from `from` (whose roster signs) to `to`.
pub fn verify_link(link: &ForwardLink, from: &SkipBlock, to: &[u8; 32]) -> Result<(), String> {
    let from_hash = hash32(&from.hash, "block hash")?;
    let roster = from.roster.as_ref().ok_or("block has no roster")?;
    verify_link_from(link, &from_hash, roster, to, None)
}

/// [`verify_link`] for a link leaving from block `from_hash` whose roster is `roster`.
/// `own`: the position of this node in `roster` and the signature it made itself of
/// this link's message (a follower keeps what it signed); a signature with exactly
/// those bytes at that position is valid, so it is not verified again. Every other
/// signature is.
pub fn verify_link_from(
    link: &ForwardLink,
    from_hash: &[u8; 32],
    roster: &Roster,
    to: &[u8; 32],
    own: Option<(usize, &[u8; 64])>,
) -> Result<(), String> {
    if link.from != from_hash {
        return Err("forward link does not start at its block".into());
    }
    if link.to != to {
        return Err(format!(
            "forward link points to {}, expected {}",
            short(&link.to),
            short(to)
        ));
    }
    if link.new_roster.is_some() {
        return Err("roster changes are not supported".into());
    }
    let sig = link
        .signature
        .as_ref()
        .ok_or("forward link has no signature")?;
    let msg = link_hash(from_hash, to);
    if sig.msg != msg {
        return Err("forward link signs another message than hash(from ‖ to)".into());
    }
    let keys = roster_keys(roster)?;
    let n = keys.len();
    let mask_len = n.div_ceil(8);
    if sig.sig.len() < mask_len {
        return Err("forward link signature is truncated".into());
    }
    let (sigs, mask) = sig.sig.split_at(sig.sig.len() - mask_len);
    let signers: Vec<usize> = (0..n)
        .filter(|i| mask[i / 8] & (1 << (i % 8)) != 0)
        .collect();
    if mask_len > 0 && (mask[mask_len - 1] as u32) >> (n - (mask_len - 1) * 8) != 0 {
        return Err("forward link signature names a signer outside the roster".into());
    }
    if sigs.len() != signers.len() * 64 {
        return Err(format!(
            "forward link signature has {} bytes of signatures for {} signers",
            sigs.len(),
            signers.len()
        ));
    }
    let need = threshold(n);
    if signers.len() < need {
        return Err(format!(
            "forward link has {} of {n} signatures; {need} needed",
            signers.len()
        ));
    }
    for (k, i) in signers.iter().enumerate() {
        let s = &sigs[k * 64..(k + 1) * 64];
        if own.is_some_and(|(p, o)| p == *i && o[..] == *s) {
            continue;
        }
        if !keys::verify(&keys[*i], &msg, s) {
            return Err(format!(
                "forward link: invalid signature of roster member {i} ({})",
                short(&keys[*i])
            ));
        }
    }
    Ok(())
}

/// A block's first bytes in hex, for messages.
pub fn short(b: &[u8]) -> String {
    hex::encode(&b[..b.len().min(8)])
}

// ---------------------------------------------------------------------------------------
// Skiplist arithmetic

/// `base^h`, or `None` past `u32`.
pub fn span(base: i32, h: u32) -> Option<u64> {
    (base as u64)
        .checked_pow(h)
        .filter(|s| *s <= u32::MAX as u64)
}

/// Height of block `index` in a chain of `base`/`max` heights.
pub fn height_of(index: u32, base: i32, max: i32) -> i32 {
    if index == 0 {
        return max;
    }
    let mut h = 1;
    while h < max {
        match span(base, h as u32) {
            Some(s) if (index as u64).is_multiple_of(s) => h += 1,
            _ => break,
        }
    }
    h
}

/// Index of the block that block `index` links back to at level `h`.
pub fn backlink_index(index: u32, base: i32, h: u32) -> Option<u32> {
    span(base, h)
        .and_then(|s| (index as u64).checked_sub(s))
        .map(|i| i as u32)
}

/// Index that a level-`h` forward link from block `index` points to.
pub fn forward_index(index: u32, base: i32, h: u32) -> Option<u32> {
    span(base, h)
        .map(|s| index as u64 + s)
        .filter(|i| *i <= u32::MAX as u64)
        .map(|i| i as u32)
}

/// Structural checks of a genesis block as received (not who sent it).
pub fn check_genesis(b: &SkipBlock) -> Result<[u8; 32], String> {
    if b.index != 0 || !b.genesis.is_empty() {
        return Err("a genesis block has index 0 and no genesis id".into());
    }
    check_common(b)?;
    if b.height != b.max_height {
        return Err("a genesis block's height must be its maximum height".into());
    }
    if b.backlinks.len() != 1 || b.backlinks[0].len() != 32 {
        return Err("a genesis block has one 32-byte random backlink".into());
    }
    check_hash(b)
}

fn check_common(b: &SkipBlock) -> Result<(), String> {
    if b.signature_scheme != SCHEME_ED25519 {
        return Err(format!(
            "signature scheme {} is not supported (this conode signs with Ed25519, scheme {SCHEME_ED25519})",
            b.signature_scheme
        ));
    }
    if !BASE_HEIGHTS.contains(&b.base_height) || !MAX_HEIGHTS.contains(&b.max_height) {
        return Err(format!(
            "base height {} / maximum height {} out of range ({}..={} / {}..={})",
            b.base_height,
            b.max_height,
            BASE_HEIGHTS.start(),
            BASE_HEIGHTS.end(),
            MAX_HEIGHTS.start(),
            MAX_HEIGHTS.end()
        ));
    }
    if b.data.len() > MAX_DATA {
        return Err(format!(
            "block data is {} bytes; the limit is {MAX_DATA}",
            b.data.len()
        ));
    }
    if !b.verifiers.is_empty() || b.payload.is_some() {
        return Err("verifiers and payload are not supported".into());
    }
    roster_keys(b.roster.as_ref().ok_or("block has no roster")?)?;
    Ok(())
}

fn check_hash(b: &SkipBlock) -> Result<[u8; 32], String> {
    let h = block_hash(b);
    if b.hash != h {
        return Err(format!(
            "block hash mismatch: it says {}, its contents hash to {}",
            short(&b.hash),
            short(&h)
        ));
    }
    Ok(h)
}

/// Check that `b` is a valid successor of `prev` given `backlink_hash(level) -> hash of
/// the block at index − base^level` from our own store. Signatures are checked elsewhere.
pub fn check_successor(
    prev: &SkipBlock,
    genesis: &[u8; 32],
    b: &SkipBlock,
    mut backlink_hash: impl FnMut(u32) -> Result<[u8; 32], String>,
) -> Result<[u8; 32], String> {
    if b.genesis != genesis {
        return Err("block belongs to another chain".into());
    }
    if b.index != prev.index + 1 {
        return Err(format!(
            "block index {} does not follow the latest block {}",
            b.index, prev.index
        ));
    }
    if (b.base_height, b.max_height) != (prev.base_height, prev.max_height) {
        return Err("block heights differ from the chain's".into());
    }
    check_common(b)?;
    let want = height_of(b.index as u32, b.base_height, b.max_height);
    if b.height != want {
        return Err(format!("block height is {}, must be {want}", b.height));
    }
    if b.backlinks.len() != want as usize {
        return Err(format!(
            "block has {} backlinks, must have {want}",
            b.backlinks.len()
        ));
    }
    for (h, link) in b.backlinks.iter().enumerate() {
        let expected = backlink_hash(h as u32)?;
        if link[..] != expected[..] {
            return Err(format!("wrong backlink at level {h}"));
        }
    }
    let (Some(pr), Some(r)) = (&prev.roster, &b.roster) else {
        return Err("block has no roster".into());
    };
    if !same_roster(pr, r) {
        return Err("roster changes are not supported".into());
    }
    check_hash(b)
}

/// Encode a block for storage: without forward links.
pub fn encode_stored(b: &SkipBlock) -> Vec<u8> {
    if b.forward.is_empty() {
        return b.encode_to_vec();
    }
    let mut c = b.clone();
    c.forward.clear();
    c.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyPair;

    fn roster(keys: &[KeyPair]) -> Roster {
        Roster {
            id: vec![],
            list: keys
                .iter()
                .enumerate()
                .map(|(i, k)| ServerIdentity {
                    public: crate::proto::tagged_point(&k.public_bytes()),
                    address: format!("tls://127.0.0.1:{}", 7000 + i),
                    ..Default::default()
                })
                .collect(),
            aggregate: vec![],
        }
    }

    fn block(keys: &[KeyPair]) -> SkipBlock {
        let mut b = SkipBlock {
            index: 0,
            height: 4,
            max_height: 4,
            base_height: 4,
            backlinks: vec![vec![7; 32]],
            data: b"hello".to_vec(),
            roster: Some(roster(keys)),
            signature_scheme: SCHEME_ED25519,
            ..Default::default()
        };
        b.hash = block_hash(&b).to_vec();
        b
    }

    #[test]
    fn threshold_is_n_minus_a_third() {
        let t: Vec<usize> = (1..=10).map(threshold).collect();
        assert_eq!(t, vec![1, 2, 3, 3, 4, 5, 5, 6, 7, 7]);
    }

    #[test]
    fn heights_and_links_follow_the_skiplist() {
        let h: Vec<i32> = (0..17).map(|i| height_of(i, 4, 3)).collect();
        assert_eq!(h, vec![3, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 3]);
        assert_eq!(backlink_index(16, 4, 2), Some(0));
        assert_eq!(backlink_index(16, 4, 1), Some(12));
        assert_eq!(forward_index(12, 4, 1), Some(16));
        assert_eq!(height_of(u32::MAX - 1, 256, 32), 1);
        assert_eq!(span(256, 5), None);
    }

    #[test]
    fn the_hash_covers_data_roster_addresses_and_order() {
        let keys: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate().unwrap()).collect();
        let b = block(&keys);
        check_genesis(&b).unwrap();
        let mut c = b.clone();
        c.data.push(0);
        assert!(check_genesis(&c).unwrap_err().contains("hash mismatch"));
        let mut c = b.clone();
        c.roster.as_mut().unwrap().list[0].address = "tls://10.0.0.1:1".into();
        assert!(check_genesis(&c).unwrap_err().contains("hash mismatch"));
        // Moving bytes from data into a backlink changes the hash (lengths are hashed).
        let mut c = b.clone();
        c.backlinks[0].push(b'h');
        c.data.remove(0);
        assert_ne!(block_hash(&c), block_hash(&b));
    }

    fn link(keys: &[KeyPair], signers: &[usize], from: &SkipBlock, to: [u8; 32]) -> ForwardLink {
        let f = hash32(&from.hash, "").unwrap();
        let msg = link_hash(&f, &to);
        let sigs = signers.iter().map(|i| (*i, keys[*i].sign(&msg))).collect();
        ForwardLink {
            from: f.to_vec(),
            to: to.to_vec(),
            new_roster: None,
            signature: Some(ByzcoinSig {
                msg: msg.to_vec(),
                sig: combine_signatures(keys.len(), sigs),
            }),
        }
    }

    #[test]
    fn forward_links_need_the_threshold_of_valid_member_signatures() {
        let keys: Vec<KeyPair> = (0..4).map(|_| KeyPair::generate().unwrap()).collect();
        let b = block(&keys);
        let to = [9u8; 32];
        verify_link(&link(&keys, &[0, 1, 2], &b, to), &b, &to).unwrap();
        verify_link(&link(&keys, &[0, 1, 2, 3], &b, to), &b, &to).unwrap();
        let e = verify_link(&link(&keys, &[0, 3], &b, to), &b, &to).unwrap_err();
        assert!(e.contains("2 of 4 signatures; 3 needed"), "{e}");
        // A non-member signs in member 2's place.
        let mut other = keys.clone();
        other[2] = KeyPair::generate().unwrap();
        let e = verify_link(&link(&other, &[0, 1, 2], &b, to), &b, &to).unwrap_err();
        assert!(e.contains("invalid signature of roster member 2"), "{e}");
        // A flipped bit in a signature.
        let mut l = link(&keys, &[0, 1, 2], &b, to);
        l.signature.as_mut().unwrap().sig[5] ^= 1;
        assert!(verify_link(&l, &b, &to)
            .unwrap_err()
            .contains("invalid signature"));
        // No signature, the wrong target, a mask bit past the roster.
        let mut l = link(&keys, &[0, 1, 2], &b, to);
        l.signature = None;
        assert!(verify_link(&l, &b, &to)
            .unwrap_err()
            .contains("no signature"));
        let l = link(&keys, &[0, 1, 2], &b, to);
        assert!(verify_link(&l, &b, &[8; 32])
            .unwrap_err()
            .contains("points to"));
        let mut l = link(&keys, &[0, 1, 2], &b, to);
        let n = l.signature.as_ref().unwrap().sig.len();
        l.signature.as_mut().unwrap().sig[n - 1] |= 0x80;
        assert!(verify_link(&l, &b, &to).is_err());
    }

    #[test]
    fn a_signature_the_node_made_itself_is_trusted_only_byte_for_byte_at_its_position() {
        let keys: Vec<KeyPair> = (0..4).map(|_| KeyPair::generate().unwrap()).collect();
        let b = block(&keys);
        let from = hash32(&b.hash, "").unwrap();
        let r = b.roster.as_ref().unwrap();
        let to = [9u8; 32];
        let good = link(&keys, &[0, 1, 2], &b, to);
        let mine: [u8; 64] = good.signature.as_ref().unwrap().sig[64..128]
            .try_into()
            .unwrap();
        verify_link_from(&good, &from, r, &to, Some((1, &mine))).unwrap();
        // Member 1's signature replaced by garbage that this node claims as its own at
        // another position, or that differs from what it signed: verified, and refused.
        let mut bad = good.clone();
        bad.signature.as_mut().unwrap().sig[64..128].copy_from_slice(&[7; 64]);
        let junk = [7u8; 64];
        let e = verify_link_from(&bad, &from, r, &to, Some((2, &junk))).unwrap_err();
        assert!(e.contains("invalid signature of roster member 1"), "{e}");
        let e = verify_link_from(&bad, &from, r, &to, Some((1, &mine))).unwrap_err();
        assert!(e.contains("invalid signature of roster member 1"), "{e}");
        // Member 1's own signature stands in for nobody else's.
        let e = verify_link_from(&good, &from, r, &[8; 32], Some((1, &mine))).unwrap_err();
        assert!(e.contains("points to"), "{e}");
    }
}
