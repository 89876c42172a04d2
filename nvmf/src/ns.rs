//! Namespaces and the contract every backend implements.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use metrics::{Counter, Histogram};

use p2pnvmf_p2p::mem::{MappingPin, Window};
use p2pnvmf_p2p::pci::PciAddr;

use crate::Status;

/// One operation on a backend. Offsets and lengths are bytes, always multiples of the
/// namespace's block size and inside `size_bytes`: the I/O path checks before submitting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Into the request's window, its first `len` bytes.
    Read {
        offset: u64,
        len: usize,
    },
    /// From the request's window, its first `len` bytes.
    Write {
        offset: u64,
        len: usize,
    },
    Flush,
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    /// Dataset Management deallocate: the range reads back as zeroes afterwards (DLFEAT).
    Deallocate {
        offset: u64,
        len: u64,
    },
}

/// An operation for one command of a queue (`tag` names the command), with the data window it
/// reads into or writes from; the window stays with the operation until it is done.
#[derive(Debug)]
pub struct IoRequest {
    pub tag: u16,
    pub op: Op,
    pub buf: Option<Window>,
}

/// A finished operation, with its window back.
#[derive(Debug)]
pub struct IoDone {
    pub tag: u16,
    pub result: Result<(), IoError>,
    pub buf: Option<Window>,
}

impl IoRequest {
    pub fn done(self, result: Result<(), IoError>) -> IoDone {
        IoDone { tag: self.tag, result, buf: self.buf }
    }
}

/// Why an operation failed, kept as the layer below said it so that the host hears its
/// meaning (the I/O path maps it to the command's status).
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// An NVMe device completed the command with this status: the host gets it as it is.
    #[error("{device}: {status}")]
    Device { device: PciAddr, status: Status },
    /// The kernel's errno (file and block-device namespaces, and what a driver's own system
    /// calls return).
    #[error(transparent)]
    Os(#[from] io::Error),
    /// The device behind the namespace does not work now (an NVMe controller given up on, no
    /// I/O queue pair in time): the host gets Namespace Not Ready without DNR — it may retry
    /// later. (A path error would send a multipathing host back to this same path at once, in
    /// a loop, while ANA still calls it optimized.)
    #[error("{0}")]
    Unavailable(String),
}

impl IoError {
    pub fn errno(errno: i32) -> IoError {
        IoError::Os(io::Error::from_raw_os_error(errno))
    }

    /// The same failure again, for each of several operations it ends: its status, errno or
    /// reason kept (an errno-less system error keeps its words as a reason).
    pub fn replica(&self) -> IoError {
        match self {
            IoError::Device { device, status } => IoError::Device { device: *device, status: *status },
            IoError::Os(e) => match e.raw_os_error() {
                Some(errno) => IoError::errno(errno),
                None => IoError::Os(io::Error::new(e.kind(), e.to_string())),
            },
            IoError::Unavailable(why) => IoError::Unavailable(why.clone()),
        }
    }
}

/// Block storage behind a namespace. I/O goes through a [`BackendQueue`] per I/O queue, so
/// queues share nothing per I/O and each has many operations in flight.
pub trait Backend: Send + Sync + fmt::Debug {
    fn size_bytes(&self) -> u64;
    /// log2 of the logical block size the namespace serves (a device's own format).
    fn lba_shift(&self) -> u32 {
        9
    }
    /// Whether writes sit in a volatile cache until Flush (reported as VWC in Identify).
    fn volatile_write_cache(&self) -> bool;
    /// Flushes from outside any queue (at shutdown); may block.
    fn flush(&self) -> Result<(), IoError>;
    /// This backend's side of one I/O queue of `depth` commands, its completions found as
    /// `reaping` says.
    fn open_queue(self: Arc<Self>, depth: usize, reaping: Reaping) -> Result<Box<dyn BackendQueue>, IoError>;
    /// Whether [`Backend::open_queue`] blocks for a while (admin commands to a device): the
    /// core then opens the queue off the queue's task, its first operations waiting for it.
    fn opens_slowly(&self) -> bool {
        false
    }
    /// What a backend on an NVMe device says of it, passed through to hosts instead of the
    /// target's own values; `None` for storage that is no NVMe device.
    fn device(&self) -> Option<&DeviceFacts> {
        None
    }
    /// The device's SMART / Health Information log page (512 bytes), read now; may block
    /// briefly (an admin command).
    fn health_log(&self) -> Option<Result<Vec<u8>, IoError>> {
        None
    }
}

/// Identify fields of an NVMe namespace and its controller that hosts should see as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    /// Identify Namespace NSFEAT, NOWS (valid with NSFEAT bit 4) and DLFEAT.
    pub nsfeat: u8,
    pub nows: u16,
    pub dlfeat: u8,
    /// Identify Controller ONCS: what the device supports.
    pub oncs: u16,
}

/// How a backend queue's owner learns of its completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaping {
    /// The owner's task sleeps until the backend signals (an interrupt's eventfd, the
    /// io_uring's descriptor turning readable).
    Signalled,
    /// The owner runs on a poller (poll mode): [`BackendQueue::poll_ready`] looks for
    /// completions where the device posts them (a completion queue in memory) and, while
    /// operations are in flight, has the task polled again on the next turn; the device
    /// raises no interrupt where it can be told not to.
    Polled,
}

thread_local! {
    static POLLER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Reaping {
    /// How queues opened from this thread reap: polled on a poller's thread.
    pub fn here() -> Reaping {
        if POLLER.get() { Reaping::Polled } else { Reaping::Signalled }
    }

    /// Marks the calling thread a poller's (its runtime never sleeps).
    pub fn mark_poller_thread() {
        POLLER.set(true);
    }

    /// A polled queue's [`BackendQueue::poll_ready`]: ready when its look found a completion
    /// (`found`); otherwise, while operations are in flight, the task is polled again on the
    /// poller's next turn, and an idle queue asks for nothing.
    pub fn look(cx: &mut Context<'_>, found: bool, in_flight: bool) -> Poll<()> {
        if found {
            return Poll::Ready(());
        }
        if in_flight {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

/// Where one queue submits operations and collects their completions (SPDK's
/// COMPLETE/ASYNCHRONOUS, Firecracker's Executed/Submitted).
pub trait BackendQueue: Send + fmt::Debug {
    /// Starts `req`: `Some` when it finished already (an inline backend, or an error at
    /// submission), `None` when it is in flight and will come out of [`BackendQueue::reap`].
    fn submit(&mut self, req: IoRequest) -> Option<IoDone>;
    /// Hands every finished operation to `done`, in completion order.
    fn reap(&mut self, done: &mut dyn FnMut(IoDone));
    /// Ready when completions wait to be reaped: what a queue's task sleeps on. Never ready
    /// for a backend whose operations all finish inside `submit`.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()>;
    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// The queue's data area, which every window it lends comes from: a backend may register
    /// it with its device once (io_uring fixed buffers) instead of per operation.
    fn register(&mut self, _area: &MappingPin) {}
}

/// A namespace of a subsystem.
#[derive(Debug, Clone)]
pub struct Namespace {
    pub nsid: u32,
    pub backend: Arc<dyn Backend>,
    /// log2 of the logical block size.
    pub lba_shift: u32,
    pub ids: NsIds,
    /// Where its I/O buffers come from.
    pub buffers: crate::buffers::NsBuffers,
    pub metrics: NsMetrics,
    /// Its registrations and reservation, shared by every controller (kept by a reload that
    /// keeps the namespace).
    pub resv: Arc<crate::resv::Reservation>,
    /// Its ANA group on this head (whose state every path of the head reports).
    pub ana: Arc<crate::ana::Group>,
}

/// A namespace's I/O metrics, labelled `subnqn` and `nsid`: `p2pnvmf_io_commands_total` and
/// `p2pnvmf_io_bytes_total` by `op`, `p2pnvmf_io_latency_seconds` (from the command's start to
/// its completion at the backend) for reads and writes, and `p2pnvmf_io_errors_total` by
/// `status`. Handles are made once per namespace, so counting allocates nothing per command.
#[derive(Clone)]
pub struct NsMetrics {
    subnqn: Arc<str>,
    nsid: u32,
    /// read, write, other.
    commands: [Counter; 3],
    bytes: [Counter; 2],
    latency: [Histogram; 2],
}

impl fmt::Debug for NsMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NsMetrics({} nsid {})", self.subnqn, self.nsid)
    }
}

impl NsMetrics {
    fn new(subnqn: &str, nsid: u32) -> Self {
        let (s, n) = (subnqn.to_string(), nsid.to_string());
        let commands = ["read", "write", "other"].map(
            |op| metrics::counter!("p2pnvmf_io_commands_total", "subnqn" => s.clone(), "nsid" => n.clone(), "op" => op),
        );
        let bytes = ["read", "write"].map(
            |op| metrics::counter!("p2pnvmf_io_bytes_total", "subnqn" => s.clone(), "nsid" => n.clone(), "op" => op),
        );
        let latency = ["read", "write"]
            .map(|op| metrics::histogram!("p2pnvmf_io_latency_seconds", "subnqn" => s.clone(), "nsid" => n.clone(), "op" => op));
        NsMetrics { subnqn: subnqn.into(), nsid, commands, bytes, latency }
    }

    /// One finished command: `read` or `write` (else another command), the bytes it moved,
    /// its status and how long it took.
    pub(crate) fn record(&self, rw: Option<bool>, len: usize, status: crate::Status, took: Duration) {
        let i = match rw {
            Some(write) => usize::from(write),
            None => 2,
        };
        self.commands[i].increment(1);
        if !status.is_success() {
            // Errors are rare: a labelled handle made on the spot is fine.
            let code = format!("{:#06x}", u16::from(status.sct()) << 8 | u16::from(status.sc()));
            metrics::counter!("p2pnvmf_io_errors_total", "subnqn" => self.subnqn.to_string(),
                              "nsid" => self.nsid.to_string(), "status" => code)
            .increment(1);
        } else if i < 2 {
            self.bytes[i].increment(len as u64);
            self.latency[i].record(took.as_secs_f64());
        }
    }
}

/// A namespace's identifiers (NVMe Base 2.0, 4.7.1): what hosts key multipath, udev names
/// and "is this the same volume" on. An all-zero identifier is not reported, as the
/// specification reads zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NsIds {
    pub nguid: [u8; 16],
    pub uuid: [u8; 16],
    pub eui64: [u8; 8],
}

impl NsIds {
    /// NGUID and UUID derived from the subsystem NQN and NSID, so they stay the same across
    /// restarts; no EUI-64 (it needs an IEEE OUI of our own).
    pub fn derived(subnqn: &str, nsid: u32) -> Self {
        // Salts: "nguid" and "uuid" in ASCII.
        let nguid = stable_id(subnqn, nsid, 0x6e_6775_6964);
        let mut uuid = stable_id(subnqn, nsid, 0x7575_6964);
        // RFC 4122 version 8 (custom), variant 10.
        uuid[6] = (uuid[6] & 0x0f) | 0x80;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        NsIds { nguid, uuid, eui64: [0; 8] }
    }
}

impl NsIds {
    /// The UUID as RFC 4122 prints it, `None` when not reported.
    pub fn uuid_text(&self) -> Option<String> {
        reported(&self.uuid).then(|| crate::wire::uuid_text(&self.uuid))
    }

    /// The NGUID as 32 hex digits (as nvme-cli prints it), `None` when not reported.
    pub fn nguid_text(&self) -> Option<String> {
        reported(&self.nguid).then(|| crate::wire::hex(&self.nguid))
    }

    /// The EUI-64 as 16 hex digits, `None` when not reported.
    pub fn eui64_text(&self) -> Option<String> {
        reported(&self.eui64).then(|| crate::wire::hex(&self.eui64))
    }
}

/// Whether an identifier is reported: zero is not.
fn reported(id: &[u8]) -> bool {
    id.iter().any(|&b| b != 0)
}

impl Namespace {
    /// A namespace with the identifiers [`NsIds::derived`] gives; the configuration may set
    /// others (a volume that moved here keeps its identity).
    pub fn new(subnqn: &str, nsid: u32, backend: Arc<dyn Backend>) -> Self {
        let lba_shift = backend.lba_shift();
        let metrics = NsMetrics::new(subnqn, nsid);
        let ids = NsIds::derived(subnqn, nsid);
        let (buffers, resv) = (crate::buffers::NsBuffers::Host, Arc::default());
        let ana = crate::ana::Group::standalone(1);
        Namespace { nsid, backend, lba_shift, ids, buffers, metrics, resv, ana }
    }

    pub fn block_size(&self) -> u32 {
        1 << self.lba_shift
    }

    pub fn blocks(&self) -> u64 {
        self.backend.size_bytes() >> self.lba_shift
    }
}

/// 128 bits from two FNV-1a passes with different seeds: stable across builds and platforms.
fn stable_id(subnqn: &str, nsid: u32, salt: u64) -> [u8; 16] {
    let fnv = |seed: u64| {
        let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
        for b in subnqn.bytes().chain(nsid.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    };
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&fnv(salt).to_be_bytes());
    id[8..].copy_from_slice(&fnv(salt.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15).to_be_bytes());
    id
}

/// A backend of 1 MiB that stores nothing and finishes every operation at once: what tests and
/// benchmarks of the core put behind a namespace (the core's own cost is what is left).
#[derive(Debug)]
pub struct Null;

impl Backend for Null {
    fn size_bytes(&self) -> u64 {
        1 << 20
    }
    fn volatile_write_cache(&self) -> bool {
        false
    }
    fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }
    fn open_queue(self: Arc<Self>, _: usize, _: Reaping) -> Result<Box<dyn BackendQueue>, IoError> {
        Ok(Box::new(NullQueue))
    }
}

#[derive(Debug)]
struct NullQueue;

impl BackendQueue for NullQueue {
    fn submit(&mut self, req: IoRequest) -> Option<IoDone> {
        Some(req.done(Ok(())))
    }
    fn reap(&mut self, _: &mut dyn FnMut(IoDone)) {}
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<()> {
        Poll::Pending
    }
    fn in_flight(&self) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = Namespace::new("nqn.x", 1, Arc::new(Null));
        let b = Namespace::new("nqn.x", 1, Arc::new(Null));
        let c = Namespace::new("nqn.x", 2, Arc::new(Null));
        assert_eq!(a.ids, b.ids);
        assert_ne!(a.ids.nguid, c.ids.nguid);
        assert_ne!(a.ids.nguid, a.ids.uuid);
        assert_eq!(a.ids.uuid[6] >> 4, 8);
        assert_eq!(a.ids.eui64, [0; 8]);
        let ids = NsIds {
            uuid: *b"\x91\xfd\xba\x0d\xf8\x7b\x4c\x25\xb8\x0f\xdb\x7b\xe1\x41\x8b\x9e",
            nguid: [0; 16],
            eui64: [0xab; 8],
        };
        assert_eq!(ids.uuid_text().as_deref(), Some("91fdba0d-f87b-4c25-b80f-db7be1418b9e"));
        assert_eq!((ids.nguid_text(), ids.eui64_text().as_deref()), (None, Some("abababababababab")));
        assert_eq!(a.blocks(), 2048);
    }
}
