//! The layering rule of ARCHITECTURE.md, checked: a module of `src/` may import only modules of its own
//! layer or below, so the dependency arrows all point one way and each layer can be read, tested and
//! replaced without the ones above it. An import is any path that names a top-level module: `crate::x`,
//! each name of a group `crate::{x, y::z}` (also over several lines), and a `super::` path that reaches
//! the crate root (`super::x` in `src/a.rs` or `src/a/mod.rs`, `super::super::x` in `src/a/b.rs`).

use std::collections::BTreeMap;
use std::path::Path;

/// Layers, lowest first; the same table as ARCHITECTURE.md's "Layers".
const LAYERS: &[(&str, &[&str])] = &[
    ("foundations", &["error", "values", "signing", "jitter"]),
    ("configuration and wire types", &["config", "manifest", "detection", "scoring"]),
    (
        "frames and models",
        &[
            "images",
            "source",
            "decode",
            "preprocess",
            "resample",
            "backend",
            "model",
            "locate",
            "head",
            "gallery",
            "gps",
            "clock",
        ],
    ),
    ("the core", &["identify", "sighting"]),
    ("the frame path", &["pipeline"]),
    ("outputs and service", &["outbox", "mqtt", "sink", "health", "service"]),
    ("front ends", &["daemon", "eval", "bench", "catalogue"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&module))
}

/// The top-level module a source file belongs to: `src/config/mqtt.rs` -> `config`.
fn module_of(path: &Path, src: &Path) -> String {
    let rel = path.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_string()
}

/// The module path of a source file: `src/config/mqtt.rs` -> [config, mqtt], `src/config/mod.rs` -> [config].
fn module_path(path: &Path, src: &Path) -> Vec<String> {
    let rel = path.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The leading identifier of `s`.
fn ident(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The top-level names after a path prefix: `x::y` -> [x]; `{x, y::{z}, w}` -> [x, y, w].
fn names_after(rest: &str) -> Vec<String> {
    let rest = rest.trim_start();
    let Some(group) = rest.strip_prefix('{') else {
        return vec![ident(rest).to_string()];
    };
    let (mut names, mut depth, mut item_start) = (Vec::new(), 0usize, 0usize);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                names.push(ident(group[item_start..i].trim_start()).to_string());
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                names.push(ident(group[item_start..i].trim_start()).to_string());
                item_start = i + 1;
            }
            _ => {}
        }
    }
    names
}

/// Every top-level module a file at `module` (its module path) names outside comments and its
/// `#[cfg(test)]` module: through `crate::` and through `super::` paths that reach the crate root.
fn imports(text: &str, module: &[String]) -> Vec<String> {
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    // Comments out (from `//` to the end of the line), lines joined so a `use` may span several.
    let code: String = code.lines().map(|l| l.find("//").map_or(l, |i| &l[..i])).collect::<Vec<_>>().join("\n");
    let boundary = |i: usize| !code[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        if boundary(i) {
            out.extend(names_after(&code[i + "crate::".len()..]));
        }
    }
    for (i, _) in code.match_indices("super::") {
        if !boundary(i) {
            continue; // the second `super::` of `super::super::`
        }
        let mut rest = &code[i..];
        let mut up = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            rest = r.trim_start();
            up += 1;
        }
        // At the crate root only when it climbs out of every enclosing module; below it, the path stays
        // inside this file's own top-level module.
        if up == module.len() {
            out.extend(names_after(rest));
        }
    }
    out.retain(|n| n.starts_with(|c: char| c.is_ascii_lowercase()));
    out
}

#[test]
fn imports_finds_groups_and_super_paths() {
    let top = ["pipeline".to_string()];
    let nested = ["config".to_string(), "mqtt".to_string()];
    assert_eq!(imports("use crate::decode::Decoder;", &top), ["decode"]);
    assert_eq!(imports("use crate::{mqtt, sink::{Sink, Sinks}, Error};", &top), ["mqtt", "sink"]);
    assert_eq!(
        imports("use crate::{\n    daemon,\n    // crate::bench\n    health::Health,\n};", &top),
        ["daemon", "health"]
    );
    assert_eq!(
        imports("use super::mqtt::Publisher;\nlet x = super::{outbox, health};", &top),
        ["mqtt", "outbox", "health"]
    );
    assert_eq!(imports("use super::values::Count;", &nested), Vec::<String>::new(), "inside config");
    assert_eq!(imports("use super::super::pipeline::Control;", &nested), ["pipeline"]);
    assert_eq!(imports("pub(crate) fn f() {}", &top), Vec::<String>::new());
    assert_eq!(imports("fn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::daemon;\n}", &top), Vec::<String>::new());
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn imports_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    all.sort();
    let mut violations = Vec::new();
    let mut unknown = BTreeMap::new();
    for path in &all {
        let module = module_of(path, &src);
        if module == "lib" || module == "main" {
            continue; // the crate root and the binary sit above everything
        }
        let Some(own) = layer_of(&module) else {
            unknown.insert(module.clone(), path.display().to_string());
            continue;
        };
        let text = std::fs::read_to_string(path).unwrap();
        for import in imports(&text, &module_path(path, &src)) {
            // `crate::Error` / `crate::Result` are re-exports of `error`.
            let Some(theirs) = layer_of(&import) else { continue };
            if theirs > own {
                violations.push(format!(
                    "{}: `{module}` ({}) imports `{import}` ({})",
                    path.strip_prefix(&src).unwrap().display(),
                    LAYERS[own].0,
                    LAYERS[theirs].0
                ));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "modules missing from the layer table (add them here and to ARCHITECTURE.md): {unknown:?}"
    );
    violations.sort();
    violations.dedup();
    assert!(violations.is_empty(), "imports pointing up the layers:\n{}", violations.join("\n"));
}

/// Within a layer, no two modules import each other (a cycle would make them one module in disguise).
#[test]
fn no_module_cycles_within_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut edges: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for path in &all {
        let module = module_of(path, &src);
        let text = std::fs::read_to_string(path).unwrap();
        for import in imports(&text, &module_path(path, &src)) {
            if import != module && layer_of(&import).is_some() {
                edges.entry(module.clone()).or_default().insert(import);
            }
        }
    }
    let mut cycles = Vec::new();
    for (a, targets) in &edges {
        for b in targets {
            if a < b && edges.get(b).is_some_and(|t| t.contains(a)) {
                cycles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(cycles.is_empty(), "modules importing each other: {cycles:?}");
}
