//! Subsystems and the ports (listeners) they are exposed on.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::auth::Host;
use crate::ns::Namespace;

/// The well-known discovery subsystem NQN (NVMe Base 2.0, 4.5).
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// Transport type as in the discovery log's TRTYPE (NVMe-oF 1.1, Figure 31).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrType {
    Rdma = 1,
    Tcp = 3,
}

impl TrType {
    /// As metrics and `p2pnvmf status` label it.
    pub fn as_str(self) -> &'static str {
        match self {
            TrType::Rdma => "rdma",
            TrType::Tcp => "tcp",
        }
    }

    /// As the specification names it, for logs.
    pub fn name(self) -> &'static str {
        match self {
            TrType::Rdma => "NVMe/RDMA",
            TrType::Tcp => "NVMe/TCP",
        }
    }
}

/// What a transport tells the core about itself, for Identify and the discovery log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportParams {
    /// I/O queue command capsule size, in 16-byte units (IOCCSZ): SQE plus in-capsule data.
    pub ioccsz: u32,
    /// Largest data transfer of one command, in bytes (MDTS is derived from it).
    pub max_xfer: u32,
    /// Maximum SGL data block descriptors per command (MSDBD).
    pub msdbd: u8,
    /// Keyed SGL data block descriptors supported (RDMA).
    pub keyed_sgls: bool,
}

/// A listener as the core and the discovery log see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub id: u16,
    pub trtype: TrType,
    pub traddr: String,
    pub trsvcid: String,
    pub params: TransportParams,
}

/// An NVM subsystem with its namespaces and host access list.
#[derive(Debug)]
pub struct Subsystem {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub allow_any_host: bool,
    /// The hosts let in (when not any host), with the secrets those with a key must prove.
    pub hosts: Vec<Host>,
    /// Port ids the subsystem is exposed on; `None` means every port.
    pub ports: Option<Vec<u16>>,
    /// Sorted by NSID.
    pub namespaces: Vec<Namespace>,
    /// Controller IDs this head gives the subsystem's controllers: heads serving one subsystem
    /// give disjoint ranges, since a host refuses a second controller with an ID it knows.
    pub cntlids: std::ops::RangeInclusive<u16>,
    pub stats: IoStats,
}

/// Dynamic controller IDs range over 1..=FFEFh (NVMe Base 2.0, Figure 275, CNTLID).
pub const CNTLIDS: std::ops::RangeInclusive<u16> = 1..=0xffef;

/// Host I/O counters for the SMART log. Relaxed atomics: counts, not synchronisation.
#[derive(Debug, Default)]
pub struct IoStats {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl IoStats {
    pub fn record_read(&self, bytes: u64) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes_read.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn record_write(&self, bytes: u64) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes_written.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }
}

impl Subsystem {
    /// A subsystem any host may use on every port (serial and model left generic): what tests
    /// and embedders start from.
    pub fn open(nqn: &str, namespaces: Vec<Namespace>) -> Subsystem {
        Subsystem {
            nqn: nqn.into(),
            serial: "P2PNVMF".into(),
            model: "p2pnvmf".into(),
            allow_any_host: true,
            hosts: Vec::new(),
            ports: None,
            namespaces,
            cntlids: CNTLIDS,
            stats: IoStats::default(),
        }
    }

    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allow_any_host || self.host(hostnqn).is_some()
    }

    /// The host's entry, whose secrets its queues authenticate with (any host allowed: none).
    pub fn host(&self, hostnqn: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.nqn == hostnqn).filter(|_| !self.allow_any_host)
    }

    pub fn on_port(&self, port: u16) -> bool {
        self.ports.as_ref().is_none_or(|p| p.contains(&port))
    }

    pub fn ns(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces.binary_search_by_key(&nsid, |n| n.nsid).ok().map(|i| &self.namespaces[i])
    }
}
