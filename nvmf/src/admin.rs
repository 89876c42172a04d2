//! Admin commands (NVMe Base 2.0, 5): Identify, Get Log Page, Get/Set Features, Async Event
//! Request, Keep Alive, Abort. Discovery controllers accept the subset NVMe-oF 1.1, 5 allows.

use std::sync::Arc;

use crate::ctrl::{AERL, Controller, VERSION, feat};
use crate::response::Response;
use crate::subsystem::Subsystem;
use crate::target::Target;
use crate::wire::{Sqe, io_opcode, put_str};
use crate::{Status, ana};

pub mod opcode {
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    pub const KEEP_ALIVE: u8 = 0x18;
}

/// Whether the admin opcode is one this controller type implements.
pub fn supported(op: u8, discovery: bool) -> bool {
    use opcode::*;
    match op {
        IDENTIFY | GET_LOG_PAGE | SET_FEATURES | GET_FEATURES | ASYNC_EVENT_REQUEST | KEEP_ALIVE => true,
        ABORT => !discovery,
        _ => false,
    }
}

/// Log page identifiers (NVMe Base 2.0, Figure 202; NVMe-oF 1.1, 5.3).
pub mod lid {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NS_LIST: u8 = 0x04;
    pub const COMMAND_EFFECTS: u8 = 0x05;
    pub const ANA: u8 = 0x0c;
    pub const DISCOVERY: u8 = 0x70;
    pub const RESERVATION_NOTIFICATION: u8 = 0x80;
}

/// Firmware revision reported in Identify and the firmware slot log.
pub const FIRMWARE_REVISION: &str = env!("CARGO_PKG_VERSION");

const PAGE: usize = 4096;

/// Executes an admin command on its data; `None` for an Async Event Request held until an event
/// completes it (through the queue's reap).
pub(crate) fn execute(
    target: &Target,
    ctrl: &Arc<Controller>,
    tag: u16,
    sqe: &Sqe,
    data: &mut [u8],
) -> Option<Response> {
    let r = match sqe.opcode {
        opcode::IDENTIFY => identify(ctrl, sqe, data),
        opcode::GET_LOG_PAGE => get_log_page(target, ctrl, sqe, data),
        opcode::SET_FEATURES => {
            if sqe.cdw10.get() & (1 << 31) != 0 {
                return Some(Response::status(Status::FEATURE_NOT_SAVEABLE.dnr()));
            }
            let fid = sqe.cdw10.get() as u8;
            let set = match fid {
                feat::RESERVATION_NOTIFICATION_MASK | feat::RESERVATION_PERSISTENCE => {
                    set_reservation_feature(ctrl, fid, sqe.nsid.get(), sqe.cdw11.get())
                }
                _ => ctrl.set_feature(fid, sqe.cdw11.get()),
            };
            match set {
                Ok(dw0) => Response::result(dw0.into()),
                Err(s) => Response::status(s),
            }
        }
        opcode::GET_FEATURES => get_features(ctrl, sqe, data),
        opcode::ASYNC_EVENT_REQUEST => {
            return match ctrl.push_aer(tag) {
                Ok(None) => None,
                Ok(Some(event)) => Some(Response::result(event.into())),
                Err(s) => Some(Response::status(s)),
            };
        }
        opcode::KEEP_ALIVE => Response::ok(),
        // Abort is best effort (NVMe Base 2.0, 5.1): commands in flight at a backend are not
        // withdrawn, so report "not aborted" (DW0 bit 0).
        opcode::ABORT => Response::result(1),
        _ => Response::status(Status::INVALID_OPCODE.dnr()),
    };
    Some(r)
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Copies a built page into the host's buffer, as much as both hold.
fn reply(page: &[u8], data: &mut [u8]) -> Response {
    let n = page.len().min(data.len());
    data[..n].copy_from_slice(&page[..n]);
    Response::data(n)
}

mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    pub const NS_DESCRIPTORS: u8 = 0x03;
}

fn identify(ctrl: &Controller, sqe: &Sqe, data: &mut [u8]) -> Response {
    let cns = sqe.cdw10.get() as u8;
    let mut page = [0u8; PAGE];
    let subsys = match (ctrl.subsystem(), cns) {
        (_, cns::CONTROLLER) => {
            identify_controller(ctrl, &mut page);
            return reply(&page, data);
        }
        (Some(s), _) => s,
        (None, _) => return Response::status(Status::INVALID_FIELD.dnr()),
    };
    let nsid = sqe.nsid.get();
    match cns {
        cns::NAMESPACE => {
            if nsid == 0 || nsid == u32::MAX {
                return Response::status(Status::INVALID_NAMESPACE.dnr());
            }
            // An inactive NSID reads as zeroes (NVMe Base 2.0, 5.17.2.1).
            if let Some(ns) = subsys.ns(nsid) {
                let blocks = ns.blocks();
                put64(&mut page, 0, blocks); // NSZE
                put64(&mut page, 8, blocks); // NCAP
                put64(&mut page, 16, blocks); // NUSE
                page[24] = 1 << 2; // NSFEAT: DAE (deallocated or unwritten error) supported
                // NMIC: shared — every controller of the subsystem reaches it, as with the
                // kernel target; without it a host refuses a second path's namespace.
                page[30] = 1;
                page[33] = 1 | 1 << 3; // DLFEAT: deallocated blocks read as zeroes; WZ dealloc
                if let Some(d) = ns.backend.device() {
                    // An NVMe device's own features, as its Identify says.
                    page[24] = d.nsfeat;
                    put16(&mut page, 72, d.nows);
                    page[33] = d.dlfeat;
                }
                // RESCAP: every reservation type, IEKEY as NVMe 1.3 defines it, and PTPL
                // where a state directory keeps it.
                page[31] = 0xfe | u8::from(ns.resv.ptpl_capable());
                put32(&mut page, 92, ns.ana.id); // ANAGRPID
                page[104..120].copy_from_slice(&ns.ids.nguid);
                page[120..128].copy_from_slice(&ns.ids.eui64);
                put32(&mut page, 128, (ns.lba_shift) << 16); // LBAF0: LBADS
            }
            reply(&page, data)
        }
        cns::ACTIVE_NS_LIST => {
            for (i, ns) in subsys.namespaces.iter().filter(|n| n.nsid > nsid).take(1024).enumerate() {
                put32(&mut page, i * 4, ns.nsid);
            }
            reply(&page, data)
        }
        cns::NS_DESCRIPTORS => {
            let Some(ns) = subsys.ns(nsid) else {
                return Response::status(Status::INVALID_NAMESPACE.dnr());
            };
            // NIDT 1 = EUI-64, 2 = NGUID, 3 = UUID, 4 = CSI (NVMe Base 2.0, Figure 277); an
            // identifier that is zero is not reported.
            let ids = &ns.ids;
            let mut at = 0;
            for (nidt, id) in [(1u8, &ids.eui64[..]), (2, &ids.nguid[..]), (3, &ids.uuid[..]), (4, &[0u8][..])] {
                if nidt != 4 && id.iter().all(|&b| b == 0) {
                    continue;
                }
                page[at..at + 4].copy_from_slice(&[nidt, id.len() as u8, 0, 0]);
                page[at + 4..at + 4 + id.len()].copy_from_slice(id); // CSI 0: NVM command set
                at += 4 + id.len();
            }
            reply(&page, data)
        }
        _ => Response::status(Status::INVALID_FIELD.dnr()),
    }
}

/// Identify Controller (NVMe Base 2.0, Figure 275; fabrics fields NVMe-oF 1.1, Figure 28).
fn identify_controller(ctrl: &Controller, page: &mut [u8; PAGE]) {
    let subsys = ctrl.subsystem();
    let (serial, model) = match &subsys {
        Some(s) => (s.serial.as_str(), s.model.as_str()),
        None => ("", "p2pnvmf discovery"),
    };
    put_str(&mut page[4..24], serial, b' ');
    put_str(&mut page[24..64], model, b' ');
    put_str(&mut page[64..72], FIRMWARE_REVISION, b' ');
    page[72] = 6; // RAB
    // CMIC: several ports (listeners) and several controllers (heads) reach the subsystem;
    // an NVM subsystem reports ANA (a discovery controller has no namespaces: a host checks
    // MNAN against NN when CMIC says ANA).
    page[76] = 1 | 1 << 1 | if ctrl.is_discovery() { 0 } else { 1 << 3 };
    let params = ctrl.port.params;
    // MDTS in units of the 4 KiB minimum page size, as a power of two.
    page[77] = (params.max_xfer / 4096).max(1).ilog2() as u8;
    put16(page, 78, ctrl.cntlid);
    put32(page, 80, VERSION);
    // OAES: discovery log changes; namespace attribute and ANA changes.
    put32(page, 92, if ctrl.is_discovery() { 1 << 31 } else { 1 << 8 | 1 << 11 });
    page[111] = if ctrl.is_discovery() { 2 } else { 1 }; // CNTRLTYPE
    page[258] = AERL;
    page[260] = 1 << 1 | 1; // FRMW: one slot, slot 1 read-only
    page[261] = 1 << 1 | 1 << 2; // LPA: command effects log, extended data for Get Log Page
    page[263] = 0; // NPSS
    put16(page, 320, 10); // KAS: keep-alive granularity 10 × 100 ms
    page[512] = 6 << 4 | 6; // SQES
    page[513] = 4 << 4 | 4; // CQES
    put16(page, 514, ctrl.limits().queue_entries); // MAXCMD
    if let Some(s) = ctrl.subsystem() {
        // NN: the largest NSID, at least MNAN (a host checks MNAN <= NN), as nvmet reports.
        put32(page, 516, s.namespaces.last().map_or(0, |n| n.nsid).max(ana::MAX_NAMESPACES));
        // ONCS: Compare (done by the target), Dataset Management and Write Zeroes where every
        // NVMe device behind a namespace has them, Reservations (kept by the target).
        let dsm_wz = s.namespaces.iter().filter_map(|n| n.backend.device()).fold(1 << 2 | 1 << 3, |a, d| a & d.oncs);
        put16(page, 520, 1 | dsm_wz | 1 << 5); // ... and Reservations
        page[525] = s.namespaces.iter().any(|n| n.backend.volatile_write_cache()).into(); // VWC
        put32(page, 540, ana::MAX_NAMESPACES); // MNAN
        page[342] = ana::TRANSITION_SECS; // ANATT
        // ANACAP: every state reported; a reload may move a namespace to another group.
        page[343] = 0b1_1111;
        put32(page, 344, ana::MAX_GROUPS); // ANAGRPMAX
        put32(page, 348, ana::MAX_GROUPS); // NANAGRPID
    }
    // SGLS: supported; keyed data blocks (bit 2) on RDMA; offsets in SGL data blocks (bit 20).
    let keyed = if params.keyed_sgls { 1 << 2 } else { 0 };
    put32(page, 536, 1 | keyed | 1 << 20);
    put_str(&mut page[768..1024], ctrl.subnqn(), 0);
    put32(page, 1792, params.ioccsz); // IOCCSZ
    put32(page, 1796, 1); // IORCSZ: 16-byte response capsules
    put16(page, 1800, 0); // ICDOFF
    page[1802] = 0; // FCATT: dynamic controller model
    page[1803] = params.msdbd;
}

fn get_log_page(target: &Target, ctrl: &Controller, sqe: &Sqe, data: &mut [u8]) -> Response {
    let lid = sqe.cdw10.get() as u8;
    let numd = (sqe.cdw10.get() >> 16) | (sqe.cdw11.get() & 0xffff) << 16;
    let len = (u64::from(numd) + 1) * 4;
    let offset = u64::from(sqe.cdw12.get()) | u64::from(sqe.cdw13.get()) << 32;
    if len > data.len() as u64 {
        return Response::status(Status::DATA_SGL_LENGTH_INVALID.dnr());
    }
    let mut page = [0u8; PAGE];
    let built: &[u8] = match (lid, &ctrl.subsystem()) {
        (lid::DISCOVERY, None) => {
            let log = target.discovery_log(&ctrl.hostnqn);
            return copy_log(&log, offset, len, data);
        }
        (lid::ERROR, _) => &page[..64], // ELPE 0: one entry, error count 0 = empty
        (lid::SMART, Some(s)) => {
            smart_log(s, &mut page);
            // One NVMe device behind the subsystem: its own health, as it reports it.
            if let [ns] = &s.namespaces[..]
                && let Some(log) = ns.backend.health_log()
            {
                match log {
                    Ok(l) => page[..512].copy_from_slice(&l[..512]),
                    Err(e) => tracing::warn!(nsid = ns.nsid, "SMART log of the device: {e}; the target's own instead"),
                }
            }
            &page[..512]
        }
        (lid::FIRMWARE_SLOT, Some(_)) => {
            page[0] = 1; // AFI: slot 1 active
            put_str(&mut page[8..16], FIRMWARE_REVISION, b' ');
            &page[..512]
        }
        (lid::CHANGED_NS_LIST, Some(_)) => {
            for (i, nsid) in ctrl.take_changed_namespaces().into_iter().enumerate() {
                put32(&mut page, i * 4, nsid);
            }
            &page[..]
        }
        (lid::RESERVATION_NOTIFICATION, Some(_)) => {
            page[..64].copy_from_slice(&ctrl.take_reservation_notice());
            &page[..64]
        }
        (lid::ANA, Some(s)) => {
            // LSP bit 0: Return Groups Only.
            let groups_only = (sqe.cdw10.get() >> 8) & 1 != 0;
            let mut log = ana::log_page(s.namespaces.iter().map(|n| (n.nsid, &n.ana)), groups_only);
            // The page is as long as the host sizes it from Identify (nvme-cli reads it in 4 KiB
            // pieces up to there): zeroes after the descriptors.
            log.resize(ana::MAX_LOG_LEN.max(log.len()), 0);
            return copy_log(&log, offset, len, data);
        }
        (lid::COMMAND_EFFECTS, Some(_)) => {
            command_effects(&mut page);
            &page[..]
        }
        _ => return Response::status(Status::INVALID_LOG_PAGE.dnr()),
    };
    copy_log(built, offset, len, data)
}

fn copy_log(log: &[u8], offset: u64, len: u64, data: &mut [u8]) -> Response {
    if !offset.is_multiple_of(4) || offset > log.len() as u64 {
        return Response::status(Status::INVALID_FIELD.dnr());
    }
    let tail = &log[offset as usize..];
    let n = tail.len().min(len as usize);
    data[..n].copy_from_slice(&tail[..n]);
    // Past the end of the page the host reads zeroes.
    data[n..len as usize].fill(0);
    Response::data(len as usize)
}

/// SMART / Health Information (NVMe Base 2.0, Figure 207) with the subsystem's I/O counters.
fn smart_log(s: &Subsystem, page: &mut [u8; PAGE]) {
    put16(page, 1, 293); // composite temperature, kelvin
    page[3] = 100; // available spare
    page[4] = 10; // available spare threshold
    let st = &s.stats;
    let (rd, wr) = (st.bytes_read(), st.bytes_written());
    // Data units are thousands of 512-byte units, rounded up.
    page[32..48].copy_from_slice(&u128::from(rd.div_ceil(512_000)).to_le_bytes());
    page[48..64].copy_from_slice(&u128::from(wr.div_ceil(512_000)).to_le_bytes());
    page[64..80].copy_from_slice(&u128::from(st.reads()).to_le_bytes());
    page[80..96].copy_from_slice(&u128::from(st.writes()).to_le_bytes());
}

/// Commands Supported and Effects (NVMe Base 2.0, Figure 210): CSUPP, and LBCC for writes.
fn command_effects(page: &mut [u8; PAGE]) {
    const CSUPP: u32 = 1;
    const LBCC: u32 = 1 << 1;
    for op in (0..=u8::MAX).filter(|&op| supported(op, false)) {
        put32(page, usize::from(op) * 4, CSUPP);
    }
    for op in io_opcode::ALL {
        let lbcc = if io_opcode::changes_content(op) { LBCC } else { 0 };
        put32(page, 1024 + usize::from(op) * 4, CSUPP | lbcc);
    }
}

/// Set Features Reservation Notification Mask (82h: bits 1–3 mask registration preempted,
/// reservation released, reservation preempted) or Reservation Persistence (83h: bit 0 PTPL),
/// of one namespace or, with NSID FFFFFFFFh, of all.
fn set_reservation_feature(ctrl: &Controller, fid: u8, nsid: u32, cdw11: u32) -> Result<u32, Status> {
    let subsys = ctrl.subsystem().ok_or(Status::INVALID_FIELD.dnr())?;
    let namespaces: Vec<_> = match nsid {
        u32::MAX => subsys.namespaces.iter().collect(),
        _ => vec![subsys.ns(nsid).ok_or(Status::INVALID_NAMESPACE.dnr())?],
    };
    if fid == feat::RESERVATION_NOTIFICATION_MASK {
        if cdw11 & !0b1110 != 0 {
            return Err(Status::INVALID_FIELD.dnr());
        }
        ctrl.set_reservation_mask(namespaces.iter().map(|n| n.nsid), cdw11);
        return Ok(0);
    }
    if cdw11 & !1 != 0 {
        return Err(Status::INVALID_FIELD.dnr());
    }
    for ns in namespaces {
        ns.resv.set_ptpl(cdw11 & 1 != 0)?;
    }
    Ok(0)
}

fn get_features(ctrl: &Controller, sqe: &Sqe, data: &mut [u8]) -> Response {
    let fid = sqe.cdw10.get() as u8;
    let sel = (sqe.cdw10.get() >> 8) & 7;
    let reservation = matches!(fid, feat::RESERVATION_NOTIFICATION_MASK | feat::RESERVATION_PERSISTENCE);
    if sel == 3 {
        // Supported capabilities: nothing saveable; the reservation features are
        // namespace-specific (bit 1) and changeable (bit 2).
        return Response::result(if reservation { 0b110 } else { 0 });
    }
    if reservation {
        let subsys = ctrl.subsystem();
        let Some(ns) = subsys.as_deref().and_then(|s| s.ns(sqe.nsid.get())) else {
            return Response::status(Status::INVALID_NAMESPACE.dnr());
        };
        return Response::result(match fid {
            feat::RESERVATION_NOTIFICATION_MASK => ctrl.reservation_mask(ns.nsid).into(),
            _ => ns.resv.state().ptpl.into(),
        });
    }
    if fid == feat::HOST_IDENTIFIER {
        // Fabrics use the 128-bit host identifier only (EXHID must be set).
        if sqe.cdw11.get() & 1 == 0 || data.len() < 16 {
            return Response::status(Status::INVALID_FIELD.dnr());
        }
        data[..16].copy_from_slice(&ctrl.hostid);
        return Response::data(16);
    }
    match ctrl.get_feature(fid) {
        Ok(v) => Response::result(v.into()),
        Err(s) => Response::status(s),
    }
}
