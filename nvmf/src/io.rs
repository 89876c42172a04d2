//! NVM I/O commands (NVMe NVM Command Set 1.0, 3): Read, Write, Flush, Write Zeroes, Dataset
//! Management, Compare. Each is checked (NSID, LBA range, transfer length), turned into
//! backend operations and submitted; its completion comes back inline or later, out of order,
//! through [`IoState::reap`]. One command may take several operations (Flush of every
//! namespace, a Deallocate per range): it completes when the last one does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use p2pnvmf_p2p::mem::{MappingPin, Window};
use tracing::warn;

use crate::Status;
use crate::ns::{BackendQueue, IoDone, IoError, IoRequest, Namespace, Op, Reaping};
use crate::request::{Completion, Exec, Request};
use crate::response::Response;
use crate::resv::{Group, HostId, Reservation, Verdict};
use crate::subsystem::Subsystem;
use crate::wire::{Sqe, io_opcode as opcode};

/// One namespace's backend queue on this queue, for the backend it was opened on (a reload
/// may put another backend behind the same NSID).
#[derive(Debug)]
struct NsQueue {
    nsid: u32,
    backend: Arc<dyn crate::Backend>,
    q: Box<dyn BackendQueue>,
}

impl NsQueue {
    fn serves(&self, ns: &Namespace) -> bool {
        serves(self.nsid, &self.backend, ns)
    }
}

/// Whether a backend queue for `nsid` on `backend` serves `ns` as it is now.
fn serves(nsid: u32, backend: &Arc<dyn crate::Backend>, ns: &Namespace) -> bool {
    nsid == ns.nsid && Arc::ptr_eq(backend, &ns.backend)
}

/// A backend queue being opened off the queue's task, and the operations waiting for it.
#[derive(Debug)]
struct Opening {
    nsid: u32,
    backend: Arc<dyn crate::Backend>,
    task: tokio::task::JoinHandle<Result<Box<dyn BackendQueue>, IoError>>,
    /// What the opening gave, once it finished.
    done: Option<Result<Box<dyn BackendQueue>, IoError>>,
    waiting: Vec<IoRequest>,
}

impl Opening {
    fn serves(&self, ns: &Namespace) -> bool {
        serves(self.nsid, &self.backend, ns)
    }
}

/// A command with operations in flight: the request, and how its operations stand.
#[derive(Debug)]
struct Inflight {
    /// Its buffer is away with the operation while one reads or writes it; a compare keeps
    /// the host's data here and reads what the namespace holds into `scratch`.
    req: Request,
    started: Instant,
    /// Bytes the command moves (reads and writes).
    len: usize,
    /// Operations not yet completed.
    remaining: usize,
    /// The first failure among its operations.
    status: Status,
    scratch: Option<Window>,
    /// The reservation view whose count of commands in flight holds it.
    entered: Option<usize>,
}

/// What an I/O command comes to once checked: the operations it submits.
#[derive(Debug)]
enum Planned {
    /// Flush of every namespace (NSID FFFFFFFFh).
    FlushAll,
    /// A read or write of the command's buffer (a compare reads into `scratch`).
    Data { op: Op, scratch: Option<Window> },
    /// One operation without data.
    One(Op),
    /// Deallocate of each range.
    Deallocate { ranges: Box<[(u64, u64)]> },
}

/// Commands in flight by tag, and compare buffers kept for reuse.
#[derive(Debug, Default)]
struct Commands {
    inflight: Vec<Option<Inflight>>,
    scratch: Vec<Window>,
    failures: FailureLog,
    /// Reservations of the namespaces this queue used, for its host (kept while a command
    /// counts on them: commands hold their index).
    views: Vec<ResvView>,
}

impl Drop for Commands {
    /// A queue that goes away with commands in flight no longer counts them: a Preempt and
    /// Abort waiting on them ends.
    fn drop(&mut self) {
        let entered: Vec<usize> = self.inflight.iter().flatten().filter_map(|f| f.entered).collect();
        for i in entered {
            self.leave(i);
        }
    }
}

/// What this queue knows of a namespace's reservation for its host: the verdict of the
/// version it last saw, and its count of commands in flight there (what a Preempt and Abort
/// waits on).
#[derive(Debug)]
struct ResvView {
    nsid: u32,
    resv: Arc<Reservation>,
    seen: u64,
    verdict: Verdict,
    /// Commands in flight there; `busy` shows it to a Preempt and Abort (this queue alone
    /// writes it, so a store does, no read-modify-write).
    count: u32,
    busy: Arc<AtomicU32>,
}

/// The reservation step of the I/O pipeline: whether this queue's host may run a command of
/// `group` on `ns` now (NVMe Base 2.0, 8.19), the command counted in flight first so that a
/// Preempt and Abort changing the reservation meanwhile either sees it or is seen by it. A
/// verdict is looked up again only when the reservation's version moved: one atomic load.
/// Returns the view whose count the command holds until [`Commands::complete`].
fn enter(views: &mut Vec<ResvView>, ns: &Namespace, host: &HostId, group: Group) -> Result<usize, Status> {
    let i = match views.iter().position(|v| v.nsid == ns.nsid && Arc::ptr_eq(&v.resv, &ns.resv)) {
        Some(i) => i,
        None => {
            let busy = ns.resv.track(host);
            let (seen, verdict) = ns.resv.verdict(host);
            views.push(ResvView { nsid: ns.nsid, resv: ns.resv.clone(), seen, verdict, count: 0, busy });
            views.len() - 1
        }
    };
    let v = &mut views[i];
    v.count += 1;
    // Stored, then the version loaded, both sequentially consistent: a change to the
    // reservation (its version moved after the state) either sees this count or is seen here.
    v.busy.store(v.count, Ordering::SeqCst);
    if v.resv.version() != v.seen {
        (v.seen, v.verdict) = v.resv.verdict(host);
    }
    match v.verdict.of(group) {
        Ok(()) => Ok(i),
        Err(s) => {
            v.count -= 1;
            v.busy.store(v.count, Ordering::Release);
            Err(s)
        }
    }
}

/// Lines a queue logs for failed I/O per second: a failing device fails every command, and
/// the log must stay readable (the metrics count every failure, by status).
const FAILURES_LOGGED_PER_SECOND: u32 = 5;

/// Which failed commands a queue logs: the first few of every second, the next line saying
/// how many went unlogged meanwhile.
#[derive(Debug, Default)]
struct FailureLog {
    second: Option<Instant>,
    logged: u32,
    unlogged: u64,
}

impl FailureLog {
    /// Whether to log a failure seen at `now`, and how many went unlogged before it.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.second.is_none_or(|s| now.duration_since(s).as_secs() >= 1) {
            (self.second, self.logged) = (Some(now), 0);
        }
        if self.logged == FAILURES_LOGGED_PER_SECOND {
            self.unlogged += 1;
            return None;
        }
        self.logged += 1;
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// A queue's I/O execution state: backend queues per namespace (opened on first use) and the
/// commands in flight.
#[derive(Debug, Default)]
pub(crate) struct IoState {
    queues: Vec<NsQueue>,
    opening: Vec<Opening>,
    cmds: Commands,
    /// The transport's data area, registered with each backend queue as it opens.
    area: Option<MappingPin>,
}

/// Starting LBA and block count (CDW10–12), checked against the namespace.
fn lba_range(ns: &Namespace, sqe: &Sqe) -> Result<(u64, u64), Status> {
    let slba = u64::from(sqe.cdw10.get()) | u64::from(sqe.cdw11.get()) << 32;
    let nlb = u64::from(sqe.cdw12.get() & 0xffff) + 1;
    match slba.checked_add(nlb) {
        Some(end) if end <= ns.blocks() => Ok((slba << ns.lba_shift, nlb << ns.lba_shift)),
        _ => Err(Status::LBA_OUT_OF_RANGE.dnr()),
    }
}

/// Dataset Management ranges (NVM Command Set 1.0, 3.2.3): 16 bytes each (context attributes,
/// length in blocks, starting LBA), all checked before any is acted on.
fn dsm_ranges(ns: &Namespace, sqe: &Sqe, data: &[u8], out: &mut [(u64, u64); 256]) -> Result<usize, Status> {
    let nr = (sqe.cdw10.get() & 0xff) as usize + 1;
    let ranges = data.get(..nr * 16).ok_or(Status::DATA_SGL_LENGTH_INVALID.dnr())?;
    for (i, r) in ranges.chunks_exact(16).enumerate() {
        let nlb = u64::from(u32::from_le_bytes(r[4..8].try_into().expect("4 bytes")));
        let slba = u64::from_le_bytes(r[8..16].try_into().expect("8 bytes"));
        match slba.checked_add(nlb) {
            Some(end) if end <= ns.blocks() => out[i] = (slba << ns.lba_shift, nlb << ns.lba_shift),
            _ => return Err(Status::LBA_OUT_OF_RANGE.dnr()),
        }
    }
    Ok(nr)
}

impl IoState {
    /// Starts an I/O command: its buffer holds the host's data (writes) or receives the data
    /// (reads). A command that finishes at once comes back `Done`; a submitted one is held —
    /// its buffer lent to the operation that moves it — until it comes out of
    /// [`IoState::reap`].
    pub(crate) fn start(
        &mut self,
        subsys: &Subsystem,
        host: &HostId,
        depth: usize,
        tag: u16,
        mut req: Request,
    ) -> Exec {
        let (planned, entered) = match self.plan(subsys, host, tag, &req) {
            Ok(p) => p,
            Err(s) => {
                if let Some(ns) = subsys.ns(req.sqe.nsid.get()) {
                    ns.metrics.record(opcode::rw(req.sqe.opcode), 0, s, std::time::Duration::ZERO);
                }
                req.response = Response::status(s);
                return Exec::Done(req);
            }
        };
        let nsid = req.sqe.nsid.get();
        match planned {
            Planned::FlushAll => {
                // Namespaces this head does not serve now, or a reservation keeps this host from
                // writing, are not flushed (nor counted for a Preempt and Abort: a flush changes
                // no data).
                let mut writable = Vec::new();
                for ns in subsys.namespaces.iter().filter(|ns| ns.ana.admit().is_ok()) {
                    if let Ok(i) = enter(&mut self.cmds.views, ns, host, Group::Write) {
                        self.cmds.leave(i);
                        writable.push(ns);
                    }
                }
                self.cmds.begin(tag, req, 0, writable.len(), None);
                for ns in writable {
                    self.submit(ns, depth, IoRequest { tag, op: Op::Flush, buf: None });
                }
            }
            Planned::Data { op, scratch } => {
                let len = match op {
                    Op::Read { len, .. } | Op::Write { len, .. } => len,
                    _ => 0,
                };
                let f = self.cmds.begin(tag, req, len, 1, entered);
                let buf = match scratch {
                    Some(s) => s,
                    None => f.req.buf.take().expect("checked by plan"),
                };
                let ns = subsys.ns(nsid).expect("checked by plan");
                self.submit(ns, depth, IoRequest { tag, op, buf: Some(buf) });
            }
            Planned::One(op) => {
                self.cmds.begin(tag, req, 0, 1, entered);
                let ns = subsys.ns(nsid).expect("checked by plan");
                self.submit(ns, depth, IoRequest { tag, op, buf: None });
            }
            Planned::Deallocate { ranges } => {
                self.cmds.begin(tag, req, 0, ranges.len(), entered);
                let ns = subsys.ns(nsid).expect("checked by plan");
                for &(offset, len) in &ranges {
                    self.submit(ns, depth, IoRequest { tag, op: Op::Deallocate { offset, len }, buf: None });
                }
            }
        }
        // Every operation may have finished inline already.
        match self.cmds.inflight.get(usize::from(tag)) {
            Some(Some(f)) if f.remaining == 0 => Exec::Done(self.cmds.complete(subsys, tag).req),
            _ => Exec::Submitted,
        }
    }

    /// Checks an I/O command against its namespace, the path (its ANA group's state on this
    /// head) and its reservation, and says what it submits.
    fn plan(
        &mut self,
        subsys: &Subsystem,
        host: &HostId,
        tag: u16,
        req: &Request,
    ) -> Result<(Planned, Option<usize>), Status> {
        if self.cmds.inflight.get(usize::from(tag)).is_some_and(Option::is_some) {
            warn!(tag, "a command was started on a tag still in flight");
            return Err(Status::INTERNAL_ERROR);
        }
        let (sqe, len) = (&req.sqe, req.len());
        let nsid = sqe.nsid.get();
        if sqe.opcode == opcode::FLUSH && nsid == u32::MAX {
            return Ok((Planned::FlushAll, None));
        }
        let ns = subsys.ns(nsid).ok_or(Status::INVALID_NAMESPACE.dnr())?;
        ns.ana.admit()?;
        let entered = match Group::of(sqe.opcode) {
            Some(group) => Some(enter(&mut self.cmds.views, ns, host, group)?),
            None => None,
        };
        let planned = match sqe.opcode {
            opcode::READ | opcode::WRITE | opcode::COMPARE => {
                let (offset, bytes) = lba_range(ns, sqe)?;
                if len as u64 != bytes {
                    return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
                }
                if req.buf.as_ref().is_none_or(|b| b.len() < len) {
                    warn!(tag, len, "no data buffer of the command's length");
                    return Err(Status::INTERNAL_ERROR);
                }
                // Compare reads what the namespace holds beside the host's data.
                let scratch = match sqe.opcode {
                    opcode::COMPARE => Some(self.cmds.scratch_for(len)?),
                    _ => None,
                };
                let op = match sqe.opcode {
                    opcode::WRITE => Op::Write { offset, len },
                    _ => Op::Read { offset, len },
                };
                Ok(Planned::Data { op, scratch })
            }
            opcode::FLUSH => Ok(Planned::One(Op::Flush)),
            opcode::WRITE_ZEROES => {
                let (offset, len) = lba_range(ns, sqe)?;
                Ok(Planned::One(Op::WriteZeroes { offset, len }))
            }
            opcode::DATASET_MANAGEMENT => {
                let data = req.buf.as_ref().map_or(&[][..], |b| &b.bytes()[..len.min(b.len())]);
                let mut ranges = [(0u64, 0u64); 256];
                let nr = dsm_ranges(ns, sqe, data, &mut ranges)?;
                // Only Deallocate (AD, CDW11 bit 2) has an effect.
                let dealloc = sqe.cdw11.get() & (1 << 2) != 0;
                let ranges = ranges[..nr].iter().filter(|r| dealloc && r.1 != 0).copied().collect();
                Ok(Planned::Deallocate { ranges })
            }
            _ => Err(Status::INVALID_OPCODE.dnr()),
        };
        Ok((planned?, entered))
    }

    /// Submits to `ns`'s backend queue (opened on first use: off the queue's task for a
    /// backend that opens slowly, the operation waiting meanwhile); an inline completion is
    /// accounted at once.
    fn submit(&mut self, ns: &Namespace, depth: usize, req: IoRequest) {
        if let Some(o) = self.opening.iter_mut().find(|o| o.serves(ns)) {
            o.waiting.push(req);
            return;
        }
        let q = match self.queues.iter().position(|q| q.serves(ns)) {
            Some(i) => &mut self.queues[i],
            None if ns.backend.opens_slowly() && tokio::runtime::Handle::try_current().is_ok() => {
                let backend = ns.backend.clone();
                let reaping = Reaping::here();
                let task = tokio::task::spawn_blocking(move || backend.open_queue(depth, reaping));
                let backend = ns.backend.clone();
                self.opening.push(Opening { nsid: ns.nsid, backend, task, done: None, waiting: vec![req] });
                return;
            }
            None => match Arc::clone(&ns.backend).open_queue(depth, Reaping::here()) {
                Ok(q) => self.add_queue(ns.nsid, ns.backend.clone(), q),
                Err(e) => {
                    warn!(nsid = ns.nsid, "opening the namespace's backend for this queue: {e}");
                    self.cmds.account(req.done(Err(e)));
                    return;
                }
            },
        };
        if let Some(done) = q.q.submit(req) {
            self.cmds.account(done);
        }
    }

    /// A backend queue opened for this queue: registered with the data area, and used from now on.
    fn add_queue(&mut self, nsid: u32, backend: Arc<dyn crate::Backend>, mut q: Box<dyn BackendQueue>) -> &mut NsQueue {
        if let Some(area) = &self.area {
            q.register(area);
        }
        self.queues.push(NsQueue { nsid, backend, q });
        self.queues.last_mut().expect("pushed")
    }

    /// Backend queues whose opening finished: the operations that waited go to them now, or
    /// fail with the reason; commands that thereby finished go to `out`.
    fn opened(&mut self, subsys: &Subsystem, out: &mut impl FnMut(Completion)) {
        while let Some(i) = self.opening.iter().position(|o| o.done.is_some()) {
            let o = self.opening.swap_remove(i);
            let mut finished = Vec::new();
            match o.done.expect("finished") {
                Ok(q) => {
                    let q = self.add_queue(o.nsid, o.backend, q);
                    finished.extend(o.waiting.into_iter().filter_map(|req| q.q.submit(req)));
                }
                Err(e) => {
                    warn!(nsid = o.nsid, "opening the namespace's backend for this queue: {e}");
                    // Each waiting operation gets the failure, its meaning kept for the host's status.
                    finished.extend(o.waiting.into_iter().map(|req| req.done(Err(e.replica()))));
                }
            }
            for d in finished {
                if let Some(tag) = self.cmds.account(d) {
                    out(self.cmds.complete(subsys, tag));
                }
            }
        }
    }

    /// Hands every command whose last operation finished to `out`, in completion order.
    pub(crate) fn reap(&mut self, subsys: &Subsystem, out: &mut impl FnMut(Completion)) {
        self.opened(subsys, out);
        let IoState { queues, cmds, .. } = self;
        for q in queues.iter_mut().filter(|q| q.q.in_flight() > 0) {
            q.q.reap(&mut |d| {
                if let Some(tag) = cmds.account(d) {
                    out(cmds.complete(subsys, tag));
                }
            });
        }
    }

    /// Ready when some backend queue has completions to reap (never, with none in flight).
    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut opened = false;
        for o in self.opening.iter_mut().filter(|o| o.done.is_none()) {
            if let Poll::Ready(r) = std::pin::Pin::new(&mut o.task).poll(cx) {
                o.done =
                    Some(r.unwrap_or_else(|e| Err(IoError::Unavailable(format!("opening the backend queue: {e}")))));
                opened = true;
            }
        }
        if opened || self.opening.iter().any(|o| o.done.is_some()) {
            return Poll::Ready(());
        }
        for q in &mut self.queues {
            if q.q.poll_ready(cx).is_ready() {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }

    /// After a reload: closes the backend queues of namespaces `subsys` no longer has (or has
    /// on another backend) once nothing is in flight on them; commands in flight there finish
    /// and complete as usual.
    pub(crate) fn retire(&mut self, subsys: &Subsystem) {
        self.queues.retain(|q| q.q.in_flight() > 0 || subsys.ns(q.nsid).is_some_and(|ns| q.serves(ns)));
        // Commands in flight hold their view's index: views go only when none is in flight.
        if self.cmds.inflight.iter().all(Option::is_none) {
            self.cmds.views.retain(|v| subsys.ns(v.nsid).is_some_and(|ns| Arc::ptr_eq(&ns.resv, &v.resv)));
        }
    }

    pub(crate) fn set_data_area(&mut self, area: MappingPin) {
        for q in &mut self.queues {
            q.q.register(&area);
        }
        self.area = Some(area);
    }

    /// Operations in flight on every backend queue of this queue.
    pub(crate) fn in_flight(&self) -> usize {
        let waiting: usize = self.opening.iter().map(|o| o.waiting.len()).sum();
        waiting + self.queues.iter().map(|q| q.q.in_flight()).sum::<usize>()
    }
}

impl Commands {
    /// Holds `req` in flight under `tag` with `ops` operations to wait for, `len` bytes to move.
    fn begin(&mut self, tag: u16, req: Request, len: usize, ops: usize, entered: Option<usize>) -> &mut Inflight {
        let t = usize::from(tag);
        if self.inflight.len() <= t {
            self.inflight.resize_with(t + 1, || None);
        }
        self.inflight[t].insert(Inflight {
            req,
            started: Instant::now(),
            len,
            remaining: ops,
            status: Status::SUCCESS,
            scratch: None,
            entered,
        })
    }

    /// A reused compare buffer of at least `len` bytes.
    fn scratch_for(&mut self, len: usize) -> Result<Window, Status> {
        match self.scratch.iter().position(|w| w.len() >= len) {
            Some(i) => Ok(self.scratch.swap_remove(i)),
            None => Window::host(len).map_err(|e| {
                warn!("compare buffer of {len} bytes: {e}");
                Status::INTERNAL_ERROR
            }),
        }
    }

    /// Counts one finished operation against its command; the tag when that was its last.
    fn account(&mut self, done: IoDone) -> Option<u16> {
        let Some(Some(f)) = self.inflight.get_mut(usize::from(done.tag)) else {
            warn!(tag = done.tag, "completion for a command not in flight");
            return None;
        };
        let (opcode, nsid) = (f.req.sqe.opcode, f.req.sqe.nsid.get());
        if let Err(e) = &done.result
            && f.status.is_success()
        {
            f.status = failure_status(opcode, e);
            if let Some(unlogged) = self.failures.admit(Instant::now()) {
                warn!(nsid, opcode, status = %f.status, unlogged, "I/O failed: {e}");
            }
        }
        match done.buf {
            // Compare read into the scratch buffer; other commands lent the request's buffer.
            Some(b) if opcode == opcode::COMPARE => f.scratch = Some(b),
            Some(b) => f.req.buf = Some(b),
            None => {}
        }
        f.remaining = f.remaining.saturating_sub(1);
        (f.remaining == 0).then_some(done.tag)
    }

    /// A command counted on view `i` no longer is.
    fn leave(&mut self, i: usize) {
        let v = &mut self.views[i];
        v.count -= 1;
        v.busy.store(v.count, Ordering::Release);
    }

    /// The request whose operations are all done, its response set.
    fn complete(&mut self, subsys: &Subsystem, tag: u16) -> Completion {
        let mut f = self.inflight[usize::from(tag)].take().expect("command in flight");
        if let Some(i) = f.entered {
            self.leave(i);
        }
        let (opcode, nsid) = (f.req.sqe.opcode, f.req.sqe.nsid.get());
        let mut response = Response::status(f.status);
        if f.status.is_success() {
            match opcode {
                opcode::READ => {
                    subsys.stats.record_read(f.len as u64);
                    response = Response::data(f.len);
                }
                opcode::WRITE => subsys.stats.record_write(f.len as u64),
                opcode::COMPARE => {
                    let same = match (&f.req.buf, &f.scratch) {
                        (Some(h), Some(s)) => h.bytes()[..f.len] == s.bytes()[..f.len],
                        _ => false,
                    };
                    if !same {
                        response = Response::status(Status::COMPARE_FAILURE.dnr());
                    }
                }
                _ => {}
            }
        }
        if let Some(ns) = subsys.ns(nsid) {
            ns.metrics.record(opcode::rw(opcode), f.len, response.status, f.started.elapsed());
        }
        if let Some(s) = f.scratch {
            self.scratch.push(s);
        }
        f.req.response = response;
        Completion { tag, req: f.req }
    }
}

/// The status a host gets for a command that failed below the target: an NVMe device's own
/// status as it is; an errno as nvmet's errno_to_nvme_status maps the few a host can act on,
/// and an I/O error of the storage (EIO, or ENODATA for the block layer's medium error) as the
/// media error an SSD reports for it (qemu's NVMe model does the same) — retryable, since a
/// transient fault may clear.
pub fn failure_status(op: u8, e: &IoError) -> Status {
    let errno = match e {
        IoError::Device { status, .. } => return *status,
        IoError::Unavailable(_) => return Status::NAMESPACE_NOT_READY,
        IoError::Os(e) => e.raw_os_error(),
    };
    match errno {
        Some(libc_errno::ENOSPC) => Status::CAPACITY_EXCEEDED.dnr(),
        Some(libc_errno::EINVAL) => Status::INVALID_FIELD.dnr(),
        Some(libc_errno::EOPNOTSUPP) => Status::INVALID_OPCODE.dnr(),
        Some(libc_errno::EIO | libc_errno::ENODATA) => match op {
            opcode::READ | opcode::COMPARE => Status::UNRECOVERED_READ_ERROR,
            opcode::WRITE | opcode::WRITE_ZEROES | opcode::FLUSH => Status::WRITE_FAULT,
            _ => Status::INTERNAL_ERROR,
        },
        _ => Status::INTERNAL_ERROR,
    }
}

/// Linux errnos (asm-generic/errno*.h), the ones the I/O path maps; nvmf has no libc.
mod libc_errno {
    pub const EIO: i32 = 5;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const ENODATA: i32 = 61;
    pub const EOPNOTSUPP: i32 = 95;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn a_failing_device_logs_a_few_lines_a_second_and_counts_the_rest() {
        let mut log = FailureLog::default();
        let t0 = Instant::now();
        let at = |ms| t0 + std::time::Duration::from_millis(ms);
        let first: Vec<_> = (0..8).map(|i| log.admit(at(i * 10))).collect();
        let n = FAILURES_LOGGED_PER_SECOND as usize;
        assert!(first[..n].iter().all(|l| *l == Some(0)), "{first:?}");
        assert!(first[n..].iter().all(Option::is_none), "{first:?}");
        // The next second's first line says how many the last one left out.
        assert_eq!(log.admit(at(1000)), Some(8 - n as u64));
        assert_eq!(log.admit(at(1001)), Some(0));
    }

    #[test]
    fn a_failure_keeps_its_meaning_at_the_wire() {
        let dev = |s: Status| IoError::Device { device: "0000:01:00.0".parse().unwrap(), status: s };
        // The SSD's own status, DNR and all, whatever the command.
        assert_eq!(
            failure_status(opcode::READ, &dev(Status::UNRECOVERED_READ_ERROR.dnr())),
            Status::UNRECOVERED_READ_ERROR.dnr()
        );
        assert_eq!(failure_status(opcode::WRITE, &dev(Status::LBA_OUT_OF_RANGE)), Status::LBA_OUT_OF_RANGE);
        // An errno: a storage I/O error is a media error of the command's direction.
        for errno in [5, 61] {
            assert_eq!(failure_status(opcode::READ, &IoError::errno(errno)), Status::UNRECOVERED_READ_ERROR);
            assert_eq!(failure_status(opcode::COMPARE, &IoError::errno(errno)), Status::UNRECOVERED_READ_ERROR);
            for op in [opcode::WRITE, opcode::WRITE_ZEROES, opcode::FLUSH] {
                assert_eq!(failure_status(op, &IoError::errno(errno)), Status::WRITE_FAULT);
            }
            assert_eq!(failure_status(opcode::DATASET_MANAGEMENT, &IoError::errno(errno)), Status::INTERNAL_ERROR);
        }
        assert_eq!(failure_status(opcode::WRITE, &IoError::errno(28)), Status::CAPACITY_EXCEEDED.dnr());
        assert_eq!(failure_status(opcode::WRITE, &IoError::errno(22)), Status::INVALID_FIELD.dnr());
        assert_eq!(failure_status(opcode::WRITE_ZEROES, &IoError::errno(95)), Status::INVALID_OPCODE.dnr());
        assert_eq!(
            failure_status(opcode::READ, &IoError::Os(io::ErrorKind::UnexpectedEof.into())),
            Status::INTERNAL_ERROR
        );
        // A device that does not work now: retryable, whatever the command.
        let gone = IoError::Unavailable("0000:01:00.0: controller fatal status".into());
        for op in [opcode::READ, opcode::WRITE, opcode::FLUSH] {
            assert_eq!(failure_status(op, &gone), Status::NAMESPACE_NOT_READY);
        }
        // The same failure for each operation it ends keeps its meaning.
        assert_eq!(failure_status(opcode::WRITE, &IoError::errno(28).replica()), Status::CAPACITY_EXCEEDED.dnr());
        assert_eq!(failure_status(opcode::READ, &gone.replica()), Status::NAMESPACE_NOT_READY);
    }
}
