//! The nvme-vfio backend in the VM: an NVMe SSD the target drives itself through VFIO (guest
//! IOMMU) or, opted in, at physical addresses without one; taken from and given back to the kernel.

use p2pnvmf_vmrig::{Nvme, Scenario, Topology};

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_nvme_vfio_identify_verify_and_give_back() {
    let topo = Topology::new()
        .iommu()
        .root_port("rp1")
        .nvme("ssd", "rp1", Nvme { serial: "VFIOSSD1".into(), size_mib: 256, cmb_mib: None, block_size: None })
        .nic("pcie.0");
    Scenario::new("nvme-vfio", topo, "nvme-vfio.sh")
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        // Seconds per side-by-side measurement (the kernel's nvmet, ours).
        .env("NVME_VFIO_BENCH_RUNTIME", std::env::var("NVME_VFIO_BENCH_RUNTIME").unwrap_or_else(|_| "3".into()))
        .timeout(std::time::Duration::from_secs(600))
        .run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_nvme_vfio_prps_carry_the_cmb_bus_address() {
    // 4096-byte blocks: the target's namespace takes the SSD's format.
    let topo = Topology::new()
        .iommu()
        .root_port("rp1")
        .nvme(
            "ssd",
            "rp1",
            Nvme { serial: "VFIOCMB1".into(), size_mib: 256, cmb_mib: Some(64), block_size: Some(4096) },
        )
        .nic("pcie.0");
    Scenario::new("nvme-vfio-cmb", topo, "nvme-vfio-cmb.sh")
        .qemu_trace(&["pci_nvme_map_addr_cmb", "pci_nvme_err_*"])
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .timeout(std::time::Duration::from_secs(600))
        .run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_nvme_vfio_prps_carry_a_peer_bar_bus_address() {
    let topo = Topology::new()
        .iommu()
        .root_port("rp1")
        .switch("up1", "rp1", &["dn1", "dn2", "dn3"])
        .nvme("ssd", "dn1", Nvme { serial: "VFIOPEER1".into(), size_mib: 256, cmb_mib: None, block_size: None })
        .ivshmem("shm", "dn2", 32)
        .nvme("cmb", "dn3", Nvme { serial: "PEERCMB1".into(), size_mib: 64, cmb_mib: Some(64), block_size: None })
        .nic("pcie.0");
    Scenario::new("nvme-vfio-peer", topo, "nvme-vfio-peer.sh")
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .timeout(std::time::Duration::from_secs(600))
        .run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_nvme_vfio_physical_addresses_without_an_iommu() {
    let topo = Topology::new()
        .root_port("rp1")
        .switch("up1", "rp1", &["dn1", "dn2", "dn3"])
        .nvme("ssd", "dn1", Nvme { serial: "NOIOMMU1".into(), size_mib: 256, cmb_mib: Some(64), block_size: None })
        .ivshmem("shm", "dn2", 32)
        .nvme("cmb", "dn3", Nvme { serial: "NOIOMMUCMB".into(), size_mib: 64, cmb_mib: Some(32), block_size: None })
        .nic("pcie.0");
    Scenario::new("nvme-vfio-no-iommu", topo, "nvme-vfio-no-iommu.sh")
        .qemu_trace(&["pci_nvme_map_addr_cmb", "pci_nvme_err_*"])
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .timeout(std::time::Duration::from_secs(600))
        .run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_media_errors_reach_the_host_with_their_meaning() {
    // Sectors 2048 (reads) and 4096 (writes) of the SSD's medium fail, as media-errors.sh expects.
    let topo = Topology::new()
        .iommu()
        .root_port("rp1")
        .nvme("ssd", "rp1", Nvme { serial: "BADSSD1".into(), size_mib: 64, cmb_mib: None, block_size: None })
        .failing_sectors("ssd", &[2048], &[4096])
        .nic("pcie.0");
    Scenario::new("media-errors", topo, "media-errors.sh")
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .timeout(std::time::Duration::from_secs(600))
        .run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_nvme_vfio_queues_beyond_the_ssds_queue_pairs_share_one() {
    let topo = Topology::new()
        .iommu()
        .root_port("rp1")
        .nvme("ssd", "rp1", Nvme { serial: "QPSSD1".into(), size_mib: 64, cmb_mib: None, block_size: None })
        .nvme_property("ssd", "max_ioqpairs=2")
        .nic("pcie.0");
    Scenario::new("nvme-vfio-queue-pairs", topo, "nvme-vfio-queue-pairs.sh")
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .timeout(std::time::Duration::from_secs(300))
        .run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_ha_dual_ported_ssd_each_head_its_controller_and_cmb() {
    // One SSD, two controllers on their own root ports (own IOMMU groups): one per head.
    let ssd = Nvme { serial: "DUALSSD1".into(), size_mib: 256, cmb_mib: Some(32), block_size: None };
    let topo = Topology::new()
        .iommu()
        .root_port("rp1")
        .root_port("rp2")
        .dual_ported_nvme("ssd", &[("ctl0", "rp1"), ("ctl1", "rp2")], ssd)
        .nic("pcie.0");
    Scenario::new("ha-dual-port", topo, "ha-dual-port.sh")
        .qemu_trace(&["pci_nvme_map_addr_cmb", "pci_nvme_err_*"])
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .size("DUAL_RUNS", 1)
        .timeout(std::time::Duration::from_secs(900))
        .run_ok();
}
