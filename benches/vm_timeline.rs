//! `cargo bench --bench vm_timeline`: where each QD1 read's time goes, timed for the kernel
//! target and ours in poll mode by the same events of the guest kernel's own trace
//! (`bench-timeline.sh`, read by `p2pnvmf_vmrig::ftrace`): submitted → in the target (the
//! host's send and the transport's delivery; not seen for ours over RDMA) → answered (the
//! target's own work), answered → at the host's
//! socket (over TCP: the answer's way through the target's send and the loopback), → completed
//! (the host's receive work, and any wake-up of its CPU), completed → the next submission
//! (fio's turn). fio 4k random reads at queue depth 1 on CPU `FIO_CPU` (default 0), the poller
//! on CPU `POLL_CPU` (default 1), `ROUNDS` interleaved rounds (default 3) of `BENCH_RUNTIME`
//! seconds (default 5); `HOST_POLL=1` has the host poll (a poll queue and fio's `--hipri`),
//! `DEDICATED=1` gives the poller's vCPU a host CPU of its own. Writes
//! `target/bench/vm_timeline.md`. Every figure is of a traced run: tracing slows both sides.
//! Beside each target's pooled medians, the medians of each round's slowest 1% of commands:
//! which stretches a tail is made of.

use std::fmt::Write as _;
use std::path::Path;

use p2pnvmf_vmrig::ftrace::{self, Event, Io, STRETCHES};
use p2pnvmf_vmrig::{Scenario, Topology, write_bench_result};
use serde_json::Value;

/// fio's IOPS and p99 total latency (µs) of a run.
fn fio(json: &Path) -> Option<(f64, f64)> {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(json).ok()?).ok()?;
    let read = &doc["jobs"][0]["read"];
    Some((read["iops"].as_f64()?, read["lat_ns"]["percentile"]["99.000000"].as_f64()? / 1000.0))
}

fn cell(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |x| format!("{x:.0}"))
}

fn main() {
    let mut scn = Scenario::new("bench-timeline", Topology::nic_only().steady_clock(), "bench-timeline.sh")
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .timeout(std::time::Duration::from_secs(1800));
    for key in ["BENCH_RUNTIME", "ROUNDS", "FIO_CPU", "POLL_CPU", "HOST_POLL"] {
        if let Ok(v) = std::env::var(key) {
            scn = scn.env(key, v);
        }
    }
    let out = scn.dedicated_poller_from_env(false).run_ok();
    let mut table = String::from("| transport | target | round | IOPS | p99 µs | commands | period µs |");
    for (name, ..) in STRETCHES {
        let _ = write!(table, " {name} µs |");
    }
    table.push_str(" IPIs per command | fio slept |\n|---|---|---|---|---|---|---|");
    table.push_str(&"---|".repeat(STRETCHES.len() + 2));
    table.push('\n');
    for t in ["tcp", "rdma"] {
        for target in ["kernel", "poll"] {
            let (mut all, mut tails): (Vec<Io>, Vec<Io>) = (Vec::new(), Vec::new());
            for round in (1..).take_while(|r| out.run_dir.join(format!("{t}.{target}.{r}.trace")).exists()) {
                let base = format!("{t}.{target}.{round}");
                let text = std::fs::read_to_string(out.run_dir.join(format!("{base}.trace"))).expect("trace");
                // The first commands run while fio starts up.
                let ios: Vec<Io> = ftrace::ios(text.lines().filter_map(Event::parse)).into_iter().skip(10).collect();
                let (iops, p99) = fio(&out.run_dir.join(format!("{base}.json"))).unzip();
                row(&mut table, t, target, &round.to_string(), iops, p99, &ios);
                // Each round's own slowest: a round the rig slowed as a whole does not take the tail.
                tails.extend(ftrace::slowest(&ios, 0.01));
                all.extend(ios);
            }
            row(&mut table, t, target, "all", None, None, &all);
            row(&mut table, t, target, "slowest 1% of each", None, None, &tails);
        }
    }
    println!("{table}");
    write_bench_result("vm_timeline.md", &table);
}

fn row(table: &mut String, t: &str, target: &str, round: &str, iops: Option<f64>, p99: Option<f64>, ios: &[Io]) {
    let s = ftrace::summary(ios);
    let who = if target == "poll" { "p2pnvmf poll mode" } else { "kernel" };
    let _ = write!(table, "| {t} | {who} | {round} | {} | {} | {} | {:.0} |", cell(iops), cell(p99), s.ios, s.period);
    for x in &s.stretches {
        let _ = write!(table, " {} |", cell(*x));
    }
    let _ = writeln!(table, " {:.2} | {:.0}% |", s.ipis, s.fio_slept * 100.0);
}
