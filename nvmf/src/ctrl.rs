//! Controllers: registers (via Fabrics Property Get/Set), features, async event requests,
//! keep-alive, and teardown.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{Notify, watch};

use crate::Status;
use crate::buffers::ControllerPools;
use crate::subsystem::{Port, Subsystem};

/// What the target grants hosts (`[limits]`), refused with the specification's status once
/// reached rather than by running out of memory or descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Controllers one subsystem serves at once: a Connect beyond gets Controller Busy.
    pub controllers_per_subsystem: u16,
    /// I/O queues a controller may create: Number of Queues grants at most this many and an
    /// I/O queue Connect beyond is refused.
    pub io_queues: u16,
    /// Entries of a queue (CAP.MQES + 1, MAXCMD): a Connect asking for more is refused.
    pub queue_entries: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { controllers_per_subsystem: 128, io_queues: 64, queue_entries: 128 }
    }
}
/// Async Event Request Limit, 0-based (AERL): four outstanding requests.
pub const AERL: u8 = 3;

/// Completion DW0 of a Discovery Log Page Change notice (NVMe Base 2.0, Figure 151): type 2
/// (notice), information F0h, log page 70h.
pub const AEN_DISCOVERY_LOG_CHANGE: u32 = 0x02 | 0xf0 << 8 | 0x70 << 16;
/// Async Event Configuration bit enabling discovery log change notices (Figure 326).
const AEC_DISCOVERY_LOG_CHANGE: u32 = 1 << 31;
/// Completion DW0 of a Namespace Attribute Changed notice (Figure 151): type 2 (notice),
/// information 00h, log page 04h (Changed Namespace List).
pub const AEN_NS_ATTRIBUTE_CHANGED: u32 = 0x02 | 0x04 << 16;
/// Async Event Configuration bit enabling Namespace Attribute Notices (Figure 326).
const AEC_NS_ATTRIBUTE: u32 = 1 << 8;
/// Completion DW0 of an Asymmetric Namespace Access Change notice (Figure 151): type 2
/// (notice), information 03h, log page 0Ch.
pub const AEN_ANA_CHANGE: u32 = 0x02 | 0x03 << 8 | 0x0c << 16;
/// Async Event Configuration bit enabling ANA Change Notices (Figure 326).
pub const AEC_ANA_CHANGE: u32 = 1 << 11;
/// Completion DW0 of a Reservation Log Page Available event (Figure 151): type 6 (I/O command
/// specific status), information 00h, log page 80h.
pub const AEN_RESERVATION_LOG: u32 = 0x06 | 0x80 << 16;
/// Reservation notices a controller keeps until its host reads them (as nvmet's 64).
const RESV_LOG_MAX: usize = 64;
/// Entries of the Changed Namespace List log (Figure 209); more changes than that are reported
/// as a first entry of FFFFFFFFh.
const CHANGED_NS_MAX: usize = 1024;

/// Controller register offsets (NVMe Base 2.0, Figure 33; NVMe-oF 1.1, Figure 7).
pub mod reg {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1c;
}

/// NVMe 1.3.0, as the features we implement match it.
pub const VERSION: u32 = 0x0001_0300;

const CC_EN: u32 = 1;
const CC_SHN_MASK: u32 = 0x3 << 14;
const CSTS_RDY: u32 = 1;
const CSTS_CFS: u32 = 1 << 1;
const CSTS_SHST_COMPLETE: u32 = 0x2 << 2;

#[derive(Debug, Default)]
struct State {
    cc: u32,
    csts: u32,
    kato_ms: u32,
    /// Number of I/O queues granted (Set Features 07h), 0-based as reported; None until set.
    queues: Option<u16>,
    async_event_config: u32,
    write_cache: bool,
    /// Transport tags of outstanding Async Event Requests (on the admin queue).
    aers: Vec<u16>,
    /// Events waiting for an Async Event Request.
    events: Vec<u32>,
    /// Connected I/O queues and their entries.
    io_queues: BTreeMap<u16, u16>,
    /// NSIDs added, removed or changed since the host last read the Changed Namespace List.
    changed_ns: BTreeSet<u32>,
    resv_log: ResvLog,
    /// Reservation Notification Mask per NSID (Set Features 82h): notices the host masked.
    resv_masks: BTreeMap<u32, u32>,
}

/// The Reservation Notification log of one controller (NVMe Base 2.0, 5.16.1.24): notices in
/// order, each with its count; the count also moves on for a notice lost to a full log.
#[derive(Debug, Default)]
struct ResvLog {
    count: u64,
    entries: std::collections::VecDeque<(u64, crate::resv::NoticeKind, u32)>,
}

/// Who connected: the host NQN and Host Identifier of its Connect, and its address as the
/// transport saw it.
#[derive(Debug, Clone)]
pub(crate) struct Who {
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub peer: String,
}

/// One host's association with a subsystem (or with the discovery subsystem).
#[derive(Debug)]
pub struct Controller {
    pub cntlid: u16,
    subnqn: String,
    /// `None` for a discovery controller. A reload that changes the subsystem replaces it here
    /// and moves `generation` on, which queues compare per command instead of taking the lock.
    subsys: Option<Mutex<Arc<Subsystem>>>,
    generation: AtomicU64,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub port: Port,
    /// The host's address as its admin queue's transport saw it (empty when it does not say).
    pub peer: String,
    state: Mutex<State>,
    /// CSTS.RDY, read by every command: kept outside the lock so I/O never takes it.
    ready: AtomicBool,
    born: Instant,
    last_seen_ms: AtomicU64,
    dead: watch::Sender<Option<&'static str>>,
    event_ready: Notify,
    /// p2p pools per namespace, decided at admin Connect.
    pub p2p: Arc<ControllerPools>,
    limits: Limits,
}

impl Controller {
    pub(crate) fn new(
        cntlid: u16,
        subsys: Option<Arc<Subsystem>>,
        host: Who,
        port: Port,
        kato_ms: u32,
        limits: Limits,
    ) -> Self {
        let p2p = Arc::new(ControllerPools::new(cntlid, &host.hostnqn));
        let Who { hostnqn, hostid, peer } = host;
        let write_cache =
            subsys.as_ref().is_some_and(|s| s.namespaces.iter().any(|n| n.backend.volatile_write_cache()));
        Controller {
            cntlid,
            subnqn: subsys.as_ref().map_or(crate::DISCOVERY_NQN.into(), |s| s.nqn.clone()),
            subsys: subsys.map(Mutex::new),
            generation: AtomicU64::new(0),
            hostnqn,
            hostid,
            port,
            peer,
            state: Mutex::new(State { kato_ms, write_cache, ..State::default() }),
            ready: AtomicBool::new(false),
            born: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
            dead: watch::channel(None).0,
            event_ready: Notify::new(),
            p2p,
            limits,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_discovery(&self) -> bool {
        self.subsys.is_none()
    }

    pub fn subnqn(&self) -> &str {
        &self.subnqn
    }

    /// The subsystem as it is now (`None` for a discovery controller).
    pub fn subsystem(&self) -> Option<Arc<Subsystem>> {
        self.subsys.as_ref().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Moves on each time a reload replaces the subsystem.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A reload's new version of the subsystem: namespaces added, removed or changed (another
    /// backend or size) go to the Changed Namespace List and raise a Namespace Attribute
    /// Changed event. Returns those NSIDs.
    pub(crate) fn replace_subsystem(&self, new: Arc<Subsystem>) -> Vec<u32> {
        let Some(cell) = &self.subsys else { return Vec::new() };
        let old = std::mem::replace(&mut *cell.lock().unwrap_or_else(|e| e.into_inner()), new.clone());
        self.generation.fetch_add(1, Ordering::AcqRel);
        let same = |a: &crate::Namespace, b: &crate::Namespace| {
            Arc::ptr_eq(&a.backend, &b.backend)
                && a.blocks() == b.blocks()
                && a.lba_shift == b.lba_shift
                && a.ids == b.ids
        };
        let changed: Vec<u32> = old
            .namespaces
            .iter()
            .filter(|o| new.ns(o.nsid).is_none_or(|n| !same(o, n)))
            .chain(new.namespaces.iter().filter(|n| old.ns(n.nsid).is_none()))
            .map(|n| n.nsid)
            .collect();
        if !changed.is_empty() {
            let mut st = self.state();
            st.changed_ns.extend(&changed);
            drop(st);
            self.notify(AEN_NS_ATTRIBUTE_CHANGED);
        }
        // A namespace kept but moved to another ANA group: the ANA log says so.
        if old.namespaces.iter().any(|o| new.ns(o.nsid).is_some_and(|n| n.ana.id != o.ana.id)) {
            self.notify(AEN_ANA_CHANGE);
        }
        changed
    }

    /// The Changed Namespace List log's entries (NVMe Base 2.0, 5.16.1.5), cleared by reading.
    pub fn take_changed_namespaces(&self) -> Vec<u32> {
        let changed = std::mem::take(&mut self.state().changed_ns);
        if changed.len() > CHANGED_NS_MAX { vec![u32::MAX] } else { changed.into_iter().collect() }
    }

    /// A reservation change of namespace `nsid` concerns this controller's host: logged and
    /// announced unless the host masked that kind of notice (Set Features 82h).
    pub fn reservation_notice(&self, nsid: u32, kind: crate::resv::NoticeKind) {
        let mut st = self.state();
        if st.resv_masks.get(&nsid).is_some_and(|m| m & 1 << kind as u32 != 0) {
            return;
        }
        let log = &mut st.resv_log;
        log.count = log.count.checked_add(1).unwrap_or(1);
        if log.entries.len() == RESV_LOG_MAX {
            tracing::warn!(
                cntlid = self.cntlid,
                nsid,
                ?kind,
                "reservation notification log full: notice lost (its count says so)"
            );
        } else {
            let count = log.count;
            log.entries.push_back((count, kind, nsid));
        }
        drop(st);
        self.notify(AEN_RESERVATION_LOG);
    }

    /// The Reservation Notification log page (64 bytes, Figure 286): the oldest notice, taken
    /// by reading, with how many more wait; zeroes when none does.
    pub fn take_reservation_notice(&self) -> [u8; 64] {
        let mut page = [0u8; 64];
        let mut st = self.state();
        if let Some((count, kind, nsid)) = st.resv_log.entries.pop_front() {
            page[..8].copy_from_slice(&count.to_le_bytes());
            page[8] = kind as u8;
            page[9] = st.resv_log.entries.len().min(255) as u8;
            page[12..16].copy_from_slice(&nsid.to_le_bytes());
        }
        page
    }

    /// Reservation Notification Mask of `nsids` (Set Features 82h; bits 1–3).
    pub fn set_reservation_mask(&self, nsids: impl Iterator<Item = u32>, mask: u32) {
        let mut st = self.state();
        for nsid in nsids {
            st.resv_masks.insert(nsid, mask);
        }
    }

    pub fn reservation_mask(&self, nsid: u32) -> u32 {
        self.state().resv_masks.get(&nsid).copied().unwrap_or(0)
    }

    /// Records host activity for the keep-alive timer (any command counts, as with TBKAS).
    /// Every queue calls it per command, so the shared word is written at most every 10 ms
    /// (far below the keep-alive granularity) rather than per I/O.
    pub fn touch(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        if ms >= self.last_seen_ms.load(Ordering::Relaxed) + 10 {
            self.last_seen_ms.store(ms, Ordering::Relaxed);
        }
    }

    pub fn kato(&self) -> Duration {
        Duration::from_millis(self.state().kato_ms.into())
    }

    /// Tears the controller down: every queue watching [`Controller::watch_dead`] closes.
    pub fn kill(&self, reason: &'static str) {
        self.dead.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }

    pub fn dead_reason(&self) -> Option<&'static str> {
        *self.dead.borrow()
    }

    pub fn watch_dead(&self) -> watch::Receiver<Option<&'static str>> {
        self.dead.subscribe()
    }

    /// Waits until the keep-alive timer expires (returns) or the controller dies (returns too).
    pub(crate) async fn keep_alive_expired(&self) {
        let mut dead = self.watch_dead();
        loop {
            let kato = self.kato();
            if kato.is_zero() {
                // Keep-alive disabled (or changed later by Set Features): poll for changes.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = dead.changed() => return,
                }
            }
            let last = Duration::from_millis(self.last_seen_ms.load(Ordering::Relaxed));
            let idle = self.born.elapsed().saturating_sub(last);
            if idle >= kato {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(kato - idle) => {}
                _ = dead.changed() => return,
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// CAP (NVMe Base 2.0, Figure 36): MQES, CQR, TO = 7.5 s, CSS = NVM, MPSMIN = MPSMAX = 4 KiB.
    pub fn cap(&self) -> u64 {
        u64::from(self.limits.queue_entries - 1) | 1 << 16 | 15 << 24 | 1 << 37
    }

    /// Fabrics Property Get.
    pub fn property_get(&self, offset: u32, eight: bool) -> Result<u64, Status> {
        let st = self.state();
        match (offset, eight) {
            (reg::CAP, true) => Ok(self.cap()),
            (reg::VS, false) => Ok(VERSION.into()),
            (reg::CC, false) => Ok(st.cc.into()),
            (reg::CSTS, false) => Ok(st.csts.into()),
            _ => Err(Status::INVALID_FIELD.dnr()),
        }
    }

    /// Fabrics Property Set: only CC is writable.
    pub fn property_set(&self, offset: u32, eight: bool, value: u64) -> Result<(), Status> {
        if (offset, eight) != (reg::CC, false) {
            return Err(Status::INVALID_FIELD.dnr());
        }
        let cc = value as u32;
        let mut st = self.state();
        let was = st.cc;
        st.cc = cc;
        if cc & CC_EN != 0 && was & CC_EN == 0 {
            // I/O controllers need 64-byte SQEs and 16-byte CQEs (IOSQES 6, IOCQES 4).
            let (sqes, cqes) = ((cc >> 16) & 0xf, (cc >> 20) & 0xf);
            if !self.is_discovery() && (sqes != 6 || cqes != 4) {
                st.csts = CSTS_CFS;
            } else {
                st.csts = CSTS_RDY;
            }
        } else if cc & CC_EN == 0 && was & CC_EN != 0 {
            st.csts &= !CSTS_RDY;
        }
        if cc & CC_SHN_MASK != 0 {
            st.csts |= CSTS_SHST_COMPLETE;
        }
        self.ready.store(st.csts & CSTS_RDY != 0, Ordering::Release);
        Ok(())
    }

    /// Records a newly connected I/O queue of `entries`; refuses a qid already in use or out
    /// of range.
    pub(crate) fn add_io_queue(&self, qid: u16, entries: u16) -> bool {
        let mut st = self.state();
        let max = st.queues.map_or(self.limits.io_queues, |q| q + 1);
        match st.io_queues.entry(qid) {
            std::collections::btree_map::Entry::Vacant(v) if qid <= max => {
                v.insert(entries);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn remove_io_queue(&self, qid: u16) {
        self.state().io_queues.remove(&qid);
    }

    /// The connected I/O queues: (qid, entries).
    pub fn io_queues(&self) -> Vec<(u16, u16)> {
        self.state().io_queues.iter().map(|(&q, &e)| (q, e)).collect()
    }

    /// Set Features (NVMe Base 2.0, 5.27.1). Returns the completion's DW0.
    pub fn set_feature(&self, fid: u8, cdw11: u32) -> Result<u32, Status> {
        let mut st = self.state();
        match fid {
            feat::NUMBER_OF_QUEUES if !self.is_discovery() => {
                let (nsq, ncq) = (cdw11 as u16, (cdw11 >> 16) as u16);
                if nsq == u16::MAX || ncq == u16::MAX {
                    return Err(Status::INVALID_FIELD.dnr());
                }
                let granted = nsq.min(ncq).min(self.limits.io_queues - 1);
                st.queues = Some(granted);
                Ok(u32::from(granted) | u32::from(granted) << 16)
            }
            feat::KEEP_ALIVE_TIMER => {
                st.kato_ms = cdw11;
                Ok(0)
            }
            feat::ASYNC_EVENT_CONFIG => {
                st.async_event_config = cdw11;
                Ok(0)
            }
            feat::VOLATILE_WRITE_CACHE if !self.is_discovery() => {
                st.write_cache = cdw11 & 1 != 0;
                Ok(0)
            }
            // Fabrics set the host identifier at Connect (NVMe-oF 1.1, 3.3).
            feat::HOST_IDENTIFIER => Err(Status::COMMAND_SEQUENCE_ERROR.dnr()),
            _ => Err(Status::INVALID_FIELD.dnr()),
        }
    }

    /// Get Features (current values). Host Identifier is returned as data by the caller.
    pub fn get_feature(&self, fid: u8) -> Result<u32, Status> {
        let st = self.state();
        match fid {
            feat::NUMBER_OF_QUEUES if !self.is_discovery() => {
                let q = u32::from(st.queues.unwrap_or(self.limits.io_queues - 1));
                Ok(q | q << 16)
            }
            feat::KEEP_ALIVE_TIMER => Ok(st.kato_ms),
            feat::ASYNC_EVENT_CONFIG => Ok(st.async_event_config),
            feat::VOLATILE_WRITE_CACHE if !self.is_discovery() => Ok(st.write_cache.into()),
            _ => Err(Status::INVALID_FIELD.dnr()),
        }
    }

    /// An Async Event Request (the transport's `tag`): completes at once with a waiting event
    /// (`Some(dw0)`), or is held (`None`); refused past the limit (AERL + 1 outstanding).
    pub fn push_aer(&self, tag: u16) -> Result<Option<u32>, Status> {
        let mut st = self.state();
        if !st.events.is_empty() {
            return Ok(Some(st.events.remove(0)));
        }
        if st.aers.len() > usize::from(AERL) {
            return Err(Status::ASYNC_EVENT_LIMIT_EXCEEDED.dnr());
        }
        st.aers.push(tag);
        Ok(None)
    }

    /// Raises an asynchronous event if the host enabled it; the admin queue's transport is
    /// woken to complete a held request with it.
    pub fn notify(&self, event: u32) {
        let mut st = self.state();
        let enabled = match event {
            AEN_DISCOVERY_LOG_CHANGE => st.async_event_config & AEC_DISCOVERY_LOG_CHANGE != 0,
            AEN_NS_ATTRIBUTE_CHANGED => st.async_event_config & AEC_NS_ATTRIBUTE != 0,
            AEN_ANA_CHANGE => st.async_event_config & AEC_ANA_CHANGE != 0,
            _ => true,
        };
        // One of a kind is enough: the host reads the log page to learn what changed.
        if enabled && !st.events.contains(&event) {
            st.events.push(event);
            drop(st);
            self.event_ready.notify_one();
        }
    }

    /// Waits until an event may complete a held Async Event Request.
    pub async fn event_ready(&self) {
        self.event_ready.notified().await;
    }

    /// Pairs held requests with waiting events: (tag, DW0) completions to send.
    pub fn take_async_completions(&self) -> Vec<(u16, u32)> {
        let mut st = self.state();
        let n = st.aers.len().min(st.events.len());
        let tags: Vec<u16> = st.aers.drain(..n).collect();
        tags.into_iter().zip(st.events.drain(..n)).collect()
    }
}

/// Feature identifiers (NVMe Base 2.0, Figure 319).
pub mod feat {
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0f;
    pub const HOST_IDENTIFIER: u8 = 0x81;
    pub const RESERVATION_NOTIFICATION_MASK: u8 = 0x82;
    pub const RESERVATION_PERSISTENCE: u8 = 0x83;
}
