//! What the configuration says of PCI functions: their addresses, how a driven device
//! addresses memory, and the p2p memory providers it names. The p2p layer and the nvme-vfio
//! driver use these values as they are.

use std::fmt;
use std::str::FromStr;

/// A PCI function address, `dddd:bb:dd.f`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddr {
    pub domain: u32,
    pub bus: u8,
    pub dev: u8,
    pub func: u8,
}

impl FromStr for PciAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a PCI address (dddd:bb:dd.f)");
        let (domain, rest) = s.split_once(':').ok_or_else(bad)?;
        let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
        let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
        let hex = |v: &str, max: u32| u32::from_str_radix(v, 16).ok().filter(|n| *n <= max).ok_or_else(bad);
        // Domains print as %04x: VMD domains (10000 and up) take five digits.
        if !(4..=8).contains(&domain.len()) || bus.len() != 2 || dev.len() != 2 || func.len() != 1 {
            return Err(bad());
        }
        Ok(PciAddr {
            domain: hex(domain, u32::MAX)?,
            bus: hex(bus, 0xff)? as u8,
            dev: hex(dev, 0x1f)? as u8,
            func: hex(func, 7)? as u8,
        })
    }
}

impl fmt::Display for PciAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.dev, self.func)
    }
}

/// How a device the target drives addresses memory for its DMA (`dma` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    /// `"iommu"` (the default): vfio-pci, the device's DMA confined by the IOMMU to what the
    /// target maps for it (IOVAs).
    Iommu,
    /// `"physical"`: uio_pci_generic and physical addresses, for hosts without an IOMMU: nothing
    /// confines the device's DMA, so it is used only when asked for.
    Physical,
}

impl Addressing {
    /// As the configuration says it (`dma`).
    pub fn as_str(self) -> &'static str {
        match self {
            Addressing::Iommu => "iommu",
            Addressing::Physical => "physical",
        }
    }
}

/// What kind of p2p memory a provider offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NvmeCmb,
    Bar,
    P2pmem,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::NvmeCmb => "nvme-cmb",
            Kind::Bar => "bar",
            Kind::P2pmem => "p2pmem",
        }
    }
}

/// A provider the configuration names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub pci: PciAddr,
    pub kind: Kind,
    /// For `Kind::Bar`.
    pub bar: Option<u8>,
}
