//! `ana-watch`: reads the ANA log page (0Ch) of several NVMe controllers through the Linux
//! host's admin passthrough ioctl, every PERIOD milliseconds, and prints a line whenever what
//! they report for a group changes: `<unix ms> <state of each controller>`. A test-side
//! witness of what the heads report, without an nvme-cli process per sample. Ends when the
//! file given by --until exists; exits 1 if any sample saw two controllers Optimized.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;

#[derive(Parser)]
#[command(about = "Samples the ANA log page of NVMe controllers (/dev/nvmeX)")]
struct Args {
    /// ANA group to follow.
    #[arg(long, default_value_t = 1)]
    group: u32,
    #[arg(long, default_value_t = 50)]
    period_ms: u64,
    /// Stop once this file exists.
    #[arg(long)]
    until: std::path::PathBuf,
    controllers: Vec<std::path::PathBuf>,
}

/// struct nvme_passthru_cmd (linux/nvme_ioctl.h), 72 bytes.
#[repr(C)]
#[derive(Default)]
struct PassthruCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

/// NVME_IOCTL_ADMIN_CMD: _IOWR('N', 0x41, struct nvme_passthru_cmd).
const NVME_IOCTL_ADMIN_CMD: libc::c_ulong = 0xc000_0000 | (72 << 16) | ((b'N' as libc::c_ulong) << 8) | 0x41;

/// Group `group`'s state in the controller's ANA log page (header and the first 4 KiB).
fn state(dev: &File, group: u32) -> String {
    let mut page = vec![0u8; 4096];
    let cmd = PassthruCmd {
        opcode: 0x02,
        nsid: 0xffff_ffff,
        addr: page.as_mut_ptr() as u64,
        data_len: page.len() as u32,
        cdw10: 0x0c | (1 << 8) | ((page.len() as u32 / 4 - 1) << 16), // RGO: groups only
        ..Default::default()
    };
    // SAFETY: the descriptor is open; `cmd` is a live nvme_passthru_cmd whose `addr` points at
    // `page`, `data_len` bytes the kernel writes into and nothing else.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), NVME_IOCTL_ADMIN_CMD, &cmd) };
    if r != 0 {
        return if r < 0 { format!("error:{}", std::io::Error::last_os_error()) } else { format!("status:{r:#x}") };
    }
    let groups = u16::from_le_bytes([page[8], page[9]]) as usize;
    (0..groups.min(127))
        .map(|i| &page[16 + i * 32..48 + i * 32])
        .find(|d| u32::from_le_bytes(d[..4].try_into().unwrap()) == group)
        .map_or("absent".into(), |d| {
            match d[16] & 0xf {
                1 => "optimized",
                2 => "non-optimized",
                3 => "inaccessible",
                4 => "persistent-loss",
                15 => "change",
                _ => "invalid",
            }
            .into()
        })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let devs: Vec<File> = args
        .controllers
        .iter()
        .map(|p| File::open(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())))
        .collect::<Result<_, _>>()?;
    let (mut last, mut samples, mut both) = (Vec::new(), 0u64, 0u64);
    while !args.until.exists() {
        let now: Vec<String> = devs.iter().map(|d| state(d, args.group)).collect();
        samples += 1;
        if now.iter().filter(|s| *s == "optimized").count() > 1 {
            both += 1;
        }
        if now != last {
            let ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
            println!("{ms} {}", now.join(" "));
            last = now;
        }
        std::thread::sleep(Duration::from_millis(args.period_ms));
    }
    println!("samples {samples} both-optimized {both}");
    if both > 0 {
        std::process::exit(1);
    }
    Ok(())
}
