//! Which memory an I/O's data buffer comes from. Decided at three levels, as Linux's nvmet
//! does, each fallback logged with its reason and counted (`p2pnvmf_p2p_fallbacks_total`,
//! label `level`): the namespace (at start: a usable provider or not), the controller (at
//! Connect: can the transport's mover reach the provider), the request (a chunk free or not).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use p2pnvmf_p2p::mem::Window;
use p2pnvmf_p2p::path::{Client, Path};
use p2pnvmf_p2p::pci::PciAddr;
use p2pnvmf_p2p::plan::P2p;
use p2pnvmf_p2p::pool::{ChunkPool, Slab};
use tracing::{info, warn};

use crate::io::opcode;
use crate::wire::Sqe;
use crate::{Controller, Queue};

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

/// The levels of a fallback to host memory.
pub const FALLBACK_LEVELS: [&str; 3] = ["namespace", "controller", "request"];
static FALLBACKS: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

/// Counts one fallback to host memory at `level` (one of [`FALLBACK_LEVELS`]) for `reason`, a
/// short fixed code (the full reason goes to the log): the label set stays bounded.
pub fn count_fallback(level: &'static str, reason: &'static str) {
    metrics::counter!("p2pnvmf_p2p_fallbacks_total", "level" => level, "reason" => reason).increment(1);
    if let Some(i) = FALLBACK_LEVELS.iter().position(|&l| l == level) {
        FALLBACKS[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Fallbacks to host memory so far, per level of [`FALLBACK_LEVELS`] (`p2pnvmf status`).
pub fn fallback_counts() -> [u64; 3] {
    [0, 1, 2].map(|i| FALLBACKS[i].load(Ordering::Relaxed))
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
            .map_err(|e| ("provider_unusable", e)),
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
            let pool = p2p.pool(provider).map_err(|e| ("provider_unusable", e))?;
            let fd = p2p.dma_buf(provider).and_then(|fd| dmabuf.clone().map(|()| fd));
            match fd {
                Ok(fd) => {
                    Ok((pool, Some(fd), "RDMA: the NIC moves data to and from the provider through a dma-buf MR"))
                }
                Err(e) => Err(("no_dmabuf", format!("dma-buf: {e}; topology: {topology}"))),
            }
        }
    }
}

/// The controller-level decision for each p2p namespace: the pool its queues use, or host
/// memory with the reason logged once and counted.
pub(crate) fn controller_pools(p2p: &P2p, ctrl: &Controller, mover: &Mover) -> Vec<P2pPool> {
    let Some(subsys) = ctrl.subsystem() else { return Vec::new() };
    let mut pools = Vec::new();
    for ns in &subsys.namespaces {
        let NsBuffers::P2p { provider, required } = ns.buffers else { continue };
        let pci = p2p.providers[provider].pci;
        match decide(p2p, provider, required, mover) {
            Ok((pool, dma_buf, how)) => {
                info!(cntlid = ctrl.cntlid, hostnqn = %ctrl.hostnqn, nsid = ns.nsid, provider = %pci, "p2p buffers: {how}");
                pools.push(P2pPool { nsid: ns.nsid, provider: pci, pool, dma_buf });
            }
            // Expected for NVMe/TCP with `auto`; worth a warning where a NIC was meant to use it.
            Err((code, reason)) => controller_fallback(ctrl, ns.nsid, pci, code, &reason, *mover != Mover::Cpu),
        }
    }
    pools
}

/// Logs (a warning when `warn`) and counts a controller-level fallback to host memory.
pub(crate) fn controller_fallback(
    ctrl: &Controller,
    nsid: u32,
    provider: PciAddr,
    code: &'static str,
    reason: &str,
    warn: bool,
) {
    if warn {
        warn!(cntlid = ctrl.cntlid, hostnqn = %ctrl.hostnqn, nsid, %provider, "controller falls back to host memory: {reason}");
    } else {
        info!(cntlid = ctrl.cntlid, hostnqn = %ctrl.hostnqn, nsid, %provider, "controller falls back to host memory: {reason}");
    }
    count_fallback("controller", code);
}

/// A queue's share of its controller's pools, taken once after Connect; per-I/O allocation
/// touches nothing shared.
#[derive(Debug, Default)]
pub struct QueueBuffers {
    slabs: Vec<(u32, Slab)>,
    /// A request fell back already (logged once per queue, counted every time).
    warned: bool,
}

impl QueueBuffers {
    /// Slabs for an I/O queue of a controller with p2p pools (none for admin queues).
    pub fn for_queue(q: &Queue) -> QueueBuffers {
        match q.controller() {
            Some(c) if q.qid() != 0 => Self::of(&c.p2p_pools(), q.entries()),
            _ => QueueBuffers::default(),
        }
    }

    /// A queue's slabs of `pools`, as many chunks as it has entries where they last.
    pub fn of(pools: &[P2pPool], entries: u16) -> QueueBuffers {
        let slabs = pools.iter().map(|p| (p.nsid, p.pool.take(usize::from(entries)))).collect();
        QueueBuffers { slabs, warned: false }
    }

    /// A p2p chunk for the data of `sqe` (`len` bytes), when its namespace uses p2p memory
    /// on this controller; `None` means host memory (counted as a fallback when a p2p
    /// namespace had no chunk to give).
    pub fn get(&mut self, sqe: &Sqe, len: usize) -> Option<Window> {
        if !matches!(sqe.opcode, opcode::READ | opcode::WRITE | opcode::COMPARE) || len == 0 {
            return None;
        }
        let nsid = sqe.nsid.get();
        let s = &mut self.slabs.iter_mut().find(|(n, _)| *n == nsid)?.1;
        // Revoked memory: the controller-level fallback is its transport's to say.
        if s.revoked().is_some() {
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
        count_fallback("request", code);
        if !self.warned {
            self.warned = true;
            warn!(
                nsid,
                len,
                slab_chunks = s.owned(),
                "request falls back to host memory: {why} (logged once per queue)"
            );
        }
        None
    }

    /// Why namespace `nsid`'s p2p memory was revoked, if this queue has some and it was.
    pub fn revoked(&self, nsid: u32) -> Option<&str> {
        self.slabs.iter().find(|(n, _)| *n == nsid).and_then(|(_, s)| s.revoked())
    }

    /// Lets go of namespace `nsid`'s slab (its free chunks go back to the pool): the queue
    /// uses host memory for it from now on.
    pub fn forget(&mut self, nsid: u32) {
        self.slabs.retain(|(n, _)| *n != nsid);
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

    use p2pnvmf_p2p::pci::Sysfs;

    use super::*;
    use crate::ns::tests::Null;
    use crate::{Namespace, Port, Subsystem, TrType, TransportParams};

    /// The target's p2p state over a private copy of `tests/fixtures/pci-switch-cmb` (NVMe CMB
    /// and mlx5_0 below one switch), the CMB BAR backed by a sparse file.
    fn p2p() -> (P2p, PathBuf) {
        let dir = p2pnvmf_p2p::fixture::switch_with_cmb();
        (P2p::discover(&Sysfs::new(&dir), &[], &[], true).unwrap(), dir)
    }

    fn controller(required: bool) -> Controller {
        let mut ns = Namespace::new("nqn.x", 1, Arc::new(Null));
        ns.buffers = NsBuffers::P2p { provider: 0, required };
        let subsys = Subsystem::open("nqn.x", vec![ns]);
        let params = TransportParams { ioccsz: 4, max_xfer: 1 << 17, msdbd: 1, keyed_sgls: true };
        let port = Port { id: 1, trtype: TrType::Rdma, traddr: "10.0.0.1".into(), trsvcid: "4420".into(), params };
        let who = crate::ctrl::Who { hostnqn: "nqn.host".into(), hostid: [0; 16], peer: String::new() };
        Controller::new(1, Some(Arc::new(subsys)), who, port, 0, Default::default())
    }

    #[test]
    fn each_mover_gets_the_pool_or_host_memory_with_a_reason() {
        let (p2p, dir) = p2p();
        assert_eq!(p2p.for_namespace(None), Ok(0));
        // NVMe/TCP with buffers = "p2p": the CPU copies through the provider's mapping.
        assert!(decide(&p2p, 0, true, &Mover::Cpu).is_ok());
        assert_eq!(controller_pools(&p2p, &controller(true), &Mover::Cpu).len(), 1);
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
        assert!(controller_pools(&p2p, &controller(false), &rdma("mlx5_0")).is_empty());
        // Exported (a fake exporter stands in for VFIO): the verbs library decides next.
        let p2p = p2p.with_exporter(|_| std::fs::File::open("/dev/null").map(Into::into).map_err(|e| e.to_string()));
        let old = Mover::Rdma { device: "mlx5_0".into(), dmabuf: Err("libibverbs has no ibv_reg_dmabuf_mr".into()) };
        let (_, nic) = decide(&p2p, 0, false, &old).unwrap_err();
        assert!(nic.starts_with("dma-buf: libibverbs has no ibv_reg_dmabuf_mr; topology: mlx5_0"), "{nic}");
        let pools = controller_pools(&p2p, &controller(false), &rdma("mlx5_0"));
        assert_eq!(pools.len(), 1, "auto: the NIC gets the pool and its dma-buf");
        assert!(pools[0].dma_buf.is_some() && pools[0].nsid == 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
