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
use crate::hooks::{Facts, Hook, Hooks};
use crate::live::Shipper;
use crate::metrics::Metrics;
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
/// How long an IPv6 address may stay tentative (the kernel's DAD, about 1 s at the
/// default `dad_transmits` and `retrans_time`) after the add: below the core's 5 s action
/// timeout, so that the add reports its own failure.
const DAD_WAIT: Duration = Duration::from_secs(3);

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

/// failoverd is stopping: if this host may hold the address (live, or releasing it, or
/// deciding about a leftover), drop it, then stop the conode (it would answer nobody,
/// and a later promote installs into its data directory). The next start is as standby. Logged step by step; errors
/// are logged, not returned: the unit's `ExecStopPost=failoverd release-vip` tries the
/// address again.
pub async fn release_on_stop(effects: &Effects, last: Option<&failoverd_core::Status>) {
    let Some(st) = last else { return };
    if !st.vip_held && st.role != failoverd_core::Role::Live {
        return;
    }
    effects.stop_answering_strays();
    match tokio::time::timeout(Duration::from_secs(10), effects.address.remove()).await {
        Ok(Ok(())) => tracing::info!("stopping: the address is released (epoch {})", st.epoch),
        Ok(Err(e)) => tracing::error!(
            "stopping: removing the address failed: {e}; `failoverd release-vip` removes it"
        ),
        Err(_) => tracing::error!(
            "stopping: removing the address took over 10 s; `failoverd release-vip` removes it"
        ),
    }
    match effects.conode.stop(effects.conode_timeout).await {
        Ok(()) => tracing::info!("stopping: the conode is stopped; this host starts as standby"),
        Err(e) => tracing::error!("stopping: stopping the conode failed: {e}"),
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

/// What the driver reports besides its decisions: systemd's watchdog, the notify hooks
/// and the metrics of role changes. Reports never wait: hooks are queued
/// ([`Hooks::fire`]), the watchdog ping is one datagram.
pub struct Reporting {
    pub metrics: Arc<Metrics>,
    pub hooks: Hooks,
    /// systemd's watchdog and its interval (`WatchdogSec=`): pinged with `WATCHDOG=1` at
    /// a quarter of it from the loop itself, so that a stuck loop stops the pings.
    pub watchdog: Option<(conode::sd_notify::Notifier, Duration)>,
    /// `[vip] address` as written, and the peer's address, for the hooks.
    pub vip: String,
    pub peer: String,
}

/// What [`Reporting`] last reported, to see what changed.
struct Reported {
    role: failoverd_core::Role,
    health: HashMap<&'static str, bool>,
    conflicts: u64,
    conflict_mac: Option<Mac>,
}

impl Reporting {
    fn facts(&self, st: &failoverd_core::Status) -> Facts {
        Facts {
            role: st.role.to_string(),
            previous_role: st.role.to_string(),
            epoch: st.epoch,
            vip: self.vip.clone(),
            peer: self.peer.clone(),
            ..Facts::default()
        }
    }

    /// Compare `st` with what was reported and report the changes. A role change is
    /// reported once it is complete (`settled`): a claim abandoned half-way is not one.
    fn observe(&self, st: &failoverd_core::Status, settled: bool, seen: &mut Reported) {
        if settled && st.role != seen.role {
            let (cause, reason) = st.role_cause.clone().unwrap_or((
                failoverd_core::RoleCause::LeftoverConfirmed,
                "started with the address".into(),
            ));
            self.metrics.role_changed(st.role, cause);
            self.hooks.fire(
                Hook::RoleChange,
                Facts {
                    previous_role: seen.role.to_string(),
                    cause: cause.label().into(),
                    reason,
                    ..self.facts(st)
                },
            );
            seen.role = st.role;
        }
        // The core forgets the other role's verdicts at a role change: so does this, so
        // that a first failing verdict after a round trip is news again.
        seen.health.retain(|n, _| {
            st.health
                .iter()
                .any(|h| crate::status::check_name(h.check) == *n)
        });
        for h in &st.health {
            let name = crate::status::check_name(h.check);
            let before = seen.health.insert(name, h.ok);
            // A change, or a first verdict that fails (a first pass is no news).
            if before.is_some_and(|b| b != h.ok) || (before.is_none() && !h.ok) {
                self.hooks.fire(
                    Hook::HealthChange,
                    Facts {
                        check: name.into(),
                        ok: Some(h.ok),
                        reason: h.reason.clone(),
                        ..self.facts(st)
                    },
                );
            }
        }
        if st.conflicts > seen.conflicts {
            seen.conflicts = st.conflicts;
            self.hooks.fire(
                Hook::Conflict,
                Facts {
                    mac: seen.conflict_mac.map(|m| m.to_string()).unwrap_or_default(),
                    conflicts: st.conflicts,
                    reason: format!("another host answered ARP for {}", self.vip),
                    ..self.facts(st)
                },
            );
        }
    }

    /// Ping the watchdog (called by the loop at each of its ticks).
    fn ping(&self) {
        if let Some((n, _)) = &self.watchdog {
            if let Err(e) = n.send("WATCHDOG=1") {
                tracing::warn!("cannot ping systemd's watchdog: {e}");
            }
        }
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
    reporting: Reporting,
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
    let mut seen = Reported {
        role: failoverd_core::Role::Standby,
        health: HashMap::new(),
        conflicts: 0,
        conflict_mac: None,
    };
    // The watchdog's pings: sent by the loop itself at each tick (a quarter of the
    // interval), so that a stuck loop sends none.
    let mut watchdog_tick = tokio::time::interval(
        reporting
            .watchdog
            .as_ref()
            .map_or(Duration::from_secs(3600), |(_, every)| *every / 4)
            .max(Duration::from_millis(10)),
    );
    watchdog_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
        let st = core.status();
        reporting.observe(&st, core.is_settled(), &mut seen);
        let _ = status.send(Some(st));
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
                    Event::Conflict(mac) => {
                        seen.conflict_mac = Some(mac);
                        Input::ConflictSeen { mac }
                    }
                    #[cfg(test)]
                    Event::Stall(d) => {
                        // A stuck decision loop, for the watchdog's test.
                        std::thread::sleep(d);
                        continue;
                    }
                    Event::Outcome { op, result } => Input::Outcome { op, result },
                };
                core.handle(now(), input);
            }
            _ = sleep => core.handle_timeout(now()),
            _ = watchdog_tick.tick() => reporting.ping(),
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
/// socket and Status at its public address); while standby, the live failoverd (the peer port's status) and the live
/// conode through the address (Status over WebSocket at the conode's public address).
/// Verdicts alert only; the core never promotes on them.
pub async fn health_checks(
    handle: Handle,
    metrics: Arc<Metrics>,
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
            // Both ways in: the admin socket (the conode runs and its database is
            // open) and Status over WebSocket at its public address (what clients use).
            let t = Instant::now();
            let admin = conode.answers().await;
            let status = if admin {
                Some(conode::client::status(&server, Duration::from_secs(2)).await)
            } else {
                None
            };
            metrics.health_check(Check::OwnConode, t.elapsed().as_secs_f64());
            let exited = conode.reap().await;
            let at = server.address.host_port();
            verdicts.push(match (status, exited) {
                (Some(Ok(_)), _) => (
                    Check::OwnConode,
                    true,
                    format!("its admin socket answers and Status answers at {at}"),
                ),
                (Some(Err(e)), _) => (
                    Check::OwnConode,
                    false,
                    format!("its admin socket answers but Status at {at}: {e}"),
                ),
                (None, Some(st)) => (Check::OwnConode, false, format!("the conode exited ({st})")),
                (None, None) => (
                    Check::OwnConode,
                    false,
                    "its admin socket does not answer".to_string(),
                ),
            });
        } else {
            let t = Instant::now();
            let r = peer
                .request(hyper::Method::GET, "/v1/status", "", "status")
                .await;
            metrics.health_check(Check::LivePeer, t.elapsed().as_secs_f64());
            verdicts.push(match r {
                Ok(_) => (Check::LivePeer, true, "the peer port answers".to_string()),
                Err(e) => (Check::LivePeer, false, e.to_string()),
            });
            let t = Instant::now();
            let r = conode::client::status(&server, Duration::from_secs(2)).await;
            metrics.health_check(Check::LiveConode, t.elapsed().as_secs_f64());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, TemplateArgs, Transport};
    use std::os::unix::net::UnixDatagram;
    use std::path::Path;

    /// A driver with real parts around it (a store, a peer client towards a port where
    /// nobody listens, no managed address) and a watchdog towards `notify`.
    fn driver(
        dir: &Path,
        notify: &Path,
        every: Duration,
    ) -> (
        impl std::future::Future<Output = Result<(), String>>,
        mpsc::Sender<Event>,
        watch::Sender<bool>,
    ) {
        conode::tls::install_provider();
        let key = conode::keys::KeyPair::generate().unwrap();
        let peer_key = conode::keys::KeyPair::generate().unwrap();
        let text = crate::config::template(&TemplateArgs {
            key_file: &dir.join("key"),
            state_dir: dir,
            conode_config: &dir.join("private.toml"),
            conode_data_dir: dir,
            peer_address: "127.0.0.1:9",
            peer_key: &peer_key.public_hex(),
            listen_peer: "",
            listen_metrics: "",
            interface: "lo",
            vip: "",
            transport: Transport::Https,
            ssh_target: "",
            ssh_inbox: "",
        });
        let cfg = Config::parse(&dir.join("f.toml"), &text, |_| None).unwrap();
        let store = Arc::new(Store::open(dir, 1, peer_key.public_bytes(), [2; 32]).unwrap());
        let status = Arc::new(crate::status::Status::new(store.clone()));
        let metrics = Arc::new(Metrics::new());
        let tls = conode::peer::PeerTls::new(&key).unwrap();
        let peer =
            PeerClient::new(&tls, "127.0.0.1:9", peer_key.public_bytes(), &cfg.timeouts).unwrap();
        let effects = Arc::new(Effects {
            state_dir: dir.to_path_buf(),
            public: [2; 32],
            store: store.clone(),
            conode: Arc::new(Conode::new(
                cfg.conode.clone(),
                dir.join("admin.sock"),
                dir.join("db"),
            )),
            shipper: Arc::new(Shipper {
                cfg: cfg.clone(),
                key,
                admin: dir.join("admin.sock"),
                peer: peer.clone(),
                status,
                metrics: metrics.clone(),
                mirror: std::sync::Mutex::new(None),
                busy: tokio::sync::Mutex::new(()),
            }),
            address: Address::Unmanaged,
            conode_timeout: Duration::from_secs(5),
            origin: AtomicU64::new(0),
            strays: std::sync::Mutex::new(None),
        });
        let (events_tx, events_rx) = mpsc::channel(16);
        let (status_tx, _status_rx) = watch::channel(None);
        let (stop_tx, stop_rx) = watch::channel(false);
        let reporting = Reporting {
            metrics: metrics.clone(),
            hooks: Hooks::start(crate::config::HooksSection::default(), metrics),
            watchdog: Some((
                conode::sd_notify::Notifier::to(notify.to_str().unwrap()).unwrap(),
                every,
            )),
            vip: String::new(),
            peer: "127.0.0.1:9".into(),
        };
        let core = Core::new(failoverd_core::Config::default()).unwrap();
        let started = Input::Started {
            leftover_address: false,
            persisted_epoch: 0,
            newest_generation: None,
        };
        let fut = drive(
            core,
            started,
            events_rx,
            events_tx.clone(),
            effects,
            peer,
            status_tx,
            reporting,
            stop_rx,
        );
        (fut, events_tx, stop_tx)
    }

    fn status(role: failoverd_core::Role) -> failoverd_core::Status {
        failoverd_core::Status {
            role,
            epoch: 5,
            vip_held: role == failoverd_core::Role::Live,
            doing: "idle".into(),
            peer: failoverd_core::PeerStatus {
                reachable: true,
                last_heard: None,
                epoch: 4,
                live: false,
                may_hold: false,
                newest_generation: None,
            },
            health: Vec::new(),
            newest_generation: Some(3),
            conflicts: 0,
            role_cause: None,
        }
    }

    fn verdict(check: Check, ok: bool) -> failoverd_core::HealthVerdict {
        failoverd_core::HealthVerdict {
            check,
            ok,
            reason: format!("{check:?} {ok}"),
            since: Millis(0),
        }
    }

    /// What the driver reports to the hooks: a role change once complete, with its
    /// cause; a health verdict that flips (or a first one that fails); each conflict,
    /// with the MAC; nothing twice.
    #[test]
    fn hooks_are_fired_for_changes_only_with_their_facts() {
        use failoverd_core::{Role, RoleCause};
        let metrics = Arc::new(Metrics::new());
        let (hooks, mut rx) = Hooks::capture(metrics.clone());
        let r = Reporting {
            metrics: metrics.clone(),
            hooks,
            watchdog: None,
            vip: "10.0.0.1/24".into(),
            peer: "10.0.0.3:7780".into(),
        };
        let mut seen = Reported {
            role: Role::Standby,
            health: HashMap::new(),
            conflicts: 0,
            conflict_mac: None,
        };
        let mut fired = || {
            let mut v = Vec::new();
            while let Ok(x) = rx.try_recv() {
                v.push(x);
            }
            v
        };
        // A claim under way (live, not settled): nothing yet; settled: one role change.
        let mut st = status(Role::Live);
        st.role_cause = Some((RoleCause::ForcedPromote, "forced promote".into()));
        r.observe(&st, false, &mut seen);
        assert!(fired().is_empty());
        r.observe(&st, true, &mut seen);
        r.observe(&st, true, &mut seen);
        let f = fired();
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].0, Hook::RoleChange);
        let facts = &f[0].1;
        assert_eq!(
            (
                facts.role.as_str(),
                facts.previous_role.as_str(),
                facts.cause.as_str()
            ),
            ("live", "standby", "forced_promote")
        );
        assert_eq!((facts.epoch, facts.vip.as_str()), (5, "10.0.0.1/24"));
        assert!(metrics
            .encode(&crate::status::StatusView::default())
            .contains("failoverd_failovers_total{cause=\"forced_promote\"} 1"));
        // Health: a first pass is no news, a failure is, and so is the recovery.
        st.health = vec![verdict(Check::OwnConode, true)];
        r.observe(&st, true, &mut seen);
        assert!(fired().is_empty());
        st.health = vec![verdict(Check::OwnConode, false)];
        r.observe(&st, true, &mut seen);
        r.observe(&st, true, &mut seen);
        st.health = vec![verdict(Check::OwnConode, true)];
        r.observe(&st, true, &mut seen);
        let f = fired();
        let oks: Vec<_> = f
            .iter()
            .map(|(h, x)| (*h, x.check.as_str(), x.ok))
            .collect();
        assert_eq!(
            oks,
            [
                (Hook::HealthChange, "own_conode", Some(false)),
                (Hook::HealthChange, "own_conode", Some(true))
            ]
        );
        // Failing, then forgotten by the core (a role round trip), then failing again:
        // news again.
        st.health = vec![verdict(Check::OwnConode, false)];
        r.observe(&st, true, &mut seen);
        st.health = Vec::new();
        r.observe(&st, true, &mut seen);
        st.health = vec![verdict(Check::OwnConode, false)];
        r.observe(&st, true, &mut seen);
        let again: Vec<_> = fired().iter().map(|(h, x)| (*h, x.ok)).collect();
        assert_eq!(
            again,
            [
                (Hook::HealthChange, Some(false)),
                (Hook::HealthChange, Some(false))
            ]
        );
        // A conflict, with the MAC the driver saw.
        seen.conflict_mac = Some(Mac([2, 0, 0, 0, 0, 9]));
        st.conflicts = 1;
        r.observe(&st, true, &mut seen);
        r.observe(&st, true, &mut seen);
        let f = fired();
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].0, Hook::Conflict);
        assert_eq!(f[0].1.mac, "02:00:00:00:00:09");
        assert_eq!(f[0].1.conflicts, 1);
        let env = f[0].1.env(Hook::Conflict);
        assert!(env.contains(&("FAILOVERD_MAC", "02:00:00:00:00:09".into())));
        assert!(env.contains(&("FAILOVERD_EVENT", "conflict".into())));
    }

    /// Watchdog pings received on `sock` within `window`.
    fn pings(sock: &UnixDatagram, window: Duration) -> usize {
        let end = Instant::now() + window;
        let mut n = 0;
        let mut buf = [0u8; 64];
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            if let Ok(k) = sock.recv(&mut buf) {
                assert_eq!(&buf[..k], b"WATCHDOG=1");
                n += 1;
            }
        }
        n
    }

    /// The watchdog is pinged by the decision loop itself: while the loop is stuck no
    /// ping goes out (systemd then restarts failoverd), and they resume after it.
    #[test]
    fn watchdog_pings_stop_while_the_decision_loop_is_stuck() {
        let d = tempfile::tempdir().unwrap();
        let notify = d.path().join("notify");
        let sock = UnixDatagram::bind(&notify).unwrap();
        let every = Duration::from_millis(400); // pings every 100 ms
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (fut, events, stop) = rt.block_on(async { driver(d.path(), &notify, every) });
        let task = rt.spawn(fut);
        let running = pings(&sock, Duration::from_millis(1000));
        assert!(running >= 5, "{running} pings in 1 s while the loop runs");
        rt.block_on(events.send(Event::Stall(Duration::from_millis(1500))))
            .unwrap();
        std::thread::sleep(Duration::from_millis(150));
        // Drain what was sent before the stall began.
        let _ = pings(&sock, Duration::from_millis(1));
        let stuck = pings(&sock, Duration::from_millis(1000));
        assert_eq!(stuck, 0, "pings went on while the loop was stuck");
        std::thread::sleep(Duration::from_millis(500));
        let after = pings(&sock, Duration::from_millis(1000));
        assert!(after >= 5, "{after} pings in 1 s after the loop came back");
        stop.send(true).unwrap();
        rt.block_on(task).unwrap().unwrap();
    }
}
