//! The p2p layer's error: what failed, on which file or device, and the errno when the
//! kernel gave one — so a caller can tell "busy" from "absent" and a user reads the path or
//! PCI address it concerns.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file (sysfs, procfs, a device node).
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// A file's content is not what the kernel documents.
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
    /// A system call on a device (ioctl, mmap, eventfd): `what` names the call and the device.
    #[error("{what}: {source}")]
    Os { what: String, source: io::Error },
    /// The device, the topology or the configuration does not allow it; why, in words.
    #[error("{0}")]
    Unusable(String),
}

impl Error {
    pub fn os(what: impl Into<String>, source: io::Error) -> Self {
        Error::Os { what: what.into(), source }
    }

    /// The kernel's errno behind the error, if it came from the kernel.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } | Error::Os { source, .. } => source.raw_os_error(),
            Error::Format { .. } | Error::Unusable(_) => None,
        }
    }

    /// The error with `context` (a PCI address, what was being done) in front of its message,
    /// its kind and errno kept.
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        match self {
            Error::Io { path, source } => Error::Os { what: format!("{context}: {}", path.display()), source },
            Error::Os { what, source } => Error::Os { what: format!("{context}: {what}"), source },
            Error::Format { path, what } => Error::Format { path, what: format!("{context}: {what}") },
            Error::Unusable(why) => Error::Unusable(format!("{context}: {why}")),
        }
    }
}

impl From<String> for Error {
    fn from(why: String) -> Self {
        Error::Unusable(why)
    }
}

impl From<&str> for Error {
    fn from(why: &str) -> Self {
        Error::Unusable(why.to_owned())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
