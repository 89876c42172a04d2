//! Whether a client (RDMA NIC, NVMe controller) can reach a provider's memory, and with which
//! address — Linux's rules (drivers/pci/p2pdma.c): below a common upstream bridge with no ACS
//! redirect on the path the peers use bus addresses; otherwise the request goes through the
//! root complex, which only some host bridges forward, and then the client must use the
//! IOMMU/CPU address; otherwise no p2p at all.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use crate::addr::{BusAddr, CpuAddr};
use crate::pci::{ACS_REDIRECTS, Error, Function, PciAddr, Sysfs};
use crate::provider::Provider;
use crate::rdma::RdmaDevice;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    BusAddress,
    HostBridge,
    None,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::BusAddress => "bus-address",
            Path::HostBridge => "host-bridge",
            Path::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub path: Path,
    /// Hops to the common bridge counted from both sides (to the root complex when there is
    /// none); `None` when there is no path.
    pub distance: Option<u32>,
    pub reason: String,
}

impl Decision {
    fn none(reason: String) -> Decision {
        Decision { path: Path::None, distance: None, reason }
    }
}

/// A device that would DMA to or from provider memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    Pci {
        addr: PciAddr,
        name: Option<String>,
    },
    /// No PCI function of its own (rxe, siw): never a p2p client.
    Software {
        name: String,
        reason: String,
    },
}

impl Client {
    pub fn rdma(d: &RdmaDevice) -> Client {
        match (d.pci, d.software_reason()) {
            (Some(addr), None) => Client::Pci { addr, name: Some(d.name.clone()) },
            (_, reason) => Client::Software { name: d.name.clone(), reason: reason.unwrap_or_default() },
        }
    }

    /// The PCI address where the client has one, its device name where it has none.
    pub fn id(&self) -> String {
        match self {
            Client::Pci { addr, .. } => addr.to_string(),
            Client::Software { name, .. } => name.clone(),
        }
    }

    pub fn name(&self) -> Option<&str> {
        match self {
            Client::Pci { name, .. } => name.as_deref(),
            Client::Software { name, .. } => Some(name),
        }
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Client::Pci { addr, name: Some(n) } => write!(f, "{n} ({addr})"),
            Client::Pci { addr, name: None } => write!(f, "{addr}"),
            Client::Software { name, .. } => write!(f, "{name}"),
        }
    }
}

/// Host bridges known to forward p2p between root ports: Linux's whitelist (vendor, device,
/// whether both peers must sit below the same host bridge). AMD Zen and newer are recognised
/// from the CPU instead.
const FORWARDING_HOST_BRIDGES: &[(u16, u16, bool)] = &[
    (0x8086, 0x3c00, true),
    (0x8086, 0x3c01, true),
    (0x8086, 0x2f00, true),
    (0x8086, 0x2f01, true),
    (0x8086, 0x2030, false),
    (0x8086, 0x2031, false),
    (0x8086, 0x2032, false),
    (0x8086, 0x2033, false),
    (0x8086, 0x2020, false),
    (0x8086, 0x09a2, false),
];

/// The PCI functions and RDMA devices of one sysfs tree, with p2p decisions cached per
/// provider × client.
#[derive(Debug)]
pub struct Topology {
    pub functions: Vec<Function>,
    pub rdma: Vec<RdmaDevice>,
    /// `[p2p] allow_host_bridges`: host bridges (vendor, device) the operator says forward p2p.
    allow: Vec<(u16, u16)>,
    amd_zen: bool,
    cache: Mutex<HashMap<(PciAddr, String), Decision>>,
}

impl Topology {
    pub fn read(sysfs: &Sysfs, allow_host_bridges: &[(u16, u16)]) -> Result<Topology, Error> {
        let cpuinfo = std::fs::read_to_string(sysfs.root().join("proc/cpuinfo")).unwrap_or_default();
        Ok(Topology {
            functions: sysfs.functions()?,
            rdma: sysfs.rdma_devices()?,
            allow: allow_host_bridges.to_vec(),
            amd_zen: amd_zen(&cpuinfo),
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn function(&self, addr: PciAddr) -> Option<&Function> {
        self.functions.iter().find(|f| f.addr == addr)
    }

    /// The clients p2p decisions are made for: every RDMA device and NVMe controller.
    pub fn clients(&self) -> Vec<Client> {
        let mut out: Vec<Client> = self.rdma.iter().map(Client::rdma).collect();
        out.extend(self.functions.iter().filter(|f| f.is_nvme()).map(|f| Client::Pci { addr: f.addr, name: None }));
        out
    }

    /// The RDMA device `name` as a client (`None`: not in this tree).
    pub fn rdma_client(&self, name: &str) -> Option<Client> {
        self.rdma.iter().find(|d| d.name == name).map(Client::rdma)
    }

    /// How `client` reaches memory of `provider`, computed once per pair.
    pub fn decide(&self, provider: PciAddr, client: &Client) -> Decision {
        let key = (provider, client.id());
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.entry(key).or_insert_with(|| self.compute(provider, client)).clone()
    }

    fn compute(&self, provider: PciAddr, client: &Client) -> Decision {
        let addr = match client {
            Client::Software { reason, .. } => return Decision::none(reason.clone()),
            Client::Pci { addr, .. } => *addr,
        };
        let (Some(p), Some(c)) = (self.function(provider), self.function(addr)) else {
            return Decision::none(format!("{provider} or {addr} is not in the PCI topology"));
        };
        if p.addr == c.addr {
            return Decision {
                path: Path::BusAddress,
                distance: Some(0),
                reason: format!("{addr} is the provider itself"),
            };
        }
        // Chains from each device up to its root port, the device itself first.
        let a: Vec<PciAddr> = std::iter::once(p.addr).chain(p.upstream.iter().copied()).collect();
        let b: Vec<PciAddr> = std::iter::once(c.addr).chain(c.upstream.iter().copied()).collect();
        let common = (p.host_bridge == c.host_bridge)
            .then(|| a.iter().enumerate().find_map(|(i, x)| b.iter().position(|y| y == x).map(|j| (i, j))))
            .flatten();
        let redirects = |chain: &[PciAddr]| -> Vec<PciAddr> {
            chain
                .iter()
                .copied()
                .filter(|x| self.function(*x).and_then(|f| f.acs_ctrl).is_some_and(|ctrl| ctrl & ACS_REDIRECTS != 0))
                .collect()
        };
        let (distance, why_not_bus) = match common {
            Some((i, j)) => {
                // Linux checks every bridge from the provider up to and including the common
                // one, and the client's side below it.
                let mut acs = redirects(&a[..=i]);
                acs.extend(redirects(&b[..j]));
                let distance = (i + j) as u32;
                if acs.is_empty() {
                    return Decision {
                        path: Path::BusAddress,
                        distance: Some(distance),
                        reason: format!(
                            "common upstream bridge {}, no ACS redirect on the path: the client uses bus addresses",
                            a[i]
                        ),
                    };
                }
                let list: Vec<String> = acs.iter().map(ToString::to_string).collect();
                (distance, format!("ACS P2P redirect is set on {} (pci=disable_acs_redir= lifts it)", list.join(", ")))
            }
            None => (
                (a.len() + b.len()) as u32,
                format!("no common upstream switch ({} and {})", a[a.len() - 1], b[b.len() - 1]),
            ),
        };
        match self.forwards(p, c) {
            Ok(how) => Decision {
                path: Path::HostBridge,
                distance: Some(distance),
                reason: format!("{why_not_bus}; {how}: the client uses the IOMMU/CPU address"),
            },
            Err(why) => Decision::none(format!("{why_not_bus}; {why}")),
        }
    }

    /// Whether the root complex forwards p2p between the two functions' host bridges.
    fn forwards(&self, p: &Function, c: &Function) -> Result<String, String> {
        if self.amd_zen {
            return Ok("AMD Zen root complexes forward p2p".into());
        }
        let same = p.host_bridge == c.host_bridge;
        let mut names = Vec::new();
        for f in [p, c] {
            let hb = f.host_bridge_addr().and_then(|a| self.function(a));
            let Some(hb) = hb else {
                return Err(format!("host bridge {} has no function 00.0 to identify it", f.host_bridge));
            };
            let ids = (hb.vendor, hb.device);
            let name = format!("host bridge {:04x}:{:04x} ({})", hb.vendor, hb.device, hb.addr);
            let listed = FORWARDING_HOST_BRIDGES.iter().any(|&(v, d, need_same)| (v, d) == ids && (same || !need_same));
            if !listed && !self.allow.contains(&ids) {
                return Err(format!(
                    "{name} is not known to forward p2p{} (list it in [p2p] allow_host_bridges if it does)",
                    if same { "" } else { " across host bridges" }
                ));
            }
            if !names.contains(&name) {
                names.push(name);
            }
            if same {
                break;
            }
        }
        Ok(format!("{} forwards p2p", names.join(" and ")))
    }
}

/// What a client puts on the wire for a byte of a provider's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireAddr {
    /// Below the same switch: the bus address.
    Bus(BusAddr),
    /// Through the host bridge: the CPU address (an IOMMU, where there is one, maps it).
    Cpu(CpuAddr),
}

/// The address `client` must put on the wire for byte `off` of `provider`'s window, per
/// `decision`; `None` when it has no path (the caller must use host memory) or `off` leaves
/// the address space.
pub fn address(provider: &Provider, decision: &Decision, off: u64) -> Option<WireAddr> {
    match decision.path {
        Path::BusAddress => provider.bus_addr.checked_add(off).map(WireAddr::Bus),
        Path::HostBridge => provider.cpu_addr.checked_add(off).map(WireAddr::Cpu),
        Path::None => None,
    }
}

fn amd_zen(cpuinfo: &str) -> bool {
    let field = |k: &str| {
        cpuinfo.lines().find_map(|l| l.split_once(':').filter(|(n, _)| n.trim() == k).map(|(_, v)| v.trim().to_owned()))
    };
    field("vendor_id").as_deref() == Some("AuthenticAMD")
        && field("cpu family").and_then(|f| f.parse::<u32>().ok()).is_some_and(|f| f >= 0x17)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zen_from_cpuinfo() {
        assert!(amd_zen("vendor_id\t: AuthenticAMD\ncpu family\t: 25\n"));
        assert!(!amd_zen("vendor_id\t: AuthenticAMD\ncpu family\t: 21\n"));
        assert!(!amd_zen("vendor_id\t: GenuineIntel\ncpu family\t: 6\n"));
        assert!(!amd_zen(""));
    }
}
