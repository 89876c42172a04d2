//! DH-HMAC-CHAP messages as a host without the secret may send them: a DH group byte, then a
//! sequence of [op (1 byte), length (2 bytes, LE), data]; an even op is an Authentication Send
//! of `data`, an odd op an Authentication Receive into a buffer of `length` bytes. Never a panic, and never
//! an authenticated queue: that takes the key, which the input cannot hold.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use p2pnvmf_nvmf::Host;
use p2pnvmf_nvmf::auth::{Secret, Session, Verdict};

const KEY: &str = "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:";
const CTRL_KEY: &str = "DHHC-1:02:ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoOEhYaHiImKi4yNjo+QkZKTvGwQfg==:";

fuzz_target!(|input: &[u8]| {
    // The first byte picks the DH group (NULL or an ffdhe group), as a host entry would.
    let Some((&group, mut rest)) = input.split_first() else { return };
    let host = Host {
        key: Some(Secret::parse(KEY).expect("valid")),
        ctrl_key: Some(Secret::parse(CTRL_KEY).expect("valid")),
        dhgroup: group % 3,
        ..Host::open("nqn.2014-08.org.nvmexpress:uuid:0f0f0f0f-0000-0000-0000-000000000001")
    };
    let mut s = Session::new(&host, "nqn.2026-11.io.p2pnvmf:fuzz", Duration::from_secs(5)).expect("keyed");
    let now = Instant::now();
    while rest.len() >= 3 {
        let (op, len) = (rest[0], usize::from(u16::from_le_bytes([rest[1], rest[2]])) % 4097);
        rest = &rest[3..];
        let v = if op % 2 == 0 {
            let n = len.min(rest.len());
            let v = s.send(&rest[..n], now);
            rest = &rest[n..];
            v
        } else {
            let mut out = vec![0xa5u8; len];
            match s.receive(&mut out) {
                Ok(v) => v,
                Err(_) => continue,
            }
        };
        assert!(!matches!(v, Verdict::Authenticated { .. }), "authenticated without the key");
        assert!(!s.authenticated(), "authenticated without the key");
    }
});
