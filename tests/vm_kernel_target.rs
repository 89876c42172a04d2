//! Rig self-test: the Linux kernel nvmet target inside the VM, reached by nvme-cli over
//! RDMA (rxe) and TCP. This is also the reference our own target is compared against.

use p2pnvmf_vmrig::{Scenario, Topology};

fn kernel_target(transport: &str) {
    Scenario::new(&format!("kernel-target-{transport}"), Topology::nic_only(), "kernel-target.sh")
        .env("TRANSPORT", transport)
        .run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_kernel_target_rdma() {
    kernel_target("rdma");
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_kernel_target_tcp() {
    kernel_target("tcp");
}
