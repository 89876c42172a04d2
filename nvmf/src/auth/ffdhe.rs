//! The finite-field Diffie-Hellman groups DH-HMAC-CHAP offers (ffdhe2048 … ffdhe8192, RFC 7919),
//! for the ephemeral exchange that augments the challenges.

use std::sync::OnceLock;

use num_bigint::BigUint;

pub use p2pnvmf_config::dhchap::{dhgroup_id as id, dhgroup_name as name};

/// DH group identifiers (NVMe Base 2.2, 8.3.4.5.2; named in [`p2pnvmf_config::dhchap::DHGROUPS`])
/// with the size and the X of RFC 7919's definition of each prime.
const GROUPS: [(u8, u32, u32); 5] =
    [(1, 2048, 560_316), (2, 3072, 2_625_351), (3, 4096, 5_736_041), (4, 6144, 15_705_020), (5, 8192, 10_965_728)];

/// The prime of group `id`, computed once from RFC 7919, appendix A:
/// p = 2^b − 2^(b−64) + (⌊2^(b−130) · e⌋ + X) · 2^64 − 1.
fn prime(id: u8) -> Option<&'static BigUint> {
    static PRIMES: [OnceLock<BigUint>; 5] = [const { OnceLock::new() }; 5];
    let i = GROUPS.iter().position(|g| g.0 == id)?;
    let (_, b, x) = GROUPS[i];
    Some(PRIMES[i].get_or_init(|| {
        let one = BigUint::from(1u8);
        let e = scaled_e(b - 130);
        (&one << b) - (&one << (b - 64)) + ((e + x) << 64u32) - one
    }))
}

/// ⌊2^bits · e⌋, from e = Σ 1/k! with 64 guard bits.
fn scaled_e(bits: u32) -> BigUint {
    let mut term = BigUint::from(1u8) << (bits + 64);
    let mut sum = BigUint::ZERO;
    let mut k = 0u32;
    while term != BigUint::ZERO {
        sum += &term;
        k += 1;
        term /= k;
    }
    sum >> 64u32
}

/// One side's ephemeral key pair in a group: x random, g^x mod p public (g = 2).
pub struct KeyPair {
    p: &'static BigUint,
    x: BigUint,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair({} bits, <private>)", self.p.bits())
    }
}

impl KeyPair {
    /// A fresh pair in group `id` from the 64 random bytes `seed`: a 512-bit exponent, above
    /// twice the strength of the largest group (RFC 7919, 5.2).
    pub fn new(id: u8, seed: &[u8; 64]) -> Option<KeyPair> {
        Some(KeyPair { p: prime(id)?, x: BigUint::from_bytes_be(seed) })
    }

    /// Length of the group's values, in bytes.
    pub fn value_len(&self) -> usize {
        self.p.bits().div_ceil(8) as usize
    }

    /// g^x mod p, big-endian, as long as the prime.
    pub fn public(&self) -> Vec<u8> {
        self.pad(BigUint::from(2u8).modpow(&self.x, self.p))
    }

    /// The shared secret with the peer's public value `y` (big-endian, as long as the prime):
    /// y^x mod p, or `None` for a value outside 2 … p − 2 (RFC 7919, 5.1).
    pub fn shared(&self, y: &[u8]) -> Option<Vec<u8>> {
        let y = BigUint::from_bytes_be(y);
        let one = BigUint::from(1u8);
        if y <= one || y >= self.p - &one {
            return None;
        }
        Some(self.pad(y.modpow(&self.x, self.p)))
    }

    fn pad(&self, v: BigUint) -> Vec<u8> {
        let b = v.to_bytes_be();
        let mut out = vec![0; self.value_len() - b.len()];
        out.extend_from_slice(&b);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes_are_rfc_7919s() {
        for (id, bits, _) in GROUPS {
            let p = prime(id).unwrap();
            assert_eq!(p.bits(), u64::from(bits));
            let hex = format!("{p:X}");
            // Every ffdhe prime starts with 64 one bits and the digits of e, and ends with 64.
            assert!(hex.starts_with("FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620"), "{id}: {}", &hex[..40]);
            assert!(hex.ends_with("FFFFFFFFFFFFFFFF"));
        }
        // The last digits RFC 7919 prints for ffdhe2048 and ffdhe8192.
        assert!(format!("{:X}", prime(1).unwrap()).ends_with("886B423861285C97FFFFFFFFFFFFFFFF"));
        assert!(format!("{:X}", prime(5).unwrap()).ends_with("D68C8BB7C5C6424CFFFFFFFFFFFFFFFF"));
        // A safe prime: 2 generates the subgroup of order q = (p - 1) / 2, so 2^q = 1.
        let p = prime(1).unwrap();
        assert_eq!(BigUint::from(2u8).modpow(&(p >> 1u32), p), BigUint::from(1u8));
        assert!(prime(0).is_none() && prime(6).is_none());
        assert_eq!((id("ffdhe3072"), name(5)), (Some(2), Some("ffdhe8192")));
    }

    #[test]
    fn both_sides_derive_the_same_secret_and_refuse_degenerate_values() {
        let (a, b) = (KeyPair::new(1, &[0x11; 64]).unwrap(), KeyPair::new(1, &[0x77; 64]).unwrap());
        let (pa, pb) = (a.public(), b.public());
        assert_eq!((pa.len(), pb.len()), (256, 256));
        assert_eq!(a.shared(&pb).unwrap(), b.shared(&pa).unwrap());
        assert_ne!(pa, pb);
        let mut one = vec![0; 256];
        one[255] = 1;
        assert_eq!(a.shared(&one), None);
        assert_eq!(a.shared(&[0xff; 256]), None);
    }
}
