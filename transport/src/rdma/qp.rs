//! One NVMe/RDMA queue pair's verbs resources, and the [`Verbs`] the request state machine
//! drives: its protection domain, completion queue and channel, the QP, and two registered
//! regions — control memory (receive capsules, response capsules) and the data area (one
//! window per data buffer). Memory is registered for local access only: the target never
//! hands out an rkey, so no host can reach it by RDMA. Dropping a `Qp` tears it all down in
//! the order verbs require.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr;
use std::sync::Arc;

use p2pnvmf_nvmf::wire::Cqe;
use p2pnvmf_p2p::mem::{Mapping, MappingPin, Window};
use tracing::{debug, warn};
use zerocopy::IntoBytes;

use super::request::{Event, Keyed, Mr, Verbs};
use super::srq::SharedRecv;
use super::sys::{self, Api};

/// Work request id: kind in the high half, index in the low half.
mod wr {
    pub const RECV: u64 = 0;
    pub const READ: u64 = 1 << 32;
    pub const SEND: u64 = 2 << 32;
    pub const KIND: u64 = 0xffff_ffff << 32;
}

/// Where a queue's receive capsules live.
#[derive(Debug)]
enum Recv {
    /// Its own, at the start of the control region.
    Own,
    /// A device's SRQ.
    Shared(Arc<SharedRecv>),
}

/// Sizes of a queue pair.
#[derive(Debug, Clone, Copy)]
pub struct QpSize {
    /// Receive capsules (the host's queue depth).
    pub depth: usize,
    /// Bytes per capsule (SQE + in-capsule data).
    pub capsule: usize,
    /// Request contexts, each with a response capsule.
    pub requests: usize,
    /// Data buffers: (count, bytes) of each size class, smallest first; the last holds the
    /// largest transfer.
    pub buffers: [(usize, usize); 3],
    /// Send-queue entries.
    pub send_wrs: usize,
}

#[derive(Debug)]
pub struct Qp {
    api: &'static Api,
    id: *mut sys::RdmaCmId,
    /// Ours to free unless it is the shared receive queue's.
    pd: *mut sys::IbvPd,
    recv: Recv,
    channel: *mut sys::IbvCompChannel,
    cq: *mut sys::IbvCq,
    ctrl_mr: *mut sys::IbvMr,
    data_mr: *mut sys::IbvMr,
    /// dma-buf MRs of p2p pools: the CPU address their SGEs start at, length, MR.
    dmabuf_mrs: Vec<(usize, usize, *mut sys::IbvMr)>,
    qp_created: bool,
    /// The id is ours to destroy once accepted; before, the listener rejects and destroys it.
    owns_id: bool,
    /// Own receive capsules, then response capsules.
    ctrl: Mapping,
    /// The data area's range (its windows are lent out), for its lkey.
    data: MappingPin,
    size: QpSize,
    /// Poll mode: no completion channel; the CQ is polled, never armed.
    polled: bool,
    /// Poll mode: the CQ as the poller looks at it ([`Qp::cq_look`]), disarmed before the CQ
    /// is destroyed.
    look: Option<Arc<CqLook>>,
    /// Send-queue work requests of this round, each with its one SGE, posted as one chain by
    /// [`Qp::flush`]: one `ibv_post_send` per round — with rxe, one doorbell system call —
    /// instead of one per response. Room for the whole send queue, so it never grows.
    batch: Vec<(sys::IbvSendWr, sys::IbvSge)>,
}

// SAFETY: the verbs objects are used only by the task that owns the Qp.
unsafe impl Send for Qp {}

impl Drop for Qp {
    fn drop(&mut self) {
        // No look reaches the CQ once it is gone, whoever still holds the look.
        if let Some(l) = &self.look {
            l.disarm();
        }
        // SAFETY: each handle was created for this Qp and is destroyed once, QP first.
        unsafe {
            if self.qp_created {
                (self.api.rdma_destroy_qp)(self.id);
            }
            for mr in [self.ctrl_mr, self.data_mr].into_iter().chain(self.dmabuf_mrs.iter().map(|m| m.2)) {
                if !mr.is_null() {
                    (self.api.ibv_dereg_mr)(mr);
                }
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
            if self.owns_id {
                (self.api.rdma_destroy_id)(self.id);
            }
        }
    }
}

impl Qp {
    /// Creates everything for the connect request on `id` (not yet accepted). Returns the
    /// data buffers as windows, one list per size class. On error, what was created is freed
    /// (the id stays the listener's to reject).
    pub fn create(
        api: &'static Api,
        id: *mut sys::RdmaCmId,
        size: QpSize,
        shared: Option<Arc<SharedRecv>>,
        polled: bool,
    ) -> io::Result<(Qp, Vec<Vec<Window>>)> {
        let recv_area = if shared.is_some() { 0 } else { size.depth * size.capsule };
        let ctrl_len = recv_area + size.requests * 16;
        let data_len = size.buffers.iter().map(|(n, len)| n * len).sum();
        let ctrl = Mapping::host(ctrl_len)
            .map_err(|e| io::Error::new(e.kind(), format!("{ctrl_len} bytes of queue memory: {e}")))?;
        let data = Mapping::host(data_len)
            .map_err(|e| io::Error::new(e.kind(), format!("{data_len} bytes of data buffers: {e}")))?;
        let (data_ptr, data_len) = (data.as_ptr(), data.len());
        let windows = data.split(&size.buffers);
        let pin = windows
            .iter()
            .flatten()
            .next()
            .map(Window::pin_mapping)
            .ok_or_else(|| io::Error::other("no data buffers"))?;
        let mut qp = Qp {
            api,
            id,
            pd: shared.as_ref().map_or(ptr::null_mut(), |s| s.pd),
            recv: match shared {
                Some(s) => Recv::Shared(s),
                None => Recv::Own,
            },
            channel: ptr::null_mut(),
            cq: ptr::null_mut(),
            ctrl_mr: ptr::null_mut(),
            data_mr: ptr::null_mut(),
            dmabuf_mrs: Vec::new(),
            qp_created: false,
            owns_id: false,
            ctrl,
            data: pin,
            size,
            polled,
            look: None,
            batch: Vec::with_capacity(size.send_wrs),
        };
        // SAFETY: a connect request's id carries its device context.
        let verbs = unsafe { (*id).verbs };
        // SAFETY: each constructor gets live parents; NULL results are checked, and `qp` frees
        // whatever was created if a later step fails.
        unsafe {
            if matches!(qp.recv, Recv::Own) {
                qp.pd = sys::check_ptr("ibv_alloc_pd", (api.ibv_alloc_pd)(verbs))?;
            }
            if !polled {
                qp.channel = sys::check_ptr("ibv_create_comp_channel", (api.ibv_create_comp_channel)(verbs))?;
                sys::set_nonblocking((*qp.channel).fd)?;
            }
            // Room beyond the depth: with a shared receive queue a host may overrun its own.
            let cqe = (2 * size.depth + size.send_wrs) as i32;
            qp.cq = sys::check_ptr("ibv_create_cq", (api.ibv_create_cq)(verbs, cqe, ptr::null_mut(), qp.channel, 0))?;
            let local = sys::IBV_ACCESS_LOCAL_WRITE;
            qp.ctrl_mr =
                sys::check_ptr("ibv_reg_mr", (api.ibv_reg_mr)(qp.pd, qp.ctrl.as_ptr().cast(), qp.ctrl.len(), local))?;
            qp.data_mr = sys::check_ptr("ibv_reg_mr", (api.ibv_reg_mr)(qp.pd, data_ptr.cast(), data_len, local))?;
            // No host is given a key: what the NIC reads and writes is ours to post, so a host
            // that learns or guesses these keys still gets a remote access error (the VM suite
            // attacks them from this log).
            for (what, mr) in [("capsules", qp.ctrl_mr), ("data", qp.data_mr)] {
                let m = &*mr;
                debug!(
                    region = what,
                    addr = format_args!("{:#x}", m.addr as u64),
                    len = m.length,
                    lkey = format_args!("{:#x}", m.lkey),
                    rkey = format_args!("{:#x}", m.rkey),
                    "queue memory registered for local access only"
                );
            }
            let srq = match &qp.recv {
                Recv::Shared(s) => s.srq,
                Recv::Own => ptr::null_mut(),
            };
            let mut init = sys::IbvQpInitAttr {
                qp_context: ptr::null_mut(),
                send_cq: qp.cq,
                recv_cq: qp.cq,
                srq,
                cap: sys::IbvQpCap {
                    max_send_wr: size.send_wrs as u32,
                    max_recv_wr: if srq.is_null() { size.depth as u32 } else { 0 },
                    max_send_sge: 1,
                    max_recv_sge: 1,
                    max_inline_data: 0,
                },
                qp_type: sys::IBV_QPT_RC,
                sq_sig_all: 0,
            };
            sys::check("rdma_create_qp", (api.rdma_create_qp)(qp.id, qp.pd, &mut init))?;
            qp.qp_created = true;
            sys::check("ibv_req_notify_cq", qp.ops().req_notify_cq.map_or(-1, |f| f(qp.cq, 0)))?;
        }
        if matches!(qp.recv, Recv::Own) {
            for idx in 0..size.depth {
                qp.post_recv(idx)?;
            }
        }
        Ok((qp, windows))
    }

    /// The data area, for a backend to register once.
    pub fn data_area(&self) -> MappingPin {
        self.data.clone()
    }

    /// Accepts the connection with our private data and read depths; the id is ours from then.
    pub fn accept(&mut self, private: &[u8], ird: u8, ord: u8) -> io::Result<()> {
        let mut param = sys::RdmaConnParam {
            private_data: private.as_ptr().cast(),
            private_data_len: private.len() as u8,
            responder_resources: ird,
            initiator_depth: ord,
            flow_control: 1,
            retry_count: 7,
            rnr_retry_count: 7,
            srq: 0,
            qp_num: 0,
        };
        // SAFETY: the QP exists and `param`/`private` outlive the call.
        sys::check("rdma_accept", unsafe { (self.api.rdma_accept)(self.id, &mut param) })?;
        self.owns_id = true;
        Ok(())
    }

    /// Starts the disconnect (harmless twice).
    pub fn disconnect(&self) {
        // SAFETY: our connected id.
        unsafe { (self.api.rdma_disconnect)(self.id) };
    }

    /// The completion channel's descriptor; none in poll mode.
    pub fn channel_fd(&self) -> Option<RawFd> {
        // SAFETY: a channel, when there is one, lives as long as self.
        (!self.channel.is_null()).then(|| unsafe { (*self.channel).fd })
    }

    /// The device's name, for the p2p decision.
    pub fn device_name(&self) -> String {
        // SAFETY: a live context's device; the name is a NUL-terminated string it owns.
        let name = unsafe { std::ffi::CStr::from_ptr((self.api.ibv_get_device_name)(self.ops().device)) };
        name.to_string_lossy().into_owned()
    }

    fn ops(&self) -> &sys::IbvContext {
        // SAFETY: the id's device context outlives the queue pair.
        unsafe { &*(*self.id).verbs }
    }

    fn qp(&self) -> *mut sys::IbvQp {
        // SAFETY: set by rdma_create_qp before any post.
        unsafe { (*self.id).qp }
    }

    fn ctrl_sge(&self, off: usize, len: usize) -> sys::IbvSge {
        // SAFETY: registered in create().
        let lkey = unsafe { (*self.ctrl_mr).lkey };
        sys::IbvSge { addr: self.ctrl.as_ptr() as u64 + off as u64, length: len as u32, lkey }
    }

    /// An SGE for the first `len` bytes of a data window, which must lie in the region `mr`
    /// names: the data area, or a registered dma-buf with that lkey.
    fn data_sge(&self, w: &Window, len: usize, mr: Mr) -> io::Result<sys::IbvSge> {
        let (start, end) = (w.as_ptr() as usize, w.as_ptr() as usize + len);
        let lkey = match mr {
            // SAFETY: registered in create().
            Mr::Data if self.data.holds(w) => unsafe { (*self.data_mr).lkey },
            Mr::DmaBuf(lkey)
                if self.dmabuf_mrs.iter().any(|&(base, n, m)| {
                    // SAFETY: registered by reg_dmabuf, alive until drop.
                    let key = unsafe { (*m).lkey };
                    key == lkey && base <= start && end <= base + n
                }) =>
            {
                lkey
            }
            _ => return Err(io::Error::other(format!("a buffer outside the registered region {mr:?}"))),
        };
        if len > w.len() {
            return Err(io::Error::other("a transfer longer than its buffer"));
        }
        Ok(sys::IbvSge { addr: start as u64, length: len as u32, lkey })
    }

    fn recv_area(&self) -> usize {
        match self.recv {
            Recv::Own => self.size.depth * self.size.capsule,
            Recv::Shared(_) => 0,
        }
    }

    fn send_wr(wr_id: u64, opcode: u32, signaled: bool) -> sys::IbvSendWr {
        sys::IbvSendWr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: ptr::null_mut(),
            num_sge: 1,
            opcode,
            send_flags: if signaled { sys::IBV_SEND_SIGNALED } else { 0 },
            invalidate_rkey: 0,
            rdma_remote_addr: 0,
            rdma_rkey: 0,
            rest: [0; 76],
        }
    }

    /// Posts the round's work requests (in the order they came) as one chain.
    pub fn flush(&mut self) -> io::Result<()> {
        let n = self.batch.len();
        if n == 0 {
            return Ok(());
        }
        let f = self.ops().post_send.ok_or_else(|| io::Error::other("provider has no post_send"))?;
        let base = self.batch.as_mut_ptr();
        // SAFETY: every index is below `n`, the vector's length; the pointers into it stay
        // valid until the post returns (nothing touches the vector meanwhile).
        let head = unsafe {
            for i in 0..n {
                let e = &mut *base.add(i);
                e.0.sg_list = &mut e.1;
                e.0.next = if i + 1 < n { &mut (*base.add(i + 1)).0 } else { ptr::null_mut() };
            }
            &mut (*base).0
        };
        let mut bad = ptr::null_mut();
        // SAFETY: every SGE points into registered memory (checked as each was queued);
        // providers copy WRs at post time. The windows the SGEs point into stay with their
        // requests until the completions come back.
        let r = sys::check("ibv_post_send", unsafe { f(self.qp(), head, &mut bad) });
        self.batch.clear();
        r
    }

    /// Drains the completion queue into `out`; in channel mode, takes the channel's event and
    /// re-arms the CQ first so no completion is missed.
    pub fn poll(&mut self, out: &mut Vec<Event>) -> io::Result<()> {
        let ops = self.ops();
        let (poll_cq, notify) = match (ops.poll_cq, ops.req_notify_cq) {
            (Some(p), Some(n)) => (p, n),
            _ => return Err(io::Error::other("provider lacks poll_cq/req_notify_cq")),
        };
        if !self.polled {
            let mut cq: *mut sys::IbvCq = ptr::null_mut();
            let mut ctx: *mut c_void = ptr::null_mut();
            // One read: the channel is this CQ's alone, and an armed CQ raises one event and
            // disarms until the re-arm below, so no second event can wait behind the first (a
            // second read would only return EAGAIN: a system call per wake-up for nothing).
            // SAFETY: non-blocking channel; the event taken is acked; our CQ re-armed.
            unsafe {
                if (self.api.ibv_get_cq_event)(self.channel, &mut cq, &mut ctx) == 0 {
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
            events(&wcs[..n as usize], out)?;
            if (n as usize) < wcs.len() {
                return Ok(());
            }
        }
    }

    /// Poll mode: what the poller looks at for this queue ([`CqLook`]); the same one each time.
    pub fn cq_look(&mut self) -> io::Result<Arc<CqLook>> {
        if let Some(l) = &self.look {
            return Ok(l.clone());
        }
        let poll_cq = self.ops().poll_cq.ok_or_else(|| io::Error::other("provider lacks poll_cq"))?;
        let state = LookState { cq: self.cq, found: Vec::new(), failed: false };
        let l = Arc::new(CqLook { poll_cq, state: std::sync::Mutex::new(state) });
        self.look = Some(l.clone());
        Ok(l)
    }
}

/// Events of work completions; a failed one is an error, one flushed by the queue's end is not.
fn events(wcs: &[sys::IbvWc], out: &mut Vec<Event>) -> io::Result<()> {
    for wc in wcs {
        if wc.status != sys::IBV_WC_SUCCESS {
            if wc.status == sys::IBV_WC_WR_FLUSH_ERR {
                continue;
            }
            return Err(io::Error::other(format!(
                "work completion status {} (wr {:#x}, vendor {})",
                wc.status, wc.wr_id, wc.vendor_err
            )));
        }
        let idx = wc.wr_id & !wr::KIND;
        out.push(match wc.wr_id & wr::KIND {
            wr::RECV => Event::Recv { idx: idx as usize, len: wc.byte_len as usize },
            wr::READ => Event::ReadDone { req: idx as u16 },
            _ => Event::SendDone { req: idx as u16 },
        });
    }
    Ok(())
}

/// A queue's completion queue as its poller looks at it on every turn: the completions it
/// finds wait here for the queue's task ([`CqLook::take`]), which is woken only then. Made by
/// [`Qp::cq_look`]; once the Qp is gone a look finds nothing.
pub struct CqLook {
    poll_cq: sys::PollCq,
    state: std::sync::Mutex<LookState>,
}

struct LookState {
    /// Null once the Qp has destroyed it.
    cq: *mut sys::IbvCq,
    found: Vec<sys::IbvWc>,
    failed: bool,
}

// SAFETY: the CQ pointer is used only under the mutex, and the Qp nulls it under the mutex
// before destroying the CQ, so a look from any thread polls a live CQ or none.
unsafe impl Send for CqLook {}
// SAFETY: as for Send: all state is behind the mutex.
unsafe impl Sync for CqLook {}

impl crate::poll::Look for CqLook {
    fn look(&self) -> bool {
        let mut st = self.state();
        if st.cq.is_null() {
            return false;
        }
        let mut wcs = [sys::IbvWc::default(); 32];
        // SAFETY: `wcs` has room for 32 entries; the CQ is live while non-null (see Send).
        let n = unsafe { (self.poll_cq)(st.cq, wcs.len() as i32, wcs.as_mut_ptr()) };
        if n < 0 {
            st.failed = true;
            return true;
        }
        st.found.extend_from_slice(&wcs[..n as usize]);
        n > 0
    }
}

impl CqLook {
    fn state(&self) -> std::sync::MutexGuard<'_, LookState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The CQ is about to be destroyed: no look polls it from now on.
    fn disarm(&self) {
        self.state().cq = ptr::null_mut();
    }

    /// The events of the completions the poller found since the last take.
    pub fn take(&self, out: &mut Vec<Event>) -> io::Result<()> {
        let mut st = self.state();
        if st.failed {
            return Err(io::Error::other("ibv_poll_cq failed"));
        }
        let r = events(&st.found, out);
        st.found.clear();
        r
    }
}

impl std::fmt::Debug for CqLook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqLook").field("cq", &self.state().cq).finish()
    }
}

impl Verbs for Qp {
    fn post_recv(&mut self, idx: usize) -> io::Result<()> {
        if let Recv::Shared(srq) = &self.recv {
            return srq.post(idx);
        }
        let mut sge = self.ctrl_sge(idx * self.size.capsule, self.size.capsule);
        let mut wr =
            sys::IbvRecvWr { wr_id: wr::RECV | idx as u64, next: ptr::null_mut(), sg_list: &mut sge, num_sge: 1 };
        let mut bad = ptr::null_mut();
        let f = self.ops().post_recv.ok_or_else(|| io::Error::other("provider has no post_recv"))?;
        // SAFETY: the SGE points into our registered region; the WR is copied by the provider.
        sys::check("ibv_post_recv", unsafe { f(self.qp(), &mut wr, &mut bad) })
    }

    fn post_read(&mut self, req: u16, buf: &Window, len: usize, remote: &Keyed, mr: Mr) -> io::Result<()> {
        let sge = self.data_sge(buf, len, mr)?;
        let mut w = Self::send_wr(wr::READ | u64::from(req), sys::wr_opcode::RDMA_READ, true);
        w.rdma_remote_addr = remote.addr;
        w.rdma_rkey = remote.key;
        self.batch.push((w, sge));
        Ok(())
    }

    fn post_send(
        &mut self,
        req: u16,
        cqe: &Cqe,
        write: Option<(&Window, usize, &Keyed, Mr)>,
        invalidate: Option<u32>,
    ) -> io::Result<()> {
        let off = self.recv_area() + usize::from(req) * 16;
        self.ctrl.write_bytes(off, cqe.as_bytes());
        let rsp_sge = self.ctrl_sge(off, 16);
        let mut send = Self::send_wr(wr::SEND | u64::from(req), sys::wr_opcode::SEND, true);
        if let Some(key) = invalidate {
            send.opcode = sys::wr_opcode::SEND_WITH_INV;
            send.invalidate_rkey = key;
        }
        if let Some((buf, len, k, mr)) = write {
            let data_sge = self.data_sge(buf, len, mr)?;
            let mut w = Self::send_wr(0, sys::wr_opcode::RDMA_WRITE, false);
            w.rdma_remote_addr = k.addr;
            w.rdma_rkey = k.key;
            self.batch.push((w, data_sge));
        }
        self.batch.push((send, rsp_sge));
        Ok(())
    }

    fn capsule(&self, idx: usize) -> &[u8] {
        match &self.recv {
            // SAFETY: as for the shared queue below.
            Recv::Own => unsafe { self.ctrl.bytes(idx * self.size.capsule, self.size.capsule) },
            // SAFETY: the state machine reads only capsules it received and has not posted
            // back; the device does not write those.
            Recv::Shared(srq) => unsafe { srq.capsule(idx) },
        }
    }

    fn reg_dmabuf(&mut self, fd: BorrowedFd<'_>, iova: u64, len: usize) -> io::Result<u32> {
        let f = self.api.ibv_reg_dmabuf_mr.ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))?;
        // Local access only: the NIC reads and writes it for our own work requests; no host
        // gets a key to it.
        // SAFETY: our live PD and an open dma-buf fd; the result is checked.
        let mr = sys::check_ptr("ibv_reg_dmabuf_mr", unsafe {
            f(self.pd, 0, len, iova, fd.as_raw_fd(), sys::IBV_ACCESS_LOCAL_WRITE)
        })?;
        self.dmabuf_mrs.push((iova as usize, len, mr));
        // SAFETY: just registered.
        Ok(unsafe { (*mr).lkey })
    }
}

/// Frees a connect request's id that was not accepted (after rejecting it).
pub fn reject(api: &'static Api, id: *mut sys::RdmaCmId, private: &[u8]) {
    // SAFETY: the id of a connect request we have not accepted; its event is acked.
    unsafe {
        (api.rdma_reject)(id, private.as_ptr().cast(), private.len() as u8);
        (api.rdma_destroy_id)(id);
    }
}

/// The device limits a queue is sized against: (max_qp_wr, max_qp_init_rd_atom,
/// max_qp_rd_atom).
pub fn device_limits(api: &'static Api, id: *mut sys::RdmaCmId) -> io::Result<(i32, i32, i32)> {
    // SAFETY: a connect request's id carries its device context.
    let verbs = unsafe { (*id).verbs };
    // SAFETY: zeroed is a valid ibv_device_attr to be filled in.
    let mut attr: sys::IbvDeviceAttr = unsafe { std::mem::zeroed() };
    // SAFETY: `verbs` is a live context; `attr` is writable.
    sys::check("ibv_query_device", unsafe { (api.ibv_query_device)(verbs, &mut attr) })?;
    Ok((attr.max_qp_wr, attr.max_qp_init_rd_atom, attr.max_qp_rd_atom))
}

/// The device context of a connect request's id (the key of its shared receive queue).
pub fn device_of(id: *mut sys::RdmaCmId) -> *mut sys::IbvContext {
    // SAFETY: a connect request's id carries its device context.
    unsafe { (*id).verbs }
}

/// Gives a receive buffer still held at teardown back to the device's shared receive queue,
/// where other queues use it (a queue's own buffers go with the queue).
pub fn return_receive(qp: &mut Qp, idx: usize) {
    if matches!(qp.recv, Recv::Shared(_))
        && let Err(e) = qp.post_recv(idx)
    {
        warn!("returning receive buffer {idx}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::poll::Look;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    static POLLS: AtomicUsize = AtomicUsize::new(0);

    /// A provider's poll_cq with one receive completion on every call.
    unsafe extern "C" fn one_recv(_: *mut sys::IbvCq, n: i32, wc: *mut sys::IbvWc) -> i32 {
        POLLS.fetch_add(1, Relaxed);
        assert!(n >= 1);
        // SAFETY: the caller gives room for `n` entries.
        unsafe { *wc = sys::IbvWc { wr_id: wr::RECV | 7, byte_len: 72, ..Default::default() } };
        1
    }

    /// What a look finds waits for the queue's task as events; once disarmed (the Qp destroys
    /// its CQ) a look no longer calls into the provider.
    #[test]
    fn a_look_keeps_what_it_finds_and_never_polls_a_destroyed_cq() {
        let mut fake = 0u8;
        let state = LookState { cq: (&raw mut fake).cast(), found: Vec::new(), failed: false };
        let l = CqLook { poll_cq: one_recv, state: std::sync::Mutex::new(state) };
        assert!(l.look() && l.look());
        let mut out = Vec::new();
        l.take(&mut out).unwrap();
        assert_eq!(out, vec![Event::Recv { idx: 7, len: 72 }; 2]);
        l.take(&mut out).unwrap();
        assert_eq!(out.len(), 2, "taken once");
        l.disarm();
        let polls = POLLS.load(Relaxed);
        assert!(!l.look());
        assert_eq!(POLLS.load(Relaxed), polls, "a disarmed look does not reach the provider");
    }
}
