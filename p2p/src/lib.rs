//! The peer-to-peer layer (issue 5, in progress): PCIe topology from sysfs, p2p memory
//! providers (NVMe CMB, BARs), offset-corrected bus addresses, compatibility decisions, buffer
//! pools and the fallback to host memory. So far: [`pci`], reading PCI functions from an
//! injectable sysfs root. Every I/O buffer is still host memory.
#![deny(unsafe_code)]

pub mod mem;
pub mod path;
pub mod pci;
pub mod plan;
pub mod pool;
pub mod provider;
pub mod rdma;
pub mod vfio;
