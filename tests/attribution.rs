//! Attribution patching's gradients: the backward graph against central finite differences
//! through the forward graph, on tiny models of both architectures, for every hook the model
//! has (so every operator rule on the way from the logits back to it).

use std::path::Path;

use patchbay::import::{self, ImportOptions};
use patchbay::model::{reference, Architecture, ModelDir};
use patchbay::run::attribution::{Gradients, Seed};
use patchbay::run::engine::{Engine, HookPatch, Pass};
use patchbay::run::graph::Unembed;
use patchbay::runtime::{Device, Runs};
use patchbay::test_support::synth::{self, WeightDtype};

#[path = "support/sweep_fixture.rs"]
mod sweep_fixture;

fn tiny_model(dir: &Path, arch: Architecture) -> ModelDir {
    patchbay::runtime::ensure(true).unwrap();
    let ckpt = dir.join("ckpt");
    synth::tiny(arch, 3).write_hf_folder(&ckpt, WeightDtype::F32).unwrap();
    import::import(&ImportOptions { source: ckpt, out: dir.join("model"), force: false, quiet: true }).unwrap();
    ModelDir::open(&dir.join("model")).unwrap()
}

/// Backward passes from `seeds` (dM/d(logits)), no layer dropped.
fn plain(seeds: &[Vec<f32>]) -> Vec<Seed> {
    seeds.iter().map(|s| Seed { d_logits: s.clone(), dropped_layer: None }).collect()
}

/// A deterministic pseudo-random sequence in [-1, 1).
fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// For every hook: L = seed . logits; dL/d(hook) . u from the backward graph against
/// (L(a + eps u) - L(a - eps u)) / 2 eps with the hook overwritten through the forward graph.
fn gradients_match_finite_differences(arch: Architecture) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model(tmp.path(), arch);
    let mut hooks: Vec<String> = dir.manifest.hooks.keys().cloned().collect();
    hooks.sort();
    let vocab = dir.manifest.config.vocab_size;
    let ids = [vec![1u32, 5, 9, 3, 7], vec![2u32, 4, 8]];
    let seeds: Vec<Vec<f32>> = (0..ids.len()).map(|i| noise(100 + i as u64, vocab)).collect();
    let mut grads = Gradients::new(&dir, &[], &hooks, false, Runs::Few, Device::Cpu).unwrap();
    let passes: Vec<Pass> = ids.iter().map(|ids| Pass { ids: ids.clone(), patches: vec![] }).collect();
    let runs = grads.run(&passes, Some(&plain(&seeds))).unwrap();
    let mut worst = (0.0f64, String::new());
    for (h, hook) in hooks.iter().enumerate() {
        let mut engine =
            Engine::new(&dir, std::slice::from_ref(hook), &[], Unembed::LastPosition, Device::Cpu).unwrap();
        for (p, run) in runs.iter().enumerate() {
            let value = &run.values[h];
            let u = noise(7 + h as u64 * 31 + p as u64, value.data.len());
            let analytic: f64 = run.gradients[h].data.iter().zip(&u).map(|(g, u)| (g * u) as f64).sum();
            let scale: f64 = run.gradients[h].data.iter().zip(&u).map(|(g, u)| (g * u).abs() as f64).sum();
            let eps = 1e-2f32;
            let loss = |sign: f32, engine: &mut Engine| -> f64 {
                let moved: Vec<f32> = value.data.iter().zip(&u).map(|(a, u)| a + sign * eps * u).collect();
                let patch = HookPatch { hook: 0, value: moved, mask: vec![true; value.data.len()] };
                let out = engine.run(&[Pass { ids: ids[p].clone(), patches: vec![patch] }], false).unwrap();
                let logits = out[0].logits.full().unwrap();
                logits.iter().zip(&seeds[p]).map(|(z, s)| (z * s) as f64).sum()
            };
            let numeric = (loss(1.0, &mut engine) - loss(-1.0, &mut engine)) / (2.0 * eps as f64);
            let error = (numeric - analytic).abs() / scale.max(1e-6);
            if error > worst.0 {
                worst = (error, format!("{hook} (prompt {p}): analytic {analytic}, numeric {numeric}"));
            }
            assert!(
                error < 1e-3,
                "{arch:?} {hook} prompt {p}: analytic {analytic} vs numeric {numeric} (scale {scale})"
            );
        }
    }
    eprintln!("{arch:?}: {} hooks, worst relative error {:.2e} at {}", hooks.len(), worst.0, worst.1);
}

#[test]
fn llama_gradients_match_finite_differences() {
    gradients_match_finite_differences(Architecture::Llama);
}

#[test]
fn gpt2_gradients_match_finite_differences() {
    gradients_match_finite_differences(Architecture::Gpt2);
}

/// GradDrop: with layer l's residual writes (its attention and MLP outputs) dropped from the
/// backward pass, dL/d(hook) equals the central difference of L with those writes frozen at
/// their values (patched in as constants), for every hook and both a first and a middle layer.
fn graddrop_gradients_match_frozen_layer_differences(arch: Architecture) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model(tmp.path(), arch);
    let mut hooks: Vec<String> = dir.manifest.hooks.keys().cloned().collect();
    hooks.sort();
    let vocab = dir.manifest.config.vocab_size;
    let ids = vec![1u32, 5, 9, 3, 7];
    let seed = noise(41, vocab);
    let mut grads = Gradients::new(&dir, &[], &hooks, true, Runs::Few, Device::Cpu).unwrap();
    let mut checked = 0;
    for dropped in [0, dir.manifest.config.n_layers / 2] {
        let seeds = [Seed { d_logits: seed.clone(), dropped_layer: Some(dropped) }];
        let run = grads.run(&[Pass { ids: ids.clone(), patches: vec![] }], Some(&seeds)).unwrap().remove(0);
        let frozen: Vec<String> =
            ["hook_attn_out", "hook_mlp_out"].iter().map(|h| format!("blocks.{dropped}.{h}")).collect();
        let value_of = |hook: &str| &run.values[hooks.iter().position(|h| h == hook).unwrap()];
        for (h, hook) in hooks.iter().enumerate() {
            let gradient = &run.gradients[h].data;
            if frozen.contains(hook) {
                assert!(gradient.iter().all(|&g| g == 0.0), "{arch:?} {hook}: the dropped write has a gradient");
                continue;
            }
            let patchable = [hook.clone(), frozen[0].clone(), frozen[1].clone()];
            let mut engine = Engine::new(&dir, &patchable, &[], Unembed::LastPosition, Device::Cpu).unwrap();
            let fixed = |i: usize, value: Vec<f32>| HookPatch { hook: i, mask: vec![true; value.len()], value };
            let value = &run.values[h];
            let u = noise(3 + h as u64, value.data.len());
            let analytic: f64 = gradient.iter().zip(&u).map(|(g, u)| (g * u) as f64).sum();
            let scale: f64 = gradient.iter().zip(&u).map(|(g, u)| (g * u).abs() as f64).sum();
            let eps = 1e-2f32;
            let mut loss = |sign: f32| -> f64 {
                let moved: Vec<f32> = value.data.iter().zip(&u).map(|(a, u)| a + sign * eps * u).collect();
                let patches = vec![
                    fixed(0, moved),
                    fixed(1, value_of(&frozen[0]).data.clone()),
                    fixed(2, value_of(&frozen[1]).data.clone()),
                ];
                let out = engine.run(&[Pass { ids: ids.clone(), patches }], false).unwrap();
                out[0].logits.full().unwrap().iter().zip(&seed).map(|(z, s)| (z * s) as f64).sum()
            };
            let numeric = (loss(1.0) - loss(-1.0)) / (2.0 * eps as f64);
            assert!(
                (numeric - analytic).abs() <= 1e-3 * scale.max(1e-6),
                "{arch:?} layer {dropped} dropped, {hook}: analytic {analytic} vs numeric {numeric} (scale {scale})"
            );
            checked += 1;
        }
    }
    assert!(checked > hooks.len());
}

#[test]
fn llama_graddrop_gradients_match_frozen_layer_differences() {
    graddrop_gradients_match_frozen_layer_differences(Architecture::Llama);
}

#[test]
fn gpt2_graddrop_gradients_match_frozen_layer_differences() {
    graddrop_gradients_match_frozen_layer_differences(Architecture::Gpt2);
}

/// A tiny model and an IOI experiment over it in `dir`: 3 prompts, `s2_io`, both directions;
/// `body` adds corruptions, targets and metrics.
fn experiment(dir: &Path, arch: Architecture, body: &str) -> std::path::PathBuf {
    let body = format!(
        "corruption s2_io = replace S2 with IO\n{body}\nsweep {{ direction: [denoise, noise] }}\noutput \"out/r.csv\"\n"
    );
    sweep_fixture::setup_model(dir, arch, 3, &body)
}

/// `by attribution` against an estimate computed here from the gradient session directly:
/// per head, the mean over prompts of sum (a_source - a_base) dLD/da at the base run (the
/// corrupted run when denoising, the clean run when noising). The verified components' values
/// are exact patching's, equal to the same target patched exactly.
#[test]
fn estimates_match_an_independent_computation() {
    let tmp = tempfile::tempdir().unwrap();
    let file = experiment(
        tmp.path(),
        Architecture::Llama,
        "patch exact = attn.hook_z layers all heads all\npatch atp = attn.hook_z layers all heads all by attribution verify top 3\nmetric ld = logit_diff",
    );
    let exp = patchbay::check::check_file(&file, None).unwrap();
    let outcome = patchbay::report::run_and_write(&exp, &Default::default()).unwrap().outcome;
    let dir = ModelDir::open(&tmp.path().join("model")).unwrap();
    let n_layers = dir.manifest.config.n_layers;
    let hooks: Vec<String> = (0..n_layers).map(|l| format!("blocks.{l}.attn.hook_z")).collect();
    let mut grads = Gradients::new(&dir, &[], &hooks, false, Runs::Few, Device::Cpu).unwrap();
    let vocab = dir.manifest.config.vocab_size;
    let mut checked = 0;
    for (v, variant) in outcome.plan.variants.iter().enumerate() {
        let denoise = variant.direction.name() == "denoise";
        let mut runs_of = |ids: &[Vec<u32>], seeds: Vec<Vec<f32>>| {
            let passes: Vec<Pass> = ids.iter().map(|ids| Pass { ids: ids.clone(), patches: vec![] }).collect();
            grads.run(&passes, Some(&plain(&seeds))).unwrap()
        };
        let clean_ids: Vec<Vec<u32>> = variant.prompts.iter().map(|p| p.clean_ids.clone()).collect();
        let corrupted_ids: Vec<Vec<u32>> = variant
            .prompts
            .iter()
            .map(|p| match &p.corrupted {
                patchbay::ir::experiment::CorruptedPrompt::Tokens { ids, .. } => ids.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        let seeds: Vec<Vec<f32>> = variant
            .prompts
            .iter()
            .map(|p| {
                let mut s = vec![0f32; vocab];
                s[p.answer.ids()[0] as usize] += 1.0;
                s[p.wrong.as_ref().unwrap().ids()[0] as usize] -= 1.0;
                s
            })
            .collect();
        let (base_ids, source_ids) = if denoise { (&corrupted_ids, &clean_ids) } else { (&clean_ids, &corrupted_ids) };
        let base = runs_of(base_ids, seeds.clone());
        let source = runs_of(source_ids, seeds);
        let n_heads = dir.manifest.config.n_heads;
        for row in outcome.rows.iter().filter(|r| r.variant == v && r.target == "atp") {
            let (layer, head) = (row.layer.unwrap(), row.head.unwrap());
            let estimate = (base.iter().zip(&source))
                .map(|(b, s)| head_change(b, layer, &source_of(s, layer), head, n_heads))
                .sum::<f64>()
                / base.len() as f64;
            let got = row.cells[0].estimate.unwrap();
            assert!(
                (got - estimate).abs() <= 1e-4 * (1.0 + estimate.abs()),
                "{} {}: {got} vs {estimate}",
                variant.label,
                row.component
            );
            let exact = outcome
                .rows
                .iter()
                .find(|r| r.variant == v && r.target == "exact" && r.component == row.component)
                .unwrap();
            match row.method.name() {
                "exact" => assert!((row.cells[0].value.unwrap() - exact.cells[0].value.unwrap()).abs() < 1e-6),
                _ => assert_eq!(row.cells[0].value, row.cells[0].estimate),
            }
            checked += 1;
        }
        let verified =
            outcome.rows.iter().filter(|r| r.variant == v && r.target == "atp" && r.method.name() == "exact");
        assert_eq!(verified.count(), 3, "verify top 3 in {}", variant.label);
    }
    assert_eq!(checked, 2 * n_layers * dir.manifest.config.n_heads);
}

/// `by atp*` against AtP*'s GradDrop score computed here: per prompt, the sum over dropped
/// layers l of |sum over the head's activations of (a_source - a_base) dLD/da with layer l
/// dropped|, over L - 1. Heads of the last layer, where GradDrop changes nothing, score |AtP|;
/// the verified heads carry exact patching's values.
#[test]
fn atp_star_matches_an_independent_graddrop_computation() {
    let tmp = tempfile::tempdir().unwrap();
    let file = experiment(
        tmp.path(),
        Architecture::Llama,
        "patch exact = attn.hook_z layers all heads all\npatch atp = attn.hook_z layers all heads all by attribution\npatch star = attn.hook_z layers all heads all by atp* verify top 2\nmetric ld = logit_diff",
    );
    let exp = patchbay::check::check_file(&file, None).unwrap();
    let outcome = patchbay::report::run_and_write(&exp, &Default::default()).unwrap().outcome;
    let dir = ModelDir::open(&tmp.path().join("model")).unwrap();
    let (n_layers, n_heads) = (dir.manifest.config.n_layers, dir.manifest.config.n_heads);
    let hooks: Vec<String> = (0..n_layers).map(|l| format!("blocks.{l}.attn.hook_z")).collect();
    let mut grads = Gradients::new(&dir, &[], &hooks, true, Runs::Few, Device::Cpu).unwrap();
    let mut checked = 0;
    for (v, variant) in outcome.plan.variants.iter().enumerate() {
        let (base_ids, source_ids) = base_and_source_ids(variant);
        let source = logit_diff_runs(&mut grads, variant, &source_ids, None);
        let by_layer: Vec<_> =
            (0..n_layers).map(|l| logit_diff_runs(&mut grads, variant, &base_ids, Some(l))).collect();
        for row in outcome.rows.iter().filter(|r| r.variant == v && r.target == "star") {
            let (layer, head) = (row.layer.unwrap(), row.head.unwrap());
            let mut score = 0.0;
            for (p, s) in source.iter().enumerate() {
                let per_layer = |runs: &[patchbay::run::attribution::Run]| -> f64 {
                    head_change(&runs[p], layer, &s.values[layer].data, head, n_heads)
                };
                score += by_layer.iter().map(|runs| per_layer(runs).abs()).sum::<f64>() / (n_layers - 1) as f64;
            }
            score /= source.len() as f64;
            let got = row.cells[0].estimate.unwrap();
            assert!(
                (got - score).abs() <= 1e-4 * (1.0 + score),
                "{} {}: {got} vs {score}",
                variant.label,
                row.component
            );
            let twin = |target: &str| {
                outcome
                    .rows
                    .iter()
                    .find(|r| r.variant == v && r.target == target && r.component == row.component)
                    .unwrap()
            };
            if layer == n_layers - 1 {
                for (star, atp) in row.per_prompt[0].iter().zip(&twin("atp").per_prompt[0]) {
                    if row.method.name() == "atp*" {
                        assert!((star.1 - atp.1.abs()).abs() < 1e-9, "{}: {} vs |{}|", row.component, star.1, atp.1);
                    }
                }
            }
            match row.method.name() {
                "exact" => assert!((row.cells[0].value.unwrap() - twin("exact").cells[0].value.unwrap()).abs() < 1e-6),
                name => assert_eq!((name, row.cells[0].value), ("atp*", row.cells[0].estimate)),
            }
            checked += 1;
        }
        let verified =
            outcome.rows.iter().filter(|r| r.variant == v && r.target == "star" && r.method.name() == "exact");
        assert_eq!(verified.count(), 2, "verify top 2 in {}", variant.label);
    }
    assert_eq!(checked, 2 * n_layers * n_heads);
}

/// AtP*'s QK fix on query and key targets, against a computation here that takes the patched
/// pattern from the ONNX graph itself (the queries or keys of one head patched in, the pattern
/// captured) and dLD/d(pattern) from the gradient session with each layer dropped: per
/// prompt, sum over dropped layers of |(pattern' - pattern) . dLD/d(pattern)|, over L - 1.
#[test]
fn atp_star_qk_fix_matches_the_graphs_own_pattern() {
    for arch in [Architecture::Llama, Architecture::Gpt2] {
        let tmp = tempfile::tempdir().unwrap();
        let file = experiment(
            tmp.path(),
            arch,
            "patch q = attn.hook_q layers all heads all by atp*\npatch k = attn.hook_k layers all heads all by atp*\nmetric ld = logit_diff",
        );
        let exp = patchbay::check::check_file(&file, None).unwrap();
        let outcome = patchbay::report::run_and_write(&exp, &Default::default()).unwrap().outcome;
        let dir = ModelDir::open(&tmp.path().join("model")).unwrap();
        let config = &dir.manifest.config;
        let n_layers = config.n_layers;
        let patterns: Vec<String> = (0..n_layers).map(|l| format!("blocks.{l}.attn.hook_pattern")).collect();
        let mut grads = Gradients::new(&dir, &[], &patterns, true, Runs::Few, Device::Cpu).unwrap();
        let (mut checked, mut largest_fix) = (0, 0.0f64);
        for (v, variant) in outcome.plan.variants.iter().enumerate() {
            let (base_ids, source_ids) = base_and_source_ids(variant);
            let by_layer: Vec<Vec<patchbay::run::attribution::Run>> =
                (0..n_layers).map(|l| logit_diff_runs(&mut grads, variant, &base_ids, Some(l))).collect();
            for row in outcome.rows.iter().filter(|r| r.variant == v) {
                let (layer, head) = (row.layer.unwrap(), row.head.unwrap());
                let hook = format!("blocks.{layer}.attn.{}", if row.target == "q" { "hook_q" } else { "hook_k" });
                let mut engine = Engine::new(
                    &dir,
                    std::slice::from_ref(&hook),
                    &[hook.clone(), patterns[layer].clone()],
                    Unembed::LastPosition,
                    Device::Cpu,
                )
                .unwrap();
                let (mut score, mut linear) = (0.0, 0.0);
                for (base, source) in base_ids.iter().zip(&source_ids) {
                    let p = base_ids.iter().position(|b| std::ptr::eq(b, base)).unwrap();
                    let run = |engine: &mut Engine, ids: &Vec<u32>, patches| {
                        engine.run(&[Pass { ids: ids.clone(), patches }], true).unwrap().remove(0).captures
                    };
                    let before = run(&mut engine, base, vec![]);
                    let from = run(&mut engine, source, vec![]);
                    let d_head = config.d_head;
                    let heads = before[0].shape[1];
                    let mask: Vec<bool> = (0..before[0].data.len()).map(|i| (i / d_head) % heads == head).collect();
                    let patch = HookPatch { hook: 0, value: from[0].data.clone(), mask };
                    let after = run(&mut engine, base, vec![patch]);
                    let delta: Vec<f64> =
                        after[1].data.iter().zip(&before[1].data).map(|(a, b)| (a - b) as f64).collect();
                    let per_layer = |runs: &[patchbay::run::attribution::Run]| -> f64 {
                        delta.iter().zip(&runs[p].gradients[layer].data).map(|(d, g)| d * *g as f64).sum()
                    };
                    score += by_layer.iter().map(|runs| per_layer(runs).abs()).sum::<f64>() / (n_layers - 1) as f64;
                    // Without the fix: the first-order change of the pattern, from the
                    // difference quotient of the graph's own pattern along the patch.
                    let t = 1e-3f32;
                    let (hq, fq) = (&before[0].data, &from[0].data);
                    let small: Vec<f32> = hq.iter().zip(fq).map(|(b, f)| b + t * (f - b)).collect();
                    let heads_mask: Vec<bool> = (0..hq.len()).map(|i| (i / d_head) % heads == head).collect();
                    let nudged = run(&mut engine, base, vec![HookPatch { hook: 0, value: small, mask: heads_mask }]);
                    let slope: Vec<f64> =
                        nudged[1].data.iter().zip(&before[1].data).map(|(a, b)| (a - b) as f64 / t as f64).collect();
                    linear += by_layer
                        .iter()
                        .map(|runs| {
                            slope
                                .iter()
                                .zip(&runs[p].gradients[layer].data)
                                .map(|(d, g)| d * *g as f64)
                                .sum::<f64>()
                                .abs()
                        })
                        .sum::<f64>()
                        / (n_layers - 1) as f64;
                }
                score /= base_ids.len() as f64;
                linear /= base_ids.len() as f64;
                largest_fix = largest_fix.max((score - linear).abs() / (1e-3 + score));
                let got = row.cells[0].estimate.unwrap();
                assert!(
                    (got - score).abs() <= 1e-4 * (1.0 + score),
                    "{arch:?} {} {} {}: {got} vs {score}",
                    variant.label,
                    row.target,
                    row.component
                );
                checked += 1;
            }
        }
        let heads = config.n_heads + config.n_kv_heads;
        assert_eq!(checked, 2 * n_layers * heads, "{arch:?}");
        // The fix matters on these models: somewhere it moves the score by more than 5%.
        assert!(largest_fix > 0.05, "{arch:?}: the QK fix changes no score by more than {largest_fix}");
        eprintln!("{arch:?}: the QK fix moves a score by up to {:.0}%", 100.0 * largest_fix);
    }
}

/// How the backward passes are batched does not change the estimates: AtP and AtP* targets in
/// one variant, two metrics, a noise corruption with two samples, one pass per call against the
/// default budget.
#[test]
fn estimates_do_not_depend_on_batching() {
    let tmp = tempfile::tempdir().unwrap();
    let file = experiment(
        tmp.path(),
        Architecture::Llama,
        "corruption gn = noise on S2 samples 2 seed 7\npatch atp = attn.hook_z layers all heads all by attribution verify top 2\npatch star = hook_resid_pre layers all positions each by atp* verify top 2\nmetric ld = logit_diff normalized\nmetric p = prob",
    );
    let exp = patchbay::check::check_file(&file, None).unwrap();
    let run = |memory_bytes| {
        let options = patchbay::run::RunOptions { memory_bytes, ..Default::default() };
        patchbay::run::run(&exp, &options).unwrap().rows
    };
    let (batched, one_by_one) = (run(1 << 30), run(1));
    assert_eq!(batched.len(), one_by_one.len());
    // Position 0 comes before S2: its patches change nothing, so their effect is exactly 0, even
    // beside verified rows whose clean and corrupted metrics another session computed.
    let first: Vec<_> =
        batched.iter().chain(&one_by_one).filter(|r| r.target == "star" && r.position == Some(0)).collect();
    assert!(!first.is_empty());
    for row in first {
        for cells in &row.cells {
            assert_eq!(cells.estimate, Some(0.0), "{} {}", row.variant, row.component);
        }
    }
    let mut compared = 0;
    for (a, b) in batched.iter().zip(&one_by_one) {
        assert_eq!((&a.target, &a.component, a.method), (&b.target, &b.component, b.method));
        for (x, y) in a.cells.iter().zip(&b.cells) {
            for (u, v) in [(x.estimate, y.estimate), (x.value, y.value)] {
                if let (Some(u), Some(v)) = (u, v) {
                    assert!((u - v).abs() <= 1e-5 * (1.0 + u.abs()), "{} {}: {u} vs {v}", a.target, a.component);
                    compared += 1;
                }
            }
        }
    }
    assert!(compared > 100);
}

/// Ablations start from the clean run. A logit difference's gradient, known before the run, is
/// taken in the clean run's own forward-and-backward pass; a probability's, which depends on
/// the run's logits, in a backward pass after it. Both against the gradient session directly:
/// per head, the mean over prompts of sum (0 - a_clean) dM/da at the clean run.
#[test]
fn zero_ablation_estimates_match_an_independent_computation() {
    let tmp = tempfile::tempdir().unwrap();
    let file = experiment(
        tmp.path(),
        Architecture::Llama,
        "corruption z = zero ablation\npatch atp = attn.hook_z layers all heads all by attribution\nmetric ld = logit_diff\nmetric p = prob",
    );
    let exp = patchbay::check::check_file(&file, None).unwrap();
    let outcome = patchbay::run::run(&exp, &Default::default()).unwrap();
    let dir = ModelDir::open(&tmp.path().join("model")).unwrap();
    let config = &dir.manifest.config;
    let hooks: Vec<String> = (0..config.n_layers).map(|l| format!("blocks.{l}.attn.hook_z")).collect();
    let mut grads = Gradients::new(&dir, &[], &hooks, false, Runs::Few, Device::Cpu).unwrap();
    let v = outcome.plan.variants.iter().position(|v| v.corruption == "z").unwrap();
    let variant = &outcome.plan.variants[v];
    let clean_ids: Vec<Vec<u32>> = variant.prompts.iter().map(|p| p.clean_ids.clone()).collect();
    let ld = logit_diff_runs(&mut grads, variant, &clean_ids, None);
    // d P(answer) / dz_j = p_j ([j = answer] - P(answer)), at the clean run's logits.
    let prob_seeds: Vec<Seed> = variant
        .prompts
        .iter()
        .zip(&ld)
        .map(|(prompt, run)| {
            let top = run.logits.iter().fold(f32::MIN, |m, &z| m.max(z)) as f64;
            let e: Vec<f64> = run.logits.iter().map(|&z| (z as f64 - top).exp()).collect();
            let total: f64 = e.iter().sum();
            let answer = prompt.answer.ids()[0] as usize;
            let p_answer = e[answer] / total;
            let d_logits =
                (0..e.len()).map(|j| (e[j] / total * ((j == answer) as u8 as f64 - p_answer)) as f32).collect();
            Seed { d_logits, dropped_layer: None }
        })
        .collect();
    let passes: Vec<Pass> = clean_ids.iter().map(|ids| Pass { ids: ids.clone(), patches: vec![] }).collect();
    let prob = grads.run(&passes, Some(&prob_seeds)).unwrap();
    let mut checked = 0;
    for row in outcome.rows.iter().filter(|r| r.variant == v) {
        let (layer, head) = (row.layer.unwrap(), row.head.unwrap());
        for (m, runs) in [&ld, &prob].into_iter().enumerate() {
            let zeros = vec![0.0; runs[0].values[layer].data.len()];
            let estimate = runs.iter().map(|run| head_change(run, layer, &zeros, head, config.n_heads)).sum::<f64>()
                / runs.len() as f64;
            let got = row.cells[m].estimate.unwrap();
            assert!(
                (got - estimate).abs() <= 1e-4 * (1.0 + estimate.abs()),
                "{m} {}: {got} vs {estimate}",
                row.component
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 2 * config.n_layers * config.n_heads);
}

/// One backward pass per base run and metric kind: a logit difference's in the base run's own
/// pass (every `logit_diff` metric shares it), another kind's after it, and when noising one
/// for the clean run that every noise sample starts from.
#[test]
fn backward_passes_are_one_per_base_run_and_metric_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let file = experiment(
        tmp.path(),
        Architecture::Llama,
        "corruption gn = noise on S2 samples 3 seed 7\npatch atp = attn.hook_z layers all heads all by attribution\nmetric ld = logit_diff\nmetric ldn = logit_diff normalized\nmetric p = prob\nmetric pn = prob normalized",
    );
    let exp = patchbay::check::check_file(&file, None).unwrap();
    let outcome = patchbay::run::run(&exp, &Default::default()).unwrap();
    // 3 prompts; base runs: s2_io 3 each way, gn 9 denoising (per sample) and 3 noising.
    assert_eq!(outcome.work.backward_passes, 2 * (3 + 3 + 9 + 3));
}

/// A variant's base and source token ids: the corrupted and clean prompts when denoising, the
/// reverse when noising (token corruptions only).
fn base_and_source_ids(variant: &patchbay::ir::plan::Variant) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let ids_of = |clean: bool| -> Vec<Vec<u32>> {
        variant
            .prompts
            .iter()
            .map(|p| match (clean, &p.corrupted) {
                (true, _) => p.clean_ids.clone(),
                (false, patchbay::ir::experiment::CorruptedPrompt::Tokens { ids, .. }) => ids.clone(),
                (false, other) => panic!("{other:?}"),
            })
            .collect()
    };
    let denoise = variant.direction.name() == "denoise";
    (ids_of(!denoise), ids_of(denoise))
}

/// One backward pass per prompt of `variant` (token ids `ids`) from the logit difference's
/// gradient, with layer `dropped` dropped.
fn logit_diff_runs(
    grads: &mut Gradients,
    variant: &patchbay::ir::plan::Variant,
    ids: &[Vec<u32>],
    dropped: Option<usize>,
) -> Vec<patchbay::run::attribution::Run> {
    let passes: Vec<Pass> = ids.iter().map(|ids| Pass { ids: ids.clone(), patches: vec![] }).collect();
    let seeds: Vec<Seed> = variant
        .prompts
        .iter()
        .map(|p| {
            let mut d_logits = vec![0f32; grads.vocab()];
            d_logits[p.answer.ids()[0] as usize] += 1.0;
            d_logits[p.wrong.as_ref().unwrap().ids()[0] as usize] -= 1.0;
            Seed { d_logits, dropped_layer: dropped }
        })
        .collect();
    grads.run(&passes, Some(&seeds)).unwrap()
}

/// sum over head `head`'s activations in layer `layer`'s `attn.hook_z` (hook `layer`) of
/// (source - a_base) dM/da, at base run `base`.
fn head_change(
    base: &patchbay::run::attribution::Run,
    layer: usize,
    source: &[f32],
    head: usize,
    n_heads: usize,
) -> f64 {
    let (a, g) = (&base.values[layer], &base.gradients[layer]);
    let d_head = a.shape[2];
    (a.data.iter().zip(&g.data).zip(source))
        .enumerate()
        .filter(|(i, _)| (i / d_head) % n_heads == head)
        .map(|(_, ((a, g), src))| (src - a) as f64 * *g as f64)
        .sum()
}

fn source_of(run: &patchbay::run::attribution::Run, layer: usize) -> Vec<f32> {
    run.values[layer].data.clone()
}

/// The patch scaled down, a_base + t (a_source - a_base) on one head: the exact change of the
/// seeded loss divided by t converges to the attribution estimate, the error shrinking like t.
#[test]
fn scaled_patches_converge_to_the_estimate() {
    for arch in [Architecture::Llama, Architecture::Gpt2] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tiny_model(tmp.path(), arch);
        let hook = "blocks.0.attn.hook_z".to_string();
        let vocab = dir.manifest.config.vocab_size;
        let (base_ids, source_ids) = (vec![1u32, 5, 9, 3, 7], vec![1u32, 5, 4, 3, 7]);
        let seed = noise(5, vocab);
        let mut grads = Gradients::new(&dir, &[], std::slice::from_ref(&hook), false, Runs::Few, Device::Cpu).unwrap();
        let run = |grads: &mut Gradients, ids: &Vec<u32>| {
            grads
                .run(&[Pass { ids: ids.clone(), patches: vec![] }], Some(&plain(std::slice::from_ref(&seed))))
                .unwrap()
                .remove(0)
        };
        let (base, source) = (run(&mut grads, &base_ids), run(&mut grads, &source_ids));
        let (a, g, s) = (&base.values[0], &base.gradients[0], &source.values[0].data);
        let d_head = a.shape[2];
        let mask: Vec<bool> = (0..a.data.len()).map(|i| (i / d_head) % a.shape[1] == 1).collect();
        let estimate: f64 =
            (0..a.data.len()).filter(|&i| mask[i]).map(|i| (s[i] - a.data[i]) as f64 * g.data[i] as f64).sum();
        let mut engine =
            Engine::new(&dir, std::slice::from_ref(&hook), &[], Unembed::LastPosition, Device::Cpu).unwrap();
        let loss = |engine: &mut Engine, t: f32| -> f64 {
            let value: Vec<f32> = a.data.iter().zip(s).map(|(a, s)| a + t * (s - a)).collect();
            let patch = HookPatch { hook: 0, value, mask: mask.clone() };
            let out = engine.run(&[Pass { ids: base_ids.clone(), patches: vec![patch] }], false).unwrap();
            out[0].logits.full().unwrap().iter().zip(&seed).map(|(z, s)| (z * s) as f64).sum()
        };
        let at_zero = loss(&mut engine, 0.0);
        let errors: Vec<f64> = [0.2f32, 0.1, 0.05]
            .iter()
            .map(|&t| ((loss(&mut engine, t) - at_zero) / t as f64 - estimate).abs())
            .collect();
        eprintln!("{arch:?}: estimate {estimate:.5}, |exact/t - estimate| at t = 0.2, 0.1, 0.05: {errors:?}");
        for pair in errors.windows(2) {
            let ratio = pair[0] / pair[1];
            assert!((1.6..2.5).contains(&ratio), "{arch:?}: error ratio {ratio} when t halves ({errors:?})");
        }
    }
}

/// The backward graph's gradients against central differences through the pure-Rust reference
/// forward pass (an implementation that shares no code with the ONNX graph), in f32 with a
/// step of 1e-2, for every hook of both architectures.
#[test]
fn gradients_match_the_reference_forward_pass() {
    for arch in [Architecture::Llama, Architecture::Gpt2] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tiny_model(tmp.path(), arch);
        let weights = synth::tiny(arch, 3);
        let mut hooks: Vec<String> = dir.manifest.hooks.keys().cloned().collect();
        hooks.sort();
        let ids = vec![1u32, 5, 9, 3, 7];
        let seed = noise(11, dir.manifest.config.vocab_size);
        let mut grads = Gradients::new(&dir, &[], &hooks, false, Runs::Few, Device::Cpu).unwrap();
        let run = grads
            .run(&[Pass { ids: ids.clone(), patches: vec![] }], Some(&plain(std::slice::from_ref(&seed))))
            .unwrap();
        let mut worst = 0.0f64;
        for (h, hook) in hooks.iter().enumerate() {
            let gradient = &run[0].gradients[h].data;
            let u = noise(3 + h as u64, gradient.len());
            let analytic: f64 = gradient.iter().zip(&u).map(|(g, u)| (g * u) as f64).sum();
            let scale: f64 = gradient.iter().zip(&u).map(|(g, u)| (g * u).abs() as f64).sum();
            let eps = 1e-2f32;
            let loss = |sign: f32| -> f64 {
                let out = reference::forward_patched(&weights, &ids, &mut |name, values| {
                    if name == hook {
                        values.iter_mut().zip(&u).for_each(|(v, u)| *v += sign * eps * u);
                    }
                })
                .unwrap();
                let vocab = seed.len();
                let last = &out.logits.data[out.logits.data.len() - vocab..];
                last.iter().zip(&seed).map(|(z, s)| (z * s) as f64).sum()
            };
            let numeric = (loss(1.0) - loss(-1.0)) / (2.0 * eps as f64);
            let error = (numeric - analytic).abs() / scale.max(1e-6);
            worst = worst.max(error);
            assert!(error < 1e-3, "{arch:?} {hook}: backward graph {analytic} vs reference {numeric}");
        }
        eprintln!(
            "{arch:?}: {} hooks against the reference forward pass, worst relative error {worst:.2e}",
            hooks.len()
        );
    }
}
