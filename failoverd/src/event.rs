//! What the failover driver ([`crate::failover`]) is told, and the handle through which
//! the peer port, the control socket, the snapshot loop and the health checks tell it.
//! Plain data: nothing here acts.

use failoverd_core::{Check, Command, Mac, OpId, Outcome, PeerMessage};
use tokio::sync::{mpsc, oneshot, watch};

/// Everything the driver is told.
pub enum Event {
    /// A message from the peer (authenticated by the peer port's pinned TLS).
    Peer(PeerMessage),
    /// An operator command and where its one answer goes.
    Command {
        command: Command,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// A health check's verdict.
    Health {
        check: Check,
        ok: bool,
        reason: String,
    },
    /// A generation verified and installed by the store, or shipped from this host's
    /// conode database (which then holds at least that data).
    GenerationVerified(u64),
    /// Another MAC answered ARP for the address.
    Conflict(Mac),
    /// The outcome of an effect.
    Outcome {
        op: OpId,
        result: Result<Outcome, String>,
    },
    /// Block the driver's loop this long (the watchdog's test: a stuck loop).
    #[cfg(test)]
    Stall(std::time::Duration),
}

/// The way into the driver.
#[derive(Clone)]
pub struct Handle {
    pub events: mpsc::Sender<Event>,
    pub status: watch::Receiver<Option<failoverd_core::Status>>,
}

impl Handle {
    /// Ask the core to carry out `command`; its answer in words.
    pub async fn command(&self, command: Command) -> Result<String, String> {
        let (tx, rx) = oneshot::channel();
        self.events
            .send(Event::Command { command, reply: tx })
            .await
            .map_err(|_| "failoverd is stopping".to_string())?;
        rx.await
            .map_err(|_| "failoverd stopped before the command finished".to_string())?
    }
}
