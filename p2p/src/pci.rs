//! PCI functions as sysfs shows them, read from a root directory the caller gives (the real
//! `/sys` or a fixture tree): identity, the chain of upstream bridges to the host bridge, the
//! PCIe port type and ACS control from config space, and each BAR's CPU address (`resource`)
//! and bus address (the BAR registers in `config`), hence its bus offset.

use std::path::{Path, PathBuf};

pub use p2pnvmf_config::pci::PciAddr;

use crate::addr::{BusAddr, CpuAddr};

/// PCIe device/port type (PCIe Base 6.0, 7.5.3.2, bits 7:4 of the capabilities register).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortType {
    Endpoint,
    RootPort,
    SwitchUpstream,
    SwitchDownstream,
    /// Root complex integrated endpoint.
    RcEndpoint,
    Other(u8),
    /// No PCI Express capability (conventional PCI).
    Conventional,
}

impl PortType {
    fn from_cap(v: u8) -> Self {
        match v {
            0 | 1 => PortType::Endpoint,
            4 => PortType::RootPort,
            5 => PortType::SwitchUpstream,
            6 => PortType::SwitchDownstream,
            9 => PortType::RcEndpoint,
            o => PortType::Other(o),
        }
    }
}

/// ACS control bits that send peer-to-peer traffic up to the root complex (PCIe Base 6.0,
/// 7.7.8.3): P2P Request Redirect, P2P Completion Redirect, P2P Egress Control.
pub const ACS_REDIRECTS: u16 = 1 << 2 | 1 << 3 | 1 << 5;

/// A memory or I/O BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub index: u8,
    /// CPU physical address (`resource`).
    pub cpu_addr: CpuAddr,
    pub size: u64,
    /// PCI bus address (the BAR register).
    pub bus_addr: BusAddr,
    pub mem64: bool,
    pub prefetchable: bool,
    pub io: bool,
}

impl Bar {
    /// bus address − CPU address, as Linux keeps it per p2p provider (wrapping, may be
    /// "negative").
    pub fn bus_offset(&self) -> u64 {
        self.bus_addr.offset_from(self.cpu_addr)
    }
}

/// One PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    pub addr: PciAddr,
    pub class: u32,
    pub vendor: u16,
    pub device: u16,
    /// Upstream bridges, nearest first, up to the root port.
    pub upstream: Vec<PciAddr>,
    /// The host bridge (`pci0000:00`).
    pub host_bridge: String,
    pub port_type: PortType,
    /// ACS control register, when the function has the ACS extended capability.
    pub acs_ctrl: Option<u16>,
    pub iommu_group: Option<u32>,
    pub numa_node: Option<i32>,
    pub bars: Vec<Bar>,
    /// The bound driver (`nvme`, `vfio-pci`, ...), if any.
    pub driver: Option<String>,
}

impl Function {
    /// The host bridge's own function (device 0 on the root bus), whose vendor and device say
    /// whether the root complex forwards p2p.
    pub fn host_bridge_addr(&self) -> Option<PciAddr> {
        let (domain, bus) = self.host_bridge.strip_prefix("pci")?.split_once(':')?;
        format!("{domain}:{bus}:00.0").parse().ok()
    }

    pub fn bar(&self, index: u8) -> Option<&Bar> {
        self.bars.iter().find(|b| b.index == index)
    }

    /// NVMe controller (class 01h, subclass 08h, prog-if 02h).
    pub fn is_nvme(&self) -> bool {
        self.class == 0x010802
    }
}

pub use crate::Error;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

fn format(path: &Path, what: impl Into<String>) -> Error {
    Error::Format { path: path.to_path_buf(), what: what.into() }
}

/// A sysfs tree at `root` (`/` on a live system, a fixture directory in tests).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Sysfs { root: root.into() }
    }

    /// The tree whose sysfs is mounted at `mount` (`/sys`, or a fixture's `sys`): its parent is
    /// the root the other paths (`proc/cpuinfo`) hang from.
    pub fn at_mount(mount: &Path) -> Result<Sysfs, Error> {
        if !mount.join("bus/pci/devices").is_dir() {
            let hint = if mount.join("sys/bus/pci/devices").is_dir() {
                format!(" (did you mean {}?)", mount.join("sys").display())
            } else {
                String::new()
            };
            return Err(
                format!("{} is not where sysfs is mounted: it has no bus/pci/devices{hint}", mount.display()).into()
            );
        }
        let root = mount.parent().map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
        Ok(Sysfs::new(root))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of a function (`sys/bus/pci/devices/<addr>`), for its resource files.
    pub fn function_dir(&self, addr: PciAddr) -> PathBuf {
        self.devices_dir().join(addr.to_string())
    }

    fn devices_dir(&self) -> PathBuf {
        self.root.join("sys/bus/pci/devices")
    }

    /// Every PCI function, in address order.
    pub fn functions(&self) -> Result<Vec<Function>, Error> {
        let dir = self.devices_dir();
        let mut addrs = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let name = entry.map_err(io(&dir))?.file_name();
            let name = name.to_string_lossy();
            addrs.push(name.parse::<PciAddr>().map_err(|e| format(&dir, e))?);
        }
        addrs.sort();
        addrs.into_iter().map(|a| self.function(a)).collect()
    }

    pub fn function(&self, addr: PciAddr) -> Result<Function, Error> {
        let link = self.devices_dir().join(addr.to_string());
        let real = std::fs::canonicalize(&link).map_err(io(&link))?;
        let (host_bridge, upstream) = chain(&real, addr).map_err(|e| format(&link, e))?;
        let hex = |name: &str| -> Result<u64, Error> {
            let p = real.join(name);
            let s = std::fs::read_to_string(&p).map_err(io(&p))?;
            u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).map_err(|_| format(&p, "not a hex number"))
        };
        let opt_link_num = |name: &str| -> Option<u32> {
            std::fs::read_link(real.join(name)).ok()?.file_name()?.to_str()?.parse().ok()
        };
        let numa_node = std::fs::read_to_string(real.join("numa_node"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|n| *n >= 0);
        let config_path = real.join("config");
        let config = std::fs::read(&config_path).map_err(io(&config_path))?;
        let cfg = Config::new(&config).map_err(|e| format(&config_path, e))?;
        let resource_path = real.join("resource");
        let resource = std::fs::read_to_string(&resource_path).map_err(io(&resource_path))?;
        let bars = bars(&cfg, &resource).map_err(|e| format(&resource_path, e))?;
        Ok(Function {
            addr,
            class: hex("class")? as u32,
            vendor: hex("vendor")? as u16,
            device: hex("device")? as u16,
            upstream,
            host_bridge,
            port_type: cfg.port_type(),
            acs_ctrl: cfg.acs_ctrl(),
            iommu_group: opt_link_num("iommu_group"),
            numa_node,
            bars,
            driver: std::fs::read_link(real.join("driver"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())),
        })
    }
}

/// From `/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0`: the host bridge and the upstream
/// bridges, nearest first.
fn chain(real: &Path, addr: PciAddr) -> Result<(String, Vec<PciAddr>), String> {
    let names: Vec<String> = real.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    let hb = names
        .iter()
        .rposition(|n| n.starts_with("pci") && n.contains(':'))
        .ok_or_else(|| format!("{} is not below a host bridge (pciDDDD:BB)", real.display()))?;
    let mut path: Vec<PciAddr> = names[hb + 1..].iter().map(|n| n.parse()).collect::<Result<_, _>>()?;
    if path.pop() != Some(addr) {
        return Err(format!("{} does not end in {addr}", real.display()));
    }
    path.reverse();
    Ok((names[hb].clone(), path))
}

/// Config space as the `config` file gives it (64 bytes unprivileged, 256 or 4096 as root).
struct Config<'a>(&'a [u8]);

impl<'a> Config<'a> {
    fn new(b: &'a [u8]) -> Result<Self, String> {
        if b.len() < 64 {
            return Err(format!("config space of {} bytes (< 64)", b.len()));
        }
        Ok(Config(b))
    }

    fn u8(&self, off: usize) -> Option<u8> {
        self.0.get(off).copied()
    }

    fn u16(&self, off: usize) -> Option<u16> {
        Some(u16::from_le_bytes(self.0.get(off..off + 2)?.try_into().ok()?))
    }

    fn u32(&self, off: usize) -> Option<u32> {
        Some(u32::from_le_bytes(self.0.get(off..off + 4)?.try_into().ok()?))
    }

    /// Type 0 headers have six BARs, type 1 (bridges) two.
    fn bar_count(&self) -> usize {
        if self.0[0x0e] & 0x7f == 1 { 2 } else { 6 }
    }

    /// Capability list (PCI 3.0, 6.7), guarded against loops.
    fn cap(&self, id: u8) -> Option<usize> {
        if self.u16(0x06)? & (1 << 4) == 0 {
            return None;
        }
        let mut ptr = usize::from(self.u8(0x34)? & !3);
        for _ in 0..48 {
            if ptr < 0x40 {
                return None;
            }
            if self.u8(ptr)? == id {
                return Some(ptr);
            }
            ptr = usize::from(self.u8(ptr + 1)? & !3);
        }
        None
    }

    /// Extended capability list from 0x100 (needs the 4 KiB config space).
    fn ext_cap(&self, id: u16) -> Option<usize> {
        let mut ptr = 0x100;
        for _ in 0..480 {
            let h = self.u32(ptr)?;
            if h == 0 || h == u32::MAX {
                return None;
            }
            if h as u16 == id {
                return Some(ptr);
            }
            ptr = (h >> 20) as usize & !3;
            if ptr < 0x100 {
                return None;
            }
        }
        None
    }

    fn port_type(&self) -> PortType {
        match self.cap(0x10).and_then(|p| self.u16(p + 2)) {
            Some(v) => PortType::from_cap(((v >> 4) & 0xf) as u8),
            None => PortType::Conventional,
        }
    }

    fn acs_ctrl(&self) -> Option<u16> {
        self.ext_cap(0x000d).and_then(|p| self.u16(p + 6))
    }
}

/// BARs with a CPU range in `resource` (one `start end flags` line per resource, BARs first)
/// and their bus addresses from the BAR registers.
fn bars(cfg: &Config, resource: &str) -> Result<Vec<Bar>, String> {
    let lines: Vec<&str> = resource.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < cfg.bar_count() {
        let reg = cfg.u32(0x10 + 4 * i).unwrap_or(0);
        let io = reg & 1 == 1;
        let mem64 = !io && (reg >> 1) & 3 == 2;
        let bus_addr = if io {
            u64::from(reg & !3)
        } else if mem64 {
            u64::from(reg & !0xf) | u64::from(cfg.u32(0x14 + 4 * i).unwrap_or(0)) << 32
        } else {
            u64::from(reg & !0xf)
        };
        let fields: Vec<u64> = lines
            .get(i)
            .ok_or_else(|| format!("no resource line for BAR {i}"))?
            .split_whitespace()
            .map(|v| {
                u64::from_str_radix(v.trim_start_matches("0x"), 16).map_err(|_| format!("resource line {i}: '{v}'"))
            })
            .collect::<Result<_, _>>()?;
        let (start, end) = match fields[..] {
            [s, e, _] => (s, e),
            _ => return Err(format!("resource line {i} has {} fields, expected 3", fields.len())),
        };
        if start != 0 && end >= start {
            out.push(Bar {
                index: i as u8,
                cpu_addr: CpuAddr::new(start),
                size: end - start + 1,
                bus_addr: BusAddr::new(bus_addr),
                mem64,
                prefetchable: !io && reg & (1 << 3) != 0,
                io,
            });
        }
        i += if mem64 { 2 } else { 1 };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let a: PciAddr = "0000:0a:1f.7".parse().unwrap();
        assert_eq!((a.domain, a.bus, a.dev, a.func), (0, 10, 31, 7));
        assert_eq!(a.to_string(), "0000:0a:1f.7");
        let vmd: PciAddr = "10000:e1:00.0".parse().unwrap();
        assert_eq!((vmd.domain, vmd.to_string().as_str()), (0x10000, "10000:e1:00.0"));
        for bad in ["0000:0a:20.0", "0:0a:00.0", "0000:0a:00.8", "0000-0a:00.0", "pci0000:00"] {
            assert!(bad.parse::<PciAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn chain_from_a_canonical_path() {
        let p = Path::new("/x/sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0/0000:02:01.0/0000:03:00.0");
        let (hb, up) = chain(p, "0000:03:00.0".parse().unwrap()).unwrap();
        assert_eq!(hb, "pci0000:00");
        let up: Vec<String> = up.iter().map(ToString::to_string).collect();
        assert_eq!(up, ["0000:02:01.0", "0000:01:00.0", "0000:00:01.0"]);
        assert!(chain(p, "0000:04:00.0".parse().unwrap()).is_err());
    }

    #[test]
    fn bar_offset_wraps_like_linux() {
        let b = Bar {
            index: 2,
            cpu_addr: CpuAddr::new(0x6000_0000_0000),
            size: 1 << 26,
            bus_addr: BusAddr::new(0x8000_0000),
            mem64: true,
            prefetchable: true,
            io: false,
        };
        assert_eq!(b.bus_offset().wrapping_add(b.cpu_addr.get()), b.bus_addr.get());
    }

    #[test]
    fn short_config_is_refused() {
        assert!(Config::new(&[0u8; 16]).is_err());
    }
}
