//! The discovery log page (NVMe-oF 1.1, 5.3): what a host's discovery controller lists.

use std::sync::Arc;

use zerocopy::IntoBytes;

use crate::subsystem::{Port, Subsystem, TrType};
use crate::wire::{DiscoveryLogEntry, DiscoveryLogHeader, put_str};

/// One entry per port × subsystem that `hostnqn` may see; `genctr` moves on with every change,
/// `asqsz` is the admin queue size hosts may ask for.
pub fn log(subsystems: &[Arc<Subsystem>], ports: &[Port], hostnqn: &str, genctr: u64, asqsz: u16) -> Vec<u8> {
    let mut entries = Vec::new();
    for port in ports {
        for s in subsystems.iter().filter(|s| s.on_port(port.id) && s.host_allowed(hostnqn)) {
            entries.push(entry(port, &s.nqn, asqsz));
        }
    }
    let header = DiscoveryLogHeader {
        genctr: genctr.into(),
        numrec: (entries.len() as u64).into(),
        recfmt: 0.into(),
        rsvd: [0; 1006],
    };
    let mut log = header.as_bytes().to_vec();
    for e in &entries {
        log.extend_from_slice(e.as_bytes());
    }
    log
}

fn entry(port: &Port, subnqn: &str, asqsz: u16) -> DiscoveryLogEntry {
    let mut e = DiscoveryLogEntry {
        trtype: port.trtype as u8,
        adrfam: if port.traddr.contains(':') { 2 } else { 1 },
        subtype: 2, // NVM subsystem
        treq: 0,
        portid: port.id.into(),
        cntlid: 0xffff.into(),
        asqsz: asqsz.into(),
        eflags: 0.into(),
        rsvd1: [0; 20],
        trsvcid: [0; 32],
        rsvd2: [0; 192],
        subnqn: [0; 256],
        traddr: [0; 256],
        tsas: [0; 256],
    };
    put_str(&mut e.trsvcid, &port.trsvcid, b' ');
    put_str(&mut e.subnqn, subnqn, 0);
    put_str(&mut e.traddr, &port.traddr, b' ');
    if port.trtype == TrType::Rdma {
        // RDMA_QPTYPE connected, RDMA_PRTYPE not specified, RDMA_CMS rdma_cm (Figure 32).
        e.tsas[..3].copy_from_slice(&[1, 1, 1]);
    }
    e
}
