//! The ONNX graph `patchbay import` writes agrees with the pure-Rust reference forward pass on
//! tiny synthetic models of both architectures, imported through every checkpoint format.

use std::path::Path;

use patchbay::import::{self, gguf, ImportOptions};
use patchbay::model::checkpoint::{Checkpoint, Tensor};
use patchbay::model::{reference, Architecture, ModelDir};
use patchbay::onnx::surgery;
use patchbay::runtime::{self, Batch, Device};
use patchbay::test_support::gguf_writer::GgufTypes;
use patchbay::test_support::synth::{self, SynthModel, WeightDtype};

const PROMPT: &str = "When Mary and John went to the store , John gave a drink to";

fn import_dir(source: &Path, out: &Path) -> ModelDir {
    import::import(&ImportOptions { source: source.into(), out: out.into(), force: false, quiet: true }).unwrap();
    ModelDir::open(out).unwrap()
}

/// Run the imported graph with every hook exposed as an output.
fn run_all_hooks(dir: &ModelDir, sequences: &[Vec<u32>]) -> (Tensor, Vec<(String, Tensor)>) {
    runtime::ensure(true).unwrap();
    let hooks: Vec<&str> = dir.manifest.hooks.keys().map(String::as_str).collect();
    let model = surgery::with_outputs(surgery::load(&dir.onnx_path()).unwrap(), &hooks).unwrap();
    let mut session = runtime::session_from_proto(&model, &dir.path, Device::Cpu).unwrap();
    let mut names = vec![dir.manifest.logits.as_str()];
    names.extend(&hooks);
    let mut out = runtime::run(&mut session, &Batch::new(sequences), &names).unwrap();
    let logits = out.remove(0);
    (logits, hooks.iter().map(|h| h.to_string()).zip(out).collect())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape, b.shape);
    a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn assert_matches_reference(model: &SynthModel, dir: &ModelDir) {
    assert_graph_matches(model, model, dir)
}

/// The graph in `dir` against the reference forward pass over `weights`.
fn assert_graph_matches(model: &SynthModel, weights: &dyn Checkpoint, dir: &ModelDir) {
    let tokens = model.encode(PROMPT);
    assert!(!tokens.contains(&0), "the prompt must be in the synthetic vocabulary");
    let expected = reference::forward(weights, &tokens).unwrap();
    let (logits, hooks) = run_all_hooks(dir, &[tokens]);
    let diff = max_abs_diff(&logits, &expected.logits);
    assert!(diff < 1e-4, "logits differ by {diff}");
    assert_eq!(hooks.len(), expected.hooks.len());
    for (name, got) in &hooks {
        let diff = max_abs_diff(got, &expected.hooks[name]);
        assert!(diff < 1e-4, "hook {name} differs from the reference by {diff}");
    }
    // Residual-stream invariants, on the ONNX graph's own tensors.
    let get = |name: String| &hooks.iter().find(|(n, _)| *n == name).unwrap().1;
    for l in 0..model.config.n_layers {
        let sum = |a: &Tensor, b: &Tensor| {
            Tensor::new(a.shape.clone(), a.data.iter().zip(&b.data).map(|(x, y)| x + y).collect())
        };
        let mid = sum(get(format!("blocks.{l}.hook_resid_pre")), get(format!("blocks.{l}.hook_attn_out")));
        assert!(max_abs_diff(&mid, get(format!("blocks.{l}.hook_resid_mid"))) < 1e-6);
        let post = sum(get(format!("blocks.{l}.hook_resid_mid")), get(format!("blocks.{l}.hook_mlp_out")));
        assert!(max_abs_diff(&post, get(format!("blocks.{l}.hook_resid_post"))) < 1e-6);
    }
}

#[test]
fn llama_from_safetensors_matches_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let model = synth::tiny(Architecture::Llama, 1);
    model.write_hf_folder(&tmp.path().join("ckpt"), WeightDtype::F32).unwrap();
    let dir = import_dir(&tmp.path().join("ckpt"), &tmp.path().join("model"));
    assert_matches_reference(&model, &dir);
}

#[test]
fn gpt2_from_safetensors_matches_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let model = synth::tiny(Architecture::Gpt2, 2);
    model.write_hf_folder(&tmp.path().join("ckpt"), WeightDtype::F32).unwrap();
    let dir = import_dir(&tmp.path().join("ckpt"), &tmp.path().join("model"));
    assert_matches_reference(&model, &dir);
}

#[test]
fn llama_and_gpt2_from_exact_gguf_match_reference() {
    for (arch, seed) in [(Architecture::Llama, 4), (Architecture::Gpt2, 5)] {
        let tmp = tempfile::tempdir().unwrap();
        let model = synth::tiny(arch, seed);
        let file = tmp.path().join("tiny.gguf");
        model.write_gguf(&file, GgufTypes::EXACT).unwrap();
        let dir = import_dir(&file, &tmp.path().join("model"));
        assert_matches_reference(&model, &dir);
    }
}

/// Quantised GGUF (Q8_0 embedding, Q4_1 matrices): the graph agrees with the reference run on
/// the file's own dequantised weights.
#[test]
fn quantised_gguf_matches_reference_on_dequantised_weights() {
    for (arch, seed) in [(Architecture::Llama, 6), (Architecture::Gpt2, 7)] {
        let tmp = tempfile::tempdir().unwrap();
        let model = synth::tiny(arch, seed);
        let file = tmp.path().join("tiny.gguf");
        model.write_gguf(&file, GgufTypes::default()).unwrap();
        let dir = import_dir(&file, &tmp.path().join("model"));
        let weights = gguf::GgufCheckpoint::open(&file).unwrap();
        assert_graph_matches(&model, &weights, &dir);
    }
}

/// Left padding and the attention mask: a short prompt batched with a longer one gives the
/// same logits as when it runs alone.
#[test]
fn padded_batch_rows_match_solo_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = synth::tiny(Architecture::Llama, 3);
    model.write_hf_folder(&tmp.path().join("ckpt"), WeightDtype::F32).unwrap();
    let dir = import_dir(&tmp.path().join("ckpt"), &tmp.path().join("model"));
    let long = model.encode(PROMPT);
    let short = model.encode("Mary gave a ball to");
    let (batched, _) = run_all_hooks(&dir, &[long, short.clone()]);
    let (solo, _) = run_all_hooks(&dir, &[short]);
    let vocab = model.config.vocab_size;
    let last_row = |t: &Tensor, row: usize| {
        let pos = t.shape[1];
        t.data[(row * pos + pos - 1) * vocab..(row * pos + pos) * vocab].to_vec()
    };
    let (a, b) = (last_row(&batched, 1), last_row(&solo, 0));
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(diff < 1e-5, "padded row differs from its solo run by {diff}");
}
