//! NVM I/O commands (NVMe NVM Command Set 1.0, 3): Read, Write, Flush, Write Zeroes, Dataset
//! Management, Compare. Each checks NSID, LBA range and transfer length before the backend.

use crate::Status;
use crate::ctrl::Controller;
use crate::ns::{Namespace, io_error_status};
use crate::queue::Response;
use crate::subsystem::Subsystem;
use crate::wire::Sqe;

pub mod opcode {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
    pub const ALL: [u8; 6] = [FLUSH, WRITE, READ, COMPARE, WRITE_ZEROES, DATASET_MANAGEMENT];

    pub fn changes_content(op: u8) -> bool {
        matches!(op, WRITE | WRITE_ZEROES | DATASET_MANAGEMENT)
    }
}

/// Starting LBA and block count (CDW10–12), checked against the namespace.
fn lba_range(ns: &Namespace, sqe: &Sqe) -> Result<(u64, u64), Status> {
    let slba = u64::from(sqe.cdw10.get()) | u64::from(sqe.cdw11.get()) << 32;
    let nlb = u64::from(sqe.cdw12.get() & 0xffff) + 1;
    match slba.checked_add(nlb) {
        Some(end) if end <= ns.blocks() => Ok((slba << ns.lba_shift, nlb << ns.lba_shift)),
        _ => Err(Status::LBA_OUT_OF_RANGE.dnr()),
    }
}

pub(crate) fn execute(ctrl: &Controller, sqe: &Sqe, data: &mut [u8]) -> Response {
    let Some(subsys) = &ctrl.subsys else {
        return Response::status(Status::INVALID_OPCODE.dnr());
    };
    match run(subsys, sqe, data) {
        Ok(r) => r,
        Err(s) => Response::status(s),
    }
}

fn run(subsys: &Subsystem, sqe: &Sqe, data: &mut [u8]) -> Result<Response, Status> {
    let nsid = sqe.nsid.get();
    if sqe.opcode == opcode::FLUSH && nsid == u32::MAX {
        for ns in &subsys.namespaces {
            ns.backend.flush().map_err(|e| io_error_status(&e))?;
        }
        return Ok(Response::ok());
    }
    let ns = subsys.ns(nsid).ok_or(Status::INVALID_NAMESPACE.dnr())?;
    let be = &ns.backend;
    let io = |r: std::io::Result<()>| r.map_err(|e| io_error_status(&e));
    match sqe.opcode {
        opcode::READ | opcode::WRITE | opcode::COMPARE => {
            let (off, len) = lba_range(ns, sqe)?;
            if data.len() as u64 != len {
                return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
            }
            match sqe.opcode {
                opcode::READ => {
                    io(be.read(off, data))?;
                    subsys.stats.record_read(len);
                    Ok(Response::data(data.len()))
                }
                opcode::WRITE => {
                    io(be.write(off, data))?;
                    subsys.stats.record_write(len);
                    Ok(Response::ok())
                }
                _ => compare(ns, off, data),
            }
        }
        opcode::FLUSH => io(be.flush()).map(|()| Response::ok()),
        opcode::WRITE_ZEROES => {
            let (off, len) = lba_range(ns, sqe)?;
            io(be.write_zeroes(off, len))?;
            Ok(Response::ok())
        }
        opcode::DATASET_MANAGEMENT => dataset_management(ns, sqe, data),
        _ => Err(Status::INVALID_OPCODE.dnr()),
    }
}

/// Compare in 64 KiB steps, so a large compare needs no buffer of its size.
fn compare(ns: &Namespace, off: u64, host: &[u8]) -> Result<Response, Status> {
    let mut chunk = [0u8; 64 << 10];
    for (i, want) in host.chunks(chunk.len()).enumerate() {
        let have = &mut chunk[..want.len()];
        ns.backend.read(off + (i * (64 << 10)) as u64, have).map_err(|e| io_error_status(&e))?;
        if have != want {
            return Err(Status::COMPARE_FAILURE.dnr());
        }
    }
    Ok(Response::ok())
}

/// Dataset Management (NVM Command Set 1.0, 3.2.3): ranges of 16 bytes (context attributes,
/// length in blocks, starting LBA); only Deallocate (AD, CDW11 bit 2) has an effect.
fn dataset_management(ns: &Namespace, sqe: &Sqe, data: &[u8]) -> Result<Response, Status> {
    let nr = (sqe.cdw10.get() & 0xff) as usize + 1;
    let ranges = data.get(..nr * 16).ok_or(Status::DATA_SGL_LENGTH_INVALID.dnr())?;
    if sqe.cdw11.get() & (1 << 2) == 0 {
        return Ok(Response::ok());
    }
    let mut checked = [(0u64, 0u64); 256];
    for (i, r) in ranges.chunks_exact(16).enumerate() {
        let nlb = u64::from(u32::from_le_bytes(r[4..8].try_into().expect("4 bytes")));
        let slba = u64::from_le_bytes(r[8..16].try_into().expect("8 bytes"));
        match slba.checked_add(nlb) {
            Some(end) if end <= ns.blocks() => {
                checked[i] = (slba << ns.lba_shift, nlb << ns.lba_shift);
            }
            _ => return Err(Status::LBA_OUT_OF_RANGE.dnr()),
        }
    }
    // All ranges are checked first so an invalid one changes nothing.
    for &(off, len) in &checked[..nr] {
        if len != 0 {
            ns.backend.deallocate(off, len).map_err(|e| io_error_status(&e))?;
        }
    }
    Ok(Response::ok())
}
