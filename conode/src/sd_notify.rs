//! The systemd notify protocol (`sd_notify(3)`), for `Type=notify` units: a datagram
//! such as `READY=1` sent to the Unix socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name written with a leading `@`). Without `$NOTIFY_SOCKET` (not started by
//! systemd) every call does nothing.
//!
//! The watchdog (`WatchdogSec=` in the unit) is read from `$WATCHDOG_USEC` (and
//! `$WATCHDOG_PID`, when set, must be this process); the caller pings with `WATCHDOG=1`
//! well within that interval (failoverd: every quarter of it), from the loop whose progress
//! the pings vouch for.
//!
//! Used by the conode (READY once both ports listen, STOPPING at shutdown) and by
//! failoverd (the same, and the watchdog from its decision loop).

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A connection to the service manager's notify socket.
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
    /// Where the notifications go, for messages.
    name: String,
}

impl Notifier {
    /// The notifier named by `$NOTIFY_SOCKET`; `Ok(None)` when it is not set.
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => Notifier::to(&s.to_string_lossy()).map(Some),
        }
    }

    /// A notifier sending to `socket`: a path, or `@name` for an abstract socket.
    pub fn to(socket: &str) -> io::Result<Notifier> {
        let addr = if let Some(name) = socket.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())?
        } else if socket.starts_with('/') {
            SocketAddr::from_pathname(socket)?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET={socket:?} is neither an absolute path nor @abstract"),
            ));
        };
        Ok(Notifier {
            sock: UnixDatagram::unbound()?,
            addr,
            name: socket.to_string(),
        })
    }

    /// Send one notification, e.g. `"READY=1"` or `"STOPPING=1\nSTATUS=stopping"`.
    pub fn send(&self, state: &str) -> io::Result<()> {
        self.sock
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(|_| ())
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.name)))
    }
}

/// Send `state` to the service manager if there is one; a failure is logged (the
/// service manager's view is not worth stopping the program for).
pub fn notify(state: &str) {
    match Notifier::from_env() {
        Ok(None) => {}
        Ok(Some(n)) => {
            if let Err(e) = n.send(state) {
                tracing::warn!("cannot notify systemd ({state:?}): {e}");
            }
        }
        Err(e) => tracing::warn!("cannot notify systemd ({state:?}): {e}"),
    }
}

/// The watchdog interval the service manager asked for (`$WATCHDOG_USEC`), if it is
/// meant for this process; ping well within it (failoverd: every quarter).
pub fn watchdog() -> Option<Duration> {
    watchdog_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// The variables of the protocol: removed from the environment of the processes a
/// service starts (a conode run by failoverd), which must not speak for it.
pub const VARIABLES: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::to(path.to_str().unwrap()).unwrap();
        n.send("READY=1").unwrap();
        n.send("STOPPING=1").unwrap();
        assert_eq!(receive(&sock), "READY=1");
        assert_eq!(receive(&sock), "STOPPING=1");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("conode-notify-test-{}", std::process::id());
        let sock =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Notifier::to(&format!("@{name}"))
            .unwrap()
            .send("WATCHDOG=1")
            .unwrap();
        assert_eq!(receive(&sock), "WATCHDOG=1");
    }

    #[test]
    fn a_relative_socket_is_refused_and_a_missing_one_is_an_error() {
        assert!(Notifier::to("notify").is_err());
        let d = tempfile::tempdir().unwrap();
        let n = Notifier::to(d.path().join("none").to_str().unwrap()).unwrap();
        let e = n.send("READY=1").unwrap_err().to_string();
        assert!(e.contains("none"), "{e}");
    }

    #[test]
    fn the_watchdog_is_for_this_process_only() {
        assert_eq!(
            watchdog_from(Some("4000000"), None, 7),
            Some(Duration::from_secs(4))
        );
        assert_eq!(
            watchdog_from(Some("4000000"), Some("7"), 7),
            Some(Duration::from_secs(4))
        );
        assert_eq!(watchdog_from(Some("4000000"), Some("8"), 7), None);
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_from(None, Some("7"), 7), None);
    }
}
