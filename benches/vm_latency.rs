//! `cargo bench --bench vm_latency`: where a QD1 command's time goes. fio 4k randread at queue
//! depth 1 against the kernel target and p2pnvmf (RAM namespace) over TCP and RDMA; our
//! target traces each command, so each command's time splits into inside the target (capsule
//! received → answer written or posted) and outside it (answer → the next capsule: wire, host,
//! fio and every wake-up on the way); the kernel target's commands split the same way from its
//! own tracepoints (`nvmet_req_init` → `nvmet_req_complete`, in a traced run of its own).
//! Prints the price of a thread's wake-up on one CPU and across two (`wake-cost`, with the IPIs
//! it caused), percentiles of both splits beside fio's
//! latency, the target's system calls per I/O by name (a third, counted run), the top of a CPU
//! profile of the target during the TCP run, and a fourth, quiet run in poll mode (the poller
//! pinned to CPU `POLL_CPU`, default 1). `POLL=1` runs the first two in poll mode and leaves
//! out the others; `TARGET_WORKERS=N` runs the target with N tokio worker threads; `PIN_CPU=C`
//! pins fio and our target to CPU C; `FIO_CPU=C` pins fio alone, for every target; `HOST_POLL=1`
//! has the host poll (a poll queue and fio's `--hipri`), for every target; `IDLE_POLL=1` boots
//! the guest with `idle=poll` (idle vCPUs spin: no wake-up finds one asleep in qemu);
//! `DEDICATED=1` gives the poller's vCPU a host CPU of its own (`Scenario::dedicated_vcpu`).

use p2pnvmf_vmrig::{Scenario, Topology};
use serde_json::Value;

/// Microseconds since midnight from a tracing line's RFC 3339 timestamp.
fn micros(line: &str) -> Option<f64> {
    let t = line.split_whitespace().next()?.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = t.split(':');
    let (h, m, s) =
        (parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?);
    Some(((h * 60.0 + m) * 60.0 + s) * 1e6)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p / 100.0).round() as usize]
}

fn summary(name: &str, v: &mut [f64]) -> String {
    if v.is_empty() {
        return format!("{name}: no samples");
    }
    format!("{name}: n {} p50 {:.0} p99 {:.0} p99.9 {:.0} µs", v.len(), pct(v, 50.0), pct(v, 99.0), pct(v, 99.9))
}

/// fio's figures of a run, the IPIs per I/O during it and, in poll mode, the poller's busy
/// time per I/O and how often it was preempted (all written beside its JSON).
fn fio_lat(path: &std::path::Path) -> String {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("fio result")).expect("fio json");
    let r = &doc["jobs"][0]["read"];
    let p = |k: &str| r["lat_ns"]["percentile"][k].as_f64().unwrap_or(0.0) / 1000.0;
    let beside = |ext: &str| {
        std::fs::read_to_string(format!("{}.{ext}", path.display())).ok().and_then(|t| t.trim().parse::<f64>().ok())
    };
    let ios = r["total_ios"].as_f64().unwrap_or(0.0).max(1.0);
    let ipis = beside("ipis");
    let busy = beside("busy").map_or_else(String::new, |s| format!(", poller busy {:.0} µs per I/O", s * 1e6 / ios));
    let preempted = beside("preempted")
        .map_or_else(String::new, |n| format!(", poller preempted {n:.0} times ({:.2} per I/O)", n / ios));
    format!(
        "IOPS {:.0}, latency p50 {:.0} p99 {:.0} p99.9 {:.0} µs, IPIs per I/O {}{busy}{preempted}",
        r["iops"].as_f64().unwrap_or(0.0),
        p("50.000000"),
        p("99.000000"),
        p("99.900000"),
        ipis.map_or_else(|| "-".into(), |n| format!("{:.2}", n / ios))
    )
}

/// The target's system calls per fio I/O by name, most frequent first (the counting run).
fn syscalls(dir: &std::path::Path, t: &str) -> String {
    let (Ok(perf), Ok(fio)) = (
        std::fs::read_to_string(dir.join(format!("{t}.syscalls.txt"))),
        std::fs::read_to_string(dir.join(format!("{t}.ours-syscalls.json"))),
    ) else {
        return "not counted".into();
    };
    let doc: Value = serde_json::from_str(&fio).expect("fio json");
    let ios = doc["jobs"][0]["read"]["total_ios"].as_f64().unwrap_or(0.0).max(1.0);
    let mut counts: Vec<(f64, &str)> = perf
        .lines()
        .filter_map(|l| {
            let mut f = l.split(',');
            let n = f.next()?.parse::<f64>().ok()?;
            let name = f.nth(1)?.strip_prefix("syscalls:sys_enter_")?;
            (n > 0.0).then_some((n, name))
        })
        .collect();
    counts.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total: f64 = counts.iter().map(|c| c.0).sum();
    let top: Vec<String> = counts.iter().take(8).map(|(n, name)| format!("{name} {:.2}", n / ios)).collect();
    format!("{:.2} in all: {}", total / ios, top.join(", "))
}

/// Splits a run's events — (µs, true) where a read begins, (µs, false) where its answer is
/// done — into each read's time inside (begin → done) and outside (done → the next begin).
fn split(events: impl Iterator<Item = (f64, bool)>) -> (Vec<f64>, Vec<f64>) {
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    let (mut last_begin, mut last_done) = (None, None);
    for (ts, begins) in events {
        if begins {
            if let Some(d) = last_done.take() {
                outside.push(ts - d);
            }
            last_begin = Some(ts);
        } else if let Some(b) = last_begin.take() {
            inside.push(ts - b);
            last_done = Some(ts);
        }
    }
    (inside, outside)
}

fn main() {
    let mut topology = Topology::nic_only().steady_clock();
    if std::env::var("IDLE_POLL").is_ok_and(|v| v == "1") {
        topology = topology.idle_poll();
    }
    let mut scn = Scenario::new("bench-latency", topology, "bench-latency.sh")
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .binary("P2PNVMF_WAKE_COST", env!("CARGO_BIN_EXE_wake-cost"))
        .timeout(std::time::Duration::from_secs(900));
    for key in ["BENCH_RUNTIME", "TARGET_WORKERS", "PIN_CPU", "FIO_CPU", "POLL", "POLL_CPU", "HOST_POLL"] {
        if let Ok(v) = std::env::var(key) {
            scn = scn.env(key, v);
        }
    }
    let out = scn.dedicated_poller_from_env(false).run_ok();
    let wake = std::fs::read_to_string(out.run_dir.join("wake-cost.txt")).expect("wake-cost's figures");
    println!("thread wake-ups (wake-cost):\n{}", wake.trim_end());
    let log = std::fs::read_to_string(out.run_dir.join("target.log")).expect("target log");
    for t in ["tcp", "rdma"] {
        let (start, end) = (format!("mark {t} start"), format!("mark {t} end"));
        // The traced run is the second between its marks.
        let traced = log.match_indices(&start).nth(1).map_or("", |(i, _)| &log[i..]);
        let lines: Vec<&str> = traced.lines().take_while(|l| !l.contains(&end)).collect();
        // The event that starts a read, the one that hands its answer to the transport (where
        // the kernel's nvmet_req_complete is) and, over TCP, the one that writes it.
        let (begin, answered) = match t {
            "tcp" => ("capsule", "answer queued"),
            _ => ("rdma request: new", "to=Completing"),
        };
        let events = |done: &'static str| {
            lines.iter().filter_map(move |l| {
                let ts = micros(l)?;
                if l.contains(begin) && l.contains("opcode=2") {
                    Some((ts, true))
                } else {
                    l.contains(done).then_some((ts, false))
                }
            })
        };
        let kernel_trace =
            std::fs::read_to_string(out.run_dir.join(format!("{t}.kernel-trace.txt"))).unwrap_or_default();
        let kernel_events = kernel_trace.lines().filter_map(|l| {
            let (head, rest) = l.split_once(": nvmet_req_")?;
            let ts = head.rsplit(' ').next()?.parse::<f64>().ok()? * 1e6;
            let qid = rest.split("qid=").nth(1)?.split(',').next()?;
            match (rest.starts_with("init"), qid) {
                (_, "0") => None,
                (true, _) => rest.contains("nvme_cmd_read").then_some((ts, true)),
                (false, _) => Some((ts, false)),
            }
        });
        println!("{t}: kernel target: {}", fio_lat(&out.run_dir.join(format!("{t}.kernel.json"))));
        println!("{t}: kernel traced: {}", fio_lat(&out.run_dir.join(format!("{t}.kernel-traced.json"))));
        println!("{t}: p2pnvmf:        {}", fio_lat(&out.run_dir.join(format!("{t}.ours-quiet.json"))));
        println!("{t}: p2pnvmf traced: {}", fio_lat(&out.run_dir.join(format!("{t}.ours-traced.json"))));
        let poll = out.run_dir.join(format!("{t}.ours-poll.json"));
        if poll.exists() {
            println!("{t}: p2pnvmf poll:   {}", fio_lat(&poll));
        }
        let (mut inside, mut outside) = split(kernel_events);
        println!("{t}:   kernel: {}", summary("inside (nvmet_req_init -> nvmet_req_complete)", &mut inside));
        println!("{t}:   kernel: {}", summary("outside (complete -> next read's init)", &mut outside));
        let (mut inside, mut outside) = split(events(answered));
        println!("{t}:   ours:   {}", summary("inside (command in -> answer to the transport)", &mut inside));
        println!("{t}:   ours:   {}", summary("outside (answer to the transport -> next command in)", &mut outside));
        if t == "tcp" {
            let (mut inside, mut outside) = split(events("batch written"));
            println!("{t}:   ours:   {}", summary("inside to the wire (capsule in -> answer written)", &mut inside));
            println!(
                "{t}:   ours:   {}",
                summary("outside the wire (answer written -> next capsule in)", &mut outside)
            );
        }
        println!("{t}:   system calls per I/O: {}", syscalls(&out.run_dir, t));
    }
    if let Ok(perf) = std::fs::read_to_string(out.run_dir.join("perf.txt")) {
        println!("CPU profile of the target during the TCP run (perf, cpu-clock):\n{perf}");
    }
}
