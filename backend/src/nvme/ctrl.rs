//! An NVMe controller the target drives through VFIO: taking ownership (a function bound to
//! vfio-pci is used; an unbound one is bound to vfio-pci and given back at exit; one bound to
//! the kernel's nvme driver is refused), reset, the admin queue, Identify, the number of I/O
//! queues, and creating and deleting I/O queue pairs. Admin commands run synchronously: they
//! happen at start and when a queue opens or closes, never per I/O.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use p2pnvmf_nvmf::wire::{Cqe, Sqe};
use p2pnvmf_p2p::mem::{Mapping, MappingPin};
use p2pnvmf_p2p::pci::{PciAddr, Sysfs};
use p2pnvmf_p2p::vfio::VfioDevice;
use tracing::{info, warn};

use super::queue::{CQE_SIZE, QueuePair, SQE_SIZE, status};
use super::spec::{self, Cap, IdController, IdNamespace, admin, reg};

/// Admin queue depth.
const ADMIN_ENTRIES: u16 = 32;
/// How long an admin command may take before the controller is declared stuck.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// IOVAs the driver hands out for host memory: above the low 4 GiB (where 32-bit peer BARs'
/// bus addresses live, which are mapped at IOVA = bus address) and below 2^39, the narrowest
/// IOMMU address width in use (qemu's intel-iommu default).
const IOVA_BASE: u64 = 1 << 32;
const IOVA_END: u64 = 1 << 39;
/// IOVA ranges are handed out in these units (a 2 MiB huge page).
const IOVA_UNIT: u64 = 2 << 20;
const PAGE: usize = 4096;

/// What we did to own the function, undone on drop.
#[derive(Debug)]
struct Claim {
    sysfs: PathBuf,
    pci: PciAddr,
    /// We bound it to vfio-pci: unbind it and clear driver_override at exit.
    bound_by_us: bool,
}

impl Claim {
    fn take(sysfs: &Sysfs, pci: PciAddr) -> Result<Claim, String> {
        let dir = sysfs.function_dir(pci);
        if !dir.exists() {
            return Err(format!("{pci}: no such PCI function ({} is absent)", dir.display()));
        }
        let driver = |dir: &Path| {
            std::fs::read_link(dir.join("driver"))
                .ok()
                .and_then(|l| Some(l.file_name()?.to_string_lossy().into_owned()))
        };
        match driver(&dir).as_deref() {
            Some("vfio-pci") => return Ok(Claim { sysfs: sysfs.root().to_path_buf(), pci, bound_by_us: false }),
            Some("nvme") => {
                return Err(format!(
                    "{pci} is bound to the kernel's nvme driver, which may hold mounted filesystems on it: free it \
                     yourself (echo {pci} > /sys/bus/pci/drivers/nvme/unbind) to let the target take it, or serve \
                     its block device with backend = \"file\""
                ));
            }
            Some(d) => {
                return Err(format!("{pci} is bound to the kernel driver {d}; unbind it to use it with nvme-vfio"));
            }
            None => {}
        }
        if !dir.join("iommu_group").exists() {
            return Err(format!(
                "{pci}: no IOMMU group: the IOMMU is off (turn it on with intel_iommu=on or amd_iommu=on on the kernel \
                 command line); nvme-vfio needs it to keep the SSD's DMA to the target's memory, and its \
                 physical-address mode without one is not built yet"
            ));
        }
        let root = sysfs.root().join("sys/bus/pci");
        if !root.join("drivers/vfio-pci").exists() {
            return Err(format!("{pci}: the vfio-pci driver is not loaded (modprobe vfio-pci)"));
        }
        let write = |p: PathBuf, v: &str| {
            std::fs::write(&p, v).map_err(|e| format!("{pci}: writing {v} to {}: {e}", p.display()))
        };
        write(dir.join("driver_override"), "vfio-pci")?;
        write(root.join("drivers_probe"), &pci.to_string())?;
        if driver(&dir).as_deref() != Some("vfio-pci") {
            let _ = std::fs::write(dir.join("driver_override"), "\n");
            return Err(format!("{pci}: vfio-pci did not bind it (see the kernel log)"));
        }
        info!(%pci, "bound to vfio-pci for the nvme-vfio backend; given back at exit");
        Ok(Claim { sysfs: sysfs.root().to_path_buf(), pci, bound_by_us: true })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.bound_by_us {
            return;
        }
        let dir = Sysfs::new(&self.sysfs).function_dir(self.pci);
        let unbind = self.sysfs.join("sys/bus/pci/drivers/vfio-pci/unbind");
        if let Err(e) = std::fs::write(&unbind, self.pci.to_string()) {
            warn!(pci = %self.pci, "unbinding from vfio-pci at exit: {e}");
        }
        let _ = std::fs::write(dir.join("driver_override"), "\n");
    }
}

/// Host memory the controller reaches by DMA, at an IOVA of ours.
#[derive(Debug, Clone)]
pub struct Dma {
    pub mem: Arc<Mapping>,
    pub iova: u64,
}

/// Hands out DMA-mapped host memory and maps memory others own: each piece mapped into the
/// device's IOMMU domain once, at an IOVA range of ours (reused after an unmap).
#[derive(Debug)]
struct DmaSpace {
    dev: Arc<VfioDevice>,
    /// Free IOVA ranges (start, length), first fit.
    free: Mutex<Vec<(u64, u64)>>,
    /// The controller's own memory, kept alive for the device as long as it is open.
    pins: Mutex<Vec<MappingPin>>,
}

impl DmaSpace {
    fn new(dev: Arc<VfioDevice>) -> DmaSpace {
        DmaSpace { dev, free: Mutex::new(vec![(IOVA_BASE, IOVA_END - IOVA_BASE)]), pins: Mutex::new(Vec::new()) }
    }

    /// Maps `pin`'s mapping for the device at an IOVA of ours; returns the IOVA and the length
    /// reserved (for [`DmaSpace::unmap`]).
    fn map(&self, pci: PciAddr, pin: &MappingPin) -> Result<(u64, u64), String> {
        let span = (pin.range().1 as u64).next_multiple_of(IOVA_UNIT);
        let iova = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let i =
                free.iter().position(|&(_, len)| len >= span).ok_or_else(|| format!("{pci}: IOVA space exhausted"))?;
            let (at, len) = free[i];
            if len == span {
                free.remove(i);
            } else {
                free[i] = (at + span, len - span);
            }
            at
        };
        match self.dev.map_dma(pin, iova) {
            Ok(()) => Ok((iova, span)),
            Err(e) => {
                self.release(iova, span);
                Err(e)
            }
        }
    }

    /// Maps `pin` (peer device memory) for the device at IOVA = `bus`, its bus address, so
    /// that the same address in a PRP works whether the switch routes it to the peer or sends it
    /// up to the IOMMU (ACS redirect, qemu); the range leaves the pool of IOVAs for host memory.
    fn map_at(&self, pci: PciAddr, pin: &MappingPin, bus: u64) -> Result<(), String> {
        let span = (pin.range().1 as u64).next_multiple_of(PAGE as u64);
        {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = free.iter().position(|&(at, len)| at <= bus && bus + span <= at + len) {
                let (at, len) = free.remove(i);
                free.extend([(at, bus - at), (bus + span, at + len - bus - span)].into_iter().filter(|r| r.1 > 0));
            } else if bus < IOVA_END && bus + span > IOVA_BASE {
                return Err(format!("{pci}: peer memory at bus address {bus:#x} collides with IOVAs in use"));
            }
        }
        self.dev.map_dma(pin, bus)?;
        self.pins.lock().unwrap_or_else(|e| e.into_inner()).push(pin.clone());
        Ok(())
    }

    fn unmap(&self, iova: u64, span: u64) -> Result<(), String> {
        let r = self.dev.unmap_dma(iova, span as usize);
        self.release(iova, span);
        r
    }

    fn release(&self, iova: u64, span: u64) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).push((iova, span));
    }

    fn alloc(&self, pci: PciAddr, len: usize) -> Result<Dma, String> {
        let mem = Arc::new(Mapping::host(len).map_err(|e| format!("{pci}: {len} bytes of DMA memory: {e}"))?);
        let pin = MappingPin::of(&mem);
        let (iova, _) = self.map(pci, &pin)?;
        self.pins.lock().unwrap_or_else(|e| e.into_inner()).push(pin);
        Ok(Dma { mem, iova })
    }
}

/// The admin queue and its page for Identify data.
#[derive(Debug)]
struct Admin {
    q: QueuePair,
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
    regs: Arc<Mapping>,
    cap: Cap,
    admin: Mutex<Admin>,
    pub id: IdController,
    /// I/O queue pairs the controller granted (Set Features, Number of Queues).
    pub max_io_queues: u16,
    free_qids: Mutex<Vec<u16>>,
    /// Eventfds of MSI-X vectors 0 (admin, unused: admin commands poll) to `max_io_queues`.
    irqs: Vec<OwnedFd>,
    /// The controller's own CMB, enabled for data at a bus address.
    pub cmb: Option<Cmb>,
    /// Bus addresses of peer memory mapped for the SSD (at IOVA = bus address).
    peers: Mutex<Vec<u64>>,
    /// Why the controller was given up on (fatal status, reset, a command that never ended);
    /// from then on every command fails at once. `is_failed` is what the I/O path reads (no
    /// lock shared between queues per I/O).
    failed: Mutex<Option<String>>,
    is_failed: AtomicBool,
    _claim: Claim,
}

/// The controller's Controller Memory Buffer as enabled: PRPs for data in it carry `bus` +
/// offset — the address programmed into CMBMSC.CBA, not the CPU address of any mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmb {
    pub bus: u64,
    pub size: u64,
}

/// Enables the controller's CMB for data at its bus address (CMBMSC, as the p2p layer does
/// for every CMB it uses: a controller or function reset clears it) and says where it answers.
fn enable_cmb(sysfs: &Sysfs, f: &p2pnvmf_p2p::pci::Function) -> Option<Cmb> {
    match sysfs.nvme_cmb(f, true) {
        Ok(Some(p)) if p.is_usable() => {
            let cmb = Cmb { bus: p.bus_addr, size: p.size };
            info!(pci = %f.addr, bus = format_args!("{:#x}", cmb.bus), size = cmb.size, "CMB enabled for data: PRPs carry its bus address");
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
fn wait_csts(pci: PciAddr, regs: &Mapping, cap: Cap, what: &str, done: impl Fn(u32) -> bool) -> Result<(), String> {
    let start = Instant::now();
    let limit = Duration::from_millis(cap.timeout_ms());
    loop {
        let csts = regs.read32(reg::CSTS);
        if csts & reg::CSTS_CFS != 0 {
            return Err(format!("{pci}: controller fatal status (CSTS {csts:#x})"));
        }
        if done(csts) {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!("{pci}: {what} not within CAP.TO ({} ms; CSTS {csts:#x})", limit.as_millis()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn wait_ready(pci: PciAddr, regs: &Mapping, cap: Cap, ready: bool) -> Result<(), String> {
    let what = format!("CSTS.RDY did not become {}", ready as u8);
    wait_csts(pci, regs, cap, &what, |csts| (csts & reg::CSTS_RDY != 0) == ready)
}

impl Controller {
    /// Takes `pci` (see the module documentation), resets it and brings it up with at most
    /// `want` I/O queue pairs.
    pub fn open(sysfs: &Sysfs, pci: PciAddr, want: u16) -> Result<Controller, String> {
        let claim = Claim::take(sysfs, pci)?;
        let f = sysfs.function(pci).map_err(|e| e.to_string())?;
        let dev = VfioDevice::open(&f)?;
        if !dev.iommu() {
            return Err(format!("{pci}: VFIO without an IOMMU is not supported by nvme-vfio yet"));
        }
        // Memory space and bus mastering (PCI command register bits 1 and 2).
        let mut cmd = [0u8; 2];
        dev.config_read(4, &mut cmd)?;
        dev.config_write(4, &(u16::from_le_bytes(cmd) | 0x6).to_le_bytes())?;
        let regs = Arc::new(dev.map_bar(0, 0, 0x2000)?);
        let cap = Cap(regs.read64(reg::CAP));
        if !cap.nvm() || cap.min_page() > PAGE {
            return Err(format!("{pci}: CAP {:#x}: no NVM command set or no 4 KiB pages", cap.0));
        }
        let dma = DmaSpace::new(dev);
        // Firmware may have left the controller enabled (SeaBIOS does): reset it first.
        if regs.read32(reg::CC) & reg::CC_EN != 0 {
            regs.write32(reg::CC, 0);
        }
        wait_ready(pci, &regs, cap, false)?;
        let entries = ADMIN_ENTRIES.min(cap.max_entries() as u16);
        let aq = dma.alloc(pci, 2 * PAGE)?;
        regs.write32(reg::AQA, u32::from(entries - 1) << 16 | u32::from(entries - 1));
        regs.write64_hi_lo(reg::ASQ, aq.iova);
        regs.write64_hi_lo(reg::ACQ, aq.iova + PAGE as u64);
        regs.write32(reg::INTMS, !0);
        regs.write32(reg::CC, reg::CC_EN | reg::CC_ENTRY_SIZES);
        wait_ready(pci, &regs, cap, true)?;
        let cmb = enable_cmb(sysfs, &f);
        let q = QueuePair::new(0, entries, aq.mem, 0, PAGE, regs.clone(), cap.doorbell_stride());
        let buf = dma.alloc(pci, PAGE)?;
        let mut c = Controller {
            pci,
            dma,
            regs,
            cap,
            admin: Mutex::new(Admin { q, buf, next_cid: 0 }),
            id: IdController::parse(&[0; PAGE]),
            max_io_queues: 0,
            free_qids: Mutex::new(Vec::new()),
            irqs: Vec::new(),
            cmb,
            peers: Mutex::new(Vec::new()),
            failed: Mutex::new(None),
            is_failed: AtomicBool::new(false),
            _claim: claim,
        };
        c.id = IdController::parse(&c.identify(admin::CNS_CONTROLLER, 0)?);
        let cqe = c.admin_cmd(spec::set_num_queues(want.max(1)))?;
        // Dword 0: NSQA in bits 15:0, NCQA in 31:16, both 0's based.
        let r = cqe.result.get() as u32;
        c.max_io_queues = ((r & 0xffff).min(r >> 16) as u16).saturating_add(1).min(want.max(1));
        *c.free_qids.lock().unwrap_or_else(|e| e.into_inner()) = (1..=c.max_io_queues).rev().collect();
        c.irqs = (0..=c.max_io_queues)
            .map(|_| p2pnvmf_p2p::vfio::eventfd())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{pci}: eventfd: {e}"))?;
        let fds: Vec<i32> = c.irqs.iter().map(AsRawFd::as_raw_fd).collect();
        c.dma.dev.msix(&fds).map_err(|e| format!("{pci}: MSI-X: {e}"))?;
        info!(%pci, serial = %c.id.serial, model = %c.id.model, firmware = %c.id.firmware, mdts = c.id.mdts,
              io_queues = c.max_io_queues, max_entries = cap.max_entries(), "NVMe controller up through VFIO");
        Ok(c)
    }

    /// Submits `sqe` on `q` and waits for its completion, polling: for admin commands and the
    /// shutdown flush, never for I/O. A status other than success, a controller given up on or
    /// in fatal status, or no completion within `limit` is an error naming the command.
    pub fn run(&self, q: &mut QueuePair, mut sqe: Sqe, cid: u16, limit: Duration) -> Result<Cqe, String> {
        // A controller given up on answers nothing: fail at once instead of waiting.
        if let Some(why) = self.failed() {
            return Err(why);
        }
        let what = if q.qid == 0 { "admin command" } else { "I/O command" };
        sqe.cid.set(cid);
        q.submit(&sqe);
        let start = Instant::now();
        loop {
            while let Some(cqe) = q.poll() {
                if cqe.cid.get() != cid {
                    continue;
                }
                q.ring_cq();
                return match status(&cqe) {
                    0 => Ok(cqe),
                    s => Err(format!(
                        "{}: {what} {:#04x} failed with status {s:#x} (SCT {}, SC {:#04x})",
                        self.pci,
                        sqe.opcode,
                        s >> 8 & 0x7,
                        s & 0xff
                    )),
                };
            }
            if let Some(why) = self.failed() {
                return Err(why);
            }
            let csts = self.regs.read32(reg::CSTS);
            if csts & reg::CSTS_CFS != 0 || start.elapsed() > limit {
                return Err(format!(
                    "{}: {what} {:#04x} got no completion within {limit:?} (CSTS {csts:#x})",
                    self.pci, sqe.opcode
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Runs one admin command and waits for its completion.
    fn admin_cmd(&self, sqe: Sqe) -> Result<Cqe, String> {
        let mut a = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let cid = a.next_cid;
        a.next_cid = a.next_cid.wrapping_add(1);
        self.run(&mut a.q, sqe, cid, ADMIN_TIMEOUT)
    }

    /// Runs the admin command `cmd` makes for the admin data page (at its IOVA) and returns
    /// the first `len` bytes the controller put there; the page is the caller's until then.
    fn admin_read(&self, cmd: impl FnOnce(u64) -> Sqe, len: usize) -> Result<Vec<u8>, String> {
        let mut a = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let (cid, sqe) = (a.next_cid, cmd(a.buf.iova));
        a.next_cid = a.next_cid.wrapping_add(1);
        self.run(&mut a.q, sqe, cid, ADMIN_TIMEOUT)?;
        Ok(a.buf.mem.slice(0, len.min(PAGE)).to_vec())
    }

    /// Identify data structure `cns` (for `nsid`).
    pub fn identify(&self, cns: u32, nsid: u32) -> Result<Vec<u8>, String> {
        self.admin_read(|iova| spec::identify(cns, nsid, iova), PAGE)
    }

    /// Identify Namespace `nsid`; an inactive or absent namespace is an error.
    pub fn namespace(&self, nsid: u32) -> Result<IdNamespace, String> {
        if nsid == 0 || nsid > self.id.nn {
            return Err(format!("{}: namespace {nsid} does not exist (the controller has {})", self.pci, self.id.nn));
        }
        let ns = IdNamespace::parse(&self.identify(admin::CNS_NAMESPACE, nsid)?);
        if !ns.active() {
            return Err(format!("{}: namespace {nsid} is not active", self.pci));
        }
        Ok(ns)
    }

    /// A log page (at most 4 KiB), e.g. SMART / Health Information (02h).
    pub fn log_page(&self, lid: u8, nsid: u32, len: usize) -> Result<Vec<u8>, String> {
        self.admin_read(|iova| spec::get_log_page(lid, nsid, len.min(PAGE), iova), len)
    }

    /// DMA-mapped host memory of `len` bytes (mapped once; lives as long as the controller).
    pub fn dma(&self, len: usize) -> Result<Dma, String> {
        self.dma.alloc(self.pci, len)
    }

    /// Maps memory someone else owns (a queue's data area) for the device; the caller keeps
    /// `pin` until it calls [`Controller::unmap`] with what this returned.
    pub fn map(&self, pin: &MappingPin) -> Result<(u64, u64), String> {
        self.dma.map(self.pci, pin)
    }

    pub fn unmap(&self, iova: u64, span: u64) -> Result<(), String> {
        self.dma.unmap(iova, span)
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
    pub fn check(&self) -> Result<(), String> {
        if let Some(why) = self.failed() {
            return Err(why);
        }
        let csts = self.regs.read32(reg::CSTS);
        match (csts & reg::CSTS_CFS != 0, csts & reg::CSTS_RDY != 0) {
            (false, true) => Ok(()),
            (true, _) => Err(self.give_up(format!("controller fatal status (CSTS {csts:#x})"))),
            (false, false) => Err(self.give_up(format!("the controller is no longer ready (reset? CSTS {csts:#x})"))),
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
            *failed = Some(why);
            self.is_failed.store(true, Ordering::Release);
        }
        failed.clone().expect("set")
    }

    /// Makes peer device memory starting at bus address `bus` (`pin` keeps it mapped)
    /// reachable by the SSD at that same address: mapped at IOVA = `bus` once per controller
    /// (queues ask once per peer, not per I/O).
    pub fn peer(&self, pin: &MappingPin, bus: u64) -> Result<(), String> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if !peers.contains(&bus) {
            self.dma.map_at(self.pci, pin, bus)?;
            info!(pci = %self.pci, bus = format_args!("{bus:#x}"), bytes = pin.range().1,
                  "peer memory mapped for the SSD at IOVA = its bus address");
            peers.push(bus);
        }
        Ok(())
    }

    /// The eventfd MSI-X vector `qid` signals (I/O queue `qid` raises vector `qid`).
    pub fn irq(&self, qid: u16) -> Result<OwnedFd, String> {
        self.irqs
            .get(usize::from(qid))
            .ok_or_else(|| format!("{}: no interrupt vector for queue {qid}", self.pci))?
            .try_clone()
            .map_err(|e| format!("{}: duplicating the eventfd of vector {qid}: {e}", self.pci))
    }

    /// Creates an I/O queue pair of `entries`; `None` when every granted pair is in use.
    pub fn create_io_queue(&self, entries: u16) -> Result<Option<QueuePair>, String> {
        let Some(qid) = self.free_qids.lock().unwrap_or_else(|e| e.into_inner()).pop() else { return Ok(None) };
        let entries = entries.clamp(2, self.cap.max_entries().min(4096) as u16);
        let sq_len = (usize::from(entries) * SQE_SIZE).next_multiple_of(PAGE);
        let cq_len = (usize::from(entries) * CQE_SIZE).next_multiple_of(PAGE);
        let created = self.dma(sq_len + cq_len).and_then(|m| {
            self.admin_cmd(spec::create_cq(qid, u32::from(entries), m.iova + sq_len as u64, Some(qid)))?;
            if let Err(e) = self.admin_cmd(spec::create_sq(qid, u32::from(entries), m.iova, qid)) {
                let _ = self.admin_cmd(spec::delete_queue(admin::DELETE_CQ, qid));
                return Err(e);
            }
            Ok(QueuePair::new(qid, entries, m.mem, 0, sq_len, self.regs.clone(), self.cap.doorbell_stride()))
        });
        if created.is_err() {
            self.free_qids.lock().unwrap_or_else(|e| e.into_inner()).push(qid);
        }
        created.map(Some)
    }

    /// Deletes an I/O queue pair (its commands must have completed).
    pub fn delete_io_queue(&self, q: QueuePair) -> Result<(), String> {
        let qid = q.qid;
        let r = self
            .admin_cmd(spec::delete_queue(admin::DELETE_SQ, qid))
            .and_then(|_| self.admin_cmd(spec::delete_queue(admin::DELETE_CQ, qid)));
        self.free_qids.lock().unwrap_or_else(|e| e.into_inner()).push(qid);
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
    fn sysfs(name: &str) -> (Sysfs, PathBuf) {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/pci-switch-cmb");
        let dir = std::env::temp_dir().join(format!("p2pnvmf-claim-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(std::process::Command::new("cp").arg("-a").arg(&src).arg(&dir).status().unwrap().success());
        (Sysfs::new(&dir), dir)
    }

    #[test]
    fn ownership_is_taken_only_where_it_is_free_to_take() {
        let (s, dir) = sysfs("own");
        let nvme: PciAddr = "0000:03:00.0".parse().unwrap();
        let e = Claim::take(&s, "0000:7f:00.0".parse().unwrap()).unwrap_err();
        assert!(e.contains("0000:7f:00.0: no such PCI function"), "{e}");
        // No IOMMU (no group): refused before anything is written.
        let group = s.function_dir(nvme).join("iommu_group");
        let target = std::fs::read_link(&group).unwrap();
        std::fs::remove_file(&group).unwrap();
        let e = Claim::take(&s, nvme).unwrap_err();
        assert!(e.contains("0000:03:00.0: no IOMMU group: the IOMMU is off"), "{e}");
        std::os::unix::fs::symlink(target, &group).unwrap();
        // vfio-pci not loaded: nothing is written.
        let e = Claim::take(&s, nvme).unwrap_err();
        assert!(e.contains("the vfio-pci driver is not loaded (modprobe vfio-pci)"), "{e}");
        // Loaded, but the bind does not happen (no kernel behind these files): undone, said so.
        let drivers = dir.join("sys/bus/pci/drivers");
        std::fs::create_dir_all(drivers.join("vfio-pci")).unwrap();
        std::fs::write(dir.join("sys/bus/pci/drivers_probe"), "").unwrap();
        let e = Claim::take(&s, nvme).unwrap_err();
        assert!(e.contains("vfio-pci did not bind it"), "{e}");
        assert_eq!(std::fs::read_to_string(dir.join("sys/bus/pci/drivers_probe")).unwrap(), "0000:03:00.0");
        let fdir = s.function_dir(nvme);
        assert_eq!(std::fs::read_to_string(fdir.join("driver_override")).unwrap(), "\n", "override cleared again");
        // The kernel's nvme driver holds it: refused with the way out, nothing touched.
        std::fs::create_dir_all(drivers.join("nvme")).unwrap();
        std::os::unix::fs::symlink(drivers.join("nvme"), fdir.join("driver")).unwrap();
        std::fs::write(fdir.join("driver_override"), "untouched").unwrap();
        let e = Claim::take(&s, nvme).unwrap_err();
        assert!(
            e.contains("bound to the kernel's nvme driver") && e.contains("/sys/bus/pci/drivers/nvme/unbind"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(fdir.join("driver_override")).unwrap(), "untouched");
        // Already on vfio-pci: used as it is, and left bound at the end.
        std::fs::remove_file(fdir.join("driver")).unwrap();
        std::os::unix::fs::symlink(drivers.join("vfio-pci"), fdir.join("driver")).unwrap();
        let c = Claim::take(&s, nvme).unwrap();
        assert!(!c.bound_by_us);
        drop(c);
        assert!(!drivers.join("vfio-pci/unbind").exists(), "not unbound at the end");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
