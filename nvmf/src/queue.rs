//! One NVMe-oF queue as the core sees it: the first command must be Connect; afterwards
//! commands are parsed by queue type (admin or I/O) and executed. Transports own the bytes on
//! the wire; this owns what they mean.

use std::future::poll_fn;
use std::sync::Arc;

use p2pnvmf_p2p::mem::Window;
use tracing::{debug, info, warn};

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
        if sqe.opcode == FABRICS_OPCODE {
            return match (sqe.fctype(), &self.ctrl) {
                (fctype::CONNECT, None) => Ok(()),
                (fctype::PROPERTY_GET | fctype::PROPERTY_SET, Some(_)) if self.qid == 0 => Ok(()),
                (fctype::CONNECT | fctype::PROPERTY_GET | fctype::PROPERTY_SET, _) => {
                    Err(Status::COMMAND_SEQUENCE_ERROR.dnr())
                }
                _ => Err(Status::INVALID_OPCODE.dnr()),
            };
        }
        let Some(ctrl) = &self.ctrl else {
            return Err(Status::COMMAND_SEQUENCE_ERROR.dnr());
        };
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

    /// Executes one command, known to the transport by `tag` (unique among its commands in
    /// flight). `buf` holds the host's data for host-to-controller commands and receives the
    /// data for controller-to-host ones; `len` is the SGL's length. An I/O command may be
    /// `Submitted`: it then keeps the window until its completion comes out of
    /// [`Queue::reap`]. Everything else finishes here and leaves `buf` where it was.
    pub fn execute(&mut self, tag: u16, sqe: &Sqe, buf: &mut Option<Window>, len: usize) -> Exec {
        if let Some(c) = &self.ctrl {
            c.touch();
        }
        if let Err(s) = self.admit(sqe) {
            debug!(opcode = sqe.opcode, qid = self.qid, %s, "command refused");
            return s.into();
        }
        if self.qid != 0 && sqe.opcode != FABRICS_OPCODE {
            let ctrl = self.ctrl.as_ref().expect("admitted commands have a controller");
            let Some(subsys) = &ctrl.subsys else { return Status::INVALID_OPCODE.dnr().into() };
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
        if let Some(subsys) = self.ctrl.as_ref().and_then(|c| c.subsys.as_ref()) {
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
            _ => self.connect(sqe, data),
        }
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
            self.target.connect_admin(&self.port, &cd, kato)
        } else {
            self.target.connect_io(&self.port, &cd, qid)
        };
        match ctrl {
            Ok(c) => {
                self.qid = qid;
                self.entries = sqsize + 1;
                self.sq_flow_disabled = cattr & (1 << 2) != 0;
                info!(cntlid = c.cntlid, qid, sqsize, sq_flow_disabled = self.sq_flow_disabled, "queue connected");
                let cntlid = c.cntlid;
                if let (0, Some(p2p)) = (qid, self.target.p2p()) {
                    c.set_p2p_pools(crate::buffers::controller_pools(p2p, &c, &self.mover));
                }
                self.ctrl = Some(c);
                Response::result(cntlid.into())
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
            if self.qid == 0 {
                // Losing the admin queue ends the association (as in Linux nvmet).
                self.target.remove_controller(c.cntlid);
            } else {
                c.remove_io_queue(self.qid);
            }
        }
    }
}
