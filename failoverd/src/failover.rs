//! The failover shell: one driver task around the sans-IO core
//! ([`failoverd_core::Core`]), in the manner of quinn's driver: it feeds the core every
//! [`Event`] with the monotonic time, drains its actions, and re-arms one timer at
//! `poll_timeout`. Effects (epoch, address, conode, generations, final snapshot) are
//! carried out one at a time, in the order asked, by a worker of their own, and each
//! outcome comes back as an event: the core never assumes a side effect happened.
//!
//! This module decides nothing: every decision is the core's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use failoverd_core::{
    Action, Check, CommandId, Core, Effect, Input, Level, Mac, Millis, OpId, Outcome,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::conode_ctl::Conode;
use crate::live::Shipper;
use crate::peer::PeerClient;
use crate::standby::Store;

pub use crate::event::{Event, Handle};

/// The address as the shell manages it.
pub enum Address {
    /// `[vip] address` is empty: no address is managed (probes find no holder, adds and
    /// removes do nothing); roles, epochs and the conode are still managed.
    Unmanaged,
    /// The virtual IP on `[vip] interface` (see [`crate::vip`]), and its probe.
    Vip(crate::vip::Vip, crate::vip::ProbeTimers),
}

/// Gratuitous ARP (or unsolicited NA) bursts: this many, this far apart.
const ANNOUNCE_COUNT: u32 = 3;
const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(50);
/// How long an IPv6 address may stay tentative (the kernel's DAD) after the add.
const DAD_WAIT: Duration = Duration::from_secs(5);

fn core_mac(m: crate::vip::Mac) -> Mac {
    Mac(m.0)
}

impl Address {
    /// Our tagged address is on the interface now.
    pub async fn leftover(&self) -> Result<bool, String> {
        match self {
            Address::Unmanaged => Ok(false),
            Address::Vip(v, _) => {
                let p = v.present().await.map_err(|e| e.to_string())?;
                if p.is_present() && !p.is_ours() {
                    tracing::warn!(
                        "{} is on {} but was not added by failoverd (no IFA_PROTO tag): it is left alone; remove it by hand if it should not be there",
                        v.cidr(),
                        v.interface
                    );
                }
                Ok(p.is_ours())
            }
        }
    }

    async fn probe(&self) -> Result<Option<Mac>, String> {
        match self {
            Address::Unmanaged => Ok(None),
            Address::Vip(v, timers) => v
                .probe(*timers)
                .await
                .map(|m| m.map(core_mac))
                .map_err(|e| e.to_string()),
        }
    }

    /// One probe and a short wait: [`failoverd_core::Effect::QuickProbe`].
    async fn quick_probe(&self) -> Result<Option<Mac>, String> {
        match self {
            Address::Unmanaged => Ok(None),
            Address::Vip(v, timers) => v
                .probe(timers.quick())
                .await
                .map(|m| m.map(core_mac))
                .map_err(|e| e.to_string()),
        }
    }

    async fn add(&self) -> Result<(), String> {
        match self {
            Address::Unmanaged => Ok(()),
            Address::Vip(v, _) => {
                v.add().await.map_err(|e| e.to_string())?;
                if v.addr.is_ipv6() {
                    // The kernel's duplicate address detection decides whether the
                    // address is ours to answer for.
                    let t = Instant::now();
                    loop {
                        match v.present().await.map_err(|e| e.to_string())? {
                            crate::vip::Presence::Present {
                                dad: crate::vip::Dad::Done,
                                ..
                            } => break,
                            crate::vip::Presence::Present {
                                dad: crate::vip::Dad::Failed,
                                ..
                            } => {
                                let _ = v.remove().await;
                                return Err(format!(
                                    "{}: duplicate address detection failed: another host holds it",
                                    v.cidr()
                                ));
                            }
                            _ if t.elapsed() > DAD_WAIT => {
                                return Err(format!(
                                    "{}: still tentative after {DAD_WAIT:?}",
                                    v.cidr()
                                ))
                            }
                            _ => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                }
                Ok(())
            }
        }
    }

    async fn remove(&self) -> Result<(), String> {
        match self {
            Address::Unmanaged => Ok(()),
            Address::Vip(v, _) => v.remove().await.map_err(|e| e.to_string()),
        }
    }

    async fn announce(&self) -> Result<(), String> {
        match self {
            Address::Unmanaged => Ok(()),
            Address::Vip(v, _) => {
                // The first round now (clients move at once); the repeats in the
                // background, so that the conode starts without waiting for them.
                v.announce(1, ANNOUNCE_INTERVAL)
                    .await
                    .map_err(|e| e.to_string())?;
                let v = v.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(ANNOUNCE_INTERVAL).await;
                    if let Err(e) = v.announce(ANNOUNCE_COUNT - 1, ANNOUNCE_INTERVAL).await {
                        tracing::warn!("gratuitous ARP repeat on {}: {e}", v.interface);
                    }
                });
                Ok(())
            }
        }
    }
}

/// Watch for other MACs answering for the address while the core counts it as possibly
/// ours, and tell the driver (the core resolves it by epoch). A watch that fails is
/// started again after a pause.
pub async fn conflict_watch(
    vip: crate::vip::Vip,
    handle: Handle,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    use futures_util::StreamExt;
    let mut pause = Duration::from_millis(100);
    loop {
        let started = async {
            let own = vip.mac().await?;
            vip.watch_conflicts(own)
        };
        match started.await {
            Err(e) => tracing::warn!("address conflict watch on {}: {e}", vip.interface),
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                loop {
                    let next = tokio::select! {
                        n = stream.next() => n,
                        _ = stop.wait_for(|s| *s) => return Ok(()),
                    };
                    match next {
                        Some(Ok(mac)) => {
                            pause = Duration::from_millis(100);
                            let mine = handle.status.borrow().as_ref().is_some_and(|s| s.vip_held);
                            if mine
                                && handle
                                    .events
                                    .send(Event::Conflict(core_mac(mac)))
                                    .await
                                    .is_err()
                            {
                                return Ok(());
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!("address conflict watch on {}: {e}", vip.interface);
                            break;
                        }
                        None => break,
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// What carries out the core's effects.
pub struct Effects {
    pub state_dir: PathBuf,
    pub public: [u8; 32],
    pub store: Arc<Store>,
    pub conode: Arc<Conode>,
    pub shipper: Arc<Shipper>,
    pub address: Address,
    /// How long starting or stopping the conode may take.
    pub conode_timeout: Duration,
    /// The newest generation this host's conode database is known to hold at least
    /// (shipped from it, or installed into it); 0 when none.
    pub origin: AtomicU64,
    /// The task answering connection attempts that still reach this host for the
    /// address it removed ([`crate::unreach`]); stopped before the address is added.
    pub strays: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
}

/// How long after removing the address this host answers the connection attempts that
/// still reach it (until the new holder's announcement moved the clients' caches).
const STRAY_WINDOW: Duration = Duration::from_secs(3);

impl Effects {
    fn stop_answering_strays(&self) {
        if let Some(task) = self.strays.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }

    async fn run(&self, effect: Effect) -> Result<Outcome, String> {
        match effect {
            Effect::PersistEpoch(e) => {
                let dir = self.state_dir.clone();
                tokio::task::spawn_blocking(move || crate::epoch::write(&dir, e))
                    .await
                    .map_err(|e| format!("the epoch task failed: {e}"))??;
                Ok(Outcome::EpochPersisted(e))
            }
            Effect::ProbeAddress => Ok(Outcome::ProbeResult {
                holder: self.address.probe().await?,
            }),
            Effect::AddAddress => {
                self.stop_answering_strays();
                self.address.add().await.map(|()| Outcome::AddressAdded)
            }
            Effect::RemoveAddress => {
                // The socket that answers the connection attempts still coming here is
                // opened first, so that none right after the removal goes unanswered.
                let opened = match &self.address {
                    Address::Vip(v, _) => Some(crate::unreach::open(v).await),
                    _ => None,
                };
                self.address.remove().await?;
                if let (Address::Vip(v, _), Some(opened)) = (&self.address, opened) {
                    // Clients still sending here learn at once that the address moved.
                    let v = v.clone();
                    let task = tokio::spawn(async move {
                        let answered =
                            crate::unreach::answer_opened(&v, opened, STRAY_WINDOW).await;
                        if let Err(e) = answered {
                            tracing::warn!("answering connection attempts for {}: {e}", v.cidr());
                        }
                    });
                    let old = self
                        .strays
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .replace(task.abort_handle());
                    if let Some(old) = old {
                        old.abort();
                    }
                }
                Ok(Outcome::AddressRemoved)
            }
            Effect::Announce => self.address.announce().await.map(|()| Outcome::Announced),
            Effect::QuickProbe => Ok(Outcome::ProbeResult {
                holder: self.address.quick_probe().await?,
            }),
            Effect::StartConode => self
                .conode
                .start(self.conode_timeout)
                .await
                .map(|()| Outcome::ConodeStarted),
            Effect::StopConode => self
                .conode
                .stop(self.conode_timeout)
                .await
                .map(|()| Outcome::ConodeStopped),
            Effect::InstallGeneration(g) => {
                if g <= self.origin.load(Ordering::SeqCst) {
                    // This host's database is where generation g came from (or g was
                    // installed here already): it holds at least that data.
                    return Ok(Outcome::GenerationInstalled(g));
                }
                let gen = self
                    .store
                    .installed()
                    .into_iter()
                    .find(|i| i.manifest.generation == g)
                    .ok_or_else(|| format!("generation {g} is not held on this host"))?;
                let conode = self.conode.clone();
                let store = self.store.clone();
                let state_dir = self.state_dir.clone();
                tokio::task::spawn_blocking(move || {
                    // This host numbers its own snapshots past g from now on, also after
                    // a restart (when the store may no longer hold g).
                    let t = std::time::Instant::now();
                    crate::live::number_past(&state_dir, g).map_err(|e| e.to_string())?;
                    tracing::debug!("generation counter past {g} in {:?}", t.elapsed());
                    if conode.install(g, &gen.path)? {
                        // The conode's database is the generation's file now.
                        store.forget(g);
                    }
                    Ok::<_, String>(())
                })
                .await
                .map_err(|e| format!("the install task failed: {e}"))??;
                self.origin.fetch_max(g, Ordering::SeqCst);
                Ok(Outcome::GenerationInstalled(g))
            }
            Effect::ShipFinalSnapshot => {
                // A running conode is frozen at its final image (clients keep reading
                // until it stops); one that does not run is shipped from its file.
                let s = if self.conode.answers().await {
                    self.shipper.final_image().await
                } else {
                    self.shipper
                        .final_snapshot(self.conode.db(), self.public)
                        .await
                }
                .map_err(|e| e.to_string())?;
                self.origin.fetch_max(s.generation, Ordering::SeqCst);
                Ok(Outcome::FinalSnapshotShipped {
                    generation: s.generation,
                })
            }
        }
    }
}

/// How long the effect worker lets one effect run before it reports a failure (the core
/// has its own, shorter timeouts; this keeps a hung effect from blocking the ones after).
fn worker_limit(e: &Effect) -> Duration {
    match e {
        Effect::InstallGeneration(_) | Effect::ShipFinalSnapshot => Duration::from_secs(900),
        Effect::StartConode | Effect::StopConode => Duration::from_secs(120),
        _ => Duration::from_secs(60),
    }
}

/// Run the core until `stop`: the driver loop. `started` is the first input.
#[allow(clippy::too_many_arguments)]
pub async fn drive(
    mut core: Core,
    started: Input,
    mut events: mpsc::Receiver<Event>,
    to_self: mpsc::Sender<Event>,
    effects: Arc<Effects>,
    peer: PeerClient,
    status: watch::Sender<Option<failoverd_core::Status>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let t0 = Instant::now();
    let now = move || Millis(t0.elapsed().as_millis() as u64);
    // The effect worker: one at a time, in order.
    let (work_tx, mut work_rx) = mpsc::unbounded_channel::<(OpId, Effect)>();
    let worker_events = to_self.clone();
    let worker = tokio::spawn(async move {
        while let Some((op, effect)) = work_rx.recv().await {
            let limit = worker_limit(&effect);
            let t = Instant::now();
            let result = match tokio::time::timeout(limit, effects.run(effect)).await {
                Ok(r) => r,
                Err(_) => Err(format!("{effect:?} did not finish within {limit:?}")),
            };
            match &result {
                Ok(o) => tracing::info!("{effect:?} done in {:?}: {o:?}", t.elapsed()),
                Err(e) => tracing::warn!("{effect:?} failed after {:?}: {e}", t.elapsed()),
            }
            if worker_events
                .send(Event::Outcome { op, result })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let _worker = AbortOnDrop(worker);
    let mut replies: HashMap<CommandId, oneshot::Sender<Result<String, String>>> = HashMap::new();
    let mut next_command = 1u64;
    core.handle(now(), started);
    loop {
        while let Some(a) = core.poll_action() {
            match a {
                Action::Do { op, effect } => {
                    tracing::debug!("effect {op:?}: {effect:?}");
                    if work_tx.send((op, effect)).is_err() {
                        return Err("the effect worker is gone: this is a bug".into());
                    }
                }
                Action::Send(m) => {
                    let peer = peer.clone();
                    tokio::spawn(async move {
                        let body = crate::wire::encode(&m);
                        if let Err(e) = peer
                            .request(hyper::Method::POST, "/v1/core", body, "peer message")
                            .await
                        {
                            tracing::debug!("peer message not delivered: {e}");
                        }
                    });
                }
                Action::Reply { id, result } => {
                    if let Some(r) = replies.remove(&id) {
                        let _ = r.send(result);
                    }
                }
                Action::Log { level, text } => match level {
                    Level::Debug => tracing::debug!("{text}"),
                    Level::Info => tracing::info!("{text}"),
                    Level::Warn => tracing::warn!("{text}"),
                    Level::Error => tracing::error!("{text}"),
                },
            }
        }
        let _ = status.send(Some(core.status()));
        let deadline = core
            .poll_timeout()
            .map(|Millis(ms)| tokio::time::Instant::from_std(t0) + Duration::from_millis(ms));
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { return Ok(()) };
                let input = match ev {
                    Event::Peer(m) => Input::Peer(m),
                    Event::Command { command, reply } => {
                        let id = CommandId(next_command);
                        next_command += 1;
                        replies.insert(id, reply);
                        Input::Command { id, command }
                    }
                    Event::Health { check, ok, reason } => Input::Health { check, ok, reason },
                    Event::GenerationVerified(generation) => Input::GenerationVerified { generation },
                    Event::Conflict(mac) => Input::ConflictSeen { mac },
                    Event::Outcome { op, result } => Input::Outcome { op, result },
                };
                core.handle(now(), input);
            }
            _ = sleep => core.handle_timeout(now()),
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The health checks, every `every`: while live, this host's own conode (its admin
/// socket); while standby, the live failoverd (the peer port's status) and the live
/// conode through the address (Status over WebSocket at the conode's public address).
/// Verdicts alert only; the core never promotes on them.
pub async fn health_checks(
    handle: Handle,
    conode: Arc<Conode>,
    peer: PeerClient,
    server: conode::config::ServerToml,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<(), String> {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        let live = handle
            .status
            .borrow()
            .as_ref()
            .is_some_and(|s| s.role == failoverd_core::Role::Live);
        let mut verdicts = Vec::new();
        if live {
            let ok = conode.answers().await;
            let exited = conode.reap().await;
            verdicts.push((
                Check::OwnConode,
                ok,
                match (ok, exited) {
                    (true, _) => "its admin socket answers".to_string(),
                    (false, Some(st)) => format!("the conode exited ({st})"),
                    (false, None) => "its admin socket does not answer".to_string(),
                },
            ));
        } else {
            let r = peer
                .request(hyper::Method::GET, "/v1/status", "", "status")
                .await;
            verdicts.push(match r {
                Ok(_) => (Check::LivePeer, true, "the peer port answers".to_string()),
                Err(e) => (Check::LivePeer, false, e.to_string()),
            });
            let r = conode::client::status(&server, Duration::from_secs(2)).await;
            verdicts.push(match r {
                Ok(_) => (
                    Check::LiveConode,
                    true,
                    format!("Status answers at {}", server.address.host_port()),
                ),
                Err(e) => (
                    Check::LiveConode,
                    false,
                    format!("Status at {}: {e}", server.address.host_port()),
                ),
            });
        }
        for (check, ok, reason) in verdicts {
            if handle
                .events
                .send(Event::Health { check, ok, reason })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    }
}
