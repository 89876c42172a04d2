//! p2p decisions and providers on the fixture trees of `tests/fixtures` (see
//! `make-pci-fixtures.py` for each layout).

use std::path::PathBuf;

use p2pnvmf_p2p::addr::BusAddr;
use p2pnvmf_p2p::path::{Client, Path, Topology, WireAddr, address};
use p2pnvmf_p2p::pci::{PciAddr, Sysfs};
use p2pnvmf_p2p::plan::P2p;
use p2pnvmf_p2p::provider::Kind;

/// A private copy of a fixture tree.
fn copy_of(name: &str) -> (Sysfs, PathBuf) {
    let dst = p2pnvmf_p2p::fixture::copy(name);
    (Sysfs::new(&dst), dst)
}

fn a(s: &str) -> PciAddr {
    s.parse().unwrap()
}

/// Topology reads only: the fixture tree itself.
fn topo(name: &str, allow: &[(u16, u16)]) -> Topology {
    let tree = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name);
    Topology::read(&Sysfs::new(tree), allow).unwrap()
}

fn nic(t: &Topology, name: &str) -> Client {
    t.rdma_client(name).unwrap_or_else(|| panic!("no RDMA device {name}"))
}

#[test]
fn a_nic_and_cmb_below_one_switch_use_bus_addresses_at_distance_4() {
    let t = topo("pci-switch-cmb", &[]);
    let d = t.decide(a("0000:03:00.0"), &nic(&t, "mlx5_0"));
    assert_eq!((d.path, d.distance), (Path::BusAddress, Some(4)), "{}", d.reason);
    assert!(d.reason.contains("common upstream bridge 0000:01:00.0"), "{}", d.reason);
    // The NVMe reaching its own CMB.
    let own = t.decide(a("0000:03:00.0"), &Client::Pci { addr: a("0000:03:00.0"), name: None });
    assert_eq!((own.path, own.distance), (Path::BusAddress, Some(0)));
}

#[test]
fn b_root_ports_of_a_forwarding_host_bridge_go_through_it_others_do_not() {
    let t = topo("pci-root-ports", &[]);
    let fwd = t.decide(a("0000:02:00.0"), &nic(&t, "mlx5_0"));
    assert_eq!((fwd.path, fwd.distance), (Path::HostBridge, Some(4)), "{}", fwd.reason);
    assert!(fwd.reason.contains("host bridge 8086:2030 (0000:00:00.0) forwards p2p"), "{}", fwd.reason);
    let not = t.decide(a("0001:02:00.0"), &nic(&t, "mlx5_1"));
    assert_eq!((not.path, not.distance), (Path::None, None));
    assert!(not.reason.contains("host bridge 8086:29c0 (0001:00:00.0) is not known to forward p2p"), "{}", not.reason);
    // Across host bridges both must be listed without the same-bridge restriction.
    let across = t.decide(a("0000:02:00.0"), &nic(&t, "mlx5_1"));
    assert_eq!(across.path, Path::None, "{}", across.reason);
    // The operator's allow-list turns the second into a host-bridge path.
    let t = topo("pci-root-ports", &[(0x8086, 0x29c0)]);
    assert_eq!(t.decide(a("0001:02:00.0"), &nic(&t, "mlx5_1")).path, Path::HostBridge);
}

#[test]
fn c_acs_redirect_on_the_path_sends_p2p_through_the_host_bridge() {
    let t = topo("pci-acs-redirect", &[]);
    let d = t.decide(a("0000:03:00.0"), &nic(&t, "mlx5_0"));
    assert_eq!((d.path, d.distance), (Path::HostBridge, Some(4)), "{}", d.reason);
    assert!(d.reason.contains("ACS P2P redirect is set on 0000:02:00.0"), "{}", d.reason);
}

#[test]
fn d_with_a_host_bridge_offset_the_peer_gets_the_bus_address() {
    let (sysfs, dir) = copy_of("pci-switch-offset");
    let t = Topology::read(&sysfs, &[]).unwrap();
    let providers = sysfs.providers(&t.functions, &[], true).unwrap();
    let p = &providers[0];
    assert_eq!((p.pci, p.kind, p.bar), (a("0000:03:00.0"), Kind::NvmeCmb, Some(2)));
    assert_eq!((p.cpu_addr.get(), p.bus_addr.get(), p.size), (0x6000_0800_0000, 0x8800_0000, 64 << 20));
    assert_eq!(p.offset(), 0x8000_0000u64.wrapping_sub(0x6000_0000_0000));
    let d = t.decide(p.pci, &nic(&t, "mlx5_0"));
    assert_eq!(d.path, Path::BusAddress, "{}", d.reason);
    assert_eq!(address(p, &d, 0x1000), Some(WireAddr::Bus(BusAddr::new(0x8800_1000))), "bus address, not CPU address");
    // CMBMSC was programmed with CRE | CMSE | the bus address, high dword first.
    let regs = std::fs::read(dir.join("sys/bus/pci/devices/0000:03:00.0/resource0")).unwrap();
    assert_eq!(u64::from_le_bytes(regs[0x50..0x58].try_into().unwrap()), 0x8800_0003);
    assert_eq!(p.cmbmsc, Some(0x8800_0003));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn e_rxe_is_a_software_device_with_no_path() {
    let t = topo("pci-rxe", &[]);
    assert_eq!(t.rdma.len(), 1);
    assert!(t.rdma[0].is_software());
    assert_eq!(t.rdma[0].netdev.as_deref(), Some("eth0"));
    let c = nic(&t, "rxe0");
    assert_eq!(c.id(), "rxe0");
    let d = t.decide(a("0000:01:00.0"), &c);
    assert_eq!((d.path, d.distance), (Path::None, None));
    assert!(d.reason.contains("rxe0 is a software RDMA device over eth0"), "{}", d.reason);
}

#[test]
fn providers_name_why_they_cannot_be_used() {
    let (sysfs, dir) = copy_of("pci-switch-cmb");
    let t = Topology::read(&sysfs, &[]).unwrap();
    // A NIC BAR bound to mlx5_core: the driver owns it.
    let spec = p2pnvmf_p2p::provider::Spec { pci: a("0000:04:00.0"), kind: Kind::Bar, bar: Some(0) };
    let p = &sysfs.providers(&t.functions, &[spec], false).unwrap()[0];
    assert!(p.unusable.as_deref().unwrap().contains("bound to the kernel driver mlx5_core"), "{:?}", p.unusable);
    let missing = p2pnvmf_p2p::provider::Spec { pci: a("0000:04:00.0"), kind: Kind::Bar, bar: Some(3) };
    assert!(sysfs.providers(&t.functions, &[missing], false).unwrap_err().to_string().contains("BAR3 has no resource"));
    // The CMB maps and holds data (a file stands in for the BAR here).
    let cmb = &sysfs.providers(&t.functions, &[], true).unwrap()[0];
    assert!(cmb.is_usable(), "{:?}", cmb.unusable);
    std::fs::write(dir.join("sys/bus/pci/devices/0000:03:00.0/resource2"), vec![0u8; 64 << 20]).unwrap();
    let m = cmb.map().unwrap();
    m.write_bytes(4096, b"p2p!");
    let mut back = [0u8; 4];
    m.read_bytes(4096, &mut back);
    assert_eq!(&back, b"p2p!");
    let twice = cmb.map().unwrap_err().to_string();
    assert!(twice.contains("0000:03:00.0 BAR2 bytes") && twice.contains("already mapped in this process"), "{twice}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_configured_bar_and_the_kernels_p2pmem_are_providers() {
    let (sysfs, dir) = copy_of("pci-rxe");
    let nvme = dir.join("sys/bus/pci/devices/0000:01:00.0");
    // p2pmem as a CONFIG_PCI_P2PDMA kernel shows it.
    std::fs::create_dir_all(nvme.join("p2pmem")).unwrap();
    std::fs::write(nvme.join("p2pmem/size"), "67108864\n").unwrap();
    std::fs::write(nvme.join("p2pmem/available"), "33554432\n").unwrap();
    std::fs::write(nvme.join("p2pmem/allocate"), vec![0u8; 1 << 20]).unwrap();
    let t = Topology::read(&sysfs, &[]).unwrap();
    let specs = [
        p2pnvmf_p2p::provider::Spec { pci: a("0000:01:00.0"), kind: Kind::Bar, bar: Some(2) },
        p2pnvmf_p2p::provider::Spec { pci: a("0000:01:00.0"), kind: Kind::P2pmem, bar: None },
    ];
    let ps = sysfs.providers(&t.functions, &specs, true).unwrap();
    let (bar, p2pmem) = (&ps[0], &ps[1]);
    assert_eq!((bar.kind, bar.bar, bar.size, bar.cmb), (Kind::Bar, Some(2), 64 << 20, None));
    assert_eq!((bar.cpu_addr.get(), bar.bus_addr.get()), (0x1_0600_0000, 0x1_0600_0000));
    assert!(bar.check().is_ok(), "{:?}", bar.check());
    assert_eq!((p2pmem.kind, p2pmem.size), (Kind::P2pmem, 64 << 20));
    let info = p2pmem.p2pmem.unwrap();
    assert_eq!((info.available, info.published), (32 << 20, false));
    // Its addresses are those of the BAR that holds it.
    assert_eq!((p2pmem.bar, p2pmem.cpu_addr.get(), p2pmem.bus_addr.get()), (Some(2), 0x1_0600_0000, 0x1_0600_0000));
    assert!(p2pmem.check().is_ok());
    // The p2pmem of a function without one is refused with the reason.
    let none = p2pnvmf_p2p::provider::Spec { pci: a("0000:00:02.0"), kind: Kind::P2pmem, bar: None };
    let e = sysfs.providers(&t.functions, &[none], true).unwrap_err().to_string();
    assert!(e.contains("CONFIG_PCI_P2PDMA"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `sys/dev/block/<dev>` → a device directory `rel` below the root (created), as the kernel links it.
fn block_link(dir: &std::path::Path, dev: &str, rel: &str) {
    let target = dir.join(rel);
    std::fs::create_dir_all(&target).unwrap();
    std::fs::create_dir_all(dir.join("sys/dev/block")).unwrap();
    std::os::unix::fs::symlink(&target, dir.join("sys/dev/block").join(dev)).unwrap();
}

#[test]
fn a_file_namespace_takes_p2pmem_its_nvme_reaches_and_nothing_else() {
    let (sysfs, dir) = copy_of("pci-switch-offset");
    let dev = |a: &str| std::fs::canonicalize(dir.join("sys/bus/pci/devices").join(a)).unwrap();
    std::fs::write(dev("0000:03:00.0").join("resource2"), b"").unwrap();
    std::fs::File::options()
        .write(true)
        .open(dev("0000:03:00.0").join("resource2"))
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let ctrl = dev("0000:03:00.0").join("nvme/nvme0");
    let rel = |p: &std::path::Path| p.strip_prefix(&dir).unwrap().to_str().unwrap().to_owned();
    block_link(&dir, "259:0", &rel(&ctrl.join("nvme0n1")));
    block_link(&dir, "259:1", &rel(&ctrl.join("nvme0n1/nvme0n1p1")));
    std::fs::write(ctrl.join("nvme0n1/nvme0n1p1/partition"), "1\n").unwrap();
    block_link(&dir, "259:2", "sys/devices/virtual/nvme-subsystem/nvme-subsys0/nvme1n1");
    std::os::unix::fs::symlink(&ctrl, dir.join("sys/devices/virtual/nvme-subsystem/nvme-subsys0/nvme0")).unwrap();
    block_link(&dir, "1:0", "sys/devices/virtual/block/ram0");
    block_link(&dir, "8:0", &rel(&dev("0000:04:00.0").join("host0/target0:0:0/0:0:0:0/block/sda")));

    let disk = |maj, min| sysfs.block_device(maj, min);
    let nvme0n1 = disk(259, 0).unwrap();
    assert_eq!((nvme0n1.name.as_str(), nvme0n1.functions.clone()), ("nvme0n1", vec![a("0000:03:00.0")]));
    assert_eq!(disk(259, 1).unwrap(), nvme0n1, "a partition is served by its disk's controller");
    assert_eq!(disk(259, 2).unwrap().functions, [a("0000:03:00.0")], "a multipath head by its paths");
    assert!(disk(1, 0).unwrap_err().to_string().contains("ram0 is not on a PCI device"));
    assert!(disk(9, 9).unwrap_err().to_string().contains("not a block device the kernel lists"));

    // Debian's kernels: no p2pmem, and the CMB mapped through sysfs is no DMA target for the kernel.
    let p2p = P2p::discover(&sysfs, &[], &[], true).unwrap();
    assert_eq!(p2p.providers.iter().map(|p| p.kind).collect::<Vec<_>>(), [Kind::NvmeCmb]);
    let e = p2p.for_block_device(&nvme0n1, None).unwrap_err().to_string();
    assert!(e.starts_with("no p2pmem") && e.contains("CONFIG_PCI_P2PDMA"), "{e}");
    let sda = disk(8, 0).unwrap();
    assert!(
        p2p.for_block_device(&sda, None)
            .unwrap_err()
            .to_string()
            .contains("sda is on 0000:04:00.0 (class 020000), not an NVMe controller")
    );

    // A P2PDMA kernel publishes the CMB as p2pmem: the NVMe reaches it (itself, distance 0).
    let p2pmem = dev("0000:03:00.0").join("p2pmem");
    std::fs::create_dir_all(&p2pmem).unwrap();
    for (f, v) in [("size", "67108864\n"), ("available", "67108864\n"), ("published", "0\n")] {
        std::fs::write(p2pmem.join(f), v).unwrap();
    }
    std::fs::File::create(p2pmem.join("allocate")).unwrap().set_len(64 << 20).unwrap();
    let p2p = P2p::discover(&sysfs, &[], &[], true).unwrap();
    let (i, d) = p2p.for_block_device(&nvme0n1, None).unwrap();
    let p = &p2p.providers[i];
    assert_eq!((p.kind, d.path, d.distance), (Kind::P2pmem, Path::BusAddress, Some(0)));
    // Pinned by `provider` (a PCI function): its p2pmem qualifies; a function that provides
    // nothing is named.
    assert_eq!(p2p.for_block_device(&nvme0n1, Some(a("0000:03:00.0"))).unwrap().0, 1);
    let e = p2p.for_block_device(&nvme0n1, Some(a("0000:04:00.0"))).unwrap_err().to_string();
    assert_eq!(e, "provider 0000:04:00.0 is not a p2p provider here (p2pnvmf topology lists them)");
    // Addresses from the BAR holding it: the host bridge's offset shows.
    assert_eq!((p.bar, p.cpu_addr.get(), p.bus_addr.get()), (Some(2), 0x6000_0800_0000, 0x8800_0000));
    let report = p2p.report().to_text();
    assert!(report.contains("0000:03:00.0 p2pmem BAR2 cpu 0x600008000000 bus 0x88000000"), "{report}");
    assert!(report.contains("available 64 MiB published=0"), "{report}");
    // Used up by others: nothing left to pool, said so.
    std::fs::write(p2pmem.join("available"), "0\n").unwrap();
    let p2p = P2p::discover(&sysfs, &[], &[], true).unwrap();
    let e = p2p.for_block_device(&nvme0n1, None).unwrap_err().to_string();
    assert!(e.contains("p2pmem of 0000:03:00.0: 0000:03:00.0: p2pmem has no memory available"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn p2pmem_out_of_an_nvmes_reach_is_named() {
    let (sysfs, dir) = copy_of("pci-root-ports");
    let dev = |a: &str| std::fs::canonicalize(dir.join("sys/bus/pci/devices").join(a)).unwrap();
    for f in ["0000:02:00.0", "0001:02:00.0"] {
        std::fs::write(dev(f).join("resource2"), b"").unwrap();
    }
    let p2pmem = dev("0000:02:00.0").join("p2pmem");
    std::fs::create_dir_all(&p2pmem).unwrap();
    std::fs::write(p2pmem.join("size"), "67108864\n").unwrap();
    std::fs::File::create(p2pmem.join("allocate")).unwrap().set_len(64 << 20).unwrap();
    let rel = dev("0001:02:00.0").join("nvme/nvme1/nvme1n1");
    block_link(&dir, "259:3", rel.strip_prefix(&dir).unwrap().to_str().unwrap());
    let p2p = P2p::discover(&sysfs, &[], &[], true).unwrap();
    let e = p2p.for_block_device(&sysfs.block_device(259, 3).unwrap(), None).unwrap_err().to_string();
    assert!(e.contains("p2pmem of 0000:02:00.0 is out of reach of 0001:02:00.0: no common upstream switch"), "{e}");
    std::fs::remove_dir_all(dir).unwrap();
}
