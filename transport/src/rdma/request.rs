//! The life of an NVMe/RDMA command, as one explicit state machine (after SPDK's
//! `spdk_nvmf_rdma_request_state`): every request is in exactly one state, a request waiting
//! for a resource sits in that resource's pending queue, and [`Requests::process`] advances
//! whatever can move until nothing can. Completions — of receives, RDMA READs, SENDs and
//! backend operations — arrive in any order and only feed this machine; every response leaves
//! through one path ([`Requests::complete`] → `ReadyToComplete` → SEND).
//!
//! Resources a request waits for, each with its own queue:
//! - a request context (`need_request`): a receive whose capsule has no context yet;
//! - a data buffer (`need_buffer`): a window of the queue's data area;
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

use p2pnvmf_nvmf::wire::{Cqe, Sqe, sgl};
use p2pnvmf_nvmf::{Completion, Controller, Direction, Exec, Queue, Response, Status};
use p2pnvmf_p2p::mem::Window;
use tracing::{debug, info, trace};
use zerocopy::FromBytes;

/// A keyed SGL data block: where the host's buffer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keyed {
    pub addr: u64,
    pub len: usize,
    pub key: u32,
    pub invalidate: bool,
}

/// What the state machine asks of the queue pair. The real one posts verbs work requests;
/// tests use a fake that records them.
pub trait Verbs {
    /// Gives receive buffer `idx` back to the device.
    fn post_recv(&mut self, idx: usize) -> io::Result<()>;
    /// RDMA READ of the host's `remote` buffer into the first `len` bytes of `buf`; completes
    /// as [`Event::ReadDone`] for `req`.
    fn post_read(&mut self, req: u16, buf: &Window, len: usize, remote: &Keyed) -> io::Result<()>;
    /// SEND of `cqe` from request `req`'s response buffer, after an RDMA WRITE of `write`'s
    /// first bytes to the host when given (one chained post); completes as
    /// [`Event::SendDone`] for `req`. `invalidate` makes it SEND_WITH_INV.
    fn post_send(
        &mut self,
        req: u16,
        cqe: &Cqe,
        write: Option<(&Window, usize, &Keyed)>,
        invalidate: Option<u32>,
    ) -> io::Result<()>;
    /// The capsule in receive buffer `idx`.
    fn capsule(&self, idx: usize) -> &[u8];
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

#[derive(Debug)]
struct Req {
    state: State,
    sqe: Sqe,
    /// A receive buffer still held (in-capsule data not copied out yet).
    recv: Option<usize>,
    /// In-capsule data: offset after the SQE and length.
    icd: Option<(usize, usize)>,
    keyed: Option<Keyed>,
    /// The command's data length.
    len: usize,
    buf: Option<Window>,
    response: Response,
    cid: u16,
    /// Send-queue slots its posts hold until the SEND completes.
    wrs: usize,
}

impl Req {
    fn new() -> Self {
        Req {
            state: State::Free,
            sqe: Sqe::default(),
            recv: None,
            icd: None,
            keyed: None,
            len: 0,
            buf: None,
            response: Response::ok(),
            cid: 0,
            wrs: 0,
        }
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
    buffers: Vec<Window>,
    need_request: VecDeque<(usize, usize)>,
    need_buffer: VecDeque<u16>,
    need_read: VecDeque<u16>,
    need_send: VecDeque<u16>,
    /// Async event completions waiting for a request context.
    events: VecDeque<(u16, u32)>,
    reads_out: usize,
    send_free: usize,
    lim: Limits,
    pub queue: Queue,
    /// Completions reaped from the core, reused.
    reaped: Vec<Completion>,
}

/// Why a queue pair cannot go on.
pub type Fatal = io::Error;

impl Requests {
    /// A queue's requests over `buffers` (its data area, one window per buffer).
    pub fn new(queue: Queue, buffers: Vec<Window>, lim: Limits) -> Requests {
        let n = lim.requests;
        Requests {
            reqs: (0..n).map(|_| Req::new()).collect(),
            free: (0..n as u16).rev().collect(),
            buffers,
            need_request: VecDeque::with_capacity(lim.max_waiting + 1),
            need_buffer: VecDeque::with_capacity(n),
            need_read: VecDeque::with_capacity(n),
            need_send: VecDeque::with_capacity(n),
            events: VecDeque::new(),
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
        self.buffers.len()
    }

    fn set(&mut self, req: u16, state: State) {
        let r = &mut self.reqs[usize::from(req)];
        trace!(req, cid = r.cid, from = ?r.state, to = ?state, "rdma request");
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
        let plan = self.queue.admit(&sqe).and_then(|()| self.plan(&sqe, len - 64));
        let r = &mut self.reqs[usize::from(req)];
        *r = Req { cid: sqe.cid.get(), sqe, ..Req::new() };
        trace!(req, cid = r.cid, opcode = sqe.opcode, "rdma request: new");
        match plan {
            Err(status) => {
                v.post_recv(idx)?;
                self.complete(req, Response::status(status));
            }
            Ok(Plan::InCapsule(o, l)) => {
                (r.recv, r.icd, r.len) = (Some(idx), Some((o, l)), l);
                self.wait_buffer(req);
            }
            Ok(Plan::Keyed(k)) if k.len > 0 => {
                (r.keyed, r.len) = (Some(k), k.len);
                v.post_recv(idx)?;
                self.wait_buffer(req);
            }
            Ok(Plan::Keyed(k)) => {
                r.keyed = Some(k);
                v.post_recv(idx)?;
                self.execute(req);
            }
            Ok(Plan::None) => {
                v.post_recv(idx)?;
                self.execute(req);
            }
        }
        Ok(())
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
                if len > self.lim.max_xfer {
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

    fn wait_buffer(&mut self, req: u16) {
        self.set(req, State::NeedBuffer);
        self.need_buffer.push_back(req);
    }

    /// The buffer is there: copy in-capsule data out (and give the receive buffer back),
    /// fetch the host's data, or execute.
    fn have_buffer(&mut self, v: &mut impl Verbs, req: u16, mut buf: Window) -> Result<(), Fatal> {
        let r = &mut self.reqs[usize::from(req)];
        if let (Some(idx), Some((o, l))) = (r.recv.take(), r.icd) {
            buf.bytes_mut()[..l].copy_from_slice(&v.capsule(idx)[64 + o..64 + o + l]);
            v.post_recv(idx)?;
        }
        r.buf = Some(buf);
        if r.keyed.is_some() && Direction::of(&r.sqe) == Direction::HostToController {
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
        let (sqe, len) = (r.sqe, r.len);
        match self.queue.execute(req, &sqe, &mut r.buf, len) {
            Exec::Done(resp) => self.complete(req, resp),
            Exec::Submitted => self.set(req, State::Executing),
            // Held by the controller: answered through its events, with another context.
            Exec::Deferred => self.release(req),
        }
    }

    /// The one way to a response: queue it for the send queue.
    fn complete(&mut self, req: u16, mut resp: Response) {
        let r = &mut self.reqs[usize::from(req)];
        if r.icd.is_some() {
            // In-capsule data only ever flows to the controller.
            resp.data_len = 0;
        }
        r.response = resp;
        self.set(req, State::ReadyToComplete);
        self.need_send.push_back(req);
    }

    /// Commands the backends finished.
    pub fn reap(&mut self, v: &mut impl Verbs) -> Result<(), Fatal> {
        let mut done = std::mem::take(&mut self.reaped);
        self.queue.reap(&mut |c| done.push(c));
        for c in done.drain(..) {
            let r = &mut self.reqs[usize::from(c.tag)];
            if c.buf.is_some() {
                r.buf = c.buf;
            }
            if r.state != State::Executing {
                return Err(io::Error::other(format!(
                    "backend completion for request {} in state {:?}",
                    c.tag, r.state
                )));
            }
            self.complete(c.tag, c.response);
        }
        self.reaped = done;
        self.process(v)
    }

    /// Async Event Request completions from the controller.
    pub fn post_events(&mut self, v: &mut impl Verbs, ctrl: &Controller) -> Result<(), Fatal> {
        for (cid, dw0) in ctrl.take_async_completions() {
            info!(cntlid = ctrl.cntlid, cid, dw0 = format_args!("{dw0:#x}"), "async event completed");
            self.events.push_back((cid, dw0));
        }
        self.process(v)
    }

    /// Advances every waiting request that can move now, until nothing can.
    pub fn process(&mut self, v: &mut impl Verbs) -> Result<(), Fatal> {
        loop {
            let mut moved = false;
            // Responses first: they free what the others wait for.
            while let Some(&req) = self.need_send.front() {
                let r = &self.reqs[usize::from(req)];
                let write = r.keyed.filter(|k| {
                    Direction::of(&r.sqe) == Direction::ControllerToHost
                        && k.len > 0
                        && r.response.data_len > 0
                        && r.response.status.is_success()
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
                let k = r.keyed.expect("reads are keyed");
                v.post_read(req, r.buf.as_ref().expect("buffer before read"), k.len, &k)?;
                self.reads_out += 1;
                self.send_free -= 1;
                self.set(req, State::TransferringHostToController);
                moved = true;
            }
            while !self.buffers.is_empty()
                && let Some(req) = self.need_buffer.pop_front()
            {
                let buf = self.buffers.pop().expect("checked non-empty");
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
            while !self.free.is_empty()
                && let Some((cid, dw0)) = self.events.pop_front()
            {
                let req = self.free.pop().expect("checked non-empty");
                let r = &mut self.reqs[usize::from(req)];
                *r = Req { cid, ..Req::new() };
                self.complete(req, Response::result(dw0.into()));
                moved = true;
            }
            if !moved {
                return Ok(());
            }
        }
    }

    fn send(&mut self, v: &mut impl Verbs, req: u16, write: Option<Keyed>) -> Result<(), Fatal> {
        let r = &self.reqs[usize::from(req)];
        let cqe = self.queue.cqe(r.cid, &r.response);
        let invalidate = r.keyed.filter(|k| k.invalidate).map(|k| k.key);
        let data = write.map(|k| {
            let buf = r.buf.as_ref().expect("data to write lives in the buffer");
            (buf, (r.response.data_len as usize).min(k.len), k)
        });
        v.post_send(req, &cqe, data.as_ref().map(|(b, n, k)| (*b, *n, k)), invalidate)?;
        let wrs = 1 + usize::from(write.is_some());
        self.send_free -= wrs;
        let r = &mut self.reqs[usize::from(req)];
        r.wrs = wrs;
        // Data the host does not read back is no longer needed: the buffer serves the next.
        if write.is_none()
            && let Some(b) = r.buf.take()
        {
            self.buffers.push(b);
        }
        self.set(req, State::Completing);
        Ok(())
    }

    fn release(&mut self, req: u16) {
        let r = &mut self.reqs[usize::from(req)];
        if let Some(b) = r.buf.take() {
            self.buffers.push(b);
        }
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

#[derive(Debug, Clone, Copy)]
enum Plan {
    None,
    Keyed(Keyed),
    InCapsule(usize, usize),
}
