//! Path patching (`path` statements) on the tiny models of both architectures, against path
//! patching done independently in this file with the pure-Rust reference forward pass, and its
//! invariants: with nothing frozen and the final residual stream as receiver it is activation
//! patching of the sender; a last-layer head's path to the logits with other heads frozen is its
//! activation-patching effect; with heads and MLPs frozen, step two moves the receiver's residual
//! stream by exactly the sender's output change.

use std::collections::BTreeMap;
use std::path::Path;

use patchbay::ir::experiment::CorruptedPrompt;
use patchbay::model::checkpoint::Tensor;
use patchbay::model::{reference, Architecture};
use patchbay::run::{self, Executor, RunOptions};
use patchbay::test_support::synth;

#[path = "support/sweep_fixture.rs"]
mod sweep_fixture;
use sweep_fixture::{setup_model, setup_synth};

fn run_file(file: &Path, executor: Executor) -> run::Outcome {
    let exp = patchbay::check::check_file(file, None).unwrap_or_else(|d| panic!("{d:?}"));
    run::run(&exp, &RunOptions { executor, ..RunOptions::default() }).unwrap()
}

const PATHS: &str = "path q = from attn.hook_z layers 0 heads all to [L1.H0, L1.H3] q
path k = from attn.hook_z layers 0 heads all to L1.H1 k
path v = from attn.hook_z layers 0 heads [1, 2] to L1.H2 v freeze heads
path pos = from attn.hook_z layers 0 heads 0 positions [S2] to L1.H0 q freeze none
path mlp = from hook_mlp_out layers 0 to resid 1 freeze none
path final = from attn.hook_z layers 0 heads all to resid 2
path direct = from attn.hook_z layers 0 heads all to logits
path mlps = from hook_mlp_out layers 0 to logits freeze heads
path only_mlps = from attn.hook_z layers 0 heads [0, 3] to L1.H1 q freeze mlps
";

/// One `path` statement, as the test reads it back from the plan.
struct Path_ {
    sender_hook: String,
    sender_layer: usize,
    head: Option<usize>,
    position: Option<usize>,
    spec: patchbay::ir::experiment::PathSpec,
}

/// Path patching by its definition, on the pure-Rust forward pass: step two (sender from the
/// source run, frozen hooks from the base run, every layer from the sender's on),
/// then step three (receivers' inputs from step two); the logit difference of the answer and
/// the wrong answer at the last position, and step two's hooks.
fn reference_path(
    weights: &synth::SynthModel,
    base_ids: &[u32],
    source_ids: &[u32],
    path: &Path_,
    tokens: (usize, usize),
) -> (f64, BTreeMap<String, Tensor>) {
    let n_layers = weights.config.n_layers;
    let base = reference::forward(weights, base_ids).unwrap().hooks;
    let source = reference::forward(weights, source_ids).unwrap().hooks;
    // Every head (and MLP) from the sender's layer on is held: literally "every other path
    // frozen", whatever the receivers' layers.
    let frozen = |hook: &str| -> bool {
        (path.sender_layer..n_layers).any(|l| {
            (path.spec.freeze_heads && hook == format!("blocks.{l}.attn.hook_z"))
                || (path.spec.freeze_mlps && hook == format!("blocks.{l}.hook_mlp_out"))
        })
    };
    let step_two = reference::forward_patched(weights, base_ids, &mut |hook, values| {
        let (src, held) = (&source[hook].data, &base[hook].data);
        let shape = &base[hook].shape[1..];
        for (i, v) in values.iter_mut().enumerate() {
            let sender = hook == path.sender_hook
                && path.head.is_none_or(|h| (i / shape[2]) % shape[1] == h)
                && path.position.is_none_or(|q| i / shape[1..].iter().product::<usize>() == q);
            if sender {
                *v = src[i];
            } else if frozen(hook) {
                *v = held[i];
            }
        }
    })
    .unwrap();
    let ld = |logits: &Tensor| {
        let vocab = logits.shape[2];
        let last = &logits.data[logits.data.len() - vocab..];
        (last[tokens.0] - last[tokens.1]) as f64
    };
    // The receivers' hooks and heads, named here from the receiver.
    use patchbay::ir::experiment::Receiver;
    let receivers: Vec<(String, Option<usize>)> = match &path.spec.receiver {
        Receiver::Logits => vec![],
        Receiver::Resid(l) if *l == n_layers => vec![(format!("blocks.{}.hook_resid_post", l - 1), None)],
        Receiver::Resid(l) => vec![(format!("blocks.{l}.hook_resid_pre"), None)],
        Receiver::Heads { input, heads, .. } => {
            heads.iter().map(|&(l, h)| (format!("blocks.{l}.attn.hook_{}", input.name()), Some(h))).collect()
        }
    };
    if receivers.is_empty() {
        return (ld(&step_two.logits), step_two.hooks);
    }
    let step_three = reference::forward_patched(weights, base_ids, &mut |hook, values| {
        for (h, head) in &receivers {
            if h == hook {
                let (recorded, shape) = (&step_two.hooks[hook].data, &step_two.hooks[hook].shape[1..]);
                for (i, v) in values.iter_mut().enumerate() {
                    if head.is_none_or(|head| (i / shape[2]) % shape[1] == head) {
                        *v = recorded[i];
                    }
                }
            }
        }
    })
    .unwrap();
    (ld(&step_three.logits), step_two.hooks)
}

#[test]
fn path_patching_agrees_with_an_independent_pure_rust_computation() {
    for arch in [Architecture::Llama, Architecture::Gpt2] {
        // 9 targets; heads senders 4 runs each except v and only_mlps (2), pos (1) and the MLPs
        // (1 each).
        agrees_with_pure_rust(synth::tiny(arch, 3), PATHS, 4 + 4 + 2 + 1 + 1 + 4 + 4 + 1 + 2);
    }
}

/// Receivers in several layers (three layers): a later receiver's input does not carry the
/// sender through an earlier receiver or the heads in between.
#[test]
fn receivers_in_several_layers_agree_with_the_pure_rust_computation() {
    let paths = "path span = from attn.hook_z layers 0 heads all to [L2.H1, L1.H0] q
path span_v = from hook_mlp_out layers 0 to [L1.H2, L2.H3] v freeze heads
path span_none = from attn.hook_z layers 0 heads 1 to [L1.H3, L2.H0] k freeze none
path late = from attn.hook_z layers 1 heads all to L2.H2 q
path late_mlp = from hook_mlp_out layers 0..1 to logits
";
    for arch in [Architecture::Llama, Architecture::Gpt2] {
        agrees_with_pure_rust(synth::tiny_layers(arch, 3, 3), paths, 4 + 1 + 1 + 4 + 2);
    }
}

/// Every path row's per-prompt logit difference (2 directions x 3 prompts) against
/// [`reference_path`]; `runs` path runs per variant.
fn agrees_with_pure_rust(weights: synth::SynthModel, paths: &str, runs: usize) {
    let arch = weights.config.architecture;
    let body = format!("corruption s2_io = replace S2 with IO\n{paths}metric ld = logit_diff\nsweep {{ direction: [denoise, noise] }}\n");
    let tmp = tempfile::tempdir().unwrap();
    let file = setup_synth(tmp.path(), &weights, 3, &body);
    let out = run_file(&file, Executor::Fast);
    let (mut checked, mut moved) = (0, 0);
    for row in &out.rows {
        let variant = &out.plan.variants[row.variant];
        let run = variant.patches.iter().find(|p| p.target == row.target && p.label == row.component).unwrap();
        let path = Path_ {
            sender_hook: run.hooks[0].clone(),
            sender_layer: run.layers[0],
            head: run.head,
            position: None,
            spec: run.path.clone().expect("a path row"),
        };
        assert_eq!(row.method.name(), "path");
        for (p, prompt) in variant.prompts.iter().enumerate() {
            let CorruptedPrompt::Tokens { ids: corrupted, .. } = &prompt.corrupted else { panic!() };
            let (source_ids, base_ids) = match variant.direction.name() {
                "denoise" => (&prompt.clean_ids, corrupted),
                _ => (corrupted, &prompt.clean_ids),
            };
            let position = run.token_positions.get(p).copied();
            let tokens = (prompt.answer.ids()[0] as usize, prompt.wrong.as_ref().unwrap().ids()[0] as usize);
            let (expected, _) =
                reference_path(&weights, base_ids, source_ids, &Path_ { position, ..path_clone(&path) }, tokens);
            let got = row.per_prompt[0][p].2.expect("a path row has patched metrics");
            assert!(
                (got - expected).abs() < 1e-4,
                "{arch:?} {} {} {} prompt {p}: {got} vs {expected}",
                variant.label,
                row.target,
                row.component
            );
            checked += 1;
            // Not vacuous: the path changes the prompt's metric by more than the tolerance
            // (`m_effect`: patched minus the base run's).
            moved += usize::from(row.per_prompt[0][p].1.abs() > 1e-2);
        }
    }
    assert_eq!(checked, 2 * 3 * runs, "{arch:?}");
    assert!(moved * 2 > checked, "{arch:?}: only {moved} of {checked} paths move the metric");
}

fn path_clone(p: &Path_) -> Path_ {
    Path_ { sender_hook: p.sender_hook.clone(), spec: p.spec.clone(), ..*p }
}

/// With heads and MLPs frozen, everything between sender and receiver is linear in the sender's
/// output: step two's residual stream entering the receiver's layer is the base one plus the
/// sender head's change of its layer's attention output.
#[test]
fn frozen_step_two_moves_the_residual_stream_by_the_senders_output_change() {
    for arch in [Architecture::Llama, Architecture::Gpt2] {
        let weights = synth::tiny(arch, 3);
        let (base_ids, source_ids) = ([1u32, 5, 9, 3, 7, 2], [1u32, 5, 9, 4, 7, 2]);
        for head in 0..4 {
            let spec = patchbay::ir::experiment::PathSpec {
                receiver: patchbay::ir::experiment::Receiver::Resid(1),
                freeze_heads: true,
                freeze_mlps: true,
            };
            let path = Path_ {
                sender_hook: "blocks.0.attn.hook_z".into(),
                sender_layer: 0,
                head: Some(head),
                position: None,
                spec,
            };
            let (_, step_two) = reference_path(&weights, &base_ids, &source_ids, &path, (0, 1));
            let base = reference::forward(&weights, &base_ids).unwrap().hooks;
            // The sender alone patched: its layer's attention output changes by the head's part.
            let source = reference::forward(&weights, &source_ids).unwrap().hooks;
            let sender_only = reference::forward_patched(&weights, &base_ids, &mut |hook, values| {
                if hook == "blocks.0.attn.hook_z" {
                    let shape = &source[hook].shape[1..];
                    for (i, v) in values.iter_mut().enumerate() {
                        if (i / shape[2]) % shape[1] == head {
                            *v = source[hook].data[i];
                        }
                    }
                }
            })
            .unwrap()
            .hooks;
            let resid = |h: &BTreeMap<String, Tensor>| h["blocks.1.hook_resid_pre"].data.clone();
            let attn = |h: &BTreeMap<String, Tensor>| h["blocks.0.hook_attn_out"].data.clone();
            let moved: Vec<f32> = resid(&step_two).iter().zip(resid(&base)).map(|(a, b)| a - b).collect();
            let delta: Vec<f32> = attn(&sender_only).iter().zip(attn(&base)).map(|(a, b)| a - b).collect();
            assert!(delta.iter().any(|d| d.abs() > 1e-3), "{arch:?} head {head}: the sender changes nothing");
            for (m, d) in moved.iter().zip(&delta) {
                assert!((m - d).abs() < 1e-5, "{arch:?} head {head}: {m} vs {d}");
            }
        }
    }
}

/// `freeze none` to the final residual stream is activation patching of the sender; a
/// last-layer head's path to the logits with heads frozen is its activation-patching effect;
/// the reference executor (one pass per call) agrees with the batched one.
#[test]
fn path_patching_invariants_and_executors_agree() {
    let body = "corruption s2_io = replace S2 with IO
corruption gn = noise on S2 samples 2
path everything = from attn.hook_z layers 0 heads all to resid 2 freeze none
patch heads0 = attn.hook_z layers 0 heads all
path last = from attn.hook_z layers 1 heads all to logits freeze heads
patch heads1 = attn.hook_z layers 1 heads all
path mlp = from hook_mlp_out layers 0 to resid 2 freeze none
patch mlp0 = hook_mlp_out layers 0
metric ld = logit_diff normalized
metric p = prob
sweep { direction: [denoise, noise] }
";
    for arch in [Architecture::Llama, Architecture::Gpt2] {
        let tmp = tempfile::tempdir().unwrap();
        let file = setup_model(tmp.path(), arch, 3, body);
        let fast = run_file(&file, Executor::Fast);
        let reference = run_file(&file, Executor::Reference);
        let values = |rows: &[patchbay::run::results::Row], target: &str, component: &str, variant: usize| {
            let row = rows.iter().find(|r| r.target == target && r.component == component && r.variant == variant);
            let row = row.unwrap_or_else(|| panic!("{target} {component}"));
            row.per_prompt.iter().flat_map(|m| m.iter().map(|p| p.2.unwrap())).collect::<Vec<f64>>()
        };
        let mut compared = 0;
        for (v, variant) in fast.plan.variants.iter().enumerate() {
            for (path, patch) in [("everything", "heads0"), ("last", "heads1"), ("mlp", "mlp0")] {
                for run in variant.patches.iter().filter(|r| r.target == path) {
                    let (a, b) = (values(&fast.rows, path, &run.label, v), values(&fast.rows, patch, &run.label, v));
                    for (x, y) in a.iter().zip(&b) {
                        assert!((x - y).abs() < 1e-5, "{arch:?} {} {path} {}: {x} vs {y}", variant.label, run.label);
                    }
                    let r = values(&reference.rows, path, &run.label, v);
                    for (x, y) in a.iter().zip(&r) {
                        assert!(
                            (x - y).abs() < 1e-5,
                            "{arch:?} {} {path} {}: fast {x}, reference {y}",
                            variant.label,
                            run.label
                        );
                    }
                    compared += 1;
                }
            }
        }
        // 4 variants (2 corruptions x 2 directions) x (4 + 4 + 1) components.
        assert_eq!(compared, 4 * 9, "{arch:?}");
    }
}

#[test]
fn path_statements_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("path a = from attn.hook_z layers 1 heads 0 to L1.H0 q", "patchbay::path_receiver_not_after_sender"),
        ("path a = from attn.hook_z layers 0..1 heads 0 to resid 1", "patchbay::path_receiver_not_after_sender"),
        ("path a = from hook_resid_pre layers 0 to logits", "patchbay::path_sender"),
        ("path a = from attn.hook_z layers 0 heads 0 to resid 3", "patchbay::path_receiver_out_of_range"),
        ("path a = from attn.hook_z layers 0 heads 0 to L1.H4 q", "patchbay::path_receiver_out_of_range"),
        ("path a = from attn.hook_z layers 0 heads 0 to L1 q", "patchbay::path_receiver_out_of_range"),
    ];
    let mut file = setup_model(tmp.path(), Architecture::Llama, 2, "");
    for (statement, code) in cases {
        file = setup_model(
            tmp.path(),
            Architecture::Llama,
            2,
            &format!("corruption c = replace S2 with IO\n{statement}\nmetric ld = logit_diff\n"),
        );
        let diagnostics =
            patchbay::check::check_file(&file, None).err().unwrap_or_else(|| panic!("{statement} checked"));
        let codes: Vec<&str> = diagnostics.iter().map(|d| d.code).collect();
        assert!(codes.contains(&code), "{statement}: {codes:?}");
    }
    // A key receiver of a grouped-query model is a KV head: a warning naming the query heads.
    std::fs::write(
        &file,
        std::fs::read_to_string(&file).unwrap().replace(
            "path a = from attn.hook_z layers 0 heads 0 to L1 q",
            "path a = from attn.hook_z layers 0 heads 0 to L1.H3 k",
        ),
    )
    .unwrap();
    let exp = patchbay::check::check_file(&file, None).unwrap();
    let warning = exp.warnings.iter().map(|w| w.render_plain()).collect::<String>();
    assert!(warning.contains("KV head 1, shared by query heads 2, 3"), "{warning}");
}
