//! The `.bay` front end on arbitrary UTF-8: `syntax::parse`, and, for inputs that parse,
//! `check::check_file` against a tiny imported model, with every diagnostic rendered. Nothing may
//! panic, hang or allocate without bound, whatever the text.
//!
//! Each process works in `/tmp/patchbay-fuzz-language-<pid>/`, made once at start-up:
//! `model/` (a tiny synthetic Llama, imported), `shared/names.bay` and `facts.csv` (so the
//! examples' `include` and file dataset resolve), and `exp.bay`, rewritten for every input. An
//! input without a `model` statement gets `model "model"` prepended, so most inputs reach the
//! checker; the corpus seeds say `model "model"` themselves.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use patchbay::import::{self, ImportOptions};
use patchbay::model::Architecture;
use patchbay::syntax::{Diagnostic, StatementKind};
use patchbay::test_support::synth::{self, WeightDtype};

const PREFIX: &str = "patchbay-fuzz-language-";

/// The experiment file every input is written to.
fn experiment_path() -> &'static Path {
    static EXP: OnceLock<PathBuf> = OnceLock::new();
    EXP.get_or_init(|| {
        let tmp = std::env::temp_dir();
        remove_stale(&tmp);
        let dir = tmp.join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("shared")).unwrap();
        let ckpt = dir.join("ckpt");
        synth::tiny(Architecture::Llama, 2).write_hf_folder(&ckpt, WeightDtype::F32).unwrap();
        import::import(&ImportOptions { source: ckpt.clone(), out: dir.join("model"), force: false, quiet: true })
            .unwrap();
        std::fs::remove_dir_all(&ckpt).unwrap();
        std::fs::write(dir.join("shared/names.bay"), include_str!("../../examples/shared/names.bay")).unwrap();
        std::fs::write(dir.join("facts.csv"), include_str!("../../examples/facts.csv")).unwrap();
        dir.join("exp.bay")
    })
}

/// Work folders of fuzzing processes that are gone.
fn remove_stale(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn render(diagnostics: &[Diagnostic]) {
    for d in diagnostics {
        let _ = d.render_plain();
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let exp = experiment_path();
    // Parsed as if it were `exp.bay`, so relative includes resolve in the work folder.
    let ast = match patchbay::syntax::parse(text, exp) {
        Ok(ast) => ast,
        Err(diagnostics) => return render(&diagnostics),
    };
    let has_model = ast.statements.iter().any(|s| matches!(s.kind, StatementKind::Model { .. }));
    let source = if has_model { text.to_string() } else { format!("model \"model\"\n{text}") };
    std::fs::write(exp, source).unwrap();
    match patchbay::check::check_file(exp, None) {
        Ok(_) => {}
        Err(diagnostics) => render(&diagnostics),
    }
});
