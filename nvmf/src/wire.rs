//! NVMe and NVMe-oF wire structures, little-endian, with spec references and layout tests.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Submission queue entry, 64 bytes (NVMe Base 2.0, Figure 88). Fabrics commands reuse it with
/// `fctype` in byte 4 (NVMe-oF 1.1, Figure 9).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Sqe {
    pub opcode: u8,
    pub flags: u8,
    pub cid: U16,
    pub nsid: U32,
    pub cdw2: U32,
    pub cdw3: U32,
    pub mptr: U64,
    pub dptr: SglDescriptor,
    pub cdw10: U32,
    pub cdw11: U32,
    pub cdw12: U32,
    pub cdw13: U32,
    pub cdw14: U32,
    pub cdw15: U32,
}

impl Sqe {
    /// Fabrics command type (valid when `opcode == 0x7f`): byte 4, where `nsid` sits.
    pub fn fctype(&self) -> u8 {
        self.nsid.get() as u8
    }

    /// PSDT (flags bits 7:6): 0 means PRPs, which fabrics do not allow.
    pub fn psdt(&self) -> u8 {
        self.flags >> 6
    }
}

/// Fabrics command opcode and command types (NVMe-oF 1.1, Figure 9).
pub const FABRICS_OPCODE: u8 = 0x7f;
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const AUTH_SEND: u8 = 0x05;
    pub const AUTH_RECEIVE: u8 = 0x06;
}

/// Which way a command's data moves, from the opcode's (or fctype's) low two bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    None,
    HostToController,
    ControllerToHost,
    Bidirectional,
}

impl Direction {
    pub fn of(sqe: &Sqe) -> Self {
        let bits = if sqe.opcode == FABRICS_OPCODE { sqe.fctype() } else { sqe.opcode };
        match bits & 3 {
            0 => Direction::None,
            1 => Direction::HostToController,
            2 => Direction::ControllerToHost,
            _ => Direction::Bidirectional,
        }
    }
}

/// Opcodes of the NVM command set (NVM Command Set 1.0, Figure 13).
pub mod io_opcode {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
    pub const RESV_REGISTER: u8 = 0x0d;
    pub const RESV_REPORT: u8 = 0x0e;
    pub const RESV_ACQUIRE: u8 = 0x11;
    pub const RESV_RELEASE: u8 = 0x15;
    pub const ALL: [u8; 10] = [
        FLUSH,
        WRITE,
        READ,
        COMPARE,
        WRITE_ZEROES,
        DATASET_MANAGEMENT,
        RESV_REGISTER,
        RESV_REPORT,
        RESV_ACQUIRE,
        RESV_RELEASE,
    ];

    /// The reservation commands (NVMe Base 2.0, 7.2–7.5), executed by the target itself.
    pub fn is_reservation(op: u8) -> bool {
        matches!(op, RESV_REGISTER | RESV_REPORT | RESV_ACQUIRE | RESV_RELEASE)
    }

    pub fn changes_content(op: u8) -> bool {
        matches!(op, WRITE | WRITE_ZEROES | DATASET_MANAGEMENT)
    }

    /// Read (`Some(false)`), write (`Some(true)`) or another command, as metrics count them.
    pub fn rw(op: u8) -> Option<bool> {
        match op {
            READ => Some(false),
            WRITE => Some(true),
            _ => None,
        }
    }
}

/// Completion queue entry, 16 bytes (NVMe Base 2.0, Figure 90).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Cqe {
    pub result: U64,
    pub sqhd: U16,
    pub sqid: U16,
    pub cid: U16,
    pub status: U16,
}

/// SGL descriptor, 16 bytes (NVMe Base 2.0, Figure 114). The identifier byte holds the type in
/// bits 7:4 and the sub type in bits 3:0. Keyed descriptors (type 4) put a 3-byte length and a
/// 4-byte key in `length`/`rsvd`.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct SglDescriptor {
    pub addr: U64,
    pub length: U32,
    pub rsvd: [u8; 3],
    pub id: u8,
}

/// SGL descriptor identifiers that NVMe-oF hosts send.
pub mod sgl {
    /// Data block, sub type offset: in-capsule data at `addr` bytes into the capsule's data.
    pub const DATA_BLOCK_OFFSET: u8 = 0x01;
    /// Transport SGL data block, transport-specific sub type A (NVMe/TCP: data by R2T/C2H).
    pub const TRANSPORT_DATA_BLOCK: u8 = 0x5a;
    /// Keyed data block (RDMA), sub type address.
    pub const KEYED_DATA_BLOCK: u8 = 0x40;
    /// Keyed data block, sub type invalidate key.
    pub const KEYED_DATA_BLOCK_INVALIDATE: u8 = 0x4f;
}

/// Fabrics Connect command data, 1024 bytes (NVMe-oF 1.1, Figure 20).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ConnectData {
    pub hostid: [u8; 16],
    pub cntlid: U16,
    pub rsvd1: [u8; 238],
    pub subnqn: [u8; 256],
    pub hostnqn: [u8; 256],
    pub rsvd2: [u8; 256],
}

/// Discovery log page header, 1024 bytes (NVMe-oF 1.1, Figure 30).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DiscoveryLogHeader {
    pub genctr: U64,
    pub numrec: U64,
    pub recfmt: U16,
    pub rsvd: [u8; 1006],
}

/// Discovery log page entry, 1024 bytes (NVMe-oF 1.1, Figure 31).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DiscoveryLogEntry {
    pub trtype: u8,
    pub adrfam: u8,
    pub subtype: u8,
    pub treq: u8,
    pub portid: U16,
    pub cntlid: U16,
    pub asqsz: U16,
    pub eflags: U16,
    pub rsvd1: [u8; 20],
    pub trsvcid: [u8; 32],
    pub rsvd2: [u8; 192],
    pub subnqn: [u8; 256],
    pub traddr: [u8; 256],
    pub tsas: [u8; 256],
}

/// Copies `s` into a fixed ASCII field, padded with `pad` (spaces for SN/MN/FR, NUL for NQNs).
pub fn put_str(field: &mut [u8], s: &str, pad: u8) {
    field.fill(pad);
    let n = s.len().min(field.len());
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}

/// Lower-case hex digits of an identifier (as nvme-cli prints an NGUID or EUI-64).
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// `N` bytes from exactly 2N hex digits, as [`hex`] writes them.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut id = [0u8; N];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(id)
}

/// A 16-byte identifier in the 8-4-4-4-12 form of RFC 4122 (namespace UUIDs, host IDs).
pub fn uuid_text(id: &[u8; 16]) -> String {
    let h = hex(id);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Reads a NUL-terminated (or full-width) string field; `None` when it is not UTF-8.
pub fn get_str(field: &[u8]) -> Option<&str> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    std::str::from_utf8(&field[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layouts() {
        assert_eq!(size_of::<Sqe>(), 64);
        assert_eq!(offset_of!(Sqe, dptr), 24);
        assert_eq!(offset_of!(Sqe, cdw10), 40);
        assert_eq!(size_of::<Cqe>(), 16);
        assert_eq!(offset_of!(Cqe, status), 14);
        assert_eq!(size_of::<SglDescriptor>(), 16);
        assert_eq!(size_of::<ConnectData>(), 1024);
        assert_eq!(offset_of!(ConnectData, subnqn), 256);
        assert_eq!(offset_of!(ConnectData, hostnqn), 512);
        assert_eq!(size_of::<DiscoveryLogHeader>(), 1024);
        assert_eq!(size_of::<DiscoveryLogEntry>(), 1024);
        assert_eq!(offset_of!(DiscoveryLogEntry, trsvcid), 32);
        assert_eq!(offset_of!(DiscoveryLogEntry, subnqn), 256);
        assert_eq!(offset_of!(DiscoveryLogEntry, traddr), 512);
    }

    #[test]
    fn fctype_is_byte_four() {
        let mut raw = [0u8; 64];
        raw[0] = 0x7f;
        raw[4] = 0x01;
        let sqe = Sqe::read_from_bytes(&raw).unwrap();
        assert_eq!(sqe.fctype(), 0x01);
    }

    #[test]
    fn strings() {
        let mut f = [0u8; 8];
        put_str(&mut f, "abc", b' ');
        assert_eq!(&f, b"abc     ");
        put_str(&mut f, "abcdefghij", 0);
        assert_eq!(&f, b"abcdefgh");
        assert_eq!(get_str(b"nqn\0\0"), Some("nqn"));
        assert_eq!(get_str(&[0xff, 0]), None);
    }
}
