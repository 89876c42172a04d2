//! The reservation commands of an I/O queue (NVMe Base 2.0, 7.2–7.5): Register, Acquire,
//! Release and Report, executed on the namespace's [`Reservation`](crate::resv::Reservation)
//! for the controller's host; the hosts a change concerns hear of it on every controller they
//! have (log page 80h and its event).

use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use crate::ctrl::Controller;
use crate::request::Request;
use crate::response::Response;
use crate::resv::{self, Drain, Reservation};
use crate::subsystem::Subsystem;
use crate::target::Target;
use crate::wire::io_opcode as opcode;
use crate::{Namespace, Status};

/// A Preempt and Abort waiting for the preempted hosts' commands in flight before it completes.
#[derive(Debug)]
pub struct Held {
    nsid: u32,
    resv: Arc<Reservation>,
    drain: Drain,
    since: Instant,
}

impl Held {
    pub fn done(&self) -> bool {
        self.drain.done()
    }

    /// The preempted hosts' new commands are no longer refused for the wait (over, or given up
    /// with the preempting host's queue: `in_flight` then says what was left).
    pub fn finish(self) {
        self.resv.drained(&self.drain);
        info!(
            nsid = self.nsid,
            waited_us = self.since.elapsed().as_micros() as u64,
            in_flight = self.drain.in_flight(),
            "preempt and abort: the wait for the preempted hosts' commands is over"
        );
    }
}

/// Executes a reservation command, setting its response; a Preempt and Abort that must wait
/// for the preempted hosts' commands is [`Held`], to complete when it is done.
pub(crate) fn execute(target: &Target, ctrl: &Controller, subsys: &Subsystem, req: &mut Request) -> Option<Held> {
    let sqe = req.sqe;
    let Some(ns) = subsys.ns(sqe.nsid.get()) else {
        req.response = Response::status(Status::INVALID_NAMESPACE.dnr());
        return None;
    };
    if let Err(s) = ns.ana.admit() {
        req.response = Response::status(s);
        return None;
    }
    let len = req.len();
    let Some(data) = req.data_mut() else {
        warn!(nsid = ns.nsid, len, "no data buffer of the command's length");
        req.response = Response::status(Status::INTERNAL_ERROR);
        return None;
    };
    let (me, cdw10) = (&ctrl.hostid, sqe.cdw10.get());
    if sqe.opcode == opcode::RESV_REPORT {
        let st = ns.resv.state();
        req.response = match resv::report(&st, cdw10, sqe.cdw11.get(), data) {
            Ok(n) => Response::data(n),
            Err(s) => Response::status(s),
        };
        return None;
    }
    let data: &[u8] = data;
    let applied = ns.resv.apply(|st, ptpl_capable| match sqe.opcode {
        opcode::RESV_REGISTER => resv::register(st, me, cdw10, data, ptpl_capable),
        opcode::RESV_ACQUIRE => resv::acquire(st, me, cdw10, data),
        _ => resv::release(st, me, cdw10, data),
    });
    match applied {
        Ok((change, drain)) => {
            let (gen_, holder) = (change.state.generation, change.state.holder.map(|h| h.rtype as u8));
            info!(
                nsid = ns.nsid,
                opcode = sqe.opcode,
                cdw10 = format_args!("{cdw10:#x}"),
                generation = gen_,
                rtype = holder.unwrap_or(0),
                registrants = change.state.registrants.len(),
                aborted = change.aborted.len(),
                "reservation changed"
            );
            if sqe.opcode == opcode::RESV_REGISTER
                && cdw10 >> 30 == 3
                && !ns.resv.ptpl_capable()
                && ns.resv.warn_ptpl_once()
            {
                warn!(
                    nsid = ns.nsid,
                    "a host asked for Persist Through Power Loss: not kept without [reservations] state_dir; registrations end with the process"
                );
            }
            notify(target, subsys, ns, &change.notices);
            req.response = Response::ok();
            drain.map(|drain| {
                info!(
                    nsid = ns.nsid,
                    in_flight = drain.in_flight(),
                    "preempt and abort: waiting for the preempted hosts' commands in flight"
                );
                Held { nsid: ns.nsid, resv: ns.resv.clone(), drain, since: Instant::now() }
            })
        }
        Err(s) => {
            info!(nsid = ns.nsid, opcode = sqe.opcode, cdw10 = format_args!("{cdw10:#x}"), status = %s, "reservation command refused");
            req.response = Response::status(s);
            None
        }
    }
}

/// Tells every controller of each host concerned, through the Reservation Notification log.
fn notify(target: &Target, subsys: &Subsystem, ns: &Namespace, notices: &[resv::Notice]) {
    if notices.is_empty() {
        return;
    }
    for c in target.controllers().iter().filter(|c| !c.is_discovery() && c.subnqn() == subsys.nqn) {
        for n in notices.iter().filter(|n| n.host == c.hostid) {
            c.reservation_notice(ns.nsid, n.kind);
        }
    }
}
