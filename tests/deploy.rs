//! deploy/install.sh into a scratch root: the binary, the unit and an example configuration
//! land where the unit expects them, an edited configuration survives a second install, and the
//! unit passes `systemd-analyze verify` without a complaint (Type=notify is what `serve` speaks:
//! see `systemd_hears_ready_reloading_and_stopping` in tcp_loopback.rs).

use std::path::Path;
use std::process::Command;

fn install(root: &Path) -> String {
    let out = Command::new("deploy/install.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DESTDIR", root)
        .env("P2PNVMF_BIN", env!("CARGO_BIN_EXE_p2pnvmf"))
        .output()
        .expect("run deploy/install.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "deploy/install.sh failed:\n{text}");
    text
}

#[test]
fn install_puts_binary_unit_and_config_in_place_and_the_unit_verifies() {
    let root = std::env::temp_dir().join(format!("p2pnvmf-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let out = install(&root);
    assert!(out.contains("installed an example configuration"), "{out}");
    let (bin, unit, cfg) = (
        root.join("usr/local/sbin/p2pnvmf"),
        root.join("etc/systemd/system/p2pnvmf.service"),
        root.join("etc/p2pnvmf/p2pnvmf.toml"),
    );
    assert!(root.join("usr/local/share/doc/p2pnvmf/README.md").is_file());
    let shipped = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/appliance.toml"));
    assert_eq!(std::fs::read_to_string(&cfg).ok(), shipped.ok());
    // An operator's edits survive a reinstall.
    std::fs::write(&cfg, "# edited\n").unwrap();
    assert!(install(&root).contains("kept the existing"));
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), "# edited\n");

    // The installed unit, its paths moved under the scratch root, as systemd reads it.
    let text = std::fs::read_to_string(&unit).unwrap();
    for line in ["Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID", "CapabilityBoundingSet="] {
        assert!(text.lines().any(|l| l.starts_with(line)), "the unit lacks {line}");
    }
    let moved = text
        .replace("/usr/local/sbin/p2pnvmf", bin.to_str().unwrap())
        .replace("/etc/p2pnvmf/", &format!("{}/", cfg.parent().unwrap().display()));
    let check = root.join("p2pnvmf.service");
    std::fs::write(&check, moved).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&check)
        .output()
        .expect("systemd-analyze (package systemd; tests/vm/deps.sh installs it)");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify:\n{said}");
    std::fs::remove_dir_all(&root).unwrap();
}
