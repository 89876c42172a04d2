//! NVMe-oF transports: [`tcp`] (NVMe/TCP) and [`rdma`] (NVMe/RDMA over RDMA CM, with
//! libibverbs and librdmacm loaded at run time), each a [`Transport`] the target listens on.
//! Connections run on the runtime's worker threads, woken by the kernel, or in poll mode on
//! polling threads of their own ([`poll`]). Unsafe code is confined to `rdma::sys`, the verbs
//! owners (`rdma::cm`, `rdma::qp`, `rdma::srq`), the CPU's CRC32C instruction, and in `poll`
//! the CPU-affinity calls and the TSC read.
#![deny(unsafe_code)]

pub mod crc32c;
pub mod poll;
pub mod rdma;
pub mod tcp;
pub mod unbound_work;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use p2pnvmf_nvmf::{Port, Target, TrType, TransportParams};
use tokio::sync::watch;

/// What the target needs of a transport, NVMe/TCP and NVMe/RDMA alike: its type, what the core
/// advertises to hosts for it, and listeners. Everything a command means is the core's
/// ([`p2pnvmf_nvmf::Queue`]); a transport moves capsules and data.
pub trait Transport: Send + Sync + std::fmt::Debug {
    fn trtype(&self) -> TrType;
    /// IOCCSZ, the largest transfer and the SGL kinds, as the core reports them to hosts.
    fn params(&self) -> TransportParams;
    /// Binds `addr`; the error says why this transport cannot listen there (rdma-core missing,
    /// the address in use).
    fn bind(&self, addr: SocketAddr) -> io::Result<Box<dyn Listening>>;
}

/// A listener's work: accepting connections and serving their queues until shutdown.
pub type Serving = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// What a listener serves: `port` of `target` until `shutdown` turns true; in poll mode its
/// connections run on `pollers`, else on the runtime.
#[derive(Debug, Clone)]
pub struct Service {
    pub target: Arc<Target>,
    pub port: Port,
    pub shutdown: watch::Receiver<bool>,
    pub pollers: Option<Arc<poll::Pollers>>,
}

/// A bound listener.
pub trait Listening: Send {
    /// Serves `service` until its shutdown, then waits for every connection to finish.
    fn serve(self: Box<Self>, service: Service) -> Serving;
}
