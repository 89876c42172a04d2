//! `p2pnvmf serve` on loopback, checked by `nvmf-tcp-probe` (malformed input gets the spec's
//! answer; a well-formed host still gets its data back) and by a clean SIGTERM shutdown.
//! The Linux host over the same transport is exercised in the VM suite (`vm_tcp`).

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(args: &[&str], port: u16) -> Served {
    let child = Command::new(env!("CARGO_BIN_EXE_p2pnvmf"))
        .arg("serve")
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn p2pnvmf");
    let mut served = Served(child);
    let start = Instant::now();
    loop {
        // A target that could not bind exits: say so (a connect to a port nobody listens on
        // can even succeed, by connecting to itself).
        if let Some(st) = served.0.try_wait().unwrap() {
            let log: Vec<String> =
                BufReader::new(served.0.stderr.take().unwrap()).lines().map_while(Result::ok).collect();
            panic!("p2pnvmf exited at start ({st}):\n{}", log.join("\n"));
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "p2pnvmf did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    served
}

fn probe(port: u16, nqn: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nvmf-tcp-probe"))
        .arg(format!("127.0.0.1:{port}"))
        .arg(nqn)
        .output()
        .expect("run nvmf-tcp-probe");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "probe failed:\n{text}");
    text
}

/// SIGTERM must stop the target within 10 s with exit code 0.
fn terminate(mut s: Served) -> String {
    let pid = s.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let start = Instant::now();
    let status = loop {
        if let Some(st) = s.0.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no exit 10 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let log: Vec<String> = BufReader::new(s.0.stderr.take().unwrap()).lines().map_while(Result::ok).collect();
    assert!(status.success(), "exit status {status}; log:\n{}", log.join("\n"));
    log.join("\n")
}

/// A free port below Linux's ephemeral range (32768 up): one from bind(0) is an ephemeral
/// port, which the probes' own connections in a parallel test may take as their source port
/// before the target binds it.
fn free_port() -> u16 {
    let start = 20000 + (std::process::id() % 10000) as u16;
    (start..32768)
        .chain(10000..start)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port below 32768")
}

#[test]
fn embedded_default_serves_and_survives_bad_input() {
    let s = serve(&[], 4420);
    let report = probe(4420, "nqn.2026-11.io.p2pnvmf:default");
    assert!(report.contains(" 0 failed"), "{report}");
    let log = terminate(s);
    assert!(log.contains("SIGTERM: shutting down"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn configured_subsystem_with_allow_list() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("p2pnvmf-loopback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("t.toml");
    let host = "nqn.2014-08.org.nvmexpress:uuid:0b0e3f2a-9c41-4c3b-9d7a-5c1f0a526d5e";
    std::fs::write(
        &cfg,
        format!(
            "[[listener]]\ntransport = \"tcp\"\naddress = \"127.0.0.1\"\nport = {port}\n\n\
             [[subsystem]]\nnqn = \"nqn.2026-11.io.p2pnvmf:t\"\nhosts = [\"{host}\"]\n\n\
             [[subsystem.namespace]]\nnsid = 1\nbackend = \"file\"\npath = \"{}\"\nsize = \"4MiB\"\n",
            dir.join("ns.img").display()
        ),
    )
    .unwrap();
    let s = serve(&["--config", cfg.to_str().unwrap()], port);
    probe(port, "nqn.2026-11.io.p2pnvmf:t");
    terminate(s);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_config_names_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("p2pnvmf-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[[listener]]\ntransport = \"tcp\"\naddress = \"127.0.0.1\"\nport = 70000\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_p2pnvmf")).arg("check-config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:4:8: listener[0].port: 70000 is not a TCP port", bad.display())), "{err}");
    let good = dir.join("good.toml");
    std::fs::write(&good, p2pnvmf_config_default()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_p2pnvmf")).arg("check-config").arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 listener(s), 1 subsystem(s), 1 namespace(s))"));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn p2pnvmf_config_default() -> &'static str {
    include_str!("../deploy/default.toml")
}

/// Every configuration shipped in deploy/ is valid.
#[test]
fn shipped_configs_pass_check_config() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = [root.join("deploy/default.toml"), root.join("deploy/examples/appliance.toml")];
    for f in files {
        let out = Command::new(env!("CARGO_BIN_EXE_p2pnvmf")).arg("check-config").arg(&f).output().unwrap();
        assert!(out.status.success(), "{}: {}", f.display(), String::from_utf8_lossy(&out.stderr));
    }
}

/// Under systemd (`Type=notify`): READY=1 once the listener is up, RELOADING=1 then READY=1
/// around a SIGHUP, STOPPING=1 at SIGTERM, through the socket $NOTIFY_SOCKET names.
#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("p2pnvmf-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cfg, sock) = (dir.join("t.toml"), dir.join("notify"));
    let body = format!(
        "[[listener]]\ntransport = \"tcp\"\naddress = \"127.0.0.1\"\nport = {port}\n\n\
         [[subsystem]]\nnqn = \"nqn.2026-12.io.p2pnvmf:n\"\nallow_any_host = true\n\n\
         [[subsystem.namespace]]\nnsid = 1\nbackend = \"ram\"\nsize = \"1MiB\"\n"
    );
    std::fs::write(&cfg, &body).unwrap();
    let rx = UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let next = || {
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let child = Command::new(env!("CARGO_BIN_EXE_p2pnvmf"))
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &sock)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let s = Served(child);
    let ready = next();
    assert_eq!(ready, "READY=1\nSTATUS=serving 1 subsystem(s) on 1 listener(s)");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok(), "READY=1 came after the listener was up");
    std::fs::write(&cfg, body.replace("size = \"1MiB\"", "size = \"2MiB\"")).unwrap();
    let pid = s.0.id().to_string();
    assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    assert_eq!(next(), "RELOADING=1\nSTATUS=reloading the configuration");
    assert_eq!(next(), ready);
    let log = terminate(s);
    assert!(next().starts_with("STOPPING=1\n"));
    assert!(log.contains("SIGHUP: ") && log.contains(" applied"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `p2pnvmf status` and `p2pnvmf reload` through the admin socket (mode 0600): what is served,
/// what a reload changed, and why an invalid file was refused.
#[test]
fn status_and_reload_through_the_admin_socket() {
    use std::os::unix::fs::PermissionsExt;
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("p2pnvmf-admin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cfg, sock) = (dir.join("t.toml"), dir.join("admin.sock"));
    let key = "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:";
    let body = format!(
        "[[listener]]\nname = \"lo\"\ntransport = \"tcp\"\naddress = \"127.0.0.1\"\nport = {port}\n\n\
         [[subsystem]]\nnqn = \"nqn.2026-12.io.p2pnvmf:s\"\nhosts = [\"nqn.2026-12.io.p2pnvmf:h1\"]\n\
         [[subsystem.host]]\nnqn = \"nqn.2026-12.io.p2pnvmf:h2\"\ndhchap_key = \"{key}\"\n\n\
         [[subsystem.namespace]]\nnsid = 1\nbackend = \"ram\"\nsize = \"1MiB\"\n"
    );
    std::fs::write(&cfg, &body).unwrap();
    let s = serve(&["--config", cfg.to_str().unwrap(), "--admin-socket", sock.to_str().unwrap()], port);
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_p2pnvmf")).args(args).arg("--socket").arg(&sock).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    // The admin socket comes up beside the listeners, not necessarily before them.
    let start = Instant::now();
    while !cli(&["status"]).0 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    let (ok, json) = cli(&["status", "--json"]);
    assert!(ok, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["listeners"][0]["port"], port);
    assert_eq!(v["listeners"][0]["transport"], "tcp");
    let sub = &v["subsystems"][0];
    assert_eq!(sub["hosts"][1], serde_json::json!({"nqn": "nqn.2026-12.io.p2pnvmf:h2", "dhchap": true}));
    assert_eq!(sub["namespaces"][0]["size"], 1 << 20);
    assert_eq!(sub["namespaces"][0]["buffers"], "host memory");
    assert_eq!(v["controllers"], serde_json::json!([]));
    assert!(!json.contains("AAECAwQF"), "no secret in the status");
    let (ok, text) = cli(&["status"]);
    assert!(ok && text.contains("nqn.2026-12.io.p2pnvmf:s  (2 host(s), 1 with DH-HMAC-CHAP)"), "{text}");
    assert!(text.contains("nsid 1"), "{text}");

    // A namespace added: the reload says what changed.
    // With its own UUID and EUI-64 (kept from another target); and a subsystem named as
    // blktests names them, served with one warning however often it is reloaded.
    let more = "[[subsystem.namespace]]\nnsid = 2\nbackend = \"ram\"\nsize = \"2MiB\"\n\
                uuid = \"91fdba0d-f87b-4c25-b80f-db7be1418b9e\"\neui64 = \"00:11:22:33:44:55:66:77\"\n\
                [[subsystem]]\nnqn = \"blktests-subsystem-1\"\nallow_any_host = true\n";
    std::fs::write(&cfg, format!("{body}{more}")).unwrap();
    let (ok, text) = cli(&["reload"]);
    assert!(
        ok && text.contains(
            "applied: subsystems added [\"blktests-subsystem-1\"], removed [], changed [\"nqn.2026-12.io.p2pnvmf:s\"]"
        ),
        "{text}"
    );
    let (_, json) = cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let ns2 = &v["subsystems"][0]["namespaces"][1];
    assert_eq!(ns2["nsid"], 2, "{json}");
    assert_eq!(ns2["uuid"], "91fdba0d-f87b-4c25-b80f-db7be1418b9e");
    assert_eq!(ns2["eui64"], "0011223344556677");
    assert_eq!(ns2["nguid"].as_str().map(str::len), Some(32), "the derived NGUID: {json}");
    assert_eq!(v["subsystems"][1]["nqn"], "blktests-subsystem-1");
    std::fs::write(&cfg, format!("{body}{more}serial = \"B1\"\n")).unwrap();
    assert!(cli(&["reload"]).0);
    // An invalid file: refused with its line, exit status 1, nothing changed.
    std::fs::write(&cfg, format!("{body}bogus = 1\n")).unwrap();
    let (ok, text) = cli(&["reload"]);
    assert!(!ok && text.contains("reload refused: ") && text.contains("unknown field `bogus`"), "{text}");
    let log = terminate(s);
    assert!(log.contains("admin socket: reload refused"), "{log}");
    assert_eq!(log.matches("'blktests-subsystem-1' is not in the NQN form").count(), 1, "{log}");
    assert!(!sock.exists(), "the socket goes with the target");
    let (ok, text) = cli(&["status"]);
    assert!(!ok && text.contains("is `p2pnvmf serve` running"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}
