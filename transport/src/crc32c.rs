//! CRC32C (Castagnoli), as NVMe/TCP header and data digests use it: the CPU's CRC32
//! instruction where there is one (SSE4.2 on x86-64, checked once at run time), else
//! slicing-by-8 tables built at compile time.
#![allow(unsafe_code)]

const POLY: u32 = 0x82f6_3b78; // reflected 0x1EDC6F41

const TABLES: [[u32; 256]; 8] = {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        s += 1;
    }
    t
};

/// Running CRC32C state (pre/post-inverted like the digest on the wire).
#[derive(Debug, Clone, Copy)]
pub struct Crc32c(u32);

impl Default for Crc32c {
    fn default() -> Self {
        Crc32c(!0)
    }
}

impl Crc32c {
    pub fn update(&mut self, data: &[u8]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("sse4.2") {
            // SAFETY: the CPU has SSE4.2 (checked just above).
            self.0 = unsafe { hw::update(self.0, data) };
            return;
        }
        self.update_sw(data);
    }

    /// The table-driven update, for CPUs without the instruction (and to check against).
    pub fn update_sw(&mut self, data: &[u8]) {
        let mut c = self.0;
        let mut chunks = data.chunks_exact(8);
        for b in &mut chunks {
            let lo = c ^ u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            c = TABLES[7][(lo & 0xff) as usize]
                ^ TABLES[6][((lo >> 8) & 0xff) as usize]
                ^ TABLES[5][((lo >> 16) & 0xff) as usize]
                ^ TABLES[4][(lo >> 24) as usize]
                ^ TABLES[3][b[4] as usize]
                ^ TABLES[2][b[5] as usize]
                ^ TABLES[1][b[6] as usize]
                ^ TABLES[0][b[7] as usize];
        }
        for &b in chunks.remainder() {
            c = (c >> 8) ^ TABLES[0][((c ^ u32::from(b)) & 0xff) as usize];
        }
        self.0 = c;
    }

    pub fn finish(self) -> u32 {
        !self.0
    }
}

pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = Crc32c::default();
    c.update(data);
    c.finish()
}

/// The software path alone (benchmarks compare it with the instruction).
pub fn crc32c_sw(data: &[u8]) -> u32 {
    let mut c = Crc32c::default();
    c.update_sw(data);
    c.finish()
}

#[cfg(target_arch = "x86_64")]
mod hw {
    use std::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u64};

    /// CRC32C with the SSE4.2 instruction, 8 bytes per step.
    #[target_feature(enable = "sse4.2")]
    pub fn update(c: u32, data: &[u8]) -> u32 {
        let mut c64 = u64::from(c);
        let mut chunks = data.chunks_exact(8);
        for b in &mut chunks {
            c64 = _mm_crc32_u64(c64, u64::from_le_bytes(b.try_into().expect("8 bytes")));
        }
        let mut c = c64 as u32;
        for &b in chunks.remainder() {
            c = _mm_crc32_u8(c, b);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vectors() {
        // RFC 3720, B.4, and the common check value.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46dd_794e);
    }

    fn bitwise(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            }
        }
        !c
    }

    proptest! {
        #[test]
        fn instruction_and_tables_agree(data in prop::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(crc32c(&data), crc32c_sw(&data));
        }

        #[test]
        fn slicing_matches_bitwise_in_any_split(data in prop::collection::vec(any::<u8>(), 0..300), at in 0usize..300) {
            let at = at.min(data.len());
            let mut c = Crc32c::default();
            c.update(&data[..at]);
            c.update(&data[at..]);
            prop_assert_eq!(c.finish(), bitwise(&data));
            let mut c = Crc32c::default();
            c.update_sw(&data[..at]);
            c.update_sw(&data[at..]);
            prop_assert_eq!(c.finish(), bitwise(&data));
        }
    }
}
