//! The serde layer: raw TOML with spans, then validation into the model.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::dhchap::{self, DHGROUP_NULL, Host, Secret};
use crate::pci::{Kind, PciAddr, Spec};

use crate::{
    ANA_GROUPS, Ana, AnaState, Backend, Buffers, Cluster, Config, ConfigError, Limits, Listener, MAX_NAMESPACES,
    Namespace, P2p, Performance, Subsystem, Transport,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listener: Vec<Spanned<RawListener>>,
    #[serde(default)]
    subsystem: Vec<Spanned<RawSubsystem>>,
    p2p: Option<RawP2p>,
    metrics: Option<RawMetrics>,
    limits: Option<RawLimits>,
    reservations: Option<RawReservations>,
    ana: Option<RawAna>,
    cluster: Option<Spanned<RawCluster>>,
    performance: Option<RawPerformance>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPerformance {
    poll: Option<Spanned<bool>>,
    cores: Option<Spanned<Vec<Spanned<i64>>>>,
    isolate_cores: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    etcd: Spanned<Vec<Spanned<String>>>,
    name: Spanned<String>,
    lease_ttl: Option<Spanned<toml::Value>>,
    standby: Option<Spanned<String>>,
    prefix: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAna {
    #[serde(default)]
    groups: std::collections::BTreeMap<String, Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReservations {
    state_dir: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    controllers_per_subsystem: Option<Spanned<i64>>,
    io_queues: Option<Spanned<i64>>,
    queue_size: Option<Spanned<i64>>,
    connections_per_listener: Option<Spanned<i64>>,
    r2t_data: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawP2p {
    #[serde(default)]
    allow_host_bridges: Vec<Spanned<String>>,
    #[serde(default)]
    provider: Vec<Spanned<RawProvider>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    pci: Spanned<String>,
    kind: Spanned<String>,
    bar: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Option<Spanned<String>>,
    transport: Spanned<String>,
    address: Spanned<String>,
    port: Option<Spanned<i64>>,
    inline_data_size: Option<Spanned<i64>>,
    srq_size: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubsystem {
    nqn: Spanned<String>,
    serial: Option<Spanned<String>>,
    model: Option<Spanned<String>>,
    #[serde(default)]
    allow_any_host: bool,
    #[serde(default)]
    hosts: Vec<Spanned<String>>,
    #[serde(default)]
    host: Vec<Spanned<RawHost>>,
    listeners: Option<Spanned<toml::Value>>,
    #[serde(default)]
    namespace: Vec<Spanned<RawNamespace>>,
    cntlid_min: Option<Spanned<i64>>,
    cntlid_max: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    nqn: Spanned<String>,
    dhchap_key: Option<Spanned<String>>,
    dhchap_ctrl_key: Option<Spanned<String>>,
    dhchap_dhgroup: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    nsid: Spanned<i64>,
    backend: Spanned<String>,
    size: Option<Spanned<toml::Value>>,
    path: Option<Spanned<String>>,
    pci: Option<Spanned<String>>,
    device_nsid: Option<Spanned<i64>>,
    dma: Option<Spanned<String>>,
    buffers: Option<Spanned<String>>,
    provider: Option<Spanned<String>>,
    uuid: Option<Spanned<String>>,
    nguid: Option<Spanned<String>>,
    eui64: Option<Spanned<String>>,
    ana_group: Option<Spanned<i64>>,
}

struct Ctx<'a> {
    src: &'a str,
    file: &'a str,
    /// What is accepted but worth telling the operator (a name not in the "nqn." form).
    warnings: std::cell::RefCell<Vec<ConfigError>>,
}

impl<'a> Ctx<'a> {
    fn new(src: &'a str, file: &'a str) -> Self {
        Ctx { src, file, warnings: Default::default() }
    }

    /// The file as TOML, before any of its values is checked.
    fn raw(&self) -> Result<RawConfig, ConfigError> {
        toml::from_str(self.src).map_err(|e| self.err(e.span().unwrap_or(0..0), e.message().trim().to_string()))
    }

    fn err(&self, span: Range<usize>, message: String) -> ConfigError {
        let before = &self.src[..span.start.min(self.src.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        ConfigError { file: self.file.to_string(), line, column, message }
    }
}

/// The `[p2p]` table of a file that may hold only that (what `topology --config` reads); a
/// file with listeners is checked whole, so its errors are not hidden.
pub(crate) fn parse_p2p(src: &str, file: &str) -> Result<P2p, ConfigError> {
    let cx = Ctx::new(src, file);
    let raw = cx.raw()?;
    if !raw.listener.is_empty() {
        return parse(src, file).map(|c| c.p2p);
    }
    raw.p2p.as_ref().map_or(Ok(P2p::default()), |r| p2p(&cx, r))
}

pub(crate) fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
    let cx = Ctx::new(src, file);
    let raw = cx.raw()?;
    if raw.listener.is_empty() {
        return Err(cx.err(0..0, "no [[listener]]: the target would serve nothing".into()));
    }
    let mut listeners = Vec::new();
    for (i, l) in raw.listener.iter().enumerate() {
        listeners.push(listener(&cx, i, l)?);
    }
    let mut subsystems = Vec::new();
    let mut nqns = HashSet::new();
    for (i, s) in raw.subsystem.iter().enumerate() {
        let sub = subsystem(&cx, i, s, &listeners)?;
        if !nqns.insert(sub.nqn.clone()) {
            return Err(cx.err(s.get_ref().nqn.span(), format!("subsystem[{i}].nqn: '{}' is defined twice", sub.nqn)));
        }
        subsystems.push(sub);
    }
    let p2p = match &raw.p2p {
        Some(r) => p2p(&cx, r)?,
        None => P2p::default(),
    };
    let metrics_listen = match &raw.metrics {
        Some(m) => Some(m.listen.get_ref().parse().map_err(|_| {
            cx.err(m.listen.span(), format!("metrics.listen: '{}' is not an address:port", m.listen.get_ref()))
        })?),
        None => None,
    };
    let limits = match &raw.limits {
        Some(r) => limits(&cx, r)?,
        None => Limits::default(),
    };
    let reservations_state_dir = match &raw.reservations {
        Some(r) if Path::new(r.state_dir.get_ref()).is_absolute() => Some(PathBuf::from(r.state_dir.get_ref())),
        Some(r) => {
            let why = format!("reservations.state_dir: '{}' is not an absolute path", r.state_dir.get_ref());
            return Err(cx.err(r.state_dir.span(), why));
        }
        None => None,
    };
    unique_namespace_ids(&cx, &raw, &subsystems)?;
    let ana = match &raw.ana {
        Some(r) => ana(&cx, r)?,
        None => Ana::default(),
    };
    let cluster = match &raw.cluster {
        Some(r) => Some(cluster(&cx, r)?),
        None => None,
    };
    if let (Some(_), Some(r)) = (&cluster, &raw.reservations) {
        let why = "reservations.state_dir: with [cluster] registrations and reservations are kept in etcd";
        return Err(cx.err(r.state_dir.span(), why.into()));
    }
    if let (Some(_), Some(a)) = (&cluster, raw.ana.as_ref().and_then(|a| a.groups.values().next())) {
        let why = "ana.groups: with [cluster] the cluster decides the groups' states (the owner optimized, the others cluster.standby)";
        return Err(cx.err(a.span(), why.into()));
    }
    let performance = match &raw.performance {
        Some(r) => performance(&cx, r)?,
        None => Performance::default(),
    };
    let warnings = cx.warnings.into_inner();
    Ok(Config {
        listeners,
        subsystems,
        p2p,
        metrics_listen,
        limits,
        reservations_state_dir,
        ana,
        cluster,
        performance,
        warnings,
    })
}

/// An integer key within `lo..=hi`, or `default` when absent.
fn ranged(cx: &Ctx, key: &str, v: Option<&Spanned<i64>>, lo: i64, hi: i64, default: i64) -> Result<i64, ConfigError> {
    match v {
        None => Ok(default),
        Some(v) if (lo..=hi).contains(v.get_ref()) => Ok(*v.get_ref()),
        Some(v) => Err(cx.err(v.span(), format!("{key}: {} is not from {lo} to {hi}", v.get_ref()))),
    }
}

/// Bytes as a number or a string like "16MiB".
fn bytes(v: &toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::Integer(i) => u64::try_from(*i).map_err(|_| format!("{i} is negative")),
        toml::Value::String(s) => crate::parse_size(s),
        _ => Err("expected a number of bytes or a string like \"1GiB\"".into()),
    }
}

fn performance(cx: &Ctx, r: &RawPerformance) -> Result<Performance, ConfigError> {
    let poll = r.poll.as_ref().is_some_and(|p| *p.get_ref());
    let mut cores = Vec::new();
    if let Some(list) = &r.cores {
        if !poll {
            return Err(cx.err(list.span(), "performance.cores: the CPUs of polling threads: needs poll = true".into()));
        }
        if list.get_ref().is_empty() {
            return Err(
                cx.err(list.span(), "performance.cores: empty (leave it out for one thread, not pinned)".into())
            );
        }
        for c in list.get_ref() {
            let cpu = ranged(cx, "performance.cores", Some(c), 0, 4095, 0)? as usize;
            if cores.contains(&cpu) {
                return Err(cx.err(c.span(), format!("performance.cores: CPU {cpu} is named twice")));
            }
            cores.push(cpu);
        }
    }
    let isolate_cores = match &r.isolate_cores {
        Some(i) if *i.get_ref() && cores.is_empty() => {
            return Err(cx.err(
                i.span(),
                "performance.isolate_cores: keeps the kernel's work off the pollers' CPUs: needs cores".into(),
            ));
        }
        Some(i) => *i.get_ref(),
        None => false,
    };
    Ok(Performance { poll, cores, isolate_cores })
}

fn limits(cx: &Ctx, r: &RawLimits) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let r2t_data = match &r.r2t_data {
        None => d.r2t_data,
        Some(v) => bytes(v.get_ref())
            .ok()
            .filter(|b| (128 << 10..=1 << 30).contains(b))
            .ok_or_else(|| cx.err(v.span(), "limits.r2t_data: not from 128KiB to 1GiB".into()))?,
    };
    Ok(Limits {
        // Controller IDs run to 0xffef; queues and their entries are memory per host.
        controllers_per_subsystem: ranged(
            cx,
            "limits.controllers_per_subsystem",
            r.controllers_per_subsystem.as_ref(),
            1,
            0xffef,
            d.controllers_per_subsystem.into(),
        )? as u16,
        io_queues: ranged(cx, "limits.io_queues", r.io_queues.as_ref(), 1, 1024, d.io_queues.into())? as u16,
        // The admin queue needs 32 entries (NVMe-oF 1.1, 3.2.1).
        queue_size: ranged(cx, "limits.queue_size", r.queue_size.as_ref(), 32, 1024, d.queue_size.into())? as u16,
        connections_per_listener: ranged(
            cx,
            "limits.connections_per_listener",
            r.connections_per_listener.as_ref(),
            2,
            65536,
            d.connections_per_listener.into(),
        )? as u32,
        r2t_data,
    })
}

/// `[ana] groups = { 1 = "optimized", ... }`: this head's state of each ANA group.
fn ana(cx: &Ctx, r: &RawAna) -> Result<Ana, ConfigError> {
    let mut groups = std::collections::BTreeMap::new();
    // toml keeps no span for a table key: the value's line names it.
    for (key, v) in &r.groups {
        let id = key.parse::<u32>().ok().filter(|id| (1..=ANA_GROUPS).contains(id)).ok_or_else(|| {
            cx.err(v.span(), format!("ana.groups: '{key}' is not an ANA group ID (1 to {ANA_GROUPS})"))
        })?;
        let state = AnaState::parse(v.get_ref()).ok_or_else(|| {
            let names: Vec<_> = AnaState::ALL.iter().map(|s| format!("\"{}\"", s.as_str())).collect();
            cx.err(
                v.span(),
                format!("ana.groups.{key}: unknown state '{}' (expected {})", v.get_ref(), names.join(", ")),
            )
        })?;
        groups.insert(id, state);
    }
    Ok(Ana { groups })
}

/// `[cluster]`: etcd endpoints, this head's name, the lease, what a non-owner reports.
fn cluster(cx: &Ctx, c: &Spanned<RawCluster>) -> Result<Cluster, ConfigError> {
    let r = c.get_ref();
    if r.etcd.get_ref().is_empty() {
        return Err(cx.err(r.etcd.span(), "cluster.etcd: no endpoint (e.g. [\"http://10.0.0.1:2379\"])".into()));
    }
    let mut etcd = Vec::new();
    for e in r.etcd.get_ref() {
        let url = e.get_ref();
        let ok = url.strip_prefix("http://").is_some_and(|hp| {
            hp.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && !h.contains('/') && p.parse::<u16>().is_ok())
        });
        if !ok {
            let why = format!("cluster.etcd: '{url}' is not http://HOST:PORT (TLS to etcd is not supported yet)");
            return Err(cx.err(e.span(), why));
        }
        etcd.push(url.clone());
    }
    let name = r.name.get_ref();
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 63 || !name.chars().all(valid) {
        let why = format!("cluster.name: '{name}' is not 1 to 63 letters, digits, '.', '_' or '-'");
        return Err(cx.err(r.name.span(), why));
    }
    let lease_ttl = match &r.lease_ttl {
        None => 5,
        Some(v) => {
            let secs = match v.get_ref() {
                toml::Value::Integer(i) => Some(*i),
                toml::Value::String(s) => s.strip_suffix('s').and_then(|n| n.trim().parse().ok()),
                _ => None,
            };
            secs.filter(|s| (2..=60).contains(s)).ok_or_else(|| {
                cx.err(v.span(), "cluster.lease_ttl: not whole seconds from 2 to 60 (e.g. \"5s\")".into())
            })? as u32
        }
    };
    let standby = match r.standby.as_ref() {
        None => AnaState::NonOptimized,
        Some(v) => match AnaState::parse(v.get_ref()) {
            Some(s @ (AnaState::NonOptimized | AnaState::Inaccessible)) => s,
            _ => {
                let why = format!(
                    "cluster.standby: '{}' is not \"non-optimized\" or \"inaccessible\" (what a head reports for a group another head owns)",
                    v.get_ref()
                );
                return Err(cx.err(v.span(), why));
            }
        },
    };
    let prefix = match r.prefix.as_ref() {
        None => "/p2pnvmf".to_string(),
        Some(v) if v.get_ref().starts_with('/') && !v.get_ref().ends_with('/') => v.get_ref().clone(),
        Some(v) => {
            let why = format!("cluster.prefix: '{}' does not start with '/' or ends with one", v.get_ref());
            return Err(cx.err(v.span(), why));
        }
    };
    Ok(Cluster { etcd, name: name.clone(), lease_ttl_secs: lease_ttl, standby, prefix })
}

fn p2p(cx: &Ctx, r: &RawP2p) -> Result<P2p, ConfigError> {
    let mut out = P2p::default();
    for (i, hb) in r.allow_host_bridges.iter().enumerate() {
        let ids = hb.get_ref().split_once(':').and_then(|(v, d)| {
            let hex = |x: &str| (x.len() == 4).then(|| u16::from_str_radix(x, 16).ok()).flatten();
            Some((hex(v)?, hex(d)?))
        });
        let ids = ids.ok_or_else(|| {
            cx.err(
                hb.span(),
                format!(
                    "p2p.allow_host_bridges[{i}]: '{}' is not vendor:device in hex (e.g. \"8086:2030\")",
                    hb.get_ref()
                ),
            )
        })?;
        out.allow_host_bridges.push(ids);
    }
    for (i, p) in r.provider.iter().enumerate() {
        let r = p.get_ref();
        let key = format!("p2p.provider[{i}]");
        let pci: PciAddr = r.pci.get_ref().parse().map_err(|e| cx.err(r.pci.span(), format!("{key}.pci: {e}")))?;
        let kind = match r.kind.get_ref().as_str() {
            "nvme-cmb" => Kind::NvmeCmb,
            "bar" => Kind::Bar,
            "p2pmem" => Kind::P2pmem,
            k => {
                return Err(cx.err(
                    r.kind.span(),
                    format!("{key}.kind: unknown kind '{k}' (expected \"nvme-cmb\", \"bar\" or \"p2pmem\")"),
                ));
            }
        };
        let bar = match (&r.bar, kind) {
            (None, Kind::Bar) => return Err(cx.err(p.span(), format!("{key}: kind \"bar\" needs bar = 0..5"))),
            (Some(b), Kind::Bar) => {
                Some(u8::try_from(*b.get_ref()).ok().filter(|n| *n <= 5).ok_or_else(|| {
                    cx.err(b.span(), format!("{key}.bar: {} is not a BAR index (0 to 5)", b.get_ref()))
                })?)
            }
            (Some(b), k) => {
                return Err(
                    cx.err(b.span(), format!("{key}.bar: only for kind \"bar\" (a {} names its own BAR)", k.as_str()))
                );
            }
            (None, _) => None,
        };
        let spec = Spec { pci, kind, bar };
        if out.providers.contains(&spec) {
            return Err(cx.err(p.span(), format!("{key}: {} {} is listed twice", kind.as_str(), pci)));
        }
        out.providers.push(spec);
    }
    Ok(out)
}

fn listener(cx: &Ctx, i: usize, l: &Spanned<RawListener>) -> Result<Listener, ConfigError> {
    let r = l.get_ref();
    let transport = match r.transport.get_ref().as_str() {
        "tcp" => Transport::Tcp,
        "rdma" => Transport::Rdma,
        t => {
            return Err(cx.err(
                r.transport.span(),
                format!("listener[{i}].transport: unknown transport '{t}' (expected \"tcp\" or \"rdma\")"),
            ));
        }
    };
    let address = r.address.get_ref().parse().map_err(|_| {
        cx.err(r.address.span(), format!("listener[{i}].address: '{}' is not an IP address", r.address.get_ref()))
    })?;
    let port = match &r.port {
        None => 4420,
        Some(p) => u16::try_from(*p.get_ref())
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| cx.err(p.span(), format!("listener[{i}].port: {} is not a TCP port", p.get_ref())))?,
    };
    let name = r.name.as_ref().map_or_else(|| format!("listener{i}"), |n| n.get_ref().clone());
    if transport == Transport::Tcp {
        let span = r.inline_data_size.as_ref().map(|v| (v.span(), "inline_data_size"));
        if let Some((span, key)) = span.or_else(|| r.srq_size.as_ref().map(|v| (v.span(), "srq_size"))) {
            return Err(cx.err(span, format!("listener[{i}].{key}: applies to rdma listeners only")));
        }
    }
    let inline_data_size = match &r.inline_data_size {
        None => crate::DEFAULT_INLINE_DATA,
        Some(v) => u32::try_from(*v.get_ref())
            .ok()
            .filter(|n| *n <= crate::MAX_INLINE_DATA && n % 16 == 0)
            .ok_or_else(|| {
                cx.err(
                    v.span(),
                    format!(
                        "listener[{i}].inline_data_size: {} must be a multiple of 16 from 0 to {}",
                        v.get_ref(),
                        crate::MAX_INLINE_DATA
                    ),
                )
            })?,
    };
    let srq_size = match &r.srq_size {
        None => None,
        Some(v) => Some(ranged(cx, &format!("listener[{i}].srq_size"), Some(v), 16, 16384, 0)? as u32),
    };
    Ok(Listener { name, transport, address, port, inline_data_size, srq_size })
}

fn ascii_field(cx: &Ctx, key: &str, v: &Spanned<String>, max: usize) -> Result<String, ConfigError> {
    let s = v.get_ref();
    if s.is_empty() || s.len() > max || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(cx.err(v.span(), format!("{key}: '{s}' must be 1 to {max} printable ASCII characters")));
    }
    Ok(s.clone())
}

/// Longest NQN (NVMe Base 2.0, 4.5): the Connect data and discovery log fields hold 256
/// bytes, NUL-terminated; Linux (host and target) cut names at this length.
pub const NQN_MAX: usize = 223;

/// A subsystem or host NQN. Accepted as Linux's nvmet accepts it (any name of 1 to 223 bytes:
/// existing set-ups such as blktests' `blktests-subsystem-1` keep their names); refused where
/// it would not survive the wire (too long, a NUL — TOML strings are UTF-8 already). A name
/// not in the "nqn." form NVMe Base 4.5 defines is served with a warning.
fn nqn_field(cx: &Ctx, key: &str, v: &Spanned<String>) -> Result<String, ConfigError> {
    let s = v.get_ref();
    if s.is_empty() || s.len() > NQN_MAX || s.contains('\0') {
        return Err(cx.err(
            v.span(),
            format!("{key}: '{}' is not a usable NQN (1 to {NQN_MAX} bytes of UTF-8, no NUL)", s.escape_debug()),
        ));
    }
    if !s.starts_with("nqn.") {
        cx.warnings.borrow_mut().push(cx.err(
            v.span(),
            format!(
                "{key}: '{s}' is not in the NQN form (\"nqn.yyyy-mm.reverse.domain:name\", NVMe Base 4.5); \
                 served as given, as Linux's nvmet serves it"
            ),
        ));
    }
    Ok(s.clone())
}

/// A `bytes`-long identifier in hex: `uuid` in its 8-4-4-4-12 form, `nguid` and `eui64` as hex
/// digits with optional `-` or `:` between bytes (as nvmet's configfs and nvme-cli print them).
fn hex_id<const N: usize>(cx: &Ctx, key: &str, v: &Spanned<String>, form: &str) -> Result<[u8; N], ConfigError> {
    let s = v.get_ref();
    let digits: Vec<u8> = s.bytes().filter(|b| *b != b'-' && *b != b':').collect();
    let bad = || cx.err(v.span(), format!("{key}: '{s}' is not {N} bytes in hex ({form})"));
    if digits.len() != 2 * N || s.starts_with(['-', ':']) || s.ends_with(['-', ':']) {
        return Err(bad());
    }
    let mut id = [0u8; N];
    for (i, pair) in digits.chunks(2).enumerate() {
        id[i] = std::str::from_utf8(pair).ok().and_then(|p| u8::from_str_radix(p, 16).ok()).ok_or_else(bad)?;
    }
    Ok(id)
}

/// Two namespaces with one identifier would be one volume to a host (which refuses the
/// second: "duplicate IDs"); zero means "not reported" and may repeat.
fn unique_namespace_ids(cx: &Ctx, raw: &RawConfig, subsystems: &[Subsystem]) -> Result<(), ConfigError> {
    let mut seen: std::collections::HashMap<(&str, Vec<u8>), String> = Default::default();
    for (i, s) in subsystems.iter().enumerate() {
        for (j, n) in s.namespaces.iter().enumerate() {
            let ids =
                [("uuid", n.uuid.map(Vec::from)), ("nguid", n.nguid.map(Vec::from)), ("eui64", n.eui64.map(Vec::from))];
            for (field, id) in ids {
                let Some(id) = id.filter(|id| id.iter().any(|&b| b != 0)) else { continue };
                let key = format!("subsystem[{i}].namespace[{j}].{field}");
                if let Some(first) = seen.insert((field, id), key.clone()) {
                    // The span of this namespace's key, for the line.
                    let r = raw.subsystem[i]
                        .get_ref()
                        .namespace
                        .iter()
                        .find(|r| *r.get_ref().nsid.get_ref() == i64::from(n.nsid));
                    let span = r.and_then(|r| match field {
                        "uuid" => r.get_ref().uuid.as_ref(),
                        "nguid" => r.get_ref().nguid.as_ref(),
                        _ => r.get_ref().eui64.as_ref(),
                    });
                    return Err(cx.err(span.map_or(0..0, |v| v.span()), format!("{key}: the same {field} as {first}")));
                }
            }
        }
    }
    Ok(())
}

fn subsystem(cx: &Ctx, i: usize, s: &Spanned<RawSubsystem>, listeners: &[Listener]) -> Result<Subsystem, ConfigError> {
    let r = s.get_ref();
    let key = format!("subsystem[{i}]");
    let nqn = nqn_field(cx, &format!("{key}.nqn"), &r.nqn)?;
    if nqn == "nqn.2014-08.org.nvmexpress.discovery" {
        return Err(cx.err(r.nqn.span(), format!("{key}.nqn: the discovery NQN is reserved")));
    }
    let serial = match &r.serial {
        Some(v) => ascii_field(cx, &format!("{key}.serial"), v, 20)?,
        None => format!("P2PNVMF{:04}", i + 1),
    };
    let model = match &r.model {
        Some(v) => ascii_field(cx, &format!("{key}.model"), v, 40)?,
        None => "p2pnvmf".into(),
    };
    let hosts = hosts(cx, &key, r)?;
    if !r.allow_any_host && hosts.is_empty() {
        return Err(cx.err(
            s.span(),
            format!("{key}: no host may connect to {nqn}: set allow_any_host = true or list hosts = [...]"),
        ));
    }
    let listeners = match &r.listeners {
        None => None,
        Some(v) => Some(listener_refs(cx, &format!("{key}.listeners"), v, listeners)?).filter(|l| !l.is_empty()),
    };
    let mut namespaces = Vec::new();
    for (j, n) in r.namespace.iter().enumerate() {
        let ns = namespace(cx, &format!("{key}.namespace[{j}]"), n)?;
        if namespaces.iter().any(|m: &Namespace| m.nsid == ns.nsid) {
            return Err(
                cx.err(n.get_ref().nsid.span(), format!("{key}.namespace[{j}].nsid: {} is used twice", ns.nsid))
            );
        }
        namespaces.push(ns);
    }
    namespaces.sort_by_key(|n| n.nsid);
    if namespaces.len() > MAX_NAMESPACES {
        let why = format!("{key}: {} namespaces, more than the {MAX_NAMESPACES} a subsystem holds", namespaces.len());
        return Err(cx.err(s.span(), why));
    }
    // As Linux's nvmet attr_cntlid_min/max: heads serving one subsystem give disjoint ranges.
    let cntlid_min = ranged(cx, &format!("{key}.cntlid_min"), r.cntlid_min.as_ref(), 1, 0xffef, 1)? as u16;
    let cntlid_max = ranged(cx, &format!("{key}.cntlid_max"), r.cntlid_max.as_ref(), 1, 0xffef, 0xffef)? as u16;
    if cntlid_min > cntlid_max {
        let at = r.cntlid_max.as_ref().or(r.cntlid_min.as_ref()).map_or(s.span(), |v| v.span());
        return Err(cx.err(at, format!("{key}: cntlid_min {cntlid_min} is above cntlid_max {cntlid_max}")));
    }
    Ok(Subsystem {
        nqn,
        serial,
        model,
        allow_any_host: r.allow_any_host,
        hosts,
        listeners,
        namespaces,
        cntlid_min,
        cntlid_max,
    })
}

/// `hosts = [...]` (no secrets) and `[[subsystem.host]]` tables, each host once.
fn hosts(cx: &Ctx, key: &str, r: &RawSubsystem) -> Result<Vec<Host>, ConfigError> {
    let mut hosts: Vec<Host> = Vec::new();
    let mut add = |h: Host, span: Range<usize>, what: String| {
        if hosts.iter().any(|o| o.nqn == h.nqn) {
            return Err(cx.err(span, format!("{what}: host {} is listed twice", h.nqn)));
        }
        hosts.push(h);
        Ok(())
    };
    for (j, h) in r.hosts.iter().enumerate() {
        let what = format!("{key}.hosts[{j}]");
        add(Host::open(&nqn_field(cx, &what, h)?), h.span(), what)?;
    }
    for (j, t) in r.host.iter().enumerate() {
        let (what, h) = (format!("{key}.host[{j}]"), t.get_ref());
        let secret = |field: &str, v: &Option<Spanned<String>>| {
            v.as_ref()
                .map(|v| Secret::parse(v.get_ref()).map_err(|e| cx.err(v.span(), format!("{what}.{field}: {e}"))))
                .transpose()
        };
        let (dhchap_key, ctrl_key) =
            (secret("dhchap_key", &h.dhchap_key)?, secret("dhchap_ctrl_key", &h.dhchap_ctrl_key)?);
        if ctrl_key.is_some() && dhchap_key.is_none() {
            return Err(cx.err(
                t.span(),
                format!("{what}: dhchap_ctrl_key needs dhchap_key (the controller proves itself only to a host that authenticated)"),
            ));
        }
        if r.allow_any_host && dhchap_key.is_some() {
            return Err(cx.err(
                t.span(),
                format!("{what}: allow_any_host = true lets every host in without authentication; remove it to require dhchap_key"),
            ));
        }
        let dhgroup = match &h.dhchap_dhgroup {
            None => DHGROUP_NULL,
            Some(_) if dhchap_key.is_none() => {
                return Err(cx.err(t.span(), format!("{what}: dhchap_dhgroup needs dhchap_key")));
            }
            Some(v) if v.get_ref() == "null" => DHGROUP_NULL,
            Some(v) => dhchap::dhgroup_id(v.get_ref()).ok_or_else(|| {
                cx.err(
                    v.span(),
                    format!("{what}.dhchap_dhgroup: '{}' is not null, ffdhe2048, ffdhe3072, ffdhe4096, ffdhe6144 or ffdhe8192", v.get_ref()),
                )
            })?,
        };
        let host = Host { nqn: nqn_field(cx, &format!("{what}.nqn"), &h.nqn)?, key: dhchap_key, ctrl_key, dhgroup };
        add(host, t.span(), what)?;
    }
    Ok(hosts)
}

/// `listeners = "all"` or a list of listener names; `Some(vec![])` never escapes (means all).
fn listener_refs(cx: &Ctx, key: &str, v: &Spanned<toml::Value>, all: &[Listener]) -> Result<Vec<String>, ConfigError> {
    match v.get_ref() {
        toml::Value::String(s) if s == "all" => Ok(Vec::new()),
        toml::Value::Array(items) => items
            .iter()
            .map(|item| match item.as_str() {
                Some(n) if all.iter().any(|l| l.name == n) => Ok(n.to_string()),
                Some(n) => Err(cx.err(v.span(), format!("{key}: no listener named '{n}'"))),
                None => Err(cx.err(v.span(), format!("{key}: expected listener names (strings)"))),
            })
            .collect(),
        _ => Err(cx.err(v.span(), format!("{key}: expected \"all\" or a list of listener names"))),
    }
}

fn namespace(cx: &Ctx, key: &str, n: &Spanned<RawNamespace>) -> Result<Namespace, ConfigError> {
    let r = n.get_ref();
    let nsid = u32::try_from(*r.nsid.get_ref()).ok().filter(|&id| id != 0 && id != u32::MAX).ok_or_else(|| {
        cx.err(r.nsid.span(), format!("{key}.nsid: {} is not a valid NSID (1 to 4294967294)", r.nsid.get_ref()))
    })?;
    let size = match &r.size {
        None => None,
        Some(v) => {
            let bytes = bytes(v.get_ref()).map_err(|m| cx.err(v.span(), format!("{key}.size: {m}")))?;
            if bytes == 0 || bytes % 512 != 0 {
                return Err(cx.err(v.span(), format!("{key}.size: {bytes} is not a positive multiple of 512 bytes")));
            }
            Some((bytes, v.span()))
        }
    };
    let backend_name = r.backend.get_ref().as_str();
    if backend_name != "nvme-vfio" {
        if let Some(p) = &r.pci {
            return Err(cx.err(p.span(), format!("{key}.pci: only the \"nvme-vfio\" backend takes a PCI address")));
        }
        if let Some(d) = &r.device_nsid {
            return Err(cx.err(d.span(), format!("{key}.device_nsid: only the \"nvme-vfio\" backend takes it")));
        }
        if let Some(d) = &r.dma {
            return Err(cx.err(d.span(), format!("{key}.dma: only the \"nvme-vfio\" backend takes it")));
        }
    }
    let backend = match backend_name {
        "ram" => {
            let (size, _) = size.ok_or_else(|| cx.err(n.span(), format!("{key}: backend \"ram\" needs size")))?;
            if let Some(p) = &r.path {
                return Err(cx.err(p.span(), format!("{key}.path: backend \"ram\" takes no path")));
            }
            Backend::Ram { size }
        }
        "file" => {
            let path =
                r.path.as_ref().ok_or_else(|| cx.err(n.span(), format!("{key}: backend \"file\" needs path")))?;
            Backend::File { path: path.get_ref().into(), size: size.map(|(s, _)| s) }
        }
        "nvme-vfio" => {
            let pci =
                r.pci.as_ref().ok_or_else(|| cx.err(n.span(), format!("{key}: backend \"nvme-vfio\" needs pci")))?;
            let pci_addr = pci.get_ref().parse().map_err(|e| cx.err(pci.span(), format!("{key}.pci: {e}")))?;
            if let Some(p) = &r.path {
                return Err(cx.err(p.span(), format!("{key}.path: backend \"nvme-vfio\" takes pci, not path")));
            }
            if let Some((_, span)) = size {
                return Err(
                    cx.err(span, format!("{key}.size: backend \"nvme-vfio\" serves the SSD namespace's own size"))
                );
            }
            let device_nsid = match &r.device_nsid {
                None => 1,
                Some(d) => {
                    u32::try_from(*d.get_ref()).ok().filter(|&id| id != 0 && id != u32::MAX).ok_or_else(|| {
                        cx.err(
                            d.span(),
                            format!("{key}.device_nsid: {} is not a valid NSID (1 to 4294967294)", d.get_ref()),
                        )
                    })?
                }
            };
            let dma = match r.dma.as_ref().map(|d| (d.get_ref().as_str(), d.span())) {
                None | Some(("iommu", _)) => crate::Addressing::Iommu,
                Some(("physical", _)) => crate::Addressing::Physical,
                Some((other, span)) => {
                    return Err(cx.err(
                        span,
                        format!("{key}.dma: unknown addressing '{other}' (expected \"iommu\" or \"physical\")"),
                    ));
                }
            };
            Backend::NvmeVfio { pci: pci_addr, device_nsid, dma }
        }
        b => {
            return Err(cx.err(
                r.backend.span(),
                format!("{key}.backend: unknown backend '{b}' (expected \"ram\", \"file\" or \"nvme-vfio\")"),
            ));
        }
    };
    let buffers = match r.buffers.as_ref().map(|b| (b.get_ref().as_str(), b.span())) {
        None | Some(("auto", _)) => Buffers::Auto,
        Some(("host", _)) => Buffers::Host,
        Some(("p2p", _)) => Buffers::P2p,
        Some((b, span)) => {
            return Err(
                cx.err(span, format!("{key}.buffers: unknown value '{b}' (expected \"auto\", \"host\" or \"p2p\")"))
            );
        }
    };
    let provider = match &r.provider {
        None => None,
        Some(_) if buffers == Buffers::Host => {
            let p = r.provider.as_ref().expect("matched");
            return Err(cx.err(p.span(), format!("{key}.provider: buffers = \"host\" takes no p2p provider")));
        }
        Some(p) => Some(p.get_ref().parse().map_err(|e| cx.err(p.span(), format!("{key}.provider: {e}")))?),
    };
    let uuid = r
        .uuid
        .as_ref()
        .map(|v| hex_id(cx, &format!("{key}.uuid"), v, "e.g. \"91fdba0d-f87b-4c25-b80f-db7be1418b9e\""))
        .transpose()?;
    let nguid = r.nguid.as_ref().map(|v| hex_id(cx, &format!("{key}.nguid"), v, "32 hex digits")).transpose()?;
    let eui64 = r.eui64.as_ref().map(|v| hex_id(cx, &format!("{key}.eui64"), v, "16 hex digits")).transpose()?;
    let ana_group = ranged(cx, &format!("{key}.ana_group"), r.ana_group.as_ref(), 1, ANA_GROUPS.into(), 1)? as u32;
    Ok(Namespace { nsid, backend, buffers, provider, uuid, nguid, eui64, ana_group })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LISTENER: &str = "[[listener]]\nname = \"t\"\ntransport = \"tcp\"\naddress = \"127.0.0.1\"\n";

    fn err(src: &str) -> ConfigError {
        parse(src, "t.toml").unwrap_err()
    }

    #[test]
    fn default_is_valid() {
        let c = Config::default_config();
        assert_eq!(c.listeners[0].port, 4420);
        assert_eq!(c.subsystems[0].nqn, "nqn.2026-11.io.p2pnvmf:default");
        assert_eq!(c.subsystems[0].namespaces[0].backend, Backend::Ram { size: 1 << 30 });
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = err(&format!("{LISTENER}colour = \"blue\"\n"));
        assert_eq!((e.file.as_str(), e.line), ("t.toml", 5));
        assert!(e.message.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn semantic_errors_name_key_and_line() {
        let src = format!(
            "{LISTENER}\n[[subsystem]]\nnqn = \"nqn.2026-11.io.x:a\"\nallow_any_host = true\n\n[[subsystem.namespace]]\nnsid = 1\nbackend = \"ram\"\nsize = \"3MB\"\n"
        );
        let e = err(&src);
        assert_eq!(e.line, 13, "{e}");
        assert!(e.message.starts_with("subsystem[0].namespace[0].size: unknown size unit"), "{e}");
    }

    #[test]
    fn limits_default_parse_and_refuse_out_of_range_values_by_line() {
        assert_eq!(parse(LISTENER, "t").unwrap().limits, Limits::default());
        let c = parse(
            &format!(
                "{LISTENER}[limits]\ncontrollers_per_subsystem = 2\nio_queues = 4\nqueue_size = 64\n\
                 connections_per_listener = 16\nr2t_data = \"1MiB\"\n"
            ),
            "t",
        )
        .unwrap();
        assert_eq!(
            c.limits,
            Limits {
                controllers_per_subsystem: 2,
                io_queues: 4,
                queue_size: 64,
                connections_per_listener: 16,
                r2t_data: 1 << 20
            }
        );
        for (body, want) in [
            ("queue_size = 16", "limits.queue_size: 16 is not from 32 to 1024"),
            ("io_queues = 0", "limits.io_queues: 0 is not from 1 to 1024"),
            ("controllers_per_subsystem = 70000", "limits.controllers_per_subsystem: 70000 is not from 1 to 65519"),
            ("r2t_data = \"4KiB\"", "limits.r2t_data: not from 128KiB to 1GiB"),
            ("queues = 4", "unknown field `queues`"),
        ] {
            let e = err(&format!("{LISTENER}[limits]\n{body}\n"));
            assert!(e.message.contains(want), "{body}: {e}");
            assert_eq!(e.line, LISTENER.lines().count() + 2, "{body}: {e}");
        }
    }

    #[test]
    fn names_nvmet_accepts_are_served_with_a_warning_once_and_wire_breakers_refused() {
        let sub = |nqn: &str, host: &str| format!("{LISTENER}[[subsystem]]\nnqn = \"{nqn}\"\nhosts = [\"{host}\"]\n");
        // blktests' names: no "nqn." prefix, as Linux's nvmet takes them.
        let c = parse(&sub("blktests-subsystem-1", "nqn.2014-08.org.nvmexpress:uuid:0f01fb42"), "t.toml").unwrap();
        assert_eq!(c.subsystems[0].nqn, "blktests-subsystem-1");
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        let w = &c.warnings[0];
        assert_eq!((w.file.as_str(), w.line), ("t.toml", 6), "{w}");
        assert!(w.message.starts_with("subsystem[0].nqn: 'blktests-subsystem-1' is not in the NQN form"), "{w}");
        let c = parse(&sub("nqn.2026-12.io.x:a", "hostnqn"), "t").unwrap();
        assert!(
            c.warnings[0].message.starts_with("subsystem[0].hosts[0]: 'hostnqn' is not in the NQN form"),
            "{:?}",
            c.warnings
        );
        assert!(parse(&sub("nqn.2026-12.io.x:a", "nqn.h"), "t").unwrap().warnings.is_empty());
        // 223 bytes is the longest NQN; 224 would be cut by the host and the kernel target.
        let longest = format!("nqn.{}", "a".repeat(219));
        assert_eq!(parse(&sub(&longest, "nqn.h"), "t").unwrap().subsystems[0].nqn.len(), 223);
        let e = err(&sub(&format!("{longest}b"), "nqn.h"));
        assert!(e.message.contains("is not a usable NQN (1 to 223 bytes of UTF-8, no NUL)"), "{e}");
        let e = err(&sub("nqn.a\\u0000b", "nqn.h"));
        assert!(e.message.contains("'nqn.a\\0b' is not a usable NQN"), "{e}");
        let e = err(&sub("nqn.x", "a\\u0000"));
        assert!(e.message.starts_with("subsystem[0].hosts[0]:"), "{e}");
        // A name that is not UTF-8 cannot even be read: the file is refused with its path.
        let mut bytes = sub("nqn.x", "nqn.h").into_bytes();
        let at = bytes.windows(5).position(|w| w == b"nqn.x").unwrap();
        bytes[at + 4] = 0xff;
        let path = std::env::temp_dir().join(format!("p2pnvmf-not-utf8-{}.toml", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        let _ = std::fs::remove_file(&path);
        assert!(e.starts_with(&format!("{}: stream did not contain valid UTF-8", path.display())), "{e}");
        let e = err(&sub("nqn.2014-08.org.nvmexpress.discovery", "nqn.h"));
        assert!(e.message.contains("the discovery NQN is reserved"), "{e}");
    }

    #[test]
    fn namespace_identifiers_parse_in_the_forms_tools_print_and_stay_unique() {
        let ns = |nsid: u32, body: &str| {
            format!("[[subsystem.namespace]]\nnsid = {nsid}\nbackend = \"ram\"\nsize = 4096\n{body}")
        };
        let sub = |nss: &str| format!("{LISTENER}[[subsystem]]\nnqn = \"nqn.x\"\nallow_any_host = true\n{nss}");
        let c = parse(
            &sub(&ns(
                1,
                "uuid = \"91fdba0d-f87b-4c25-b80f-db7be1418b9e\"\nnguid = \"91FDBA0D-F87B-4C25-B80F-DB7BE1418B9E\"\n\
                 eui64 = \"00:11:22:33:44:55:66:77\"\n",
            )),
            "t",
        )
        .unwrap();
        let n = &c.subsystems[0].namespaces[0];
        let id = [0x91, 0xfd, 0xba, 0x0d, 0xf8, 0x7b, 0x4c, 0x25, 0xb8, 0x0f, 0xdb, 0x7b, 0xe1, 0x41, 0x8b, 0x9e];
        assert_eq!((n.uuid, n.nguid), (Some(id), Some(id)));
        assert_eq!(n.eui64, Some([0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]));
        let c = parse(&sub(&ns(1, "eui64 = \"0011223344556677\"\n")), "t").unwrap();
        assert_eq!(
            (c.subsystems[0].namespaces[0].eui64, c.subsystems[0].namespaces[0].uuid),
            (Some([0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]), None)
        );
        for (body, want) in [
            ("uuid = \"91fdba0d\"", "subsystem[0].namespace[0].uuid: '91fdba0d' is not 16 bytes in hex"),
            ("nguid = \"zz\"", "subsystem[0].namespace[0].nguid: 'zz' is not 16 bytes in hex (32 hex digits)"),
            ("eui64 = \"-0011223344556677\"", "eui64: '-0011223344556677' is not 8 bytes in hex"),
            ("eui64 = \"001122334455667g\"", "is not 8 bytes in hex"),
        ] {
            let e = err(&sub(&ns(1, &format!("{body}\n"))));
            assert!(e.message.contains(want), "{body}: {e}");
            assert_eq!(e.line, 12, "{body}: {e}");
        }
        // A duplicate is refused at the second one's line; zero ("not reported") may repeat.
        let two = |a: &str, b: &str| sub(&format!("{}{}", ns(1, a), ns(2, b)));
        let e = err(&two(
            "nguid = \"00112233445566778899aabbccddeeff\"\n",
            "nguid = \"00112233-4455-6677-8899-aabbccddeeff\"\n",
        ));
        assert!(
            e.message.contains("subsystem[0].namespace[1].nguid: the same nguid as subsystem[0].namespace[0].nguid"),
            "{e}"
        );
        assert_eq!(e.line, 17, "{e}");
        let zero = "nguid = \"00000000-0000-0000-0000-000000000000\"\n";
        assert!(parse(&two(zero, zero), "t").is_ok());
    }

    #[test]
    fn nvme_vfio_namespaces_and_pinned_providers() {
        let ns = |body: &str| {
            format!(
                "{LISTENER}\n[[subsystem]]\nnqn = \"nqn.x\"\nallow_any_host = true\n[[subsystem.namespace]]\nnsid = 1\n{body}"
            )
        };
        let c = parse(
            &ns("backend = \"nvme-vfio\"\npci = \"0000:05:00.0\"\ndevice_nsid = 2\nprovider = \"0000:03:00.0\"\n"),
            "t",
        )
        .unwrap();
        let n = &c.subsystems[0].namespaces[0];
        assert_eq!(
            n.backend,
            Backend::NvmeVfio { pci: "0000:05:00.0".parse().unwrap(), device_nsid: 2, dma: crate::Addressing::Iommu }
        );
        assert_eq!(n.provider, Some("0000:03:00.0".parse().unwrap()));
        let c = parse(&ns("backend = \"nvme-vfio\"\npci = \"0000:05:00.0\"\n"), "t").unwrap();
        assert_eq!(
            c.subsystems[0].namespaces[0].backend,
            Backend::NvmeVfio { pci: "0000:05:00.0".parse().unwrap(), device_nsid: 1, dma: crate::Addressing::Iommu }
        );
        let c = parse(&ns("backend = \"nvme-vfio\"\npci = \"0000:05:00.0\"\ndma = \"physical\"\n"), "t").unwrap();
        assert_eq!(
            c.subsystems[0].namespaces[0].backend,
            Backend::NvmeVfio {
                pci: "0000:05:00.0".parse().unwrap(),
                device_nsid: 1,
                dma: crate::Addressing::Physical
            }
        );
        for (body, want) in [
            ("backend = \"nvme-vfio\"\n", "backend \"nvme-vfio\" needs pci"),
            ("backend = \"nvme-vfio\"\npci = \"5:00\"\n", "subsystem[0].namespace[0].pci:"),
            ("backend = \"nvme-vfio\"\npci = \"0000:05:00.0\"\nsize = 4096\n", "serves the SSD namespace's own size"),
            (
                "backend = \"nvme-vfio\"\npci = \"0000:05:00.0\"\ndevice_nsid = 0\n",
                "device_nsid: 0 is not a valid NSID",
            ),
            ("backend = \"ram\"\nsize = 4096\ndevice_nsid = 1\n", "only the \"nvme-vfio\" backend takes it"),
            ("backend = \"ram\"\nsize = 4096\ndma = \"physical\"\n", "dma: only the \"nvme-vfio\" backend takes it"),
            (
                "backend = \"nvme-vfio\"\npci = \"0000:05:00.0\"\ndma = \"phys\"\n",
                "dma: unknown addressing 'phys' (expected \"iommu\" or \"physical\")",
            ),
            (
                "backend = \"ram\"\nsize = 4096\nbuffers = \"host\"\nprovider = \"0000:03:00.0\"\n",
                "buffers = \"host\" takes no p2p provider",
            ),
            ("backend = \"ram\"\nsize = 4096\nprovider = \"zz\"\n", "subsystem[0].namespace[0].provider:"),
        ] {
            let e = err(&ns(body));
            assert!(e.message.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn not_yet_implemented_is_refused_not_ignored() {
        let e = err("[[listener]]\ntransport = \"iwarp\"\naddress = \"10.0.0.1\"\n");
        assert!(e.message.contains("unknown transport 'iwarp'"), "{e}");
    }

    #[test]
    fn ana_groups_states_and_controller_id_ranges() {
        let sub = "[[subsystem]]\nnqn = \"nqn.a\"\nallow_any_host = true\ncntlid_min = 100\ncntlid_max = 199\n\
                   [[subsystem.namespace]]\nnsid = 1\nbackend = \"ram\"\nsize = 4096\nana_group = 2\n";
        let ana = "[ana]\ngroups = { 1 = \"inaccessible\", 2 = \"non-optimized\" }\n";
        let c = parse(&format!("{LISTENER}{sub}{ana}"), "t").unwrap();
        assert_eq!((c.subsystems[0].cntlid_min, c.subsystems[0].cntlid_max), (100, 199));
        assert_eq!(c.subsystems[0].namespaces[0].ana_group, 2);
        let want = [(1, AnaState::Inaccessible), (2, AnaState::NonOptimized)];
        assert_eq!(c.ana.groups, want.into_iter().collect());
        let d = parse(&format!("{LISTENER}[[subsystem]]\nnqn = \"nqn.a\"\nallow_any_host = true\n"), "t").unwrap();
        assert_eq!((d.subsystems[0].cntlid_min, d.subsystems[0].cntlid_max, &d.ana), (1, 0xffef, &Ana::default()));
        for (bad, line, msg) in [
            ("[ana]\ngroups = { 0 = \"optimized\" }\n", 6, "ana.groups: '0' is not an ANA group ID (1 to 128)"),
            ("[ana]\ngroups = { x = \"optimized\" }\n", 6, "ana.groups: 'x' is not an ANA group ID"),
            (
                "[ana]\ngroups = { 1 = \"active\" }\n",
                6,
                "ana.groups.1: unknown state 'active' (expected \"optimized\", \"non-optimized\"",
            ),
            ("[ana]\nstate = 1\n", 6, "unknown field `state`"),
        ] {
            let e = err(&format!("{LISTENER}{bad}"));
            assert!(e.message.contains(msg) && e.line == line, "{bad}: {e}");
        }
        for (bad, msg) in [
            ("cntlid_min = 0\n", "subsystem[0].cntlid_min: 0 is not from 1 to 65519"),
            ("cntlid_max = 65520\n", "subsystem[0].cntlid_max: 65520 is not from 1 to 65519"),
            ("cntlid_min = 10\ncntlid_max = 9\n", "subsystem[0]: cntlid_min 10 is above cntlid_max 9"),
            (
                "[[subsystem.namespace]]\nnsid = 1\nbackend = \"ram\"\nsize = 4096\nana_group = 129\n",
                "subsystem[0].namespace[0].ana_group: 129 is not from 1 to 128",
            ),
        ] {
            let e = err(&format!("{LISTENER}[[subsystem]]\nnqn = \"nqn.a\"\nallow_any_host = true\n{bad}"));
            assert!(e.message.contains(msg), "{bad}: {e}");
        }
    }

    #[test]
    fn cluster_section() {
        let c = parse(
            &format!(
                "{LISTENER}[cluster]\netcd = [\"http://10.0.0.1:2379\", \"http://etcd2:2379\"]\nname = \"head-a\"\n"
            ),
            "t",
        )
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!(c.etcd, ["http://10.0.0.1:2379", "http://etcd2:2379"]);
        assert_eq!(
            (c.name.as_str(), c.lease_ttl_secs, c.standby, c.prefix.as_str()),
            ("head-a", 5, AnaState::NonOptimized, "/p2pnvmf")
        );
        let c = parse(
            &format!("{LISTENER}[cluster]\netcd = [\"http://e:1\"]\nname = \"b\"\nlease_ttl = \"3s\"\nstandby = \"inaccessible\"\nprefix = \"/x/y\"\n"),
            "t",
        )
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!((c.lease_ttl_secs, c.standby, c.prefix.as_str()), (3, AnaState::Inaccessible, "/x/y"));
        let base = "[cluster]\netcd = [\"http://e:1\"]\nname = \"b\"\n";
        for (bad, msg) in [
            ("[cluster]\netcd = []\nname = \"b\"\n", "cluster.etcd: no endpoint"),
            (
                "[cluster]\netcd = [\"https://e:1\"]\nname = \"b\"\n",
                "cluster.etcd: 'https://e:1' is not http://HOST:PORT",
            ),
            ("[cluster]\netcd = [\"http://e\"]\nname = \"b\"\n", "is not http://HOST:PORT"),
            ("[cluster]\netcd = [\"http://e:1\"]\nname = \"a b\"\n", "cluster.name: 'a b' is not"),
            (&format!("{base}lease_ttl = \"1s\"\n"), "cluster.lease_ttl: not whole seconds from 2 to 60"),
            (&format!("{base}lease_ttl = \"5m\"\n"), "cluster.lease_ttl"),
            (&format!("{base}standby = \"optimized\"\n"), "cluster.standby: 'optimized' is not"),
            (&format!("{base}prefix = \"p2pnvmf\"\n"), "cluster.prefix: 'p2pnvmf' does not start with '/'"),
            (
                &format!("{base}[ana]\ngroups = {{ 1 = \"optimized\" }}\n"),
                "ana.groups: with [cluster] the cluster decides",
            ),
            (&format!("{base}[reservations]\nstate_dir = \"/var/lib/x\"\n"), "reservations.state_dir: with [cluster]"),
        ] {
            let e = err(&format!("{LISTENER}{bad}"));
            assert!(e.message.contains(msg), "{bad}: {e}");
        }
    }

    #[test]
    fn p2p_section_and_buffers() {
        let c = parse(
            &format!(
                "{LISTENER}[p2p]\nallow_host_bridges = [\"8086:29c0\"]\n[[p2p.provider]]\npci = \"0000:03:00.0\"\nkind = \"nvme-cmb\"\n\
                 [[p2p.provider]]\npci = \"0000:04:00.0\"\nkind = \"bar\"\nbar = 4\n[[subsystem]]\nnqn = \"nqn.x\"\n\
                 allow_any_host = true\n[[subsystem.namespace]]\nnsid = 1\nbackend = \"ram\"\nsize = 4096\nbuffers = \"p2p\"\n"
            ),
            "t",
        )
        .unwrap();
        assert_eq!(c.p2p.allow_host_bridges, [(0x8086, 0x29c0)]);
        assert_eq!(c.p2p.providers[0], Spec { pci: "0000:03:00.0".parse().unwrap(), kind: Kind::NvmeCmb, bar: None });
        assert_eq!((c.p2p.providers[1].kind, c.p2p.providers[1].bar), (Kind::Bar, Some(4)));
        assert_eq!(c.subsystems[0].namespaces[0].buffers, Buffers::P2p);
        let prov = |body: &str| err(&format!("{LISTENER}\n[[p2p.provider]]\n{body}"));
        let e = prov("pci = \"03:00.0\"\nkind = \"bar\"\nbar = 0\n");
        assert_eq!(e.line, 7, "{e}");
        assert!(e.message.contains("p2p.provider[0].pci: '03:00.0' is not a PCI address"), "{e}");
        assert!(prov("pci = \"0000:03:00.0\"\nkind = \"bar\"\n").message.contains("kind \"bar\" needs bar"));
        assert!(prov("pci = \"0000:03:00.0\"\nkind = \"bar\"\nbar = 6\n").message.contains("6 is not a BAR index"));
        assert!(prov("pci = \"0000:03:00.0\"\nkind = \"nvme-cmb\"\nbar = 2\n").message.contains("only for kind"));
        assert!(prov("pci = \"0000:03:00.0\"\nkind = \"cmb\"\n").message.contains("unknown kind 'cmb'"));
        let c = parse(&format!("{LISTENER}[metrics]\nlisten = \"127.0.0.1:9464\"\n"), "t").unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        let c = parse(&format!("{LISTENER}[reservations]\nstate_dir = \"/var/lib/p2pnvmf\"\n"), "t").unwrap();
        assert_eq!(c.reservations_state_dir.as_deref(), Some(std::path::Path::new("/var/lib/p2pnvmf")));
        let e = err(&format!("{LISTENER}[reservations]\nstate_dir = \"state\"\n"));
        assert!(e.message.contains("reservations.state_dir: 'state' is not an absolute path") && e.line == 6, "{e}");
        assert!(err(&format!("{LISTENER}[metrics]\nlisten = \"9464\"\n")).message.contains("metrics.listen: '9464'"));
        let e = err(&format!("{LISTENER}[p2p]\nallow_host_bridges = [\"intel\"]\n"));
        assert!(e.message.contains("allow_host_bridges[0]: 'intel' is not vendor:device"), "{e}");
    }

    #[test]
    fn rdma_listener_options() {
        let rdma = "[[listener]]\ntransport = \"rdma\"\naddress = \"10.0.0.1\"\n";
        let c = parse(&format!("{rdma}inline_data_size = 16384\n"), "t").unwrap();
        assert_eq!(c.listeners[0].inline_data_size, 16384);
        assert_eq!(parse(rdma, "t").unwrap().listeners[0].inline_data_size, 8192);
        let c = parse(&format!("{rdma}srq_size = 256\n"), "t").unwrap();
        assert_eq!(c.listeners[0].srq_size, Some(256));
        assert!(err(&format!("{rdma}srq_size = 8\n")).message.contains("srq_size: 8 is not from 16 to 16384"));
        let e = err(&format!("{rdma}inline_data_size = 16400\n"));
        assert!(e.message.contains("inline_data_size: 16400 must be a multiple of 16 from 0 to 16384"), "{e}");
        let e = err(&format!("{LISTENER}srq_size = 64\n"));
        assert!(e.message.contains("listener[0].srq_size: applies to rdma listeners only"), "{e}");
        assert_eq!(e.line, 5);
    }

    #[test]
    fn performance_poll_mode_and_its_cores() {
        assert_eq!(parse(LISTENER, "t").unwrap().performance, Performance::default());
        let c = parse(&format!("{LISTENER}[performance]\npoll = true\n"), "t").unwrap();
        assert_eq!(c.performance, Performance { poll: true, cores: vec![], isolate_cores: false });
        let c = parse(&format!("{LISTENER}[performance]\npoll = true\ncores = [1, 3]\n"), "t").unwrap();
        assert_eq!(c.performance.cores, vec![1, 3]);
        let e = err(&format!("{LISTENER}[performance]\ncores = [1]\n"));
        assert!(e.message.contains("performance.cores: the CPUs of polling threads: needs poll = true"), "{e}");
        assert_eq!(e.line, 6);
        let c =
            parse(&format!("{LISTENER}[performance]\npoll = true\ncores = [1]\nisolate_cores = true\n"), "t").unwrap();
        assert!(c.performance.isolate_cores);
        let e = err(&format!("{LISTENER}[performance]\npoll = true\nisolate_cores = true\n"));
        assert!(
            e.message.contains("performance.isolate_cores: keeps the kernel's work off the pollers' CPUs: needs cores"),
            "{e}"
        );
        let e = err(&format!("{LISTENER}[performance]\npoll = true\ncores = [1, 1]\n"));
        assert!(e.message.contains("performance.cores: CPU 1 is named twice"), "{e}");
        let e = err(&format!("{LISTENER}[performance]\npoll = true\ncores = [-1]\n"));
        assert!(e.message.contains("performance.cores: -1 is not from 0 to 4095"), "{e}");
        let e = err(&format!("{LISTENER}[performance]\npoll = true\ncores = []\n"));
        assert!(e.message.contains("performance.cores: empty"), "{e}");
        assert!(err(&format!("{LISTENER}[performance]\npollers = 2\n")).message.contains("unknown field `pollers`"));
    }

    #[test]
    fn access_and_references() {
        let e = err(&format!("{LISTENER}[[subsystem]]\nnqn = \"nqn.x\"\n"));
        assert!(e.message.contains("no host may connect"), "{e}");
        let e =
            err(&format!("{LISTENER}[[subsystem]]\nnqn = \"nqn.x\"\nallow_any_host = true\nlisteners = [\"nope\"]\n"));
        assert!(e.message.contains("no listener named 'nope'"), "{e}");
        let e = err(&format!("{LISTENER}[[subsystem]]\nnqn = \"\"\nallow_any_host = true\n"));
        assert!(e.message.contains("is not a usable NQN"), "{e}");
        let c = parse(
            &format!("{LISTENER}[[subsystem]]\nnqn = \"nqn.x\"\nhosts = [\"nqn.h\"]\nlisteners = [\"t\"]\n"),
            "t",
        )
        .unwrap();
        assert_eq!(c.subsystems[0].listeners, Some(vec!["t".to_string()]));
        assert_eq!(c.subsystems[0].hosts, vec![Host::open("nqn.h")]);
    }

    #[test]
    fn host_tables_carry_dhchap_secrets_and_errors_never_show_them() {
        const KEY: &str = "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:";
        const CTRL: &str = "DHHC-1:02:ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoOEhYaHiImKi4yNjo+QkZKTvGwQfg==:";
        let sub = |body: &str| format!("{LISTENER}[[subsystem]]\nnqn = \"nqn.x\"\n{body}");
        let c = parse(
            &sub(&format!(
                "hosts = [\"nqn.a\"]\n[[subsystem.host]]\nnqn = \"nqn.b\"\ndhchap_key = \"{KEY}\"\n\
                 dhchap_ctrl_key = \"{CTRL}\"\n[[subsystem.host]]\nnqn = \"nqn.c\"\ndhchap_key = \"{KEY}\"\n\
                 dhchap_dhgroup = \"ffdhe3072\"\n"
            )),
            "t",
        )
        .unwrap();
        let h = &c.subsystems[0].hosts;
        assert_eq!(h.iter().map(|h| h.nqn.as_str()).collect::<Vec<_>>(), ["nqn.a", "nqn.b", "nqn.c"]);
        assert_eq!(h[0], Host::open("nqn.a"));
        assert_eq!(h[1].key, Some(Secret::parse(KEY).unwrap()));
        assert_eq!(h[1].ctrl_key, Some(Secret::parse(CTRL).unwrap()));
        assert_eq!((h[2].ctrl_key.as_ref(), h[2].dhgroup, h[1].dhgroup), (None, 2, DHGROUP_NULL));
        assert!(!format!("{c:?}").contains("AAECAwQF"), "secrets stay out of Debug output");

        // A mistyped secret: named by key and line, the secret itself not repeated.
        let bad = KEY.replace("AAEC", "AAED");
        let e = err(&sub(&format!("[[subsystem.host]]\nnqn = \"nqn.b\"\ndhchap_key = \"{bad}\"\n")));
        assert_eq!(e.line, 9, "{e}");
        assert!(e.message.starts_with("subsystem[0].host[0].dhchap_key: DHHC-1 secret: its CRC-32"), "{e}");
        assert!(!e.message.contains("AAED"), "{e}");
        let e = err(&sub("[[subsystem.host]]\nnqn = \"nqn.b\"\ndhchap_key = \"secret\"\n"));
        assert!(e.message.contains("not a DH-HMAC-CHAP secret"), "{e}");
        let e = err(&sub(&format!("[[subsystem.host]]\nnqn = \"nqn.b\"\ndhchap_ctrl_key = \"{CTRL}\"\n")));
        assert!(e.message.contains("subsystem[0].host[0]: dhchap_ctrl_key needs dhchap_key"), "{e}");
        let e =
            err(&sub(&format!("allow_any_host = true\n[[subsystem.host]]\nnqn = \"nqn.b\"\ndhchap_key = \"{KEY}\"\n")));
        assert!(e.message.contains("allow_any_host = true lets every host in"), "{e}");
        let e = err(&sub(&format!(
            "[[subsystem.host]]\nnqn = \"nqn.b\"\ndhchap_key = \"{KEY}\"\ndhchap_dhgroup = \"ffdhe1024\"\n"
        )));
        assert!(e.message.starts_with("subsystem[0].host[0].dhchap_dhgroup: 'ffdhe1024' is not null"), "{e}");
        let e = err(&sub("[[subsystem.host]]\nnqn = \"nqn.b\"\ndhchap_dhgroup = \"null\"\n"));
        assert!(e.message.contains("dhchap_dhgroup needs dhchap_key"), "{e}");
        let e = err(&sub("hosts = [\"nqn.b\"]\n[[subsystem.host]]\nnqn = \"nqn.b\"\n"));
        assert!(e.message.contains("subsystem[0].host[0]: host nqn.b is listed twice"), "{e}");
        let e = err(&sub("[[subsystem.host]]\nnqn = \"nqn.b\"\ndhchap = 1\n"));
        assert!(e.message.contains("unknown field `dhchap`"), "{e}");
    }

    #[test]
    fn duplicate_nsid_and_file_backend() {
        let ns = "[[subsystem.namespace]]\nnsid = 1\nbackend = \"file\"\npath = \"/tmp/x\"\n";
        let src = format!("{LISTENER}[[subsystem]]\nnqn = \"nqn.x\"\nallow_any_host = true\n{ns}{ns}");
        let e = err(&src);
        assert!(e.message.contains("nsid: 1 is used twice"), "{e}");
        assert_eq!(e.line, 13);
    }

    proptest! {
        /// Arbitrary text never panics the parser.
        #[test]
        fn arbitrary_input_never_panics(s in "\\PC{0,200}") {
            let _ = parse(&s, "x");
        }
    }
}
