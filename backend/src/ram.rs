//! A RAM namespace that costs nothing until written: memory is allocated per 64 KiB chunk on
//! first write, and deallocated chunks are freed.

use std::io;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use p2pnvmf_nvmf::{Backend, BackendQueue, IoDone, IoError, IoRequest, Op, Reaping};

const CHUNK_SHIFT: u32 = 16;
const CHUNK: usize = 1 << CHUNK_SHIFT;

/// Per-chunk locks: I/O on different chunks never contends.
#[derive(Debug)]
pub struct RamBackend {
    size: u64,
    chunks: Vec<RwLock<Option<Box<[u8]>>>>,
}

impl RamBackend {
    pub fn new(size: u64) -> Self {
        let n = size.div_ceil(CHUNK as u64) as usize;
        RamBackend { size, chunks: (0..n).map(|_| RwLock::new(None)).collect() }
    }

    /// Bytes of memory actually allocated.
    pub fn resident_bytes(&self) -> u64 {
        let used = self.chunks.iter().filter(|c| c.read().is_ok_and(|c| c.is_some())).count();
        (used * CHUNK) as u64
    }

    /// Splits `[offset, offset + len)` into (chunk index, offset in chunk, length) pieces.
    fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (usize, usize, usize)> {
        let mut pos = offset;
        let end = offset + len;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let idx = (pos >> CHUNK_SHIFT) as usize;
            let within = (pos & (CHUNK as u64 - 1)) as usize;
            let n = (CHUNK - within).min((end - pos) as usize);
            pos += n as u64;
            Some((idx, within, n))
        })
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(22)),
        }
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        for (idx, within, n) in Self::pieces(offset, len) {
            let mut chunk = self.chunks[idx].write().unwrap_or_else(|e| e.into_inner());
            if n == CHUNK {
                *chunk = None;
            } else if let Some(c) = chunk.as_mut() {
                c[within..within + n].fill(0);
            }
        }
        Ok(())
    }
}

impl RamBackend {
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let mut done = 0;
        for (idx, within, n) in Self::pieces(offset, buf.len() as u64) {
            let chunk = self.chunks[idx].read().unwrap_or_else(|e| e.into_inner());
            let dst = &mut buf[done..done + n];
            match chunk.as_ref() {
                Some(c) => dst.copy_from_slice(&c[within..within + n]),
                None => dst.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    pub fn write(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let mut done = 0;
        for (idx, within, n) in Self::pieces(offset, buf.len() as u64) {
            let mut chunk = self.chunks[idx].write().unwrap_or_else(|e| e.into_inner());
            let c = chunk.get_or_insert_with(|| vec![0u8; CHUNK].into_boxed_slice());
            c[within..within + n].copy_from_slice(&buf[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Runs one operation (a memory copy: RAM namespaces complete inline).
    fn run(&self, req: &mut IoRequest) -> io::Result<()> {
        match (req.op, req.buf.as_mut()) {
            (Op::Read { offset, len }, Some(b)) => self.read(offset, &mut b.bytes_mut()[..len]),
            (Op::Write { offset, len }, Some(b)) => self.write(offset, &b.bytes()[..len]),
            (Op::Read { .. } | Op::Write { .. }, None) => Err(io::Error::other("no buffer for a read or write")),
            (Op::Flush, _) => Ok(()),
            (Op::WriteZeroes { offset, len } | Op::Deallocate { offset, len }, _) => self.zero(offset, len),
        }
    }
}

impl Backend for RamBackend {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn volatile_write_cache(&self) -> bool {
        false
    }

    fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }

    fn open_queue(self: Arc<Self>, _depth: usize, _: Reaping) -> Result<Box<dyn BackendQueue>, IoError> {
        Ok(Box::new(RamQueue(self)))
    }
}

/// A queue's side of a RAM namespace: every operation finishes inside `submit`.
#[derive(Debug)]
pub struct RamQueue(Arc<RamBackend>);

impl BackendQueue for RamQueue {
    fn submit(&mut self, mut req: IoRequest) -> Option<IoDone> {
        let r = self.0.run(&mut req);
        Some(req.done(r.map_err(IoError::Os)))
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
    use proptest::prelude::*;

    #[test]
    fn large_namespace_costs_nothing_until_written() {
        let ram = RamBackend::new(1 << 40);
        assert_eq!(ram.resident_bytes(), 0);
        ram.write(1 << 39, &[7u8; 4096]).unwrap();
        assert_eq!(ram.resident_bytes(), CHUNK as u64);
        let mut buf = [1u8; 4096];
        ram.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        ram.zero(1 << 39, CHUNK as u64).unwrap();
        assert_eq!(ram.resident_bytes(), 0);
    }

    #[test]
    fn out_of_range_is_einval() {
        let ram = RamBackend::new(1 << 20);
        let e = ram.write((1 << 20) - 512, &[0u8; 1024]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(22));
    }

    proptest! {
        /// Against a flat model: any sequence of writes and zeroings reads back the same.
        #[test]
        fn matches_flat_model(ops in prop::collection::vec((0u64..600_000, 1usize..200_000, any::<u8>(), any::<bool>()), 1..20)) {
            const SIZE: u64 = 1 << 20;
            let ram = RamBackend::new(SIZE);
            let mut model = vec![0u8; SIZE as usize];
            for (off, len, byte, zero) in ops {
                let len = len.min((SIZE - off) as usize);
                if zero {
                    ram.zero(off, len as u64).unwrap();
                    model[off as usize..off as usize + len].fill(0);
                } else {
                    ram.write(off, &vec![byte; len]).unwrap();
                    model[off as usize..off as usize + len].fill(byte);
                }
            }
            let mut all = vec![0u8; SIZE as usize];
            ram.read(0, &mut all).unwrap();
            prop_assert!(all == model);
        }
    }
}
