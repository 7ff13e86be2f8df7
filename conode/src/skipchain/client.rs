//! The client side of the skipchain service (over the WebSocket), as `conode chain` and
//! the tests use it. Everything a server returns is verified here: block hashes, and
//! the signed forward links between consecutive blocks of an update chain.

use prost::Message;

use super::block::{
    self, GetAllSkipChainIDsReply, GetSingleBlock, GetSingleBlockByIndex,
    GetSingleBlockByIndexReply, GetUpdateChain, GetUpdateChainReply, Roster, SkipBlock,
    StoreSkipBlock, StoreSkipBlockReply,
};
use crate::client::call;
use crate::config::ServerToml;

async fn request<R: Message + Default>(
    server: &ServerToml,
    method: &str,
    body: impl Message,
) -> Result<R, String> {
    let reply = call(server, "Skipchain", method, body.encode_to_vec()).await?;
    R::decode(&reply[..]).map_err(|e| format!("invalid {method} reply: {e}"))
}

fn checked(b: SkipBlock) -> Result<SkipBlock, String> {
    let h = block::block_hash(&b);
    if b.hash != h {
        return Err(format!(
            "the server returned block {} whose hash does not match its contents",
            b.index
        ));
    }
    Ok(b)
}

/// Create a chain led by `roster[0]` (the request goes to it). Zero heights mean the
/// defaults.
pub async fn create(
    roster: Roster,
    data: Vec<u8>,
    base_height: i32,
    max_height: i32,
) -> Result<SkipBlock, String> {
    let leader = block::member_server(roster.list.first().ok_or("the roster is empty")?)?;
    let req = StoreSkipBlock {
        target_skip_chain_id: Vec::new(),
        new_block: Some(SkipBlock {
            base_height,
            max_height,
            data,
            roster: Some(roster),
            ..Default::default()
        }),
        signature: None,
    };
    let r: StoreSkipBlockReply = request(&leader, "StoreSkipBlock", req).await?;
    checked(r.latest.ok_or("the reply has no block")?)
}

/// Append `data` to the chain of block `target`, sending it to `leader`.
pub async fn append(
    leader: &ServerToml,
    target: &[u8],
    data: Vec<u8>,
) -> Result<StoreSkipBlockReply, String> {
    let req = StoreSkipBlock {
        target_skip_chain_id: target.to_vec(),
        new_block: Some(SkipBlock {
            data,
            ..Default::default()
        }),
        signature: None,
    };
    let r: StoreSkipBlockReply = request(leader, "StoreSkipBlock", req).await?;
    let latest = checked(r.latest.clone().ok_or("the reply has no block")?)?;
    if let Some(prev) = &r.previous {
        let prev = checked(prev.clone())?;
        let link = prev
            .forward
            .first()
            .ok_or("the previous block has no forward link")?;
        block::verify_link(link, &prev, &block::hash32(&latest.hash, "hash")?)?;
    }
    Ok(r)
}

pub async fn get_block(server: &ServerToml, id: &[u8]) -> Result<SkipBlock, String> {
    let b: SkipBlock =
        request(server, "GetSingleBlock", GetSingleBlock { id: id.to_vec() }).await?;
    checked(b)
}

pub async fn get_by_index(
    server: &ServerToml,
    genesis: &[u8],
    index: i32,
) -> Result<SkipBlock, String> {
    let r: GetSingleBlockByIndexReply = request(
        server,
        "GetSingleBlockByIndex",
        GetSingleBlockByIndex {
            genesis: genesis.to_vec(),
            index,
        },
    )
    .await?;
    let b = checked(r.skipblock.ok_or("the reply has no block")?)?;
    if b.index != index || block::chain_id(&b)?[..] != genesis[..] {
        return Err(format!(
            "the server returned block {} of another chain or index",
            b.index
        ));
    }
    // The links lead from the genesis to the block, each signed by the roster.
    let g = get_block(server, genesis).await?;
    let mut from = g.clone();
    for l in &r.links {
        if l.from != from.hash {
            return Err("the proof links do not form a path from the genesis".into());
        }
        let to = block::hash32(&l.to, "link target")?;
        block::verify_link(l, &from, &to)?;
        // Rosters cannot change, so the next link is signed by the same roster.
        from = SkipBlock {
            hash: l.to.clone(),
            roster: g.roster.clone(),
            ..Default::default()
        };
    }
    if from.hash != b.hash {
        return Err("the proof links do not lead to the returned block".into());
    }
    Ok(b)
}

pub async fn chain_ids(server: &ServerToml) -> Result<Vec<Vec<u8>>, String> {
    let r: GetAllSkipChainIDsReply =
        request(server, "GetAllSkipChainIDs", block::GetAllSkipChainIDs {}).await?;
    Ok(r.skip_chain_ids)
}

/// The blocks from `from` to the latest, along the longest forward links, each verified
/// against the previous one (hash, and a forward link signed by the threshold of the
/// previous block's roster).
pub async fn update_chain(server: &ServerToml, from: &[u8]) -> Result<Vec<SkipBlock>, String> {
    let mut out: Vec<SkipBlock> = Vec::new();
    let mut next = from.to_vec();
    loop {
        let r: GetUpdateChainReply = request(
            server,
            "GetUpdateChain",
            GetUpdateChain {
                latest_id: next.clone(),
                max_height: Some(0),
                max_blocks: None,
            },
        )
        .await?;
        let mut got = 0;
        for b in r.update {
            let b = checked(b)?;
            if let Some(prev) = out.last() {
                if prev.hash == b.hash {
                    continue;
                }
                verify_step(prev, &b)?;
            } else if b.hash != from {
                return Err("the update chain does not start at the requested block".into());
            }
            out.push(b);
            got += 1;
        }
        let last = out.last().ok_or("empty update chain")?;
        if got == 0 || last.forward.is_empty() {
            return Ok(out);
        }
        next = last.hash.clone();
    }
}

/// `b` follows `prev` through one of `prev`'s signed forward links.
pub fn verify_step(prev: &SkipBlock, b: &SkipBlock) -> Result<(), String> {
    let to = block::hash32(&b.hash, "hash")?;
    let link = prev
        .forward
        .iter()
        .find(|l| l.to == b.hash)
        .ok_or_else(|| {
            format!(
                "block {} has no forward link to block {}",
                prev.index, b.index
            )
        })?;
    block::verify_link(link, prev, &to)
}
