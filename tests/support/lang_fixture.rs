//! Shared test fixture for the language tests: a tiny model directory (manifest + tokenizer, no
//! ONNX file) that `check` can resolve. Included by the `lang_*` tests with `#[path]`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use patchbay::model::{Architecture, Manifest, ModelConfig, Source, MANIFEST_FORMAT};

/// Words the fixture tokenizer keeps whole; anything else splits into characters.
pub const WORDS: &[&str] = &[
    "When", "and", "went", "to", "the", "store", "park", "gave", "a", "drink", "book", "Mary", "John", "Tom", "Sarah",
    "Alice", "Bob", "The", "war", "lasted", "from", "year", "capital", "of", "France", "is", "Paris", "Italy", "Rome",
    "Spain", "Madrid", "city", "Then", "said", "Eiffel", "Tower", "in", "located",
];

pub fn config(
    n_layers: usize,
    n_heads: usize,
    n_kv: usize,
    d_model: usize,
    d_head: usize,
    d_mlp: usize,
) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        n_layers,
        n_heads,
        n_kv_heads: n_kv,
        d_model,
        d_head,
        d_mlp,
        vocab_size: 0,
        n_ctx: 2048,
        norm_eps: 1e-5,
        rope_theta: Some(10000.0),
        rope_scaling: None,
        tied_embeddings: true,
    }
}

/// A BPE tokenizer (whitespace pre-tokenizer) whose merges build exactly the words of WORDS.
pub fn tokenizer_json() -> String {
    let mut vocab: Vec<String> = vec!["<unk>".into()];
    let push = |s: String, vocab: &mut Vec<String>| {
        if !vocab.contains(&s) {
            vocab.push(s);
        }
    };
    for c in ('a'..='z').chain('A'..='Z').chain('0'..='9') {
        push(c.to_string(), &mut vocab);
    }
    for c in [",", ".", "'", "?", "!", ":", "-"] {
        push(c.to_string(), &mut vocab);
    }
    let mut merges: Vec<String> = Vec::new();
    for w in WORDS {
        let chars: Vec<char> = w.chars().collect();
        for i in 1..chars.len() {
            let left: String = chars[..i].iter().collect();
            let right = chars[i].to_string();
            let m = format!("{left} {right}");
            if !merges.contains(&m) {
                merges.push(m);
            }
            push(format!("{left}{right}"), &mut vocab);
        }
    }
    let vocab_map: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::Value::from(i))).collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
                  "vocab": vocab_map, "merges": merges}
    })
    .to_string()
}

/// Write a model directory for `config` at `dir`.
pub fn write_model(dir: &Path, name: &str, mut config: ModelConfig) {
    std::fs::create_dir_all(dir).unwrap();
    let tok = tokenizer_json();
    config.vocab_size = 200;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: name.into(),
        hooks: Manifest::hook_table(&config),
        config,
        source: Source {
            path: "fixture".into(),
            format: "fixture".into(),
            sha256: "0".repeat(64),
            patchbay_version: "test".into(),
        },
        inputs: vec!["input_ids".into(), "position_ids".into(), "attention_mask".into()],
        logits: "logits".into(),
    };
    std::fs::write(dir.join("patchbay.json"), serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tok).unwrap();
}

/// A temp folder with the fixture model at `tiny/` (2 layers, 4 heads, 2 KV heads).
pub fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_model(&dir.path().join("tiny"), "tiny", config(2, 4, 2, 32, 8, 64));
    dir
}

/// Write a file into the workspace and return its path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}
