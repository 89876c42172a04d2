//! blktests' nvme group — the suite the Linux NVMe maintainers run for every target change —
//! against p2pnvmf in the VM, over NVMe/TCP and NVMe/RDMA (rxe), with namespaces on a block
//! device and on an SSD the target drives itself (nvme-vfio). blktests reaches the target
//! through `tests/blktests/nvme-target-control` (its NVME_TARGET_CONTROL interface).
//!
//! Every test's outcome is compared with [`expected`]: a test that should pass and does not, a
//! test expected to fail or be skipped that passes, a test that goes missing — each fails the
//! run, so the table (and the README's, drawn from it) stays what the suite really does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use p2pnvmf_vmrig::{Nvme, Scenario, Topology, repo_root};

/// What a test does against p2pnvmf, and the evidence when it is not a plain pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Pass,
    /// Skipped by blktests, with its own reason (words of it).
    NotRun(&'static str),
    /// Fails only because blktests writes nvmet's configfs even when NVME_TARGET_CONTROL names
    /// an external target: the failed output shows the write.
    Configfs(&'static str),
    /// Passes without reaching the target: it finds its ports in nvmet's configfs (none) and
    /// connects nothing; its full output shows it.
    Vacuous(&'static str),
    /// Fails on the host's side: the same host fails the same way against the kernel's own
    /// nvmet in the same VM (the scenario's reference run).
    HostSide(&'static str),
    /// Needs a local NVMe device (TEST_DEVS): `check` does not list it for a fabrics target.
    NotListed,
}

/// The nvme group at blktests a608cb5, on the Debian 6.12 guest, against p2pnvmf.
fn expected(test: &str) -> Expect {
    use Expect::*;
    let n: u32 = test.trim_start_matches("nvme/").parse().expect("nvme/NNN");
    match n {
        // Loop-transport tests.
        2 | 16 | 17 | 52 => NotRun("is not supported in this test"),
        55 => NotRun("kernel option DEBUG_ATOMIC_SLEEP has not been enabled"),
        30 => NotRun("Linux kernel soft target not available"),
        32..=37 | 39 | 46 | 49 | 50 | 53 | 59 | 64 | 66 | 67 => NotListed,
        // Host DH-HMAC-CHAP attributes set with _set_nvmet_hostkey/_ctrlkey/_hash/_dhgroup.
        42..=45 => Configfs("/sys/kernel/config/nvmet/hosts/nqn.2014-08.org.nvmexpress:uuid:0f01fb42"),
        // Reads nvmet's attr_qid_max to decide.
        48 => NotRun("missing attr_qid_max feature"),
        51 => Configfs("/sys/kernel/config/nvmet/subsystems/blktests-subsystem-1/namespaces/1/enable"),
        // Looks for nvmet's resv_enable (reservations: a later issue).
        54 => NotRun("missing reservation feature"),
        56 => NotRun("kernel option ULP_DDP has not been enabled"),
        57 => Vacuous("disconnected 0 controller(s)"),
        58 => {
            Configfs("cannot create directory '/sys/kernel/config/nvmet/subsystems/blktests-subsystem-1/namespaces/1'")
        }
        60 => NotRun("kernel option NVME_TARGET_DEBUGFS has not been enabled"),
        62 | 63 => NotRun("tlshd"),
        65 => NotRun("kernel does not support unmap write zeroes sysfs interface"),
        // delayed_removal_secs came with Linux 6.16; the guest's host is 6.12.
        68 => HostSide("delayed_removal_secs: Permission denied"),
        69 => NotRun("kernel option KASAN has not been enabled"),
        _ => Pass,
    }
}

/// blktests at the commit in `../shared/third_party` (a608cb5).
const BLKTESTS_TAR: &str = "blktests-a608cb5.tar.gz";

fn tarball() -> PathBuf {
    let p = repo_root().join("../shared/third_party").join(BLKTESTS_TAR);
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

/// The nvme group's tests in the tarball's listing (`tests/nvme/NNN`) that `check` lists for a
/// fabrics target.
fn group() -> Vec<String> {
    let out = std::process::Command::new("tar").arg("tzf").arg(tarball()).output().expect("tar");
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("blktests/tests/nvme/"))
        .filter(|t| t.len() == 3 && t.bytes().all(|b| b.is_ascii_digit()))
        .map(|t| format!("nvme/{t}"))
        .filter(|t| expected(t) != Expect::NotListed)
        .collect();
    v.sort();
    assert!(v.len() > 40, "nvme tests in {BLKTESTS_TAR}: {v:?}");
    v
}

/// `BT_ALL=1` (`tests/run.sh --full`): the whole group on both backends over both transports.
fn whole_run() -> bool {
    std::env::var_os("BT_ALL").is_some()
}

/// The group's three longest on loop devices (60-85 s each on 2 cores): a 350 MiB fio verify
/// (010), xfs with fio on it (012), 10 connect/disconnect rounds (031). CI has their paths in
/// other scenarios (fio verify over both transports, 100 RDMA connect cycles).
const LONG: [&str; 3] = ["nvme/010", "nvme/012", "nvme/031"];

/// The whole run: the group. CI: the tests that reach the target and pass — those skipped by
/// blktests, failing outside the target or passing without reaching it say nothing of it (the
/// whole run checks their evidence) — less the [`LONG`] ones.
fn selection(all: Vec<String>) -> Vec<String> {
    if whole_run() {
        return all;
    }
    all.into_iter().filter(|t| expected(t) == Expect::Pass && !LONG.contains(&t.as_str())).collect()
}

/// The whole run: both transports. CI: `ci`, each transport once over the two backends (the
/// group through a loop device over TCP took 12 min on 2 cores, and as long again over RDMA).
fn transports(ci: &'static str) -> &'static str {
    if whole_run() { "tcp rdma" } else { ci }
}

/// One outcome per (transport, test) from the scenario's summary.
fn outcomes(run_dir: &Path) -> BTreeMap<(String, String), (String, String)> {
    let tsv = std::fs::read_to_string(run_dir.join("blktests-summary.tsv")).expect("the summary");
    tsv.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.splitn(4, '\t').collect();
            (f.len() == 4).then(|| ((f[0].into(), f[1].into()), (f[2].into(), f[3].into())))
        })
        .collect()
}

/// The full output blktests kept of `test` (`nvme/NNN`) in a run's results
/// (`bt-results-RUN/<device and conditions>/nvme/NNN.full`).
fn full_output(run_dir: &Path, run: &str, test: &str) -> String {
    let dir = run_dir.join(format!("bt-results-{run}"));
    let Ok(entries) = std::fs::read_dir(&dir) else { return String::new() };
    entries
        .flatten()
        .map(|e| e.path().join(format!("{test}.full")))
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default()
}

/// Runs `tests` over each of `trtypes` with `backend`, and checks every outcome against
/// [`expected`].
fn run(name: &str, topology: Topology, backend: &str, trtypes: &str, tests: &[String], img: &str) {
    let host_side: Vec<&str> =
        tests.iter().map(String::as_str).filter(|t| matches!(expected(t), Expect::HostSide(_))).collect();
    let out = Scenario::new(name, topology, "blktests.sh")
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .binary("BT_CONTROL", repo_root().join("tests/blktests/nvme-target-control"))
        .binary("BLKTESTS_TAR", tarball())
        .env("BT_TRTYPES", trtypes)
        .env("BT_BACKEND", backend)
        .env("BT_IMG_SIZE", img)
        .env("BT_TESTS", tests.join(" "))
        .env("BT_REFERENCE", host_side.join(" "))
        .memory(4096)
        .timeout(Duration::from_secs(2400))
        .run_ok();
    let got = outcomes(&out.run_dir);
    let mut wrong = Vec::new();
    for tr in trtypes.split_whitespace() {
        let run = format!("{tr}-{backend}");
        for test in tests {
            let want = expected(test);
            let Some((status, detail)) = got.get(&(tr.to_string(), test.to_string())) else {
                if want != Expect::NotListed {
                    wrong.push(format!("{tr} {test}: expected {want:?}, blktests did not list it"));
                }
                continue;
            };
            eprintln!("{tr:5} {test:9} {status:8} {}", if status == "passed" { "" } else { detail.as_str() });
            let ok = match want {
                Expect::Pass => status == "passed",
                Expect::NotRun(why) => status == "not run" && detail.contains(why),
                Expect::Configfs(evidence) => status == "failed" && detail.contains(evidence),
                Expect::Vacuous(evidence) => {
                    status == "passed" && full_output(&out.run_dir, &run, test).contains(evidence)
                }
                Expect::HostSide(evidence) => {
                    let kernel = got.get(&("kernel-tcp".to_string(), test.to_string()));
                    status == "failed"
                        && detail.contains(evidence)
                        && kernel.is_some_and(|(s, d)| s == "failed" && d.contains(evidence))
                }
                Expect::NotListed => false,
            };
            if !ok {
                wrong.push(format!("{tr} {test}: expected {want:?}, got {status}: {detail}"));
            }
        }
    }
    assert!(wrong.is_empty(), "blktests outcomes differ from the expected ones:\n{}", wrong.join("\n"));
}

/// The group, each namespace a file namespace on a loop device (as blktests' own set-up gives
/// the kernel target): over NVMe/TCP in CI, over both transports with `BT_ALL=1`.
#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_blktests_nvme_on_a_block_device() {
    // 012's xfs test needs 350 MiB.
    run("blktests-device", Topology::nic_only(), "device", transports("tcp"), &selection(group()), "350M");
}

/// The nvme-vfio backend: each subsystem blktests sets up takes the SSD (vfio-pci, the guest
/// IOMMU) and gives it back at cleanup. In CI the tests that move data or check identities on a
/// 128 MiB SSD over NVMe/RDMA; with `BT_ALL=1` the group on 350 MiB over both transports.
#[test]
#[ignore = "boots a VM: run by tests/run.sh"]
fn vm_blktests_nvme_on_nvme_vfio() {
    let subset = ["004", "008", "010", "018", "019", "022", "026", "029", "040", "047", "061"];
    let (tests, size_mib) = match whole_run() {
        true => (group(), 350),
        false => (subset.iter().map(|t| format!("nvme/{t}")).collect(), 128),
    };
    let topo = Topology::new()
        .iommu()
        .root_port("rp1")
        .nvme("ssd", "rp1", Nvme { serial: "BLKTESTS1".into(), size_mib, cmb_mib: None, block_size: None })
        .nic("pcie.0");
    run("blktests-nvme-vfio", topo, "nvme-vfio", transports("rdma"), &tests, &format!("{size_mib}M"));
}

#[test]
fn a_tests_full_output_is_found_under_its_conditions_directory() {
    let dir = std::env::temp_dir().join(format!("p2pnvmf-bt-full-{}", std::process::id()));
    let nvme = dir.join("bt-results-tcp-device/nodev_tr_tcp/nvme");
    std::fs::create_dir_all(&nvme).unwrap();
    std::fs::write(nvme.join("057.full"), "NQN:blktests-subsystem-1 disconnected 0 controller(s)\n").unwrap();
    assert!(full_output(&dir, "tcp-device", "nvme/057").contains("disconnected 0 controller(s)"));
    assert_eq!(full_output(&dir, "rdma-device", "nvme/057"), "");
    std::fs::remove_dir_all(&dir).unwrap();
}
