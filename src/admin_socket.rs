//! The local admin socket behind `p2pnvmf status` and `p2pnvmf reload`: a client writes one
//! request line (`status` or `reload`) and reads one JSON document back. The socket is the
//! service user's alone (mode 0600), in /run/p2pnvmf (the unit's RuntimeDirectory). Requests
//! are answered by the serve loop, the one place that holds the configuration.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info};

pub const DEFAULT_PATH: &str = "/run/p2pnvmf/admin.sock";

/// A request for the serve loop, with where its answer goes.
#[derive(Debug)]
pub enum Ask {
    Status(oneshot::Sender<Value>),
    /// Ok: what the reload changed; Err: why it was refused.
    Reload(oneshot::Sender<Result<String, String>>),
    /// A planned move of an ANA group to another head (`p2pnvmf ana move`).
    AnaMove {
        group: u32,
        to: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// Creates the socket at `path`, taking over a stale one (nobody answers) but never a live
/// target's.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    let shown = path.display();
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!("{shown}: another p2pnvmf answers there"));
        }
        std::fs::remove_file(path).map_err(|e| format!("removing the stale {shown}: {e}"))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    // Bound under a name of its own and made the service user's before it takes `path`: nobody
    // else can connect in between.
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".{}.new", std::process::id()));
    let aside = std::path::PathBuf::from(aside);
    let _ = std::fs::remove_file(&aside);
    let listener = UnixListener::bind(&aside).map_err(|e| format!("{}: {e}", aside.display()))?;
    let placed = std::fs::set_permissions(&aside, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: making it the service user's alone: {e}", aside.display()))
        .and_then(|()| std::fs::rename(&aside, path).map_err(|e| format!("{shown}: {e}")));
    if placed.is_err() {
        let _ = std::fs::remove_file(&aside);
    }
    placed.map(|()| listener)
}

/// Answers connections until `stop`; removes the socket file then.
pub async fn serve(
    listener: UnixListener,
    path: std::path::PathBuf,
    asks: mpsc::Sender<Ask>,
    mut stop: watch::Receiver<bool>,
) {
    info!(path = %path.display(), "admin socket ready (p2pnvmf status, p2pnvmf reload)");
    loop {
        tokio::select! {
            c = listener.accept() => match c {
                Ok((stream, _)) => { tokio::spawn(answer(stream, asks.clone())); }
                Err(e) => debug!("admin socket accept: {e}"),
            },
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn answer(stream: UnixStream, asks: mpsc::Sender<Ask>) {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    // One short line: a client cannot make the target buffer more.
    if BufReader::new(rd.take(128)).read_line(&mut line).await.is_err() {
        return;
    }
    let answer = match line.trim() {
        "status" => {
            let (tx, rx) = oneshot::channel();
            match asks.send(Ask::Status(tx)).await {
                Ok(()) => rx.await.unwrap_or_else(|_| json!({"error": "the target is stopping"})),
                Err(_) => json!({"error": "the target is stopping"}),
            }
        }
        "reload" => {
            let (tx, rx) = oneshot::channel();
            let r = match asks.send(Ask::Reload(tx)).await {
                Ok(()) => rx.await.unwrap_or_else(|_| Err("the target is stopping".into())),
                Err(_) => Err("the target is stopping".into()),
            };
            match r {
                Ok(what) => json!({"reloaded": true, "message": what}),
                Err(why) => json!({"reloaded": false, "message": why}),
            }
        }
        other if other.starts_with("ana-move ") => {
            let mut w = other.split_whitespace().skip(1);
            match (w.next().and_then(|g| g.parse().ok()), w.next(), w.next()) {
                (Some(group), Some(to), None) => {
                    let (tx, rx) = oneshot::channel();
                    let r = match asks.send(Ask::AnaMove { group, to: to.to_string(), reply: tx }).await {
                        Ok(()) => rx.await.unwrap_or_else(|_| Err("the target is stopping".into())),
                        Err(_) => Err("the target is stopping".into()),
                    };
                    match r {
                        Ok(what) => json!({"moved": true, "message": what}),
                        Err(why) => json!({"moved": false, "message": why}),
                    }
                }
                _ => json!({"error": "ana-move takes a group number and a head name"}),
            }
        }
        other => json!({"error": format!("unknown request '{other}': status, reload or ana-move")}),
    };
    let _ = wr.write_all(format!("{answer}\n").as_bytes()).await;
}

/// The client side: sends `request` to the target at `path` and returns its answer.
pub fn ask(path: &Path, request: &str) -> anyhow::Result<Value> {
    let mut s = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to {} (is `p2pnvmf serve` running, and may this user open its admin socket?)",
            path.display()
        )
    })?;
    s.write_all(format!("{request}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out).with_context(|| format!("reading the answer from {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&out).with_context(|| format!("the answer from {} is not JSON", path.display()))?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        anyhow::bail!("{}: {e}", path.display());
    }
    Ok(v)
}

/// `status` as text for a person.
pub fn render(v: &Value) -> String {
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let list = |v: &Value, key: &str| v.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
    let mut out = String::from("listeners:\n");
    for l in list(v, "listeners") {
        out += &format!("  {:<10} {:<5} {}:{}\n", s(&l["name"]), s(&l["transport"]), s(&l["address"]), s(&l["port"]));
    }
    out += "subsystems:\n";
    for sub in list(v, "subsystems") {
        let hosts = match sub["allow_any_host"].as_bool() {
            Some(true) => "any host".to_string(),
            _ => {
                let h = list(&sub, "hosts");
                let keyed = h.iter().filter(|h| h["dhchap"].as_bool() == Some(true)).count();
                format!("{} host(s), {keyed} with DH-HMAC-CHAP", h.len())
            }
        };
        out += &format!("  {}  ({hosts})\n", s(&sub["nqn"]));
        for ns in list(&sub, "namespaces") {
            out += &format!(
                "    nsid {:<3} {:<9} {:>14} bytes  {}  buffers: {}\n",
                s(&ns["nsid"]),
                s(&ns["backend"]),
                s(&ns["size"]),
                s(&ns["device"]),
                s(&ns["buffers"])
            );
            out += &format!(
                "             uuid {}  nguid {}  eui64 {}  ANA group {} {}\n",
                s(&ns["uuid"]),
                s(&ns["nguid"]),
                s(&ns["eui64"]),
                s(&ns["ana_group"]),
                s(&ns["ana_state"])
            );
            let r = &ns["reservation"];
            let regs = list(r, "registrants");
            if !regs.is_empty() || r["ptpl"].as_bool() == Some(true) {
                let holder = match r["type"].as_u64() {
                    Some(0) | None => "no reservation".to_string(),
                    Some(t) => format!("type {t} held by {}", s(&r["holder"])),
                };
                out += &format!(
                    "             reservation: {holder}, {} registrant(s), generation {}, PTPL {}\n",
                    regs.len(),
                    s(&r["generation"]),
                    if r["ptpl"].as_bool() == Some(true) { "on" } else { "off" }
                );
            }
        }
    }
    if let Some(c) = v.get("cluster") {
        let lease = match c["serving_for_ms"].as_u64() {
            Some(ms) => format!("lease {} (serving for {ms} ms more unless renewed)", s(&c["lease"])),
            None => "no lease: fenced, every group inaccessible here".into(),
        };
        out += &format!("cluster: head {} of etcd {}; {lease}\n", s(&c["name"]), s(&c["etcd"]));
        if let Some(e) = c["etcd_error"].as_str() {
            out += &format!("  etcd: {e}\n");
        }
        for g in list(c, "groups") {
            out += &format!("  ANA group {:<3} owner {:<12} here {}\n", s(&g["group"]), s(&g["owner"]), s(&g["state"]));
        }
    }
    out += "controllers:\n";
    for c in list(v, "controllers") {
        let queues = list(&c, "io_queues");
        let depths: Vec<String> = queues.iter().map(|q| s(&q["entries"])).collect();
        out += &format!(
            "  cntlid {:<4} {}  host {}  from {} over {} (listener {})  keep-alive {} ms  {} I/O queue(s) [{}]\n",
            s(&c["cntlid"]),
            s(&c["subnqn"]),
            s(&c["hostnqn"]),
            s(&c["host_address"]),
            s(&c["transport"]),
            s(&c["listener"]),
            s(&c["kato_ms"]),
            queues.len(),
            depths.join(", ")
        );
    }
    out += "p2p providers:\n";
    match v["p2p"]["error"].as_str() {
        Some(e) => out += &format!("  none: {e}\n"),
        None if list(&v["p2p"], "providers").is_empty() => out += "  none\n",
        None => {
            for p in list(&v["p2p"], "providers") {
                out += &match p["usable"].as_bool() {
                    Some(true) => format!(
                        "  {} {}  {} of {} chunks in use\n",
                        s(&p["pci"]),
                        s(&p["kind"]),
                        s(&p["chunks_in_use"]),
                        s(&p["chunks"])
                    ),
                    _ => format!("  {} {}  unusable: {}\n", s(&p["pci"]), s(&p["kind"]), s(&p["reason"])),
                };
            }
        }
    }
    let f = &v["fallbacks"];
    out += &format!(
        "fallbacks to host memory: namespace {}, controller {}, request {}\n",
        s(&f["namespace"]),
        s(&f["controller"]),
        s(&f["request"])
    );
    let pollers = list(v, "pollers");
    if !pollers.is_empty() {
        out += "pollers (poll mode):
";
        for p in pollers {
            let share = p["busy_share"].as_f64().unwrap_or(0.0) * 100.0;
            out += &format!(
                "  poller {} on CPU {}  {} connection(s)  busy {share:.1}% (last second)  busy {:.3} s, idle {:.3} s in all\n",
                s(&p["poller"]),
                match p["cpu"].as_u64() {
                    Some(c) => c.to_string(),
                    None => "any".into(),
                },
                s(&p["connections"]),
                p["busy_seconds"].as_f64().unwrap_or(0.0),
                p["idle_seconds"].as_f64().unwrap_or(0.0),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_is_the_service_users_from_the_start_and_a_live_one_is_never_taken() {
        let dir = std::env::temp_dir().join(format!("p2pnvmf-admin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("admin.sock");
        let first = bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["admin.sock"], "bound aside, then renamed: nothing left beside it");
        let err = bind(&path).unwrap_err();
        assert!(err.ends_with("admin.sock: another p2pnvmf answers there"), "{err}");
        // Its target gone, the file left behind is taken over.
        drop(first);
        assert!(path.exists());
        bind(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
