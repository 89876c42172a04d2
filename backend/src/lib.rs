//! Namespace backends: [`ram::RamBackend`] (sparse, allocated as written) and
//! [`file::FileBackend`] (regular files and block devices, through io_uring with O_DIRECT where
//! the kernel allows, positional reads and writes otherwise). Unsafe code is confined to `uring`
//! and `irq`, and to NVMe submission: an entry's addresses are the SSD's to DMA to until its
//! completion, a promise (`QueuePair::submit`) its callers keep.
#![deny(unsafe_code)]

pub mod file;
#[allow(unsafe_code)]
mod irq;
mod moved;
pub mod nvme;
pub mod ram;
#[allow(unsafe_code)]
mod uring;

pub use file::FileBackend;
pub use ram::RamBackend;
