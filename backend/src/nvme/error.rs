//! The nvme-vfio driver's error: which SSD, what failed, and what the kernel or the SSD said —
//! the errno, or the SSD's own completion status — so that a host hears its meaning and the log
//! names the PCI address.

use std::io;

use p2pnvmf_nvmf::Status;
use p2pnvmf_nvmf::ns::IoError;
use p2pnvmf_p2p::pci::PciAddr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// VFIO, uio, sysfs or a mapping refused (the p2p layer's error, errno kept).
    #[error("{pci}: {source}")]
    Device { pci: PciAddr, source: p2pnvmf_p2p::Error },
    /// A system call of the driver's own.
    #[error("{pci}: {what}: {source}")]
    Os { pci: PciAddr, what: String, source: io::Error },
    /// The SSD completed a command with an error status.
    #[error("{pci}: {what} failed: {status}")]
    Status { pci: PciAddr, what: String, status: Status },
    /// The controller does not work (fatal status, not ready, a command that never completed,
    /// given up on, no queue pair in time): said with its PCI address.
    #[error("{0}")]
    Failed(String),
    /// The SSD, its namespace or the system is not as nvme-vfio needs it (bound to another
    /// driver, no IOMMU group, a namespace format it cannot serve): what to change.
    #[error("{0}")]
    Setup(String),
}

impl Error {
    /// For `map_err` on the p2p layer's results.
    pub fn device(pci: PciAddr) -> impl FnOnce(p2pnvmf_p2p::Error) -> Error {
        move |source| Error::Device { pci, source }
    }

    /// For `map_err` on a system call's result.
    pub fn os(pci: PciAddr, what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Os { pci, what: what.into(), source }
    }
}

/// At the namespace's seam the meaning goes on to the host: the SSD's status as it is, the
/// errno, or — for a controller that does not work — the reason (Namespace Not Ready).
impl From<Error> for IoError {
    fn from(e: Error) -> IoError {
        match e {
            Error::Status { pci, status, .. } => IoError::Device { device: pci, status },
            Error::Os { source, .. } => IoError::Os(source),
            Error::Device { ref source, .. } => match source.errno() {
                Some(errno) => IoError::Os(io::Error::from_raw_os_error(errno)),
                None => IoError::Unavailable(e.to_string()),
            },
            Error::Failed(why) | Error::Setup(why) => IoError::Unavailable(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_keeps_its_meaning_for_the_host() {
        let pci: PciAddr = "0000:01:00.0".parse().unwrap();
        let status = Status::from_device(0x2 << 8 | 0x81);
        let e = Error::Status { pci, what: "Identify".into(), status };
        assert!(matches!(IoError::from(e), IoError::Device { status: s, .. } if s == status));
        let e = Error::os(pci, "eventfd")(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(matches!(IoError::from(e), IoError::Os(e) if e.raw_os_error() == Some(libc::EMFILE)));
        let busy = p2pnvmf_p2p::Error::os("opening /dev/vfio/3", io::Error::from_raw_os_error(libc::EBUSY));
        let e = Error::device(pci)(busy);
        assert_eq!(e.to_string(), "0000:01:00.0: opening /dev/vfio/3: Device or resource busy (os error 16)");
        assert!(matches!(IoError::from(e), IoError::Os(e) if e.raw_os_error() == Some(libc::EBUSY)));
        let e = Error::Failed("0000:01:00.0: controller fatal status".into());
        assert!(matches!(IoError::from(e), IoError::Unavailable(_)));
    }
}
