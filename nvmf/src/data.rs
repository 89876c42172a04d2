//! Where a command's data is, from its SGL descriptor (NVMe-oF 1.1, 2.3; NVMe/TCP 1.0, 3.3;
//! NVMe over RDMA 1.0, 3): checked here once for every transport, which then moves the bytes.

use crate::Status;
use crate::subsystem::TransportParams;
use crate::wire::{Direction, Sqe, sgl};

/// Where the data of an accepted command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataPlan {
    /// The command moves no data.
    #[default]
    None,
    /// Host-to-controller data in the capsule: `len` bytes at `offset` of its in-capsule data.
    InCapsule { offset: usize, len: usize },
    /// `len` bytes the transport moves: an RDMA keyed transfer, or NVMe/TCP's R2T/H2CData
    /// (host to controller) and C2HData (controller to host).
    Transport { len: usize },
}

impl DataPlan {
    /// The bytes the command's buffer holds.
    pub fn len(self) -> usize {
        match self {
            DataPlan::None => 0,
            DataPlan::InCapsule { len, .. } | DataPlan::Transport { len } => len,
        }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

/// Locates `sqe`'s data, `icd_len` bytes having come in its capsule, on a transport with
/// `params` (keyed SGLs for RDMA, the transport data block for NVMe/TCP, at most `max_xfer`
/// bytes). A refusal is the status the command completes with.
pub fn locate(sqe: &Sqe, icd_len: usize, params: &TransportParams) -> Result<DataPlan, Status> {
    let dir = Direction::of(sqe);
    match dir {
        Direction::None => return Ok(DataPlan::None),
        Direction::Bidirectional => return Err(Status::INVALID_FIELD.dnr()),
        _ => {}
    }
    let d = sqe.dptr;
    let keyed = matches!(d.id, sgl::KEYED_DATA_BLOCK | sgl::KEYED_DATA_BLOCK_INVALIDATE);
    // A keyed descriptor's length is 3 bytes; its key follows (NVMe Base 2.0, Figure 120).
    let len = if keyed { d.length.get() & 0x00ff_ffff } else { d.length.get() } as usize;
    if len > params.max_xfer as usize {
        return Err(Status::DATA_SGL_LENGTH_INVALID.dnr());
    }
    match d.id {
        sgl::DATA_BLOCK_OFFSET if dir == Direction::HostToController => {
            let offset = d.addr.get();
            match offset.checked_add(len as u64) {
                Some(end) if end <= icd_len as u64 => Ok(DataPlan::InCapsule { offset: offset as usize, len }),
                _ if offset > icd_len as u64 => Err(Status::SGL_OFFSET_INVALID.dnr()),
                _ => Err(Status::DATA_SGL_LENGTH_INVALID.dnr()),
            }
        }
        _ if keyed && params.keyed_sgls => Ok(DataPlan::Transport { len }),
        // NVMe/TCP: data beside a capsule that carries some is not this descriptor's.
        sgl::TRANSPORT_DATA_BLOCK if !params.keyed_sgls && icd_len == 0 => Ok(DataPlan::Transport { len }),
        _ => Err(Status::SGL_TYPE_INVALID.dnr()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::FABRICS_OPCODE;

    const TCP: TransportParams = TransportParams { ioccsz: 516, max_xfer: 1 << 20, msdbd: 1, keyed_sgls: false };
    const RDMA: TransportParams = TransportParams { keyed_sgls: true, ..TCP };

    fn cmd(opcode: u8, id: u8, addr: u64, len: u32) -> Sqe {
        let mut s = Sqe { opcode, ..Sqe::default() };
        (s.dptr.id, s.dptr.addr, s.dptr.length) = (id, addr.into(), len.into());
        s
    }

    #[test]
    fn each_descriptor_is_checked_the_same_on_every_transport() {
        const WRITE: u8 = 0x01;
        const READ: u8 = 0x02;
        for p in [&TCP, &RDMA] {
            // In-capsule data: anywhere inside what came, at an offset too (ICDOFF is 0, so
            // the host may place it); past its end by offset or by length.
            let at = |o, l| locate(&cmd(WRITE, sgl::DATA_BLOCK_OFFSET, o, l), 8192, p);
            assert_eq!(at(0, 4096), Ok(DataPlan::InCapsule { offset: 0, len: 4096 }));
            assert_eq!(at(512, 4096), Ok(DataPlan::InCapsule { offset: 512, len: 4096 }));
            assert_eq!(at(8193, 0), Err(Status::SGL_OFFSET_INVALID.dnr()));
            assert_eq!(at(4096, 8192), Err(Status::DATA_SGL_LENGTH_INVALID.dnr()));
            assert_eq!(at(u64::MAX, 2), Err(Status::SGL_OFFSET_INVALID.dnr()));
            // In-capsule data for a read, both directions at once, too long.
            assert_eq!(locate(&cmd(READ, sgl::DATA_BLOCK_OFFSET, 0, 512), 0, p), Err(Status::SGL_TYPE_INVALID.dnr()));
            assert_eq!(locate(&cmd(0x03, sgl::DATA_BLOCK_OFFSET, 0, 512), 512, p), Err(Status::INVALID_FIELD.dnr()));
            let big = (1 << 20) + 1;
            assert_eq!(
                locate(&cmd(READ, sgl::KEYED_DATA_BLOCK, 0, big), 0, p),
                Err(Status::DATA_SGL_LENGTH_INVALID.dnr())
            );
            // No data: whatever the descriptor says.
            assert_eq!(locate(&cmd(0x00, 0xff, 0, 4096), 0, p), Ok(DataPlan::None));
        }
        // Each transport's own descriptor, and only its own.
        // A keyed length of 4096 with key byte 0xc0 above it.
        let keyed = cmd(READ, sgl::KEYED_DATA_BLOCK, 0x1000, 0xc000_1000);
        let transport = cmd(READ, sgl::TRANSPORT_DATA_BLOCK, 0, 4096);
        assert_eq!(locate(&keyed, 0, &RDMA), Ok(DataPlan::Transport { len: 4096 }));
        assert_eq!(locate(&keyed, 0, &TCP), Err(Status::SGL_TYPE_INVALID.dnr()));
        assert_eq!(locate(&transport, 0, &TCP), Ok(DataPlan::Transport { len: 4096 }));
        assert_eq!(locate(&transport, 0, &RDMA), Err(Status::SGL_TYPE_INVALID.dnr()));
        assert_eq!(locate(&transport, 512, &TCP), Err(Status::SGL_TYPE_INVALID.dnr()));
        // A fabrics command's direction comes from its fctype: Property Get (0x04) moves none.
        let mut get = cmd(FABRICS_OPCODE, 0xff, 0, 0);
        get.nsid = 0x04.into();
        assert_eq!(locate(&get, 0, &TCP), Ok(DataPlan::None));
    }
}
