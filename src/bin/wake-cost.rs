//! `wake-cost`: what it costs one thread to wake another that sleeps, on the same CPU and
//! across CPUs — a one-byte ping-pong over a Unix socket pair between two threads pinned to
//! the CPUs given. Across CPUs every hand-off wakes a CPU that went idle (an inter-processor
//! interrupt); on one CPU it is a context switch. The QD1 benchmark runs it in the VM to price
//! the wake-ups it counts per I/O (`benches/vm_latency.rs`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Round-trip time of a thread-to-thread wake-up, on one CPU or across two")]
struct Args {
    /// The first thread's CPU.
    a: usize,
    /// The second thread's CPU (the same as `a` for a context switch without an IPI).
    b: usize,
    /// Round trips to time (after 1000 not timed).
    #[arg(long, default_value_t = 20_000)]
    loops: u32,
}

fn pin(cpu: usize) -> Result<()> {
    p2pnvmf_transport::poll::pin(cpu).with_context(|| format!("pinning to CPU {cpu}"))
}

/// `n` round trips: one byte out, the same byte back.
fn ping(s: &mut UnixStream, n: u32) -> Result<()> {
    let mut b = [0u8; 1];
    for _ in 0..n {
        s.write_all(&b).context("ping write")?;
        s.read_exact(&mut b).context("ping read")?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (mut here, mut there) = UnixStream::pair().context("socketpair")?;
    let b = args.b;
    let echo = std::thread::spawn(move || -> Result<()> {
        pin(b)?;
        let mut byte = [0u8; 1];
        // Until the other end closes.
        while there.read(&mut byte).context("echo read")? == 1 {
            there.write_all(&byte).context("echo write")?;
        }
        Ok(())
    });
    pin(args.a)?;
    ping(&mut here, 1000)?;
    let t0 = Instant::now();
    ping(&mut here, args.loops)?;
    let per = t0.elapsed().as_secs_f64() * 1e6 / f64::from(args.loops);
    drop(here);
    echo.join().map_err(|_| anyhow::anyhow!("the echo thread panicked"))??;
    println!(
        "CPUs {} and {}: round trip {per:.1} µs, {:.1} µs per wake-up ({} loops)",
        args.a,
        args.b,
        per / 2.0,
        args.loops
    );
    Ok(())
}
