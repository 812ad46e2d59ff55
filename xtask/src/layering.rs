//! The module layering check: no module of a crate's `src/` may reach, through `crate::…` and `super::…`
//! paths, a module that reaches it back. A cycle means neither module can be read, tested or moved without
//! the other; the check names the cycle so that it is broken where it is made, not patched.
//!
//! Each file is a node named by its module path (`actors/run.rs` is `actors::run`, `http/mod.rs` is
//! `http`); a path `crate::a::b::Item` is an edge to the longest prefix that names a module (`a::b` when
//! `a/b.rs` exists, else `a`). A parent reaching its children by relative paths (`mod.rs` naming
//! `runs::create`) is not an edge: a parent contains its children. Comments and the `#[cfg(test)]` part
//! of a file (by convention its end) are not read: tests may use anything.
//!
//! Run it with `cargo xtask layering`; `cargo test --workspace` (and so `cargo xtask test`) runs it too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose modules must not form a cycle, relative to the workspace root.
pub const CHECKED: &[&str] = &["crates/node/src", "crates/engine/src"];

/// A module graph: each module and the modules it reaches.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// Checks every crate of [`CHECKED`] under `workspace`; the error names each cycle found.
pub fn check(workspace: &Path) -> Result<(), String> {
    let mut problems = Vec::new();
    for src in CHECKED {
        let graph = graph_of(&workspace.join(src))?;
        if let Some(cycle) = find_cycle(&graph) {
            problems.push(format!("`{src}` has a module cycle: {}", cycle.join(" -> ")));
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(problems.join("\n")) }
}

/// The module graph of the crate whose sources are in `src`.
pub fn graph_of(src: &Path) -> Result<Graph, String> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    let modules: BTreeMap<String, PathBuf> =
        files.into_iter().filter_map(|file| module_of(src, &file).map(|module| (module, file))).collect();
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    let mut graph = Graph::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).map_err(|err| format!("cannot read {}: {err}", file.display()))?;
        let targets = graph.entry(module.clone()).or_default();
        for path in referenced_paths(&code_of(&text), module) {
            if let Some(target) = longest_module(&path, &known)
                && &target != module
                && !target.is_empty()
            {
                targets.insert(target);
            }
        }
    }
    Ok(graph)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|err| format!("cannot list {}: {err}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|err| format!("cannot list {}: {err}", dir.display()))?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// `actors/run.rs` → `actors::run`, `http/mod.rs` → `http`; the crate root (`lib.rs`, `main.rs`) is `""`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> =
        relative.iter().map(|part| part.to_string_lossy().trim_end_matches(".rs").to_owned()).collect();
    if parts.last().is_some_and(|last| last == "mod") {
        parts.pop();
    }
    if parts.len() == 1 && parts.first().is_some_and(|only| only == "lib" || only == "main") {
        parts.clear();
    }
    Some(parts.join("::"))
}

/// The code of a file without comments and without its `#[cfg(test)]` tail.
fn code_of(text: &str) -> String {
    let mut code = String::with_capacity(text.len());
    for line in text.lines() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let line = match line.find("//") {
            Some(at) => line.get(..at).unwrap_or(line),
            None => line,
        };
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// Every absolute module path a file names through `crate::` or `super::`, groups (`crate::{a, b::c}`)
/// expanded, as segments from the crate root.
fn referenced_paths(code: &str, module: &str) -> Vec<Vec<String>> {
    let mut own: Vec<String> = module.split("::").filter(|s| !s.is_empty()).map(str::to_owned).collect();
    // `super` of `actors/run.rs` is `actors`; of `http/mod.rs` (module `http`), the crate root.
    own.pop();
    let mut paths = Vec::new();
    let bytes = code.as_bytes();
    let mut at = 0;
    while at < code.len() {
        let rest = code.get(at..).unwrap_or_default();
        let starts_word = at == 0 || bytes.get(at - 1).is_none_or(|b| !(b.is_ascii_alphanumeric() || *b == b'_'));
        let (base, skip) = if starts_word && rest.starts_with("crate::") {
            (Vec::new(), "crate::".len())
        } else if starts_word && rest.starts_with("super::") {
            (own.clone(), "super::".len())
        } else {
            at += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        let (tree, used) = path_tree(rest.get(skip..).unwrap_or_default());
        for tail in tree {
            let mut path = base.clone();
            path.extend(tail);
            paths.push(path);
        }
        at += skip + used.max(1);
    }
    paths
}

/// Parses `a::b::{c, d::e}` at the start of `text` into its leaf paths; returns them and the bytes read.
fn path_tree(text: &str) -> (Vec<Vec<String>>, usize) {
    let mut prefix = Vec::new();
    let mut at = 0;
    loop {
        let rest = text.get(at..).unwrap_or_default();
        if rest.starts_with('{') {
            let mut leaves = Vec::new();
            at += 1;
            loop {
                let inner = text.get(at..).unwrap_or_default();
                let skipped = inner.len() - inner.trim_start_matches([' ', '\n', '\t', ',']).len();
                at += skipped;
                let inner = text.get(at..).unwrap_or_default();
                if inner.is_empty() {
                    return (leaves, at);
                }
                if inner.starts_with('}') {
                    at += 1;
                    break;
                }
                let (children, used) = path_tree(inner);
                for child in children {
                    let mut path = prefix.clone();
                    path.extend(child);
                    leaves.push(path);
                }
                at += used.max(1);
                // Skip `as alias` and anything else up to the next item of the group.
                let inner = text.get(at..).unwrap_or_default();
                let to_next = inner.find([',', '}']).unwrap_or(inner.len());
                at += to_next;
            }
            return (leaves, at);
        }
        let ident_len = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '*')).unwrap_or(rest.len());
        if ident_len == 0 {
            return (vec![prefix], at);
        }
        prefix.push(rest.get(..ident_len).unwrap_or_default().to_owned());
        at += ident_len;
        if text.get(at..).unwrap_or_default().starts_with("::") {
            at += 2;
        } else {
            return (vec![prefix], at);
        }
    }
}

/// The longest prefix of `path` that names a module of `known`.
fn longest_module(path: &[String], known: &BTreeSet<String>) -> Option<String> {
    (1..=path.len()).rev().map(|n| path.get(..n).unwrap_or_default().join("::")).find(|name| known.contains(name))
}

/// A cycle of `graph`, as the modules along it with the first repeated at the end, if there is one.
pub fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle: Vec<String> = stack.get(from..).unwrap_or_default().to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Open);
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph.keys().find_map(|node| visit(node, graph, &mut marks, &mut Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &str)]) -> Graph {
        let mut graph = Graph::new();
        for (from, to) in edges {
            graph.entry((*from).to_owned()).or_default().insert((*to).to_owned());
            graph.entry((*to).to_owned()).or_default();
        }
        graph
    }

    #[test]
    fn a_cycle_is_found_and_named() {
        let cycle = find_cycle(&graph(&[("shared", "actors::run"), ("actors::run", "shared"), ("http", "shared")]));
        let cycle = cycle.expect("a cycle");
        assert_eq!(cycle.first(), cycle.last());
        assert!(cycle.contains(&"shared".to_owned()) && cycle.contains(&"actors::run".to_owned()));
        assert!(find_cycle(&graph(&[("http", "shared"), ("shared", "error"), ("http", "error")])).is_none());
    }

    #[test]
    fn paths_groups_and_super_are_read() {
        let code = code_of(
            "use crate::{actors::run::{Run, Step}, error::X as Y};\nuse super::writer::Commit;\n\
             // crate::ignored::Thing\nfn f() { crate::shared::now(); }\n#[cfg(test)]\nmod tests { use crate::tested; }\n",
        );
        let paths: Vec<String> = referenced_paths(&code, "actors::learning").iter().map(|p| p.join("::")).collect();
        assert_eq!(
            paths,
            ["actors::run::Run", "actors::run::Step", "error::X", "actors::writer::Commit", "shared::now"]
        );
    }

    #[test]
    fn node_and_engine_modules_form_no_cycle() {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default();
        if let Err(problem) = check(&workspace) {
            panic!("{problem}");
        }
    }
}
