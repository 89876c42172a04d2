//! One NVMe-oF queue as the core sees it: the first command must be Connect; afterwards
//! commands are parsed by queue type (admin or I/O) and executed. Transports own the bytes on
//! the wire; this owns what they mean.

use std::future::poll_fn;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::auth::Session;
use crate::buffers::{Mover, QueueBuffers};
use crate::ctrl::Controller;
use crate::data;
use crate::io::IoState;
use crate::request::{Completion, Exec, Request};
use crate::reservations::{self, Held};
use crate::response::Response;
use crate::subsystem::{Port, TrType};
use crate::target::Target;
use crate::wire::{Cqe, Direction, FABRICS_OPCODE, Sqe, fctype, io_opcode};
use crate::{Status, admin, fabrics};

/// The span a transport runs one queue's task in: every line it logs names the host's
/// address and, once Connect made the queue part of a controller, the host NQN, controller ID
/// and queue ID, so one host's story can be followed in the log.
pub fn span(transport: TrType, peer: &dyn std::fmt::Display) -> tracing::Span {
    use tracing::field::Empty;
    tracing::info_span!("queue", transport = transport.as_str(), %peer, hostnqn = Empty, cntlid = Empty, qid = Empty)
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
    mover: Mover,
    io: IoState,
    /// Async Event Requests held for an event, by tag (admin queue).
    held: Vec<(u16, Request)>,
    /// Preempt and Abort commands waiting for the preempted hosts' commands, by tag.
    draining: Vec<(u16, Request, Held)>,
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
            mover: Mover::Cpu,
            io: IoState::default(),
            held: Vec::new(),
            draining: Vec::new(),
        }
    }

    /// Who moves this queue's data (the CPU unless an RDMA transport says otherwise): the
    /// controller's p2p decision depends on it.
    pub fn set_mover(&mut self, mover: Mover) {
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

    /// This I/O queue's share of its controller's p2p pools (none for an admin queue, or
    /// before Connect).
    pub fn buffers(&self) -> QueueBuffers {
        match &self.ctrl {
            Some(c) if self.qid != 0 => QueueBuffers::of(&c.p2p, &c.p2p.current(), self.entries),
            _ => QueueBuffers::default(),
        }
    }

    /// Entries in the queue once connected (the host's SQSIZE + 1).
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Whether the host disabled SQ flow control at Connect (SQHD then need not be reported).
    pub fn sq_flow_disabled(&self) -> bool {
        self.sq_flow_disabled
    }

    /// Accepts a command that arrived on this queue — once, before any of its data moves, as
    /// nvmet parses before mapping data: admitted in the queue's state (Connect first, then
    /// authentication, an opcode of the queue's kind, an enabled controller) and its data
    /// located by its SGL, `icd_len` bytes having come in the capsule. A connected host's
    /// command keeps its controller alive unless refused for want of authentication. A refusal
    /// is the status to complete the command with; an accepted command is a [`Request`] that
    /// goes to [`Queue::execute`] once its data is in its buffer.
    pub fn accept(&self, sqe: &Sqe, icd_len: usize) -> Result<Request, Status> {
        let admitted = self.admit(sqe);
        if let Some(c) = &self.ctrl
            && admitted != Err(Status::AUTHENTICATION_REQUIRED.dnr())
        {
            c.touch();
        }
        admitted?;
        let plan = data::locate(sqe, icd_len, &self.port.params)?;
        Ok(Request { sqe: *sqe, plan, ..Request::default() })
    }

    /// Whether this queue, in its current state, takes the command at all.
    fn admit(&self, sqe: &Sqe) -> Result<(), Status> {
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
            io_opcode::ALL.contains(&sqe.opcode) && !ctrl.is_discovery()
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

    /// Executes a request [`Queue::accept`] made, known to the transport by `tag` (unique
    /// among its commands in flight), its buffer holding the host's data for host-to-controller
    /// commands and receiving the data for controller-to-host ones. An I/O command or an Async
    /// Event Request may be `Submitted`: the request then comes back out of [`Queue::reap`].
    pub fn execute(&mut self, tag: u16, mut req: Request) -> Exec {
        let sqe = req.sqe;
        if self.ctrl.is_none() && (sqe.opcode != FABRICS_OPCODE || sqe.fctype() != fctype::CONNECT) {
            warn!(tag, opcode = sqe.opcode, "a command was executed that was not accepted");
            req.response = Response::status(Status::COMMAND_SEQUENCE_ERROR.dnr());
            return Exec::Done(req);
        }
        if self.qid != 0 && sqe.opcode != FABRICS_OPCODE {
            let ctrl = self.ctrl.as_ref().expect("checked above");
            let generation = ctrl.generation();
            if self.subsys.is_none() || generation != self.generation {
                self.subsys = ctrl.subsystem();
                self.generation = generation;
                if let Some(s) = &self.subsys {
                    self.io.retire(s);
                }
            }
            let Some(subsys) = &self.subsys else {
                req.response = Response::status(Status::INVALID_OPCODE.dnr());
                return Exec::Done(req);
            };
            if io_opcode::is_reservation(sqe.opcode) {
                return match reservations::execute(&self.target, ctrl, subsys, &mut req) {
                    None => Exec::Done(req),
                    Some(held) => {
                        self.draining.push((tag, req, held));
                        Exec::Submitted
                    }
                };
            }
            return self.io.start(subsys, &ctrl.hostid, usize::from(self.entries), tag, req);
        }
        // Fabrics and admin commands work on the bytes directly.
        let len = req.len();
        let Some(data) = req.data_mut() else {
            warn!(tag, len, "no data buffer of the command's length");
            req.response = Response::status(Status::INTERNAL_ERROR);
            return Exec::Done(req);
        };
        let response = if sqe.opcode == FABRICS_OPCODE {
            Some(self.fabrics(&sqe, data))
        } else {
            let ctrl = self.ctrl.clone().expect("checked above");
            admin::execute(&self.target, &ctrl, tag, &sqe, data)
        };
        match response {
            Some(r) => {
                req.response = r;
                Exec::Done(req)
            }
            None => {
                // An Async Event Request, held until an event completes it.
                self.held.push((tag, req));
                Exec::Submitted
            }
        }
    }

    /// Resolves when submitted commands may have completed — backend operations, a Preempt
    /// and Abort whose wait may be over (looked at every millisecond), or on the admin queue an
    /// async event for a held Async Event Request (never while nothing is in flight); collect
    /// them with [`Queue::reap`].
    pub async fn io_ready(&mut self) {
        let events = self.ctrl.clone().filter(|_| self.qid == 0);
        let draining = !self.draining.is_empty();
        tokio::select! {
            () = poll_fn(|cx| self.io.poll_ready(cx)) => {}
            () = tokio::time::sleep(std::time::Duration::from_millis(1)), if draining => {}
            () = async {
                match &events {
                    Some(c) => c.event_ready().await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }

    /// Hands every submitted request that finished to `out`, in completion order: backend
    /// operations, and on the admin queue Async Event Requests an event completes.
    pub fn reap(&mut self, out: &mut impl FnMut(Completion)) {
        if let Some(subsys) = &self.subsys {
            self.io.reap(subsys, out);
        }
        while let Some(i) = self.draining.iter().position(|(_, _, held)| held.done()) {
            let (tag, req, held) = self.draining.swap_remove(i);
            held.finish();
            out(Completion { tag, req });
        }
        if let (0, Some(c)) = (self.qid, &self.ctrl) {
            for (tag, dw0) in c.take_async_completions() {
                let Some(i) = self.held.iter().position(|(t, _)| *t == tag) else {
                    warn!(cntlid = c.cntlid, tag, "an async event for no request held");
                    continue;
                };
                info!(cntlid = c.cntlid, tag, dw0 = format_args!("{dw0:#x}"), "async event completed");
                let (tag, mut req) = self.held.swap_remove(i);
                req.response = Response::result(dw0.into());
                out(Completion { tag, req });
            }
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
        match (sqe.fctype(), &self.ctrl) {
            (fctype::PROPERTY_GET | fctype::PROPERTY_SET, Some(c)) => fabrics::property(c, sqe),
            (fctype::AUTH_SEND | fctype::AUTH_RECEIVE, Some(c)) => {
                let session = self.auth.as_mut().expect("admitted: the queue has a session");
                fabrics::authenticate(session, c, self.qid, sqe, data)
            }
            _ => match fabrics::connect(&self.target, &self.port, &self.peer, &self.mover, sqe, data) {
                Ok(c) => {
                    metrics::gauge!("p2pnvmf_queues", "transport" => self.port.trtype.as_str()).increment(1.0);
                    (self.qid, self.entries, self.sq_flow_disabled, self.auth) =
                        (c.qid, c.entries, c.sq_flow_disabled, c.auth);
                    self.ctrl = Some(c.ctrl);
                    Response::result(c.result.into())
                }
                Err(refused) => refused,
            },
        }
    }

    /// The CQE that completes a finished request (its response), advancing the SQ head: the
    /// one way every command of the queue is answered.
    pub fn complete(&mut self, req: &Request) -> Cqe {
        self.sqhd = (self.sqhd + 1) % self.entries;
        let r = &req.response;
        Cqe {
            result: r.result.into(),
            sqhd: self.sqhd.into(),
            sqid: self.qid.into(),
            cid: req.sqe.cid,
            status: r.status.to_cqe_field().into(),
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // A preempted host must not stay refused because the preempting one went away.
        for (_, _, held) in self.draining.drain(..) {
            held.finish();
        }
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

/// What a queue's transport watches once Connect gave it a controller: its teardown.
#[derive(Debug, Default)]
pub struct CtrlWatch {
    dead: Option<watch::Receiver<Option<&'static str>>>,
}

impl CtrlWatch {
    /// Starts watching once the queue has a controller (returning true that once); a no-op
    /// afterwards.
    pub fn follow(&mut self, queue: &Queue) -> bool {
        if self.dead.is_none()
            && let Some(c) = queue.controller()
        {
            // The queue's span (see [`span`]) names its host from now on.
            let span = tracing::Span::current();
            span.record("hostnqn", c.hostnqn.as_str());
            span.record("cntlid", c.cntlid);
            span.record("qid", queue.qid());
            self.dead = Some(c.watch_dead());
            return true;
        }
        false
    }

    /// For a transport's select loop: resolves with the reason when the controller is torn
    /// down; never before Connect.
    pub async fn torn_down(&mut self) -> Option<&'static str> {
        let Some(dead) = self.dead.as_mut() else {
            return std::future::pending().await;
        };
        dead.wait_for(|r| r.is_some()).await.map(|r| *r).ok().flatten()
    }
}
