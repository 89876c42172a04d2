//! A namespace on a regular file or a block device. I/O goes through io_uring when the kernel
//! allows it, else positional reads and writes; an O_DIRECT descriptor serves every request
//! whose buffer, offset and length are aligned, the page-cache descriptor the rest. Flush is
//! fdatasync, and the namespace reports a volatile write cache.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use p2pnvmf_nvmf::Backend;
use tracing::{info, warn};

use crate::uring;

/// Memory alignment for O_DIRECT buffers (a page covers every logical block size in use).
pub const DIRECT_MEM_ALIGN: usize = 4096;
/// Offset and length granularity for O_DIRECT (the logical block size we expose).
const DIRECT_IO_ALIGN: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    IoUring,
    /// pread/pwrite, when io_uring is unavailable.
    Sync,
}

#[derive(Debug)]
pub struct FileBackend {
    path: PathBuf,
    file: File,
    direct: Option<File>,
    size: u64,
    engine: Engine,
}

impl FileBackend {
    /// Opens `path` with the best engine available. A regular file is created or extended to
    /// `size` when given; a block device (or an existing file without `size`) serves its own
    /// size.
    pub fn open(path: &Path, size: Option<u64>) -> io::Result<Self> {
        let engine = match uring::available() {
            Ok(()) => Engine::IoUring,
            Err(e) => {
                warn!(path = %path.display(), "io_uring unavailable ({e}): using pread/pwrite");
                Engine::Sync
            }
        };
        Self::open_with(path, size, engine)
    }

    pub fn open_with(path: &Path, size: Option<u64>, engine: Engine) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(size.is_some()).open(path)?;
        let meta = file.metadata()?;
        let size = if meta.file_type().is_block_device() {
            (&file).seek(SeekFrom::End(0))?
        } else {
            match size {
                Some(s) if meta.len() < s => {
                    file.set_len(s)?;
                    s
                }
                Some(s) => s,
                None => meta.len(),
            }
        };
        let direct = match OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                // tmpfs and some network filesystems refuse O_DIRECT.
                info!(path = %path.display(), "O_DIRECT unavailable ({e}): page cache only");
                None
            }
        };
        Ok(FileBackend { path: path.to_path_buf(), file, direct, size, engine })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn engine(&self) -> Engine {
        self.engine
    }

    pub fn has_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The O_DIRECT descriptor when this request qualifies, else the page-cache one.
    fn fd_for(&self, ptr: usize, offset: u64, len: usize) -> &File {
        match &self.direct {
            Some(d)
                if ptr.is_multiple_of(DIRECT_MEM_ALIGN)
                    && offset.is_multiple_of(DIRECT_IO_ALIGN)
                    && (len as u64).is_multiple_of(DIRECT_IO_ALIGN) =>
            {
                d
            }
            _ => &self.file,
        }
    }

    fn write_from(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let f = self.fd_for(buf.as_ptr() as usize, offset, buf.len());
        match self.engine {
            Engine::IoUring => uring::write_at(f.as_raw_fd(), buf, offset),
            Engine::Sync => f.write_all_at(buf, offset),
        }
    }
}

impl Backend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let f = self.fd_for(buf.as_ptr() as usize, offset, buf.len());
        match self.engine {
            Engine::IoUring => uring::read_at(f.as_raw_fd(), buf, offset),
            Engine::Sync => f.read_exact_at(buf, offset),
        }
    }

    fn write(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.write_from(offset, buf)
    }

    fn flush(&self) -> io::Result<()> {
        match self.engine {
            Engine::IoUring => uring::fdatasync(self.file.as_raw_fd()),
            Engine::Sync => self.file.sync_data(),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROES.len() as u64) as usize;
            self.write_from(offset + done, &ZEROES[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }

    fn volatile_write_cache(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page-aligned window of `len` bytes inside a Vec.
    fn aligned(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
        v.resize(len + DIRECT_MEM_ALIGN, 0);
        let off = v.as_ptr().align_offset(DIRECT_MEM_ALIGN);
        &mut v[off..off + len]
    }

    fn roundtrip(engine: Engine) {
        let path = std::env::temp_dir().join(format!("p2pnvmf-file-{engine:?}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            let f = FileBackend::open_with(&path, Some(1 << 20), engine).unwrap();
            let mut v = Vec::new();
            let buf = aligned(&mut v, 8192);
            buf.fill(0xab);
            // Aligned (O_DIRECT where the filesystem allows) and unaligned (page cache) writes.
            f.write(4096, buf).unwrap();
            f.write(100_000, &[0xcd; 300]).unwrap();
            f.flush().unwrap();
        }
        let f = FileBackend::open_with(&path, None, engine).unwrap();
        assert_eq!(f.size_bytes(), 1 << 20);
        let mut v = Vec::new();
        let buf = aligned(&mut v, 8192);
        f.read(4096, buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0xab));
        let mut small = [0u8; 300];
        f.read(100_000, &mut small).unwrap();
        assert_eq!(small, [0xcd; 300]);
        f.write_zeroes(4096, 512).unwrap();
        f.read(4096, &mut small).unwrap();
        assert_eq!(small, [0; 300]);
        let e = f.read((1 << 20) - 100, &mut small).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn io_uring_engine_roundtrip() {
        uring::available().expect("io_uring on the test machine");
        roundtrip(Engine::IoUring);
    }

    #[test]
    fn pread_fallback_roundtrip() {
        roundtrip(Engine::Sync);
    }
}
