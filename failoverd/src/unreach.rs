//! Tell the clients whose connection attempts still come to this host, after it gave
//! the virtual IP up, that the address is not here, so that they try again at once
//! instead of a second later.
//!
//! When the VIP moves, the clients' ARP and neighbour caches keep pointing at the old
//! holder's MAC until the new holder's gratuitous ARP (IPv6: unsolicited Neighbour
//! Advertisement) reaches them: a few hundred milliseconds after the old holder let go
//! (the new holder probes, adds the address, then announces). A TCP SYN sent in that
//! gap arrives here, for an address this host no longer has. With forwarding off, Linux
//! drops it without a word, and the client waits for TCP's first SYN retransmission,
//! one second later (RFC 6298's initial RTO): a lost second for every connection
//! opened during the switch.
//!
//! [`answer_strays`] closes that gap. For a `window` after the VIP was removed, it reads
//! the IP frames that arrive on the VIP's interface and answers each TCP SYN for the
//! VIP with an ICMP Destination Unreachable: IPv4 type 3 code 1 (host unreachable,
//! RFC 792), IPv6 type 1 code 3 (address unreachable, RFC 4443). The answer goes to the
//! MAC the SYN came from, from this host's own address on the interface
//! ([`Vip::own_address`]), never from the VIP. Linux aborts a connection in SYN-SENT
//! on such an error (`connect()` fails with EHOSTUNREACH, at once), so the client can
//! retry at once, and reaches the new holder as soon as the announcement has moved its
//! cache. Only SYNs are answered: an established connection takes these errors as soft
//! and goes on retransmitting (the new holder resets it), so answering them would only
//! add traffic.
//!
//! Two halves, like [`crate::arp`]:
//! - pure functions that recognise a stray SYN ([`parse_stray_v4`], [`parse_stray_v6`])
//!   and build the answer ([`host_unreachable_v4`], [`address_unreachable_v6`]),
//!   unit-tested below with bytes checked by hand;
//! - [`answer_strays`], the IO shell: one [`PacketSocket`] for the VIP's family, every
//!   read bounded by the window, at most [`MAX_ANSWERS`] answers per [`RATE_PERIOD`].
//!
//! It must never speak for the VIP: it sends only from this host's own address, and
//! refuses to start while the VIP is on the interface (the caller starts it right after
//! [`Vip::remove`] and must stop it, by dropping the future, before adding the VIP back
//! to this host: once the address is here, the kernel answers and an ICMP error from us
//! would kill a good connection). It never runs past its window, never decides
//! anything, and trusts nothing it reads: short or malformed packets are skipped, never
//! unwrapped. IPv6 packets with extension headers are not answered (their clients wait
//! as before).
//!
//! Only frames sent to this host's own MAC are answered: a SYN that reaches this host
//! although it was sent to another host's MAC (a promiscuous interface, a switch that
//! floods a MAC it has not learned) is the new holder's to answer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::arp::{self, PacketSocket, ETH_P_IP, ETH_P_IPV6, IPV6_HEADER_LEN};
use crate::vip::Vip;

/// Most answers sent in one [`RATE_PERIOD`]; stray SYNs beyond it are not answered
/// (their clients wait for the retransmission as before). Bounds what a flood of SYNs
/// (or a client retrying in a tight loop) can make this host send.
pub const MAX_ANSWERS: u32 = 100;
/// The period [`MAX_ANSWERS`] is counted over.
pub const RATE_PERIOD: Duration = Duration::from_millis(100);

/// The IPv6 minimum MTU (RFC 8200 §5): an ICMPv6 error quotes as much of the packet as
/// fits in it (RFC 4443 §2.4 (c)).
pub const IPV6_MIN_MTU: usize = 1280;

/// ICMPv4 type Destination Unreachable.
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMPv4 Destination Unreachable code "host unreachable" (EHOSTUNREACH on Linux).
pub const ICMP_HOST_UNREACH: u8 = 1;
/// ICMPv6 type Destination Unreachable.
pub const ICMPV6_DEST_UNREACH: u8 = 1;
/// ICMPv6 Destination Unreachable code "address unreachable" (EHOSTUNREACH on Linux).
pub const ICMPV6_ADDR_UNREACH: u8 = 3;

/// Hop limit (TTL) of the answers.
const HOP_LIMIT: u8 = 64;
/// IPv4 TOS of the answers: precedence "internetwork control", as Linux marks its own
/// ICMP errors.
const TOS_INTERNETWORK_CONTROL: u8 = 0xc0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMPV6: u8 = 58;
/// Length of an IPv4 header without options.
const IPV4_HEADER_LEN: usize = 20;
/// Length of a TCP header without options.
const TCP_HEADER_LEN: usize = 20;
/// Length of the ICMP header (type, code, checksum, 4 unused bytes) before the quote.
const ICMP_HEADER_LEN: usize = 8;
/// RFC 792: an ICMPv4 error quotes the IP header and this much of what follows it.
const ICMPV4_QUOTED_PAYLOAD: usize = 8;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A connection attempt (a TCP SYN) for the VIP that came to this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stray<'a, A> {
    /// The client: the SYN's source address.
    pub src: A,
    /// The client's port.
    pub src_port: u16,
    /// The port it tried on the VIP.
    pub dst_port: u16,
    /// The whole IP packet, cut to the length its header gives (link padding dropped):
    /// what the answer quotes.
    pub packet: &'a [u8],
}

/// The stray SYN in `packet` (an IPv4 packet, Ethernet header stripped): a TCP segment
/// to `vip` with SYN set and ACK, RST and FIN clear, from a unicast source. `None` for
/// anything else: short, not version 4, a bad header length or checksum, a fragment
/// other than the first.
pub fn parse_stray_v4(packet: &[u8], vip: Ipv4Addr) -> Option<Stray<'_, Ipv4Addr>> {
    let h = packet.get(..IPV4_HEADER_LEN)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if h[0] >> 4 != 4 || ihl < IPV4_HEADER_LEN {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if total < ihl {
        return None;
    }
    let packet = packet.get(..total)?;
    if checksum(packet.get(..ihl)?) != 0 {
        return None;
    }
    // Only the first fragment (offset 0) carries the TCP header.
    let fragment_offset = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    if fragment_offset != 0 || h[9] != IPPROTO_TCP {
        return None;
    }
    let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
    let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
    // RFC 1812 §4.3.2.7: no ICMP error to a source that is not one host.
    let one_host = !(src.is_unspecified()
        || src.is_loopback()
        || src.is_multicast()
        || src.octets()[0] >= 240);
    if dst != vip || !one_host {
        return None;
    }
    let (src_port, dst_port) = tcp_syn(packet.get(ihl..)?)?;
    Some(Stray {
        src,
        src_port,
        dst_port,
        packet,
    })
}

/// The stray SYN in `packet` (an IPv6 packet, Ethernet header stripped): TCP directly
/// after the fixed header, to `vip`, SYN set and ACK, RST and FIN clear, from a unicast
/// source. `None` for anything else, including packets with extension headers.
pub fn parse_stray_v6(packet: &[u8], vip: Ipv6Addr) -> Option<Stray<'_, Ipv6Addr>> {
    let h = packet.get(..IPV6_HEADER_LEN)?;
    if h[0] >> 4 != 6 || h[6] != IPPROTO_TCP {
        return None;
    }
    let total = IPV6_HEADER_LEN + usize::from(u16::from_be_bytes([h[4], h[5]]));
    let packet = packet.get(..total)?;
    let addr = |b: &[u8]| -> Option<Ipv6Addr> {
        let o: [u8; 16] = b.try_into().ok()?;
        Some(Ipv6Addr::from(o))
    };
    let src = addr(h.get(8..24)?)?;
    let dst = addr(h.get(24..40)?)?;
    // RFC 4443 §2.4 (e): no error to a source that does not name one node.
    if dst != vip || src.is_unspecified() || src.is_loopback() || src.is_multicast() {
        return None;
    }
    let (src_port, dst_port) = tcp_syn(packet.get(IPV6_HEADER_LEN..)?)?;
    Some(Stray {
        src,
        src_port,
        dst_port,
        packet,
    })
}

/// The ports of `tcp` if it is a whole TCP header (data offset within the segment) of
/// a connection attempt: SYN set, ACK, RST and FIN clear.
fn tcp_syn(tcp: &[u8]) -> Option<(u16, u16)> {
    let t = tcp.get(..TCP_HEADER_LEN)?;
    let data_offset = usize::from(t[12] >> 4) * 4;
    if data_offset < TCP_HEADER_LEN || data_offset > tcp.len() {
        return None;
    }
    if t[13] & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) != TCP_SYN {
        return None;
    }
    Some((
        u16::from_be_bytes([t[0], t[1]]),
        u16::from_be_bytes([t[2], t[3]]),
    ))
}

/// The IPv4 packet that answers `stray` with ICMP host unreachable, from `src` (this
/// host's own address, never the VIP) to the stray's source: TTL 64, Don't Fragment,
/// both checksums filled in; the ICMP body quotes the stray's IP header and the first
/// 8 bytes after it (RFC 792: its ports and sequence number, which the client's kernel
/// matches to its connection).
pub fn host_unreachable_v4(src: Ipv4Addr, stray: &Stray<'_, Ipv4Addr>) -> Vec<u8> {
    let p = stray.packet;
    let ihl = p
        .first()
        .map_or(IPV4_HEADER_LEN, |b| usize::from(b & 0x0f) * 4);
    let quoted = p.get(..ihl + ICMPV4_QUOTED_PAYLOAD).unwrap_or(p);
    let mut icmp = vec![ICMP_DEST_UNREACH, ICMP_HOST_UNREACH, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(quoted);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    // At most 20 + 8 + 60 + 8 bytes: far below 64 KiB.
    let total = (IPV4_HEADER_LEN + icmp.len()) as u16;
    let mut ip = Vec::with_capacity(usize::from(total));
    ip.extend_from_slice(&[0x45, TOS_INTERNETWORK_CONTROL]);
    ip.extend_from_slice(&total.to_be_bytes());
    // Identification 0 and Don't Fragment (RFC 6864: an atomic datagram).
    ip.extend_from_slice(&[0, 0, 0x40, 0]);
    ip.extend_from_slice(&[HOP_LIMIT, IPPROTO_ICMP, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&stray.src.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ip
}

/// The IPv6 packet that answers `stray` with ICMPv6 address unreachable, from `src`
/// (this host's own address, never the VIP) to the stray's source: hop limit 64; the
/// body quotes as much of the stray as fits in [`IPV6_MIN_MTU`] bytes in all (RFC 4443
/// §3.1); the checksum covers the pseudo-header.
pub fn address_unreachable_v6(src: Ipv6Addr, stray: &Stray<'_, Ipv6Addr>) -> Vec<u8> {
    let room = IPV6_MIN_MTU - IPV6_HEADER_LEN - ICMP_HEADER_LEN;
    let quoted = stray.packet.get(..room).unwrap_or(stray.packet);
    let mut icmp = vec![ICMPV6_DEST_UNREACH, ICMPV6_ADDR_UNREACH, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(quoted);
    let sum = arp::icmpv6_checksum(src, stray.src, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut p = Vec::with_capacity(IPV6_HEADER_LEN + icmp.len());
    p.extend_from_slice(&0x6000_0000u32.to_be_bytes());
    // At most 1240 bytes.
    p.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    p.extend_from_slice(&[IPPROTO_ICMPV6, HOP_LIMIT]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&stray.src.octets());
    p.extend_from_slice(&icmp);
    p
}

/// The Internet checksum (RFC 1071) of `bytes`; 0 over a header whose checksum is right.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    for c in bytes.chunks(2) {
        let w = match c {
            [a, b] => u16::from_be_bytes([*a, *b]),
            [a] => u16::from_be_bytes([*a, 0]),
            _ => 0,
        };
        sum += u64::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The answer to `packet` (an IP packet of the VIP's family) if it is a stray SYN for
/// `vip`, with the client it goes to; `None` otherwise, or if `own` is not of `vip`'s
/// family.
fn answer_to(packet: &[u8], vip: IpAddr, own: IpAddr) -> Option<(Vec<u8>, SocketAddr)> {
    match (vip, own) {
        (IpAddr::V4(vip), IpAddr::V4(own)) => {
            let s = parse_stray_v4(packet, vip)?;
            let client = SocketAddr::from((s.src, s.src_port));
            Some((host_unreachable_v4(own, &s), client))
        }
        (IpAddr::V6(vip), IpAddr::V6(own)) => {
            let s = parse_stray_v6(packet, vip)?;
            let client = SocketAddr::from((s.src, s.src_port));
            Some((address_unreachable_v6(own, &s), client))
        }
        _ => None,
    }
}

/// [`MAX_ANSWERS`] per [`RATE_PERIOD`], counted over fixed periods that start at the
/// first answer after the previous period ended.
#[derive(Debug)]
struct Budget {
    start: Instant,
    used: u32,
}

impl Budget {
    fn new(now: Instant) -> Budget {
        Budget {
            start: now,
            used: 0,
        }
    }

    /// Whether one more answer may go at `now` (and count it if so).
    fn take(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.start) >= RATE_PERIOD {
            *self = Budget::new(now);
        }
        if self.used < MAX_ANSWERS {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

/// What [`answer_strays`] did.
#[derive(Debug, Default)]
struct Tally {
    answered: u64,
    over_limit: u64,
}

/// For `window` from now, answer every TCP SYN for the VIP that reaches this host with
/// ICMP host unreachable (IPv6: address unreachable), from this host's own address on
/// the VIP's interface, to the MAC the SYN came from. Call it right after
/// [`Vip::remove`]; drop the future before adding the VIP back to this host. Returns
/// how many it answered; ends by itself when the window has passed.
///
/// At most [`MAX_ANSWERS`] per [`RATE_PERIOD`]; the rest are counted and not answered.
/// Without an address of its own on the interface it answers nothing: `Ok(0)` and a
/// warning. `Err` (one line) if the VIP is still on the interface, or netlink or the
/// packet socket fails (e.g. without CAP_NET_RAW).
pub async fn answer_strays(vip: &Vip, window: Duration) -> Result<u64, String> {
    let opened = open(vip).await;
    answer_opened(vip, opened, window).await
}

/// A packet socket open for the VIP's connection attempts, and the address to answer from
/// ([`open`]): opened before the address is removed, it misses no attempt that comes
/// right after the removal.
pub struct Opened {
    own: IpAddr,
    sock: PacketSocket,
}

/// Open what [`answer_opened`] needs; `Ok(None)`: nothing to answer from (warned).
pub async fn open(vip: &Vip) -> Result<Option<Opened>, String> {
    let unanswered = |e: &dyn std::fmt::Display| {
        format!(
            "connection attempts that still come to this host for {} go unanswered: {e}",
            vip.addr
        )
    };
    let own = match vip.own_address().await {
        Ok(Some(own)) => own,
        Ok(None) => {
            let family = if vip.addr.is_ipv4() { "IPv4" } else { "IPv6" };
            tracing::warn!(
                vip = %vip,
                "not answering connection attempts that still come to this host for {}: \
                 {} has no {family} address of its own to answer from; those clients \
                 retry after TCP's 1 s",
                vip.addr,
                vip.interface
            );
            return Ok(None);
        }
        Err(e) => return Err(unanswered(&e)),
    };
    let socket_error = |e: Errno| {
        let hint = if e == Errno::EPERM || e == Errno::EACCES {
            " (failoverd needs CAP_NET_RAW: run it as root or grant the capability)"
        } else {
            ""
        };
        unanswered(&format!("packet socket on {}: {e}{hint}", vip.interface))
    };
    let index = nix::net::if_::if_nametoindex(vip.interface.as_str()).map_err(socket_error)?;
    let ethertype = if vip.addr.is_ipv4() {
        ETH_P_IP
    } else {
        ETH_P_IPV6
    };
    let sock = PacketSocket::open(index, ethertype).map_err(socket_error)?;
    Ok(Some(Opened { own, sock }))
}

/// [`answer_strays`] with what [`open`] opened (before the address was removed).
pub async fn answer_opened(
    vip: &Vip,
    opened: Result<Option<Opened>, String>,
    window: Duration,
) -> Result<u64, String> {
    let deadline = tokio::time::Instant::now() + window;
    let mut tally = Tally::default();
    let run = tokio::time::timeout_at(deadline, answer_until_cut(vip, opened, &mut tally)).await;
    if let Ok(Err(e)) = run {
        return Err(match tally.answered {
            0 => e,
            n => format!("{e} ({n} answered before that)"),
        });
    }
    let unreachable = if vip.addr.is_ipv4() {
        "ICMP host unreachable"
    } else {
        "ICMPv6 address unreachable"
    };
    if tally.answered > 0 {
        tracing::info!(
            vip = %vip,
            answered = tally.answered,
            "answered {} connection attempts that still came to this host for {} ({unreachable}) \
             so that clients retry at once",
            tally.answered,
            vip.addr
        );
    }
    if tally.over_limit > 0 {
        tracing::warn!(
            vip = %vip,
            over_limit = tally.over_limit,
            "left {} connection attempts for {} unanswered: more than {MAX_ANSWERS} in \
             {RATE_PERIOD:?}; those clients retry after TCP's 1 s",
            tally.over_limit,
            vip.addr
        );
    }
    Ok(tally.answered)
}

/// The body of [`answer_strays`]: returns `Ok` only when it has nothing to do; else
/// answers until an error, or until the caller's timeout cuts it.
async fn answer_until_cut(
    vip: &Vip,
    opened: Result<Option<Opened>, String>,
    tally: &mut Tally,
) -> Result<(), String> {
    let unanswered = |e: &dyn std::fmt::Display| {
        format!(
            "connection attempts that still come to this host for {} go unanswered: {e}",
            vip.addr
        )
    };
    let Some(Opened { own, sock }) = opened? else {
        return Ok(());
    };
    match vip.present().await {
        Ok(p) if p.is_present() => {
            return Err(format!(
                "refusing to answer connection attempts for {} with ICMP errors: the address \
                 is still on {}, so this host serves it; this is a bug (answer only after \
                 removing it)",
                vip.addr, vip.interface
            ))
        }
        Ok(_) => {}
        Err(e) => return Err(unanswered(&e)),
    }
    let socket_error = |e: Errno| unanswered(&format!("packet socket on {}: {e}", vip.interface));
    tracing::debug!(vip = %vip, %own, "answering connection attempts for the VIP");
    let mut budget = Budget::new(Instant::now());
    loop {
        let frame = sock.recv().await.map_err(socket_error)?;
        if !frame.to_us {
            // For another host's MAC (a promiscuous or flooding link): not ours to answer.
            continue;
        }
        let Some((answer, client)) = answer_to(&frame.payload, vip.addr, own) else {
            continue;
        };
        if !budget.take(Instant::now()) {
            tally.over_limit += 1;
            continue;
        }
        sock.send(&answer, frame.from).await.map_err(socket_error)?;
        tally.answered += 1;
        tracing::debug!(
            vip = %vip,
            %client,
            mac = %frame.from,
            from = %own,
            "answered a connection attempt for the VIP: not here"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
    const OWN: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

    /// A TCP header: port 40000 -> 7770, sequence 0x01020304, data offset 5, SYN,
    /// window 0xfaf0, checksum left 0 (not checked: offloads leave it unfinished).
    const SYN_TCP: [u8; 20] = [
        0x9c, 0x40, 0x1e, 0x5a, 1, 2, 3, 4, 0, 0, 0, 0, 0x50, 0x02, 0xfa, 0xf0, 0, 0, 0, 0,
    ];

    /// 10.0.0.3 -> 10.0.0.100, TCP, 40 bytes, id 0x1234, DF, TTL 64. Header checksum by
    /// hand: 4500 + 0028 + 1234 + 4000 + 4006 + 0a00 + 0003 + 0a00 + 0064 = ebc9, and
    /// !ebc9 = 1436.
    fn syn_v4() -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 6, 0x14, 0x36, 10, 0, 0, 3, 10, 0, 0, 100,
        ];
        p.extend_from_slice(&SYN_TCP);
        p
    }

    /// Fill in the IPv4 header checksum of `p` again after a change.
    fn resum(p: &mut [u8]) {
        p[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum(&p[..20]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// fd00::3 -> fd00::100, TCP directly, hop limit 64, the same TCP header.
    fn syn_v6() -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
        p.extend_from_slice(&v6("fd00::3").octets());
        p.extend_from_slice(&v6("fd00::100").octets());
        p.extend_from_slice(&SYN_TCP);
        p
    }

    #[test]
    fn checksum_of_a_known_header_and_zero_over_a_right_one() {
        let p = syn_v4();
        let mut h = p[..20].to_vec();
        assert_eq!(checksum(&h), 0, "a right header sums to zero");
        h[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(checksum(&h), 0x1436);
        assert_eq!(
            checksum(&[0x01]),
            !0x0100,
            "an odd byte is padded with zero"
        );
    }

    #[test]
    fn v4_syn_for_the_vip_is_a_stray() {
        let p = syn_v4();
        let s = parse_stray_v4(&p, VIP).expect("a stray");
        assert_eq!((s.src, s.src_port, s.dst_port), (CLIENT, 40000, 7770));
        assert_eq!(s.packet, &p[..]);
        // Ethernet pads short frames to 46 bytes of payload: the padding is not quoted.
        let mut padded = p.clone();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(parse_stray_v4(&padded, VIP).map(|s| s.packet), Some(&p[..]));
    }

    #[test]
    fn v4_not_a_stray() {
        let p = syn_v4();
        assert_eq!(
            parse_stray_v4(&p, Ipv4Addr::new(10, 0, 0, 101)),
            None,
            "another address"
        );
        // Change one byte; fix the header checksum if the byte is in the header.
        let with = |i: usize, v: u8| {
            let mut q = p.clone();
            q[i] = v;
            if i < 20 {
                resum(&mut q);
            }
            q
        };
        let from = |src: [u8; 4]| {
            let mut q = p.clone();
            q[12..16].copy_from_slice(&src);
            resum(&mut q);
            q
        };
        for (what, q) in [
            ("SYN-ACK", with(33, 0x12)),
            ("ACK", with(33, 0x10)),
            ("RST", with(33, 0x04)),
            ("SYN-FIN", with(33, 0x03)),
            ("TCP data offset 4", with(32, 0x40)),
            ("TCP data offset past the end", with(32, 0x60)),
            ("UDP", with(9, 17)),
            ("version 6", with(0, 0x65)),
            ("IHL 4", with(0, 0x44)),
            ("IHL past the total length", with(0, 0x4f)),
            ("total length past the packet", with(3, 41)),
            ("a later fragment", with(7, 1)),
            ("from a multicast source", from([224, 0, 0, 1])),
            ("from the broadcast address", from([255; 4])),
            ("from 0.0.0.0", from([0; 4])),
            ("from loopback", from([127, 0, 0, 1])),
        ] {
            assert_eq!(parse_stray_v4(&q, VIP), None, "{what}");
        }
        let mut bad_sum = p.clone();
        bad_sum[11] ^= 1;
        assert_eq!(parse_stray_v4(&bad_sum, VIP), None, "bad header checksum");
        // SYN with ECN setup (ECE, CWR) is still a connection attempt.
        assert!(parse_stray_v4(&with(33, 0xc2), VIP).is_some());
        // A first fragment (More Fragments, offset 0) carries the header.
        assert!(parse_stray_v4(&with(6, 0x20), VIP).is_some());
    }

    #[test]
    fn every_cut_of_a_stray_is_skipped_without_panic() {
        let p = syn_v4();
        for n in 0..p.len() {
            assert_eq!(parse_stray_v4(&p[..n], VIP), None, "first {n} bytes");
        }
        let p = syn_v6();
        for n in 0..p.len() {
            assert_eq!(parse_stray_v6(&p[..n], v6("fd00::100")), None, "first {n}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        // A fixed pseudo-random sequence (xorshift), in every length up to 100 bytes,
        // with the version nibble forced so that the parsers look further.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for n in 0..2000 {
            let mut b: Vec<u8> = (0..n % 100)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if let Some(first) = b.first_mut() {
                *first = if n % 2 == 0 { 0x45 } else { 0x60 };
            }
            let _ = parse_stray_v4(&b, VIP);
            let _ = parse_stray_v6(&b, v6("fd00::100"));
            let _ = answer_to(&b, IpAddr::V4(VIP), IpAddr::V4(OWN));
        }
    }

    #[test]
    fn v4_answer_is_host_unreachable_from_our_address_quoting_header_and_8_bytes() {
        let p = syn_v4();
        let s = parse_stray_v4(&p, VIP).unwrap();
        let a = host_unreachable_v4(OWN, &s);
        // IP header: 45 c0, length 56, id 0, DF, TTL 64, ICMP, 10.0.0.1 -> 10.0.0.3.
        // Checksum by hand: 45c0 + 0038 + 4000 + 4001 + 0a00 + 0001 + 0a00 + 0003 = d9fd,
        // !d9fd = 2602.
        let mut want = vec![
            0x45, 0xc0, 0, 56, 0, 0, 0x40, 0, 64, 1, 0x26, 0x02, 10, 0, 0, 1, 10, 0, 0, 3,
        ];
        // ICMP: type 3 code 1; checksum by hand: 0301 + ffff (the quoted header, right)
        // + 9c40 + 1e5a + 0102 + 0304 = c1a1 (carries folded), !c1a1 = 3e5e.
        want.extend_from_slice(&[3, 1, 0x3e, 0x5e, 0, 0, 0, 0]);
        want.extend_from_slice(&p[..28]);
        assert_eq!(a, want);
        assert_eq!(checksum(&a[..20]), 0, "IP header checksum");
        assert_eq!(checksum(&a[20..]), 0, "ICMP checksum");
        assert_eq!(
            &a[12..16],
            &OWN.octets(),
            "from our own address, not the VIP"
        );
    }

    #[test]
    fn v4_answer_quotes_ip_options_too() {
        // IHL 6: one 4-byte option (NOPs), total 44.
        let mut p = vec![
            0x46, 0, 0, 44, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 3, 10, 0, 0, 100, 1, 1, 1,
            0,
        ];
        let sum = checksum(&p);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(&SYN_TCP);
        let s = parse_stray_v4(&p, VIP).expect("a stray with options");
        let a = host_unreachable_v4(OWN, &s);
        assert_eq!(a.len(), 20 + 8 + 24 + 8);
        assert_eq!(&a[28..], &p[..32]);
        assert_eq!(checksum(&a[..20]), 0);
        assert_eq!(checksum(&a[20..]), 0);
    }

    #[test]
    fn v6_syn_for_the_vip_is_a_stray_and_nothing_else_is() {
        let vip = v6("fd00::100");
        let p = syn_v6();
        let s = parse_stray_v6(&p, vip).expect("a stray");
        assert_eq!(
            (s.src, s.src_port, s.dst_port, s.packet),
            (v6("fd00::3"), 40000, 7770, &p[..])
        );
        let mut padded = p.clone();
        padded.extend_from_slice(&[0; 4]);
        assert_eq!(parse_stray_v6(&padded, vip).map(|s| s.packet), Some(&p[..]));
        assert_eq!(parse_stray_v6(&p, v6("fd00::101")), None, "another address");
        let with = |i: usize, v: u8| {
            let mut q = p.clone();
            q[i] = v;
            q
        };
        for (what, q) in [
            ("SYN-ACK", with(53, 0x12)),
            ("RST", with(53, 0x04)),
            ("a hop-by-hop header first", with(6, 0)),
            ("UDP", with(6, 17)),
            ("version 4", with(0, 0x40)),
            ("payload length past the packet", with(5, 21)),
            ("payload length 0 (no TCP header)", with(5, 0)),
            ("from a multicast source", with(8, 0xff)),
        ] {
            assert_eq!(parse_stray_v6(&q, vip), None, "{what}");
        }
        let mut unspecified = p.clone();
        unspecified[8..24].copy_from_slice(&[0; 16]);
        assert_eq!(parse_stray_v6(&unspecified, vip), None, "from ::");
    }

    #[test]
    fn v6_answer_is_address_unreachable_from_our_address_quoting_the_packet() {
        let own = v6("fd00::1");
        let p = syn_v6();
        let s = parse_stray_v6(&p, v6("fd00::100")).unwrap();
        let a = address_unreachable_v6(own, &s);
        // Header: version 6, payload 8 + 60 = 68, ICMPv6, hop limit 64, fd00::1 -> fd00::3.
        let mut want = vec![0x60, 0, 0, 0, 0, 68, 58, 64];
        want.extend_from_slice(&own.octets());
        want.extend_from_slice(&v6("fd00::3").octets());
        // Type 1 code 3; checksum by hand: fd00 x 4 (the four addresses) = 3f400; the
        // rest of the pseudo-header 0001 + 0003 + 0044 + 003a, ICMP 0103, the quoted
        // header 6000 + 0014 + 0640 + 0003 + 0100: 68dc; the quoted TCP header 9c40 +
        // 1e5a + 0102 + 0304 + 5002 + faf0 = 20992; in all 6666e, folded 6674, !6674 =
        // 998b.
        want.extend_from_slice(&[1, 3, 0x99, 0x8b, 0, 0, 0, 0]);
        want.extend_from_slice(&p);
        assert_eq!(a, want);
        assert_eq!(arp::icmpv6_checksum(own, v6("fd00::3"), &a[40..]), 0);
    }

    #[test]
    fn v6_answer_fits_the_minimum_mtu() {
        let own = v6("fd00::1");
        let mut p = syn_v6();
        // A SYN carrying 1440 bytes of data (TCP Fast Open): 1500 bytes in all.
        p[4..6].copy_from_slice(&1460u16.to_be_bytes());
        p.resize(1500, 0xab);
        let s = parse_stray_v6(&p, v6("fd00::100")).expect("a stray");
        let a = address_unreachable_v6(own, &s);
        assert_eq!(a.len(), IPV6_MIN_MTU);
        assert_eq!(u16::from_be_bytes([a[4], a[5]]), 1240);
        assert_eq!(&a[48..], &p[..1232]);
        assert_eq!(arp::icmpv6_checksum(own, v6("fd00::3"), &a[40..]), 0);
    }

    #[test]
    fn answers_only_in_the_vips_family() {
        let vip4 = IpAddr::V4(VIP);
        let (answer, client) =
            answer_to(&syn_v4(), vip4, IpAddr::V4(OWN)).expect("an answer to a stray");
        assert_eq!(client, "10.0.0.3:40000".parse().unwrap());
        assert_eq!(answer[20], ICMP_DEST_UNREACH);
        assert_eq!(answer_to(&syn_v4(), vip4, IpAddr::V6(v6("fd00::1"))), None);
        let vip6 = IpAddr::V6(v6("fd00::100"));
        let (answer, client) =
            answer_to(&syn_v6(), vip6, IpAddr::V6(v6("fd00::1"))).expect("an answer");
        assert_eq!(client, "[fd00::3]:40000".parse().unwrap());
        assert_eq!(answer[40], ICMPV6_DEST_UNREACH);
        assert_eq!(answer_to(&syn_v6(), vip4, IpAddr::V4(OWN)), None);
    }

    #[test]
    fn budget_allows_100_per_100_ms() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        for i in 0..MAX_ANSWERS {
            assert!(b.take(t0 + Duration::from_millis(u64::from(i % 90))), "{i}");
        }
        assert!(
            !b.take(t0 + Duration::from_millis(99)),
            "the 101st in 100 ms"
        );
        assert!(b.take(t0 + RATE_PERIOD), "a new period");
        let later = t0 + RATE_PERIOD;
        for _ in 1..MAX_ANSWERS {
            assert!(b.take(later));
        }
        assert!(!b.take(later + Duration::from_millis(50)));
    }
}
