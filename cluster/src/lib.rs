//! Several heads serving the same storage (a shared block device, a dual-ported SSD): each ANA
//! group is owned by one head at a time through etcd, which the owner reports Optimized and
//! the others `standby`. Nothing of our own keeps cluster state: one key per group names its
//! owner and lives under the owner's etcd lease; whoever creates the key while it is absent
//! owns the group (a transaction on its create revision).
//!
//! Fencing: a head that cannot renew its lease stops serving every group (Inaccessible) before
//! etcd can expire the lease and let another head take over — see [`fence::fence_at`].

pub mod fence;
mod store;

pub use store::{EtcdStore, Shared};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    Txn, TxnOp, WatchOptions, WatchStream,
};
use p2pnvmf_nvmf::ana::State;
use p2pnvmf_nvmf::discovery::PeerPort;
use p2pnvmf_nvmf::{Target, TrType};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tracing::{info, warn};

/// How long one etcd request may take before the connection counts as broken.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a planned move may take before it is withdrawn.
pub const MOVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Between attempts to reach etcd.
const RETRY: Duration = Duration::from_millis(500);

/// What `p2pnvmf status` shows of the cluster.
#[derive(Debug, Clone, Default)]
struct Shown {
    lease: Option<i64>,
    /// Until when this head may serve what it owns (none when fenced).
    fence_at: Option<Instant>,
    owners: BTreeMap<u32, String>,
    etcd_error: Option<String>,
}

/// A running head's membership; dropping it does not stop it (see [`Cluster::stop`]).
#[derive(Debug)]
pub struct Cluster {
    cfg: p2pnvmf_config::Cluster,
    groups: BTreeSet<u32>,
    target: Arc<Target>,
    shown: Arc<Mutex<Shown>>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Tells the session to register this head's listeners again.
    listeners_changed: Arc<tokio::sync::Notify>,
}

impl Cluster {
    /// Joins the cluster of `cfg` for `groups` (the ANA groups this head's namespaces are in):
    /// until this head holds a lease, they are Inaccessible here. Needs a multi-thread runtime
    /// (reservation state is taken off the worker threads: `block_in_place`).
    /// `shared`: what the namespaces' reservation stores (made from it) share with the session.
    pub fn start(
        cfg: &p2pnvmf_config::Cluster,
        target: Arc<Target>,
        groups: BTreeSet<u32>,
        shared: Arc<Shared>,
    ) -> Cluster {
        for &g in &groups {
            target.set_ana_state(g, State::Inaccessible);
        }
        let shown = Arc::new(Mutex::new(Shown::default()));
        let (stop, stopped) = watch::channel(false);
        let head = Head {
            cfg: cfg.clone(),
            groups: groups.clone(),
            target: target.clone(),
            ttl: Duration::from_secs(cfg.lease_ttl_secs.into()),
            lease: None,
            owners: BTreeMap::new(),
            shown: shown.clone(),
            endpoint: 0,
            shared,
            peers: BTreeMap::new(),
            moves: BTreeMap::new(),
            joined: false,
            listeners_changed: Arc::default(),
            registered: String::new(),
        };
        let listeners_changed = head.listeners_changed.clone();
        let task = tokio::spawn(head.run(stopped));
        Cluster { cfg: cfg.clone(), groups, target, shown, stop, task: Mutex::new(Some(task)), listeners_changed }
    }

    /// The target's subsystems changed (a reload): other heads' discovery logs learn which of
    /// them this head serves on which listener.
    pub fn subsystems_changed(&self) {
        self.listeners_changed.notify_one();
    }

    /// Leaves the cluster: this head's groups go Inaccessible here and its lease is revoked, so
    /// another head takes them over at once (a planned shutdown).
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Moves group `group` to head `to` (`p2pnvmf ana move`): a move key under a lease of its
    /// own names `to`; the owner goes to Change and hands the group over, `to` takes it, the
    /// others stand aside. Waits until `to` owns it (or gives up after [`MOVE_TIMEOUT`],
    /// withdrawing the move), then removes the key. Runs on a connection of its own.
    pub fn move_group(
        &self,
        group: u32,
        to: String,
    ) -> impl std::future::Future<Output = Result<String, String>> + Send + 'static {
        let cfg = self.cfg.clone();
        async move {
            let opts = ConnectOptions::new().with_connect_timeout(REQUEST_TIMEOUT).with_timeout(REQUEST_TIMEOUT);
            let (mut c, _) = connect(cfg.etcd.clone(), 0, opts).await?;
            let get = |c: &mut Client, key: String| {
                let mut c = c.clone();
                async move {
                    let r = timed(c.get(key, None)).await?.map_err(failed("reading"))?;
                    Ok::<_, Broken>(r.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
                }
            };
            let owner_key = format!("{}/ana/{group}/owner", cfg.prefix);
            if get(&mut c, format!("{}/heads/{to}", cfg.prefix)).await?.is_none() {
                return Err(format!("no live head named '{to}' in the cluster"));
            }
            let from = get(&mut c, owner_key.clone()).await?;
            if from.as_deref() == Some(to.as_str()) {
                return Ok(format!("group {group} is {to}'s already"));
            }
            let t0 = Instant::now();
            let lease =
                timed(c.lease_grant(MOVE_TIMEOUT.as_secs() as i64 * 2, None)).await?.map_err(failed("lease grant"))?;
            let move_key = format!("{}/ana/{group}/move", cfg.prefix);
            timed(c.put(move_key.clone(), to.clone(), Some(PutOptions::new().with_lease(lease.id()))))
                .await?
                .map_err(failed("writing the move"))?;
            let mut moved = false;
            while t0.elapsed() < MOVE_TIMEOUT {
                if get(&mut c, owner_key.clone()).await?.as_deref() == Some(to.as_str()) {
                    moved = true;
                    break;
                }
                sleep(Duration::from_millis(20)).await;
            }
            let _ = timed(c.lease_revoke(lease.id())).await;
            let was = from.unwrap_or_else(|| "nobody".into());
            match moved {
                true => Ok(format!("group {group} moved from {was} to {to} in {} ms", t0.elapsed().as_millis())),
                false => Err(format!(
                    "group {group}: {to} did not take it from {was} in {MOVE_TIMEOUT:?}; the move is withdrawn"
                )),
            }
        }
    }

    /// The cluster as `p2pnvmf status` shows it.
    pub fn status(&self) -> serde_json::Value {
        let s = self.shown.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let groups: Vec<_> = self
            .groups
            .iter()
            .map(|g| {
                let state = self.target.ana.get(*g).map(|gr| gr.state().as_str());
                serde_json::json!({"group": g, "owner": s.owners.get(g), "state": state})
            })
            .collect();
        let valid_ms = s.fence_at.map(|f| f.saturating_duration_since(Instant::now()).as_millis() as u64);
        serde_json::json!({"name": self.cfg.name, "etcd": self.cfg.etcd, "lease": s.lease.map(|l| format!("{l:x}")),
                           "lease_ttl_s": self.cfg.lease_ttl_secs, "serving_for_ms": valid_ms,
                           "etcd_error": s.etcd_error, "groups": groups})
    }
}

/// This head's lease: its ID and until when it may serve under it.
#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    /// As granted (each renewal restores it).
    ttl: Duration,
    fence_at: Instant,
}

struct Head {
    cfg: p2pnvmf_config::Cluster,
    groups: BTreeSet<u32>,
    target: Arc<Target>,
    ttl: Duration,
    lease: Option<Lease>,
    /// Each group's owner as etcd last said (absent: nobody).
    owners: BTreeMap<u32, String>,
    shown: Arc<Mutex<Shown>>,
    /// The etcd member last talked to (index into the endpoints).
    endpoint: usize,
    shared: Arc<Shared>,
    /// Other heads' listeners, by head (their registration keys).
    peers: BTreeMap<String, Vec<PeerPort>>,
    /// Planned moves under way: group → the head it goes to (`ana move`).
    moves: BTreeMap<u32, String>,
    /// Whether this head has read the cluster's state once (a reconnect is no restart).
    joined: bool,
    listeners_changed: Arc<tokio::sync::Notify>,
    /// What this head registered of its listeners last.
    registered: String,
}

/// Why a head stops serving under its lease.
#[derive(Debug, Clone, Copy)]
enum Fence {
    /// No renewal answered in time: etcd may expire the lease soon.
    Late,
    /// etcd answered a renewal: the lease is gone.
    Expired,
    /// Asked to stop.
    Leaving,
}

impl Fence {
    /// The metric's label and what the log says.
    fn says(self) -> (&'static str, &'static str) {
        match self {
            Fence::Late => ("renewal_late", "lease not renewed in time"),
            Fence::Expired => ("lease_expired", "etcd says the lease expired"),
            Fence::Leaving => ("leaving", "leaving the cluster"),
        }
    }
}

/// Why a connection to etcd was given up (the lease may still be valid: the head reconnects).
pub(crate) type Broken = String;

impl Head {
    fn owner_key(&self, group: u32) -> String {
        format!("{}/ana/{group}/owner", self.cfg.prefix)
    }

    /// The group of a key `PREFIX/ana/G/<what>` (`owner`, `move`).
    fn group_key(&self, key: &[u8], what: &str) -> Option<u32> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&format!("{}/ana/", self.cfg.prefix))?;
        rest.strip_suffix(what)?.strip_suffix('/')?.parse().ok()
    }

    fn group_of(&self, key: &[u8]) -> Option<u32> {
        self.group_key(key, "owner")
    }

    /// A planned move's key (`PREFIX/ana/G/move` = the head the group goes to): kept, and where
    /// this head owns the group, handed over. False when `key` is no move's.
    async fn planned(&mut self, client: &mut Client, key: &[u8], value: Option<&[u8]>) -> Result<bool, Broken> {
        let Some(g) = self.move_group_of(key) else { return Ok(false) };
        let Some(to) = value.map(|v| String::from_utf8_lossy(v).into_owned()) else {
            self.moves.remove(&g);
            return Ok(true);
        };
        info!(group = g, to, "cluster: planned move");
        self.moves.insert(g, to.clone());
        if to != self.cfg.name && self.owners.get(&g) == Some(&self.cfg.name) {
            self.hand_over(client, g).await?;
        }
        Ok(true)
    }

    /// Gives group `g` up for a planned move: Change here first (hosts hold their I/O for the
    /// transition instead of failing over), then the owner key deleted while it is still this
    /// lease's; the head named by the move takes it, others stand aside.
    async fn hand_over(&mut self, client: &mut Client, g: u32) -> Result<(), Broken> {
        let Some(lease) = self.lease else { return Ok(()) };
        self.target.set_ana_state(g, State::Change);
        let key = self.owner_key(g);
        let txn = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, lease.id)])
            .and_then([TxnOp::delete(key, None)]);
        timed(client.txn(txn)).await?.map_err(|e| format!("handing group {g} over: {e}"))?;
        info!(group = g, to = self.moves.get(&g).map(String::as_str), "cluster: group handed over");
        Ok(())
    }

    fn move_group_of(&self, key: &[u8]) -> Option<u32> {
        self.group_key(key, "move")
    }

    /// The head a registration key `PREFIX/heads/<name>` names.
    fn head_of<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        std::str::from_utf8(key).ok()?.strip_prefix(&self.cfg.prefix)?.strip_prefix("/heads/")
    }

    /// A head's listener registration (`None`: the head is gone): kept for the discovery log.
    /// False when `key` is no head's.
    fn peer(&mut self, key: &[u8], value: Option<&[u8]>) -> bool {
        let Some(name) = self.head_of(key) else { return false };
        if name == self.cfg.name {
            return true;
        }
        match value {
            Some(v) => {
                let ports = parse_listeners(name, &String::from_utf8_lossy(v));
                info!(head = name, listeners = ports.len(), "cluster: head's listeners registered");
                self.peers.insert(name.to_string(), ports);
            }
            None => {
                info!(head = name, "cluster: head gone (its lease ended)");
                self.peers.remove(name);
            }
        }
        self.publish_peers();
        true
    }

    /// The peers' listeners to the target's discovery log (which says whether they changed).
    fn publish_peers(&self) {
        self.target.set_peers(self.peers.values().flatten().cloned().collect());
    }

    /// Sets every group's state from what this head knows: Inaccessible without a valid lease,
    /// Optimized where it owns the group (Change while handing it over), `standby` elsewhere.
    fn apply(&self) {
        for &g in &self.groups {
            let mine = self.owners.get(&g) == Some(&self.cfg.name);
            let leaving = self.moves.get(&g).is_some_and(|to| *to != self.cfg.name);
            let state = match self.lease {
                None => State::Inaccessible,
                // Handed over, until etcd says the key is gone: still Change.
                Some(_) if mine && leaving => State::Change,
                Some(_) if mine => State::Optimized,
                Some(_) => self.cfg.standby,
            };
            self.target.set_ana_state(g, state);
        }
        let left = self.lease.map_or(Duration::ZERO, |l| l.fence_at.saturating_duration_since(Instant::now()));
        metrics::gauge!("p2pnvmf_cluster_serving_for_seconds").set(left.as_secs_f64());
        let mut s = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        s.lease = self.lease.map(|l| l.id);
        s.fence_at = self.lease.map(|l| l.fence_at);
        s.owners = self.owners.clone();
    }

    fn shown_error(&self, e: Option<String>) {
        self.shown.lock().unwrap_or_else(|e| e.into_inner()).etcd_error = e;
    }

    /// Stops serving: the lease can no longer be trusted to outlive the next moment.
    fn fence(&mut self, why: Fence) {
        if let Some(l) = self.lease.take() {
            let (code, why) = why.says();
            warn!(lease = format_args!("{:x}", l.id), "cluster: fenced ({why}): every group inaccessible on this head");
            metrics::counter!("p2pnvmf_cluster_fences_total", "reason" => code).increment(1);
        }
        self.owners.retain(|_, o| *o != self.cfg.name);
        self.apply();
    }

    /// When the fence falls, if there is a lease to lose.
    fn fence_deadline(&self) -> Option<Instant> {
        self.lease.map(|l| l.fence_at)
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            let why = match self.session(&mut stop).await {
                Ok(()) => return,
                Err(why) => why,
            };
            warn!(etcd = ?self.cfg.etcd, "cluster: etcd: {why}; reconnecting (serving on until the fence)");
            metrics::counter!("p2pnvmf_cluster_etcd_errors_total").increment(1);
            self.shown_error(Some(why));
            tokio::select! {
                _ = sleep(RETRY) => {}
                _ = sleep_until_opt(self.fence_deadline()) => self.fence(Fence::Late),
                _ = stop.changed() => {
                    self.leave(None).await;
                    return;
                }
            }
        }
    }

    /// Connects (as long as the lease allows) and serves; Ok when asked to stop.
    async fn session(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), Broken> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_require_leader(true)
            .with_keep_alive(Duration::from_secs(1), REQUEST_TIMEOUT);
        let (endpoints, from, fence) = (self.cfg.etcd.clone(), self.endpoint, self.fence_deadline());
        let client = tokio::select! {
            c = connect(endpoints, from, opts) => match c {
                Ok((c, at)) => {
                    self.endpoint = at;
                    c
                }
                Err(why) => {
                    self.endpoint = (from + 1) % self.cfg.etcd.len();
                    return Err(why);
                }
            },
            _ = sleep_until_opt(fence) => {
                self.fence(Fence::Late);
                return Err("lease not renewed in time".into());
            }
            _ = stop.changed() => {
                self.leave(None).await;
                return Ok(());
            }
        };
        self.shared.connected(Some(client.clone()));
        let r = self.serve(client, stop).await;
        self.shared.connected(None);
        r
    }

    /// Leaves: Inaccessible here first, then the lease revoked so its keys go at once.
    async fn leave(&mut self, client: Option<&mut Client>) {
        let lease = self.lease;
        self.fence(Fence::Leaving);
        if let (Some(c), Some(l)) = (client, lease) {
            match timeout(REQUEST_TIMEOUT, c.lease_revoke(l.id)).await {
                Ok(Ok(_)) => info!(lease = format_args!("{:x}", l.id), "cluster: lease revoked; groups released"),
                _ => warn!("cluster: could not revoke the lease: its groups move when it expires"),
            }
        }
    }

    /// One connection's life: the lease (kept or new), its keep-alives, the owners read and
    /// watched, groups taken when free. Returns Ok when asked to stop.
    async fn serve(&mut self, mut client: Client, stop: &mut watch::Receiver<bool>) -> Result<(), Broken> {
        let lease = match self.lease {
            Some(l) => l,
            None => {
                let asked = Instant::now();
                let r =
                    timed(client.lease_grant(self.ttl.as_secs() as i64, None)).await?.map_err(failed("lease grant"))?;
                let ttl = Duration::from_secs(r.ttl().max(0) as u64);
                let l = Lease { id: r.id(), ttl, fence_at: fence::fence_at(asked, ttl) };
                info!(lease = format_args!("{:x}", l.id), ttl_s = ttl.as_secs(), "cluster: lease granted");
                self.lease = Some(l);
                l
            }
        };
        // Opening the keep-alive stream renews the lease (it waits for the first answer, whose
        // TTL is not 0): counted toward the fence, so that after a failover to another member
        // the renewal is not left waiting behind the session's other requests, which wait for
        // the cluster's new leader.
        let asked = Instant::now();
        let (mut keeper, mut renewals): (LeaseKeeper, LeaseKeepAliveStream) =
            timed(client.lease_keep_alive(lease.id)).await?.map_err(failed("lease keep-alive"))?;
        if let Some(l) = &mut self.lease {
            l.fence_at = fence::fence_at(asked, l.ttl);
        }
        let registered_at = self.register(&mut client, lease.id).await?;
        // Owners, reservations and heads, read at one revision and watched from the next.
        let prefix = format!("{}/", self.cfg.prefix);
        let r = timed(client.get(prefix.clone(), Some(GetOptions::new().with_prefix())))
            .await?
            .map_err(failed("reading the cluster's state"))?;
        let rev = r.header().map_or(0, |h| h.revision());
        // No other head registered before this one: nothing served the subsystems, which is a
        // power loss for their hosts — reservations without PTPL end.
        let power_lost = !self.joined
            && !r.kvs().iter().any(|kv| {
                self.head_of(kv.key()).is_some_and(|h| h != self.cfg.name) && kv.create_revision() < registered_at
            });
        self.joined = true;
        self.owners.clear();
        self.peers.clear();
        self.moves.clear();
        for kv in r.kvs() {
            if let Ok(key) = kv.key_str()
                && key.starts_with(&self.shared.resv_prefix())
            {
                if power_lost && self.shared.end_without_ptpl(&mut client, key, kv.value(), kv.mod_revision()).await? {
                    continue;
                }
                // Takes the namespace's lock, which a reservation command may hold: off the
                // worker thread, so the tasks queued on it run meanwhile.
                tokio::task::block_in_place(|| {
                    self.shared.observed(&self.target, key, Some(kv.value()), kv.mod_revision(), false)
                });
                continue;
            }
            if self.peer(kv.key(), Some(kv.value())) {
                continue;
            }
            if let Some(g) = self.move_group_of(kv.key()) {
                self.moves.insert(g, String::from_utf8_lossy(kv.value()).into_owned());
                continue;
            }
            let (Some(g), Ok(owner)) = (self.group_of(kv.key()), kv.value_str()) else { continue };
            if owner == self.cfg.name && kv.lease() != lease.id {
                // Ours from a lease this head gave up (fenced): let it go now, not at its expiry.
                let _ = timed(client.lease_revoke(kv.lease())).await;
                continue;
            }
            self.owners.insert(g, owner.to_string());
        }
        // Heads gone while this head was away are gone from its discovery log too.
        self.publish_peers();
        let mut events: WatchStream =
            timed(client.watch(prefix, Some(WatchOptions::new().with_prefix().with_start_revision(rev + 1))))
                .await?
                .map_err(failed("watching the owners"))?;
        self.shown_error(None);
        for g in self.groups.clone() {
            if !self.owners.contains_key(&g) {
                self.campaign(&mut client, g).await?;
            }
        }
        self.apply();
        let renew_every = self.ttl / 3;
        let mut next_renewal = Instant::now();
        // Send times of keep-alives not yet answered, oldest first.
        let mut sent = std::collections::VecDeque::new();
        loop {
            tokio::select! {
                _ = sleep_until(next_renewal) => {
                    next_renewal = Instant::now() + renew_every;
                    sent.push_back(Instant::now());
                    timed(keeper.keep_alive()).await?.map_err(failed("lease keep-alive"))?;
                }
                m = renewals.message() => {
                    let resp = m.map_err(failed("lease keep-alive"))?.ok_or("lease keep-alive: stream ended")?;
                    let asked = sent.pop_front().unwrap_or_else(Instant::now);
                    if resp.ttl() <= 0 {
                        self.fence(Fence::Expired);
                        return Err("lease expired".into());
                    }
                    if let Some(l) = &mut self.lease {
                        l.fence_at = fence::fence_at(asked, Duration::from_secs(resp.ttl() as u64));
                    }
                    self.apply();
                }
                m = events.message() => {
                    let resp = m.map_err(failed("watch"))?.ok_or("watch: stream ended")?;
                    let mut free = Vec::new();
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        if let Ok(key) = kv.key_str()
                            && key.starts_with(&self.shared.resv_prefix())
                        {
                            let value = (ev.event_type() == EventType::Put).then(|| kv.value());
                            tokio::task::block_in_place(|| {
                                self.shared.observed(&self.target, key, value, kv.mod_revision(), true)
                            });
                            continue;
                        }
                        let value = (ev.event_type() == EventType::Put).then(|| kv.value());
                        if self.peer(kv.key(), value) {
                            continue;
                        }
                        if self.planned(&mut client, kv.key(), value).await? {
                            // A move withdrawn (or done) may leave a group free for anyone.
                            if value.is_none() && let Some(g) = self.move_group_of(kv.key()) {
                                free.push(g);
                            }
                            continue;
                        }
                        let Some(g) = self.group_of(kv.key()) else { continue };
                        match ev.event_type() {
                            EventType::Put => {
                                let owner = kv.value_str().unwrap_or_default().to_string();
                                info!(group = g, owner, "cluster: group owned");
                                self.owners.insert(g, owner);
                            }
                            EventType::Delete => {
                                info!(group = g, was = self.owners.get(&g).map(String::as_str), "cluster: group free");
                                self.owners.remove(&g);
                                free.push(g);
                            }
                        }
                    }
                    // Not ours any more: no longer Optimized here before anything else.
                    self.apply();
                    free.retain(|g| self.groups.contains(g));
                    for g in free {
                        self.campaign(&mut client, g).await?;
                    }
                    self.apply();
                }
                _ = self.listeners_changed.notified() => {
                    if listeners_text(&self.target) != self.registered {
                        self.register(&mut client, lease.id).await?;
                        info!("cluster: this head's listeners registered again (its subsystems changed)");
                    }
                }
                _ = sleep_until_opt(self.fence_deadline()) => {
                    self.fence(Fence::Late);
                    return Err("lease not renewed in time".into());
                }
                _ = stop.changed() => {
                    self.leave(Some(&mut client)).await;
                    return Ok(());
                }
            }
        }
    }

    /// Registers this head's listeners and the subsystems on each under `lease` (gone with it),
    /// for the other heads' discovery logs; returns the revision of the registration.
    async fn register(&mut self, client: &mut Client, lease: i64) -> Result<i64, Broken> {
        let me = format!("{}/heads/{}", self.cfg.prefix, self.cfg.name);
        let listeners = listeners_text(&self.target);
        let r = timed(client.put(me, listeners.clone(), Some(PutOptions::new().with_lease(lease))))
            .await?
            .map_err(failed("registering the listeners"))?;
        self.registered = listeners;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// Takes group `g` if nobody owns it: its owner key created under this head's lease.
    async fn campaign(&mut self, client: &mut Client, g: u32) -> Result<(), Broken> {
        let Some(lease) = self.lease else { return Ok(()) };
        if self.owners.contains_key(&g) || self.moves.get(&g).is_some_and(|to| *to != self.cfg.name) {
            return Ok(());
        }
        let key = self.owner_key(g);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), self.cfg.name.clone(), Some(PutOptions::new().with_lease(lease.id)))])
            .or_else([TxnOp::get(key, None)]);
        let r = timed(client.txn(txn)).await?.map_err(|e| format!("taking group {g}: {e}"))?;
        if r.succeeded() {
            info!(group = g, lease = format_args!("{:x}", lease.id), "cluster: this head owns the group");
            self.owners.insert(g, self.cfg.name.clone());
        }
        Ok(())
    }
}

/// A client of the first member from `from` on that answers with a leader, and its index: a
/// member gone (killed, cut off, out of quorum) is passed over at once instead of being tried
/// again by a balancer while the lease runs down.
async fn connect(endpoints: Vec<String>, from: usize, opts: ConnectOptions) -> Result<(Client, usize), Broken> {
    let n = endpoints.len();
    let mut why = Vec::new();
    for i in 0..n {
        let at = (from + i) % n;
        let url = &endpoints[at];
        let attempt = async {
            let mut c = Client::connect([url], Some(opts.clone())).await?;
            c.status().await?;
            Ok::<_, etcd_client::Error>(c)
        };
        match timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(Ok(c)) => {
                if i > 0 {
                    info!(etcd = url, "cluster: talking to this etcd member");
                }
                return Ok((c, at));
            }
            Ok(Err(e)) => why.push(format!("{url}: {e}")),
            Err(_) => why.push(format!("{url}: no answer in {REQUEST_TIMEOUT:?}")),
        }
    }
    Err(format!("no etcd member answers: {}", why.join("; ")))
}

/// This head's listeners and the subsystems on each, as other heads read them: a line per
/// listener, `port ID TRANSPORT ADDRESS SERVICE`, then `subsystem ID NQN` lines (tabs apart).
fn listeners_text(target: &Target) -> String {
    let subsystems = target.subsystems();
    let mut s = String::new();
    for p in &target.ports {
        s += &format!("port\t{}\t{}\t{}\t{}\n", p.id, p.trtype.as_str(), p.traddr, p.trsvcid);
        for sub in subsystems.iter().filter(|sub| sub.on_port(p.id)) {
            s += &format!("subsystem\t{}\t{}\n", p.id, sub.nqn);
        }
    }
    s
}

/// Another head's listeners from their text. Port IDs are the head's own, moved into a range of
/// its name's (IDs are per subsystem port; the heads' own ones all start at 1).
fn parse_listeners(head: &str, text: &str) -> Vec<PeerPort> {
    let base = 0x8000 | (u16::from(head.bytes().fold(0u8, |h, b| h.wrapping_mul(31).wrapping_add(b)) & 0x7f) << 8);
    let mut ports: Vec<PeerPort> = Vec::new();
    for line in text.lines() {
        match line.split('\t').collect::<Vec<_>>()[..] {
            ["port", id, t, addr, svc] => {
                let trtype = match t {
                    "tcp" => TrType::Tcp,
                    "rdma" => TrType::Rdma,
                    _ => continue,
                };
                let Ok(id) = id.parse::<u16>() else { continue };
                ports.push(PeerPort {
                    head: head.into(),
                    portid: base | (id & 0xff),
                    trtype,
                    traddr: addr.into(),
                    trsvcid: svc.into(),
                    subsystems: Vec::new(),
                });
            }
            ["subsystem", id, nqn] => {
                let Ok(id) = id.parse::<u16>() else { continue };
                if let Some(p) = ports.iter_mut().find(|p| p.portid == base | (id & 0xff)) {
                    p.subsystems.push(nqn.into());
                }
            }
            _ => {}
        }
    }
    ports
}

/// An etcd error as the reason a connection was given up.
pub(crate) fn failed(what: &'static str) -> impl Fn(etcd_client::Error) -> Broken {
    move |e| format!("{what}: {e}")
}

/// An etcd request with [`REQUEST_TIMEOUT`].
pub(crate) async fn timed<T>(f: impl std::future::Future<Output = T>) -> Result<T, Broken> {
    timeout(REQUEST_TIMEOUT, f).await.map_err(|_| format!("no answer in {REQUEST_TIMEOUT:?}"))
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pnvmf_nvmf::{Port, Subsystem, TransportParams};

    #[test]
    fn a_heads_listeners_read_back_as_peer_ports() {
        let params = TransportParams { ioccsz: 4, max_xfer: 4096, msdbd: 1, keyed_sgls: false };
        let port = |id, trtype, svc: &str| Port { id, trtype, traddr: "10.0.2.16".into(), trsvcid: svc.into(), params };
        let mut only_tcp = Subsystem::open("nqn.x:b", Vec::new());
        only_tcp.ports = Some(vec![1]);
        let t = Target::new(
            vec![Arc::new(Subsystem::open("nqn.x:a b", Vec::new())), Arc::new(only_tcp)],
            vec![port(1, TrType::Tcp, "4420"), port(2, TrType::Rdma, "4421")],
        );
        let peers = parse_listeners("head-b", &listeners_text(&t));
        let got: Vec<_> =
            peers.iter().map(|p| (p.portid & 0xff, p.trtype, p.trsvcid.as_str(), p.subsystems.clone())).collect();
        assert_eq!(
            got,
            [
                (1, TrType::Tcp, "4420", vec!["nqn.x:a b".to_string(), "nqn.x:b".to_string()]),
                (2, TrType::Rdma, "4421", vec!["nqn.x:a b".to_string()]),
            ]
        );
        assert!(peers.iter().all(|p| p.portid & 0x8000 != 0 && p.head == "head-b"));
        assert!(parse_listeners("x", "port\tz\ttcp\ta\t1\nnonsense\nport\t1\tfc\ta\t1\n").is_empty());
    }
}
