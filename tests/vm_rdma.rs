//! Our target over NVMe/RDMA (soft-RoCE, rxe0), driven by the Linux kernel host in the VM.

use p2pnvmf_vmrig::{Scenario, Topology};

fn rdma_scenario(name: &str, script: &str) -> Scenario {
    Scenario::new(name, Topology::nic_only(), script)
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .binary("P2PNVMF_RDMA_PROBE", env!("CARGO_BIN_EXE_nvmf-rdma-probe"))
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_rdma_smoke() {
    rdma_scenario("rdma-smoke", "rdma-smoke.sh").run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_rdma_io() {
    rdma_scenario("rdma-io", "rdma-io.sh")
        .size("RDMA_CYCLES", 100)
        .timeout(std::time::Duration::from_secs(900))
        .run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_rdma_bad_input_beside_fio() {
    rdma_scenario("rdma-bad-input", "rdma-bad-input.sh").run_ok();
}
