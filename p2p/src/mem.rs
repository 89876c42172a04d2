//! Memory mappings: device memory through a file (sysfs `resourceN`, a VFIO device region) and
//! host memory (anonymous, huge pages when the system has them reserved). Register access is
//! volatile and 32 bits wide, as PCIe devices expect.
//!
//! I/O data lives in [`Window`]s: disjoint pieces of one mapping, each owned by one party at a
//! time. A window moves (by value) to whoever works on it — the transport, a backend's
//! in-flight operation, a pool — so two users of the same bytes cannot exist in safe code,
//! and the mapping stays alive while any window of it does (even one a device still writes).
#![allow(unsafe_code)]

use std::io;
use std::ops::Range;
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex, Weak};

use crate::addr::BusAddr;

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
    bus: Option<BusAddr>,
    /// For BAR memory: its range, held in this process's register of mapped BARs until unmapped.
    claim: Option<Claim>,
    /// Registers, reached by volatile accesses only: never split into windows.
    registers: bool,
}

/// What a BAR mapping is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarUse {
    /// Registers (an NVMe controller's BAR0): volatile 32-bit accesses only, so a second
    /// mapping of them aliases nothing; it cannot be split into windows.
    Registers,
    /// Memory handed out as windows: one mapping of its bytes in the process at a time.
    Memory,
}

// SAFETY: a Mapping owns its pages. Through a shared Mapping the bytes are reached only by
// volatile 32-bit accesses, never by reference (safe code); references exist only through an
// owned, disjoint Window or the `unsafe fn bytes` contract.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

/// BAR ranges mapped in this process. A second mapping of the same bytes would let two sets of
/// [`Window`]s alias them, so it is refused.
static MAPPED: Mutex<Vec<BarRange>> = Mutex::new(Vec::new());

#[derive(Debug, Clone, PartialEq)]
struct BarRange {
    function: Box<str>,
    bar: u8,
    bytes: Range<u64>,
}

/// A BAR range entered in [`MAPPED`], removed on drop.
#[derive(Debug)]
struct Claim(BarRange);

impl Claim {
    fn take(function: &str, bar: u8, bytes: Range<u64>) -> io::Result<Claim> {
        let mut mapped = MAPPED.lock().unwrap_or_else(|e| e.into_inner());
        let overlaps = |r: &&BarRange| {
            *r.function == *function && r.bar == bar && r.bytes.start < bytes.end && bytes.start < r.bytes.end
        };
        if let Some(r) = mapped.iter().find(overlaps) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{function} BAR{bar} bytes {:#x}..{:#x} are already mapped in this process",
                    r.bytes.start, r.bytes.end
                ),
            ));
        }
        let r = BarRange { function: function.into(), bar, bytes };
        mapped.push(r.clone());
        Ok(Claim(r))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        MAPPED.lock().unwrap_or_else(|e| e.into_inner()).retain(|r| *r != self.0);
    }
}

impl Mapping {
    /// Maps `len` bytes of an open file or device fd from `offset`.
    ///
    /// # Safety
    /// The caller promises that the range behaves as memory (a memory BAR or a file, not
    /// registers with read side effects: those are reached through `read32`/`write32` only),
    /// that it is not truncated or removed while mapped (a fault, not an error), and that
    /// nothing else in this process maps the same range: [`Window`]s of two mappings of one
    /// range would alias.
    pub unsafe fn fd(fd: i32, offset: u64, len: usize) -> io::Result<Mapping> {
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

    /// Maps `len` bytes from `off` of BAR `bar` of the PCI function whose sysfs directory is
    /// `function` (resolved here, so every way of reaching the function names it alike), which `fd`
    /// reaches from `fd_offset` (a sysfs `resourceN` from 0, a VFIO region from its offset).
    /// As [`BarUse::Memory`], refused while another memory mapping of this process holds any
    /// of the same bytes.
    ///
    /// # Safety
    /// `fd` from `fd_offset` is that BAR, which stays while mapped (the function is held —
    /// unbound, bound to VFIO or uio — by this process); as `Memory`, the range is memory
    /// (no read side effects).
    pub unsafe fn bar(
        function: &Path,
        bar: u8,
        fd: i32,
        fd_offset: u64,
        off: u64,
        len: usize,
        usage: BarUse,
    ) -> io::Result<Mapping> {
        let function = function.canonicalize().unwrap_or_else(|_| function.to_path_buf());
        let claim = match usage {
            BarUse::Memory => Some(Claim::take(&function.to_string_lossy(), bar, off..off + len as u64)?),
            BarUse::Registers => None,
        };
        // SAFETY: the BAR stays (the caller's promise); memory is claimed against a second
        // mapping of the same bytes, registers are never split into windows.
        let mut m = unsafe { Self::fd(fd, fd_offset + off, len) }?;
        m.claim = claim;
        m.registers = usage == BarUse::Registers;
        Ok(m)
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
        Ok(Mapping { base, map_len, delta, len, device: None, bus: None, claim: None, registers: false })
    }

    /// Marks the mapping as device memory of `provider`, for those who count or treat it apart,
    /// starting at PCI bus address `bus` when that is known (a BAR window; not p2pmem, whose
    /// allocations the kernel places).
    pub fn device(mut self, provider: String, bus: Option<BusAddr>) -> Mapping {
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

    /// Copies `src` into the mapping at `off`, in volatile 32-bit writes (as device memory
    /// wants them, and because a device may read the range meanwhile: no reference to the
    /// mapping's bytes is ever made). `off` and the length are multiples of 4.
    pub fn write_bytes(&self, off: usize, src: &[u8]) {
        assert!(off.is_multiple_of(4) && src.len().is_multiple_of(4), "unaligned copy into device memory");
        for (i, w) in src.chunks_exact(4).enumerate() {
            self.write32(off + 4 * i, u32::from_ne_bytes(w.try_into().expect("4 bytes")));
        }
    }

    /// Copies from the mapping at `off` into `dst`, in volatile 32-bit reads (see
    /// [`Mapping::write_bytes`]).
    pub fn read_bytes(&self, off: usize, dst: &mut [u8]) {
        assert!(off.is_multiple_of(4) && dst.len().is_multiple_of(4), "unaligned copy from device memory");
        for (i, w) in dst.chunks_exact_mut(4).enumerate() {
            w.copy_from_slice(&self.read32(off + 4 * i).to_ne_bytes());
        }
    }

    /// Fills `len` bytes at `off` with zeroes (volatile, as [`Mapping::write_bytes`]).
    pub fn zero(&self, off: usize, len: usize) {
        assert!(off.is_multiple_of(4) && len.is_multiple_of(4), "unaligned clear of device memory");
        for at in (off..off + len).step_by(4) {
            self.write32(at, 0);
        }
    }

    /// The bytes at `off`, as a reference, for memory a device writes and the CPU then reads in
    /// place (a received capsule).
    ///
    /// # Safety
    /// Nothing — CPU or device — writes the range while the reference lives.
    pub unsafe fn bytes(&self, off: usize, len: usize) -> &[u8] {
        assert!(off + len <= self.len, "bytes outside the mapping");
        // SAFETY: in bounds; unchanged while borrowed (the caller's promise).
        unsafe { std::slice::from_raw_parts(self.as_ptr().add(off), len) }
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
        assert!(!self.registers, "a register mapping cannot be split into windows");
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
    pub fn bus_addr(&self) -> Option<BusAddr> {
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
    use std::fs::OpenOptions;
    use std::os::fd::AsRawFd;

    #[test]
    fn registers_of_a_file_mapping_at_an_unaligned_offset() {
        let dir = std::env::temp_dir().join(format!("p2pnvmf-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resource0");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        {
            let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
            // SAFETY: a file of this test's own, mapped once.
            let m = unsafe { Mapping::fd(f.as_raw_fd(), 4096 + 64, 128) }.unwrap();
            m.write64_hi_lo(0x10, 0x1122_3344_5566_7788);
            assert_eq!(m.read64(0x10), 0x1122_3344_5566_7788);
            m.write_bytes(100, b"abcd");
            let mut b = [0u8; 4];
            m.read_bytes(100, &mut b);
            assert_eq!(&b, b"abcd");
            m.zero(100, 4);
            m.read_bytes(100, &mut b);
            assert_eq!(b, [0; 4]);
        }
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(&raw[4096 + 64 + 0x10..][..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bar_range_is_mapped_once_at_a_time() {
        let path = std::env::temp_dir().join(format!("p2pnvmf-bar-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4 * 4096]).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        // SAFETY: a file of this test's own standing in for a BAR.
        let map = |off, len| unsafe {
            Mapping::bar(Path::new("/x/0000:01:00.0"), 2, f.as_raw_fd(), 0, off, len, BarUse::Memory)
        };
        let first = map(4096, 8192).unwrap();
        let again = map(8192, 4096).unwrap_err();
        assert!(again.to_string().contains("/x/0000:01:00.0 BAR2 bytes 0x1000..0x3000 are already mapped"), "{again}");
        let beside = map(3 * 4096, 4096).unwrap();
        drop(first);
        let after = map(8192, 4096).unwrap();
        // SAFETY: as above.
        let regs =
            unsafe { Mapping::bar(Path::new("/x/0000:01:00.0"), 2, f.as_raw_fd(), 0, 0, 4 * 4096, BarUse::Registers) };
        assert!(regs.is_ok(), "registers may be mapped beside memory: volatile access aliases nothing");
        drop((beside, after, regs));
        std::fs::remove_file(&path).unwrap();
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
        let m = Mapping::host(3 << 20).unwrap();
        assert_eq!(m.len(), 3 << 20);
        m.write_bytes((3 << 20) - 4, b"tail");
        let mut back = [0; 4];
        m.read_bytes((3 << 20) - 4, &mut back);
        assert_eq!(&back, b"tail");
    }
}
