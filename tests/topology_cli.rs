//! `p2pnvmf topology --json` on fixture trees: the contract scripts rely on.

use std::process::Command;

use serde_json::Value;

/// Runs the command on a private copy of a fixture (it programs CMBMSC in resource0).
fn topology(fixture: &str, extra: &[&str]) -> Value {
    let dir = p2pnvmf_p2p::fixture::copy(fixture);
    let out = Command::new(env!("CARGO_BIN_EXE_p2pnvmf"))
        .args(["topology", "--json", "--sysfs-root"])
        .arg(dir.join("sys"))
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cmbmsc = std::fs::read(dir.join("sys/bus/pci/devices/0000:03:00.0/resource0")).ok();
    let _ = std::fs::remove_dir_all(&dir);
    let mut v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["cmbmsc_in_registers"] = cmbmsc
        .map_or(Value::Null, |r| Value::from(format!("{:#x}", u64::from_le_bytes(r[0x50..0x58].try_into().unwrap()))));
    v
}

fn decision<'a>(v: &'a Value, provider: &str, client: &str) -> &'a Value {
    v["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["provider"] == provider && d["client"] == client)
        .unwrap_or_else(|| panic!("no decision {provider} -> {client} in {v:#}"))
}

#[test]
fn offset_fixture_reports_bus_and_cpu_addresses_and_a_bus_address_path() {
    let v = topology("pci-switch-offset", &[]);
    let p = &v["providers"][0];
    assert_eq!(p["pci"], "0000:03:00.0");
    assert_eq!(p["kind"], "nvme-cmb");
    assert_eq!(p["bar"], 2);
    assert_eq!(p["cpu_addr"], "0x600008000000");
    assert_eq!(p["bus_addr"], "0x88000000");
    assert_eq!(p["offset"], format!("{:#x}", 0x8000_0000u64.wrapping_sub(0x6000_0000_0000)));
    assert_eq!(p["size"], 64 << 20);
    assert_eq!((p["rds"].as_bool(), p["wds"].as_bool()), (Some(true), Some(true)));
    assert_eq!(p["cmbmsc"], "0x88000003");
    assert_eq!(v["cmbmsc_in_registers"], "0x88000003", "CBA is the bus address");
    let d = decision(&v, "0000:03:00.0", "0000:04:00.0");
    assert_eq!((d["path"].as_str(), d["distance"].as_u64()), (Some("bus-address"), Some(4)));
    assert_eq!(d["client_name"], "mlx5_0");
    // The NIC reaches the CMB, but an unbound CMB maps through sysfs: no dma-buf, said why.
    let b = &v["dmabuf"][0];
    assert_eq!((b["device"].as_str(), b["provider"].as_str()), (Some("mlx5_0"), Some("0000:03:00.0")));
    assert_eq!(b["tried"], false);
    assert!(b["reason"].as_str().unwrap().contains("0000:03:00.0 is not bound to vfio-pci"), "{b}");
}

#[test]
fn rxe_fixture_names_the_software_client_with_no_distance() {
    let v = topology("pci-rxe", &[]);
    let d = decision(&v, "0000:01:00.0", "rxe0");
    assert_eq!(d["path"], "none");
    assert!(d["distance"].is_null());
    assert!(d["reason"].as_str().unwrap().contains("software RDMA device"), "{d}");
}

#[test]
fn config_providers_and_allowed_host_bridges_apply() {
    let cfg = std::env::temp_dir().join(format!("p2pnvmf-topology-{}.toml", std::process::id()));
    std::fs::write(
        &cfg,
        "[[listener]]\ntransport = \"tcp\"\naddress = \"127.0.0.1\"\n[p2p]\nallow_host_bridges = [\"8086:29c0\"]\n\
         [[p2p.provider]]\npci = \"0001:02:00.0\"\nkind = \"nvme-cmb\"\n",
    )
    .unwrap();
    let v = topology("pci-root-ports", &["--config", cfg.to_str().unwrap()]);
    std::fs::remove_file(&cfg).unwrap();
    assert_eq!(v["providers"].as_array().unwrap().len(), 1);
    let d = decision(&v, "0001:02:00.0", "0001:01:00.0");
    assert_eq!((d["path"].as_str(), d["distance"].as_u64()), (Some("host-bridge"), Some(4)));
}

#[test]
fn a_file_with_only_p2p_is_a_topology_config() {
    let cfg = std::env::temp_dir().join(format!("p2pnvmf-topology-p2p-{}.toml", std::process::id()));
    std::fs::write(&cfg, "[p2p]\nallow_host_bridges = [\"8086:29c0\"]\n").unwrap();
    let v = topology("pci-root-ports", &["--config", cfg.to_str().unwrap()]);
    let d = decision(&v, "0001:02:00.0", "0001:01:00.0");
    assert_eq!(d["path"], "host-bridge", "the allowed host bridge applies: {d}");
    std::fs::write(&cfg, "[p2p]\nallow_host_bridges = [\"8086\"]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_p2pnvmf")).args(["topology", "--config"]).arg(&cfg).output().unwrap();
    std::fs::remove_file(&cfg).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(":2:") && err.contains("allow_host_bridges"), "{err}");
}

#[test]
fn sysfs_root_is_where_sysfs_is_mounted() {
    let dir = p2pnvmf_p2p::fixture::copy("pci-rxe");
    let out =
        Command::new(env!("CARGO_BIN_EXE_p2pnvmf")).args(["topology", "--sysfs-root"]).arg(&dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "the directory above sysfs is refused");
    assert!(err.contains("is not where sysfs is mounted") && err.contains("did you mean"), "{err}");
}
