//! `p2pnvmf serve`: builds the target from the configuration, starts the listeners and
//! shuts down cleanly on SIGINT/SIGTERM.

use std::sync::Arc;

use anyhow::Context;
use p2pnvmf_backend::{FileBackend, RamBackend};
use p2pnvmf_config::{Backend as BackendCfg, Config, Transport};
use p2pnvmf_nvmf::{Backend, IoStats, Namespace, Port, Subsystem, Target, TrType};
use p2pnvmf_transport::tcp::{self, TcpParams};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::info;

fn open_backend(subnqn: &str, nsid: u32, cfg: &BackendCfg) -> anyhow::Result<Arc<dyn Backend>> {
    Ok(match cfg {
        BackendCfg::Ram { size } => Arc::new(RamBackend::new(*size)),
        BackendCfg::File { path, size } => {
            let f = FileBackend::open(path, *size).with_context(|| {
                format!("{subnqn} namespace {nsid}: opening {}", path.display())
            })?;
            info!(subnqn, nsid, path = %path.display(), engine = ?f.engine(), o_direct = f.has_direct(), "file backend open");
            Arc::new(f)
        }
    })
}

/// Builds the core's view of the configuration: ports numbered from 1 in listener order.
fn build_target(cfg: &Config, params: &TcpParams) -> anyhow::Result<Arc<Target>> {
    let ports: Vec<Port> = cfg
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| Port {
            id: i as u16 + 1,
            trtype: match l.transport {
                Transport::Tcp => TrType::Tcp,
                Transport::Rdma => TrType::Rdma,
            },
            traddr: l.address.to_string(),
            trsvcid: l.port.to_string(),
            params: params.transport_params(),
        })
        .collect();
    let port_id = |name: &str| {
        cfg.listeners
            .iter()
            .position(|l| l.name == name)
            .map(|i| i as u16 + 1)
            .expect("validated")
    };
    let mut subsystems = Vec::new();
    for s in &cfg.subsystems {
        let mut namespaces = Vec::new();
        for n in &s.namespaces {
            let backend = open_backend(&s.nqn, n.nsid, &n.backend)?;
            info!(subnqn = %s.nqn, nsid = n.nsid, size = backend.size_bytes(), backend = ?n.backend, "namespace ready");
            namespaces.push(Namespace::new(&s.nqn, n.nsid, backend));
        }
        subsystems.push(Subsystem {
            nqn: s.nqn.clone(),
            serial: s.serial.clone(),
            model: s.model.clone(),
            allow_any_host: s.allow_any_host,
            hosts: s.hosts.clone(),
            ports: s
                .listeners
                .as_ref()
                .map(|l| l.iter().map(|n| port_id(n)).collect()),
            namespaces,
            stats: IoStats::default(),
        });
    }
    Ok(Target::new(subsystems, ports))
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let params = TcpParams::default();
    let target = build_target(&cfg, &params)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut listeners = tokio::task::JoinSet::new();
    for port in target.ports.clone() {
        let addr = std::net::SocketAddr::new(port.traddr.parse()?, port.trsvcid.parse()?);
        let sock = tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "listener {}: binding NVMe/TCP on {addr}",
                cfg.listeners[usize::from(port.id) - 1].name
            )
        })?;
        info!(%addr, port = port.id, "NVMe/TCP listener ready");
        listeners.spawn(tcp::serve(
            sock,
            target.clone(),
            port,
            params,
            stop_rx.clone(),
        ));
    }
    for s in &target.subsystems {
        info!(subnqn = %s.nqn, namespaces = s.namespaces.len(), allow_any_host = s.allow_any_host, "subsystem ready");
    }
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        _ = term.recv() => info!("SIGTERM: shutting down"),
    }
    let _ = stop_tx.send(true);
    while listeners.join_next().await.is_some() {}
    for s in &target.subsystems {
        for ns in &s.namespaces {
            if let Err(e) = ns.backend.flush() {
                tracing::warn!(subnqn = %s.nqn, nsid = ns.nsid, "flush at shutdown failed: {e}");
            }
        }
    }
    info!("stopped");
    Ok(())
}
