//! NVMe/TCP PDUs (NVMe/TCP Transport 1.0, 3.6): layouts, header validation and encoders.
//! Pure functions: the connection code calls them, tests drive them without sockets.

use p2pnvmf_nvmf::wire::{Cqe, Sqe};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub mod pdu_type {
    pub const IC_REQ: u8 = 0x00;
    pub const IC_RESP: u8 = 0x01;
    pub const H2C_TERM_REQ: u8 = 0x02;
    pub const C2H_TERM_REQ: u8 = 0x03;
    pub const CAPSULE_CMD: u8 = 0x04;
    pub const CAPSULE_RESP: u8 = 0x05;
    pub const H2C_DATA: u8 = 0x06;
    pub const C2H_DATA: u8 = 0x07;
    pub const R2T: u8 = 0x09;
}

pub mod flags {
    pub const HDGSTF: u8 = 1 << 0;
    pub const DDGSTF: u8 = 1 << 1;
    /// Last data PDU of a command (H2CData/C2HData).
    pub const DATA_LAST: u8 = 1 << 2;
    /// C2HData: the command succeeded and no response capsule follows.
    pub const DATA_SUCCESS: u8 = 1 << 3;
}

/// Fatal Error Status of a termination request (NVMe/TCP 1.0, Figure 17).
pub mod fes {
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// Common header, 8 bytes (Figure 13).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct CommonHeader {
    pub pdu_type: u8,
    pub flags: u8,
    pub hlen: u8,
    pub pdo: u8,
    pub plen: U32,
}

/// ICReq, 128 bytes (Figure 20).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct IcReq {
    pub ch: CommonHeader,
    pub pfv: U16,
    pub hpda: u8,
    pub dgst: u8,
    pub maxr2t: U32,
    pub rsvd: [u8; 112],
}

/// ICResp, 128 bytes (Figure 21).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct IcResp {
    pub ch: CommonHeader,
    pub pfv: U16,
    pub cpda: u8,
    pub dgst: u8,
    pub maxh2cdata: U32,
    pub rsvd: [u8; 112],
}

/// CapsuleCmd header: CH + SQE, 72 bytes (Figure 22).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct CapsuleCmd {
    pub ch: CommonHeader,
    pub sqe: Sqe,
}

/// CapsuleResp: CH + CQE, 24 bytes (Figure 23).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct CapsuleResp {
    pub ch: CommonHeader,
    pub cqe: Cqe,
}

/// H2CData and C2HData header, 24 bytes (Figures 24, 25).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DataHeader {
    pub ch: CommonHeader,
    pub cccid: U16,
    pub ttag: U16,
    pub datao: U32,
    pub datal: U32,
    pub rsvd: [u8; 4],
}

/// R2T, 24 bytes (Figure 26).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct R2t {
    pub ch: CommonHeader,
    pub cccid: U16,
    pub ttag: U16,
    pub r2to: U32,
    pub r2tl: U32,
    pub rsvd: [u8; 4],
}

/// H2CTermReq / C2HTermReq header, 24 bytes (Figures 18, 19); the offending PDU header follows.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct TermReq {
    pub ch: CommonHeader,
    pub fes: U16,
    pub fei: U32,
    pub rsvd: [u8; 10],
}

/// A protocol error that ends the connection with a C2HTermReq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fatal {
    pub fes: u16,
    /// Fatal Error Information: for header errors, the byte offset of the bad field.
    pub fei: u32,
    pub why: &'static str,
}

impl Fatal {
    pub fn header(offset: u32, why: &'static str) -> Self {
        Fatal { fes: fes::INVALID_HEADER_FIELD, fei: offset, why }
    }
    pub fn sequence(why: &'static str) -> Self {
        Fatal { fes: fes::PDU_SEQUENCE_ERROR, fei: 0, why }
    }
}

/// What the connection negotiated, for header checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub hdgst: bool,
    pub ddgst: bool,
    /// Largest in-capsule data accepted.
    pub max_icd: u32,
    /// MAXH2CDATA we announced.
    pub maxh2cdata: u32,
}

/// A validated header: where the data starts and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub pdu_type: u8,
    pub hlen: usize,
    /// Header digest follows the header.
    pub hdgst: bool,
    /// Bytes between the header (and its digest) and the data: padding to PDO.
    pub pad: usize,
    pub data_len: usize,
    pub ddgst: bool,
}

impl Layout {
    /// Bytes still to read after the 8-byte common header.
    pub fn rest(&self) -> usize {
        self.hlen - 8 + self.digest_len(self.hdgst) + self.pad + self.data_len + self.digest_len(self.ddgst)
    }

    fn digest_len(&self, on: bool) -> usize {
        if on { 4 } else { 0 }
    }
}

const CH_PLEN: u32 = 4;
const CH_HLEN: u32 = 2;
const CH_PDO: u32 = 3;

/// Validates a host-to-controller common header against the negotiated limits.
pub fn check(ch: &CommonHeader, lim: &Limits) -> Result<Layout, Fatal> {
    let (want_hlen, digests) = match ch.pdu_type {
        pdu_type::IC_REQ => (128, false),
        pdu_type::H2C_TERM_REQ => (24, false),
        pdu_type::CAPSULE_CMD => (72, true),
        pdu_type::H2C_DATA => (24, true),
        _ => return Err(Fatal::header(0, "PDU type a host may not send")),
    };
    if usize::from(ch.hlen) != want_hlen {
        return Err(Fatal::header(CH_HLEN, "wrong HLEN for the PDU type"));
    }
    let hdgst = digests && lim.hdgst;
    if digests && (ch.flags & flags::HDGSTF != 0) != lim.hdgst {
        return Err(Fatal::header(1, "HDGSTF does not match the negotiated header digest"));
    }
    let plen = ch.plen.get() as usize;
    let head = want_hlen + if hdgst { 4 } else { 0 };
    if plen < head {
        return Err(Fatal::header(CH_PLEN, "PLEN shorter than the header"));
    }
    let max_data = match ch.pdu_type {
        pdu_type::IC_REQ if plen != 128 => {
            return Err(Fatal::header(CH_PLEN, "ICReq PLEN is not 128"));
        }
        pdu_type::IC_REQ => 0,
        pdu_type::H2C_TERM_REQ => 128,
        pdu_type::CAPSULE_CMD => lim.max_icd as usize,
        _ => lim.maxh2cdata as usize,
    };
    if plen == head {
        return Ok(Layout { pdu_type: ch.pdu_type, hlen: want_hlen, hdgst, pad: 0, data_len: 0, ddgst: false });
    }
    if ch.pdu_type == pdu_type::H2C_TERM_REQ {
        // Terminations carry the offending header as plain data, without PDO or digests.
        let data_len = plen - head;
        if data_len > max_data {
            return Err(Fatal::header(CH_PLEN, "termination request too long"));
        }
        return Ok(Layout { pdu_type: ch.pdu_type, hlen: want_hlen, hdgst, pad: 0, data_len, ddgst: false });
    }
    let pdo = usize::from(ch.pdo);
    if pdo < head || pdo > plen {
        return Err(Fatal::header(CH_PDO, "PDO outside the PDU"));
    }
    let ddgst = digests && lim.ddgst;
    if digests && (ch.flags & flags::DDGSTF != 0) != lim.ddgst {
        return Err(Fatal::header(1, "DDGSTF does not match the negotiated data digest"));
    }
    let data_len = (plen - pdo)
        .checked_sub(if ddgst { 4 } else { 0 })
        .ok_or(Fatal::header(CH_PLEN, "PLEN too short for the data digest"))?;
    if data_len > max_data {
        return Err(Fatal { fes: fes::DATA_LIMIT_EXCEEDED, fei: 0, why: "data longer than the negotiated limit" });
    }
    Ok(Layout { pdu_type: ch.pdu_type, hlen: want_hlen, hdgst, pad: pdo - head, data_len, ddgst })
}

/// ICReq checks (Figure 20): PFV 0, HPDA ≤ 31, DGST bits only.
pub fn check_icreq(req: &IcReq) -> Result<(bool, bool), Fatal> {
    if req.pfv.get() != 0 {
        return Err(Fatal { fes: fes::UNSUPPORTED_PARAMETER, fei: 8, why: "unsupported PDU format version" });
    }
    if req.hpda > 31 {
        return Err(Fatal::header(10, "HPDA out of range"));
    }
    if req.dgst & !3 != 0 {
        return Err(Fatal::header(11, "reserved DGST bits set"));
    }
    Ok((req.dgst & 1 != 0, req.dgst & 2 != 0))
}

pub fn common(pdu_type: u8, flags: u8, hlen: u8, pdo: u8, plen: usize) -> CommonHeader {
    CommonHeader { pdu_type, flags, hlen, pdo, plen: (plen as u32).into() }
}

pub fn ic_resp(hdgst: bool, ddgst: bool, maxh2cdata: u32) -> IcResp {
    IcResp {
        ch: common(pdu_type::IC_RESP, 0, 128, 0, 128),
        pfv: 0.into(),
        cpda: 0,
        dgst: u8::from(hdgst) | u8::from(ddgst) << 1,
        maxh2cdata: maxh2cdata.into(),
        rsvd: [0; 112],
    }
}

fn digest_flags(hdgst: bool, ddgst: bool) -> u8 {
    (if hdgst { flags::HDGSTF } else { 0 }) | (if ddgst { flags::DDGSTF } else { 0 })
}

pub fn capsule_resp(cqe: Cqe, hdgst: bool) -> CapsuleResp {
    let plen = 24 + if hdgst { 4 } else { 0 };
    CapsuleResp { ch: common(pdu_type::CAPSULE_RESP, digest_flags(hdgst, false), 24, 0, plen), cqe }
}

pub fn r2t(cccid: u16, ttag: u16, offset: u32, len: u32, hdgst: bool) -> R2t {
    let plen = 24 + if hdgst { 4 } else { 0 };
    R2t {
        ch: common(pdu_type::R2T, digest_flags(hdgst, false), 24, 0, plen),
        cccid: cccid.into(),
        ttag: ttag.into(),
        r2to: offset.into(),
        r2tl: len.into(),
        rsvd: [0; 4],
    }
}

/// C2HData header for `len` bytes at `offset`; `last`/`success` set the flags of Figure 25.
pub fn c2h_data(cccid: u16, offset: u32, len: usize, last: bool, success: bool, lim: &Limits) -> DataHeader {
    let head = 24 + if lim.hdgst { 4 } else { 0 };
    let plen = head + len + if lim.ddgst { 4 } else { 0 };
    let mut f = digest_flags(lim.hdgst, lim.ddgst);
    if last {
        f |= flags::DATA_LAST;
    }
    if success {
        f |= flags::DATA_SUCCESS;
    }
    DataHeader {
        ch: common(pdu_type::C2H_DATA, f, 24, head as u8, plen),
        cccid: cccid.into(),
        ttag: 0.into(),
        datao: offset.into(),
        datal: (len as u32).into(),
        rsvd: [0; 4],
    }
}

/// C2HTermReq carrying up to 128 bytes of the offending header.
pub fn c2h_term_req(f: &Fatal, offending: &[u8]) -> Vec<u8> {
    let copy = &offending[..offending.len().min(128)];
    let t = TermReq {
        ch: common(pdu_type::C2H_TERM_REQ, 0, 24, 0, 24 + copy.len()),
        fes: f.fes.into(),
        fei: f.fei.into(),
        rsvd: [0; 10],
    };
    let mut v = t.as_bytes().to_vec();
    v.extend_from_slice(copy);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::mem::size_of;

    const LIM: Limits = Limits { hdgst: false, ddgst: false, max_icd: 8192, maxh2cdata: 131072 };

    #[test]
    fn layouts() {
        assert_eq!(size_of::<CommonHeader>(), 8);
        assert_eq!(size_of::<IcReq>(), 128);
        assert_eq!(size_of::<IcResp>(), 128);
        assert_eq!(size_of::<CapsuleCmd>(), 72);
        assert_eq!(size_of::<CapsuleResp>(), 24);
        assert_eq!(size_of::<DataHeader>(), 24);
        assert_eq!(size_of::<R2t>(), 24);
        assert_eq!(size_of::<TermReq>(), 24);
        assert_eq!(std::mem::offset_of!(TermReq, fei), 10);
    }

    #[test]
    fn capsule_with_in_capsule_data() {
        let ch = common(pdu_type::CAPSULE_CMD, 0, 72, 72, 72 + 1024);
        let l = check(&ch, &LIM).unwrap();
        assert_eq!((l.data_len, l.pad, l.rest()), (1024, 0, 64 + 1024));
    }

    #[test]
    fn digests_are_counted() {
        let lim = Limits { hdgst: true, ddgst: true, ..LIM };
        let ch = common(pdu_type::H2C_DATA, flags::HDGSTF | flags::DDGSTF, 24, 28, 28 + 4096 + 4);
        let l = check(&ch, &lim).unwrap();
        assert_eq!((l.data_len, l.hdgst, l.ddgst, l.rest()), (4096, true, true, 16 + 4 + 4096 + 4));
        // Header digest negotiated but the flag missing.
        let bad = common(pdu_type::H2C_DATA, flags::DDGSTF, 24, 28, 28 + 4096 + 4);
        assert_eq!(check(&bad, &lim).unwrap_err().fei, 1);
    }

    #[test]
    fn rejects_what_a_host_may_not_send() {
        for (ch, fes_, fei) in [
            (common(pdu_type::CAPSULE_RESP, 0, 24, 0, 24), fes::INVALID_HEADER_FIELD, 0),
            (common(pdu_type::CAPSULE_CMD, 0, 70, 0, 72), fes::INVALID_HEADER_FIELD, 2),
            (common(pdu_type::CAPSULE_CMD, 0, 72, 0, 40), fes::INVALID_HEADER_FIELD, 4),
            (common(pdu_type::CAPSULE_CMD, 0, 72, 10, 100), fes::INVALID_HEADER_FIELD, 3),
            (common(pdu_type::CAPSULE_CMD, 0, 72, 72, 72 + 8193), fes::DATA_LIMIT_EXCEEDED, 0),
            (common(pdu_type::H2C_DATA, 0, 24, 24, 24 + 131073), fes::DATA_LIMIT_EXCEEDED, 0),
            (common(pdu_type::IC_REQ, 0, 128, 0, 129), fes::INVALID_HEADER_FIELD, 4),
        ] {
            let e = check(&ch, &LIM).unwrap_err();
            assert_eq!((e.fes, e.fei), (fes_, fei), "{ch:?}: {}", e.why);
        }
    }

    #[test]
    fn icreq_checks() {
        let mut req = IcReq::read_from_bytes(&[0u8; 128]).unwrap();
        req.dgst = 3;
        assert_eq!(check_icreq(&req), Ok((true, true)));
        req.pfv = 1.into();
        assert_eq!(check_icreq(&req).unwrap_err().fes, fes::UNSUPPORTED_PARAMETER);
    }

    #[test]
    fn c2h_flags_and_lengths() {
        let lim = Limits { hdgst: true, ddgst: true, ..LIM };
        let h = c2h_data(7, 0, 4096, true, true, &lim);
        assert_eq!(h.ch.flags, flags::HDGSTF | flags::DDGSTF | flags::DATA_LAST | flags::DATA_SUCCESS);
        assert_eq!((h.ch.pdo, h.ch.plen.get()), (28, 28 + 4096 + 4));
        let t = c2h_term_req(&Fatal::header(2, "x"), &[1; 200]);
        assert_eq!(t.len(), 24 + 128);
    }

    proptest! {
        /// Any header either fails with a FES or yields a layout whose parts add up to PLEN.
        #[test]
        fn check_never_panics_and_adds_up(t in 0u8..12, f in any::<u8>(), hlen in any::<u8>(), pdo in any::<u8>(), plen in 0u32..300_000, hd in any::<bool>(), dd in any::<bool>()) {
            let lim = Limits { hdgst: hd, ddgst: dd, ..LIM };
            let ch = common(t, f, hlen, pdo, plen as usize);
            if let Ok(l) = check(&ch, &lim) {
                prop_assert_eq!(8 + l.rest(), plen as usize);
            }
        }
    }
}
