//! The target: subsystems, ports and the controller registry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tracing::{info, warn};

use crate::Status;
use crate::ana;
use crate::ctrl::{Controller, Limits, Who};
use crate::discovery::PeerPort;
use crate::subsystem::{CNTLIDS, DISCOVERY_NQN, Port, Subsystem};
use crate::wire::{ConnectData, get_str};

/// A Connect refusal: the status and, for Connect Invalid Parameters, the IATTR/IPO in DW0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectError {
    pub status: Status,
    pub result: u32,
}

impl ConnectError {
    fn new(status: Status) -> Self {
        ConnectError { status: status.dnr(), result: 0 }
    }

    /// Invalid parameter at byte `offset` of the Connect data (IATTR = 1, NVMe-oF 1.1 Fig. 21).
    fn data_param(offset: usize) -> Self {
        ConnectError { status: Status::CONNECT_INVALID_PARAMETERS.dnr(), result: 1 << 16 | offset as u32 }
    }

    /// The same without Do Not Retry: the host may succeed later and keeps trying.
    fn retry(self) -> Self {
        ConnectError { status: self.status.without_dnr(), ..self }
    }

    /// Invalid parameter at byte `offset` of the Connect SQE (IATTR = 0).
    pub fn sqe_param(offset: usize) -> Self {
        ConnectError { status: Status::CONNECT_INVALID_PARAMETERS.dnr(), result: offset as u32 }
    }
}

#[derive(Debug, Default)]
struct Registry {
    ctrls: HashMap<u16, Arc<Controller>>,
    next: u16,
}

#[derive(Debug)]
pub struct Target {
    subsystems: RwLock<Vec<Arc<Subsystem>>>,
    /// NQNs a reconfiguration took away (and none has brought back): their hosts' reconnects
    /// are refused without Do Not Retry, so a subsystem torn down and set up again — a planned
    /// move, a test harness — finds its hosts back (Linux's nvmet gets there by closing a port
    /// left without subsystems; a listener of ours serves on).
    withdrawn: Mutex<std::collections::HashSet<String>>,
    pub ports: Vec<Port>,
    registry: Mutex<Registry>,
    genctr: AtomicU64,
    p2p: std::sync::OnceLock<Arc<p2pnvmf_p2p::plan::P2p>>,
    pub limits: Limits,
    /// This head's ANA groups, whose states its namespaces report.
    pub ana: Arc<ana::Groups>,
    /// Other heads' listeners (from the cluster), listed in the discovery log too.
    peers: RwLock<Vec<PeerPort>>,
}

impl Target {
    pub fn new(subsystems: Vec<Arc<Subsystem>>, ports: Vec<Port>) -> Arc<Self> {
        Self::with(subsystems, ports, Limits::default(), ana::Groups::new(|_| ana::State::Optimized))
    }

    /// A target with `limits` whose namespaces are in groups of `ana`.
    pub fn with(subsystems: Vec<Arc<Subsystem>>, ports: Vec<Port>, limits: Limits, ana: Arc<ana::Groups>) -> Arc<Self> {
        ana_gauges(&subsystems);
        Arc::new(Target {
            subsystems: RwLock::new(subsystems),
            withdrawn: Mutex::default(),
            ports,
            registry: Mutex::new(Registry { next: 1, ..Registry::default() }),
            genctr: AtomicU64::new(1),
            p2p: std::sync::OnceLock::new(),
            limits,
            ana,
            peers: RwLock::default(),
        })
    }

    /// Sets ANA group `id`'s state on this head; when it changes, every controller of a
    /// subsystem with a namespace in the group gets an ANA Change notice (and reads log 0Ch).
    /// Returns whether it changed.
    pub fn set_ana_state(&self, id: u32, state: ana::State) -> bool {
        let Some(group) = self.ana.get(id) else { return false };
        let was = group.state();
        if !self.ana.set(id, state) {
            return false;
        }
        let mut told = 0;
        for c in self.controllers() {
            let Some(s) = c.subsystem() else { continue };
            if s.namespaces.iter().any(|n| Arc::ptr_eq(&n.ana, group)) {
                c.notify(crate::ctrl::AEN_ANA_CHANGE);
                told += 1;
            }
        }
        info!(group = id, from = %was, to = %state, controllers = told, "ANA state changed");
        ana_gauge(id, state);
        true
    }

    /// The p2p state namespaces with p2p buffers draw on (set once at start).
    pub fn set_p2p(&self, p2p: Arc<p2pnvmf_p2p::plan::P2p>) {
        let _ = self.p2p.set(p2p);
    }

    pub fn p2p(&self) -> Option<&Arc<p2pnvmf_p2p::plan::P2p>> {
        self.p2p.get()
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current subsystems (a snapshot: a reconfiguration may replace them).
    pub fn subsystems(&self) -> Vec<Arc<Subsystem>> {
        self.subsystems.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the subsystems (a configuration reload): controllers of subsystems that are
    /// gone, or of hosts no longer allowed, are torn down; the others get the new version of
    /// their subsystem (namespaces added and removed, announced to the host by a Namespace
    /// Attribute Changed event); the discovery log generation moves on and discovery
    /// controllers get a Discovery Log Page Change notice.
    pub fn reconfigure(&self, subsystems: Vec<Arc<Subsystem>>) {
        ana_gauges(&subsystems);
        let old =
            std::mem::replace(&mut *self.subsystems.write().unwrap_or_else(|e| e.into_inner()), subsystems.clone());
        {
            let mut withdrawn = self.withdrawn.lock().unwrap_or_else(|e| e.into_inner());
            withdrawn.extend(old.iter().map(|s| s.nqn.clone()));
            for s in &subsystems {
                withdrawn.remove(&s.nqn);
            }
        }
        let ctrls: Vec<Arc<Controller>> = self.registry().ctrls.values().cloned().collect();
        for c in ctrls.iter().filter(|c| !c.is_discovery()) {
            let new =
                subsystems.iter().find(|s| s.nqn == c.subnqn() && s.host_allowed(&c.hostnqn) && s.on_port(c.port.id));
            match new {
                None => {
                    warn!(cntlid = c.cntlid, subnqn = c.subnqn(), hostnqn = %c.hostnqn, "reconfigured: host may no longer use this subsystem; tearing the controller down");
                    self.remove_controller(c.cntlid);
                }
                Some(s) if c.subsystem().is_some_and(|old| !Arc::ptr_eq(&old, s)) => {
                    let changed = c.replace_subsystem(s.clone());
                    if !changed.is_empty() {
                        info!(cntlid = c.cntlid, subnqn = c.subnqn(), hostnqn = %c.hostnqn, ?changed, "reconfigured: namespaces changed; Namespace Attribute Changed sent");
                    }
                }
                Some(_) => {}
            }
        }
        self.discovery_changed(&format!("{} subsystem(s)", subsystems.len()));
    }

    /// The discovery log changed: its generation moves on and discovery controllers get a
    /// Discovery Log Page Change notice.
    fn discovery_changed(&self, why: &str) {
        let generation = self.genctr.fetch_add(1, Ordering::Relaxed) + 1;
        info!(generation, "discovery log changed: {why}");
        for c in self.controllers().iter().filter(|c| c.is_discovery()) {
            c.notify(crate::ctrl::AEN_DISCOVERY_LOG_CHANGE);
        }
    }

    /// The listeners other heads serve now (the cluster's view); a change reaches discovery
    /// controllers as a Discovery Log Page Change.
    pub fn set_peers(&self, peers: Vec<PeerPort>) {
        let mut cur = self.peers.write().unwrap_or_else(|e| e.into_inner());
        if *cur == peers {
            return;
        }
        let heads: std::collections::BTreeSet<&str> = peers.iter().map(|p| p.head.as_str()).collect();
        let why = format!("peer heads {heads:?}, {} listener(s)", peers.len());
        *cur = peers;
        drop(cur);
        self.discovery_changed(&why);
    }

    pub fn port(&self, id: u16) -> Option<&Port> {
        self.ports.iter().find(|p| p.id == id)
    }

    pub fn controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.registry().ctrls.get(&cntlid).cloned()
    }

    /// Every controller, by controller ID.
    pub fn controllers(&self) -> Vec<Arc<Controller>> {
        let mut v: Vec<_> = self.registry().ctrls.values().cloned().collect();
        v.sort_by_key(|c| c.cntlid);
        v
    }

    pub fn controller_count(&self) -> usize {
        self.registry().ctrls.len()
    }

    /// Admin queue Connect: checks the NQNs and the host allow-list, creates a controller
    /// and starts its keep-alive timer.
    pub fn connect_admin(
        self: &Arc<Self>,
        port: &Port,
        data: &ConnectData,
        kato_ms: u32,
        peer: &str,
    ) -> Result<Arc<Controller>, ConnectError> {
        let (subnqn, hostnqn) = self.connect_nqns(data)?;
        if data.cntlid.get() != 0xffff {
            // Only the dynamic controller model is offered.
            return Err(ConnectError::data_param(std::mem::offset_of!(ConnectData, cntlid)));
        }
        let subsys = if subnqn == DISCOVERY_NQN {
            None
        } else {
            let s = self.subsystem_for(subnqn, hostnqn, port)?;
            if !s.host_allowed(hostnqn) {
                warn!(subnqn, hostnqn, "host not in the subsystem's allow-list");
                return Err(ConnectError::new(Status::CONNECT_INVALID_HOST));
            }
            Some(s)
        };
        let mut reg = self.registry();
        let serving = reg.ctrls.values().filter(|c| !c.is_discovery() && c.subnqn() == subnqn).count();
        if subsys.is_some() && serving >= usize::from(self.limits.controllers_per_subsystem) {
            warn!(
                subnqn,
                hostnqn,
                limit = self.limits.controllers_per_subsystem,
                "Connect refused: the subsystem serves as many controllers as limits.controllers_per_subsystem allows"
            );
            return Err(ConnectError::new(Status::CONNECT_CONTROLLER_BUSY));
        }
        // The next free ID of the subsystem's range, from where the last one was given.
        let ids = subsys.as_ref().map_or(CNTLIDS, |s| s.cntlids.clone());
        let (lo, span) = (u32::from(*ids.start()), ids.len() as u32);
        let from = u32::from(reg.next).saturating_sub(lo);
        let Some(cntlid) = (0..span).map(|i| (lo + (from + i) % span) as u16).find(|id| !reg.ctrls.contains_key(id))
        else {
            warn!(subnqn, hostnqn, ids = ?ids, "Connect refused: every controller ID of the subsystem's range is in use");
            return Err(ConnectError::new(Status::CONNECT_CONTROLLER_BUSY));
        };
        reg.next = if cntlid >= *CNTLIDS.end() { 1 } else { cntlid + 1 };
        let ctrl = Arc::new(Controller::new(
            cntlid,
            subsys,
            Who { hostnqn: hostnqn.to_string(), hostid: data.hostid, peer: peer.to_string() },
            port.clone(),
            kato_ms,
            self.limits,
        ));
        reg.ctrls.insert(cntlid, ctrl.clone());
        drop(reg);
        metrics::gauge!("p2pnvmf_controllers", "transport" => port.trtype.as_str()).increment(1.0);
        ctrl.touch();
        info!(cntlid, subnqn, hostnqn, port = port.id, kato_ms, "controller created");
        let (target, c) = (Arc::clone(self), ctrl.clone());
        tokio::spawn(async move {
            c.keep_alive_expired().await;
            if c.dead_reason().is_none() {
                warn!(cntlid = c.cntlid, subnqn = c.subnqn(), hostnqn = %c.hostnqn,
                      kato_ms = c.kato().as_millis() as u64, "keep-alive timeout: tearing the controller down");
                c.kill("keep-alive timeout");
            }
            target.remove_controller(c.cntlid);
        });
        Ok(ctrl)
    }

    /// I/O queue Connect: the controller must exist, be enabled and belong to this host — the
    /// same host NQN and Host Identifier as its admin queue (a host that names another's
    /// controller does not get a queue on it), still allowed by the subsystem.
    pub fn connect_io(
        &self,
        port: &Port,
        data: &ConnectData,
        qid: u16,
        entries: u16,
    ) -> Result<Arc<Controller>, ConnectError> {
        let (subnqn, hostnqn) = self.connect_nqns(data)?;
        let cntlid_off = std::mem::offset_of!(ConnectData, cntlid);
        let ctrl = self.controller(data.cntlid.get()).ok_or(ConnectError::data_param(cntlid_off))?;
        if ctrl.subnqn() != subnqn || ctrl.hostnqn != hostnqn || ctrl.port.id != port.id {
            return Err(ConnectError::data_param(cntlid_off));
        }
        if ctrl.hostid != data.hostid {
            warn!(
                cntlid = ctrl.cntlid,
                hostnqn, "I/O queue Connect with another Host Identifier than its controller's"
            );
            return Err(ConnectError::data_param(std::mem::offset_of!(ConnectData, hostid)));
        }
        if ctrl.subsystem().is_some_and(|s| !s.host_allowed(hostnqn)) {
            return Err(ConnectError::new(Status::CONNECT_INVALID_HOST));
        }
        if ctrl.is_discovery() || !ctrl.enabled() {
            return Err(ConnectError::new(Status::COMMAND_SEQUENCE_ERROR));
        }
        if !ctrl.add_io_queue(qid, entries) {
            return Err(ConnectError::sqe_param(42));
        }
        ctrl.touch();
        Ok(ctrl)
    }

    fn connect_nqns<'a>(&self, data: &'a ConnectData) -> Result<(&'a str, &'a str), ConnectError> {
        let subnqn = get_str(&data.subnqn)
            .filter(|s| !s.is_empty())
            .ok_or(ConnectError::data_param(std::mem::offset_of!(ConnectData, subnqn)))?;
        let hostnqn = get_str(&data.hostnqn)
            .filter(|s| !s.is_empty())
            .ok_or(ConnectError::data_param(std::mem::offset_of!(ConnectData, hostnqn)))?;
        Ok((subnqn, hostnqn))
    }

    fn subsystem_for(&self, subnqn: &str, hostnqn: &str, port: &Port) -> Result<Arc<Subsystem>, ConnectError> {
        if let Some(s) = self.subsystems().into_iter().find(|s| s.nqn == subnqn && s.on_port(port.id)) {
            return Ok(s);
        }
        let refused = ConnectError::data_param(std::mem::offset_of!(ConnectData, subnqn));
        if self.withdrawn.lock().unwrap_or_else(|e| e.into_inner()).contains(subnqn) {
            info!(
                subnqn,
                hostnqn,
                "Connect for a subsystem a reload took away: refused without Do Not Retry, so the host tries again"
            );
            return Err(refused.retry());
        }
        warn!(subnqn, hostnqn, port = port.id, "Connect for a subsystem not served on this port");
        Err(refused)
    }

    pub fn remove_controller(&self, cntlid: u16) {
        if let Some(c) = self.registry().ctrls.remove(&cntlid) {
            metrics::gauge!("p2pnvmf_controllers", "transport" => c.port.trtype.as_str()).decrement(1.0);
            c.kill("controller removed");
            info!(cntlid, subnqn = c.subnqn(), hostnqn = %c.hostnqn, "controller removed");
        }
    }

    pub fn generation(&self) -> u64 {
        self.genctr.load(Ordering::Relaxed)
    }

    /// The discovery log page for `hostnqn`, as it stands now.
    pub fn discovery_log(&self, hostnqn: &str) -> Vec<u8> {
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner()).clone();
        crate::discovery::log(
            &self.subsystems(),
            &self.ports,
            &peers,
            hostnqn,
            self.generation(),
            self.limits.queue_entries,
        )
    }
}

/// `p2pnvmf_ana_state{group}`: the group's state on this head, as its ANAS value.
fn ana_gauge(group: u32, state: ana::State) {
    metrics::gauge!("p2pnvmf_ana_state", "group" => group.to_string()).set(f64::from(state as u8));
}

/// The gauge of every group a namespace of `subsystems` is in (at start, and after a reload that
/// may bring a namespace in a group that had none).
fn ana_gauges(subsystems: &[Arc<Subsystem>]) {
    for n in subsystems.iter().flat_map(|s| &s.namespaces) {
        ana_gauge(n.ana.id, n.ana.state());
    }
}
