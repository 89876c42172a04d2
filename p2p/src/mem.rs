//! Memory mappings: device memory through a file (sysfs `resourceN`, a VFIO device region) and
//! host memory (anonymous, huge pages when the system has them reserved). Register access is
//! volatile and 32 bits wide, as PCIe devices expect.
//!
//! I/O data lives in [`Window`]s: disjoint pieces of one mapping, each owned by one party at a
//! time. A window moves (by value) to whoever works on it — the transport, a backend's
//! in-flight operation, a pool — so two users of the same bytes cannot exist in safe code,
//! and the mapping stays alive while any window of it does (even one a device still writes).
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::{Arc, Weak};

const PAGE: u64 = 4096;
const HUGE_PAGE: usize = 2 << 20;

/// A mapping, unmapped on drop. `ptr` points at the requested offset inside the mapping.
#[derive(Debug)]
pub struct Mapping {
    base: NonNull<u8>,
    map_len: usize,
    delta: usize,
    len: usize,
    /// Device memory: the provider's name (a PCI address); `None` for host memory.
    device: Option<Box<str>>,
    /// The PCI bus address of the mapping's first byte, where a peer device reaches it.
    bus: Option<u64>,
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

    /// Anonymous host memory of `len` bytes in normal pages, touched only as used: for
    /// buffers sized to what a connection actually moves.
    pub fn host_small(len: usize) -> io::Result<Mapping> {
        let map_len = len.next_multiple_of(PAGE as usize).max(PAGE as usize);
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: anonymous mapping; the result is checked.
        let p = unsafe { libc::mmap(ptr::null_mut(), map_len, prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        Self::checked(p, map_len, 0, len)
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

    /// Host memory in 2 MiB huge pages only, populated and locked: pages that stay where they
    /// are, so their physical addresses can be given to a device that has no IOMMU in front of
    /// it. Fails when the system has too few huge pages reserved.
    pub fn locked_huge(len: usize) -> io::Result<Mapping> {
        let huge_len = len.next_multiple_of(HUGE_PAGE).max(HUGE_PAGE);
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_LOCKED | libc::MAP_POPULATE;
        // SAFETY: anonymous mapping; the result is checked.
        let p = unsafe { libc::mmap(ptr::null_mut(), huge_len, prot, flags, -1, 0) };
        Self::checked(p, huge_len, 0, huge_len)
    }

    fn checked(p: *mut libc::c_void, map_len: usize, delta: usize, len: usize) -> io::Result<Mapping> {
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { base, map_len, delta, len, device: None, bus: None })
    }

    /// Marks the mapping as device memory of `provider`, for those who count or treat it apart,
    /// starting at PCI bus address `bus` when that is known (a BAR window; not p2pmem, whose
    /// allocations the kernel places).
    pub fn device(mut self, provider: String, bus: Option<u64>) -> Mapping {
        self.device = Some(provider.into());
        self.bus = bus;
        self
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

    pub fn slice_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.len, "slice outside the mapping");
        // SAFETY: in bounds; exclusive through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr().add(off), len) }
    }
}

impl Mapping {
    /// Splits the mapping into disjoint windows of `size` bytes (the tail that does not fill
    /// one is left out). The mapping is consumed: from now on only the windows reach it.
    pub fn into_windows(self, size: usize) -> Vec<Window> {
        assert!(size > 0, "windows of 0 bytes");
        let n = self.len / size;
        self.split(&[(n, size)]).pop().expect("one class")
    }

    /// Splits the mapping into classes of windows, `(count, size)` each, one after the other
    /// (what does not fit is left out).
    pub fn split(self, classes: &[(usize, usize)]) -> Vec<Vec<Window>> {
        let map = Arc::new(self);
        let mut off = 0;
        classes
            .iter()
            .map(|&(count, size)| {
                let mut v = Vec::with_capacity(count);
                while v.len() < count && size > 0 && off + size <= map.len {
                    v.push(Window { map: map.clone(), off, len: size, home: None });
                    off += size;
                }
                v
            })
            .collect()
    }
}

/// Where a window goes when its owner drops it (a pool), instead of being lost.
pub trait Home: Send + Sync + std::fmt::Debug {
    fn take_back(&self, w: Window);
}

/// A disjoint piece of a [`Mapping`], owned by one party at a time (see the module
/// documentation). Moving it is the hand-over; there is no way to copy it.
#[derive(Debug)]
pub struct Window {
    map: Arc<Mapping>,
    off: usize,
    len: usize,
    home: Option<Weak<dyn Home>>,
}

impl Window {
    /// A window over fresh host memory of `len` bytes (normal pages, page-aligned).
    pub fn host(len: usize) -> io::Result<Window> {
        let m = Mapping::host_small(len)?;
        Ok(Window { map: Arc::new(m), off: 0, len, home: None })
    }

    /// The same window, returning to `home` whenever it is dropped.
    pub fn with_home(mut self, home: Weak<dyn Home>) -> Window {
        self.home = Some(home);
        self
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where the window starts, for a device that is handed it (a NIC's SGE, an io_uring
    /// operation); the window must stay with that operation until it completes.
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: off + len <= map.len by construction.
        unsafe { self.map.as_ptr().add(self.off) }
    }

    /// The provider whose device memory this is; `None` for host memory.
    pub fn device(&self) -> Option<&str> {
        self.map.device.as_deref()
    }

    /// The PCI bus address of the window's first byte, for device memory whose address is known.
    pub fn bus_addr(&self) -> Option<u64> {
        Some(self.map.bus? + self.off as u64)
    }

    /// Offset of the window in its mapping (add the mapping's bus or CPU address for a device).
    pub fn offset(&self) -> usize {
        self.off
    }

    /// The mapping's start and length, for registering the whole mapping with a device once.
    pub fn mapping_range(&self) -> (*mut u8, usize) {
        (self.map.as_ptr(), self.map.len)
    }

    /// Keeps the window's whole mapping alive (for as long as a device has it registered),
    /// without access to its bytes.
    pub fn pin_mapping(&self) -> MappingPin {
        MappingPin(self.map.clone())
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: in bounds; this window is the only way to its bytes and we hold it.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: in bounds; exclusive through &mut of the only owner of these bytes.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len) }
    }
}

/// A mapping kept alive for a device that has it registered; it gives no access to the bytes.
#[derive(Debug, Clone)]
pub struct MappingPin(Arc<Mapping>);

impl MappingPin {
    /// Keeps `map` alive for a device it is registered with.
    pub fn of(map: &Arc<Mapping>) -> MappingPin {
        MappingPin(map.clone())
    }

    pub fn range(&self) -> (*mut u8, usize) {
        (self.0.as_ptr(), self.0.len)
    }

    /// Whether `w` lies in this mapping.
    pub fn holds(&self, w: &Window) -> bool {
        Arc::ptr_eq(&self.0, &w.map)
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some(home) = self.home.as_ref().and_then(Weak::upgrade) {
            let back = Window { map: self.map.clone(), off: self.off, len: self.len, home: self.home.take() };
            home.take_back(back);
        }
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
    fn windows_are_disjoint_and_keep_their_mapping_alive() {
        let m = Mapping::host_small(3 * 4096 + 100).unwrap();
        let base = m.as_ptr() as usize;
        let mut w = m.into_windows(4096);
        assert_eq!(w.len(), 3, "the partial tail is left out");
        assert_eq!(w.iter().map(|w| w.as_ptr() as usize - base).collect::<Vec<_>>(), [0, 4096, 8192]);
        w[1].bytes_mut().fill(7);
        let last = w.pop().unwrap();
        let mid = w.pop().unwrap();
        drop(w);
        // The other windows are gone; the mapping lives on for these two.
        assert!(mid.bytes().iter().all(|&b| b == 7) && last.bytes().iter().all(|&b| b == 0));
        assert_eq!((mid.offset(), mid.len()), (4096, 4096));
        let (start, len) = mid.mapping_range();
        assert_eq!((start as usize, len), (base, 3 * 4096 + 100));
        let two = Mapping::host_small(3 * 4096).unwrap().split(&[(2, 1024), (9, 4096)]);
        assert_eq!((two[0].len(), two[1].len()), (2, 2), "classes in order, what fits");
        assert_eq!((two[1][0].offset(), two[1][1].len()), (2048, 4096));
        let own = Window::host(100).unwrap();
        assert!((own.as_ptr() as usize).is_multiple_of(4096) && own.len() == 100);
    }

    #[test]
    fn host_memory_is_usable_with_or_without_huge_pages() {
        let mut m = Mapping::host(3 << 20).unwrap();
        assert_eq!(m.len(), 3 << 20);
        m.slice_mut((3 << 20) - 4, 4).copy_from_slice(b"tail");
        assert_eq!(m.slice((3 << 20) - 4, 4), b"tail");
    }
}
