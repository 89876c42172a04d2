//! RDMA CM connect private data (NVMe-oF RDMA binding): parsed into a queue request or a
//! reject status, never a panic; an accepted request obeys the binding's rules.
#![no_main]

use libfuzzer_sys::fuzz_target;
use p2pnvmf_transport::rdma::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = wire::parse_request(data, &Default::default()) {
        // A receive slot per command and one over: HRQSIZE > HSQSIZE, admin at least 32 deep.
        assert!(r.depth >= 2 && r.hrqsize >= r.depth && (r.qid != 0 || r.depth >= 32), "accepted {r:?}");
    }
});
