//! BARs of a function bound to vfio-pci, mapped through VFIO (container, group, device fd,
//! region info, mmap) — the way to reach device memory once a driver owns the function, since
//! sysfs `resourceN` refuses mmap of claimed regions. Works with an IOMMU (type 1 v2) and in
//! the kernel's no-IOMMU mode.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_GROUP_FLAGS_VIABLE, VFIO_NOIOMMU_IOMMU, VFIO_REGION_INFO_FLAG_MMAP, VFIO_TYPE, VFIO_TYPE1v2_IOMMU,
    vfio_group_status, vfio_region_info,
};

use crate::mem::Mapping;
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

/// An open VFIO device. Mappings keep the device (and through it the group and container)
/// alive; the group can be opened once, so one `VfioDevice` serves every BAR of a function.
#[derive(Debug)]
pub struct VfioDevice {
    name: String,
    device: File,
    _group: File,
    _container: File,
}

fn ioctl(fd: &File, req: libc::c_ulong, arg: *mut libc::c_void, what: &str) -> Result<libc::c_int, String> {
    // SAFETY: each caller passes the argument type its request expects.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if rc < 0 { Err(format!("{what}: {}", io::Error::last_os_error())) } else { Ok(rc) }
}

impl VfioDevice {
    pub fn open(f: &Function) -> Result<VfioDevice, String> {
        let group = f.iommu_group.ok_or_else(|| format!("{} is bound to vfio-pci but has no IOMMU group", f.addr))?;
        let rw = |p: &str| OpenOptions::new().read(true).write(true).open(p).map_err(|e| format!("opening {p}: {e}"));
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
            ));
        }
        let mut cfd = container.as_raw_fd();
        ioctl(&group_file, GROUP_SET_CONTAINER, (&raw mut cfd).cast(), "VFIO_GROUP_SET_CONTAINER")?;
        ioctl(&container, SET_IOMMU, iommu as usize as *mut libc::c_void, "VFIO_SET_IOMMU")?;
        let name = CString::new(f.addr.to_string()).expect("no NUL in a PCI address");
        let fd =
            ioctl(&group_file, GROUP_GET_DEVICE_FD, name.as_ptr() as *mut libc::c_void, "VFIO_GROUP_GET_DEVICE_FD")?;
        // SAFETY: a fresh fd the kernel just gave us, owned from here on.
        let device = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(VfioDevice { name: f.addr.to_string(), device, _group: group_file, _container: container })
    }

    /// Maps `len` bytes of BAR `bar` from `off`.
    pub fn map_bar(&self, bar: u8, off: u64, len: usize) -> Result<Mapping, String> {
        let mut info = vfio_region_info {
            argsz: size_of::<vfio_region_info>() as u32,
            index: u32::from(bar),
            ..Default::default()
        };
        ioctl(&self.device, DEVICE_GET_REGION_INFO, (&raw mut info).cast(), "VFIO_DEVICE_GET_REGION_INFO")?;
        if info.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(format!("{}: VFIO does not allow mmap of BAR{bar}", self.name));
        }
        if off + len as u64 > info.size {
            return Err(format!("{}: {len} bytes at {off:#x} exceed BAR{bar} ({:#x} bytes)", self.name, info.size));
        }
        Mapping::fd(self.device.as_raw_fd(), info.offset + off, len)
            .map_err(|e| format!("{}: mmap of BAR{bar} through VFIO: {e}", self.name))
    }
}
