//! The per-I/O pieces in isolation (criterion): NVMe/TCP capsule header decode, keyed SGL
//! decode, a pool chunk taken and given back, a response capsule encoded, and CRC32C with the
//! CPU's instruction and with tables, over a PDU header and a 4 KiB data block.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use p2pnvmf_nvmf::wire::{Cqe, Sqe, sgl};
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

criterion_group!(benches, per_io);
criterion_main!(benches);
