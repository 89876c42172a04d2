//! A user-space NVMe driver over VFIO: the target owns the SSD and puts in every PRP the address
//! the SSD must use for the buffer the p2p layer chose.

pub mod ctrl;
mod dma;
pub mod error;
pub mod ns;
pub mod pair;
pub mod prp;
#[allow(unsafe_code)]
pub mod queue;
pub mod spec;

pub use error::Error;
