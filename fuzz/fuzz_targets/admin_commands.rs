//! Admin and Fabrics commands on a connected, enabled admin queue: Identify, Get Log Page,
//! Get/Set Features, Property Get/Set, Keep Alive, another Connect — every field as a host
//! may send it. The input is a sequence of [SQE (64 bytes), data length (2 bytes, LE), data];
//! each command gets an answer, never a panic, and a response never claims more data than the
//! command's buffer.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use p2pnvmf_backend::ram::RamBackend;
use p2pnvmf_nvmf::wire::{ConnectData, Sqe, put_str, sgl};
use p2pnvmf_nvmf::{Exec, Namespace, Port, Queue, Subsystem, Target, TrType, TransportParams};
use p2pnvmf_p2p::mem::Window;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

const NQN: &str = "nqn.2026-11.io.p2pnvmf:fuzz";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:0f0f0f0f-0000-0000-0000-000000000001";

/// Runs `sqe` as a transport would, `data` having come in its capsule: accepted, then executed
/// with a buffer of the length its SGL names (`data` at its start); returns the response's data
/// length when done now, and the buffer's.
fn exec(q: &mut Queue, sqe: &Sqe, data: &[u8]) -> Option<(u32, usize)> {
    let mut req = match q.accept(sqe, data.len()) {
        Ok(req) => req,
        Err(_) => return Some((0, 0)),
    };
    let len = req.len();
    let mut w = Window::host(len.max(1)).expect("host memory");
    let n = len.min(data.len());
    w.bytes_mut()[..n].copy_from_slice(&data[..n]);
    req.buf = Some(w);
    match q.execute(0, req) {
        Exec::Done(r) => Some((r.response.data_len, len)),
        // Held (an Async Event Request) or at the backend, which finishes RAM operations inline.
        Exec::Submitted => {
            let mut done = None;
            q.reap(&mut |c| done = Some(c.req.response.data_len));
            done.map(|n| (n, len))
        }
    }
}

fn fabrics(fctype: u32) -> Sqe {
    let mut s = Sqe::new_zeroed();
    (s.opcode, s.flags, s.nsid) = (0x7f, 1 << 6, fctype.into());
    s.dptr.id = sgl::TRANSPORT_DATA_BLOCK;
    s
}

fuzz_target!(|input: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let ns = Namespace::new(NQN, 1, Arc::new(RamBackend::new(1 << 20)));
        let params = TransportParams { ioccsz: 516, max_xfer: 1 << 17, msdbd: 1, keyed_sgls: false };
        let port = Port { id: 1, trtype: TrType::Tcp, traddr: "127.0.0.1".into(), trsvcid: "4420".into(), params };
        let t = Target::new(vec![Arc::new(Subsystem::open(NQN, vec![ns]))], vec![port.clone()]);
        let mut q = Queue::new(t, port);
        let mut connect = fabrics(1);
        connect.cdw11 = 31.into();
        (connect.dptr.id, connect.dptr.length) = (sgl::DATA_BLOCK_OFFSET, 1024.into());
        let mut d = ConnectData::new_zeroed();
        d.cntlid = 0xffff.into();
        put_str(&mut d.subnqn, NQN, 0);
        put_str(&mut d.hostnqn, HOST, 0);
        assert_eq!(exec(&mut q, &connect, d.as_bytes()), Some((0, 1024)));
        // Property Set CC: enabled, 64-byte SQEs, 16-byte CQEs.
        let mut cc = fabrics(0);
        cc.flags = 0;
        (cc.cdw11, cc.cdw12) = (0x14.into(), (1 | 6 << 16 | 4 << 20).into());
        exec(&mut q, &cc, &[]);
        let mut rest = input;
        while rest.len() >= 66 {
            let sqe = Sqe::read_from_bytes(&rest[..64]).expect("64 bytes");
            let len = (usize::from(u16::from_le_bytes([rest[64], rest[65]])) % 8193).min(rest.len() - 66);
            let data = &rest[66..66 + len];
            if let Some((n, buffer)) = exec(&mut q, &sqe, data) {
                assert!(n as usize <= buffer, "{n} bytes of data for a {buffer}-byte buffer: {sqe:?}");
            }
            rest = &rest[66 + len..];
        }
    });
});
