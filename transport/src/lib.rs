//! NVMe-oF transports: [`tcp`] (NVMe/TCP) and [`rdma`] (NVMe/RDMA over RDMA CM, with
//! libibverbs and librdmacm loaded at run time). Unsafe code is confined to `rdma::sys` and
//! the verbs owners in `rdma`.
#![deny(unsafe_code)]

pub mod crc32c;
#[allow(unsafe_code)]
pub mod rdma;
pub mod tcp;
