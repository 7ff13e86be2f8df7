//! Two "hosts" in network namespaces, one cable between them, and a real sshd: the lab
//! for the system tests of `failoverd` (snapshots shipped over HTTPS, rsync-over-ssh and
//! scp, and links that fail).
//!
//! # Layout
//!
//! ```text
//!   root namespace: no address, no route, no traffic of ours
//!
//!   +---------------------------+           +---------------------------+
//!   | netns stl-PID-N-NAME-a    |   veth    | netns stl-PID-N-NAME-b    |
//!   | lo up                     |           | lo up                     |
//!   | eth0 10.X.Y.1/24          |-----------| eth0 10.X.Y.2/24          |
//!   +---------------------------+           +---------------------------+
//! ```
//!
//! The veth pair is created inside host a with its peer placed directly in host b, so it
//! never appears in the root namespace, and both ends can be called `eth0`. Addresses are
//! private and exist only inside the lab; two labs may even use the same ones.
//!
//! # Use
//!
//! ```no_run
//! use std::time::Duration;
//! use system_tests::netns::{Lab, Sshd};
//!
//! let lab = Lab::new("snap");                     // panics unless root and `ip` exists
//! let dir = tempfile::tempdir().unwrap();
//! let sshd = Sshd::start(lab.b(), dir.path());    // /usr/sbin/sshd inside host b
//! let sshd_addr = std::net::SocketAddr::from((sshd.addr(), 22));
//! let run = lab.a().sh(&format!("ssh {} {} true", sshd.ssh_args().join(" "), sshd.target()),
//!                      Duration::from_secs(20));
//! assert_eq!(run.code, Some(0), "{}", run.stderr);
//! lab.link_down();                                // a's end of the cable: fast failures
//! lab.link_up();
//! lab.partition();                                // frames silently lost: timeouts
//! lab.heal();
//! lab.loss(30);                                   // 30 % of packets lost, each way
//! lab.clear_loss();
//! let slow = lab.delayed_relay(sshd_addr, Duration::from_millis(200));
//! // connect (from a) to slow.addr() instead of sshd_addr: 200 ms each way
//! drop(slow);
//! // Drop (also while a test panics): children killed by pid, namespaces deleted.
//! ```
//!
//! * [`Lab::new`]`(name) -> Lab`; [`Lab::a`], [`Lab::b`]` -> &Host`; [`Lab::name`].
//! * [`Host::ns`], [`Host::addr`]` -> Ipv4Addr`, [`Host::iface`], [`Host::mac`];
//!   [`Host::command`]`(program) -> Command` (`ip netns exec NS program`);
//!   [`Host::spawn`]`(Command) -> Spawned` (killed by the lab on drop);
//!   [`Host::sh`]`(script, timeout) -> Run` (bash, bounded);
//!   [`Host::in_ns`]`(closure)` runs Rust code on a thread inside the namespace (sockets
//!   it creates stay in that namespace wherever they are used); [`Host::connect`].
//! * Faults (see below): [`Lab::link_down`] / [`Lab::link_up`], [`Lab::partition`] /
//!   [`Lab::heal`], [`Lab::loss`]`(percent)` / [`Lab::clear_loss`],
//!   [`Lab::delayed_relay`]`(to, delay) -> Relay` ([`Relay::addr`]).
//! * [`Sshd::start`]`(&Host, dir) -> Sshd`: keys, `authorized_keys`, `known_hosts` and an
//!   `sshd_config` in `dir`; [`Sshd::ssh_args`], [`Sshd::ssh_command`] (for `rsync -e`),
//!   [`Sshd::target`] (`root@ADDR`), [`Sshd::client_key`], [`Sshd::known_hosts`].
//!
//! # Faults
//!
//! * **Link down** ([`Lab::link_down`]): a's end of the cable goes down; connections fail
//!   at once ("network is unreachable").
//! * **Partition** ([`Lab::partition`]): both links stay up but every frame between the
//!   hosts is lost, both ways (neighbour entries point at a MAC nobody has); connections
//!   and packets in flight time out, as behind a dead switch.
//! * **Loss** ([`Lab::loss`]): a random share of the IP packets crossing the cable is
//!   dropped, each way, by an nftables table of the lab's own ([`NFT_TABLE`]) in host a:
//!   `numgen random mod 100 < N drop` in netdev chains on the egress and ingress of a's
//!   `eth0`, below the sockets, so senders are not told (as with a lossy link). Rules in
//!   the output hook would not do: a UDP or ICMP send they drop fails with EPERM.
//! * **Delay** ([`Lab::delayed_relay`]): a TCP relay in host a that holds every piece of
//!   bytes for the delay, each way, before passing it on. Only TCP connections made to
//!   the relay are slowed, which is what the failover tests need (HTTPS and ssh).
//!
//! netem (`tc qdisc ... netem`) is not used: the kernels of this project's machines and
//! CI are built without `CONFIG_NET_SCH_NETEM` (tc answers "Specified qdisc kind is
//! unknown"), while nftables (`CONFIG_NF_TABLES_NETDEV`, `CONFIG_NETFILTER_EGRESS`,
//! `CONFIG_NFT_NUMGEN`) is built in. A fault the lab offers must work here, or the tests
//! that need it could never run.
//!
//! # Limits and guarantees
//!
//! * Root only (namespaces need `CAP_SYS_ADMIN`), and the tools of `scripts/install-deps`
//!   (`ip`, `nft`, sshd, ssh, rsync): a missing one fails the test with the command to
//!   run; nothing is ever skipped.
//! * Every wait is bounded; a command that overruns is killed and fails the test.
//! * On drop the lab sends SIGKILL to the children it recorded (by pid, through their
//!   `Child`, so a reaped pid is never signalled), then to any process still inside one
//!   of its two namespaces (descendants of those children, e.g. sshd sessions), then
//!   deletes both namespaces; the veth pair and the nftables table go with them. A
//!   [`Relay`] borrows its lab, so it is dropped (its threads stopped) before the lab.
//! * Namespaces named `stl-PID-...` whose PID no longer runs are left-overs of a run
//!   that was killed: [`Lab::new`] deletes them (and kills what still runs in them).
//! * Names carry the pid and a per-process counter, so test binaries and test threads
//!   running in parallel never clash.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{wait_bounded, Run};

/// Prefix of every namespace a lab creates; with the owner's pid right after it.
const PREFIX: &str = "stl-";
/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Serializes namespace creation and the left-over sweep across test processes
/// (`ip netns add` sets up /run/netns on first use, which is not safe to race).
const LOCK_FILE: &str = "/run/lock/system-tests-netns.lock";
/// The interface name of the cable's end in each host.
const IFACE: &str = "eth0";
/// The longest a single `ip` or `nft` command may take.
const IP_TIMEOUT: Duration = Duration::from_secs(10);
/// A locally administered MAC nobody has: [`Lab::partition`] points each host's
/// neighbour entry for the other host at it, so frames leave and are dropped on arrival.
const NOWHERE_MAC: &str = "02:00:00:00:00:00";

/// The nftables table [`Lab::loss`] keeps its rules in, inside host a.
pub const NFT_TABLE: &str = "lab_fault";
/// Most connections a [`Relay`] carries at once; more are closed on arrival.
pub const RELAY_CONNECTIONS: usize = 16;
/// The longest delay a [`Relay`] takes: its threads stop within it once dropped.
pub const RELAY_MAX_DELAY: Duration = Duration::from_secs(10);

const SSHD: &str = "/usr/sbin/sshd";
const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
const SSHD_START_TIMEOUT: Duration = Duration::from_secs(10);

type Children = Arc<Mutex<Vec<Arc<Mutex<Child>>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock must not stop the cleanup.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Two hosts joined by one veth cable. See the module documentation.
pub struct Lab {
    name: String,
    a: Host,
    b: Host,
    /// [`Lab::with_client`]: a third host, and the namespace of the bridge that joins
    /// the three.
    client: Option<Host>,
    switch: Option<String>,
    children: Children,
}

/// One end of the lab: a network namespace with `lo` and `eth0` up.
pub struct Host {
    ns: String,
    addr: Ipv4Addr,
    peer: Ipv4Addr,
    children: Children,
}

/// A process started with [`Host::spawn`]. Dropping it does not stop the process: the
/// lab does, when it is dropped; [`Spawned::kill`] does it earlier.
pub struct Spawned {
    pid: u32,
    child: Arc<Mutex<Child>>,
    /// The child's standard streams, if they were piped.
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

impl Lab {
    /// Create the two namespaces and the cable. Panics (failing the test) if not root,
    /// if `ip` is missing, or if any step fails; what was created is then removed.
    pub fn new(name: &str) -> Lab {
        let euid = nix::unistd::geteuid();
        assert!(
            euid.is_root(),
            "netns lab {name:?}: running as uid {euid}, network namespaces need root: \
             run the system tests as root"
        );
        if let Err(e) = Command::new("ip").arg("-V").output() {
            panic!(
                "netns lab {name:?}: cannot run `ip` ({e}): install iproute2 \
                 (run scripts/install-deps as root)"
            );
        }
        static LABS: AtomicUsize = AtomicUsize::new(0);
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let short: String = name
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_lowercase())
            .take(12)
            .collect();
        let ns = |side: &str| format!("{PREFIX}{pid}-{n}-{short}-{side}");
        // Any 10.X.Y.0/24: the addresses exist only inside the lab's namespaces.
        let (x, y) = (100 + (pid % 100) as u8, (n % 256) as u8);
        let (addr_a, addr_b) = (Ipv4Addr::new(10, x, y, 1), Ipv4Addr::new(10, x, y, 2));

        let _lock = NetnsLock::take();
        sweep_leftovers();

        let children: Children = Arc::default();
        let host = |ns: String, addr, peer| Host {
            ns,
            addr,
            peer,
            children: Arc::clone(&children),
        };
        // From here on, a panic drops `lab`, which deletes whatever was created.
        let lab = Lab {
            name: name.to_string(),
            a: host(ns("a"), addr_a, addr_b),
            b: host(ns("b"), addr_b, addr_a),
            client: None,
            switch: None,
            children: Arc::clone(&children),
        };
        let (na, nb) = (lab.a.ns.as_str(), lab.b.ns.as_str());
        ip(&["netns", "add", na]);
        ip(&["netns", "add", nb]);
        ip(&[
            "-n", na, "link", "add", IFACE, "type", "veth", "peer", "name", IFACE, "netns", nb,
        ]);
        for h in [&lab.a, &lab.b] {
            let cidr = format!("{}/24", h.addr);
            ip(&["-n", &h.ns, "link", "set", "lo", "up"]);
            ip(&["-n", &h.ns, "addr", "add", &cidr, "dev", IFACE]);
            ip(&["-n", &h.ns, "link", "set", IFACE, "up"]);
        }
        lab.wait_link_state("UP");
        lab
    }

    /// Three hosts on one link: a, b and a client `c` (`10.X.Y.3`), each with a veth to
    /// a bridge in a namespace of its own (no address there). [`Lab::link_down`] takes
    /// a's cable down (b and the client keep theirs); the other faults act between a and
    /// b as in [`Lab::new`].
    pub fn with_client(name: &str) -> Lab {
        let two = Lab::new(name);
        let (na, nb) = (two.a.ns.clone(), two.b.ns.clone());
        let base = na.strip_suffix("-a").unwrap_or(&na).to_string();
        let (nc, nsw) = (format!("{base}-c"), format!("{base}-sw"));
        let o = two.a.addr.octets();
        let addr_c = Ipv4Addr::new(o[0], o[1], o[2], 3);
        let _lock = NetnsLock::take();
        let mut lab = two;
        lab.client = Some(Host {
            ns: nc.clone(),
            addr: addr_c,
            peer: lab.a.addr,
            children: Arc::clone(&lab.children),
        });
        lab.switch = Some(nsw.clone());
        // From here a panic drops `lab`, which deletes all four namespaces.
        ip(&["netns", "add", &nc]);
        ip(&["netns", "add", &nsw]);
        // Replace the a–b cable by one cable per host to the bridge.
        ip(&["-n", &na, "link", "del", IFACE]);
        ip(&["-n", &nsw, "link", "add", "br0", "type", "bridge"]);
        for (ns, port, h) in [(&na, "pa", &lab.a), (&nb, "pb", &lab.b)]
            .into_iter()
            .chain([(&nc, "pc", lab.client.as_ref().unwrap_or(&lab.a))])
        {
            ip(&[
                "-n", &nsw, "link", "add", port, "type", "veth", "peer", "name", IFACE, "netns", ns,
            ]);
            ip(&["-n", &nsw, "link", "set", port, "master", "br0"]);
            ip(&["-n", &nsw, "link", "set", port, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", h.addr),
                "dev",
                IFACE,
            ]);
            ip(&["-n", ns, "link", "set", IFACE, "up"]);
        }
        ip(&["-n", &nsw, "link", "set", "br0", "up"]);
        lab.wait_link_state("UP");
        lab
    }

    /// The client of [`Lab::with_client`].
    pub fn client(&self) -> &Host {
        match &self.client {
            Some(c) => c,
            None => panic!(
                "netns lab {:?} has no client: make it with Lab::with_client",
                self.name
            ),
        }
    }

    /// The client of [`Lab::with_client`], if this lab has one.
    pub fn client_if_any(&self) -> Option<&Host> {
        self.client.as_ref()
    }

    /// Give every host of the lab (a, b, and the client if there is one) an IPv6 address
    /// on its cable, `fdXX:Y:Z::1`, `::2`, `::3` /64 like the IPv4 ones, without DAD
    /// (unique by construction), and return the prefix `fdXX:Y:Z::` (its `::100` is
    /// free for a virtual IP).
    pub fn add_ipv6(&self) -> String {
        let o = self.a.addr.octets();
        let net = format!(
            "fd{:02x}:{:x}:{:x}::",
            o[1],
            o[2],
            std::process::id() & 0xffff
        );
        let hosts = [(&self.a, 1), (&self.b, 2)]
            .into_iter()
            .chain(self.client.as_ref().map(|c| (c, 3)));
        for (h, n) in hosts {
            let script = format!(
                "sysctl -qw net.ipv6.conf.{IFACE}.disable_ipv6=0 && \
                 ip addr add {net}{n}/64 dev {IFACE} nodad"
            );
            let r = h.sh(&script, Duration::from_secs(10));
            assert_eq!(r.code, Some(0), "`{script}` in {}: {}", h.ns, r.stderr);
        }
        net
    }

    /// The name given to [`Lab::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Host a (address `10.X.Y.1`).
    pub fn a(&self) -> &Host {
        &self.a
    }

    /// Host b (address `10.X.Y.2`).
    pub fn b(&self) -> &Host {
        &self.b
    }

    /// Set a's end of the cable down: both ends lose carrier, a's route to b goes away,
    /// and connections fail at once ("network is unreachable") until [`Lab::link_up`].
    pub fn link_down(&self) {
        ip(&["-n", &self.a.ns, "link", "set", IFACE, "down"]);
        self.wait_link_state("DOWN");
    }

    /// Set a's end of the cable up again and wait (at most 10 s) until both ends carry.
    pub fn link_up(&self) {
        ip(&["-n", &self.a.ns, "link", "set", IFACE, "up"]);
        self.wait_link_state("UP");
    }

    /// Lose every frame between a and b, both ways, while the links stay up: connections
    /// and packets in flight time out instead of failing fast, as with a dead switch.
    /// (Each host's neighbour entry for the other points at a MAC nobody has.)
    pub fn partition(&self) {
        for h in [&self.a, &self.b] {
            let peer = h.peer.to_string();
            ip(&[
                "-n",
                &h.ns,
                "neigh",
                "replace",
                &peer,
                "lladdr",
                NOWHERE_MAC,
                "dev",
                IFACE,
                "nud",
                "permanent",
            ]);
        }
    }

    /// Undo [`Lab::partition`] (harmless without one): the hosts resolve each other anew.
    pub fn heal(&self) {
        for h in [&self.a, &self.b] {
            let peer = h.peer.to_string();
            ip(&[
                "-n", &h.ns, "neigh", "flush", "to", &peer, "dev", IFACE, "nud", "all",
            ]);
        }
    }

    /// Lose `percent` % of the IP packets that cross the cable, each way, chosen at
    /// random packet by packet, as a bad link would: an nftables table of the lab's own
    /// ([`NFT_TABLE`], family netdev) on host a's `eth0` drops them at the device, on
    /// egress and on ingress, below the sockets (a sender is not told; ARP is untouched,
    /// so the hosts still find each other). Replaces an earlier loss at once. TCP
    /// retransmits what is lost, so connections slow down rather than fail, unless
    /// `percent` is 100. Panics if `nft` is missing or the kernel lacks what it needs.
    pub fn loss(&self, percent: u8) {
        assert!(percent <= 100, "lab.loss({percent}): a share of 0 to 100 %");
        // nft takes `mod 100 < N` for N of 1 to 99 only.
        let rule = match percent {
            0 => String::new(),
            100 => "meta protocol { ip, ip6 } drop;".to_string(),
            n => format!("meta protocol {{ ip, ip6 }} numgen random mod 100 < {n} drop;"),
        };
        let drop_on = |hook: &str| {
            format!(
                "chain {hook} {{ type filter hook {hook} device \"{IFACE}\" priority 0; \
                 policy accept; {rule} }}"
            )
        };
        // One transaction: create (so that the delete cannot fail), delete, create anew.
        let script = format!(
            "table netdev {NFT_TABLE} {{}}\ndelete table netdev {NFT_TABLE}\n\
             table netdev {NFT_TABLE} {{\n{}\n{}\n}}\n",
            drop_on("egress"),
            drop_on("ingress"),
        );
        self.nft(&script, &format!("loss({percent})"));
    }

    /// Undo [`Lab::loss`] (harmless without one): the lab's nftables table goes.
    pub fn clear_loss(&self) {
        let script = format!("table netdev {NFT_TABLE} {{}}\ndelete table netdev {NFT_TABLE}\n");
        self.nft(&script, "clear_loss()");
    }

    /// `nft -f -` with `script` in host a; panics with nft's message and what to do.
    fn nft(&self, script: &str, what: &str) {
        let mut cmd = self.a.command("nft");
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("nft for lab.{what} in {}", self.a.ns);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let r = wait_bounded(child, script.as_bytes(), IP_TIMEOUT, &what);
        if r.code != Some(0) {
            let hint = if r.stderr.contains("exec of") {
                "is nft installed? (Debian's nftables: run scripts/install-deps)"
            } else {
                "the kernel needs nftables: CONFIG_NF_TABLES_NETDEV, CONFIG_NETFILTER_INGRESS, \
                 CONFIG_NETFILTER_EGRESS and CONFIG_NFT_NUMGEN"
            };
            panic!(
                "netns lab {:?}: {what} failed ({:?}): {}; {hint}",
                self.name,
                r.code,
                r.stderr.trim()
            );
        }
    }

    /// A TCP relay in host a, on a's address, that forwards each connection to `to`
    /// (usually a server in b) and holds every piece of bytes for `delay`, each way,
    /// before passing it on: a link with that latency, which netem would give on a
    /// kernel that has it. The bytes are not changed, reordered or lost. At most
    /// [`RELAY_CONNECTIONS`] connections at once (more are closed on arrival); `delay`
    /// at most [`RELAY_MAX_DELAY`]. Dropping the relay closes every connection and
    /// stops its threads (within `delay`); it cannot outlive the lab.
    pub fn delayed_relay(&self, to: SocketAddr, delay: Duration) -> Relay<'_> {
        assert!(
            delay <= RELAY_MAX_DELAY,
            "lab.delayed_relay: a delay of {delay:?} is over the {RELAY_MAX_DELAY:?} a \
             relay allows (its threads must stop within the delay)"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Streams = Arc::default();
        let (tx, rx) = mpsc::channel();
        let (ns, bind) = (self.a.ns.clone(), SocketAddr::from((self.a.addr, 0)));
        let (stop2, streams2) = (Arc::clone(&stop), Arc::clone(&streams));
        let accept = std::thread::Builder::new()
            .name("lab-relay".into())
            .spawn(move || {
                // Every thread the relay starts from here inherits a's namespace.
                let listener = enter_ns(&ns).and_then(|()| {
                    let l = TcpListener::bind(bind).map_err(|e| format!("bind {bind}: {e}"))?;
                    l.set_nonblocking(true)
                        .map_err(|e| format!("listener of {bind}: {e}"))?;
                    Ok(l)
                });
                let listener = match listener {
                    Ok(l) => {
                        let _ = tx.send(l.local_addr().map_err(|e| e.to_string()));
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                relay_accept(listener, to, delay, &stop2, &streams2);
            })
            .unwrap_or_else(|e| panic!("cannot start the relay's thread: {e}"));
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("the relay in {} did not start: {e}", self.a.ns))
            .unwrap_or_else(|e| panic!("the relay in {} did not start: {e}", self.a.ns));
        Relay {
            addr,
            to,
            stop,
            streams,
            accept: Some(accept),
            _lab: std::marker::PhantomData,
        }
    }

    /// Wait until both ends of the cable report `state` ("UP" or "DOWN"): the kernel
    /// attaches the queue that carries frames only once it has seen the carrier.
    fn wait_link_state(&self, state: &str) {
        let want = format!("state {state} ");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Bridged, a's cable is its own: only a's end changes.
            let ends: Vec<&Host> = match &self.client {
                Some(_) if state == "DOWN" => vec![&self.a],
                Some(c) => vec![&self.a, &self.b, c],
                None => vec![&self.a, &self.b],
            };
            let shown: Vec<String> = ends
                .iter()
                .map(|h| ip(&["-n", &h.ns, "-o", "link", "show", IFACE]))
                .collect();
            if shown.iter().all(|s| s.contains(&want)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "netns lab {:?}: the cable is not {state} on both ends after 10 s: {shown:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Runs during unwinding too: report, never panic.
        let children: Vec<_> = lock(&self.children).drain(..).collect();
        for c in children {
            let mut c = lock(&c);
            // std's Child::kill does nothing once the child is reaped: no stray pid.
            let _ = c.kill();
            let _ = c.wait();
        }
        let extra: Vec<&String> = self
            .client
            .as_ref()
            .map(|c| &c.ns)
            .into_iter()
            .chain(self.switch.as_ref())
            .collect();
        for ns in [&self.a.ns, &self.b.ns].into_iter().chain(extra) {
            if let Err(e) = delete_ns(ns) {
                eprintln!("netns lab {:?}: {e}", self.name);
            }
        }
    }
}

impl Host {
    /// The namespace's name (for `ip netns exec`, `ip -n`).
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// This host's address on the cable.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The cable's interface in this host (`eth0`).
    pub fn iface(&self) -> &str {
        IFACE
    }

    /// `ip netns exec NS program`: add arguments, stdio, then run it (bounded: see
    /// [`crate::wait_bounded`]) or [`Host::spawn`] it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// Start `cmd` (usually from [`Host::command`]) and record it: the lab kills it (by
    /// pid, SIGKILL) when dropped. Piped streams are handed back in the [`Spawned`].
    pub fn spawn(&self, mut cmd: Command) -> Spawned {
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("in {}: cannot start {cmd:?}: {e}", self.ns));
        let pid = child.id();
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let child = Arc::new(Mutex::new(child));
        lock(&self.children).push(Arc::clone(&child));
        Spawned {
            pid,
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    /// `bash -c script` in this host, stdin empty, output collected; killed (and the test
    /// failed) after `timeout`.
    pub fn sh(&self, script: &str, timeout: Duration) -> Run {
        let mut cmd = self.command("bash");
        cmd.arg("-c").arg(script);
        let what = format!("`{script}` in {}", self.ns);
        run_bounded_for(cmd, &what, timeout)
    }

    /// Run `f` on a new thread that has joined this host's network namespace. Sockets made
    /// there belong to the namespace for their whole life, wherever they are used later
    /// (e.g. bind a `TcpListener` in b, accept on the test's thread). A panic in `f` is
    /// the caller's panic.
    pub fn in_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                enter_ns(&self.ns).unwrap_or_else(|e| panic!("{e}"));
                f()
            });
            t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// The Ethernet address of this host's end of the cable (`52:54:00:aa:bb:cc`), read
    /// with `ip -o link show`.
    pub fn mac(&self) -> String {
        let out = ip(&["-n", &self.ns, "-o", "link", "show", IFACE]);
        out.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_else(|| panic!("no link/ether in `ip -o link show {IFACE}`: {out}"))
            .to_string()
    }

    /// A TCP connection from this host to `to`, given up after `timeout`.
    pub fn connect(&self, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.in_ns(|| TcpStream::connect_timeout(&to, timeout))
    }
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status if the process has ended (it is then reaped).
    pub fn try_wait(&self) -> Option<ExitStatus> {
        lock(&self.child)
            .try_wait()
            .unwrap_or_else(|e| panic!("wait for pid {}: {e}", self.pid))
    }

    /// Wait at most `timeout` for the process to end.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL (unless it has ended already) and reap.
    pub fn kill(&self) -> ExitStatus {
        let mut c = lock(&self.child);
        let _ = c.kill();
        c.wait()
            .unwrap_or_else(|e| panic!("wait for killed pid {}: {e}", self.pid))
    }
}

/// A TCP relay with a delay, from [`Lab::delayed_relay`]; stopped when dropped.
pub struct Relay<'lab> {
    addr: SocketAddr,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Both sockets of every open connection, by connection, to shut them down on drop.
    streams: Streams,
    accept: Option<JoinHandle<()>>,
    _lab: std::marker::PhantomData<&'lab Lab>,
}

impl Relay<'_> {
    /// Where to connect (in host a) instead of the relay's target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address each connection is forwarded to.
    pub fn to(&self) -> SocketAddr {
        self.to
    }
}

impl Drop for Relay<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for (_, s) in lock(&self.streams).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            if t.join().is_err() {
                eprintln!("netns lab: the relay to {} panicked", self.to);
            }
        }
    }
}

/// The sockets of a relay's open connections, each with its connection's number.
type Streams = Arc<Mutex<Vec<(u64, TcpStream)>>>;

/// Join the network namespace `ns` with this thread (and the threads it starts later).
pub(crate) fn enter_ns(ns: &str) -> Result<(), String> {
    let path = Path::new(NETNS_DIR).join(ns);
    let file = File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // setns(2) changes the network namespace of the calling thread only.
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns into {}: {e}", path.display()))
}

/// The relay's accept loop: polls `listener` (non-blocking) until `stop`, then waits for
/// its connections to end.
fn relay_accept(
    listener: TcpListener,
    to: SocketAddr,
    delay: Duration,
    stop: &Arc<AtomicBool>,
    streams: &Streams,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut next_id = 0u64;
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => {
                eprintln!("netns lab: the relay to {to} cannot accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        conns.retain(|t| !t.is_finished());
        if active.load(Ordering::SeqCst) >= RELAY_CONNECTIONS {
            eprintln!(
                "netns lab: the relay to {to} carries {RELAY_CONNECTIONS} connections \
                 already; closing a new one"
            );
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        next_id += 1;
        let id = next_id;
        let (stop, streams, left) = (Arc::clone(stop), Arc::clone(streams), Arc::clone(&active));
        let t = std::thread::Builder::new()
            .name("lab-relay-conn".into())
            .spawn(move || {
                relay_one(id, client, to, delay, &stop, &streams);
                lock(&streams).retain(|(i, _)| *i != id);
                left.fetch_sub(1, Ordering::SeqCst);
            });
        match t {
            Ok(t) => conns.push(t),
            Err(e) => {
                active.fetch_sub(1, Ordering::SeqCst);
                eprintln!("netns lab: the relay to {to} cannot start a thread: {e}");
            }
        }
    }
    for t in conns {
        let _ = t.join();
    }
}

/// Carry one connection: connect to `to`, then pump each way with `delay`.
fn relay_one(
    id: u64,
    client: TcpStream,
    to: SocketAddr,
    delay: Duration,
    stop: &AtomicBool,
    streams: &Mutex<Vec<(u64, TcpStream)>>,
) {
    let server = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("netns lab: the relay cannot connect to {to}: {e}; closing the client");
            return;
        }
    };
    let _ = client.set_nonblocking(false);
    let clones = (client.try_clone(), server.try_clone());
    let (Ok(client2), Ok(server2)) = clones else {
        eprintln!("netns lab: the relay to {to} cannot clone its sockets; closing");
        return;
    };
    {
        let mut all = lock(streams);
        for s in [&client, &server] {
            if let Ok(c) = s.try_clone() {
                all.push((id, c));
            }
        }
        // Drop of the relay sets `stop` before it shuts the registered sockets down.
        if stop.load(Ordering::SeqCst) {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }
    let back = std::thread::Builder::new()
        .name("lab-relay-back".into())
        .spawn(move || relay_pump(server2, client2, delay));
    if let Err(e) = &back {
        eprintln!("netns lab: the relay to {to} cannot start a thread for answers: {e}");
        let _ = client.shutdown(Shutdown::Both);
    }
    relay_pump(client, server, delay);
    if let Ok(t) = back {
        let _ = t.join();
    }
}

/// Copy `from` to `to`, each piece written `delay` after it was read (a reader and a
/// writer thread, so pieces in flight do not add up their delays); then half-close `to`.
fn relay_pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::Builder::new()
        .name("lab-relay-write".into())
        .spawn(move || {
            for (read_at, bytes) in rx {
                let due = read_at + delay;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if to.write_all(&bytes).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    if let Ok(w) = writer {
        let _ = w.join();
    }
}

/// An `sshd` running inside one host, with its own keys and configuration in a directory
/// of the test's. Killed (by pid) when dropped, and by the lab in any case.
pub struct Sshd {
    dir: PathBuf,
    addr: Ipv4Addr,
    process: Spawned,
    log: PathBuf,
}

impl Sshd {
    /// Write keys and configuration into `dir` (created if needed), start
    /// `/usr/sbin/sshd -D -e` in `host` on `ADDR:22`, and wait (at most 10 s) until it
    /// greets. Logins: root with [`Sshd::client_key`] only.
    pub fn start(host: &Host, dir: &Path) -> Sshd {
        for tool in [SSHD, SFTP_SERVER] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: run scripts/install-deps (as root: it installs \
                 openssh-server, openssh-client and rsync)"
            );
        }
        // With UsePAM no, sshd refuses accounts whose password field starts with '!'.
        if let Ok(shadow) = std::fs::read_to_string("/etc/shadow") {
            let locked = shadow
                .lines()
                .find_map(|l| l.strip_prefix("root:"))
                .is_some_and(|rest| rest.starts_with('!'));
            assert!(
                !locked,
                "root is locked in /etc/shadow ('!'): the test sshd (UsePAM no) would \
                 refuse every login; unlock it without a password: usermod -p '*' root"
            );
        }
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let dir = dir
            .canonicalize()
            .unwrap_or_else(|e| panic!("cannot resolve {}: {e}", dir.display()));
        // ssh_command() joins arguments with spaces for `rsync -e`.
        assert!(
            !dir.to_string_lossy().contains(char::is_whitespace),
            "sshd directory {} has whitespace in its path: choose another",
            dir.display()
        );
        let addr = host.addr();
        let host_key = dir.join("ssh_host_ed25519_key");
        let client_key = dir.join("client_ed25519");
        keygen(&host_key, &format!("sshd of {}", host.ns));
        keygen(&client_key, "system tests client");
        let public = |key: &Path| {
            let p = PathBuf::from(format!("{}.pub", key.display()));
            std::fs::read_to_string(&p)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
        };
        write(&dir.join("authorized_keys"), &public(&client_key));
        write(
            &dir.join("known_hosts"),
            &format!("{addr} {}", public(&host_key)),
        );
        let d = dir.display();
        let config = format!(
            "# written by tests/src/netns.rs (system-tests)\n\
             ListenAddress {addr}\n\
             Port 22\n\
             HostKey {d}/ssh_host_ed25519_key\n\
             PidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             Subsystem sftp {SFTP_SERVER}\n\
             LogLevel ERROR\n"
        );
        let config_path = dir.join("sshd_config");
        write(&config_path, &config);
        // The privilege separation directory sshd insists on (root-owned, not writable
        // by others). Shared by every sshd on the machine; never removed.
        let privsep = Path::new("/run/sshd");
        std::fs::create_dir_all(privsep)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", privsep.display()));
        std::fs::set_permissions(privsep, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", privsep.display()));

        let log = dir.join("sshd.log");
        let logf =
            File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let mut cmd = host.command(SSHD);
        cmd.args(["-D", "-e", "-f"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        let sshd = Sshd {
            dir,
            addr,
            process: host.spawn(cmd),
            log,
        };
        sshd.wait_greeting(host);
        sshd
    }

    /// Connect from inside the server's own host until sshd sends its `SSH-2.0-` banner
    /// (over b's loopback route: readiness does not depend on the cable).
    fn wait_greeting(&self, host: &Host) {
        let to = SocketAddr::from((self.addr, 22));
        let deadline = Instant::now() + SSHD_START_TIMEOUT;
        loop {
            if let Some(st) = self.process.try_wait() {
                panic!(
                    "sshd in {} exited at start ({st}): {}",
                    host.ns,
                    self.log_text()
                );
            }
            let banner = host.in_ns(|| -> io::Result<String> {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(500))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut buf = [0u8; 8];
                s.read_exact(&mut buf)?;
                // Answer in kind: a client that hangs up before identifying itself
                // costs an error line in sshd's log; one that identifies, none.
                s.write_all(b"SSH-2.0-netns_lab_probe\r\n")?;
                Ok(String::from_utf8_lossy(&buf).into_owned())
            });
            if banner.as_deref().is_ok_and(|b| b.starts_with("SSH-2.0-")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sshd in {} did not greet on {to} within {SSHD_START_TIMEOUT:?} (last: \
                 {banner:?}): {}",
                host.ns,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The private key the server accepts for root (ed25519, no passphrase).
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_ed25519")
    }

    /// A known_hosts file with the server's host key at its address.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts")
    }

    /// Options for `ssh`/`scp` that log in with [`Sshd::client_key`] and check the host
    /// key strictly, reading no user or system configuration, never prompting, and
    /// giving up on a connection after 5 s.
    pub fn ssh_args(&self) -> Vec<String> {
        let mut v = vec!["-F".to_string(), "none".to_string()];
        v.push("-i".to_string());
        v.push(self.client_key().display().to_string());
        for o in [
            format!("UserKnownHostsFile={}", self.known_hosts().display()),
            "GlobalKnownHostsFile=/dev/null".to_string(),
            "StrictHostKeyChecking=yes".to_string(),
            "BatchMode=yes".to_string(),
            "IdentitiesOnly=yes".to_string(),
            "ConnectTimeout=5".to_string(),
        ] {
            v.push("-o".to_string());
            v.push(o);
        }
        v
    }

    /// `ssh ARGS...` as one string, for `rsync -e`.
    pub fn ssh_command(&self) -> String {
        format!("ssh {}", self.ssh_args().join(" "))
    }

    /// `root@ADDR`, the login for `ssh`, `scp` and `rsync`.
    pub fn target(&self) -> String {
        format!("root@{}", self.addr)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// What sshd wrote to its stderr (`-e`, LogLevel ERROR).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let mut c = lock(&self.process.child);
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// `ssh-keygen -t ed25519 -N ''` into `key` (replacing an old one) and `key.pub`.
fn keygen(key: &Path, comment: &str) {
    for p in [
        key.to_path_buf(),
        PathBuf::from(format!("{}.pub", key.display())),
    ] {
        let _ = std::fs::remove_file(p);
    }
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(key);
    let r = run_bounded(cmd, &format!("ssh-keygen -f {}", key.display()));
    assert!(
        r.code == Some(0),
        "ssh-keygen for {} failed ({:?}): {} (is openssh-client installed? run \
         scripts/install-deps)",
        key.display(),
        r.code,
        r.stderr.trim()
    );
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Run `cmd` with no stdin and piped output, for at most [`IP_TIMEOUT`].
fn run_bounded(cmd: Command, what: &str) -> Run {
    run_bounded_for(cmd, what, IP_TIMEOUT)
}

fn run_bounded_for(mut cmd: Command, what: &str, timeout: Duration) -> Run {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    wait_bounded(child, b"", timeout, what)
}

/// `ip ARGS`; panics with ip's message if it fails. Returns its standard output.
fn ip(args: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let what = format!("ip {}", args.join(" "));
    let r = run_bounded(cmd, &what);
    assert!(
        r.code == Some(0),
        "{what} failed ({:?}): {}",
        r.code,
        r.stderr.trim()
    );
    r.stdout
}

/// Kill what still runs in namespace `ns` (our children's descendants), then delete it.
/// Never panics: it runs from `Drop`.
fn delete_ns(ns: &str) -> Result<(), String> {
    if !Path::new(NETNS_DIR).join(ns).exists() {
        return Ok(());
    }
    let me = std::process::id();
    let pids = Command::new("ip")
        .args(["netns", "pids", ns])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
    {
        if pid != me {
            // The pid was inside our namespace.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
    let out = Command::new("ip")
        .args(["netns", "del", ns])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip netns del {ns}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip netns del {ns} failed ({}): {}; delete it by hand",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Delete `stl-PID-...` namespaces whose PID no longer runs (a test process killed before
/// its labs could clean up).
fn sweep_leftovers() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // kill(2) with no signal only checks whether the pid exists.
        let gone = kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH);
        if gone {
            match delete_ns(&name) {
                Ok(()) => eprintln!("netns lab: deleted {name}, left over by pid {pid}"),
                Err(e) => eprintln!("netns lab: left-over {name}: {e}"),
            }
        }
    }
}

/// An exclusive `flock` on [`LOCK_FILE`], released on drop; waits at most 30 s.
struct NetnsLock {
    _held: Flock<File>,
}

impl NetnsLock {
    fn take() -> NetnsLock {
        let path = Path::new(LOCK_FILE);
        if let Some(d) = path.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let mut f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(held) => return NetnsLock { _held: held },
                Err((back, _)) => f = back,
            }
            assert!(
                Instant::now() < deadline,
                "{} stayed locked for 30 s: another test process is stuck creating \
                 namespaces",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
