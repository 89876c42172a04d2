//! Which PCI function serves a block device: the NVMe controller behind a file namespace, so
//! that its buffers can come from p2p memory that controller reaches (the kernel's own driver
//! then DMAs to and from it).

use crate::Error;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::pci::{PciAddr, Sysfs};

/// A whole-disk block device and the PCI functions that do its DMA (an NVMe multipath head
/// has one per path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDevice {
    /// The disk's name (`nvme0n1`), a partition's disk for a partition.
    pub name: String,
    pub functions: Vec<PciAddr>,
}

/// The last PCI function on a sysfs device path: the one nearest the device.
fn nearest_function(path: &Path) -> Option<PciAddr> {
    path.components().filter_map(|c| c.as_os_str().to_str()?.parse().ok()).next_back()
}

impl Sysfs {
    /// The block device `path` is (a block special file) or lives on (a regular file), as
    /// `major:minor`.
    pub fn block_device_of(&self, path: &Path) -> Result<BlockDevice, Error> {
        let meta = std::fs::metadata(path).map_err(|e| Error::os(format!("{}", path.display()), e))?;
        let dev = if meta.file_type().is_block_device() { meta.rdev() } else { meta.dev() };
        // glibc's gnu_dev_major/minor encoding.
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        self.block_device(major, minor)
            .map_err(|e| e.context(format_args!("{} (device {major}:{minor})", path.display())))
    }

    /// The block device `major:minor` from `sys/dev/block`.
    pub fn block_device(&self, major: u64, minor: u64) -> Result<BlockDevice, Error> {
        let link = self.root().join(format!("sys/dev/block/{major}:{minor}"));
        let real = std::fs::canonicalize(&link).map_err(|e| {
            format!(
                "not a block device the kernel lists ({}: {e}); a filesystem without one (tmpfs) has no device to DMA",
                link.display()
            )
        })?;
        let disk: PathBuf = match real.join("partition").exists() {
            true => real.parent().map_or(real.clone(), Path::to_path_buf),
            false => real,
        };
        let name = disk.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(f) = nearest_function(&disk) {
            return Ok(BlockDevice { name, functions: vec![f] });
        }
        // An NVMe multipath head sits below its nvme-subsystem; the controllers there are its paths.
        let subsys =
            disk.parent().filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("nvme-subsys")));
        let mut functions = Vec::new();
        if let Some(dir) = subsys {
            for e in std::fs::read_dir(dir).map_err(|e| Error::os(format!("{}", dir.display()), e))?.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.strip_prefix("nvme").is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
                    && let Some(f) = std::fs::canonicalize(e.path()).ok().as_deref().and_then(nearest_function)
                {
                    functions.push(f);
                }
            }
        }
        functions.sort();
        if functions.is_empty() {
            return Err(format!("{name} is not on a PCI device (a virtual or software block device)").into());
        }
        Ok(BlockDevice { name, functions })
    }
}
