//! NVMe-oF over RDMA (NVMe-oF 1.1, 7.3), on RDMA CM and verbs loaded at run time.
//!
//! One CM listener per address; each connect request becomes one queue pair with its own
//! completion channel (polled through tokio), protection domain and one registered memory
//! region holding the receive capsules, the data buffers and the response capsules.
//! Host writes are fetched with RDMA READ; host reads go out as RDMA WRITE chained with the
//! SEND of the response (SEND_WITH_INV when the host asks for invalidation).

mod srq;
#[allow(unsafe_code)]
pub mod sys;
pub mod wire;

use std::collections::HashMap;
use std::ffi::c_void;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::Arc;

use p2pnvmf_nvmf::buffers::Mover;
use p2pnvmf_nvmf::ctrl::{CtrlWatch, Watched};
use p2pnvmf_nvmf::wire::{Cqe, Sqe, sgl};
use p2pnvmf_nvmf::{Controller, Direction, Exec, Port, Queue, Response, Status, Target, TransportParams};
use p2pnvmf_p2p::mem::Mapping;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};
use zerocopy::{FromBytes, IntoBytes};

use sys::{Api, cm_event};
use wire::RejectStatus;

/// Per-listener NVMe/RDMA settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaParams {
    /// In-capsule data accepted on I/O queues (IOCCSZ = 4 + this / 16).
    pub max_icd: u32,
    /// Largest transfer of one command.
    pub max_xfer: u32,
    /// Poll completion queues (for dedicated cores) instead of sleeping on completion channels.
    pub busy_poll: bool,
    /// Receive capsules through one shared receive queue per device, of this many entries.
    pub srq: Option<usize>,
}

impl Default for RdmaParams {
    fn default() -> Self {
        RdmaParams { max_icd: 8192, max_xfer: 128 << 10, busy_poll: false, srq: None }
    }
}

impl RdmaParams {
    pub fn transport_params(&self) -> TransportParams {
        TransportParams { ioccsz: (64 + self.max_icd) / 16, max_xfer: self.max_xfer, msdbd: 1, keyed_sgls: true }
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

/// A raw fd to register with tokio (owned elsewhere).
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The listening CM id and its event channel.
pub struct Listener {
    api: &'static Api,
    channel: *mut sys::RdmaEventChannel,
    id: *mut sys::RdmaCmId,
}

// SAFETY: the handles are only used from the task that owns the Listener.
unsafe impl Send for Listener {}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("id", &self.id).finish()
    }
}

impl Listener {
    /// Binds and listens on `addr` (an address of an RDMA-capable interface).
    pub fn bind(addr: SocketAddr) -> io::Result<Listener> {
        let api = sys::api().map_err(io::Error::other)?;
        // SAFETY: plain constructor; NULL is checked.
        let channel = sys::check_ptr("rdma_create_event_channel", unsafe { (api.rdma_create_event_channel)() })?;
        let mut l = Listener { api, channel, id: ptr::null_mut() };
        // SAFETY: `channel` is valid; `l.id` receives the new id.
        sys::check("rdma_create_id", unsafe {
            (api.rdma_create_id)(channel, &mut l.id, ptr::null_mut(), sys::RDMA_PS_TCP)
        })?;
        let sin = sockaddr(addr)?;
        // SAFETY: `sin` is a valid sockaddr_in for the duration of the call.
        sys::check(&format!("rdma_bind_addr {addr}"), unsafe {
            (api.rdma_bind_addr)(l.id, (&sin as *const libc::sockaddr_in).cast())
        })?;
        // SAFETY: bound id.
        sys::check("rdma_listen", unsafe { (api.rdma_listen)(l.id, 128) })?;
        // SAFETY: `channel` stays valid while the Listener lives.
        sys::set_nonblocking(unsafe { (*channel).fd })?;
        Ok(l)
    }

    fn fd(&self) -> RawFd {
        // SAFETY: the channel lives as long as self.
        unsafe { (*self.channel).fd }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // SAFETY: every child id was destroyed by its connection before this runs.
        unsafe {
            if !self.id.is_null() {
                (self.api.rdma_destroy_id)(self.id);
            }
            (self.api.rdma_destroy_event_channel)(self.channel);
        }
    }
}

/// What the CM loop tells a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmNote {
    Established,
    Disconnected(&'static str),
}

/// Accepts RDMA connections until `shutdown`, then waits for every queue to close.
pub async fn serve(
    listener: Listener,
    target: Arc<Target>,
    port: Port,
    params: RdmaParams,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    // SAFETY: the channel fd stays open until `listener` drops, after `afd` (dropped first below).
    let afd = unsafe { AsyncFd::register(Fd(listener.fd())) }.map_err(|e| e.into_parts().1)?;
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
                    handle_event(&listener, ev, &target, &port, &params, &shutdown, &mut conns, &mut tasks, &mut srqs);
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

/// A CM event copied out of librdmacm (and acknowledged).
struct Event {
    kind: u32,
    status: i32,
    id: *mut sys::RdmaCmId,
    private: Vec<u8>,
    initiator_depth: u8,
    responder_resources: u8,
}

fn next_event(l: &Listener) -> Option<Event> {
    let mut ev: *mut sys::RdmaCmEvent = ptr::null_mut();
    // SAFETY: non-blocking channel; on success `ev` points to an event we must ack.
    if unsafe { (l.api.rdma_get_cm_event)(l.channel, &mut ev) } != 0 {
        return None;
    }
    // SAFETY: `ev` is valid until acked; private data is copied before the ack.
    let e = unsafe {
        let r = &*ev;
        let private = if r.conn.private_data.is_null() {
            Vec::new()
        } else {
            std::slice::from_raw_parts(r.conn.private_data.cast::<u8>(), usize::from(r.conn.private_data_len)).to_vec()
        };
        let e = Event {
            kind: r.event,
            status: r.status,
            id: r.id,
            private,
            initiator_depth: r.conn.initiator_depth,
            responder_resources: r.conn.responder_resources,
        };
        (l.api.rdma_ack_cm_event)(ev);
        e
    };
    Some(e)
}

#[allow(clippy::too_many_arguments)]
fn handle_event(
    l: &Listener,
    ev: Event,
    target: &Arc<Target>,
    port: &Port,
    params: &RdmaParams,
    shutdown: &watch::Receiver<bool>,
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
        cm_event::CONNECT_REQUEST => match accept(l.api, &ev, target, port, params, srqs) {
            Ok(conn) => {
                let (tx, rx) = mpsc::unbounded_channel();
                conns.insert(key, tx);
                tasks.spawn(conn.run(rx, shutdown.clone()));
            }
            Err((status, why)) => {
                warn!(port = port.id, ?status, "RDMA connect request rejected: {why}");
                let rej = status.private_data();
                // SAFETY: the id of a connect request we have not accepted; the event is acked.
                unsafe {
                    (l.api.rdma_reject)(ev.id, rej.as_bytes().as_ptr().cast(), rej.as_bytes().len() as u8);
                    (l.api.rdma_destroy_id)(ev.id);
                }
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

/// Work request id: kind in the high half, slot in the low half.
mod wr {
    pub const RECV: u64 = 0;
    pub const READ: u64 = 1 << 32;
    pub const SEND: u64 = 2 << 32;
    pub const KIND: u64 = 0xffff_ffff << 32;
}

/// Outstanding Async Event Requests may need response capsules of their own.
const EVENT_RSPS: usize = p2pnvmf_nvmf::ctrl::AERL as usize + 1;

#[derive(Debug, Clone, Copy)]
struct Keyed {
    addr: u64,
    len: usize,
    key: u32,
    invalidate: bool,
}

/// Where a queue's receive capsules live.
enum Recv {
    /// Its own: capsule `i` is at the start of `mem`, and slot `i` is command `i`.
    Own,
    /// A device's SRQ: a command slot holds the SRQ buffer its capsule arrived in.
    Shared { srq: Arc<srq::SharedRecv>, free: Vec<usize>, held: Vec<Option<usize>> },
}

/// One queue pair and everything registered for it. Dropping it tears it all down, in the
/// order verbs require.
struct Conn {
    api: &'static Api,
    id: *mut sys::RdmaCmId,
    /// Ours to free unless it is the shared receive queue's.
    pd: *mut sys::IbvPd,
    recv: Recv,
    /// Bytes of `mem` holding our own receive capsules (0 with a shared receive queue).
    recv_area: usize,
    channel: *mut sys::IbvCompChannel,
    cq: *mut sys::IbvCq,
    mr: *mut sys::IbvMr,
    qp_created: bool,
    /// Own receive capsules, then data buffers, then response capsules.
    mem: Mapping,
    depth: usize,
    capsule: usize,
    max_xfer: usize,
    /// For each slot, the command waiting for its RDMA READ.
    reading: Vec<Option<(Sqe, Keyed)>>,
    free_event_rsps: Vec<usize>,
    busy_poll: bool,
    queue: Queue,
    peer: String,
}

// SAFETY: the verbs objects are used only by the task that owns the Conn.
unsafe impl Send for Conn {}

impl Drop for Conn {
    fn drop(&mut self) {
        // SAFETY: each handle was created for this Conn and is destroyed once, QP first.
        unsafe {
            if self.qp_created {
                (self.api.rdma_destroy_qp)(self.id);
            }
            if !self.mr.is_null() {
                (self.api.ibv_dereg_mr)(self.mr);
            }
            if !self.cq.is_null() {
                (self.api.ibv_destroy_cq)(self.cq);
            }
            if !self.channel.is_null() {
                (self.api.ibv_destroy_comp_channel)(self.channel);
            }
            if !self.pd.is_null() && matches!(self.recv, Recv::Own) {
                (self.api.ibv_dealloc_pd)(self.pd);
            }
            (self.api.rdma_destroy_id)(self.id);
        }
        // Shared capsules this queue still held go back to the device's SRQ.
        if let Recv::Shared { srq, held, .. } = &mut self.recv {
            for idx in held.iter_mut().filter_map(Option::take) {
                if let Err(e) = srq.post(idx) {
                    warn!("returning SRQ buffer {idx}: {e}");
                }
            }
        }
    }
}

type Refusal = (RejectStatus, String);

/// Validates a connect request, builds the queue pair and accepts it.
fn accept(
    api: &'static Api,
    ev: &Event,
    target: &Arc<Target>,
    port: &Port,
    params: &RdmaParams,
    srqs: &mut HashMap<usize, Arc<srq::SharedRecv>>,
) -> Result<Conn, Refusal> {
    let req = wire::parse_request(&ev.private).map_err(|s| (s, format!("private data {:02x?}", ev.private)))?;
    let no_res = |e: io::Error| (RejectStatus::NoResources, e.to_string());
    // SAFETY: the id of a connect request carries its device context.
    let verbs = unsafe { (*ev.id).verbs };
    // SAFETY: zeroed is a valid ibv_device_attr to be filled in.
    let mut attr: sys::IbvDeviceAttr = unsafe { std::mem::zeroed() };
    // SAFETY: `verbs` is a live context; `attr` is writable.
    sys::check("ibv_query_device", unsafe { (api.ibv_query_device)(verbs, &mut attr) }).map_err(no_res)?;
    let (ord, ird) =
        wire::negotiate_rd(ev.initiator_depth, ev.responder_resources, attr.max_qp_init_rd_atom, attr.max_qp_rd_atom)
            .map_err(|s| {
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
    let max_xfer = params.max_xfer as usize;
    let shared = match params.srq {
        Some(n) => Some(match srqs.get(&(verbs as usize)) {
            Some(s) => s.clone(),
            None => {
                let s = Arc::new(srq::SharedRecv::new(api, verbs, n, capsule).map_err(no_res)?);
                info!(entries = s.count(), capsule, "shared receive queue created");
                srqs.insert(verbs as usize, s.clone());
                s
            }
        }),
        None => None,
    };
    let recv_area = if shared.is_some() { 0 } else { depth * capsule };
    let mem_len = recv_area + depth * max_xfer + (depth + EVENT_RSPS) * 16;
    let mut c = Conn {
        api,
        id: ev.id,
        pd: shared.as_ref().map_or(ptr::null_mut(), |s| s.pd),
        recv: match &shared {
            Some(s) => Recv::Shared { srq: s.clone(), free: (0..depth).rev().collect(), held: vec![None; depth] },
            None => Recv::Own,
        },
        recv_area,
        channel: ptr::null_mut(),
        cq: ptr::null_mut(),
        mr: ptr::null_mut(),
        qp_created: false,
        mem: Mapping::host(mem_len)
            .map_err(|e| (RejectStatus::NoResources, format!("{mem_len} bytes of queue memory: {e}")))?,
        depth,
        capsule,
        max_xfer,
        reading: vec![None; depth],
        free_event_rsps: (depth..depth + EVENT_RSPS).collect(),
        busy_poll: params.busy_poll,
        queue: {
            let mut q = Queue::new(target.clone(), port.clone());
            // SAFETY: a live context's device; the name is a NUL-terminated string it owns.
            let name = unsafe { std::ffi::CStr::from_ptr((api.ibv_get_device_name)((*verbs).device)) };
            q.set_mover(Mover::Rdma(name.to_string_lossy().into_owned()));
            q
        },
        peer: format!("qid {} (cm id {:p})", req.qid, ev.id),
    };
    let send_wrs = 2 * depth + EVENT_RSPS + 1;
    // SAFETY: each constructor gets live parents; NULL results are checked, and `c` frees
    // whatever was created if a later step fails.
    unsafe {
        if shared.is_none() {
            c.pd = sys::check_ptr("ibv_alloc_pd", (api.ibv_alloc_pd)(verbs)).map_err(no_res)?;
        }
        c.channel = sys::check_ptr("ibv_create_comp_channel", (api.ibv_create_comp_channel)(verbs)).map_err(no_res)?;
        sys::set_nonblocking((*c.channel).fd).map_err(no_res)?;
        let cqe = (depth + send_wrs) as i32;
        c.cq = sys::check_ptr("ibv_create_cq", (api.ibv_create_cq)(verbs, cqe, ptr::null_mut(), c.channel, 0))
            .map_err(no_res)?;
        let access = sys::IBV_ACCESS_LOCAL_WRITE | sys::IBV_ACCESS_REMOTE_READ | sys::IBV_ACCESS_REMOTE_WRITE;
        c.mr = sys::check_ptr("ibv_reg_mr", (api.ibv_reg_mr)(c.pd, c.mem.as_ptr().cast(), mem_len, access))
            .map_err(no_res)?;
        let mut init = sys::IbvQpInitAttr {
            qp_context: ptr::null_mut(),
            send_cq: c.cq,
            recv_cq: c.cq,
            srq: shared.as_ref().map_or(ptr::null_mut(), |s| s.srq),
            cap: sys::IbvQpCap {
                max_send_wr: send_wrs as u32,
                max_recv_wr: if shared.is_some() { 0 } else { depth as u32 },
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: sys::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        sys::check("rdma_create_qp", (api.rdma_create_qp)(c.id, c.pd, &mut init)).map_err(no_res)?;
        c.qp_created = true;
        sys::check("ibv_req_notify_cq", c.ctx_ops().req_notify_cq.map_or(-1, |f| f(c.cq, 0))).map_err(no_res)?;
    }
    if shared.is_none() {
        for slot in 0..depth {
            c.post_recv(slot).map_err(no_res)?;
        }
    }
    let rep = wire::accept(req.depth);
    let mut param = sys::RdmaConnParam {
        private_data: rep.as_bytes().as_ptr().cast(),
        private_data_len: rep.as_bytes().len() as u8,
        responder_resources: ird,
        initiator_depth: ord,
        flow_control: 1,
        retry_count: 7,
        rnr_retry_count: 7,
        srq: 0,
        qp_num: 0,
    };
    // SAFETY: the QP exists and `param`/`rep` outlive the call.
    sys::check("rdma_accept", unsafe { (api.rdma_accept)(c.id, &mut param) }).map_err(no_res)?;
    info!(qid = req.qid, depth, hrqsize = req.hrqsize, ord, ird, busy_poll = params.busy_poll, "RDMA queue accepted");
    Ok(c)
}

impl Conn {
    fn ctx_ops(&self) -> &sys::IbvContext {
        // SAFETY: the id's device context outlives the connection.
        unsafe { &*(*self.id).verbs }
    }

    fn qp(&self) -> *mut sys::IbvQp {
        // SAFETY: set by rdma_create_qp before any post.
        unsafe { (*self.id).qp }
    }

    fn lkey(&self) -> u32 {
        // SAFETY: registered in accept().
        unsafe { (*self.mr).lkey }
    }

    fn recv_off(&self, slot: usize) -> usize {
        slot * self.capsule
    }

    fn data_off(&self, slot: usize) -> usize {
        self.recv_area + slot * self.max_xfer
    }

    fn rsp_off(&self, rsp: usize) -> usize {
        self.recv_area + self.depth * self.max_xfer + rsp * 16
    }

    /// The capsule of the command in `slot` (its own receive buffer, or the SRQ buffer it
    /// holds).
    fn capsule_mut(&mut self, slot: usize) -> &mut [u8] {
        match &self.recv {
            Recv::Own => {
                let off = self.recv_off(slot);
                self.mem.slice_mut(off, self.capsule)
            }
            Recv::Shared { srq, held, .. } => {
                let idx = held[slot].expect("slot holds an SRQ buffer");
                // SAFETY: this queue took `idx` from a receive completion and has not posted
                // it back; no one else uses it until release().
                unsafe { srq.capsule_mut(idx) }
            }
        }
    }

    /// Gives a finished command's receive buffer back (to our QP or to the SRQ).
    fn release(&mut self, slot: usize) -> io::Result<()> {
        if let Recv::Shared { srq, free, held } = &mut self.recv {
            let idx = held[slot].take().expect("slot holds an SRQ buffer");
            free.push(slot);
            return srq.post(idx);
        }
        self.post_recv(slot)
    }

    fn sge(&self, off: usize, len: usize) -> sys::IbvSge {
        sys::IbvSge { addr: self.mem.as_ptr() as u64 + off as u64, length: len as u32, lkey: self.lkey() }
    }

    fn post_recv(&mut self, slot: usize) -> io::Result<()> {
        let mut sge = self.sge(self.recv_off(slot), self.capsule);
        let mut wr =
            sys::IbvRecvWr { wr_id: wr::RECV | slot as u64, next: ptr::null_mut(), sg_list: &mut sge, num_sge: 1 };
        let mut bad = ptr::null_mut();
        let f = self.ctx_ops().post_recv.ok_or_else(|| io::Error::other("provider has no post_recv"))?;
        // SAFETY: the SGE points into our registered memory; the WR is copied by the provider.
        sys::check("ibv_post_recv", unsafe { f(self.qp(), &mut wr, &mut bad) })
    }

    fn send_wr(wr_id: u64, opcode: u32, sge: &mut sys::IbvSge, signaled: bool) -> sys::IbvSendWr {
        sys::IbvSendWr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: sge,
            num_sge: 1,
            opcode,
            send_flags: if signaled { sys::IBV_SEND_SIGNALED } else { 0 },
            invalidate_rkey: 0,
            rdma_remote_addr: 0,
            rdma_rkey: 0,
            rest: [0; 76],
        }
    }

    fn post_send(&self, wr: &mut sys::IbvSendWr) -> io::Result<()> {
        let mut bad = ptr::null_mut();
        let f = self.ctx_ops().post_send.ok_or_else(|| io::Error::other("provider has no post_send"))?;
        // SAFETY: every SGE in the chain points into registered memory and lives on the
        // caller's stack until this returns; providers copy WRs at post time.
        sys::check("ibv_post_send", unsafe { f(self.qp(), wr, &mut bad) })
    }

    fn post_read(&self, slot: usize, k: &Keyed) -> io::Result<()> {
        let mut sge = self.sge(self.data_off(slot), k.len);
        let mut w = Self::send_wr(wr::READ | slot as u64, sys::wr_opcode::RDMA_READ, &mut sge, true);
        w.rdma_remote_addr = k.addr;
        w.rdma_rkey = k.key;
        self.post_send(&mut w)
    }

    /// Sends the response capsule in `rsp`, after an RDMA WRITE of `write` bytes of the slot's
    /// data when the host reads.
    fn respond(&mut self, rsp: usize, slot: usize, cid: u16, r: &Response, keyed: Option<Keyed>) -> io::Result<()> {
        let cqe: Cqe = self.queue.cqe(cid, r);
        let off = self.rsp_off(rsp);
        self.mem.slice_mut(off, 16).copy_from_slice(cqe.as_bytes());
        let mut rsp_sge = self.sge(off, 16);
        let mut send = Self::send_wr(wr::SEND | rsp as u64, sys::wr_opcode::SEND, &mut rsp_sge, true);
        if let Some(k) = keyed.filter(|k| k.invalidate) {
            send.opcode = sys::wr_opcode::SEND_WITH_INV;
            send.invalidate_rkey = k.key;
        }
        let write_len = r.data_len as usize;
        match keyed.filter(|_| write_len > 0 && r.status.is_success()) {
            Some(k) => {
                let mut data_sge = self.sge(self.data_off(slot), write_len.min(k.len));
                let mut write = Self::send_wr(0, sys::wr_opcode::RDMA_WRITE, &mut data_sge, false);
                write.rdma_remote_addr = k.addr;
                write.rdma_rkey = k.key;
                write.next = &mut send;
                self.post_send(&mut write)
            }
            None => self.post_send(&mut send),
        }
    }

    /// A received capsule: checks, then executes now or after fetching data.
    fn on_recv(&mut self, idx: usize, byte_len: usize) -> io::Result<()> {
        let slot = match &mut self.recv {
            Recv::Own => idx,
            Recv::Shared { srq, free, held } => match free.pop() {
                Some(slot) => {
                    held[slot] = Some(idx);
                    slot
                }
                None => {
                    srq.post(idx)?;
                    return Err(io::Error::other("host sent more commands than its queue holds"));
                }
            },
        };
        if byte_len < 64 {
            // A capsule shorter than an SQE has no CID to answer: a fatal controller error
            // (as nvmet-rdma does).
            if let Some(c) = self.queue.controller() {
                c.kill("capsule shorter than 64 bytes");
            }
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("capsule of {byte_len} bytes (< 64)")));
        }
        let sqe = Sqe::read_from_bytes(&self.capsule_mut(slot)[..64]).expect("64 bytes");
        let cid = sqe.cid.get();
        let plan = self.queue.admit(&sqe).and_then(|()| self.plan(&sqe, byte_len - 64));
        match plan {
            Err(status) => self.respond(slot, slot, cid, &Response::status(status), None),
            Ok(Plan::Keyed(k)) if Direction::of(&sqe) == Direction::HostToController && k.len > 0 => {
                self.reading[slot] = Some((sqe, k));
                self.post_read(slot, &k)
            }
            Ok(Plan::Keyed(k)) => self.execute(slot, &sqe, DataAt::Slot(k.len), Some(k)),
            Ok(Plan::InCapsule(o, len)) => self.execute(slot, &sqe, DataAt::Capsule(o, len), None),
            Ok(Plan::None) => self.execute(slot, &sqe, DataAt::Slot(0), None),
        }
    }

    fn plan(&self, sqe: &Sqe, icd_len: usize) -> Result<Plan, Status> {
        let dir = Direction::of(sqe);
        if dir == Direction::None {
            return Ok(Plan::None);
        }
        if dir == Direction::Bidirectional {
            return Err(Status::INVALID_FIELD.dnr());
        }
        let d = sqe.dptr;
        match d.id {
            sgl::KEYED_DATA_BLOCK | sgl::KEYED_DATA_BLOCK_INVALIDATE => {
                // Keyed data block: 3-byte length, then a 4-byte key (NVMe Base 2.0, Fig. 118).
                let raw = d.length.get();
                let len = (raw & 0x00ff_ffff) as usize;
                let key =
                    raw >> 24 | u32::from(d.rsvd[0]) << 8 | u32::from(d.rsvd[1]) << 16 | u32::from(d.rsvd[2]) << 24;
                if len > self.max_xfer {
                    return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
                }
                Ok(Plan::Keyed(Keyed {
                    addr: d.addr.get(),
                    len,
                    key,
                    invalidate: d.id == sgl::KEYED_DATA_BLOCK_INVALIDATE,
                }))
            }
            sgl::DATA_BLOCK_OFFSET if dir == Direction::HostToController => {
                let (o, len) = (d.addr.get(), d.length.get() as usize);
                match o.checked_add(len as u64) {
                    Some(end) if end <= icd_len as u64 => Ok(Plan::InCapsule(o as usize, len)),
                    _ if o > icd_len as u64 => Err(Status::SGL_OFFSET_INVALID.dnr()),
                    _ => Err(Status::DATA_SGL_LENGTH_INVALID.dnr()),
                }
            }
            _ => Err(Status::SGL_TYPE_INVALID.dnr()),
        }
    }

    fn execute(&mut self, slot: usize, sqe: &Sqe, at: DataAt, keyed: Option<Keyed>) -> io::Result<()> {
        let (data_off, recv_off) = (self.data_off(slot), self.recv_off(slot));
        let buf: &mut [u8] = match at {
            DataAt::Slot(len) => self.mem.slice_mut(data_off, len),
            DataAt::Capsule(o, len) => match &self.recv {
                Recv::Own => self.mem.slice_mut(recv_off + 64 + o, len),
                Recv::Shared { srq, held, .. } => {
                    let idx = held[slot].expect("slot holds an SRQ buffer");
                    // SAFETY: as in capsule_mut(): the buffer is this queue's until release().
                    let capsule = unsafe { srq.capsule_mut(idx) };
                    &mut capsule[64 + o..64 + o + len]
                }
            },
        };
        let exec = self.queue.execute(sqe, buf);
        match exec {
            Exec::Done(r) => {
                let r = match at {
                    // In-capsule data only ever flows to the controller.
                    DataAt::Capsule(..) => Response { data_len: 0, ..r },
                    DataAt::Slot(_) => r,
                };
                self.respond(slot, slot, sqe.cid.get(), &r, keyed)
            }
            // Held by the controller: the receive buffer is free again.
            Exec::Deferred => self.release(slot),
        }
    }

    fn on_send_done(&mut self, rsp: usize) -> io::Result<()> {
        if rsp < self.depth {
            self.release(rsp)
        } else {
            self.free_event_rsps.push(rsp);
            Ok(())
        }
    }

    fn on_read_done(&mut self, slot: usize) -> io::Result<()> {
        let (sqe, k) =
            self.reading[slot].take().ok_or_else(|| io::Error::other("RDMA READ completion for an idle slot"))?;
        self.execute(slot, &sqe, DataAt::Slot(k.len), Some(k))
    }

    /// Completes held Async Event Requests with the controller's events.
    fn send_events(&mut self, ctrl: &Controller) -> io::Result<()> {
        for (cid, dw0) in ctrl.take_async_completions() {
            let rsp =
                self.free_event_rsps.pop().ok_or_else(|| io::Error::other("no response buffer for an async event"))?;
            info!(cntlid = ctrl.cntlid, cid, dw0 = format_args!("{dw0:#x}"), "async event completed");
            self.respond(rsp, 0, cid, &Response::result(dw0.into()), None)?;
        }
        Ok(())
    }

    /// Drains the completion queue; in channel mode, takes the channel's events and re-arms
    /// the CQ first so no completion is missed.
    fn poll(&mut self) -> io::Result<()> {
        let ops = self.ctx_ops();
        let (poll_cq, notify) = match (ops.poll_cq, ops.req_notify_cq) {
            (Some(p), Some(n)) => (p, n),
            _ => return Err(io::Error::other("provider lacks poll_cq/req_notify_cq")),
        };
        if !self.busy_poll {
            let mut cq: *mut sys::IbvCq = ptr::null_mut();
            let mut ctx: *mut c_void = ptr::null_mut();
            // SAFETY: non-blocking channel; one event acked per event taken; our CQ re-armed.
            unsafe {
                while (self.api.ibv_get_cq_event)(self.channel, &mut cq, &mut ctx) == 0 {
                    (self.api.ibv_ack_cq_events)(cq, 1);
                }
                sys::check("ibv_req_notify_cq", notify(self.cq, 0))?;
            }
        }
        let mut wcs = [sys::IbvWc::default(); 32];
        loop {
            // SAFETY: `wcs` has room for 32 entries.
            let n = unsafe { poll_cq(self.cq, wcs.len() as i32, wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(io::Error::other("ibv_poll_cq failed"));
            }
            for wc in &wcs[..n as usize] {
                if wc.status != sys::IBV_WC_SUCCESS {
                    if wc.status == sys::IBV_WC_WR_FLUSH_ERR {
                        continue;
                    }
                    return Err(io::Error::other(format!(
                        "work completion status {} (wr {:#x}, vendor {})",
                        wc.status, wc.wr_id, wc.vendor_err
                    )));
                }
                let slot = (wc.wr_id & !wr::KIND) as usize;
                match wc.wr_id & wr::KIND {
                    wr::RECV => self.on_recv(slot, wc.byte_len as usize)?,
                    wr::READ => self.on_read_done(slot)?,
                    _ => self.on_send_done(slot)?,
                }
            }
            if (n as usize) < wcs.len() {
                return Ok(());
            }
        }
    }

    async fn run(mut self, mut notes: mpsc::UnboundedReceiver<CmNote>, mut shutdown: watch::Receiver<bool>) {
        // SAFETY: the completion channel fd stays open until `self` drops, after `afd`.
        let afd = match unsafe { AsyncFd::register(Fd((*self.channel).fd)) } {
            Ok(a) => a,
            Err(e) => {
                return warn!(peer = %self.peer, "registering the completion channel: {}", e.into_parts().1);
            }
        };
        let mut ctrl = CtrlWatch::default();
        let why = loop {
            ctrl.follow(&self.queue);
            tokio::select! {
                // Busy-poll mode: poll between every other readiness check.
                () = tokio::task::yield_now(), if self.busy_poll => {
                    if let Err(e) = self.poll() {
                        break format!("{e}");
                    }
                }
                guard = afd.readable(), if !self.busy_poll => {
                    match guard {
                        Ok(mut g) => {
                            g.clear_ready();
                            if let Err(e) = self.poll() {
                                break format!("{e}");
                            }
                        }
                        Err(e) => break format!("completion channel: {e}"),
                    }
                }
                n = notes.recv() => match n {
                    Some(CmNote::Established) => debug!(peer = %self.peer, "established"),
                    Some(CmNote::Disconnected(why)) => break why.to_string(),
                    None => break "listener gone".to_string(),
                },
                w = ctrl.changed() => match w {
                    Watched::TornDown(reason) => break format!("controller gone ({})", reason.unwrap_or("?")),
                    Watched::Events(c) => {
                        if let Err(e) = self.send_events(&c) {
                            break format!("{e}");
                        }
                    }
                },
                _ = shutdown.wait_for(|s| *s) => break "target shutting down".to_string(),
            }
        };
        let who = self.queue.controller().map(|c| (c.cntlid, c.subnqn().to_string()));
        info!(peer = %self.peer, ?who, qid = self.queue.qid(), "RDMA queue closing: {why}");
        // SAFETY: our connected id; disconnecting twice is harmless.
        unsafe { (self.api.rdma_disconnect)(self.id) };
        drop(afd);
    }
}

#[derive(Debug, Clone, Copy)]
enum Plan {
    None,
    Keyed(Keyed),
    InCapsule(usize, usize),
}

#[derive(Debug, Clone, Copy)]
enum DataAt {
    Slot(usize),
    Capsule(usize, usize),
}
