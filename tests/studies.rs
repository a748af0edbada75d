//! The demo study (`examples/demo.bay`, what `patchbay demo` runs) on SmolLM2-135M: the
//! methodology findings its `expect` lines state were measured, and CI reruns them, so a change
//! that breaks a finding fails. The first run fetches ONNX Runtime and the model.

use std::path::Path;

use patchbay::run::RunOptions;
use patchbay::{demo, runtime};

#[test]
fn demo_study_findings_hold() {
    runtime::ensure(true).unwrap();
    demo::ensure_demo_model(true).unwrap();
    // A copy, so the results land in a temporary folder (the study's paths are relative).
    let tmp = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    std::fs::create_dir(tmp.path().join("shared")).unwrap();
    for file in ["demo.bay", "shared/names.bay"] {
        std::fs::copy(examples.join(file), tmp.path().join(file)).unwrap();
    }
    let exp = patchbay::check::check_file(&tmp.path().join("demo.bay"), None)
        .unwrap_or_else(|d| panic!("{}", d.iter().map(|d| d.render_plain()).collect::<String>()));
    assert!(!exp.expectations.is_empty(), "the study states its findings");
    let report = patchbay::report::run_and_write(&exp, &RunOptions::default()).unwrap();
    for verdict in &report.outcome.verdicts {
        assert!(verdict.holds, "line {}: {}\n{}", verdict.line, verdict.text, verdict.details.join("\n"));
    }
    // The model does the task on every prompt, and the run ends in the report.
    let task = report.outcome.tasks[0].as_ref().unwrap();
    assert_eq!(task.correct, task.prompts, "{task:?}");
    let page = std::fs::read_to_string(tmp.path().join("results/demo.html")).unwrap();
    assert!(page.contains("s2_io") && page.contains("io_s1") && page.contains("gn"));
}
