//! Import fidelity against Hugging Face transformers itself: every checkpoint under
//! `tests/fixtures/hf/cases` was written by transformers (`make_fixtures.py`, with random
//! weights and every supported architecture, config style, dtype and RoPE variant), together
//! with transformers' token ids and logits for a few prompts. patchbay must import each one, from
//! the Hugging Face folder and (where the generator wrote one) from the same weights as GGUF,
//! tokenise the prompts to the same ids and compute the same logits, through the ONNX graph and
//! through the pure-Rust reference forward pass.

use std::path::{Path, PathBuf};

use patchbay::import::{self, open_checkpoint, ImportOptions};
use patchbay::model::{reference, ModelDir};
use patchbay::runtime::{self, Batch, Device};

/// transformers' logits are f32; ours differ by accumulation order only.
const TOLERANCE: f32 = 1e-4;

#[derive(serde::Deserialize)]
struct Expected {
    description: String,
    prompts: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    /// `[prompt][position][vocab]`.
    logits: Vec<Vec<Vec<f32>>>,
}

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/cases");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    cases.sort();
    assert!(cases.len() >= 10, "expected the generated fixture cases in {}", root.display());
    cases
}

fn expected(case: &Path) -> Expected {
    serde_json::from_str(&std::fs::read_to_string(case.join("expected.json")).unwrap()).unwrap()
}

/// Import `source`, tokenise every prompt and compare ids and logits with transformers'.
fn check_import(source: &Path, expected: &Expected, label: &str) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let imported =
        import::import(&ImportOptions { source: source.into(), out: out.clone(), force: false, quiet: true });
    if let Err(e) = imported {
        return vec![format!("{label}: import failed: {e:#}")];
    }
    let dir = ModelDir::open(&out).unwrap();
    let tokenizer = dir.tokenizer().unwrap();
    let mut session = runtime::session(&dir.onnx_path(), Device::Cpu).unwrap();
    let ckpt = open_checkpoint(source).unwrap();
    let mut failures = vec![];
    for (i, prompt) in expected.prompts.iter().enumerate() {
        let ids = tokenizer.encode(prompt.as_str(), true).unwrap().get_ids().to_vec();
        if ids != expected.input_ids[i] {
            failures.push(format!(
                "{label}: prompt {prompt:?} tokenises to {ids:?}, transformers {:?}",
                expected.input_ids[i]
            ));
            continue;
        }
        let want: Vec<f32> = expected.logits[i].iter().flatten().copied().collect();
        let onnx = runtime::run(&mut session, &Batch::new(std::slice::from_ref(&ids)), &[&dir.manifest.logits])
            .unwrap()
            .remove(0);
        let reference = reference::forward(ckpt.as_ref(), &ids).unwrap().logits;
        for (what, got) in [("ONNX", &onnx.data), ("reference", &reference.data)] {
            assert_eq!(got.len(), want.len(), "{label}: logits shape");
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            if diff.is_nan() || diff > TOLERANCE {
                failures.push(format!("{label}: {what} logits of prompt {i} differ from transformers by {diff}"));
            }
        }
    }
    failures
}

#[test]
fn every_checkpoint_matches_transformers() {
    runtime::ensure(true).unwrap();
    let mut failures = vec![];
    let mut checked = 0;
    for case in cases() {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let expected = expected(&case);
        assert!(!expected.description.is_empty());
        failures.extend(check_import(&case, &expected, &format!("{name} (safetensors)")));
        checked += 1;
        let gguf = case.join("model.gguf");
        if gguf.is_file() {
            failures.extend(check_import(&gguf, &expected, &format!("{name} (gguf)")));
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} imports differ from transformers:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The report that opened issue 6: a transformers 5 Llama config keeps `rope_theta` 500000
/// inside `rope_parameters`; the importer used to fall back to 10000 without a word.
#[test]
fn transformers5_rope_parameters_regression() {
    runtime::ensure(true).unwrap();
    let case = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/cases/llama_v5_rope500k_f32");
    let config = std::fs::read_to_string(case.join("config.json")).unwrap();
    assert!(config.contains("\"rope_parameters\"") && !config.contains("\"rope_theta\":500000.0,\"rope_scaling\""));
    let failures = check_import(&case, &expected(&case), "llama_v5_rope500k_f32");
    assert!(failures.is_empty(), "{failures:?}");
}

/// One tokenisation rule everywhere: for a model whose tokenizer prepends BOS, `predict` and
/// `check` (and so `plan` and `run`, which take check's ids) give transformers' ids, BOS included.
#[test]
fn predict_and_check_tokenise_like_transformers() {
    runtime::ensure(true).unwrap();
    let case = cases().into_iter().find(|c| c.ends_with("llama_v5_tied_mha_bos_f32")).unwrap();
    let expected = expected(&case);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    import::import(&ImportOptions { source: case, out: out.clone(), force: false, quiet: true }).unwrap();
    let (prompt, ids) = (&expected.prompts[0], &expected.input_ids[0]);
    assert_eq!(ids[0], 0, "the fixture's tokenizer adds BOS");
    let dir = ModelDir::open(&out).unwrap();
    let predicted = patchbay::predict::predict(&dir, prompt, 1, Device::Cpu).unwrap();
    assert_eq!(&predicted.tokens, ids);
    let file = tmp.path().join("exp.bay");
    std::fs::write(
        &file,
        format!(
            "model \"model\"\ndataset d {{\n  template \"{}{{X}}\"\n  slot X from [\" to\"]\n  answer \" Mary\"\n}}\ncorruption n = noise on X\npatch r = hook_resid_pre\nmetric p = prob\n",
            prompt.strip_suffix(" to").unwrap()
        ),
    )
    .unwrap();
    let exp = patchbay::check::check_file(&file, None).unwrap();
    assert_eq!(&exp.datasets[0].prompts[0].ids, ids);
}
