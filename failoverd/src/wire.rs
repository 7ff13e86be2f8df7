//! The failover core's peer messages ([`failoverd_core::PeerMessage`]) on the wire: JSON
//! in the body of `POST /v1/core` on the pinned-TLS peer port.
//!
//! ```json
//! {"epoch":7,"live":true,"may_hold":true,"newest_generation":12,
//!  "body":{"kind":"handover","generation":12}}
//! ```
//! `body.kind` is one of `heartbeat`, `handover_request` (`ask`), `handover`
//! (`generation`), `handover_ack` (`from_epoch`), `refused` (`of`: `handover_request`,
//! `handover` or `message`, `request_epoch`, `reason`). Unknown kinds and missing fields
//! are refused by [`decode`]; this module never decides anything about what a message
//! means.

use failoverd_core::{Body, PeerMessage, Refusal};
use serde_json::{json, Value};

/// Largest message accepted (a refusal's reason is the only free text).
pub const MAX_MESSAGE: u64 = 16 << 10;

/// The JSON form of `m`.
pub fn encode(m: &PeerMessage) -> Vec<u8> {
    let body = match &m.body {
        Body::Heartbeat => json!({"kind": "heartbeat"}),
        Body::HandoverRequest { ask } => json!({"kind": "handover_request", "ask": ask}),
        Body::Handover { generation } => json!({"kind": "handover", "generation": generation}),
        Body::HandoverAck { from_epoch } => {
            json!({"kind": "handover_ack", "from_epoch": from_epoch})
        }
        Body::Refused {
            of,
            request_epoch,
            reason,
        } => json!({
            "kind": "refused",
            "of": match of {
                Refusal::HandoverRequest => "handover_request",
                Refusal::Handover => "handover",
                Refusal::Message => "message",
            },
            "request_epoch": request_epoch,
            "reason": reason,
        }),
    };
    json!({
        "epoch": m.epoch,
        "live": m.live,
        "may_hold": m.may_hold,
        "newest_generation": m.newest_generation,
        "body": body,
    })
    .to_string()
    .into_bytes()
}

/// Parse a message, refusing anything that is not exactly what [`encode`] writes.
pub fn decode(bytes: &[u8]) -> Result<PeerMessage, String> {
    if bytes.len() as u64 > MAX_MESSAGE {
        return Err(format!(
            "a peer message of {} bytes is over the {MAX_MESSAGE} accepted",
            bytes.len()
        ));
    }
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("a peer message is not JSON: {e}"))?;
    let u64_at = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("a peer message lacks the number {k:?}"))
    };
    let bool_at = |k: &str| {
        v.get(k)
            .and_then(Value::as_bool)
            .ok_or_else(|| format!("a peer message lacks the flag {k:?}"))
    };
    let newest_generation = match v.get("newest_generation") {
        None | Some(Value::Null) => None,
        Some(g) => Some(
            g.as_u64()
                .ok_or("a peer message's newest_generation is not a number")?,
        ),
    };
    let b = v.get("body").ok_or("a peer message has no body")?;
    let body = match b.get("kind").and_then(Value::as_str) {
        Some("heartbeat") => Body::Heartbeat,
        Some("handover_request") => Body::HandoverRequest {
            ask: u64_at(b, "ask")?,
        },
        Some("handover") => Body::Handover {
            generation: u64_at(b, "generation")?,
        },
        Some("handover_ack") => Body::HandoverAck {
            from_epoch: u64_at(b, "from_epoch")?,
        },
        Some("refused") => Body::Refused {
            of: match b.get("of").and_then(Value::as_str) {
                Some("handover_request") => Refusal::HandoverRequest,
                Some("handover") => Refusal::Handover,
                Some("message") => Refusal::Message,
                other => return Err(format!("a refusal of an unknown message {other:?}")),
            },
            request_epoch: u64_at(b, "request_epoch")?,
            reason: b
                .get("reason")
                .and_then(Value::as_str)
                .ok_or("a refusal without a reason")?
                .chars()
                .take(512)
                .collect(),
        },
        other => return Err(format!("a peer message of unknown kind {other:?}")),
    };
    Ok(PeerMessage {
        epoch: u64_at(&v, "epoch")?,
        live: bool_at("live")?,
        may_hold: bool_at("may_hold")?,
        newest_generation,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips() {
        let bodies = [
            Body::Heartbeat,
            Body::HandoverRequest { ask: 3 },
            Body::Handover { generation: 12 },
            Body::HandoverAck { from_epoch: 7 },
            Body::Refused {
                of: Refusal::Handover,
                request_epoch: 4,
                reason: "stale epoch 4 < 7".into(),
            },
            Body::Refused {
                of: Refusal::HandoverRequest,
                request_epoch: 9,
                reason: "busy".into(),
            },
            Body::Refused {
                of: Refusal::Message,
                request_epoch: u64::MAX,
                reason: "future epoch".into(),
            },
        ];
        for (i, body) in bodies.into_iter().enumerate() {
            let m = PeerMessage {
                epoch: i as u64 + 1,
                live: i % 2 == 0,
                may_hold: i % 3 == 0,
                newest_generation: (i > 2).then_some(i as u64 * 10),
                body,
            };
            assert_eq!(decode(&encode(&m)).unwrap(), m);
        }
    }

    #[test]
    fn garbage_and_half_messages_are_refused() {
        for bad in [
            &b"not json"[..],
            br#"{}"#,
            br#"{"epoch":1,"live":true,"may_hold":false,"body":{"kind":"takeover"}}"#,
            br#"{"epoch":-1,"live":true,"may_hold":false,"body":{"kind":"heartbeat"}}"#,
            br#"{"epoch":1,"live":"yes","may_hold":false,"body":{"kind":"heartbeat"}}"#,
            br#"{"epoch":1,"live":true,"may_hold":false,"body":{"kind":"handover"}}"#,
            br#"{"epoch":1,"live":true,"may_hold":false,"newest_generation":"9","body":{"kind":"heartbeat"}}"#,
        ] {
            assert!(decode(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(decode(&vec![b' '; MAX_MESSAGE as usize + 1]).is_err());
    }
}
