//! Our target over NVMe/TCP, driven by the Linux kernel host (nvme-cli, fio) in the VM.

use p2pnvmf_vmrig::{Scenario, Topology};

fn tcp_scenario(name: &str, script: &str) -> Scenario {
    Scenario::new(name, Topology::nic_only(), script)
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .binary("P2PNVMF_PROBE", env!("CARGO_BIN_EXE_nvmf-tcp-probe"))
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_tcp_smoke() {
    tcp_scenario("tcp-smoke", "tcp-smoke.sh").run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_tcp_limits() {
    tcp_scenario("tcp-limits", "tcp-limits.sh").run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_tcp_io() {
    tcp_scenario("tcp-io", "tcp-io.sh").timeout(std::time::Duration::from_secs(420)).run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_tcp_keepalive_restart() {
    tcp_scenario("tcp-keepalive-restart", "tcp-keepalive-restart.sh").run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_tcp_link_cut_during_fio() {
    tcp_scenario("tcp-link-cut", "tcp-link-cut.sh").run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_tcp_bad_input_beside_fio() {
    tcp_scenario("tcp-bad-input", "tcp-bad-input.sh").run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_tcp_persistent_discovery_aen() {
    tcp_scenario("tcp-discovery-aen", "tcp-discovery-aen.sh").run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_dhchap_authentication_tcp_and_rdma() {
    tcp_scenario("auth", "auth.sh").run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_tcp_reload_reaches_connected_hosts() {
    tcp_scenario("tcp-reconfigure", "tcp-reconfigure.sh").run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_tcp_metrics_match_fio() {
    tcp_scenario("tcp-metrics", "tcp-metrics.sh").run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_two_controllers_and_two_host_identities_share_a_namespace() {
    tcp_scenario("multipath", "multipath.sh").timeout(std::time::Duration::from_secs(400)).run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_ana_two_heads_one_device_the_host_follows_their_states() {
    tcp_scenario("ana", "ana.sh").timeout(std::time::Duration::from_secs(500)).run_ok();
}

/// `HA_RUNS` kills, partitions per transport (1 in CI, 3 in the full run; `HA_RUNS=20` for the
/// README's distributions).
#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_ha_owner_killed_or_cut_off_from_etcd_io_goes_on() {
    tcp_scenario("ha", "ha.sh")
        .binary("P2PNVMF_ANA_WATCH", env!("CARGO_BIN_EXE_ana-watch"))
        .size("HA_RUNS", 1)
        .timeout(std::time::Duration::from_secs(1800))
        .run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_ha_etcd_member_lost_changes_nothing_quorum_lost_fences() {
    tcp_scenario("ha-quorum", "ha-quorum.sh").timeout(std::time::Duration::from_secs(600)).run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_import_nvmetcli_keeps_what_the_host_sees() {
    tcp_scenario("import-nvmetcli", "import-nvmetcli.sh").run_ok();
}

#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_reservations_fence_hosts_and_persist_through_a_restart() {
    let blktests = p2pnvmf_vmrig::repo_root().join("../shared/third_party/blktests-a608cb5.tar.gz");
    tcp_scenario("reservations", "reservations.sh")
        .binary("P2PNVMF_PR_IOCTL", env!("CARGO_BIN_EXE_pr-ioctl"))
        .binary("BLKTESTS_TAR", blktests)
        .timeout(std::time::Duration::from_secs(600))
        .run_ok();
}
