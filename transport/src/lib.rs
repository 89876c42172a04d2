//! NVMe-oF transports: [`tcp`] (NVMe/TCP) and [`rdma`] (NVMe/RDMA over RDMA CM, with
//! libibverbs and librdmacm loaded at run time). Unsafe code is confined to `rdma::sys`, the
//! verbs owners (`rdma::cm`, `rdma::qp`, `rdma::srq`) and the CPU's CRC32C instruction.
#![deny(unsafe_code)]

pub mod crc32c;
pub mod rdma;
pub mod tcp;
