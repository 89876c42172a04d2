//! Memory mappings: device memory through a file (sysfs `resourceN`, a VFIO device region) and
//! host memory (anonymous, huge pages when the system has them reserved). Register access is
//! volatile and 32 bits wide, as PCIe devices expect.
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::{self, NonNull};

const PAGE: u64 = 4096;
const HUGE_PAGE: usize = 2 << 20;

/// A mapping, unmapped on drop. `ptr` points at the requested offset inside the mapping.
#[derive(Debug)]
pub struct Mapping {
    base: NonNull<u8>,
    map_len: usize,
    delta: usize,
    len: usize,
}

// SAFETY: a Mapping owns its pages; concurrent users get disjoint chunks (pool) or use volatile
// register access.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `path` from `offset` (any alignment), shared, read-write.
    pub fn file(path: &Path, offset: u64, len: usize) -> io::Result<Mapping> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        Self::fd(f.as_raw_fd(), offset, len)
    }

    /// Maps `len` bytes of an open file or device fd from `offset`.
    pub fn fd(fd: i32, offset: u64, len: usize) -> io::Result<Mapping> {
        let aligned = offset & !(PAGE - 1);
        let delta = (offset - aligned) as usize;
        let map_len = (delta + len).next_multiple_of(PAGE as usize);
        let off = libc::off_t::try_from(aligned).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: a fresh shared mapping of a caller-supplied fd; the result is checked.
        let p = unsafe {
            libc::mmap(ptr::null_mut(), map_len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, off)
        };
        Self::checked(p, map_len, delta, len)
    }

    /// Anonymous host memory of at least `len` bytes: 2 MiB huge pages when the system has them
    /// reserved (fewer TLB misses for NIC and CPU alike), else normal pages with a THP hint.
    pub fn host(len: usize) -> io::Result<Mapping> {
        let huge_len = len.next_multiple_of(HUGE_PAGE);
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: anonymous mapping; the result is checked.
        let p = unsafe { libc::mmap(ptr::null_mut(), huge_len, prot, flags | libc::MAP_HUGETLB, -1, 0) };
        if p != libc::MAP_FAILED {
            return Self::checked(p, huge_len, 0, len);
        }
        let map_len = len.next_multiple_of(PAGE as usize).max(PAGE as usize);
        // SAFETY: as above.
        let p = unsafe { libc::mmap(ptr::null_mut(), map_len, prot, flags, -1, 0) };
        let m = Self::checked(p, map_len, 0, len)?;
        // SAFETY: advice on our own mapping; failure only means no THP.
        unsafe { libc::madvise(m.base.as_ptr().cast(), map_len, libc::MADV_HUGEPAGE) };
        Ok(m)
    }

    fn checked(p: *mut libc::c_void, map_len: usize, delta: usize, len: usize) -> io::Result<Mapping> {
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { base, map_len, delta, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: delta < map_len by construction.
        unsafe { self.base.as_ptr().add(self.delta) }
    }

    fn reg(&self, off: usize) -> *mut u32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.len,
            "register {off:#x} outside a {:#x}-byte mapping",
            self.len
        );
        // SAFETY: in bounds and aligned (checked above).
        unsafe { self.as_ptr().add(off).cast() }
    }

    pub fn read32(&self, off: usize) -> u32 {
        // SAFETY: `reg` checks bounds and alignment; volatile because this is device memory.
        unsafe { ptr::read_volatile(self.reg(off)) }
    }

    pub fn write32(&self, off: usize, v: u32) {
        // SAFETY: as in read32.
        unsafe { ptr::write_volatile(self.reg(off), v) }
    }

    /// A 64-bit register as two 32-bit reads, low dword first.
    pub fn read64(&self, off: usize) -> u64 {
        u64::from(self.read32(off)) | u64::from(self.read32(off + 4)) << 32
    }

    /// A 64-bit register as two 32-bit writes, high dword first, so that the enabling low
    /// dword lands last (Linux's hi_lo_writeq for CMBMSC).
    pub fn write64_hi_lo(&self, off: usize, v: u64) {
        self.write32(off + 4, (v >> 32) as u32);
        self.write32(off, v as u32);
    }

    /// Copies `src` into the mapping at `off`.
    pub fn write_bytes(&self, off: usize, src: &[u8]) {
        assert!(off + src.len() <= self.len, "write outside the mapping");
        // SAFETY: in bounds; callers own the range they write (pool chunks are disjoint).
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), self.as_ptr().add(off), src.len()) }
    }

    /// Copies from the mapping at `off` into `dst`.
    pub fn read_bytes(&self, off: usize, dst: &mut [u8]) {
        assert!(off + dst.len() <= self.len, "read outside the mapping");
        // SAFETY: as in write_bytes.
        unsafe { ptr::copy_nonoverlapping(self.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) }
    }

    pub fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.len, "slice outside the mapping");
        // SAFETY: in bounds; lives as long as self.
        unsafe { std::slice::from_raw_parts(self.as_ptr().add(off), len) }
    }

    /// A disjoint sub-range for the pool's chunk owner (shared mapping, exclusive range).
    #[allow(clippy::mut_from_ref, reason = "chunks are disjoint; each is lent to one slab borrow at a time")]
    pub(crate) fn chunk_mut(&self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.len, "chunk outside the mapping");
        // SAFETY: in bounds; the pool lends each chunk to one slab at a time, which hands out
        // one borrow at a time through &mut Slab.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr().add(off), len) }
    }

    pub fn slice_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.len, "slice outside the mapping");
        // SAFETY: in bounds; exclusive through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr().add(off), len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_of_a_file_mapping_at_an_unaligned_offset() {
        let dir = std::env::temp_dir().join(format!("p2pnvmf-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resource0");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        {
            let m = Mapping::file(&path, 4096 + 64, 128).unwrap();
            m.write64_hi_lo(0x10, 0x1122_3344_5566_7788);
            assert_eq!(m.read64(0x10), 0x1122_3344_5566_7788);
            m.write_bytes(100, b"abc");
            let mut b = [0u8; 3];
            m.read_bytes(100, &mut b);
            assert_eq!(&b, b"abc");
        }
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(&raw[4096 + 64 + 0x10..][..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn host_memory_is_usable_with_or_without_huge_pages() {
        let mut m = Mapping::host(3 << 20).unwrap();
        assert_eq!(m.len(), 3 << 20);
        m.slice_mut((3 << 20) - 4, 4).copy_from_slice(b"tail");
        assert_eq!(m.slice((3 << 20) - 4, 4), b"tail");
    }
}
