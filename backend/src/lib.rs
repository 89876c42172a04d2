//! Namespace backends: [`ram::RamBackend`] (sparse, allocated as written) and
//! [`file::FileBackend`] (regular files and block devices, through io_uring with O_DIRECT where
//! the kernel allows, positional reads and writes otherwise). Unsafe code is confined to `uring`.
#![deny(unsafe_code)]

pub mod file;
pub mod ram;
#[allow(unsafe_code)]
mod uring;

pub use file::FileBackend;
pub use ram::RamBackend;
