//! NVMe-oF over RDMA (NVMe-oF 1.1, 7.3), on RDMA CM and verbs loaded at run time.
//!
//! One CM listener per address ([`cm`]); each connect request becomes one queue pair ([`qp`])
//! with its own completion channel (polled through tokio), protection domain, control memory
//! (receive and response capsules) and data area. Commands run concurrently through the
//! request state machine ([`request`]): host writes are fetched with RDMA READ (up to the
//! negotiated depth at once), executed while others transfer, and host reads go out as RDMA
//! WRITE chained with the SEND of the response (SEND_WITH_INV when the host asks).
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod cm;
#[allow(unsafe_code)]
mod qp;
pub mod request;
#[allow(unsafe_code)]
mod srq;
#[allow(unsafe_code)]
pub mod sys;
pub mod wire;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use p2pnvmf_nvmf::buffers::Mover;
use p2pnvmf_nvmf::queue::{self, CtrlWatch};
use p2pnvmf_nvmf::{Port, Queue, Target, TrType, TransportParams};
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, warn};
use zerocopy::IntoBytes;

use crate::poll::{self, Pollers};
use crate::{Listening, Service, Serving, Transport};
pub use cm::Listener;
use cm::{Event, next_event};
use qp::{Qp, QpSize};
use request::{Limits, Requests};
use sys::{Api, cm_event};
use wire::RejectStatus;

/// Per-listener NVMe/RDMA settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaParams {
    /// In-capsule data accepted on I/O queues (IOCCSZ = 4 + this / 16).
    pub max_icd: u32,
    /// Largest transfer of one command.
    pub max_xfer: u32,
    /// Receive capsules through one shared receive queue per device, of this many entries.
    pub srq: Option<usize>,
    /// Queues the listener holds at once; connect requests beyond are rejected.
    pub max_connections: usize,
}

impl Default for RdmaParams {
    fn default() -> Self {
        RdmaParams { max_icd: 8192, max_xfer: 1 << 20, srq: None, max_connections: 1024 }
    }
}

/// NVMe/RDMA with these settings.
impl Transport for RdmaParams {
    fn trtype(&self) -> TrType {
        TrType::Rdma
    }

    fn params(&self) -> TransportParams {
        TransportParams { ioccsz: (64 + self.max_icd) / 16, max_xfer: self.max_xfer, msdbd: 1, keyed_sgls: true }
    }

    /// Fails naming the library when rdma-core is missing.
    fn bind(&self, addr: SocketAddr) -> io::Result<Box<dyn Listening>> {
        available().map_err(io::Error::other)?;
        Ok(Box::new(Bound { listener: Listener::bind(addr)?, params: *self }))
    }
}

/// An NVMe/RDMA listener bound, not yet serving.
struct Bound {
    listener: Listener,
    params: RdmaParams,
}

impl Listening for Bound {
    fn serve(self: Box<Self>, service: Service) -> Serving {
        Box::pin(serve(self.listener, self.params, service))
    }
}

/// Whether libibverbs and librdmacm can be loaded; the error names the one missing.
pub fn available() -> Result<(), String> {
    sys::api().map(drop)
}

/// `addr` as the sockaddr_in librdmacm takes (IPv4 only for now).
pub fn sockaddr(addr: SocketAddr) -> io::Result<libc::sockaddr_in> {
    match addr {
        SocketAddr::V4(a) => Ok(libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
            sin_zero: [0; 8],
        }),
        SocketAddr::V6(_) => {
            Err(io::Error::new(io::ErrorKind::Unsupported, "IPv6 RDMA listeners are not supported yet"))
        }
    }
}

/// What the CM loop tells a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmNote {
    Established,
    Disconnected(&'static str),
}

/// Accepts RDMA connections until shutdown, then waits for every queue to close. With the
/// service's pollers, each queue runs on one and polls its completion queue there.
async fn serve(listener: Listener, params: RdmaParams, service: Service) -> io::Result<()> {
    let Service { target, port, shutdown, pollers } = service;
    // The channel fd stays open until `listener` drops, after `afd` (dropped first below).
    #[allow(unsafe_code)]
    // SAFETY: as above.
    let afd = unsafe { cm::watch(listener.fd())? };
    let mut conns: HashMap<usize, mpsc::UnboundedSender<CmNote>> = HashMap::new();
    let mut tasks = JoinSet::new();
    // Dropped before the listener, after every queue (each holds a reference) has closed.
    let mut srqs: HashMap<usize, Arc<srq::SharedRecv>> = HashMap::new();
    let mut stop = shutdown.clone();
    'events: loop {
        tokio::select! {
            guard = afd.readable() => {
                let mut guard = guard?;
                while let Some(ev) = next_event(&listener) {
                    if ev.id == listener.id && ev.kind == cm_event::DEVICE_REMOVAL {
                        // The kernel waits for every id on the device to be destroyed, ours too.
                        error!(port = port.id, "RDMA device removed under the listener: it stops; rdma-core keeps the device open until the target exits, so restart it once the device is back");
                        break 'events;
                    }
                    let on = Serve { target: &target, port: &port, params: &params, shutdown: &shutdown, pollers: pollers.as_deref() };
                    handle_event(&listener, ev, &on, &mut conns, &mut tasks, &mut srqs);
                }
                guard.clear_ready();
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    info!(port = port.id, queues = tasks.len(), "RDMA listener stopping");
    // Queues see the shutdown too and disconnect; their CM events are no longer needed.
    while tasks.join_next().await.is_some() {}
    drop(afd);
    drop(listener);
    Ok(())
}

/// What a listener serves its queues with.
struct Serve<'a> {
    target: &'a Arc<Target>,
    port: &'a Port,
    params: &'a RdmaParams,
    shutdown: &'a watch::Receiver<bool>,
    pollers: Option<&'a Pollers>,
}

fn handle_event(
    l: &Listener,
    ev: Event,
    on: &Serve,
    conns: &mut HashMap<usize, mpsc::UnboundedSender<CmNote>>,
    tasks: &mut JoinSet<()>,
    srqs: &mut HashMap<usize, Arc<srq::SharedRecv>>,
) {
    let key = ev.id as usize;
    let note = |conns: &mut HashMap<usize, mpsc::UnboundedSender<CmNote>>, n: CmNote| {
        if let Some(tx) = conns.get(&key) {
            let _ = tx.send(n);
        }
        if matches!(n, CmNote::Disconnected(_)) {
            conns.remove(&key);
        }
    };
    match ev.kind {
        cm_event::CONNECT_REQUEST
            if {
                while tasks.try_join_next().is_some() {}
                tasks.len() >= on.params.max_connections
            } =>
        {
            warn!(
                port = on.port.id,
                limit = on.params.max_connections,
                "RDMA connect request rejected (no resources): the listener holds limits.connections_per_listener queues"
            );
            qp::reject(l.api, ev.id, RejectStatus::NoResources.private_data().as_bytes());
        }
        cm_event::CONNECT_REQUEST => match accept(l.api, &ev, on, srqs) {
            Ok(conn) => {
                let (tx, rx) = mpsc::unbounded_channel();
                conns.insert(key, tx);
                let span = queue::span(TrType::Rdma, &ev.peer.map_or_else(|| conn.peer.clone(), |p| p.to_string()));
                poll::place(on.pollers, tasks, conn.run(rx, on.shutdown.clone()).instrument(span));
            }
            Err((status, why)) => {
                warn!(port = on.port.id, ?status, "RDMA connect request rejected: {why}");
                qp::reject(l.api, ev.id, status.private_data().as_bytes());
            }
        },
        cm_event::ESTABLISHED => note(conns, CmNote::Established),
        cm_event::DISCONNECTED => note(conns, CmNote::Disconnected("host disconnected")),
        cm_event::CONNECT_ERROR => note(conns, CmNote::Disconnected("connect error")),
        cm_event::DEVICE_REMOVAL => note(conns, CmNote::Disconnected("RDMA device removed")),
        cm_event::TIMEWAIT_EXIT => debug!("RDMA CM timewait exit"),
        other => debug!(event = other, status = ev.status, "RDMA CM event ignored"),
    }
}

/// Completions the poller found; never, without a watch (interrupt mode).
async fn found(watch: Option<&poll::Watch>) {
    match watch {
        Some(w) => w.found().await,
        None => std::future::pending().await,
    }
}

/// Readiness of a completion channel; never, without one.
async fn readable(afd: Option<&AsyncFd<cm::Fd>>) -> io::Result<AsyncFdReadyGuard<'_, cm::Fd>> {
    match afd {
        Some(a) => a.readable().await,
        None => std::future::pending().await,
    }
}

/// Bytes of a small data buffer: 4 KiB I/O and in-capsule data up to the default 8 KiB, twice.
const SMALL_BUFFER: usize = 16 << 10;
const LARGE_BUFFER: usize = 128 << 10;

/// Outstanding Async Event Requests may need response capsules of their own.
const EVENT_RSPS: usize = p2pnvmf_nvmf::ctrl::AERL as usize + 1;

/// One connected queue: its verbs resources and its requests.
struct Conn {
    /// Declared first: the requests (and the core queue with its in-flight I/O) go before the
    /// queue pair whose memory their windows point into is deregistered.
    reqs: Requests,
    qp: Qp,
    peer: String,
    /// Poll mode: the poller looks at the completion queue on every turn (never armed) and
    /// wakes the queue's task when it finds completions.
    polled: bool,
    events: Vec<request::Event>,
}

type Refusal = (RejectStatus, String);

/// Validates a connect request, builds the queue pair and accepts it.
fn accept(
    api: &'static Api,
    ev: &Event,
    on: &Serve,
    srqs: &mut HashMap<usize, Arc<srq::SharedRecv>>,
) -> Result<Conn, Refusal> {
    let (target, port, params) = (on.target, on.port, on.params);
    let polled = on.pollers.is_some();
    let req = wire::parse_request(&ev.private, &target.limits)
        .map_err(|s| (s, format!("private data {:02x?}", ev.private)))?;
    let no_res = |e: io::Error| (RejectStatus::NoResources, e.to_string());
    let (max_qp_wr, max_init_rd, max_rd) = qp::device_limits(api, ev.id).map_err(no_res)?;
    let (ord, ird) =
        wire::negotiate_rd(ev.initiator_depth, ev.responder_resources, max_init_rd, max_rd).map_err(|s| {
            (
                s,
                format!(
                    "host offers initiator depth {} and responder resources {}",
                    ev.initiator_depth, ev.responder_resources
                ),
            )
        })?;
    let depth = usize::from(req.depth);
    let capsule = 64 + params.max_icd as usize;
    let shared = match params.srq {
        Some(n) => {
            let verbs = qp::device_of(ev.id);
            Some(match srqs.get(&(verbs as usize)) {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(srq::SharedRecv::new(api, verbs, n, capsule).map_err(no_res)?);
                    info!(entries = s.count(), capsule, "shared receive queue created");
                    srqs.insert(verbs as usize, s.clone());
                    s
                }
            })
        }
        None => None,
    };
    // A context per command the host may have outstanding, as many again for those whose
    // SEND has not completed yet, and some for async events. Each holds at most two send
    // entries (RDMA WRITE + SEND), bounded by the device.
    let requests = 2 * depth + EVENT_RSPS;
    let send_wrs = (2 * requests).min(max_qp_wr.max(2) as usize);
    // Data buffers: a small one per command (4 KiB I/O, in-capsule data, admin pages), an
    // eighth as many of 128 KiB (what a host's large I/O mostly is) and a few of the largest
    // transfer (MDTS: nvme-cli's passthrough I/O, 1 MiB bios); a command takes the smallest
    // free one that fits and waits when none does. Pinned for the MR, so this is the queue's
    // memory cost (depth 128: 2 + 2 + 2 MiB).
    let max_xfer = params.max_xfer as usize;
    let small = SMALL_BUFFER.max(capsule - 64).min(max_xfer);
    let large = LARGE_BUFFER.clamp(small, max_xfer);
    let buffers = [(depth, small), ((depth / 8).max(4), large), ((depth / 64).max(2), max_xfer)];
    let size = QpSize { depth, capsule, requests, buffers, send_wrs };
    let (mut qp, buffers) = Qp::create(api, ev.id, size, shared, polled).map_err(no_res)?;
    let mut queue = Queue::new(target.clone(), port.clone());
    if let Some(peer) = ev.peer {
        queue.set_peer(peer.to_string());
    }
    queue.set_mover(Mover::Rdma { device: qp.device_name(), dmabuf: sys::dmabuf_support(api) });
    queue.set_data_area(qp.data_area());
    let lim = Limits { requests, reads: usize::from(ord), send_slots: send_wrs, max_xfer, max_waiting: depth };
    let reqs = Requests::new(queue, buffers, lim);
    let rep = wire::accept(req.depth);
    qp.accept(rep.as_bytes(), ird, ord).map_err(no_res)?;
    info!(qid = req.qid, depth, hrqsize = req.hrqsize, ord, ird, requests, send_wrs, polled, "RDMA queue accepted");
    Ok(Conn { reqs, qp, peer: format!("qid {} (cm id {:p})", req.qid, ev.id), polled, events: Vec::with_capacity(64) })
}

impl Conn {
    /// Polls the completion queue — after what the poller found in it, in poll mode — and feeds
    /// every completion to the requests.
    fn poll(&mut self, found: Option<&qp::CqLook>) -> io::Result<()> {
        self.events.clear();
        if let Some(f) = found {
            f.take(&mut self.events)?;
        }
        self.qp.poll(&mut self.events)?;
        if !self.events.is_empty() {
            poll::did_work();
        }
        for &ev in &self.events {
            self.reqs.on_event(&mut self.qp, ev)?;
        }
        Ok(())
    }

    async fn run(mut self, mut notes: mpsc::UnboundedReceiver<CmNote>, mut shutdown: watch::Receiver<bool>) {
        // Poll mode: no completion channel to wait on.
        let afd = match self.qp.channel_fd() {
            None => None,
            #[allow(unsafe_code)]
            // SAFETY: the completion channel fd stays open until `self.qp` drops, after `afd`.
            Some(fd) => match unsafe { cm::watch(fd) } {
                Ok(a) => Some(a),
                Err(e) => return warn!(peer = %self.peer, "registering the completion channel: {e}"),
            },
        };
        // Poll mode: the poller looks at the completion queue on every turn and wakes this task
        // when it finds completions.
        let look = match self.polled.then(|| self.qp.cq_look()).transpose() {
            Ok(l) => l,
            Err(e) => return warn!(peer = %self.peer, "polling the completion queue: {e}"),
        };
        let watch = match look.as_ref().map(|l| poll::Watch::new(l.clone())).transpose() {
            Ok(w) => w,
            Err(e) => return warn!(peer = %self.peer, "polling the completion queue: {e}"),
        };
        let mut ctrl = CtrlWatch::default();
        let why = loop {
            ctrl.follow(&self.reqs.queue);
            tokio::select! {
                () = found(watch.as_ref()) => {
                    if let Err(e) = self.poll(look.as_deref()) {
                        break format!("{e}");
                    }
                }
                guard = readable(afd.as_ref()), if !self.polled => {
                    match guard {
                        Ok(mut g) => {
                            g.clear_ready();
                            if let Err(e) = self.poll(None) {
                                break format!("{e}");
                            }
                        }
                        Err(e) => break format!("completion channel: {e}"),
                    }
                }
                // Reaped below, with what finished inline meanwhile.
                () = self.reqs.queue.io_ready() => {}
                n = notes.recv() => match n {
                    Some(CmNote::Established) => debug!(peer = %self.peer, "established"),
                    Some(CmNote::Disconnected(why)) => break why.to_string(),
                    None => break "listener gone".to_string(),
                },
                reason = ctrl.torn_down() => break format!("controller gone ({})", reason.unwrap_or("?")),
                _ = shutdown.wait_for(|s| *s) => break "target shutting down".to_string(),
            }
            // Commands the backends finished: woken for them, or inline while we handled the rest.
            match self.reqs.reap(&mut self.qp) {
                Ok(0) => {}
                Ok(_) => poll::did_work(),
                Err(e) => break format!("{e}"),
            }
            // The round's RDMA READs, WRITEs and SENDs go to the device together.
            if let Err(e) = self.qp.flush() {
                break format!("{e}");
            }
        };
        let who = self.reqs.queue.controller().map(|c| (c.cntlid, c.subnqn().to_string()));
        info!(peer = %self.peer, ?who, qid = self.reqs.queue.qid(), "RDMA queue closing: {why}");
        self.reqs.log_pending();
        // Receive buffers still held go back (to the device's SRQ, where other queues use them).
        let held: Vec<usize> = self.reqs.held_receives().collect();
        for idx in held {
            qp::return_receive(&mut self.qp, idx);
        }
        drop(watch);
        self.qp.disconnect();
        drop(afd);
    }
}
