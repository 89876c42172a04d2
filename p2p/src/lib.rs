//! The peer-to-peer layer: PCI functions ([`pci`]) and RDMA devices ([`rdma`]) from an
//! injectable sysfs root, p2p memory providers ([`provider`]: NVMe CMB, BARs, p2pmem) mapped
//! through sysfs, VFIO or uio ([`mem`], [`vfio`], [`uio`]), Linux's path rules with offset-corrected
//! addresses ([`path`]), chunk pools ([`pool`]) and the target-wide state and report
//! ([`plan`]). Unsafe code lives in `mem`, `vfio` and `uio`, and in the one function of
//! `provider` that maps a BAR through sysfs.
#![deny(unsafe_code)]

pub mod addr;
pub mod block;
pub mod error;
#[doc(hidden)]
pub mod fixture;
pub mod mem;
pub mod path;
pub mod pci;
pub mod plan;
pub mod pool;
pub mod provider;
pub mod rdma;
pub mod uio;
pub mod vfio;

pub use error::Error;
