//! Every file in examples/ passes `check` against the SmolLM2 demo model, when it is installed.
//! Without it the test prints a skip note. Set PATCHBAY_TEST_SMOL_TOKENIZER to a SmolLM2
//! `tokenizer.json` to check against a fixture manifest with SmolLM2's shapes instead.

#[path = "support/lang_fixture.rs"]
mod fixture;

use std::path::PathBuf;

fn example_files() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bay") && p.file_name().is_some_and(|n| n != "names.bay"))
        .collect();
    files.sort();
    files
}

#[test]
fn examples_check() {
    let real = patchbay::setup::models_dir().join(patchbay::setup::DEMO_MODEL);
    let _guard;
    if !real.join("patchbay.json").is_file() {
        match std::env::var_os("PATCHBAY_TEST_SMOL_TOKENIZER") {
            None => {
                eprintln!("skip: {} is not installed (run `patchbay demo`); examples not checked", real.display());
                return;
            }
            Some(tok) => {
                let ws = tempfile::tempdir().unwrap();
                let dir = ws.path().join(patchbay::setup::DEMO_MODEL);
                fixture::write_model(&dir, "smollm2-135m", fixture::config(30, 9, 3, 576, 64, 1536));
                std::fs::copy(tok, dir.join("tokenizer.json")).unwrap();
                std::env::set_var("PATCHBAY_MODELS", ws.path());
                _guard = ws;
            }
        }
    }
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
