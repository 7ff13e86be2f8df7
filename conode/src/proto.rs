//! Client wire messages (protobuf), one place for their field numbers.
//!
//! Numbers and labels follow cothority's `external/proto/{status,onet,network}.proto`,
//! which is what the Go conode emits and what the `@dedis/cothority` JavaScript client
//! decodes (with protobufjs, which enforces `required`). So: fields the JS client marks
//! `required` are always emitted, even when empty, and points carry the 8-byte suite tag
//! `ed.point` before their 32 bytes. `ServerIdentity.url` is always emitted too, as the Go
//! encoder does for non-pointer fields. Maps are `BTreeMap`s so our encoding is stable.

use std::collections::BTreeMap;

/// The 8-byte tag kyber puts before a marshalled Ed25519 point.
pub const ED_POINT_TAG: &[u8; 8] = b"ed.point";

/// `status.Request`: empty.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}

/// `status.Response`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusResponse {
    #[prost(btree_map = "string, message", tag = "1")]
    pub status: BTreeMap<String, Status>,
    #[prost(message, optional, tag = "2")]
    pub serveridentity: Option<ServerIdentity>,
}

/// `onet.Status`: one section of key/value strings.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    #[prost(btree_map = "string, string", tag = "1")]
    pub field: BTreeMap<String, String>,
}

/// `network.ServerIdentity` (6 is Go's unexported private key: never on the wire).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServerIdentity {
    #[prost(bytes = "vec", required, tag = "1")]
    pub public: Vec<u8>,
    #[prost(message, repeated, tag = "2")]
    pub service_identities: Vec<ServiceIdentity>,
    #[prost(bytes = "vec", required, tag = "3")]
    pub id: Vec<u8>,
    #[prost(string, required, tag = "4")]
    pub address: String,
    #[prost(string, required, tag = "5")]
    pub description: String,
    #[prost(string, required, tag = "7")]
    pub url: String,
}

/// `network.ServiceIdentity`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ServiceIdentity {
    #[prost(string, required, tag = "1")]
    pub name: String,
    #[prost(string, required, tag = "2")]
    pub suite: String,
    #[prost(bytes = "vec", required, tag = "3")]
    pub public: Vec<u8>,
}

/// Tag a 32-byte Ed25519 point as kyber does.
pub fn tagged_point(p: &[u8; 32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(40);
    v.extend_from_slice(ED_POINT_TAG);
    v.extend_from_slice(p);
    v
}

/// Read a point that may or may not carry the `ed.point` tag (Go accepts both).
pub fn untag_point(b: &[u8]) -> Option<[u8; 32]> {
    let raw = match b.len() {
        40 if b.starts_with(ED_POINT_TAG) => &b[8..],
        32 => b,
        _ => return None,
    };
    raw.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn required_fields_are_emitted_even_when_empty() {
        let si = ServerIdentity::default();
        let bytes = si.encode_to_vec();
        // public(1), id(3), address(4), description(5), url(7): all length-delimited, empty.
        assert_eq!(bytes, vec![0x0a, 0, 0x1a, 0, 0x22, 0, 0x2a, 0, 0x3a, 0]);
    }

    #[test]
    fn status_response_layout_matches_go() {
        let mut r = StatusResponse::default();
        let mut s = Status::default();
        s.field.insert("version".into(), "v".into());
        r.status.insert("Conode".into(), s);
        let b = r.encode_to_vec();
        // 0a <len> { 0a 06 "Conode" 12 <len> { 0a <len> {0a 07 "version" 12 01 "v"} } }
        assert_eq!(&b[..4], &[0x0a, 0x18, 0x0a, 0x06]);
        assert_eq!(StatusResponse::decode(&b[..]).unwrap(), r);
    }
}
