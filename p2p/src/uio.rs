//! A function bound to uio_pci_generic, for hosts without an IOMMU: its BARs through sysfs
//! `resourceN` (uio_pci_generic claims none), config space through sysfs `config`, and its INTx
//! interrupt through `/dev/uioN`. The kernel masks INTx (command register bit 10) when the
//! interrupt fires and counts it; the user reads the count and unmasks INTx again.
//! uio_pci_generic clears bus mastering when *any* open file of `/dev/uioN` is closed, so the
//! device is opened once, here, and held until nothing may DMA any more.
#![allow(unsafe_code)]

use crate::Error;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::mem::{BarUse, Mapping};

/// PCI command register (config offset 4): memory space, bus master, INTx disable.
const COMMAND: u64 = 4;
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_MASTER: u16 = 1 << 2;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;

#[derive(Debug)]
pub struct UioDevice {
    name: String,
    dir: PathBuf,
    config: File,
    uio: File,
}

impl UioDevice {
    /// Opens the function in `dir` (its sysfs directory), bound to uio_pci_generic; `/dev` is
    /// found below `root` (the sysfs root, `/` outside tests).
    pub fn open(name: &str, dir: &Path, root: &Path) -> Result<UioDevice, Error> {
        let uio = std::fs::read_dir(dir.join("uio"))
            .ok()
            .and_then(|mut d| d.find_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())))
            .ok_or_else(|| {
                format!("{name}: no uio device under {} (is it bound to uio_pci_generic?)", dir.display())
            })?;
        let dev = root.join("dev").join(&uio);
        let uio = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .map_err(|e| Error::os(format!("{name}: opening {}", dev.display()), e))?;
        let config = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("config"))
            .map_err(|e| Error::os(format!("{name}: opening its config space"), e))?;
        Ok(UioDevice { name: name.to_string(), dir: dir.to_path_buf(), config, uio })
    }

    /// Maps `len` bytes of BAR `bar` from `off` (sysfs `resourceN`).
    pub fn map_bar(&self, bar: u8, off: u64, len: usize, usage: BarUse) -> Result<Mapping, Error> {
        let path = self.dir.join(format!("resource{bar}"));
        let err = |e: io::Error| Error::os(format!("{}: mapping {}", self.name, path.display()), e);
        let f = OpenOptions::new().read(true).write(true).open(&path).map_err(err)?;
        // SAFETY: the sysfs file of BAR `bar` of the function this process holds through uio.
        unsafe { Mapping::bar(&self.dir, bar, f.as_raw_fd(), 0, off, len, usage) }.map_err(err)
    }

    fn command(&self) -> Result<u16, Error> {
        let mut b = [0u8; 2];
        self.config
            .read_exact_at(&mut b, COMMAND)
            .map_err(|e| Error::os(format!("{}: reading the command register", self.name), e))?;
        Ok(u16::from_le_bytes(b))
    }

    fn set_command(&self, v: u16) -> Result<(), Error> {
        self.config
            .write_all_at(&v.to_le_bytes(), COMMAND)
            .map_err(|e| Error::os(format!("{}: writing the command register", self.name), e))
    }

    /// Turns on memory decoding and bus mastering, and unmasks INTx.
    pub fn enable(&self) -> Result<(), Error> {
        let c = self.command()?;
        self.set_command((c | COMMAND_MEMORY | COMMAND_MASTER) & !COMMAND_INTX_DISABLE)
    }

    /// Unmasks INTx after an interrupt (the kernel masked it). The kernel touches the
    /// register only when INTx fires, which it cannot while masked: the read-modify-write is ours.
    pub fn unmask_intx(&self) -> Result<(), Error> {
        let c = self.command()?;
        if c & COMMAND_INTX_DISABLE == 0 {
            return Ok(());
        }
        self.set_command(c & !COMMAND_INTX_DISABLE)
    }

    /// Waits up to `limit` for an interrupt; true when one (or more) came.
    pub fn wait(&self, limit: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd { fd: self.uio.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = limit.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one pollfd that lives across the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
        }
        if n == 0 {
            return Ok(false);
        }
        // The interrupt count, exactly 4 bytes (uio refuses other sizes).
        let mut count = [0u8; 4];
        (&self.uio).read_exact(&mut count)?;
        Ok(true)
    }
}
