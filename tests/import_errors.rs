//! Bad inputs to `patchbay import` get a clear error and leave nothing behind; an existing model
//! directory is never damaged.

use std::path::{Path, PathBuf};
use std::process::Command;

use patchbay::import::{self, gguf::GgufTypes, ImportOptions, Outcome};
use patchbay::model::{Architecture, Manifest};
use patchbay::synth::{self, WeightDtype};

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
