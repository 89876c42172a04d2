//! Namespaces and the contract every backend implements.

use std::fmt;
use std::io;
use std::sync::Arc;

/// Block storage behind a namespace. Offsets and lengths are bytes, always multiples of the
/// namespace's block size and inside `size_bytes`: the I/O path checks before calling.
pub trait Backend: Send + Sync + fmt::Debug {
    fn size_bytes(&self) -> u64;
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Dataset Management deallocate: the range may read back as zeroes afterwards.
    fn deallocate(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Whether writes sit in a volatile cache until Flush (reported as VWC in Identify).
    fn volatile_write_cache(&self) -> bool;
}

/// A namespace of a subsystem.
#[derive(Debug, Clone)]
pub struct Namespace {
    pub nsid: u32,
    pub backend: Arc<dyn Backend>,
    /// log2 of the logical block size.
    pub lba_shift: u32,
    pub nguid: [u8; 16],
    pub uuid: [u8; 16],
    /// Where its I/O buffers come from.
    pub buffers: crate::buffers::NsBuffers,
}

impl Namespace {
    /// A namespace with NGUID and UUID derived from the subsystem NQN and NSID, so they stay
    /// the same across restarts (hosts key multipath and udev names on them).
    pub fn new(subnqn: &str, nsid: u32, backend: Arc<dyn Backend>) -> Self {
        // Salts: "nguid" and "uuid" in ASCII.
        let nguid = stable_id(subnqn, nsid, 0x6e_6775_6964);
        let mut uuid = stable_id(subnqn, nsid, 0x7575_6964);
        // RFC 4122 version 8 (custom), variant 10.
        uuid[6] = (uuid[6] & 0x0f) | 0x80;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        Namespace { nsid, backend, lba_shift: 9, nguid, uuid, buffers: crate::buffers::NsBuffers::Host }
    }

    pub fn block_size(&self) -> u32 {
        1 << self.lba_shift
    }

    pub fn blocks(&self) -> u64 {
        self.backend.size_bytes() >> self.lba_shift
    }
}

/// 128 bits from two FNV-1a passes with different seeds: stable across builds and platforms.
fn stable_id(subnqn: &str, nsid: u32, salt: u64) -> [u8; 16] {
    let fnv = |seed: u64| {
        let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
        for b in subnqn.bytes().chain(nsid.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    };
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&fnv(salt).to_be_bytes());
    id[8..].copy_from_slice(&fnv(salt.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15).to_be_bytes());
    id
}

/// Maps an I/O error to the NVMe status the host sees (cf. nvmet's errno_to_nvme_status).
pub fn io_error_status(e: &io::Error) -> crate::Status {
    use crate::Status;
    // ENOSPC, EINVAL, EOPNOTSUPP: the few errnos a host can act on.
    match e.raw_os_error() {
        Some(28) => Status::CAPACITY_EXCEEDED.dnr(),
        Some(22) => Status::INVALID_FIELD.dnr(),
        Some(95) => Status::INVALID_OPCODE.dnr(),
        _ => Status::INTERNAL_ERROR,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A backend that stores nothing, for tests that need a namespace.
    #[derive(Debug)]
    pub(crate) struct Null;
    impl Backend for Null {
        fn size_bytes(&self) -> u64 {
            1 << 20
        }
        fn read(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8]) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn deallocate(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn volatile_write_cache(&self) -> bool {
            false
        }
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = Namespace::new("nqn.x", 1, Arc::new(Null));
        let b = Namespace::new("nqn.x", 1, Arc::new(Null));
        let c = Namespace::new("nqn.x", 2, Arc::new(Null));
        assert_eq!(a.nguid, b.nguid);
        assert_eq!(a.uuid, b.uuid);
        assert_ne!(a.nguid, c.nguid);
        assert_ne!(a.nguid, a.uuid);
        assert_eq!(a.uuid[6] >> 4, 8);
        assert_eq!(a.blocks(), 2048);
    }

    #[test]
    fn errno_mapping() {
        let s = io_error_status(&io::Error::from_raw_os_error(28));
        assert_eq!(s, crate::Status::CAPACITY_EXCEEDED.dnr());
        assert_eq!(io_error_status(&io::Error::other("x")), crate::Status::INTERNAL_ERROR);
    }
}
