//! `cargo bench --bench vm_fio`: the same fio jobs against the kernel's nvmet target (brd) and
//! ours (RAM namespace), over RDMA (rxe) and TCP, in one VM run; prints IOPS and bandwidth and
//! the ratios ours / kernel. Only ratios within one run mean anything (TCG emulation).

use p2pnvmf_vmrig::{Scenario, Topology};

fn main() {
    let out = Scenario::new("bench-fio", Topology::nic_only(), "bench-fio.sh")
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .timeout(std::time::Duration::from_secs(900))
        .run_ok();
    for line in out.console.lines().filter(|l| l.starts_with("bench ") || l.starts_with("ratio ")) {
        println!("{line}");
    }
}
