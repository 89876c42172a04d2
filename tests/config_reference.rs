//! The README's configuration reference (the TOML block under "### Configuration") names
//! exactly the keys the parser accepts, table by table: the parser's own list comes from its
//! refusal of an unknown key ("unknown field `zz`, expected one of ...").

use std::collections::{BTreeMap, BTreeSet};

/// Keys per table header in the README's reference, commented-out keys included.
fn readme_keys() -> BTreeMap<String, BTreeSet<String>> {
    let readme = include_str!("../README.md");
    let start = readme.find("### Configuration\n\n```toml\n").expect("the README has a configuration reference");
    let block = &readme[start..];
    let block = &block[block.find("```toml\n").unwrap() + 8..];
    let block = &block[..block.find("\n```").unwrap()];
    let mut keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut table = String::new();
    for line in block.lines() {
        let line = line.trim_start();
        if line.starts_with('[') {
            table = line.split_whitespace().next().unwrap().trim_matches(|c| c == '[' || c == ']').to_string();
            keys.entry(table.clone()).or_default();
            // A sub-table is a key of its parent (`[[subsystem.host]]`: `host` in `subsystem`).
            if let Some((parent, child)) = table.rsplit_once('.') {
                keys.entry(parent.to_string()).or_default().insert(child.to_string());
            }
        } else if let Some((k, _)) = line.trim_start_matches("# ").split_once(" = ")
            && k.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            keys.entry(table.clone()).or_default().insert(k.to_string());
        }
    }
    keys
}

/// The keys the parser accepts in `table`, from its error for an unknown one.
fn parser_keys(table: &str) -> BTreeSet<String> {
    let listener = "[[listener]]\ntransport = \"tcp\"\naddress = \"127.0.0.1\"\n";
    let subsystem = "[[subsystem]]\nnqn = \"nqn.x\"\nallow_any_host = true\n";
    let src = match table {
        "listener" => format!("{listener}zz = 1\n"),
        "subsystem" => format!("{listener}{subsystem}zz = 1\n"),
        "subsystem.host" | "subsystem.namespace" => format!("{listener}{subsystem}[[{table}]]\nzz = 1\n"),
        "p2p.provider" => format!("{listener}[[p2p.provider]]\nzz = 1\n"),
        "" => format!("zz = 1\n{listener}"),
        other => format!("{listener}[{other}]\nzz = 1\n"),
    };
    let e = p2pnvmf_config::Config::parse(&src, "t.toml").expect_err("an unknown key is refused").to_string();
    let list = e.split("expected ").nth(1).unwrap_or_else(|| panic!("{table}: {e}"));
    list.split('`').skip(1).step_by(2).map(String::from).collect()
}

#[test]
fn the_readme_reference_lists_exactly_what_the_parser_accepts() {
    let readme = readme_keys();
    let tables: BTreeSet<&str> = [
        "listener",
        "subsystem",
        "subsystem.host",
        "subsystem.namespace",
        "p2p",
        "p2p.provider",
        "metrics",
        "limits",
        "reservations",
        "ana",
        "cluster",
        "performance",
    ]
    .into();
    assert_eq!(readme.keys().map(String::as_str).collect::<BTreeSet<_>>(), tables, "tables in the README");
    let top: BTreeSet<String> = tables.iter().filter(|t| !t.contains('.')).map(|t| t.to_string()).collect();
    assert_eq!(top, parser_keys(""), "top-level tables: README (left) vs parser (right)");
    for t in tables {
        assert_eq!(readme[t], parser_keys(t), "keys of [{t}]: README (left) vs parser (right)");
    }
}
