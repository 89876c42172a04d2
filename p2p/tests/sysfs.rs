//! `pci::Sysfs` on the fixture trees of `tests/fixtures` (made by `make-pci-fixtures.py`).
//! `pci-switch-offset`: a host bridge whose window maps CPU 0x6000_0000_0000 to bus
//! 0x8000_0000, a root port, a switch with two downstream ports, an NVMe with a 64-bit
//! prefetchable BAR2 below the first and a NIC below the second.

use std::path::PathBuf;

use p2pnvmf_p2p::pci::{ACS_REDIRECTS, PciAddr, PortType, Sysfs};

fn tree(name: &str) -> Sysfs {
    Sysfs::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name))
}

fn fixture() -> Sysfs {
    tree("pci-switch-offset")
}

fn a(s: &str) -> PciAddr {
    s.parse().unwrap()
}

#[test]
fn functions_with_chains_port_types_and_acs() {
    let all = fixture().functions().unwrap();
    let addrs: Vec<String> = all.iter().map(|f| f.addr.to_string()).collect();
    assert_eq!(
        addrs,
        [
            "0000:00:00.0",
            "0000:00:01.0",
            "0000:01:00.0",
            "0000:02:00.0",
            "0000:02:01.0",
            "0000:03:00.0",
            "0000:04:00.0"
        ]
    );
    let types: Vec<PortType> = all.iter().map(|f| f.port_type).collect();
    use PortType::*;
    assert_eq!(types, [Endpoint, RootPort, SwitchUpstream, SwitchDownstream, SwitchDownstream, Endpoint, Endpoint]);
    let nvme = &all[5];
    assert_eq!((nvme.class, nvme.vendor, nvme.device), (0x010802, 0x1b36, 0x0010));
    assert_eq!(nvme.upstream, [a("0000:02:00.0"), a("0000:01:00.0"), a("0000:00:01.0")]);
    assert_eq!(nvme.host_bridge, "pci0000:00");
    assert_eq!((nvme.iommu_group, nvme.numa_node), (Some(7), Some(0)));
    assert_eq!(all[6].numa_node, None, "numa_node -1 means none");
    assert_eq!(all[3].acs_ctrl, Some(0x0001), "ACS source validation only: no redirect");
    assert_eq!(all[1].acs_ctrl, Some(0));
    assert_eq!(all[0].acs_ctrl, None);
    let acs = tree("pci-acs-redirect").function(a("0000:02:00.0")).unwrap();
    assert_eq!(acs.acs_ctrl.map(|c| c & ACS_REDIRECTS), Some(0x000c));
}

#[test]
fn bars_carry_cpu_and_bus_addresses() {
    let nvme = fixture().function(a("0000:03:00.0")).unwrap();
    let idx: Vec<u8> = nvme.bars.iter().map(|b| b.index).collect();
    assert_eq!(idx, [0, 2], "BAR1 is the upper half of the 64-bit BAR0");
    let cmb = nvme.bars[1];
    assert_eq!((cmb.cpu_addr.get(), cmb.bus_addr.get(), cmb.size), (0x6000_0800_0000, 0x8800_0000, 64 << 20));
    assert!(cmb.mem64 && cmb.prefetchable && !cmb.io);
    // The address a peer must use is the bus address: CPU address + offset.
    assert_eq!(cmb.cpu_addr.get().wrapping_add(cmb.bus_offset()), 0x8800_0000);
    assert_eq!(cmb.bus_offset(), 0x8000_0000u64.wrapping_sub(0x6000_0000_0000));
    let nic = fixture().function(a("0000:04:00.0")).unwrap();
    assert_eq!((nic.bars[0].index, nic.bars[0].mem64, nic.bars[0].bus_addr.get()), (1, false, 0x8100_0000));
}

#[test]
fn a_missing_function_names_its_path() {
    let e = fixture().function(a("0000:09:00.0")).unwrap_err().to_string();
    assert!(e.contains("sys/bus/pci/devices/0000:09:00.0"), "{e}");
}
