//! Memory the SSD reaches by DMA, and the address it uses for it. Through the IOMMU (VFIO
//! type 1) every piece is mapped once at an IOVA of ours. Without one (the opt-in
//! physical-address mode) the SSD uses physical addresses, which only locked huge pages keep
//! fixed: the driver's memory comes from such pages, handed out in power-of-two pieces that
//! never cross a huge page (so each piece is physically contiguous), and memory others own
//! cannot be given to the SSD at all.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use p2pnvmf_p2p::addr::{BusAddr, Iova};
use p2pnvmf_p2p::mem::{Mapping, MappingPin};
use p2pnvmf_p2p::pci::PciAddr;
use p2pnvmf_p2p::vfio::VfioDevice;

use super::Error;

/// IOVAs the driver hands out for host memory: above the low 4 GiB (where 32-bit peer BARs'
/// bus addresses live, which are mapped at IOVA = bus address) and below 2^39, the narrowest
/// IOMMU address width in use (qemu's intel-iommu default).
const IOVA_BASE: u64 = 1 << 32;
const IOVA_END: u64 = 1 << 39;
/// IOVA ranges are handed out in these units; also the huge page size.
const HUGE: u64 = 2 << 20;
const PAGE: usize = 4096;
/// Piece sizes of the physical-address mode: 4 KiB << class, up to one huge page.
const CLASSES: usize = 10;

/// Memory of the driver's that the SSD reaches by DMA, given back when dropped — unmapped
/// from the IOMMU, or returned to the huge pages it came from: keep it as long as the SSD
/// may use it.
#[derive(Debug)]
pub struct Dma {
    mem: Arc<Mapping>,
    off: usize,
    len: usize,
    addr: Addr,
    home: Home,
}

/// Where a [`Dma`] goes back to.
#[derive(Debug)]
enum Home {
    /// Its own mapping, unmapped from the IOMMU (the reserved IOVA span) and freed.
    Iommu(Arc<Iommu>, u64),
    /// The arena and size class of its piece.
    Arena(Arc<Arena>, usize),
    /// Whole huge pages of its own, freed with the mapping.
    Own,
}

/// Where the SSD finds a piece of memory.
#[derive(Debug)]
enum Addr {
    /// Byte 0 at this address, the rest following.
    Contiguous(u64),
    /// Each 2 MiB huge page at its own physical address.
    HugePages(Box<[u64]>),
}

impl Dma {
    /// Bytes usable (at least what was asked for).
    pub fn size(&self) -> usize {
        self.len
    }

    /// The address at which the SSD reaches byte `at` (the same for the rest of its 4 KiB page).
    pub fn addr(&self, at: usize) -> u64 {
        assert!(at < self.len, "{at} outside {} bytes of DMA memory", self.len);
        match &self.addr {
            Addr::Contiguous(a) => a + at as u64,
            Addr::HugePages(pages) => pages[at / HUGE as usize] + (at as u64 % HUGE),
        }
    }

    /// Copies `src` in at `at` (see [`Mapping::write_bytes`]: 4-byte units, no reference made).
    pub fn write(&mut self, at: usize, src: &[u8]) {
        assert!(at + src.len() <= self.len, "write outside the DMA memory");
        self.mem.write_bytes(self.off + at, src);
    }

    /// Copies out what is at `at` (the SSD may have written it: no reference is made).
    pub fn read(&self, at: usize, dst: &mut [u8]) {
        assert!(at + dst.len() <= self.len, "read outside the DMA memory");
        self.mem.read_bytes(self.off + at, dst);
    }

    /// The mapping and offset of byte 0, for a queue pair laid out in it.
    pub fn region(&self) -> (Arc<Mapping>, usize) {
        (self.mem.clone(), self.off)
    }
}

impl Drop for Dma {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.home, Home::Own) {
            Home::Iommu(iommu, span) => {
                let Addr::Contiguous(iova) = self.addr else { unreachable!("IOVA ranges are contiguous") };
                if let Err(e) = iommu.unmap(Iova::new(iova), span) {
                    tracing::warn!("unmapping driver memory at IOVA {iova:#x}: {e}");
                }
            }
            Home::Arena(arena, class) => {
                let Addr::Contiguous(phys) = self.addr else { unreachable!("arena pieces are contiguous") };
                arena.lock()[class].push((self.mem.clone(), self.off, phys));
            }
            Home::Own => {}
        }
    }
}

/// How the SSD's DMA addresses memory.
#[derive(Debug)]
pub enum DmaSpace {
    Iommu(Arc<Iommu>),
    Physical(Arc<Arena>),
}

impl DmaSpace {
    pub fn iommu(dev: Arc<VfioDevice>) -> DmaSpace {
        DmaSpace::Iommu(Arc::new(Iommu {
            dev,
            free: Mutex::new(vec![(IOVA_BASE, IOVA_END - IOVA_BASE)]),
            pins: Mutex::new(Vec::new()),
        }))
    }

    pub fn physical() -> DmaSpace {
        DmaSpace::Physical(Arc::new(Arena { free: Mutex::new(Default::default()), pages: locked_huge_pages }))
    }

    /// `len` bytes of memory the SSD reaches.
    pub fn alloc(&self, pci: PciAddr, len: usize) -> Result<Dma, Error> {
        match self {
            DmaSpace::Iommu(s) => s.alloc(pci, len),
            DmaSpace::Physical(a) => a.alloc(pci, len),
        }
    }

    /// Maps memory someone else owns for the SSD at an IOVA of ours; returns the IOVA and the
    /// length reserved (for [`DmaSpace::unmap`]). Physical-address mode cannot: the pages of
    /// others may move.
    pub fn map(&self, pci: PciAddr, pin: &MappingPin) -> Result<(Iova, u64), Error> {
        match self {
            DmaSpace::Iommu(s) => s.map(pci, pin),
            DmaSpace::Physical(_) => Err(Error::Setup(format!(
                "{pci}: physical-address mode: the SSD reaches only the driver's locked huge pages"
            ))),
        }
    }

    /// Makes peer device memory at bus address `bus` reachable at that address: through the
    /// IOMMU, mapped at IOVA = `bus`, so that the same address in a PRP works whether the
    /// switch routes it to the peer or sends it up to the IOMMU (ACS redirect, qemu); without
    /// an IOMMU the bus address reaches the peer as it is.
    pub fn map_at(&self, pci: PciAddr, pin: &MappingPin, bus: BusAddr) -> Result<(), Error> {
        match self {
            DmaSpace::Iommu(s) => s.map_at(pci, pin, bus),
            DmaSpace::Physical(_) => Ok(()),
        }
    }

    pub fn unmap(&self, iova: Iova, span: u64) -> Result<(), p2pnvmf_p2p::Error> {
        match self {
            DmaSpace::Iommu(s) => s.unmap(iova, span),
            DmaSpace::Physical(_) => Ok(()),
        }
    }
}

/// Hands out DMA-mapped host memory and maps memory others own: each piece mapped into the
/// device's IOMMU domain once, at an IOVA range of ours (reused after an unmap).
#[derive(Debug)]
pub struct Iommu {
    dev: Arc<VfioDevice>,
    /// Free IOVA ranges (start, length), first fit.
    free: Mutex<Vec<(u64, u64)>>,
    /// Peer memory mapped at IOVA = its bus address, kept alive for the device while it is open.
    pins: Mutex<Vec<MappingPin>>,
}

impl Iommu {
    fn map(&self, pci: PciAddr, pin: &MappingPin) -> Result<(Iova, u64), Error> {
        let span = (pin.range().1 as u64).next_multiple_of(HUGE);
        let iova = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let i = free
                .iter()
                .position(|&(_, len)| len >= span)
                .ok_or_else(|| Error::os(pci, "IOVA space")(io::Error::from_raw_os_error(libc::ENOSPC)))?;
            let (at, len) = free[i];
            if len == span {
                free.remove(i);
            } else {
                free[i] = (at + span, len - span);
            }
            Iova::new(at)
        };
        match self.dev.map_dma(pin, iova) {
            Ok(()) => Ok((iova, span)),
            Err(e) => {
                self.release(iova, span);
                Err(Error::Device { pci, source: e })
            }
        }
    }

    fn map_at(&self, pci: PciAddr, pin: &MappingPin, bus: BusAddr) -> Result<(), Error> {
        let span = (pin.range().1 as u64).next_multiple_of(PAGE as u64);
        let end = bus
            .checked_add(span)
            .ok_or_else(|| Error::Setup(format!("{pci}: peer memory at {bus:#x} ends past the address space")))?;
        let (bus, end) = (bus.get(), end.get());
        {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = free.iter().position(|&(at, len)| at <= bus && end <= at + len) {
                let (at, len) = free.remove(i);
                free.extend([(at, bus - at), (end, at + len - end)].into_iter().filter(|r| r.1 > 0));
            } else if bus < IOVA_END && end > IOVA_BASE {
                return Err(Error::Setup(format!(
                    "{pci}: peer memory at bus address {bus:#x} collides with IOVAs in use"
                )));
            }
        }
        // Identity: the IOVA is the bus address, so one PRP address serves either route.
        self.dev.map_dma(pin, Iova::new(bus)).map_err(Error::device(pci))?;
        self.pins.lock().unwrap_or_else(|e| e.into_inner()).push(pin.clone());
        Ok(())
    }

    fn unmap(&self, iova: Iova, span: u64) -> Result<(), p2pnvmf_p2p::Error> {
        let r = self.dev.unmap_dma(iova, span as usize);
        self.release(iova, span);
        r
    }

    fn release(&self, iova: Iova, span: u64) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).push((iova.get(), span));
    }

    fn alloc(self: &Arc<Self>, pci: PciAddr, len: usize) -> Result<Dma, Error> {
        let mem = Arc::new(Mapping::host(len).map_err(Error::os(pci, format!("{len} bytes of DMA memory")))?);
        // The Dma holds the mapping until it has unmapped it.
        let (iova, span) = self.map(pci, &MappingPin::of(&mem))?;
        Ok(Dma {
            len: mem.len(),
            mem,
            off: 0,
            addr: Addr::Contiguous(iova.get()),
            home: Home::Iommu(self.clone(), span),
        })
    }
}

/// A free piece of a huge page: its mapping, offset and physical address.
type Piece = (Arc<Mapping>, usize, u64);

/// Where huge pages come from: `len` bytes (a multiple of 2 MiB) and each page's address.
type Pages = fn(PciAddr, usize) -> Result<(Arc<Mapping>, Box<[u64]>), Error>;

/// Locked huge pages of the physical-address mode, as free pieces per size class. Pieces are
/// split from larger ones and never merged: the arena keeps what the busiest moment needed.
#[derive(Debug)]
pub struct Arena {
    free: Mutex<[Vec<Piece>; CLASSES]>,
    pages: Pages,
}

/// Locked huge pages at their physical addresses.
fn locked_huge_pages(pci: PciAddr, len: usize) -> Result<(Arc<Mapping>, Box<[u64]>), Error> {
    let mem = Mapping::locked_huge(len).map(Arc::new).map_err(Error::os(
        pci,
        format!(
            "{len} bytes of locked 2 MiB huge pages for DMA (the physical-address mode takes its memory from \
             reserved huge pages: echo N > /proc/sys/vm/nr_hugepages)"
        ),
    ))?;
    let pages = (0..mem.len() / HUGE as usize)
        .map(|i| physical(pci, mem.as_ptr() as usize + i * HUGE as usize))
        .collect::<Result<_, _>>()?;
    Ok((mem, pages))
}

impl Arena {
    fn lock(&self) -> std::sync::MutexGuard<'_, [Vec<Piece>; CLASSES]> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn alloc(self: &Arc<Self>, pci: PciAddr, len: usize) -> Result<Dma, Error> {
        if len > HUGE as usize {
            // Larger than a huge page: whole pages, each at its own physical address.
            let (mem, pages) = (self.pages)(pci, len.next_multiple_of(HUGE as usize))?;
            return Ok(Dma { mem, off: 0, len, addr: Addr::HugePages(pages), home: Home::Own });
        }
        let class = len.max(PAGE).div_ceil(PAGE).next_power_of_two().trailing_zeros() as usize;
        let mut free = self.lock();
        let (mem, off, phys, from) = match (class..CLASSES).find(|&c| !free[c].is_empty()) {
            Some(c) => {
                let (m, off, phys) = free[c].pop().expect("not empty");
                // A piece given back holds what its last user left (a completion queue's old
                // entries would pass for new ones): cleared, as fresh huge pages are.
                m.zero(off, PAGE << class);
                (m, off, phys, c)
            }
            None => {
                let (m, pages) = (self.pages)(pci, HUGE as usize)?;
                (m, 0, pages[0], CLASSES - 1)
            }
        };
        // Split down to the class asked for; the upper halves stay free.
        for c in (class..from).rev() {
            let half = PAGE << c;
            free[c].push((mem.clone(), off + half, phys + half as u64));
        }
        drop(free);
        Ok(Dma { mem, off, len: PAGE << class, addr: Addr::Contiguous(phys), home: Home::Arena(self.clone(), class) })
    }
}

/// The physical address of the page at virtual address `addr` of this process, from
/// /proc/self/pagemap (bit 63: present; bits 54:0: the page frame number, shown to
/// CAP_SYS_ADMIN only).
fn physical(pci: PciAddr, addr: usize) -> Result<u64, Error> {
    const WHAT: &str = "the physical address of DMA memory from /proc/self/pagemap";
    let f = std::fs::File::open("/proc/self/pagemap").map_err(Error::os(pci, WHAT))?;
    let mut entry = [0u8; 8];
    f.read_exact_at(&mut entry, (addr / PAGE) as u64 * 8).map_err(Error::os(pci, WHAT))?;
    let entry = u64::from_le_bytes(entry);
    let pfn = entry & ((1 << 55) - 1);
    if entry >> 63 == 0 {
        return Err(Error::Setup(format!("{pci}: {WHAT}: the page is not present")));
    }
    if pfn == 0 {
        return Err(Error::Setup(format!("{pci}: {WHAT}: no page frame number shown (needs CAP_SYS_ADMIN)")));
    }
    Ok(pfn * PAGE as u64 + (addr % PAGE) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Normal memory posing as huge pages at made-up physical addresses (1 GiB + 4 MiB per call),
    /// so the arena's bookkeeping runs anywhere; the VM suite runs it on real huge pages.
    fn fake_pages(pci: PciAddr, len: usize) -> Result<(Arc<Mapping>, Box<[u64]>), Error> {
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let base = (1 << 30) + CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) * (4 << 20);
        let mem = Arc::new(Mapping::host_small(len).map_err(Error::os(pci, "host memory"))?);
        Ok((mem, (0..len as u64 / HUGE).map(|i| base + i * 2 * HUGE).collect()))
    }

    fn free_bytes(arena: &Arena) -> usize {
        arena.lock().iter().enumerate().map(|(c, v)| v.len() * (PAGE << c)).sum()
    }

    #[test]
    fn pieces_split_from_huge_pages_and_come_back() {
        let pci: PciAddr = "0000:01:00.0".parse().unwrap();
        let arena = Arc::new(Arena { free: Mutex::new(Default::default()), pages: fake_pages });
        let space = DmaSpace::Physical(arena.clone());
        let a = space.alloc(pci, 8192).unwrap();
        let b = space.alloc(pci, 100).unwrap();
        let start = a.addr(0);
        assert_eq!((a.size(), b.size()), (8192, 4096), "rounded up to a power of two pages");
        assert_eq!(a.addr(0) % HUGE, 0, "the first piece starts the huge page");
        assert_eq!(b.addr(0), a.addr(0) + 8192, "split from the upper half left free");
        assert_eq!(a.addr(5000), a.addr(0) + 5000);
        let mut a = a;
        a.write(4096, b"piece...");
        let mut back = [0; 8];
        a.read(4096, &mut back);
        assert_eq!(&back, b"piece...");
        let a_at = a.addr(0);
        assert_eq!(free_bytes(&arena), HUGE as usize - 8192 - 4096, "the rest of the page is free");
        drop((a, b));
        assert_eq!(free_bytes(&arena), HUGE as usize, "given back");
        let reused = space.alloc(pci, 8192).unwrap();
        assert_eq!(reused.addr(0), a_at, "the same piece again");
        reused.read(4096, &mut back);
        assert_eq!(back, [0; 8], "cleared for its next user");
        drop(reused);
        let again = space.alloc(pci, 1 << 20).unwrap();
        assert_eq!(again.addr(0), start + (1 << 20), "the free upper half, not a new page");
        assert_eq!(free_bytes(&arena), (HUGE as usize) - (1 << 20));
        // Beyond a huge page: each page at its own address, not contiguous.
        let big = space.alloc(pci, 3 << 20).unwrap();
        assert_eq!(big.addr((2 << 20) + 10), big.addr(0) + 2 * HUGE + 10);
        assert_ne!(big.addr((2 << 20) + 10), big.addr(0) + HUGE + 10);
        drop((again, big));
        let e = space.map(pci, &MappingPin::of(&Arc::new(Mapping::host_small(4096).unwrap()))).unwrap_err().to_string();
        assert!(e.contains("reaches only the driver's locked huge pages"), "{e}");
    }
}
