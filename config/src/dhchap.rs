//! What the configuration says of a host's DH-HMAC-CHAP authentication (NVMe Base 2.2,
//! 8.3.4.5): the host entry, its secrets as `nvme gen-dhchap-key` prints them, and the
//! Diffie-Hellman group by name. The target's authentication uses these values as they are;
//! secrets never appear in a `Debug` output.

use std::fmt;

/// `dhchap_dhgroup = "null"`: no Diffie-Hellman exchange.
pub const DHGROUP_NULL: u8 = 0x00;

/// The FFDHE groups (RFC 7919) by identifier (NVMe Base 2.2, 8.3.4.5.2) and name.
pub const DHGROUPS: [(u8, &str); 5] =
    [(1, "ffdhe2048"), (2, "ffdhe3072"), (3, "ffdhe4096"), (4, "ffdhe6144"), (5, "ffdhe8192")];

/// The identifier of the group named `name` (`ffdhe2048` …).
pub fn dhgroup_id(name: &str) -> Option<u8> {
    DHGROUPS.iter().find(|g| g.1 == name).map(|g| g.0)
}

/// The name of group `id` (1 to 5), if it is one.
pub fn dhgroup_name(id: u8) -> Option<&'static str> {
    DHGROUPS.iter().find(|g| g.0 == id).map(|g| g.1)
}

/// Why a `DHHC-1` secret was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("not a DH-HMAC-CHAP secret: expected DHHC-1:<00..03>:<base64>: as `nvme gen-dhchap-key` prints")]
    Format,
    #[error("DHHC-1 secret: transformation hash {0:02} is not 00 (none), 01 (SHA-256), 02 (SHA-384) or 03 (SHA-512)")]
    TransformHash(u8),
    #[error("DHHC-1 secret: the key part is not valid base64")]
    Base64,
    #[error("DHHC-1 secret: the key is {0} bytes; it must be 32, 48 or 64 (plus its 4-byte CRC-32)")]
    Length(usize),
    #[error("DHHC-1 secret: its CRC-32 does not match the key (mistyped or truncated)")]
    Crc,
}

/// A host a subsystem lets in, with the secrets it authenticates with (none: it need not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub nqn: String,
    /// `dhchap_key`: the host must prove it holds this secret on every queue.
    pub key: Option<Secret>,
    /// `dhchap_ctrl_key`: what the controller proves itself with when the host asks.
    pub ctrl_key: Option<Secret>,
    /// `dhchap_dhgroup`: [`DHGROUP_NULL`] or a [`DHGROUPS`] identifier.
    pub dhgroup: u8,
}

impl Host {
    pub fn open(nqn: &str) -> Host {
        Host { nqn: nqn.into(), key: None, ctrl_key: None, dhgroup: DHGROUP_NULL }
    }
}

/// Standard base64 with padding (RFC 4648, 4), as DHHC-1 secrets use.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(4) {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (i, q) in b.chunks(4).enumerate() {
        let last = i + 1 == b.len() / 4;
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut v = 0u32;
        for &c in &q[..4 - pad] {
            v = v << 6 | value(c)?;
        }
        v <<= 6 * pad as u32;
        out.extend_from_slice(&v.to_be_bytes()[1..4 - pad]);
    }
    Some(out)
}

/// CRC-32 (IEEE 802.3, reflected, as zlib): the check a DHHC-1 secret carries.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { crc >> 1 ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A DH-HMAC-CHAP secret: the key, and the hash (by its identifier: 1 SHA-256, 2 SHA-384,
/// 3 SHA-512; 0 none) that turns it into an NQN's key before use.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    key: Vec<u8>,
    transform: u8,
}

impl Secret {
    /// Parses `DHHC-1:<hh>:<base64 of key || CRC-32 (little-endian)>:`, the representation
    /// nvme-cli prints and Linux reads.
    pub fn parse(s: &str) -> Result<Secret, SecretError> {
        let rest = s.trim().strip_prefix("DHHC-1:").ok_or(SecretError::Format)?;
        let (hh, rest) = rest.split_once(':').ok_or(SecretError::Format)?;
        let b64 = rest.strip_suffix(':').unwrap_or(rest);
        if hh.len() != 2 || b64.contains(':') {
            return Err(SecretError::Format);
        }
        let transform: u8 = hh.parse().map_err(|_| SecretError::Format)?;
        if transform > 3 {
            return Err(SecretError::TransformHash(transform));
        }
        let mut key = base64_decode(b64).ok_or(SecretError::Base64)?;
        let n = key.len().saturating_sub(4);
        if ![32, 48, 64].contains(&n) {
            return Err(SecretError::Length(n));
        }
        let crc = u32::from_le_bytes(key[n..].try_into().expect("four bytes"));
        key.truncate(n);
        if crc32(&key) != crc {
            return Err(SecretError::Crc);
        }
        Ok(Secret { key, transform })
    }

    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The transformation hash's identifier (0: none).
    pub fn transform(&self) -> u8 {
        self.transform
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DHHC-1:{:02}:<redacted>:", self.transform)
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.key.fill(0);
        std::hint::black_box(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_and_base64_are_the_standard_ones() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(base64_decode("TWFu").unwrap(), b"Man");
        assert_eq!(base64_decode("TWE=").unwrap(), b"Ma");
        assert_eq!(base64_decode("TQ==").unwrap(), b"M");
        assert_eq!(base64_decode("TQ==TWFu"), None);
        assert_eq!(base64_decode("TWF"), None);
    }
}
