//! `cargo bench --bench vm_fio`: p2pnvmf beside the kernel's nvmet target in the VM, over RDMA
//! (rxe) and TCP, on the same kinds of backing (brd through our file backend and our RAM
//! namespace; null_blk with 0.5 ms completions through our file backend), fio with io_uring.
//! Every job runs BENCH_RUNS times (default 3), kernel and ours interleaved, BENCH_RUNTIME
//! seconds each (default 5), then ours again in poll mode (its poller pinned to CPU `POLL_CPU`,
//! default 1). Writes `target/bench/vm_fio.{json,md,png}` and prints the table: medians with
//! min and max, ours / kernel per row for both modes, CPU-µs per I/O for the QD1 and QD32 rows,
//! and our target's system calls per I/O (counted by perf in a pass of their own). Under TCG
//! only ratios within one run mean anything. `DEDICATED=1` gives the poller's vCPU a host CPU of
//! its own, every other qemu thread the other (`Scenario::dedicated_vcpu`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use p2pnvmf_vmrig::{Scenario, Topology, read_pairs, repo_root, write_bench_result};
use serde_json::{Value, json};

/// A measured quantity of a fio job and which way is better.
#[derive(Debug, Clone, Copy)]
enum Metric {
    Iops,
    MibPerSec,
    /// Latency percentile (submission to completion, as the application sees it), in µs.
    Lat(&'static str, &'static str),
    /// CPU time per I/O, in µs (see [`cpu_per_io`]).
    CpuPerIo,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Iops => "IOPS",
            Metric::MibPerSec => "MiB/s",
            Metric::Lat(name, _) => name,
            Metric::CpuPerIo => "CPU µs/IO",
        }
    }

    fn higher_is_better(self) -> bool {
        !matches!(self, Metric::Lat(..) | Metric::CpuPerIo)
    }

    /// The metric from one side (read or write) of fio's JSON; not for CPU.
    fn of(self, side: &Value) -> Option<f64> {
        match self {
            Metric::CpuPerIo => None,
            Metric::Iops => side["iops"].as_f64(),
            Metric::MibPerSec => side["bw"].as_f64().map(|kib| kib / 1024.0),
            // Total latency, not completion latency: the kernel's TCP host may finish a command
            // inside the submitting system call, which clat does not count.
            Metric::Lat(_, key) => side["lat_ns"]["percentile"][key].as_f64().map(|ns| ns / 1000.0),
        }
    }
}

const QD1: [Metric; 5] = [
    Metric::Iops,
    Metric::Lat("p50 µs", "50.000000"),
    Metric::Lat("p99 µs", "99.000000"),
    Metric::Lat("p99.9 µs", "99.900000"),
    Metric::CpuPerIo,
];

/// The table's rows: (our backing, the kernel's backing, job, metrics).
fn rows() -> Vec<(&'static str, &'static str, &'static str, Vec<Metric>)> {
    let mut v = Vec::new();
    for ours in ["brd", "ram"] {
        v.push((ours, "brd", "qd1-randread", QD1.to_vec()));
        v.push((ours, "brd", "qd1-randread-hostpoll", QD1.to_vec()));
        for job in ["qd32x2-randread", "qd32x2-randwrite", "qd32x1-randread"] {
            v.push((ours, "brd", job, vec![Metric::Iops, Metric::CpuPerIo]));
        }
        for job in ["seq128k-read", "seq128k-write"] {
            v.push((ours, "brd", job, vec![Metric::MibPerSec]));
        }
    }
    v.push(("null", "null", "qd1-randread", QD1.to_vec()));
    v.push(("null", "null", "qd32x1-randread", vec![Metric::Iops]));
    v
}

fn backing_label(b: &str) -> &'static str {
    match b {
        "brd" => "brd (ours: file backend)",
        "ram" => "kernel brd / our RAM namespace",
        _ => "null_blk 0.5 ms (ours: file backend)",
    }
}

/// Values of `metric` over the runs of one side.
fn values(dir: &Path, t: &str, backing: &str, job: &str, who: &str, metric: Metric) -> Vec<f64> {
    let mut v = Vec::new();
    for run in 1.. {
        let path = dir.join(format!("{t}.{backing}.{job}.{who}.{run}.json"));
        let Ok(text) = std::fs::read_to_string(&path) else { break };
        let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let x = match metric {
            Metric::CpuPerIo => cpu_per_io(&path, &dir.join(format!("{t}.idle.{run}")), &doc, who != "kernel"),
            _ => {
                let side = if job.contains("write") { "write" } else { "read" };
                metric.of(&doc["jobs"][0][side])
            }
        };
        v.push(x.unwrap_or_else(|| panic!("{}: no {}", path.display(), metric.name())));
    }
    v
}

/// I/Os fio completed (reads and writes).
fn ios(doc: &Value) -> Option<f64> {
    let job = &doc["jobs"][0];
    Some(job["read"]["total_ios"].as_f64()? + job["write"]["total_ios"].as_f64()?)
}

/// CPU-µs per I/O of the run whose fio JSON is `json`: the guest's kernel time (system, irq,
/// softirq — the kernel target, the host's initiator and fio's system calls) plus, for our
/// target, its user time, less the kernel time the idle baseline `idle` shows for as long,
/// over fio's I/Os. The host side is in both targets' figures alike.
fn cpu_per_io(json: &Path, idle: &Path, doc: &Value, ours: bool) -> Option<f64> {
    let run = read_pairs(&PathBuf::from(format!("{}.cpu", json.display())))?;
    let idle = read_pairs(idle)?;
    let idle_per_ns = idle.get("kernel_ticks")? / idle.get("ns")?;
    let user = if ours { *run.get("target_user_ticks")? } else { 0.0 };
    let ticks = run.get("kernel_ticks")? + user - idle_per_ns * run.get("ns")?;
    Some(ticks / run.get("hz")? * 1e6 / ios(doc)?)
}

/// Our target's system calls per I/O in the counting pass of `job` over `t` in `mode` (`ours`:
/// the default, or `poll`).
fn syscalls_per_io(dir: &Path, t: &str, job: &str, mode: &str) -> Option<f64> {
    let perf = std::fs::read_to_string(dir.join(format!("{t}.brd.{job}.{mode}.syscalls"))).ok()?;
    let count: f64 = perf.lines().find(|l| l.contains("raw_syscalls:sys_enter"))?.split(',').next()?.parse().ok()?;
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{t}.brd.{job}.{mode}.syscalls.json"))).ok()?)
            .ok()?;
    Some(count / ios(&doc)?)
}

fn stats(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(f64::total_cmp);
    json!({ "median": v[v.len() / 2], "min": v[0], "max": v[v.len() - 1], "runs": v.len() })
}

fn fmt(x: f64) -> String {
    if x >= 100.0 { format!("{x:.0}") } else { format!("{x:.1}") }
}

fn main() {
    let runtime = std::env::var("BENCH_RUNTIME").unwrap_or_else(|_| "5".into());
    let runs = std::env::var("BENCH_RUNS").unwrap_or_else(|_| "3".into());
    let poll_cpu = std::env::var("POLL_CPU").unwrap_or_else(|_| "1".into());
    let scn = Scenario::new("bench-fio", Topology::nic_only().steady_clock(), "bench-fio.sh")
        .binary("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .env("BENCH_RUNTIME", runtime.clone())
        .env("BENCH_RUNS", runs.clone())
        .env("POLL_CPU", poll_cpu.clone())
        .timeout(std::time::Duration::from_secs(5400))
        // brd devices, a RAM namespace and 32 RDMA queues' data areas at once.
        .memory(4096);
    let out = scn.dedicated_poller_from_env(false).run_ok();
    let dir = out.run_dir.join("results");

    let mut table = String::from(
        "| transport | backing | fio job | metric | kernel median (min–max) | p2pnvmf median (min–max) | ours / kernel | p2pnvmf poll mode | poll / kernel |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let mut rows_json = Vec::new();
    for t in ["rdma", "tcp"] {
        for (ours_backing, kernel_backing, job, metrics) in rows() {
            for m in metrics {
                let k = stats(values(&dir, t, kernel_backing, job, "kernel", m));
                let o = stats(values(&dir, t, ours_backing, job, "ours", m));
                let p = stats(values(&dir, t, ours_backing, job, "poll", m));
                let ratio = |s: &Value| Some(s["median"].as_f64()? / k["median"].as_f64()?);
                let cell = |s: &Value| match (s["median"].as_f64(), s["min"].as_f64(), s["max"].as_f64()) {
                    (Some(med), Some(min), Some(max)) => format!("{} ({}–{})", fmt(med), fmt(min), fmt(max)),
                    _ => "-".into(),
                };
                let better = if m.higher_is_better() { "" } else { " (lower is better)" };
                let shown = |r: Option<f64>| r.map_or_else(|| "-".into(), |r| format!("{r:.2}{better}"));
                let _ = writeln!(
                    table,
                    "| {t} | {} | {job} | {} | {} | {} | {} | {} | {} |",
                    backing_label(ours_backing),
                    m.name(),
                    cell(&k),
                    cell(&o),
                    shown(ratio(&o)),
                    cell(&p),
                    shown(ratio(&p)),
                );
                rows_json.push(json!({
                    "transport": t, "backing": ours_backing, "kernel_backing": kernel_backing, "job": job,
                    "metric": m.name(), "higher_is_better": m.higher_is_better(),
                    "kernel": k, "ours": o, "ratio": ratio(&o), "poll": p, "poll_ratio": ratio(&p),
                }));
            }
        }
    }
    let mut syscalls = BTreeMap::new();
    let _ = writeln!(
        table,
        "\n| transport | fio job (brd, ours: file backend) | system calls per I/O: kernel | p2pnvmf | poll mode |\n|---|---|---|---|---|"
    );
    for t in ["rdma", "tcp"] {
        for job in ["qd1-randread", "qd32x2-randread"] {
            let mut cells = Vec::new();
            for mode in ["ours", "poll"] {
                let n = syscalls_per_io(&dir, t, job, mode);
                cells.push(n.map_or_else(|| "not counted (perf)".to_string(), |n| format!("{n:.2}")));
                syscalls.insert(format!("{t}.{job}.{mode}"), n);
            }
            let _ = writeln!(table, "| {t} | {job} | 0 (in the kernel) | {} | {} |", cells[0], cells[1]);
        }
    }
    let rss: BTreeMap<String, u64> = out
        .console
        .lines()
        .filter_map(|l| l.strip_prefix("bench-rss "))
        .filter_map(|l| l.split_once(' ').and_then(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?))))
        .collect();
    let _ = writeln!(
        table,
        "\np2pnvmf RSS (kB): {}",
        rss.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
    );
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let report = json!({
        "date": date.unwrap_or_default(),
        "command": format!("BENCH_RUNTIME={runtime} BENCH_RUNS={runs} POLL_CPU={poll_cpu} cargo bench --bench vm_fio"),
        "runtime_s": runtime, "runs": runs, "rss_kib": rss, "rows": rows_json, "syscalls_per_io": syscalls,
    });
    let json = write_bench_result("vm_fio.json", &serde_json::to_string_pretty(&report).expect("json"));
    write_bench_result("vm_fio.md", &table);
    println!("{table}");
    let png = json.with_extension("png");
    match chart(&json, &png) {
        Ok(()) => println!("chart: {}", png.display()),
        Err(e) => eprintln!("no chart: {e}"),
    }
}

/// Renders the ratios as a PNG with matplotlib (installed from Debian when missing).
fn chart(json: &Path, png: &Path) -> Result<(), String> {
    let has = |py: &str| Command::new("/usr/bin/python3").args(["-c", py]).status().is_ok_and(|s| s.success());
    if !has("import matplotlib") {
        let st = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", "python3-matplotlib"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| format!("apt-get: {e}"))?;
        if !st.success() {
            return Err("apt-get install python3-matplotlib failed".into());
        }
    }
    let script: PathBuf = repo_root().join("benches/vm_fio_chart.py");
    let st = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(json)
        .arg(png)
        .status()
        .map_err(|e| format!("python3: {e}"))?;
    if st.success() { Ok(()) } else { Err(format!("{} failed", script.display())) }
}
