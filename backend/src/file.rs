//! A namespace on a regular file or a block device, with positional reads and writes.
//! Writes go through the page cache, so the namespace reports a volatile write cache and
//! Flush means fdatasync.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use p2pnvmf_nvmf::Backend;

#[derive(Debug)]
pub struct FileBackend {
    path: PathBuf,
    file: File,
    size: u64,
}

impl FileBackend {
    /// Opens `path`. A regular file is created or extended to `size` when given; a block
    /// device (or an existing file without `size`) serves its own size.
    pub fn open(path: &Path, size: Option<u64>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(size.is_some())
            .open(path)?;
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
        Ok(FileBackend {
            path: path.to_path_buf(),
            file,
            size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Backend for FileBackend {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROES.len() as u64) as usize;
            self.file.write_all_at(&ZEROES[..n], offset + done)?;
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

    #[test]
    fn data_survives_reopen() {
        let path = std::env::temp_dir().join(format!("p2pnvmf-file-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            let f = FileBackend::open(&path, Some(1 << 20)).unwrap();
            f.write(4096, &[0xab; 512]).unwrap();
            f.flush().unwrap();
        }
        let f = FileBackend::open(&path, None).unwrap();
        assert_eq!(f.size_bytes(), 1 << 20);
        let mut buf = [0u8; 512];
        f.read(4096, &mut buf).unwrap();
        assert_eq!(buf, [0xab; 512]);
        f.write_zeroes(4096, 512).unwrap();
        f.read(4096, &mut buf).unwrap();
        assert_eq!(buf, [0; 512]);
        std::fs::remove_file(&path).unwrap();
    }
}
