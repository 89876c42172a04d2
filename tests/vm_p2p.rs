//! The p2p layer in the VM: a PCIe switch holding the CMB NVMe, the NIC and a memory BAR
//! (ivshmem), another NVMe on a different root port; and on the P2PDMA guest kernel, the SSDs
//! moving data through the CMB with the kernel's own NVMe driver.

use p2pnvmf_vmrig::{Kernel, Nvme, Scenario, Topology};

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_p2p_topology_cmb_and_fallbacks() {
    let topo = Topology::new()
        .root_port("rp1")
        .switch("up1", "rp1", &["dn1", "dn2", "dn3"])
        .nvme("cmb", "dn1", Nvme { serial: "CMB1".into(), size_mib: 64, cmb_mib: Some(64), block_size: None })
        .nic("dn2")
        .ivshmem("shm", "dn3", 32)
        .root_port("rp2")
        .nvme("plain", "rp2", Nvme { serial: "PLAIN1".into(), size_mib: 64, cmb_mib: None, block_size: None });
    Scenario::new("p2p", topo, "p2p.sh")
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .timeout(std::time::Duration::from_secs(480))
        .run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_p2p_cmb_through_vfio() {
    let topo = Topology::new()
        .iommu()
        .root_port("rp1")
        .nvme("cmb", "rp1", Nvme { serial: "CMB1".into(), size_mib: 64, cmb_mib: Some(64), block_size: None })
        .nic("pcie.0");
    Scenario::new("p2p-vfio", topo, "p2p-vfio.sh").binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf")).run_ok();
}

#[test]
#[ignore = "boots a VM with the P2PDMA guest kernel: run by tests/run.sh --full"]
fn vm_p2pmem_ssds_dma_through_the_cmb_with_the_kernel_driver() {
    let topo = Topology::new()
        .root_port("rp1")
        .switch("up1", "rp1", &["dn1", "dn2", "dn3"])
        .nvme("cmb", "dn1", Nvme { serial: "CMB1".into(), size_mib: 128, cmb_mib: Some(64), block_size: None })
        .nic("dn2")
        .nvme("peer", "dn3", Nvme { serial: "PEER1".into(), size_mib: 128, cmb_mib: None, block_size: None });
    Scenario::new("p2pmem", topo, "p2pmem.sh")
        .kernel(Kernel::P2pdma)
        .qemu_trace(&["pci_nvme_map_addr_cmb", "pci_nvme_err_*"])
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        // Seconds per side-by-side measurement (p2p, host memory, the kernel's nvmet).
        .size("P2PMEM_BENCH_RUNTIME", 3)
        .timeout(std::time::Duration::from_secs(900))
        .run_ok();
}
