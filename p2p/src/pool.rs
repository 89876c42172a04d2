//! Buffer pools: fixed-size, aligned chunks over one mapping — a provider's window (p2p) or
//! host memory. Queues never share a lock per I/O: each takes a `Slab` of chunks when it starts
//! (the only time the pool's lock is taken) and allocates from it alone. An empty slab means
//! the request falls back to host memory; the caller counts that.

use std::sync::{Arc, Mutex};

use crate::mem::Mapping;

#[derive(Debug)]
pub struct ChunkPool {
    mem: Mapping,
    chunk: usize,
    free: Mutex<Vec<u32>>,
    count: usize,
}

impl ChunkPool {
    /// Chunks of `chunk` bytes (a power of two, at least 4 KiB) over `mem`.
    pub fn new(mem: Mapping, chunk: usize) -> Result<Arc<ChunkPool>, String> {
        if !chunk.is_power_of_two() || chunk < 4096 {
            return Err(format!("chunk size {chunk} is not a power of two of at least 4096"));
        }
        let count = mem.len() / chunk;
        if count == 0 {
            return Err(format!("a {}-byte window holds no {chunk}-byte chunk", mem.len()));
        }
        let free = (0..count as u32).rev().collect();
        Ok(Arc::new(ChunkPool { mem, chunk, free: Mutex::new(free), count }))
    }

    /// `count` chunks of host memory (huge pages when available).
    pub fn host(chunk: usize, count: usize) -> Result<Arc<ChunkPool>, String> {
        let mem = Mapping::host(chunk * count).map_err(|e| format!("{} bytes of host memory: {e}", chunk * count))?;
        Self::new(mem, chunk)
    }

    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    pub fn chunks(&self) -> usize {
        self.count
    }

    pub fn free_chunks(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn mapping(&self) -> &Mapping {
        &self.mem
    }

    /// Up to `want` chunks for one queue.
    pub fn take(self: &Arc<Self>, want: usize) -> Slab {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let at = free.len().saturating_sub(want);
        let mine = free.split_off(at);
        Slab { pool: self.clone(), all: mine.clone(), free: mine }
    }
}

/// One queue's chunks.
#[derive(Debug)]
pub struct Slab {
    pool: Arc<ChunkPool>,
    free: Vec<u32>,
    /// Every chunk taken, free or lent: all go back when the queue ends, even those a
    /// command still held.
    all: Vec<u32>,
}

/// A chunk in use; give it back with `Slab::put`.
#[derive(Debug, PartialEq, Eq)]
pub struct Chunk(u32);

impl Slab {
    /// A chunk for a transfer of `len` bytes; `None` when the slab is empty or `len` exceeds a
    /// chunk (the request uses host memory).
    pub fn get(&mut self, len: usize) -> Option<Chunk> {
        if len > self.pool.chunk {
            return None;
        }
        self.free.pop().map(Chunk)
    }

    pub fn put(&mut self, c: Chunk) {
        self.free.push(c.0);
    }

    /// Offset of a chunk within the pool's window (add the provider's bus or CPU address for
    /// a device).
    pub fn offset(&self, c: &Chunk) -> usize {
        c.0 as usize * self.pool.chunk
    }

    /// The chunk's memory, for the CPU.
    pub fn bytes(&mut self, c: &Chunk, len: usize) -> &mut [u8] {
        assert!(len <= self.pool.chunk, "{len} bytes do not fit a {}-byte chunk", self.pool.chunk);
        let off = self.offset(c);
        // Chunks are disjoint and this slab owns `c`; the pool (and mapping) outlives the slab.
        self.pool.mem.chunk_mut(off, len)
    }

    pub fn chunk_size(&self) -> usize {
        self.pool.chunk
    }

    /// Chunks this slab holds (free or lent out).
    pub fn owned(&self) -> usize {
        self.all.len()
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        free.append(&mut self.all);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slabs_split_the_pool_and_return_it() {
        let pool = ChunkPool::host(4096, 8).unwrap();
        let mut a = pool.take(5);
        let b = pool.take(5);
        assert_eq!((a.owned(), b.owned(), pool.free_chunks()), (5, 3, 0));
        let c = a.get(4096).unwrap();
        assert!(a.get(4097).is_none(), "larger than a chunk: host memory");
        a.bytes(&c, 4).copy_from_slice(b"data");
        let off = a.offset(&c);
        assert_eq!(pool.mapping().slice(off, 4), b"data");
        a.put(c);
        let _lent = a.get(1).unwrap();
        drop(b);
        assert_eq!(pool.free_chunks(), 3);
        drop(a);
        assert_eq!(pool.free_chunks(), 8);
    }

    #[test]
    fn an_exhausted_slab_says_so() {
        let pool = ChunkPool::host(8192, 2).unwrap();
        let mut s = pool.take(4);
        let got: Vec<Chunk> = std::iter::from_fn(|| s.get(8192)).collect();
        assert_eq!(got.len(), 2);
        let offs: Vec<usize> = got.iter().map(|c| s.offset(c)).collect();
        assert!(offs.iter().all(|o| o % 8192 == 0) && offs[0] != offs[1], "{offs:?}");
        assert!(s.get(1).is_none());
        assert!(ChunkPool::host(3000, 1).is_err());
    }
}
