//! The core driven as a transport would drive it: SQEs and data buffers in, responses out.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use p2pnvmf_nvmf::ana::{self, Groups};
use p2pnvmf_nvmf::wire::{ConnectData, DiscoveryLogEntry, DiscoveryLogHeader, Sqe, get_str, put_str, sgl};
use p2pnvmf_nvmf::{
    Backend, BackendQueue, DISCOVERY_NQN, DataPlan, Exec, IoDone, IoError, IoRequest, IoStats, Limits, Namespace, Op,
    Port, Queue, Reaping, Request, Response, Status, Subsystem, Target, TrType, TransportParams,
};
use p2pnvmf_p2p::mem::Window;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

/// Held operations: submitted, and released (true) by the test.
type Held = Arc<Mutex<Vec<(IoRequest, bool)>>>;

/// A namespace in memory; with `hold`, its queues keep every operation until the test
/// releases it (a backend whose completions come later and out of order).
#[derive(Debug)]
struct Mem(Mutex<Vec<u8>>, Option<Held>);

impl Mem {
    fn run(&self, req: &mut IoRequest) {
        let mut m = self.0.lock().unwrap();
        match (req.op, req.buf.as_mut()) {
            (Op::Read { offset, len }, Some(b)) => {
                b.bytes_mut()[..len].copy_from_slice(&m[offset as usize..offset as usize + len])
            }
            (Op::Write { offset, len }, Some(b)) => {
                m[offset as usize..offset as usize + len].copy_from_slice(&b.bytes()[..len])
            }
            (Op::WriteZeroes { offset, len } | Op::Deallocate { offset, len }, _) => {
                m[offset as usize..(offset + len) as usize].fill(0)
            }
            (Op::Flush, _) => {}
            (op, None) => panic!("{op:?} without a buffer"),
        }
    }
}

impl Backend for Mem {
    fn size_bytes(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn volatile_write_cache(&self) -> bool {
        true
    }
    fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }
    fn open_queue(self: Arc<Self>, _: usize, _: Reaping) -> Result<Box<dyn BackendQueue>, IoError> {
        let (held, hold) = match &self.1 {
            Some(h) => (h.clone(), true),
            None => (Held::default(), false),
        };
        Ok(Box::new(MemQueue { mem: self, held, hold }))
    }
}

/// A queue's side of `Mem`: inline, or holding operations until the test releases them.
#[derive(Debug)]
struct MemQueue {
    mem: Arc<Mem>,
    held: Held,
    hold: bool,
}

impl BackendQueue for MemQueue {
    fn submit(&mut self, mut req: IoRequest) -> Option<IoDone> {
        if self.hold {
            self.held.lock().unwrap().push((req, false));
            return None;
        }
        self.mem.run(&mut req);
        Some(req.done(Ok(())))
    }
    fn reap(&mut self, done: &mut dyn FnMut(IoDone)) {
        let mut held = self.held.lock().unwrap();
        let mut i = 0;
        while i < held.len() {
            if held[i].1 {
                let (mut req, _) = held.remove(i);
                self.mem.run(&mut req);
                done(req.done(Ok(())));
            } else {
                i += 1;
            }
        }
    }
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<()> {
        if self.held.lock().unwrap().iter().any(|h| h.1) { Poll::Ready(()) } else { Poll::Pending }
    }
    fn in_flight(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
const OTHER_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:99999999-2222-3333-4444-555555555555";
const OPEN: &str = "nqn.2026-11.io.p2pnvmf:open";
const LOCKED: &str = "nqn.2026-11.io.p2pnvmf:locked";
const PARAMS: TransportParams = TransportParams { ioccsz: 516, max_xfer: 1 << 20, msdbd: 1, keyed_sgls: false };

fn port(id: u16) -> Port {
    Port { id, trtype: TrType::Tcp, traddr: "10.0.0.1".into(), trsvcid: format!("{}", 4419 + id), params: PARAMS }
}

fn subsystem(nqn: &str, any: bool, ports: Option<Vec<u16>>) -> Arc<Subsystem> {
    let ns = Namespace::new(nqn, 1, Arc::new(Mem(Mutex::new(vec![0; 1 << 20]), None)));
    Arc::new(Subsystem {
        nqn: nqn.into(),
        serial: "SN1".into(),
        model: "model".into(),
        allow_any_host: any,
        hosts: vec![p2pnvmf_nvmf::Host::open(HOST)],
        ports,
        namespaces: vec![ns],
        cntlids: p2pnvmf_nvmf::subsystem::CNTLIDS,
        stats: IoStats::default(),
    })
}

fn target() -> Arc<Target> {
    Target::new(vec![subsystem(OPEN, true, None), subsystem(LOCKED, false, Some(vec![2]))], vec![port(1), port(2)])
}

fn sqe(opcode: u8) -> Sqe {
    let mut s = Sqe::new_zeroed();
    s.opcode = opcode;
    s.flags = 1 << 6;
    s.cid = 9.into();
    s.dptr.id = sgl::TRANSPORT_DATA_BLOCK;
    s
}

fn connect(q: &mut Queue, qid: u16, subnqn: &str, host: &str, cntlid: u16) -> Response {
    connect_with_id(q, qid, subnqn, host, [7; 16], cntlid)
}

fn connect_with_id(q: &mut Queue, qid: u16, subnqn: &str, host: &str, hostid: [u8; 16], cntlid: u16) -> Response {
    let mut s = sqe(0x7f);
    s.nsid = 1.into();
    s.cdw10 = (u32::from(qid) << 16).into();
    s.cdw11 = 31.into();
    s.cdw12 = 0.into();
    let mut d = ConnectData::new_zeroed();
    (d.cntlid, d.hostid) = (cntlid.into(), hostid);
    put_str(&mut d.subnqn, subnqn, 0);
    put_str(&mut d.hostnqn, host, 0);
    done(exec(q, &s, d.as_mut_bytes()))
}

/// Accepts and executes `s` with `data` as its buffer (copied into a window and back), as a
/// transport would: the SGL names `data`'s length unless the test set one.
fn exec(q: &mut Queue, s: &Sqe, data: &mut [u8]) -> Exec {
    let mut s = *s;
    if s.dptr.length.get() == 0 {
        s.dptr.length = (data.len() as u32).into();
    }
    let mut req = match q.accept(&s, 0) {
        Ok(req) => req,
        Err(status) => return Exec::Done(Request::answered(s, Response::status(status))),
    };
    let mut w = Window::host(data.len().max(1)).unwrap();
    w.bytes_mut()[..data.len()].copy_from_slice(data);
    req.buf = Some(w);
    // The CID as the tag: unique among a test's commands in flight, as a transport's tags are.
    let e = q.execute(s.cid.get(), req);
    if let Exec::Done(Request { buf: Some(w), .. }) = &e {
        data.copy_from_slice(&w.bytes()[..data.len()]);
    }
    e
}

/// Executes `s` under `tag` with `buf` as its buffer of `len` bytes, as a transport does once
/// the data is in; a buffer that comes back at once goes back into `buf`.
fn submit(q: &mut Queue, tag: u16, s: &Sqe, buf: &mut Option<Window>, len: usize) -> Exec {
    let plan = if len == 0 { DataPlan::None } else { DataPlan::Transport { len } };
    let mut e = q.execute(tag, Request { sqe: *s, plan, buf: buf.take(), ..Request::default() });
    if let Exec::Done(r) = &mut e {
        *buf = r.buf.take();
    }
    e
}

fn done(e: Exec) -> Response {
    match e {
        Exec::Done(r) => r.response,
        other => panic!("{other:?}"),
    }
}

fn prop_set(q: &mut Queue, off: u32, v: u32) -> Response {
    let mut s = sqe(0x7f);
    s.flags = 0;
    s.nsid = 0.into();
    s.cdw11 = off.into();
    s.cdw12 = v.into();
    done(exec(q, &s, &mut []))
}

fn prop_get(q: &mut Queue, off: u32, eight: bool) -> Response {
    let mut s = sqe(0x7f);
    s.flags = 0;
    s.nsid = 4.into();
    s.cdw10 = u32::from(eight).into();
    s.cdw11 = off.into();
    done(exec(q, &s, &mut []))
}

const CC_ENABLE: u32 = 1 | 6 << 16 | 4 << 20;

/// Admin queue connected to `subnqn` through port `p` and enabled.
fn admin(t: &Arc<Target>, p: u16, subnqn: &str) -> (Queue, u16) {
    let mut q = Queue::new(t.clone(), port(p));
    let r = connect(&mut q, 0, subnqn, HOST, 0xffff);
    assert_eq!(r.status, Status::SUCCESS);
    assert!(prop_set(&mut q, 0x14, CC_ENABLE).status.is_success());
    (q, r.result as u16)
}

fn io_queue(t: &Arc<Target>, cntlid: u16) -> Queue {
    let mut q = Queue::new(t.clone(), port(1));
    assert_eq!(connect(&mut q, 1, OPEN, HOST, cntlid).status, Status::SUCCESS);
    q
}

fn rw(opcode: u8, slba: u64, nlb: u32) -> Sqe {
    let mut s = sqe(opcode);
    s.nsid = 1.into();
    s.cdw10 = (slba as u32).into();
    s.cdw11 = ((slba >> 32) as u32).into();
    s.cdw12 = (nlb - 1).into();
    s
}

#[tokio::test]
async fn registers_follow_cc() {
    let t = target();
    let mut q = Queue::new(t.clone(), port(1));
    assert_eq!(prop_get(&mut q, 0, true).status, Status::COMMAND_SEQUENCE_ERROR.dnr());
    assert!(connect(&mut q, 0, OPEN, HOST, 0xffff).status.is_success());
    let cap = prop_get(&mut q, 0x00, true).result;
    assert_eq!(cap & 0xffff, 127, "MQES");
    assert_eq!(cap >> 37 & 1, 1, "CSS NVM");
    assert_eq!(prop_get(&mut q, 0x08, false).result, 0x10300);
    assert_eq!(prop_get(&mut q, 0x1c, false).result & 1, 0, "not ready before CC.EN");
    // Admin commands wait for CC.EN.
    assert_eq!(done(exec(&mut q, &sqe(0x18), &mut [])).status, Status::COMMAND_SEQUENCE_ERROR.dnr());
    prop_set(&mut q, 0x14, CC_ENABLE);
    assert_eq!(prop_get(&mut q, 0x1c, false).result, 1, "RDY");
    prop_set(&mut q, 0x14, CC_ENABLE | 1 << 14);
    assert_eq!(prop_get(&mut q, 0x1c, false).result >> 2 & 3, 2, "shutdown complete");
    assert_eq!(prop_get(&mut q, 0x30, false).status, Status::INVALID_FIELD.dnr());
    // Bad entry sizes make the enable fail with CFS.
    let (mut q2, _) = admin(&t, 1, OPEN);
    prop_set(&mut q2, 0x14, 0);
    prop_set(&mut q2, 0x14, 1 | 7 << 16 | 4 << 20);
    assert_eq!(prop_get(&mut q2, 0x1c, false).result, 2, "CFS");
}

#[tokio::test]
async fn connect_checks_hosts_ports_and_controllers() {
    let t = target();
    let mut q = Queue::new(t.clone(), port(2));
    assert_eq!(connect(&mut q, 0, LOCKED, OTHER_HOST, 0xffff).status, Status::CONNECT_INVALID_HOST.dnr());
    // LOCKED is only on port 2: through port 1 the NQN is unknown (IATTR 1, IPO 256).
    let mut q = Queue::new(t.clone(), port(1));
    let r = connect(&mut q, 0, LOCKED, HOST, 0xffff);
    assert_eq!((r.status, r.result), (Status::CONNECT_INVALID_PARAMETERS.dnr(), 0x1_0100));
    // Static controller IDs are not offered.
    let r = connect(&mut Queue::new(t.clone(), port(1)), 0, OPEN, HOST, 5);
    assert_eq!((r.status, r.result), (Status::CONNECT_INVALID_PARAMETERS.dnr(), 0x1_0010));
    let (_a, cntlid) = admin(&t, 1, OPEN);
    // I/O queue: wrong host, unknown cntlid, duplicate qid.
    let r = connect(&mut Queue::new(t.clone(), port(1)), 1, OPEN, OTHER_HOST, cntlid);
    assert_eq!(r.status, Status::CONNECT_INVALID_PARAMETERS.dnr());
    let r = connect(&mut Queue::new(t.clone(), port(1)), 1, OPEN, HOST, cntlid + 100);
    assert_eq!(r.status, Status::CONNECT_INVALID_PARAMETERS.dnr());
    // The host NQN is no secret: another Host Identifier (offset 0 of the data) is refused.
    let r = connect_with_id(&mut Queue::new(t.clone(), port(1)), 1, OPEN, HOST, [8; 16], cntlid);
    assert_eq!((r.status, r.result), (Status::CONNECT_INVALID_PARAMETERS.dnr(), 0x1_0000));
    let _io = io_queue(&t, cntlid);
    let r = connect(&mut Queue::new(t.clone(), port(1)), 1, OPEN, HOST, cntlid);
    assert_eq!((r.status, r.result), (Status::CONNECT_INVALID_PARAMETERS.dnr(), 42));
    // A second Connect on a connected queue.
    let mut io = Queue::new(t.clone(), port(1));
    assert!(connect(&mut io, 2, OPEN, HOST, cntlid).status.is_success());
    assert_eq!(connect(&mut io, 3, OPEN, HOST, cntlid).status, Status::COMMAND_SEQUENCE_ERROR.dnr());
    // Dropping the admin queue ends the association.
    drop(_a);
    assert!(t.controller(cntlid).is_none());
    assert_eq!(t.controller_count(), 0);
}

#[tokio::test]
async fn identify_controller_namespace_and_lists() {
    let t = target();
    let (mut q, cntlid) = admin(&t, 1, OPEN);
    let mut page = vec![0u8; 4096];
    let mut id = sqe(0x06);
    id.cdw10 = 1.into();
    assert_eq!(done(exec(&mut q, &id, &mut page)).data_len, 4096);
    assert_eq!(get_str(&page[4..24]), Some("SN1                 "));
    assert_eq!(u16::from_le_bytes([page[78], page[79]]), cntlid);
    assert_eq!(page[77], 8, "MDTS: 1 MiB in 4 KiB units");
    assert_eq!(page[111], 1, "I/O controller");
    assert_eq!(get_str(&page[768..1024]), Some(OPEN));
    assert_eq!(u32::from_le_bytes(page[1792..1796].try_into().unwrap()), 516);
    assert_eq!(u32::from_le_bytes(page[516..520].try_into().unwrap()), 1024, "NN: at least MNAN");
    assert_eq!(page[76], 0b1011, "CMIC: multi-port, multi-controller, ANA");
    id.cdw10 = 0.into();
    id.nsid = 1.into();
    done(exec(&mut q, &id, &mut page));
    assert_eq!(u64::from_le_bytes(page[..8].try_into().unwrap()), 2048, "NSZE in 512-byte blocks");
    assert_eq!(page[30], 1, "NMIC: shared, so a host puts every path's namespace under one head");
    let nguid = page[104..120].to_vec();
    assert_ne!(nguid, [0; 16], "the derived NGUID");
    assert_eq!(&page[120..128], &[0; 8], "no EUI-64 unless configured");
    id.nsid = 5.into();
    done(exec(&mut q, &id, &mut page));
    assert!(page.iter().all(|&b| b == 0), "an inactive NSID reads as zeroes");
    id.nsid = u32::MAX.into();
    assert_eq!(done(exec(&mut q, &id, &mut page)).status, Status::INVALID_NAMESPACE.dnr());
    id.cdw10 = 2.into();
    id.nsid = 0.into();
    done(exec(&mut q, &id, &mut page));
    assert_eq!(&page[..8], &[1, 0, 0, 0, 0, 0, 0, 0], "active list: NSID 1 only");
    id.cdw10 = 3.into();
    id.nsid = 1.into();
    done(exec(&mut q, &id, &mut page));
    assert_eq!((page[0], page[1], page[20], page[21], page[40]), (2, 16, 3, 16, 4));
    assert_eq!(&page[4..20], &nguid[..], "the same NGUID in both pages");
    assert_eq!(page[24 + 6] >> 4, 8, "UUID version");
    assert_eq!(&page[45..64], &[0; 19], "nothing after the CSI descriptor");
}

#[tokio::test]
async fn configured_identifiers_reach_identify_and_a_zero_one_is_not_reported() {
    let mut ns = Namespace::new(OPEN, 1, Arc::new(Mem(Mutex::new(vec![0; 1 << 20]), None)));
    let uuid = *b"\x91\xfd\xba\x0d\xf8\x7b\x4c\x25\xb8\x0f\xdb\x7b\xe1\x41\x8b\x9e";
    ns.ids = p2pnvmf_nvmf::NsIds { nguid: [0; 16], uuid, eui64: [0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77] };
    let subsys = Subsystem::open(OPEN, vec![ns]);
    let t = Target::new(vec![Arc::new(subsys)], vec![port(1)]);
    let (mut q, _) = admin(&t, 1, OPEN);
    let mut page = vec![0u8; 4096];
    let mut id = sqe(0x06);
    id.nsid = 1.into();
    done(exec(&mut q, &id, &mut page));
    assert_eq!(&page[104..120], &[0; 16], "NGUID zero: not reported");
    assert_eq!(&page[120..128], &[0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77], "EUI64");
    id.cdw10 = 3.into();
    done(exec(&mut q, &id, &mut page));
    // EUI-64 (type 1, 8 bytes), UUID (type 3), CSI (type 4); no NGUID descriptor.
    assert_eq!(&page[..4], &[1, 8, 0, 0]);
    assert_eq!(&page[4..12], &[0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]);
    assert_eq!(&page[12..16], &[3, 16, 0, 0]);
    assert_eq!(&page[16..32], &uuid);
    assert_eq!(&page[32..37], &[4, 1, 0, 0, 0]);
    assert!(page[37..].iter().all(|&b| b == 0));
}

#[tokio::test]
async fn discovery_log_lists_what_the_host_may_see() {
    let t = target();
    let mut q = Queue::new(t.clone(), port(1));
    assert!(connect(&mut q, 0, DISCOVERY_NQN, OTHER_HOST, 0xffff).status.is_success());
    prop_set(&mut q, 0x14, 1);
    let mut log = vec![0u8; 4096];
    let mut glp = sqe(0x02);
    glp.cdw10 = (0x70 | (1023u32 << 16)).into();
    done(exec(&mut q, &glp, &mut log));
    let h = DiscoveryLogHeader::read_from_bytes(&log[..1024]).unwrap();
    // OTHER_HOST may not use LOCKED: only OPEN on both ports.
    assert_eq!(h.numrec.get(), 2);
    for i in 0..2 {
        let e = DiscoveryLogEntry::read_from_bytes(&log[1024 * (i + 1)..1024 * (i + 2)]).unwrap();
        assert_eq!(get_str(&e.subnqn), Some(OPEN));
        assert_eq!(e.portid.get(), i as u16 + 1);
        assert_eq!(e.trtype, 3);
    }
    // Reading from an offset.
    let mut part = vec![0u8; 1024];
    glp.cdw10 = (0x70 | (255u32 << 16)).into();
    glp.cdw12 = 1024.into();
    done(exec(&mut q, &glp, &mut part));
    assert_eq!(&part[..], &log[1024..2048]);
    // The discovery controller has no namespaces or I/O pages.
    glp.cdw10 = (0x02 | (127u32 << 16)).into();
    glp.cdw12 = 0.into();
    assert_eq!(done(exec(&mut q, &glp, &mut part)).status, Status::INVALID_LOG_PAGE.dnr());
    // HOST also sees LOCKED on port 2.
    let mut q = Queue::new(t.clone(), port(1));
    connect(&mut q, 0, DISCOVERY_NQN, HOST, 0xffff);
    prop_set(&mut q, 0x14, 1);
    glp.cdw10 = (0x70 | (1023u32 << 16)).into();
    done(exec(&mut q, &glp, &mut log));
    assert_eq!(DiscoveryLogHeader::read_from_bytes(&log[..1024]).unwrap().numrec.get(), 3);
}

#[tokio::test]
async fn limits_are_refused_with_the_spec_status() {
    let lim = Limits { controllers_per_subsystem: 1, io_queues: 2, queue_entries: 64 };
    let t = Target::with(vec![subsystem(OPEN, true, None)], vec![port(1)], lim, Groups::new(|_| ana::State::Optimized));
    let (mut q, cntlid) = admin(&t, 1, OPEN);
    // One controller per subsystem: another host's Connect gets Controller Busy.
    let r = connect(&mut Queue::new(t.clone(), port(1)), 0, OPEN, OTHER_HOST, 0xffff);
    assert_eq!(r.status, Status::CONNECT_CONTROLLER_BUSY.dnr());
    // CAP.MQES says 64 entries; a queue of 65 is refused (SQSIZE at SQE byte 44).
    assert_eq!(prop_get(&mut q, 0, true).result & 0xffff, 63);
    let mut c = sqe(0x7f);
    (c.nsid, c.cdw10, c.cdw11) = (1.into(), (1u32 << 16).into(), 64.into());
    let mut d = ConnectData::new_zeroed();
    (d.cntlid, d.hostid) = (cntlid.into(), [7; 16]);
    put_str(&mut d.subnqn, OPEN, 0);
    put_str(&mut d.hostnqn, HOST, 0);
    let r = done(exec(&mut Queue::new(t.clone(), port(1)), &c, d.as_mut_bytes()));
    assert_eq!((r.status, r.result), (Status::CONNECT_INVALID_PARAMETERS.dnr(), 44));
    // Two I/O queues at most, whatever the host asks for.
    let mut set = sqe(0x09);
    (set.cdw10, set.cdw11) = (0x07.into(), (7 | 7 << 16).into());
    assert_eq!(done(exec(&mut q, &set, &mut [])).result, 1 | 1 << 16);
    let _q1 = io_queue(&t, cntlid);
    let mut q2 = Queue::new(t.clone(), port(1));
    assert!(connect(&mut q2, 2, OPEN, HOST, cntlid).status.is_success());
    let r = connect(&mut Queue::new(t.clone(), port(1)), 3, OPEN, HOST, cntlid);
    assert_eq!((r.status, r.result), (Status::CONNECT_INVALID_PARAMETERS.dnr(), 42));
}

#[tokio::test]
async fn features_and_async_events() {
    let t = target();
    let (mut q, _) = admin(&t, 1, OPEN);
    let mut set = sqe(0x09);
    set.cdw10 = 0x07.into();
    set.cdw11 = (200 | 200 << 16).into();
    assert_eq!(done(exec(&mut q, &set, &mut [])).result, 63 | 63 << 16, "queues capped at 64");
    set.cdw10 = 0x0f.into();
    set.cdw11 = 15000.into();
    assert!(done(exec(&mut q, &set, &mut [])).status.is_success());
    let mut get = sqe(0x0a);
    get.cdw10 = 0x0f.into();
    assert_eq!(done(exec(&mut q, &get, &mut [])).result, 15000);
    set.cdw10 = (0x0f | 1 << 31).into();
    assert_eq!(done(exec(&mut q, &set, &mut [])).status, Status::FEATURE_NOT_SAVEABLE.dnr());
    set.cdw10 = 0x81.into();
    assert_eq!(done(exec(&mut q, &set, &mut [])).status, Status::COMMAND_SEQUENCE_ERROR.dnr());
    let mut hostid = [0u8; 16];
    get.cdw10 = 0x81.into();
    get.cdw11 = 1.into();
    assert_eq!(done(exec(&mut q, &get, &mut hostid)).data_len, 16);
    get.cdw10 = 0x42.into();
    assert_eq!(done(exec(&mut q, &get, &mut [])).status, Status::INVALID_FIELD.dnr());
    // AERL 3: four requests are held, the fifth is refused.
    for cid in 0..4 {
        let mut aer = sqe(0x0c);
        aer.cid = cid.into();
        assert!(matches!(exec(&mut q, &aer, &mut []), Exec::Submitted));
    }
    assert_eq!(done(exec(&mut q, &sqe(0x0c), &mut [])).status, Status::ASYNC_EVENT_LIMIT_EXCEEDED.dnr());
}

#[tokio::test]
async fn io_commands_and_their_errors() {
    let t = target();
    let (_a, cntlid) = admin(&t, 1, OPEN);
    let mut q = io_queue(&t, cntlid);
    let pattern: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    let mut buf = pattern.clone();
    assert!(done(exec(&mut q, &rw(0x01, 8, 8), &mut buf)).status.is_success());
    let mut back = vec![0u8; 4096];
    assert_eq!(done(exec(&mut q, &rw(0x02, 8, 8), &mut back)).data_len, 4096);
    assert_eq!(back, pattern);
    assert!(done(exec(&mut q, &rw(0x05, 8, 8), &mut buf)).status.is_success(), "compare equal");
    buf[100] ^= 1;
    assert_eq!(done(exec(&mut q, &rw(0x05, 8, 8), &mut buf)).status, Status::COMPARE_FAILURE.dnr());
    assert!(done(exec(&mut q, &rw(0x08, 8, 1), &mut [])).status.is_success(), "write zeroes");
    done(exec(&mut q, &rw(0x02, 8, 8), &mut back));
    assert!(back[..512].iter().all(|&b| b == 0) && back[512..] == pattern[512..]);
    // Dataset Management deallocate of blocks 9..16.
    let mut range = [0u8; 16];
    range[4..8].copy_from_slice(&7u32.to_le_bytes());
    range[8..16].copy_from_slice(&9u64.to_le_bytes());
    let mut dsm = rw(0x09, 0, 1);
    dsm.cdw10 = 0.into();
    dsm.cdw11 = (1 << 2).into();
    assert!(done(exec(&mut q, &dsm, &mut range)).status.is_success());
    done(exec(&mut q, &rw(0x02, 8, 8), &mut back));
    assert!(back.iter().all(|&b| b == 0));
    // An out-of-range DSM range changes nothing.
    range[8..16].copy_from_slice(&2047u64.to_le_bytes());
    assert_eq!(done(exec(&mut q, &dsm, &mut range)).status, Status::LBA_OUT_OF_RANGE.dnr());
    // Errors.
    assert_eq!(done(exec(&mut q, &rw(0x02, 2047, 2), &mut back[..1024])).status, Status::LBA_OUT_OF_RANGE.dnr());
    assert_eq!(done(exec(&mut q, &rw(0x02, u64::MAX, 1), &mut back[..512])).status, Status::LBA_OUT_OF_RANGE.dnr());
    assert_eq!(done(exec(&mut q, &rw(0x02, 0, 8), &mut back[..512])).status, Status::DATA_SGL_LENGTH_INVALID.dnr());
    let mut bad_ns = rw(0x02, 0, 1);
    bad_ns.nsid = 2.into();
    assert_eq!(done(exec(&mut q, &bad_ns, &mut back[..512])).status, Status::INVALID_NAMESPACE.dnr());
    assert_eq!(done(exec(&mut q, &rw(0x06, 0, 1), &mut [])).status, Status::INVALID_OPCODE.dnr());
    let mut flush_all = rw(0x00, 0, 1);
    flush_all.nsid = u32::MAX.into();
    assert!(done(exec(&mut q, &flush_all, &mut [])).status.is_success());
    // PRPs are not allowed on fabrics.
    let mut prp = rw(0x02, 0, 1);
    prp.flags = 0;
    assert_eq!(done(exec(&mut q, &prp, &mut back[..512])).status, Status::INVALID_FIELD.dnr());
    // SMART counts what went through.
    let mut smart = vec![0u8; 512];
    let mut glp = sqe(0x02);
    glp.cdw10 = (0x02 | (127u32 << 16)).into();
    let mut a = _a;
    done(exec(&mut a, &glp, &mut smart));
    assert_eq!(u128::from_le_bytes(smart[80..96].try_into().unwrap()), 1, "host write commands");
    assert_eq!(u128::from_le_bytes(smart[64..80].try_into().unwrap()), 3, "host read commands (compares not counted)");
}

#[tokio::test(start_paused = true)]
async fn keep_alive_timeout_tears_the_controller_down() {
    let t = target();
    let mut q = Queue::new(t.clone(), port(1));
    let mut s = sqe(0x7f);
    s.nsid = 1.into();
    s.cdw11 = 31.into();
    s.cdw12 = 1000.into(); // KATO 1 s
    let mut d = ConnectData::new_zeroed();
    d.cntlid = 0xffff.into();
    put_str(&mut d.subnqn, OPEN, 0);
    put_str(&mut d.hostnqn, HOST, 0);
    let cntlid = done(exec(&mut q, &s, d.as_mut_bytes())).result as u16;
    prop_set(&mut q, 0x14, CC_ENABLE);
    let ctrl = t.controller(cntlid).unwrap();
    let mut dead = ctrl.watch_dead();
    // Keep Alive every 500 ms keeps it up.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(done(exec(&mut q, &sqe(0x18), &mut [])).status.is_success());
    }
    assert!(ctrl.dead_reason().is_none());
    // Silence past KATO ends it.
    tokio::time::timeout(Duration::from_secs(3), dead.wait_for(|r| r.is_some())).await.unwrap().unwrap();
    assert_eq!(ctrl.dead_reason(), Some("keep-alive timeout"));
    tokio::task::yield_now().await;
    assert!(t.controller(cntlid).is_none());
}

#[tokio::test]
async fn reconfiguration_notifies_discovery_controllers() {
    let t = target();
    let mut disc = Queue::new(t.clone(), port(1));
    connect(&mut disc, 0, DISCOVERY_NQN, HOST, 0xffff);
    prop_set(&mut disc, 0x14, 1);
    // Enable discovery log change notices (AEC bit 31) and post one request.
    let mut set = sqe(0x09);
    set.cdw10 = 0x0b.into();
    set.cdw11 = (1u32 << 31).into();
    assert!(done(exec(&mut disc, &set, &mut [])).status.is_success());
    let mut aer = sqe(0x0c);
    aer.cid = 77.into();
    assert!(matches!(exec(&mut disc, &aer, &mut []), Exec::Submitted));
    let (_open, open_id) = admin(&t, 1, OPEN);
    let gen_before = t.generation();
    // OPEN goes away, a new subsystem comes: the held request completes through the queue.
    t.reconfigure(vec![subsystem(LOCKED, false, Some(vec![2])), subsystem("nqn.2026-11.io.p2pnvmf:new", true, None)]);
    assert_eq!(t.generation(), gen_before + 1);
    tokio::time::timeout(Duration::from_secs(1), disc.io_ready()).await.expect("woken by the event");
    let mut got = Vec::new();
    disc.reap(&mut |c| got.push((c.tag, c.req.response.result)));
    assert_eq!(got, [(77, 0x70_f002)]);
    assert!(t.controller(open_id).is_none(), "controller of a removed subsystem is torn down");
    // A later change with no request held is kept until the host posts one.
    t.reconfigure(t.subsystems());
    assert_eq!(done(exec(&mut disc, &aer, &mut [])).result, 0x70_f002);
    // A controller that did not enable the notice gets none.
    let mut quiet = Queue::new(t.clone(), port(1));
    connect(&mut quiet, 0, DISCOVERY_NQN, HOST, 0xffff);
    prop_set(&mut quiet, 0x14, 1);
    t.reconfigure(t.subsystems());
    assert!(matches!(exec(&mut quiet, &aer, &mut []), Exec::Submitted));
    let mut got = Vec::new();
    quiet.reap(&mut |c| got.push(c.tag));
    assert!(got.is_empty());
}

#[tokio::test]
async fn submitted_commands_complete_out_of_order_with_their_windows() {
    let held = Held::default();
    let ns = Namespace::new(OPEN, 1, Arc::new(Mem(Mutex::new(vec![0; 1 << 20]), Some(held.clone()))));
    let subsys = Subsystem::open(OPEN, vec![ns]);
    let t = Target::new(vec![Arc::new(subsys)], vec![port(1)]);
    let (_a, cntlid) = admin(&t, 1, OPEN);
    let mut q = io_queue(&t, cntlid);
    // Three writes of different patterns, all in flight at once.
    let mut bufs: Vec<Option<Window>> = Vec::new();
    for tag in 0..3u16 {
        let mut w = Window::host(4096).unwrap();
        w.bytes_mut().fill(0x10 + tag as u8);
        let mut b = Some(w);
        assert!(matches!(submit(&mut q, tag, &rw(0x01, u64::from(tag) * 8, 8), &mut b, 4096), Exec::Submitted));
        assert!(b.is_none(), "the submitted command holds its window");
        bufs.push(b);
    }
    assert_eq!(q.in_flight(), 3);
    // A tag still in flight is refused, not overwritten.
    let mut dup = Some(Window::host(4096).unwrap());
    assert_eq!(done(submit(&mut q, 1, &rw(0x02, 0, 8), &mut dup, 4096)).status, Status::INTERNAL_ERROR);
    let mut reaped = Vec::new();
    q.reap(&mut |c| reaped.push(c.tag));
    assert!(reaped.is_empty(), "nothing finished yet");
    // The backend finishes 2, then 0, then 1: completions follow that order.
    for tag in [2u16, 0, 1] {
        held.lock().unwrap().iter_mut().find(|(r, _)| r.tag == tag).unwrap().1 = true;
        tokio::time::timeout(Duration::from_secs(1), q.io_ready()).await.expect("ready once released");
        q.reap(&mut |c| {
            assert!(c.req.response.status.is_success());
            assert_eq!(c.req.buf.as_ref().map(Window::len), Some(4096), "the window comes back");
            bufs[usize::from(c.tag)] = c.req.buf;
            reaped.push(c.tag);
        });
    }
    assert_eq!(reaped, [2, 0, 1]);
    assert_eq!(q.in_flight(), 0);
    // Read back the three blocks in one command.
    let mut back = Some(Window::host(3 * 4096).unwrap());
    assert!(matches!(submit(&mut q, 7, &rw(0x02, 0, 24), &mut back, 3 * 4096), Exec::Submitted));
    held.lock().unwrap()[0].1 = true;
    let mut got = None;
    q.reap(&mut |c| got = Some(c));
    let c = got.unwrap();
    assert_eq!((c.tag, c.req.response.data_len), (7, 3 * 4096));
    let data = c.req.buf.unwrap();
    assert!(data.bytes().chunks(4096).enumerate().all(|(i, b)| b.iter().all(|&x| x == 0x10 + i as u8)));
}

/// Authentication Send (0x05) or Receive (0x06) of DH-HMAC-CHAP with TL/AL `len`.
fn auth_cmd(fctype: u32, len: usize) -> Sqe {
    let mut s = sqe(0x7f);
    s.nsid = fctype.into();
    s.cdw10 = (0xe9 << 24 | 1 << 16 | 1 << 8).into();
    s.cdw11 = (len as u32).into();
    s
}

#[tokio::test]
async fn a_host_with_a_key_must_authenticate_every_queue_first() {
    const KEY: &str = "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:";
    let keyed = p2pnvmf_nvmf::Host {
        key: Some(p2pnvmf_nvmf::auth::Secret::parse(KEY).unwrap()),
        ..p2pnvmf_nvmf::Host::open(HOST)
    };
    let ns = Namespace::new(LOCKED, 1, Arc::new(Mem(Mutex::new(vec![0; 1 << 20]), None)));
    let s = Subsystem { hosts: vec![keyed], allow_any_host: false, ..Subsystem::open(LOCKED, vec![ns]) };
    let t = Target::new(vec![Arc::new(s)], vec![port(1)]);
    let mut q = Queue::new(t.clone(), port(1));
    let r = connect(&mut q, 0, LOCKED, HOST, 0xffff);
    assert!(r.status.is_success());
    assert_eq!(r.result >> 16 & 0x2, 0x2, "AUTHREQ.ATR set");
    let cntlid = r.result as u16;
    // Nothing but authentication runs before it succeeds: not even Property Get.
    assert_eq!(prop_get(&mut q, 0x08, false).status, Status::AUTHENTICATION_REQUIRED.dnr());
    assert_eq!(prop_set(&mut q, 0x14, CC_ENABLE).status, Status::AUTHENTICATION_REQUIRED.dnr());
    assert_eq!(done(exec(&mut q, &sqe(0x06), &mut [0; 4096])).status, Status::AUTHENTICATION_REQUIRED.dnr());
    // Wrong security protocol and a TL that is not the data's length.
    let mut bad = auth_cmd(5, 8);
    bad.cdw10 = (0xea << 24 | 1 << 16 | 1 << 8).into();
    assert_eq!(done(exec(&mut q, &bad, &mut [0; 8])).status, Status::INVALID_FIELD.dnr());
    assert_eq!(done(exec(&mut q, &auth_cmd(5, 9), &mut [0; 8])).status, Status::DATA_SGL_LENGTH_INVALID.dnr());
    // Negotiate (SHA-256, NULL group), then the challenge.
    let mut neg = vec![0u8; 72];
    neg[4] = 1; // t_id
    neg[7] = 1; // napd
    neg[8] = 1; // authid DH-HMAC-CHAP
    (neg[10], neg[11], neg[12]) = (1, 1, 1); // halen, dhlen, SHA-256; DH group 0 at idlist[30]
    assert!(done(exec(&mut q, &auth_cmd(5, 72), &mut neg)).status.is_success());
    let mut chal = [0u8; 128];
    let r = done(exec(&mut q, &auth_cmd(6, 128), &mut chal));
    assert!(r.status.is_success());
    assert_eq!((chal[0], chal[1], chal[6], chal[8], chal[9]), (1, 0x01, 32, 1, 0), "challenge, hl 32, SHA-256, NULL");
    // A reply with a response that is not HMAC(key, C1 ...): Failure1, and the controller goes.
    let mut reply = vec![0u8; 16 + 64];
    (reply[0], reply[1], reply[4], reply[6]) = (1, 0x02, 1, 32);
    assert!(done(exec(&mut q, &auth_cmd(5, reply.len()), &mut reply)).status.is_success());
    assert!(t.controller(cntlid).unwrap().dead_reason().is_none());
    let mut fail = [0u8; 64];
    assert!(done(exec(&mut q, &auth_cmd(6, 64), &mut fail)).status.is_success());
    assert_eq!(fail[..8], [0, 0xf1, 0, 0, 1, 0, 1, 1], "Failure1: authentication failure, failed");
    assert_eq!(t.controller(cntlid).and_then(|c| c.dead_reason()), Some("authentication failed"));
    // Hosts without a key on the other subsystem are not asked to authenticate.
    let t = target();
    let r = connect(&mut Queue::new(t.clone(), port(2)), 0, LOCKED, HOST, 0xffff);
    assert_eq!(r.result >> 16, 0);
    let (mut q, _) = admin(&t, 1, OPEN);
    assert_eq!(done(exec(&mut q, &auth_cmd(5, 72), &mut neg)).status, Status::COMMAND_SEQUENCE_ERROR.dnr());
}

/// Get Log Page `lid`, 4 KiB.
fn log_page(q: &mut Queue, lid: u32) -> Vec<u8> {
    let mut s = sqe(0x02);
    s.cdw10 = (lid | 1023 << 16).into();
    let mut page = vec![0u8; 4096];
    assert!(done(exec(q, &s, &mut page)).status.is_success());
    page
}

#[tokio::test]
async fn reconfiguration_reaches_connected_controllers() {
    let held = Held::default();
    let ns1 = Namespace::new(OPEN, 1, Arc::new(Mem(Mutex::new(vec![0; 1 << 20]), Some(held.clone()))));
    let t = Target::new(vec![Arc::new(Subsystem::open(OPEN, vec![ns1.clone()]))], vec![port(1)]);
    let (mut a, cntlid) = admin(&t, 1, OPEN);
    // Enable Namespace Attribute Notices (AEC bit 8) and post a request.
    let mut set = sqe(0x09);
    (set.cdw10, set.cdw11) = (0x0b.into(), (1u32 << 8).into());
    assert!(done(exec(&mut a, &set, &mut [])).status.is_success());
    let mut aer = sqe(0x0c);
    aer.cid = 5.into();
    assert!(matches!(exec(&mut a, &aer, &mut []), Exec::Submitted));
    let mut q = io_queue(&t, cntlid);
    // A write to NSID 1 stays in flight across the reload.
    let mut w = Some(Window::host(4096).unwrap());
    w.as_mut().unwrap().bytes_mut().fill(0x5a);
    assert!(matches!(submit(&mut q, 0, &rw(0x01, 0, 8), &mut w, 4096), Exec::Submitted));

    // NSID 1 goes, NSID 2 comes.
    let ns2 = Namespace::new(OPEN, 2, Arc::new(Mem(Mutex::new(vec![0; 1 << 20]), None)));
    t.reconfigure(vec![Arc::new(Subsystem::open(OPEN, vec![ns2]))]);
    let c = t.controller(cntlid).expect("the controller stays");
    let mut got = Vec::new();
    a.reap(&mut |c| got.push((c.tag, c.req.response.result)));
    assert_eq!(got, [(5, 0x04_0002)], "Namespace Attribute Changed, log page 04h");
    let list = log_page(&mut a, 0x04);
    assert_eq!(list[..12], [1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0], "Changed Namespace List: 1 and 2");
    assert!(log_page(&mut a, 0x04).iter().all(|&b| b == 0), "reading the log clears it");
    let mut ident = sqe(0x06);
    ident.cdw10 = 2.into();
    let mut ids = vec![0u8; 4096];
    done(exec(&mut a, &ident, &mut ids));
    assert_eq!(ids[..8], [2, 0, 0, 0, 0, 0, 0, 0], "active namespace list");

    // The write in flight finishes and completes; later commands for NSID 1 are refused.
    held.lock().unwrap()[0].1 = true;
    tokio::time::timeout(Duration::from_secs(1), q.io_ready()).await.expect("ready once released");
    let mut statuses = Vec::new();
    q.reap(&mut |c| statuses.push(c.req.response.status));
    assert_eq!(statuses, [Status::SUCCESS]);
    let mut r = Some(Window::host(4096).unwrap());
    assert_eq!(done(submit(&mut q, 1, &rw(0x02, 0, 8), &mut r, 4096)).status, Status::INVALID_NAMESPACE.dnr());
    let mut r2 = rw(0x02, 0, 8);
    r2.nsid = 2.into();
    assert!(done(submit(&mut q, 2, &r2, &mut r, 4096)).status.is_success(), "NSID 2 serves on the same queue");
    assert_eq!(q.in_flight(), 0);

    // An unchanged reload raises nothing; a host no longer allowed is disconnected.
    t.reconfigure(t.subsystems());
    assert!(c.take_async_completions().is_empty());
    let mut locked = Subsystem::open(OPEN, Vec::new());
    (locked.allow_any_host, locked.hosts) = (false, vec![p2pnvmf_nvmf::Host::open(OTHER_HOST)]);
    t.reconfigure(vec![Arc::new(locked)]);
    assert!(t.controller(cntlid).is_none());
    assert_eq!(c.dead_reason(), Some("controller removed"));
}

#[tokio::test]
async fn a_subsystem_taken_away_by_a_reload_is_refused_without_do_not_retry_until_it_is_back() {
    let t = target();
    let (_a, _) = admin(&t, 1, OPEN);
    let dnr = |r: &Response| r.status == Status::CONNECT_INVALID_PARAMETERS.dnr();
    let retry = |r: &Response| r.status == Status::CONNECT_INVALID_PARAMETERS.without_dnr();
    // Never served: Do Not Retry, pointing at the subsystem NQN (IATTR 1, offset 256).
    let r = connect(&mut Queue::new(t.clone(), port(1)), 0, "nqn.2026-12.io.p2pnvmf:never", HOST, 0xffff);
    assert!(dnr(&r) && r.result == 0x1_0100, "{r:?}");
    // OPEN torn down: its host's reconnects are told to try again, at the same parameter.
    t.reconfigure(vec![subsystem(LOCKED, false, Some(vec![2]))]);
    let r = connect(&mut Queue::new(t.clone(), port(1)), 0, OPEN, HOST, 0xffff);
    assert!(retry(&r) && r.result == 0x1_0100, "{r:?}");
    // Set up again: served. A subsystem served, just not on this port, is refused for good.
    t.reconfigure(vec![subsystem(OPEN, true, None), subsystem(LOCKED, false, Some(vec![2]))]);
    assert!(connect(&mut Queue::new(t.clone(), port(1)), 0, OPEN, HOST, 0xffff).status.is_success());
    assert!(dnr(&connect(&mut Queue::new(t.clone(), port(1)), 0, LOCKED, HOST, 0xffff)));
}

/// A namespace whose queues take a while to open (as an SSD's queue pair does, by admin
/// commands), then serve from `Mem`; with `fail`, the opening fails with its error instead.
#[derive(Debug)]
struct SlowOpen {
    mem: Arc<Mem>,
    fail: Option<fn() -> IoError>,
}

const OPENING: Duration = Duration::from_millis(300);

impl Backend for SlowOpen {
    fn size_bytes(&self) -> u64 {
        self.mem.size_bytes()
    }
    fn volatile_write_cache(&self) -> bool {
        true
    }
    fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }
    fn open_queue(self: Arc<Self>, depth: usize, reaping: Reaping) -> Result<Box<dyn BackendQueue>, IoError> {
        std::thread::sleep(OPENING);
        if let Some(fail) = self.fail {
            return Err(fail());
        }
        self.mem.clone().open_queue(depth, reaping)
    }
    fn opens_slowly(&self) -> bool {
        true
    }
}

#[tokio::test]
async fn a_slowly_opening_backend_queue_opens_off_the_queue_task_while_its_first_command_waits() {
    let no_pair: fn() -> IoError = || IoError::Unavailable("every granted I/O queue pair is in use".into());
    let no_space: fn() -> IoError = || IoError::errno(28);
    // The waiting write's status: success, or the opening's failure with its errno's meaning.
    for (fail, want) in [
        (None, Status::SUCCESS),
        (Some(no_pair), Status::NAMESPACE_NOT_READY),
        (Some(no_space), Status::CAPACITY_EXCEEDED.dnr()),
    ] {
        let mem = Arc::new(Mem(Mutex::new(vec![0; 1 << 20]), None));
        let ns = Namespace::new(OPEN, 1, Arc::new(SlowOpen { mem, fail }));
        let t = Target::new(vec![Arc::new(Subsystem::open(OPEN, vec![ns]))], vec![port(1)]);
        let (_a, cntlid) = admin(&t, 1, OPEN);
        let mut q = io_queue(&t, cntlid);
        let mut w = Window::host(4096).unwrap();
        w.bytes_mut().fill(0x6b);
        let mut b = Some(w);
        // On this single-threaded runtime an opening on the queue's task would hold it for
        // the whole opening; the write is submitted at once instead, and waits for the queue.
        let started = std::time::Instant::now();
        assert!(matches!(submit(&mut q, 0, &rw(0x01, 8, 8), &mut b, 4096), Exec::Submitted));
        assert!(started.elapsed() < OPENING / 2, "execute waited {:?} for the opening", started.elapsed());
        assert_eq!(q.in_flight(), 1, "the waiting write counts as in flight");
        tokio::time::timeout(Duration::from_secs(5), q.io_ready()).await.expect("ready once opened");
        let mut got = Vec::new();
        q.reap(&mut |c| got.push((c.tag, c.req.response.status)));
        assert_eq!(got, [(0, want)]);
        assert_eq!(q.in_flight(), 0);
        if fail.is_none() {
            // The queue is open: a read runs inline and finds the write.
            let mut r = Some(Window::host(4096).unwrap());
            let resp = done(submit(&mut q, 1, &rw(0x02, 8, 8), &mut r, 4096));
            assert!(resp.status.is_success());
            assert!(r.unwrap().bytes().iter().all(|&x| x == 0x6b));
        }
    }
}

const HOST_A_ID: [u8; 16] = [7; 16];
const HOST_B_ID: [u8; 16] = [9; 16];

/// A connected and enabled admin queue and an I/O queue of host `hostnqn`/`hostid` on `OPEN`.
fn host_queues(t: &Arc<Target>, hostnqn: &str, hostid: [u8; 16]) -> (Queue, Queue) {
    let mut a = Queue::new(t.clone(), port(1));
    let r = connect_with_id(&mut a, 0, OPEN, hostnqn, hostid, 0xffff);
    assert!(r.status.is_success());
    assert!(prop_set(&mut a, 0x14, CC_ENABLE).status.is_success());
    let mut io = Queue::new(t.clone(), port(1));
    assert!(connect_with_id(&mut io, 1, OPEN, hostnqn, hostid, r.result as u16).status.is_success());
    (a, io)
}

/// A reservation command (Register 0Dh, Acquire 11h, Release 15h) on namespace 1 with its keys.
fn resv(q: &mut Queue, opcode: u8, cdw10: u32, keys: &[u64]) -> Exec {
    let mut s = sqe(opcode);
    s.nsid = 1.into();
    s.cdw10 = cdw10.into();
    let mut data: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
    exec(q, &s, &mut data)
}

/// Reservation Report (extended): (generation, type, registrants' (key, holds)).
fn resv_report(q: &mut Queue) -> (u32, u8, Vec<(u64, bool)>) {
    let mut s = sqe(0x0e);
    s.nsid = 1.into();
    s.cdw10 = 1023.into();
    s.cdw11 = 1.into();
    let mut page = vec![0u8; 4096];
    assert_eq!(done(exec(q, &s, &mut page)).data_len, 4096);
    let n = u16::from_le_bytes([page[5], page[6]]) as usize;
    let regs = (0..n)
        .map(|i| (u64::from_le_bytes(page[72 + i * 64..80 + i * 64].try_into().unwrap()), page[66 + i * 64] == 1));
    (u32::from_le_bytes(page[..4].try_into().unwrap()), page[4], regs.collect())
}

#[tokio::test]
async fn a_reservation_fences_the_other_host_and_tells_it_what_changed() {
    let t = target();
    let (mut a_admin, mut a) = host_queues(&t, HOST, HOST_A_ID);
    let (_b_admin, mut b) = host_queues(&t, OTHER_HOST, HOST_B_ID);
    let conflict = Status::RESERVATION_CONFLICT.dnr();
    let mut block = vec![0x5a; 512];
    // Identify: reservations in ONCS, every type in RESCAP, no PTPL without a state directory.
    let mut id = vec![0u8; 4096];
    let mut ident = sqe(0x06);
    ident.cdw10 = 1.into();
    done(exec(&mut a_admin, &ident, &mut id));
    assert_ne!(u16::from_le_bytes([id[520], id[521]]) & 1 << 5, 0, "ONCS reservations");
    (ident.cdw10, ident.nsid) = (0.into(), 1.into());
    done(exec(&mut a_admin, &ident, &mut id));
    assert_eq!(id[31], 0xfe, "RESCAP");

    assert!(done(resv(&mut a, 0x0d, 0, &[0, 1])).status.is_success());
    assert!(done(resv(&mut b, 0x0d, 0, &[0, 2])).status.is_success());
    assert_eq!(done(resv(&mut b, 0x0d, 0, &[0, 3])).status, conflict, "registered with another key");
    // A takes Write Exclusive: B may read, not write; A may do both.
    assert!(done(resv(&mut a, 0x11, 1 << 8, &[1, 0])).status.is_success());
    assert_eq!(done(exec(&mut b, &rw(0x01, 0, 1), &mut block)).status, conflict);
    assert_eq!(done(exec(&mut b, &rw(0x08, 0, 1), &mut [])).status, conflict, "write zeroes");
    assert!(done(exec(&mut b, &rw(0x02, 0, 1), &mut block)).status.is_success());
    assert!(done(exec(&mut a, &rw(0x01, 0, 1), &mut block)).status.is_success());
    assert_eq!(resv_report(&mut b), (2, 1, vec![(1, true), (2, false)]));
    // A waits for events; B preempts A into Exclusive Access.
    let mut aer = sqe(0x0c);
    aer.cid = 40.into();
    assert!(matches!(exec(&mut a_admin, &aer, &mut []), Exec::Submitted));
    assert!(done(resv(&mut b, 0x11, 1 | 2 << 8, &[2, 1])).status.is_success());
    assert_eq!(resv_report(&mut a), (3, 2, vec![(2, true)]));
    assert_eq!(done(exec(&mut a, &rw(0x02, 0, 1), &mut block)).status, conflict, "A may not even read now");
    // A's host hears of it: the event, then the log page says what happened and to which namespace.
    tokio::time::timeout(Duration::from_secs(1), a_admin.io_ready()).await.expect("an event");
    let mut events = Vec::new();
    a_admin.reap(&mut |c| events.push((c.tag, c.req.response.result)));
    assert_eq!(events, [(40, 0x0080_0006)]);
    let page = log_page(&mut a_admin, 0x80);
    assert_eq!((u64::from_le_bytes(page[..8].try_into().unwrap()), page[8], page[9]), (1, 1, 0));
    assert_eq!(u32::from_le_bytes(page[12..16].try_into().unwrap()), 1);
    assert!(log_page(&mut a_admin, 0x80)[..64].iter().all(|&b| b == 0), "read once");
    // Features: the notification mask per namespace; PTPL needs a state directory.
    let mut set = sqe(0x09);
    (set.cdw10, set.nsid, set.cdw11) = (0x82.into(), 1.into(), 0b0010.into());
    assert!(done(exec(&mut a_admin, &set, &mut [])).status.is_success());
    set.cdw11 = 1.into();
    assert_eq!(done(exec(&mut a_admin, &set, &mut [])).status, Status::INVALID_FIELD.dnr());
    let mut get = sqe(0x0a);
    (get.cdw10, get.nsid) = (0x82.into(), 1.into());
    assert_eq!(done(exec(&mut a_admin, &get, &mut [])).result, 0b0010);
    (set.cdw10, set.cdw11) = (0x83.into(), 1.into());
    assert_eq!(done(exec(&mut a_admin, &set, &mut [])).status, Status::INVALID_FIELD.dnr());
    get.nsid = 5.into();
    assert_eq!(done(exec(&mut a_admin, &get, &mut [])).status, Status::INVALID_NAMESPACE.dnr());
    // With registration-preempted notices masked, a preemption leaves no entry.
    assert!(done(resv(&mut a, 0x0d, 0, &[0, 1])).status.is_success());
    assert!(done(resv(&mut b, 0x11, 1 | 2 << 8, &[2, 1])).status.is_success());
    assert!(log_page(&mut a_admin, 0x80)[..64].iter().all(|&b| b == 0), "masked");
    // Clear by B: A is no longer registered, so no notice; every host may write again.
    assert!(done(resv(&mut b, 0x15, 1, &[2])).status.is_success());
    assert_eq!(resv_report(&mut a), (6, 0, vec![]));
    assert!(done(exec(&mut a, &rw(0x01, 0, 1), &mut block)).status.is_success());
}

#[tokio::test]
async fn preempt_and_abort_completes_after_the_preempted_hosts_commands_in_flight() {
    let held = Held::default();
    let ns = Namespace::new(OPEN, 1, Arc::new(Mem(Mutex::new(vec![0; 1 << 20]), Some(held.clone()))));
    let t = Target::new(vec![Arc::new(Subsystem::open(OPEN, vec![ns]))], vec![port(1)]);
    let (_a_admin, mut a) = host_queues(&t, HOST, HOST_A_ID);
    let (_b_admin, mut b) = host_queues(&t, OTHER_HOST, HOST_B_ID);
    assert!(done(resv(&mut a, 0x0d, 0, &[0, 1])).status.is_success());
    assert!(done(resv(&mut b, 0x0d, 0, &[0, 2])).status.is_success());
    assert!(done(resv(&mut b, 0x11, 1 << 8, &[2, 0])).status.is_success());
    // B, holding Write Exclusive, has a write at the backend when A preempts and aborts it.
    let mut w = Some(Window::host(512).unwrap());
    assert!(matches!(submit(&mut b, 3, &rw(0x01, 0, 1), &mut w, 512), Exec::Submitted));
    assert!(matches!(resv(&mut a, 0x11, 2 | 1 << 8, &[1, 2]), Exec::Submitted), "waits for B's write");
    // Meanwhile B's new commands are refused (retryable), and the acquire stays pending.
    let mut r = Some(Window::host(512).unwrap());
    assert_eq!(done(submit(&mut b, 4, &rw(0x02, 0, 1), &mut r, 512)).status, Status::ABORTED_BY_REQUEST);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut acquired = Vec::new();
    a.reap(&mut |c| acquired.push(c.req.response.status));
    assert!(acquired.is_empty(), "B's write still in flight");
    // B's write finishes: the acquire completes after it.
    held.lock().unwrap()[0].1 = true;
    b.reap(&mut |c| {
        assert!(c.req.response.status.is_success());
        w = c.req.buf;
    });
    tokio::time::timeout(Duration::from_secs(1), a.io_ready()).await.expect("the acquire's wait ends");
    a.reap(&mut |c| acquired.push(c.req.response.status));
    assert_eq!(acquired, [Status::SUCCESS]);
    // B, unregistered, may read under Write Exclusive again but not write.
    assert!(matches!(submit(&mut b, 4, &rw(0x02, 0, 1), &mut r, 512), Exec::Submitted));
    assert_eq!(done(submit(&mut b, 5, &rw(0x01, 0, 1), &mut w, 512)).status, Status::RESERVATION_CONFLICT.dnr());
}

#[tokio::test]
async fn ana_states_reach_identify_the_log_page_events_and_the_io_path() {
    // Namespace 1 in group 3 of a head whose group 3 starts non-optimized.
    let groups = Groups::new(|id| if id == 3 { ana::State::NonOptimized } else { ana::State::Optimized });
    let mut sub = Arc::into_inner(subsystem(OPEN, true, None)).unwrap();
    sub.namespaces[0].ana = groups.get(3).unwrap().clone();
    let t = Target::with(vec![Arc::new(sub)], vec![port(1)], Limits::default(), groups);
    let (mut a, cntlid) = admin(&t, 1, OPEN);
    let mut q = io_queue(&t, cntlid);
    let mut id = vec![0u8; 4096];
    let mut identify = sqe(0x06);
    identify.cdw10 = 1.into();
    done(exec(&mut a, &identify, &mut id));
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    assert_eq!(id[76] & 0b1011, 0b1011, "CMIC: multi-port, multi-controller, ANA");
    assert_eq!(le32(&id, 92) & 1 << 11, 1 << 11, "OAES: ANA change notices");
    assert_eq!((id[342], id[343]), (10, 0b1_1111), "ANATT, ANACAP");
    assert_eq!((le32(&id, 344), le32(&id, 348), le32(&id, 540)), (128, 128, 1024), "ANAGRPMAX, NANAGRPID, MNAN");
    // A discovery controller has no namespaces and says no ANA (a host would check its MNAN).
    let (mut disc, _) = admin(&t, 1, p2pnvmf_nvmf::DISCOVERY_NQN);
    let mut did = vec![0u8; 4096];
    done(exec(&mut disc, &identify, &mut did));
    assert_eq!((did[76] & 1 << 3, le32(&did, 540)), (0, 0), "discovery: CMIC without ANA, MNAN 0");
    (identify.cdw10, identify.nsid) = (0.into(), 1.into());
    done(exec(&mut a, &identify, &mut id));
    assert_eq!(le32(&id, 92), 3, "ANAGRPID");
    let page = log_page(&mut a, 0x0c);
    assert_eq!((u16::from_le_bytes([page[8], page[9]]), le32(&page, 16), le32(&page, 20)), (1, 3, 1));
    assert_eq!((page[32], le32(&page, 48)), (ana::State::NonOptimized as u8, 1));
    let mut block = vec![0u8; 512];
    assert!(done(exec(&mut q, &rw(0x02, 0, 1), &mut block)).status.is_success(), "non-optimized serves I/O");

    // The host enables ANA change notices and waits; the head stops serving group 3.
    let mut aec = sqe(0x09);
    (aec.cdw10, aec.cdw11) = (0x0b.into(), (1 << 11).into());
    assert!(done(exec(&mut a, &aec, &mut [])).status.is_success());
    let mut aer = sqe(0x0c);
    aer.cid = 40.into();
    assert!(matches!(exec(&mut a, &aer, &mut []), Exec::Submitted));
    assert!(t.set_ana_state(1, ana::State::Inaccessible));
    let quiet = tokio::time::timeout(Duration::from_millis(50), a.io_ready()).await;
    assert!(quiet.is_err(), "no namespace of the subsystem is in group 1: no notice");
    assert!(t.set_ana_state(3, ana::State::Inaccessible));
    assert!(!t.set_ana_state(3, ana::State::Inaccessible), "the same state is no change");
    tokio::time::timeout(Duration::from_secs(1), a.io_ready()).await.expect("an event");
    let mut events = Vec::new();
    a.reap(&mut |c| events.push((c.tag, c.req.response.result)));
    assert_eq!(events, [(40, 0x000c_0302)], "notice, ANA change, log page 0Ch");
    let page = log_page(&mut a, 0x0c);
    assert_eq!(page[32], ana::State::Inaccessible as u8);
    assert!(u64::from_le_bytes(page[..8].try_into().unwrap()) > 0, "the change count moved");
    // I/O, reservation commands and a flush of every namespace: the path status, no DNR, so
    // the host retries on another path; admin commands still work.
    let inaccessible = Status::new(3, 0x02);
    assert_eq!(done(exec(&mut q, &rw(0x02, 0, 1), &mut block)).status, inaccessible);
    assert_eq!(done(exec(&mut q, &rw(0x01, 0, 1), &mut block)).status, inaccessible);
    assert_eq!(done(resv(&mut q, 0x0d, 0, &[0, 1])).status, inaccessible);
    let mut flush_all = rw(0x00, 0, 1);
    flush_all.nsid = u32::MAX.into();
    assert!(done(exec(&mut q, &flush_all, &mut [])).status.is_success(), "nothing this head serves to flush");
    done(exec(&mut a, &identify, &mut id));
    assert_eq!(le32(&id, 92), 3);
    t.set_ana_state(3, ana::State::Change);
    assert_eq!(done(exec(&mut q, &rw(0x02, 0, 1), &mut block)).status, Status::new(3, 0x03));
    t.set_ana_state(3, ana::State::PersistentLoss);
    assert_eq!(done(exec(&mut q, &rw(0x02, 0, 1), &mut block)).status, Status::new(3, 0x01));
    t.set_ana_state(3, ana::State::Optimized);
    assert!(done(exec(&mut q, &rw(0x01, 0, 1), &mut block)).status.is_success());
    // RGO: the group without its NSID list.
    let mut glp = sqe(0x02);
    glp.cdw10 = (0x0c | 1 << 8 | 7 << 16).into();
    let mut rgo = vec![0u8; 32];
    done(exec(&mut a, &glp, &mut rgo));
    assert_eq!((le32(&rgo, 16), le32(&rgo, 20)), (3, 0));
    // Read in 4 KiB pieces as nvme-cli does, up to the length Identify implies: zeroes past
    // the descriptors, Invalid Field only beyond.
    let mut piece = vec![0xffu8; 4096];
    glp.cdw10 = (0x0c | 1023 << 16).into();
    (glp.cdw12, glp.cdw13) = (8192.into(), 0.into());
    assert!(done(exec(&mut a, &glp, &mut piece)).status.is_success());
    assert!(piece.iter().all(|&b| b == 0));
    glp.cdw12 = (16 + 128 * 32 + 1024 * 4 + 4).into();
    assert_eq!(done(exec(&mut a, &glp, &mut piece)).status, Status::INVALID_FIELD.dnr());
}

#[tokio::test]
async fn controller_ids_come_from_the_subsystems_range() {
    let mut sub = Arc::into_inner(subsystem(OPEN, true, None)).unwrap();
    sub.cntlids = 100..=101;
    let t = Target::new(vec![Arc::new(sub)], vec![port(1)]);
    let mut held: Vec<(Queue, u16)> = (0..2).map(|_| admin(&t, 1, OPEN)).collect();
    assert_eq!(held.iter().map(|h| h.1).collect::<Vec<_>>(), [100, 101]);
    let r = connect(&mut Queue::new(t.clone(), port(1)), 0, OPEN, HOST, 0xffff);
    assert_eq!(r.status, Status::CONNECT_CONTROLLER_BUSY.dnr(), "the range is used up");
    held.remove(0);
    assert_eq!(admin(&t, 1, OPEN).1, 100, "a freed ID is given again");
}
