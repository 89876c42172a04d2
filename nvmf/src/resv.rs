//! Reservations (NVMe Base 2.0, 8.19; commands 7.2–7.5): registrations by host identifier, the
//! reservation and its type, what they let each host do, and what changes them.
//!
//! The rules are pure functions of a namespace's [`State`] and the command, so tests drive them
//! without a queue; a command's change is computed on a copy, persisted when Persist Through
//! Power Loss is on, and only then made current. A namespace's [`Reservation`] holds the state
//! for every controller of the subsystem (keys belong to host identifiers, not controllers); the
//! I/O path reads a verdict its queue cached for the state's version, so a command costs one
//! atomic load when nothing changed.

pub mod store;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::Status;
use crate::wire::io_opcode as opcode;
pub use store::{FileStore, Record, Store, StoreError};

/// A host identifier (the 128-bit Host Identifier of Connect).
pub type HostId = [u8; 16];

/// Reservation types (NVMe Base 2.0, Figure 565).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RType {
    WriteExclusive = 1,
    ExclusiveAccess = 2,
    WriteExclusiveRegistrantsOnly = 3,
    ExclusiveAccessRegistrantsOnly = 4,
    WriteExclusiveAllRegistrants = 5,
    ExclusiveAccessAllRegistrants = 6,
}

impl RType {
    pub fn from_u8(v: u8) -> Option<RType> {
        use RType::*;
        [WriteExclusive, ExclusiveAccess, WriteExclusiveRegistrantsOnly, ExclusiveAccessRegistrantsOnly]
            .into_iter()
            .chain([WriteExclusiveAllRegistrants, ExclusiveAccessAllRegistrants])
            .find(|t| *t as u8 == v)
    }

    /// Every registrant holds the reservation.
    fn all_registrants(self) -> bool {
        matches!(self, RType::WriteExclusiveAllRegistrants | RType::ExclusiveAccessAllRegistrants)
    }

    /// Registrants other than the holder have access as the holder does.
    fn registrants_have_access(self) -> bool {
        !matches!(self, RType::WriteExclusive | RType::ExclusiveAccess)
    }

    /// Hosts without access may not even read.
    fn exclusive_access(self) -> bool {
        matches!(
            self,
            RType::ExclusiveAccess | RType::ExclusiveAccessRegistrantsOnly | RType::ExclusiveAccessAllRegistrants
        )
    }
}

/// A registered host and its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registrant {
    pub host: HostId,
    pub key: u64,
}

/// The reservation: who holds it (for All Registrants types, the registrant reported as its
/// holder — every registrant holds it) and its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub host: HostId,
    pub rtype: RType,
}

/// A namespace's reservation state: what Reservation Report shows and PTPL keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    /// Moves on with every successful Register, Preempt and Clear (Figure 569, GEN).
    pub generation: u32,
    /// Persist Through Power Loss.
    pub ptpl: bool,
    /// In the order they registered.
    pub registrants: Vec<Registrant>,
    pub holder: Option<Holder>,
}

/// What a host is told about a change it did not make (Figure 286: Reservation Notification
/// log page types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    RegistrationPreempted = 1,
    ReservationReleased = 2,
    ReservationPreempted = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    pub host: HostId,
    pub kind: NoticeKind,
}

/// What a Register, Acquire or Release command changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub state: State,
    pub notices: Vec<Notice>,
    /// Hosts whose commands in flight must end before the command completes (Preempt and Abort).
    pub aborted: Vec<HostId>,
}

impl Change {
    /// No change yet: `state` as it is, nobody to tell or wait for.
    fn of(state: State) -> Change {
        Change { state, notices: Vec::new(), aborted: Vec::new() }
    }
}

const CONFLICT: Status = Status::RESERVATION_CONFLICT.dnr();
const INVALID: Status = Status::INVALID_FIELD.dnr();

/// The command's data: `n` little-endian keys.
fn keys<const N: usize>(data: &[u8]) -> Result<[u64; N], Status> {
    let data = data.get(..N * 8).ok_or(Status::DATA_SGL_LENGTH_INVALID.dnr())?;
    Ok(std::array::from_fn(|i| u64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().expect("8 bytes"))))
}

/// Ignore Existing Key (CDW10 bit 3).
fn iekey(cdw10: u32) -> bool {
    cdw10 & 1 << 3 != 0
}

impl State {
    fn registrant(&self, host: &HostId) -> Option<&Registrant> {
        self.registrants.iter().find(|r| &r.host == host)
    }

    /// Whether `host` holds the reservation (any registrant does under an All Registrants type).
    pub fn holds(&self, host: &HostId) -> bool {
        match self.holder {
            Some(h) if h.rtype.all_registrants() => self.registrant(host).is_some(),
            Some(h) => &h.host == host,
            None => false,
        }
    }

    /// The registrant `host` with the current key `crkey` (or any key with `ignore`).
    fn keyed(&self, host: &HostId, crkey: u64, ignore: bool) -> Result<(), Status> {
        match self.registrant(host) {
            Some(r) if ignore || r.key == crkey => Ok(()),
            _ => Err(CONFLICT),
        }
    }

    /// Removes a registrant; a holder that goes passes an All Registrants reservation to the
    /// next registrant and releases any other (Registrants Only: told to the others).
    fn unregister(&mut self, host: &HostId, notices: &mut Vec<Notice>) {
        self.registrants.retain(|r| &r.host != host);
        let Some(h) = self.holder.filter(|h| &h.host == host) else { return };
        if h.rtype.all_registrants() {
            self.holder = self.registrants.first().map(|r| Holder { host: r.host, rtype: h.rtype });
        } else {
            self.holder = None;
            if h.rtype.registrants_have_access() {
                self.tell_registrants(host, NoticeKind::ReservationReleased, notices);
            }
        }
    }

    /// A notice to every registrant but `except`.
    fn tell_registrants(&self, except: &HostId, kind: NoticeKind, notices: &mut Vec<Notice>) {
        notices.extend(self.registrants.iter().filter(|r| &r.host != except).map(|r| Notice { host: r.host, kind }));
    }
}

/// Reservation Register (NVMe Base 2.0, 7.3): register (0), unregister (1) or replace (2) the
/// key of host `me`; CPTPL (CDW10 bits 31:30) changes Persist Through Power Loss, which
/// `ptpl_capable` says the namespace can keep.
pub fn register(st: &State, me: &HostId, cdw10: u32, data: &[u8], ptpl_capable: bool) -> Result<Change, Status> {
    let [crkey, nrkey] = keys::<2>(data)?;
    let ptpl = match cdw10 >> 30 {
        0 => st.ptpl,
        1 => return Err(INVALID),
        2 => false,
        // Linux sets it with every registration (IOC_PR_REGISTER): a namespace that cannot
        // persist leaves it off, as Get Features and Report then say.
        _ => ptpl_capable,
    };
    if cdw10 & 0x3fff_fff0 != 0 {
        return Err(INVALID);
    }
    let mut out = Change::of(st.clone());
    let s = &mut out.state;
    match cdw10 & 7 {
        0 => match s.registrant(me) {
            // Registering again with the same key changes nothing but succeeds.
            Some(r) if r.key != nrkey => return Err(CONFLICT),
            Some(_) => {}
            None => s.registrants.push(Registrant { host: *me, key: nrkey }),
        },
        1 => {
            s.keyed(me, crkey, iekey(cdw10))?;
            s.unregister(me, &mut out.notices);
        }
        2 => {
            s.keyed(me, crkey, iekey(cdw10))?;
            s.registrants.iter_mut().filter(|r| &r.host == me).for_each(|r| r.key = nrkey);
        }
        _ => return Err(INVALID),
    }
    s.ptpl = ptpl;
    s.generation = s.generation.wrapping_add(1);
    Ok(out)
}

/// Reservation Acquire (NVMe Base 2.0, 7.2): acquire (0), preempt (1) or preempt and abort (2)
/// with type CDW10 bits 15:8, by host `me` registered with the current key.
pub fn acquire(st: &State, me: &HostId, cdw10: u32, data: &[u8]) -> Result<Change, Status> {
    let [crkey, prkey] = keys::<2>(data)?;
    let rtype = RType::from_u8((cdw10 >> 8) as u8).ok_or(INVALID)?;
    if iekey(cdw10) || cdw10 & 0xffff_00f0 != 0 {
        return Err(INVALID);
    }
    st.keyed(me, crkey, false)?;
    let mut out = Change::of(st.clone());
    match cdw10 & 7 {
        0 => match out.state.holder {
            None => out.state.holder = Some(Holder { host: *me, rtype }),
            Some(h) if out.state.holds(me) && h.rtype == rtype => {}
            Some(_) => return Err(CONFLICT),
        },
        act @ (1 | 2) => {
            preempt(&mut out, me, rtype, prkey)?;
            if act == 1 {
                out.aborted.clear();
            }
            out.state.generation = out.state.generation.wrapping_add(1);
        }
        _ => return Err(INVALID),
    }
    Ok(out)
}

/// Preempt (NVMe Base 2.0, 8.19.7): takes the reservation from the holder whose key is
/// `prkey`, or unregisters the hosts with that key.
fn preempt(out: &mut Change, me: &HostId, rtype: RType, prkey: u64) -> Result<(), Status> {
    let s = &out.state;
    match s.holder {
        None => preempt_key(out, prkey, me, false),
        Some(h) if h.rtype.all_registrants() && prkey == 0 => {
            // Every other registrant goes; the preempting host holds the new reservation.
            out.state.holder = Some(Holder { host: *me, rtype });
            let others: Vec<HostId> = out.state.registrants.iter().map(|r| r.host).filter(|h| h != me).collect();
            for host in others {
                preempted(out, host, me);
            }
            Ok(())
        }
        Some(h) if h.rtype.all_registrants() => preempt_key(out, prkey, me, false),
        Some(h) if &h.host == me => {
            // Preempting oneself changes the type; the other registrants hear of the release.
            out.state.holder = Some(Holder { host: *me, rtype });
            if h.rtype != rtype {
                out.state.tell_registrants(me, NoticeKind::ReservationReleased, &mut out.notices);
            }
            Ok(())
        }
        Some(h) if s.registrant(&h.host).is_some_and(|r| r.key == prkey) => {
            out.state.holder = Some(Holder { host: *me, rtype });
            preempt_key(out, prkey, me, true)?;
            if h.rtype != rtype {
                out.state.tell_registrants(me, NoticeKind::ReservationReleased, &mut out.notices);
            }
            Ok(())
        }
        Some(_) if prkey != 0 => preempt_key(out, prkey, me, false),
        Some(_) => Err(INVALID),
    }
}

/// Unregisters every host registered with `key` (but `me` when `keep_me`); Reservation
/// Conflict when none has that key.
fn preempt_key(out: &mut Change, key: u64, me: &HostId, keep_me: bool) -> Result<(), Status> {
    let hit: Vec<HostId> =
        out.state.registrants.iter().filter(|r| r.key == key && !(keep_me && &r.host == me)).map(|r| r.host).collect();
    if hit.is_empty() {
        return Err(CONFLICT);
    }
    for host in hit {
        preempted(out, host, me);
    }
    Ok(())
}

/// `host`'s registration preempted by `me`: told so, unless it is `me`, and its commands
/// aborted.
fn preempted(out: &mut Change, host: HostId, me: &HostId) {
    out.state.unregister(&host, &mut out.notices);
    if &host != me {
        out.notices.push(Notice { host, kind: NoticeKind::RegistrationPreempted });
        out.aborted.push(host);
    }
}

/// Reservation Release (NVMe Base 2.0, 7.5): release (0) the reservation of type CDW10 bits
/// 15:8 that host `me` holds, or clear (1) every registration and the reservation.
pub fn release(st: &State, me: &HostId, cdw10: u32, data: &[u8]) -> Result<Change, Status> {
    let [crkey] = keys::<1>(data)?;
    if iekey(cdw10) || cdw10 & 0xffff_00f0 != 0 {
        return Err(INVALID);
    }
    st.keyed(me, crkey, false)?;
    let mut out = Change::of(st.clone());
    let s = &mut out.state;
    match cdw10 & 7 {
        0 => {
            // Releasing what one does not hold succeeds and changes nothing.
            let Some(h) = s.holder.filter(|_| s.holds(me)) else { return Ok(out) };
            if h.rtype as u32 != (cdw10 >> 8) & 0xff {
                return Err(INVALID);
            }
            s.holder = None;
            if h.rtype.registrants_have_access() {
                s.tell_registrants(me, NoticeKind::ReservationReleased, &mut out.notices);
            }
        }
        1 => {
            s.tell_registrants(me, NoticeKind::ReservationPreempted, &mut out.notices);
            s.holder = None;
            s.registrants.clear();
            s.generation = s.generation.wrapping_add(1);
        }
        _ => return Err(INVALID),
    }
    Ok(out)
}

/// Bytes of the extended Reservation Status data structure's header and of each registrant's
/// entry (NVMe Base 2.0, Figures 570 and 572).
const REPORT_HEADER: usize = 64;
const REPORT_ENTRY: usize = 64;

/// Reservation Report (NVMe Base 2.0, 7.4) into `out` (NUMD + 1 dwords, CDW10): the extended
/// data structure (EDS, CDW11 bit 0), as fabrics hosts have 128-bit host identifiers — without
/// EDS the command gets Host Identifier Inconsistent (8.19.3). Returns the bytes written.
pub fn report(st: &State, cdw10: u32, cdw11: u32, out: &mut [u8]) -> Result<usize, Status> {
    if cdw11 & 1 == 0 {
        return Err(Status::HOST_ID_INCONSISTENT.dnr());
    }
    let len = (cdw10 as usize + 1) * 4;
    let out = out.get_mut(..len).ok_or(Status::DATA_SGL_LENGTH_INVALID.dnr())?;
    out.fill(0);
    let mut page = [0u8; REPORT_HEADER];
    page[..4].copy_from_slice(&st.generation.to_le_bytes());
    page[4] = st.holder.map_or(0, |h| h.rtype as u8);
    page[5..7].copy_from_slice(&(st.registrants.len() as u16).to_le_bytes());
    page[9] = st.ptpl.into();
    let n = REPORT_HEADER.min(len);
    out[..n].copy_from_slice(&page[..n]);
    for (i, r) in st.registrants.iter().enumerate() {
        let at = REPORT_HEADER + i * REPORT_ENTRY;
        let Some(e) = out.get_mut(at..at + REPORT_ENTRY) else { break };
        // The dynamic controller model: a registrant is a host, not one controller.
        e[..2].copy_from_slice(&0xffffu16.to_le_bytes());
        e[2] = st.holds(&r.host).into(); // RCSTS: holds the reservation
        e[8..16].copy_from_slice(&r.key.to_le_bytes());
        e[16..32].copy_from_slice(&r.host);
    }
    Ok(len)
}

/// The command groups a reservation restricts (NVMe Base 2.0, Figure 573).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Read,
    Write,
}

impl Group {
    /// The group of an NVM command set opcode; `None` for commands a reservation allows.
    pub fn of(op: u8) -> Option<Group> {
        match op {
            opcode::READ | opcode::COMPARE => Some(Group::Read),
            opcode::WRITE | opcode::WRITE_ZEROES | opcode::DATASET_MANAGEMENT | opcode::FLUSH => Some(Group::Write),
            _ => None,
        }
    }
}

/// Whether `me` may run a command of `group` (NVMe Base 2.0, Figure 573).
pub fn access(st: &State, me: &HostId, group: Group) -> Result<(), Status> {
    let Some(h) = st.holder else { return Ok(()) };
    if st.holds(me) || (h.rtype.registrants_have_access() && st.registrant(me).is_some()) {
        return Ok(());
    }
    match group {
        Group::Read if !h.rtype.exclusive_access() => Ok(()),
        _ => Err(CONFLICT),
    }
}

/// What a queue caches of a namespace's reservation for its host: the verdict per group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub read: Result<(), Status>,
    pub write: Result<(), Status>,
}

impl Verdict {
    pub fn of(&self, group: Group) -> Result<(), Status> {
        match group {
            Group::Read => self.read,
            Group::Write => self.write,
        }
    }
}

/// While a Preempt and Abort waits for a preempted host's commands in flight, that host's new
/// commands the reservation still allows are refused with this retryable status (nvmet refuses
/// them with Internal Error), so that the wait ends; those it no longer allows get Reservation
/// Conflict.
const DRAINING: Status = Status::ABORTED_BY_REQUEST;

#[derive(Debug, Default)]
struct Inner {
    state: State,
    /// Hosts a Preempt and Abort is waiting for.
    draining: Vec<HostId>,
    /// Each queue's count of commands in flight on the namespace, by its host.
    queues: Vec<(HostId, Weak<AtomicU32>)>,
    /// Told once that PTPL was asked for on a namespace that cannot keep it.
    ptpl_warned: bool,
}

/// A namespace's reservation: shared by every controller of its subsystem, kept across reloads
/// that keep the namespace, persisted through `store` while PTPL is on.
#[derive(Debug)]
pub struct Reservation {
    inner: Mutex<Inner>,
    /// Moves on with every change a queue's verdict depends on.
    version: AtomicU64,
    store: Option<Box<dyn Store>>,
}

impl Default for Reservation {
    fn default() -> Self {
        Reservation { inner: Mutex::default(), version: AtomicU64::new(1), store: None }
    }
}

impl Reservation {
    /// A reservation kept through `store` when PTPL is on: what the store holds is loaded
    /// (registrations and reservation of before a restart), a damaged record refused.
    pub fn persistent(store: Box<dyn Store>) -> Result<Reservation, StoreError> {
        let state = store.load()?.unwrap_or_default();
        let inner = Mutex::new(Inner { state, ..Inner::default() });
        Ok(Reservation { inner, version: AtomicU64::new(1), store: Some(store) })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether PTPL can be kept (RESCAP bit 0).
    pub fn ptpl_capable(&self) -> bool {
        self.store.is_some()
    }

    pub fn state(&self) -> State {
        self.inner().state.clone()
    }

    /// The version a cached [`Verdict`] was made for; the one load a command pays.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// The verdict for `me` now, and its version.
    pub fn verdict(&self, me: &HostId) -> (u64, Verdict) {
        let inner = self.inner();
        let version = self.version.load(Ordering::SeqCst);
        let (st, draining) = (&inner.state, inner.draining.contains(me));
        // A host being drained gets the conflict the new reservation gives it; what it may
        // still do waits (retryably) for the drain.
        let verdict = |group| match access(st, me, group) {
            Ok(()) if draining => Err(DRAINING),
            other => other,
        };
        (version, Verdict { read: verdict(Group::Read), write: verdict(Group::Write) })
    }

    /// A queue of host `me` counts its commands in flight on the namespace in the counter this
    /// returns, which a Preempt and Abort waits on.
    pub fn track(&self, me: &HostId) -> Arc<AtomicU32> {
        let busy = Arc::new(AtomicU32::new(0));
        let mut inner = self.inner();
        inner.queues.retain(|(_, q)| q.strong_count() > 0);
        inner.queues.push((*me, Arc::downgrade(&busy)));
        busy
    }

    /// Applies a command's change made by `rule` from the current state: persisted first while
    /// PTPL is on (or as it turns off), a failure to persist leaving everything as it was; in a
    /// shared store, always. Returns the change, and for a Preempt and Abort what to wait for.
    pub fn apply(
        &self,
        rule: impl Fn(&State, bool) -> Result<Change, Status>,
    ) -> Result<(Change, Option<Drain>), Status> {
        let store = match &self.store {
            Some(store) if store.shared() => return self.apply_shared(store.as_ref(), rule),
            other => other,
        };
        let mut inner = self.inner();
        let change = rule(&inner.state, self.ptpl_capable())?;
        if let Some(store) = store
            && (change.state.ptpl || inner.state.ptpl)
            && change.state != inner.state
        {
            let kept = change.state.ptpl.then_some(&change.state);
            store.save(kept, &change.notices).map_err(|e| store_failure(&e))?;
        }
        inner.state = change.state.clone();
        Ok(self.commit(&mut inner, change))
    }

    /// [`Reservation::apply`] with a store other heads share: the state is not held locked
    /// while the store answers (this head's I/O and the cluster's watch go on); the store's
    /// transaction on its revision decides between changes, and a change another head made
    /// first is applied to again (a few times at most: each retry follows a change made).
    fn apply_shared(
        &self,
        store: &dyn Store,
        rule: impl Fn(&State, bool) -> Result<Change, Status>,
    ) -> Result<(Change, Option<Drain>), Status> {
        for _ in 0..8 {
            let base = self.inner().state.clone();
            let change = rule(&base, true)?;
            if change.state != base {
                match store.save(Some(&change.state), &change.notices) {
                    Ok(()) => {}
                    Err(StoreError::Stale(newer)) => {
                        let mut inner = self.inner();
                        if inner.state == base {
                            inner.state = newer.unwrap_or_default();
                            self.version.fetch_add(1, Ordering::SeqCst);
                        }
                        continue;
                    }
                    Err(e) => return Err(store_failure(&e)),
                }
            }
            let mut inner = self.inner();
            // A state taken from the store meanwhile was made after this one (the store's
            // revisions order them): it stays.
            if inner.state == base {
                inner.state = change.state.clone();
            }
            return Ok(self.commit(&mut inner, change));
        }
        tracing::warn!("reservation: the shared state kept changing under 8 tries; command refused (retryable)");
        Err(Status::ANA_TRANSITION)
    }

    /// A change made current: the Preempt and Abort wait set up, the version moved on.
    fn commit(&self, inner: &mut Inner, change: Change) -> (Change, Option<Drain>) {
        let drain = (!change.aborted.is_empty()).then(|| {
            inner.draining.extend(&change.aborted);
            let counters = inner
                .queues
                .iter()
                .filter(|(h, _)| change.aborted.contains(h))
                .filter_map(|(_, q)| q.upgrade())
                .collect();
            Drain { hosts: change.aborted.clone(), counters }
        });
        // After the state: a queue that counted a command before this sees the new version.
        self.version.fetch_add(1, Ordering::SeqCst);
        (change, drain)
    }

    /// A state another head made current in the shared store, if `newer` (asked while no
    /// command of this head changes the state) says there is one: taken as it is, queues see
    /// the new version and decide again. Returns the state it replaced.
    pub fn observe(&self, newer: impl FnOnce() -> Option<State>) -> Option<State> {
        let mut inner = self.inner();
        let state = newer()?;
        let old = std::mem::replace(&mut inner.state, state);
        self.version.fetch_add(1, Ordering::SeqCst);
        Some(old)
    }

    /// A Preempt and Abort's wait is over: the preempted hosts' commands run again (as the
    /// reservation now lets them).
    pub fn drained(&self, drain: &Drain) {
        let mut inner = self.inner();
        for h in &drain.hosts {
            if let Some(i) = inner.draining.iter().position(|d| d == h) {
                inner.draining.swap_remove(i);
            }
        }
        self.version.fetch_add(1, Ordering::SeqCst);
    }

    /// Sets PTPL (Set Features Reservation Persistence).
    pub fn set_ptpl(&self, on: bool) -> Result<(), Status> {
        if on && !self.ptpl_capable() {
            return Err(INVALID);
        }
        self.apply(|st, _| Ok(Change::of(State { ptpl: on, ..st.clone() }))).map(drop)
    }

    /// True the first time it is asked: for the one warning that a host asked for PTPL where it
    /// cannot be kept.
    pub fn warn_ptpl_once(&self) -> bool {
        !std::mem::replace(&mut self.inner().ptpl_warned, true)
    }
}

/// The status a command gets when its state could not be kept: retryable where the store is
/// out of reach for now (the host may try another path), Internal Error otherwise.
fn store_failure(e: &StoreError) -> Status {
    match e {
        StoreError::Unavailable(why) => {
            tracing::warn!("reservation state not kept, command refused (retryable): {why}");
            Status::ANA_TRANSITION
        }
        e => {
            tracing::error!("reservation state not persisted, command refused: {e}");
            Status::INTERNAL_ERROR
        }
    }
}

/// The commands a Preempt and Abort waits for: those in flight on queues of the preempted hosts
/// when it changed the reservation (new ones are refused meanwhile).
#[derive(Debug)]
pub struct Drain {
    hosts: Vec<HostId>,
    counters: Vec<Arc<AtomicU32>>,
}

impl Drain {
    pub fn done(&self) -> bool {
        self.in_flight() == 0
    }

    /// The preempted hosts' commands still in flight on the namespace.
    pub fn in_flight(&self) -> u32 {
        self.counters.iter().map(|c| c.load(Ordering::SeqCst)).sum()
    }
}

#[cfg(test)]
mod tests;
