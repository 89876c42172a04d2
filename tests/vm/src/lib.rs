//! The soft-RoCE VM rig every end-to-end test runs on.
//!
//! A [`Scenario`] is a PCIe [`Topology`] plus a guest shell script. [`Scenario::run`] boots
//! Debian's 6.12 kernel under qemu (q35, TCG) with an initramfs built by
//! `tests/vm/build-initramfs.sh`; the guest mounts the host's root read-only over virtio-9p,
//! brings up rxe0 on eth0 and runs the script in a chroot of the host root, so nvme-cli and fio
//! run as host binaries. The run directory, shared read-write as `/tmp/scn` in the guest,
//! holds the scripts and our binaries (the guest's tmpfs on /tmp hides the host's /tmp, so
//! nothing is run from its host path), the console log and anything the scenario writes.

pub mod ftrace;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Address of the guest's eth0 (and so of rxe0). qemu's user network runs with `restrict=on`:
/// nothing leaves the VM.
pub const GUEST_IP: &str = "10.0.2.15";

/// Where the run directory appears in the guest.
const GUEST_RUN_DIR: &str = "/tmp/scn";

/// With a host VM ([`Scenario::remote_host`]): the target VM's and the host VM's addresses on
/// the link between them (scenarios see the first as `RIG_TARGET_IP`, lib.sh's `GUEST_IP`).
pub const TARGET_LINK_IP: &str = "10.0.3.1";
pub const HOST_LINK_IP: &str = "10.0.3.2";

/// The first bytes of a link NIC's MAC, by which the guest's init finds it.
const LINK_MAC_PREFIX: &str = "52:54:00:0a";

/// Where a device plugs in: the root complex or a named port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bus {
    Root,
    Port(String),
}

impl Bus {
    fn qemu_name(&self) -> &str {
        match self {
            Bus::Root => "pcie.0",
            Bus::Port(p) => p,
        }
    }
}

impl From<&str> for Bus {
    fn from(s: &str) -> Self {
        if s == "pcie.0" { Bus::Root } else { Bus::Port(s.to_string()) }
    }
}

/// An emulated NVMe controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nvme {
    pub serial: String,
    pub size_mib: u64,
    /// Controller Memory Buffer size; qemu puts it in BAR2 (64-bit, prefetchable).
    pub cmb_mib: Option<u32>,
    /// Logical (and physical) block size of its namespace; qemu's default is 512.
    pub block_size: Option<u32>,
}

/// Sectors an SSD's medium fails (`Topology::failing_sectors`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Failing {
    reads: Vec<u64>,
    writes: Vec<u64>,
}

impl Failing {
    /// blkdebug's configuration: an `[inject-error]` rule per sector, EIO every time.
    fn blkdebug_config(&self) -> Option<String> {
        let rules = |event: &str, sectors: &[u64]| {
            sectors
                .iter()
                .map(|s| format!("[inject-error]\nevent = \"{event}\"\nerrno = \"5\"\nsector = \"{s}\"\n\n"))
                .collect::<String>()
        };
        let conf = rules("read_aio", &self.reads) + &rules("write_aio", &self.writes);
        (!conf.is_empty()).then_some(conf)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Device {
    RootPort { id: String, chassis: u32 },
    SwitchUpstream { id: String, bus: Bus },
    SwitchDownstream { id: String, bus: Bus, chassis: u32 },
    Nvme { id: String, bus: Bus, nvme: Nvme, failing: Failing, props: Vec<String> },
    DualPorted { id: String, controllers: Vec<(String, Bus)>, nvme: Nvme },
    Nic { bus: Bus },
    Ivshmem { id: String, bus: Bus, size_mib: u32 },
}

/// The guest's PCIe layout, as data. Device ids name ports for later devices' `on`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    devices: Vec<Device>,
    iommu: bool,
    /// The guest's TSC taken as reliable (`tsc=reliable`): see [`Topology::steady_clock`].
    steady_clock: bool,
    /// Idle vCPUs spin instead of halting (`idle=poll`): see [`Topology::idle_poll`].
    idle_poll: bool,
    chassis: u32,
}

impl Topology {
    /// An empty topology: add at least a NIC before booting.
    pub fn new() -> Self {
        Self::default()
    }

    /// The smallest useful topology: the virtio NIC (for rxe0 and TCP) on the root complex.
    pub fn nic_only() -> Self {
        Self::new().nic("pcie.0")
    }

    fn next_chassis(&mut self) -> u32 {
        self.chassis += 1;
        self.chassis
    }

    pub fn root_port(mut self, id: &str) -> Self {
        let chassis = self.next_chassis();
        self.devices.push(Device::RootPort { id: id.into(), chassis });
        self
    }

    /// A PCIe switch (x3130 upstream port) on `on`, with one xio3130 downstream port per name.
    pub fn switch(mut self, id: &str, on: &str, downstream: &[&str]) -> Self {
        self.devices.push(Device::SwitchUpstream { id: id.into(), bus: on.into() });
        for d in downstream {
            let chassis = self.next_chassis();
            self.devices.push(Device::SwitchDownstream { id: (*d).into(), bus: id.into(), chassis });
        }
        self
    }

    pub fn nvme(mut self, id: &str, on: &str, nvme: Nvme) -> Self {
        self.devices.push(Device::Nvme {
            id: id.into(),
            bus: on.into(),
            nvme,
            failing: Failing::default(),
            props: Vec::new(),
        });
        self
    }

    /// A dual-ported SSD: qemu's `nvme-subsys` `id` with one controller per `(id, port)` of
    /// `controllers`, each with serial `nvme.serial` and `nvme.cmb_mib` of CMB, all attached to
    /// one shared namespace (nsid 1, `nvme.size_mib`, NMIC set): the medium two heads of an HA
    /// pair both reach, each through its own controller.
    pub fn dual_ported_nvme(mut self, id: &str, controllers: &[(&str, &str)], nvme: Nvme) -> Self {
        let controllers = controllers.iter().map(|(c, on)| ((*c).to_owned(), Bus::from(*on))).collect();
        self.devices.push(Device::DualPorted { id: id.into(), controllers, nvme });
        self
    }

    /// Adds qemu device property `prop` (`key=value`, e.g. `max_ioqpairs=2`) to SSD `id`.
    pub fn nvme_property(mut self, id: &str, prop: &str) -> Self {
        for d in &mut self.devices {
            if let Device::Nvme { id: i, props, .. } = d
                && i == id
            {
                props.push(prop.into());
            }
        }
        self
    }

    /// Makes the medium of SSD `id` fail reads of `reads` and writes of `writes` (512-byte
    /// sectors; every I/O that touches one fails with EIO) through qemu's blkdebug driver:
    /// qemu's NVMe model answers such a read with Unrecovered Read Error and a write with Write
    /// Fault, as an SSD with a bad block would.
    pub fn failing_sectors(mut self, id: &str, reads: &[u64], writes: &[u64]) -> Self {
        for d in &mut self.devices {
            if let Device::Nvme { id: i, failing, .. } = d
                && i == id
            {
                *failing = Failing { reads: reads.to_vec(), writes: writes.to_vec() };
            }
        }
        self
    }

    pub fn nic(mut self, on: &str) -> Self {
        self.devices.push(Device::Nic { bus: on.into() });
        self
    }

    /// An ivshmem-plain device: `size_mib` of RAM behind a 64-bit prefetchable BAR2, the
    /// guest's stand-in for a peer device's memory BAR.
    pub fn ivshmem(mut self, id: &str, on: &str, size_mib: u32) -> Self {
        self.devices.push(Device::Ivshmem { id: id.into(), bus: on.into(), size_mib });
        self
    }

    /// A guest IOMMU (intel-iommu with interrupt remapping), for VFIO.
    pub fn iommu(mut self) -> Self {
        self.iommu = true;
        self
    }

    /// The kernel command line this topology needs beyond the rig's own.
    /// For benchmarks: the guest keeps the TSC as its clocksource. Some boots without it made
    /// every clock_gettime a system call (13 to 182 per I/O in a target that made none the boot
    /// before), most likely the clocksource watchdog dropping the TSC under TCG's jitter (the
    /// guest's log level hides its message); the hardware this stands for has an invariant TSC.
    pub fn steady_clock(mut self) -> Self {
        self.steady_clock = true;
        self
    }

    /// For a benchmark's experiment: the guest's idle loop spins (`idle=poll`) instead of
    /// halting the vCPU. Under TCG a halted vCPU is a qemu thread asleep, and waking it for an
    /// interrupt from the other vCPU costs some 40 µs (`wake-cost`), where waking an idle core
    /// of the hardware this stands for costs a few; with it, no wake-up finds a vCPU asleep.
    pub fn idle_poll(mut self) -> Self {
        self.idle_poll = true;
        self
    }

    pub fn kernel_args(&self) -> String {
        let mut args = Vec::new();
        if self.iommu {
            args.push("intel_iommu=on");
        }
        if self.steady_clock {
            args.push("tsc=reliable");
        }
        if self.idle_poll {
            args.push("idle=poll");
        }
        args.join(" ")
    }

    /// The qemu device arguments; disk images are created in `run_dir`.
    pub fn qemu_args(&self, run_dir: &Path) -> Result<Vec<String>, RigError> {
        let mut args = Vec::new();
        let mut push = |a: &str, b: String| {
            args.push(a.to_string());
            args.push(b);
        };
        if self.iommu {
            push("-device", "intel-iommu,intremap=on".into());
        }
        let mut nics = 0;
        for dev in &self.devices {
            match dev {
                Device::RootPort { id, chassis } => {
                    push("-device", format!("pcie-root-port,id={id},bus=pcie.0,chassis={chassis},slot={chassis}"))
                }
                Device::SwitchUpstream { id, bus } => {
                    push("-device", format!("x3130-upstream,id={id},bus={}", bus.qemu_name()))
                }
                Device::SwitchDownstream { id, bus, chassis } => push(
                    "-device",
                    format!("xio3130-downstream,id={id},bus={},chassis={chassis},slot={chassis}", bus.qemu_name()),
                ),
                Device::Nvme { id, bus, nvme, failing, props } => {
                    push("-drive", drive(run_dir, id, nvme.size_mib, failing)?);
                    let mut d = format!("nvme,id={id},bus={},serial={},drive=drv-{id}", bus.qemu_name(), nvme.serial);
                    if let Some(cmb) = nvme.cmb_mib {
                        let _ = write!(d, ",cmb_size_mb={cmb}");
                    }
                    if let Some(bs) = nvme.block_size {
                        let _ = write!(d, ",logical_block_size={bs},physical_block_size={bs}");
                    }
                    for p in props {
                        let _ = write!(d, ",{p}");
                    }
                    push("-device", d);
                }
                Device::DualPorted { id, controllers, nvme } => {
                    push("-device", format!("nvme-subsys,id={id}"));
                    for (c, bus) in controllers {
                        let mut d = format!("nvme,id={c},bus={},serial={},subsys={id}", bus.qemu_name(), nvme.serial);
                        if let Some(cmb) = nvme.cmb_mib {
                            let _ = write!(d, ",cmb_size_mb={cmb}");
                        }
                        push("-device", d);
                    }
                    let first = controllers
                        .first()
                        .map(|(c, _)| c.as_str())
                        .ok_or_else(|| RigError::Topology(format!("dual-ported SSD {id} has no controller")))?;
                    push("-drive", drive(run_dir, id, nvme.size_mib, &Failing::default())?);
                    let mut ns = format!("nvme-ns,drive=drv-{id},bus={first},nsid=1,shared=on");
                    if let Some(bs) = nvme.block_size {
                        let _ = write!(ns, ",logical_block_size={bs},physical_block_size={bs}");
                    }
                    push("-device", ns);
                }
                Device::Ivshmem { id, bus, size_mib } => {
                    push("-object", format!("memory-backend-ram,id=mem-{id},size={size_mib}M"));
                    push("-device", format!("ivshmem-plain,id={id},memdev=mem-{id},bus={}", bus.qemu_name()));
                }
                Device::Nic { bus } => {
                    push("-netdev", format!("user,id=net{nics},restrict=on"));
                    push("-device", format!("virtio-net-pci,netdev=net{nics},bus={}", bus.qemu_name()));
                    nics += 1;
                }
            }
        }
        if nics != 1 {
            return Err(RigError::Topology(format!(
                "a topology needs exactly one NIC (the guest's eth0), found {nics}"
            )));
        }
        Ok(args)
    }
}

/// The `-drive` value of SSD `id`'s medium: a sparse image of `size_mib` in `run_dir`, behind
/// blkdebug when sectors fail.
fn drive(run_dir: &Path, id: &str, size_mib: u64, failing: &Failing) -> Result<String, RigError> {
    let img = run_dir.join(format!("{id}.img"));
    let f = std::fs::File::create(&img).map_err(|e| RigError::io(&img, e))?;
    f.set_len(size_mib << 20).map_err(|e| RigError::io(&img, e))?;
    let file = match failing.blkdebug_config() {
        Some(conf) => {
            let path = run_dir.join(format!("{id}.blkdebug"));
            std::fs::write(&path, conf).map_err(|e| RigError::io(&path, e))?;
            format!("blkdebug:{}:{}", path.display(), img.display())
        }
        None => img.display().to_string(),
    };
    Ok(format!("file={file},if=none,id=drv-{id},format=raw"))
}

/// A guest script to run on a topology, with a time bound.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub topology: Topology,
    /// Path of the guest script, relative to `tests/vm/scenarios/`.
    pub script: String,
    /// Extra environment for the script.
    pub env: Vec<(String, String)>,
    /// Host binaries made available in the guest, by environment variable.
    pub binaries: Vec<(String, PathBuf)>,
    /// The whole run, boot included; past it qemu is killed and the run fails.
    pub timeout: Duration,
    pub memory_mib: u32,
    pub kernel: Kernel,
    /// qemu trace events (see [`Scenario::qemu_trace`]).
    pub trace: Vec<String>,
    /// The host VM's script (see [`Scenario::remote_host`]).
    pub host_script: Option<String>,
    /// The target VM's vCPU with a host CPU to itself (see [`Scenario::dedicated_vcpu`]).
    pub dedicated_vcpu: Option<u32>,
}

/// One VM of a run: the target VM (the scenario's topology) or the host VM beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vm {
    Target,
    Host,
}

/// What names a VM's part of a run.
struct VmNames {
    /// Its entry script (`{entry}.sh`) in the run directory; the host VM's is named by the
    /// init's `rig.entry`, the target VM's is the init's default.
    entry: &'static str,
    /// Where the init writes its script's exit code.
    rc: &'static str,
    console: &'static str,
    /// Its address on the link between the two VMs.
    link_ip: &'static str,
}

impl Vm {
    fn names(self) -> &'static VmNames {
        const TARGET: VmNames =
            VmNames { entry: "scenario", rc: "rc", console: "console.log", link_ip: TARGET_LINK_IP };
        const HOST: VmNames =
            VmNames { entry: "host", rc: "host.rc", console: "host-console.log", link_ip: HOST_LINK_IP };
        match self {
            Vm::Target => &TARGET,
            Vm::Host => &HOST,
        }
    }
}

/// The qemu arguments of `vm`'s end of the link between two VMs: a virtio NIC with the link's
/// MAC prefix on qemu's `stream` netdev, the target VM's qemu listening on the Unix socket
/// `sock` and the host VM's connecting to it. A stream, not datagrams: a burst larger than the
/// receiving qemu takes in at once waits in the socket instead of being dropped. With a UDP
/// link (`dgram`) one pass over RDMA — connect, a 64 MiB fill, three 2 s fio runs — took 110 s
/// against 22 s over this one; most likely soft-RoCE waiting out its retransmission timeout
/// for each dropped packet (not measured).
fn link_args(vm: Vm, sock: &Path) -> Vec<String> {
    let (server, n) = match vm {
        Vm::Target => ("on", 1),
        Vm::Host => ("off", 2),
    };
    vec![
        "-netdev".into(),
        format!("stream,id=link,server={server},addr.type=unix,addr.path={}", sock.display()),
        "-device".into(),
        format!("virtio-net-pci,netdev=link,mac={LINK_MAC_PREFIX}:00:0{n},bus=pcie.0"),
    ]
}

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The script's exit code; `None` when the guest never reported one (timeout, panic).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub console: String,
    pub run_dir: PathBuf,
    /// Seconds from kernel start to "rig: ready", as the guest measured it.
    pub boot_secs: Option<f64>,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    /// The guest kernel panicked before the rig reported ready: no scenario code ran.
    fn died_booting(&self) -> bool {
        self.boot_secs.is_none() && !self.timed_out && self.console.contains("Kernel panic")
    }

    /// The last `n` lines of the guest console.
    pub fn console_tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RigError {
    #[error("VM rig prerequisite missing: {0}")]
    Missing(String),
    #[error("building the guest kernel/initramfs failed: {0}")]
    Build(String),
    #[error("bad topology: {0}")]
    Topology(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl RigError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        RigError::Io { path: path.to_path_buf(), source }
    }
}

/// The `key value` pairs of a file a scenario wrote (e.g. the CPU ticks beside a fio result),
/// or `None` when it is missing or a value is not a number.
pub fn read_pairs(path: &Path) -> Option<std::collections::BTreeMap<String, f64>> {
    let text = std::fs::read_to_string(path).ok()?;
    let words: Vec<&str> = text.split_whitespace().collect();
    words.chunks(2).map(|kv| Some((kv.first()?.to_string(), kv.get(1)?.parse().ok()?))).collect()
}

/// The repository root (this crate lives in `tests/vm`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root exists")
}

/// Writes a benchmark's result as `target/bench/NAME` and says where.
pub fn write_bench_result(name: &str, text: &str) -> PathBuf {
    let dir = repo_root().join("target/bench");
    let path = dir.join(name);
    std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&path, text))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    println!("written to {}", path.display());
    path
}

struct Artifacts {
    kernel: PathBuf,
    initramfs: PathBuf,
}

/// The guest kernel a scenario boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernel {
    /// Debian's 6.12 image: what a Debian appliance runs (no CONFIG_PCI_P2PDMA).
    #[default]
    Debian,
    /// Debian's 6.12 source built with CONFIG_PCI_P2PDMA (`tests/vm/build-p2pdma-kernel.sh`),
    /// as Ubuntu, Fedora and RHEL kernels are: the kernel's NVMe driver publishes p2pmem.
    P2pdma,
}

impl Kernel {
    fn arg(self) -> &'static str {
        match self {
            Kernel::Debian => "debian",
            Kernel::P2pdma => "p2pdma",
        }
    }
}

/// Builds (or finds cached) the guest kernel and initramfs once per process and kernel.
fn artifacts(kernel: Kernel) -> Result<&'static Artifacts, RigError> {
    static DEBIAN: OnceLock<Result<Artifacts, String>> = OnceLock::new();
    static P2PDMA: OnceLock<Result<Artifacts, String>> = OnceLock::new();
    let cell = match kernel {
        Kernel::Debian => &DEBIAN,
        Kernel::P2pdma => &P2PDMA,
    };
    let built = cell.get_or_init(|| {
        let script = repo_root().join("tests/vm/build-initramfs.sh");
        let out = Command::new(&script)
            .arg(kernel.arg())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("{}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut lines = stdout.lines();
        match (lines.next(), lines.next()) {
            (Some(k), Some(i)) => Ok(Artifacts { kernel: k.into(), initramfs: i.into() }),
            _ => Err(format!("unexpected output from {}: {stdout}", script.display())),
        }
    });
    built.as_ref().map_err(|e| {
        if e.contains("missing") || e.contains("no linux-image") || e.contains("not installed") {
            RigError::Missing(e.clone())
        } else {
            RigError::Build(e.clone())
        }
    })
}

const QEMU: &str = "qemu-system-x86_64";

/// Finds `name` in a PATH-style list, or says which package brings it.
fn find_in_path(name: &str, path: &std::ffi::OsStr, package: &str) -> Result<PathBuf, RigError> {
    std::env::split_paths(path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| RigError::Missing(format!("{name} not found in PATH (package {package}; run tests/vm/deps.sh)")))
}

/// Single-quotes a value for the guest's bash.
fn shell_quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', r"'\''"))
}

impl Scenario {
    pub fn new(name: &str, topology: Topology, script: &str) -> Self {
        Scenario {
            name: name.into(),
            topology,
            script: script.into(),
            env: Vec::new(),
            binaries: Vec::new(),
            timeout: Duration::from_secs(180),
            memory_mib: 2048,
            kernel: Kernel::Debian,
            trace: Vec::new(),
            host_script: None,
            dedicated_vcpu: None,
        }
    }

    pub fn kernel(mut self, k: Kernel) -> Self {
        self.kernel = k;
        self
    }

    /// qemu trace events to log into `qemu-trace.log` in the run directory (the guest reads
    /// it as `/tmp/scn/qemu-trace.log`): how qemu witnesses what a device did.
    pub fn qemu_trace(mut self, events: &[&str]) -> Self {
        self.trace.extend(events.iter().map(|e| (*e).to_owned()));
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Passes the host's `key` on to the scenario, `ci` when it is not set: how a scenario's
    /// repetitions stay small in CI and grow in the full run (`tests/run.sh --full` sets them).
    pub fn size(self, key: &str, ci: u32) -> Self {
        let value = std::env::var(key).unwrap_or_else(|_| ci.to_string());
        self.env(key, value)
    }

    /// Makes the host binary `path` runnable in the guest as `$key`.
    pub fn binary(mut self, key: &str, path: impl Into<PathBuf>) -> Self {
        self.binaries.push((key.into(), path.into()));
        self
    }

    /// Guest memory (2048 MiB unless set).
    pub fn memory(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// A second VM beside this one, standing for a remote host: one vCPU, 1 GiB, the kernel
    /// arguments of this topology's clock, running `script` (from `tests/vm/scenarios/`) from
    /// the same run directory, where the two scripts meet through files. A link between the
    /// two VMs (a Unix stream socket between the two qemus) carries TCP and soft-RoCE
    /// (rxe1 in both); the target VM is at [`TARGET_LINK_IP`], the host VM at [`HOST_LINK_IP`],
    /// and both scripts see the first as `RIG_TARGET_IP`. Each VM keeps its own console
    /// (`console.log`, `host-console.log`); the run passes when both scripts exit 0, and once
    /// either VM has stopped the other gets a minute more.
    pub fn remote_host(mut self, script: &str) -> Self {
        self.host_script = Some(script.into());
        self
    }

    /// The target VM's vCPU `vcpu` gets the host's last CPU to itself, and every other qemu
    /// thread of the run (the other vCPUs, qemu's I/O threads, the host VM) the other CPUs:
    /// for a poller on that vCPU, as a poller has a core of its own on hardware. Without it a
    /// spinning vCPU shares a host CPU by time slices with whichever qemu thread the host's
    /// scheduler puts beside it, and that thread waits its turn for milliseconds.
    pub fn dedicated_vcpu(mut self, vcpu: u32) -> Self {
        self.dedicated_vcpu = Some(vcpu);
        self
    }

    /// For benchmarks: [`Scenario::dedicated_vcpu`] for the poller's vCPU (`POLL_CPU`, default
    /// 1) when the environment's `DEDICATED` is `1`, or is unset and `default` holds.
    pub fn dedicated_poller_from_env(self, default: bool) -> Self {
        let on = std::env::var("DEDICATED").map_or(default, |v| v == "1");
        let vcpu = std::env::var("POLL_CPU").map_or(Ok(1), |v| v.parse()).expect("POLL_CPU is a vCPU number");
        if on { self.dedicated_vcpu(vcpu) } else { self }
    }

    /// Applies [`Scenario::dedicated_vcpu`] to the qemu processes `pids` (the target VM's
    /// first), once the vCPU's thread is there (qemu names it `CPU N/TCG`).
    fn dedicate(&self, vcpu: u32, pids: &[u32]) -> Result<(), RigError> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cpus < 2 {
            return Err(RigError::Topology(format!("a dedicated vCPU needs 2 host CPUs, this host has {cpus}")));
        }
        let (own, rest) = ((cpus - 1).to_string(), format!("0-{}", cpus - 2));
        let name = format!("CPU {vcpu}/TCG");
        let tasks = |pid: u32| -> Vec<(String, String)> {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|t| {
                    let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                    (t.file_name().to_string_lossy().into_owned(), comm.trim().to_owned())
                })
                .collect()
        };
        let start = Instant::now();
        while !tasks(pids[0]).iter().any(|(_, comm)| *comm == name) {
            if start.elapsed() > Duration::from_secs(30) {
                return Err(RigError::Topology(format!("qemu (pid {}) has no thread '{name}'", pids[0])));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for (i, &pid) in pids.iter().enumerate() {
            for (tid, comm) in tasks(pid) {
                let mask = if i == 0 && comm == name { &own } else { &rest };
                let out = Command::new("taskset")
                    .args(["-p", "-c", mask, &tid])
                    .output()
                    .map_err(|e| RigError::io(Path::new("taskset"), e))?;
                if !out.status.success() {
                    return Err(RigError::Topology(format!(
                        "taskset -p -c {mask} {tid} ({comm}): {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
            }
        }
        Ok(())
    }

    /// `vm`'s entry point: environment, the helper library, then its script, all from the run
    /// directory (`/tmp/scn` in the guest).
    fn guest_entry(&self, vm: Vm) -> String {
        let mut s = String::from("set -euo pipefail\n");
        for (k, v) in &self.env {
            let _ = writeln!(s, "export {k}={}", shell_quote(v));
        }
        for (k, path) in &self.binaries {
            let name = path.file_name().map_or_else(|| k.clone(), |n| n.to_string_lossy().into_owned());
            let _ = writeln!(s, "export {k}={}", shell_quote(&format!("{GUEST_RUN_DIR}/bin/{name}")));
        }
        if self.host_script.is_some() {
            let _ = writeln!(s, "export RIG_TARGET_IP={TARGET_LINK_IP}");
        }
        let script = match vm {
            Vm::Target => &self.script,
            Vm::Host => self.host_script.as_ref().expect("a host VM has a script"),
        };
        let _ = writeln!(s, "source {GUEST_RUN_DIR}/lib.sh");
        let _ = writeln!(s, "source {GUEST_RUN_DIR}/{script}");
        s
    }

    /// The VMs of this run.
    fn vms(&self) -> &'static [Vm] {
        match self.host_script {
            Some(_) => &[Vm::Target, Vm::Host],
            None => &[Vm::Target],
        }
    }

    /// Fills the run directory: scripts, binaries (hard-linked where possible), entry points.
    fn stage(&self, repo: &Path, run_dir: &Path) -> Result<(), RigError> {
        let copy = |from: &Path, to: &Path| -> Result<(), RigError> {
            if std::fs::hard_link(from, to).is_err() {
                std::fs::copy(from, to).map_err(|e| RigError::io(from, e))?;
            }
            Ok(())
        };
        copy(&repo.join("tests/vm/guest/lib.sh"), &run_dir.join("lib.sh"))?;
        for script in std::iter::once(&self.script).chain(&self.host_script) {
            copy(&repo.join("tests/vm/scenarios").join(script), &run_dir.join(script))?;
        }
        let bin = run_dir.join("bin");
        std::fs::create_dir_all(&bin).map_err(|e| RigError::io(&bin, e))?;
        for (k, path) in &self.binaries {
            let name =
                path.file_name().ok_or_else(|| RigError::Topology(format!("{k}: {} is not a file", path.display())))?;
            copy(path, &bin.join(name))?;
        }
        for &vm in self.vms() {
            let entry = run_dir.join(format!("{}.sh", vm.names().entry));
            std::fs::write(&entry, self.guest_entry(vm)).map_err(|e| RigError::io(&entry, e))?;
        }
        Ok(())
    }

    /// Boots the VM (or both), runs the scenario and returns what happened. Errors are the
    /// rig's own (missing prerequisites, build failures); a failing scenario is an `Outcome`.
    pub fn run(&self) -> Result<Outcome, RigError> {
        let qemu = find_in_path(QEMU, &std::env::var_os("PATH").unwrap_or_default(), "qemu-system-x86")?;
        let art = artifacts(self.kernel)?;
        let repo = repo_root();
        let run_dir = repo.join("target/vm-runs").join(&self.name);
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).map_err(|e| RigError::io(&run_dir, e))?;
        self.stage(&repo, &run_dir)?;
        let first = self.boot(&qemu, art, &run_dir)?;
        if !first.died_booting() {
            return Ok(first);
        }
        // TCG occasionally mis-executes the kernel's live code patching (an int3 Oops seconds
        // into boot, before any scenario code ran). Only such a boot is retried, once, and the
        // first console is kept beside the second.
        let kept = run_dir.join("console.boot1.log");
        std::fs::write(&kept, &first.console).map_err(|e| RigError::io(&kept, e))?;
        eprintln!(
            "scenario {}: guest kernel died before rig: ready; booting again (first console in {})",
            self.name,
            kept.display()
        );
        for &vm in self.vms() {
            let _ = std::fs::remove_file(run_dir.join(vm.names().rc));
        }
        self.boot(&qemu, art, &run_dir)
    }

    /// The qemu command of `vm`; `link` is the link's socket when there is a host VM.
    fn qemu_command(
        &self,
        qemu: &Path,
        art: &Artifacts,
        run_dir: &Path,
        vm: Vm,
        link: Option<&Path>,
    ) -> Result<Command, RigError> {
        let host_topology;
        let (topology, cpus, memory_mib) = match vm {
            Vm::Target => (&self.topology, 2, self.memory_mib),
            Vm::Host => {
                host_topology = Topology { steady_clock: self.topology.steady_clock, ..Topology::nic_only() };
                (&host_topology, 1, 1024)
            }
        };
        let mut kernel_args = format!("console=ttyS0 panic=-1 loglevel=4 {}", topology.kernel_args());
        if link.is_some() {
            let _ = write!(kernel_args, " rig.link={}/24", vm.names().link_ip);
        }
        if vm == Vm::Host {
            let _ = write!(kernel_args, " rig.entry={}", vm.names().entry);
        }
        let mut cmd = Command::new(qemu);
        // Named threads (`CPU N/TCG`), for Scenario::dedicated_vcpu.
        cmd.args(["-name", &format!("{},debug-threads=on", vm.names().entry)])
            .args(["-machine", "q35,accel=tcg", "-cpu", "max", "-smp", &cpus.to_string()])
            .args(["-m", &memory_mib.to_string()])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", run_dir.join(vm.names().console).display()))
            .arg("-kernel")
            .arg(&art.kernel)
            .arg("-initrd")
            .arg(&art.initramfs)
            .arg("-append")
            .arg(kernel_args)
            .args([
                "-virtfs",
                "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
                "-virtfs",
            ])
            .arg(format!("local,path={},mount_tag=run,security_model=none", run_dir.display()))
            .args(topology.qemu_args(run_dir)?)
            .args(link.map(|sock| link_args(vm, sock)).unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if vm == Vm::Target && !self.trace.is_empty() {
            cmd.args(self.trace.iter().flat_map(|e| ["-trace".to_owned(), e.clone()]))
                .arg("-D")
                .arg(run_dir.join("qemu-trace.log"));
        }
        Ok(cmd)
    }

    fn boot(&self, qemu: &Path, art: &Artifacts, run_dir: &Path) -> Result<Outcome, RigError> {
        let sock = run_dir.join("link.sock");
        let link = self.host_script.as_ref().map(|_| sock.as_path());
        let _ = std::fs::remove_file(&sock);
        let start = Instant::now();
        let mut children = Vec::new();
        for &vm in self.vms() {
            if vm == Vm::Host {
                // The host VM's qemu connects at its start: the target VM's must listen first.
                while !sock.exists() && start.elapsed() < Duration::from_secs(30) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let mut cmd = self.qemu_command(qemu, art, run_dir, vm, link)?;
            children.push((vm, cmd.spawn().map_err(|e| RigError::io(Path::new(QEMU), e))?, None));
        }
        if let Some(vcpu) = self.dedicated_vcpu {
            let pids: Vec<u32> = children.iter().map(|c| c.1.id()).collect();
            if let Err(e) = self.dedicate(vcpu, &pids) {
                for (_, child, _) in &mut children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err(e);
            }
        }
        // Once one VM has stopped, the other (waiting on files the first will not write) gets
        // this much longer.
        const GRACE: Duration = Duration::from_secs(60);
        let mut deadline = start + self.timeout;
        let mut timed_out = false;
        while children.iter().any(|c| c.2.is_none()) {
            for (_, child, stopped) in children.iter_mut().filter(|c| c.2.is_none()) {
                if let Some(status) = child.try_wait().map_err(|e| RigError::io(Path::new(QEMU), e))? {
                    *stopped = Some(status);
                    deadline = deadline.min(Instant::now() + GRACE);
                }
            }
            if Instant::now() > deadline {
                for (_, child, stopped) in children.iter_mut().filter(|c| c.2.is_none()) {
                    timed_out = true;
                    let _ = child.kill();
                    *stopped = child.wait().ok();
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let elapsed = start.elapsed();
        let mut console = String::new();
        let mut exit_code = Some(0);
        for (vm, mut child, _) in children {
            if vm == Vm::Host {
                console.push_str("\n[host VM console]\n");
            }
            console.push_str(&std::fs::read_to_string(run_dir.join(vm.names().console)).unwrap_or_default());
            if let Some(mut err) = child.stderr.take() {
                let mut qemu_err = String::new();
                let _ = std::io::Read::read_to_string(&mut err, &mut qemu_err);
                if !qemu_err.trim().is_empty() {
                    let _ = write!(console, "\n[qemu stderr]\n{qemu_err}");
                }
            }
            let rc = std::fs::read_to_string(run_dir.join(vm.names().rc)).ok().and_then(|s| s.trim().parse().ok());
            // The first VM that did not pass speaks for the run.
            if exit_code == Some(0) {
                exit_code = rc;
            }
        }
        let boot_secs = console
            .lines()
            .find_map(|l| l.strip_prefix("rig: ready after "))
            .and_then(|s| s.trim_end_matches('s').parse().ok());
        Ok(Outcome { exit_code, timed_out, console, run_dir: run_dir.to_path_buf(), boot_secs, elapsed })
    }

    /// Runs the scenario and panics with the console tail unless it passed: the form tests use.
    pub fn run_ok(&self) -> Outcome {
        let out = match self.run() {
            Ok(out) => out,
            Err(e) => panic!("scenario {}: {e}", self.name),
        };
        // Straight to stderr, past the test harness's capture: the suite's log shows what each
        // scenario took, passed or not (what the CI time budget is made of).
        let line = format!(
            "scenario {}: exit {:?}, boot {:?}s, {:.1}s in all (logs in {})\n",
            self.name,
            out.exit_code,
            out.boot_secs,
            out.elapsed.as_secs_f64(),
            out.run_dir.display()
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        if !out.passed() {
            panic!(
                "scenario {} failed ({}); console tail:\n{}",
                self.name,
                if out.timed_out {
                    format!("timed out after {:?}", self.timeout)
                } else {
                    format!("exit code {:?}", out.exit_code)
                },
                out.console_tail(60)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_boot_that_panicked_before_ready_counts_as_died_booting() {
        let out = |console: &str, boot_secs, timed_out| Outcome {
            exit_code: None,
            timed_out,
            console: console.into(),
            run_dir: PathBuf::new(),
            boot_secs,
            elapsed: Duration::ZERO,
        };
        assert!(out("Oops: int3\nKernel panic - not syncing", None, false).died_booting());
        assert!(!out("rig: ready after 4.2s\nKernel panic", Some(4.2), false).died_booting());
        assert!(!out("Kernel panic", None, true).died_booting());
        assert!(!out("no output", None, false).died_booting());
    }

    #[test]
    fn switch_topology_renders_ports_in_order() {
        let dir = std::env::temp_dir().join("p2pnvmf-vmrig-unit");
        std::fs::create_dir_all(&dir).unwrap();
        let t = Topology::new()
            .root_port("rp1")
            .switch("up1", "rp1", &["dn1", "dn2", "dn3"])
            .nvme("cmb", "dn1", Nvme { serial: "CMB1".into(), size_mib: 1, cmb_mib: Some(64), block_size: None })
            .nic("dn2")
            .ivshmem("shm", "dn3", 32)
            .root_port("rp2")
            .nvme("other", "rp2", Nvme { serial: "N2".into(), size_mib: 1, cmb_mib: None, block_size: None })
            .iommu();
        let args = t.qemu_args(&dir).unwrap();
        let devices: Vec<&str> = args.chunks(2).filter(|c| c[0] == "-device").map(|c| c[1].as_str()).collect();
        assert_eq!(devices[0], "intel-iommu,intremap=on");
        assert_eq!(devices[1], "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1");
        assert_eq!(devices[2], "x3130-upstream,id=up1,bus=rp1");
        assert_eq!(devices[3], "xio3130-downstream,id=dn1,bus=up1,chassis=2,slot=2");
        assert_eq!(devices[4], "xio3130-downstream,id=dn2,bus=up1,chassis=3,slot=3");
        assert!(devices[6].starts_with("nvme,id=cmb,bus=dn1,serial=CMB1,drive=drv-cmb"));
        assert!(devices[6].ends_with(",cmb_size_mb=64"));
        assert_eq!(devices[7], "virtio-net-pci,netdev=net0,bus=dn2");
        assert_eq!(devices[8], "ivshmem-plain,id=shm,memdev=mem-shm,bus=dn3");
        assert!(args.windows(2).any(|w| w == ["-object", "memory-backend-ram,id=mem-shm,size=32M"]));
        assert_eq!(devices[10], "nvme,id=other,bus=rp2,serial=N2,drive=drv-other");
        assert_eq!(t.kernel_args(), "intel_iommu=on");
        assert_eq!(Topology::nic_only().iommu().steady_clock().kernel_args(), "intel_iommu=on tsc=reliable");
        assert_eq!(Topology::nic_only().steady_clock().idle_poll().kernel_args(), "tsc=reliable idle=poll");
        assert_eq!(std::fs::metadata(dir.join("cmb.img")).unwrap().len(), 1 << 20);
    }

    #[test]
    fn failing_sectors_become_a_blkdebug_drive() {
        let dir = std::env::temp_dir().join("p2pnvmf-vmrig-unit-blkdebug");
        std::fs::create_dir_all(&dir).unwrap();
        let t = Topology::new()
            .nvme("bad", "pcie.0", Nvme { serial: "BAD1".into(), size_mib: 1, cmb_mib: None, block_size: None })
            .failing_sectors("bad", &[2048], &[4096])
            .nvme_property("bad", "max_ioqpairs=2")
            .nic("pcie.0");
        let args = t.qemu_args(&dir).unwrap();
        let conf = dir.join("bad.blkdebug");
        let drive =
            format!("file=blkdebug:{}:{},if=none,id=drv-bad,format=raw", conf.display(), dir.join("bad.img").display());
        assert!(args.contains(&drive), "{args:?}");
        assert!(
            args.contains(&"nvme,id=bad,bus=pcie.0,serial=BAD1,drive=drv-bad,max_ioqpairs=2".to_string()),
            "{args:?}"
        );
        let conf = std::fs::read_to_string(conf).unwrap();
        assert_eq!(conf.matches("[inject-error]").count(), 2);
        assert!(conf.contains("event = \"read_aio\"\nerrno = \"5\"\nsector = \"2048\""), "{conf}");
        assert!(conf.contains("event = \"write_aio\"\nerrno = \"5\"\nsector = \"4096\""), "{conf}");
    }

    #[test]
    fn a_dual_ported_ssd_is_one_subsystem_with_a_shared_namespace() {
        let dir = std::env::temp_dir().join("p2pnvmf-vmrig-unit-dual");
        std::fs::create_dir_all(&dir).unwrap();
        let nvme = Nvme { serial: "DUAL1".into(), size_mib: 2, cmb_mib: Some(16), block_size: Some(4096) };
        let t = Topology::new()
            .root_port("rp1")
            .root_port("rp2")
            .dual_ported_nvme("ssd", &[("ctl0", "rp1"), ("ctl1", "rp2")], nvme)
            .nic("pcie.0");
        let args = t.qemu_args(&dir).unwrap();
        let devices: Vec<&str> = args.chunks(2).filter(|c| c[0] == "-device").map(|c| c[1].as_str()).collect();
        assert_eq!(
            devices[2..6],
            [
                "nvme-subsys,id=ssd",
                "nvme,id=ctl0,bus=rp1,serial=DUAL1,subsys=ssd,cmb_size_mb=16",
                "nvme,id=ctl1,bus=rp2,serial=DUAL1,subsys=ssd,cmb_size_mb=16",
                "nvme-ns,drive=drv-ssd,bus=ctl0,nsid=1,shared=on,logical_block_size=4096,physical_block_size=4096",
            ]
        );
        assert!(args.contains(&format!("file={},if=none,id=drv-ssd,format=raw", dir.join("ssd.img").display())));
        assert_eq!(std::fs::metadata(dir.join("ssd.img")).unwrap().len(), 2 << 20);
    }

    #[test]
    fn missing_qemu_is_named_with_its_package() {
        let err = find_in_path(QEMU, std::ffi::OsStr::new("/nonexistent"), "qemu-system-x86").unwrap_err();
        assert!(matches!(err, RigError::Missing(_)));
        assert!(err.to_string().contains("qemu-system-x86_64 not found in PATH (package qemu-system-x86"), "{err}");
    }

    #[test]
    fn missing_kernel_package_fails_fast_with_a_message() {
        let cache = std::env::temp_dir().join(format!("p2pnvmf-empty-cache-{}", std::process::id()));
        std::fs::create_dir_all(&cache).unwrap();
        let start = Instant::now();
        let out = Command::new(repo_root().join("tests/vm/build-initramfs.sh"))
            .env("P2PNVMF_VM_CACHE", &cache)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&cache);
        assert!(!out.status.success());
        assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no linux-image-6.12 unsigned package in"), "{stderr}");
    }

    #[test]
    fn topology_without_a_nic_is_refused() {
        let err = Topology::new().root_port("rp1").qemu_args(Path::new("/tmp")).unwrap_err();
        assert!(err.to_string().contains("exactly one NIC"), "{err}");
    }

    #[test]
    fn the_host_vm_connects_to_the_link_the_target_vm_listens_on() {
        let sock = Path::new("/r/link.sock");
        let (target, host) = (link_args(Vm::Target, sock), link_args(Vm::Host, sock));
        assert_eq!(target[1], "stream,id=link,server=on,addr.type=unix,addr.path=/r/link.sock");
        assert_eq!(host[1], "stream,id=link,server=off,addr.type=unix,addr.path=/r/link.sock");
        assert_eq!(target[3], format!("virtio-net-pci,netdev=link,mac={LINK_MAC_PREFIX}:00:01,bus=pcie.0"));
        assert_eq!(host[3], format!("virtio-net-pci,netdev=link,mac={LINK_MAC_PREFIX}:00:02,bus=pcie.0"));
    }

    #[test]
    fn a_host_vm_runs_its_own_script_and_both_know_the_target_address() {
        let s = Scenario::new("x", Topology::nic_only(), "t.sh").remote_host("h.sh");
        assert_eq!(s.vms(), [Vm::Target, Vm::Host]);
        let (target, host) = (s.guest_entry(Vm::Target), s.guest_entry(Vm::Host));
        for entry in [&target, &host] {
            assert!(entry.contains(&format!("export RIG_TARGET_IP={TARGET_LINK_IP}\n")), "{entry}");
        }
        assert!(target.ends_with("source /tmp/scn/t.sh\n"), "{target}");
        assert!(host.ends_with("source /tmp/scn/h.sh\n"), "{host}");
        assert!(!Scenario::new("y", Topology::nic_only(), "t.sh").guest_entry(Vm::Target).contains("RIG_TARGET_IP"));
    }

    #[test]
    fn a_scenarios_key_value_file_reads_as_numbers() {
        let path = std::env::temp_dir().join(format!("p2pnvmf-vmrig-pairs-{}", std::process::id()));
        std::fs::write(&path, "busy_ticks 377 ns 5066133817 hz 100\n").unwrap();
        let p = read_pairs(&path).unwrap();
        assert_eq!((p["busy_ticks"], p["ns"], p["hz"]), (377.0, 5066133817.0, 100.0));
        std::fs::write(&path, "busy_ticks x\n").unwrap();
        assert_eq!(read_pairs(&path), None, "a value that is not a number");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read_pairs(&path), None, "no file");
    }

    #[test]
    fn guest_entry_quotes_environment() {
        let s = Scenario::new("x", Topology::nic_only(), "a.sh").env("NQN", "it's").binary("BIN", "/t/debug/p2pnvmf");
        let entry = s.guest_entry(Vm::Target);
        assert!(entry.contains(r"export NQN='it'\''s'"), "{entry}");
        assert!(entry.contains("export BIN='/tmp/scn/bin/p2pnvmf'"), "{entry}");
        assert!(entry.ends_with("source /tmp/scn/lib.sh\nsource /tmp/scn/a.sh\n"), "{entry}");
    }
}
