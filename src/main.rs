//! `p2pnvmf`: the NVMe-oF target appliance's command line.

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
    },
    /// Validate a configuration file without serving.
    CheckConfig { file: PathBuf },
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
        Command::Serve { config } => {
            let cfg = match &config {
                Some(path) => p2pnvmf_config::Config::load(path)?,
                None => p2pnvmf_config::Config::default_config(),
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(serve::run(cfg, config))
        }
        Command::CheckConfig { file } => {
            let cfg = p2pnvmf_config::Config::load(&file)?;
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
