//! Interrupt eventfds on tokio: an MSI-X vector's eventfd, owned by the `AsyncFd` that watches it.

use std::fs::File;
use std::io;

use tokio::io::unix::AsyncFd;

/// Watches `f` for readability.
pub(crate) fn watch(f: File) -> io::Result<AsyncFd<File>> {
    // SAFETY: the AsyncFd owns the file, so the descriptor stays open until it is deregistered.
    unsafe { AsyncFd::register(f) }.map_err(|e| e.into_parts().1)
}
