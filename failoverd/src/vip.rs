//! The IO shell of the virtual IP: add, remove and look at the address through
//! rtnetlink, probe the link before a claim, announce after it, watch for another
//! host claiming it, and check that `[vip]` can work on this host.
//!
//! Each function carries out one kind of system call with a timeout and reports what
//! happened; the decision core (`failoverd-core`) decides when to call which. This
//! module must never decide anything: it does not retry, does not claim after a probe,
//! does not drop the address on a conflict, does not log above `debug`. Above all it
//! must never remove an address it did not add: failoverd's addresses carry the tag
//! [`FAILOVERD_IFA_PROTO`] in `IFA_PROTO`, and [`Vip::remove`] refuses an address
//! without it ([`VipError::NotOurs`]).
//!
//! # What each call does
//!
//! | call | IPv4 | IPv6 |
//! |---|---|---|
//! | [`Vip::add`] | `RTM_NEWADDR` tagged; Ok if already there with our tag | the same, kernel DAD left on: the address is *tentative* until DAD ends (about 1 s by default), *dadfailed* if another host holds it |
//! | [`Vip::remove`] | `RTM_DELADDR` of our tagged address; Ok if absent | the same |
//! | [`Vip::present`] | on the interface? ours? | also tentative / dadfailed ([`Dad`]) |
//! | [`Vip::probe`] | RFC 5227 ARP probes (sender IP 0.0.0.0), then a wait | our own duplicate address detection: Neighbour Solicitations from `::` to the solicited-node group, then a wait; the address is **not** added |
//! | [`Vip::announce`] | gratuitous ARP, request and reply forms, `count` rounds | unsolicited Neighbour Advertisements (Override) to ff02::1, `count` rounds |
//! | [`Vip::watch_conflicts`] | ARP from another MAC with sender IP = the VIP | Neighbour Advertisements for the VIP from another MAC |
//! | [`check`] | interface exists, VIP in one of its subnets, CAP_NET_ADMIN and CAP_NET_RAW | the same |
//!
//! A probe answers "did anyone on this link say they hold the address while we
//! listened". It cannot see a host behind a partition (that host cannot hear us
//! either); it catches the host whose daemon died while its kernel kept the address.
//! For IPv6 on real hardware the listener relies on the NIC delivering ff02::1 (always
//! joined) and, to see a competing prober, the VIP's solicited-node group (joined by
//! nobody here: such probes are seen on veth and bridges, which filter nothing).
//!
//! Every socket is made in the network namespace of the calling thread, at the call:
//! tests run these functions on a thread that has joined a namespace.
//!
//! # Wiring (for the daemon)
//!
//! Build one [`Vip`] from the validated `[vip]` section ([`Vip::parse`]) and run the
//! core's actions as tasks, each outcome fed back as an input:
//! - at start (safety rule 1): [`Vip::present`]; a tagged leftover is removed with
//!   [`Vip::remove`] unless the core says we hold the current epoch; an untagged copy
//!   is reported, never touched;
//! - claim: [`Vip::probe`] (`Some(mac)` → refuse, with [`VipError::Held`] as the line),
//!   then [`Vip::add`], then [`Vip::announce`] (e.g. 3 rounds 50 ms apart), repeated
//!   later for the refresh; for IPv6, [`Vip::present`] until [`Dad::Done`] (or
//!   [`Dad::Failed`]: another holder, remove ours);
//! - while holding: one task draining [`Vip::watch_conflicts`] (own MAC from
//!   [`Vip::mac`]); each MAC is an input the core resolves by epoch;
//! - release: [`Vip::remove`];
//! - `failoverd check`: [`check`], one line per problem.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures_util::stream::{Stream, TryStreamExt};
use nix::errno::Errno;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressMessage, AddressProtocol,
};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{AddressMessageBuilder, Handle};
use tokio::time::Instant;

use crate::arp::{self, PacketSocket, ARP_REPLY, ARP_REQUEST, ETH_P_ARP, ETH_P_IPV6};
pub use crate::arp::{Mac, BROADCAST};

/// The `IFA_PROTO` value failoverd tags its addresses with ("who added this address",
/// Linux >= 5.18). The kernel uses 0 to 3 (unspecified, loopback, router announcement,
/// link-local); keepalived takes the lowest number free in `rt_addrprotos`, counting up
/// from 4. failoverd takes 250, far from both. iproute2 shows it as `proto 250`
/// (`ip -d addr show`), or by name after `echo '250 failoverd' >>
/// /etc/iproute2/rt_addrprotos`.
pub const FAILOVERD_IFA_PROTO: u8 = 250;

/// The longest a netlink exchange (one request and its answer) may take.
pub const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);

/// Most probes one [`Vip::probe`] may send, and most rounds one [`Vip::announce`] may
/// send: the calls are bounded in count as well as in time.
pub const MAX_ROUNDS: u32 = 100;
/// The longest [`Vip::probe`] or [`Vip::announce`] may be asked to take.
pub const MAX_DURATION: Duration = Duration::from_secs(30);

/// What a call was doing when it failed, for error messages ("cannot add ...").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Remove,
    Look,
    Probe,
    Announce,
    Watch,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Look => "look up",
            Op::Probe => "probe for",
            Op::Announce => "announce",
            Op::Watch => "watch for conflicts over",
        })
    }
}

/// The errors of the virtual IP's IO shell. `Display` is one line for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VipError {
    /// `[vip] address` is not `ADDRESS/PREFIX`, the prefix is longer than the family
    /// allows, or the address cannot be a service address (unspecified, loopback,
    /// multicast).
    #[error("vip.address {input:?} is not a usable ADDRESS/PREFIX: {reason}")]
    Parse { input: String, reason: String },
    /// The interface does not exist in this host's network namespace (a typo in
    /// `[vip] interface`, or a device not yet created at boot).
    #[error("cannot {op} {vip}: interface {} does not exist here (check [vip] interface)", vip.interface)]
    NoInterface { op: Op, vip: Vip },
    /// The interface has no Ethernet address (loopback, tun, wireguard): ARP and
    /// neighbour discovery cannot run on it.
    #[error("cannot {op} {vip}: interface {} has no Ethernet address (ARP needs an Ethernet-like link)", vip.interface)]
    NoMac { op: Op, vip: Vip },
    /// The address is on the interface without failoverd's tag: someone added it by
    /// hand, or another program (keepalived, DHCP) did. failoverd leaves it alone.
    #[error(
        "refusing to {op} {vip}: the address is on {} without failoverd's tag (IFA_PROTO \
         {FAILOVERD_IFA_PROTO}), so failoverd did not add it; if it must go, remove it by hand \
         (ip addr del {} dev {})",
        vip.interface, vip.cidr(), vip.interface
    )]
    NotOurs { op: Op, vip: Vip },
    /// Another host answered the probe: it holds the address (made by the caller from
    /// [`Vip::probe`]'s answer, to refuse a claim with this line).
    #[error("refusing to claim {} on {}: host {mac} answered the {}", vip.cidr(), vip.interface, vip.probe_name())]
    Held { vip: Vip, mac: Mac },
    /// The kernel refused a netlink request (e.g. EPERM without CAP_NET_ADMIN), or the
    /// netlink socket failed.
    #[error("cannot {op} {vip}: netlink: {source}{}", hint(source.raw_os_error(), "CAP_NET_ADMIN"))]
    Netlink {
        op: Op,
        vip: Vip,
        source: std::io::Error,
    },
    /// A raw packet socket could not be opened, bound, written or read (EPERM without
    /// CAP_NET_RAW; ENETDOWN with the interface down).
    #[error("cannot {op} {vip}: packet socket: {source}{}", hint(Some(*source as i32), "CAP_NET_RAW"))]
    Packet { op: Op, vip: Vip, source: Errno },
    /// The kernel did not answer in time (a wedged netlink socket, a full send queue).
    #[error("cannot {op} {vip}: nothing done within {after:?}")]
    Timeout { op: Op, vip: Vip, after: Duration },
    /// The kernel added the address but did not keep failoverd's tag (Linux before
    /// 5.18 has no IFA_PROTO): failoverd took it off again and cannot manage it here.
    #[error(
        "cannot add {vip}: the kernel did not keep failoverd's tag (IFA_PROTO \
         {FAILOVERD_IFA_PROTO}, Linux 5.18 or later), so failoverd could not recognise the \
         address as its own; it was taken off again"
    )]
    TagNotKept { vip: Vip },
    /// Probe or announcement timers out of bounds.
    #[error("cannot {op} {vip}: {reason}")]
    Timers { op: Op, vip: Vip, reason: String },
}

fn hint(errno: Option<i32>, cap: &str) -> String {
    match errno {
        Some(e) if e == Errno::EPERM as i32 || e == Errno::EACCES as i32 => {
            format!(" (failoverd needs {cap}: run it as root or grant the capability)")
        }
        _ => String::new(),
    }
}

/// The virtual IP: an address with its prefix, on one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vip {
    pub interface: String,
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for Vip {
    /// `10.0.0.1/24 on eth0`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {}", self.cidr(), self.interface)
    }
}

/// Whether the VIP is on its interface, and in which state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Not on the interface (with any prefix).
    Absent,
    /// On the interface.
    Present {
        /// It carries failoverd's tag ([`FAILOVERD_IFA_PROTO`]).
        ours: bool,
        /// Its prefix on the interface (may differ from the configured one if someone
        /// else added it).
        prefix: u8,
        /// IPv6 duplicate address detection (always [`Dad::Done`] for IPv4).
        dad: Dad,
    },
}

impl Presence {
    pub fn is_present(&self) -> bool {
        matches!(self, Presence::Present { .. })
    }

    /// On the interface with failoverd's tag.
    pub fn is_ours(&self) -> bool {
        matches!(self, Presence::Present { ours: true, .. })
    }
}

/// The state of IPv6 duplicate address detection for an address on the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dad {
    /// Usable (IPv4 always; IPv6 once DAD passed, or when it was off).
    Done,
    /// DAD runs: the address does not answer yet (`tentative`).
    Tentative,
    /// DAD found another holder: the address will never answer (`dadfailed`).
    Failed,
}

/// How [`Vip::probe`] probes: `count` probes `interval` apart, then it listens `wait`
/// more. RFC 5227's own timers (3 probes 1-2 s apart, 2 s wait) take 4-7 s; these
/// defaults (3 probes 50 ms apart, 150 ms wait: 250 ms in all) suit hosts on one
/// switch, where an answer comes in well under a millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTimers {
    pub count: u32,
    pub interval: Duration,
    pub wait: Duration,
}

impl Default for ProbeTimers {
    fn default() -> Self {
        ProbeTimers {
            count: 3,
            interval: Duration::from_millis(50),
            wait: Duration::from_millis(150),
        }
    }
}

impl ProbeTimers {
    /// The quick probe before a promote's install: one probe, then `interval` of
    /// waiting (an answer on one link comes in well under a millisecond).
    pub fn quick(&self) -> ProbeTimers {
        ProbeTimers {
            count: 1,
            interval: self.interval,
            wait: self.interval,
        }
    }

    /// From the first probe to the end of the wait.
    pub fn total(&self) -> Duration {
        self.interval * self.count.saturating_sub(1) + self.wait
    }
}

impl Vip {
    /// `interface` and `cidr` (`"10.0.0.1/24"`, `"fd00::1/64"`), checked: the prefix
    /// fits the family, the address is not unspecified, loopback or multicast.
    pub fn parse(interface: &str, cidr: &str) -> Result<Vip, VipError> {
        let bad = |reason: &str| VipError::Parse {
            input: cidr.to_string(),
            reason: reason.to_string(),
        };
        let (a, p) = cidr
            .split_once('/')
            .ok_or_else(|| bad("no /PREFIX (write e.g. 10.0.0.1/24)"))?;
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| bad("the address is neither IPv4 nor IPv6"))?;
        let prefix: u8 = p
            .trim()
            .parse()
            .map_err(|_| bad("the prefix is not a number"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(bad(&format!("prefix /{prefix} is longer than /{max}")));
        }
        if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() {
            return Err(bad("an unspecified, loopback or multicast address"));
        }
        if interface.is_empty() {
            return Err(bad("[vip] interface is empty"));
        }
        Ok(Vip {
            interface: interface.to_string(),
            addr,
            prefix,
        })
    }

    /// `10.0.0.1/24`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.addr, self.prefix)
    }

    fn probe_name(&self) -> &'static str {
        if self.addr.is_ipv4() {
            "ARP probe"
        } else {
            "duplicate address detection"
        }
    }

    fn err_timeout(&self, op: Op, after: Duration) -> VipError {
        VipError::Timeout {
            op,
            vip: self.clone(),
            after,
        }
    }

    fn err_netlink(&self, op: Op, e: rtnetlink::Error) -> VipError {
        VipError::Netlink {
            op,
            vip: self.clone(),
            source: netlink_io(e),
        }
    }

    fn err_packet(&self, op: Op, source: Errno) -> VipError {
        VipError::Packet {
            op,
            vip: self.clone(),
            source,
        }
    }

    /// Put the VIP on its interface, tagged with [`FAILOVERD_IFA_PROTO`]. Ok if it is
    /// already there with our tag; [`VipError::NotOurs`] if it is there without (it
    /// is left as it is). For IPv6 the kernel's DAD runs: see [`Vip::present`].
    pub async fn add(&self) -> Result<(), VipError> {
        bounded(self, Op::Add, NETLINK_TIMEOUT, self.add_inner()).await
    }

    async fn add_inner(&self) -> Result<(), VipError> {
        let op = Op::Add;
        let nl = Netlink::open(self, op)?;
        let link = self.link(&nl, op).await?;
        match self.find(&nl, link.index, op).await? {
            Some(m) if is_ours(&m) => return Ok(()),
            Some(_) => return Err(self.not_ours(op)),
            None => {}
        }
        let mut req = nl.handle.address().add(link.index, self.addr, self.prefix);
        req.message_mut()
            .attributes
            .push(AddressAttribute::Protocol(AddressProtocol::from(
                FAILOVERD_IFA_PROTO,
            )));
        match req.execute().await {
            // Read the tag back: a kernel before Linux 5.18 accepts IFA_PROTO and drops
            // it, and an address failoverd cannot recognise as its own it could never
            // remove (not even on a higher epoch). Take it off again at once and refuse.
            Ok(()) => match self.find(&nl, link.index, op).await? {
                Some(m) if !is_ours(&m) => {
                    let del = self.message(link.index, m.header.prefix_len);
                    if let Err(e) = nl.handle.address().del(del).execute().await {
                        return Err(self.err_netlink(Op::Remove, e));
                    }
                    Err(VipError::TagNotKept { vip: self.clone() })
                }
                _ => Ok(()),
            },
            // Added meanwhile (by us or by someone): look again.
            Err(e) if errno_of(&e) == Some(Errno::EEXIST) => {
                match self.find(&nl, link.index, op).await? {
                    Some(m) if is_ours(&m) => Ok(()),
                    Some(_) => Err(self.not_ours(op)),
                    None => Err(self.err_netlink(op, e)),
                }
            }
            Err(e) => Err(self.err_netlink(op, e)),
        }
    }

    /// Take the VIP off its interface if failoverd put it there. Ok if it is absent;
    /// [`VipError::NotOurs`] (and nothing removed) if it is there without our tag.
    pub async fn remove(&self) -> Result<(), VipError> {
        bounded(self, Op::Remove, NETLINK_TIMEOUT, self.remove_inner()).await
    }

    async fn remove_inner(&self) -> Result<(), VipError> {
        let op = Op::Remove;
        let nl = Netlink::open(self, op)?;
        let link = self.link(&nl, op).await?;
        let found = match self.find(&nl, link.index, op).await? {
            None => return Ok(()),
            Some(m) if !is_ours(&m) => return Err(self.not_ours(op)),
            Some(m) => m,
        };
        // The prefix it has on the interface: the kernel deletes by address and prefix.
        let prefix = found.header.prefix_len;
        let msg = self.message(link.index, prefix);
        match nl.handle.address().del(msg).execute().await {
            Ok(()) => Ok(()),
            // Gone meanwhile.
            Err(e) if errno_of(&e) == Some(Errno::EADDRNOTAVAIL) => Ok(()),
            Err(e) => Err(self.err_netlink(op, e)),
        }
    }

    /// The netlink message naming this address with `prefix` on interface `index`.
    fn message(&self, index: u32, prefix: u8) -> AddressMessage {
        match self.addr {
            IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(index)
                .address(a, prefix)
                .build(),
            IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(index)
                .address(a, prefix)
                .build(),
        }
    }

    /// Whether the VIP is on its interface, whether it is ours, and (IPv6) its DAD state.
    pub async fn present(&self) -> Result<Presence, VipError> {
        bounded(self, Op::Look, NETLINK_TIMEOUT, async {
            let nl = Netlink::open(self, Op::Look)?;
            let link = self.link(&nl, Op::Look).await?;
            Ok(match self.find(&nl, link.index, Op::Look).await? {
                None => Presence::Absent,
                Some(m) => Presence::Present {
                    ours: is_ours(&m),
                    prefix: m.header.prefix_len,
                    dad: dad_state(&m),
                },
            })
        })
        .await
    }

    /// The Ethernet address of the VIP's interface (what [`Vip::watch_conflicts`]
    /// needs as `own_mac`).
    pub async fn mac(&self) -> Result<Mac, VipError> {
        bounded(self, Op::Look, NETLINK_TIMEOUT, async {
            let nl = Netlink::open(self, Op::Look)?;
            let link = self.link(&nl, Op::Look).await?;
            link.mac.ok_or_else(|| VipError::NoMac {
                op: Op::Look,
                vip: self.clone(),
            })
        })
        .await
    }

    /// Ask the link whether anyone holds the VIP, without claiming it: `Some(mac)` of
    /// the first host that did (an ARP reply or request with sender IP = VIP, or another
    /// host's probe for it; for IPv6 a Neighbour Advertisement for it, or another
    /// host's DAD solicitation), `None` if nobody did within [`ProbeTimers::total`].
    /// The address is not added (also for IPv6). Returns at the first answer.
    pub async fn probe(&self, timers: ProbeTimers) -> Result<Option<Mac>, VipError> {
        let op = Op::Probe;
        if timers.count == 0 || timers.count > MAX_ROUNDS || timers.total() > MAX_DURATION {
            return Err(VipError::Timers {
                op,
                vip: self.clone(),
                reason: format!(
                    "{} probes over {:?}: 1 to {MAX_ROUNDS} probes within {MAX_DURATION:?}",
                    timers.count,
                    timers.total()
                ),
            });
        }
        let (index, own) = self.index_and_mac(op).await?;
        let guard = timers.total() + NETLINK_TIMEOUT;
        bounded(self, op, guard, self.probe_inner(index, own, timers)).await
    }

    async fn probe_inner(
        &self,
        index: u32,
        own: Mac,
        timers: ProbeTimers,
    ) -> Result<Option<Mac>, VipError> {
        let op = Op::Probe;
        let (ethertype, probe, to) = match self.addr {
            IpAddr::V4(a) => (
                ETH_P_ARP,
                arp::arp_probe(own, a).to_bytes().to_vec(),
                BROADCAST,
            ),
            IpAddr::V6(a) => {
                let (p, to) = arp::ndp_dad_solicit(a);
                (ETH_P_IPV6, p, to)
            }
        };
        let sock = PacketSocket::open(index, ethertype).map_err(|e| self.err_packet(op, e))?;
        let start = Instant::now();
        let end = start + timers.total();
        let mut sent = 0u32;
        loop {
            let now = Instant::now();
            let next_send = start + timers.interval * sent;
            if sent < timers.count && now >= next_send {
                sock.send(&probe, to)
                    .await
                    .map_err(|e| self.err_packet(op, e))?;
                tracing::debug!(vip = %self, n = sent + 1, "probe sent");
                sent += 1;
                continue;
            }
            if sent >= timers.count && now >= end {
                return Ok(None);
            }
            let until = if sent < timers.count { next_send } else { end };
            match tokio::time::timeout_at(until, sock.recv()).await {
                Err(_elapsed) => continue,
                Ok(Err(e)) => return Err(self.err_packet(op, e)),
                Ok(Ok(frame)) => {
                    if let Some(mac) = self.claimant(&frame, own, true) {
                        tracing::debug!(vip = %self, %mac, "probe answered");
                        return Ok(Some(mac));
                    }
                }
            }
        }
    }

    /// The MAC of another host that `frame` shows claiming (or, with `probes`, probing
    /// for) the VIP; `None` if it does not.
    fn claimant(&self, frame: &arp::Frame, own: Mac, probes: bool) -> Option<Mac> {
        match self.addr {
            IpAddr::V4(vip) => {
                let a = arp::parse_arp(&frame.payload)?;
                if a.sha == own {
                    return None;
                }
                let claims = a.spa == vip;
                let probing =
                    probes && a.op == ARP_REQUEST && a.spa.is_unspecified() && a.tpa == vip;
                (claims || probing).then_some(a.sha)
            }
            IpAddr::V6(vip) => {
                let n = arp::parse_ndp(&frame.payload)?;
                if n.target != vip || frame.from == own {
                    return None;
                }
                let mac = n.lladdr.unwrap_or(frame.from);
                if mac == own {
                    return None;
                }
                let advert = n.kind == arp::ND_NEIGHBOR_ADVERT;
                let probing =
                    probes && n.kind == arp::ND_NEIGHBOR_SOLICIT && n.src.is_unspecified();
                (advert || probing).then_some(mac)
            }
        }
    }

    /// Tell the link that this host now holds the VIP: `count` rounds `interval`
    /// apart, each a gratuitous ARP request and a gratuitous ARP reply (IPv6: one
    /// unsolicited Neighbour Advertisement with Override). Neighbours that have an
    /// entry for the VIP update it at once; with `arp_accept=0` (Linux's default) they
    /// do not create one. Call it only while holding the address.
    pub async fn announce(&self, count: u32, interval: Duration) -> Result<(), VipError> {
        let op = Op::Announce;
        let total = interval * count.saturating_sub(1);
        if count == 0 || count > MAX_ROUNDS || total > MAX_DURATION {
            return Err(VipError::Timers {
                op,
                vip: self.clone(),
                reason: format!(
                    "{count} rounds {interval:?} apart: 1 to {MAX_ROUNDS} rounds within \
                     {MAX_DURATION:?}"
                ),
            });
        }
        let (index, own) = self.index_and_mac(op).await?;
        bounded(self, op, total + NETLINK_TIMEOUT, async {
            let (ethertype, frames) = match self.addr {
                IpAddr::V4(a) => (
                    ETH_P_ARP,
                    vec![
                        (
                            arp::arp_announce(own, a, ARP_REQUEST).to_bytes().to_vec(),
                            BROADCAST,
                        ),
                        (
                            arp::arp_announce(own, a, ARP_REPLY).to_bytes().to_vec(),
                            BROADCAST,
                        ),
                    ],
                ),
                IpAddr::V6(a) => (ETH_P_IPV6, vec![arp::ndp_unsolicited_advert(own, a)]),
            };
            let sock = PacketSocket::open(index, ethertype).map_err(|e| self.err_packet(op, e))?;
            for round in 0..count {
                if round > 0 {
                    tokio::time::sleep(interval).await;
                }
                for (frame, to) in &frames {
                    sock.send(frame, *to)
                        .await
                        .map_err(|e| self.err_packet(op, e))?;
                }
                tracing::debug!(vip = %self, round = round + 1, "announced");
            }
            Ok(())
        })
        .await
    }

    /// While holding the VIP: a stream of the MACs of other hosts that claim it (ARP
    /// with sender IP = the VIP from a MAC other than `own_mac`; IPv6: a Neighbour
    /// Advertisement for it from another MAC), one item per message seen. The socket is
    /// opened now (in the calling thread's namespace, inside a tokio runtime); the
    /// stream ends after its first error. Drop it to stop watching.
    pub fn watch_conflicts(
        &self,
        own_mac: Mac,
    ) -> Result<impl Stream<Item = Result<Mac, VipError>> + Send + 'static, VipError> {
        let op = Op::Watch;
        let index = nix::net::if_::if_nametoindex(self.interface.as_str()).map_err(|e| {
            if e == Errno::ENODEV {
                VipError::NoInterface {
                    op,
                    vip: self.clone(),
                }
            } else {
                self.err_packet(op, e)
            }
        })?;
        let ethertype = if self.addr.is_ipv4() {
            ETH_P_ARP
        } else {
            ETH_P_IPV6
        };
        let sock = PacketSocket::open(index, ethertype).map_err(|e| self.err_packet(op, e))?;
        let vip = self.clone();
        Ok(futures_util::stream::unfold(
            Some((sock, vip)),
            move |state| async move {
                let (sock, vip) = state?;
                loop {
                    match sock.recv().await {
                        Err(e) => {
                            let err = vip.err_packet(Op::Watch, e);
                            return Some((Err(err), None));
                        }
                        Ok(frame) => {
                            if let Some(mac) = vip.claimant(&frame, own_mac, false) {
                                tracing::debug!(vip = %vip, %mac, "another host claims the VIP");
                                return Some((Ok(mac), Some((sock, vip))));
                            }
                        }
                    }
                }
            },
        ))
    }

    async fn index_and_mac(&self, op: Op) -> Result<(u32, Mac), VipError> {
        bounded(self, op, NETLINK_TIMEOUT, async {
            let nl = Netlink::open(self, op)?;
            let link = self.link(&nl, op).await?;
            let mac = link.mac.ok_or_else(|| VipError::NoMac {
                op,
                vip: self.clone(),
            })?;
            Ok((link.index, mac))
        })
        .await
    }

    async fn link(&self, nl: &Netlink, op: Op) -> Result<Link, VipError> {
        match link_by_name(&nl.handle, &self.interface).await {
            Ok(Some(l)) => Ok(l),
            Ok(None) => Err(VipError::NoInterface {
                op,
                vip: self.clone(),
            }),
            Err(e) => Err(self.err_netlink(op, e)),
        }
    }

    /// The address message of the VIP on interface `index` (any prefix), if there.
    async fn find(
        &self,
        nl: &Netlink,
        index: u32,
        op: Op,
    ) -> Result<Option<AddressMessage>, VipError> {
        let all = addresses(&nl.handle, index)
            .await
            .map_err(|e| self.err_netlink(op, e))?;
        Ok(all.into_iter().find(|m| address_of(m) == Some(self.addr)))
    }

    fn not_ours(&self, op: Op) -> VipError {
        VipError::NotOurs {
            op,
            vip: self.clone(),
        }
    }

    /// This host's own address on the VIP's interface, of the VIP's family and never
    /// the VIP itself: the source of what this host says about the VIP while it does
    /// not hold it (`crate::unreach`). Preferred: for IPv6 a global address (not
    /// fe80::/10) over a link-local one; then one whose subnet holds the VIP. Tentative
    /// and dadfailed addresses are passed over. `None` if the interface has no such
    /// address.
    pub async fn own_address(&self) -> Result<Option<IpAddr>, VipError> {
        let op = Op::Look;
        bounded(self, op, NETLINK_TIMEOUT, async {
            let nl = Netlink::open(self, op)?;
            let link = self.link(&nl, op).await?;
            let all = addresses(&nl.handle, link.index)
                .await
                .map_err(|e| self.err_netlink(op, e))?;
            let link_local = |a: IpAddr| match a {
                IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
                IpAddr::V4(_) => false,
            };
            Ok(all
                .iter()
                .filter(|m| dad_state(m) == Dad::Done)
                .filter_map(|m| Some((address_of(m)?, m.header.prefix_len)))
                .filter(|(a, _)| a.is_ipv4() == self.addr.is_ipv4() && *a != self.addr)
                // The smallest key wins, and the first of equals: kernel order.
                .min_by_key(|(a, p)| (link_local(*a), !same_subnet(*a, *p, self.addr)))
                .map(|(a, _)| a))
        })
        .await
    }
}

/// Check that the VIP can work on this host (for `failoverd check`); changes nothing.
/// Each problem is one line: the interface exists; the address lies in a subnet
/// already configured on it (so it is reachable on that link); the process has
/// CAP_NET_ADMIN (to add and remove addresses) and CAP_NET_RAW (ARP).
pub async fn check(vip: &Vip) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let facts = tokio::time::timeout(NETLINK_TIMEOUT, interface_facts(vip)).await;
    match facts {
        Err(_) => problems.push(format!(
            "cannot read the interfaces: netlink gave no answer within {NETLINK_TIMEOUT:?}"
        )),
        Ok(Err(e)) => problems.push(e),
        Ok(Ok(None)) => {}
        Ok(Ok(Some(p))) => problems.push(p),
    }
    match tokio::fs::read_to_string("/proc/self/status").await {
        Err(e) => problems.push(format!(
            "cannot read /proc/self/status to check capabilities: {e}"
        )),
        Ok(status) => match effective_caps(&status) {
            None => problems.push(
                "cannot check capabilities: /proc/self/status has no CapEff line".to_string(),
            ),
            Some(eff) => {
                for (bit, name, why) in [
                    (12, "CAP_NET_ADMIN", "to add and remove the address"),
                    (13, "CAP_NET_RAW", "for ARP probes and announcements"),
                ] {
                    if eff & (1u64 << bit) == 0 {
                        problems.push(format!(
                            "failoverd lacks {name} ({why}): run it as root or grant it \
                             (systemd: AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW)"
                        ));
                    }
                }
            }
        },
    }
    match tokio::fs::read_to_string("/proc/sys/kernel/osrelease").await {
        Err(e) => problems.push(format!(
            "cannot read /proc/sys/kernel/osrelease to check the kernel keeps address tags: {e}"
        )),
        Ok(release) => {
            if let Some(p) = kernel_problem(release.trim()) {
                problems.push(p);
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Why failoverd cannot tag addresses on the kernel `release` (`6.1.0-18-amd64`): the
/// IFA_PROTO attribute is kept from Linux 5.18 on.
fn kernel_problem(release: &str) -> Option<String> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    match (major, minor) {
        (Some(major), Some(minor)) if (major, minor) >= (5, 18) => None,
        (Some(_), Some(_)) => Some(format!(
            "the kernel {release} does not keep address tags (IFA_PROTO, Linux 5.18 or \
             later): failoverd could not recognise its own address"
        )),
        _ => Some(format!(
            "cannot tell whether the kernel {release:?} keeps address tags (Linux 5.18 or later)"
        )),
    }
}

/// `Ok(None)` if the interface exists and the VIP is in one of its subnets; `Ok(Some)`
/// with the problem if not; `Err` if netlink failed.
async fn interface_facts(vip: &Vip) -> Result<Option<String>, String> {
    let nl = Netlink::open(vip, Op::Look).map_err(|e| e.to_string())?;
    let link = match link_by_name(&nl.handle, &vip.interface).await {
        Ok(Some(l)) => l,
        Ok(None) => {
            return Ok(Some(format!(
                "vip.interface {} does not exist on this host",
                vip.interface
            )))
        }
        Err(e) => return Err(format!("cannot read the interfaces: {}", netlink_io(e))),
    };
    let all = addresses(&nl.handle, link.index).await.map_err(|e| {
        format!(
            "cannot read the addresses of {}: {}",
            vip.interface,
            netlink_io(e)
        )
    })?;
    let nets: Vec<(IpAddr, u8)> = all
        .iter()
        .filter_map(|m| Some((address_of(m)?, m.header.prefix_len)))
        .filter(|(a, _)| a.is_ipv4() == vip.addr.is_ipv4() && *a != vip.addr)
        .collect();
    if nets.iter().any(|(a, p)| same_subnet(*a, *p, vip.addr)) {
        return Ok(None);
    }
    let family = if vip.addr.is_ipv4() { "IPv4" } else { "IPv6" };
    let has = if nets.is_empty() {
        format!("{} has no {family} address", vip.interface)
    } else {
        let list: Vec<String> = nets.iter().map(|(a, p)| format!("{a}/{p}")).collect();
        format!("{} has {}", vip.interface, list.join(", "))
    };
    Ok(Some(format!(
        "vip.address {} is in no subnet of {} ({has}): clients on that link could not reach it",
        vip.cidr(),
        vip.interface
    )))
}

/// Whether `b` lies in the subnet `a/prefix`.
fn same_subnet(a: IpAddr, prefix: u8, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// The effective capability set from the text of `/proc/self/status`.
fn effective_caps(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// A netlink connection of its own; its task is stopped when this is dropped.
struct Netlink {
    handle: Handle,
    conn: tokio::task::JoinHandle<()>,
}

impl Netlink {
    fn open(vip: &Vip, op: Op) -> Result<Netlink, VipError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|source| VipError::Netlink {
                op,
                vip: vip.clone(),
                source,
            })?;
        Ok(Netlink {
            handle,
            conn: tokio::spawn(conn),
        })
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// What the shell needs of an interface.
struct Link {
    index: u32,
    mac: Option<Mac>,
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<Link>, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(Some(link_of(&m))),
        Ok(None) => Ok(None),
        Err(e) if errno_of(&e) == Some(Errno::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

fn link_of(m: &LinkMessage) -> Link {
    let mac = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b)
            if b.len() == 6 && !m.header.flags.contains(LinkFlags::Loopback) =>
        {
            let mut o = [0u8; 6];
            o.copy_from_slice(b);
            Some(Mac(o))
        }
        _ => None,
    });
    Link {
        index: m.header.index,
        mac,
    }
}

async fn addresses(handle: &Handle, index: u32) -> Result<Vec<AddressMessage>, rtnetlink::Error> {
    handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
}

/// The address an address message is about (IFA_LOCAL for IPv4, IFA_ADDRESS for IPv6).
fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    let want_local = m.header.family == AddressFamily::Inet;
    let mut fallback = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) if want_local => return Some(*ip),
            AddressAttribute::Address(ip) if !want_local => return Some(*ip),
            AddressAttribute::Address(ip) => fallback = Some(*ip),
            _ => {}
        }
    }
    fallback
}

fn is_ours(m: &AddressMessage) -> bool {
    m.attributes
        .iter()
        .any(|a| matches!(a, AddressAttribute::Protocol(p) if u8::from(*p) == FAILOVERD_IFA_PROTO))
}

fn dad_state(m: &AddressMessage) -> Dad {
    let flags = m
        .attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(m.header.flags.bits())));
    if flags.contains(AddressFlags::Dadfailed) {
        Dad::Failed
    } else if flags.contains(AddressFlags::Tentative) {
        Dad::Tentative
    } else {
        Dad::Done
    }
}

fn errno_of(e: &rtnetlink::Error) -> Option<Errno> {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => {
            Some(Errno::from_raw(m.raw_code().abs()))
        }
        _ => None,
    }
}

fn netlink_io(e: rtnetlink::Error) -> std::io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => std::io::Error::other(other.to_string()),
    }
}

/// Run `f`, failing with [`VipError::Timeout`] after `after`.
async fn bounded<T>(
    vip: &Vip,
    op: Op,
    after: Duration,
    f: impl std::future::Future<Output = Result<T, VipError>>,
) -> Result<T, VipError> {
    tokio::time::timeout(after, f)
        .await
        .unwrap_or_else(|_| Err(vip.err_timeout(op, after)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v4_and_v6_and_refuses_nonsense() {
        let v = Vip::parse("eth0", "10.0.0.1/24").unwrap();
        assert_eq!(
            (v.addr, v.prefix),
            (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 24)
        );
        assert_eq!(v.to_string(), "10.0.0.1/24 on eth0");
        let v = Vip::parse("eth0", "fd00::1/64").unwrap();
        assert_eq!(v.cidr(), "fd00::1/64");
        for bad in [
            "10.0.0.1",
            "10.0.0.1/33",
            "fd00::1/129",
            "10.0.0/24",
            "0.0.0.0/0",
            "127.0.0.1/8",
            "224.0.0.1/4",
            "10.0.0.1/x",
        ] {
            let e = Vip::parse("eth0", bad).unwrap_err();
            assert!(
                e.to_string().starts_with(&format!("vip.address {bad:?}")),
                "{e}"
            );
        }
        assert!(Vip::parse("", "10.0.0.1/24").is_err());
    }

    #[test]
    fn subnets() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(same_subnet(a("10.0.0.2"), 24, a("10.0.0.1")));
        assert!(!same_subnet(a("10.0.0.2"), 24, a("10.0.1.1")));
        assert!(same_subnet(a("10.0.0.2"), 0, a("192.168.1.1")));
        assert!(same_subnet(a("10.0.0.2"), 32, a("10.0.0.2")));
        assert!(same_subnet(a("fd00::2"), 64, a("fd00::1")));
        assert!(!same_subnet(a("fd00::2"), 64, a("fd00:0:0:1::1")));
        assert!(!same_subnet(a("fd00::2"), 64, a("10.0.0.1")));
    }

    #[test]
    fn capabilities_from_proc_status() {
        let s = "Name:\tx\nCapEff:\t0000000000003000\n";
        assert_eq!(effective_caps(s), Some(0x3000));
        assert_eq!(effective_caps("Name: x\n"), None);
        assert_eq!(effective_caps("CapEff:\tzz\n"), None);
    }

    #[test]
    fn kernels_before_5_18_are_named_as_not_keeping_tags() {
        for ok in ["5.18.0", "6.1.0-18-amd64", "6.18.44-fc-v1045", "10.0"] {
            assert_eq!(kernel_problem(ok), None, "{ok}");
        }
        for old in ["5.17.15", "4.19.0-26-amd64", "3.10"] {
            let p = kernel_problem(old).unwrap();
            assert!(p.contains(old) && p.contains("5.18"), "{p}");
        }
        assert!(kernel_problem("weird").unwrap().contains("cannot tell"));
    }

    #[test]
    fn operator_lines_name_object_and_cause() {
        let vip = Vip::parse("eth0", "10.0.0.1/24").unwrap();
        let mac: Mac = "52:54:00:aa:bb:cc".parse().unwrap();
        assert_eq!(
            VipError::Held {
                vip: vip.clone(),
                mac
            }
            .to_string(),
            "refusing to claim 10.0.0.1/24 on eth0: host 52:54:00:aa:bb:cc answered the ARP probe"
        );
        let e = VipError::NotOurs {
            op: Op::Remove,
            vip: vip.clone(),
        };
        assert_eq!(
            e.to_string(),
            "refusing to remove 10.0.0.1/24 on eth0: the address is on eth0 without \
             failoverd's tag (IFA_PROTO 250), so failoverd did not add it; if it must go, \
             remove it by hand (ip addr del 10.0.0.1/24 dev eth0)"
        );
        let e = VipError::Packet {
            op: Op::Probe,
            vip,
            source: Errno::EPERM,
        };
        assert!(e.to_string().contains("needs CAP_NET_RAW"), "{e}");
    }

    #[test]
    fn probe_timers_default_short_and_bounded() {
        let t = ProbeTimers::default();
        assert_eq!(t.total(), Duration::from_millis(250));
    }
}
