//! NVMe/TCP transport (NVMe/TCP Transport Specification 1.0).

pub mod conn;
pub mod pdu;

use std::io;
use std::net::SocketAddr;

use p2pnvmf_nvmf::queue;
use p2pnvmf_nvmf::{TrType, TransportParams};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, info, warn};

use crate::poll;
use crate::{Listening, Service, Serving, Transport};

/// Per-listener NVMe/TCP settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpParams {
    /// In-capsule data accepted on any queue (the Linux host sends up to 8 KiB on admin).
    pub max_icd: u32,
    /// Largest transfer of one command.
    pub max_xfer: u32,
    /// MAXH2CDATA announced in ICResp.
    pub maxh2cdata: u32,
    /// Connections the listener holds at once; more are closed at once.
    pub max_connections: usize,
    /// Bytes one connection asks for with R2Ts and has not received yet.
    pub r2t_data: usize,
}

impl Default for TcpParams {
    fn default() -> Self {
        TcpParams { max_icd: 8192, max_xfer: 1 << 20, maxh2cdata: 1 << 20, max_connections: 1024, r2t_data: 16 << 20 }
    }
}

/// NVMe/TCP with these settings.
impl Transport for TcpParams {
    fn trtype(&self) -> TrType {
        TrType::Tcp
    }

    /// IOCCSZ covers the SQE plus in-capsule data.
    fn params(&self) -> TransportParams {
        TransportParams { ioccsz: (64 + self.max_icd) / 16, max_xfer: self.max_xfer, msdbd: 1, keyed_sgls: false }
    }

    fn bind(&self, addr: SocketAddr) -> io::Result<Box<dyn Listening>> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(Box::new(Bound { listener, params: *self }))
    }
}

/// An NVMe/TCP listener bound, not yet serving.
#[derive(Debug)]
struct Bound {
    listener: std::net::TcpListener,
    params: TcpParams,
}

impl Listening for Bound {
    fn serve(self: Box<Self>, service: Service) -> Serving {
        Box::pin(async move {
            let listener = TcpListener::from_std(self.listener)?;
            serve(listener, self.params, service).await;
            Ok(())
        })
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Accepts connections on `listener` until shutdown, then waits for every connection task to
/// finish. A connection is served where the service's pollers place it.
async fn serve(listener: TcpListener, params: TcpParams, service: Service) {
    let Service { target, port, shutdown, pollers } = service;
    let mut conns = JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    while conns.try_join_next().is_some() {}
                    if conns.len() >= params.max_connections {
                        warn!(port = port.id, %peer, limit = params.max_connections,
                              "connection closed: the listener holds limits.connections_per_listener connections");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    // Registered again with the driver of the thread that serves it.
                    let stream = match stream.into_std() {
                        Ok(s) => s,
                        Err(e) => {
                            warn!(port = port.id, %peer, "connection closed: taking it from the listener's driver: {e}");
                            continue;
                        }
                    };
                    let (target, port, shutdown) = (target.clone(), port.clone(), shutdown.clone());
                    let run = async move {
                        match TcpStream::from_std(stream) {
                            Ok(s) => conn::run(s.into_split(), peer, target, port, params, shutdown).await,
                            Err(e) => warn!(port = port.id, "connection closed: registering its socket: {e}"),
                        }
                    };
                    poll::place(pollers.as_deref(), &mut conns, run.instrument(queue::span(TrType::Tcp, &peer)));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(port = port.id, "accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stopped(&mut stop) => break,
        }
    }
    info!(port = port.id, connections = conns.len(), "listener stopping");
    while conns.join_next().await.is_some() {}
}
