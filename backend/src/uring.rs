//! An io_uring for one queue of a backend: many operations in flight, completions reaped when
//! the ring's descriptor turns readable, or on a poller when its completion queue (shared
//! memory) holds some. Every operation's context — the data window its
//! buffer points into — is owned by the ring's table from submission to completion, and
//! dropping the ring waits for every operation, so the kernel never touches memory that was
//! given back or freed.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::task::{Context, Poll};

use io_uring::{IoUring, opcode, squeue, types};
use p2pnvmf_nvmf::Reaping;
use p2pnvmf_p2p::mem::{MappingPin, Window};
use tokio::io::unix::AsyncFd;

/// Whether io_uring works here (kernel support, no seccomp filter refusing it).
pub fn available() -> io::Result<()> {
    IoUring::new(2).map(drop)
}

/// What an operation's context lends it: the window its buffer points into.
pub(crate) trait Lends {
    fn window(&self) -> Option<&Window>;
}

/// One operation on a descriptor. `at` is the byte offset into the context's window where
/// the buffer starts (moving on after a short transfer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Read {
        at: usize,
    },
    Write {
        at: usize,
    },
    /// A write from a static page of zeroes (at most [`ZEROES_LEN`] bytes).
    WriteZeroes,
    Fdatasync,
    Fallocate {
        mode: i32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Desc {
    pub fd: RawFd,
    pub kind: Kind,
    pub offset: u64,
    pub len: u64,
}

/// Length of the static zero buffer zeroing writes use.
pub(crate) const ZEROES_LEN: usize = 64 << 10;
pub(crate) static ZEROES: [u8; ZEROES_LEN] = [0; ZEROES_LEN];

/// Mappings registered as fixed buffers (the queue's data area); a few suffice.
const FIXED_SLOTS: u32 = 4;

/// The ring's descriptor as tokio sees it (owned by the ring).
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

pub(crate) struct Ring<T> {
    /// Registered with tokio on first use; declared before `ring` so it is deregistered
    /// before the ring's descriptor closes.
    ready: Option<AsyncFd<RingFd>>,
    ring: IoUring,
    /// In-flight operations by user_data.
    ops: Vec<Option<(T, Desc)>>,
    free: Vec<u32>,
    in_flight: usize,
    /// Registered fixed buffers: the mapping each slot holds alive.
    fixed: Vec<MappingPin>,
    fixed_ok: bool,
    reaping: Reaping,
}

impl<T: Lends> Ring<T> {
    pub fn new(entries: u32, reaping: Reaping) -> io::Result<Ring<T>> {
        let ring = IoUring::new(entries.next_power_of_two().clamp(8, 4096))?;
        // Sparse fixed-buffer table (5.13+); without it, plain buffers serve every operation.
        let fixed_ok = ring.submitter().register_buffers_sparse(FIXED_SLOTS).is_ok();
        let (ops, free, fixed) = (Vec::new(), Vec::new(), Vec::new());
        Ok(Ring { ready: None, ring, ops, free, in_flight: 0, fixed, fixed_ok, reaping })
    }

    /// Ready when completions wait: the ring's descriptor polls readable then, or — polled —
    /// its completion queue holds an entry (a look at shared memory, no system call; while
    /// operations are in flight the task is polled again on the next turn).
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.reaping == Reaping::Polled {
            let found = !self.ring.completion().is_empty() || !self.ring.submission().is_empty();
            return Reaping::look(cx, found, self.in_flight > 0);
        }
        if self.ready.is_none() {
            // SAFETY: the descriptor belongs to `self.ring`, which outlives the registration
            // (field order: `ready` drops first).
            match unsafe { AsyncFd::register(RingFd(self.ring.as_raw_fd())) } {
                Ok(a) => self.ready = Some(a),
                Err(e) => {
                    tracing::error!("io_uring descriptor with tokio: {}", e.into_parts().1);
                    return Poll::Pending;
                }
            }
        }
        let ready = self.ready.as_ref().expect("registered above");
        match ready.poll_read_ready(cx) {
            Poll::Ready(r) => {
                // Cleared before the caller reaps: a completion after this wakes us again.
                if let Ok(mut g) = r {
                    g.clear_ready();
                }
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Registers a whole mapping (a queue's data area) as a fixed buffer, so operations on its
    /// windows skip pinning pages per I/O. False when the kernel refuses or the table is full.
    pub fn register(&mut self, pin: &MappingPin) -> bool {
        if !self.fixed_ok || self.fixed.len() >= FIXED_SLOTS as usize {
            return false;
        }
        if self.fixed.iter().any(|p| p.range() == pin.range()) {
            return true;
        }
        let pin = pin.clone();
        let (base, len) = pin.range();
        let iov = libc::iovec { iov_base: base.cast(), iov_len: len };
        // SAFETY: `pin` keeps the mapping alive for as long as the registration (the ring)
        // exists: it is stored below and dropped only with the ring.
        let r = unsafe { self.ring.submitter().register_buffers_update(self.fixed.len() as u32, &[iov], None) };
        if r.is_ok() {
            self.fixed.push(pin);
        }
        r.is_ok()
    }

    /// Hands `desc` to the kernel; the ring keeps `ctx` (and the window it lends) until the
    /// operation completes. An error leaves nothing in flight and gives `ctx` back.
    pub fn start(&mut self, ctx: T, desc: Desc) -> Result<(), (T, io::Error)> {
        let entry = match self.entry(&ctx, &desc) {
            Ok(e) => e,
            Err(e) => return Err((ctx, e)),
        };
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.ops.push(None);
                (self.ops.len() - 1) as u32
            }
        };
        let entry = entry.user_data(u64::from(slot));
        // SAFETY: the entry's buffer (if any) points into the window `ctx` lends, owned by
        // `self.ops` from here until its completion is reaped; Drop waits for every completion.
        let mut pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if !pushed {
            // The submission queue is full: hand it to the kernel, then there is room.
            let _ = self.ring.submit();
            // SAFETY: as above.
            pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        }
        if !pushed {
            self.free.push(slot);
            return Err((ctx, io::Error::other("io_uring submission queue full")));
        }
        self.ops[slot as usize] = Some((ctx, desc));
        self.in_flight += 1;
        self.submit_queued();
        Ok(())
    }

    /// Hands queued entries to the kernel. An entry the kernel does not take now (EBUSY while
    /// completions overflow) stays queued and goes with the next submit, at the latest when
    /// those completions are reaped.
    fn submit_queued(&mut self) {
        loop {
            match self.ring.submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if !matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    tracing::warn!("io_uring_enter: {e}; queued operations wait for the next submit");
                }
                _ => {}
            }
            return;
        }
    }

    fn entry(&self, ctx: &T, desc: &Desc) -> io::Result<squeue::Entry> {
        let fd = types::Fd(desc.fd);
        let len = u32::try_from(desc.len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let buffer = |at: usize| -> io::Result<(&Window, *mut u8)> {
            let w = ctx.window().ok_or_else(|| io::Error::other("no buffer for a read or write"))?;
            if at + len as usize > w.len() {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            // SAFETY: in bounds of the window (checked above).
            Ok((w, unsafe { w.as_ptr().add(at) }))
        };
        Ok(match desc.kind {
            Kind::Read { at } => {
                let (w, p) = buffer(at)?;
                match self.fixed.iter().position(|pin| pin.holds(w)) {
                    Some(i) => opcode::ReadFixed::new(fd, p, len, i as u16).offset(desc.offset).build(),
                    None => opcode::Read::new(fd, p, len).offset(desc.offset).build(),
                }
            }
            Kind::Write { at } => {
                let (w, p) = buffer(at)?;
                match self.fixed.iter().position(|pin| pin.holds(w)) {
                    Some(i) => opcode::WriteFixed::new(fd, p, len, i as u16).offset(desc.offset).build(),
                    None => opcode::Write::new(fd, p, len).offset(desc.offset).build(),
                }
            }
            Kind::WriteZeroes => {
                if len as usize > ZEROES_LEN {
                    return Err(io::Error::from_raw_os_error(libc::EINVAL));
                }
                opcode::Write::new(fd, ZEROES.as_ptr(), len).offset(desc.offset).build()
            }
            Kind::Fdatasync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            Kind::Fallocate { mode } => opcode::Fallocate::new(fd, desc.len).offset(desc.offset).mode(mode).build(),
        })
    }

    /// Takes every completion: `f` gets each operation's context, description and result
    /// (bytes or -errno).
    pub fn reap(&mut self, mut f: impl FnMut(&mut Self, T, Desc, i32)) {
        if !self.ring.submission().is_empty() {
            self.submit_queued();
        }
        loop {
            let mut batch = [(0u64, 0i32); 32];
            let mut n = 0;
            for cqe in self.ring.completion().take(batch.len()) {
                batch[n] = (cqe.user_data(), cqe.result());
                n += 1;
            }
            for &(slot, res) in &batch[..n] {
                let Some((ctx, desc)) = self.ops.get_mut(slot as usize).and_then(Option::take) else {
                    continue;
                };
                self.free.push(slot as u32);
                self.in_flight -= 1;
                f(self, ctx, desc, res);
            }
            if n < batch.len() {
                return;
            }
        }
    }
}

impl<T> std::fmt::Debug for Ring<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("in_flight", &self.in_flight).field("fixed", &self.fixed.len()).finish()
    }
}

impl<T> Drop for Ring<T> {
    /// Cancels what can be cancelled and waits for every completion, so no operation outlives
    /// the windows it was lent. If waiting fails, the contexts are leaked rather than freed
    /// under the kernel.
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        for (slot, op) in self.ops.iter().enumerate() {
            if op.is_some() {
                let cancel = opcode::AsyncCancel::new(slot as u64).build().user_data(u64::MAX);
                // SAFETY: a cancel request carries no buffer.
                let _ = unsafe { self.ring.submission().push(&cancel) };
            }
        }
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    tracing::error!(
                        "io_uring: waiting for {} operations at close: {e}; leaking their buffers",
                        self.in_flight
                    );
                    std::mem::forget(std::mem::take(&mut self.ops));
                    return;
                }
            }
            for cqe in self.ring.completion() {
                if let Some(op) = self.ops.get_mut(cqe.user_data() as usize).and_then(Option::take) {
                    drop(op);
                    self.in_flight -= 1;
                }
            }
        }
    }
}
