//! The link-layer messages of the virtual IP, and the raw packet socket that carries
//! them: ARP (RFC 826) probes and gratuitous announcements for IPv4 (RFC 5227 style),
//! and for IPv6 the Neighbour Discovery messages (RFC 4861) that play the same parts:
//! a duplicate-address-detection Neighbour Solicitation as the probe and an
//! unsolicited Neighbour Advertisement (Override set) as the announcement.
//!
//! Two halves:
//! - pure functions that build and parse the messages ([`arp_probe`], [`arp_announce`],
//!   [`parse_arp`], [`ndp_dad_solicit`], [`ndp_unsolicited_advert`], [`parse_ndp`]),
//!   unit-tested below with known bytes;
//! - [`PacketSocket`]: an `AF_PACKET`, `SOCK_DGRAM` socket bound to one interface and
//!   one EtherType (the kernel writes and strips the Ethernet header), read and written
//!   through tokio's [`AsyncFd`].
//!
//! It must never decide anything (whether an answer is a conflict is the caller's
//! question), never send on an interface it was not given, and never block: every
//! read is awaited and the caller bounds it with a timeout. It trusts nothing it reads:
//! short or malformed frames are skipped, never unwrapped.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{
    bind, recvfrom, sendto, socket, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType,
    SockaddrLike,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// EtherType of ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;

/// ARP operation: request.
pub const ARP_REQUEST: u16 = 1;
/// ARP operation: reply.
pub const ARP_REPLY: u16 = 2;

/// ICMPv6 Neighbour Solicitation.
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
/// ICMPv6 Neighbour Advertisement.
pub const ND_NEIGHBOR_ADVERT: u8 = 136;

/// The Ethernet broadcast address.
pub const BROADCAST: Mac = Mac([0xff; 6]);

/// `sll_pkttype` of a frame this host sent (PACKET_OUTGOING): our own probes, seen
/// again on the way out.
const PACKET_OUTGOING: u8 = 4;
/// `sll_pkttype` of a frame sent to this host's own MAC (PACKET_HOST).
const PACKET_HOST: u8 = 0;

/// Length of an ARP message for Ethernet and IPv4.
const ARP_LEN: usize = 28;
/// Length of the fixed IPv6 header.
pub(crate) const IPV6_HEADER_LEN: usize = 40;

/// A 48-bit Ethernet (MAC) address, shown as `52:54:00:aa:bb:cc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    /// `52:54:00:aa:bb:cc` (six hex octets separated by colons).
    fn from_str(s: &str) -> Result<Mac, String> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts
                .next()
                .ok_or_else(|| format!("{s:?} is not a MAC address (six hex octets)"))?;
            *o = u8::from_str_radix(p, 16)
                .map_err(|_| format!("{s:?} is not a MAC address (bad octet {p:?})"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address (more than six octets)"));
        }
        Ok(Mac(out))
    }
}

impl Mac {
    /// The Ethernet multicast address of an IPv6 multicast group (RFC 2464 §7).
    pub fn ipv6_multicast(group: Ipv6Addr) -> Mac {
        let o = group.octets();
        Mac([0x33, 0x33, o[12], o[13], o[14], o[15]])
    }
}

/// One ARP message for Ethernet and IPv4, as read from the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// [`ARP_REQUEST`] or [`ARP_REPLY`] (others are passed through).
    pub op: u16,
    /// Sender hardware address.
    pub sha: Mac,
    /// Sender protocol address (0.0.0.0 in an RFC 5227 probe).
    pub spa: Ipv4Addr,
    /// Target hardware address.
    pub tha: Mac,
    /// Target protocol address.
    pub tpa: Ipv4Addr,
}

impl Arp {
    /// The 28 bytes of this message (htype 1, ptype 0x0800, hlen 6, plen 4).
    pub fn to_bytes(&self) -> [u8; ARP_LEN] {
        let mut b = [0u8; ARP_LEN];
        b[0..2].copy_from_slice(&1u16.to_be_bytes());
        b[2..4].copy_from_slice(&0x0800u16.to_be_bytes());
        b[4] = 6;
        b[5] = 4;
        b[6..8].copy_from_slice(&self.op.to_be_bytes());
        b[8..14].copy_from_slice(&self.sha.0);
        b[14..18].copy_from_slice(&self.spa.octets());
        b[18..24].copy_from_slice(&self.tha.0);
        b[24..28].copy_from_slice(&self.tpa.octets());
        b
    }
}

/// An RFC 5227 probe for `target` from `own`: a request with sender IP 0.0.0.0 (so no
/// host's cache learns from it), target MAC zero.
pub fn arp_probe(own: Mac, target: Ipv4Addr) -> Arp {
    Arp {
        op: ARP_REQUEST,
        sha: own,
        spa: Ipv4Addr::UNSPECIFIED,
        tha: Mac([0; 6]),
        tpa: target,
    }
}

/// A gratuitous ARP for `vip` held by `own`: sender and target IP both `vip`. The
/// request form (`op` [`ARP_REQUEST`], target MAC zero, like `arping -U`) and the reply
/// form (`op` [`ARP_REPLY`], target MAC `own`, like `arping -A`) for gear that honours
/// only one of them.
pub fn arp_announce(own: Mac, vip: Ipv4Addr, op: u16) -> Arp {
    let tha = if op == ARP_REPLY { own } else { Mac([0; 6]) };
    Arp {
        op,
        sha: own,
        spa: vip,
        tha,
        tpa: vip,
    }
}

/// The ARP message in `payload` (an Ethernet/IPv4 ARP body, Ethernet header already
/// stripped), or `None` for anything else or anything short.
pub fn parse_arp(payload: &[u8]) -> Option<Arp> {
    let b = payload.get(..ARP_LEN)?;
    let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    if u16_at(0) != 1 || u16_at(2) != 0x0800 || b[4] != 6 || b[5] != 4 {
        return None;
    }
    let mac = |i: usize| {
        let mut m = [0u8; 6];
        m.copy_from_slice(&b[i..i + 6]);
        Mac(m)
    };
    let ip = |i: usize| Ipv4Addr::new(b[i], b[i + 1], b[i + 2], b[i + 3]);
    Some(Arp {
        op: u16_at(6),
        sha: mac(8),
        spa: ip(14),
        tha: mac(18),
        tpa: ip(24),
    })
}

/// The solicited-node multicast group of `addr` (ff02::1:ffXX:XXXX), where a DAD
/// Neighbour Solicitation for it is sent.
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// A whole IPv6 packet (header and ICMPv6 body, checksum filled in) carrying `icmp`
/// from `src` to `dst` with hop limit 255, as Neighbour Discovery requires.
fn ipv6_icmp(src: Ipv6Addr, dst: Ipv6Addr, mut icmp: Vec<u8>) -> Vec<u8> {
    let sum = icmpv6_checksum(src, dst, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut p = Vec::with_capacity(IPV6_HEADER_LEN + icmp.len());
    p.extend_from_slice(&0x6000_0000u32.to_be_bytes());
    // Neighbour Discovery messages are far below 64 KiB.
    p.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    p.push(58); // next header: ICMPv6
    p.push(255); // hop limit
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&icmp);
    p
}

/// The ICMPv6 checksum (RFC 4443 §2.3) over the pseudo-header and `icmp` (whose
/// checksum field is zero).
pub(crate) fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for c in bytes.chunks(2) {
            let w = match c {
                [a, b] => u16::from_be_bytes([*a, *b]),
                [a] => u16::from_be_bytes([*a, 0]),
                _ => 0,
            };
            sum += u32::from(w);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(icmp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A duplicate-address-detection Neighbour Solicitation for `target` (RFC 4862 §5.4.2):
/// from the unspecified address `::` to `target`'s solicited-node group, with no
/// source link-layer option. Returns the IPv6 packet and the Ethernet destination.
pub fn ndp_dad_solicit(target: Ipv6Addr) -> (Vec<u8>, Mac) {
    let dst = solicited_node(target);
    let mut icmp = vec![ND_NEIGHBOR_SOLICIT, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    (
        ipv6_icmp(Ipv6Addr::UNSPECIFIED, dst, icmp),
        Mac::ipv6_multicast(dst),
    )
}

/// An unsolicited Neighbour Advertisement for `vip` held by `own` (RFC 4861 §7.2.6):
/// to all nodes (ff02::1), Override set, Solicited clear, with the target link-layer
/// address option; from `vip` itself, as keepalived sends it. Returns the IPv6 packet
/// and the Ethernet destination.
pub fn ndp_unsolicited_advert(own: Mac, vip: Ipv6Addr) -> (Vec<u8>, Mac) {
    let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    // type, code, checksum, flags (Override = 0x20 in the first byte), reserved
    let mut icmp = vec![ND_NEIGHBOR_ADVERT, 0, 0, 0, 0x20, 0, 0, 0];
    icmp.extend_from_slice(&vip.octets());
    icmp.extend_from_slice(&[2, 1]); // option: target link-layer address, 8 bytes
    icmp.extend_from_slice(&own.0);
    (ipv6_icmp(vip, dst, icmp), Mac::ipv6_multicast(dst))
}

/// A Neighbour Discovery message about some target address, as read from the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ndp {
    /// [`ND_NEIGHBOR_SOLICIT`] or [`ND_NEIGHBOR_ADVERT`].
    pub kind: u8,
    /// The IPv6 source (`::` in a DAD solicitation).
    pub src: Ipv6Addr,
    /// The address the message is about.
    pub target: Ipv6Addr,
    /// The link-layer address option (target's for an advertisement, source's for a
    /// solicitation), if present.
    pub lladdr: Option<Mac>,
}

/// The Neighbour Solicitation or Advertisement in `packet` (an IPv6 packet, Ethernet
/// header stripped), or `None` for anything else, anything short, or a hop limit other
/// than 255 (RFC 4861 §7.1.1: such a message did not come from the link).
pub fn parse_ndp(packet: &[u8]) -> Option<Ndp> {
    let h = packet.get(..IPV6_HEADER_LEN)?;
    if h[0] >> 4 != 6 || h[6] != 58 || h[7] != 255 {
        return None;
    }
    let addr = |b: &[u8]| -> Option<Ipv6Addr> {
        let o: [u8; 16] = b.get(..16)?.try_into().ok()?;
        Some(Ipv6Addr::from(o))
    };
    let src = addr(&h[8..24])?;
    let len = usize::from(u16::from_be_bytes([h[4], h[5]]));
    let icmp = packet.get(IPV6_HEADER_LEN..IPV6_HEADER_LEN + len)?;
    let kind = *icmp.first()?;
    if kind != ND_NEIGHBOR_SOLICIT && kind != ND_NEIGHBOR_ADVERT {
        return None;
    }
    let target = addr(icmp.get(8..24)?)?;
    // Options: (type, length in units of 8 bytes, value).
    let want = if kind == ND_NEIGHBOR_ADVERT { 2 } else { 1 };
    let mut lladdr = None;
    let mut opts = icmp.get(24..).unwrap_or_default();
    while let [ty, units, ..] = *opts {
        let n = usize::from(units) * 8;
        if n == 0 || opts.len() < n {
            break;
        }
        if ty == want && n >= 8 {
            let mut m = [0u8; 6];
            m.copy_from_slice(&opts[2..8]);
            lladdr = Some(Mac(m));
        }
        opts = &opts[n..];
    }
    Some(Ndp {
        kind,
        src,
        target,
        lladdr,
    })
}

/// A frame read from a [`PacketSocket`]: its payload and the sender's link address.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The Ethernet source of the frame.
    pub from: Mac,
    /// The payload (the Ethernet header stripped by the kernel).
    pub payload: Vec<u8>,
    /// Sent to this host's own MAC (`PACKET_HOST`), not broadcast, multicast or to
    /// another host (seen on a promiscuous or flooding link).
    pub to_us: bool,
}

/// An `AF_PACKET`, `SOCK_DGRAM`, non-blocking socket bound to one interface and one
/// EtherType. Needs `CAP_NET_RAW`. Frames this host sends itself are not returned by
/// [`PacketSocket::recv`].
pub struct PacketSocket {
    fd: AsyncFd<OwnedFd>,
    ifindex: u32,
    ethertype: u16,
}

impl PacketSocket {
    /// Open the socket and bind it to interface `ifindex` and `ethertype`. Must be
    /// called inside a tokio runtime (the socket is registered with its reactor).
    pub fn open(ifindex: u32, ethertype: u16) -> Result<PacketSocket, Errno> {
        let fd = socket(
            AddressFamily::Packet,
            SockType::Datagram,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        bind(fd.as_raw_fd(), &link_addr(ifindex, ethertype, Mac([0; 6])))?;
        // SAFETY: `fd` is an OwnedFd, open and owned by the AsyncFd from here until the
        // AsyncFd drops it (deregistering first); nothing else holds it or can close it:
        // `PacketSocket` never hands it out nor replaces it.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }
                .map_err(|e| io_errno(e.into_parts().1))?;
        Ok(PacketSocket {
            fd,
            ifindex,
            ethertype,
        })
    }

    /// Send `payload` to the Ethernet address `to` (the kernel adds the header with
    /// this interface's MAC as source).
    pub async fn send(&self, payload: &[u8], to: Mac) -> Result<(), Errno> {
        let addr = link_addr(self.ifindex, self.ethertype, to);
        loop {
            let mut guard = self.fd.writable().await.map_err(io_errno)?;
            match guard.try_io(|fd| {
                sendto(fd.as_raw_fd(), payload, &addr, MsgFlags::empty())
                    .map_err(std::io::Error::from)
            }) {
                Ok(r) => return r.map(drop).map_err(io_errno),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next frame another host sent (our own outgoing frames are skipped). Waits
    /// as long as it takes: bound it with a timeout.
    pub async fn recv(&self) -> Result<Frame, Errno> {
        let mut buf = vec![0u8; 2048];
        loop {
            let mut guard = self.fd.readable().await.map_err(io_errno)?;
            let got = guard.try_io(|fd| {
                recvfrom::<LinkAddr>(fd.as_raw_fd(), &mut buf).map_err(std::io::Error::from)
            });
            let (n, from) = match got {
                Ok(r) => r.map_err(io_errno)?,
                Err(_would_block) => continue,
            };
            let Some(from) = from else { continue };
            if from.pkttype() == PACKET_OUTGOING || from.halen() != 6 {
                continue;
            }
            let Some(mac) = from.addr() else { continue };
            return Ok(Frame {
                to_us: from.pkttype() == PACKET_HOST,
                from: Mac(mac),
                payload: buf[..n.min(buf.len())].to_vec(),
            });
        }
    }
}

fn io_errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// The `sockaddr_ll` for interface `ifindex`, EtherType `ethertype`, Ethernet address
/// `mac` (the destination when sending; ignored when binding).
fn link_addr(ifindex: u32, ethertype: u16, mac: Mac) -> LinkAddr {
    let mut sll_addr = [0u8; 8];
    sll_addr[..6].copy_from_slice(&mac.0);
    let sll = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: ethertype.to_be(),
        sll_ifindex: ifindex as i32,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr,
    };
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `sll` is a live, initialised sockaddr_ll and `len` is exactly its size, so
    // `from_raw` reads `len` valid bytes; its family is AF_PACKET, which it checks. nix
    // offers no safe constructor of a LinkAddr (only this one and recvfrom's).
    let addr = unsafe { LinkAddr::from_raw(std::ptr::from_ref(&sll).cast(), Some(len)) };
    addr.unwrap_or_else(|| unreachable!("a sockaddr_ll of family AF_PACKET and its own size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: Mac = Mac([0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]);

    #[test]
    fn probe_has_zero_sender_ip_and_round_trips() {
        let vip = Ipv4Addr::new(10, 0, 0, 1);
        let p = arp_probe(OWN, vip);
        let b = p.to_bytes();
        assert_eq!(
            b[..8],
            [0, 1, 8, 0, 6, 4, 0, 1],
            "htype 1, IPv4, hlen 6, plen 4, op request"
        );
        assert_eq!(
            b[14..18],
            [0, 0, 0, 0],
            "sender IP 0.0.0.0 (RFC 5227 §2.1.1)"
        );
        assert_eq!(b[24..28], [10, 0, 0, 1]);
        assert_eq!(parse_arp(&b), Some(p));
    }

    #[test]
    fn announcements_have_sender_and_target_ip_the_vip() {
        let vip = Ipv4Addr::new(10, 0, 0, 1);
        let req = arp_announce(OWN, vip, ARP_REQUEST);
        assert_eq!((req.spa, req.tpa, req.tha), (vip, vip, Mac([0; 6])));
        let rep = arp_announce(OWN, vip, ARP_REPLY);
        assert_eq!((rep.op, rep.spa, rep.tpa, rep.tha), (2, vip, vip, OWN));
    }

    #[test]
    fn short_or_foreign_arp_is_skipped() {
        let b = arp_probe(OWN, Ipv4Addr::new(10, 0, 0, 1)).to_bytes();
        assert_eq!(parse_arp(&b[..27]), None);
        let mut ipx = b;
        ipx[2] = 0x81;
        assert_eq!(parse_arp(&ipx), None);
        assert_eq!(parse_arp(&[]), None);
    }

    #[test]
    fn mac_parses_and_prints() {
        let m: Mac = "52:54:00:aa:bb:cc".parse().unwrap();
        assert_eq!(m, OWN);
        assert_eq!(m.to_string(), "52:54:00:aa:bb:cc");
        assert!("52:54:00:aa:bb".parse::<Mac>().is_err());
        assert!("52:54:00:aa:bb:cc:dd".parse::<Mac>().is_err());
        assert!("52:54:00:aa:bb:zz".parse::<Mac>().is_err());
    }

    #[test]
    fn solicited_node_group_and_its_mac() {
        let a: Ipv6Addr = "fd00::12:3456".parse().unwrap();
        let g = solicited_node(a);
        assert_eq!(g, "ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            Mac::ipv6_multicast(g),
            Mac([0x33, 0x33, 0xff, 0x12, 0x34, 0x56])
        );
    }

    #[test]
    fn icmpv6_checksum_of_known_packet() {
        // An echo request ::1 -> ::1, id 0, seq 0, no data: sum 0x8000 + 2 + 58 + 4.
        let one = Ipv6Addr::LOCALHOST;
        let icmp = [128u8, 0, 0, 0, 0, 0, 0, 0];
        let expect = !(0x8000u16 + 1 + 1 + 8 + 58);
        assert_eq!(icmpv6_checksum(one, one, &icmp), expect);
    }

    #[test]
    fn ndp_messages_round_trip() {
        let vip: Ipv6Addr = "fd00::1".parse().unwrap();
        let (na, to) = ndp_unsolicited_advert(OWN, vip);
        assert_eq!(to, Mac([0x33, 0x33, 0, 0, 0, 1]));
        let p = parse_ndp(&na).expect("an advertisement");
        assert_eq!(
            (p.kind, p.src, p.target, p.lladdr),
            (ND_NEIGHBOR_ADVERT, vip, vip, Some(OWN))
        );
        assert_eq!(
            na[IPV6_HEADER_LEN + 4],
            0x20,
            "Override set, Solicited clear"
        );
        // A correct checksum sums to zero with the pseudo-header.
        let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        assert_eq!(icmpv6_checksum(vip, dst, &na[IPV6_HEADER_LEN..]), 0);

        let (ns, to) = ndp_dad_solicit(vip);
        assert_eq!(to, Mac([0x33, 0x33, 0xff, 0, 0, 1]));
        let p = parse_ndp(&ns).expect("a solicitation");
        assert_eq!(
            (p.kind, p.src, p.target, p.lladdr),
            (ND_NEIGHBOR_SOLICIT, Ipv6Addr::UNSPECIFIED, vip, None)
        );
    }

    #[test]
    fn ndp_with_low_hop_limit_or_garbage_is_skipped() {
        let vip: Ipv6Addr = "fd00::1".parse().unwrap();
        let (mut na, _) = ndp_unsolicited_advert(OWN, vip);
        assert_eq!(parse_ndp(&na[..50]), None);
        na[7] = 64;
        assert_eq!(parse_ndp(&na), None);
        assert_eq!(parse_ndp(&[0x60; 10]), None);
    }
}
