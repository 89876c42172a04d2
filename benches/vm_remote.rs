//! `cargo bench --bench vm_remote`: the targets served to a host in a second VM, as a remote
//! host is served. The target VM (two vCPUs) runs the kernel's nvmet (brd) and p2pnvmf (RAM
//! namespace; the default mode and poll mode, its poller on CPU `POLL_CPU`, default 1) in turn;
//! the host VM (one vCPU) connects across a link between the two VMs (TCP and soft-RoCE) and
//! runs fio: 4k random reads at QD1, random reads and writes at QD32, `BENCH_RUNTIME` seconds
//! each (default 5), `BENCH_RUNS` rounds (default 3) in rotating order. Unlike the one-VM
//! benches, no target shares a CPU with the host's initiator or fio, and no target's answer is
//! an IPI to the host's vCPU: what is left is each target's own delivery. Prints medians (min
//! and max) beside the kernel target, with the target VM's CPU per I/O (all of that VM's busy
//! time: nothing else runs there), and writes `target/bench/vm_remote.md`. The poller's vCPU
//! has a host CPU to itself, every other qemu thread of both VMs the other
//! ([`Scenario::dedicated_vcpu`]; `DEDICATED=0` leaves them all to the host's scheduler).
//! `PROFILE=1` adds a system-wide CPU profile of the target VM during the runs of the kernel
//! target and of ours in the default mode (printed for round 1).

use std::fmt::Write as _;
use std::path::Path;

use p2pnvmf_vmrig::{Scenario, Topology, read_pairs, write_bench_result};
use serde_json::Value;

const JOBS: [&str; 3] = ["qd1-randread", "qd32-randread", "qd32-randwrite"];
const TARGETS: [&str; 3] = ["kernel", "ours", "poll"];

/// One figure of a fio result: IOPS, a total-latency percentile (µs), or the target VM's
/// CPU-µs per I/O (from the `.cpu` file beside the JSON).
fn figure(json: &Path, what: &str) -> Option<f64> {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(json).ok()?).ok()?;
    let job = &doc["jobs"][0];
    let side = if job["write"]["total_ios"].as_f64()? > 0.0 { &job["write"] } else { &job["read"] };
    let ios = side["total_ios"].as_f64()?.max(1.0);
    match what {
        "IOPS" => side["iops"].as_f64(),
        "p50 µs" => side["lat_ns"]["percentile"]["50.000000"].as_f64().map(|ns| ns / 1000.0),
        "p99 µs" => side["lat_ns"]["percentile"]["99.000000"].as_f64().map(|ns| ns / 1000.0),
        _ => {
            let cpu = read_pairs(Path::new(&format!("{}.cpu", json.display())))?;
            Some(cpu.get("busy_ticks")? / cpu.get("hz")? * 1e6 / ios)
        }
    }
}

/// Median, min and max of a figure over the rounds.
fn stats(dir: &Path, target: &str, t: &str, job: &str, what: &str) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = (1..=99)
        .map(|round| dir.join(format!("{target}.{t}.{job}.{round}.json")))
        .take_while(|p| p.exists())
        .filter_map(|p| figure(&p, what))
        .collect();
    v.sort_by(f64::total_cmp);
    Some((*v.get(v.len() / 2)?, v[0], v[v.len() - 1]))
}

fn fmt(x: f64) -> String {
    if x >= 100.0 { format!("{x:.0}") } else { format!("{x:.1}") }
}

fn main() {
    let mut scn = Scenario::new("bench-remote", Topology::nic_only().steady_clock(), "remote-target.sh")
        .remote_host("remote-host.sh")
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .timeout(std::time::Duration::from_secs(2400));
    for key in ["BENCH_RUNTIME", "BENCH_RUNS", "POLL_CPU", "PROFILE"] {
        if let Ok(v) = std::env::var(key) {
            scn = scn.env(key, v);
        }
    }
    let out = scn.dedicated_poller_from_env(true).run_ok();
    let mut table = String::from(
        "| transport | fio job | metric | kernel median (min–max) | p2pnvmf | ours / kernel | p2pnvmf poll mode | poll / kernel |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for t in ["tcp", "rdma"] {
        for job in JOBS {
            for what in ["IOPS", "p50 µs", "p99 µs", "CPU µs/IO"] {
                let [k, o, p] = TARGETS.map(|target| stats(&out.run_dir, target, t, job, what));
                let cell = |s: Option<(f64, f64, f64)>| {
                    s.map_or_else(|| "-".into(), |(med, min, max)| format!("{} ({}–{})", fmt(med), fmt(min), fmt(max)))
                };
                let ratio = |s: Option<(f64, f64, f64)>| match (s, k) {
                    (Some((a, ..)), Some((b, ..))) if b > 0.0 => format!("{:.2}", a / b),
                    _ => "-".into(),
                };
                let _ = writeln!(
                    table,
                    "| {t} | {job} | {what} | {} | {} | {} | {} | {} |",
                    cell(k),
                    cell(o),
                    ratio(o),
                    cell(p),
                    ratio(p)
                );
            }
        }
    }
    println!("{table}");
    for t in ["tcp", "rdma"] {
        for (job, target) in JOBS.iter().flat_map(|j| ["kernel", "ours"].map(|o| (*j, o))) {
            let perf = out.run_dir.join(format!("{target}.{t}.{job}.1.json.perf.txt"));
            if let Ok(text) = std::fs::read_to_string(perf) {
                println!("the target VM's CPU profile during {target}'s {job} over {t}, round 1:\n{text}");
            }
        }
    }
    write_bench_result("vm_remote.md", &table);
}
