//! What the driver needs of the NVMe specification: controller registers (NVMe Base 2.0,
//! 3.1.4), admin and NVM command opcodes, PRP-form submission entries, and the Identify fields
//! it reads (Base 2.0 Figure 275, NVM Command Set 1.0 Figure 97).

use p2pnvmf_nvmf::wire::Sqe;
use zerocopy::IntoBytes;

/// Controller register offsets.
pub mod reg {
    pub const CAP: usize = 0x00;
    pub const INTMS: usize = 0x0c;
    /// Interrupt Mask Clear: unmasks pin-based (INTx) vectors.
    pub const INTMC: usize = 0x10;
    pub const CC: usize = 0x14;
    pub const CSTS: usize = 0x1c;
    pub const AQA: usize = 0x24;
    pub const ASQ: usize = 0x28;
    pub const ACQ: usize = 0x30;

    /// Doorbells start here; stride from CAP.DSTRD.
    pub const DOORBELLS: usize = 0x1000;

    pub const CC_EN: u32 = 1 << 0;
    /// I/O SQ entry size 2^6, I/O CQ entry size 2^4; NVM command set; 4 KiB pages (MPS 0).
    pub const CC_ENTRY_SIZES: u32 = 6 << 16 | 4 << 20;
    pub const CC_SHN_NORMAL: u32 = 1 << 14;
    pub const CSTS_RDY: u32 = 1 << 0;
    pub const CSTS_CFS: u32 = 1 << 1;
    pub const CSTS_SHST_MASK: u32 = 3 << 2;
    pub const CSTS_SHST_DONE: u32 = 2 << 2;
}

/// Controller Capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// Largest queue the controller supports, in entries (MQES is 0's based).
    pub fn max_entries(self) -> u32 {
        (self.0 & 0xffff) as u32 + 1
    }

    /// CAP.TO: worst-case time for CSTS.RDY to change after CC.EN does, in milliseconds.
    pub fn timeout_ms(self) -> u64 {
        ((self.0 >> 24) & 0xff).max(1) * 500
    }

    /// Bytes between doorbell registers (4 << DSTRD).
    pub fn doorbell_stride(self) -> usize {
        4 << ((self.0 >> 32) & 0xf)
    }

    /// The NVM command set is supported (CSS bit 0).
    pub fn nvm(self) -> bool {
        (self.0 >> 37) & 1 != 0
    }

    /// Smallest memory page size the controller supports, in bytes.
    pub fn min_page(self) -> usize {
        4096 << ((self.0 >> 48) & 0xf)
    }
}

/// Admin command opcodes (Base 2.0, Figure 141).
pub mod admin {
    pub const DELETE_SQ: u8 = 0x00;
    pub const CREATE_SQ: u8 = 0x01;
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const DELETE_CQ: u8 = 0x04;
    pub const CREATE_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const SET_FEATURES: u8 = 0x09;
    /// Set Features identifier: Number of Queues.
    pub const FEAT_NUM_QUEUES: u32 = 0x07;
    /// Identify CNS values.
    pub const CNS_NAMESPACE: u32 = 0x00;
    pub const CNS_CONTROLLER: u32 = 0x01;
}

/// An admin or I/O command with its data described by PRP1/PRP2 (PSDT 0).
pub fn command(opcode: u8, nsid: u32, prp: (u64, u64), cdw: [u32; 6]) -> Sqe {
    let mut sqe = Sqe { opcode, ..Sqe::default() };
    sqe.nsid.set(nsid);
    let dptr = sqe.dptr.as_mut_bytes();
    dptr[..8].copy_from_slice(&prp.0.to_le_bytes());
    dptr[8..].copy_from_slice(&prp.1.to_le_bytes());
    for (field, v) in [&mut sqe.cdw10, &mut sqe.cdw11, &mut sqe.cdw12, &mut sqe.cdw13, &mut sqe.cdw14, &mut sqe.cdw15]
        .into_iter()
        .zip(cdw)
    {
        field.set(v);
    }
    sqe
}

/// Create I/O Completion Queue `qid` of `entries` at `addr`, physically contiguous, raising
/// interrupt vector `vector` when `irq`.
pub fn create_cq(qid: u16, entries: u32, addr: u64, vector: Option<u16>) -> Sqe {
    let ien = vector.map_or(0, |v| u32::from(v) << 16 | 2);
    command(admin::CREATE_CQ, 0, (addr, 0), [(entries - 1) << 16 | u32::from(qid), ien | 1, 0, 0, 0, 0])
}

/// Create I/O Submission Queue `qid` of `entries` at `addr`, completing to CQ `cqid`.
pub fn create_sq(qid: u16, entries: u32, addr: u64, cqid: u16) -> Sqe {
    command(
        admin::CREATE_SQ,
        0,
        (addr, 0),
        [(entries - 1) << 16 | u32::from(qid), u32::from(cqid) << 16 | 1, 0, 0, 0, 0],
    )
}

pub fn delete_queue(opcode: u8, qid: u16) -> Sqe {
    command(opcode, 0, (0, 0), [u32::from(qid), 0, 0, 0, 0, 0])
}

/// Identify (`cns`) into the 4 KiB page at `addr`.
pub fn identify(cns: u32, nsid: u32, addr: u64) -> Sqe {
    command(admin::IDENTIFY, nsid, (addr, 0), [cns, 0, 0, 0, 0, 0])
}

/// Set Features, Number of Queues: `n` submission and `n` completion queues (0's based).
pub fn set_num_queues(n: u16) -> Sqe {
    let v = u32::from(n - 1);
    command(admin::SET_FEATURES, 0, (0, 0), [admin::FEAT_NUM_QUEUES, v << 16 | v, 0, 0, 0, 0])
}

/// Get Log Page `lid` (`len` bytes, a multiple of 4, at most a page) into `addr`.
pub fn get_log_page(lid: u8, nsid: u32, len: usize, addr: u64) -> Sqe {
    let numd = (len / 4 - 1) as u32;
    command(admin::GET_LOG_PAGE, nsid, (addr, 0), [(numd & 0xffff) << 16 | u32::from(lid), numd >> 16, 0, 0, 0, 0])
}

/// The fields of Identify Controller the driver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdController {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// Maximum data transfer size as a power of two of the minimum page size; 0: no limit.
    pub mdts: u8,
    /// Optional NVM Command Support (bit 2 Dataset Management, bit 3 Write Zeroes).
    pub oncs: u16,
    /// Volatile Write Cache present.
    pub vwc: bool,
    /// Number of namespaces.
    pub nn: u32,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end_matches([' ', '\0']).to_owned()
}

impl IdController {
    pub fn parse(page: &[u8]) -> IdController {
        let u16_at = |o: usize| u16::from_le_bytes([page[o], page[o + 1]]);
        IdController {
            serial: text(&page[4..24]),
            model: text(&page[24..64]),
            firmware: text(&page[64..72]),
            mdts: page[77],
            oncs: u16_at(520),
            vwc: page[525] & 1 != 0,
            nn: u32::from_le_bytes(page[516..520].try_into().expect("4 bytes")),
        }
    }

    /// Largest transfer in bytes with pages of `page` bytes (`None`: unlimited).
    pub fn max_transfer(&self, page: usize) -> Option<usize> {
        (self.mdts != 0).then(|| page << self.mdts)
    }
}

/// The fields of Identify Namespace the driver uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdNamespace {
    /// Size in logical blocks.
    pub nsze: u64,
    pub nsfeat: u8,
    /// Logical block size in bytes (of the format in use).
    pub block_size: u32,
    /// Metadata bytes per block of the format in use (the target exports none).
    pub metadata: u16,
    /// Namespace Optimal Write Size, 0's based blocks (valid when NSFEAT bit 4).
    pub nows: u16,
    /// Deallocate Logical Block Features.
    pub dlfeat: u8,
}

impl IdNamespace {
    pub fn parse(page: &[u8]) -> IdNamespace {
        let u16_at = |o: usize| u16::from_le_bytes([page[o], page[o + 1]]);
        // FLBAS bits 3:0 and 6:5 select the LBA format (NVM Command Set 1.0, Figure 97).
        let flbas = page[26];
        let fmt = usize::from(flbas & 0xf) | usize::from((flbas >> 5) & 0x3) << 4;
        let lbaf = 128 + 4 * fmt.min(63);
        IdNamespace {
            nsze: u64::from_le_bytes(page[0..8].try_into().expect("8 bytes")),
            nsfeat: page[24],
            block_size: 1u32.checked_shl(u32::from(page[lbaf + 2])).unwrap_or(0),
            metadata: u16_at(lbaf),
            nows: u16_at(72),
            dlfeat: page[33],
        }
    }

    /// Whether the namespace exists (Identify answers zeroes for an inactive NSID).
    pub fn active(&self) -> bool {
        self.nsze != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_decode() {
        // qemu's nvme: MQES 2047, CQR, TO 15 (7.5 s), DSTRD 0, CSS NVM, MPSMIN 0.
        let cap = Cap(0x7ff | 1 << 16 | 0xf << 24 | 1 << 37);
        assert_eq!((cap.max_entries(), cap.timeout_ms(), cap.doorbell_stride()), (2048, 7500, 4));
        assert!(cap.nvm());
        assert_eq!(cap.min_page(), 4096);
        assert_eq!(Cap(2 << 32).doorbell_stride(), 16);
    }

    #[test]
    fn commands_carry_prps_and_dwords_where_the_spec_puts_them() {
        let s = create_cq(3, 128, 0x1234_5000, Some(2));
        let b = s.as_bytes();
        assert_eq!(b[0], admin::CREATE_CQ);
        assert_eq!(&b[24..32], &0x1234_5000u64.to_le_bytes());
        assert_eq!((s.cdw10.get(), s.cdw11.get()), (127 << 16 | 3, 2 << 16 | 2 | 1));
        let s = create_sq(3, 128, 0x9000, 3);
        assert_eq!((s.cdw10.get(), s.cdw11.get()), (127 << 16 | 3, 3 << 16 | 1));
        let s = command(0x02, 1, (0xa000, 0xb000), [7, 0, 15, 0, 0, 0]);
        assert_eq!(
            (&s.as_bytes()[24..32], &s.as_bytes()[32..40]),
            (&0xa000u64.to_le_bytes()[..], &0xb000u64.to_le_bytes()[..])
        );
        assert_eq!((s.nsid.get(), s.cdw10.get(), s.cdw12.get(), s.flags), (1, 7, 15, 0));
        assert_eq!(set_num_queues(4).cdw11.get(), 3 << 16 | 3);
        let s = get_log_page(0x02, 0xffff_ffff, 512, 0x7000);
        assert_eq!(s.cdw10.get(), 127 << 16 | 2);
    }

    #[test]
    fn identify_pages_decode() {
        let mut c = vec![0u8; 4096];
        c[4..13].copy_from_slice(b"SERIAL1  ");
        c[24..31].copy_from_slice(b"QEMU NV");
        c[77] = 7;
        c[516..520].copy_from_slice(&256u32.to_le_bytes());
        c[520..522].copy_from_slice(&0x000cu16.to_le_bytes());
        c[525] = 1;
        let id = IdController::parse(&c);
        assert_eq!(
            (id.serial.as_str(), id.model.as_str(), id.mdts, id.nn, id.oncs, id.vwc),
            ("SERIAL1", "QEMU NV", 7, 256, 0xc, true)
        );
        assert_eq!(id.max_transfer(4096), Some(512 << 10));
        let mut n = vec![0u8; 4096];
        n[0..8].copy_from_slice(&262_144u64.to_le_bytes());
        n[26] = 1; // format 1
        n[128 + 4 + 2] = 12; // 4096-byte blocks
        n[128 + 2] = 9;
        let ns = IdNamespace::parse(&n);
        assert_eq!((ns.nsze, ns.block_size, ns.metadata, ns.active()), (262_144, 4096, 0, true));
        assert!(!IdNamespace::parse(&[0u8; 4096]).active());
    }
}
