//! nvmf's modules import each other in no circle: executors (fabrics, admin, io, discovery)
//! below the dispatcher (queue), and the data types below them. Read from the sources: every
//! `crate::` path outside comments and test modules, with names the crate root re-exports
//! traced to the module that defines them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Code without comments, and without what follows `#[cfg(test)]` (test modules come last).
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n")
}

/// The first segment of every item of a `use`/path tree after `crate::`.
fn first_segments(tree: &str, out: &mut BTreeSet<String>) {
    let tree = tree.trim();
    if let Some(inner) = tree.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        let (mut depth, mut start) = (0, 0);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    first_segments(&inner[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        first_segments(&inner[start..], out);
        return;
    }
    let name: String = tree.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    if !name.is_empty() {
        out.insert(name);
    }
}

/// Names used through `crate::` in `code`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if rest.starts_with('{') {
            let mut depth = 0;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(rest.len(), |(j, _)| j + 1);
            first_segments(&rest[..end], &mut names);
        } else {
            first_segments(rest, &mut names);
        }
    }
    names
}

#[test]
fn modules_import_each_other_in_no_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules: BTreeMap<String, String> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs") && !p.ends_with("lib.rs"))
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    assert!(modules.len() >= 10, "nvmf's modules not found under {}", src.display());
    // What the crate root re-exports: `pub use module::{A, B};` → A and B live in `module`.
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let mut reexport = BTreeMap::new();
    for line in lib.lines().filter_map(|l| l.trim().strip_prefix("pub use ")) {
        let (module, items) = line.trim_end_matches(';').split_once("::").unwrap();
        let mut names = BTreeSet::new();
        first_segments(items, &mut names);
        for n in names {
            reexport.insert(n, module.to_string());
        }
    }
    let mut edges: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (m, text) in &modules {
        let to = crate_paths(&code(text))
            .into_iter()
            .filter_map(|n| if modules.contains_key(&n) { Some(n) } else { reexport.get(&n).cloned() })
            .filter(|n| n != m)
            .collect();
        edges.insert(m, to);
    }
    // Depth-first search; a module met again on the current path closes a circle.
    fn visit<'a>(
        m: &'a str,
        edges: &'a BTreeMap<&str, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| *p == m) {
            return Some(path[i..].iter().chain([&m]).map(|s| s.to_string()).collect());
        }
        if !done.insert(m) {
            return None;
        }
        path.push(m);
        for next in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in edges.keys() {
        if let Some(circle) = visit(m, &edges, &mut Vec::new(), &mut done) {
            panic!("nvmf's modules import each other in a circle: {}\nedges: {edges:#?}", circle.join(" -> "));
        }
    }
    // The dispatcher is above every executor.
    for executor in ["fabrics", "admin", "io"] {
        assert!(edges["queue"].contains(executor), "queue does not dispatch to {executor}");
    }
}

#[test]
fn the_reader_finds_what_a_use_tree_names() {
    let names = crate_paths("use crate::{Status, a::{B, C}, wire::{Sqe, io_opcode as op}};\nlet x = crate::ctrl::AEN;");
    let want: BTreeSet<String> = ["Status", "a", "wire", "ctrl"].map(String::from).into();
    assert_eq!(names, want);
    assert_eq!(code("a // crate::x\n#[cfg(test)]\nuse crate::y;"), "a ");
}
