//! `p2pnvmf serve`: builds the target from the configuration, starts the listeners, reloads
//! subsystems on SIGHUP and shuts down cleanly on SIGINT/SIGTERM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use p2pnvmf_backend::nvme::ns::NvmeVfio;
use p2pnvmf_backend::{FileBackend, RamBackend};
use p2pnvmf_cluster::{Cluster, Shared};
use p2pnvmf_config::{Backend as BackendCfg, Buffers, Config};
use p2pnvmf_nvmf::ana;
use p2pnvmf_nvmf::buffers::{self, NsBuffers, NsStorage};
use p2pnvmf_nvmf::resv::{FileStore, Reservation};
use p2pnvmf_nvmf::wire::uuid_text;
use p2pnvmf_nvmf::{Backend, IoStats, Limits, Namespace, NsIds, Port, Subsystem, Target};
use p2pnvmf_p2p::pci::Sysfs;
use p2pnvmf_p2p::plan::P2p;
use p2pnvmf_transport::poll::Pollers;
use p2pnvmf_transport::rdma::RdmaParams;
use p2pnvmf_transport::tcp::TcpParams;
use p2pnvmf_transport::{Service, Transport};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::admin_socket::{self, Ask};
use crate::notify::Notifier;

/// I/O queue pairs asked of an SSD driven through VFIO: one per target queue using it.
const NVME_VFIO_QUEUES: u16 = 64;

fn open_backend(
    p2p: &Result<Arc<P2p>, String>,
    subnqn: &str,
    nsid: u32,
    cfg: &BackendCfg,
) -> anyhow::Result<Arc<dyn Backend>> {
    Ok(match cfg {
        BackendCfg::Ram { size } => Arc::new(RamBackend::new(*size)),
        BackendCfg::File { path, size } => {
            let f = FileBackend::open(path, *size)
                .with_context(|| format!("{subnqn} namespace {nsid}: opening {}", path.display()))?;
            info!(subnqn, nsid, path = %path.display(), engine = ?f.engine(), o_direct = f.has_direct(), "file backend open");
            Arc::new(f)
        }
        BackendCfg::NvmeVfio { pci, device_nsid, dma } => {
            let b = NvmeVfio::open(&Sysfs::new("/"), *pci, *device_nsid, NVME_VFIO_QUEUES, *dma)
                .map_err(|e| anyhow::anyhow!("{subnqn} namespace {nsid}: backend nvme-vfio: {e}"))?;
            // The SSD's own CMB as a provider: a controller given up on (reset, fatal status)
            // takes its CMB with it, so RDMA queues stop using its dma-buf.
            if let Ok(p) = p2p
                && let Some(i) = p.providers.iter().position(|pr| pr.pci == *pci)
                && let Ok(pool) = p.pool(i)
            {
                b.on_failure(move |why| pool.revoke(why.to_string()));
            }
            Arc::new(b)
        }
    })
}

/// The identifiers a namespace reports: the configured ones, else those derived from NQN and
/// NSID.
fn namespace_ids(subnqn: &str, n: &p2pnvmf_config::Namespace) -> NsIds {
    let derived = NsIds::derived(subnqn, n.nsid);
    NsIds {
        uuid: n.uuid.unwrap_or(derived.uuid),
        nguid: n.nguid.unwrap_or(derived.nguid),
        eui64: n.eui64.unwrap_or(derived.eui64),
    }
}

/// The namespace-level buffer decision for `n` (`buffers::for_namespace`), as the config asks it.
fn ns_buffers(
    p2p: &Result<Arc<P2p>, String>,
    subnqn: &str,
    n: &p2pnvmf_config::Namespace,
) -> anyhow::Result<NsBuffers> {
    let required = match n.buffers {
        Buffers::Host => return Ok(NsBuffers::Host),
        Buffers::Auto => false,
        Buffers::P2p => true,
    };
    let storage = match &n.backend {
        BackendCfg::File { path, .. } => NsStorage::File(path),
        BackendCfg::Ram { .. } => NsStorage::Ram,
        BackendCfg::NvmeVfio { pci, .. } => NsStorage::NvmeVfio(*pci),
    };
    buffers::for_namespace(p2p, &Sysfs::new("/"), (subnqn, n.nsid), storage, required, n.provider)
        .map_err(anyhow::Error::msg)
}

/// The p2p state, read only when some namespace may use p2p memory.
fn discover_p2p(cfg: &Config) -> Result<Arc<P2p>, String> {
    let wanted = cfg.subsystems.iter().flat_map(|s| &s.namespaces).any(|n| n.buffers != Buffers::Host);
    if !wanted {
        return Err("every namespace uses host buffers".into());
    }
    let p = P2p::discover(&Sysfs::new("/"), &cfg.p2p.providers, &cfg.p2p.allow_host_bridges, true)
        .map_err(|e| format!("reading the PCI topology: {e}"))?;
    for (i, pr) in p.providers.iter().enumerate() {
        match p.pool(i) {
            Ok(pool) => {
                info!(provider = %pr.pci, kind = pr.kind.as_str(), cpu_addr = format_args!("{:#x}", pr.cpu_addr),
                              bus_addr = format_args!("{:#x}", pr.bus_addr), size = pr.size, chunks = pool.chunks(),
                              cmbmsc = ?pr.cmbmsc.map(|v| format!("{v:#x}")), "p2p provider mapped")
            }
            Err(why) => warn!(provider = %pr.pci, kind = pr.kind.as_str(), "p2p provider unusable: {why}"),
        }
    }
    Ok(Arc::new(p))
}

/// A namespace's reservation kept under `dir` while PTPL is on: what a previous run kept is
/// loaded (and said), a damaged state file refused with its path.
fn persistent_reservation(dir: &Path, subnqn: &str, nsid: u32) -> anyhow::Result<Reservation> {
    let store = FileStore::new(dir, subnqn, nsid);
    let path = store.path().to_path_buf();
    let r = Reservation::persistent(Box::new(store)).with_context(|| format!("subsystem {subnqn} namespace {nsid}"))?;
    let st = r.state();
    if st.ptpl {
        info!(subnqn, nsid, path = %path.display(), generation = st.generation, registrants = st.registrants.len(),
              rtype = st.holder.map_or(0, |h| h.rtype as u8), "reservation kept through the restart (PTPL)");
    }
    Ok(r)
}

/// The live subsystems by NQN, with the configuration each was built from, so a reload keeps
/// what did not change (a RAM namespace keeps its data, a file stays open, counters go on).
struct Live {
    subsystems: HashMap<String, (p2pnvmf_config::Subsystem, Arc<Subsystem>)>,
    p2p: Result<Arc<P2p>, String>,
    /// This head's ANA groups (the target's), which namespaces are placed in.
    ana: Arc<ana::Groups>,
    /// With `[cluster]`: where namespaces keep their reservations (etcd).
    cluster: Option<Arc<Shared>>,
}

impl Live {
    /// Builds the subsystems of `cfg`, reusing unchanged subsystems and namespaces of `self`.
    fn build(&self, cfg: &Config) -> anyhow::Result<Live> {
        let port_id =
            |name: &str| cfg.listeners.iter().position(|l| l.name == name).map(|i| i as u16 + 1).expect("validated");
        let mut next = Live {
            subsystems: HashMap::new(),
            p2p: self.p2p.clone(),
            ana: self.ana.clone(),
            cluster: self.cluster.clone(),
        };
        for s in &cfg.subsystems {
            let old = self.subsystems.get(&s.nqn);
            if let Some((old_cfg, live)) = old.filter(|(c, _)| c == s) {
                next.subsystems.insert(s.nqn.clone(), (old_cfg.clone(), live.clone()));
                continue;
            }
            let mut namespaces = Vec::new();
            for n in &s.namespaces {
                let reused = old.and_then(|(c, live)| {
                    let was = c.namespaces.iter().find(|m| m.nsid == n.nsid)?;
                    (was.backend == n.backend).then(|| live.ns(n.nsid).cloned()).flatten()
                });
                let mut ns = match reused {
                    Some(ns) => ns,
                    None => {
                        let backend = open_backend(&self.p2p, &s.nqn, n.nsid, &n.backend)?;
                        info!(subnqn = %s.nqn, nsid = n.nsid, size = backend.size_bytes(), backend = ?n.backend, "namespace ready");
                        let mut ns = Namespace::new(&s.nqn, n.nsid, backend);
                        if let Some(shared) = &self.cluster {
                            ns.resv = Arc::new(Reservation::persistent(Box::new(shared.store(&s.nqn, n.nsid)))?);
                        } else if let Some(dir) = &cfg.reservations_state_dir {
                            ns.resv = Arc::new(persistent_reservation(dir, &s.nqn, n.nsid)?);
                        }
                        ns
                    }
                };
                ns.ids = namespace_ids(&s.nqn, n);
                ns.ana = self.ana.get(n.ana_group).expect("group IDs are checked by the configuration").clone();
                ns.buffers = ns_buffers(&self.p2p, &s.nqn, n)?;
                namespaces.push(ns);
            }
            let live = Arc::new(Subsystem {
                nqn: s.nqn.clone(),
                serial: s.serial.clone(),
                model: s.model.clone(),
                allow_any_host: s.allow_any_host,
                hosts: s.hosts.clone(),
                ports: s.listeners.as_ref().map(|l| l.iter().map(|n| port_id(n)).collect()),
                namespaces,
                cntlids: s.cntlid_min..=s.cntlid_max,
                stats: IoStats::default(),
            });
            info!(
                subnqn = %s.nqn, namespaces = live.namespaces.len(), allow_any_host = s.allow_any_host, hosts = s.hosts.len(),
                dhchap_hosts = s.hosts.iter().filter(|h| h.key.is_some()).count(), "subsystem ready"
            );
            next.subsystems.insert(s.nqn.clone(), (s.clone(), live));
        }
        Ok(next)
    }

    fn list(&self) -> Vec<Arc<Subsystem>> {
        let mut v: Vec<_> = self.subsystems.values().map(|(_, s)| s.clone()).collect();
        v.sort_by(|a, b| a.nqn.cmp(&b.nqn));
        v
    }
}

/// The transport a `[[listener]]` names, with its settings and `[limits]`.
fn transport(l: &p2pnvmf_config::Listener, lim: &p2pnvmf_config::Limits) -> Box<dyn Transport> {
    let max_connections = lim.connections_per_listener as usize;
    match l.transport {
        p2pnvmf_config::Transport::Tcp => {
            Box::new(TcpParams { max_connections, r2t_data: lim.r2t_data as usize, ..TcpParams::default() })
        }
        p2pnvmf_config::Transport::Rdma => Box::new(RdmaParams {
            max_icd: l.inline_data_size,
            srq: l.srq_size.map(|n| n as usize),
            max_connections,
            ..RdmaParams::default()
        }),
    }
}

/// What the core enforces of `[limits]`.
fn core_limits(lim: &p2pnvmf_config::Limits) -> Limits {
    Limits {
        controllers_per_subsystem: lim.controllers_per_subsystem,
        io_queues: lim.io_queues,
        queue_entries: lim.queue_size,
    }
}

fn ports(cfg: &Config) -> Vec<Port> {
    cfg.listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let t = transport(l, &cfg.limits);
            let (trtype, params) = (t.trtype(), t.params());
            Port { id: i as u16 + 1, trtype, traddr: l.address.to_string(), trsvcid: l.port.to_string(), params }
        })
        .collect()
}

/// A reload (SIGHUP or `p2pnvmf reload`): re-reads the configuration file and applies
/// subsystem changes. Listener changes need a restart; an invalid file changes nothing. Logged
/// with `why` as the prefix; returns what changed, or why nothing did.
fn reload(why: &str, path: &Path, cfg: &mut Config, live: &mut Live, target: &Target) -> Result<String, String> {
    let refused = |reason: String| {
        error!("{why}: reload refused, configuration unchanged: {reason}");
        Err(reason)
    };
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return refused(e.to_string()),
    };
    if new.listeners != cfg.listeners {
        return refused(format!("[[listener]] changed in {}; restart to apply", path.display()));
    }
    if new.p2p != cfg.p2p
        || new.metrics_listen != cfg.metrics_listen
        || new.limits != cfg.limits
        || new.reservations_state_dir != cfg.reservations_state_dir
        || new.cluster != cfg.cluster
        || new.performance != cfg.performance
    {
        return refused(format!(
            "[p2p], [metrics], [limits], [reservations], [cluster] or [performance] changed in {}; restart to apply",
            path.display()
        ));
    }
    if cfg.cluster.is_some()
        && let Some(g) = ana_groups(&new).difference(&ana_groups(cfg)).next()
    {
        return refused(format!(
            "{}: ANA group {g} is new; the cluster takes groups at start: restart to apply",
            path.display()
        ));
    }
    if new.subsystems == cfg.subsystems {
        let moved = apply_ana(&new, target);
        *cfg = new;
        if moved.is_empty() {
            info!("{why}: {} unchanged", path.display());
            return Ok(format!("{} unchanged", path.display()));
        }
        info!("{why}: {} applied", path.display());
        return Ok(format!("{} applied: ANA groups changed {moved:?}", path.display()));
    }
    match live.build(&new) {
        Ok(next) => {
            let nqns = |c: &Config| c.subsystems.iter().map(|s| s.nqn.clone()).collect::<Vec<_>>();
            let (old_nqns, new_nqns) = (nqns(cfg), nqns(&new));
            let added: Vec<_> = new_nqns.iter().filter(|n| !old_nqns.contains(n)).cloned().collect();
            let removed: Vec<_> = old_nqns.iter().filter(|n| !new_nqns.contains(n)).cloned().collect();
            let changed: Vec<_> = new
                .subsystems
                .iter()
                .filter(|s| cfg.subsystems.iter().any(|o| o.nqn == s.nqn && o != *s))
                .map(|s| s.nqn.clone())
                .collect();
            target.reconfigure(next.list());
            *live = next;
            let moved = apply_ana(&new, target);
            // Warned once: what the running configuration already had was said before.
            for w in new.warnings.iter().filter(|w| !cfg.warnings.iter().any(|o| o.message == w.message)) {
                warn!("{why}: {w}");
            }
            *cfg = new;
            info!("{why}: {} applied", path.display());
            Ok(format!(
                "{} applied: subsystems added {added:?}, removed {removed:?}, changed {changed:?}, ANA groups changed {moved:?}",
                path.display()
            ))
        }
        Err(e) => refused(format!("{e:#}")),
    }
}

/// Sets this head's ANA group states to `[ana]`'s (a group not named: optimized); hosts of the
/// groups that changed get an ANA Change notice. Returns those groups.
fn apply_ana(cfg: &Config, target: &Target) -> Vec<u32> {
    if cfg.cluster.is_some() {
        return Vec::new();
    }
    let cfg = &cfg.ana;
    (1..=ana::MAX_GROUPS)
        .filter(|id| target.set_ana_state(*id, cfg.groups.get(id).copied().unwrap_or(ana::State::Optimized)))
        .collect()
}

/// The ANA groups the configuration's namespaces are in.
fn ana_groups(cfg: &Config) -> std::collections::BTreeSet<u32> {
    cfg.subsystems.iter().flat_map(|s| s.namespaces.iter().map(|n| n.ana_group)).collect()
}

/// What `p2pnvmf status` shows: listeners, subsystems and their namespaces' buffers, connected
/// controllers, p2p providers and the fallbacks so far.
/// A namespace's reservation as `status` shows it.
fn reservation_status(ns: &Namespace) -> serde_json::Value {
    let st = ns.resv.state();
    let registrants: Vec<_> = st
        .registrants
        .iter()
        .map(|r| serde_json::json!({"hostid": uuid_text(&r.host), "key": format!("{:#x}", r.key)}))
        .collect();
    serde_json::json!({"generation": st.generation, "type": st.holder.map_or(0, |h| h.rtype as u8),
                       "holder": st.holder.map(|h| uuid_text(&h.host)), "registrants": registrants, "ptpl": st.ptpl})
}

fn status(cfg: &Config, live: &Live, target: &Target, pollers: Option<&Pollers>) -> serde_json::Value {
    use serde_json::json;
    // Ports are the listeners in order (`ports`): their transport names come from the core.
    let listeners: Vec<_> = cfg
        .listeners
        .iter()
        .zip(&target.ports)
        .map(|(l, p)| json!({"name": l.name, "transport": p.trtype.as_str(), "address": l.address.to_string(), "port": l.port}))
        .collect();
    let p2p = live.p2p.as_ref().ok();
    let subsystems: Vec<_> = cfg
        .subsystems
        .iter()
        .map(|s| {
            let namespaces: Vec<_> = s
                .namespaces
                .iter()
                .map(|n| {
                    let ns = live.subsystems.get(&s.nqn).and_then(|(_, l)| l.ns(n.nsid));
                    let (backend, device) = match &n.backend {
                        BackendCfg::Ram { .. } => ("ram", String::new()),
                        BackendCfg::File { path, .. } => ("file", path.display().to_string()),
                        BackendCfg::NvmeVfio { pci, device_nsid, .. } => {
                            ("nvme-vfio", format!("{pci} nsid {device_nsid}"))
                        }
                    };
                    let buffers = match ns.map(|n| &n.buffers) {
                        Some(NsBuffers::P2p { provider, .. }) => {
                            p2p.map_or("p2p".into(), |p| format!("p2p {}", p.providers[*provider].pci))
                        }
                        _ => "host memory".into(),
                    };
                    let ids = ns.map(|n| n.ids).unwrap_or_default();
                    json!({"nsid": n.nsid, "backend": backend, "device": device,
                           "size": ns.map(|n| n.backend.size_bytes()), "buffers": buffers,
                           "uuid": ids.uuid_text(), "nguid": ids.nguid_text(), "eui64": ids.eui64_text(),
                           "ana_group": n.ana_group, "ana_state": ns.map(|n| n.ana.state().as_str()),
                           "reservation": ns.map(reservation_status)})
                })
                .collect();
            let hosts: Vec<_> = s.hosts.iter().map(|h| json!({"nqn": h.nqn, "dhchap": h.key.is_some()})).collect();
            json!({"nqn": s.nqn, "allow_any_host": s.allow_any_host, "hosts": hosts, "namespaces": namespaces})
        })
        .collect();
    let controllers: Vec<_> = target
        .controllers()
        .iter()
        .map(|c| {
            let listener = cfg.listeners.get(usize::from(c.port.id) - 1).map(|l| l.name.clone());
            let queues: Vec<_> =
                c.io_queues().iter().map(|&(qid, entries)| json!({"qid": qid, "entries": entries})).collect();
            json!({"cntlid": c.cntlid, "subnqn": c.subnqn(), "hostnqn": c.hostnqn,
                   "transport": c.port.trtype.as_str(), "listener": listener,
                   "host_address": (!c.peer.is_empty()).then(|| c.peer.clone()),
                   "kato_ms": c.kato().as_millis() as u64, "io_queues": queues})
        })
        .collect();
    let p2p = match &live.p2p {
        Err(e) => json!({"error": e}),
        Ok(p) => {
            let providers: Vec<_> = p
                .providers
                .iter()
                .enumerate()
                .map(|(i, pr)| match p.pool(i) {
                    Ok(pool) => json!({"pci": pr.pci.to_string(), "kind": pr.kind.as_str(), "usable": true,
                                       "chunks": pool.chunks(), "chunks_in_use": pool.chunks() - pool.free_chunks()}),
                    Err(why) => {
                        json!({"pci": pr.pci.to_string(), "kind": pr.kind.as_str(), "usable": false, "reason": why.to_string()})
                    }
                })
                .collect();
            json!({"providers": providers})
        }
    };
    let [namespace, controller, request] = p2pnvmf_nvmf::buffers::fallback_counts();
    let pollers: Vec<_> = pollers
        .map(Pollers::status)
        .unwrap_or_default()
        .iter()
        .map(|p| {
            json!({"poller": p.index, "cpu": p.cpu, "connections": p.connections, "busy_share": p.busy_share,
                   "busy_seconds": p.busy_seconds, "idle_seconds": p.idle_seconds})
        })
        .collect();
    json!({"listeners": listeners, "subsystems": subsystems, "controllers": controllers, "p2p": p2p,
           "fallbacks": {"namespace": namespace, "controller": controller, "request": request},
           "pollers": pollers})
}

pub async fn run(mut cfg: Config, path: Option<PathBuf>, admin_path: &Path) -> anyhow::Result<()> {
    if let Some(addr) = cfg.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            // Latency as a histogram (else the exporter renders a summary): 10 µs to 1 s.
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("p2pnvmf_io_latency_seconds".into()),
                &[
                    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
                    250e-3, 1.0,
                ],
            )
            .context("metrics: latency buckets")?
            .install()
            .with_context(|| format!("metrics.listen: serving Prometheus metrics on {addr}"))?;
        info!(%addr, "Prometheus metrics on http://{addr}/metrics");
    }
    for w in &cfg.warnings {
        warn!("{w}");
    }
    let p2p = discover_p2p(&cfg);
    let ana = ana::Groups::new(|id| cfg.ana.groups.get(&id).copied().unwrap_or(ana::State::Optimized));
    let shared = cfg.cluster.as_ref().map(Shared::new);
    let mut live =
        Live { subsystems: HashMap::new(), p2p: p2p.clone(), ana: ana.clone(), cluster: shared.clone() }.build(&cfg)?;
    let target = Target::with(live.list(), ports(&cfg), core_limits(&cfg.limits), ana);
    if let Ok(p) = p2p {
        target.set_p2p(p);
    }
    // Before any listener: the cluster's groups are Inaccessible until this head holds a lease.
    let cluster = cfg.cluster.as_ref().zip(shared).map(|(c, shared)| {
        let groups = ana_groups(&cfg);
        info!(name = c.name, etcd = ?c.etcd, lease_ttl_s = c.lease_ttl_secs, ?groups, "joining the cluster");
        Cluster::start(c, target.clone(), groups, shared)
    });
    let pollers = match cfg.performance.poll {
        true => Some(Pollers::start(&cfg.performance.cores).context("[performance] poll: starting the pollers")?),
        false => None,
    };
    // Held until the target stops: dropping it puts the kernel's mask back.
    let _unbound_work_off = match cfg.performance.isolate_cores {
        true => Some(
            p2pnvmf_transport::unbound_work::UnboundWorkOff::apply(Path::new("/sys"), &cfg.performance.cores)
                .context("[performance] isolate_cores")?,
        ),
        false => None,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut listeners = tokio::task::JoinSet::new();
    for port in target.ports.clone() {
        let addr = std::net::SocketAddr::new(port.traddr.parse()?, port.trsvcid.parse()?);
        let lcfg = &cfg.listeners[usize::from(port.id) - 1];
        let (name, kind) = (lcfg.name.clone(), port.trtype.name());
        // Fails at start-up, naming the cause (rdma-core missing, the address in use).
        let bound = transport(lcfg, &cfg.limits)
            .bind(addr)
            .with_context(|| format!("listener {name}: binding {kind} on {addr}"))?;
        info!(%addr, port = port.id, "{kind} listener ready");
        let serving =
            bound.serve(Service { target: target.clone(), port, shutdown: stop_rx.clone(), pollers: pollers.clone() });
        listeners.spawn(async move {
            if let Err(e) = serving.await {
                error!("listener {name}: {kind} on {addr}: {e}");
            }
        });
    }
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let (asks_tx, mut asks) = mpsc::channel(8);
    let admin = match admin_socket::bind(admin_path) {
        Ok(l) => Some(tokio::spawn(admin_socket::serve(l, admin_path.to_path_buf(), asks_tx, stop_rx.clone()))),
        Err(e) => {
            warn!("admin socket unavailable (p2pnvmf status and reload will not reach this target): {e}");
            None
        }
    };
    let systemd = Notifier::from_env();
    let serving = |t: &Target| {
        format!("READY=1\nSTATUS=serving {} subsystem(s) on {} listener(s)", t.subsystems().len(), t.ports.len())
    };
    systemd.send(&serving(&target));
    // Both ways to ask for a reload (SIGHUP, `p2pnvmf reload`), with systemd told around it.
    let reload_notified = |why: &str, cfg: &mut Config, live: &mut Live| match &path {
        Some(p) => {
            systemd.send("RELOADING=1\nSTATUS=reloading the configuration");
            let r = reload(why, p, cfg, live, &target);
            if r.is_ok()
                && let Some(c) = &cluster
            {
                c.subsystems_changed();
            }
            systemd.send(&serving(&target));
            r
        }
        None => {
            warn!("{why}: serving the embedded default, no file to reload");
            Err("serving the embedded default: there is no file to reload".into())
        }
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break info!("SIGINT: shutting down"),
            _ = term.recv() => break info!("SIGTERM: shutting down"),
            _ = hup.recv() => {
                let _ = reload_notified("SIGHUP", &mut cfg, &mut live);
            }
            Some(ask) = asks.recv() => match ask {
                Ask::Status(reply) => {
                    let mut v = status(&cfg, &live, &target, pollers.as_deref());
                    if let Some(c) = &cluster {
                        v["cluster"] = c.status();
                    }
                    let _ = reply.send(v);
                }
                Ask::Reload(reply) => {
                    let _ = reply.send(reload_notified("admin socket", &mut cfg, &mut live));
                }
                Ask::AnaMove { group, to, reply } => match &cluster {
                    Some(c) => {
                        info!(group, to, "planned move asked for");
                        let moving = c.move_group(group, to);
                        tokio::spawn(async move {
                            let r = moving.await;
                            match &r {
                                Ok(what) => info!("planned move: {what}"),
                                Err(why) => warn!("planned move: {why}"),
                            }
                            let _ = reply.send(r);
                        });
                    }
                    None => {
                        let _ = reply.send(Err("no [cluster]: ANA states come from [ana] groups (change them by reload)".into()));
                    }
                },
            },
        }
    }
    systemd.send("STOPPING=1\nSTATUS=stopping: closing connections, flushing namespaces");
    // Groups handed over first (Inaccessible here, the lease revoked), while hosts still
    // reach this head for the ANA Change that sends them elsewhere.
    if let Some(c) = &cluster {
        c.stop().await;
    }
    let _ = stop_tx.send(true);
    while listeners.join_next().await.is_some() {}
    // Their connections have ended with the listeners.
    drop(pollers);
    if let Some(a) = admin {
        let _ = a.await;
    }
    for s in target.subsystems() {
        for ns in &s.namespaces {
            if let Err(e) = ns.backend.flush() {
                warn!(subnqn = %s.nqn, nsid = ns.nsid, "flush at shutdown failed: {e}");
            }
        }
    }
    // Backends let go of their devices now (an SSD driven through VFIO is shut down and given
    // back to the kernel), not at process exit.
    drop(live);
    drop(target);
    info!("stopped");
    Ok(())
}
