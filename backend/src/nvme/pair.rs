//! A target queue's way to the SSD: an I/O queue pair of its own, or — when the SSD granted
//! fewer pairs than the target has queues — a share of its last pair with the other target
//! queues beyond (as blk-mq maps many submitters onto an SSD's hardware queues). A share's
//! commands carry CIDs of their own range; whoever takes completions from the CQ hands each
//! to its sharer and wakes it. Queues with a pair of their own take no lock.

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use p2pnvmf_nvmf::wire::{Cqe, Sqe};

use super::queue::QueuePair;

/// CIDs of one sharer: its commands carry `index * SHARE_CIDS + their own CID` (a target
/// queue has at most 1023 commands at the SSD).
const SHARE_CIDS: u16 = 1024;
/// Sharers of one pair, at most (the CID space).
const MAX_SHARERS: usize = (u16::MAX as usize + 1) / SHARE_CIDS as usize;

#[derive(Debug)]
pub enum Pair {
    Own(QueuePair),
    Shared(Share),
}

/// A queue pair several target queues use.
#[derive(Debug)]
pub struct SharedPair {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `None` once its last sharer left (it is deleted then).
    q: Option<QueuePair>,
    sharers: Vec<Sharer>,
}

#[derive(Debug, Default)]
struct Sharer {
    in_use: bool,
    /// Completions taken from the CQ by another sharer.
    inbox: Vec<Cqe>,
    waker: Option<Waker>,
    /// Woken because completions made room in the SQ (its commands may wait for some).
    poked: bool,
}

/// One target queue's share of a [`SharedPair`].
#[derive(Debug)]
pub struct Share {
    pair: Arc<SharedPair>,
    index: usize,
}

impl SharedPair {
    pub fn new(q: QueuePair) -> Arc<SharedPair> {
        Arc::new(SharedPair { inner: Mutex::new(Inner { q: Some(q), sharers: Vec::new() }) })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new share, unless the pair has as many sharers as CIDs allow or was closed.
    pub fn join(self: &Arc<Self>) -> Option<Share> {
        let mut inner = self.lock();
        inner.q.as_ref()?;
        let index = match inner.sharers.iter().position(|s| !s.in_use) {
            Some(i) => i,
            None if inner.sharers.len() < MAX_SHARERS => {
                inner.sharers.push(Sharer::default());
                inner.sharers.len() - 1
            }
            None => return None,
        };
        inner.sharers[index] = Sharer { in_use: true, ..Sharer::default() };
        Some(Share { pair: self.clone(), index })
    }

    /// Target queues using the pair.
    pub fn sharers(&self) -> usize {
        self.lock().sharers.iter().filter(|s| s.in_use).count()
    }
}

impl Pair {
    pub fn qid(&self) -> u16 {
        match self {
            Pair::Own(q) => q.qid,
            Pair::Shared(s) => s.pair.lock().q.as_ref().expect("open while shared").qid,
        }
    }

    /// Whether the SQ has room for another entry.
    pub fn has_room(&self) -> bool {
        match self {
            Pair::Own(q) => q.has_room(),
            Pair::Shared(s) => s.pair.lock().q.as_ref().expect("open while shared").has_room(),
        }
    }

    /// [`QueuePair::submit`] when the SQ has room (checked and used at once: a sharer may take
    /// the last entry between two looks), the CID made the share's own; false when it is full
    /// (nothing was written).
    ///
    /// # Safety
    /// As for [`QueuePair::submit`].
    #[allow(unsafe_code)]
    pub unsafe fn submit(&mut self, sqe: &Sqe) -> bool {
        match self {
            Pair::Own(q) if !q.has_room() => false,
            Pair::Own(q) => {
                // SAFETY: the caller's promise, passed on.
                unsafe { q.submit(sqe) };
                true
            }
            Pair::Shared(s) => {
                let mut sqe = *sqe;
                sqe.cid.set(s.index as u16 * SHARE_CIDS + sqe.cid.get());
                let mut inner = s.pair.lock();
                let q = inner.q.as_mut().expect("open while shared");
                if !q.has_room() {
                    return false;
                }
                // SAFETY: the caller's promise, passed on.
                unsafe { q.submit(&sqe) };
                true
            }
        }
    }

    /// Takes this queue's completions into `out` (with the CIDs it gave) and rings the CQ
    /// doorbell. A share hands every other sharer its completions and wakes them (and those
    /// that may wait for room in the SQ).
    pub fn take_completions(&mut self, out: &mut Vec<Cqe>) {
        match self {
            Pair::Own(q) => {
                out.extend(std::iter::from_fn(|| q.poll()));
                q.ring_cq();
            }
            Pair::Shared(s) => {
                let mut inner = s.pair.lock();
                let Inner { q, sharers } = &mut *inner;
                let q = q.as_mut().expect("open while shared");
                let mut took = false;
                while let Some(mut cqe) = q.poll() {
                    took = true;
                    let wire = cqe.cid.get();
                    cqe.cid.set(wire % SHARE_CIDS);
                    match sharers.get_mut(usize::from(wire / SHARE_CIDS)) {
                        Some(sharer) if sharer.in_use => sharer.inbox.push(cqe),
                        // A sharer that left waited for its commands first: none is its.
                        _ => tracing::warn!(cid = wire, "completion for no sharer of the queue pair; ignored"),
                    }
                }
                q.ring_cq();
                out.append(&mut sharers[s.index].inbox);
                if took {
                    for sharer in sharers.iter_mut() {
                        if let Some(w) = sharer.waker.take() {
                            sharer.poked = true;
                            w.wake();
                        }
                    }
                }
            }
        }
    }

    /// Whether the CQ holds a completion not taken yet (for any sharer): a poller's look.
    pub fn posted(&self) -> bool {
        match self {
            Pair::Own(q) => q.posted(),
            Pair::Shared(s) => s.pair.lock().q.as_ref().is_some_and(QueuePair::posted),
        }
    }

    /// Whether this queue has something to reap that its interrupt does not say: completions
    /// another sharer took from the CQ, or room they made in the SQ; otherwise `waker` is woken
    /// when there is. Always false for a pair of its own.
    pub fn has_inbox(&self, waker: &Waker) -> bool {
        let Pair::Shared(s) = self else { return false };
        let mut inner = s.pair.lock();
        let me = &mut inner.sharers[s.index];
        if me.inbox.is_empty() && !std::mem::take(&mut me.poked) {
            me.waker = Some(waker.clone());
            return false;
        }
        true
    }

    /// Leaves the pair (its commands done): the queue pair to delete when this was its last
    /// user.
    pub fn close(self) -> Option<QueuePair> {
        match self {
            Pair::Own(q) => Some(q),
            Pair::Shared(s) => {
                let mut inner = s.pair.lock();
                inner.sharers[s.index] = Sharer::default();
                if inner.sharers.iter().any(|x| x.in_use) { None } else { inner.q.take() }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use p2pnvmf_p2p::mem::Mapping;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Posts a completion for `cid` at CQ slot `slot` (phase 1), as the controller would.
    fn post(mem: &Mapping, slot: u16, cid: u16) {
        let at = 4096 + usize::from(slot) * 16;
        mem.write32(at + 8, u32::from(slot + 1));
        mem.write32(at + 12, u32::from(cid) | 1 << 16);
    }

    /// A shared queue pair 2 of `entries` in test memory (the SQ at 0, the CQ at 4096), and two
    /// shares of it.
    fn two_sharers(entries: u16) -> (Arc<Mapping>, Arc<SharedPair>, Pair, Pair) {
        let mem = Arc::new(Mapping::host_small(8192).unwrap());
        let regs = Arc::new(Mapping::host_small(0x2000).unwrap());
        let shared = SharedPair::new(QueuePair::new(2, entries, mem.clone(), 0, 4096, regs, 4));
        let (a, b) = (Pair::Shared(shared.join().unwrap()), Pair::Shared(shared.join().unwrap()));
        (mem, shared, a, b)
    }

    #[test]
    #[allow(unsafe_code)]
    fn each_sharer_gets_its_own_completions_and_is_woken_for_them() {
        let (mem, shared, mut a, mut b) = two_sharers(64);
        assert_eq!((shared.sharers(), a.qid()), (2, 2));
        let mut sqe = Sqe::default();
        sqe.cid.set(5);
        // SAFETY: the entries name no memory (a controller played by this test).
        assert!(unsafe { a.submit(&sqe) && b.submit(&sqe) });
        // CDW0 of the second entry: opcode, flags, then the CID.
        assert_eq!(mem.read32(64) >> 16, 1024 + 5, "b's CID carries its share");
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        assert!(!b.has_inbox(&Waker::from(woken.clone())), "nothing for b yet");
        post(&mem, 0, 1024 + 5);
        post(&mem, 1, 5);
        let mut got = Vec::new();
        a.take_completions(&mut got);
        assert_eq!(got.iter().map(|c| c.cid.get()).collect::<Vec<_>>(), [5], "a takes its own");
        assert_eq!(woken.0.load(Ordering::Relaxed), 1, "b was woken for its completion");
        assert!(b.has_inbox(&Waker::from(woken.clone())));
        got.clear();
        b.take_completions(&mut got);
        assert_eq!(got.iter().map(|c| c.cid.get()).collect::<Vec<_>>(), [5], "b's, with its own CID");
        assert!(a.close().is_none(), "b still uses the pair");
        let c = Pair::Shared(shared.join().unwrap());
        assert!(b.close().is_none() && c.close().is_some(), "the last one out deletes it");
        assert!(shared.join().is_none(), "a closed pair takes no sharer");
    }

    #[test]
    #[allow(unsafe_code)]
    fn a_full_shared_sq_takes_nothing_until_a_completion_makes_room() {
        let (mem, _shared, mut a, mut b) = two_sharers(4);
        let sqe = Sqe::default();
        // SAFETY: the entries name no memory (a controller played by this test).
        let took = unsafe { [a.submit(&sqe), b.submit(&sqe), a.submit(&sqe), b.submit(&sqe)] };
        assert_eq!(took, [true, true, true, false], "three entries, one always empty");
        assert!(!a.has_room());
        // The controller consumed the first entry: b's completion makes room, and a is told.
        let woken = Arc::new(Count(AtomicUsize::new(0)));
        assert!(!a.has_inbox(&Waker::from(woken.clone())));
        post(&mem, 0, 1024);
        let mut got = Vec::new();
        b.take_completions(&mut got);
        assert_eq!((got.len(), woken.0.load(Ordering::Relaxed)), (1, 1));
        assert!(a.has_inbox(&Waker::from(woken.clone())), "a may send what waited");
        // SAFETY: as above.
        assert!(unsafe { a.submit(&sqe) });
    }
}
