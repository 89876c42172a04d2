//! Which memory an I/O's data buffer comes from: the one home of the p2p buffer policy.
//! Decided at three levels, as Linux's nvmet does — the namespace (at start: a usable provider
//! or not, [`for_namespace`]), the controller (at Connect: can the transport's mover reach the
//! provider, [`ControllerPools`]), the request (a chunk free or not, [`QueueBuffers`]) — and
//! every fallback to host memory, wherever it is found (a NIC refusing the dma-buf, memory
//! revoked, a kernel or SSD that cannot reach the buffer), goes through [`fall_back`]: logged
//! with its reason and counted (`p2pnvmf_p2p_fallbacks_total`, labels `level` and `reason`).

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use p2pnvmf_p2p::mem::Window;
use p2pnvmf_p2p::path::{Client, Path};
use p2pnvmf_p2p::pci::{PciAddr, Sysfs};
use p2pnvmf_p2p::plan::P2p;
use p2pnvmf_p2p::pool::{ChunkPool, Slab};
use p2pnvmf_p2p::provider::Kind;
use tracing::{info, warn};

use crate::wire::{Sqe, io_opcode as opcode};

/// A namespace's buffer source, decided when it was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NsBuffers {
    Host,
    /// Chunks of the target's provider `provider`; `required` for `buffers = "p2p"`.
    P2p {
        provider: usize,
        required: bool,
    },
}

/// Who moves a queue's data between the wire and the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mover {
    /// NVMe/TCP: the CPU copies between socket and buffer.
    Cpu,
    /// An RDMA device, by name, DMAs to and from the buffer; `dmabuf` is whether its verbs
    /// library can register a dma-buf at all (else why not).
    Rdma { device: String, dmabuf: Result<(), String> },
}

/// A pool a controller's I/O queues take chunks from for namespace `nsid`.
#[derive(Debug, Clone)]
pub struct P2pPool {
    pub nsid: u32,
    pub provider: PciAddr,
    pub pool: Arc<ChunkPool>,
    /// The provider's window as a dma-buf, which each RDMA queue registers with its NIC
    /// (`None` for NVMe/TCP, whose CPU copies).
    pub dma_buf: Option<Arc<OwnedFd>>,
}

/// Where a fallback to host memory was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Namespace,
    Controller,
    Request,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Namespace, Level::Controller, Level::Request];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Namespace => "namespace",
            Level::Controller => "controller",
            Level::Request => "request",
        }
    }
}

/// How a fallback is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Log {
    /// Worth a warning: p2p memory was meant to be used.
    Warn,
    /// Expected (NVMe/TCP with `auto`, a device without p2p memory).
    Info,
    /// Counted only: a queue logged its first one already.
    Counted,
}

static FALLBACKS: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

/// Logs and counts one fallback to host memory at `level`: `code` is a short fixed code (the
/// metric's `reason` label, so the label set stays bounded), `reason` the full words for the
/// log (formatted only when logged). Every fallback of the target goes through here; context
/// (subsystem, controller, queue) comes from the caller's fields or span.
pub fn fall_back(level: Level, code: &'static str, reason: &dyn fmt::Display, log: Log) {
    metrics::counter!("p2pnvmf_p2p_fallbacks_total", "level" => level.as_str(), "reason" => code).increment(1);
    FALLBACKS[level as usize].fetch_add(1, Ordering::Relaxed);
    let level = level.as_str();
    match log {
        Log::Warn => warn!(code, "{level} falls back to host memory: {reason}"),
        Log::Info => info!(code, "{level} falls back to host memory: {reason}"),
        Log::Counted => {}
    }
}

/// Fallbacks to host memory so far, per level of [`Level::ALL`] (`p2pnvmf status`).
pub fn fallback_counts() -> [u64; 3] {
    [0, 1, 2].map(|i| FALLBACKS[i].load(Ordering::Relaxed))
}

/// One queue's request-level fallbacks: each counted, the first one logged (a loaded queue
/// would log a line per I/O otherwise).
#[derive(Debug, Default)]
pub struct RequestFallbacks {
    logged: bool,
}

impl RequestFallbacks {
    pub fn fall_back(&mut self, code: &'static str, reason: &dyn fmt::Display) {
        let log = if std::mem::replace(&mut self.logged, true) { Log::Counted } else { Log::Warn };
        fall_back(Level::Request, code, &format_args!("{reason} (logged once per queue)"), log);
    }
}

/// What a namespace's storage is, as the namespace-level decision needs it.
#[derive(Debug, Clone, Copy)]
pub enum NsStorage<'a> {
    /// A file or block device, served through the kernel: its SSD must reach p2pmem.
    File(&'a std::path::Path),
    Ram,
    /// An SSD driven through VFIO: its PRPs carry the memory's bus address.
    NvmeVfio(PciAddr),
}

/// The namespace-level decision for namespace `nsid` of `subnqn` on `storage`: p2p chunks from
/// `provider` (or the first usable one), or host memory with the reason — or, when `required`
/// (`buffers = "p2p"`), a refusal saying why.
pub fn for_namespace(
    p2p: &Result<Arc<P2p>, String>,
    sysfs: &Sysfs,
    (subnqn, nsid): (&str, u32),
    storage: NsStorage<'_>,
    required: bool,
    provider: Option<PciAddr>,
) -> Result<NsBuffers, String> {
    let found = p2p.as_ref().map_err(Clone::clone).and_then(|p| match storage {
        NsStorage::File(path) => {
            let dev = sysfs.block_device_of(path).map_err(|e| e.to_string())?;
            let (i, d) = p.for_block_device(&dev, provider).map_err(|e| e.to_string())?;
            info!(subnqn, nsid, device = %dev.name, ssd = ?dev.functions.iter().map(ToString::to_string).collect::<Vec<_>>(),
                  provider = %p.providers[i].pci, path = d.path.as_str(), distance = d.distance, "the SSD reaches p2pmem: {}", d.reason);
            Ok(i)
        }
        NsStorage::Ram => p.for_namespace(provider).map_err(|e| e.to_string()),
        // The SSD's own CMB first, else the nearest BAR window it reaches. p2pmem is the
        // kernel's to place, not ours.
        NsStorage::NvmeVfio(pci) => {
            let client = Client::Pci { addr: pci, name: None };
            match p.nearest(&[client], |pr| pr.kind != Kind::P2pmem, provider).map_err(|e| e.to_string())? {
                Ok((i, _)) => Ok(i),
                Err(why) if why.is_empty() => Err(format!("no CMB or memory BAR that {pci} reaches")),
                Err(why) => Err(format!("no provider {pci} reaches: {}", why.join("; "))),
            }
        }
    });
    match found {
        Ok(i) => {
            let p = &p2p.as_ref().expect("a provider came from it").providers[i];
            info!(subnqn, nsid, provider = %p.pci, kind = p.kind.as_str(), size = p.size, required, "p2p buffers available");
            Ok(NsBuffers::P2p { provider: i, required })
        }
        Err(why) if required => {
            Err(format!("{subnqn} namespace {nsid}: buffers = \"p2p\" but no usable provider: {why}"))
        }
        Err(why) => {
            // The storage says which decision found nothing.
            let code = match storage {
                NsStorage::File(_) => "no_p2pmem_for_device",
                NsStorage::Ram => "no_provider",
                NsStorage::NvmeVfio(_) => "no_provider_the_ssd_reaches",
            };
            fall_back(Level::Namespace, code, &format_args!("{why} ({subnqn} namespace {nsid})"), Log::Info);
            Ok(NsBuffers::Host)
        }
    }
}

/// What the controller-level decision gives a controller for one provider.
type Decided = (Arc<ChunkPool>, Option<Arc<OwnedFd>>, &'static str);

/// Why a controller falls back: the metrics' reason code and the log's words.
type Refused = (&'static str, String);

/// The controller-level decision for provider `provider`: its pool for `mover`, with how it is
/// used, or the reason it falls back to host memory.
fn decide(p2p: &P2p, provider: usize, required: bool, mover: &Mover) -> Result<Decided, Refused> {
    let pci = p2p.providers[provider].pci;
    match mover {
        Mover::Cpu if required => p2p
            .pool(provider)
            .map(|pool| (pool, None, "NVMe/TCP: the CPU copies between the socket and the provider's memory"))
            .map_err(|e| ("provider_unusable", e.to_string())),
        Mover::Cpu => Err((
            "tcp_cpu_copies",
            "NVMe/TCP moves data with the CPU; p2p memory pays off only for an RDMA NIC that reaches it \
             (buffers = \"p2p\" forces it)"
                .into(),
        )),
        Mover::Rdma { device, dmabuf } => {
            let client = p2p.topology.rdma_client(device).unwrap_or_else(|| Client::Software {
                name: device.clone(),
                reason: format!("RDMA device {device} is not in /sys/class/infiniband"),
            });
            // A NIC reaches device memory only through a dma-buf MR, and registering one is
            // where the kernel checks the p2p path and computes the NIC's address: it is tried
            // whatever the topology says, which is reported beside the first step that fails.
            let (d, _) = p2p.for_client(provider, &client);
            let topology = match d.path {
                Path::None => d.reason,
                p => format!("{client} reaches {pci} by {} (distance {})", p.as_str(), d.distance.unwrap_or(0)),
            };
            let pool = p2p.pool(provider).map_err(|e| ("provider_unusable", e.to_string()))?;
            let fd = p2p.dma_buf(provider).map_err(|e| e.to_string()).and_then(|fd| dmabuf.clone().map(|()| fd));
            match fd {
                Ok(fd) => {
                    Ok((pool, Some(fd), "RDMA: the NIC moves data to and from the provider through a dma-buf MR"))
                }
                Err(e) => Err(("no_dmabuf", format!("dma-buf: {e}; topology: {topology}"))),
            }
        }
    }
}

/// A controller's p2p pools: the controller-level decision, made at admin Connect and
/// shared by its I/O queues; a pool is dropped when a queue finds it cannot be used after all
/// (its NIC refused the dma-buf, the memory was revoked), and queues connecting later use host
/// memory for that namespace.
#[derive(Debug)]
pub struct ControllerPools {
    cntlid: u16,
    hostnqn: String,
    pools: Mutex<Vec<P2pPool>>,
}

impl ControllerPools {
    pub fn new(cntlid: u16, hostnqn: &str) -> Self {
        ControllerPools { cntlid, hostnqn: hostnqn.into(), pools: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<P2pPool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Decides for each namespace (`nsid`, its buffers) with p2p buffers: its pool for
    /// `mover`, or host memory with the reason.
    pub fn decide(&self, p2p: &P2p, namespaces: impl IntoIterator<Item = (u32, NsBuffers)>, mover: &Mover) {
        let mut pools = Vec::new();
        for (nsid, buffers) in namespaces {
            let NsBuffers::P2p { provider, required } = buffers else { continue };
            let pci = p2p.providers[provider].pci;
            match decide(p2p, provider, required, mover) {
                Ok((pool, dma_buf, how)) => {
                    info!(cntlid = self.cntlid, hostnqn = %self.hostnqn, nsid, provider = %pci, "p2p buffers: {how}");
                    pools.push(P2pPool { nsid, provider: pci, pool, dma_buf });
                }
                // Expected for NVMe/TCP with `auto`; worth a warning where a NIC was meant to use it.
                Err((code, reason)) => {
                    let log = if *mover == Mover::Cpu { Log::Info } else { Log::Warn };
                    self.fall_back(nsid, pci, code, &reason, log);
                }
            }
        }
        *self.lock() = pools;
    }

    /// The pools as they are now (empty: host memory); read once per queue at Connect.
    pub fn current(&self) -> Vec<P2pPool> {
        self.lock().clone()
    }

    /// Drops namespace `nsid`'s pool, a controller-level fallback found by an I/O queue: said
    /// and counted once, by the first queue to find it. Whether there was a pool to drop.
    pub fn drop_pool(&self, nsid: u32, code: &'static str, why: &dyn fmt::Display) -> bool {
        let mut pools = self.lock();
        let Some(i) = pools.iter().position(|p| p.nsid == nsid) else { return false };
        let p = pools.remove(i);
        drop(pools);
        self.fall_back(nsid, p.provider, code, why, Log::Warn);
        true
    }

    fn fall_back(&self, nsid: u32, provider: PciAddr, code: &'static str, why: &dyn fmt::Display, log: Log) {
        let reason = format_args!(
            "{why} (cntlid {}, host {}, namespace {nsid}, provider {provider})",
            self.cntlid, self.hostnqn
        );
        fall_back(Level::Controller, code, &reason, log);
    }
}

/// A queue's share of its controller's pools, taken once after Connect; per-I/O allocation
/// touches nothing shared.
#[derive(Debug, Default)]
pub struct QueueBuffers {
    pools: Option<Arc<ControllerPools>>,
    slabs: Vec<(u32, Slab)>,
    fallbacks: RequestFallbacks,
}

impl QueueBuffers {
    /// A queue's slabs of `usable` (pools of `pools`), as many chunks as it has entries where
    /// they last.
    pub fn of(pools: &Arc<ControllerPools>, usable: &[P2pPool], entries: u16) -> QueueBuffers {
        let slabs = usable.iter().map(|p| (p.nsid, p.pool.take(usize::from(entries)))).collect();
        QueueBuffers { pools: Some(pools.clone()), slabs, fallbacks: RequestFallbacks::default() }
    }

    /// A p2p chunk for the data of `sqe` (`len` bytes), when its namespace uses p2p memory
    /// on this controller; `None` means host memory (a fallback when a p2p namespace had no
    /// chunk to give, or its memory was revoked).
    pub fn get(&mut self, sqe: &Sqe, len: usize) -> Option<Window> {
        if !matches!(sqe.opcode, opcode::READ | opcode::WRITE | opcode::COMPARE) || len == 0 {
            return None;
        }
        let nsid = sqe.nsid.get();
        let i = self.slabs.iter().position(|(n, _)| *n == nsid)?;
        let s = &mut self.slabs[i].1;
        if let Some(why) = s.revoked() {
            // The first queue to see it says it for the controller, which goes on in host
            // memory; each queue lets go of its share once.
            let why = format!("the provider's memory was revoked: {why}");
            if let Some(p) = &self.pools {
                p.drop_pool(nsid, "revoked", &why);
            }
            self.slabs.remove(i);
            return None;
        }
        if let Some(chunk) = s.get(len) {
            return Some(chunk);
        }
        let (code, why) = if len > s.chunk_size() {
            ("transfer_too_large", "the transfer is larger than a p2p chunk")
        } else {
            ("pool_exhausted", "the p2p pool is exhausted")
        };
        let owned = s.owned();
        self.fallbacks.fall_back(code, &format_args!("{why} (namespace {nsid}, {len} bytes, slab of {owned} chunks)"));
        None
    }

    /// Gives a chunk back to its slab.
    pub fn put(&mut self, w: Window) {
        if let Some((_, s)) = self.slabs.iter_mut().find(|(_, s)| s.owns(&w)) {
            s.put(w);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// The target's p2p state over a private copy of `tests/fixtures/pci-switch-cmb` (NVMe CMB
    /// and mlx5_0 below one switch), the CMB BAR backed by a sparse file.
    fn p2p() -> (P2p, PathBuf) {
        let dir = p2pnvmf_p2p::fixture::switch_with_cmb();
        (P2p::discover(&Sysfs::new(&dir), &[], &[], true).unwrap(), dir)
    }

    /// A controller's pools for one p2p namespace on provider 0, decided for `mover`.
    fn pools(p2p: &P2p, required: bool, mover: &Mover) -> Vec<P2pPool> {
        let pools = ControllerPools::new(1, "nqn.host");
        pools.decide(p2p, [(1, NsBuffers::P2p { provider: 0, required }), (2, NsBuffers::Host)], mover);
        pools.current()
    }

    #[test]
    fn each_mover_gets_the_pool_or_host_memory_with_a_reason() {
        let (p2p, dir) = p2p();
        assert_eq!(p2p.for_namespace(None).ok(), Some(0));
        // NVMe/TCP with buffers = "p2p": the CPU copies through the provider's mapping.
        assert!(decide(&p2p, 0, true, &Mover::Cpu).is_ok());
        assert_eq!(pools(&p2p, true, &Mover::Cpu).len(), 1);
        let reason = |required, mover: Mover| decide(&p2p, 0, required, &mover).unwrap_err();
        let (code, why) = reason(false, Mover::Cpu);
        assert!(code == "tcp_cpu_copies" && why.contains("NVMe/TCP moves data with the CPU"));
        let rdma = |dev: &str| Mover::Rdma { device: dev.into(), dmabuf: Ok(()) };
        // The fixture's CMB maps through sysfs: no dma-buf export, said first; the topology beside.
        let (code, nic) = reason(true, rdma("mlx5_0"));
        assert_eq!(code, "no_dmabuf");
        assert!(nic.starts_with("dma-buf: 0000:03:00.0 is not bound to vfio-pci"), "{nic}");
        assert!(
            nic.contains("topology: mlx5_0 (0000:04:00.0) reaches 0000:03:00.0 by bus-address (distance 4)"),
            "{nic}"
        );
        assert!(reason(true, rdma("rxe9")).1.contains("rxe9 is not in /sys/class/infiniband"));
        assert!(pools(&p2p, false, &rdma("mlx5_0")).is_empty());
        // Exported (a fake exporter stands in for VFIO): the verbs library decides next.
        let p2p = p2p.with_exporter(|_| {
            std::fs::File::open("/dev/null").map(Into::into).map_err(|e| p2pnvmf_p2p::Error::os("/dev/null", e))
        });
        let old = Mover::Rdma { device: "mlx5_0".into(), dmabuf: Err("libibverbs has no ibv_reg_dmabuf_mr".into()) };
        let (_, nic) = decide(&p2p, 0, false, &old).unwrap_err();
        assert!(nic.starts_with("dma-buf: libibverbs has no ibv_reg_dmabuf_mr; topology: mlx5_0"), "{nic}");
        let pools = pools(&p2p, false, &rdma("mlx5_0"));
        assert_eq!(pools.len(), 1, "auto: the NIC gets the pool and its dma-buf");
        assert!(pools[0].dma_buf.is_some() && pools[0].nsid == 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
