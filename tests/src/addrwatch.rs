//! The checker of record for "at most one host holds the virtual IP": in each network
//! namespace of a lab, the kernel's own address events (rtnetlink notifications, not
//! polling) turned into holder intervals, and [`AddrWatch::assert_no_overlap`] failing
//! the test, with every interval and event printed, if two namespaces held the VIP at
//! any instant.
//!
//! # How
//!
//! One thread per namespace joins it and opens a `NETLINK_ROUTE` socket there (a
//! socket stays in the namespace it was made in), subscribed to `RTNLGRP_LINK`,
//! `RTNLGRP_IPV4_IFADDR` and `RTNLGRP_IPV6_IFADDR`. The state is seeded by a dump of
//! the links and then of the addresses **on the same socket, after subscribing**:
//! notifications and dump answers come out of one queue in the kernel's order, so no
//! event falls between the seed and the stream. Each `RTM_NEWADDR`/`RTM_DELADDR` for
//! the VIP and each `RTM_NEWLINK`/`RTM_DELLINK` updates the namespace's state, and each
//! change of "holds the VIP" opens or closes an interval stamped with
//! [`Instant::now`] at receipt. All namespaces share one kernel, so one monotonic clock:
//! timestamps of different namespaces compare directly. A receipt stamp trails the
//! kernel's change by the reader's wake-up latency (microseconds to a few ms on a busy
//! machine); a handover tighter than that could be misjudged either way.
//!
//! # What counts as holding
//!
//! [`Counting::Reachable`] (the default, and what [`AddrWatch::start`] uses): the VIP
//! is on an interface that is administratively up **and** has carrier (`IFF_UP` and
//! `IFF_LOWER_UP`), and (IPv6) is neither tentative nor dadfailed. That is "the kernel
//! answers ARP/ND for it on a live link": the holder the LAN can see. An address left on
//! a link that went down does not count while the link is down, and counts again the
//! moment the link comes back with it (an overlap then, if someone else holds it): the
//! demo of issue 15 takes the old live host's link down with the address on it.
//!
//! [`Counting::AnyAddress`] (stricter): the VIP on any interface counts, whatever the
//! link or DAD state. Tests that want it and take a link down with the address on it
//! must also remove the address (or the namespace).
//!
//! # Soundness
//!
//! A lost notification would make the verdict worthless, so the socket has a 4 MiB
//! receive buffer and an overrun (`ENOBUFS`), a dump interrupted by a change
//! (`NLM_F_DUMP_INTR`), or any netlink error becomes a **fault**: `assert_no_overlap`
//! then fails naming it, rather than pass on partial data. Before judging,
//! [`AddrWatch::sync`] makes each thread send a fresh dump request and wait for its end:
//! every event before the call is then in.
//!
//! It must never change anything in a namespace (it only listens and dumps), and never
//! outlive its lab (it borrows the hosts, or, from [`AddrWatch::start_owned`], is
//! dropped by its owner before the lab; dropping it stops and joins its threads within
//! [`RECV_TICK`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;
use rtnetlink::packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkFlags, LinkMessage};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket};

use crate::netns::Host;

/// How long a reader thread blocks in one `recv` before it looks at its commands (stop,
/// sync). Not a poll of the state: events wake it at once.
pub const RECV_TICK: Duration = Duration::from_millis(50);
/// The longest [`AddrWatch::start`] and [`AddrWatch::sync`] wait for the threads.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RX_BUFFER: usize = 4 << 20;

/// What counts as holding the VIP. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counting {
    /// On an interface that is up with carrier, and (IPv6) not tentative nor dadfailed.
    Reachable,
    /// On any interface, in any state.
    AnyAddress,
}

/// A stretch of time a namespace held the VIP, from the watch's start; `to` is `None`
/// while it still holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval {
    pub from: Duration,
    pub to: Option<Duration>,
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        match self.to {
            Some(t) => write!(f, "[{:.3} ms, {:.3} ms)", ms(self.from), ms(t)),
            None => write!(f, "[{:.3} ms, still held)", ms(self.from)),
        }
    }
}

/// Two namespaces that held the VIP at once, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub a: String,
    pub b: String,
    pub from: Duration,
    pub to: Duration,
}

/// The per-namespace address watch. See the module documentation.
pub struct AddrWatch<'lab> {
    vip: IpAddr,
    counting: Counting,
    start: Instant,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    _lab: std::marker::PhantomData<&'lab Host>,
}

struct Shared {
    state: Mutex<Vec<NsState>>,
    changed: Condvar,
    stop: AtomicBool,
}

/// What one namespace's thread knows.
struct NsState {
    ns: String,
    /// Links by index: (up, carrier).
    links: HashMap<u32, (bool, bool)>,
    /// The VIP's copies by interface index: (tentative, dadfailed).
    copies: HashMap<u32, (bool, bool)>,
    held_since: Option<Instant>,
    closed: Vec<(Instant, Instant)>,
    /// What happened, for the report: (when, what).
    log: Vec<(Instant, String)>,
    seeded: bool,
    sync_wanted: u32,
    sync_done: u32,
    fault: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<'lab> AddrWatch<'lab> {
    /// Watch `vip` in each host's namespace, counting [`Counting::Reachable`] copies.
    /// Returns once every namespace is seeded (panics after [`SYNC_TIMEOUT`]).
    pub fn start(vip: IpAddr, hosts: &[&'lab Host]) -> AddrWatch<'lab> {
        AddrWatch::start_counting(vip, hosts, Counting::Reachable)
    }

    /// [`AddrWatch::start`] with the given rule of what counts as holding.
    pub fn start_counting(
        vip: IpAddr,
        hosts: &[&'lab Host],
        counting: Counting,
    ) -> AddrWatch<'lab> {
        let names: Vec<&str> = hosts.iter().map(|h| h.ns()).collect();
        AddrWatch::start_named(vip, &names, counting)
    }

    /// [`AddrWatch::start`] for an owner that keeps the watch beside the lab it watches
    /// (`Pair` in `tests/failover_netns.rs` owns both, so that the watch runs from before
    /// its first failoverd starts to its drop): the namespaces by name, nothing borrowed.
    /// The owner must drop the watch before the lab (declare its field before the lab's:
    /// fields drop in order); a watch that outlived its lab would keep the namespaces
    /// alive in its threads until it is dropped.
    pub fn start_owned(vip: IpAddr, hosts: &[&Host]) -> AddrWatch<'static> {
        let names: Vec<&str> = hosts.iter().map(|h| h.ns()).collect();
        AddrWatch::start_named(vip, &names, Counting::Reachable)
    }

    fn start_named(vip: IpAddr, hosts: &[&str], counting: Counting) -> AddrWatch<'lab> {
        let start = Instant::now();
        let shared = Arc::new(Shared {
            state: Mutex::new(
                hosts
                    .iter()
                    .map(|h| NsState {
                        ns: h.to_string(),
                        links: HashMap::new(),
                        copies: HashMap::new(),
                        held_since: None,
                        closed: Vec::new(),
                        log: Vec::new(),
                        seeded: false,
                        sync_wanted: 0,
                        sync_done: 0,
                        fault: None,
                    })
                    .collect(),
            ),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut watch = AddrWatch {
            vip,
            counting,
            start,
            shared: Arc::clone(&shared),
            threads: Vec::new(),
            _lab: std::marker::PhantomData,
        };
        for (i, h) in hosts.iter().enumerate() {
            let (shared, ns) = (Arc::clone(&shared), h.to_string());
            let t = std::thread::Builder::new()
                .name(format!("addrwatch-{i}"))
                .spawn(move || {
                    let r = crate::netns::enter_ns(&ns)
                        .and_then(|()| reader(&shared, i, vip, counting));
                    if let Err(e) = r {
                        let mut st = lock(&shared.state);
                        st[i].fault.get_or_insert(format!("{ns}: {e}"));
                        drop(st);
                        shared.changed.notify_all();
                    }
                })
                .unwrap_or_else(|e| panic!("addrwatch: cannot start a thread: {e}"));
            watch.threads.push(t);
        }
        watch.wait_all("seed the address state", |s| s.seeded || s.fault.is_some());
        if let Some(f) = watch.faults().first() {
            panic!("addrwatch for {vip}: {f}");
        }
        watch
    }

    /// Wait until every event that happened before this call has been read, in every
    /// namespace (each thread dumps the addresses anew and waits for the dump's end).
    pub fn sync(&self) {
        {
            let mut st = lock(&self.shared.state);
            for s in st.iter_mut() {
                s.sync_wanted += 1;
            }
        }
        self.wait_all("sync", |s| {
            s.sync_done >= s.sync_wanted || s.fault.is_some()
        });
    }

    fn wait_all(&self, what: &str, done: impl Fn(&NsState) -> bool) {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let mut st = lock(&self.shared.state);
        while !st.iter().all(&done) {
            let now = Instant::now();
            assert!(
                now < deadline,
                "addrwatch for {}: could not {what} within {SYNC_TIMEOUT:?}",
                self.vip
            );
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// The namespaces holding the VIP now (after a [`AddrWatch::sync`]).
    pub fn holders(&self) -> Vec<String> {
        self.sync();
        lock(&self.shared.state)
            .iter()
            .filter(|s| s.held_since.is_some())
            .map(|s| s.ns.clone())
            .collect()
    }

    /// Wait (at most `timeout`) until the holders are exactly `want` (namespace names);
    /// event-driven: wakes at each change. Returns whether they were.
    pub fn wait_holders(&self, want: &[&str], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let is = |st: &Vec<NsState>| {
            let mut h: Vec<&str> = st
                .iter()
                .filter(|s| s.held_since.is_some())
                .map(|s| s.ns.as_str())
                .collect();
            let mut w = want.to_vec();
            h.sort_unstable();
            w.sort_unstable();
            h == w
        };
        let mut st = lock(&self.shared.state);
        loop {
            if is(&st) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Every namespace's holder intervals so far (after a [`AddrWatch::sync`]).
    pub fn intervals(&self) -> BTreeMap<String, Vec<Interval>> {
        self.sync();
        let st = lock(&self.shared.state);
        st.iter()
            .map(|s| (s.ns.clone(), self.intervals_of(s)))
            .collect()
    }

    fn intervals_of(&self, s: &NsState) -> Vec<Interval> {
        let since = |t: Instant| t.saturating_duration_since(self.start);
        let mut v: Vec<Interval> = s
            .closed
            .iter()
            .map(|(a, b)| Interval {
                from: since(*a),
                to: Some(since(*b)),
            })
            .collect();
        if let Some(a) = s.held_since {
            v.push(Interval {
                from: since(a),
                to: None,
            });
        }
        v
    }

    fn faults(&self) -> Vec<String> {
        lock(&self.shared.state)
            .iter()
            .filter_map(|s| s.fault.clone())
            .collect()
    }

    /// Every pair of namespaces that held the VIP at the same instant (intervals are
    /// half-open; one still open runs to now).
    pub fn overlaps(&self) -> Vec<Overlap> {
        let now = Instant::now().saturating_duration_since(self.start);
        let all: Vec<(String, Vec<Interval>)> = self.intervals().into_iter().collect();
        let mut out = Vec::new();
        for (i, (na, ia)) in all.iter().enumerate() {
            for (nb, ib) in &all[i + 1..] {
                for x in ia {
                    for y in ib {
                        let from = x.from.max(y.from);
                        let to = x.to.unwrap_or(now).min(y.to.unwrap_or(now));
                        if from < to {
                            out.push(Overlap {
                                a: na.clone(),
                                b: nb.clone(),
                                from,
                                to,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// Fail (panic) if two namespaces held the VIP at any instant, or if the watch lost
    /// events; the message has every interval and every event seen.
    pub fn assert_no_overlap(&self) {
        if let Err(msg) = self.verdict() {
            panic!("{msg}");
        }
    }

    /// What [`AddrWatch::assert_no_overlap`] judges, as a value: `Err` with every
    /// interval and event seen if two namespaces held the VIP at any instant, or if the
    /// watch lost events (for a `Drop` that reports before it panics).
    pub fn verdict(&self) -> Result<(), String> {
        let overlaps = self.overlaps();
        let faults = self.faults();
        if overlaps.is_empty() && faults.is_empty() {
            return Ok(());
        }
        let mut msg = format!("at most one holder of {} ({:?}): ", self.vip, self.counting);
        if !faults.is_empty() {
            let _ = write!(msg, "the watch is unsound: {}; ", faults.join("; "));
        }
        for o in &overlaps {
            let _ = write!(
                msg,
                "{} and {} both held it from {:.3} ms to {:.3} ms; ",
                o.a,
                o.b,
                o.from.as_secs_f64() * 1000.0,
                o.to.as_secs_f64() * 1000.0
            );
        }
        msg.push_str(&self.report());
        Err(msg)
    }

    /// Every namespace's intervals and event log, one per line (ms since the start).
    pub fn report(&self) -> String {
        let mut out = String::from("\n");
        let st = lock(&self.shared.state);
        for s in st.iter() {
            let iv: Vec<String> = self.intervals_of(s).iter().map(|i| i.to_string()).collect();
            let _ = writeln!(out, "  {} held: {}", s.ns, iv.join(" "));
            for (t, what) in &s.log {
                let ms = t.saturating_duration_since(self.start).as_secs_f64() * 1000.0;
                let _ = writeln!(out, "    {ms:10.3} ms  {what}");
            }
        }
        out
    }
}

impl Drop for AddrWatch<'_> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One namespace's reader: subscribe, seed, then read events until told to stop.
fn reader(shared: &Shared, i: usize, vip: IpAddr, counting: Counting) -> Result<(), String> {
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| format!("netlink socket: {e}"))?;
    sock.bind_auto().map_err(|e| format!("netlink bind: {e}"))?;
    for g in [RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR] {
        sock.add_membership(g)
            .map_err(|e| format!("netlink group {g}: {e}"))?;
    }
    sock.set_rx_buf_sz(RX_BUFFER)
        .map_err(|e| format!("netlink receive buffer: {e}"))?;
    let tick = TimeVal::new(0, RECV_TICK.as_micros() as i64);
    setsockopt(&sock, sockopt::ReceiveTimeout, &tick)
        .map_err(|e| format!("netlink receive timeout: {e}"))?;

    let mut r = Reader {
        shared,
        i,
        vip,
        counting,
        sock,
        seq: 0,
        buf: Vec::with_capacity(1 << 16),
    };
    r.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
    r.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
    {
        let mut st = lock(&shared.state);
        st[i].seeded = true;
        st[i].log.push((Instant::now(), "seeded".into()));
    }
    shared.changed.notify_all();
    while !shared.stop.load(Ordering::SeqCst) {
        let wanted = lock(&shared.state)[i].sync_wanted;
        if wanted > lock(&shared.state)[i].sync_done {
            r.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
            lock(&shared.state)[i].sync_done = wanted;
            shared.changed.notify_all();
            continue;
        }
        r.read_once()?;
    }
    Ok(())
}

struct Reader<'a> {
    shared: &'a Shared,
    i: usize,
    vip: IpAddr,
    counting: Counting,
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Reader<'_> {
    /// Send a dump request and read (applying every message, events included) until
    /// its end. Bounded by [`SYNC_TIMEOUT`].
    fn dump(&mut self, req: RouteNetlinkMessage) -> Result<(), String> {
        self.seq += 1;
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(req));
        msg.finalize();
        let mut bytes = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut bytes);
        self.sock
            .send(&bytes, 0)
            .map_err(|e| format!("netlink dump request: {e}"))?;
        let deadline = Instant::now() + SYNC_TIMEOUT;
        loop {
            if self.read_once()? == Some(seq) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "netlink dump {seq} did not end within {SYNC_TIMEOUT:?}"
                ));
            }
        }
    }

    /// Read one datagram (or time out after [`RECV_TICK`]) and apply its messages.
    /// Returns the sequence number of a dump that ended in it, if any.
    fn read_once(&mut self) -> Result<Option<u32>, String> {
        self.buf.clear();
        match self.sock.recv(&mut self.buf, 0) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(None),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => {
                return Err("the kernel dropped address events (ENOBUFS): verdict unsound".into())
            }
            Err(e) => return Err(format!("netlink receive: {e}")),
        }
        let now = Instant::now();
        let data = std::mem::take(&mut self.buf);
        let mut ended = None;
        let mut off = 0usize;
        while off + 16 <= data.len() {
            let len = u32::from_ne_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]])
                as usize;
            if len < 16 || off + len > data.len() {
                self.buf = data;
                return Err(format!(
                    "netlink: a message of {len} bytes in a datagram of {}",
                    self.buf.len()
                ));
            }
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..off + len]);
            off += (len + 3) & !3;
            let msg = match msg {
                Ok(m) => m,
                // A message this crate cannot parse is not about addresses we track.
                Err(_) => continue,
            };
            if msg.header.flags & NLM_F_DUMP_INTR != 0 {
                self.buf = data;
                return Err("a dump was interrupted by a change (NLM_F_DUMP_INTR)".into());
            }
            match msg.payload {
                NetlinkPayload::Done(_) => ended = Some(msg.header.sequence_number),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    self.buf = data;
                    return Err(format!("netlink error: {e}"));
                }
                NetlinkPayload::Overrun(_) => {
                    self.buf = data;
                    return Err("netlink overrun: verdict unsound".into());
                }
                NetlinkPayload::InnerMessage(m) => self.apply(now, m),
                _ => {}
            }
        }
        self.buf = data;
        Ok(ended)
    }

    fn apply(&self, now: Instant, m: RouteNetlinkMessage) {
        let mut st = lock(&self.shared.state);
        let s = &mut st[self.i];
        let what = match m {
            RouteNetlinkMessage::NewLink(l) => {
                let f = l.header.flags;
                let v = (f.contains(LinkFlags::Up), f.contains(LinkFlags::LowerUp));
                let old = s.links.insert(l.header.index, v);
                if old == Some(v) || !s.copies.contains_key(&l.header.index) {
                    None
                } else {
                    Some(format!(
                        "link {} up={} carrier={}",
                        l.header.index, v.0, v.1
                    ))
                }
            }
            RouteNetlinkMessage::DelLink(l) => {
                s.links.remove(&l.header.index);
                s.copies
                    .remove(&l.header.index)
                    .map(|_| format!("link {} deleted", l.header.index))
            }
            RouteNetlinkMessage::NewAddress(a) if address_of(&a) == Some(self.vip) => {
                let f = flags(&a);
                let v = (
                    f.contains(AddressFlags::Tentative),
                    f.contains(AddressFlags::Dadfailed),
                );
                let old = s.copies.insert(a.header.index, v);
                (old != Some(v)).then(|| {
                    format!(
                        "RTM_NEWADDR {}/{} on link {}{}{}",
                        self.vip,
                        a.header.prefix_len,
                        a.header.index,
                        if v.0 { " tentative" } else { "" },
                        if v.1 { " dadfailed" } else { "" }
                    )
                })
            }
            RouteNetlinkMessage::DelAddress(a) if address_of(&a) == Some(self.vip) => {
                s.copies.remove(&a.header.index);
                Some(format!(
                    "RTM_DELADDR {}/{} on link {}",
                    self.vip, a.header.prefix_len, a.header.index
                ))
            }
            _ => None,
        };
        let Some(what) = what else { return };
        s.log.push((now, what));
        let held = match self.counting {
            Counting::AnyAddress => !s.copies.is_empty(),
            Counting::Reachable => s.copies.iter().any(|(idx, (tentative, failed))| {
                !tentative
                    && !failed
                    && s.links
                        .get(idx)
                        .is_some_and(|(up, carrier)| *up && *carrier)
            }),
        };
        match (s.held_since, held) {
            (None, true) => {
                s.held_since = Some(now);
                s.log.push((now, "-> holds".into()));
            }
            (Some(since), false) => {
                s.closed.push((since, now));
                s.held_since = None;
                s.log.push((now, "-> does not hold".into()));
            }
            _ => {}
        }
        drop(st);
        self.shared.changed.notify_all();
    }
}

/// The address an address message is about (IFA_LOCAL for IPv4, IFA_ADDRESS for IPv6).
fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    let v4 = m.header.family == AddressFamily::Inet;
    m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) if v4 => Some(*ip),
        AddressAttribute::Address(ip) if !v4 => Some(*ip),
        _ => None,
    })
}

fn flags(m: &AddressMessage) -> AddressFlags {
    m.attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(u32::from(m.header.flags.bits())))
}
