//! BARs of a function bound to vfio-pci, mapped through VFIO (container, group, device fd,
//! region info, mmap) — the way to reach device memory once a driver owns the function, since
//! sysfs `resourceN` refuses mmap of claimed regions. Works with an IOMMU (type 1 v2) and in
//! the kernel's no-IOMMU mode.
#![allow(unsafe_code)]

use crate::Error;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_DEVICE_FEATURE_GET, VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_GROUP_FLAGS_VIABLE,
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_NOIOMMU_IOMMU, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_MSIX_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_TYPE, VFIO_TYPE1v2_IOMMU, vfio_group_status,
    vfio_iommu_type1_dma_map, vfio_region_info,
};

use crate::addr::Iova;
use crate::mem::{BarUse, Mapping, MappingPin};
use crate::pci::Function;

/// `_IO(VFIO_TYPE, VFIO_BASE + n)` (include/uapi/linux/vfio.h).
const fn vfio_io(n: u32) -> libc::c_ulong {
    ((VFIO_TYPE as libc::c_ulong) << 8) | (VFIO_BASE + n) as libc::c_ulong
}
const SET_IOMMU: libc::c_ulong = vfio_io(2);
const GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
const GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
const GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
const DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
const DEVICE_SET_IRQS: libc::c_ulong = vfio_io(10);
const IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
const IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);
const DEVICE_FEATURE: libc::c_ulong = vfio_io(17);
/// `VFIO_DEVICE_FEATURE_DMA_BUF` (Linux 6.19): export BAR ranges as a dma-buf.
const FEATURE_DMA_BUF: u32 = 11;

/// A non-blocking eventfd, for an MSI-X vector to signal.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before it is owned.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An open VFIO device. Mappings keep the device (and through it the group and container)
/// alive; the group can be opened once, so one `VfioDevice` serves every BAR of a function.
#[derive(Debug)]
pub struct VfioDevice {
    name: String,
    device: File,
    _group: File,
    container: File,
    /// DMA goes through an IOMMU (type 1); false in no-IOMMU mode (physical addresses).
    iommu: bool,
}

fn ioctl(fd: &File, req: libc::c_ulong, arg: *mut libc::c_void, what: &str) -> Result<libc::c_int, Error> {
    // SAFETY: each caller passes the argument type its request expects.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if rc < 0 { Err(Error::os(what, io::Error::last_os_error())) } else { Ok(rc) }
}

/// Devices open in this process: a VFIO group opens once, so every user of a function (the p2p
/// layer mapping its CMB, the NVMe driver) shares one `VfioDevice` and its container.
static OPEN: std::sync::Mutex<Vec<(String, std::sync::Weak<VfioDevice>)>> = std::sync::Mutex::new(Vec::new());

impl VfioDevice {
    /// The function's VFIO device, opened once per process and shared.
    pub fn open(f: &Function) -> Result<std::sync::Arc<VfioDevice>, Error> {
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(_, d)| d.strong_count() > 0);
        let name = f.addr.to_string();
        if let Some(d) = open.iter().find(|(n, _)| *n == name).and_then(|(_, d)| d.upgrade()) {
            return Ok(d);
        }
        let d = std::sync::Arc::new(Self::open_new(f)?);
        open.push((name, std::sync::Arc::downgrade(&d)));
        Ok(d)
    }

    fn open_new(f: &Function) -> Result<VfioDevice, Error> {
        let group = f.iommu_group.ok_or_else(|| format!("{} is bound to vfio-pci but has no IOMMU group", f.addr))?;
        let rw = |p: &str| {
            OpenOptions::new().read(true).write(true).open(p).map_err(|e| Error::os(format!("opening {p}"), e))
        };
        // No-IOMMU mode names the group noiommu-N and needs its own IOMMU type.
        let (group_file, iommu) = match rw(&format!("/dev/vfio/{group}")) {
            Ok(g) => (g, VFIO_TYPE1v2_IOMMU),
            Err(e) => match rw(&format!("/dev/vfio/noiommu-{group}")) {
                Ok(g) => (g, VFIO_NOIOMMU_IOMMU),
                Err(_) => return Err(e),
            },
        };
        let container = rw("/dev/vfio/vfio")?;
        let mut status = vfio_group_status { argsz: size_of::<vfio_group_status>() as u32, flags: 0 };
        ioctl(&group_file, GROUP_GET_STATUS, (&raw mut status).cast(), "VFIO_GROUP_GET_STATUS")?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(format!(
                "IOMMU group {group} of {} is not viable: bind every device in it to vfio-pci",
                f.addr
            )
            .into());
        }
        let mut cfd = container.as_raw_fd();
        ioctl(&group_file, GROUP_SET_CONTAINER, (&raw mut cfd).cast(), "VFIO_GROUP_SET_CONTAINER")?;
        ioctl(&container, SET_IOMMU, iommu as usize as *mut libc::c_void, "VFIO_SET_IOMMU")?;
        let name = CString::new(f.addr.to_string()).expect("no NUL in a PCI address");
        let fd =
            ioctl(&group_file, GROUP_GET_DEVICE_FD, name.as_ptr() as *mut libc::c_void, "VFIO_GROUP_GET_DEVICE_FD")?;
        // SAFETY: a fresh fd the kernel just gave us, owned from here on.
        let device = unsafe { File::from_raw_fd(fd) };
        Ok(VfioDevice {
            name: f.addr.to_string(),
            device,
            _group: group_file,
            container,
            iommu: iommu == VFIO_TYPE1v2_IOMMU,
        })
    }

    /// Whether the device's DMA is translated by an IOMMU (else it uses physical addresses).
    pub fn iommu(&self) -> bool {
        self.iommu
    }

    fn region(&self, index: u32) -> Result<vfio_region_info, Error> {
        let mut info = vfio_region_info { argsz: size_of::<vfio_region_info>() as u32, index, ..Default::default() };
        ioctl(&self.device, DEVICE_GET_REGION_INFO, (&raw mut info).cast(), "VFIO_DEVICE_GET_REGION_INFO")?;
        Ok(info)
    }

    /// Maps `len` bytes of BAR `bar` from `off`.
    pub fn map_bar(&self, bar: u8, off: u64, len: usize, usage: BarUse) -> Result<Mapping, Error> {
        let info = self.region(u32::from(bar))?;
        if info.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(format!("{}: VFIO does not allow mmap of BAR{bar}", self.name).into());
        }
        if off + len as u64 > info.size {
            return Err(
                format!("{}: {len} bytes at {off:#x} exceed BAR{bar} ({:#x} bytes)", self.name, info.size).into()
            );
        }
        // VFIO devices are real ones: their sysfs directory is under /sys.
        let function = Path::new("/sys/bus/pci/devices").join(&self.name);
        // SAFETY: the VFIO region of BAR `bar` of the device this process holds, which VFIO lets us
        // map; VFIO keeps the device while a mapping of it lives.
        unsafe { Mapping::bar(&function, bar, self.device.as_raw_fd(), info.offset, off, len, usage) }
            .map_err(|e| Error::os(format!("{}: mmap of BAR{bar} through VFIO", self.name), e))
    }

    /// Reads `buf.len()` bytes of config space at `off`.
    pub fn config_read(&self, off: u64, buf: &mut [u8]) -> Result<(), Error> {
        let at = self.region(VFIO_PCI_CONFIG_REGION_INDEX)?.offset + off;
        std::os::unix::fs::FileExt::read_exact_at(&self.device, buf, at)
            .map_err(|e| Error::os(format!("{}: reading config space at {off:#x}", self.name), e))
    }

    pub fn config_write(&self, off: u64, buf: &[u8]) -> Result<(), Error> {
        let at = self.region(VFIO_PCI_CONFIG_REGION_INDEX)?.offset + off;
        std::os::unix::fs::FileExt::write_all_at(&self.device, buf, at)
            .map_err(|e| Error::os(format!("{}: writing config space at {off:#x}", self.name), e))
    }

    /// Makes the mapping behind `pin` reachable by the device's DMA at `iova` (IOMMU mode). The
    /// caller keeps `pin` for as long as the device may use it.
    pub fn map_dma(&self, pin: &MappingPin, iova: Iova) -> Result<(), Error> {
        let (ptr, len) = pin.range();
        let mut map = vfio_iommu_type1_dma_map {
            argsz: size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: ptr as u64,
            iova: iova.get(),
            size: len.next_multiple_of(4096) as u64,
        };
        ioctl(&self.container, IOMMU_MAP_DMA, (&raw mut map).cast(), "VFIO_IOMMU_MAP_DMA")
            .map(drop)
            .map_err(|e| e.context(format_args!("{}: mapping {len:#x} bytes for DMA at IOVA {iova:#x}", self.name)))
    }

    /// Removes the DMA mapping of `len` bytes at `iova`.
    pub fn unmap_dma(&self, iova: Iova, len: usize) -> Result<(), Error> {
        // vfio_iommu_type1_dma_unmap without its trailing bitmap: argsz, flags, iova, size.
        let mut unmap: [u64; 3] = [(size_of::<[u64; 3]>() as u64), iova.get(), len.next_multiple_of(4096) as u64];
        ioctl(&self.container, IOMMU_UNMAP_DMA, unmap.as_mut_ptr().cast(), "VFIO_IOMMU_UNMAP_DMA").map(drop)
    }

    /// Exports `len` bytes of BAR `bar` from `off` as a dma-buf (`VFIO_DEVICE_FEATURE` GET
    /// `DMA_BUF`, Linux 6.19+ with CONFIG_VFIO_PCI_DMABUF): the fd a NIC's driver imports, the
    /// kernel then checking the p2p path and giving the NIC the address it must use. Kernels
    /// without the feature answer ENOTTY (unknown feature) or EINVAL.
    pub fn export_dma_buf(&self, bar: u8, off: u64, len: u64) -> io::Result<OwnedFd> {
        // struct vfio_device_feature { argsz, flags } + struct vfio_device_feature_dma_buf
        // { region_index, open_flags, flags, nr_ranges } + one struct vfio_region_dma_range
        // { offset, length }: 40 bytes, the range 8-byte aligned at 24.
        let mut arg: [u32; 10] = [
            40,
            VFIO_DEVICE_FEATURE_GET | FEATURE_DMA_BUF,
            u32::from(bar),
            (libc::O_RDWR | libc::O_CLOEXEC) as u32,
            0,
            1,
            off as u32,
            (off >> 32) as u32,
            len as u32,
            (len >> 32) as u32,
        ];
        // SAFETY: the argument is the layout above, as large as argsz says.
        let fd = unsafe { libc::ioctl(self.device.as_raw_fd(), DEVICE_FEATURE, arg.as_mut_ptr()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd the kernel just returned, owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Routes MSI-X vectors 0.. to `eventfds`.
    pub fn msix(&self, eventfds: &[i32]) -> Result<(), Error> {
        // struct vfio_irq_set: argsz, flags, index, start, count, then one eventfd per vector.
        let flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
        let mut set: Vec<u32> = vec![0, flags, VFIO_PCI_MSIX_IRQ_INDEX, 0, eventfds.len() as u32];
        set.extend(eventfds.iter().map(|&fd| fd as u32));
        set[0] = (set.len() * 4) as u32;
        ioctl(&self.device, DEVICE_SET_IRQS, set.as_mut_ptr().cast(), "VFIO_DEVICE_SET_IRQS").map(drop)
    }
}
