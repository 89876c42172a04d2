//! A namespace on a regular file or a block device. Each I/O queue has its own io_uring with
//! every command of the queue in flight at once (positional reads and writes, inline, only
//! when io_uring is unavailable); an O_DIRECT descriptor serves every request whose buffer,
//! offset and length are aligned, the page-cache descriptor the rest. Flush is fdatasync;
//! Write Zeroes and Deallocate are io_uring fallocate calls (zero range, punch hole), with
//! zeroing writes only where neither is supported. The namespace reports a volatile write
//! cache.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use p2pnvmf_nvmf::buffers::RequestFallbacks;
use p2pnvmf_nvmf::{Backend, BackendQueue, IoDone, IoError, IoRequest, Op, Reaping};
use p2pnvmf_p2p::mem::{MappingPin, Window};
use tracing::{info, warn};

use crate::moved::Moved;
use crate::uring::{self, Desc, Kind, Lends, Ring, ZEROES, ZEROES_LEN};

/// Memory alignment for O_DIRECT buffers (a page covers every logical block size in use).
pub const DIRECT_MEM_ALIGN: usize = 4096;
/// Offset and length granularity for O_DIRECT (the logical block size we expose).
const DIRECT_IO_ALIGN: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    IoUring,
    /// pread/pwrite, when io_uring is unavailable.
    Sync,
}

#[derive(Debug)]
pub struct FileBackend {
    path: PathBuf,
    file: File,
    direct: Option<File>,
    size: u64,
    engine: Engine,
    /// Zeroing methods this file or device refused (learnt once, then skipped).
    no_punch_hole: AtomicBool,
    no_zero_range: AtomicBool,
}

impl FileBackend {
    /// Opens `path` with the best engine available. A regular file is created or extended to
    /// `size` when given; a block device (or an existing file without `size`) serves its own
    /// size.
    pub fn open(path: &Path, size: Option<u64>) -> io::Result<Self> {
        let engine = match uring::available() {
            Ok(()) => Engine::IoUring,
            Err(e) => {
                warn!(path = %path.display(), "io_uring unavailable ({e}): using pread/pwrite");
                Engine::Sync
            }
        };
        Self::open_with(path, size, engine)
    }

    pub fn open_with(path: &Path, size: Option<u64>, engine: Engine) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(size.is_some()).open(path)?;
        let meta = file.metadata()?;
        let size = if meta.file_type().is_block_device() {
            (&file).seek(SeekFrom::End(0))?
        } else {
            match size {
                Some(s) if meta.len() < s => {
                    file.set_len(s)?;
                    s
                }
                Some(s) => s,
                None => meta.len(),
            }
        };
        let direct = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                // tmpfs and some network filesystems refuse O_DIRECT.
                info!(path = %path.display(), "O_DIRECT unavailable ({e}): page cache only");
                None
            }
        };
        Ok(FileBackend {
            path: path.to_path_buf(),
            file,
            direct,
            size,
            engine,
            no_punch_hole: AtomicBool::new(false),
            no_zero_range: AtomicBool::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    pub fn has_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The O_DIRECT descriptor when this request qualifies, else the page-cache one.
    fn fd_for(&self, ptr: usize, offset: u64, len: usize) -> &File {
        match &self.direct {
            Some(d)
                if ptr.is_multiple_of(DIRECT_MEM_ALIGN)
                    && offset.is_multiple_of(DIRECT_IO_ALIGN)
                    && (len as u64).is_multiple_of(DIRECT_IO_ALIGN) =>
            {
                d
            }
            _ => &self.file,
        }
    }
}

/// How a range is zeroed: tried in order until the file or device accepts one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zeroing {
    /// `FALLOC_FL_PUNCH_HOLE`: deallocates; reads return zeroes (on a block device, the
    /// kernel's zero-out with unmap, as BLKDISCARD would but with zeroes guaranteed).
    PunchHole,
    /// `FALLOC_FL_ZERO_RANGE`: zeroes in place (on a block device, BLKZEROOUT's path).
    ZeroRange,
    /// Writes of a page of zeroes: always works.
    Write,
}

const DEALLOCATE: [Zeroing; 3] = [Zeroing::PunchHole, Zeroing::ZeroRange, Zeroing::Write];
const WRITE_ZEROES: [Zeroing; 3] = [Zeroing::ZeroRange, Zeroing::PunchHole, Zeroing::Write];

impl Zeroing {
    fn fallocate_mode(self) -> Option<i32> {
        match self {
            Zeroing::PunchHole => Some(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
            Zeroing::ZeroRange => Some(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE),
            Zeroing::Write => None,
        }
    }
}

impl FileBackend {
    /// The zeroing methods for `op` in order, starting with the first not known to fail here.
    fn zeroing(&self, op: &Op) -> Option<(&'static [Zeroing; 3], usize)> {
        let order = match op {
            Op::WriteZeroes { .. } => &WRITE_ZEROES,
            Op::Deallocate { .. } => &DEALLOCATE,
            _ => return None,
        };
        let first = order.iter().position(|z| !self.refuses(*z)).unwrap_or(2);
        Some((order, first))
    }

    fn refuses(&self, z: Zeroing) -> bool {
        match z {
            Zeroing::PunchHole => self.no_punch_hole.load(Ordering::Relaxed),
            Zeroing::ZeroRange => self.no_zero_range.load(Ordering::Relaxed),
            Zeroing::Write => false,
        }
    }

    fn learn_refusal(&self, z: Zeroing) {
        let flag = match z {
            Zeroing::PunchHole => &self.no_punch_hole,
            Zeroing::ZeroRange => &self.no_zero_range,
            Zeroing::Write => return,
        };
        if !flag.swap(true, Ordering::Relaxed) {
            info!(path = %self.path.display(), method = ?z, "zeroing method not supported here; using the next one");
        }
    }

    /// The next step of `p`: the part of a read or write not done yet, a flush, or the
    /// current zeroing method for the rest of its range.
    fn step(&self, p: &Pending) -> Desc {
        let buf_ptr = p.req.buf.as_ref().map_or(0, |b| b.as_ptr() as usize);
        let rest = |offset: u64, len: u64| (offset + p.done, len - p.done);
        match p.req.op {
            Op::Read { offset, len } | Op::Write { offset, len } => {
                let (offset, left) = rest(offset, len as u64);
                let fd = self.fd_for(buf_ptr + p.done as usize, offset, left as usize).as_raw_fd();
                let at = p.done as usize;
                let kind = if matches!(p.req.op, Op::Read { .. }) { Kind::Read { at } } else { Kind::Write { at } };
                Desc { fd, kind, offset, len: left }
            }
            Op::Flush => Desc { fd: self.file.as_raw_fd(), kind: Kind::Fdatasync, offset: 0, len: 0 },
            Op::WriteZeroes { offset, len } | Op::Deallocate { offset, len } => {
                let (offset, left) = rest(offset, len);
                let fd = self.file.as_raw_fd();
                match p.zeroing.and_then(|(order, i)| order[i].fallocate_mode()) {
                    Some(mode) => Desc { fd, kind: Kind::Fallocate { mode }, offset, len: left },
                    None => Desc { fd, kind: Kind::WriteZeroes, offset, len: left.min(ZEROES_LEN as u64) },
                }
            }
        }
    }

    /// What a completion of `p`'s current step means: done (with the result) or a next step.
    fn advance(&self, p: &mut Pending, desc: &Desc, res: i32) -> Option<io::Result<()>> {
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            if let (Kind::Fallocate { .. }, Some((order, i))) = (desc.kind, p.zeroing)
                && matches!(-res, libc::EOPNOTSUPP | libc::ENODEV)
            {
                self.learn_refusal(order[i]);
                p.zeroing = Some((order, i + 1));
                return None;
            }
            return Some(Err(e));
        }
        let total = match p.req.op {
            Op::Read { len, .. } | Op::Write { len, .. } => len as u64,
            Op::WriteZeroes { len, .. } | Op::Deallocate { len, .. } if desc.kind == Kind::WriteZeroes => len,
            _ => return Some(Ok(())),
        };
        if res == 0 {
            // Past the end of the file (a file shrunk under us) or a device refusing writes.
            let kind = if matches!(desc.kind, Kind::Read { .. }) {
                io::ErrorKind::UnexpectedEof
            } else {
                io::ErrorKind::WriteZero
            };
            return Some(Err(kind.into()));
        }
        p.done += res as u64;
        (p.done >= total).then_some(Ok(()))
    }

    /// Runs `req` here and now with positional I/O (when io_uring is unavailable).
    fn run_sync(&self, req: &mut IoRequest) -> io::Result<()> {
        let ptr = req.buf.as_ref().map_or(0, |b| b.as_ptr() as usize);
        match (req.op, req.buf.as_mut()) {
            (Op::Read { offset, len }, Some(b)) => {
                self.fd_for(ptr, offset, len).read_exact_at(&mut b.bytes_mut()[..len], offset)
            }
            (Op::Write { offset, len }, Some(b)) => {
                self.fd_for(ptr, offset, len).write_all_at(&b.bytes()[..len], offset)
            }
            (Op::Read { .. } | Op::Write { .. }, None) => Err(io::Error::other("no buffer for a read or write")),
            (Op::Flush, _) => self.file.sync_data(),
            (Op::WriteZeroes { offset, len } | Op::Deallocate { offset, len }, _) => {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(ZEROES_LEN as u64) as usize;
                    self.file.write_all_at(&ZEROES[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
        }
    }
}

impl Backend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn volatile_write_cache(&self) -> bool {
        true
    }

    fn flush(&self) -> Result<(), IoError> {
        Ok(self.file.sync_data()?)
    }

    fn open_queue(self: Arc<Self>, depth: usize, reaping: Reaping) -> Result<Box<dyn BackendQueue>, IoError> {
        let ring = match self.engine {
            Engine::IoUring => Some(Ring::new(2 * depth as u32, reaping)?),
            Engine::Sync => None,
        };
        Ok(Box::new(FileQueue { file: self, ring, moved: Moved::default(), fallbacks: RequestFallbacks::default() }))
    }
}

/// An operation in flight: the request (with its window) and how far it got.
#[derive(Debug)]
struct Pending {
    req: IoRequest,
    /// Bytes done (reads, writes, zeroing writes).
    done: u64,
    /// Zeroing methods to try, and which one is current.
    zeroing: Option<(&'static [Zeroing; 3], usize)>,
    /// The device-memory window the kernel refused, parked while the request runs again in
    /// host memory (a request-level fallback).
    parked: Option<Window>,
}

impl Pending {
    fn new(file: &FileBackend, req: IoRequest) -> Pending {
        let zeroing = file.zeroing(&req.op);
        Pending { req, done: 0, zeroing, parked: None }
    }

    /// After the kernel refused this read or write on its device-memory window: the same
    /// request on a host bounce buffer (a write's data copied there first). `None` when there
    /// is nothing to fall back from.
    fn bounce(&mut self) -> Option<io::Result<()>> {
        let (Op::Read { len, .. } | Op::Write { len, .. }) = self.req.op else { return None };
        if self.parked.is_some() || self.req.buf.as_ref()?.device().is_none() {
            return None;
        }
        let mut host = match Window::host(len) {
            Ok(w) => w,
            Err(e) => return Some(Err(e)),
        };
        let dev = self.req.buf.take().expect("checked above");
        if matches!(self.req.op, Op::Write { .. }) {
            host.bytes_mut().copy_from_slice(&dev.bytes()[..len]);
        }
        self.req.buf = Some(host);
        self.parked = Some(dev);
        self.done = 0;
        Some(Ok(()))
    }

    /// The request with its own window back (a read's data copied into it from the bounce
    /// buffer), finished with `r`.
    fn finish(mut self, r: io::Result<()>) -> IoDone {
        if let Some(mut dev) = self.parked.take() {
            let host = self.req.buf.take().expect("a bounced request keeps its host buffer");
            if let (Op::Read { len, .. }, Ok(())) = (self.req.op, &r) {
                dev.bytes_mut()[..len].copy_from_slice(&host.bytes()[..len]);
            }
            self.req.buf = Some(dev);
        }
        self.req.done(r.map_err(IoError::Os))
    }
}

impl Lends for Pending {
    fn window(&self) -> Option<&Window> {
        self.req.buf.as_ref()
    }
}

/// Finishes `p` with `r`, counting what a successful read or write moved (a bounced request's
/// window is the host one until `finish` puts its own back).
fn finish_counted(moved: &mut Moved, p: Pending, r: io::Result<()>) -> IoDone {
    if r.is_ok() {
        moved.count(&p.req.op, p.req.buf.as_ref().and_then(Window::device));
    }
    p.finish(r)
}

/// One queue's side of a file backend: its own io_uring (none when io_uring is unavailable:
/// then every operation runs inline).
#[derive(Debug)]
pub struct FileQueue {
    file: Arc<FileBackend>,
    ring: Option<Ring<Pending>>,
    moved: Moved,
    fallbacks: RequestFallbacks,
}

impl FileQueue {
    /// Starts `p`'s next step; a refusal at submission finishes it with the error.
    fn start(file: &FileBackend, ring: &mut Ring<Pending>, p: Pending) -> Option<IoDone> {
        let desc = file.step(&p);
        ring.start(p, desc).err().map(|(p, e)| p.finish(Err(e)))
    }

    /// What to do with `p` finished with `r`: a read or write the kernel refused on device
    /// memory runs again in host memory (`true`); anything else is done — an I/O error of the
    /// storage is the host's to hear, not a reason to try other memory.
    fn falls_back(fallbacks: &mut RequestFallbacks, file: &FileBackend, p: &mut Pending, r: &io::Result<()>) -> bool {
        // The errnos of a refused pin: EREMOTEIO for p2p pages the I/O path may not use
        // (no FOLL_PCI_P2PDMA), EFAULT for memory without struct pages (a BAR's PFN mapping).
        let Err(e) = r else { return false };
        if !matches!(e.raw_os_error(), Some(libc::EREMOTEIO | libc::EFAULT)) {
            return false;
        }
        let provider = p.req.buf.as_ref().and_then(Window::device).map(str::to_owned);
        match p.bounce() {
            None => false,
            Some(Err(alloc)) => {
                warn!(path = %file.path.display(), "request cannot fall back to host memory: {alloc}");
                false
            }
            Some(Ok(())) => {
                let why = format_args!(
                    "the kernel refused the p2p buffer ({e}); retried in host memory ({}, provider {})",
                    file.path.display(),
                    provider.as_deref().unwrap_or("-")
                );
                fallbacks.fall_back("kernel_refused", &why);
                true
            }
        }
    }
}

impl BackendQueue for FileQueue {
    fn submit(&mut self, req: IoRequest) -> Option<IoDone> {
        let mut p = Pending::new(&self.file, req);
        let Some(ring) = &mut self.ring else {
            let mut r = self.file.run_sync(&mut p.req);
            if Self::falls_back(&mut self.fallbacks, &self.file, &mut p, &r) {
                r = self.file.run_sync(&mut p.req);
            }
            return Some(finish_counted(&mut self.moved, p, r));
        };
        Self::start(&self.file, ring, p)
    }

    fn reap(&mut self, done: &mut dyn FnMut(IoDone)) {
        let Some(ring) = &mut self.ring else { return };
        let (file, moved, fallbacks) = (&self.file, &mut self.moved, &mut self.fallbacks);
        ring.reap(|ring, mut p, desc, res| {
            let r = match file.advance(&mut p, &desc, res) {
                None => None,
                Some(r) if Self::falls_back(fallbacks, file, &mut p, &r) => None,
                Some(r) => Some(r),
            };
            let d = match r {
                Some(r) => finish_counted(moved, p, r),
                None => match Self::start(file, ring, p) {
                    Some(d) => d,
                    None => return,
                },
            };
            done(d);
        });
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.ring {
            Some(r) => r.poll_ready(cx),
            None => Poll::Pending,
        }
    }

    fn in_flight(&self) -> usize {
        self.ring.as_ref().map_or(0, Ring::in_flight)
    }

    fn register(&mut self, area: &MappingPin) {
        if let Some(ring) = &mut self.ring {
            let ok = ring.register(area);
            tracing::debug!(registered = ok, "data area as io_uring fixed buffers");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, dir: &Path) -> PathBuf {
        let path = dir.join(format!("p2pnvmf-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    /// Submits and waits for the completion (reaping, as a queue's task would when woken).
    fn run(q: &mut dyn BackendQueue, tag: u16, op: Op, buf: Option<Window>) -> IoDone {
        if let Some(d) = q.submit(IoRequest { tag, op, buf }) {
            return d;
        }
        let start = std::time::Instant::now();
        loop {
            let mut got = None;
            q.reap(&mut |d| got = Some(d));
            if let Some(d) = got {
                assert_eq!(d.tag, tag);
                return d;
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(10), "no completion");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn filled(len: usize, byte: u8) -> Window {
        let mut w = Window::host(len).unwrap();
        w.bytes_mut().fill(byte);
        w
    }

    fn roundtrip(engine: Engine) {
        let path = temp(&format!("{engine:?}"), &std::env::temp_dir());
        {
            let f = Arc::new(FileBackend::open_with(&path, Some(1 << 20), engine).unwrap());
            let mut q = f.clone().open_queue(32, Reaping::Signalled).unwrap();
            let d = run(&mut *q, 1, Op::Write { offset: 4096, len: 8192 }, Some(filled(8192, 0xab)));
            d.result.unwrap();
            assert_eq!(d.buf.unwrap().len(), 8192, "the window comes back");
            run(&mut *q, 2, Op::Flush, None).result.unwrap();
        }
        let f = Arc::new(FileBackend::open_with(&path, None, engine).unwrap());
        assert_eq!(f.size_bytes(), 1 << 20);
        let mut q = f.clone().open_queue(32, Reaping::Signalled).unwrap();
        let d = run(&mut *q, 3, Op::Read { offset: 4096, len: 8192 }, Some(filled(8192, 0)));
        d.result.unwrap();
        assert!(d.buf.unwrap().bytes().iter().all(|&b| b == 0xab));
        run(&mut *q, 4, Op::WriteZeroes { offset: 4096, len: 512 }, None).result.unwrap();
        run(&mut *q, 5, Op::Deallocate { offset: 8192, len: 4096 }, None).result.unwrap();
        let d = run(&mut *q, 6, Op::Read { offset: 4096, len: 8192 }, Some(filled(8192, 1)));
        let back = d.buf.unwrap();
        assert!(back.bytes()[..512].iter().all(|&b| b == 0), "write zeroes");
        assert!(back.bytes()[512..4096].iter().all(|&b| b == 0xab), "untouched");
        assert!(back.bytes()[4096..].iter().all(|&b| b == 0), "deallocated");
        let e = run(&mut *q, 7, Op::Read { offset: (1 << 20) - 512, len: 4096 }, Some(filled(4096, 0)));
        assert!(matches!(e.result, Err(IoError::Os(e)) if e.kind() == io::ErrorKind::UnexpectedEof));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn io_uring_engine_roundtrip() {
        uring::available().expect("io_uring on the test machine");
        roundtrip(Engine::IoUring);
    }

    /// Polled (a poller's queue): `poll_ready` looks at the ring's completion queue itself —
    /// no runtime here, so the ring's descriptor is never registered with one — and while an
    /// operation is in flight asks to be polled again at once; idle, it asks for nothing.
    #[test]
    fn a_polled_ring_is_looked_at_each_turn_and_never_waited_on() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        uring::available().expect("io_uring on the test machine");
        let path = temp("polled", &std::env::temp_dir());
        let f = Arc::new(FileBackend::open_with(&path, Some(1 << 20), Engine::IoUring).unwrap());
        let mut q = f.clone().open_queue(4, Reaping::Polled).unwrap();
        let count = Arc::new(Count(0.into()));
        let waker = std::task::Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(q.poll_ready(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::Relaxed), 0, "idle: no turn asked for");
        let req = IoRequest { tag: 9, op: Op::Write { offset: 0, len: 4096 }, buf: Some(filled(4096, 0x5a)) };
        assert!(q.submit(req).is_none(), "in flight");
        let start = std::time::Instant::now();
        let mut turns = 0;
        while q.poll_ready(&mut cx).is_pending() {
            turns += 1;
            assert_eq!(count.0.load(Ordering::Relaxed), turns, "each look that found nothing asks for the next turn");
            assert!(start.elapsed() < std::time::Duration::from_secs(10), "no completion");
        }
        let mut got = None;
        q.reap(&mut |d| got = Some(d));
        let d = got.expect("ready means a completion to reap");
        assert_eq!(d.tag, 9);
        d.result.unwrap();
        assert_eq!(q.in_flight(), 0);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn pread_fallback_roundtrip() {
        roundtrip(Engine::Sync);
    }

    #[test]
    fn a_queue_keeps_many_operations_in_flight_and_completes_each_once() {
        let path = temp("many", &std::env::temp_dir());
        let f = Arc::new(FileBackend::open_with(&path, Some(1 << 20), Engine::IoUring).unwrap());
        let mut q = f.clone().open_queue(64, Reaping::Signalled).unwrap();
        for tag in 0..64u16 {
            assert!(
                q.submit(IoRequest {
                    tag,
                    op: Op::Write { offset: u64::from(tag) * 4096, len: 4096 },
                    buf: Some(filled(4096, tag as u8))
                })
                .is_none()
            );
        }
        assert_eq!(q.in_flight(), 64, "all submitted before any is reaped");
        let mut seen = [false; 64];
        let start = std::time::Instant::now();
        while q.in_flight() > 0 {
            q.reap(&mut |d| {
                d.result.unwrap();
                assert!(!std::mem::replace(&mut seen[usize::from(d.tag)], true), "tag {} twice", d.tag);
            });
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
        }
        assert!(seen.iter().all(|&s| s));
        let d = run(&mut *q, 0, Op::Read { offset: 0, len: 64 * 4096 }, Some(filled(64 * 4096, 0xff)));
        let back = d.buf.unwrap();
        assert!(back.bytes().chunks(4096).enumerate().all(|(i, c)| c.iter().all(|&b| b == i as u8)));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn zeroing_falls_back_where_a_method_is_refused() {
        // tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE.
        let shm = Path::new("/dev/shm");
        assert!(shm.is_dir(), "/dev/shm on the test machine");
        let path = temp("zero", shm);
        let f = Arc::new(FileBackend::open_with(&path, Some(1 << 20), Engine::IoUring).unwrap());
        let mut q = f.clone().open_queue(8, Reaping::Signalled).unwrap();
        run(&mut *q, 1, Op::Write { offset: 0, len: 65536 }, Some(filled(65536, 0x5a))).result.unwrap();
        run(&mut *q, 2, Op::WriteZeroes { offset: 4096, len: 8192 }, None).result.unwrap();
        assert!(f.refuses(Zeroing::ZeroRange) && !f.refuses(Zeroing::PunchHole));
        let back = run(&mut *q, 3, Op::Read { offset: 0, len: 65536 }, Some(filled(65536, 1))).buf.unwrap();
        let b = back.bytes();
        assert!(
            b[..4096].iter().all(|&x| x == 0x5a)
                && b[4096..12288].iter().all(|&x| x == 0)
                && b[12288..].iter().all(|&x| x == 0x5a)
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_queue_dropped_with_operations_in_flight_settles_them_before_letting_go() {
        let path = temp("drop", &std::env::temp_dir());
        let f = Arc::new(FileBackend::open_with(&path, Some(4 << 20), Engine::IoUring).unwrap());
        let pool = p2pnvmf_p2p::pool::ChunkPool::host(1 << 18, 16).unwrap();
        let mut slab = pool.take(16);
        let mut q = f.clone().open_queue(16, Reaping::Signalled).unwrap();
        for tag in 0..16u16 {
            let mut w = slab.get(1 << 18).unwrap();
            w.bytes_mut().fill(7);
            let op = Op::Write { offset: u64::from(tag) << 18, len: 1 << 18 };
            assert!(q.submit(IoRequest { tag, op, buf: Some(w) }).is_none());
        }
        drop(slab);
        assert_eq!(pool.free_chunks(), 0, "every chunk is with an operation");
        // Dropping the queue cancels what has not started and waits for the rest: only then
        // do the windows go home.
        drop(q);
        assert_eq!(pool.free_chunks(), 16);
        let mut q = f.clone().open_queue(1, Reaping::Signalled).unwrap();
        let back = run(&mut *q, 0, Op::Read { offset: 0, len: 4 << 20 }, Some(filled(4 << 20, 0))).buf.unwrap();
        for region in back.bytes().chunks(1 << 18) {
            assert!(region.iter().all(|&b| b == 7) || region.iter().all(|&b| b == 0), "a write was cut short");
        }
        std::fs::remove_file(&path).unwrap();
    }

    /// Memory the CPU reaches but the kernel will not pin for a device's DMA — what a p2p
    /// buffer is to a driver that refuses it: a `memfd_secret` mapping, marked as device memory.
    #[allow(unsafe_code)]
    fn unpinnable(len: usize) -> Window {
        use std::os::fd::FromRawFd;
        // SAFETY: a plain syscall returning a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_memfd_secret, 0) };
        assert!(fd >= 0, "memfd_secret on the test machine: {}", io::Error::last_os_error());
        // SAFETY: the fd was just returned to us and is owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd as i32) };
        f.set_len(len as u64).unwrap();
        // SAFETY: a memfd of this test's own, sized before and mapped once.
        let m = unsafe { p2pnvmf_p2p::mem::Mapping::fd(f.as_raw_fd(), 0, len) }.unwrap();
        let m = m.device("test-provider".into(), None);
        m.into_windows(len).pop().unwrap()
    }

    #[test]
    fn a_p2p_buffer_the_kernel_refuses_is_retried_in_host_memory() {
        let path = temp("refused", &std::env::temp_dir());
        let f = Arc::new(FileBackend::open_with(&path, Some(1 << 20), Engine::IoUring).unwrap());
        assert!(f.has_direct(), "O_DIRECT on the test machine's temp directory");
        let mut w = unpinnable(1 << 16);
        // The kernel refuses the buffer for O_DIRECT, as it does p2p pages on a device that
        // cannot reach them.
        let refused = f.direct.as_ref().unwrap().write_at(w.bytes(), 0).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EFAULT));
        w.bytes_mut().fill(0x3c);
        let at = w.as_ptr();
        for engine in [Engine::IoUring, Engine::Sync] {
            let f = Arc::new(FileBackend::open_with(&path, None, engine).unwrap());
            let mut q = f.clone().open_queue(4, Reaping::Signalled).unwrap();
            let d = run(&mut *q, 1, Op::Write { offset: 1 << 16, len: 1 << 16 }, Some(w));
            d.result.unwrap();
            w = d.buf.unwrap();
            assert_eq!(w.as_ptr(), at, "the command ends with its own window");
            w.bytes_mut().fill(0);
            let d = run(&mut *q, 2, Op::Read { offset: 1 << 16, len: 1 << 16 }, Some(w));
            d.result.unwrap();
            w = d.buf.unwrap();
            assert!(w.bytes().iter().all(|&b| b == 0x3c), "{engine:?}: the read landed in the window");
        }
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[1 << 16..2 << 16].iter().all(|&b| b == 0x3c));
        std::fs::remove_file(&path).unwrap();
    }
}
