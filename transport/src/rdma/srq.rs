//! A shared receive queue per RDMA device: one protection domain, one SRQ and one registered
//! region of receive capsules serve every queue pair on the device, so receive memory grows
//! with the SRQ size instead of with the number of queues.

use std::io;
use std::ptr;

use p2pnvmf_p2p::mem::Mapping;

use super::sys::{self, Api};

#[derive(Debug)]
pub struct SharedRecv {
    api: &'static Api,
    verbs: *mut sys::IbvContext,
    pub(super) pd: *mut sys::IbvPd,
    pub(super) srq: *mut sys::IbvSrq,
    mr: *mut sys::IbvMr,
    mem: Mapping,
    capsule: usize,
    count: usize,
}

// SAFETY: verbs allows posting to an SRQ from any thread; each capsule buffer is owned by
// exactly one queue between its receive completion and its repost (see `capsule_mut`).
unsafe impl Send for SharedRecv {}
// SAFETY: as above.
unsafe impl Sync for SharedRecv {}

impl SharedRecv {
    /// Creates the SRQ on `verbs` with `count` capsules of `capsule` bytes, all posted.
    pub fn new(api: &'static Api, verbs: *mut sys::IbvContext, count: usize, capsule: usize) -> io::Result<SharedRecv> {
        let mem = Mapping::host(count * capsule)?;
        let mut s = SharedRecv {
            api,
            verbs,
            pd: ptr::null_mut(),
            srq: ptr::null_mut(),
            mr: ptr::null_mut(),
            mem,
            capsule,
            count,
        };
        // SAFETY: live device context; results checked; `s` frees what exists on error.
        unsafe {
            s.pd = sys::check_ptr("ibv_alloc_pd", (api.ibv_alloc_pd)(verbs))?;
            let mut attr =
                sys::IbvSrqInitAttr { srq_context: ptr::null_mut(), max_wr: count as u32, max_sge: 1, srq_limit: 0 };
            s.srq = sys::check_ptr("ibv_create_srq", (api.ibv_create_srq)(s.pd, &mut attr))?;
            s.mr = sys::check_ptr(
                "ibv_reg_mr",
                (api.ibv_reg_mr)(s.pd, s.mem.as_ptr().cast(), s.mem.len(), sys::IBV_ACCESS_LOCAL_WRITE),
            )?;
        }
        for i in 0..count {
            s.post(i)?;
        }
        Ok(s)
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Returns capsule buffer `idx` to the SRQ.
    pub fn post(&self, idx: usize) -> io::Result<()> {
        // SAFETY: `mr` registered in new(); `verbs` outlives the SRQ.
        let (lkey, f) = unsafe { ((*self.mr).lkey, (*self.verbs).post_srq_recv) };
        let f = f.ok_or_else(|| io::Error::other("provider has no post_srq_recv"))?;
        let mut sge = sys::IbvSge {
            addr: self.mem.as_ptr() as u64 + (idx * self.capsule) as u64,
            length: self.capsule as u32,
            lkey,
        };
        let mut wr = sys::IbvRecvWr { wr_id: idx as u64, next: ptr::null_mut(), sg_list: &mut sge, num_sge: 1 };
        let mut bad = ptr::null_mut();
        // SAFETY: the SGE points into our registered region; the provider copies the WR.
        sys::check("ibv_post_srq_recv", unsafe { f(self.srq, &mut wr, &mut bad) })
    }

    /// The capsule in buffer `idx`.
    ///
    /// # Safety
    /// The caller must hold `idx`: it took it from a receive completion and has not posted it
    /// again, so the device does not write it meanwhile.
    pub unsafe fn capsule(&self, idx: usize) -> &[u8] {
        assert!(idx < self.count, "SRQ buffer {idx} out of range");
        // SAFETY: in range; not written while the caller holds it (its contract).
        unsafe { std::slice::from_raw_parts(self.mem.as_ptr().add(idx * self.capsule), self.capsule) }
    }
}

impl Drop for SharedRecv {
    fn drop(&mut self) {
        // SAFETY: every QP using the SRQ is gone (each holds an Arc); destroyed once, SRQ first.
        unsafe {
            if !self.srq.is_null() {
                (self.api.ibv_destroy_srq)(self.srq);
            }
            if !self.mr.is_null() {
                (self.api.ibv_dereg_mr)(self.mr);
            }
            if !self.pd.is_null() {
                (self.api.ibv_dealloc_pd)(self.pd);
            }
        }
    }
}
