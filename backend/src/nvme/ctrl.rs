//! An NVMe controller the target drives itself: taking ownership (a function bound to the
//! driver of its addressing mode is used; an unbound one is bound to it and given back at exit;
//! one bound to the kernel's nvme driver is refused), reset, the admin queue, Identify, the
//! number of I/O queues, interrupts, and creating and deleting I/O queue pairs. Admin commands
//! run synchronously: they happen at start and when a queue opens or closes, never per I/O.
//!
//! Two addressing modes: through the IOMMU (vfio-pci, VFIO type 1, MSI-X vectors on eventfds),
//! and, opted into for hosts without an IOMMU, physical addresses (uio_pci_generic, locked huge
//! pages, one INTx interrupt for every queue).

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use p2pnvmf_nvmf::Reaping;
use p2pnvmf_nvmf::wire::{Cqe, Sqe};
pub use p2pnvmf_p2p::addr::Addressing;
use p2pnvmf_p2p::addr::{BusAddr, Iova};
use p2pnvmf_p2p::mem::{BarUse, Mapping, MappingPin};
use p2pnvmf_p2p::pci::{PciAddr, Sysfs};
use p2pnvmf_p2p::uio::UioDevice;
use p2pnvmf_p2p::vfio::VfioDevice;
use tracing::{info, warn};

use super::Error;
pub use super::dma::Dma;
use super::dma::DmaSpace;
use super::pair::{Pair, SharedPair};
use super::queue::{CQE_SIZE, QueuePair, SQE_SIZE, status};
use super::spec::{self, Cap, IdController, IdNamespace, admin, reg};

/// Admin queue depth.
const ADMIN_ENTRIES: u16 = 32;
/// How long an admin command may take before the controller is declared stuck.
/// The kernel driver that hands the function to user space in `mode`.
fn user_space_driver(mode: Addressing) -> &'static str {
    match mode {
        Addressing::Iommu => "vfio-pci",
        Addressing::Physical => "uio_pci_generic",
    }
}

const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries of the shared queue pair: room for several target queues' commands (a queue whose
/// command finds the SQ full waits for room).
const SHARED_ENTRIES: u16 = 1024;
const PAGE: usize = 4096;

/// The SSDs this process drives: one [`Controller`] each, and the functions claimed (until the
/// claim has given one back). A namespace set up again by a reload while the queues of its
/// previous set-up still finish their I/O shares that controller; one still being given back
/// is waited for — instead of two owners racing over bind, reset and unbind.
static DRIVEN: Mutex<Vec<(PciAddr, std::sync::Weak<Controller>)>> = Mutex::new(Vec::new());
static CLAIMED: (Mutex<Vec<PciAddr>>, std::sync::Condvar) = (Mutex::new(Vec::new()), std::sync::Condvar::new());
/// How long a claim waits for the previous owner to give the function back (its shutdown
/// waits up to CAP.TO, then vfio-pci's unbind for every file to close).
const RELEASE_WAIT: Duration = Duration::from_secs(30);

/// What we did to own the function, undone on drop.
#[derive(Debug)]
struct Claim {
    sysfs: PathBuf,
    pci: PciAddr,
    /// The driver we bound it to, to unbind and clear driver_override at exit.
    bound_by_us: Option<&'static str>,
}

impl Claim {
    fn take(sysfs: &Sysfs, pci: PciAddr, mode: Addressing) -> Result<Claim, Error> {
        let (claimed, released) = &CLAIMED;
        let held = claimed.lock().unwrap_or_else(|e| e.into_inner());
        let (mut held, wait) =
            released.wait_timeout_while(held, RELEASE_WAIT, |h| h.contains(&pci)).unwrap_or_else(|e| e.into_inner());
        if wait.timed_out() {
            return Err(Error::Setup(format!(
                "{pci}: still driven by this target after {RELEASE_WAIT:?} (its last user does not let go)"
            )));
        }
        let claim = Self::take_unlisted(sysfs, pci, mode)?;
        held.push(pci);
        Ok(claim)
    }

    fn take_unlisted(sysfs: &Sysfs, pci: PciAddr, mode: Addressing) -> Result<Claim, Error> {
        let dir = sysfs.function_dir(pci);
        if !dir.exists() {
            return Err(Error::Setup(format!("{pci}: no such PCI function ({} is absent)", dir.display())));
        }
        let driver = |dir: &Path| {
            std::fs::read_link(dir.join("driver"))
                .ok()
                .and_then(|l| Some(l.file_name()?.to_string_lossy().into_owned()))
        };
        let want = user_space_driver(mode);
        match driver(&dir).as_deref() {
            Some(d) if d == want => {
                return Ok(Claim { sysfs: sysfs.root().to_path_buf(), pci, bound_by_us: None });
            }
            Some("nvme") => {
                return Err(Error::Setup(format!(
                    "{pci} is bound to the kernel's nvme driver, which may hold mounted filesystems on it: free it \
                     yourself (echo {pci} > /sys/bus/pci/drivers/nvme/unbind) to let the target take it, or serve \
                     its block device with backend = \"file\""
                )));
            }
            Some(d) => {
                return Err(Error::Setup(format!(
                    "{pci} is bound to the kernel driver {d}; unbind it to use it with nvme-vfio"
                )));
            }
            None => {}
        }
        match (mode, dir.join("iommu_group").exists()) {
            (Addressing::Iommu, false) => {
                return Err(Error::Setup(format!(
                    "{pci}: no IOMMU group: the IOMMU is off (turn it on with intel_iommu=on or amd_iommu=on on the \
                     kernel command line); nvme-vfio needs it to keep the SSD's DMA to the target's memory, or \
                     dma = \"physical\" on the namespace to use physical addresses without one (nothing then \
                     stops the SSD from writing anywhere in memory)"
                )));
            }
            (Addressing::Physical, true) => {
                return Err(Error::Setup(format!(
                    "{pci} has an IOMMU group: with the IOMMU on, the SSD's DMA to physical addresses would fault; \
                     drop dma = \"physical\" to go through the IOMMU"
                )));
            }
            _ => {}
        }
        let root = sysfs.root().join("sys/bus/pci");
        if !root.join("drivers").join(want).exists() {
            return Err(Error::Setup(format!("{pci}: the {want} driver is not loaded (modprobe {want})")));
        }
        let write = |p: PathBuf, v: &str| {
            std::fs::write(&p, v).map_err(Error::os(pci, format!("writing {v} to {}", p.display())))
        };
        write(dir.join("driver_override"), want)?;
        write(root.join("drivers_probe"), &pci.to_string())?;
        if driver(&dir).as_deref() != Some(want) {
            let _ = std::fs::write(dir.join("driver_override"), "\n");
            return Err(Error::Setup(format!("{pci}: {want} did not bind it (see the kernel log)")));
        }
        info!(%pci, driver = want, "bound for the nvme-vfio backend; given back at exit");
        Ok(Claim { sysfs: sysfs.root().to_path_buf(), pci, bound_by_us: Some(want) })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(driver) = self.bound_by_us {
            let dir = Sysfs::new(&self.sysfs).function_dir(self.pci);
            let unbind = self.sysfs.join("sys/bus/pci/drivers").join(driver).join("unbind");
            if let Err(e) = std::fs::write(&unbind, self.pci.to_string()) {
                warn!(pci = %self.pci, "unbinding from {driver} at exit: {e}");
            }
            let _ = std::fs::write(dir.join("driver_override"), "\n");
        }
        let (claimed, released) = &CLAIMED;
        claimed.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| *p != self.pci);
        released.notify_all();
    }
}

/// The function's config space, registers and interrupts, through the driver that owns it.
#[derive(Debug)]
enum Access {
    Vfio(Arc<VfioDevice>),
    Uio(Arc<UioDevice>),
}

/// How completions are signalled.
#[derive(Debug)]
enum Irqs {
    /// MSI-X vector n signals eventfd n; I/O queue n raises vector n.
    Msix(Vec<OwnedFd>),
    /// One INTx interrupt for every queue (uio_pci_generic).
    Intx(Intx),
}

/// INTx fanned out: a thread waits for the function's interrupt on `/dev/uioN` and signals
/// every open queue's eventfd (queues then look at their own CQ), then unmasks INTx again.
/// One reader, because a queue that read the interrupt count first would leave the others
/// asleep; the thread's lock is taken per interrupt and when a queue opens or closes.
#[derive(Debug)]
struct Intx {
    queues: Arc<Mutex<Vec<(u16, File)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Intx {
    fn start(dev: Arc<UioDevice>, pci: PciAddr) -> Result<Intx, Error> {
        let queues: Arc<Mutex<Vec<(u16, File)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (q, halt) = (queues.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("intx-{pci}"))
            .spawn(move || {
                let mut warned = false;
                while !halt.load(Ordering::Relaxed) {
                    match dev.wait(Duration::from_millis(200)) {
                        Ok(false) => {}
                        Ok(true) => {
                            for (_, fd) in q.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                                let _ = (&*fd).write(&1u64.to_ne_bytes());
                            }
                            if let Err(e) = dev.unmask_intx() {
                                warn!("{e}");
                            }
                        }
                        Err(e) => {
                            if !std::mem::replace(&mut warned, true) {
                                warn!(%pci, "waiting for the INTx interrupt: {e}; queues poll once a second");
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .map_err(Error::os(pci, "starting the interrupt thread"))?;
        Ok(Intx { queues, stop, thread: Some(thread) })
    }
}

impl Drop for Intx {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The admin queue and its page for Identify data.
#[derive(Debug)]
struct Admin {
    q: QueuePair,
    /// Where `q` lives.
    _mem: Dma,
    buf: Dma,
    next_cid: u16,
}

/// A controller brought up and identified. Field order matters: the device (and with it its
/// IOMMU mappings) is released before the memory it maps, and every mapping of the device
/// (`regs`, the admin queue's) before the claim gives the function back — vfio-pci's unbind
/// waits until nothing holds the device.
#[derive(Debug)]
pub struct Controller {
    pub pci: PciAddr,
    dma: DmaSpace,
    access: Access,
    regs: Arc<Mapping>,
    cap: Cap,
    admin: Mutex<Admin>,
    pub id: IdController,
    /// I/O queue pairs the controller granted (Set Features, Number of Queues).
    pub max_io_queues: u16,
    free_qids: Mutex<Vec<u16>>,
    /// Signalled when a queue pair's ID goes back to `free_qids`.
    qid_freed: Condvar,
    /// The last granted pair, shared by the target queues beyond the granted ones.
    shared: Mutex<Weak<SharedPair>>,
    irqs: Irqs,
    /// Where each I/O queue pair lives, by queue id.
    queue_mem: Mutex<Vec<(u16, Dma)>>,
    /// The controller's own CMB, enabled for data at a bus address.
    pub cmb: Option<Cmb>,
    /// Bus addresses of peer memory the SSD reaches (mapped at IOVA = bus address).
    peers: Mutex<Vec<BusAddr>>,
    /// Why the controller was given up on (fatal status, reset, a command that never ended);
    /// from then on every command fails at once. `is_failed` is what the I/O path reads (no
    /// lock shared between queues per I/O).
    failed: Mutex<Option<String>>,
    is_failed: AtomicBool,
    /// Told the reason when the controller is given up on (its CMB's pool is revoked).
    failure_hooks: Hooks,
    _claim: Claim,
}

/// A function told why a controller was given up on.
pub type FailureHook = Box<dyn Fn(&str) + Send + Sync>;

#[derive(Default)]
struct Hooks(Mutex<Vec<FailureHook>>);

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failure hook(s)", self.0.lock().unwrap_or_else(|e| e.into_inner()).len())
    }
}

/// The controller's Controller Memory Buffer as enabled: PRPs for data in it carry `bus` +
/// offset — the address programmed into CMBMSC.CBA, not the CPU address of any mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmb {
    pub bus: BusAddr,
    pub size: u64,
}

/// Enables the controller's CMB for data at its bus address (CMBMSC, as the p2p layer does
/// for every CMB it uses: a controller or function reset clears it) and says where it answers.
fn enable_cmb(sysfs: &Sysfs, f: &p2pnvmf_p2p::pci::Function) -> Option<Cmb> {
    match sysfs.nvme_cmb(f, true) {
        Ok(Some(p)) if p.is_usable() => {
            let cmb = Cmb { bus: p.bus_addr, size: p.size };
            info!(pci = %f.addr, bus = %cmb.bus, size = cmb.size, "CMB enabled for data: PRPs carry its bus address");
            Some(cmb)
        }
        Ok(Some(p)) => {
            info!(pci = %f.addr, "no CMB for data: {}", p.unusable.unwrap_or_default());
            None
        }
        Ok(None) => None,
        Err(e) => {
            warn!(pci = %f.addr, "reading the CMB: {e}");
            None
        }
    }
}

/// Waits within CAP.TO until CSTS shows `what` (`done`); fatal status is an error at once.
fn wait_csts(pci: PciAddr, regs: &Mapping, cap: Cap, what: &str, done: impl Fn(u32) -> bool) -> Result<(), Error> {
    let start = Instant::now();
    let limit = Duration::from_millis(cap.timeout_ms());
    loop {
        let csts = regs.read32(reg::CSTS);
        if csts & reg::CSTS_CFS != 0 {
            return Err(Error::Failed(format!("{pci}: controller fatal status (CSTS {csts:#x})")));
        }
        if done(csts) {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(Error::Failed(format!(
                "{pci}: {what} not within CAP.TO ({} ms; CSTS {csts:#x})",
                limit.as_millis()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn wait_ready(pci: PciAddr, regs: &Mapping, cap: Cap, ready: bool) -> Result<(), Error> {
    let what = format!("CSTS.RDY did not become {}", ready as u8);
    wait_csts(pci, regs, cap, &what, |csts| (csts & reg::CSTS_RDY != 0) == ready)
}

impl Controller {
    /// The controller of `pci`: the one this process drives already (another namespace of the
    /// SSD, or the same one set up again), else [`Controller::open`]ed.
    pub fn shared(sysfs: &Sysfs, pci: PciAddr, want: u16, mode: Addressing) -> Result<Arc<Controller>, Error> {
        let mut driven = DRIVEN.lock().unwrap_or_else(|e| e.into_inner());
        driven.retain(|(_, c)| c.strong_count() > 0);
        if let Some(c) = driven.iter().find(|(p, _)| *p == pci).and_then(|(_, c)| c.upgrade()) {
            if c.mode() != mode {
                return Err(Error::Setup(format!("{pci} is driven with dma = \"{}\" already", c.mode().as_str())));
            }
            if let Some(why) = c.failed() {
                return Err(Error::Failed(format!(
                    "{pci} was given up on ({why}) and its queues still close; try again"
                )));
            }
            info!(%pci, "NVMe controller driven already: shared");
            return Ok(c);
        }
        let c = Arc::new(Controller::open(sysfs, pci, want, mode)?);
        driven.push((pci, Arc::downgrade(&c)));
        Ok(c)
    }

    fn mode(&self) -> Addressing {
        match self.access {
            Access::Vfio(_) => Addressing::Iommu,
            Access::Uio(_) => Addressing::Physical,
        }
    }

    /// Takes `pci` (see the module documentation) for `mode`, resets it and brings it up with
    /// at most `want` I/O queue pairs.
    pub fn open(sysfs: &Sysfs, pci: PciAddr, want: u16, mode: Addressing) -> Result<Controller, Error> {
        let claim = Claim::take(sysfs, pci, mode)?;
        let f = sysfs.function(pci).map_err(Error::device(pci))?;
        let (access, dma) = match mode {
            Addressing::Iommu => {
                let dev = VfioDevice::open(&f).map_err(Error::device(pci))?;
                if !dev.iommu() {
                    return Err(Error::Setup(format!(
                        "{pci}: VFIO in no-IOMMU mode: use dma = \"physical\" (uio_pci_generic)"
                    )));
                }
                // Memory space and bus mastering (PCI command register bits 1 and 2).
                let mut cmd = [0u8; 2];
                dev.config_read(4, &mut cmd).map_err(Error::device(pci))?;
                dev.config_write(4, &(u16::from_le_bytes(cmd) | 0x6).to_le_bytes()).map_err(Error::device(pci))?;
                (Access::Vfio(dev.clone()), DmaSpace::iommu(dev))
            }
            Addressing::Physical => {
                let dev = Arc::new(
                    UioDevice::open(&pci.to_string(), &sysfs.function_dir(pci), sysfs.root())
                        .map_err(Error::device(pci))?,
                );
                dev.enable().map_err(Error::device(pci))?;
                warn!(%pci, "physical-address mode: no IOMMU confines the SSD's DMA");
                (Access::Uio(dev), DmaSpace::physical())
            }
        };
        let regs = Arc::new(match &access {
            Access::Vfio(dev) => dev.map_bar(0, 0, 0x2000, BarUse::Registers).map_err(Error::device(pci))?,
            Access::Uio(dev) => dev.map_bar(0, 0, 0x2000, BarUse::Registers).map_err(Error::device(pci))?,
        });
        let cap = Cap(regs.read64(reg::CAP));
        if !cap.nvm() || cap.min_page() > PAGE {
            return Err(Error::Setup(format!("{pci}: CAP {:#x}: no NVM command set or no 4 KiB pages", cap.0)));
        }
        // Firmware may have left the controller enabled (SeaBIOS does): reset it first.
        if regs.read32(reg::CC) & reg::CC_EN != 0 {
            regs.write32(reg::CC, 0);
        }
        wait_ready(pci, &regs, cap, false)?;
        let entries = ADMIN_ENTRIES.min(cap.max_entries() as u16);
        let aq = dma.alloc(pci, 2 * PAGE)?;
        regs.write32(reg::AQA, u32::from(entries - 1) << 16 | u32::from(entries - 1));
        regs.write64_hi_lo(reg::ASQ, aq.addr(0));
        regs.write64_hi_lo(reg::ACQ, aq.addr(PAGE));
        regs.write32(reg::INTMS, !0);
        regs.write32(reg::CC, reg::CC_EN | reg::CC_ENTRY_SIZES);
        wait_ready(pci, &regs, cap, true)?;
        let cmb = enable_cmb(sysfs, &f);
        let (mem, at) = aq.region();
        let q = QueuePair::new(0, entries, mem, at, at + PAGE, regs.clone(), cap.doorbell_stride());
        let buf = dma.alloc(pci, PAGE)?;
        let mut c = Controller {
            pci,
            dma,
            access,
            regs,
            cap,
            admin: Mutex::new(Admin { q, _mem: aq, buf, next_cid: 0 }),
            id: IdController::parse(&[0; PAGE]),
            max_io_queues: 0,
            free_qids: Mutex::new(Vec::new()),
            qid_freed: Condvar::new(),
            shared: Mutex::new(Weak::new()),
            irqs: Irqs::Msix(Vec::new()),
            queue_mem: Mutex::new(Vec::new()),
            cmb,
            peers: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
            is_failed: AtomicBool::new(false),
            failure_hooks: Hooks::default(),
            _claim: claim,
        };
        c.id = IdController::parse(&c.identify(admin::CNS_CONTROLLER, 0)?);
        let cqe = c.admin_cmd(spec::set_num_queues(want.max(1)))?;
        // Dword 0: NSQA in bits 15:0, NCQA in 31:16, both 0's based.
        let r = cqe.result.get() as u32;
        c.max_io_queues = ((r & 0xffff).min(r >> 16) as u16).saturating_add(1).min(want.max(1));
        *c.free_qids.lock().unwrap_or_else(|e| e.into_inner()) = (1..=c.max_io_queues).rev().collect();
        c.irqs = match &c.access {
            Access::Vfio(dev) => {
                let fds: Vec<OwnedFd> = (0..=c.max_io_queues)
                    .map(|_| p2pnvmf_p2p::vfio::eventfd())
                    .collect::<Result<_, _>>()
                    .map_err(Error::os(pci, "eventfd"))?;
                let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
                dev.msix(&raw).map_err(Error::device(pci))?;
                Irqs::Msix(fds)
            }
            Access::Uio(dev) => {
                let intx = Intx::start(dev.clone(), pci)?;
                // Pin-based interrupts: vector 0, masked since the reset.
                c.regs.write32(reg::INTMC, 1);
                Irqs::Intx(intx)
            }
        };
        let how = match mode {
            Addressing::Iommu => "through VFIO and the IOMMU",
            Addressing::Physical => "through uio_pci_generic at physical addresses",
        };
        info!(%pci, serial = %c.id.serial, model = %c.id.model, firmware = %c.id.firmware, mdts = c.id.mdts,
              io_queues = c.max_io_queues, max_entries = cap.max_entries(), "NVMe controller up {how}");
        Ok(c)
    }

    /// Submits `sqe` on `q` and waits for its completion, polling: for admin commands and the
    /// shutdown flush, never for I/O. A status other than success, a controller given up on or
    /// in fatal status, or no completion within `limit` is an error naming the command (and
    /// the controller is given up on, so the SSD writes nothing more).
    ///
    /// # Safety
    /// As for [`QueuePair::submit`]: the memory the entry names is the command's until this
    /// returns.
    #[allow(unsafe_code)]
    pub unsafe fn run(&self, q: &mut QueuePair, mut sqe: Sqe, cid: u16, limit: Duration) -> Result<Cqe, Error> {
        // A controller given up on answers nothing: fail at once instead of waiting.
        if let Some(why) = self.failed() {
            return Err(Error::Failed(why));
        }
        let what = if q.qid == 0 { "admin command" } else { "I/O command" };
        sqe.cid.set(cid);
        // SAFETY: the caller's promise, passed on.
        unsafe { q.submit(&sqe) };
        let start = Instant::now();
        loop {
            while let Some(cqe) = q.poll() {
                if cqe.cid.get() != cid {
                    continue;
                }
                q.ring_cq();
                return match status(&cqe) {
                    0 => Ok(cqe),
                    s => Err(Error::Status {
                        pci: self.pci,
                        what: format!("{what} {:#04x}", sqe.opcode),
                        status: p2pnvmf_nvmf::Status::from_device(s),
                    }),
                };
            }
            if let Some(why) = self.failed() {
                return Err(Error::Failed(why));
            }
            let csts = self.regs.read32(reg::CSTS);
            if csts & reg::CSTS_CFS != 0 || start.elapsed() > limit {
                return Err(Error::Failed(format!(
                    "{}: {what} {:#04x} got no completion within {limit:?} (CSTS {csts:#x})",
                    self.pci, sqe.opcode
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Runs one admin command and waits for its completion. Every command given here names
    /// only memory of the controller's own: the admin data page, or a queue pair's memory
    /// (held in `queue_mem` until the queue is deleted).
    #[allow(unsafe_code)]
    fn admin_cmd(&self, sqe: Sqe) -> Result<Cqe, Error> {
        let mut a = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let cid = a.next_cid;
        a.next_cid = a.next_cid.wrapping_add(1);
        // SAFETY: see above; the controller's memory outlives the command.
        unsafe { self.run(&mut a.q, sqe, cid, ADMIN_TIMEOUT) }
    }

    /// Runs the admin command `cmd` makes for the admin data page (at its IOVA) and returns
    /// the first `len` bytes the controller put there; the page is the caller's until then.
    #[allow(unsafe_code)]
    fn admin_read(&self, cmd: impl FnOnce(u64) -> Sqe, len: usize) -> Result<Vec<u8>, Error> {
        let mut a = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let (cid, sqe) = (a.next_cid, cmd(a.buf.addr(0)));
        a.next_cid = a.next_cid.wrapping_add(1);
        // SAFETY: the command names the admin data page, which the lock held keeps ours.
        unsafe { self.run(&mut a.q, sqe, cid, ADMIN_TIMEOUT) }?;
        let mut data = vec![0; len.min(PAGE).next_multiple_of(4)];
        a.buf.read(0, &mut data);
        data.truncate(len.min(PAGE));
        Ok(data)
    }

    /// Identify data structure `cns` (for `nsid`).
    pub fn identify(&self, cns: u32, nsid: u32) -> Result<Vec<u8>, Error> {
        self.admin_read(|iova| spec::identify(cns, nsid, iova), PAGE)
    }

    /// Identify Namespace `nsid`; an inactive or absent namespace is an error.
    pub fn namespace(&self, nsid: u32) -> Result<IdNamespace, Error> {
        if nsid == 0 || nsid > self.id.nn {
            return Err(Error::Setup(format!(
                "{}: namespace {nsid} does not exist (the controller has {})",
                self.pci, self.id.nn
            )));
        }
        let ns = IdNamespace::parse(&self.identify(admin::CNS_NAMESPACE, nsid)?);
        if !ns.active() {
            return Err(Error::Setup(format!("{}: namespace {nsid} is not active", self.pci)));
        }
        Ok(ns)
    }

    /// A log page (at most 4 KiB), e.g. SMART / Health Information (02h).
    pub fn log_page(&self, lid: u8, nsid: u32, len: usize) -> Result<Vec<u8>, Error> {
        self.admin_read(|iova| spec::get_log_page(lid, nsid, len.min(PAGE), iova), len)
    }

    /// Host memory of at least `len` bytes the SSD reaches.
    pub fn dma(&self, len: usize) -> Result<Dma, Error> {
        self.dma.alloc(self.pci, len)
    }

    /// Maps memory someone else owns (a queue's data area) for the device; the caller keeps
    /// `pin` until it calls [`Controller::unmap`] with what this returned. Only through the
    /// IOMMU ([`Controller::maps_host_memory`]).
    pub fn map(&self, pin: &MappingPin) -> Result<(Iova, u64), Error> {
        self.dma.map(self.pci, pin)
    }

    pub fn unmap(&self, iova: Iova, span: u64) -> Result<(), Error> {
        self.dma.unmap(iova, span).map_err(Error::device(self.pci))
    }

    /// Whether memory others own can be given to the SSD: through the IOMMU, yes; at physical
    /// addresses, no (pages of others may move), so such data goes through bounce buffers.
    pub fn maps_host_memory(&self) -> bool {
        matches!(self.dma, DmaSpace::Iommu(_))
    }

    /// Adds a hook told the reason when the controller is given up on.
    pub fn on_failure(&self, hook: FailureHook) {
        self.failure_hooks.0.lock().unwrap_or_else(|e| e.into_inner()).push(hook);
    }

    /// Why the controller was given up on, if it was.
    pub fn failed(&self) -> Option<String> {
        if !self.is_failed.load(Ordering::Acquire) {
            return None;
        }
        self.failed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether the controller still works: not given up on, CSTS.CFS clear and CSTS.RDY set (a
    /// function reset clears it). A controller found broken is given up on.
    pub fn check(&self) -> Result<(), Error> {
        if let Some(why) = self.failed() {
            return Err(Error::Failed(why));
        }
        let csts = self.regs.read32(reg::CSTS);
        match (csts & reg::CSTS_CFS != 0, csts & reg::CSTS_RDY != 0) {
            (false, true) => Ok(()),
            (true, _) => Err(Error::Failed(self.give_up(format!("controller fatal status (CSTS {csts:#x})")))),
            (false, false) => {
                Err(Error::Failed(self.give_up(format!("the controller is no longer ready (reset? CSTS {csts:#x})"))))
            }
        }
    }

    /// Gives the controller up: disabling it stops every DMA it may still do (so no window
    /// given back to its owner is written later); commands waiting for it are failed by their
    /// queues. Returns the reason.
    pub fn give_up(&self, why: String) -> String {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.is_none() {
            let why =
                format!("{}: {why}; its commands fail from now on (restart the target once it is fixed)", self.pci);
            tracing::error!("NVMe controller given up: {why}");
            self.regs.write32(reg::CC, self.regs.read32(reg::CC) & !reg::CC_EN);
            for hook in self.failure_hooks.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                hook(&why);
            }
            *failed = Some(why);
            self.is_failed.store(true, Ordering::Release);
        }
        failed.clone().expect("set")
    }

    /// Makes peer device memory starting at bus address `bus` (`pin` keeps it mapped)
    /// reachable by the SSD at that same address: through the IOMMU, mapped at IOVA = `bus`
    /// once per controller (queues ask once per peer, not per I/O).
    pub fn peer(&self, pin: &MappingPin, bus: BusAddr) -> Result<(), Error> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if !peers.contains(&bus) {
            self.dma.map_at(self.pci, pin, bus)?;
            let (at, bytes) = (bus, pin.range().1);
            if self.maps_host_memory() {
                info!(pci = %self.pci, bus = %at, bytes, "peer memory mapped for the SSD at IOVA = its bus address");
            } else {
                info!(pci = %self.pci, bus = %at, bytes, "peer memory reached by the SSD at its bus address (no IOMMU)");
            }
            peers.push(bus);
        }
        Ok(())
    }

    /// The eventfd signalled when queue `qid` may have completions: MSI-X vector `qid`'s, or
    /// one of its own that the INTx thread signals on every interrupt (each sharer of a pair
    /// gets one; they go when the pair is deleted).
    pub fn irq(&self, qid: u16) -> Result<OwnedFd, Error> {
        let dup = |fd: &OwnedFd| {
            fd.try_clone().map_err(Error::os(self.pci, format!("duplicating the eventfd of queue {qid}")))
        };
        match &self.irqs {
            Irqs::Msix(fds) => dup(fds
                .get(usize::from(qid))
                .ok_or_else(|| Error::Setup(format!("{}: no interrupt vector for queue {qid}", self.pci)))?),
            Irqs::Intx(intx) => {
                let fd = p2pnvmf_p2p::vfio::eventfd().map_err(Error::os(self.pci, "eventfd"))?;
                let mut queues = intx.queues.lock().unwrap_or_else(|e| e.into_inner());
                queues.push((qid, File::from(dup(&fd)?)));
                Ok(fd)
            }
        }
    }

    /// Creates an I/O queue pair of `entries`, its completions raising its interrupt vector
    /// when `interrupts` (else it is only ever polled); `None` when every granted pair is in use.
    pub fn create_io_queue(&self, entries: u16, interrupts: bool) -> Result<Option<QueuePair>, Error> {
        let Some(qid) = self.free_qids.lock().unwrap_or_else(|e| e.into_inner()).pop() else { return Ok(None) };
        let entries = entries.clamp(2, self.cap.max_entries().min(4096) as u16);
        let sq_len = (usize::from(entries) * SQE_SIZE).next_multiple_of(PAGE);
        let cq_len = (usize::from(entries) * CQE_SIZE).next_multiple_of(PAGE);
        // INTx has one vector, 0, for every queue.
        let vector = if matches!(self.irqs, Irqs::Msix(_)) { qid } else { 0 };
        let vector = interrupts.then_some(vector);
        let created = self.dma(sq_len + cq_len).and_then(|m| {
            self.admin_cmd(spec::create_cq(qid, u32::from(entries), m.addr(sq_len), vector))?;
            if let Err(e) = self.admin_cmd(spec::create_sq(qid, u32::from(entries), m.addr(0), qid)) {
                let _ = self.admin_cmd(spec::delete_queue(admin::DELETE_CQ, qid));
                return Err(e);
            }
            let (mem, at) = m.region();
            let q = QueuePair::new(qid, entries, mem, at, at + sq_len, self.regs.clone(), self.cap.doorbell_stride());
            self.queue_mem.lock().unwrap_or_else(|e| e.into_inner()).push((qid, m));
            Ok(q)
        });
        if created.is_err() {
            self.free_qid(qid);
        }
        created.map(Some)
    }

    /// A target queue's way to the SSD, for `entries` commands: a queue pair of its own while
    /// more than one granted pair is free; the last granted one is created shared, and target
    /// queues beyond the granted pairs share it. Waits up to `limit` for a pair to be given back
    /// only when even the shared one takes no more sharers (CIDs); `None` when none was in
    /// time. A pair of its own raises interrupts unless `reaping` is polled; the shared one
    /// always does (a sharer may sleep on them). Blocks: for callers off the runtime's workers.
    pub fn open_pair(&self, entries: u16, limit: Duration, reaping: Reaping) -> Result<Option<Pair>, Error> {
        let deadline = Instant::now() + limit;
        let mut waited = false;
        loop {
            let free = self.free_qids.lock().unwrap_or_else(|e| e.into_inner()).len();
            if free > 1
                && let Some(q) = self.create_io_queue(entries, reaping == Reaping::Signalled)?
            {
                return Ok(Some(Pair::Own(q)));
            }
            {
                let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(pair) = shared.upgrade()
                    && let Some(share) = pair.join()
                {
                    info!(pci = %self.pci, granted = self.max_io_queues, sharers = pair.sharers(),
                          "every other granted I/O queue pair is in use: this queue shares the last one");
                    return Ok(Some(Pair::Shared(share)));
                }
                if free == 1
                    && let Some(q) = self.create_io_queue(SHARED_ENTRIES, true)?
                {
                    let s = SharedPair::new(q);
                    *shared = Arc::downgrade(&s);
                    return Ok(Some(Pair::Shared(s.join().expect("a new pair takes sharers"))));
                }
            }
            let free = self.free_qids.lock().unwrap_or_else(|e| e.into_inner());
            if !free.is_empty() {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.failed().is_some() {
                return Ok(None);
            }
            if !std::mem::replace(&mut waited, true) {
                info!(pci = %self.pci, granted = self.max_io_queues, "every I/O queue pair is in use: waiting for one to be given back");
            }
            drop(self.qid_freed.wait_timeout(free, left).unwrap_or_else(|e| e.into_inner()));
        }
    }

    fn free_qid(&self, qid: u16) {
        self.free_qids.lock().unwrap_or_else(|e| e.into_inner()).push(qid);
        self.qid_freed.notify_all();
    }

    /// Deletes an I/O queue pair (its commands must have completed).
    pub fn delete_io_queue(&self, q: QueuePair) -> Result<(), Error> {
        let qid = q.qid;
        let r = self
            .admin_cmd(spec::delete_queue(admin::DELETE_SQ, qid))
            .and_then(|_| self.admin_cmd(spec::delete_queue(admin::DELETE_CQ, qid)));
        // The SSD no longer uses the queue's memory (deleted, or disabled when that failed).
        self.queue_mem.lock().unwrap_or_else(|e| e.into_inner()).retain(|(q, _)| *q != qid);
        if let Irqs::Intx(intx) = &self.irqs {
            intx.queues.lock().unwrap_or_else(|e| e.into_inner()).retain(|(q, _)| *q != qid);
        }
        self.free_qid(qid);
        r.map(drop)
    }
}

impl Drop for Controller {
    /// Normal shutdown (CC.SHN), so the SSD flushes its cache before the function is let go.
    fn drop(&mut self) {
        let cc = self.regs.read32(reg::CC);
        if cc & reg::CC_EN == 0 {
            // Given up on or reset: nothing to shut down.
            return;
        }
        self.regs.write32(reg::CC, cc | reg::CC_SHN_NORMAL);
        let done = |csts| csts & reg::CSTS_SHST_MASK == reg::CSTS_SHST_DONE;
        match wait_csts(self.pci, &self.regs, self.cap, "shutdown did not complete", done) {
            Ok(()) => info!(pci = %self.pci, "NVMe controller shut down"),
            Err(e) => warn!("{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private copy of the switch fixture (an unbound NVMe at 0000:03:00.0).
    fn sysfs() -> (Sysfs, PathBuf) {
        let dir = p2pnvmf_p2p::fixture::copy("pci-switch-cmb");
        (Sysfs::new(&dir), dir)
    }

    #[test]
    fn ownership_is_taken_only_where_it_is_free_to_take() {
        let (s, dir) = sysfs();
        let nvme: PciAddr = "0000:03:00.0".parse().unwrap();
        let e = Claim::take(&s, "0000:7f:00.0".parse().unwrap(), Addressing::Iommu).unwrap_err().to_string();
        assert!(e.contains("0000:7f:00.0: no such PCI function"), "{e}");
        // No IOMMU (no group): refused before anything is written.
        let group = s.function_dir(nvme).join("iommu_group");
        let target = std::fs::read_link(&group).unwrap();
        std::fs::remove_file(&group).unwrap();
        let e = Claim::take(&s, nvme, Addressing::Iommu).unwrap_err().to_string();
        assert!(
            e.contains("0000:03:00.0: no IOMMU group: the IOMMU is off") && e.contains("dma = \"physical\""),
            "{e}"
        );
        // Asked for physical addresses there: the uio driver is needed.
        let e = Claim::take(&s, nvme, Addressing::Physical).unwrap_err().to_string();
        assert!(e.contains("the uio_pci_generic driver is not loaded (modprobe uio_pci_generic)"), "{e}");
        std::os::unix::fs::symlink(target, &group).unwrap();
        // With an IOMMU group, physical addresses would fault: refused before anything is written.
        let e = Claim::take(&s, nvme, Addressing::Physical).unwrap_err().to_string();
        assert!(e.contains("has an IOMMU group") && e.contains("drop dma = \"physical\""), "{e}");
        // vfio-pci not loaded: nothing is written.
        let e = Claim::take(&s, nvme, Addressing::Iommu).unwrap_err().to_string();
        assert!(e.contains("the vfio-pci driver is not loaded (modprobe vfio-pci)"), "{e}");
        // Loaded, but the bind does not happen (no kernel behind these files): undone, said so.
        let drivers = dir.join("sys/bus/pci/drivers");
        std::fs::create_dir_all(drivers.join("vfio-pci")).unwrap();
        std::fs::write(dir.join("sys/bus/pci/drivers_probe"), "").unwrap();
        let e = Claim::take(&s, nvme, Addressing::Iommu).unwrap_err().to_string();
        assert!(e.contains("vfio-pci did not bind it"), "{e}");
        assert_eq!(std::fs::read_to_string(dir.join("sys/bus/pci/drivers_probe")).unwrap(), "0000:03:00.0");
        let fdir = s.function_dir(nvme);
        assert_eq!(std::fs::read_to_string(fdir.join("driver_override")).unwrap(), "\n", "override cleared again");
        // The kernel's nvme driver holds it: refused with the way out, nothing touched.
        std::fs::create_dir_all(drivers.join("nvme")).unwrap();
        std::os::unix::fs::symlink(drivers.join("nvme"), fdir.join("driver")).unwrap();
        std::fs::write(fdir.join("driver_override"), "untouched").unwrap();
        let e = Claim::take(&s, nvme, Addressing::Iommu).unwrap_err().to_string();
        assert!(
            e.contains("bound to the kernel's nvme driver") && e.contains("/sys/bus/pci/drivers/nvme/unbind"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(fdir.join("driver_override")).unwrap(), "untouched");
        // Already on vfio-pci: used as it is, and left bound at the end.
        std::fs::remove_file(fdir.join("driver")).unwrap();
        std::os::unix::fs::symlink(drivers.join("vfio-pci"), fdir.join("driver")).unwrap();
        let c = Claim::take(&s, nvme, Addressing::Iommu).unwrap();
        assert!(c.bound_by_us.is_none());
        drop(c);
        assert!(!drivers.join("vfio-pci/unbind").exists(), "not unbound at the end");
        // Bound to the other mode's driver: refused, not rebound behind its user's back.
        let e = Claim::take(&s, nvme, Addressing::Physical).unwrap_err().to_string();
        assert!(e.contains("is bound to the kernel driver vfio-pci"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_second_claim_waits_until_the_first_owner_has_given_the_function_back() {
        let (s, dir) = sysfs();
        let nvme: PciAddr = "0000:03:00.0".parse().unwrap();
        let drivers = dir.join("sys/bus/pci/drivers");
        std::fs::create_dir_all(drivers.join("vfio-pci")).unwrap();
        let fdir = s.function_dir(nvme);
        std::os::unix::fs::symlink(drivers.join("vfio-pci"), fdir.join("driver")).unwrap();
        let first = Claim::take(&s, nvme, Addressing::Iommu).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = s.clone();
        let waiter = std::thread::spawn(move || {
            let second = Claim::take(&s2, nvme, Addressing::Iommu);
            tx.send(Instant::now()).unwrap();
            second.map(drop)
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(rx.try_recv().is_err(), "the second claim went ahead while the first held the function");
        let released = Instant::now();
        drop(first);
        let got = rx.recv_timeout(Duration::from_secs(5)).expect("the second claim after the release");
        assert!(got >= released);
        waiter.join().unwrap().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
