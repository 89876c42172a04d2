//! Positional I/O through io_uring: one ring per thread (created on first use, never shared,
//! so queues on different threads never contend), one operation in flight per call.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, types};

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Whether io_uring works here (kernel support, no seccomp filter refusing it).
pub fn available() -> io::Result<()> {
    IoUring::new(2).map(drop)
}

enum Op<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
    Fsync,
}

fn submit(fd: RawFd, offset: u64, op: &mut Op<'_>) -> io::Result<usize> {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(IoUring::new(8)?);
        }
        let ring = slot.as_mut().expect("ring created above");
        let entry = match op {
            Op::Read(b) => opcode::Read::new(types::Fd(fd), b.as_mut_ptr(), b.len() as u32).offset(offset).build(),
            Op::Write(b) => opcode::Write::new(types::Fd(fd), b.as_ptr(), b.len() as u32).offset(offset).build(),
            Op::Fsync => opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build(),
        };
        // SAFETY: the buffer behind `entry` is borrowed by `op` for this whole call, and the call
        // waits for the completion below before returning, so the kernel never touches it after.
        unsafe { ring.submission().push(&entry) }.map_err(|_| io::Error::other("io_uring submission queue full"))?;
        ring.submit_and_wait(1)?;
        let cqe = ring.completion().next().ok_or_else(|| io::Error::other("io_uring: no completion"))?;
        let res = cqe.result();
        if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) }
    })
}

/// Reads all of `buf` at `offset`; a short read past the end of the file is an error.
pub fn read_at(fd: RawFd, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let n = submit(fd, offset, &mut Op::Read(buf))?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}

pub fn write_at(fd: RawFd, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let n = submit(fd, offset, &mut Op::Write(buf))?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
        offset += n as u64;
    }
    Ok(())
}

pub fn fdatasync(fd: RawFd) -> io::Result<()> {
    submit(fd, 0, &mut Op::Fsync).map(drop)
}
