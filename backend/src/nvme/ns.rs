//! An NVMe namespace behind the user-space driver as a target backend: each target I/O queue
//! gets an I/O queue pair of its own on the SSD (an eventfd on tokio, signalled by MSI-X vector
//! = queue id, or by the INTx thread in physical-address mode), every command of the target
//! queue in flight at the SSD, and transfers split at MDTS. Data goes by DMA from and into the
//! command's window where the SSD reaches it — device memory at its bus address, a queue's data
//! area registered with the IOMMU once — and through a per-command bounce buffer otherwise.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use p2pnvmf_nvmf::buffers::RequestFallbacks;
use p2pnvmf_nvmf::wire::{Cqe, Sqe, io_opcode as opcode};
use p2pnvmf_nvmf::{Backend, BackendQueue, DeviceFacts, IoDone, IoError, IoRequest, Op, Reaping, Status};
use p2pnvmf_p2p::addr::{BusAddr, Iova};
use p2pnvmf_p2p::mem::{MappingPin, Window};
use p2pnvmf_p2p::pci::{PciAddr, Sysfs};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};
use zerocopy::IntoBytes;

use super::Error;
use super::ctrl::{Addressing, Controller, Dma};
use super::pair::Pair;
use super::prp;
use super::queue::{QueuePair, status};
use super::spec::{self, IdNamespace};
use crate::moved::Moved;

const PAGE: usize = 4096;
/// Largest transfer in one command when MDTS says "no limit".
const MAX_PART: usize = 1 << 20;
/// A command the SSD has not completed after this long gets the controller given up on
/// (well inside a Linux host's 30 s I/O timeout, so the host hears an error, not silence).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a flush from outside any queue (at shutdown) may take.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a target queue's first command waits for a queue pair when every one the SSD
/// granted is in use: well inside a Linux host's 30 s I/O timeout.
const QUEUE_PAIR_WAIT: Duration = Duration::from_secs(20);
/// How often a queue with commands at the SSD looks at the controller's health.
const HEALTH_CHECK: Duration = Duration::from_secs(1);

/// ONCS bits (Identify Controller): Dataset Management, Write Zeroes.
const ONCS_DSM: u16 = 1 << 2;
const ONCS_WRITE_ZEROES: u16 = 1 << 3;

/// One namespace of an SSD the target owns. `sync` goes before `ctrl`: a queue pair holds the
/// register mapping, and the controller gives the function back only once nothing maps it.
#[derive(Debug)]
pub struct NvmeVfio {
    /// A queue pair for flushes from outside any target queue (shutdown).
    sync: Mutex<Option<QueuePair>>,
    ctrl: Arc<Controller>,
    nsid: u32,
    pub id: IdNamespace,
    /// log2 of the block size.
    shift: u32,
    /// Largest transfer per command.
    max_part: usize,
    facts: DeviceFacts,
}

impl NvmeVfio {
    /// Opens namespace `nsid` of the SSD at `pci`, with up to `queues` I/O queue pairs.
    pub fn open(sysfs: &Sysfs, pci: PciAddr, nsid: u32, queues: u16, mode: Addressing) -> Result<NvmeVfio, Error> {
        let ctrl = Controller::shared(sysfs, pci, queues.saturating_add(1), mode)?;
        let id = ctrl.namespace(nsid)?;
        if id.metadata != 0 || !matches!(id.block_size, 512 | 4096) {
            return Err(Error::Setup(format!(
                "{pci}: namespace {nsid} is formatted with {}-byte blocks and {} bytes of metadata; the target \
                 serves 512 or 4096-byte blocks without metadata",
                id.block_size, id.metadata
            )));
        }
        let max_part = ctrl.id.max_transfer(PAGE).unwrap_or(MAX_PART).min(MAX_PART);
        info!(%pci, nsid, blocks = id.nsze, block_size = id.block_size, max_part, vwc = ctrl.id.vwc, "NVMe namespace ready");
        let facts = DeviceFacts { nsfeat: id.nsfeat, nows: id.nows, dlfeat: id.dlfeat, oncs: ctrl.id.oncs };
        Ok(NvmeVfio { shift: id.block_size.trailing_zeros(), ctrl, nsid, id, max_part, facts, sync: Mutex::new(None) })
    }

    /// Calls `hook` with the reason when the controller is given up on.
    pub fn on_failure(&self, hook: impl Fn(&str) + Send + Sync + 'static) {
        self.ctrl.on_failure(Box::new(hook));
    }
}

impl Backend for NvmeVfio {
    fn size_bytes(&self) -> u64 {
        self.id.nsze << self.shift
    }

    fn lba_shift(&self) -> u32 {
        self.shift
    }

    fn device(&self) -> Option<&DeviceFacts> {
        Some(&self.facts)
    }

    fn health_log(&self) -> Option<Result<Vec<u8>, IoError>> {
        // SMART / Health Information for the whole controller: an admin command, waited for
        // with this worker's other tasks moved elsewhere.
        Some(off_the_worker(|| self.ctrl.log_page(0x02, u32::MAX, 512)).map_err(IoError::from))
    }

    fn volatile_write_cache(&self) -> bool {
        self.ctrl.id.vwc
    }

    #[allow(unsafe_code)]
    fn flush(&self) -> Result<(), IoError> {
        let mut sync = self.sync.lock().unwrap_or_else(|e| e.into_inner());
        if sync.is_none() {
            // Waited for by polling: no interrupts.
            *sync = self.ctrl.create_io_queue(2, false)?;
        }
        let q = sync
            .as_mut()
            .ok_or_else(|| IoError::Unavailable(format!("{}: no free I/O queue pair for a flush", self.ctrl.pci)))?;
        let sqe = spec::command(opcode::FLUSH, self.nsid, (0, 0), [0; 6]);
        // SAFETY: a Flush names no memory.
        Ok(unsafe { self.ctrl.run(q, sqe, 0, FLUSH_TIMEOUT) }.map(drop)?)
    }

    /// A queue pair is created by two admin commands, waited for by polling.
    fn opens_slowly(&self) -> bool {
        true
    }

    fn open_queue(self: Arc<Self>, depth: usize, reaping: Reaping) -> Result<Box<dyn BackendQueue>, IoError> {
        let depth = depth.clamp(1, 1023) as u16;
        let q = self.ctrl.open_pair(depth + 1, QUEUE_PAIR_WAIT, reaping)?.ok_or_else(|| {
            IoError::Unavailable(format!(
                "{}: every granted I/O queue pair is in use and the shared one is full (none given back within \
                 {QUEUE_PAIR_WAIT:?})",
                self.ctrl.pci
            ))
        })?;
        let irq = match reaping {
            Reaping::Signalled => Irq::Fd(Some(self.ctrl.irq(q.qid())?)),
            Reaping::Polled => Irq::Polled,
        };
        // One PRP list (or DSM range) page per command.
        let lists = self.ctrl.dma(usize::from(depth) * PAGE)?;
        let slots = (0..depth).map(|_| Slot::default()).collect();
        let own = self.ctrl.pci.to_string();
        Ok(Box::new(NvmeQueue {
            ns: self,
            q: Some(q),
            cqes: Vec::with_capacity(usize::from(depth)),
            irq,
            slots,
            free: (0..depth).rev().collect(),
            waiting: VecDeque::new(),
            backlog: VecDeque::new(),
            lists,
            mapped: Vec::new(),
            own,
            moved: Moved::default(),
            health: Box::pin(tokio::time::sleep(HEALTH_CHECK)),
            checked: Instant::now(),
            peers: Vec::new(),
            in_flight: 0,
            warned: false,
            fallbacks: RequestFallbacks::default(),
        }))
    }
}

/// Runs `f`, which waits on the SSD, letting a multi-threaded runtime move this worker's other
/// tasks elsewhere meanwhile (elsewhere — a test's single-threaded runtime, no runtime — it
/// just runs).
fn off_the_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A command of the target queue at the SSD: the request, how far its parts got, and the
/// bounce buffer when the SSD cannot reach its window.
#[derive(Debug, Default)]
struct Slot {
    req: Option<IoRequest>,
    /// Bytes (or blocks' bytes) done by earlier parts.
    done: u64,
    /// The current part's length in bytes.
    part: u64,
    bounce: Option<Dma>,
    /// Where the SSD finds the command's window; `None`: the data is in `bounce`.
    direct: Option<u64>,
    /// When the current part went to the SSD (or started waiting for room).
    since: Option<Instant>,
}

#[derive(Debug)]
enum Irq {
    /// Registered with tokio on first poll (the queue is created outside the runtime's task).
    Fd(Option<OwnedFd>),
    Async(AsyncFd<std::fs::File>),
    /// On a poller: the CQ is looked at on every turn, and a pair of its own raises no
    /// interrupt.
    Polled,
}

/// One target I/O queue's queue pair on the SSD. `ns` is the last field: the queue may hold
/// the controller's last reference, whose drop gives the function back — vfio-pci's unbind then
/// waits for every file and mapping of the device, the queue's own DMA memory among them.
#[derive(Debug)]
pub struct NvmeQueue {
    q: Option<Pair>,
    /// Completions taken from the queue pair, reused.
    cqes: Vec<Cqe>,
    irq: Irq,
    slots: Vec<Slot>,
    free: Vec<u16>,
    /// Commands whose next part waits for room in the SQ.
    waiting: VecDeque<u16>,
    /// Operations that wait for a free slot.
    backlog: VecDeque<IoRequest>,
    lists: Dma,
    /// Host memory mapped for the SSD by this queue: its data area (registered) and the
    /// mappings of windows seen (an NVMe/TCP slot's buffer), each with its IOVA and reserved
    /// span; kept alive and mapped until the queue closes.
    mapped: Vec<(MappingPin, Iova, u64)>,
    in_flight: usize,
    /// A host-memory window went through a bounce buffer (logged once per queue).
    warned: bool,
    fallbacks: RequestFallbacks,
    /// The SSD's PCI address as p2p windows name their provider.
    own: String,
    moved: Moved,
    /// Wakes the queue's task now and then while commands are at the SSD, to see to their
    /// health (an SSD that stopped answering raises no interrupt).
    health: Pin<Box<tokio::time::Sleep>>,
    /// When the controller's health was last looked at.
    checked: Instant,
    /// Bus addresses of peer memory this queue knows the SSD reaches.
    peers: Vec<BusAddr>,
    ns: Arc<NvmeVfio>,
}

/// Mappings a queue maps for the SSD on first sight, at most (a slot buffer each, and a few
/// that were outgrown); windows beyond go through a bounce buffer.
const MAPPED_PER_QUEUE: usize = 512;

impl NvmeQueue {
    /// Where the SSD finds byte 0 of `w`: in a mapping this queue mapped already, else in host
    /// memory it maps now (once per mapping); `None` for memory it cannot map (device memory,
    /// for now) or when mapping fails.
    fn device_addr(&mut self, w: &Window) -> Option<u64> {
        let at = |(pin, iova, _): &(MappingPin, Iova, u64)| (*iova + (w.as_ptr() as u64 - pin.range().0 as u64)).get();
        if let Some(m) = self.mapped.iter().find(|(pin, ..)| pin.holds(w)) {
            return Some(at(m));
        }
        if let Some(dev) = w.device() {
            // The SSD's own CMB: the bus address it was enabled at, plus the window's offset.
            if dev == self.own {
                let cmb = self.ns.ctrl.cmb.filter(|c| w.offset() as u64 + w.len() as u64 <= c.size)?;
                return Some((cmb.bus + w.offset() as u64).get());
            }
            // Peer memory: its bus address (its mapping mapped at that IOVA for the SSD, once).
            let bus = w.bus_addr()?;
            let base = BusAddr::new(bus.get() - w.offset() as u64);
            if self.peers.contains(&base) {
                return Some(bus.get());
            }
            return match self.ns.ctrl.peer(&w.pin_mapping(), base) {
                Ok(()) => {
                    self.peers.push(base);
                    Some(bus.get())
                }
                Err(e) => {
                    warn!(pci = %self.ns.ctrl.pci, provider = dev, "peer memory not reachable by the SSD (bounce buffers instead): {e}");
                    None
                }
            };
        }
        if self.mapped.len() >= MAPPED_PER_QUEUE || !self.ns.ctrl.maps_host_memory() {
            return None;
        }
        self.map(&w.pin_mapping()).map(|()| at(self.mapped.last().expect("just mapped")))
    }

    /// Maps host memory for the SSD until the queue closes.
    fn map(&mut self, pin: &MappingPin) -> Option<()> {
        match self.ns.ctrl.map(pin) {
            Ok((iova, span)) => {
                debug!(pci = %self.ns.ctrl.pci, %iova, bytes = pin.range().1, "host memory mapped for the SSD");
                self.mapped.push((pin.clone(), iova, span));
                Some(())
            }
            Err(e) => {
                warn!(pci = %self.ns.ctrl.pci, "host memory not mapped for the SSD (bounce buffers instead): {e}");
                None
            }
        }
    }

    /// The NVMe command for the next part of slot `cid`'s request.
    fn next_command(&mut self, cid: u16) -> io::Result<Sqe> {
        let ns = self.ns.clone();
        let (shift, nsid) = (ns.shift, ns.nsid);
        let list_at = usize::from(cid) * PAGE;
        let list_addr = self.lists.addr(list_at);
        let slot = &mut self.slots[usize::from(cid)];
        let direct = slot.direct;
        let req = slot.req.as_ref().expect("a slot in use holds its request");
        let blocks = |bytes: u64| bytes >> shift;
        let sqe = match req.op {
            Op::Read { offset, len } | Op::Write { offset, len } => {
                let part = (len as u64 - slot.done).min(ns.max_part as u64);
                slot.part = part;
                let done = slot.done;
                let bounce = slot.bounce.as_ref();
                // The SSD's address of byte `o` of this part: in the window, or in the bounce
                // buffer (whose huge pages need not be contiguous).
                let addr_of = |o: usize| match direct {
                    Some(a) => a + done + o as u64,
                    None => bounce.expect("bounce set at submission").addr(done as usize + o),
                };
                let mut list = [0u64; PAGE / 8];
                let (p1, p2, n) = prp::build(part as usize, PAGE, addr_of, &mut list, list_addr)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                if n > 0 {
                    self.lists.write(list_at, list[..n].as_bytes());
                }
                let slba = blocks(offset + slot.done);
                let opcode = if matches!(req.op, Op::Read { .. }) { opcode::READ } else { opcode::WRITE };
                let nlb = (blocks(part) - 1) as u32;
                spec::command(opcode, nsid, (p1, p2), [slba as u32, (slba >> 32) as u32, nlb, 0, 0, 0])
            }
            Op::Flush => spec::command(opcode::FLUSH, nsid, (0, 0), [0; 6]),
            Op::WriteZeroes { offset, len } => {
                // NLB is 16 bits, 0's based.
                let part = (len - slot.done).min(65536 << shift);
                slot.part = part;
                let slba = blocks(offset + slot.done);
                let nlb = (blocks(part) - 1) as u32;
                spec::command(opcode::WRITE_ZEROES, nsid, (0, 0), [slba as u32, (slba >> 32) as u32, nlb, 0, 0, 0])
            }
            Op::Deallocate { offset, len } => {
                // One range (NVM Command Set 1.0, Figure 39): attributes, length in blocks, SLBA.
                let part = (len - slot.done).min(u64::from(u32::MAX) << shift);
                slot.part = part;
                let slba = blocks(offset + slot.done);
                let mut range = [0u8; 16];
                range[4..8].copy_from_slice(&(blocks(part) as u32).to_le_bytes());
                range[8..].copy_from_slice(&slba.to_le_bytes());
                self.lists.write(list_at, &range);
                // NR 0 (one range), AD.
                spec::command(opcode::DATASET_MANAGEMENT, nsid, (list_addr, 0), [0, 1 << 2, 0, 0, 0, 0])
            }
        };
        let mut sqe = sqe;
        sqe.cid.set(cid);
        Ok(sqe)
    }

    /// Submits slot `cid`'s next part, or queues it until the SQ has room.
    fn issue(&mut self, cid: u16) -> io::Result<()> {
        let q = self.q.as_ref().expect("open");
        if !self.waiting.is_empty() || !q.has_room() {
            self.waiting.push_back(cid);
            return Ok(());
        }
        self.send(cid).map(drop)
    }

    /// Puts slot `cid`'s next part in the SQ, or at the front of those waiting for room when
    /// the SQ is full after all (a shared pair's other users took the room); false then.
    #[allow(unsafe_code)]
    fn send(&mut self, cid: u16) -> io::Result<bool> {
        let sqe = self.next_command(cid)?;
        // SAFETY: the entry names the slot's window (held in its request), its bounce buffer or
        // this queue's list page, all kept until the completion is taken; a queue dropped
        // with commands in flight waits for them, then deletes the SSD's queue pair, before
        // its slots and their windows go (`Drop for NvmeQueue`).
        if !unsafe { self.q.as_mut().expect("open").submit(&sqe) } {
            self.waiting.push_front(cid);
            return Ok(false);
        }
        self.slots[usize::from(cid)].since = Some(Instant::now());
        Ok(true)
    }

    /// Ends slot `cid`'s request with `r`: a read's bounced data goes to its window first.
    fn finish(&mut self, cid: u16, r: Result<(), IoError>) -> IoDone {
        let slot = &mut self.slots[usize::from(cid)];
        let mut req = slot.req.take().expect("a slot in use holds its request");
        if let (None, Op::Read { len, .. }, Ok(()), Some(w), Some(b)) =
            (slot.direct, req.op, &r, req.buf.as_mut(), &slot.bounce)
        {
            b.read(0, &mut w.bytes_mut()[..len]);
        }
        if r.is_ok() {
            // Through the window's memory when the SSD reached it, else through the bounce buffer.
            let memory = slot.direct.and(req.buf.as_ref()).and_then(Window::device);
            self.moved.count(&req.op, memory);
        }
        slot.since = None;
        self.free.push(cid);
        self.in_flight -= 1;
        req.done(r)
    }

    /// Starts `req` in free slot `cid`: `Some` when it failed at once.
    fn start(&mut self, cid: u16, req: IoRequest) -> Option<IoDone> {
        let slot = &mut self.slots[usize::from(cid)];
        (slot.req, slot.done, slot.part, slot.since) = (Some(req), 0, 0, Some(Instant::now()));
        self.in_flight += 1;
        if let Err(e) = self.prepare(cid).and_then(|()| Ok(self.issue(cid)?)) {
            return Some(self.finish(cid, Err(e)));
        }
        None
    }

    /// Finds where the SSD reaches a read's or write's window, or gives the request the bounce
    /// buffer (a write's data copied there).
    fn prepare(&mut self, cid: u16) -> Result<(), IoError> {
        let req = self.slots[usize::from(cid)].req.take().expect("set");
        let r = self.place(cid, &req);
        self.slots[usize::from(cid)].req = Some(req);
        r
    }

    fn place(&mut self, cid: u16, req: &IoRequest) -> Result<(), IoError> {
        let (Op::Read { len, .. } | Op::Write { len, .. }) = req.op else { return Ok(()) };
        let w = req.buf.as_ref().ok_or_else(|| io::Error::other("no buffer for a read or write"))?;
        let direct = self.device_addr(w);
        self.slots[usize::from(cid)].direct = direct;
        if direct.is_some() {
            return Ok(());
        }
        if let Some(provider) = w.device() {
            // p2p memory the SSD does not reach: a request-level fallback to host memory.
            let pci = self.ns.ctrl.pci;
            let why =
                format_args!("the SSD does not reach {provider}'s memory: data goes through a bounce buffer ({pci})");
            self.fallbacks.fall_back("ssd_cannot_reach", &why);
        } else if !self.warned {
            self.warned = true;
            let why = if self.ns.ctrl.maps_host_memory() {
                "not mapped for it"
            } else {
                "host memory outside the driver's huge pages, in physical-address mode"
            };
            warn!(pci = %self.ns.ctrl.pci, "the SSD cannot reach this queue's buffers ({why}): data goes through a bounce buffer (logged once per queue)");
        }
        let slot = &mut self.slots[usize::from(cid)];
        if slot.bounce.as_ref().is_none_or(|b| b.size() < len) {
            slot.bounce = Some(self.ns.ctrl.dma(len.next_power_of_two().max(PAGE))?);
        }
        if let (Op::Write { .. }, Some(b)) = (req.op, &mut slot.bounce) {
            b.write(0, &w.bytes()[..len]);
        }
        Ok(())
    }
}

impl NvmeQueue {
    /// With commands at the SSD: a controller found broken, or a command older than
    /// [`COMMAND_TIMEOUT`], gets the controller given up on (disabled, so it does no more DMA)
    /// and every command of the queue answered with the reason.
    fn see_to_health(&mut self, done: &mut dyn FnMut(IoDone)) {
        // A register read is a round trip to the device: at most once per HEALTH_CHECK.
        if self.in_flight == 0 || self.checked.elapsed() < HEALTH_CHECK && self.ns.ctrl.failed().is_none() {
            return;
        }
        self.checked = Instant::now();
        let oldest = self.slots.iter().filter_map(|s| s.since).min();
        let late = oldest.is_some_and(|t| t.elapsed() > COMMAND_TIMEOUT);
        let why = match self.ns.ctrl.check() {
            Err(e) => e.to_string(),
            Ok(()) if late => self.ns.ctrl.give_up(format!("a command got no completion within {COMMAND_TIMEOUT:?}")),
            Ok(()) => return,
        };
        self.waiting.clear();
        for req in self.backlog.drain(..) {
            done(req.done(Err(IoError::Unavailable(why.clone()))));
        }
        for cid in 0..self.slots.len() as u16 {
            if self.slots[usize::from(cid)].req.is_some() {
                done(self.finish(cid, Err(IoError::Unavailable(why.clone()))));
            }
        }
    }
}

impl BackendQueue for NvmeQueue {
    fn submit(&mut self, req: IoRequest) -> Option<IoDone> {
        let oncs = self.ns.ctrl.id.oncs;
        let unsupported = match req.op {
            Op::WriteZeroes { .. } => oncs & ONCS_WRITE_ZEROES == 0,
            Op::Deallocate { .. } => oncs & ONCS_DSM == 0,
            _ => false,
        };
        if unsupported {
            return Some(req.done(Err(IoError::errno(libc::EOPNOTSUPP))));
        }
        if let Some(why) = self.ns.ctrl.failed() {
            return Some(req.done(Err(IoError::Unavailable(why))));
        }
        // More operations than slots (a Dataset Management of many ranges on a busy queue):
        // the rest wait for a completion to free a slot.
        let Some(cid) = self.free.pop() else {
            self.backlog.push_back(req);
            return None;
        };
        self.start(cid, req)
    }

    fn reap(&mut self, done: &mut dyn FnMut(IoDone)) {
        let mut cqes = std::mem::take(&mut self.cqes);
        self.q.as_mut().expect("open").take_completions(&mut cqes);
        for cqe in cqes.drain(..) {
            let cid = cqe.cid.get();
            let Some(slot) = self.slots.get_mut(usize::from(cid)).filter(|s| s.req.is_some()) else {
                warn!(pci = %self.ns.ctrl.pci, cid, "completion for no command in flight; ignored");
                continue;
            };
            let total = match slot.req.as_ref().expect("checked").op {
                Op::Read { len, .. } | Op::Write { len, .. } => len as u64,
                Op::WriteZeroes { len, .. } | Op::Deallocate { len, .. } => len,
                Op::Flush => 0,
            };
            match status(&cqe) {
                0 => {
                    slot.done += slot.part;
                    if slot.done < total {
                        if let Err(e) = self.issue(cid) {
                            done(self.finish(cid, Err(e.into())));
                        }
                    } else {
                        done(self.finish(cid, Ok(())));
                    }
                }
                s => {
                    let e = IoError::Device { device: self.ns.ctrl.pci, status: Status::from_device(s) };
                    done(self.finish(cid, Err(e)));
                }
            }
        }
        self.cqes = cqes;
        self.see_to_health(done);
        // Completions made room: parts that waited go now, then operations that waited for a slot.
        while let Some(cid) = self.waiting.pop_front() {
            match self.send(cid) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => done(self.finish(cid, Err(e.into()))),
            }
        }
        while !self.backlog.is_empty()
            && let Some(cid) = self.free.pop()
        {
            let req = self.backlog.pop_front().expect("not empty");
            if let Some(d) = self.start(cid, req) {
                done(d);
            }
        }
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Irq::Fd(fd) = &mut self.irq {
            match crate::irq::watch(std::fs::File::from(fd.take().expect("registered once"))) {
                Ok(a) => self.irq = Irq::Async(a),
                Err(e) => {
                    warn!(pci = %self.ns.ctrl.pci, "registering the queue's interrupt eventfd: {e}");
                    return Poll::Pending;
                }
            }
        }
        if self.in_flight > 0 && self.health.as_mut().poll(cx).is_ready() {
            self.health.as_mut().reset(tokio::time::Instant::now() + HEALTH_CHECK);
            return Poll::Ready(());
        }
        // A share of a pair: completions another sharer took from the CQ.
        if self.q.as_ref().is_some_and(|q| q.has_inbox(cx.waker())) {
            return Poll::Ready(());
        }
        let fd = match &self.irq {
            Irq::Async(fd) => fd,
            Irq::Polled => return Reaping::look(cx, self.q.as_ref().is_some_and(Pair::posted), self.in_flight > 0),
            Irq::Fd(_) => unreachable!("registered above"),
        };
        loop {
            let mut guard = match fd.poll_read_ready(cx) {
                Poll::Ready(Ok(g)) => g,
                Poll::Ready(Err(_)) | Poll::Pending => return Poll::Pending,
            };
            // Drain the eventfd's count; the completions themselves are in the CQ.
            let mut count = [0u8; 8];
            match fd.get_ref().read(&mut count) {
                Ok(_) => {
                    guard.retain_ready();
                    return Poll::Ready(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(_) => return Poll::Pending,
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.backlog.len()
    }

    fn register(&mut self, area: &MappingPin) {
        if self.ns.ctrl.maps_host_memory() && self.mapped.iter().all(|(pin, ..)| pin.range() != area.range()) {
            self.map(area);
        }
    }
}

impl Drop for NvmeQueue {
    /// Waits for the SSD to finish every command (it may still DMA into their windows), then
    /// deletes the queue pair and unmaps the data area.
    fn drop(&mut self) {
        let start = std::time::Instant::now();
        while self.in_flight > 0 && start.elapsed() < std::time::Duration::from_secs(30) {
            self.reap(&mut |_| {});
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        if let Some(q) = self.q.take().and_then(Pair::close)
            && let Err(e) = self.ns.ctrl.delete_io_queue(q)
        {
            warn!(pci = %self.ns.ctrl.pci, "deleting an I/O queue pair: {e}");
        }
        for (_, iova, span) in self.mapped.drain(..) {
            if let Err(e) = self.ns.ctrl.unmap(iova, span) {
                warn!(pci = %self.ns.ctrl.pci, "unmapping host memory of a closed queue: {e}");
            }
        }
    }
}
