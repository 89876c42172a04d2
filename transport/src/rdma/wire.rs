//! RDMA CM private data of the NVMe-oF RDMA binding (NVMe-oF 1.1, 7.3.2 and 7.3.3): pure
//! parsing and encoding.

use p2pnvmf_nvmf::Limits;
use p2pnvmf_nvmf::wire::{SglDescriptor, sgl};
use zerocopy::little_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// RDMA_CM_REQUEST private data, 32 bytes (Figure 52).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ConnectRequest {
    pub recfmt: U16,
    pub qid: U16,
    pub hrqsize: U16,
    pub hsqsize: U16,
    pub cntlid: U16,
    pub rsvd: [u8; 22],
}

impl ConnectRequest {
    /// A request for the dynamic controller (CNTLID FFFFh), as a host sends it.
    pub fn new(recfmt: u16, qid: u16, hrqsize: u16, hsqsize: u16) -> Self {
        ConnectRequest {
            recfmt: recfmt.into(),
            qid: qid.into(),
            hrqsize: hrqsize.into(),
            hsqsize: hsqsize.into(),
            cntlid: 0xffff.into(),
            rsvd: [0; 22],
        }
    }
}

/// RDMA_CM_REP private data, 32 bytes (Figure 53).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Accept {
    pub recfmt: U16,
    pub crqsize: U16,
    pub rsvd: [u8; 28],
}

/// RDMA_CM_REJECT private data, 4 bytes (Figure 54).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Reject {
    pub recfmt: U16,
    pub sts: U16,
}

/// Reject status codes (Figure 55).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RejectStatus {
    InvalidLength = 1,
    InvalidRecfmt = 2,
    InvalidQid = 3,
    InvalidHsqsize = 4,
    InvalidHrqsize = 5,
    NoResources = 6,
    InvalidIrd = 7,
    InvalidOrd = 8,
}

impl RejectStatus {
    pub fn private_data(self) -> Reject {
        Reject { recfmt: 0.into(), sts: (self as u16).into() }
    }
}

/// A connect request that passed the checks: the queue's sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRequest {
    pub qid: u16,
    /// Commands the host may have outstanding: our receive queue depth.
    pub depth: u16,
    pub hrqsize: u16,
}

/// A keyed SGL data block: where the host's buffer is, and its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keyed {
    pub addr: u64,
    pub len: usize,
    pub key: u32,
    /// Sub type "invalidate key": answer with SEND_WITH_INV.
    pub invalidate: bool,
}

impl Keyed {
    /// Decodes a keyed data block descriptor (type 4): address, a 3-byte length, then a
    /// 4-byte key (NVMe Base 2.0, Figure 118).
    pub fn of(d: &SglDescriptor) -> Keyed {
        let raw = d.length.get();
        let key = raw >> 24 | u32::from(d.rsvd[0]) << 8 | u32::from(d.rsvd[1]) << 16 | u32::from(d.rsvd[2]) << 24;
        Keyed {
            addr: d.addr.get(),
            len: (raw & 0x00ff_ffff) as usize,
            key,
            invalidate: d.id == sgl::KEYED_DATA_BLOCK_INVALIDATE,
        }
    }
}

/// Validates RDMA_CM_REQUEST private data against the target's limits.
pub fn parse_request(data: &[u8], lim: &Limits) -> Result<QueueRequest, RejectStatus> {
    let bytes = data.get(..32).ok_or(RejectStatus::InvalidLength)?;
    let req = ConnectRequest::read_from_bytes(bytes).map_err(|_| RejectStatus::InvalidLength)?;
    if req.recfmt.get() != 0 {
        return Err(RejectStatus::InvalidRecfmt);
    }
    let qid = req.qid.get();
    if qid > lim.io_queues {
        return Err(RejectStatus::InvalidQid);
    }
    // HSQSIZE is 0-based; the admin queue needs at least 32 entries (NVMe-oF 1.1, 3.2.1).
    let hsqsize = req.hsqsize.get();
    if hsqsize == 0 || hsqsize >= lim.queue_entries || (qid == 0 && hsqsize < 31) {
        return Err(RejectStatus::InvalidHsqsize);
    }
    // HRQSIZE is 1-based: the host must take a response for every command it may send.
    let hrqsize = req.hrqsize.get();
    if hrqsize < hsqsize + 1 || hrqsize > lim.queue_entries + 1 {
        return Err(RejectStatus::InvalidHrqsize);
    }
    Ok(QueueRequest { qid, depth: hsqsize + 1, hrqsize })
}

pub fn accept(crqsize: u16) -> Accept {
    Accept { recfmt: 0.into(), crqsize: crqsize.into(), rsvd: [0; 28] }
}

/// RDMA READ depth (ORD) and responder resources (IRD) for the accept: what the host offers
/// (as seen from our side) bounded by the device. We issue RDMA READs, so no ORD means no
/// host writes: refused.
pub fn negotiate_rd(
    host_initiator_depth: u8,
    host_responder_resources: u8,
    dev_max_init_rd_atom: i32,
    dev_max_rd_atom: i32,
) -> Result<(u8, u8), RejectStatus> {
    let ord = i32::from(host_initiator_depth).min(dev_max_init_rd_atom).clamp(0, 255) as u8;
    let ird = i32::from(host_responder_resources).min(dev_max_rd_atom).clamp(0, 255) as u8;
    if ord == 0 {
        return Err(RejectStatus::InvalidOrd);
    }
    Ok((ord, ird))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(recfmt: u16, qid: u16, hrqsize: u16, hsqsize: u16) -> Vec<u8> {
        let mut v = ConnectRequest::new(recfmt, qid, hrqsize, hsqsize).as_bytes().to_vec();
        v.extend_from_slice(&[0; 24]); // what rdma_cm appends (56 bytes seen from Linux)
        v
    }

    #[test]
    fn keyed_descriptor_splits_length_and_key() {
        let d = SglDescriptor {
            addr: 0x1122_3344_5566_7788.into(),
            length: 0xdd00_1000.into(),
            rsvd: [0xcc, 0xbb, 0xaa],
            id: sgl::KEYED_DATA_BLOCK_INVALIDATE,
        };
        let k = Keyed::of(&d);
        assert_eq!((k.addr, k.len, k.key, k.invalidate), (0x1122_3344_5566_7788, 0x1000, 0xaabb_ccdd, true));
    }

    #[test]
    fn layouts() {
        assert_eq!(size_of::<ConnectRequest>(), 32);
        assert_eq!(size_of::<Accept>(), 32);
        assert_eq!(size_of::<Reject>(), 4);
        assert_eq!(RejectStatus::NoResources.private_data().as_bytes(), &[0, 0, 6, 0]);
    }

    #[test]
    fn linux_admin_request() {
        // As seen from the Linux host over rxe: qid 0, hrqsize 32, hsqsize 31.
        assert_eq!(
            parse_request(&req(0, 0, 32, 31), &Limits::default()),
            Ok(QueueRequest { qid: 0, depth: 32, hrqsize: 32 })
        );
        assert_eq!(parse_request(&req(0, 1, 128, 127), &Limits::default()).unwrap().depth, 128);
    }

    #[test]
    fn each_field_has_its_reject_code() {
        assert_eq!(parse_request(&[0; 16], &Limits::default()), Err(RejectStatus::InvalidLength));
        assert_eq!(parse_request(&req(1, 0, 32, 31), &Limits::default()), Err(RejectStatus::InvalidRecfmt));
        assert_eq!(parse_request(&req(0, 65, 32, 31), &Limits::default()), Err(RejectStatus::InvalidQid));
        assert_eq!(parse_request(&req(0, 1, 32, 0), &Limits::default()), Err(RejectStatus::InvalidHsqsize));
        assert_eq!(parse_request(&req(0, 0, 32, 15), &Limits::default()), Err(RejectStatus::InvalidHsqsize));
        assert_eq!(parse_request(&req(0, 1, 300, 200), &Limits::default()), Err(RejectStatus::InvalidHsqsize));
        assert_eq!(parse_request(&req(0, 1, 10, 31), &Limits::default()), Err(RejectStatus::InvalidHrqsize));
    }

    #[test]
    fn rd_negotiation() {
        // Linux over rxe: initiator depth 128 offered to us, responder resources 0.
        assert_eq!(negotiate_rd(128, 0, 128, 128), Ok((128, 0)));
        assert_eq!(negotiate_rd(128, 16, 8, 4), Ok((8, 4)));
        assert_eq!(negotiate_rd(0, 16, 8, 4), Err(RejectStatus::InvalidOrd));
    }

    proptest! {
        #[test]
        fn any_private_data_is_parsed_or_rejected(data in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(q) = parse_request(&data, &Limits::default()) {
                prop_assert!(q.depth >= 2 && q.depth <= Limits::default().queue_entries);
            }
        }
    }
}
