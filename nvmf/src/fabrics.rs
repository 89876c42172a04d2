//! Fabrics commands (NVMe-oF 1.1, 3): Connect, Property Get and Set, and DH-HMAC-CHAP's
//! Authentication Send and Receive. The queue dispatches them here; what they change of the
//! queue comes back to it.

use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info, warn};

use crate::Status;
use crate::auth::{self, Session, Verdict};
use crate::buffers::Mover;
use crate::ctrl::Controller;
use crate::response::Response;
use crate::subsystem::Port;
use crate::target::{ConnectError, Target};
use crate::wire::{ConnectData, Sqe, fctype};

/// Property Get or Set (NVMe-oF 1.1, 3.4 and 3.5) on the controller's registers.
pub(crate) fn property(ctrl: &Controller, sqe: &Sqe) -> Response {
    // ATTRIB bits 2:0: 0 = 4 bytes, 1 = 8 bytes (NVMe-oF 1.1, Figure 26).
    let eight = sqe.cdw10.get() & 7 == 1;
    let r = if sqe.fctype() == fctype::PROPERTY_GET {
        ctrl.property_get(sqe.cdw11.get(), eight).map(Response::result)
    } else {
        let value = u64::from(sqe.cdw12.get()) | u64::from(sqe.cdw13.get()) << 32;
        ctrl.property_set(sqe.cdw11.get(), eight, value).map(|()| Response::ok())
    };
    r.unwrap_or_else(Response::status)
}

/// Authentication Send (a host message in `data`) and Receive (the controller's into
/// `data`): SECP, SPSP0/1 and TL/AL in CDW10/11 (NVMe Base 2.2, 5.3.1 and 5.3.2 as
/// fabrics carry them). A failed transaction tears the controller down once this command
/// completes, as Linux nvmet does.
pub(crate) fn authenticate(session: &mut Session, ctrl: &Controller, qid: u16, sqe: &Sqe, data: &mut [u8]) -> Response {
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
                debug!(qid, al = len, needed = short.needed, "Authentication Receive buffer too small");
                return Response::status(Status::INVALID_FIELD.dnr());
            }
        }
    };
    match verdict {
        Verdict::Pending => {}
        Verdict::Authenticated { bidirectional } => info!(
            cntlid = ctrl.cntlid, qid, hostnqn = %ctrl.hostnqn, hash = session.hash().name(),
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
                cntlid = ctrl.cntlid, qid, hostnqn = %ctrl.hostnqn, subnqn = ctrl.subnqn(),
                reason = auth::failure::describe(why), "DH-HMAC-CHAP failed: {what}; tearing the controller down"
            );
            metrics::counter!("p2pnvmf_auth_failures_total").increment(1);
            ctrl.kill("authentication failed");
        }
    }
    response
}

/// What a Connect made of a queue.
pub(crate) struct Connected {
    pub ctrl: Arc<Controller>,
    pub qid: u16,
    /// The host's SQSIZE + 1.
    pub entries: u16,
    pub sq_flow_disabled: bool,
    /// DH-HMAC-CHAP state when the host has a key.
    pub auth: Option<Box<Session>>,
    /// DW0 of the response: CNTLID, and AUTHREQ when the host must authenticate.
    pub result: u32,
}

/// Connect (NVMe-oF 1.1, 3.3): RECFMT, QID, SQSIZE, CATTR, KATO in the SQE; NQNs in data. An
/// admin queue's Connect makes the controller (and its p2p buffer decision, for `mover`); an
/// I/O queue's joins it. A refusal is the response to send.
pub(crate) fn connect(
    target: &Arc<Target>,
    port: &Port,
    peer: &str,
    mover: &Mover,
    sqe: &Sqe,
    data: &[u8],
) -> Result<Connected, Response> {
    let refuse = |e: ConnectError| Response { status: e.status, result: e.result.into(), data_len: 0 };
    let recfmt = sqe.cdw10.get() as u16;
    let qid = (sqe.cdw10.get() >> 16) as u16;
    let sqsize = sqe.cdw11.get() as u16;
    let cattr = (sqe.cdw11.get() >> 16) as u8;
    let kato = sqe.cdw12.get();
    if recfmt != 0 {
        return Err(Response::status(Status::CONNECT_INCOMPATIBLE_FORMAT.dnr()));
    }
    if sqsize == 0 || sqsize >= target.limits.queue_entries {
        return Err(refuse(ConnectError::sqe_param(44)));
    }
    let cd = parse_connect_data(data).map_err(Response::status)?;
    let ctrl = if qid == 0 {
        target.connect_admin(port, &cd, kato, peer)
    } else {
        target.connect_io(port, &cd, qid, sqsize + 1)
    };
    let ctrl = ctrl.map_err(|e| {
        warn!(qid, status = %e.status, port = port.id, "connect refused");
        refuse(e)
    })?;
    let sq_flow_disabled = cattr & (1 << 2) != 0;
    info!(cntlid = ctrl.cntlid, qid, sqsize, sq_flow_disabled, "queue connected");
    let mut result = u32::from(ctrl.cntlid);
    let subsys = ctrl.subsystem();
    if let (0, Some(p2p), Some(s)) = (qid, target.p2p(), &subsys) {
        ctrl.p2p.decide(p2p, s.namespaces.iter().map(|n| (n.nsid, n.buffers)), mover);
    }
    let host = subsys.as_ref().and_then(|s| s.host(&ctrl.hostnqn));
    let auth = host.and_then(|h| Session::new(h, ctrl.subnqn(), ctrl.kato())).map(Box::new);
    if auth.is_some() {
        result |= auth::CONNECT_AUTHREQ_ATR;
    }
    Ok(Connected { ctrl, qid, entries: sqsize + 1, sq_flow_disabled, auth, result })
}

/// Parses the Connect data of a capsule.
pub fn parse_connect_data(data: &[u8]) -> Result<ConnectData, Status> {
    use zerocopy::FromBytes;
    let bytes = data.get(..1024).ok_or(Status::DATA_SGL_LENGTH_INVALID.dnr())?;
    ConnectData::read_from_bytes(bytes).map_err(|_| Status::INTERNAL_ERROR)
}
