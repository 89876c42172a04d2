//! RDMA devices from `sys/class/infiniband`, each mapped to its PCI function. Software devices
//! (rxe, siw) have none of their own — they move data with the CPU through a netdev — so they can
//! never reach peer memory; Linux's p2pdma refuses them for the same reason.

use std::path::Path;

use crate::pci::{Error, PciAddr, Sysfs};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaDevice {
    pub name: String,
    /// The PCI function doing the DMA; `None` for a software device.
    pub pci: Option<PciAddr>,
    /// The netdev a software device runs over (rxe's `parent`).
    pub netdev: Option<String>,
}

impl RdmaDevice {
    pub fn is_software(&self) -> bool {
        self.pci.is_none()
    }

    /// Why this device cannot take part in p2p, when it cannot.
    pub fn software_reason(&self) -> Option<String> {
        self.is_software().then(|| {
            let over = self.netdev.as_deref().map(|n| format!(" over {n}")).unwrap_or_default();
            format!(
                "{} is a software RDMA device{over}: it has no PCI function and copies with the CPU, so it cannot \
                 DMA to peer memory",
                self.name
            )
        })
    }
}

impl Sysfs {
    /// Every RDMA device, by name; none when the class directory is absent (no RDMA stack).
    pub fn rdma_devices(&self) -> Result<Vec<RdmaDevice>, Error> {
        let dir = self.root().join("sys/class/infiniband");
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(|source| Error::Io { path: dir.clone(), source })?;
            let name = e.file_name().to_string_lossy().into_owned();
            let path = dir.join(&name);
            let netdev = std::fs::read_to_string(path.join("parent")).ok().map(|s| s.trim().to_owned());
            // rxe names its netdev in `parent` and has no device link; a PCI NIC links its function.
            let pci = if netdev.is_some() { None } else { pci_of(&path.join("device")) };
            out.push(RdmaDevice { name, pci, netdev });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

fn pci_of(link: &Path) -> Option<PciAddr> {
    std::fs::canonicalize(link).ok()?.file_name()?.to_str()?.parse().ok()
}
