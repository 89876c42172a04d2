//! p2p memory providers: an NVMe Controller Memory Buffer, a BAR named in the config, or the
//! kernel's p2pmem. Each knows its window's CPU and bus address and how to map it, or says in
//! words why it cannot be used.

use crate::Error;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

pub use p2pnvmf_config::pci::{Kind, Spec};

use crate::addr::{BusAddr, CpuAddr};
use crate::mem::{BarUse, Mapping};
use crate::pci::{Bar, Function, PciAddr, Sysfs};
use crate::vfio::VfioDevice;

/// NVMe controller registers (NVMe Base 2.0, 3.1.4).
mod reg {
    pub const CAP: usize = 0x00;
    pub const VS: usize = 0x08;
    pub const CMBLOC: usize = 0x38;
    pub const CMBSZ: usize = 0x3c;
    pub const CMBMSC: usize = 0x50;
    pub const CMBSTS: usize = 0x58;
    /// CAP.CMBS: CMBLOC/CMBSZ need CMBMSC.CRE and the CMB needs CMBMSC.CMSE + CBA.
    pub const CAP_CMBS: u64 = 1 << 57;
    pub const CMBMSC_CRE: u64 = 1 << 0;
    pub const CMBMSC_CMSE: u64 = 1 << 1;
    /// CMBSTS.CBAI: the controller refused the CBA it was given.
    pub const CMBSTS_CBAI: u32 = 1 << 0;
}

/// What CMBLOC and CMBSZ say about a CMB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmbInfo {
    pub bir: u8,
    /// Offset of the CMB within the BAR.
    pub offset: u64,
    pub size: u64,
    /// Read Data Support / Write Data Support: PRPs/SGLs for data may point into the CMB.
    pub rds: bool,
    pub wds: bool,
    pub sqs: bool,
    pub cqs: bool,
    pub lists: bool,
}

impl CmbInfo {
    /// Decodes CMBLOC and CMBSZ (NVMe Base 2.0, 3.1.4.12–13); `None` when CMBSZ is 0 (no CMB).
    pub fn decode(cmbloc: u32, cmbsz: u32) -> Result<Option<CmbInfo>, Error> {
        if cmbsz == 0 {
            return Ok(None);
        }
        let szu = (cmbsz >> 8) & 0xf;
        if szu > 6 {
            return Err(format!("CMBSZ {cmbsz:#010x}: reserved size unit {szu}").into());
        }
        let unit = 4096u64 << (4 * szu);
        let bir = (cmbloc & 0x7) as u8;
        if !matches!(bir, 0 | 2..=5) {
            return Err(format!("CMBLOC {cmbloc:#010x}: BIR {bir} is not a BAR").into());
        }
        let bit = |n: u32| cmbsz & (1 << n) != 0;
        Ok(Some(CmbInfo {
            bir,
            offset: u64::from(cmbloc >> 12) * unit,
            size: u64::from(cmbsz >> 12) * unit,
            sqs: bit(0),
            cqs: bit(1),
            lists: bit(2),
            rds: bit(3),
            wds: bit(4),
        }))
    }
}

/// CMBMSC value enabling the CMB at `bus_addr`: CRE, CMSE and CBA (4 KiB aligned).
pub fn cmbmsc(bus_addr: BusAddr) -> u64 {
    reg::CMBMSC_CRE | reg::CMBMSC_CMSE | (bus_addr.get() & !0xfff)
}

/// One p2p memory window.
#[derive(Debug, Clone)]
pub struct Provider {
    pub pci: PciAddr,
    pub kind: Kind,
    pub bar: Option<u8>,
    /// CPU physical address of the window.
    pub cpu_addr: CpuAddr,
    /// PCI bus address of the window: what a peer below the same switch must use.
    pub bus_addr: BusAddr,
    pub size: u64,
    pub cmb: Option<CmbInfo>,
    pub nvme_version: Option<u32>,
    /// CMBMSC as read back after programming it.
    pub cmbmsc: Option<u64>,
    /// For `Kind::P2pmem`: what the kernel's allocator says.
    pub p2pmem: Option<P2pmemInfo>,
    /// Why the window cannot back buffers; `None` when it can.
    pub unusable: Option<String>,
    /// What to map, and from where.
    map_from: Option<Source>,
}

/// The kernel's p2pmem allocator of a function (`/sys/bus/pci/devices/<f>/p2pmem`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct P2pmemInfo {
    /// Bytes not yet allocated: the most a pool can map.
    pub available: u64,
    /// Offered to any kernel p2p user (nvmet's `p2pmem` attribute set to 1), not only by name.
    pub published: bool,
}

/// Where a BAR is mapped from: sysfs `resourceN` of an unbound function, or VFIO.
#[derive(Debug, Clone)]
enum Source {
    Sysfs(PathBuf, u64),
    Vfio(Arc<VfioDevice>, u8, u64),
}

impl Source {
    /// The same function's BAR `bar`, from `off`.
    fn at(&self, bar: u8, off: u64) -> Source {
        match self {
            Source::Sysfs(path, _) => Source::Sysfs(path.with_file_name(format!("resource{bar}")), off),
            Source::Vfio(dev, ..) => Source::Vfio(dev.clone(), bar, off),
        }
    }

    #[allow(unsafe_code)]
    fn map(&self, len: usize, usage: BarUse) -> Result<Mapping, Error> {
        match self {
            Source::Sysfs(path, off) => {
                let err = |e: std::io::Error| Error::os(format!("mapping {} at {off:#x}", path.display()), e);
                let f = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(err)?;
                let bar = path.file_name().and_then(|n| n.to_str()?.strip_prefix("resource")?.parse::<u8>().ok());
                let function = path.parent().unwrap_or(path);
                match bar {
                    // SAFETY: the sysfs file of a memory BAR (the provider was set up from its
                    // resource listing) of a function no kernel driver holds.
                    Some(bar) => unsafe { Mapping::bar(function, bar, f.as_raw_fd(), 0, *off, len, usage) },
                    // SAFETY: p2pmem's `allocate`: every mapping is fresh device memory the
                    // kernel's allocator hands to this mapping alone, kept until unmapped.
                    None => unsafe { Mapping::fd(f.as_raw_fd(), *off, len) },
                }
                .map_err(err)
            }
            Source::Vfio(dev, bar, off) => dev.map_bar(*bar, *off, len, usage),
        }
    }
}

impl Provider {
    /// bus address − CPU address (Linux's per-provider `bus_offset`).
    pub fn offset(&self) -> u64 {
        self.bus_addr.offset_from(self.cpu_addr)
    }

    pub fn is_usable(&self) -> bool {
        self.unusable.is_none()
    }

    /// Whether the window could be mapped: usable, and its resource file opens read-write.
    pub fn check(&self) -> Result<(), Error> {
        if let Some(why) = &self.unusable {
            return Err(why.clone().into());
        }
        match self.map_from.as_ref().ok_or("no mapping source")? {
            Source::Sysfs(path, _) => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map(drop)
                .map_err(|e| Error::os(format!("opening {}", path.display()), e)),
            Source::Vfio(..) => Ok(()),
        }
    }

    /// Exports the window [`Provider::map`] maps as a dma-buf, for an RDMA NIC to register.
    /// Only VFIO exports a BAR; the reason says what is missing otherwise.
    pub fn export_dma_buf(&self) -> Result<std::os::fd::OwnedFd, Error> {
        if let Some(why) = &self.unusable {
            return Err(why.clone().into());
        }
        match self.map_from.as_ref().ok_or("no mapping source")? {
            _ if self.kind == Kind::P2pmem => Err(format!(
                "{} is p2pmem, which the kernel's driver allocates and no interface exports as a dma-buf",
                self.pci
            )
            .into()),
            Source::Sysfs(..) => Err(format!(
                "{} is not bound to vfio-pci, and only VFIO exports a BAR as a dma-buf (bind it to vfio-pci)",
                self.pci
            )
            .into()),
            Source::Vfio(dev, bar, off) => dev.export_dma_buf(*bar, *off, self.size).map_err(|e| {
                let errno = e.raw_os_error().unwrap_or(0);
                let what = if errno == libc::ENOTTY || errno == libc::EINVAL {
                    format!(
                        "this kernel cannot export a BAR as a dma-buf (needs Linux 6.19 or later with \
                         CONFIG_VFIO_PCI_DMABUF and CONFIG_PCI_P2PDMA): VFIO_DEVICE_FEATURE_DMA_BUF on {}",
                        self.pci
                    )
                } else {
                    format!("VFIO_DEVICE_FEATURE_DMA_BUF on {} BAR{bar}", self.pci)
                };
                Error::os(what, e)
            }),
        }
    }

    /// Maps the whole window for the CPU (to fill and drain buffers).
    pub fn map(&self) -> Result<Mapping, Error> {
        if let Some(why) = &self.unusable {
            return Err(why.clone().into());
        }
        let src = self.map_from.as_ref().ok_or("no mapping source")?;
        let size = self.p2pmem.map_or(self.size, |p| p.available);
        let len = usize::try_from(size).map_err(|_| format!("{size} bytes do not fit in memory"))?;
        let bus = (self.kind != Kind::P2pmem).then_some(self.bus_addr);
        src.map(len, BarUse::Memory).map(|m| m.device(self.pci.to_string(), bus))
    }

    fn new(f: &Function, kind: Kind, bar: Option<&Bar>) -> Provider {
        Provider {
            pci: f.addr,
            kind,
            bar: bar.map(|b| b.index),
            cpu_addr: bar.map_or(CpuAddr::default(), |b| b.cpu_addr),
            bus_addr: bar.map_or(BusAddr::default(), |b| b.bus_addr),
            size: bar.map_or(0, |b| b.size),
            cmb: None,
            nvme_version: None,
            cmbmsc: None,
            p2pmem: None,
            unusable: None,
            map_from: None,
        }
    }
}

/// The kernel driver that owns a function's BARs, if any: one that claimed them makes sysfs
/// `resourceN` refuse mmap (and using them behind it would be wrong anyway). Unbound,
/// vfio-pci and uio_pci_generic functions are ours.
fn kernel_owner(f: &Function) -> Option<&str> {
    f.driver.as_deref().filter(|d| !matches!(*d, "vfio-pci" | "uio_pci_generic"))
}

/// Turns on memory decoding of an unbound function (sysfs `enable`, which is what a driver's
/// pci_enable_device does) so its BARs answer: until then reads return all ones.
fn enable_memory(dir: &std::path::Path) -> Result<(), Error> {
    let config = std::fs::read(dir.join("config")).map_err(|e| Error::os("reading config", e))?;
    let command = config.get(4).copied().unwrap_or(0);
    if command & 0x2 != 0 {
        return Ok(());
    }
    std::fs::write(dir.join("enable"), "1").map_err(|e| Error::os("enabling memory decoding (sysfs enable)", e))
}

impl Sysfs {
    /// Where `f`'s BARs map from: VFIO when vfio-pci owns it, else sysfs (uio_pci_generic
    /// claims no BAR; memory decoding turned on first when `enable`); `Err` says why they
    /// cannot be mapped.
    fn bar_source(&self, f: &Function, enable: bool) -> Result<Source, Error> {
        if let Some(d) = kernel_owner(f) {
            return Err(format!(
                "{} is bound to the kernel driver {d}, which owns its BARs; unbind it (echo {} > \
                 /sys/bus/pci/drivers/{d}/unbind) to use its memory",
                f.addr, f.addr
            )
            .into());
        }
        if f.driver.as_deref() == Some("vfio-pci") {
            return Ok(Source::Vfio(VfioDevice::open(f)?, 0, 0));
        }
        let dir = self.function_dir(f.addr);
        if enable {
            enable_memory(&dir).map_err(|e| e.context(f.addr))?;
        }
        Ok(Source::Sysfs(dir.join("resource0"), 0))
    }

    /// An NVMe controller's CMB. With `program`, sets CMBMSC (CRE to read CMBLOC/CMBSZ, then
    /// CMSE and CBA = the CMB's *bus* address, high dword first) and checks CMBSTS.CBAI.
    pub fn nvme_cmb(&self, f: &Function, program: bool) -> Result<Option<Provider>, Error> {
        let src = match self.bar_source(f, program) {
            Ok(s) => s,
            Err(why) => {
                let mut p = Provider::new(f, Kind::NvmeCmb, None);
                p.unusable = Some(why.to_string());
                return Ok(Some(p));
            }
        };
        let bar0 = f.bar(0).ok_or_else(|| format!("{}: NVMe without BAR0", f.addr))?;
        let regs = src
            .map(bar0.size.min(4096) as usize, BarUse::Registers)
            .map_err(|e| e.context(format_args!("{}: BAR0 registers", f.addr)))?;
        let cap = regs.read64(reg::CAP);
        let version = regs.read32(reg::VS);
        let cmbs = cap & reg::CAP_CMBS != 0;
        if cmbs && program {
            regs.write64_hi_lo(reg::CMBMSC, reg::CMBMSC_CRE);
        }
        let Some(cmb) =
            CmbInfo::decode(regs.read32(reg::CMBLOC), regs.read32(reg::CMBSZ)).map_err(|e| e.context(f.addr))?
        else {
            return Ok(None);
        };
        let bar = f.bar(cmb.bir).ok_or_else(|| format!("{}: CMB in BAR{} which has no resource", f.addr, cmb.bir))?;
        let mut p = Provider::new(f, Kind::NvmeCmb, Some(bar));
        p.cmb = Some(cmb);
        p.nvme_version = Some(version);
        // Where the CMB starts (the BAR's start when the offset leaves the address space: the
        // overrun below says why it is unusable).
        p.cpu_addr = bar.cpu_addr.checked_add(cmb.offset).unwrap_or(bar.cpu_addr);
        p.bus_addr = bar.bus_addr.checked_add(cmb.offset).unwrap_or(bar.bus_addr);
        p.size = cmb.size;
        if cmb.offset.checked_add(cmb.size).is_none_or(|end| end > bar.size) {
            p.unusable = Some(format!(
                "{}: CMB of {:#x} bytes at offset {:#x} overruns BAR{} ({:#x} bytes)",
                f.addr, cmb.size, cmb.offset, bar.index, bar.size
            ));
            return Ok(Some(p));
        }
        if cmbs {
            if program {
                regs.write64_hi_lo(reg::CMBMSC, cmbmsc(p.bus_addr));
            }
            p.cmbmsc = Some(regs.read64(reg::CMBMSC));
            if regs.read32(reg::CMBSTS) & reg::CMBSTS_CBAI != 0 {
                p.unusable = Some(format!(
                    "{}: the controller refused CMB base address {:#x} (CMBSTS.CBAI)",
                    f.addr, p.bus_addr
                ));
            } else if p.cmbmsc.is_some_and(|v| v & reg::CMBMSC_CMSE == 0) {
                p.unusable = Some(format!("{}: CMBMSC.CMSE is clear: the CMB memory space is disabled", f.addr));
            }
        }
        if !(cmb.rds && cmb.wds) {
            p.unusable.get_or_insert(format!(
                "{}: the CMB does not support data (CMBSZ RDS={} WDS={})",
                f.addr, cmb.rds as u8, cmb.wds as u8
            ));
        }
        drop(regs);
        p.map_from = Some(src.at(bar.index, cmb.offset));
        Ok(Some(p))
    }

    /// A whole memory BAR named in the config.
    pub fn bar_provider(&self, f: &Function, index: u8) -> Result<Provider, Error> {
        let bar = f.bar(index).ok_or_else(|| format!("{}: BAR{index} has no resource", f.addr))?;
        if bar.io {
            return Err(format!("{}: BAR{index} is an I/O BAR, not memory", f.addr).into());
        }
        let mut p = Provider::new(f, Kind::Bar, Some(bar));
        match self.bar_source(f, true) {
            Ok(src) => p.map_from = Some(src.at(index, 0)),
            Err(why) => p.unusable = Some(why.to_string()),
        }
        Ok(p)
    }

    /// The kernel's p2pmem for a function, where the kernel offers it (CONFIG_PCI_P2PDMA;
    /// Debian's kernels do not). p2pmem does not say which BAR it lives in: it is the
    /// smallest memory BAR that holds it (prefetchable first), whose `resource` gives the CPU
    /// address and whose config-space register the bus address.
    pub fn p2pmem(&self, f: &Function) -> Option<Provider> {
        let dir = self.function_dir(f.addr).join("p2pmem");
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).ok().map(|s| s.trim().to_owned());
        let size = read("size")?.parse::<u64>().ok()?;
        let available = read("available").and_then(|s| s.parse().ok()).unwrap_or(size);
        let published = read("published").is_some_and(|s| s == "1");
        let bar = f.bars.iter().filter(|b| !b.io && b.size >= size).min_by_key(|b| (!b.prefetchable, b.size));
        let mut p = Provider::new(f, Kind::P2pmem, bar);
        p.size = size;
        p.p2pmem = Some(P2pmemInfo { available, published });
        // The kernel hands out what is still free: that is what a pool can take.
        p.map_from = Some(Source::Sysfs(dir.join("allocate"), 0));
        if available == 0 {
            p.unusable = Some(format!("{}: p2pmem has no memory available (all {size} bytes allocated)", f.addr));
        }
        Some(p)
    }

    /// Providers: the configured ones, else every NVMe CMB and p2pmem found.
    pub fn providers(&self, functions: &[Function], specs: &[Spec], program: bool) -> Result<Vec<Provider>, Error> {
        let mut out = Vec::new();
        if specs.is_empty() {
            for f in functions {
                // A kernel nvme driver owns its controller; unbound, vfio-pci and uio ones are ours.
                if f.is_nvme() && kernel_owner(f).is_none() {
                    out.extend(self.nvme_cmb(f, program)?);
                }
                out.extend(self.p2pmem(f));
            }
            return Ok(out);
        }
        for s in specs {
            let f = functions
                .iter()
                .find(|f| f.addr == s.pci)
                .ok_or_else(|| format!("p2p provider {}: no such PCI function", s.pci))?;
            out.push(match s.kind {
                Kind::NvmeCmb => self
                    .nvme_cmb(f, program)?
                    .ok_or_else(|| format!("p2p provider {}: the controller has no CMB (CMBSZ is 0)", s.pci))?,
                Kind::Bar => self.bar_provider(f, s.bar.unwrap_or(0))?,
                Kind::P2pmem => self
                    .p2pmem(f)
                    .ok_or_else(|| format!("p2p provider {}: no p2pmem (the kernel lacks CONFIG_PCI_P2PDMA)", s.pci))?,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmb_registers_decode() {
        // qemu: BIR 2, SZU 1 MiB, 64 units, SQS|RDS|WDS.
        let c = CmbInfo::decode(2, 64 << 12 | 2 << 8 | 1 << 4 | 1 << 3 | 1).unwrap().unwrap();
        assert_eq!((c.bir, c.offset, c.size, c.rds, c.wds, c.sqs, c.cqs), (2, 0, 64 << 20, true, true, true, false));
        // OFST counts size units: 3 × 64 KiB.
        let c = CmbInfo::decode(3 << 12 | 4, 16 << 12 | 1 << 8).unwrap().unwrap();
        assert_eq!((c.bir, c.offset, c.size, c.rds), (4, 3 << 16, 16 << 16, false));
        assert_eq!(CmbInfo::decode(2, 0).unwrap(), None);
        assert!(CmbInfo::decode(1, 1 << 12).unwrap_err().to_string().contains("BIR 1"));
        assert!(CmbInfo::decode(0, 1 << 12 | 7 << 8).unwrap_err().to_string().contains("size unit 7"));
    }

    proptest::proptest! {
        /// Any register pair decodes or is refused with words, never panics; sizes and
        /// offsets are whole size units.
        #[test]
        fn any_cmb_registers_decode_or_are_refused(cmbloc: u32, cmbsz: u32) {
            if let Ok(Some(c)) = CmbInfo::decode(cmbloc, cmbsz) {
                let unit = 4096u64 << (4 * ((cmbsz >> 8) & 0xf));
                proptest::prop_assert_eq!(c.size, u64::from(cmbsz >> 12) * unit);
                proptest::prop_assert_eq!(c.offset % unit, 0);
            }
        }
    }

    #[test]
    fn cmbmsc_carries_the_bus_address() {
        assert_eq!(cmbmsc(BusAddr::new(0x8800_0000)), 0x8800_0003);
        assert_eq!(cmbmsc(BusAddr::new(0x6000_0800_0000)), 0x6000_0800_0003);
    }
}
