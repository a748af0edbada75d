//! Bad inputs to `patchbay import` get a clear error and leave nothing behind; an existing model
//! directory is never damaged.

use std::path::{Path, PathBuf};
use std::process::Command;

use patchbay::import::quant::GgmlType;
use patchbay::import::{self, gguf, ImportOptions, Outcome};
use patchbay::model::{Architecture, Manifest};
use patchbay::test_support::gguf_writer::{self, GgufTensorData, GgufTypes};
use patchbay::test_support::synth::{self, WeightDtype};

fn import_to(source: &Path, out: &Path, force: bool) -> anyhow::Result<Outcome> {
    import::import(&ImportOptions { source: source.into(), out: out.into(), force, quiet: true })
}

/// The import fails with a message containing every one of `needles`, and neither the output
/// directory nor a staging folder is left in its parent.
fn assert_fails_cleanly(source: &Path, needles: &[&str]) {
    let parent = tempfile::tempdir().unwrap();
    let out = parent.path().join("model");
    let message = format!("{:#}", import_to(source, &out, false).unwrap_err());
    for needle in needles {
        assert!(message.contains(needle), "expected {needle:?} in: {message}");
    }
    let left: Vec<_> = std::fs::read_dir(parent.path()).unwrap().collect();
    assert!(left.is_empty(), "import left {left:?} behind");
}

fn tiny_gguf(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    synth::tiny(Architecture::Llama, 1).write_gguf(&path, GgufTypes::EXACT).unwrap();
    path
}

fn tiny_hf(dir: &Path) -> PathBuf {
    let path = dir.join("ckpt");
    synth::tiny(Architecture::Gpt2, 1).write_hf_folder(&path, WeightDtype::F32).unwrap();
    path
}

/// Overwrite the bytes right after the first occurrence of `marker` in `path`.
fn patch_after(path: &Path, marker: &[u8], skip: usize, bytes: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    let at = data.windows(marker.len()).position(|w| w == marker).expect("marker present") + marker.len() + skip;
    data[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, data).unwrap();
}

#[test]
fn truncated_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tiny_gguf(tmp.path());
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len / 2).unwrap();
    assert_fails_cleanly(&path, &["truncated"]);
}

#[test]
fn unknown_gguf_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tiny_gguf(tmp.path());
    // general.architecture: u32 type, u64 length, then the 5 bytes "llama".
    patch_after(&path, b"general.architecture", 12, b"mamba");
    assert_fails_cleanly(&path, &["mamba", "llama", "gpt2"]);
}

#[test]
fn unsupported_gguf_tensor_type() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tiny_gguf(tmp.path());
    // Tensor info: name, n_dims (u32), dims (2 x u64), type (u32). 13 = Q5_K.
    patch_after(&path, b"blk.0.attn_q.weight", 4 + 16, &13u32.to_le_bytes());
    assert_fails_cleanly(&path, &["blk.0.attn_q.weight", "Q5_K"]);
}

#[test]
fn unknown_hf_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_hf(tmp.path());
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), config.replace("GPT2LMHeadModel", "MambaForCausalLM")).unwrap();
    assert_fails_cleanly(&dir, &["MambaForCausalLM", "GPT2LMHeadModel"]);
}

#[test]
fn safetensors_header_that_lies_about_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_hf(tmp.path());
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    // Claim the embedding is twice as large as the bytes it points at.
    let shape = &mut header["transformer.wte.weight"]["shape"][0];
    *shape = serde_json::json!(shape.as_u64().unwrap() * 2);
    let header = serde_json::to_vec(&header).unwrap();
    let mut lying = (header.len() as u64).to_le_bytes().to_vec();
    lying.extend(&header);
    lying.extend(&bytes[8 + header_len..]);
    std::fs::write(&file, lying).unwrap();
    assert_fails_cleanly(&dir, &["transformer.wte.weight"]);
}

#[test]
fn missing_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_hf(tmp.path());
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    assert_fails_cleanly(&dir, &["tokenizer.json"]);
}

#[test]
fn output_directory_holding_a_different_model() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tiny_gguf(tmp.path());
    let second = tmp.path().join("other.gguf");
    synth::tiny(Architecture::Llama, 2).write_gguf(&second, GgufTypes::EXACT).unwrap();
    let out = tmp.path().join("model");

    assert_eq!(import_to(&first, &out, false).unwrap(), Outcome::Imported);
    assert_eq!(import_to(&first, &out, false).unwrap(), Outcome::UpToDate);
    let before = Manifest::load(&out).unwrap();

    let message = format!("{:#}", import_to(&second, &out, false).unwrap_err());
    assert!(message.contains("--force") && message.contains("different model"), "{message}");
    assert_eq!(Manifest::load(&out).unwrap(), before, "a refused import must not touch the directory");

    assert_eq!(import_to(&second, &out, true).unwrap(), Outcome::Imported);
    assert_ne!(Manifest::load(&out).unwrap().source.sha256, before.source.sha256);
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 3, "only the two sources and the model remain: {left:?}");
}

#[test]
fn output_directory_with_other_files_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let source = tiny_gguf(tmp.path());
    let out = tmp.path().join("notes");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("thesis.tex"), "precious").unwrap();
    let message = format!("{:#}", import_to(&source, &out, false).unwrap_err());
    assert!(message.contains("--force"), "{message}");
    assert_eq!(std::fs::read_to_string(out.join("thesis.tex")).unwrap(), "precious");
}

#[test]
fn cli_reports_the_error_and_exits_non_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tiny_gguf(tmp.path());
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(100).unwrap();
    let out = tmp.path().join("model");
    let result = Command::new(env!("CARGO_BIN_EXE_patchbay"))
        .args(["import", "--quiet", "--out"])
        .arg(&out)
        .arg(&path)
        .output()
        .unwrap();
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.starts_with("error: ") && stderr.contains("truncated"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn staging_left_by_a_killed_import_is_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    let source = tiny_gguf(tmp.path());
    // PIDs above the kernel's pid_max (2^22) never run.
    let stale = tmp.path().join(".model.partial-4999999");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.onnx.data"), "half-written").unwrap();
    import_to(&source, &tmp.path().join("model"), false).unwrap();
    assert!(!stale.exists());
}

/// A copy of one of the transformers-written fixture checkpoints (tests/fixtures/hf).
fn fixture_copy(case: &str, dir: &Path) -> PathBuf {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/cases").join(case);
    let to = dir.join(case);
    std::fs::create_dir(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
    to
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(path, json.to_string()).unwrap();
}

/// Write a safetensors file of f32 zeros with the given tensor names and shapes.
fn write_safetensors(path: &Path, tensors: &[(&str, &[usize])]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, shape) in tensors {
        let len = 4 * shape.iter().product::<usize>();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let header = serde_json::Value::Object(header).to_string();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + offset, 0);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn unknown_rope_type_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = fixture_copy("llama_v5_rope500k_f32", tmp.path());
    edit_json(&ckpt.join("config.json"), |c| {
        c["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0})
    });
    assert_fails_cleanly(&ckpt, &["RoPE type `yarn`", "rope_parameters", "default, linear and llama3"]);
}

/// The regression that opened issue 6 still fails loudly if the base is written in a way
/// patchbay cannot read unambiguously.
#[test]
fn conflicting_rope_bases_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = fixture_copy("llama_v5_rope500k_f32", tmp.path());
    edit_json(&ckpt.join("config.json"), |c| c["rope_theta"] = serde_json::json!(10000.0));
    assert_fails_cleanly(&ckpt, &["two RoPE bases", "500000", "10000"]);
}

#[test]
fn tensors_the_architecture_does_not_use_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = fixture_copy("llama_v5_rope500k_f32", tmp.path());
    // An output-projection bias (transformers builds none without `attention_bias`) and an
    // extra norm, in a second weight file.
    write_safetensors(
        &ckpt.join("extra.safetensors"),
        &[("model.layers.0.self_attn.o_proj.bias", &[32]), ("model.layers.1.extra_norm.weight", &[32])],
    );
    assert_fails_cleanly(
        &ckpt,
        &["2 tensor(s)", "`model.layers.0.self_attn.o_proj.bias`", "`model.layers.1.extra_norm.weight`"],
    );
}

#[test]
fn untied_checkpoint_without_lm_head_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = fixture_copy("llama_v5_tied_mha_bos_f32", tmp.path());
    edit_json(&ckpt.join("config.json"), |c| c["tie_word_embeddings"] = serde_json::json!(false));
    assert_fails_cleanly(&ckpt, &["tie_word_embeddings: false", "lm_head.weight"]);
}

#[test]
fn bos_flag_disagreeing_with_the_tokenizer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = fixture_copy("llama_v5_rope500k_f32", tmp.path());
    edit_json(&ckpt.join("tokenizer_config.json"), |c| c["add_bos_token"] = serde_json::json!(true));
    assert_fails_cleanly(&ckpt, &["add_bos_token: true", "does not add the bos_token"]);
}

/// Rewrite a GGUF file with `edit` applied to its metadata and tensors (all stored as F32).
fn rewrite_gguf(
    from: &Path,
    to: &Path,
    edit: impl FnOnce(&mut Vec<(String, gguf::MetaValue)>, &mut Vec<GgufTensorData>),
) {
    let file = gguf::GgufFile::open(from).unwrap();
    let mut meta = file.metadata().to_vec();
    let mut tensors: Vec<GgufTensorData> = file
        .tensors()
        .iter()
        .map(|t| {
            let data = file.read_tensor(&t.name).unwrap().unwrap();
            GgufTensorData::encode(&t.name, &data, GgmlType::F32).unwrap()
        })
        .collect();
    edit(&mut meta, &mut tensors);
    gguf_writer::write_gguf(to, &meta, &tensors).unwrap();
}

fn fixture_gguf(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/cases").join(case).join("model.gguf")
}

#[test]
fn gguf_keys_patchbay_does_not_implement_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, gguf::MetaValue, &[&str]); 4] = [
        ("llama.rope.scaling.type", gguf::MetaValue::String("yarn".into()), &["scaling type `yarn`"]),
        ("llama.expert_count", gguf::MetaValue::U32(8), &["`llama.expert_count`", "not implemented"]),
        ("llama.attention.clamp_kqv", gguf::MetaValue::F32(8.0), &["`llama.attention.clamp_kqv`"]),
        ("llama.rope.scaling.factor", gguf::MetaValue::F32(4.0), &[]),
    ];
    for (i, (key, value, needles)) in cases.into_iter().enumerate() {
        let path = tmp.path().join(format!("edited{i}.gguf"));
        rewrite_gguf(&fixture_gguf("llama_v5_rope500k_f32"), &path, |meta, _| meta.push((key.into(), value)));
        if needles.is_empty() {
            // A linear factor is honoured: it imports (and the factor changes the frequencies).
            let out = tmp.path().join(format!("model{i}"));
            import_to(&path, &out, false).unwrap();
            let manifest = Manifest::load(&out).unwrap();
            assert!(format!("{:?}", manifest.config.rope_scaling).contains("Linear { factor: 4.0 }"));
        } else {
            assert_fails_cleanly(&path, needles);
        }
    }
}

#[test]
fn gguf_tensors_the_architecture_does_not_use_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("edited.gguf");
    rewrite_gguf(&fixture_gguf("llama_v5_rope500k_f32"), &path, |_, tensors| {
        let extra = patchbay::model::checkpoint::Tensor::new(vec![32], vec![0.5; 32]);
        tensors.push(GgufTensorData::encode("blk.0.attn_q_norm.weight", &extra, GgmlType::F32).unwrap());
    });
    assert_fails_cleanly(&path, &["1 tensor(s)", "`blk.0.attn_q_norm.weight`"]);
}

/// llama3 RoPE in GGUF lives in `rope_freqs.weight`; a wrong-sized one is refused by name.
#[test]
fn gguf_rope_freqs_of_the_wrong_size_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("edited.gguf");
    rewrite_gguf(&fixture_gguf("llama_v5_llama3_f32"), &path, |_, tensors| {
        let t = tensors.iter_mut().find(|t| t.name == "rope_freqs.weight").expect("llama3 fixture has rope_freqs");
        let short = patchbay::model::checkpoint::Tensor::new(vec![4], vec![1.0; 4]);
        *t = GgufTensorData::encode("rope_freqs.weight", &short, GgmlType::F32).unwrap();
    });
    assert_fails_cleanly(&path, &["rope_freqs.weight has 4 factors", "8 frequencies"]);
}
