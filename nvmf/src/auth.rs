//! In-band authentication with DH-HMAC-CHAP (NVMe Base 2.2, 8.3.4.5), carried by the Fabrics
//! Authentication Send and Receive commands: the host proves it holds its secret, and — when
//! it asks, and the host entry has a controller secret — the controller proves it holds its own.
//!
//! Each queue of a host with a key runs its own [`Session`]; until it succeeds, every command
//! other than Connect and the two authentication commands is refused with Authentication
//! Required. The Diffie-Hellman group is the host entry's (`dhchap_dhgroup`: NULL, as Linux
//! nvmet's default, or one of RFC 7919's [`ffdhe`] groups, whose ephemeral exchange augments the
//! challenges); a host that does not offer it is answered with "DH group not usable".
//!
//! Secrets are the `DHHC-1:<hh>:<base64>:` strings `nvme gen-dhchap-key` prints; they never
//! appear in a `Debug` output or a log line.

use std::fmt;
use std::io::Read;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
pub use p2pnvmf_config::dhchap::{DHGROUP_NULL, Host, Secret, SecretError};
use sha2::{Sha256, Sha384, Sha512};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub mod ffdhe;

/// Security protocol of the Authentication Send/Receive commands (SECP): DH-HMAC-CHAP.
pub const SECP_DHCHAP: u8 = 0xe9;
/// SPSP0 and SPSP1 of DH-HMAC-CHAP messages.
pub const SPSP_DHCHAP: u8 = 0x01;
/// Connect response DW0 bit AUTHREQ.ATR: the host must authenticate this queue.
pub const CONNECT_AUTHREQ_ATR: u32 = 1 << 17;

/// AUTH-Type of a message: the common messages (negotiate, failures) or DH-HMAC-CHAP's own.
mod auth_type {
    pub const COMMON: u8 = 0x00;
    pub const DHCHAP: u8 = 0x01;
}

/// AUTH-Id: which message it is.
mod message {
    pub const NEGOTIATE: u8 = 0x00;
    pub const CHALLENGE: u8 = 0x01;
    pub const REPLY: u8 = 0x02;
    pub const SUCCESS1: u8 = 0x03;
    pub const SUCCESS2: u8 = 0x04;
    pub const FAILURE2: u8 = 0xf0;
    pub const FAILURE1: u8 = 0xf1;
}

/// Reason code explanations of a failure message (reason code 01h, "authentication failure").
pub mod failure {
    pub const FAILED: u8 = 0x01;
    pub const NOT_USABLE: u8 = 0x02;
    pub const CONCAT_MISMATCH: u8 = 0x03;
    pub const HASH_UNUSABLE: u8 = 0x04;
    pub const DHGROUP_UNUSABLE: u8 = 0x05;
    pub const INCORRECT_PAYLOAD: u8 = 0x06;
    pub const INCORRECT_MESSAGE: u8 = 0x07;

    /// What an explanation means, for the log.
    pub fn describe(code: u8) -> &'static str {
        match code {
            FAILED => "authentication failed (the response does not match the secret)",
            NOT_USABLE => "authentication protocol not usable",
            CONCAT_MISMATCH => "secure channel concatenation mismatch",
            HASH_UNUSABLE => "no hash function both sides support",
            DHGROUP_UNUSABLE => "no Diffie-Hellman group both sides support",
            INCORRECT_PAYLOAD => "incorrect payload",
            _ => "incorrect protocol message",
        }
    }
}

const REASON_AUTHENTICATION_FAILURE: u8 = 0x01;
const AUTH_ID_DHCHAP: u8 = 0x01;
/// Hash identifiers sit at the start of the protocol descriptor's ID list, DH groups from here.
const DH_IDS_AT: usize = 30;

/// DH-HMAC-CHAP_Negotiate header; protocol descriptors follow.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct Negotiate {
    head: Header,
    sc_c: u8,
    napd: u8,
}

/// One authentication protocol descriptor of a Negotiate message.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct Descriptor {
    authid: u8,
    rsvd: u8,
    halen: u8,
    dhlen: u8,
    idlist: [u8; 60],
}

/// DH-HMAC-CHAP_Challenge header; the challenge C1 (and a DH value, never with NULL) follow.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct Challenge {
    head: Header,
    hl: u8,
    rsvd2: u8,
    hashid: u8,
    dhgid: u8,
    dhvlen: U16,
    seqnum: U32,
}

/// DH-HMAC-CHAP_Reply header; the response, the host's challenge C2 and a DH value follow.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct Reply {
    head: Header,
    hl: u8,
    rsvd2: u8,
    cvalid: u8,
    rsvd3: u8,
    dhvlen: U16,
    seqnum: U32,
}

/// DH-HMAC-CHAP_Success1 header; the controller's response follows when RVALID is set.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct Success1 {
    head: Header,
    hl: u8,
    rsvd2: u8,
    rvalid: u8,
    rsvd3: [u8; 7],
}

/// The common header of every message: type, id and transaction.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct Header {
    auth_type: u8,
    auth_id: u8,
    rsvd: U16,
    t_id: U16,
}

/// AUTH_Failure1 / AUTH_Failure2.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct Failure {
    head: Header,
    rescode: u8,
    rescode_exp: u8,
}

/// The hash functions of DH-HMAC-CHAP, by their identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha256 = 1,
    Sha384 = 2,
    Sha512 = 3,
}

/// The longest digest (SHA-512).
const MAX_HASH: usize = 64;

/// A secret's key as used for `nqn`: HMAC(transformation hash, key, NQN || "NVMe-over-Fabrics"),
/// or the key itself without a transformation (as Linux's nvme_auth_transform_key).
fn key_for(secret: &Secret, nqn: &str) -> Vec<u8> {
    match Hash::from_id(secret.transform()) {
        None => secret.key().to_vec(),
        Some(h) => {
            let mut out = [0; MAX_HASH];
            h.hmac(secret.key(), &[nqn.as_bytes(), b"NVMe-over-Fabrics"], &mut out);
            out[..h.size()].to_vec()
        }
    }
}

impl Hash {
    pub fn from_id(id: u8) -> Option<Hash> {
        match id {
            1 => Some(Hash::Sha256),
            2 => Some(Hash::Sha384),
            3 => Some(Hash::Sha512),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Hash::Sha256 => "hmac(sha256)",
            Hash::Sha384 => "hmac(sha384)",
            Hash::Sha512 => "hmac(sha512)",
        }
    }

    /// The plain digest of `data`, into `out[..self.size()]`.
    fn digest(self, data: &[u8], out: &mut [u8; MAX_HASH]) {
        use sha2::Digest;
        match self {
            Hash::Sha256 => out[..32].copy_from_slice(&Sha256::digest(data)),
            Hash::Sha384 => out[..48].copy_from_slice(&Sha384::digest(data)),
            Hash::Sha512 => out.copy_from_slice(&Sha512::digest(data)),
        }
    }

    /// HMAC over the concatenation of `parts`, into `out[..self.size()]`.
    fn hmac(self, key: &[u8], parts: &[&[u8]], out: &mut [u8; MAX_HASH]) {
        fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]], out: &mut [u8]) {
            let mut m = <M as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
            for p in parts {
                m.update(p);
            }
            out.copy_from_slice(&m.finalize().into_bytes());
        }
        let out = &mut out[..self.size()];
        match self {
            Hash::Sha256 => run::<Hmac<Sha256>>(key, parts, out),
            Hash::Sha384 => run::<Hmac<Sha384>>(key, parts, out),
            Hash::Sha512 => run::<Hmac<Sha512>>(key, parts, out),
        }
    }
}

/// Fills `out` from the kernel's random source (challenges and sequence numbers must not be
/// guessable).
fn random(out: &mut [u8]) {
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(out)).expect("/dev/urandom is readable on Linux");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Waiting for the host's Negotiate.
    Negotiate,
    /// The next Authentication Receive returns the challenge.
    Challenge,
    /// Waiting for the host's Reply.
    Reply,
    /// The next Authentication Receive returns Success1.
    Success1,
    /// Waiting for the host's Success2 (it checked the controller's response).
    Success2,
    /// The next Authentication Receive returns Failure1 with this explanation.
    Failure1(u8),
    /// A transaction finished.
    Done,
}

/// Where a queue's authentication stands after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pending,
    /// The host (and, if asked, the controller) proved its secret.
    Authenticated {
        bidirectional: bool,
    },
    /// The transaction failed with this explanation ([`failure`]): the controller is torn down,
    /// as the specification asks.
    Failed(u8),
    /// The host refused the controller's response (Failure2), with this explanation: the
    /// controller secret differs from the host's.
    RefusedByHost(u8),
}

/// An Authentication Receive whose buffer (AL) cannot hold the message: `needed` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShortBuffer {
    pub needed: usize,
}

/// One queue's DH-HMAC-CHAP transaction state (controller side).
pub struct Session {
    hostnqn: String,
    subnqn: String,
    key: Secret,
    ctrl_key: Option<Secret>,
    step: Step,
    authenticated: bool,
    tid: u16,
    hash: Hash,
    s1: u32,
    c1: [u8; MAX_HASH],
    s2: u32,
    c2: Option<[u8; MAX_HASH]>,
    dhgroup: u8,
    /// This transaction's ephemeral DH pair, and the secret shared with the host's value.
    dh: Option<ffdhe::KeyPair>,
    shared: Option<Vec<u8>>,
    /// A step left waiting longer than this restarts at Negotiate.
    step_timeout: Duration,
    expires: Option<Instant>,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("hostnqn", &self.hostnqn)
            .field("step", &self.step)
            .field("authenticated", &self.authenticated)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session for `host` on subsystem `subnqn`, or `None` when the host has no key (and
    /// need not authenticate). `step_timeout` is the keep-alive timeout, 120 s without one (as
    /// Linux nvmet).
    pub fn new(host: &Host, subnqn: &str, step_timeout: Duration) -> Option<Session> {
        let key = host.key.clone()?;
        Some(Session {
            hostnqn: host.nqn.clone(),
            subnqn: subnqn.into(),
            key,
            ctrl_key: host.ctrl_key.clone(),
            step: Step::Negotiate,
            authenticated: false,
            tid: 0,
            hash: Hash::Sha256,
            s1: 0,
            c1: [0; MAX_HASH],
            s2: 0,
            c2: None,
            dhgroup: host.dhgroup,
            dh: None,
            shared: None,
            step_timeout: if step_timeout.is_zero() { Duration::from_secs(120) } else { step_timeout },
            expires: None,
        })
    }

    /// Whether commands may run on the queue.
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// The hash negotiated by the last transaction.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// The DH group's name: `null` or `ffdhe<bits>`.
    pub fn dhgroup(&self) -> &'static str {
        ffdhe::name(self.dhgroup).unwrap_or("null")
    }

    /// Authentication Send: a message from the host.
    pub fn send(&mut self, msg: &[u8], now: Instant) -> Verdict {
        if self.expires.is_some_and(|t| now > t) {
            // The host went quiet mid-transaction: start over (Linux nvmet does the same).
            self.step = Step::Negotiate;
        }
        self.expires = Some(now + self.step_timeout);
        let Ok((h, _)) = Header::read_from_prefix(msg) else {
            return self.fail(failure::INCORRECT_PAYLOAD);
        };
        match (h.auth_type, h.auth_id) {
            (auth_type::COMMON, message::NEGOTIATE) => {
                // A Negotiate restarts at any time (re-authentication keeps the queue usable
                // until it fails).
                self.tid = h.t_id.get();
                self.step = match self.negotiate(msg) {
                    Ok(()) => Step::Challenge,
                    Err(why) => Step::Failure1(why),
                };
                Verdict::Pending
            }
            (auth_type::COMMON, message::FAILURE2) => {
                let why = Failure::read_from_prefix(msg).map_or(failure::FAILED, |(f, _)| f.rescode_exp);
                self.fail(why);
                Verdict::RefusedByHost(why)
            }
            (auth_type::DHCHAP, id) if h.t_id.get() != self.tid && Some(id) == self.expected() => {
                self.step = Step::Failure1(failure::INCORRECT_PAYLOAD);
                Verdict::Pending
            }
            (auth_type::DHCHAP, message::REPLY) if self.step == Step::Reply => {
                match self.reply(msg) {
                    Ok(()) => self.step = Step::Success1,
                    Err(why) => self.step = Step::Failure1(why),
                }
                Verdict::Pending
            }
            (auth_type::DHCHAP, message::SUCCESS2) if self.step == Step::Success2 => {
                self.authenticated = true;
                self.finish();
                Verdict::Authenticated { bidirectional: true }
            }
            _ => self.fail(failure::INCORRECT_MESSAGE),
        }
    }

    /// Authentication Receive: the controller's next message, written to `out` (zeroed past
    /// it); `Err` when `out` cannot hold it (the command's status, Invalid Field).
    pub fn receive(&mut self, out: &mut [u8]) -> Result<Verdict, ShortBuffer> {
        out.fill(0);
        let hl = self.hash.size();
        match self.step {
            Step::Challenge => {
                self.dh = match self.dhgroup {
                    DHGROUP_NULL => None,
                    id => {
                        let mut seed = [0; 64];
                        random(&mut seed);
                        let pair = ffdhe::KeyPair::new(id, &seed);
                        seed.fill(0);
                        pair
                    }
                };
                let public = self.dh.as_ref().map(|d| d.public()).unwrap_or_default();
                let needed = size_of::<Challenge>() + hl + public.len();
                if out.len() < needed {
                    return Err(ShortBuffer { needed });
                }
                self.s1 = nonzero_seqnum();
                random(&mut self.c1[..hl]);
                let head = Challenge {
                    head: self.header(auth_type::DHCHAP, message::CHALLENGE),
                    hl: hl as u8,
                    hashid: self.hash as u8,
                    dhgid: self.dhgroup,
                    dhvlen: (public.len() as u16).into(),
                    seqnum: self.s1.into(),
                    ..Default::default()
                };
                let (h, rest) = out.split_at_mut(size_of::<Challenge>());
                h.copy_from_slice(head.as_bytes());
                rest[..hl].copy_from_slice(&self.c1[..hl]);
                rest[hl..hl + public.len()].copy_from_slice(&public);
                self.step = Step::Reply;
                Ok(Verdict::Pending)
            }
            Step::Success1 => {
                let rvalid = self.c2.is_some();
                let needed = size_of::<Success1>() + if rvalid { hl } else { 0 };
                if out.len() < needed {
                    return Err(ShortBuffer { needed });
                }
                let head = Success1 {
                    head: self.header(auth_type::DHCHAP, message::SUCCESS1),
                    hl: hl as u8,
                    rvalid: rvalid.into(),
                    ..Default::default()
                };
                let (h, rest) = out.split_at_mut(size_of::<Success1>());
                h.copy_from_slice(head.as_bytes());
                if let Some(c2) = self.c2 {
                    let Some(ctrl_key) = &self.ctrl_key else {
                        // The host asked the controller to prove itself; it has no secret to.
                        return self.failure1(out, failure::FAILED);
                    };
                    let key = key_for(ctrl_key, &self.subnqn);
                    let (s2, tid) = (self.s2.to_le_bytes(), self.tid.to_le_bytes());
                    let c2 = self.augmented(&c2);
                    let parts: [&[u8]; 8] = [
                        &c2[..hl],
                        &s2,
                        &tid,
                        &[0],
                        b"Controller",
                        self.subnqn.as_bytes(),
                        &[0],
                        self.hostnqn.as_bytes(),
                    ];
                    let mut r = [0; MAX_HASH];
                    self.hash.hmac(&key, &parts, &mut r);
                    rest[..hl].copy_from_slice(&r[..hl]);
                    self.step = Step::Success2;
                    return Ok(Verdict::Pending);
                }
                self.finish();
                Ok(Verdict::Authenticated { bidirectional: false })
            }
            Step::Failure1(why) => self.failure1(out, why),
            // Nothing to send at this step: the host is out of step.
            _ => self.failure1(out, failure::INCORRECT_MESSAGE),
        }
    }

    fn failure1(&mut self, out: &mut [u8], why: u8) -> Result<Verdict, ShortBuffer> {
        let f = Failure {
            head: self.header(auth_type::COMMON, message::FAILURE1),
            rescode: REASON_AUTHENTICATION_FAILURE,
            rescode_exp: why,
        };
        let n = size_of::<Failure>().min(out.len());
        out[..n].copy_from_slice(&f.as_bytes()[..n]);
        Ok(self.fail(why))
    }

    fn header(&self, auth_type: u8, auth_id: u8) -> Header {
        Header { auth_type, auth_id, rsvd: 0.into(), t_id: self.tid.into() }
    }

    fn fail(&mut self, why: u8) -> Verdict {
        self.authenticated = false;
        self.finish();
        Verdict::Failed(why)
    }

    fn finish(&mut self) {
        self.step = Step::Done;
        self.expires = None;
        self.c1.fill(0);
        self.c2 = None;
        self.dh = None;
        if let Some(s) = &mut self.shared {
            s.fill(0);
        }
        self.shared = None;
    }

    /// The challenge as the responses cover it: itself with the NULL group, else HMAC(hash,
    /// H(shared secret), challenge) (NVMe Base 2.2, 8.3.4.5).
    fn augmented(&self, c: &[u8; MAX_HASH]) -> [u8; MAX_HASH] {
        let Some(shared) = &self.shared else { return *c };
        let hl = self.hash.size();
        let (mut key, mut out) = ([0; MAX_HASH], [0; MAX_HASH]);
        self.hash.digest(shared, &mut key);
        self.hash.hmac(&key[..hl], &[&c[..hl]], &mut out);
        key.fill(0);
        out
    }

    /// The message id the host should send next, if it should send one.
    fn expected(&self) -> Option<u8> {
        match self.step {
            Step::Reply => Some(message::REPLY),
            Step::Success2 => Some(message::SUCCESS2),
            _ => None,
        }
    }

    /// Picks the hash (the host's first usable) and the DH group (the host entry's, if offered).
    fn negotiate(&mut self, msg: &[u8]) -> Result<(), u8> {
        let (n, rest) = Negotiate::read_from_prefix(msg).map_err(|_| failure::INCORRECT_PAYLOAD)?;
        if n.sc_c != 0 {
            // Secure channel concatenation (TLS) is not offered.
            return Err(failure::CONCAT_MISMATCH);
        }
        if n.napd != 1 {
            return Err(failure::HASH_UNUSABLE);
        }
        let (d, _) = Descriptor::read_from_prefix(rest).map_err(|_| failure::INCORRECT_PAYLOAD)?;
        let (halen, dhlen) = (usize::from(d.halen), usize::from(d.dhlen));
        if d.authid != AUTH_ID_DHCHAP || halen > DH_IDS_AT || dhlen > d.idlist.len() - DH_IDS_AT {
            return Err(failure::INCORRECT_PAYLOAD);
        }
        self.hash = d.idlist[..halen].iter().find_map(|&id| Hash::from_id(id)).ok_or(failure::HASH_UNUSABLE)?;
        if !d.idlist[DH_IDS_AT..DH_IDS_AT + dhlen].contains(&self.dhgroup) {
            return Err(failure::DHGROUP_UNUSABLE);
        }
        Ok(())
    }

    /// Checks the host's response to C1 and takes its challenge C2 when it wants one answered.
    fn reply(&mut self, msg: &[u8]) -> Result<(), u8> {
        let (r, rest) = Reply::read_from_prefix(msg).map_err(|_| failure::INCORRECT_PAYLOAD)?;
        let hl = self.hash.size();
        let dhvlen = usize::from(r.dhvlen.get());
        if usize::from(r.hl) != hl
            || dhvlen != self.dh.as_ref().map_or(0, |d| d.value_len())
            || rest.len() < 2 * hl + dhvlen
        {
            return Err(failure::INCORRECT_PAYLOAD);
        }
        if let Some(dh) = &self.dh {
            self.shared = Some(dh.shared(&rest[2 * hl..2 * hl + dhvlen]).ok_or(failure::DHGROUP_UNUSABLE)?);
        }
        let key = key_for(&self.key, &self.hostnqn);
        let (s1, tid) = (self.s1.to_le_bytes(), self.tid.to_le_bytes());
        let c1 = self.augmented(&self.c1);
        let parts: [&[u8]; 8] =
            [&c1[..hl], &s1, &tid, &[0], b"HostHost", self.hostnqn.as_bytes(), &[0], self.subnqn.as_bytes()];
        let mut expect = [0; MAX_HASH];
        self.hash.hmac(&key, &parts, &mut expect);
        if !constant_time_eq(&expect[..hl], &rest[..hl]) {
            return Err(failure::FAILED);
        }
        self.s2 = r.seqnum.get();
        // SEQNUM 0: the host does not ask the controller to authenticate itself.
        if r.cvalid != 0 && self.s2 != 0 {
            let mut c2 = [0; MAX_HASH];
            c2[..hl].copy_from_slice(&rest[hl..2 * hl]);
            self.c2 = Some(c2);
        } else {
            self.authenticated = true;
        }
        Ok(())
    }
}

/// Compares without an early exit, so the time taken tells nothing about the expected bytes.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

fn nonzero_seqnum() -> u32 {
    loop {
        let mut b = [0; 4];
        random(&mut b);
        let s = u32::from_le_bytes(b);
        if s != 0 {
            return s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host side of the protocol, written from the specification's formulas, to drive a
    /// session the way the Linux host does.
    struct TestHost {
        hostnqn: &'static str,
        subnqn: &'static str,
        key: Secret,
        ctrl_key: Option<Secret>,
    }

    const SUB: &str = "nqn.2026-12.io.p2pnvmf:auth";

    fn hdr(auth_type: u8, auth_id: u8, tid: u16) -> Header {
        Header { auth_type, auth_id, rsvd: 0.into(), t_id: tid.into() }
    }
    const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";

    fn secret(hash: u8, byte: u8, len: usize) -> String {
        let mut key = vec![byte; len];
        let crc = p2pnvmf_config::dhchap::crc32(&key);
        key.extend_from_slice(&crc.to_le_bytes());
        format!("DHHC-1:{hash:02}:{}:", base64_encode(&key))
    }

    fn base64_encode(b: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for c in b.chunks(3) {
            let v =
                u32::from(c[0]) << 16 | u32::from(*c.get(1).unwrap_or(&0)) << 8 | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                s.push(if i <= c.len() { A[(v >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
            }
        }
        s
    }

    fn negotiate(tid: u16, hashes: &[u8], dhgroups: &[u8]) -> Vec<u8> {
        let mut d =
            Descriptor { authid: 1, rsvd: 0, halen: hashes.len() as u8, dhlen: dhgroups.len() as u8, idlist: [0; 60] };
        d.idlist[..hashes.len()].copy_from_slice(hashes);
        d.idlist[30..30 + dhgroups.len()].copy_from_slice(dhgroups);
        let n = Negotiate { head: hdr(0, message::NEGOTIATE, tid), sc_c: 0, napd: 1 };
        [n.as_bytes(), d.as_bytes()].concat()
    }

    impl TestHost {
        fn new(key: &str, ctrl_key: Option<&str>) -> Self {
            TestHost {
                hostnqn: HOST,
                subnqn: SUB,
                key: Secret::parse(key).unwrap(),
                ctrl_key: ctrl_key.map(|k| Secret::parse(k).unwrap()),
            }
        }

        /// The Reply to `challenge`; with a controller key, asks for bidirectional
        /// authentication with C2 = 0x5a.. and S2 = 7. Returns the DH shared secret too.
        fn reply(&self, challenge: &[u8]) -> (Vec<u8>, Hash, Option<Vec<u8>>) {
            let (c, rest) = Challenge::read_from_prefix(challenge).unwrap();
            let hash = Hash::from_id(c.hashid).unwrap();
            let hl = hash.size();
            assert_eq!(usize::from(c.hl), hl);
            let (mine, shared) = match c.dhgid {
                0 => (Vec::new(), None),
                id => {
                    let pair = ffdhe::KeyPair::new(id, &[0x3c; 64]).unwrap();
                    let theirs = &rest[hl..hl + usize::from(c.dhvlen.get())];
                    (pair.public(), pair.shared(theirs))
                }
            };
            let c1 = augment(hash, shared.as_deref(), &rest[..hl]);
            let key = key_for(&self.key, self.hostnqn);
            let mut resp = [0; MAX_HASH];
            let (s1, tid) = (c.seqnum.get().to_le_bytes(), c.head.t_id.get().to_le_bytes());
            let parts: [&[u8]; 8] =
                [&c1, &s1, &tid, &[0], b"HostHost", self.hostnqn.as_bytes(), &[0], self.subnqn.as_bytes()];
            hash.hmac(&key, &parts, &mut resp);
            let bidi = self.ctrl_key.is_some();
            let r = Reply {
                head: hdr(1, message::REPLY, c.head.t_id.get()),
                hl: hl as u8,
                rsvd2: 0,
                cvalid: bidi.into(),
                rsvd3: 0,
                dhvlen: (mine.len() as u16).into(),
                seqnum: if bidi { 7 } else { 0 }.into(),
            };
            ([r.as_bytes(), &resp[..hl], &[0x5a; MAX_HASH][..hl], &mine].concat(), hash, shared)
        }

        /// Whether Success1 carries the controller's correct response to C2.
        fn check_success1(&self, msg: &[u8], hash: Hash, shared: Option<&[u8]>) -> bool {
            let (s, rest) = Success1::read_from_prefix(msg).unwrap();
            let hl = hash.size();
            let Some(k) = &self.ctrl_key else { return s.rvalid == 0 };
            let key = key_for(k, self.subnqn);
            let mut expect = [0; MAX_HASH];
            let c2 = augment(hash, shared, &[0x5a; MAX_HASH][..hl]);
            let parts: [&[u8]; 8] = [
                &c2,
                &7u32.to_le_bytes(),
                &s.head.t_id.get().to_le_bytes(),
                &[0],
                b"Controller",
                self.subnqn.as_bytes(),
                &[0],
                self.hostnqn.as_bytes(),
            ];
            hash.hmac(&key, &parts, &mut expect);
            s.rvalid == 1 && rest[..hl] == expect[..hl]
        }
    }

    /// The augmented challenge, computed the way the specification words it.
    fn augment(hash: Hash, shared: Option<&[u8]>, c: &[u8]) -> Vec<u8> {
        let Some(shared) = shared else { return c.to_vec() };
        let (mut h, mut out) = ([0; MAX_HASH], [0; MAX_HASH]);
        hash.digest(shared, &mut h);
        hash.hmac(&h[..hash.size()], &[c], &mut out);
        out[..hash.size()].to_vec()
    }

    fn host(key: &str, ctrl_key: Option<&str>) -> Host {
        Host {
            key: Some(Secret::parse(key).unwrap()),
            ctrl_key: ctrl_key.map(|k| Secret::parse(k).unwrap()),
            ..Host::open(HOST)
        }
    }

    fn session(h: &Host) -> Session {
        Session::new(h, SUB, Duration::from_secs(5)).unwrap()
    }

    /// Runs a whole transaction; returns the last verdict.
    fn run(s: &mut Session, t: &TestHost, hashes: &[u8]) -> Verdict {
        let now = Instant::now();
        assert_eq!(s.send(&negotiate(9, hashes, &[0, 1, 2, 3, 4, 5]), now), Verdict::Pending);
        let mut buf = [0u8; 1200];
        let v = s.receive(&mut buf).unwrap();
        if v != Verdict::Pending {
            return v;
        }
        let (reply, hash, shared) = t.reply(&buf);
        assert_eq!(s.send(&reply, now), Verdict::Pending);
        let v = s.receive(&mut buf).unwrap();
        if v != Verdict::Pending {
            return v;
        }
        assert!(t.check_success1(&buf, hash, shared.as_deref()), "the controller's response checks out");
        let s2 = hdr(1, message::SUCCESS2, 9);
        s.send(&[s2.as_bytes(), &[0; 10]].concat(), now)
    }

    #[test]
    fn layouts_match_the_specification() {
        assert_eq!(size_of::<Negotiate>(), 8);
        assert_eq!(size_of::<Descriptor>(), 64);
        assert_eq!(size_of::<Challenge>(), 16);
        assert_eq!(size_of::<Reply>(), 16);
        assert_eq!(size_of::<Success1>(), 16);
        assert_eq!(size_of::<Failure>(), 8);
        assert_eq!(std::mem::offset_of!(Challenge, seqnum), 12);
        assert_eq!(std::mem::offset_of!(Reply, cvalid), 8);
    }

    #[test]
    fn secrets_parse_as_nvme_cli_prints_them() {
        // Printed by `nvme gen-dhchap-key --hmac=1` (nvme-cli 2.3).
        let s = Secret::parse("DHHC-1:01:hk+iuVEIKRzHyUOz3b6ml8E3Nx1PksD1xHSRgGHqrI2M8Fo5:").unwrap();
        assert_eq!((s.key().len(), s.transform()), (32, Hash::Sha256 as u8));
        let s = Secret::parse(&secret(0, 7, 32)).unwrap();
        assert_eq!((s.key().len(), s.transform()), (32, 0));
        let k = secret(1, 7, 32);
        assert_eq!(Secret::parse(&k).unwrap().transform(), Hash::Sha256 as u8);
        assert_eq!(format!("{:?}", Secret::parse(&k).unwrap()), "DHHC-1:01:<redacted>:");
        assert_eq!(Secret::parse(&secret(3, 7, 64)).unwrap().key(), &[7; 64][..]);
        assert_eq!(Secret::parse("DHHC-2:00:abcd:"), Err(SecretError::Format));
        assert_eq!(Secret::parse(&secret(4, 7, 32)), Err(SecretError::TransformHash(4)));
        assert_eq!(Secret::parse(&secret(0, 7, 20)), Err(SecretError::Length(20)));
        assert_eq!(Secret::parse("DHHC-1:00:!!!!:"), Err(SecretError::Base64));
        let mut bad = secret(0, 7, 32);
        bad.replace_range(12..13, if &bad[12..13] == "A" { "B" } else { "A" });
        assert_eq!(Secret::parse(&bad), Err(SecretError::Crc));
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231, test case 2.
        let mut out = [0; MAX_HASH];
        Hash::Sha256.hmac(b"Jefe", &[b"what do ya want ", b"for nothing?"], &mut out);
        assert_eq!(out[..4], [0x5b, 0xdc, 0xc1, 0x46]);
        Hash::Sha512.hmac(b"Jefe", &[b"what do ya want for nothing?"], &mut out);
        assert_eq!(out[..4], [0x16, 0x4b, 0x7a, 0x7b]);
    }

    #[test]
    fn the_right_secret_authenticates_one_way_and_both_ways() {
        for (hash, hashes) in [(1u8, [1u8, 2, 3]), (2, [2, 3, 1]), (3, [3, 1, 2])] {
            let (k, ck) = (secret(hash, 1, 32), secret(0, 2, 48));
            let mut s = session(&host(&k, None));
            assert!(!s.authenticated());
            assert_eq!(run(&mut s, &TestHost::new(&k, None), &hashes), Verdict::Authenticated { bidirectional: false });
            assert!(s.authenticated());
            assert_eq!(s.hash() as u8, hashes[0]);
            let mut s = session(&host(&k, Some(&ck)));
            assert_eq!(
                run(&mut s, &TestHost::new(&k, Some(&ck)), &hashes),
                Verdict::Authenticated { bidirectional: true }
            );
        }
    }

    #[test]
    fn ffdhe_groups_augment_the_challenges() {
        let (k, ck) = (secret(1, 1, 32), secret(2, 2, 48));
        for (group, len) in [(1u8, 256usize), (5, 1024)] {
            let h = Host { dhgroup: group, ..host(&k, Some(&ck)) };
            let mut s = session(&h);
            let t = TestHost::new(&k, Some(&ck));
            assert_eq!(run(&mut s, &t, &[1]), Verdict::Authenticated { bidirectional: true });
            // The challenge carried the group and a DH value of the prime's length.
            let mut s = session(&h);
            s.send(&negotiate(1, &[1], &[0, group]), Instant::now());
            let mut buf = [0u8; 1200];
            s.receive(&mut buf).unwrap();
            assert_eq!((buf[9], u16::from_le_bytes([buf[10], buf[11]]) as usize), (group, len));
            // A degenerate DH value from the host (1) is refused.
            let (mut reply, ..) = t.reply(&buf);
            let n = reply.len();
            reply[n - len..].fill(0);
            reply[n - 1] = 1;
            s.send(&reply, Instant::now());
            assert_eq!(s.receive(&mut buf), Ok(Verdict::Failed(failure::DHGROUP_UNUSABLE)));
        }
        // The group configured for the host must be among those offered.
        let mut s = session(&Host { dhgroup: 3, ..host(&k, None) });
        s.send(&negotiate(1, &[1], &[0, 1]), Instant::now());
        assert_eq!(s.receive(&mut [0u8; 64]), Ok(Verdict::Failed(failure::DHGROUP_UNUSABLE)));
    }

    #[test]
    fn a_wrong_secret_fails_with_failure1() {
        let mut s = session(&host(&secret(0, 1, 32), None));
        assert_eq!(run(&mut s, &TestHost::new(&secret(0, 9, 32), None), &[1]), Verdict::Failed(failure::FAILED));
        assert!(!s.authenticated());
        // The Failure1 message the host received names the reason.
        let mut s = session(&host(&secret(0, 1, 32), None));
        s.send(&negotiate(3, &[1], &[0]), Instant::now());
        let mut buf = [0u8; 64];
        s.receive(&mut buf).unwrap();
        let (reply, ..) = TestHost::new(&secret(0, 9, 32), None).reply(&buf);
        s.send(&reply, Instant::now());
        assert_eq!(s.receive(&mut buf), Ok(Verdict::Failed(failure::FAILED)));
        assert_eq!(buf[..8], [0, 0xf1, 0, 0, 3, 0, 1, failure::FAILED]);
    }

    #[test]
    fn a_controller_without_its_secret_cannot_answer_c2() {
        let k = secret(0, 1, 32);
        let mut s = session(&host(&k, None));
        assert_eq!(run(&mut s, &TestHost::new(&k, Some(&secret(0, 2, 32))), &[1]), Verdict::Failed(failure::FAILED));
    }

    #[test]
    fn a_wrong_controller_secret_is_caught_by_the_host() {
        let k = secret(0, 1, 32);
        let mut s = session(&host(&k, Some(&secret(0, 2, 32))));
        let now = Instant::now();
        s.send(&negotiate(1, &[1], &[0]), now);
        let mut buf = [0u8; 128];
        s.receive(&mut buf).unwrap();
        let t = TestHost::new(&k, Some(&secret(0, 3, 32)));
        let (reply, hash, shared) = t.reply(&buf);
        s.send(&reply, now);
        s.receive(&mut buf).unwrap();
        assert!(!t.check_success1(&buf, hash, shared.as_deref()));
        // The host answers with Failure2; the session fails with its explanation.
        let f = Failure { head: hdr(0, message::FAILURE2, 1), rescode: 1, rescode_exp: 1 };
        assert_eq!(s.send(f.as_bytes(), now), Verdict::RefusedByHost(failure::FAILED));
        assert!(!s.authenticated());
    }

    #[test]
    fn negotiation_refuses_what_it_cannot_do() {
        let k = secret(0, 1, 32);
        let h = host(&k, None);
        let cases: [(Vec<u8>, u8); 4] = [
            (negotiate(1, &[9], &[0]), failure::HASH_UNUSABLE),
            (negotiate(1, &[1], &[1, 2]), failure::DHGROUP_UNUSABLE),
            (negotiate(1, &[1], &[0])[..20].to_vec(), failure::INCORRECT_PAYLOAD),
            (
                {
                    let mut m = negotiate(1, &[1], &[0]);
                    m[6] = 1; // sc_c: secure channel concatenation
                    m
                },
                failure::CONCAT_MISMATCH,
            ),
        ];
        for (msg, why) in cases {
            let mut s = session(&h);
            assert_eq!(s.send(&msg, Instant::now()), Verdict::Pending);
            let mut buf = [0u8; 16];
            assert_eq!(s.receive(&mut buf), Ok(Verdict::Failed(why)));
            assert_eq!(buf[1], message::FAILURE1);
        }
    }

    #[test]
    fn out_of_order_and_short_buffers() {
        let h = host(&secret(0, 1, 32), None);
        let now = Instant::now();
        // A Reply before any Negotiate.
        let mut s = session(&h);
        let r = Reply {
            head: hdr(1, message::REPLY, 0),
            hl: 32,
            rsvd2: 0,
            cvalid: 0,
            rsvd3: 0,
            dhvlen: 0.into(),
            seqnum: 0.into(),
        };
        assert_eq!(s.send(&[r.as_bytes(), &[0; 64]].concat(), now), Verdict::Failed(failure::INCORRECT_MESSAGE));
        // Garbage.
        assert_eq!(session(&h).send(&[1, 2], now), Verdict::Failed(failure::INCORRECT_PAYLOAD));
        // A receive buffer too small for the challenge is the command's error, not the session's.
        let mut s = session(&h);
        s.send(&negotiate(1, &[1], &[0]), now);
        assert_eq!(s.receive(&mut [0u8; 20]), Err(ShortBuffer { needed: 48 }));
        assert!(s.receive(&mut [0u8; 48]).is_ok());
        // A reply for another transaction.
        let mut s = session(&h);
        s.send(&negotiate(1, &[1], &[0]), now);
        let mut buf = [0u8; 64];
        s.receive(&mut buf).unwrap();
        let (mut reply, ..) = TestHost::new(&secret(0, 1, 32), None).reply(&buf);
        reply[4] = 2;
        assert_eq!(s.send(&reply, now), Verdict::Pending);
        assert_eq!(s.receive(&mut buf), Ok(Verdict::Failed(failure::INCORRECT_PAYLOAD)));
    }

    #[test]
    fn a_stalled_transaction_starts_over() {
        let k = secret(0, 1, 32);
        let mut s = session(&host(&k, None));
        let now = Instant::now();
        s.send(&negotiate(1, &[1], &[0]), now);
        let mut buf = [0u8; 64];
        s.receive(&mut buf).unwrap();
        let (reply, ..) = TestHost::new(&k, None).reply(&buf);
        // Past the step timeout the reply is out of step: the session expects a Negotiate.
        assert_eq!(s.send(&reply, now + Duration::from_secs(6)), Verdict::Failed(failure::INCORRECT_MESSAGE));
        // A fresh transaction still works.
        let mut s = session(&host(&k, None));
        assert_eq!(run(&mut s, &TestHost::new(&k, None), &[1]), Verdict::Authenticated { bidirectional: false });
    }

    #[test]
    fn hosts_without_a_key_need_no_session() {
        assert!(Session::new(&Host::open(HOST), SUB, Duration::ZERO).is_none());
    }
}
