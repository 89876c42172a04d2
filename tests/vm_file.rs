//! The file backend on real block devices (brd, null_blk) behind our target, over RDMA and
//! TCP, driven by the Linux host in the VM.

use p2pnvmf_vmrig::{Scenario, Topology};

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_file_backend_verify_zeroes_and_queue_depth_at_the_device() {
    Scenario::new("file-io", Topology::nic_only(), "file-io.sh")
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .timeout(std::time::Duration::from_secs(480))
        .run_ok();
}
