//! One NVMe/TCP connection fed the input as the host's byte stream: ICReq, capsules (Connect,
//! admin and I/O commands, their SGLs and in-capsule data), H2CData, anything. The connection
//! answers or ends with a termination request, never a panic or a hang: once the input is
//! consumed the host side closes, and the connection must end within a second.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use p2pnvmf_backend::ram::RamBackend;
use p2pnvmf_nvmf::{Namespace, Port, Subsystem, Target, TrType};
use p2pnvmf_transport::tcp::{TcpParams, conn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NQN: &str = "nqn.2026-11.io.p2pnvmf:fuzz";

fuzz_target!(|input: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        // A small R2T budget, so writes also take the waiting path.
        let params = TcpParams {
            max_icd: 8192,
            max_xfer: 1 << 17,
            maxh2cdata: 1 << 17,
            r2t_data: 256 << 10,
            ..TcpParams::default()
        };
        let ns = Namespace::new(NQN, 1, Arc::new(RamBackend::new(1 << 20)));
        let port = Port {
            id: 1,
            trtype: TrType::Tcp,
            traddr: "127.0.0.1".into(),
            trsvcid: "4420".into(),
            params: p2pnvmf_transport::Transport::params(&params),
        };
        let t = Target::new(vec![Arc::new(Subsystem::open(NQN, vec![ns]))], vec![port.clone()]);
        let (host, target_side) = tokio::io::duplex(64 << 10);
        let (mut host_rd, mut host_wr) = tokio::io::split(host);
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let serve = conn::run(tokio::io::split(target_side), "127.0.0.1:1".parse().unwrap(), t, port, params, shutdown);
        let send = async {
            let _ = host_wr.write_all(input).await;
            let _ = host_wr.shutdown().await;
        };
        let drain = async {
            let mut sink = vec![0u8; 64 << 10];
            while matches!(host_rd.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        let all = async { tokio::join!(serve, send, drain) };
        tokio::time::timeout(Duration::from_secs(1), all)
            .await
            .expect("the connection did not end after the host closed");
    });
});
