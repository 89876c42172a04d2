//! The peer-to-peer layer (issue 5, not implemented yet): PCIe topology from sysfs, p2p memory
//! providers (NVMe CMB, BARs), offset-corrected bus addresses, compatibility decisions, buffer
//! pools and the fallback to host memory. Today every buffer is host memory.
