//! The discovery log page (NVMe-oF 1.1, 5.3): what a host's discovery controller lists.

use std::sync::Arc;

use zerocopy::IntoBytes;

use crate::subsystem::{Port, Subsystem, TrType};
use crate::wire::{DiscoveryLogEntry, DiscoveryLogHeader, put_str};

/// A listener of another head serving the same subsystems (from the cluster): the discovery
/// log lists it for the subsystems it serves, and refers to its discovery controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPort {
    pub head: String,
    pub portid: u16,
    pub trtype: TrType,
    pub traddr: String,
    pub trsvcid: String,
    pub subsystems: Vec<String>,
}

/// One entry per port × subsystem that `hostnqn` may see, this head's ports first, then the
/// peers' (for subsystems this head serves too: its access list decides), then a referral to
/// each peer port's discovery controller; `genctr` moves on with every change, `asqsz` is the
/// admin queue size hosts may ask for.
pub fn log(
    subsystems: &[Arc<Subsystem>],
    ports: &[Port],
    peers: &[PeerPort],
    hostnqn: &str,
    genctr: u64,
    asqsz: u16,
) -> Vec<u8> {
    let mut entries = Vec::new();
    for port in ports {
        for s in subsystems.iter().filter(|s| s.on_port(port.id) && s.host_allowed(hostnqn)) {
            entries.push(entry(port.trtype, &port.traddr, &port.trsvcid, port.id, &s.nqn, asqsz));
        }
    }
    for p in peers {
        for s in subsystems.iter().filter(|s| p.subsystems.contains(&s.nqn) && s.host_allowed(hostnqn)) {
            entries.push(entry(p.trtype, &p.traddr, &p.trsvcid, p.portid, &s.nqn, asqsz));
        }
    }
    for p in peers {
        let mut e = entry(p.trtype, &p.traddr, &p.trsvcid, p.portid, crate::DISCOVERY_NQN, asqsz);
        e.subtype = 1; // a referral to another discovery service
        entries.push(e);
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

fn entry(trtype: TrType, traddr: &str, trsvcid: &str, portid: u16, subnqn: &str, asqsz: u16) -> DiscoveryLogEntry {
    let mut e = DiscoveryLogEntry {
        trtype: trtype as u8,
        adrfam: if traddr.contains(':') { 2 } else { 1 },
        subtype: 2, // NVM subsystem
        treq: 0,
        portid: portid.into(),
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
    put_str(&mut e.trsvcid, trsvcid, b' ');
    put_str(&mut e.subnqn, subnqn, 0);
    put_str(&mut e.traddr, traddr, b' ');
    if trtype == TrType::Rdma {
        // RDMA_QPTYPE connected, RDMA_PRTYPE not specified, RDMA_CMS rdma_cm (Figure 32).
        e.tsas[..3].copy_from_slice(&[1, 1, 1]);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subsystem::TransportParams;
    use crate::wire::{DiscoveryLogEntry, get_str};
    use zerocopy::FromBytes;

    #[test]
    fn peers_are_listed_for_the_subsystems_both_serve_and_referred_to() {
        let params = TransportParams { ioccsz: 4, max_xfer: 4096, msdbd: 1, keyed_sgls: false };
        let ours = Port { id: 1, trtype: TrType::Tcp, traddr: "10.0.0.1".into(), trsvcid: "4420".into(), params };
        let shared = Arc::new(Subsystem::open("nqn.x:shared", Vec::new()));
        let peer = |nqns: &[&str]| PeerPort {
            head: "b".into(),
            portid: 0x8101,
            trtype: TrType::Rdma,
            traddr: "10.0.0.2".into(),
            trsvcid: "4421".into(),
            subsystems: nqns.iter().map(|n| n.to_string()).collect(),
        };
        let log = log(&[shared], &[ours], &[peer(&["nqn.x:shared", "nqn.x:theirs"])], "nqn.host", 7, 32);
        let entries: Vec<_> = log[1024..]
            .chunks(1024)
            .map(|c| {
                let e = DiscoveryLogEntry::read_from_bytes(c).unwrap();
                (
                    e.subtype,
                    e.portid.get(),
                    get_str(&e.traddr).unwrap().trim().to_string(),
                    get_str(&e.subnqn).unwrap().to_string(),
                )
            })
            .collect();
        // A subsystem only the peer serves is not this head's to list.
        assert_eq!(
            entries,
            [
                (2, 1, "10.0.0.1".into(), "nqn.x:shared".into()),
                (2, 0x8101, "10.0.0.2".into(), "nqn.x:shared".into()),
                (1, 0x8101, "10.0.0.2".into(), crate::DISCOVERY_NQN.into()),
            ]
        );
    }
}
