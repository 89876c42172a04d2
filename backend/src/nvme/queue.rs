//! One NVMe queue pair in host memory the controller reaches by DMA: submission entries are
//! written at the tail and the tail doorbell rung; completion entries are taken while their
//! phase tag matches, and the head doorbell rung once per batch.

use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use p2pnvmf_nvmf::wire::{Cqe, Sqe};
use p2pnvmf_p2p::mem::Mapping;
use zerocopy::IntoBytes;

use super::spec::reg;

pub const SQE_SIZE: usize = 64;
pub const CQE_SIZE: usize = 16;

/// Where a queue pair lives: `mem` holds the SQ at `sq` and the CQ at `cq` (offsets), both
/// page aligned; `regs` is BAR0.
#[derive(Debug)]
pub struct QueuePair {
    pub qid: u16,
    entries: u16,
    mem: Arc<Mapping>,
    sq: usize,
    cq: usize,
    regs: Arc<Mapping>,
    sq_doorbell: usize,
    cq_doorbell: usize,
    sq_tail: u16,
    /// The controller's SQ head as its last completion said.
    sq_head: u16,
    cq_head: u16,
    phase: bool,
    /// Completions taken since the head doorbell was last rung.
    unrung: bool,
}

impl QueuePair {
    pub fn new(
        qid: u16,
        entries: u16,
        mem: Arc<Mapping>,
        sq: usize,
        cq: usize,
        regs: Arc<Mapping>,
        stride: usize,
    ) -> Self {
        assert!(entries >= 2, "a queue holds at least two entries");
        assert!(sq + usize::from(entries) * SQE_SIZE <= mem.len() && cq + usize::from(entries) * CQE_SIZE <= mem.len());
        let sq_doorbell = reg::DOORBELLS + 2 * usize::from(qid) * stride;
        QueuePair {
            qid,
            entries,
            mem,
            sq,
            cq,
            regs,
            sq_doorbell,
            cq_doorbell: sq_doorbell + stride,
            sq_tail: 0,
            sq_head: 0,
            cq_head: 0,
            phase: true,
            unrung: false,
        }
    }

    /// Whether the SQ has room for another entry (one slot always stays empty).
    pub fn has_room(&self) -> bool {
        (self.sq_tail + 1) % self.entries != self.sq_head
    }

    /// Writes `sqe` at the tail and rings the tail doorbell. The caller checked `has_room`.
    ///
    /// # Safety
    /// The controller reads and writes by DMA whatever addresses the entry names (PRPs, a PRP
    /// list, a range list): as with io_uring's submission queue, that memory must stay
    /// allocated and untouched by anyone else until the command's completion is taken (or the
    /// queue is deleted, or the controller disabled).
    pub unsafe fn submit(&mut self, sqe: &Sqe) {
        debug_assert!(self.has_room());
        self.mem.write_bytes(self.sq + usize::from(self.sq_tail) * SQE_SIZE, sqe.as_bytes());
        self.sq_tail = (self.sq_tail + 1) % self.entries;
        // The entry must be visible in memory before the controller hears of it.
        fence(Ordering::SeqCst);
        self.regs.write32(self.sq_doorbell, u32::from(self.sq_tail));
    }

    /// DW3 of the entry at the head when the controller posted it (its phase tag current).
    fn head(&self) -> Option<u32> {
        let dw3 = self.mem.read32(self.cq + usize::from(self.cq_head) * CQE_SIZE + 12);
        ((dw3 >> 16) & 1 == u32::from(self.phase)).then_some(dw3)
    }

    /// Whether the controller posted a completion not taken yet (a look at the head entry's
    /// phase tag: what a poller does each turn).
    pub fn posted(&self) -> bool {
        self.head().is_some()
    }

    /// The next completion, if the controller posted one.
    pub fn poll(&mut self) -> Option<Cqe> {
        let dw3 = self.head()?;
        let at = self.cq + usize::from(self.cq_head) * CQE_SIZE;
        // The rest of the entry is read only after its phase tag says it is complete.
        fence(Ordering::Acquire);
        let dw2 = self.mem.read32(at + 8);
        let mut cqe = Cqe::default();
        cqe.result.set(u64::from(self.mem.read32(at)) | u64::from(self.mem.read32(at + 4)) << 32);
        cqe.sqhd.set(dw2 as u16);
        cqe.sqid.set((dw2 >> 16) as u16);
        cqe.cid.set(dw3 as u16);
        cqe.status.set((dw3 >> 16) as u16);
        self.sq_head = cqe.sqhd.get() % self.entries;
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        self.unrung = true;
        Some(cqe)
    }

    /// Tells the controller which completions were consumed (once per batch).
    pub fn ring_cq(&mut self) {
        if std::mem::take(&mut self.unrung) {
            self.regs.write32(self.cq_doorbell, u32::from(self.cq_head));
        }
    }
}

/// Status Code Type and Status Code of a completion (phase tag stripped), 0 for success.
pub fn status(cqe: &Cqe) -> u16 {
    cqe.status.get() >> 1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A controller played by the test: reads the SQ, posts completions with the phase tag.
    fn post(mem: &Mapping, cq: usize, slot: u16, cid: u16, sqhd: u16, phase: bool, sc: u16) {
        let at = cq + usize::from(slot) * CQE_SIZE;
        mem.write32(at, 0xabcd);
        mem.write32(at + 8, u32::from(sqhd));
        mem.write32(at + 12, u32::from(cid) | (u32::from(sc) << 1 | u32::from(phase)) << 16);
    }

    #[test]
    fn entries_go_round_with_the_phase_and_doorbells() {
        let mem = Arc::new(Mapping::host_small(8192).unwrap());
        let regs = Arc::new(Mapping::host_small(0x2000).unwrap());
        let mut q = QueuePair::new(1, 4, mem.clone(), 0, 4096, regs.clone(), 4);
        let mut sqe = Sqe { opcode: 2, ..Sqe::default() };
        for cid in 0..3u16 {
            assert!(q.has_room());
            sqe.cid.set(cid);
            // SAFETY: the entries name no memory (opcode 2 with no PRPs to a controller
            // played by this test).
            unsafe { q.submit(&sqe) };
        }
        assert!(!q.has_room(), "one slot stays empty");
        assert_eq!(regs.read32(0x1008), 3, "SQ 1 tail doorbell");
        let mut second = [0; 4];
        mem.read_bytes(64, &mut second);
        assert_eq!(second[2..4], 1u16.to_le_bytes(), "cid of the second entry");
        assert!(!q.posted() && q.poll().is_none(), "nothing posted yet");
        for (slot, cid) in [(0u16, 2u16), (1, 0), (2, 1)] {
            post(&mem, 4096, slot, cid, slot + 1, true, 0);
        }
        assert!(q.posted(), "a completion at the head");
        let cids: Vec<u16> = std::iter::from_fn(|| q.poll()).map(|c| c.cid.get()).collect();
        assert_eq!(cids, [2, 0, 1], "completion order");
        q.ring_cq();
        assert_eq!(regs.read32(0x100c), 3, "CQ 1 head doorbell");
        assert!(q.has_room());
        // The fourth slot, then the CQ wraps: the next round carries phase 0.
        post(&mem, 4096, 3, 7, 3, true, 0x2);
        post(&mem, 4096, 0, 8, 3, false, 0);
        let c = q.poll().unwrap();
        assert_eq!((c.cid.get(), status(&c), c.result.get()), (7, 0x2, 0xabcd));
        assert_eq!(q.poll().unwrap().cid.get(), 8, "phase flipped after the wrap");
        assert!(!q.posted() && q.poll().is_none(), "a stale entry from the first round is not taken");
    }
}
