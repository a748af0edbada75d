//! The architecture, as a test: every top-level module of `src/` uses only the modules listed
//! for it here, and the list is in dependency order, so there is no import cycle and the
//! compiler stages depend only downward: syntax -> check -> plan -> run -> report, over the model layer
//! (model contract, onnx, runtime, import) and the leaves (diagnostics, errors, cache).
//! Unit tests (`#[cfg(test)]` modules, `tests.rs` files) may use anything.

use std::collections::BTreeSet;
use std::path::Path;

/// Each module and what it may use, lowest first.
const LAYERS: &[(&str, &[&str])] = &[
    ("diag", &[]),
    ("error", &[]),
    ("cache", &[]),
    ("files", &[]),
    ("fetch", &["cache", "error"]),
    ("model", &["error"]),
    ("onnx", &["model", "error"]),
    ("runtime", &["model", "onnx", "cache", "fetch", "error"]),
    ("import", &["model", "onnx", "cache", "error"]),
    ("demo", &["model", "import", "cache", "fetch", "error"]),
    ("predict", &["model", "runtime", "error"]),
    ("test_support", &["model", "import"]),
    ("syntax", &["diag", "error"]),
    ("ir", &["diag", "model", "runtime"]),
    ("check", &["syntax", "ir", "diag", "model", "cache", "error"]),
    ("plan", &["ir", "diag", "model"]),
    ("run", &["plan", "ir", "diag", "model", "onnx", "runtime", "files", "error"]),
    ("report", &["run", "plan", "ir", "model", "runtime", "files", "error"]),
    ("cluster", &["ir", "model", "runtime", "error"]),
];

/// Macros exported at the crate root, by the module that defines them.
const MACROS: &[(&str, &str)] = &[("fixable", "error"), ("bail_fixable", "error")];

fn sources(module: &str) -> Vec<std::path::PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let file = src.join(format!("{module}.rs"));
    if file.is_file() {
        return vec![file];
    }
    let mut out = vec![];
    let mut stack = vec![src.join(module)];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && path.file_name().unwrap() != "tests.rs" {
                out.push(path);
            }
        }
    }
    out
}

/// The top-level modules a source file names through `crate::` paths (outside comments and
/// unit tests).
fn used_modules(text: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        if line.starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                used.extend(group.split(',').map(|item| item.trim().split("::").next().unwrap().to_string()));
            } else {
                used.insert(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
            }
        }
    }
    used.into_iter()
        .map(|m| MACROS.iter().find(|(name, _)| *name == m).map_or(m, |(_, module)| module.to_string()))
        .filter(|m| !m.is_empty() && m != "self")
        .collect()
}

#[test]
fn modules_depend_only_downward() {
    let mut problems = vec![];
    for (i, (module, allowed)) in LAYERS.iter().enumerate() {
        for dep in *allowed {
            let lower = LAYERS[..i].iter().any(|(m, _)| m == dep);
            assert!(lower, "LAYERS lists `{dep}` above `{module}`, which uses it");
        }
        let files = sources(module);
        assert!(!files.is_empty(), "no sources for `{module}`");
        for file in files {
            for dep in used_modules(&std::fs::read_to_string(&file).unwrap()) {
                if dep != *module && !allowed.contains(&dep.as_str()) {
                    problems.push(format!("{} uses `{dep}`", file.display()));
                }
            }
        }
    }
    assert!(problems.is_empty(), "dependencies against the layering:\n{}", problems.join("\n"));
}

/// Every module of the library is placed in a layer.
#[test]
fn every_module_has_a_layer() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    for line in lib.lines() {
        if let Some(name) = line.trim().strip_prefix("pub mod ").and_then(|l| l.strip_suffix(';')) {
            assert!(
                LAYERS.iter().any(|(m, _)| *m == name),
                "src/lib.rs declares `{name}`, which LAYERS does not place"
            );
        }
    }
}

#[test]
fn the_scanner_reads_use_groups_and_stops_at_unit_tests() {
    let text = "use crate::{cache, fetch::pip};\n// crate::run in a comment\nlet x = crate::model::Dim;\nuse crate::bail_fixable;\n#[cfg(test)]\nuse crate::run;\n";
    let used: Vec<String> = used_modules(text).into_iter().collect();
    assert_eq!(used, ["cache", "error", "fetch", "model"]);
}
