//! Namespace backends: [`ram::RamBackend`] (sparse, allocated as written) and
//! [`file::FileBackend`] (regular files and block devices).
#![forbid(unsafe_code)]

pub mod file;
pub mod ram;

pub use file::FileBackend;
pub use ram::RamBackend;
