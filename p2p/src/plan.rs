//! The target's p2p state: topology, providers and their pools, and the decisions at the
//! namespace and controller levels; plus the report `p2pnvmf topology` prints.

use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};

use serde::Serialize;

use crate::block::BlockDevice;
use crate::path::{Client, Decision, Path, Topology};
use crate::pci::{Error, PciAddr, Sysfs};
use crate::pool::ChunkPool;
use crate::provider::{Kind, Provider, Spec};

/// Chunk size of p2p pools: the largest transfer a queue moves in one piece.
pub const CHUNK: usize = 128 << 10;

#[derive(Debug)]
pub struct P2p {
    pub topology: Topology,
    pub providers: Vec<Provider>,
    /// Per provider: its pool (when mapped) or why it cannot be used.
    pools: Vec<Result<Option<Arc<ChunkPool>>, String>>,
    /// Per provider: its window exported as a dma-buf for RDMA NICs, once, when first asked.
    dma_bufs: Vec<OnceLock<Result<Arc<OwnedFd>, String>>>,
    exporter: Exporter,
}

/// Exports a provider's window as a dma-buf: through VFIO ([`Provider::export_dma_buf`]);
/// tests of the RDMA path put a fake exporter here.
pub type Exporter = fn(&Provider) -> Result<OwnedFd, Error>;

impl P2p {
    /// Reads the topology and sets up the providers (programming CMBs); with `map`, maps the
    /// usable ones into pools (else only checks that they could be).
    pub fn discover(sysfs: &Sysfs, specs: &[Spec], allow: &[(u16, u16)], map: bool) -> Result<P2p, Error> {
        let topology = Topology::read(sysfs, allow)?;
        let providers = sysfs.providers(&topology.functions, specs, true)?;
        let pools = providers
            .iter()
            .map(|p| {
                match map {
                    true => p.map().and_then(|m| ChunkPool::new(m, CHUNK)).map(Some),
                    false => p.check().map(|()| None),
                }
                .map_err(|e| e.to_string())
            })
            .collect();
        let dma_bufs = providers.iter().map(|_| OnceLock::new()).collect();
        Ok(P2p { topology, providers, pools, dma_bufs, exporter: Provider::export_dma_buf })
    }

    /// The providers a namespace may use: all, or the one its `provider` key pins.
    pub fn allowed(&self, pin: Option<PciAddr>) -> Result<Vec<usize>, Error> {
        let all: Vec<usize> =
            (0..self.providers.len()).filter(|&i| pin.is_none_or(|p| self.providers[i].pci == p)).collect();
        match (pin, all.is_empty()) {
            (Some(p), true) => {
                Err(format!("provider {p} is not a p2p provider here (p2pnvmf topology lists them)").into())
            }
            _ => Ok(all),
        }
    }

    /// The provider a namespace's buffers come from: the first with a pool (of those `pin`
    /// allows). `Err` lists why each provider is unusable.
    pub fn for_namespace(&self, pin: Option<PciAddr>) -> Result<usize, Error> {
        let allowed = self.allowed(pin)?;
        if let Some(&i) = allowed.iter().find(|&&i| self.pools[i].is_ok()) {
            return Ok(i);
        }
        if self.providers.is_empty() {
            return Err("no p2p provider: no NVMe CMB, p2pmem or configured BAR was found".into());
        }
        let why: Vec<String> = allowed.iter().filter_map(|&i| self.pools[i].as_ref().err().cloned()).collect();
        Err(why.join("; ").into())
    }

    /// The nearest provider (of those `eligible` and `pin` allows) with a pool that every one
    /// of `clients` reaches, with the farthest client's decision; else why each candidate is
    /// out (empty: there was no candidate). `Err` only for a `pin` naming no provider.
    pub fn nearest(
        &self,
        clients: &[Client],
        eligible: impl Fn(&Provider) -> bool,
        pin: Option<PciAddr>,
    ) -> Result<Result<(usize, Decision), Vec<String>>, Error> {
        let allowed = self.allowed(pin)?;
        let mut why = Vec::new();
        let mut best: Option<(usize, Decision)> = None;
        for (i, p) in self.providers.iter().enumerate().filter(|(i, p)| eligible(p) && allowed.contains(i)) {
            let kind = p.kind.as_str();
            if let Err(e) = &self.pools[i] {
                why.push(format!("{kind} of {}: {e}", p.pci));
                continue;
            }
            let decisions: Vec<(String, Decision)> =
                clients.iter().map(|c| (c.id(), self.topology.decide(p.pci, c))).collect();
            if let Some((c, d)) = decisions.iter().find(|(_, d)| d.path == Path::None) {
                why.push(format!("{kind} of {} is out of reach of {c}: {}", p.pci, d.reason));
                continue;
            }
            let worst = decisions.into_iter().map(|(_, d)| d).max_by_key(|d| d.distance).expect("clients");
            if best.as_ref().is_none_or(|(_, b)| worst.distance < b.distance) {
                best = Some((i, worst));
            }
        }
        Ok(best.ok_or(why))
    }

    /// The provider whose memory the kernel's driver of block device `dev` may DMA into — a
    /// p2pmem provider with a pool (of those `pin` allows) that every function serving `dev`
    /// reaches, the nearest first — with how it reaches it; `Err` says why there is none. Only p2pmem qualifies: the
    /// kernel pins p2pmem pages for a device's DMA, never a user mapping of a BAR.
    pub fn for_block_device(&self, dev: &BlockDevice, pin: Option<PciAddr>) -> Result<(usize, Decision), Error> {
        for f in &dev.functions {
            let func =
                self.topology.function(*f).ok_or_else(|| format!("{}: {f} is not in the PCI topology", dev.name))?;
            if !func.is_nvme() {
                return Err(format!(
                    "{} is on {f} (class {:06x}), not an NVMe controller: only the kernel's nvme driver does P2PDMA",
                    dev.name, func.class
                )
                .into());
            }
        }
        let clients: Vec<Client> =
            dev.functions.iter().map(|f| Client::Pci { addr: *f, name: Some(dev.name.clone()) }).collect();
        let why = match self.nearest(&clients, |p| p.kind == Kind::P2pmem, pin)? {
            Ok(best) => return Ok(best),
            Err(why) => why,
        };
        if why.is_empty() {
            return Err(format!(
                "no p2pmem: no PCI function offers /sys/bus/pci/devices/*/p2pmem (the kernel lacks CONFIG_PCI_P2PDMA, \
                 or no driver published device memory), and the kernel's driver of {} can DMA only into p2pmem pages, \
                 not into a user mapping of device memory",
                dev.name
            )
            .into());
        }
        Err(why.join("; ").into())
    }

    /// Provider `index`'s pool, or why it has none.
    pub fn pool(&self, index: usize) -> Result<Arc<ChunkPool>, Error> {
        match &self.pools[index] {
            Ok(Some(p)) => Ok(p.clone()),
            Ok(None) => Err(format!("{} was not mapped", self.providers[index].pci).into()),
            Err(why) => Err(why.clone().into()),
        }
    }

    /// Provider `index`'s window as a dma-buf (exported on first use and kept: every RDMA
    /// queue registers the same one), or why it cannot be exported.
    pub fn dma_buf(&self, index: usize) -> Result<Arc<OwnedFd>, Error> {
        self.dma_bufs[index]
            .get_or_init(|| (self.exporter)(&self.providers[index]).map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map_err(Error::Unusable)
    }

    /// Exports dma-bufs with `exporter` instead of VFIO.
    pub fn with_exporter(mut self, exporter: Exporter) -> P2p {
        self.exporter = exporter;
        self.dma_bufs = self.providers.iter().map(|_| OnceLock::new()).collect();
        self
    }

    /// How `client` reaches provider `index`, and the pool when it can.
    pub fn for_client(&self, index: usize, client: &Client) -> (Decision, Option<Arc<ChunkPool>>) {
        let d = self.topology.decide(self.providers[index].pci, client);
        let pool = match (&self.pools[index], d.path) {
            (Ok(Some(p)), Path::BusAddress | Path::HostBridge) => Some(p.clone()),
            _ => None,
        };
        (d, pool)
    }

    pub fn report(&self) -> Report {
        let hex = |v: u64| format!("{v:#x}");
        let providers = self
            .providers
            .iter()
            .zip(&self.pools)
            .map(|(p, pool)| ProviderReport {
                pci: p.pci.to_string(),
                kind: p.kind.as_str(),
                bar: p.bar,
                cpu_addr: hex(p.cpu_addr.get()),
                bus_addr: hex(p.bus_addr.get()),
                offset: hex(p.offset()),
                size: p.size,
                rds: p.cmb.map(|c| c.rds),
                wds: p.cmb.map(|c| c.wds),
                nvme_version: p.nvme_version.map(|v| format!("{}.{}", v >> 16, (v >> 8) & 0xff)),
                cmbmsc: p.cmbmsc.map(hex),
                available: p.p2pmem.map(|m| m.available),
                published: p.p2pmem.map(|m| m.published),
                usable: pool.is_ok(),
                reason: pool.as_ref().err().cloned(),
            })
            .collect();
        let mut decisions = Vec::new();
        for p in &self.providers {
            for c in self.topology.clients() {
                let d = self.topology.decide(p.pci, &c);
                decisions.push(DecisionReport {
                    provider: p.pci.to_string(),
                    client: c.id(),
                    client_name: c.name().map(str::to_owned),
                    path: d.path.as_str(),
                    distance: d.distance,
                    reason: d.reason,
                });
            }
        }
        let devices = self
            .topology
            .functions
            .iter()
            .filter(|f| f.is_nvme() || f.class >> 16 == 0x02)
            .map(|f| DeviceReport {
                pci: f.addr.to_string(),
                class: format!("{:06x}", f.class),
                ids: format!("{:04x}:{:04x}", f.vendor, f.device),
                upstream: f.upstream.iter().map(ToString::to_string).collect(),
                host_bridge: f.host_bridge.clone(),
                driver: f.driver.clone(),
                iommu_group: f.iommu_group,
                numa_node: f.numa_node,
            })
            .collect();
        let rdma = self
            .topology
            .rdma
            .iter()
            .map(|d| RdmaReport {
                name: d.name.clone(),
                pci: d.pci.map(|a| a.to_string()),
                netdev: d.netdev.clone(),
                software: d.is_software(),
            })
            .collect();
        Report { devices, rdma, providers, decisions, dmabuf: Vec::new(), kernel: None }
    }

    /// Per RDMA device × provider: whether a controller there would register the provider's
    /// dma-buf (the NIC's driver and the kernel's p2p check then decide), or the first step
    /// that stops it — the export (tried here, for a provider bound to vfio-pci), then the
    /// verbs library (`verbs`).
    pub fn dma_buf_report(&self, verbs: &Result<(), String>) -> Vec<DmaBufReport> {
        let mut out = Vec::new();
        for (i, p) in self.providers.iter().enumerate() {
            let why = self.dma_buf(i).map_err(|e| e.to_string()).map(drop).and_then(|()| verbs.clone()).err();
            for d in &self.topology.rdma {
                out.push(DmaBufReport {
                    device: d.name.clone(),
                    provider: p.pci.to_string(),
                    tried: why.is_none(),
                    reason: why.clone(),
                });
            }
        }
        out
    }
}

/// `p2pnvmf topology --json`: a contract for scripts (addresses as "0x…" strings; `path` one
/// of "bus-address", "host-bridge", "none"; `distance` null when there is no path).
#[derive(Debug, Serialize)]
pub struct Report {
    pub devices: Vec<DeviceReport>,
    pub rdma: Vec<RdmaReport>,
    pub providers: Vec<ProviderReport>,
    pub decisions: Vec<DecisionReport>,
    /// Filled by the caller, which knows the verbs library ([`P2p::dma_buf_report`]).
    pub dmabuf: Vec<DmaBufReport>,
    /// The running kernel's release: whether it can export a BAR as a dma-buf (6.19+).
    pub kernel: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DmaBufReport {
    pub device: String,
    pub provider: String,
    pub tried: bool,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DeviceReport {
    pub pci: String,
    pub class: String,
    pub ids: String,
    pub upstream: Vec<String>,
    pub host_bridge: String,
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    pub numa_node: Option<i32>,
}

#[derive(Debug, Serialize)]
pub struct RdmaReport {
    pub name: String,
    pub pci: Option<String>,
    pub netdev: Option<String>,
    pub software: bool,
}

#[derive(Debug, Serialize)]
pub struct ProviderReport {
    pub pci: String,
    pub kind: &'static str,
    pub bar: Option<u8>,
    pub cpu_addr: String,
    pub bus_addr: String,
    pub offset: String,
    pub size: u64,
    pub rds: Option<bool>,
    pub wds: Option<bool>,
    pub nvme_version: Option<String>,
    pub cmbmsc: Option<String>,
    /// p2pmem: bytes its allocator has free, and whether it is published to every p2p user.
    pub available: Option<u64>,
    pub published: Option<bool>,
    pub usable: bool,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct DecisionReport {
    pub provider: String,
    pub client: String,
    pub client_name: Option<String>,
    pub path: &'static str,
    pub distance: Option<u32>,
    pub reason: String,
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data serialises")
    }

    /// The human-readable form.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "Devices:");
        for d in &self.devices {
            let _ = writeln!(
                s,
                "  {} class {} [{}] driver {} via {} ({})",
                d.pci,
                d.class,
                d.ids,
                d.driver.as_deref().unwrap_or("-"),
                if d.upstream.is_empty() { "-".into() } else { d.upstream.join(" < ") },
                d.host_bridge
            );
        }
        for r in &self.rdma {
            let at = match (&r.pci, &r.netdev) {
                (Some(p), _) => p.clone(),
                (None, Some(n)) => format!("software, over {n}"),
                (None, None) => "software".into(),
            };
            let _ = writeln!(s, "  RDMA {} ({at})", r.name);
        }
        let _ = writeln!(s, "Providers:");
        if self.providers.is_empty() {
            let _ = writeln!(s, "  none");
        }
        for p in &self.providers {
            let _ = writeln!(
                s,
                "  {} {} BAR{} cpu {} bus {} offset {} size {} MiB{}{}{}{}",
                p.pci,
                p.kind,
                p.bar.map_or("-".into(), |b| b.to_string()),
                p.cpu_addr,
                p.bus_addr,
                p.offset,
                p.size >> 20,
                match (p.rds, p.wds) {
                    (Some(r), Some(w)) => format!(" RDS={} WDS={}", r as u8, w as u8),
                    _ => String::new(),
                },
                p.cmbmsc.as_ref().map(|v| format!(" CMBMSC={v}")).unwrap_or_default(),
                match (p.available, p.published) {
                    (Some(a), Some(pb)) => format!(" available {} MiB published={}", a >> 20, pb as u8),
                    _ => String::new(),
                },
                p.reason.as_ref().map(|r| format!("\n    unusable: {r}")).unwrap_or_default(),
            );
        }
        let _ = writeln!(s, "Decisions:");
        for d in &self.decisions {
            let dist = d.distance.map_or("-".into(), |v| v.to_string());
            let _ = writeln!(s, "  {} -> {}: {} (distance {dist}): {}", d.provider, d.client, d.path, d.reason);
        }
        if !self.dmabuf.is_empty() {
            let kernel = self.kernel.as_deref().unwrap_or("unknown");
            let _ = writeln!(s, "dma-buf registration (RDMA device x provider; kernel {kernel}):");
        }
        for d in &self.dmabuf {
            let what = match &d.reason {
                None => "tried at Connect (the NIC's driver and the kernel's p2p check decide)".to_string(),
                Some(r) => format!("not tried: {r}"),
            };
            let _ = writeln!(s, "  {} x {}: {what}", d.device, d.provider);
        }
        s
    }
}
