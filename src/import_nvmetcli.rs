//! `p2pnvmf import-nvmetcli FILE`: a kernel nvmet configuration, as `nvmetcli save` writes it
//! (JSON: `ports`, `subsystems`, `hosts`, each node's configfs attribute groups), turned into
//! p2pnvmf's TOML — listeners, subsystems with their allowed hosts (and DH-HMAC-CHAP secrets
//! where the file has them), namespaces with their device paths and identifiers — with a line
//! for everything that cannot be carried over. Pure: JSON text in, TOML text and notes out.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

/// The TOML, and what was not carried over (each also a comment at the top of the TOML).
#[derive(Debug)]
pub struct Imported {
    pub toml: String,
    pub notes: Vec<String>,
}

/// A TOML basic string.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// An attribute of a node's configfs group (`"addr": {"traddr": ...}`), as nvmetcli saves it:
/// a string (numbers taken as they are); empty is absent.
fn attr(node: &Value, group: &str, name: &str) -> Option<String> {
    let s = match node.get(group)?.get(name)? {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    (!s.is_empty()).then_some(s)
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key).and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

/// A host's DH-HMAC-CHAP settings where the file has them: nvmetcli's generic dump of the
/// `dhchap_*` configfs attributes (`"dhchap": {"key", "ctrl_key", "hash", "dhgroup"}`), or the
/// attribute names themselves. Upstream nvmetcli (0.7) saves only a host's NQN.
struct HostKeys {
    key: Option<String>,
    ctrl_key: Option<String>,
    dhgroup: Option<String>,
    hash: Option<String>,
}

fn host_keys(h: &Value) -> HostKeys {
    let get = |name: &str| {
        attr(h, "dhchap", name).or_else(|| h.get(format!("dhchap_{name}")).and_then(Value::as_str).map(String::from))
    };
    HostKeys { key: get("key"), ctrl_key: get("ctrl_key"), dhgroup: get("dhgroup"), hash: get("hash") }
}

pub fn import(json: &str) -> Result<Imported, String> {
    let root: Value = serde_json::from_str(json).map_err(|e| format!("not nvmetcli's JSON: {e}"))?;
    if !root.is_object() {
        return Err("not nvmetcli's JSON: the top level is not an object with ports, subsystems and hosts".into());
    }
    let mut notes = Vec::new();
    let mut out = String::new();

    // Ports → listeners; which subsystems each port exposes.
    let mut exposed: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // ANA group → its state → the ports that give it so.
    let mut ana: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut listeners = String::new();
    for (i, p) in list(&root, "ports").iter().enumerate() {
        let id = p.get("portid").map_or_else(|| format!("#{i}"), |v| v.to_string().trim_matches('"').to_string());
        let what = format!("port {id}");
        let trtype = attr(p, "addr", "trtype").unwrap_or_default();
        if trtype != "tcp" && trtype != "rdma" {
            notes.push(format!("{what}: transport '{trtype}' (p2pnvmf serves tcp and rdma): left out"));
            continue;
        }
        let Some(traddr) = attr(p, "addr", "traddr") else {
            notes.push(format!("{what}: no addr.traddr: left out"));
            continue;
        };
        if traddr.parse::<std::net::IpAddr>().is_err() {
            notes.push(format!("{what}: traddr '{traddr}' is not an IP address: left out"));
            continue;
        }
        let trsvcid = attr(p, "addr", "trsvcid").unwrap_or_else(|| "4420".into());
        let Ok(port) = trsvcid.parse::<u16>() else {
            notes.push(format!("{what}: trsvcid '{trsvcid}' is not a port number: left out"));
            continue;
        };
        let name = format!("port{id}");
        let _ = write!(
            listeners,
            "[[listener]]\nname = {}\ntransport = \"{trtype}\"\naddress = {}\nport = {port}\n",
            quoted(&name),
            quoted(&traddr)
        );
        if let Some(ids) = attr(p, "param", "inline_data_size") {
            match ids.parse::<u32>() {
                Ok(n) if trtype == "rdma" && n <= p2pnvmf_config::MAX_INLINE_DATA && n % 16 == 0 => {
                    let _ = writeln!(listeners, "inline_data_size = {n}");
                }
                // nvmet's own "not set" (-1) and TCP's (ignored by nvmet-tcp too).
                _ if trtype == "tcp" || ids == "-1" => {}
                _ => notes.push(format!(
                    "{what}: param.inline_data_size {ids}: p2pnvmf takes a multiple of 16 up to {}; the default 8192 applies",
                    p2pnvmf_config::MAX_INLINE_DATA
                )),
            }
        }
        if attr(p, "param", "pi_enable").is_some_and(|v| v != "0") {
            notes.push(format!("{what}: param.pi_enable: protection information is not supported"));
        }
        if let Some(treq) = attr(p, "addr", "treq").filter(|t| t != "not specified" && t != "not required") {
            notes.push(format!("{what}: addr.treq '{treq}': TLS is not supported yet"));
        }
        for r in list(p, "referrals") {
            notes.push(format!(
                "{what}: referral {} to {}:{}: referrals are not supported",
                r.get("name").and_then(Value::as_str).unwrap_or("?"),
                attr(r, "addr", "traddr").unwrap_or_default(),
                attr(r, "addr", "trsvcid").unwrap_or_default()
            ));
        }
        for g in list(p, "ana_groups") {
            let state = attr(g, "ana", "state").unwrap_or_default();
            let grpid = g.get("grpid").map(ToString::to_string).unwrap_or_default();
            ana.entry(grpid).or_default().entry(state).or_default().push(id.clone());
        }
        listeners.push('\n');
        for s in list(p, "subsystems").iter().filter_map(Value::as_str) {
            exposed.entry(s.to_string()).or_default().push(name.clone());
        }
    }
    if listeners.is_empty() {
        return Err("no tcp or rdma port to listen on: nothing could be served".into());
    }
    // nvmet keeps ANA states per port; a p2pnvmf head has one per group for all its listeners.
    let mut groups = Vec::new();
    for (grpid, states) in &ana {
        let valid = grpid.parse::<u32>().is_ok_and(|g| (1..=p2pnvmf_config::ANA_GROUPS).contains(&g));
        match states.iter().collect::<Vec<_>>()[..] {
            [(state, _)] if valid && p2pnvmf_config::AnaState::parse(state).is_some() => {
                if state != "optimized" {
                    groups.push(format!("{grpid} = {}", quoted(state)));
                }
            }
            _ => {
                let by_port: Vec<String> =
                    states.iter().map(|(st, ports)| format!("'{st}' on port {}", ports.join(", "))).collect();
                notes.push(format!(
                    "ANA group {grpid}: {}: a p2pnvmf head gives a group one state on all its listeners; left optimized",
                    by_port.join("; ")
                ));
            }
        }
    }
    // Hosts with secrets, by NQN.
    let keys: BTreeMap<&str, HostKeys> =
        list(&root, "hosts").iter().filter_map(|h| Some((h.get("nqn")?.as_str()?, host_keys(h)))).collect();

    let mut subsystems = String::new();
    for (i, s) in list(&root, "subsystems").iter().enumerate() {
        let Some(nqn) = s.get("nqn").and_then(Value::as_str) else {
            notes.push(format!("subsystem #{i}: no nqn: left out"));
            continue;
        };
        let what = format!("subsystem {nqn}");
        let Some(ports) = exposed.get(nqn) else {
            notes.push(format!("{what}: on no tcp or rdma port (the kernel does not serve it): left out"));
            continue;
        };
        if s.get("passthru").is_some_and(|p| p.as_array().is_some_and(|a| !a.is_empty())) {
            notes.push(format!("{what}: a passthru controller cannot be carried over: left out"));
            continue;
        }
        let _ = writeln!(subsystems, "[[subsystem]]\nnqn = {}", quoted(nqn));
        if let Some(serial) = attr(s, "attr", "serial") {
            let _ = writeln!(subsystems, "serial = {}", quoted(&serial));
        }
        if let Some(model) = attr(s, "attr", "model") {
            let _ = writeln!(subsystems, "model = {}", quoted(&model));
        }
        let ports: Vec<String> = ports.iter().map(|p| quoted(p)).collect();
        let _ = writeln!(subsystems, "listeners = [{}]", ports.join(", "));
        for a in ["cntlid_min", "cntlid_max"] {
            if let Some(v) = attr(s, "attr", a).filter(|v| v.parse::<u16>().is_ok()) {
                let _ = writeln!(subsystems, "{a} = {v}");
            }
        }
        for (a, default) in [("pi_enable", "0"), ("qid_max", "128")] {
            if let Some(v) = attr(s, "attr", a).filter(|v| v != default) {
                notes.push(format!("{what}: attr.{a} {v}: not carried over (p2pnvmf: [limits])"));
            }
        }
        // What p2pnvmf reports itself: NVMe 1.3, no IEEE OUI, its own firmware revision.
        let ours = |a: &str, v: &str| (a == "version" && v == "1.3") || (a == "ieee_oui" && v == "0x000000");
        for a in ["version", "firmware", "ieee_oui"] {
            if let Some(v) = attr(s, "attr", a).filter(|v| !ours(a, v)) {
                notes.push(format!("{what}: attr.{a} '{v}': p2pnvmf reports its own"));
            }
        }
        let hosts: Vec<&str> = list(s, "allowed_hosts").iter().filter_map(Value::as_str).collect();
        let any = attr(s, "attr", "allow_any_host").is_some_and(|v| v == "1");
        if any {
            let _ = writeln!(subsystems, "allow_any_host = true");
        }
        let (keyed, open): (Vec<&str>, Vec<&str>) =
            hosts.iter().partition(|h| keys.get(*h).is_some_and(|k| k.key.is_some()) && !any);
        if !open.is_empty() && !any {
            let list: Vec<String> = open.iter().map(|h| quoted(h)).collect();
            let _ = writeln!(subsystems, "hosts = [{}]", list.join(", "));
        }
        if any && !hosts.is_empty() {
            notes.push(format!(
                "{what}: allow_any_host = 1: its allowed_hosts ({}) and their DH-HMAC-CHAP secrets do not apply",
                hosts.join(", ")
            ));
        }
        if !any && hosts.is_empty() {
            notes.push(format!("{what}: no allowed host and allow_any_host = 0: no host could connect; kept so"));
            let _ = writeln!(subsystems, "hosts = []");
        }
        for h in keyed {
            let k = &keys[h];
            let _ = write!(
                subsystems,
                "[[subsystem.host]]\nnqn = {}\ndhchap_key = {}\n",
                quoted(h),
                quoted(k.key.as_deref().unwrap_or_default())
            );
            if let Some(c) = &k.ctrl_key {
                let _ = writeln!(subsystems, "dhchap_ctrl_key = {}", quoted(c));
            }
            match k.dhgroup.as_deref() {
                None | Some("null") => {}
                Some(g) => {
                    let _ = writeln!(subsystems, "dhchap_dhgroup = {}", quoted(g));
                }
            }
            if let Some(hash) = k.hash.as_deref().filter(|h| *h != "hmac(sha256)") {
                notes.push(format!(
                    "{what}: host {h}: dhchap hash '{hash}': p2pnvmf takes the host's first choice of SHA-256/384/512"
                ));
            }
        }
        for n in list(s, "namespaces") {
            let nsid = n.get("nsid").map(ToString::to_string).unwrap_or_default();
            let ns = format!("{what} namespace {nsid}");
            if n.get("enable").and_then(Value::as_i64) == Some(0) {
                notes.push(format!("{ns}: disabled in nvmet: left out"));
                continue;
            }
            let Some(path) = attr(n, "device", "path") else {
                notes.push(format!("{ns}: no device.path: left out"));
                continue;
            };
            let _ = write!(
                subsystems,
                "[[subsystem.namespace]]\nnsid = {nsid}\nbackend = \"file\"\npath = {}\n",
                quoted(&path)
            );
            for id in ["uuid", "nguid", "eui64"] {
                if let Some(v) = attr(n, "device", id) {
                    let _ = writeln!(subsystems, "{id} = {}", quoted(&v));
                }
            }
            let grpid = n.get("ana_grpid").map(ToString::to_string).or_else(|| attr(n, "ana", "grpid"));
            if let Some(g) = grpid.filter(|g| g != "1") {
                let _ = writeln!(subsystems, "ana_group = {g}");
            }
            if attr(n, "resv", "enable").is_some_and(|v| v == "0") {
                notes.push(format!("{ns}: resv.enable 0: p2pnvmf answers reservation commands on every namespace"));
            }
        }
        subsystems.push('\n');
    }
    let _ = writeln!(out, "# Imported from nvmetcli's JSON by `p2pnvmf import-nvmetcli`.");
    for n in &notes {
        let _ = writeln!(out, "# not carried over: {n}");
    }
    out.push('\n');
    out += &listeners;
    out += &subsystems;
    if !groups.is_empty() {
        let _ = writeln!(out, "[ana]\ngroups = {{ {} }}", groups.join(", "));
    }
    Ok(Imported { toml: out, notes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pnvmf_config::{Backend, Config, Transport};

    /// A configuration as nvmetcli saves it: a TCP and an RDMA port, an FC one, a subsystem
    /// named as blktests names them with a keyed host, one open to any host, one on no port,
    /// one passthru.
    const SAVED: &str = r#"{
      "hosts": [
        {"nqn": "nqn.2014-08.org.nvmexpress:uuid:0f01fb42-9f7f-4856-b0b3-51e60b8de349",
         "dhchap": {"key": "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:", "hash": "hmac(sha512)", "dhgroup": "ffdhe3072"}},
        {"nqn": "nqn.2014-08.org.nvmexpress:uuid:plain"}
      ],
      "ports": [
        {"addr": {"adrfam": "ipv4", "traddr": "192.0.2.10", "treq": "not specified", "trsvcid": "4420", "trtype": "tcp"},
         "ana_groups": [{"ana": {"state": "optimized"}, "grpid": 1}, {"ana": {"state": "inaccessible"}, "grpid": 3}],
         "param": {"inline_data_size": "-1", "pi_enable": "0"}, "portid": 1, "referrals": [],
         "subsystems": ["blktests-subsystem-1", "nqn.2026-12.io.example:any"]},
        {"addr": {"adrfam": "ipv4", "traddr": "192.0.2.10", "treq": "not specified", "trsvcid": "4421", "trtype": "rdma"},
         "ana_groups": [{"ana": {"state": "optimized"}, "grpid": 1}, {"ana": {"state": "inaccessible"}, "grpid": 2},
                        {"ana": {"state": "optimized"}, "grpid": 3}],
         "param": {"inline_data_size": "16384", "pi_enable": "0"}, "portid": 2,
         "referrals": [{"addr": {"traddr": "192.0.2.11", "trsvcid": "4420", "trtype": "tcp"}, "name": "other"}],
         "subsystems": ["blktests-subsystem-1", "nqn.2026-12.io.example:pt"]},
        {"addr": {"adrfam": "fc", "traddr": "nn-0x1:pn-0x2", "trtype": "fc"}, "portid": 3, "subsystems": []}
      ],
      "subsystems": [
        {"allowed_hosts": ["nqn.2014-08.org.nvmexpress:uuid:0f01fb42-9f7f-4856-b0b3-51e60b8de349", "nqn.2014-08.org.nvmexpress:uuid:plain"],
         "attr": {"allow_any_host": "0", "cntlid_max": "2000", "cntlid_min": "1001", "firmware": "6.12.118",
                  "model": "Linux", "pi_enable": "0", "qid_max": "128", "serial": "8b6c1f0c9a0e7d21", "version": "1.3"},
         "namespaces": [
           {"ana": {"grpid": "1"}, "ana_grpid": 1,
            "device": {"nguid": "00000000-0000-0000-0000-000000000000", "path": "/dev/loop0", "uuid": "91fdba0d-f87b-4c25-b80f-db7be1418b9e"},
            "enable": 1, "nsid": 1, "resv": {"enable": "0"}},
           {"ana_grpid": 2, "device": {"nguid": "00112233-4455-6677-8899-aabbccddeeff", "path": "/srv/ns2.img", "uuid": "c0e5f2d6-8a8e-4cb5-9b4e-0a3f4b5c6d7e"},
            "enable": 1, "nsid": 2, "resv": {"enable": "1"}},
           {"device": {"path": "/dev/loop9"}, "enable": 0, "nsid": 3}
         ],
         "nqn": "blktests-subsystem-1"},
        {"allowed_hosts": [], "attr": {"allow_any_host": "1", "serial": "0123456789abcdef", "version": "1.4", "ieee_oui": "0x000000"},
         "namespaces": [{"device": {"path": "/dev/ram0", "uuid": "11111111-2222-4333-8444-555555555555"}, "enable": 1, "nsid": 1}],
         "nqn": "nqn.2026-12.io.example:any"},
        {"allowed_hosts": [], "attr": {"allow_any_host": "1"}, "namespaces": [], "nqn": "nqn.2026-12.io.example:nowhere"},
        {"allowed_hosts": [], "attr": {"allow_any_host": "1"}, "namespaces": [],
         "passthru": [{"device": {"path": "/dev/nvme0"}, "enable": 1}], "nqn": "nqn.2026-12.io.example:pt"}
      ]
    }"#;

    #[test]
    fn a_saved_nvmet_configuration_becomes_one_p2pnvmf_serves_with_a_line_per_loss() {
        let imported = import(SAVED).unwrap();
        let cfg = Config::parse(&imported.toml, "imported").unwrap_or_else(|e| panic!("{e}\n{}", imported.toml));
        let l: Vec<_> =
            cfg.listeners.iter().map(|l| (l.name.as_str(), l.transport, l.port, l.inline_data_size)).collect();
        assert_eq!(l, [("port1", Transport::Tcp, 4420, 8192), ("port2", Transport::Rdma, 4421, 16384)]);
        assert_eq!(cfg.subsystems.len(), 2, "{}", imported.toml);
        let s = &cfg.subsystems[0];
        assert_eq!(
            (s.nqn.as_str(), s.serial.as_str(), s.model.as_str()),
            ("blktests-subsystem-1", "8b6c1f0c9a0e7d21", "Linux")
        );
        assert_eq!(s.listeners.as_deref(), Some(&["port1".to_string(), "port2".to_string()][..]));
        assert!(!s.allow_any_host);
        let hosts: Vec<_> = s.hosts.iter().map(|h| (h.nqn.as_str(), h.key.is_some())).collect();
        assert_eq!(
            hosts,
            [
                ("nqn.2014-08.org.nvmexpress:uuid:plain", false),
                ("nqn.2014-08.org.nvmexpress:uuid:0f01fb42-9f7f-4856-b0b3-51e60b8de349", true)
            ]
        );
        assert_eq!(s.hosts[1].dhgroup, p2pnvmf_nvmf::auth::ffdhe::id("ffdhe3072").unwrap());
        // Disabled namespace 3 is left out; the kernel's zero NGUID stays unreported.
        assert_eq!(s.namespaces.len(), 2);
        let ns1 = &s.namespaces[0];
        assert_eq!(ns1.backend, Backend::File { path: "/dev/loop0".into(), size: None });
        assert_eq!(ns1.nguid, Some([0; 16]));
        assert_eq!(ns1.uuid.map(|u| u[0]), Some(0x91));
        assert_eq!(s.namespaces[1].nguid.map(|u| u[15]), Some(0xff));
        assert!(cfg.subsystems[1].allow_any_host);
        for want in [
            "port 2: referral other to 192.0.2.11:4420: referrals are not supported",
            "ANA group 3: 'inaccessible' on port 1; 'optimized' on port 2: a p2pnvmf head gives a group one state",
            "port 3: transport 'fc' (p2pnvmf serves tcp and rdma): left out",
            "subsystem blktests-subsystem-1: attr.firmware '6.12.118': p2pnvmf reports its own",
            "subsystem nqn.2026-12.io.example:any: attr.version '1.4': p2pnvmf reports its own",
            "subsystem blktests-subsystem-1: host nqn.2014-08.org.nvmexpress:uuid:0f01fb42-9f7f-4856-b0b3-51e60b8de349: dhchap hash 'hmac(sha512)'",
            "subsystem blktests-subsystem-1 namespace 1: resv.enable 0: p2pnvmf answers reservation commands on every namespace",
            "subsystem blktests-subsystem-1 namespace 3: disabled in nvmet: left out",
            "subsystem nqn.2026-12.io.example:nowhere: on no tcp or rdma port (the kernel does not serve it): left out",
            "subsystem nqn.2026-12.io.example:pt: a passthru controller cannot be carried over: left out",
        ] {
            assert!(imported.notes.iter().any(|n| n.starts_with(want)), "no note '{want}' in {:#?}", imported.notes);
            assert!(imported.toml.contains(&format!("# not carried over: {want}")), "{}", imported.toml);
        }
        assert_eq!(imported.notes.len(), 10, "{:#?}", imported.notes);
        // ANA: the group both ports agree on, the namespace's group, the controller IDs.
        assert_eq!(cfg.ana.groups, [(2, p2pnvmf_config::AnaState::Inaccessible)].into_iter().collect());
        assert_eq!((s.namespaces[0].ana_group, s.namespaces[1].ana_group), (1, 2));
        assert_eq!((s.cntlid_min, s.cntlid_max), (1001, 2000));
    }

    #[test]
    fn what_is_not_nvmetcli_json_is_refused_with_the_reason() {
        assert!(import("{").unwrap_err().starts_with("not nvmetcli's JSON: "));
        assert!(import("[1]").unwrap_err().contains("not an object"));
        let e = import(r#"{"ports": [{"portid": 1, "addr": {"trtype": "loop"}}], "subsystems": []}"#).unwrap_err();
        assert_eq!(e, "no tcp or rdma port to listen on: nothing could be served");
        let bad = r#"{"ports": [{"portid": 1, "addr": {"trtype": "tcp", "traddr": "host.example", "trsvcid": "4420"}},
                                 {"portid": 2, "addr": {"trtype": "tcp", "traddr": "10.0.0.1", "trsvcid": "x"}},
                                 {"portid": 3, "addr": {"trtype": "tcp", "traddr": "10.0.0.1"}}]}"#;
        let i = import(bad).unwrap();
        assert_eq!(
            i.notes,
            [
                "port 1: traddr 'host.example' is not an IP address: left out",
                "port 2: trsvcid 'x' is not a port number: left out"
            ]
        );
        assert!(
            i.toml.contains("name = \"port3\"\ntransport = \"tcp\"\naddress = \"10.0.0.1\"\nport = 4420\n"),
            "{}",
            i.toml
        );
    }
}
