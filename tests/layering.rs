//! The layering rule of ARCHITECTURE.md, checked: a module of `src/` may import (`crate::x`, `super::x`
//! at the top level) only modules of its own layer or below, so the dependency arrows all point one way
//! and each layer can be read, tested and replaced without the ones above it.

use std::collections::BTreeMap;
use std::path::Path;

/// Layers, lowest first; the same table as ARCHITECTURE.md's "Layers".
const LAYERS: &[(&str, &[&str])] = &[
    ("foundations", &["error", "values", "signing"]),
    ("configuration and wire types", &["config", "manifest", "detection", "scoring"]),
    (
        "frames and models",
        &["images", "source", "decode", "preprocess", "backend", "model", "head", "gallery", "gps", "clock"],
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

/// Every `crate::name` a file mentions outside comments and `#[cfg(test)]` modules.
fn imports(text: &str) -> Vec<String> {
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = Vec::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let name: String = rest[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                out.push(name);
            }
            rest = &rest[i + 7..];
        }
    }
    out
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
        for import in imports(&text) {
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
        for import in imports(&text) {
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
