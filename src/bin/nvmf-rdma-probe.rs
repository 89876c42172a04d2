//! `nvmf-rdma-probe`: an RDMA CM client that sends what a well-behaved NVMe-oF host never
//! does — malformed connect private data, a capsule shorter than an SQE, RDMA READs and WRITEs
//! aimed at the target's own memory — and checks the target's answers: the reject status of
//! the NVMe-oF RDMA binding, a torn-down queue, a remote access error.
//! Prints one line per case and `N passed, N failed`; exits non-zero on any failure.

use std::ffi::c_void;
use std::net::SocketAddr;
use std::ptr;

use clap::Parser;
use p2pnvmf_transport::rdma::sys::{self, Api, cm_event};
use p2pnvmf_transport::rdma::{sockaddr, wire};
use zerocopy::{FromBytes, IntoBytes};

#[derive(Debug, Parser)]
#[command(about = "Check an NVMe/RDMA target's answers to malformed connects and capsules")]
struct Args {
    /// Target address, e.g. 10.0.2.15:4420 (an address of an RDMA device).
    addr: SocketAddr,
    /// Target memory to attack as ADDR:KEY (hex), e.g. the keys of another host's queues taken
    /// from the target's debug log: an RDMA READ and an RDMA WRITE of each must fail with a
    /// remote access error.
    #[arg(long = "attack", value_parser = parse_region)]
    attack: Vec<(u64, u32)>,
}

fn parse_region(s: &str) -> Result<(u64, u32), String> {
    let (a, k) = s.split_once(':').ok_or("expected ADDR:KEY")?;
    let hex = |v: &str| u64::from_str_radix(v.trim_start_matches("0x"), 16).map_err(|e| format!("{v}: {e}"));
    Ok((hex(a)?, u32::try_from(hex(k)?).map_err(|_| format!("{k}: not a 32-bit key"))?))
}

#[path = "probe/report.rs"]
mod report;

use report::{Case, R};

/// One client connection attempt: its own event channel and CM id, freed on drop.
struct Client {
    api: &'static Api,
    ch: *mut sys::RdmaEventChannel,
    id: *mut sys::RdmaCmId,
    pd: *mut sys::IbvPd,
    cq: *mut sys::IbvCq,
    mr: *mut sys::IbvMr,
    buf: Vec<u8>,
}

/// A CM event's kind, status and private data, copied before the ack.
struct Ev {
    kind: u32,
    private: Vec<u8>,
}

impl Client {
    fn new(api: &'static Api) -> R<Client> {
        // SAFETY: plain constructor; NULL checked.
        let ch = unsafe { (api.rdma_create_event_channel)() };
        if ch.is_null() {
            return Err("rdma_create_event_channel failed".into());
        }
        let mut c = Client {
            api,
            ch,
            id: ptr::null_mut(),
            pd: ptr::null_mut(),
            cq: ptr::null_mut(),
            mr: ptr::null_mut(),
            buf: vec![0; 64],
        };
        // SAFETY: valid channel; `c.id` receives the id.
        sys::check("rdma_create_id", unsafe { (api.rdma_create_id)(ch, &mut c.id, ptr::null_mut(), sys::RDMA_PS_TCP) })
            .map_err(|e| e.to_string())?;
        Ok(c)
    }

    /// Waits up to 5 s for the next CM event.
    fn event(&self) -> R<Ev> {
        // SAFETY: the channel lives as long as self.
        let fd = unsafe { (*self.ch).fd };
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 5000) } != 1 {
            return Err("no RDMA CM event within 5 s".into());
        }
        let mut ev: *mut sys::RdmaCmEvent = ptr::null_mut();
        // SAFETY: readable channel; the event is copied, then acked.
        unsafe {
            sys::check("rdma_get_cm_event", (self.api.rdma_get_cm_event)(self.ch, &mut ev))
                .map_err(|e| e.to_string())?;
            let r = &*ev;
            let private = if r.conn.private_data.is_null() {
                Vec::new()
            } else {
                std::slice::from_raw_parts(r.conn.private_data.cast::<u8>(), usize::from(r.conn.private_data_len))
                    .to_vec()
            };
            let e = Ev { kind: r.event, private };
            (self.api.rdma_ack_cm_event)(ev);
            Ok(e)
        }
    }

    fn expect(&self, kind: u32) -> R<Ev> {
        let e = self.event()?;
        if e.kind != kind {
            return Err(format!("RDMA CM event {}, expected {kind}", e.kind));
        }
        Ok(e)
    }

    /// Resolves the route, creates a QP and sends a connect request with `private` data.
    fn connect(&mut self, addr: SocketAddr, private: &[u8]) -> R<()> {
        let api = self.api;
        let sin = sockaddr(addr).map_err(|e| e.to_string())?;
        // SAFETY: `sin` outlives the call.
        sys::check("rdma_resolve_addr", unsafe {
            (api.rdma_resolve_addr)(self.id, ptr::null(), (&sin as *const libc::sockaddr_in).cast(), 2000)
        })
        .map_err(|e| e.to_string())?;
        self.expect(cm_event::ADDR_RESOLVED)?;
        // SAFETY: address resolved.
        sys::check("rdma_resolve_route", unsafe { (api.rdma_resolve_route)(self.id, 2000) })
            .map_err(|e| e.to_string())?;
        self.expect(cm_event::ROUTE_RESOLVED)?;
        // SAFETY: the route is resolved, so the id has a device context; results checked.
        unsafe {
            let verbs = (*self.id).verbs;
            self.pd = sys::check_ptr("ibv_alloc_pd", (api.ibv_alloc_pd)(verbs)).map_err(|e| e.to_string())?;
            self.cq =
                sys::check_ptr("ibv_create_cq", (api.ibv_create_cq)(verbs, 16, ptr::null_mut(), ptr::null_mut(), 0))
                    .map_err(|e| e.to_string())?;
            self.mr = sys::check_ptr(
                "ibv_reg_mr",
                (api.ibv_reg_mr)(self.pd, self.buf.as_mut_ptr().cast(), self.buf.len(), sys::IBV_ACCESS_LOCAL_WRITE),
            )
            .map_err(|e| e.to_string())?;
            let mut init = sys::IbvQpInitAttr {
                qp_context: ptr::null_mut(),
                send_cq: self.cq,
                recv_cq: self.cq,
                srq: ptr::null_mut(),
                cap: sys::IbvQpCap {
                    max_send_wr: 4,
                    max_recv_wr: 4,
                    max_send_sge: 1,
                    max_recv_sge: 1,
                    max_inline_data: 0,
                },
                qp_type: sys::IBV_QPT_RC,
                sq_sig_all: 1,
            };
            sys::check("rdma_create_qp", (api.rdma_create_qp)(self.id, self.pd, &mut init))
                .map_err(|e| e.to_string())?;
            let mut param = sys::RdmaConnParam {
                private_data: private.as_ptr().cast::<c_void>(),
                private_data_len: private.len() as u8,
                responder_resources: 16,
                initiator_depth: 16,
                flow_control: 1,
                retry_count: 7,
                rnr_retry_count: 7,
                srq: 0,
                qp_num: 0,
            };
            sys::check("rdma_connect", (api.rdma_connect)(self.id, &mut param)).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Sends the first `len` bytes of the buffer as one capsule.
    fn send(&mut self, len: usize) -> R<()> {
        self.post(sys::wr_opcode::SEND, len, 0, 0)
    }

    /// Posts one work request of `opcode` over the first `len` bytes of the buffer (for RDMA
    /// READ and WRITE, at the target's `remote` address with `rkey`).
    fn post(&mut self, opcode: u32, len: usize, remote: u64, rkey: u32) -> R<()> {
        let mut sge = sys::IbvSge { addr: self.buf.as_ptr() as u64, length: len as u32, lkey: 0 };
        // SAFETY: `mr` registered in connect(); the QP is connected; WR and SGE outlive the post.
        unsafe {
            sge.lkey = (*self.mr).lkey;
            let mut wr = sys::IbvSendWr {
                wr_id: 1,
                next: ptr::null_mut(),
                sg_list: &mut sge,
                num_sge: 1,
                opcode,
                send_flags: sys::IBV_SEND_SIGNALED,
                invalidate_rkey: 0,
                rdma_remote_addr: remote,
                rdma_rkey: rkey,
                rest: [0; 76],
            };
            let qp = (*self.id).qp;
            let post = (*(*self.id).verbs).post_send.ok_or("provider has no post_send")?;
            let mut bad = ptr::null_mut();
            sys::check("ibv_post_send", post(qp, &mut wr, &mut bad)).map_err(|e| e.to_string())
        }
    }

    /// The status of the next work completion, waiting up to 5 s.
    fn completion(&mut self) -> R<u32> {
        let mut wc = sys::IbvWc::default();
        for _ in 0..5000 {
            // SAFETY: our CQ, room for one entry.
            let n = unsafe {
                let poll = (*(*self.id).verbs).poll_cq.ok_or("provider has no poll_cq")?;
                poll(self.cq, 1, &mut wc)
            };
            match n {
                1 => return Ok(wc.status),
                0 => std::thread::sleep(std::time::Duration::from_millis(1)),
                _ => return Err("ibv_poll_cq failed".into()),
            }
        }
        Err("no work completion within 5 s".into())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // SAFETY: each handle is ours and destroyed once, QP first, channel last.
        unsafe {
            if !self.id.is_null() && !(*self.id).qp.is_null() {
                (self.api.rdma_disconnect)(self.id);
                (self.api.rdma_destroy_qp)(self.id);
            }
            if !self.mr.is_null() {
                (self.api.ibv_dereg_mr)(self.mr);
            }
            if !self.cq.is_null() {
                (self.api.ibv_destroy_cq)(self.cq);
            }
            if !self.pd.is_null() {
                (self.api.ibv_dealloc_pd)(self.pd);
            }
            if !self.id.is_null() {
                (self.api.rdma_destroy_id)(self.id);
            }
            (self.api.rdma_destroy_event_channel)(self.ch);
        }
    }
}

fn request(recfmt: u16, qid: u16, hrqsize: u16, hsqsize: u16) -> Vec<u8> {
    wire::ConnectRequest::new(recfmt, qid, hrqsize, hsqsize).as_bytes().to_vec()
}

/// A connect request the target must reject with `want` in its private data.
fn rejected(api: &'static Api, addr: SocketAddr, private: &[u8], want: wire::RejectStatus) -> R<()> {
    let mut c = Client::new(api)?;
    c.connect(addr, private)?;
    let e = c.expect(cm_event::REJECTED)?;
    let rej = wire::Reject::read_from_bytes(e.private.get(..4).ok_or("reject without private data")?).expect("4 bytes");
    if (rej.recfmt.get(), rej.sts.get()) != (0, want as u16) {
        return Err(format!("reject status {} (recfmt {}), expected {}", rej.sts.get(), rej.recfmt.get(), want as u16));
    }
    Ok(())
}

/// `IBV_WC_REM_ACCESS_ERR`: the responder refused the access (enum ibv_wc_status).
const WC_REM_ACCESS_ERR: u32 = 10;

/// An RDMA READ or WRITE (`opcode`) from a connected host at target address `addr` with
/// `rkey` must end in a remote access error: the target registers nothing for remote access.
fn refused_access(api: &'static Api, addr: SocketAddr, opcode: u32, remote: u64, rkey: u32) -> R<()> {
    let mut c = Client::new(api)?;
    c.connect(addr, &request(0, 0, 32, 31))?;
    c.expect(cm_event::ESTABLISHED)?;
    c.buf.fill(0xa5);
    c.post(opcode, 64, remote, rkey)?;
    match c.completion()? {
        WC_REM_ACCESS_ERR => Ok(()),
        sys::IBV_WC_SUCCESS => Err(format!(
            "the target let another host's {} through at {remote:#x}",
            match opcode {
                sys::wr_opcode::RDMA_READ => "RDMA READ",
                _ => "RDMA WRITE",
            }
        )),
        s => Err(format!("work completion status {s}, expected {WC_REM_ACCESS_ERR} (remote access error)")),
    }
}

fn main() {
    let args = Args::parse();
    let api = match sys::api() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let a = args.addr;
    use wire::RejectStatus::*;
    let mut cases: Vec<Case> = vec![
        ("connect with RECFMT 1", Box::new(move || rejected(api, a, &request(1, 0, 32, 31), InvalidRecfmt))),
        ("connect to QID 1000", Box::new(move || rejected(api, a, &request(0, 1000, 32, 31), InvalidQid))),
        ("connect with HSQSIZE 0", Box::new(move || rejected(api, a, &request(0, 1, 32, 0), InvalidHsqsize))),
        (
            "admin connect with HSQSIZE 7 (< 32 entries)",
            Box::new(move || rejected(api, a, &request(0, 0, 8, 7), InvalidHsqsize)),
        ),
        (
            "connect with HRQSIZE below HSQSIZE + 1",
            Box::new(move || rejected(api, a, &request(0, 1, 4, 31), InvalidHrqsize)),
        ),
        (
            "capsule of 32 bytes: the queue is torn down",
            Box::new(move || {
                let mut c = Client::new(api)?;
                c.connect(a, &request(0, 0, 32, 31))?;
                let e = c.expect(cm_event::ESTABLISHED)?;
                let rep = wire::Accept::read_from_bytes(e.private.get(..32).ok_or("accept without private data")?)
                    .expect("32 bytes");
                if rep.crqsize.get() != 32 {
                    return Err(format!("accept CRQSIZE {}, expected 32", rep.crqsize.get()));
                }
                c.send(32)?;
                c.expect(cm_event::DISCONNECTED).map(drop)
            }),
        ),
    ];
    for &(remote, key) in &args.attack {
        for (what, op) in [("READ", sys::wr_opcode::RDMA_READ), ("WRITE", sys::wr_opcode::RDMA_WRITE)] {
            let name: &'static str =
                Box::leak(format!("RDMA {what} of {remote:#x} with key {key:#x} is refused").into());
            cases.push((name, Box::new(move || refused_access(api, a, op, remote, key))));
        }
    }
    report::run(cases);
}
