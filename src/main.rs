//! `p2pnvmf`: the NVMe-oF target appliance's command line.

mod admin_socket;
mod import_nvmetcli;
mod notify;
mod serve;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about = "User-space NVMe-over-Fabrics target with peer-to-peer PCIe buffers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the configured subsystems (the embedded default without --config); SIGHUP
    /// reloads the subsystems from the file.
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Where `p2pnvmf status` and `p2pnvmf reload` reach this target (mode 0600).
        #[arg(long, default_value = admin_socket::DEFAULT_PATH)]
        admin_socket: PathBuf,
    },
    /// Show what a running target serves: listeners, subsystems and namespaces with their
    /// buffers, connected controllers, p2p providers and fallbacks.
    Status {
        #[arg(long, default_value = admin_socket::DEFAULT_PATH)]
        socket: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Make a running target reload its configuration file; prints what changed or why the
    /// reload was refused (then exits 1).
    Reload {
        #[arg(long, default_value = admin_socket::DEFAULT_PATH)]
        socket: PathBuf,
    },
    /// ANA groups of a cluster of heads.
    Ana {
        #[command(subcommand)]
        command: AnaCommand,
    },
    /// Validate a configuration file without serving.
    CheckConfig { file: PathBuf },
    /// Turn a kernel nvmet configuration saved by `nvmetcli save` (JSON) into p2pnvmf's
    /// TOML on standard output; what cannot be carried over is listed on standard error and
    /// as comments at the top.
    ImportNvmetcli { file: PathBuf },
    /// Show the PCIe devices that matter for p2p, each provider (programming NVMe CMBs) and
    /// the decision for each provider × client pair.
    Topology {
        /// Where sysfs is mounted (`/sys`; a fixture tree's `sys` in tests).
        #[arg(long, default_value = "/sys")]
        sysfs_root: PathBuf,
        /// Take the providers and allowed host bridges from this file: a full configuration
        /// or one with only `[p2p]`.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AnaCommand {
    /// Move ANA group GROUP to head HEAD while I/O runs: the owner reports Change and hands the
    /// group over, HEAD takes it and reports Optimized; prints how long it took.
    Move {
        group: u32,
        head: String,
        #[arg(long, default_value = admin_socket::DEFAULT_PATH)]
        socket: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, admin_socket } => {
            let cfg = match &config {
                Some(path) => p2pnvmf_config::Config::load(path)?,
                None => p2pnvmf_config::Config::default_config(),
            };
            // In poll mode with cores named, those are the pollers' alone.
            let pollers = cfg.performance.cores.clone();
            p2pnvmf_transport::poll::keep_off(&pollers);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .on_thread_start(move || p2pnvmf_transport::poll::keep_off(&pollers))
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(serve::run(cfg, config, &admin_socket))
        }
        Command::Status { socket, json } => {
            let v = admin_socket::ask(&socket, "status")?;
            print!("{}", if json { format!("{v:#}\n") } else { admin_socket::render(&v) });
            Ok(())
        }
        Command::Ana { command: AnaCommand::Move { group, head, socket } } => {
            let v = admin_socket::ask(&socket, &format!("ana-move {group} {head}"))?;
            let message = v["message"].as_str().unwrap_or_default();
            if v["moved"].as_bool() != Some(true) {
                anyhow::bail!("move refused: {message}");
            }
            println!("{message}");
            Ok(())
        }
        Command::Reload { socket } => {
            let v = admin_socket::ask(&socket, "reload")?;
            let message = v["message"].as_str().unwrap_or_default();
            if v["reloaded"].as_bool() != Some(true) {
                anyhow::bail!("reload refused: {message}");
            }
            println!("{message}");
            Ok(())
        }
        Command::Topology { sysfs_root, config, json } => {
            let p2p_cfg = match &config {
                Some(path) => p2pnvmf_config::Config::load_p2p(path)?,
                None => p2pnvmf_config::P2p::default(),
            };
            let sysfs = p2pnvmf_p2p::pci::Sysfs::at_mount(&sysfs_root).map_err(anyhow::Error::msg)?;
            let p2p = p2pnvmf_p2p::plan::P2p::discover(&sysfs, &p2p_cfg.providers, &p2p_cfg.allow_host_bridges, false)
                .map_err(|e| anyhow::anyhow!("topology of {}: {e}", sysfs_root.display()))?;
            let mut report = p2p.report();
            let verbs = p2pnvmf_transport::rdma::sys::api().and_then(p2pnvmf_transport::rdma::sys::dmabuf_support);
            report.dmabuf = p2p.dma_buf_report(&verbs);
            report.kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|r| r.trim().to_string());
            print!("{}", if json { report.to_json() + "\n" } else { report.to_text() });
            Ok(())
        }
        Command::ImportNvmetcli { file } => {
            let json = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let imported = import_nvmetcli::import(&json).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            // What it wrote must be a configuration this binary serves.
            p2pnvmf_config::Config::parse(&imported.toml, "<imported>")
                .with_context(|| format!("{}: the imported configuration is not valid", file.display()))?;
            for n in &imported.notes {
                eprintln!("not carried over: {n}");
            }
            print!("{}", imported.toml);
            Ok(())
        }
        Command::CheckConfig { file } => {
            let cfg = p2pnvmf_config::Config::load(&file)?;
            for w in &cfg.warnings {
                eprintln!("warning: {w}");
            }
            let namespaces: usize = cfg.subsystems.iter().map(|s| s.namespaces.len()).sum();
            println!(
                "{}: ok ({} listener(s), {} subsystem(s), {} namespace(s))",
                file.display(),
                cfg.listeners.len(),
                cfg.subsystems.len(),
                namespaces
            );
            Ok(())
        }
    }
}
