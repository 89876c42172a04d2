//! Private copies of the fixture trees in `tests/fixtures`, which stand in for `/sys` in tests
//! of every crate (see `make-pci-fixtures.py` for each layout). A copy per use: tests run in
//! parallel, and reading a CMB programs CMBMSC, which writes the copy's `resource0`.

use std::path::PathBuf;

/// A fresh copy of fixture `name` in the temporary directory; the caller removes it.
pub fn copy(name: &str) -> PathBuf {
    static COPIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name);
    let dst = std::env::temp_dir().join(format!("p2pnvmf-fixture-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    let ok = std::process::Command::new("cp").arg("-a").arg(&src).arg(&dst).status().is_ok_and(|s| s.success());
    assert!(ok, "copying {} to {}", src.display(), dst.display());
    dst
}

/// A copy of `pci-switch-cmb` (an NVMe CMB and mlx5_0 below one switch) whose CMB BAR file
/// holds its 64 MiB (sparse), so the CMB maps.
pub fn switch_with_cmb() -> PathBuf {
    let dir = copy("pci-switch-cmb");
    let bar = dir.join("sys/bus/pci/devices/0000:03:00.0/resource2");
    let f = std::fs::File::options().write(true).open(&bar);
    f.and_then(|f| f.set_len(64 << 20)).unwrap_or_else(|e| panic!("sizing {}: {e}", bar.display()));
    dir
}
