//! `pr-ioctl`: drives a block device's persistent reservations through the Linux kernel's PR
//! ioctls (linux/pr.h: IOC_PR_REGISTER, IOC_PR_RESERVE, IOC_PR_RELEASE, IOC_PR_PREEMPT,
//! IOC_PR_PREEMPT_ABORT, IOC_PR_CLEAR) — what clustered file systems, multipath and
//! hypervisors use, and what the NVMe host turns into Reservation commands. Prints `ok`, or the
//! PR status / errno the kernel returned, and exits non-zero then.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use p2pnvmf_nvmf::resv::RType;

#[derive(Debug, Parser)]
#[command(about = "Persistent reservations through the kernel's PR ioctls")]
struct Args {
    /// The block device, e.g. /dev/nvme1n1.
    dev: PathBuf,
    #[command(subcommand)]
    op: Op,
}

#[derive(Debug, Subcommand)]
enum Op {
    /// Registers `new` (with `old` = 0) or replaces `old` by `new` (Linux's NVMe host has no
    /// unregister here: `new` = 0 replaces the key with 0).
    Register {
        old: String,
        new: String,
        #[arg(long)]
        ignore_key: bool,
    },
    Reserve {
        key: String,
        #[arg(value_parser = rtype)]
        rtype: u8,
    },
    Release {
        key: String,
        #[arg(value_parser = rtype)]
        rtype: u8,
    },
    /// As the host registered with `mine`, takes the reservation of the holder registered with
    /// `victim` (or unregisters the hosts with that key) — the kernel's old_key and new_key.
    Preempt {
        mine: String,
        victim: String,
        #[arg(value_parser = rtype)]
        rtype: u8,
        /// IOC_PR_PREEMPT_ABORT: the preempted hosts' commands end first.
        #[arg(long)]
        abort: bool,
    },
    Clear {
        key: String,
    },
}

const PR_FL_IGNORE_KEY: u64 = 1;

/// _IOW('p', nr, size).
const fn iow(nr: u64, size: u64) -> u64 {
    1 << 30 | size << 16 | (b'p' as u64) << 8 | nr
}

/// PR status codes the NVMe host returns as a positive value (linux/pr.h, enum pr_status).
fn pr_status(v: i32) -> &'static str {
    match v {
        0x18 => "reservation conflict",
        0x02 => "I/O error",
        0x10000 | 0xe0000 | 0xf0000 => "path failure",
        _ => "unknown PR status",
    }
}

/// A reservation type: the block layer's enum pr_type (linux/pr.h) has the NVMe numbers, 1
/// Write Exclusive to 6 Exclusive Access All Registrants.
fn rtype(s: &str) -> Result<u8, String> {
    s.parse().ok().and_then(RType::from_u8).map(|t| t as u8).ok_or_else(|| format!("'{s}' is not a type from 1 to 6"))
}

fn key(s: &str) -> anyhow::Result<u64> {
    Ok(match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16)?,
        None => s.parse()?,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The argument structures (linux/pr.h) as little-endian words: struct pr_registration
    // {old_key, new_key, u32 flags, pad} and pr_preempt {old_key, new_key, u32 type, u32 flags}
    // take 24 bytes; pr_reservation {key, u32 type, u32 flags} and pr_clear {key, u32 flags,
    // pad} take 16.
    let (nr, words): (u64, [u64; 3]) = match &args.op {
        Op::Register { old, new, ignore_key } => {
            (200, [key(old)?, key(new)?, if *ignore_key { PR_FL_IGNORE_KEY } else { 0 }])
        }
        Op::Reserve { key: k, rtype } => (201, [key(k)?, u64::from(*rtype), 0]),
        Op::Release { key: k, rtype } => (202, [key(k)?, u64::from(*rtype), 0]),
        Op::Preempt { mine, victim, rtype, abort } => {
            (if *abort { 204 } else { 203 }, [key(mine)?, key(victim)?, u64::from(*rtype)])
        }
        Op::Clear { key: k } => (205, [key(k)?, 0, 0]),
    };
    let size = if matches!(nr, 200 | 203 | 204) { 24 } else { 16 };
    let dev = OpenOptions::new().read(true).write(true).open(&args.dev)?;
    // SAFETY: the descriptor is open; `words` is a live 24-byte buffer of which the kernel
    // reads the `size` bytes the request number names, and writes nothing.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), iow(nr, size) as libc::c_ulong, words.as_ptr()) };
    match r {
        0 => {
            println!("ok");
            Ok(())
        }
        r if r > 0 => anyhow::bail!("{}: PR status {r:#x} ({})", args.dev.display(), pr_status(r)),
        _ => anyhow::bail!("{}: {}", args.dev.display(), std::io::Error::last_os_error()),
    }
}
