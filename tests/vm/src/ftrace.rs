//! Each queue-depth-1 command's way from the host to a target and back, read from the guest
//! kernel's own trace (tracefs text with `trace_clock` mono: one clock for both CPUs), so that
//! the kernel target and ours are timed by the same events: the host's `nvme_setup_cmd` and
//! `nvme_complete_rq`, the kernel target's `nvmet_req_init` and `nvmet_req_complete`, our
//! target's system calls (the `recvfrom` that reads a command, the `writev` or `write` that sends
//! or posts its answer), the host's NVMe/TCP receive work queued (`workqueue_queue_work` of
//! `nvme_tcp_io_work`: the answer is at the host's socket), inter-processor interrupts sent and
//! fio going to sleep. `bench-timeline.sh` enables these (the target's system calls filtered to
//! its own threads); `benches/vm_timeline.rs` prints the result.

/// One line of the trace: `comm-pid [cpu] flags seconds: name: fields`, where a system call's
/// name is followed by `(args)` at entry and ` -> ret` at exit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event<'a> {
    pub cpu: u32,
    /// Microseconds on the trace clock.
    pub us: f64,
    pub name: &'a str,
    /// What follows the name: `: fields`, `(args)` or ` -> ret`.
    pub rest: &'a str,
}

impl<'a> Event<'a> {
    /// The event of a trace line; `None` for headers and lines of another shape. The command
    /// name may hold spaces and dashes, so the line is read from its `[cpu]` field on.
    pub fn parse(line: &'a str) -> Option<Self> {
        let open = line.find(" [")?;
        let after = &line[open + 2..];
        let close = after.find(']')?;
        let cpu = after[..close].parse().ok()?;
        let mut tail = after[close + 1..].trim_start();
        tail = tail.split_once(' ')?.1.trim_start(); // the flags
        let (secs, tail) = tail.split_once(": ")?;
        let us = secs.parse::<f64>().ok()? * 1e6;
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        (end > 0).then(|| Event { cpu, us, name: &tail[..end], rest: &tail[end..] })
    }

    /// A system call's return value, at its exit.
    fn ret(&self) -> Option<i64> {
        let r = self.rest.trim_start().strip_prefix("->")?.trim();
        match r.strip_prefix("0x") {
            // The value as the kernel printed it: a negative errno in two's complement.
            Some(hex) => u64::from_str_radix(hex, 16).ok().map(|v| v as i64),
            None => r.parse().ok(),
        }
    }

    /// On an I/O queue, not the admin queue (at queue depth 1 one I/O queue carries every
    /// command: queue 1, or with a poll queue 2).
    fn on_io_queue(&self) -> bool {
        self.rest.contains(" qid=") && !self.rest.contains(" qid=0,")
    }
}

/// One command's marks, in microseconds on the trace clock. A target marks what it can be seen
/// doing: the kernel target's tracepoints, our system calls (over RDMA our target reads
/// commands from memory it polls, with no call to see: no `in_target` there).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Io {
    /// The host submits it (`nvme_setup_cmd`).
    pub submitted: f64,
    /// The target has it: `nvmet_req_init`, or our `recvfrom` returning data.
    pub in_target: Option<f64>,
    /// The target hands over its answer: `nvmet_req_complete`, or our `writev`/`write` entered.
    pub answered: Option<f64>,
    /// Over TCP, the answer is at the host's socket (its receive work is queued).
    pub at_host: Option<f64>,
    /// The host completes it (`nvme_complete_rq`).
    pub completed: Option<f64>,
    /// The host submits the next one.
    pub next: f64,
    /// Inter-processor interrupts sent from this submission to the next.
    pub ipis: u32,
    /// fio went to sleep before the next submission (waited for the completion).
    pub fio_slept: bool,
}

/// The commands on I/O queues in a trace, each closed by the next submission (the last,
/// unclosed, is left out).
pub fn ios<'a>(events: impl IntoIterator<Item = Event<'a>>) -> Vec<Io> {
    let mut out = Vec::new();
    let mut cur: Option<Io> = None;
    for e in events {
        if e.name == "nvme_setup_cmd" && e.on_io_queue() {
            if let Some(mut io) = cur.take() {
                io.next = e.us;
                out.push(io);
            }
            cur = Some(Io { submitted: e.us, ..Io::default() });
            continue;
        }
        let Some(io) = cur.as_mut() else { continue };
        let exit = e.rest.trim_start().starts_with("->");
        match e.name {
            "ipi_send_cpu" | "ipi_send_cpumask" => io.ipis += 1,
            "sched_switch"
                if e.rest.contains("prev_comm=fio ")
                    && (e.rest.contains("prev_state=S ") || e.rest.contains("prev_state=D ")) =>
            {
                io.fio_slept = true
            }
            "nvmet_req_init" if e.on_io_queue() && io.in_target.is_none() => io.in_target = Some(e.us),
            "sys_recvfrom" if exit && io.in_target.is_none() && e.ret().is_some_and(|r| r > 0) => {
                io.in_target = Some(e.us)
            }
            "nvmet_req_complete" if e.on_io_queue() && io.answered.is_none() => io.answered = Some(e.us),
            "sys_writev" | "sys_write" if !exit && io.answered.is_none() => io.answered = Some(e.us),
            "workqueue_queue_work"
                if e.rest.contains("function=nvme_tcp_io_work ") && io.answered.is_some() && io.at_host.is_none() =>
            {
                io.at_host = Some(e.us)
            }
            "nvme_complete_rq" if e.on_io_queue() && io.completed.is_none() => io.completed = Some(e.us),
            _ => {}
        }
    }
    out
}

/// A point of a command's way, where its trace shows it.
pub type Mark = fn(&Io) -> Option<f64>;

/// The stretches of a command's way, as (name, from, to).
pub const STRETCHES: [(&str, Mark, Mark); 7] = [
    ("submitted -> in the target", |io| Some(io.submitted), |io| io.in_target),
    ("in the target -> answered", |io| io.in_target, |io| io.answered),
    ("submitted -> answered", |io| Some(io.submitted), |io| io.answered),
    ("answered -> at the host's socket", |io| io.answered, |io| io.at_host),
    ("at the host's socket -> completed", |io| io.at_host, |io| io.completed),
    ("answered -> completed", |io| io.answered, |io| io.completed),
    ("completed -> next submitted", |io| io.completed, |io| Some(io.next)),
];

/// The median of each stretch over `ios` (`None` where no command shows it), the median
/// period (submission to submission), the mean IPIs per command and the share of commands
/// fio slept for.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub ios: usize,
    pub period: f64,
    pub stretches: Vec<Option<f64>>,
    pub ipis: f64,
    pub fio_slept: f64,
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

pub fn summary(ios: &[Io]) -> Summary {
    let n = ios.len().max(1) as f64;
    Summary {
        ios: ios.len(),
        period: median(ios.iter().map(|io| io.next - io.submitted).collect()).unwrap_or(f64::NAN),
        stretches: STRETCHES
            .iter()
            .map(|(_, from, to)| median(ios.iter().filter_map(|io| Some(to(io)? - from(io)?)).collect()))
            .collect(),
        ipis: ios.iter().map(|io| f64::from(io.ipis)).sum::<f64>() / n,
        fio_slept: ios.iter().filter(|io| io.fio_slept).count() as f64 / n,
    }
}

/// The slowest `share` of `ios` by period (submission to the next), slowest first: what a
/// tail is made of, stretch by stretch.
pub fn slowest(ios: &[Io], share: f64) -> Vec<Io> {
    let mut v = ios.to_vec();
    v.sort_by(|a, b| (b.next - b.submitted).total_cmp(&(a.next - a.submitted)));
    v.truncate(((ios.len() as f64 * share).ceil() as usize).min(ios.len()));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    // Two commands of a traced run of ours over TCP in poll mode (columns trimmed), then the
    // next submission.
    const OURS_TCP: &str = "\
             fio-296     [000] .....    30.031316: nvme_setup_cmd: nvme0: disk=nvme0c0n1, qid=1, cmdid=12295, nsid=1
             fio-296     [000] ...1.    30.031419: sys_io_uring_enter(fd: 6, to_submit: 0, min_complete: 1, flags: 1)
   p2pnvmf-poll0-267     [001] ...1.    30.031443: sys_epoll_wait -> 0x1
             fio-296     [000] d..2.    30.031452: sched_switch: prev_comm=fio prev_pid=296 prev_prio=120 prev_state=S ==> next_comm=swapper/0 next_pid=0 next_prio=120
   p2pnvmf-poll0-267     [001] ...1.    30.031472: sys_recvfrom(fd: 13, ubuf: 7f0c900269b0, size: 10000, flags: 0, addr: 0, addr_len: 0)
   p2pnvmf-poll0-267     [001] ...1.    30.031500: sys_recvfrom -> 0x48
   p2pnvmf-poll0-267     [001] ...1.    30.031557: sys_writev(fd: 13, vec: 7f0c98005328, vlen: 3)
   p2pnvmf-poll0-267     [001] D.s4.    30.031674: workqueue_queue_work: work struct=000000001bff01bf function=nvme_tcp_io_work [nvme_tcp] workqueue=nvme_tcp_wq req_cpu=0 cpu=0
   p2pnvmf-poll0-267     [001] D.s6.    30.031682: ipi_send_cpu: cpu=0 callsite=ttwu_queue_wakelist+0xdd/0x100 callback=generic_smp_call_function_single_interrupt+0x0/0x20
   p2pnvmf-poll0-267     [001] ...1.    30.031728: sys_writev -> 0x1030
    kworker/0:2H-244     [000] ..s1.    30.031819: nvme_complete_rq: nvme0: disk=nvme0c0n1, qid=1, cmdid=12295, res=0x0, retries=0, flags=0x4, status=0x0
             fio-296     [000] ..... 30.031975: nvme_setup_cmd: nvme0: disk=nvme0c0n1, qid=1, cmdid=12296, nsid=1
   p2pnvmf-poll0-267     [001] ...1.    30.032366: sys_recvfrom(fd: 13, ubuf: 7f0c900269b0, size: 10000, flags: 0, addr: 0, addr_len: 0)
   p2pnvmf-poll0-267     [001] ...1.    30.032385: sys_recvfrom -> 0xfffffffffffffff5
   p2pnvmf-poll0-267     [001] ...1.    30.032386: sys_recvfrom -> 0x48
   p2pnvmf-poll0-267     [001] ...1.    30.032423: sys_writev(fd: 13, vec: 7f0c98005328, vlen: 3)
   p2pnvmf-poll0-267     [001] D.s4.    30.032566: workqueue_queue_work: work struct=000000001bff01bf function=nvme_tcp_io_work [nvme_tcp] workqueue=nvme_tcp_wq req_cpu=0 cpu=0
    kworker/0:2H-244     [000] ..s1.    30.032910: nvme_complete_rq: nvme0: disk=nvme0c0n1, qid=1, cmdid=12296, res=0x0, retries=0, flags=0x4, status=0x0
             fio-296     [000] ..... 30.033228: nvme_setup_cmd: nvme0: disk=nvme0c0n1, qid=1, cmdid=12297, nsid=1
";

    // One command of the kernel target over TCP: everything on fio's CPU, the admin queue's
    // commands (qid=0) left out.
    const KERNEL_TCP: &str = "\
# tracer: nop
             fio-247     [000] ..... 11.445861: nvme_setup_cmd: nvme0: disk=nvme0c0n1, qid=1, cmdid=61444, nsid=1
    kworker/0:2H-244     [000] ..... 11.445900: nvmet_req_init: nvmet1: disk=/dev/ram0, qid=0, cmdid=9, nsid=0
    kworker/0:2H-244     [000] ..... 11.446016: nvmet_req_init: nvmet1: disk=/dev/ram0, qid=1, cmdid=61444, nsid=1
    kworker/0:2H-244     [000] ..... 11.446048: nvmet_req_complete: nvmet1: disk=/dev/ram0, qid=1, cmdid=61444, res=0x0, status=0x0
    kworker/0:2H-244     [000] D.s4. 11.446118: workqueue_queue_work: work struct=0000000058a3f8a5 function=nvme_tcp_io_work [nvme_tcp] workqueue=nvme_tcp_wq req_cpu=0 cpu=0
    kworker/0:2H-244     [000] .Ns1. 11.446178: nvme_complete_rq: nvme0: disk=nvme0c0n1, qid=1, cmdid=61444, res=0x0, retries=0, flags=0x4, status=0x0
             fio-247     [000] ..... 11.446337: nvme_setup_cmd: nvme0: disk=nvme0c0n1, qid=1, cmdid=61445, nsid=1
";

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 0.01)
    }

    #[test]
    fn parses_tracepoints_and_system_calls() {
        let e = Event::parse("   p2pnvmf-poll0-267     [001] ...1.    30.031500: sys_recvfrom -> 0x48").unwrap();
        assert_eq!((e.cpu, e.name, e.ret()), (1, "sys_recvfrom", Some(0x48)));
        assert!((e.us - 30_031_500.0).abs() < 0.01);
        let e = Event::parse("  kworker/u8:0-301 [001] d..2. 44.887437: workqueue_queue_work: work struct=1").unwrap();
        assert_eq!((e.cpu, e.name, e.rest), (1, "workqueue_queue_work", ": work struct=1"));
        let e = Event::parse("  <idle>-0  [000] d.h1. 9.736296: call_function_single_entry: vector=251").unwrap();
        assert_eq!(e.name, "call_function_single_entry");
        assert_eq!(Event::parse("#                                _-----=> irqs-off/BH-disabled"), None);
        assert_eq!(Event::parse(""), None);
    }

    #[test]
    fn marks_our_commands_by_our_system_calls() {
        let ios = ios(OURS_TCP.lines().filter_map(Event::parse));
        assert_eq!(ios.len(), 2, "the third submission closes the second command");
        let first = &ios[0];
        assert!(close(first.in_target, 30_031_500.0));
        assert!(close(first.answered, 30_031_557.0));
        assert!(close(first.at_host, 30_031_674.0));
        assert!(close(first.completed, 30_031_819.0));
        assert!((first.next - 30_031_975.0).abs() < 0.01);
        assert_eq!((first.ipis, first.fio_slept), (1, true));
        // A receive that found nothing (EAGAIN) is not the command's arrival.
        assert!(close(ios[1].in_target, 30_032_386.0));
        assert_eq!((ios[1].ipis, ios[1].fio_slept), (0, false));
    }

    #[test]
    fn marks_the_kernel_targets_commands_by_its_tracepoints() {
        let ios = ios(KERNEL_TCP.lines().filter_map(Event::parse));
        assert_eq!(ios.len(), 1);
        let io = &ios[0];
        assert!(close(io.in_target, 11_446_016.0), "the admin command is not queue 1's");
        assert!(close(io.answered, 11_446_048.0));
        let s = summary(&ios);
        let want = [155.0, 32.0, 187.0, 70.0, 60.0, 130.0, 159.0];
        for ((name, ..), (got, want)) in STRETCHES.iter().zip(s.stretches.iter().zip(want)) {
            assert!(close(*got, want), "{name}: {got:?} against {want}");
        }
        assert!((s.period - 476.0).abs() < 0.01);
    }

    #[test]
    fn the_slowest_share_by_period() {
        let io = |submitted: f64, next: f64| Io { submitted, next, ..Io::default() };
        let ios: Vec<Io> = (0..200).map(|i| io(f64::from(i) * 10.0, f64::from(i) * 10.0 + f64::from(i % 7))).collect();
        let tail = slowest(&ios, 0.01);
        assert_eq!(tail.len(), 2);
        assert!(tail.iter().all(|io| io.next - io.submitted == 6.0));
        assert_eq!(slowest(&ios[..1], 0.01).len(), 1);
        assert!(slowest(&[], 0.01).is_empty());
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }
}
