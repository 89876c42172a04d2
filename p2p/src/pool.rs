//! Buffer pools: fixed-size, aligned chunks (as [`Window`]s) over one mapping — a provider's
//! window (p2p) or host memory. Queues never share a lock per I/O: each takes a `Slab` of
//! chunks when it starts (the only time the pool's lock is taken) and allocates from it alone.
//! An empty slab means the request falls back to host memory; the caller counts that.

use crate::Error;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::mem::{Home, Mapping, Window};

#[derive(Debug)]
pub struct ChunkPool {
    chunk: usize,
    free: Mutex<Vec<Window>>,
    count: usize,
    /// The mapping's start, to tell this pool's chunks from others (never dereferenced).
    base: usize,
    /// Why its memory may no longer be given to devices (the provider was reset), once it is.
    revoked: OnceLock<String>,
}

impl ChunkPool {
    /// Chunks of `chunk` bytes (a power of two, at least 4 KiB) over `mem`.
    pub fn new(mem: Mapping, chunk: usize) -> Result<Arc<ChunkPool>, Error> {
        if !chunk.is_power_of_two() || chunk < 4096 {
            return Err(format!("chunk size {chunk} is not a power of two of at least 4096").into());
        }
        let base = mem.as_ptr() as usize;
        let windows = mem.into_windows(chunk);
        if windows.is_empty() {
            return Err(format!("the window holds no {chunk}-byte chunk").into());
        }
        let count = windows.len();
        Ok(Arc::new_cyclic(|me: &Weak<ChunkPool>| {
            let home: Weak<dyn Home> = me.clone();
            let free = windows.into_iter().rev().map(|w| w.with_home(home.clone())).collect();
            ChunkPool { chunk, free: Mutex::new(free), count, base, revoked: OnceLock::new() }
        }))
    }

    /// `count` chunks of host memory (huge pages when available).
    pub fn host(chunk: usize, count: usize) -> Result<Arc<ChunkPool>, Error> {
        let mem = Mapping::host(chunk * count)
            .map_err(|e| Error::os(format!("{} bytes of host memory", chunk * count), e))?;
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

    /// The CPU address of the first chunk and the bytes all chunks span (what a NIC registers).
    pub fn span(&self) -> (usize, usize) {
        (self.base, self.chunk * self.count)
    }

    /// Whether `w` is one of this pool's chunks.
    pub fn owns(&self, w: &Window) -> bool {
        w.mapping_range().0 as usize == self.base && w.len() == self.chunk
    }

    /// Marks the memory revoked (the provider was reset): no chunk of it is handed out from
    /// now on, and those in use must not reach a device again. The first reason stays.
    pub fn revoke(&self, why: String) {
        let _ = self.revoked.set(why);
    }

    /// Why the memory was revoked, if it was (a load, for the I/O path).
    pub fn revoked(&self) -> Option<&str> {
        self.revoked.get().map(String::as_str)
    }

    /// Up to `want` chunks for one queue.
    pub fn take(self: &Arc<Self>, want: usize) -> Slab {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let at = free.len().saturating_sub(want);
        let mine = free.split_off(at);
        Slab { pool: self.clone(), owned: mine.len(), free: mine }
    }
}

impl Home for ChunkPool {
    /// A chunk dropped by whoever held it (a command's operation that outlived its queue)
    /// returns to the pool.
    fn take_back(&self, w: Window) {
        if self.owns(&w) {
            self.free.lock().unwrap_or_else(|e| e.into_inner()).push(w);
        }
    }
}

/// One queue's chunks.
#[derive(Debug)]
pub struct Slab {
    pool: Arc<ChunkPool>,
    free: Vec<Window>,
    /// Chunks taken from the pool, free or lent out.
    owned: usize,
}

impl Slab {
    /// A chunk for a transfer of `len` bytes; `None` when the slab is empty or `len` exceeds a
    /// chunk (the request uses host memory).
    pub fn get(&mut self, len: usize) -> Option<Window> {
        if len > self.pool.chunk {
            return None;
        }
        self.free.pop()
    }

    /// Takes a chunk back; false (and the window is dropped) when it is not this slab's pool's.
    pub fn put(&mut self, w: Window) -> bool {
        let ours = self.pool.owns(&w);
        if ours {
            self.free.push(w);
        }
        ours
    }

    pub fn owns(&self, w: &Window) -> bool {
        self.pool.owns(w)
    }

    pub fn chunk_size(&self) -> usize {
        self.pool.chunk
    }

    pub fn revoked(&self) -> Option<&str> {
        self.pool.revoked()
    }

    /// Chunks this slab holds (free or lent out).
    pub fn owned(&self) -> usize {
        self.owned
    }
}

impl Drop for Slab {
    /// Free chunks go back to the pool; chunks still lent out follow when their holder drops
    /// them.
    fn drop(&mut self) {
        let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        free.append(&mut self.free);
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
        let mut c = a.get(4096).unwrap();
        assert!(a.get(4097).is_none(), "larger than a chunk: host memory");
        c.bytes_mut()[..4].copy_from_slice(b"data");
        assert!(pool.owns(&c) && c.offset().is_multiple_of(4096));
        assert!(a.put(c));
        assert!(!a.put(Window::host(4096).unwrap()), "a stranger is not taken in");
        let lent = a.get(1).unwrap();
        drop(b);
        assert_eq!(pool.free_chunks(), 3);
        drop(a);
        assert_eq!(pool.free_chunks(), 7, "the chunk still lent out is not free yet");
        drop(lent);
        assert_eq!(pool.free_chunks(), 8, "dropped, it comes home");
    }

    #[test]
    fn an_exhausted_slab_says_so() {
        let pool = ChunkPool::host(8192, 2).unwrap();
        let mut s = pool.take(4);
        let got: Vec<Window> = std::iter::from_fn(|| s.get(8192)).collect();
        assert_eq!(got.len(), 2);
        let offs: Vec<usize> = got.iter().map(Window::offset).collect();
        assert!(offs.iter().all(|o| o % 8192 == 0) && offs[0] != offs[1], "{offs:?}");
        assert!(s.get(1).is_none());
        assert!(ChunkPool::host(3000, 1).is_err());
    }
}
