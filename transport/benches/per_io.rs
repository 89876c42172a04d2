//! The per-I/O pieces in isolation (criterion): NVMe/TCP capsule header decode, keyed SGL
//! decode, a pool chunk taken and given back, a response capsule encoded, and CRC32C with the
//! CPU's instruction and with tables, over a PDU header and a 4 KiB data block; and one 4 KiB
//! read through the core (`Queue::accept`, `execute`, `complete`) on a backend that finishes at
//! once, which is what the core adds per command (reservations: with none, and with this host
//! holding one).

use std::hint::black_box;

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use p2pnvmf_nvmf::wire::{ConnectData, Cqe, Sqe, put_str, sgl};
use p2pnvmf_nvmf::{Exec, Namespace, Null, Port, Queue, Subsystem, Target, TrType, TransportParams};
use p2pnvmf_p2p::mem::Window;
use p2pnvmf_p2p::pool::ChunkPool;
use p2pnvmf_transport::crc32c::{crc32c, crc32c_sw};
use p2pnvmf_transport::rdma::wire::Keyed;
use p2pnvmf_transport::tcp::pdu::{self, CapsuleCmd, CommonHeader, Limits};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

fn capsule_header() -> [u8; 72] {
    let mut sqe = Sqe::new_zeroed();
    (sqe.opcode, sqe.flags, sqe.nsid) = (0x02, 1 << 6, 1.into());
    sqe.dptr.id = sgl::TRANSPORT_DATA_BLOCK;
    sqe.dptr.length = 4096.into();
    let cmd = CapsuleCmd { ch: pdu::common(pdu::pdu_type::CAPSULE_CMD, 0, 72, 0, 72), sqe };
    let mut b = [0u8; 72];
    b.copy_from_slice(cmd.as_bytes());
    b
}

fn per_io(c: &mut Criterion) {
    let lim = Limits { hdgst: false, ddgst: false, max_icd: 8192, maxh2cdata: 1 << 20 };
    let raw = capsule_header();
    c.bench_function("tcp capsule decode", |b| {
        b.iter(|| {
            let raw = black_box(&raw);
            let ch = CommonHeader::read_from_bytes(&raw[..8]).expect("8 bytes");
            let layout = pdu::check(&ch, &lim).expect("valid");
            let cmd = CapsuleCmd::read_from_bytes(&raw[..]).expect("72 bytes");
            (layout.data_len, cmd.sqe.cid.get())
        })
    });

    let mut sqe = Sqe::new_zeroed();
    sqe.dptr.id = sgl::KEYED_DATA_BLOCK_INVALIDATE;
    (sqe.dptr.addr, sqe.dptr.length, sqe.dptr.rsvd) = (0x1000.into(), 0x4400_1000.into(), [1, 2, 3]);
    c.bench_function("keyed sgl decode", |b| b.iter(|| Keyed::of(&black_box(&sqe).dptr)));

    let pool = ChunkPool::host(128 << 10, 64).expect("host memory");
    let mut slab = pool.take(64);
    c.bench_function("pool chunk get+put", |b| {
        b.iter(|| {
            let w = slab.get(black_box(4096)).expect("a chunk");
            slab.put(w)
        })
    });

    let cqe = Cqe { result: 7.into(), sqhd: 3.into(), sqid: 1.into(), cid: 42.into(), status: 0.into() };
    c.bench_function("cqe encode (capsule resp)", |b| {
        b.iter(|| {
            let r = pdu::capsule_resp(*black_box(&cqe), false);
            r.as_bytes()[16]
        })
    });

    let mut g = c.benchmark_group("crc32c");
    let header = [0x5au8; 24];
    let block: Vec<u8> = (0..4096).map(|i| i as u8).collect();
    for (name, data) in [("24 B", &header[..]), ("4 KiB", &block[..])] {
        g.throughput(Throughput::Bytes(data.len() as u64));
        g.bench_function(format!("instruction {name}"), |b| b.iter(|| crc32c(black_box(data))));
        g.bench_function(format!("tables {name}"), |b| b.iter(|| crc32c_sw(black_box(data))));
    }
    g.finish();
}

/// Runs one command to its CQE as a transport does, with `buf` as its buffer.
fn run(q: &mut Queue, sqe: &Sqe, buf: &mut Option<Window>, data: &[u8]) -> Cqe {
    let mut req = q.accept(sqe, 0).expect("accepted");
    if let Some(w) = buf.as_mut() {
        w.bytes_mut()[..data.len()].copy_from_slice(data);
    }
    req.buf = buf.take();
    match q.execute(1, req) {
        Exec::Done(mut r) => {
            *buf = r.buf.take();
            q.complete(&r)
        }
        Exec::Submitted => panic!("an instant backend finishes inline"),
    }
}

fn command(opcode: u8, nsid: u32, len: u32) -> Sqe {
    let mut s = Sqe::new_zeroed();
    (s.opcode, s.flags, s.nsid) = (opcode, 1 << 6, nsid.into());
    s.dptr.id = sgl::TRANSPORT_DATA_BLOCK;
    s.dptr.length = len.into();
    s
}

/// An admin queue and an I/O queue of one host, connected and enabled.
fn queues(t: &Arc<Target>, port: &Port) -> (Queue, Queue) {
    let connect = |q: &mut Queue, qid: u16, cntlid: u16| {
        let mut s = command(0x7f, 1, 1024);
        (s.cdw10, s.cdw11) = ((u32::from(qid) << 16).into(), 127.into());
        let mut d = ConnectData::new_zeroed();
        (d.cntlid, d.hostid) = (cntlid.into(), [7; 16]);
        put_str(&mut d.subnqn, "nqn.2026-12.io.p2pnvmf:bench", 0);
        put_str(&mut d.hostnqn, "nqn.2014-08.org.nvmexpress:uuid:0b0e3f2a-9c41-4c3b-9d7a-5c1f0a526d5e", 0);
        let mut buf = Some(Window::host(1024).expect("memory"));
        run(q, &s, &mut buf, d.as_bytes()).result.get() as u16
    };
    let mut admin = Queue::new(t.clone(), port.clone());
    let cntlid = connect(&mut admin, 0, 0xffff);
    let mut cc = command(0x7f, 0, 0);
    cc.flags = 0;
    (cc.cdw11, cc.cdw12) = (0x14.into(), (1 | 6 << 16 | 4 << 20).into());
    run(&mut admin, &cc, &mut None, &[]);
    let mut io = Queue::new(t.clone(), port.clone());
    connect(&mut io, 1, cntlid);
    (admin, io)
}

fn core(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let _guard = rt.enter();
    let params = TransportParams { ioccsz: 516, max_xfer: 1 << 20, msdbd: 1, keyed_sgls: false };
    let port = Port { id: 1, trtype: TrType::Tcp, traddr: "127.0.0.1".into(), trsvcid: "4420".into(), params };
    let ns = Namespace::new("nqn.2026-12.io.p2pnvmf:bench", 1, Arc::new(Null));
    let t = Target::new(vec![Arc::new(Subsystem::open("nqn.2026-12.io.p2pnvmf:bench", vec![ns]))], vec![port.clone()]);
    let (_admin, mut io) = queues(&t, &port);
    let mut read = command(0x02, 1, 4096);
    read.cdw12 = 7.into();
    let mut buf = Some(Window::host(4096).expect("memory"));
    c.bench_function("core: 4 KiB read accepted, executed, completed", |b| {
        b.iter(|| black_box(run(&mut io, black_box(&read), &mut buf, &[])))
    });
    core_reserved(c, &mut io, &read, &mut buf);
}

/// The same read while this host holds a Write Exclusive reservation.
fn core_reserved(c: &mut Criterion, io: &mut Queue, read: &Sqe, buf: &mut Option<Window>) {
    let mut keys = [0u8; 16];
    keys[8] = 1;
    run(io, &command(0x0d, 1, 16), &mut Some(Window::host(16).expect("memory")), &keys);
    let mut acquire = command(0x11, 1, 16);
    acquire.cdw10 = (1 << 8).into();
    keys = [0; 16];
    keys[0] = 1;
    let cqe = run(io, &acquire, &mut Some(Window::host(16).expect("memory")), &keys);
    assert_eq!(cqe.status.get(), 0, "acquired");
    c.bench_function("core: 4 KiB read, this host holding a reservation", |b| {
        b.iter(|| black_box(run(io, black_box(read), buf, &[])))
    });
}

criterion_group!(benches, per_io, core);
criterion_main!(benches);
