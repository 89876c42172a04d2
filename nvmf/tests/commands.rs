//! The core driven as a transport would drive it: SQEs and data buffers in, responses out.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use p2pnvmf_nvmf::wire::{ConnectData, DiscoveryLogEntry, DiscoveryLogHeader, Sqe, get_str, put_str, sgl};
use p2pnvmf_nvmf::{
    Backend, DISCOVERY_NQN, Exec, IoStats, Namespace, Port, Queue, Response, Status, Subsystem, Target, TrType,
    TransportParams,
};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

#[derive(Debug)]
struct Mem(Mutex<Vec<u8>>);

impl Backend for Mem {
    fn size_bytes(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let m = self.0.lock().unwrap();
        buf.copy_from_slice(&m[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.0.lock().unwrap()[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.0.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
        Ok(())
    }
    fn deallocate(&self, off: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(off, len)
    }
    fn volatile_write_cache(&self) -> bool {
        true
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
    let ns = Namespace::new(nqn, 1, Arc::new(Mem(Mutex::new(vec![0; 1 << 20]))));
    Arc::new(Subsystem {
        nqn: nqn.into(),
        serial: "SN1".into(),
        model: "model".into(),
        allow_any_host: any,
        hosts: vec![HOST.into()],
        ports,
        namespaces: vec![ns],
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
    let mut s = sqe(0x7f);
    s.nsid = 1.into();
    s.cdw10 = (u32::from(qid) << 16).into();
    s.cdw11 = 31.into();
    s.cdw12 = 0.into();
    let mut d = ConnectData::new_zeroed();
    d.cntlid = cntlid.into();
    put_str(&mut d.subnqn, subnqn, 0);
    put_str(&mut d.hostnqn, host, 0);
    done(q.execute(&s, d.as_mut_bytes()))
}

fn done(e: Exec) -> Response {
    match e {
        Exec::Done(r) => r,
        Exec::Deferred => panic!("deferred"),
    }
}

fn prop_set(q: &mut Queue, off: u32, v: u32) -> Response {
    let mut s = sqe(0x7f);
    s.flags = 0;
    s.nsid = 0.into();
    s.cdw11 = off.into();
    s.cdw12 = v.into();
    done(q.execute(&s, &mut []))
}

fn prop_get(q: &mut Queue, off: u32, eight: bool) -> Response {
    let mut s = sqe(0x7f);
    s.flags = 0;
    s.nsid = 4.into();
    s.cdw10 = u32::from(eight).into();
    s.cdw11 = off.into();
    done(q.execute(&s, &mut []))
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
    assert_eq!(done(q.execute(&sqe(0x18), &mut [])).status, Status::COMMAND_SEQUENCE_ERROR.dnr());
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
    assert_eq!(done(q.execute(&id, &mut page)).data_len, 4096);
    assert_eq!(get_str(&page[4..24]), Some("SN1                 "));
    assert_eq!(u16::from_le_bytes([page[78], page[79]]), cntlid);
    assert_eq!(page[77], 8, "MDTS: 1 MiB in 4 KiB units");
    assert_eq!(page[111], 1, "I/O controller");
    assert_eq!(get_str(&page[768..1024]), Some(OPEN));
    assert_eq!(u32::from_le_bytes(page[1792..1796].try_into().unwrap()), 516);
    assert_eq!(u32::from_le_bytes(page[516..520].try_into().unwrap()), 1, "NN");
    id.cdw10 = 0.into();
    id.nsid = 1.into();
    done(q.execute(&id, &mut page));
    assert_eq!(u64::from_le_bytes(page[..8].try_into().unwrap()), 2048, "NSZE in 512-byte blocks");
    id.nsid = 5.into();
    done(q.execute(&id, &mut page));
    assert!(page.iter().all(|&b| b == 0), "an inactive NSID reads as zeroes");
    id.nsid = u32::MAX.into();
    assert_eq!(done(q.execute(&id, &mut page)).status, Status::INVALID_NAMESPACE.dnr());
    id.cdw10 = 2.into();
    id.nsid = 0.into();
    done(q.execute(&id, &mut page));
    assert_eq!(&page[..8], &[1, 0, 0, 0, 0, 0, 0, 0], "active list: NSID 1 only");
    id.cdw10 = 3.into();
    id.nsid = 1.into();
    done(q.execute(&id, &mut page));
    assert_eq!((page[0], page[1], page[20], page[21], page[40]), (2, 16, 3, 16, 4));
    assert_eq!(page[24 + 6] >> 4, 8, "UUID version");
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
    done(q.execute(&glp, &mut log));
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
    done(q.execute(&glp, &mut part));
    assert_eq!(&part[..], &log[1024..2048]);
    // The discovery controller has no namespaces or I/O pages.
    glp.cdw10 = (0x02 | (127u32 << 16)).into();
    glp.cdw12 = 0.into();
    assert_eq!(done(q.execute(&glp, &mut part)).status, Status::INVALID_LOG_PAGE.dnr());
    // HOST also sees LOCKED on port 2.
    let mut q = Queue::new(t.clone(), port(1));
    connect(&mut q, 0, DISCOVERY_NQN, HOST, 0xffff);
    prop_set(&mut q, 0x14, 1);
    glp.cdw10 = (0x70 | (1023u32 << 16)).into();
    done(q.execute(&glp, &mut log));
    assert_eq!(DiscoveryLogHeader::read_from_bytes(&log[..1024]).unwrap().numrec.get(), 3);
}

#[tokio::test]
async fn features_and_async_events() {
    let t = target();
    let (mut q, _) = admin(&t, 1, OPEN);
    let mut set = sqe(0x09);
    set.cdw10 = 0x07.into();
    set.cdw11 = (200 | 200 << 16).into();
    assert_eq!(done(q.execute(&set, &mut [])).result, 63 | 63 << 16, "queues capped at 64");
    set.cdw10 = 0x0f.into();
    set.cdw11 = 15000.into();
    assert!(done(q.execute(&set, &mut [])).status.is_success());
    let mut get = sqe(0x0a);
    get.cdw10 = 0x0f.into();
    assert_eq!(done(q.execute(&get, &mut [])).result, 15000);
    set.cdw10 = (0x0f | 1 << 31).into();
    assert_eq!(done(q.execute(&set, &mut [])).status, Status::FEATURE_NOT_SAVEABLE.dnr());
    set.cdw10 = 0x81.into();
    assert_eq!(done(q.execute(&set, &mut [])).status, Status::COMMAND_SEQUENCE_ERROR.dnr());
    let mut hostid = [0u8; 16];
    get.cdw10 = 0x81.into();
    get.cdw11 = 1.into();
    assert_eq!(done(q.execute(&get, &mut hostid)).data_len, 16);
    get.cdw10 = 0x42.into();
    assert_eq!(done(q.execute(&get, &mut [])).status, Status::INVALID_FIELD.dnr());
    // AERL 3: four requests are held, the fifth is refused.
    for _ in 0..4 {
        assert_eq!(q.execute(&sqe(0x0c), &mut []), Exec::Deferred);
    }
    assert_eq!(done(q.execute(&sqe(0x0c), &mut [])).status, Status::ASYNC_EVENT_LIMIT_EXCEEDED.dnr());
}

#[tokio::test]
async fn io_commands_and_their_errors() {
    let t = target();
    let (_a, cntlid) = admin(&t, 1, OPEN);
    let mut q = io_queue(&t, cntlid);
    let pattern: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    let mut buf = pattern.clone();
    assert!(done(q.execute(&rw(0x01, 8, 8), &mut buf)).status.is_success());
    let mut back = vec![0u8; 4096];
    assert_eq!(done(q.execute(&rw(0x02, 8, 8), &mut back)).data_len, 4096);
    assert_eq!(back, pattern);
    assert!(done(q.execute(&rw(0x05, 8, 8), &mut buf)).status.is_success(), "compare equal");
    buf[100] ^= 1;
    assert_eq!(done(q.execute(&rw(0x05, 8, 8), &mut buf)).status, Status::COMPARE_FAILURE.dnr());
    assert!(done(q.execute(&rw(0x08, 8, 1), &mut [])).status.is_success(), "write zeroes");
    done(q.execute(&rw(0x02, 8, 8), &mut back));
    assert!(back[..512].iter().all(|&b| b == 0) && back[512..] == pattern[512..]);
    // Dataset Management deallocate of blocks 9..16.
    let mut range = [0u8; 16];
    range[4..8].copy_from_slice(&7u32.to_le_bytes());
    range[8..16].copy_from_slice(&9u64.to_le_bytes());
    let mut dsm = rw(0x09, 0, 1);
    dsm.cdw10 = 0.into();
    dsm.cdw11 = (1 << 2).into();
    assert!(done(q.execute(&dsm, &mut range)).status.is_success());
    done(q.execute(&rw(0x02, 8, 8), &mut back));
    assert!(back.iter().all(|&b| b == 0));
    // An out-of-range DSM range changes nothing.
    range[8..16].copy_from_slice(&2047u64.to_le_bytes());
    assert_eq!(done(q.execute(&dsm, &mut range)).status, Status::LBA_OUT_OF_RANGE.dnr());
    // Errors.
    assert_eq!(done(q.execute(&rw(0x02, 2047, 2), &mut back[..1024])).status, Status::LBA_OUT_OF_RANGE.dnr());
    assert_eq!(done(q.execute(&rw(0x02, u64::MAX, 1), &mut back[..512])).status, Status::LBA_OUT_OF_RANGE.dnr());
    assert_eq!(done(q.execute(&rw(0x02, 0, 8), &mut back[..512])).status, Status::DATA_SGL_LENGTH_INVALID.dnr());
    let mut bad_ns = rw(0x02, 0, 1);
    bad_ns.nsid = 2.into();
    assert_eq!(done(q.execute(&bad_ns, &mut back[..512])).status, Status::INVALID_NAMESPACE.dnr());
    assert_eq!(done(q.execute(&rw(0x06, 0, 1), &mut [])).status, Status::INVALID_OPCODE.dnr());
    let mut flush_all = rw(0x00, 0, 1);
    flush_all.nsid = u32::MAX.into();
    assert!(done(q.execute(&flush_all, &mut [])).status.is_success());
    // PRPs are not allowed on fabrics.
    let mut prp = rw(0x02, 0, 1);
    prp.flags = 0;
    assert_eq!(done(q.execute(&prp, &mut back[..512])).status, Status::INVALID_FIELD.dnr());
    // SMART counts what went through.
    let mut smart = vec![0u8; 512];
    let mut glp = sqe(0x02);
    glp.cdw10 = (0x02 | (127u32 << 16)).into();
    let mut a = _a;
    done(a.execute(&glp, &mut smart));
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
    let cntlid = done(q.execute(&s, d.as_mut_bytes())).result as u16;
    prop_set(&mut q, 0x14, CC_ENABLE);
    let ctrl = t.controller(cntlid).unwrap();
    let mut dead = ctrl.watch_dead();
    // Keep Alive every 500 ms keeps it up.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(done(q.execute(&sqe(0x18), &mut [])).status.is_success());
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
    assert!(done(disc.execute(&set, &mut [])).status.is_success());
    let mut aer = sqe(0x0c);
    aer.cid = 77.into();
    assert_eq!(disc.execute(&aer, &mut []), Exec::Deferred);
    let (_open, open_id) = admin(&t, 1, OPEN);
    let gen_before = t.generation();
    let dctrl = disc.controller().unwrap().clone();
    let woken = tokio::spawn(async move {
        dctrl.event_ready().await;
        dctrl.take_async_completions()
    });
    // OPEN goes away, a new subsystem comes.
    t.reconfigure(vec![subsystem(LOCKED, false, Some(vec![2])), subsystem("nqn.2026-11.io.p2pnvmf:new", true, None)]);
    assert_eq!(t.generation(), gen_before + 1);
    assert_eq!(woken.await.unwrap(), vec![(77, 0x70_f002)]);
    assert!(t.controller(open_id).is_none(), "controller of a removed subsystem is torn down");
    // A later change with no request held is kept until the host posts one.
    t.reconfigure(t.subsystems());
    assert_eq!(done(disc.execute(&aer, &mut [])).result, 0x70_f002);
    // A controller that did not enable the notice gets none.
    let mut quiet = Queue::new(t.clone(), port(1));
    connect(&mut quiet, 0, DISCOVERY_NQN, HOST, 0xffff);
    prop_set(&mut quiet, 0x14, 1);
    t.reconfigure(t.subsystems());
    assert_eq!(quiet.execute(&aer, &mut []), Exec::Deferred);
    assert!(quiet.controller().unwrap().take_async_completions().is_empty());
}
