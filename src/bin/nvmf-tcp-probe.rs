//! `nvmf-tcp-probe`: sends malformed and hostile NVMe/TCP traffic to a target and checks that
//! each case gets the answer the specifications require (a C2HTermReq with the right FES, or a
//! completion with the right status), then that the target still serves a well-formed host.
//! Prints one line per case and `N passed, N failed`; exits non-zero on any failure.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use clap::Parser;
use p2pnvmf_nvmf::Status;
use p2pnvmf_nvmf::wire::{ConnectData, Cqe, Sqe, put_str, sgl};
use p2pnvmf_transport::tcp::pdu::{self, CommonHeader, IcReq, fes, pdu_type};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

#[derive(Debug, Parser)]
#[command(about = "Check an NVMe/TCP target's answers to malformed input")]
struct Args {
    /// Target address, e.g. 127.0.0.1:4420.
    addr: SocketAddr,
    /// Subsystem NQN with a namespace 1 of at least 1 MiB that this host may use.
    subnqn: String,
    #[arg(long, default_value = "nqn.2014-08.org.nvmexpress:uuid:0b0e3f2a-9c41-4c3b-9d7a-5c1f0a526d5e")]
    hostnqn: String,
}

#[path = "probe/report.rs"]
mod report;

use report::{Case, R};

struct Pdu {
    ty: u8,
    raw: Vec<u8>,
}

struct Host {
    s: TcpStream,
}

const CID: u16 = 0x1234;

impl Host {
    fn open(addr: SocketAddr) -> R<Host> {
        let s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Host { s })
    }

    /// Opens a connection and completes ICReq/ICResp without digests.
    fn ready(addr: SocketAddr) -> R<Host> {
        let mut h = Host::open(addr)?;
        h.send(icreq(0).as_bytes())?;
        let p = h.recv()?;
        if p.ty != pdu_type::IC_RESP {
            return Err(format!("expected ICResp, got PDU type {:#x}", p.ty));
        }
        Ok(h)
    }

    fn send(&mut self, b: &[u8]) -> R<()> {
        self.s.write_all(b).map_err(|e| format!("send: {e}"))
    }

    fn recv(&mut self) -> R<Pdu> {
        let mut ch = [0u8; 8];
        self.s.read_exact(&mut ch).map_err(|e| format!("receive: {e}"))?;
        let h = CommonHeader::read_from_bytes(&ch).expect("8 bytes");
        let plen = h.plen.get() as usize;
        if !(8..=(16 << 20)).contains(&plen) {
            return Err(format!("target sent PLEN {plen}"));
        }
        let mut raw = vec![0u8; plen];
        raw[..8].copy_from_slice(&ch);
        self.s.read_exact(&mut raw[8..]).map_err(|e| format!("receive: {e}"))?;
        Ok(Pdu { ty: h.pdu_type, raw })
    }

    fn capsule(&mut self, sqe: &Sqe, icd: &[u8]) -> R<()> {
        let pdo = if icd.is_empty() { 0 } else { 72 };
        let ch = pdu::common(pdu_type::CAPSULE_CMD, 0, 72, pdo, 72 + icd.len());
        let mut b = ch.as_bytes().to_vec();
        b.extend_from_slice(sqe.as_bytes());
        b.extend_from_slice(icd);
        self.send(&b)
    }

    /// Reads until the response capsule, collecting C2HData.
    fn response(&mut self) -> R<(Cqe, Vec<u8>)> {
        let mut data = Vec::new();
        loop {
            let p = self.recv()?;
            match p.ty {
                pdu_type::C2H_DATA => data.extend_from_slice(&p.raw[24..]),
                pdu_type::CAPSULE_RESP => {
                    return Ok((Cqe::read_from_bytes(&p.raw[8..24]).expect("16 bytes"), data));
                }
                t => return Err(format!("expected a response, got PDU type {t:#x}")),
            }
        }
    }

    fn command(&mut self, sqe: &Sqe, icd: &[u8]) -> R<(Status, Cqe, Vec<u8>)> {
        self.capsule(sqe, icd)?;
        let (cqe, data) = self.response()?;
        Ok((Status::from_cqe_field(cqe.status.get()), cqe, data))
    }

    /// The connection must end with a C2HTermReq carrying `want` as FES.
    fn expect_term(&mut self, want: u16) -> R<()> {
        let p = self.recv()?;
        if p.ty != pdu_type::C2H_TERM_REQ {
            return Err(format!("expected C2HTermReq, got PDU type {:#x}", p.ty));
        }
        let got = u16::from_le_bytes([p.raw[8], p.raw[9]]);
        if got != want {
            return Err(format!("C2HTermReq FES {got:#x}, expected {want:#x}"));
        }
        let mut rest = [0u8; 1];
        match self.s.read(&mut rest) {
            Ok(0) => Ok(()),
            Ok(_) => Err("connection still sending after C2HTermReq".into()),
            Err(e) => Err(format!("connection not closed after C2HTermReq: {e}")),
        }
    }
}

fn icreq(pfv: u16) -> IcReq {
    let mut r = IcReq::new_zeroed();
    r.ch = pdu::common(pdu_type::IC_REQ, 0, 128, 0, 128);
    r.pfv = pfv.into();
    r
}

fn sqe(opcode: u8) -> Sqe {
    let mut s = Sqe::new_zeroed();
    s.opcode = opcode;
    s.flags = 1 << 6; // PSDT: SGL
    s.cid = CID.into();
    s
}

fn connect_sqe(qid: u16, recfmt: u16) -> Sqe {
    let mut s = sqe(0x7f);
    s.nsid = 0x01.into(); // fctype Connect
    s.cdw10 = (u32::from(recfmt) | u32::from(qid) << 16).into();
    s.cdw11 = 31.into();
    s.dptr.id = sgl::DATA_BLOCK_OFFSET;
    s.dptr.length = 1024.into();
    s
}

fn connect_data(subnqn: &str, hostnqn: &str, cntlid: u16) -> Vec<u8> {
    let mut d = ConnectData::new_zeroed();
    d.cntlid = cntlid.into();
    put_str(&mut d.subnqn, subnqn, 0);
    put_str(&mut d.hostnqn, hostnqn, 0);
    d.as_bytes().to_vec()
}

/// Read/Write/Compare SQE for `nlb` blocks at `slba`, data by in-capsule or R2T.
fn rw(opcode: u8, nsid: u32, slba: u64, nlb: u32, len: u32, in_capsule: bool) -> Sqe {
    let mut s = sqe(opcode);
    s.nsid = nsid.into();
    s.cdw10 = (slba as u32).into();
    s.cdw11 = ((slba >> 32) as u32).into();
    s.cdw12 = (nlb - 1).into();
    s.dptr.length = len.into();
    s.dptr.id = if in_capsule { sgl::DATA_BLOCK_OFFSET } else { sgl::TRANSPORT_DATA_BLOCK };
    s
}

struct Probe {
    args: Args,
}

impl Probe {
    /// An admin queue connected and enabled; returns the host and its controller ID.
    fn admin(&self) -> R<(Host, u16)> {
        self.admin_with_kato(0)
    }

    /// An admin queue connected with keep-alive timeout `kato_ms` (0: none) and enabled.
    fn admin_with_kato(&self, kato_ms: u32) -> R<(Host, u16)> {
        let mut h = Host::ready(self.args.addr)?;
        let mut c = connect_sqe(0, 0);
        c.cdw12 = kato_ms.into();
        let (st, cqe, _) = h.command(&c, &connect_data(&self.args.subnqn, &self.args.hostnqn, 0xffff))?;
        if !st.is_success() {
            return Err(format!("admin Connect failed: {st}"));
        }
        let cntlid = cqe.result.get() as u16;
        let mut set = sqe(0x7f);
        set.flags = 0;
        set.nsid = 0x00.into(); // Property Set
        set.cdw11 = 0x14.into(); // CC
        set.cdw12 = (1 | 6 << 16 | 4 << 20).into(); // EN, IOSQES 6, IOCQES 4
        let (st, _, _) = h.command(&set, &[])?;
        if !st.is_success() {
            return Err(format!("Property Set CC.EN failed: {st}"));
        }
        Ok((h, cntlid))
    }

    /// An I/O queue (qid 1) of a fresh controller, plus the admin queue keeping it alive.
    fn io(&self) -> R<(Host, Host)> {
        let (admin, cntlid) = self.admin()?;
        let mut h = Host::ready(self.args.addr)?;
        let (st, _, _) = h.command(&connect_sqe(1, 0), &connect_data(&self.args.subnqn, &self.args.hostnqn, cntlid))?;
        if !st.is_success() {
            return Err(format!("I/O Connect failed: {st}"));
        }
        Ok((admin, h))
    }

    /// After a case that only sends and leaves: a new host still gets Identify Controller
    /// answered, so a target that died or hung on the input fails the case.
    fn still_serves(&self) -> R<()> {
        let (mut h, _) = self.admin()?;
        let mut id = sqe(0x06);
        id.cdw10 = 1.into();
        (id.dptr.id, id.dptr.length) = (sgl::TRANSPORT_DATA_BLOCK, 4096.into());
        let (st, _, data) = h.command(&id, &[])?;
        self.expect_status(st, Status::SUCCESS)?;
        if data.len() != 4096 {
            return Err(format!("Identify returned {} bytes, expected 4096", data.len()));
        }
        Ok(())
    }

    /// A silent host's controller ends at its keep-alive timeout: both its connections are
    /// closed by the target and its controller ID no longer takes an I/O queue.
    fn keep_alive_expiry(&self) -> R<()> {
        let (mut admin, cntlid) = self.admin_with_kato(1000)?;
        let mut io = Host::ready(self.args.addr)?;
        let data = connect_data(&self.args.subnqn, &self.args.hostnqn, cntlid);
        let (st, _, _) = io.command(&connect_sqe(1, 0), &data)?;
        self.expect_status(st, Status::SUCCESS)?;
        std::thread::sleep(Duration::from_secs(3));
        for (what, h) in [("admin", &mut admin), ("I/O", &mut io)] {
            let mut b = [0u8; 1];
            match h.s.read(&mut b) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Ok(_) => return Err(format!("the {what} queue still sends after the keep-alive timeout")),
                Err(e) => {
                    return Err(format!("the {what} queue is still open 3 s after a 1 s keep-alive timeout: {e}"));
                }
            }
        }
        let (st, _, _) = Host::ready(self.args.addr)?.command(&connect_sqe(1, 0), &data)?;
        self.expect_status(st, Status::CONNECT_INVALID_PARAMETERS.dnr())
    }

    fn expect_status(&self, got: Status, want: Status) -> R<()> {
        if got == want { Ok(()) } else { Err(format!("status {got}, expected {want}")) }
    }

    fn cases(&self) -> Vec<Case<'_>> {
        let a = self.args.addr;
        vec![
            (
                "first PDU is not an ICReq",
                Box::new(move || {
                    let mut h = Host::open(a)?;
                    h.capsule(&sqe(0x06), &[])?;
                    h.expect_term(fes::PDU_SEQUENCE_ERROR)
                }),
            ),
            (
                "ICReq with an unsupported PFV",
                Box::new(move || {
                    let mut h = Host::open(a)?;
                    h.send(icreq(1).as_bytes())?;
                    h.expect_term(fes::UNSUPPORTED_PARAMETER)
                }),
            ),
            (
                "capsule with a wrong HLEN",
                Box::new(move || {
                    let mut h = Host::ready(a)?;
                    let mut b = pdu::common(pdu_type::CAPSULE_CMD, 0, 70, 0, 72).as_bytes().to_vec();
                    b.extend_from_slice(&[0u8; 64]);
                    h.send(&b)?;
                    h.expect_term(fes::INVALID_HEADER_FIELD)
                }),
            ),
            (
                "capsule longer than the in-capsule limit",
                Box::new(move || {
                    let mut h = Host::ready(a)?;
                    h.send(pdu::common(pdu_type::CAPSULE_CMD, 0, 72, 72, 72 + (64 << 20)).as_bytes())?;
                    h.expect_term(fes::DATA_LIMIT_EXCEEDED)
                }),
            ),
            (
                "a controller-to-host PDU type from the host",
                Box::new(move || {
                    let mut h = Host::ready(a)?;
                    h.send(pdu::common(pdu_type::CAPSULE_RESP, 0, 24, 0, 24).as_bytes())?;
                    h.send(&[0u8; 16])?;
                    h.expect_term(fes::INVALID_HEADER_FIELD)
                }),
            ),
            (
                "truncated PDU, then the host vanishes",
                Box::new(move || {
                    let mut h = Host::ready(a)?;
                    h.send(&pdu::common(pdu_type::CAPSULE_CMD, 0, 72, 0, 72).as_bytes()[..8])?;
                    h.send(&[0u8; 20])?;
                    h.s.shutdown(Shutdown::Both).map_err(|e| e.to_string())?;
                    self.still_serves()
                }),
            ),
            (
                "admin command before Connect",
                Box::new(move || {
                    let mut h = Host::ready(a)?;
                    let (st, _, _) = h.command(&sqe(0x06), &[])?;
                    self.expect_status(st, Status::COMMAND_SEQUENCE_ERROR.dnr())
                }),
            ),
            (
                "Connect with an unknown RECFMT",
                Box::new(move || {
                    let mut h = Host::ready(a)?;
                    let (st, _, _) =
                        h.command(&connect_sqe(0, 7), &connect_data(&self.args.subnqn, &self.args.hostnqn, 0xffff))?;
                    self.expect_status(st, Status::CONNECT_INCOMPATIBLE_FORMAT.dnr())
                }),
            ),
            (
                "Connect to an unknown subsystem",
                Box::new(move || {
                    let mut h = Host::ready(a)?;
                    let (st, cqe, _) = h.command(
                        &connect_sqe(0, 0),
                        &connect_data("nqn.2026-11.io.p2pnvmf:nope", &self.args.hostnqn, 0xffff),
                    )?;
                    self.expect_status(st, Status::CONNECT_INVALID_PARAMETERS.dnr())?;
                    // IATTR 1 (Connect data), IPO 256 (SUBNQN).
                    match cqe.result.get() as u32 {
                        0x1_0100 => Ok(()),
                        r => Err(format!("IATTR/IPO {r:#x}, expected 0x10100")),
                    }
                }),
            ),
            (
                "Connect data shorter than 1024 bytes",
                Box::new(move || {
                    let mut h = Host::ready(a)?;
                    let mut s = connect_sqe(0, 0);
                    s.dptr.length = 100.into();
                    let (st, _, _) = h.command(&s, &[0u8; 100])?;
                    self.expect_status(st, Status::DATA_SGL_LENGTH_INVALID.dnr())
                }),
            ),
            (
                "unknown admin opcode",
                Box::new(move || {
                    let (mut h, _) = self.admin()?;
                    let (st, _, _) = h.command(&sqe(0xc5), &[])?;
                    self.expect_status(st, Status::INVALID_OPCODE.dnr())
                }),
            ),
            (
                "Identify with a reserved CNS",
                Box::new(move || {
                    let (mut h, _) = self.admin()?;
                    let mut s = sqe(0x06);
                    s.cdw10 = 0x55.into();
                    s.dptr.id = sgl::TRANSPORT_DATA_BLOCK;
                    s.dptr.length = 4096.into();
                    let (st, _, _) = h.command(&s, &[])?;
                    self.expect_status(st, Status::INVALID_FIELD.dnr())
                }),
            ),
            (
                "unknown I/O opcode",
                Box::new(move || {
                    let (_a, mut h) = self.io()?;
                    let (st, _, _) = h.command(&rw(0x50, 1, 0, 1, 0, false), &[])?;
                    self.expect_status(st, Status::INVALID_OPCODE.dnr())
                }),
            ),
            (
                "read past the end of the namespace",
                Box::new(move || {
                    let (_a, mut h) = self.io()?;
                    let (st, _, _) = h.command(&rw(0x02, 1, u64::MAX - 1, 8, 4096, false), &[])?;
                    self.expect_status(st, Status::LBA_OUT_OF_RANGE.dnr())
                }),
            ),
            (
                "I/O to a namespace that does not exist",
                Box::new(move || {
                    let (_a, mut h) = self.io()?;
                    let (st, _, _) = h.command(&rw(0x02, 77, 0, 1, 512, false), &[])?;
                    self.expect_status(st, Status::INVALID_NAMESPACE.dnr())
                }),
            ),
            (
                "write whose SGL length disagrees with NLB",
                Box::new(move || {
                    let (_a, mut h) = self.io()?;
                    let (st, _, _) = h.command(&rw(0x01, 1, 0, 8, 1024, true), &[0u8; 1024])?;
                    self.expect_status(st, Status::DATA_SGL_LENGTH_INVALID.dnr())
                }),
            ),
            (
                "in-capsule data at an offset past the capsule's data",
                Box::new(move || {
                    let (_a, mut h) = self.io()?;
                    // 512 bytes at offset 64 of 576 are there; at offset 577 they are not.
                    let mut s = rw(0x01, 1, 0, 1, 512, true);
                    s.dptr.addr = 64.into();
                    let (st, _, _) = h.command(&s, &[0u8; 576])?;
                    self.expect_status(st, Status::SUCCESS)?;
                    s.dptr.addr = 577.into();
                    let (st, _, _) = h.command(&s, &[0u8; 576])?;
                    self.expect_status(st, Status::SGL_OFFSET_INVALID.dnr())
                }),
            ),
            (
                "keyed (RDMA) SGL on TCP",
                Box::new(move || {
                    let (_a, mut h) = self.io()?;
                    let mut s = rw(0x02, 1, 0, 1, 512, false);
                    s.dptr.id = sgl::KEYED_DATA_BLOCK;
                    let (st, _, _) = h.command(&s, &[])?;
                    self.expect_status(st, Status::SGL_TYPE_INVALID.dnr())
                }),
            ),
            (
                "H2CData for a transfer tag never issued",
                Box::new(move || {
                    let (_a, mut h) = self.io()?;
                    let d = pdu::common(pdu_type::H2C_DATA, 0, 24, 24, 24 + 512);
                    let mut b = d.as_bytes().to_vec();
                    b.extend_from_slice(&CID.to_le_bytes());
                    b.extend_from_slice(&[0x77, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0]);
                    b.extend_from_slice(&[0u8; 512]);
                    h.send(&b)?;
                    h.expect_term(fes::INVALID_HEADER_FIELD)
                }),
            ),
            (
                "host disconnects in the middle of a write",
                Box::new(move || {
                    let (_a, mut h) = self.io()?;
                    h.capsule(&rw(0x01, 1, 0, 256, 128 << 10, false), &[])?;
                    let r2t = h.recv()?;
                    if r2t.ty != pdu_type::R2T {
                        return Err(format!("expected R2T, got PDU type {:#x}", r2t.ty));
                    }
                    let ttag = u16::from_le_bytes([r2t.raw[10], r2t.raw[11]]);
                    let mut b = pdu::common(pdu_type::H2C_DATA, 0, 24, 24, 24 + 4096).as_bytes().to_vec();
                    b.extend_from_slice(&CID.to_le_bytes());
                    b.extend_from_slice(&ttag.to_le_bytes());
                    b.extend_from_slice(&0u32.to_le_bytes());
                    b.extend_from_slice(&4096u32.to_le_bytes());
                    b.extend_from_slice(&[0u8; 4]);
                    b.extend_from_slice(&[0xabu8; 4096]);
                    h.send(&b)?;
                    h.s.shutdown(Shutdown::Both).map_err(|e| e.to_string())?;
                    self.still_serves()
                }),
            ),
            ("a silent host's controller ends at its keep-alive timeout", Box::new(move || self.keep_alive_expiry())),
            (
                "the target still serves a well-formed host",
                Box::new(move || {
                    let (_a, mut h) = self.io()?;
                    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
                    let (st, _, _) = h.command(&rw(0x01, 1, 8, 8, 4096, true), &pattern)?;
                    self.expect_status(st, Status::SUCCESS)?;
                    let (st, _, data) = h.command(&rw(0x02, 1, 8, 8, 4096, false), &[])?;
                    self.expect_status(st, Status::SUCCESS)?;
                    if data != pattern {
                        return Err("read back differs from what was written".into());
                    }
                    let (st, _, _) = h.command(&rw(0x05, 1, 8, 8, 4096, true), &[0u8; 4096])?;
                    self.expect_status(st, Status::COMPARE_FAILURE.dnr())
                }),
            ),
        ]
    }
}

fn main() {
    let probe = Probe { args: Args::parse() };
    report::run(probe.cases());
}
