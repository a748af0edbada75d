//! `patchbay run` on tiny synthetic models: the fast executor against the reference executor,
//! and the invariants of activation patching.

use std::path::{Path, PathBuf};

use patchbay::model::Architecture;
use patchbay::run::{self, results::Row, segments::Segments, Executor, RunOptions};
use patchbay::test_support::synth;

#[path = "support/sweep_fixture.rs"]
mod sweep_fixture;

/// A tiny model of `arch` imported into `<dir>/model`, and an experiment file using it.
fn setup(dir: &Path, arch: Architecture, body: &str) -> PathBuf {
    sweep_fixture::setup_model(dir, arch, 3, body)
}

fn run_file(file: &Path, executor: Executor) -> run::Outcome {
    run_file_on(file, executor, "cpu")
}

fn run_file_on(file: &Path, executor: Executor, device: &str) -> run::Outcome {
    let exp = patchbay::check::check_file(file, Some(device.parse().unwrap()))
        .unwrap_or_else(|d| panic!("{:?}", d.iter().map(|d| d.render_terminal()).collect::<Vec<_>>()));
    patchbay::report::run_and_write(&exp, &RunOptions { executor, ..RunOptions::default() }).unwrap().outcome
}

/// Whether the fast path's layer segments of the model in `<dir>/model` compute only the positions
/// from the first changed one on.
fn uses_suffix_segments(dir: &Path) -> bool {
    let model = patchbay::model::ModelDir::open(&dir.join("model")).unwrap();
    let hooks = ["blocks.1.attn.hook_z".to_string()];
    Segments::new(&model, &hooks, patchbay::runtime::Device::Cpu, None).unwrap().suffix
}

/// Every cell of `a` equals `b`'s within 1e-4 (absolute on normalised values, relative on raw).
fn assert_rows_close(a: &[Row], b: &[Row]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!((&x.target, &x.component, x.variant), (&y.target, &y.component, y.variant));
        for (cx, cy) in x.cells.iter().zip(&y.cells) {
            let pairs = [
                (cx.value, cy.value),
                (Some(cx.effect), Some(cy.effect)),
                (cx.patched, cy.patched),
                (cx.corrupted, cy.corrupted),
            ];
            for (u, v) in pairs {
                match (u, v) {
                    (Some(u), Some(v)) => {
                        let tol = 1e-4 * (1.0 + u.abs().max(v.abs()));
                        assert!((u - v).abs() <= tol, "{} {}: {u} vs {v}", x.target, x.component);
                    }
                    (u, v) => assert_eq!(u.is_some(), v.is_some()),
                }
            }
        }
    }
}

const ALL_KINDS: &str = r#"
corruption s2_io = replace S2 with IO
corruption gn = noise on S2 scale 3 samples 2 seed 7
corruption zero = zero ablation
corruption mean = mean ablation
corruption other = resample ablation seed 3
patch heads = attn.hook_z layers all heads all
patch kv = attn.hook_v layers 1 heads all positions [S2, end]
patch resid = hook_resid_pre layers all positions each
patch joint = {hook_attn_out, hook_mlp_out} layers 0 positions end
patch win = hook_mlp_out layers all window [2] with summation baseline
patch emb = hook_embed positions [S2]
metric ld = logit_diff normalized
metric ldp = logit_diff normalized per_prompt_mean
metric p = prob
metric lp = logprob
metric pd = prob_diff
metric kl = kl
sweep { direction: [denoise, noise] }
"#;

#[test]
fn fast_path_matches_reference_executor() {
    for arch in [Architecture::Llama, Architecture::Gpt2] {
        let tmp = tempfile::tempdir().unwrap();
        let file = setup(tmp.path(), arch, ALL_KINDS);
        // Imported models get suffix segments (only positions from the first changed one on).
        assert!(uses_suffix_segments(tmp.path()), "{arch:?}");
        let fast = run_file(&file, Executor::Fast);
        let reference = run_file(&file, Executor::Reference);
        assert!(fast.work.passes < reference.work.passes, "no-ops are skipped");
        assert!(
            fast.work.layer_tokens * reference.work.passes < reference.work.layer_tokens * fast.work.passes,
            "passes start late"
        );
        assert_rows_close(&fast.rows, &reference.rows);
        let peer = run_file(&file, Executor::PerComponent);
        assert_eq!((peer.work.passes, peer.work.layer_tokens), (reference.work.passes, reference.work.layer_tokens));
        assert_rows_close(&peer.rows, &reference.rows);
    }
}

/// When every metric is a logit difference, the fast path unembeds only the answers and wrong
/// answers, and computes the last layer's MLP at the final position only (unless a patch writes
/// after it); the values stay the reference executor's (which computes everything).
#[test]
fn fast_path_computes_only_what_the_metrics_read() {
    let body = r#"
corruption s2_io = replace S2 with IO
patch heads = attn.hook_z layers all heads all
patch resid = hook_resid_pre layers all positions each
metric ld = logit_diff normalized
metric raw = logit_diff
sweep { direction: [denoise, noise] }
"#;
    for arch in [Architecture::Llama, Architecture::Gpt2] {
        let tmp = tempfile::tempdir().unwrap();
        let file = setup(tmp.path(), arch, body);
        let model = patchbay::model::ModelDir::open(&tmp.path().join("model")).unwrap();
        let hooks = ["blocks.1.attn.hook_z".to_string()];
        let segments = Segments::new(&model, &hooks, patchbay::runtime::Device::Cpu, Some(&[7, 3, 7])).unwrap();
        assert_eq!(segments.tokens_read(), Some(&[3, 7][..]), "{arch:?}");
        assert!(segments.final_position_only(), "{arch:?}");
        let after = ["blocks.1.hook_mlp_out".to_string()];
        let segments = Segments::new(&model, &after, patchbay::runtime::Device::Cpu, None).unwrap();
        assert!(!segments.final_position_only(), "{arch:?}: a patch after the attention needs every position");
        let fast = run_file(&file, Executor::Fast);
        let reference = run_file(&file, Executor::Reference);
        assert_rows_close(&fast.rows, &reference.rows);
        // The run itself took the shortcuts: one logit per name the prompts answer with.
        let mut names: Vec<u32> = fast.plan.variants[0]
            .prompts
            .iter()
            .flat_map(|p| p.answer.ids().into_iter().chain(p.wrong.as_ref().unwrap().ids()))
            .collect();
        names.sort_unstable();
        names.dedup();
        let expected = patchbay::run::Shortcuts {
            suffix_positions: true,
            final_position_only: true,
            tokens_read: Some(names.len()),
        };
        assert!(fast.shortcuts.iter().all(|s| *s == Some(expected)), "{arch:?}: {:?}", fast.shortcuts);
        assert!(reference.shortcuts.iter().all(Option::is_none));
        // The clean task summary: the raw logit difference's clean mean, and who gets it wrong.
        let task = fast.tasks[0].as_ref().expect("the prompts have wrong answers");
        assert_eq!((task.prompts, task.correct + task.wrong.len()), (3, 3));
        assert!((task.mean_log_odds - fast.rows[0].cells[1].clean).abs() < 1e-9, "{task:?}");
    }
}

/// `--device cuda` runs the same plan on the GPU and agrees with the CPU reference executor.
/// Needs a CUDA GPU and the onnxruntime-gpu build (ORT_DYLIB_PATH);
/// `cargo test --test run_engine -- --ignored`.
#[test]
#[ignore = "needs a CUDA GPU and the onnxruntime-gpu build"]
fn cuda_fast_path_matches_cpu_reference() {
    for arch in [Architecture::Llama, Architecture::Gpt2] {
        let tmp = tempfile::tempdir().unwrap();
        let file = setup(tmp.path(), arch, ALL_KINDS);
        let cuda = run_file_on(&file, Executor::Fast, "cuda");
        assert_eq!(cuda.plan.device.name(), "cuda");
        assert_rows_close(&cuda.rows, &run_file(&file, Executor::Reference).rows);
    }
}

/// The provenance sidecar names every file the experiment read, with its sha256.
#[test]
fn provenance_hashes_included_and_data_files() {
    use sha2::Digest as _;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("metrics.bay"), "metric p = prob\n").unwrap();
    let body = "include \"metrics.bay\"\ncorruption s2_io = replace S2 with IO\npatch r = hook_resid_pre layers 0\noutput \"out/r.csv\"\n";
    run_file(&setup(tmp.path(), Architecture::Llama, body), Executor::Fast);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("out/r.provenance.json")).unwrap()).unwrap();
    let inputs = json["inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 1, "{json}");
    assert!(inputs[0]["file"].as_str().unwrap().ends_with("metrics.bay"));
    let expected = format!("{:x}", sha2::Sha256::digest(b"metric p = prob\n"));
    assert_eq!(inputs[0]["sha256"], expected.as_str());
}

/// An output path that names a folder is refused before any compute (no checkpoints started).
#[test]
fn an_output_that_is_a_folder_is_refused_before_compute() {
    let tmp = tempfile::tempdir().unwrap();
    let body =
        "corruption s2_io = replace S2 with IO\npatch r = hook_resid_pre layers 0\nmetric p = prob\noutput \"out\"\n";
    let file = setup(tmp.path(), Architecture::Llama, body);
    std::fs::create_dir(tmp.path().join("out")).unwrap();
    let exp = patchbay::check::check_file(&file, None).unwrap();
    let e = format!("{:#}", patchbay::report::run_and_write(&exp, &RunOptions::default()).err().unwrap());
    assert!(e.contains("exists and is not a file"), "{e}");
    assert!(!tmp.path().join("out.run").exists());
}

/// `batch N` caps the passes per ONNX Runtime call; the numbers stay the same.
#[test]
fn batch_caps_passes_per_call() {
    let tmp = tempfile::tempdir().unwrap();
    let body = "corruption s2_io = replace S2 with IO\npatch heads = attn.hook_z layers all heads all\nmetric ld = logit_diff normalized\n";
    let free = run_file(&setup(tmp.path(), Architecture::Llama, body), Executor::Fast);
    let capped = run_file(&setup(tmp.path(), Architecture::Llama, &format!("{body}batch 2\n")), Executor::Fast);
    assert!(free.work.largest_call > 2, "{:?}", free.work);
    assert_eq!(capped.work.largest_call, 2);
    assert_eq!(capped.work.passes, free.work.passes);
    assert_rows_close(&capped.rows, &free.rows);
}

fn find<'a>(outcome: &'a run::Outcome, variant: &str, target: &str, component: &str) -> &'a Row {
    outcome
        .rows
        .iter()
        .find(|r| {
            outcome.plan.variants[r.variant].label == variant
                && r.target == target
                && r.component == component
                && !r.summation
        })
        .unwrap_or_else(|| panic!("no row {variant} {target} {component}"))
}

#[test]
fn invariants_of_patching() {
    let tmp = tempfile::tempdir().unwrap();
    let body = r#"
corruption s2_io = replace S2 with IO
patch all = hook_resid_pre layers 0
patch embed = hook_embed
patch resid = hook_resid_pre layers all positions each
patch win = hook_mlp_out layers all window [2] with summation baseline
patch single = hook_mlp_out layers all
metric ld = logit_diff normalized
metric kl = kl
sweep { direction: [denoise, noise] }
"#;
    let file = setup(tmp.path(), Architecture::Llama, body);
    let out = run_file(&file, Executor::Fast);
    for (variant, expected) in [("ioi/s2_io/denoise", 1.0), ("ioi/s2_io/noise", -1.0)] {
        // Patching every position of the first residual stream (or the embeddings) moves the
        // whole run over: the clean metric restored, or destroyed.
        for (target, component) in [("all", "L0"), ("embed", "embed")] {
            let v = find(&out, variant, target, component).cells[0].value.unwrap();
            assert!((v - expected).abs() < 1e-5, "{variant} {target}: {v}");
        }
        // Before the first differing token (S2) clean and corrupted runs agree: exactly 0.
        let prompt = &out.plan.variants[0].prompts[0];
        let s2 = prompt.positions.iter().find(|(l, _)| l == "S2").unwrap().1;
        for l in 0..2 {
            for p in 0..s2 {
                let row = find(&out, variant, "resid", &format!("L{l}@{p}"));
                assert_eq!(row.cells[0].effect, 0.0, "{variant} L{l}@{p}");
            }
        }
    }
    // The summation baseline is the sum of the single-layer rows over the window (L1 w2 spans
    // layers 0 and 1).
    for variant in ["ioi/s2_io/denoise", "ioi/s2_io/noise"] {
        let baseline = out
            .rows
            .iter()
            .find(|r| r.summation && r.component == "L1 w2" && out.plan.variants[r.variant].label == variant)
            .unwrap();
        for m in 0..2 {
            let sum: f64 = ["L0", "L1"].iter().map(|c| find(&out, variant, "single", c).cells[m].effect).sum();
            assert!((baseline.cells[m].effect - sum).abs() < 1e-12, "{variant}: {} vs {sum}", baseline.cells[m].effect);
        }
    }
}

#[test]
fn patching_a_run_with_its_own_activation_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // Denoising with clean = corrupted: every patch writes the base run's own values.
    let body = r#"
corruption same = replace S2 with S1
patch heads = attn.hook_z layers all heads all
metric p = prob
"#;
    let file = setup(tmp.path(), Architecture::Gpt2, body);
    let out = run_file(&file, Executor::Reference);
    for row in &out.rows {
        assert_eq!(row.cells[0].effect, 0.0, "{}", row.component);
    }
}

#[test]
fn reruns_write_byte_identical_results() {
    let tmp = tempfile::tempdir().unwrap();
    let body = "corruption s2_io = replace S2 with IO\ncorruption gn = noise on S2 samples 2\npatch heads = attn.hook_z layers all heads all\nmetric ld = logit_diff normalized\noutput \"out/r.csv\"\nper_prompt \"out/p.csv\"\n";
    let file = setup(tmp.path(), Architecture::Llama, body);
    run_file(&file, Executor::Fast);
    let first =
        (std::fs::read(tmp.path().join("out/r.csv")).unwrap(), std::fs::read(tmp.path().join("out/p.csv")).unwrap());
    run_file(&file, Executor::Fast);
    let second =
        (std::fs::read(tmp.path().join("out/r.csv")).unwrap(), std::fs::read(tmp.path().join("out/p.csv")).unwrap());
    assert_eq!(first, second);
    let csv = String::from_utf8(first.0).unwrap();
    assert!(csv.starts_with("experiment,variant,dataset,corruption,direction,target,component,hook,layer,head,position,position_label,window,baseline,n_prompts,n_samples,method,ld,ld_effect,ld_patched,ld_clean,ld_corrupted,ld_sem,ld_estimate\n"));
    assert!(tmp.path().join("out/r.provenance.json").is_file());
}

#[test]
fn a_second_run_on_the_same_output_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let body = "corruption s2_io = replace S2 with IO\npatch heads = attn.hook_z layers 0 heads all\nmetric p = prob\noutput \"out/r.csv\"\n";
    let file = setup(tmp.path(), Architecture::Llama, body);
    std::fs::create_dir_all(tmp.path().join("out")).unwrap();
    // A lock held by another live process (the one that started this test).
    std::fs::write(tmp.path().join("out/r.csv.lock"), std::os::unix::process::parent_id().to_string()).unwrap();
    let exp = patchbay::check::check_file(&file, None).unwrap();
    let e = format!("{:#}", run::run(&exp, &RunOptions::default()).err().unwrap());
    assert!(e.contains("another patchbay run is writing"), "{e}");
}

/// An independent check: the pure-Rust reference forward pass, with the patch written into its
/// hook by the test itself, gives the engine's per-prompt patched metric for every component.
#[test]
fn engine_agrees_with_patched_pure_rust_forward() {
    use patchbay::model::reference;
    let body = r#"
corruption s2_io = replace S2 with IO
patch z = attn.hook_z layers all heads all
patch q = attn.hook_q layers 1 heads [0, 3] positions [S2, end]
patch v = attn.hook_v layers 0 heads all
patch pattern = attn.hook_pattern layers 1 heads all
patch resid = hook_resid_mid layers all positions [S1, S2, end]
patch mlp = mlp.hook_post layers 0
patch out = {hook_attn_out, hook_mlp_out} layers 1 positions end
metric ld = logit_diff
sweep { direction: [denoise, noise] }
"#;
    for arch in [Architecture::Llama, Architecture::Gpt2] {
        let tmp = tempfile::tempdir().unwrap();
        let file = setup(tmp.path(), arch, body);
        let out = run_file(&file, Executor::Fast);
        let weights = synth::tiny(arch, 3);
        let mut checked = 0;
        for row in &out.rows {
            let variant = &out.plan.variants[row.variant];
            let run = variant.patches.iter().find(|p| p.target == row.target && p.label == row.component).unwrap();
            for (p, prompt) in variant.prompts.iter().enumerate() {
                let corrupted = match &prompt.corrupted {
                    patchbay::ir::experiment::CorruptedPrompt::Tokens { ids, .. } => ids.clone(),
                    other => panic!("{other:?}"),
                };
                let (source_ids, base_ids) = match variant.direction.name() {
                    "denoise" => (&prompt.clean_ids, &corrupted),
                    _ => (&corrupted, &prompt.clean_ids),
                };
                let source = reference::forward(&weights, source_ids).unwrap().hooks;
                // The slot's token, read from the prompt's own table (not the plan's resolution).
                let position = run.position.as_ref().map(|pos| match pos {
                    patchbay::ir::experiment::Position::End => prompt.clean_ids.len() - 1,
                    patchbay::ir::experiment::Position::Slot { name, .. } => {
                        prompt.positions.iter().find(|(l, _)| l == name).unwrap().1
                    }
                    other => panic!("{other:?}"),
                });
                let patched = reference::forward_patched(&weights, base_ids, &mut |hook, values| {
                    if !run.hooks.iter().any(|h| h == hook) {
                        return;
                    }
                    let src = &source[hook];
                    let shape = &src.shape[1..];
                    // The pattern is [heads, q, k]; every other hook [pos, (heads, d_head | d)].
                    let (pos_axis, head_axis) = if hook.ends_with("hook_pattern") {
                        (1, Some(0))
                    } else {
                        (0, (shape.len() == 3).then_some(1))
                    };
                    let strides: Vec<usize> = (0..shape.len()).map(|a| shape[a + 1..].iter().product()).collect();
                    for (i, v) in values.iter_mut().enumerate() {
                        let at = |axis: usize| (i / strides[axis]) % shape[axis];
                        let head_ok = match (run.head, head_axis) {
                            (Some(h), Some(a)) => at(a) == h,
                            _ => true,
                        };
                        if head_ok && position.is_none_or(|q| at(pos_axis) == q) {
                            *v = src.data[i];
                        }
                    }
                });
                let logits = patched.unwrap().logits;
                let vocab = logits.shape[2];
                let last = &logits.data[logits.data.len() - vocab..];
                let (r, w) = (prompt.answer.ids()[0] as usize, prompt.wrong.as_ref().unwrap().ids()[0] as usize);
                let expected = (last[r] - last[w]) as f64;
                let got = row.per_prompt[0][p].2.expect("an exact row has patched metrics");
                assert!(
                    (got - expected).abs() < 1e-4,
                    "{arch:?} {} {} {} prompt {p}: {got} vs {expected}",
                    variant.label,
                    row.target,
                    row.component
                );
                checked += 1;
            }
        }
        assert!(checked > 100, "{checked}");
    }
}

/// A memory budget that is not a positive number is refused before any compute, naming it.
#[test]
fn a_memory_budget_that_is_not_positive_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let body = "corruption s2_io = replace S2 with IO\npatch heads = attn.hook_z layers all heads all\nmetric ld = logit_diff\noutput \"out/r.csv\"\n";
    let file = setup(tmp.path(), Architecture::Llama, body);
    for memory in ["0", "-1", "nan"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_patchbay"))
            .args(["run", "--quiet", &format!("--memory={memory}")])
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--memory {memory}: {stderr}");
        assert!(stderr.contains("positive number of GiB"), "--memory {memory}: {stderr}");
        assert!(!tmp.path().join("out").exists(), "--memory {memory} wrote something");
    }
}

/// kill -9 in the middle of a run leaves no partial CSV; the same command resumes from the
/// checkpointed batches and writes byte-identical results.
#[test]
fn killed_run_resumes_to_identical_results() {
    let tmp = tempfile::tempdir().unwrap();
    let body = "corruption s2_io = replace S2 with IO\ncorruption gn = noise on S2 samples 3\npatch heads = attn.hook_z layers all heads all\npatch resid = hook_resid_mid layers all positions each\nmetric ld = logit_diff normalized\nmetric kl = kl\nsweep { direction: [denoise, noise] }\noutput \"out/r.csv\"\nper_prompt \"out/p.csv\"\n";
    let file = setup(tmp.path(), Architecture::Llama, body);
    // More prompts, so the run lasts long enough to be killed in the middle.
    let text = std::fs::read_to_string(&file).unwrap().replace("count 3", "count 24");
    std::fs::write(&file, text).unwrap();
    let patchbay = env!("CARGO_BIN_EXE_patchbay");
    let run = |memory: &str| {
        std::process::Command::new(patchbay).args(["run", "--quiet", "--memory", memory]).arg(&file).output().unwrap()
    };
    // A tiny memory budget: batches of one pass, so there is time to kill it in between.
    let memory = "0.0000001";
    assert!(run(memory).status.success());
    let expected = std::fs::read(tmp.path().join("out/r.csv")).unwrap();
    let expected_prompts = std::fs::read(tmp.path().join("out/p.csv")).unwrap();
    assert!(!tmp.path().join("out/r.csv.run").exists(), "the run folder is removed at the end");
    for f in ["out/r.csv", "out/p.csv", "out/r.provenance.json"] {
        std::fs::remove_file(tmp.path().join(f)).unwrap();
    }

    let mut child = std::process::Command::new(patchbay)
        .args(["run", "--quiet", "--memory", memory])
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log = tmp.path().join("out/r.csv.run/variant-0.log");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&log).map_or(true, |t| t.matches("end ").count() < 3) {
        assert!(child.try_wait().unwrap().is_none(), "the run finished before it could be killed");
        assert!(started.elapsed().as_secs() < 60, "no checkpoint written");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!tmp.path().join("out/r.csv").exists(), "no partial CSV");
    assert!(tmp.path().join("out/r.csv.lock").exists(), "the killed run left its lock");
    let resumed = run(memory);
    assert!(
        String::from_utf8_lossy(&resumed.stderr).contains("resuming"),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(std::fs::read(tmp.path().join("out/r.csv")).unwrap(), expected);
    assert_eq!(std::fs::read(tmp.path().join("out/p.csv")).unwrap(), expected_prompts);
}

/// A model directory whose graph cannot be cut to suffix positions (here: a manifest that maps
/// no `hook_q`, as a hand-made directory might) runs its segments over all positions, and the fast
/// path still equals the reference executor.
#[test]
fn full_position_segments_match_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let body = "corruption s2_io = replace S2 with IO\ncorruption gn = noise on S2 samples 2 seed 7\npatch heads = attn.hook_z layers all heads all\npatch resid = hook_resid_pre layers all positions each\nmetric ld = logit_diff normalized\nmetric kl = kl\nsweep { direction: [denoise, noise] }\n";
    let file = setup(tmp.path(), Architecture::Llama, body);
    let manifest_path = tmp.path().join("model/patchbay.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    manifest["hooks"].as_object_mut().unwrap().retain(|name, _| !name.ends_with("attn.hook_q"));
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    assert!(!uses_suffix_segments(tmp.path()), "without hook_q the suffix cut must not apply");
    let fast = run_file(&file, Executor::Fast);
    let reference = run_file(&file, Executor::Reference);
    assert!(fast.work.passes < reference.work.passes, "no-ops are still skipped");
    assert_rows_close(&fast.rows, &reference.rows);
}
