//! The kernel's unbound work queues kept off the pollers' CPUs (`[performance] isolate_cores`):
//! their CPU mask (`<sysfs>/devices/virtual/workqueue/cpumask`) without those CPUs while the
//! target runs, and the mask found before put back when it stops. Work that a poller's own
//! system calls queue — soft-RoCE's send and completion work for its queues — otherwise runs on
//! the poller's CPU and preempts it about once per command (measured in the VM: over RDMA at QD1
//! the poller was preempted 0.7–1.4 times per I/O with the mask left alone, 0.15–0.2 with it).

use std::io;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// The mask as set by [`UnboundWorkOff::apply`]; dropping it restores the one found before.
#[derive(Debug)]
pub struct UnboundWorkOff {
    path: PathBuf,
    before: String,
}

impl UnboundWorkOff {
    /// Clears `cores` from the unbound work queues' CPU mask under `sysfs` (`/sys`).
    pub fn apply(sysfs: &Path, cores: &[usize]) -> io::Result<Self> {
        let path = sysfs.join("devices/virtual/workqueue/cpumask");
        let named = |e: io::Error, what: &str| io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display()));
        let before = std::fs::read_to_string(&path).map_err(|e| named(e, "reading"))?.trim().to_owned();
        let mask = parse(&before).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{}: not a CPU mask: {before:?}", path.display()))
        })?;
        let off = without(&mask, cores);
        if off.iter().all(|w| *w == 0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: every CPU of {before} is a poller's ({cores:?}): none left for the kernel's work",
                    path.display()
                ),
            ));
        }
        let after = format(&off);
        std::fs::write(&path, &after).map_err(|e| named(e, &format!("writing {after}")))?;
        info!(path = %path.display(), %before, %after, "the kernel's unbound work kept off the pollers' CPUs");
        Ok(UnboundWorkOff { path, before })
    }
}

impl Drop for UnboundWorkOff {
    fn drop(&mut self) {
        match std::fs::write(&self.path, &self.before) {
            Ok(()) => info!(path = %self.path.display(), mask = %self.before, "unbound work queues' CPU mask restored"),
            Err(e) => warn!("{}: restoring {}: {e}", self.path.display(), self.before),
        }
    }
}

/// A kernel CPU mask ("ff,ffffffff": 32-bit hex groups, most significant first) as words,
/// least significant first.
fn parse(s: &str) -> Option<Vec<u32>> {
    s.split(',')
        .rev()
        .map(|g| (!g.is_empty() && g.len() <= 8).then(|| u32::from_str_radix(g, 16).ok()).flatten())
        .collect()
}

/// The kernel's format of a mask: most significant group first, without its leading zeros.
fn format(words: &[u32]) -> String {
    let top = words.iter().rposition(|w| *w != 0).unwrap_or(0);
    let mut s = format!("{:x}", words[top]);
    for w in words[..top].iter().rev() {
        s += &format!(",{w:08x}");
    }
    s
}

fn without(mask: &[u32], cores: &[usize]) -> Vec<u32> {
    let mut out = mask.to_vec();
    for &c in cores {
        if let Some(w) = out.get_mut(c / 32) {
            *w &= !(1 << (c % 32));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_read_and_write_as_the_kernel_prints_them() {
        assert_eq!(parse("3"), Some(vec![3]));
        assert_eq!(parse("ff,ffffffff"), Some(vec![u32::MAX, 0xff]));
        assert_eq!(format(&[u32::MAX, 0xff]), "ff,ffffffff");
        assert_eq!(format(&[0xfffffffd, 0xff]), "ff,fffffffd");
        assert_eq!(format(&[1, 0]), "1");
        assert_eq!(format(&[0x10, 1]), "1,00000010");
        for bad in ["", "x", "1,,2", "123456789"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert_eq!(without(&[u32::MAX, 0xff], &[1, 33, 100]), [0xfffffffd, 0xfd]);
    }

    #[test]
    fn the_pollers_cpus_leave_the_mask_while_it_is_held_and_it_comes_back_after() {
        let sysfs = std::env::temp_dir().join(format!("p2pnvmf-wq-{}", std::process::id()));
        let dir = sysfs.join("devices/virtual/workqueue");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cpumask");
        std::fs::write(&file, "f\n").unwrap();
        let held = UnboundWorkOff::apply(&sysfs, &[1, 2]).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "9");
        drop(held);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "f");
        // No CPU left for the kernel: refused, the mask untouched.
        std::fs::write(&file, "3\n").unwrap();
        let e = UnboundWorkOff::apply(&sysfs, &[0, 1]).unwrap_err();
        assert!(e.to_string().contains("every CPU of 3 is a poller's ([0, 1])"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "3\n");
        std::fs::remove_dir_all(&sysfs).unwrap();
        let e = UnboundWorkOff::apply(&sysfs, &[1]).unwrap_err();
        assert!(e.to_string().contains("devices/virtual/workqueue/cpumask: reading"), "{e}");
    }
}
