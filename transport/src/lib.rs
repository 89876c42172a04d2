//! NVMe-oF transports. [`tcp`] serves NVMe/TCP; RDMA follows the same shape.
#![forbid(unsafe_code)]

pub mod crc32c;
pub mod tcp;
