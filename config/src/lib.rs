//! The TOML configuration: a raw serde layer that keeps spans, and a validated model whose
//! errors name the file, line and key.
#![forbid(unsafe_code)]

pub mod dhchap;
pub mod pci;
mod raw;
mod size;

pub use raw::NQN_MAX;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub use size::parse_size;

pub use pci::Addressing;

/// The embedded default configuration (`deploy/default.toml`).
pub const DEFAULT: &str = include_str!("../../deploy/default.toml");

/// A configuration error (or warning) with its location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Rdma,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub transport: Transport,
    pub address: IpAddr,
    pub port: u16,
    /// RDMA: in-capsule data accepted on I/O queues (advertised as IOCCSZ).
    pub inline_data_size: u32,
    /// RDMA: receive through one shared receive queue per device, of this many capsules.
    pub srq_size: Option<u32>,
}

/// Default and largest RDMA in-capsule data size.
pub const DEFAULT_INLINE_DATA: u32 = 8192;
pub const MAX_INLINE_DATA: u32 = 16384;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Sparse RAM of `size` bytes.
    Ram { size: u64 },
    /// A regular file (created or extended to `size` when given) or a block device.
    File { path: PathBuf, size: Option<u64> },
    /// Namespace `device_nsid` of the NVMe SSD at `pci`, driven by the target itself.
    NvmeVfio { pci: pci::PciAddr, device_nsid: u32, dma: Addressing },
}

/// Where a namespace's I/O buffers live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffers {
    /// Peer-to-peer memory where the NIC and backend can use it, host memory otherwise.
    Auto,
    Host,
    /// Peer-to-peer memory or nothing: the namespace refuses to start without a usable
    /// provider (controllers whose NIC cannot reach it still fall back, as Linux's nvmet does).
    P2p,
}

/// The `[p2p]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct P2p {
    /// Host bridges (vendor, device) the operator says forward p2p between root ports.
    pub allow_host_bridges: Vec<(u16, u16)>,
    /// `[[p2p.provider]]`; empty means every NVMe CMB found.
    pub providers: Vec<pci::Spec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub nsid: u32,
    pub backend: Backend,
    pub buffers: Buffers,
    /// `provider`: the p2p provider (PCI address) its buffers must come from, instead of the
    /// nearest usable one.
    pub provider: Option<pci::PciAddr>,
    /// `uuid`, `nguid`, `eui64`: identifiers that replace the derived ones (a volume moved
    /// here keeps its identity); all zeroes means "not reported".
    pub uuid: Option<[u8; 16]>,
    pub nguid: Option<[u8; 16]>,
    pub eui64: Option<[u8; 8]>,
    /// `ana_group`: its ANA group (1 to [`ANA_GROUPS`], default 1).
    pub ana_group: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subsystem {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub allow_any_host: bool,
    /// `hosts = [...]` and `[[subsystem.host]]` tables, the latter with DH-HMAC-CHAP secrets.
    pub hosts: Vec<dhchap::Host>,
    /// Names of the listeners it is exposed on; `None` for all.
    pub listeners: Option<Vec<String>>,
    pub namespaces: Vec<Namespace>,
    /// `cntlid_min`, `cntlid_max`: the controller IDs this head gives (default 1 to FFEFh).
    pub cntlid_min: u16,
    pub cntlid_max: u16,
}

/// ANA groups a head has (ANAGRPMAX), as the core's.
pub const ANA_GROUPS: u32 = 128;
/// Namespaces a subsystem may hold (MNAN).
pub const MAX_NAMESPACES: usize = 1024;

/// An ANA group's state on this head (NVMe Base 2.0, 8.1.2), with its ANAS value (Figure 221).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AnaState {
    Optimized = 0x01,
    NonOptimized = 0x02,
    Inaccessible = 0x03,
    PersistentLoss = 0x04,
    Change = 0x0f,
}

impl AnaState {
    pub const ALL: [AnaState; 5] = [
        AnaState::Optimized,
        AnaState::NonOptimized,
        AnaState::Inaccessible,
        AnaState::PersistentLoss,
        AnaState::Change,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AnaState::Optimized => "optimized",
            AnaState::NonOptimized => "non-optimized",
            AnaState::Inaccessible => "inaccessible",
            AnaState::PersistentLoss => "persistent-loss",
            AnaState::Change => "change",
        }
    }

    pub fn parse(s: &str) -> Option<AnaState> {
        AnaState::ALL.into_iter().find(|a| a.as_str() == s)
    }

    pub fn from_u8(v: u8) -> Option<AnaState> {
        AnaState::ALL.into_iter().find(|a| *a as u8 == v)
    }
}

impl std::fmt::Display for AnaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `[cluster]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// `etcd`: client URLs (http://HOST:PORT) of the etcd cluster.
    pub etcd: Vec<String>,
    /// `name`: this head's name, unique in the cluster.
    pub name: String,
    /// `lease_ttl`: the lease a head holds its groups with (whole seconds, default 5).
    pub lease_ttl_secs: u32,
    /// `standby`: what this head reports for a group another head owns.
    pub standby: AnaState,
    /// `prefix`: where in etcd's key space this cluster keeps its state (default "/p2pnvmf").
    pub prefix: String,
}

/// The `[performance]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Performance {
    /// `poll`: connections are served by polling threads that never sleep (each keeps a CPU
    /// busy) instead of the interrupt-driven default.
    pub poll: bool,
    /// `cores`: the CPUs the polling threads are pinned to, one thread each; empty: one thread,
    /// not pinned.
    pub cores: Vec<usize>,
    /// `isolate_cores`: while the target runs, the kernel's unbound work queues are kept off
    /// `cores` (their CPU mask in sysfs; the one found is put back at exit).
    pub isolate_cores: bool,
}

/// The `[ana]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ana {
    /// `groups`: this head's state of each group; a group not named is optimized.
    pub groups: std::collections::BTreeMap<u32, AnaState>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub subsystems: Vec<Subsystem>,
    pub p2p: P2p,
    /// `[metrics] listen`: where Prometheus scrapes `/metrics`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub limits: Limits,
    /// `[reservations] state_dir`: where namespaces keep registrations and reservations that
    /// persist through power loss (PTPL); without it they end with the process.
    pub reservations_state_dir: Option<PathBuf>,
    pub ana: Ana,
    /// `[cluster]`: several heads serving the same storage, sharing state through etcd.
    pub cluster: Option<Cluster>,
    pub performance: Performance,
    /// What was accepted but deserves the operator's eye, with its place in the file.
    pub warnings: Vec<ConfigError>,
}

/// The `[limits]` section: what hosts get at most, refused with the specification's status
/// (or, for connections, closed at once) instead of by running out of resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Controllers one subsystem serves at once (Connect beyond: Controller Busy).
    pub controllers_per_subsystem: u16,
    /// I/O queues per controller (Number of Queues grants at most this many).
    pub io_queues: u16,
    /// Entries per queue (CAP.MQES + 1).
    pub queue_size: u16,
    /// Connections (queues) one listener holds at once.
    pub connections_per_listener: u32,
    /// NVMe/TCP: bytes one connection has asked for with R2Ts and not yet received; further
    /// writes wait for their R2T.
    pub r2t_data: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            controllers_per_subsystem: 128,
            io_queues: 64,
            queue_size: 128,
            connections_per_listener: 1024,
            r2t_data: 16 << 20,
        }
    }
}

impl Config {
    /// Parses and validates `src`; `file` names it in errors.
    pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
        raw::parse(src, file)
    }

    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let src = read(path)?;
        Ok(Config::parse(&src, &path.display().to_string())?)
    }

    /// Only the `[p2p]` table of `path`, which may hold nothing else (a full configuration is
    /// checked whole).
    pub fn load_p2p(path: &Path) -> Result<P2p, LoadError> {
        let src = read(path)?;
        Ok(raw::parse_p2p(&src, &path.display().to_string())?)
    }

    /// The embedded default.
    pub fn default_config() -> Config {
        Config::parse(DEFAULT, "<embedded default>").expect("the embedded default is valid")
    }
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Read { path: path.to_path_buf(), source })
}
