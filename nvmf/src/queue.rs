//! One NVMe-oF queue as the core sees it: the first command must be Connect; afterwards
//! commands are parsed by queue type (admin or I/O) and executed. Transports own the bytes on
//! the wire; this owns what they mean.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Instant;

use p2pnvmf_p2p::mem::Window;
use tracing::{debug, info, warn};

use crate::auth::{self, Session, Verdict};
use crate::ctrl::Controller;
use crate::io::{Completion, IoState};
use crate::subsystem::Port;
use crate::target::{ConnectError, Target, parse_connect_data};
use crate::wire::{Cqe, Sqe};
use crate::{Status, admin, io};

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

/// A finished command: status, DW0/DW1, and how many bytes of the buffer go back to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Response {
    pub status: Status,
    pub result: u64,
    pub data_len: u32,
}

impl Response {
    pub fn status(status: Status) -> Self {
        Response { status, ..Default::default() }
    }

    pub fn ok() -> Self {
        Response::default()
    }

    pub fn data(len: usize) -> Self {
        Response { data_len: len as u32, ..Default::default() }
    }

    pub fn result(result: u64) -> Self {
        Response { result, ..Default::default() }
    }
}

/// What executing a command produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    Done(Response),
    /// In flight at the backend: its [`Completion`] comes from [`Queue::reap`], with the data
    /// window it took.
    Submitted,
    /// Held by the controller (an Async Event Request), completed later through the
    /// controller's events; the transport frees the command's slot.
    Deferred,
}

impl From<Response> for Exec {
    fn from(r: Response) -> Self {
        Exec::Done(r)
    }
}

impl From<Status> for Exec {
    fn from(s: Status) -> Self {
        Exec::Done(Response::status(s))
    }
}

/// A queue's command context.
#[derive(Debug)]
pub struct Queue {
    target: Arc<Target>,
    port: Port,
    qid: u16,
    /// Entries in the submission queue (SQSIZE + 1).
    entries: u16,
    sqhd: u16,
    ctrl: Option<Arc<Controller>>,
    /// The host's address, as the transport knows it.
    peer: String,
    /// The controller's subsystem as this queue last saw it, and its generation: refreshed
    /// when a reload replaced it (a load per command, no lock).
    subsys: Option<Arc<crate::Subsystem>>,
    generation: u64,
    /// DH-HMAC-CHAP state when the host has a key: commands wait until it succeeds.
    auth: Option<Box<Session>>,
    sq_flow_disabled: bool,
    mover: crate::buffers::Mover,
    io: IoState,
}

impl Queue {
    pub fn new(target: Arc<Target>, port: Port) -> Self {
        Queue {
            target,
            port,
            qid: 0,
            entries: 1,
            sqhd: 0,
            ctrl: None,
            peer: String::new(),
            subsys: None,
            generation: 0,
            auth: None,
            sq_flow_disabled: false,
            mover: crate::buffers::Mover::Cpu,
            io: IoState::default(),
        }
    }

    /// Who moves this queue's data (the CPU unless an RDMA transport says otherwise): the
    /// controller's p2p decision depends on it.
    pub fn set_mover(&mut self, mover: crate::buffers::Mover) {
        self.mover = mover;
    }

    /// The host's address, for the controller an admin Connect creates (`p2pnvmf status`).
    pub fn set_peer(&mut self, peer: String) {
        self.peer = peer;
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    pub fn controller(&self) -> Option<&Arc<Controller>> {
        self.ctrl.as_ref()
    }

    /// Entries in the queue once connected (the host's SQSIZE + 1).
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Whether the host disabled SQ flow control at Connect (SQHD then need not be reported).
    pub fn sq_flow_disabled(&self) -> bool {
        self.sq_flow_disabled
    }

    /// Checks that this queue, in its current state, accepts the command at all: queue state
    /// and opcode come before any data transfer (as nvmet parses before mapping data).
    pub fn admit(&self, sqe: &Sqe) -> Result<(), Status> {
        if sqe.psdt() == 0 && Direction::of(sqe) != Direction::None {
            // Fabrics carry data by SGL only (NVMe-oF 1.1, 2.2).
            return Err(Status::INVALID_FIELD.dnr());
        }
        use fctype::*;
        if sqe.opcode == FABRICS_OPCODE {
            return match (sqe.fctype(), &self.ctrl) {
                (CONNECT, None) => Ok(()),
                (AUTH_SEND | AUTH_RECEIVE, Some(_)) if self.auth.is_some() => Ok(()),
                (PROPERTY_GET | PROPERTY_SET, Some(_)) if self.qid == 0 => self.authenticated(),
                (CONNECT | PROPERTY_GET | PROPERTY_SET | AUTH_SEND | AUTH_RECEIVE, _) => {
                    Err(Status::COMMAND_SEQUENCE_ERROR.dnr())
                }
                _ => Err(Status::INVALID_OPCODE.dnr()),
            };
        }
        let Some(ctrl) = &self.ctrl else {
            return Err(Status::COMMAND_SEQUENCE_ERROR.dnr());
        };
        self.authenticated()?;
        if !ctrl.enabled() {
            return Err(Status::COMMAND_SEQUENCE_ERROR.dnr());
        }
        let known = if self.qid == 0 {
            admin::supported(sqe.opcode, ctrl.is_discovery())
        } else {
            io::opcode::ALL.contains(&sqe.opcode) && !ctrl.is_discovery()
        };
        if known { Ok(()) } else { Err(Status::INVALID_OPCODE.dnr()) }
    }

    /// Commands other than Connect and authentication wait for DH-HMAC-CHAP to succeed on
    /// this queue when the host has a key (NVMe Base 2.2, 8.3.4.5).
    fn authenticated(&self) -> Result<(), Status> {
        match &self.auth {
            Some(s) if !s.authenticated() => Err(Status::AUTHENTICATION_REQUIRED.dnr()),
            _ => Ok(()),
        }
    }

    /// Executes one command, known to the transport by `tag` (unique among its commands in
    /// flight). `buf` holds the host's data for host-to-controller commands and receives the
    /// data for controller-to-host ones; `len` is the SGL's length. An I/O command may be
    /// `Submitted`: it then keeps the window until its completion comes out of
    /// [`Queue::reap`]. Everything else finishes here and leaves `buf` where it was.
    pub fn execute(&mut self, tag: u16, sqe: &Sqe, buf: &mut Option<Window>, len: usize) -> Exec {
        let admitted = self.admit(sqe);
        if let Some(c) = &self.ctrl
            && admitted != Err(Status::AUTHENTICATION_REQUIRED.dnr())
        {
            // A host that has not authenticated does not keep its controller alive.
            c.touch();
        }
        if let Err(s) = admitted {
            debug!(opcode = sqe.opcode, qid = self.qid, %s, "command refused");
            return s.into();
        }
        if self.qid != 0 && sqe.opcode != FABRICS_OPCODE {
            let ctrl = self.ctrl.as_ref().expect("admitted commands have a controller");
            let generation = ctrl.generation();
            if self.subsys.is_none() || generation != self.generation {
                self.subsys = ctrl.subsystem();
                self.generation = generation;
                if let Some(s) = &self.subsys {
                    self.io.retire(s);
                }
            }
            let Some(subsys) = &self.subsys else { return Status::INVALID_OPCODE.dnr().into() };
            return self.io.start(subsys, usize::from(self.entries), tag, sqe, buf, len);
        }
        // Fabrics and admin commands work on the bytes directly.
        let data = match buf {
            Some(b) if b.len() >= len => &mut b.bytes_mut()[..len],
            _ if len == 0 => &mut [][..],
            _ => {
                warn!(tag, len, "no data buffer of the command's length");
                return Status::INTERNAL_ERROR.into();
            }
        };
        if sqe.opcode == FABRICS_OPCODE {
            return self.fabrics(sqe, data).into();
        }
        let ctrl = self.ctrl.clone().expect("admitted commands have a controller");
        admin::execute(&self.target, &ctrl, sqe, data)
    }

    /// Resolves when submitted commands may have completed (never while none are in
    /// flight); collect them with [`Queue::reap`].
    pub async fn io_ready(&mut self) {
        poll_fn(|cx| self.io.poll_ready(cx)).await
    }

    /// Hands every submitted command that finished to `out`, in completion order.
    pub fn reap(&mut self, out: &mut impl FnMut(Completion)) {
        if let Some(subsys) = &self.subsys {
            self.io.reap(subsys, out);
        }
    }

    /// The transport's data area (every window it lends comes from it): backends may register
    /// it once with their device.
    pub fn set_data_area(&mut self, area: p2pnvmf_p2p::mem::MappingPin) {
        self.io.set_data_area(area);
    }

    /// Backend operations in flight.
    pub fn in_flight(&self) -> usize {
        self.io.in_flight()
    }

    fn fabrics(&mut self, sqe: &Sqe, data: &mut [u8]) -> Response {
        // ATTRIB bits 2:0: 0 = 4 bytes, 1 = 8 bytes (NVMe-oF 1.1, Figure 26).
        let eight = sqe.cdw10.get() & 7 == 1;
        match (sqe.fctype(), &self.ctrl) {
            (fctype::PROPERTY_GET, Some(c)) => match c.property_get(sqe.cdw11.get(), eight) {
                Ok(v) => Response::result(v),
                Err(s) => Response::status(s),
            },
            (fctype::PROPERTY_SET, Some(c)) => {
                let value = u64::from(sqe.cdw12.get()) | u64::from(sqe.cdw13.get()) << 32;
                match c.property_set(sqe.cdw11.get(), eight, value) {
                    Ok(()) => Response::ok(),
                    Err(s) => Response::status(s),
                }
            }
            (fctype::AUTH_SEND | fctype::AUTH_RECEIVE, Some(c)) => {
                let c = c.clone();
                self.authenticate(&c, sqe, data)
            }
            _ => self.connect(sqe, data),
        }
    }

    /// Authentication Send (a host message in `data`) and Receive (the controller's into
    /// `data`): SECP, SPSP0/1 and TL/AL in CDW10/11 (NVMe Base 2.2, 5.3.1 and 5.3.2 as
    /// fabrics carry them). A failed transaction tears the controller down once this command
    /// completes, as Linux nvmet does.
    fn authenticate(&mut self, ctrl: &Controller, sqe: &Sqe, data: &mut [u8]) -> Response {
        let session = self.auth.as_mut().expect("admitted: the queue has a session");
        let [_, spsp0, spsp1, secp] = sqe.cdw10.get().to_le_bytes();
        let len = sqe.cdw11.get() as usize;
        if secp != auth::SECP_DHCHAP || spsp0 != auth::SPSP_DHCHAP || spsp1 != auth::SPSP_DHCHAP || len == 0 {
            return Response::status(Status::INVALID_FIELD.dnr());
        }
        if len != data.len() {
            return Response::status(Status::DATA_SGL_LENGTH_INVALID.dnr());
        }
        let (verdict, response) = if sqe.fctype() == fctype::AUTH_SEND {
            (session.send(data, Instant::now()), Response::ok())
        } else {
            match session.receive(data) {
                Ok(v) => (v, Response::data(len)),
                Err(short) => {
                    debug!(qid = self.qid, al = len, needed = short.needed, "Authentication Receive buffer too small");
                    return Response::status(Status::INVALID_FIELD.dnr());
                }
            }
        };
        match verdict {
            Verdict::Pending => {}
            Verdict::Authenticated { bidirectional } => info!(
                cntlid = ctrl.cntlid, qid = self.qid, hostnqn = %ctrl.hostnqn, hash = session.hash().name(),
                dhgroup = session.dhgroup(), bidirectional, "host authenticated (DH-HMAC-CHAP)"
            ),
            Verdict::Failed(why) | Verdict::RefusedByHost(why) => {
                let what = match verdict {
                    Verdict::RefusedByHost(_) => {
                        "the host refused the controller's response (is dhchap_ctrl_key the host's --dhchap-ctrl-secret?)"
                    }
                    _ => "the host did not prove its secret",
                };
                warn!(
                    cntlid = ctrl.cntlid, qid = self.qid, hostnqn = %ctrl.hostnqn, subnqn = ctrl.subnqn(),
                    reason = auth::failure::describe(why), "DH-HMAC-CHAP failed: {what}; tearing the controller down"
                );
                metrics::counter!("p2pnvmf_auth_failures_total").increment(1);
                ctrl.kill("authentication failed");
            }
        }
        response
    }

    /// Connect (NVMe-oF 1.1, 3.3): RECFMT, QID, SQSIZE, CATTR, KATO in the SQE; NQNs in data.
    fn connect(&mut self, sqe: &Sqe, data: &[u8]) -> Response {
        let refuse = |e: ConnectError| Response { status: e.status, result: e.result.into(), data_len: 0 };
        let recfmt = sqe.cdw10.get() as u16;
        let qid = (sqe.cdw10.get() >> 16) as u16;
        let sqsize = sqe.cdw11.get() as u16;
        let cattr = (sqe.cdw11.get() >> 16) as u8;
        let kato = sqe.cdw12.get();
        if recfmt != 0 {
            return Response::status(Status::CONNECT_INCOMPATIBLE_FORMAT.dnr());
        }
        if sqsize == 0 || sqsize >= self.target.limits.queue_entries {
            return refuse(ConnectError::sqe_param(44));
        }
        let cd = match parse_connect_data(data) {
            Ok(cd) => cd,
            Err(s) => return Response::status(s),
        };
        let ctrl = if qid == 0 {
            self.target.connect_admin(&self.port, &cd, kato, &self.peer)
        } else {
            self.target.connect_io(&self.port, &cd, qid, sqsize + 1)
        };
        match ctrl {
            Ok(c) => {
                self.qid = qid;
                self.entries = sqsize + 1;
                metrics::gauge!("p2pnvmf_queues", "transport" => self.port.trtype.as_str()).increment(1.0);
                self.sq_flow_disabled = cattr & (1 << 2) != 0;
                info!(cntlid = c.cntlid, qid, sqsize, sq_flow_disabled = self.sq_flow_disabled, "queue connected");
                let mut result = u32::from(c.cntlid);
                if let (0, Some(p2p)) = (qid, self.target.p2p()) {
                    c.set_p2p_pools(crate::buffers::controller_pools(p2p, &c, &self.mover));
                }
                let subsys = c.subsystem();
                let host = subsys.as_ref().and_then(|s| s.host(&c.hostnqn));
                self.auth = host.and_then(|h| Session::new(h, c.subnqn(), c.kato())).map(Box::new);
                if self.auth.is_some() {
                    result |= auth::CONNECT_AUTHREQ_ATR;
                }
                self.ctrl = Some(c);
                Response::result(result.into())
            }
            Err(e) => {
                warn!(qid, status = %e.status, port = self.port.id, "connect refused");
                refuse(e)
            }
        }
    }

    /// Builds the CQE for a finished command and advances the SQ head.
    pub fn cqe(&mut self, cid: u16, r: &Response) -> Cqe {
        self.sqhd = (self.sqhd + 1) % self.entries;
        Cqe {
            result: r.result.into(),
            sqhd: self.sqhd.into(),
            sqid: self.qid.into(),
            cid: cid.into(),
            status: r.status.to_cqe_field().into(),
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        if let Some(c) = self.ctrl.take() {
            metrics::gauge!("p2pnvmf_queues", "transport" => self.port.trtype.as_str()).decrement(1.0);
            if self.qid == 0 {
                // Losing the admin queue ends the association (as in Linux nvmet).
                self.target.remove_controller(c.cntlid);
            } else {
                c.remove_io_queue(self.qid);
            }
        }
    }
}
