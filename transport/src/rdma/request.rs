//! The life of an NVMe/RDMA command, as one explicit state machine (after SPDK's
//! `spdk_nvmf_rdma_request_state`): every request is in exactly one state, a request waiting
//! for a resource sits in that resource's pending queue, and [`Requests::process`] advances
//! whatever can move until nothing can. Completions — of receives, RDMA READs, SENDs and
//! backend operations — arrive in any order and only feed this machine; every response leaves
//! through one path ([`Requests::complete`] → `ReadyToComplete` → SEND).
//!
//! Resources a request waits for, each with its own queue:
//! - a request context (`need_request`): a receive whose capsule has no context yet;
//! - a data buffer (`need_buffer`): a chunk of p2p memory when the command's namespace has
//!   some for this controller and the queue's share is not used up (taken at once, never
//!   waited for), else a window of the queue's data area, small (most commands) or large
//!   (transfers above the small size); a request waits only for its kind. Which memory region
//!   the buffer is in ([`Mr`]) goes with the request into every RDMA READ and WRITE;
//! - RDMA READ depth and a send slot (`need_read`): at most ORD reads in flight;
//! - send slots (`need_send`): a response (RDMA WRITE + SEND, or SEND alone).
//!
//! The receive buffer goes back to the device as soon as the capsule has been copied out
//! (the SQE at once, in-capsule data once a buffer holds it), long before the response: a
//! host that reuses a command slot the moment it sees the response must never find the
//! receive queue empty (an RNR NAK costs 655 ms with RDMA CM's RNR timer).
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use p2pnvmf_nvmf::wire::{Cqe, Sqe};

pub use super::wire::Keyed;
use p2pnvmf_nvmf::buffers::QueueBuffers;
use p2pnvmf_nvmf::{Completion, DataPlan, Direction, Exec, Queue, Request, Response, Status};
use p2pnvmf_p2p::mem::Window;
use p2pnvmf_p2p::pool::ChunkPool;
use tracing::{debug, info, trace};
use zerocopy::FromBytes;

/// The memory region a data buffer is in, for the lkey of its RDMA READs and WRITEs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mr {
    /// The queue's data area (host memory).
    Data,
    /// A provider's window registered as a dma-buf MR with this lkey.
    DmaBuf(u32),
}

/// What the state machine asks of the queue pair. The real one queues send-queue work
/// requests and posts each round's together (`Qp::flush`, by the queue's task); tests use a
/// fake that records them.
pub trait Verbs {
    /// Gives receive buffer `idx` back to the device.
    fn post_recv(&mut self, idx: usize) -> io::Result<()>;
    /// RDMA READ of the host's `remote` buffer into the first `len` bytes of `buf` (in `mr`);
    /// completes as [`Event::ReadDone`] for `req`.
    fn post_read(&mut self, req: u16, buf: &Window, len: usize, remote: &Keyed, mr: Mr) -> io::Result<()>;
    /// SEND of `cqe` from request `req`'s response buffer, after an RDMA WRITE of `write`'s
    /// first bytes (in its MR) to the host when given (one chained post); completes as
    /// [`Event::SendDone`] for `req`. `invalidate` makes it SEND_WITH_INV.
    fn post_send(
        &mut self,
        req: u16,
        cqe: &Cqe,
        write: Option<(&Window, usize, &Keyed, Mr)>,
        invalidate: Option<u32>,
    ) -> io::Result<()>;
    /// The capsule in receive buffer `idx`.
    fn capsule(&self, idx: usize) -> &[u8];
    /// Registers the first `len` bytes of dma-buf `fd` with the device for local access only,
    /// byte 0 addressed as `iova` in SGEs (the CPU address of the window, so a chunk's SGE is
    /// its CPU address, as in the data area); returns the lkey. The MR lives as long as the
    /// queue pair.
    fn reg_dmabuf(&mut self, fd: BorrowedFd<'_>, iova: u64, len: usize) -> io::Result<u32>;
}

/// A work completion, as the machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Recv { idx: usize, len: usize },
    ReadDone { req: u16 },
    SendDone { req: u16 },
}

/// SPDK's states, those this transport needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Free,
    /// Waiting for a data buffer (in `need_buffer`).
    NeedBuffer,
    /// Waiting for RDMA READ depth or a send slot (in `need_read`).
    TransferToControllerPending,
    /// RDMA READ posted.
    TransferringHostToController,
    /// Submitted to the backend.
    Executing,
    /// Waiting for send slots (in `need_send`).
    ReadyToComplete,
    /// WRITE and/or SEND posted: waiting for the SEND completion.
    Completing,
}

/// A request context: the command the core carries ([`Request`]: SQE, data plan, buffer,
/// response; away with the core while it executes) and what NVMe/RDMA adds to it.
#[derive(Debug)]
struct Req {
    state: State,
    cmd: Request,
    /// A receive buffer still held (in-capsule data not copied out yet).
    recv: Option<usize>,
    /// In-capsule data: offset after the SQE and length.
    icd: Option<(usize, usize)>,
    keyed: Option<Keyed>,
    /// Where the command's buffer came from: the buffer choice, made once when the request
    /// got its buffer.
    mr: Mr,
    /// Send-queue slots its posts hold until the SEND completes.
    wrs: usize,
}

impl Req {
    fn new() -> Self {
        Req { state: State::Free, cmd: Request::default(), recv: None, icd: None, keyed: None, mr: Mr::Data, wrs: 0 }
    }
}

/// Sizes of one queue's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request contexts (more than the host's queue depth: a context stays busy until its
    /// SEND completes, after the host may already have sent the next command).
    pub requests: usize,
    /// RDMA READs in flight at once (the ORD negotiated at accept).
    pub reads: usize,
    /// Send-queue entries.
    pub send_slots: usize,
    /// Largest transfer (data buffer size).
    pub max_xfer: usize,
    /// Receives waiting for a context beyond which the host is misbehaving.
    pub max_waiting: usize,
}

/// Every request of one queue pair, and the queues of those waiting.
#[derive(Debug)]
pub struct Requests {
    reqs: Vec<Req>,
    free: Vec<u16>,
    buffers: Buffers,
    /// The queue's share of its controller's p2p pools (I/O queues; set up after Connect)
    /// and the lkey of each pool's dma-buf MR.
    p2p: QueueBuffers,
    lkeys: Vec<(Arc<ChunkPool>, u32)>,
    p2p_set_up: bool,
    need_request: VecDeque<(usize, usize)>,
    need_buffer: VecDeque<u16>,
    need_read: VecDeque<u16>,
    need_send: VecDeque<u16>,
    reads_out: usize,
    send_free: usize,
    lim: Limits,
    pub queue: Queue,
    /// Completions reaped from the core, reused.
    reaped: Vec<Completion>,
}

/// The queue's data buffers, in classes of one size each, smallest first.
#[derive(Debug)]
struct Buffers {
    classes: Vec<(usize, Vec<Window>)>,
}

impl Buffers {
    fn new(classes: Vec<Vec<Window>>) -> Self {
        let mut classes: Vec<(usize, Vec<Window>)> =
            classes.into_iter().filter_map(|c| Some((c.first()?.len(), c))).collect();
        classes.sort_by_key(|c| c.0);
        Buffers { classes }
    }

    /// The smallest free buffer that holds `len` bytes: a command takes a larger class only
    /// when its own is used up.
    fn take(&mut self, len: usize) -> Option<Window> {
        self.classes.iter_mut().filter(|c| c.0 >= len).find_map(|c| c.1.pop())
    }

    fn can(&self, len: usize) -> bool {
        self.classes.iter().any(|c| c.0 >= len && !c.1.is_empty())
    }

    fn give(&mut self, w: Window) {
        let class = self.classes.iter_mut().find(|c| c.0 == w.len()).expect("a buffer goes back to its class");
        class.1.push(w);
    }

    fn free(&self) -> usize {
        self.classes.iter().map(|c| c.1.len()).sum()
    }

    fn largest(&self) -> usize {
        self.classes.last().map_or(0, |c| c.0)
    }
}

/// Why a queue pair cannot go on.
pub type Fatal = io::Error;

impl Requests {
    /// A queue's requests over its data buffers (windows of its data area), in classes of one
    /// size each; the largest class holds the largest transfer.
    pub fn new(queue: Queue, buffers: Vec<Vec<Window>>, lim: Limits) -> Requests {
        let n = lim.requests;
        let buffers = Buffers::new(buffers);
        assert!(buffers.largest() >= lim.max_xfer, "the largest buffers hold the largest transfer");
        Requests {
            reqs: (0..n).map(|_| Req::new()).collect(),
            free: (0..n as u16).rev().collect(),
            buffers,
            p2p: QueueBuffers::default(),
            lkeys: Vec::new(),
            p2p_set_up: false,
            need_request: VecDeque::with_capacity(lim.max_waiting + 1),
            need_buffer: VecDeque::with_capacity(n),
            need_read: VecDeque::with_capacity(n),
            need_send: VecDeque::with_capacity(n),
            reads_out: 0,
            send_free: lim.send_slots,
            lim,
            queue,
            reaped: Vec::with_capacity(n),
        }
    }

    pub fn state(&self, req: u16) -> State {
        self.reqs[usize::from(req)].state
    }

    /// Requests in `state`, for tests and the log.
    pub fn count(&self, state: State) -> usize {
        self.reqs.iter().filter(|r| r.state == state).count()
    }

    pub fn free_buffers(&self) -> usize {
        self.buffers.free()
    }

    fn set(&mut self, req: u16, state: State) {
        let r = &mut self.reqs[usize::from(req)];
        trace!(req, cid = r.cmd.cid(), from = ?r.state, to = ?state, "rdma request");
        r.state = state;
    }

    /// Feeds one work completion, then advances everything that can move.
    pub fn on_event(&mut self, v: &mut impl Verbs, ev: Event) -> Result<(), Fatal> {
        match ev {
            Event::Recv { idx, len } => self.on_recv(v, idx, len)?,
            Event::ReadDone { req } => {
                self.expect(req, State::TransferringHostToController)?;
                self.reads_out -= 1;
                self.send_free += 1;
                self.execute(req);
            }
            Event::SendDone { req } => {
                self.expect(req, State::Completing)?;
                let r = &mut self.reqs[usize::from(req)];
                self.send_free += r.wrs;
                r.wrs = 0;
                self.release(req);
            }
        }
        self.process(v)
    }

    fn expect(&self, req: u16, state: State) -> Result<(), Fatal> {
        match self.reqs.get(usize::from(req)) {
            Some(r) if r.state == state => Ok(()),
            Some(r) => Err(io::Error::other(format!("completion for request {req} in state {:?}", r.state))),
            None => Err(io::Error::other(format!("completion for unknown request {req}"))),
        }
    }

    fn on_recv(&mut self, v: &mut impl Verbs, idx: usize, len: usize) -> Result<(), Fatal> {
        if len < 64 {
            // A capsule shorter than an SQE has no CID to answer: a fatal controller error
            // (as nvmet-rdma does).
            if let Some(c) = self.queue.controller() {
                c.kill("capsule shorter than 64 bytes");
            }
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("capsule of {len} bytes (< 64)")));
        }
        let Some(req) = self.free.pop() else {
            if self.need_request.len() >= self.lim.max_waiting {
                return Err(io::Error::other("host sent more commands than its queue holds"));
            }
            self.need_request.push_back((idx, len));
            return Ok(());
        };
        self.start(v, req, idx, len)
    }

    /// A new command in `req` from receive buffer `idx`: checks, then what it needs first.
    fn start(&mut self, v: &mut impl Verbs, req: u16, idx: usize, len: usize) -> Result<(), Fatal> {
        let sqe = Sqe::read_from_bytes(&v.capsule(idx)[..64]).expect("64 bytes");
        let accepted = self.queue.accept(&sqe, len - 64);
        let r = &mut self.reqs[usize::from(req)];
        *r = Req::new();
        trace!(req, cid = sqe.cid.get(), opcode = sqe.opcode, "rdma request: new");
        let plan = match accepted {
            Ok(cmd) => {
                r.cmd = cmd;
                Plan::of(&sqe, r.cmd.plan)
            }
            Err(status) => {
                r.cmd = Request::answered(sqe, Response::ok());
                v.post_recv(idx)?;
                self.complete(req, Response::status(status));
                return Ok(());
            }
        };
        match plan {
            Plan::InCapsule(o, l) => {
                (r.recv, r.icd) = (Some(idx), Some((o, l)));
                self.wait_buffer(v, req)?;
            }
            Plan::Keyed(k) if k.len > 0 => {
                r.keyed = Some(k);
                v.post_recv(idx)?;
                self.wait_buffer(v, req)?;
            }
            Plan::Keyed(k) => {
                r.keyed = Some(k);
                v.post_recv(idx)?;
                self.execute(req);
            }
            Plan::None => {
                v.post_recv(idx)?;
                self.execute(req);
            }
        }
        Ok(())
    }

    /// A p2p chunk when the command's namespace has one for this queue, else a wait for a
    /// buffer of the data area.
    fn wait_buffer(&mut self, v: &mut impl Verbs, req: u16) -> Result<(), Fatal> {
        let r = &self.reqs[usize::from(req)];
        if let Some(w) = self.p2p.get(&r.cmd.sqe, r.cmd.len()) {
            let lkey = self.lkeys.iter().find(|(pool, _)| pool.owns(&w)).expect("a registered pool's chunk").1;
            self.reqs[usize::from(req)].mr = Mr::DmaBuf(lkey);
            return self.have_buffer(v, req, w);
        }
        self.set(req, State::NeedBuffer);
        self.need_buffer.push_back(req);
        Ok(())
    }

    /// Once the I/O queue is connected: registers each p2p pool its controller decided on
    /// with the NIC (the provider's dma-buf on this queue's protection domain) and takes the
    /// queue's share of those that registered. A pool the NIC refuses is a controller-level
    /// fallback: the controller drops it, with the reason, and uses host memory.
    fn set_up_p2p(&mut self, v: &mut impl Verbs) {
        if self.p2p_set_up || self.queue.qid() == 0 {
            return;
        }
        let Some(ctrl) = self.queue.controller().cloned() else { return };
        self.p2p_set_up = true;
        let mut usable = Vec::new();
        for p in ctrl.p2p.current() {
            let Some(fd) = &p.dma_buf else { continue };
            let (base, len) = p.pool.span();
            match v.reg_dmabuf(fd.as_fd(), base as u64, len) {
                Ok(lkey) => {
                    info!(cntlid = ctrl.cntlid, qid = self.queue.qid(), nsid = p.nsid, provider = %p.provider, lkey,
                          bytes = len, "p2p memory registered with the NIC (dma-buf MR)");
                    self.lkeys.push((p.pool.clone(), lkey));
                    usable.push(p);
                }
                Err(e) => {
                    ctrl.p2p.drop_pool(
                        p.nsid,
                        "nic_refused_dmabuf",
                        &format_args!("dma-buf: the NIC does not register {}'s window: {e}", p.provider),
                    );
                }
            }
        }
        self.p2p = QueueBuffers::of(&ctrl.p2p, &usable, self.queue.entries());
    }

    /// The buffer is there: copy in-capsule data out (and give the receive buffer back),
    /// fetch the host's data, or execute.
    fn have_buffer(&mut self, v: &mut impl Verbs, req: u16, mut buf: Window) -> Result<(), Fatal> {
        let r = &mut self.reqs[usize::from(req)];
        if let (Some(idx), Some((o, l))) = (r.recv.take(), r.icd) {
            buf.bytes_mut()[..l].copy_from_slice(&v.capsule(idx)[64 + o..64 + o + l]);
            v.post_recv(idx)?;
        }
        r.cmd.buf = Some(buf);
        if r.keyed.is_some() && Direction::of(&r.cmd.sqe) == Direction::HostToController {
            self.set(req, State::TransferToControllerPending);
            self.need_read.push_back(req);
        } else {
            self.execute(req);
        }
        Ok(())
    }

    /// Hands the command to the core: it finishes now, is submitted, or is held (an AER).
    fn execute(&mut self, req: u16) {
        let r = &mut self.reqs[usize::from(req)];
        match self.queue.execute(req, std::mem::take(&mut r.cmd)) {
            Exec::Done(cmd) => {
                let resp = cmd.response;
                r.cmd = cmd;
                self.complete(req, resp);
            }
            Exec::Submitted => self.set(req, State::Executing),
        }
    }

    /// The one way to a response: queue it for the send queue.
    fn complete(&mut self, req: u16, mut resp: Response) {
        let r = &mut self.reqs[usize::from(req)];
        if r.icd.is_some() {
            // In-capsule data only ever flows to the controller.
            resp.data_len = 0;
        }
        r.cmd.response = resp;
        self.set(req, State::ReadyToComplete);
        self.need_send.push_back(req);
    }

    /// Commands the backends finished.
    pub fn reap(&mut self, v: &mut impl Verbs) -> Result<usize, Fatal> {
        let mut done = std::mem::take(&mut self.reaped);
        self.queue.reap(&mut |c| done.push(c));
        let n = done.len();
        for c in done.drain(..) {
            let r = &mut self.reqs[usize::from(c.tag)];
            if r.state != State::Executing {
                return Err(io::Error::other(format!(
                    "backend completion for request {} in state {:?}",
                    c.tag, r.state
                )));
            }
            let resp = c.req.response;
            r.cmd = c.req;
            self.complete(c.tag, resp);
        }
        self.reaped = done;
        self.process(v).map(|()| n)
    }

    /// Advances every waiting request that can move now, until nothing can.
    pub fn process(&mut self, v: &mut impl Verbs) -> Result<(), Fatal> {
        self.set_up_p2p(v);
        loop {
            let mut moved = false;
            // Responses first: they free what the others wait for.
            while let Some(&req) = self.need_send.front() {
                let revoked = self.revoked(self.reqs[usize::from(req)].mr);
                let r = &mut self.reqs[usize::from(req)];
                if revoked && r.cmd.response.data_len > 0 {
                    // Read data in revoked memory is not sent: the host gets an error instead.
                    r.cmd.response = Response::status(Status::DATA_TRANSFER_ERROR);
                }
                let r = &self.reqs[usize::from(req)];
                let write = r.keyed.filter(|k| {
                    Direction::of(&r.cmd.sqe) == Direction::ControllerToHost
                        && k.len > 0
                        && r.cmd.response.data_len > 0
                        && r.cmd.response.status.is_success()
                });
                let wrs = 1 + usize::from(write.is_some());
                if self.send_free < wrs {
                    break;
                }
                self.need_send.pop_front();
                self.send(v, req, write)?;
                moved = true;
            }
            while let Some(&req) = self.need_read.front() {
                if self.reads_out >= self.lim.reads || self.send_free == 0 {
                    break;
                }
                self.need_read.pop_front();
                let r = &self.reqs[usize::from(req)];
                if self.revoked(r.mr) {
                    // The NIC must not write into memory given back to its device.
                    self.complete(req, Response::status(Status::DATA_TRANSFER_ERROR));
                    moved = true;
                    continue;
                }
                let k = r.keyed.expect("reads are keyed");
                v.post_read(req, r.cmd.buf.as_ref().expect("buffer before read"), k.len, &k, r.mr)?;
                self.reads_out += 1;
                self.send_free -= 1;
                self.set(req, State::TransferringHostToController);
                moved = true;
            }
            // The first waiting request whose kind of buffer is free: a large transfer waiting
            // does not hold up small ones behind it.
            while let Some(i) =
                self.need_buffer.iter().position(|&q| self.buffers.can(self.reqs[usize::from(q)].cmd.len()))
            {
                let req = self.need_buffer.remove(i).expect("found above");
                let buf = self.buffers.take(self.reqs[usize::from(req)].cmd.len()).expect("checked above");
                self.reqs[usize::from(req)].mr = Mr::Data;
                self.have_buffer(v, req, buf)?;
                moved = true;
            }
            while !self.free.is_empty()
                && let Some((idx, len)) = self.need_request.pop_front()
            {
                let req = self.free.pop().expect("checked non-empty");
                self.start(v, req, idx, len)?;
                moved = true;
            }
            if !moved {
                return Ok(());
            }
        }
    }

    fn send(&mut self, v: &mut impl Verbs, req: u16, write: Option<Keyed>) -> Result<(), Fatal> {
        let r = &self.reqs[usize::from(req)];
        let cqe = self.queue.complete(&r.cmd);
        let invalidate = r.keyed.filter(|k| k.invalidate).map(|k| k.key);
        let data = write.map(|k| {
            let buf = r.cmd.buf.as_ref().expect("data to write lives in the buffer");
            (buf, (r.cmd.response.data_len as usize).min(k.len), k, r.mr)
        });
        v.post_send(req, &cqe, data.as_ref().map(|(b, n, k, mr)| (*b, *n, k, *mr)), invalidate)?;
        let wrs = 1 + usize::from(write.is_some());
        self.send_free -= wrs;
        self.reqs[usize::from(req)].wrs = wrs;
        // Data the host does not read back is no longer needed: the buffer serves the next.
        if write.is_none() {
            self.give_buffer(req);
        }
        self.set(req, State::Completing);
        Ok(())
    }

    /// Whether a buffer in `mr` is in p2p memory that was revoked since.
    fn revoked(&self, mr: Mr) -> bool {
        let Mr::DmaBuf(lkey) = mr else { return false };
        self.lkeys.iter().any(|(pool, k)| *k == lkey && pool.revoked().is_some())
    }

    /// Gives request `req`'s buffer back where it came from.
    fn give_buffer(&mut self, req: u16) {
        let r = &mut self.reqs[usize::from(req)];
        if let Some(b) = r.cmd.buf.take() {
            match r.mr {
                Mr::Data => self.buffers.give(b),
                Mr::DmaBuf(_) => self.p2p.put(b),
            }
        }
    }

    fn release(&mut self, req: u16) {
        self.give_buffer(req);
        let r = &self.reqs[usize::from(req)];
        debug_assert!(r.recv.is_none(), "a released request holds no receive buffer");
        self.set(req, State::Free);
        self.free.push(req);
    }

    /// Receive buffers still held by requests (given back on teardown).
    pub fn held_receives(&self) -> impl Iterator<Item = usize> + '_ {
        self.reqs.iter().filter_map(|r| r.recv).chain(self.need_request.iter().map(|(idx, _)| *idx))
    }

    /// Logs what waits, for a queue that closes.
    pub fn log_pending(&self) {
        debug!(
            need_request = self.need_request.len(),
            need_buffer = self.need_buffer.len(),
            need_read = self.need_read.len(),
            need_send = self.need_send.len(),
            executing = self.count(State::Executing),
            "rdma queue state at close"
        );
    }
}

#[cfg(test)]
impl Requests {
    /// The request's data buffer, for a fake NIC that "writes" the host's data.
    fn buffer_mut(&mut self, req: u16) -> &mut Window {
        self.reqs[usize::from(req)].cmd.buf.as_mut().expect("request holds a buffer")
    }
}

#[derive(Debug, Clone, Copy)]
enum Plan {
    None,
    Keyed(Keyed),
    InCapsule(usize, usize),
}

impl Plan {
    /// What the request does for data the core located: a keyed transfer's key and address
    /// come from the descriptor.
    fn of(sqe: &Sqe, d: DataPlan) -> Plan {
        match d {
            DataPlan::None => Plan::None,
            DataPlan::InCapsule { offset, len } => Plan::InCapsule(offset, len),
            DataPlan::Transport { .. } => Plan::Keyed(Keyed::of(&sqe.dptr)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use p2pnvmf_nvmf::buffers::{Mover, NsBuffers};
    use p2pnvmf_nvmf::wire::{ConnectData, put_str, sgl};
    use p2pnvmf_nvmf::{
        Backend, BackendQueue, IoDone, IoRequest, Namespace, Port, Subsystem, Target, TrType, TransportParams,
    };
    use p2pnvmf_p2p::mem::Mapping;
    use p2pnvmf_p2p::pci::Sysfs;
    use p2pnvmf_p2p::plan::P2p;
    use zerocopy::{FromZeros, IntoBytes};

    use super::*;

    const NQN: &str = "nqn.2026-11.io.p2pnvmf:rdma-states";
    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:0c0c0c0c-0000-0000-0000-000000000001";

    /// What the state machine posted.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Posted {
        Recv(usize),
        Read { req: u16, len: usize, key: u32 },
        Send { req: u16, cid: u16, status: u16, result: u64, write: Option<usize>, invalidate: Option<u32> },
    }

    /// A fake verbs layer: capsules the test places, posts recorded in order, and the memory
    /// region of every RDMA READ and WRITE. A dma-buf registers with the next of `lkeys`, or
    /// fails with `reg_error` when they are used up.
    #[derive(Debug, Default)]
    struct Fake {
        capsules: Vec<Vec<u8>>,
        posted: Vec<Posted>,
        /// (request, READ or WRITE, the region its SGE is in).
        data: Vec<(u16, &'static str, Mr)>,
        lkeys: Vec<u32>,
        reg_error: Option<i32>,
        /// What was registered: (iova, length).
        registered: Vec<(u64, usize)>,
    }

    impl Fake {
        fn take(&mut self) -> Vec<Posted> {
            std::mem::take(&mut self.posted)
        }
    }

    impl Verbs for Fake {
        fn post_recv(&mut self, idx: usize) -> io::Result<()> {
            self.posted.push(Posted::Recv(idx));
            Ok(())
        }
        fn post_read(&mut self, req: u16, buf: &Window, len: usize, remote: &Keyed, mr: Mr) -> io::Result<()> {
            assert!(len <= buf.len());
            self.posted.push(Posted::Read { req, len, key: remote.key });
            self.data.push((req, "READ", mr));
            Ok(())
        }
        fn post_send(
            &mut self,
            req: u16,
            cqe: &Cqe,
            write: Option<(&Window, usize, &Keyed, Mr)>,
            invalidate: Option<u32>,
        ) -> io::Result<()> {
            if let Some((_, _, _, mr)) = write {
                self.data.push((req, "WRITE", mr));
            }
            self.posted.push(Posted::Send {
                req,
                cid: cqe.cid.get(),
                status: cqe.status.get(),
                result: cqe.result.get(),
                write: write.map(|(_, n, _, _)| n),
                invalidate,
            });
            Ok(())
        }
        fn capsule(&self, idx: usize) -> &[u8] {
            &self.capsules[idx]
        }
        fn reg_dmabuf(&mut self, _: BorrowedFd<'_>, iova: u64, len: usize) -> io::Result<u32> {
            if self.lkeys.is_empty() {
                return Err(io::Error::from_raw_os_error(self.reg_error.unwrap_or(libc::EOPNOTSUPP)));
            }
            self.registered.push((iova, len));
            Ok(self.lkeys.remove(0))
        }
    }

    /// Operations the backend holds, and those the test finished.
    type Held = Arc<Mutex<(Vec<IoRequest>, Vec<IoRequest>)>>;

    /// A namespace whose operations stay in flight until the test finishes them.
    #[derive(Debug)]
    struct Slow(Held);

    impl Backend for Slow {
        fn size_bytes(&self) -> u64 {
            1 << 20
        }
        fn volatile_write_cache(&self) -> bool {
            false
        }
        fn flush(&self) -> Result<(), p2pnvmf_nvmf::IoError> {
            Ok(())
        }
        fn open_queue(
            self: Arc<Self>,
            _: usize,
            _: p2pnvmf_nvmf::Reaping,
        ) -> Result<Box<dyn BackendQueue>, p2pnvmf_nvmf::IoError> {
            Ok(Box::new(SlowQueue(self.0.clone())))
        }
    }

    #[derive(Debug)]
    struct SlowQueue(Held);

    impl BackendQueue for SlowQueue {
        fn submit(&mut self, req: IoRequest) -> Option<IoDone> {
            self.0.lock().unwrap().0.push(req);
            None
        }
        fn reap(&mut self, done: &mut dyn FnMut(IoDone)) {
            let finished: Vec<IoRequest> = self.0.lock().unwrap().1.drain(..).collect();
            for r in finished {
                done(r.done(Ok(())));
            }
        }
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<()> {
            Poll::Pending
        }
        fn in_flight(&self) -> usize {
            let h = self.0.lock().unwrap();
            h.0.len() + h.1.len()
        }
    }

    fn port() -> Port {
        let params = TransportParams { ioccsz: 4, max_xfer: 8192, msdbd: 1, keyed_sgls: true };
        Port { id: 1, trtype: TrType::Rdma, traddr: "10.0.0.1".into(), trsvcid: "4420".into(), params }
    }

    fn target(held: &Held) -> Arc<Target> {
        let ns = Namespace::new(NQN, 1, Arc::new(Slow(held.clone())));
        let subsys = Subsystem::open(NQN, vec![ns]);
        Target::new(vec![Arc::new(subsys)], vec![port()])
    }

    fn keyed_sqe(opcode: u8, cid: u16, len: u32, key: u32) -> Sqe {
        let mut s = Sqe::new_zeroed();
        (s.opcode, s.flags, s.cid) = (opcode, 1 << 6, cid.into());
        s.dptr.id = sgl::KEYED_DATA_BLOCK;
        s.dptr.addr = 0x1000.into();
        s.dptr.length = (len | (key & 0xff) << 24).into();
        s.dptr.rsvd = [(key >> 8) as u8, (key >> 16) as u8, (key >> 24) as u8];
        s
    }

    fn capsule(sqe: &Sqe) -> Vec<u8> {
        let mut c = vec![0u8; 64 + 4096];
        c[..64].copy_from_slice(sqe.as_bytes());
        c
    }

    /// Requests with `buffers` large buffers only.
    fn requests(t: &Arc<Target>, buffers: usize, lim: Limits) -> Requests {
        let area = Mapping::host(buffers * lim.max_xfer).unwrap();
        Requests::new(Queue::new(t.clone(), port()), vec![area.into_windows(lim.max_xfer)], lim)
    }

    const LIM: Limits = Limits { requests: 8, reads: 4, send_slots: 16, max_xfer: 8192, max_waiting: 4 };

    /// Delivers capsule `sqe` in receive buffer `idx`.
    fn recv(r: &mut Requests, f: &mut Fake, idx: usize, sqe: &Sqe) {
        if f.capsules.len() <= idx {
            f.capsules.resize(idx + 1, Vec::new());
        }
        f.capsules[idx] = capsule(sqe);
        r.on_event(f, Event::Recv { idx, len: 64 }).unwrap();
    }

    /// Connect through the machine: keyed READ of the Connect data, then the response.
    fn connect(r: &mut Requests, f: &mut Fake, qid: u16, cntlid: u16) -> u16 {
        let mut s = keyed_sqe(0x7f, 1, 1024, 0xc0);
        s.nsid = 1.into(); // fctype Connect
        s.cdw10 = (u32::from(qid) << 16).into();
        s.cdw11 = 31.into();
        recv(r, f, 0, &s);
        let Posted::Read { req, len: 1024, key: 0xc0 } = f.posted[1] else { panic!("{:?}", f.posted) };
        assert_eq!(f.posted[0], Posted::Recv(0), "the receive goes back before the data comes");
        assert_eq!(r.state(req), State::TransferringHostToController);
        let mut d = ConnectData::new_zeroed();
        d.cntlid = cntlid.into();
        put_str(&mut d.subnqn, NQN, 0);
        put_str(&mut d.hostnqn, HOST, 0);
        r.buffer_mut(req).bytes_mut()[..1024].copy_from_slice(d.as_bytes());
        r.on_event(f, Event::ReadDone { req }).unwrap();
        assert_eq!(r.state(req), State::Completing);
        let Posted::Send { status: 0, result, write: None, .. } = f.posted[2] else { panic!("{:?}", f.posted) };
        r.on_event(f, Event::SendDone { req }).unwrap();
        assert_eq!(r.state(req), State::Free);
        f.take();
        result as u16
    }

    /// An admin queue connected and enabled, as the host's first queue; returns its cntlid.
    fn enabled_admin(t: &Arc<Target>) -> (Requests, u16) {
        enabled(requests(t, 2, LIM))
    }

    /// Connects and enables admin queue `a`.
    fn enabled(mut a: Requests) -> (Requests, u16) {
        let mut f = Fake::default();
        let cntlid = connect(&mut a, &mut f, 0, 0xffff);
        let mut set = Sqe::new_zeroed();
        (set.opcode, set.nsid, set.cdw11, set.cdw12) = (0x7f, 0.into(), 0x14.into(), (1 | 6 << 16 | 4 << 20).into());
        recv(&mut a, &mut f, 1, &set);
        assert!(matches!(f.posted[1], Posted::Send { status: 0, .. }), "{:?}", f.posted);
        (a, cntlid)
    }

    /// An I/O queue's requests, connected to an enabled controller whose admin queue it keeps.
    struct Rig {
        held: Held,
        _admin: Requests,
        f: Fake,
        r: Requests,
    }

    fn io_rig(make: impl FnOnce(&Arc<Target>) -> Requests) -> Rig {
        let held = Held::default();
        let t = target(&held);
        let (_admin, cntlid) = enabled_admin(&t);
        let mut f = Fake::default();
        let mut r = make(&t);
        connect(&mut r, &mut f, 1, cntlid);
        Rig { held, _admin, f, r }
    }

    fn write_sqe(cid: u16, slba: u32, key: u32) -> Sqe {
        let mut s = keyed_sqe(0x01, cid, 4096, key);
        (s.nsid, s.cdw10, s.cdw12) = (1.into(), slba.into(), 7.into());
        s
    }

    fn read_sqe(cid: u16, slba: u32, key: u32) -> Sqe {
        let mut s = write_sqe(cid, slba, key);
        s.opcode = 0x02;
        s
    }

    /// Finishes the operation of command `tag` at the backend, and reaps.
    fn finish(held: &Held, tag: u16, r: &mut Requests, f: &mut Fake) {
        {
            let mut h = held.lock().unwrap();
            let i = h.0.iter().position(|o| o.tag == tag).expect("operation held");
            let op = h.0.remove(i);
            h.1.push(op);
        }
        r.reap(f).unwrap();
    }

    /// A target whose namespace takes p2p chunks of the fixture's CMB (below one switch with
    /// mlx5_0), exported as a dma-buf by a fake exporter (a file stands in for the fd).
    fn p2p_target(held: &Held) -> (Arc<Target>, std::path::PathBuf) {
        let dir = p2pnvmf_p2p::fixture::switch_with_cmb();
        let p2p = P2p::discover(&Sysfs::new(&dir), &[], &[], true).unwrap().with_exporter(|_| {
            std::fs::File::open("/dev/null").map(Into::into).map_err(|e| p2pnvmf_p2p::Error::os("/dev/null", e))
        });
        let mut ns = Namespace::new(NQN, 1, Arc::new(Slow(held.clone())));
        ns.buffers = NsBuffers::P2p { provider: 0, required: false };
        let t = Target::new(vec![Arc::new(Subsystem::open(NQN, vec![ns]))], vec![port()]);
        t.set_p2p(Arc::new(p2p));
        (t, dir)
    }

    /// Requests of a queue whose data mlx5_0 moves.
    fn nic_requests(t: &Arc<Target>, buffers: usize, lim: Limits) -> Requests {
        let mut r = requests(t, buffers, lim);
        r.queue.set_mover(Mover::Rdma { device: "mlx5_0".into(), dmabuf: Ok(()) });
        r
    }

    /// An admin queue and an I/O queue (`lim`) of one controller on mlx5_0, the I/O queue
    /// over `f`.
    fn nic_rig(t: &Arc<Target>, mut f: Fake, lim: Limits) -> (Requests, Requests, Fake) {
        let (admin, cntlid) = enabled(nic_requests(t, 2, LIM));
        let mut io = nic_requests(t, 2, lim);
        connect(&mut io, &mut f, 1, cntlid);
        (admin, io, f)
    }

    #[tokio::test]
    async fn p2p_chunks_carry_the_dma_buf_lkey_into_every_read_and_write() {
        let held = Held::default();
        let (t, dir) = p2p_target(&held);
        let (admin, mut r, mut f) = nic_rig(&t, Fake { lkeys: vec![0x77], ..Fake::default() }, LIM);
        // The I/O queue registered the pool's whole span, addressed by its CPU address.
        let pool = t.p2p().unwrap().pool(0).unwrap();
        let (base, len) = pool.span();
        assert_eq!(f.registered, [(base as u64, len)]);
        assert_eq!(f.data, [(0, "READ", Mr::Data)], "the Connect data came into the data area");
        f.data.clear();
        let shared = pool.free_chunks();
        // Host writes: RDMA READ into a chunk; host reads: RDMA WRITE from one.
        recv(&mut r, &mut f, 0, &write_sqe(50, 0, 0xa));
        recv(&mut r, &mut f, 1, &read_sqe(51, 8, 0xb));
        assert_eq!(r.free_buffers(), 2, "no data-area buffer taken");
        r.on_event(&mut f, Event::ReadDone { req: 0 }).unwrap();
        finish(&held, 0, &mut r, &mut f);
        finish(&held, 1, &mut r, &mut f);
        assert_eq!(f.data, [(0, "READ", Mr::DmaBuf(0x77)), (1, "WRITE", Mr::DmaBuf(0x77))]);
        r.on_event(&mut f, Event::SendDone { req: 0 }).unwrap();
        r.on_event(&mut f, Event::SendDone { req: 1 }).unwrap();
        assert_eq!((r.count(State::Free), pool.free_chunks()), (8, shared), "every chunk back in the queue's slab");
        assert_eq!(admin.queue.controller().unwrap().p2p.current().len(), 1, "the controller keeps its pool");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn revoked_p2p_memory_fails_its_transfers_and_the_controller_goes_on_in_host_memory() {
        let held = Held::default();
        let (t, dir) = p2p_target(&held);
        // One RDMA READ at a time, so a second host write waits for it with its chunk.
        let (admin, mut r, mut f) =
            nic_rig(&t, Fake { lkeys: vec![0x77], ..Fake::default() }, Limits { reads: 1, ..LIM });
        f.data.clear();
        recv(&mut r, &mut f, 0, &write_sqe(80, 0, 0xa));
        recv(&mut r, &mut f, 1, &write_sqe(81, 8, 0xb));
        recv(&mut r, &mut f, 2, &read_sqe(82, 16, 0xc));
        assert_eq!(
            (r.state(0), r.state(1), r.state(2)),
            (State::TransferringHostToController, State::TransferToControllerPending, State::Executing)
        );
        f.take();
        // The provider is reset.
        t.p2p().unwrap().pool(0).unwrap().revoke("0000:03:00.0 was reset".into());
        // The first write's data is in; the second's READ is never posted: it fails.
        r.on_event(&mut f, Event::ReadDone { req: 0 }).unwrap();
        let failed = Status::DATA_TRANSFER_ERROR.to_cqe_field();
        assert_eq!(
            f.take(),
            [Posted::Send { req: 1, cid: 81, status: failed, result: 0, write: None, invalidate: None }]
        );
        // The read's data is in revoked memory: an error instead of an RDMA WRITE.
        finish(&held, 2, &mut r, &mut f);
        assert_eq!(
            f.take(),
            [Posted::Send { req: 2, cid: 82, status: failed, result: 0, write: None, invalidate: None }]
        );
        finish(&held, 0, &mut r, &mut f);
        assert!(
            matches!(f.take()[..], [Posted::Send { req: 0, cid: 80, status: 0, .. }]),
            "a transfer already done completes"
        );
        for req in 0..3 {
            r.on_event(&mut f, Event::SendDone { req }).unwrap();
        }
        assert_eq!(r.count(State::Free), 8, "every command answered");
        // New commands: host memory, and the controller has dropped the pool.
        recv(&mut r, &mut f, 3, &write_sqe(83, 0, 0xd));
        assert_eq!(f.data.last().map(|d| (d.1, d.2)), Some(("READ", Mr::Data)));
        assert!(admin.queue.controller().unwrap().p2p.current().is_empty());
        assert_eq!(
            f.data.iter().filter(|d| d.2 != Mr::Data).count(),
            1,
            "only the first write's READ used the dma-buf"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_nic_that_refuses_the_dma_buf_falls_back_for_the_whole_controller() {
        // rxe's EOPNOTSUPP, the kernel's p2p check refusing the pair, a fault.
        for errno in [libc::EOPNOTSUPP, libc::EINVAL, libc::EFAULT] {
            let held = Held::default();
            let (t, dir) = p2p_target(&held);
            let (admin, mut r, mut f) = nic_rig(&t, Fake { reg_error: Some(errno), ..Fake::default() }, LIM);
            let ctrl = admin.queue.controller().unwrap().clone();
            assert!(ctrl.p2p.current().is_empty(), "errno {errno}: the controller dropped its pool");
            recv(&mut r, &mut f, 0, &write_sqe(60, 0, 0xa));
            r.on_event(&mut f, Event::ReadDone { req: 0 }).unwrap();
            assert_eq!(r.free_buffers(), 1, "the write holds a data-area buffer");
            finish(&held, 0, &mut r, &mut f);
            assert_eq!(f.data, [(0, "READ", Mr::Data), (0, "READ", Mr::Data)], "Connect data, then the write");
            // A queue that connects later does not try again.
            let mut g = Fake { lkeys: vec![0x99], ..Fake::default() };
            let mut later = nic_requests(&t, 2, LIM);
            connect(&mut later, &mut g, 2, ctrl.cntlid);
            assert!(g.registered.is_empty(), "errno {errno}: registered again");
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[tokio::test]
    async fn connect_walks_read_execute_send_and_frees_everything() {
        let held = Held::default();
        let t = target(&held);
        let mut f = Fake::default();
        let mut r = requests(&t, 2, LIM);
        assert_eq!(connect(&mut r, &mut f, 0, 0xffff), 1, "cntlid");
        assert_eq!((r.count(State::Free), r.free_buffers()), (8, 2));
    }

    #[tokio::test]
    async fn reads_wait_for_depth_then_go_while_others_execute() {
        let Rig { held, _admin, mut f, mut r } = io_rig(|t| requests(t, 4, Limits { reads: 1, ..LIM }));
        // Two host writes: one RDMA READ in flight at a time (ORD 1).
        recv(&mut r, &mut f, 0, &write_sqe(10, 0, 0xa));
        recv(&mut r, &mut f, 1, &write_sqe(11, 8, 0xb));
        assert_eq!(f.take(), [Posted::Recv(0), Posted::Read { req: 0, len: 4096, key: 0xa }, Posted::Recv(1)]);
        assert_eq!((r.state(0), r.state(1)), (State::TransferringHostToController, State::TransferToControllerPending));
        // The first write's data arrives: it executes (and stays at the backend) while the
        // second one's READ goes out.
        r.on_event(&mut f, Event::ReadDone { req: 0 }).unwrap();
        assert_eq!(f.take(), [Posted::Read { req: 1, len: 4096, key: 0xb }]);
        assert_eq!((r.state(0), r.state(1)), (State::Executing, State::TransferringHostToController));
        r.on_event(&mut f, Event::ReadDone { req: 1 }).unwrap();
        assert_eq!(r.count(State::Executing), 2);
        // The backend finishes them out of order; responses follow completion order.
        finish(&held, 1, &mut r, &mut f);
        finish(&held, 0, &mut r, &mut f);
        let sends: Vec<u16> = f
            .take()
            .iter()
            .map(|p| match p {
                Posted::Send { cid, status: 0, write: None, .. } => *cid,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sends, [11, 10]);
        // A write's buffer is free once executed; the contexts once their SENDs complete.
        assert_eq!(r.free_buffers(), 4);
        r.on_event(&mut f, Event::SendDone { req: 0 }).unwrap();
        r.on_event(&mut f, Event::SendDone { req: 1 }).unwrap();
        assert_eq!(r.count(State::Free), 8);
    }

    #[tokio::test]
    async fn a_request_waits_for_a_buffer_until_one_is_given_back() {
        let Rig { held, _admin, mut f, mut r } = io_rig(|t| requests(t, 1, LIM));
        recv(&mut r, &mut f, 0, &read_sqe(20, 0, 0xa));
        recv(&mut r, &mut f, 1, &read_sqe(21, 8, 0xb));
        assert_eq!((r.state(0), r.state(1)), (State::Executing, State::NeedBuffer));
        assert_eq!(f.take(), [Posted::Recv(0), Posted::Recv(1)], "both receives went back at once");
        finish(&held, 0, &mut r, &mut f);
        // Host read: RDMA WRITE of the data chained with the SEND; the buffer is busy until
        // the SEND completes.
        assert_eq!(
            f.take(),
            [Posted::Send { req: 0, cid: 20, status: 0, result: 0, write: Some(4096), invalidate: None }]
        );
        assert_eq!(r.state(1), State::NeedBuffer);
        r.on_event(&mut f, Event::SendDone { req: 0 }).unwrap();
        assert_eq!(r.state(1), State::Executing, "the freed buffer went to the waiting request");
    }

    #[test]
    fn a_command_takes_the_smallest_free_buffer_that_fits() {
        let classes = Mapping::host(16384 + 2 * 4096 + 8192).unwrap().split(&[(1, 16384), (2, 4096), (1, 8192)]);
        let mut b = Buffers::new(classes);
        assert_eq!((b.largest(), b.free()), (16384, 4));
        let (x, y) = (b.take(100).unwrap(), b.take(4096).unwrap());
        assert_eq!((x.len(), y.len()), (4096, 4096));
        let z = b.take(10).unwrap();
        assert_eq!(z.len(), 8192, "the small ones used up: the next class");
        assert!(b.can(16384) && !b.can(16385));
        assert_eq!(b.take(9000).unwrap().len(), 16384);
        assert!(b.take(1).is_none() && !b.can(1));
        b.give(z);
        b.give(x);
        assert_eq!(b.take(4096).unwrap().len(), 4096, "back in its own class");
        assert_eq!(b.take(4096).unwrap().len(), 8192);
    }

    #[tokio::test]
    async fn small_commands_are_not_held_up_by_a_large_one_waiting() {
        let Rig { held, _admin, mut f, mut r } = io_rig(|t| {
            let classes = Mapping::host(2 * 4096 + 8192).unwrap().split(&[(2, 4096), (1, 8192)]);
            Requests::new(Queue::new(t.clone(), port()), classes, LIM)
        });
        let mut big = read_sqe(70, 0, 0xa);
        (big.dptr.length, big.cdw12) = ((8192 | 0xa << 24).into(), 15.into());
        // The large buffer goes to the first 8 KiB read: the second waits ...
        recv(&mut r, &mut f, 0, &big);
        big.cid = 71.into();
        recv(&mut r, &mut f, 1, &big);
        assert_eq!((r.state(0), r.state(1)), (State::Executing, State::NeedBuffer));
        // ... while 4 KiB reads behind it take the small buffers.
        recv(&mut r, &mut f, 2, &read_sqe(72, 0, 0xa));
        recv(&mut r, &mut f, 3, &read_sqe(73, 8, 0xa));
        assert_eq!((r.state(2), r.state(3)), (State::Executing, State::Executing));
        recv(&mut r, &mut f, 4, &read_sqe(74, 16, 0xa));
        assert_eq!(r.state(4), State::NeedBuffer, "no small buffer left and the large one is taken");
        finish(&held, 0, &mut r, &mut f);
        r.on_event(&mut f, Event::SendDone { req: 0 }).unwrap();
        assert_eq!((r.state(1), r.state(4)), (State::Executing, State::NeedBuffer), "first in line first");
        finish(&held, 2, &mut r, &mut f);
        r.on_event(&mut f, Event::SendDone { req: 2 }).unwrap();
        assert_eq!(r.state(4), State::Executing);
    }

    #[tokio::test]
    async fn responses_wait_for_send_slots() {
        let Rig { held, _admin, mut f, mut r } = io_rig(|t| requests(t, 4, Limits { send_slots: 2, ..LIM }));
        recv(&mut r, &mut f, 0, &read_sqe(30, 0, 0xa));
        recv(&mut r, &mut f, 1, &read_sqe(31, 8, 0xb));
        f.take();
        finish(&held, 0, &mut r, &mut f);
        finish(&held, 1, &mut r, &mut f);
        // WRITE + SEND take both slots: the second response waits.
        assert_eq!((r.state(0), r.state(1)), (State::Completing, State::ReadyToComplete));
        assert_eq!(f.take().len(), 1);
        r.on_event(&mut f, Event::SendDone { req: 0 }).unwrap();
        assert_eq!(r.state(1), State::Completing);
        assert!(matches!(f.take()[..], [Posted::Send { cid: 31, write: Some(4096), .. }]));
    }

    #[tokio::test]
    async fn in_capsule_data_is_copied_out_before_its_receive_goes_back() {
        let Rig { held, _admin, mut f, mut r } = io_rig(|t| requests(t, 1, LIM));
        // Take the only buffer with a read, then send a write with in-capsule data.
        recv(&mut r, &mut f, 0, &read_sqe(40, 0, 0xa));
        let mut w = write_sqe(41, 8, 0);
        w.dptr.id = sgl::DATA_BLOCK_OFFSET;
        (w.dptr.addr, w.dptr.length, w.dptr.rsvd) = (0.into(), 4096.into(), [0; 3]);
        f.capsules.resize(2, Vec::new());
        f.capsules[1] = capsule(&w);
        f.capsules[1][64..64 + 4096].fill(0x77);
        r.on_event(&mut f, Event::Recv { idx: 1, len: 64 + 4096 }).unwrap();
        assert_eq!(r.state(1), State::NeedBuffer);
        assert_eq!(f.take(), [Posted::Recv(0)], "receive 1 still holds the data");
        assert_eq!(r.held_receives().collect::<Vec<_>>(), [1]);
        finish(&held, 0, &mut r, &mut f);
        r.on_event(&mut f, Event::SendDone { req: 0 }).unwrap();
        assert!(f.take().contains(&Posted::Recv(1)), "copied out, the receive goes back");
        assert_eq!(r.state(1), State::Executing);
        let op = &held.lock().unwrap().0[0];
        assert!(op.buf.as_ref().unwrap().bytes()[..4096].iter().all(|&b| b == 0x77));
    }

    #[tokio::test]
    async fn a_receive_without_a_free_context_waits_and_a_flood_is_fatal() {
        let Rig { held, _admin, mut f, mut r } =
            io_rig(|t| requests(t, 8, Limits { requests: 2, max_waiting: 1, ..LIM }));
        recv(&mut r, &mut f, 0, &read_sqe(50, 0, 0xa));
        recv(&mut r, &mut f, 1, &read_sqe(51, 8, 0xa));
        recv(&mut r, &mut f, 2, &read_sqe(52, 16, 0xa));
        assert_eq!(r.held_receives().collect::<Vec<_>>(), [2], "no context: the capsule waits in its receive");
        finish(&held, 0, &mut r, &mut f);
        r.on_event(&mut f, Event::SendDone { req: 0 }).unwrap();
        assert!(r.held_receives().next().is_none(), "started once a context was free");
        recv(&mut r, &mut f, 3, &read_sqe(53, 24, 0xa));
        f.capsules.push(capsule(&read_sqe(54, 24, 0xa)));
        let e = r.on_event(&mut f, Event::Recv { idx: 4, len: 64 }).unwrap_err();
        assert!(e.to_string().contains("more commands than its queue holds"), "{e}");
    }

    #[tokio::test]
    async fn refusals_and_bad_completions() {
        let held = Held::default();
        let t = target(&held);
        let mut f = Fake::default();
        let mut r = requests(&t, 1, LIM);
        // Any command before Connect: Command Sequence Error, answered without data.
        recv(&mut r, &mut f, 0, &read_sqe(60, 0, 0xa));
        assert_eq!(
            f.take(),
            [
                Posted::Recv(0),
                Posted::Send {
                    req: 0,
                    cid: 60,
                    status: Status::COMMAND_SEQUENCE_ERROR.dnr().to_cqe_field(),
                    result: 0,
                    write: None,
                    invalidate: None
                }
            ]
        );
        // A completion for a request that is not waiting for it ends the queue pair.
        assert!(r.on_event(&mut f, Event::ReadDone { req: 3 }).is_err());
        f.capsules[0] = vec![0; 32];
        assert!(r.on_event(&mut f, Event::Recv { idx: 0, len: 32 }).is_err(), "a capsule shorter than an SQE");
    }
}
