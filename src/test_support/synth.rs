//! Deterministic tiny models for tests: seeded random weights, a word-level vocabulary that can
//! spell IOI-style prompts, and writers that save them in checkpoint formats the importers read.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::model::checkpoint::{Checkpoint, Tensor};
use crate::model::{Architecture, ModelConfig, TOKENIZER_FILE};

/// Words of the synthetic vocabulary; index = token id. Each is a single whitespace-pre-tokenizer
/// piece (all word characters or all punctuation), so prompts tokenize one word per token.
pub const VOCAB: &[&str] = &[
    "<unk>",
    "Mary",
    "John",
    "Alice",
    "Bob",
    "Tom",
    "Sarah",
    "James",
    "Emma",
    "David",
    "Anna",
    "Paul",
    "Lisa",
    "When",
    "Then",
    "Afterwards",
    "While",
    "The",
    "and",
    "went",
    "to",
    "the",
    "store",
    "park",
    "school",
    "house",
    "restaurant",
    "office",
    ",",
    ".",
    "gave",
    "handed",
    "passed",
    "a",
    "an",
    "drink",
    "ring",
    "bag",
    "book",
    "ball",
    "snack",
    "apple",
    "kiss",
    "had",
    "lot",
    "of",
    "fun",
    "at",
    "were",
    "working",
    "decided",
    "give",
    "it",
    "is",
    "in",
    "capital",
    "France",
    "Paris",
    "city",
    "located",
];

/// An in-memory model with canonical tensor names (see [`crate::model::checkpoint`]).
#[derive(Debug, Clone)]
pub struct SynthModel {
    pub config: ModelConfig,
    /// Canonical name -> tensor. With tied embeddings `unembed.W_U` is not stored: the
    /// [`Checkpoint`] impl answers it with `embed.W_E`, so editing the embedding edits both.
    pub tensors: BTreeMap<String, Tensor>,
    pub vocab: Vec<String>,
}

/// Element type of the weights [`SynthModel::write_hf_folder`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
}

/// A tiny model: 2 layers, d_model 32, 4 heads of 8 (llama: 2 KV heads), d_mlp 64, n_ctx 64.
/// Llama has an untied unembedding and no biases; GPT-2 has biases everywhere and tied embeddings.
pub fn tiny(arch: Architecture, seed: u64) -> SynthModel {
    tiny_layers(arch, seed, 2)
}

/// [`tiny`] with `n_layers` layers (the first two are [`tiny`]'s).
pub fn tiny_layers(arch: Architecture, seed: u64, n_layers: usize) -> SynthModel {
    let llama = arch == Architecture::Llama;
    let config = ModelConfig {
        architecture: arch,
        n_layers,
        n_heads: 4,
        n_kv_heads: if llama { 2 } else { 4 },
        d_model: 32,
        d_head: 8,
        d_mlp: 64,
        vocab_size: VOCAB.len(),
        n_ctx: 64,
        norm_eps: 1e-5,
        rope_theta: llama.then_some(10000.0),
        rope_scaling: None,
        tied_embeddings: !llama,
    };
    let (d, v, q_dim, kv_dim, d_mlp) = (
        config.d_model,
        config.vocab_size,
        config.n_heads * config.d_head,
        config.n_kv_heads * config.d_head,
        config.d_mlp,
    );

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    let mut add = |name: String, shape: Vec<usize>, mean: f32, std: f32| {
        tensors.insert(name, random(&mut rng, shape, mean, std));
    };
    // Scales: residual entries ~0.5, projections ~1/sqrt(fan_in) (q and k a bit larger so
    // attention patterns are not uniform), writes into the residual stream damped to keep it O(1).
    let inv_sqrt = |n: usize| 1.0 / (n as f32).sqrt();
    add("embed.W_E".into(), vec![v, d], 0.0, 0.5);
    if !llama {
        add("pos_embed.W_pos".into(), vec![config.n_ctx, d], 0.0, 0.1);
    }
    for l in 0..config.n_layers {
        let b = |s: &str| format!("blocks.{l}.{s}");
        for ln in ["ln1", "ln2"] {
            add(b(&format!("{ln}.w")), vec![d], 1.0, 0.2);
            if !llama {
                add(b(&format!("{ln}.b")), vec![d], 0.0, 0.1);
            }
        }
        add(b("attn.W_Q"), vec![q_dim, d], 0.0, 1.5 * inv_sqrt(d));
        add(b("attn.W_K"), vec![kv_dim, d], 0.0, 1.5 * inv_sqrt(d));
        add(b("attn.W_V"), vec![kv_dim, d], 0.0, inv_sqrt(d));
        add(b("attn.W_O"), vec![d, q_dim], 0.0, 0.5 * inv_sqrt(q_dim));
        if llama {
            add(b("mlp.W_gate"), vec![d_mlp, d], 0.0, inv_sqrt(d));
        }
        add(b("mlp.W_in"), vec![d_mlp, d], 0.0, inv_sqrt(d));
        add(b("mlp.W_out"), vec![d, d_mlp], 0.0, 0.5 * inv_sqrt(d_mlp));
        if !llama {
            add(b("attn.b_Q"), vec![q_dim], 0.0, 0.1);
            add(b("attn.b_K"), vec![kv_dim], 0.0, 0.1);
            add(b("attn.b_V"), vec![kv_dim], 0.0, 0.1);
            add(b("attn.b_O"), vec![d], 0.0, 0.1);
            add(b("mlp.b_in"), vec![d_mlp], 0.0, 0.1);
            add(b("mlp.b_out"), vec![d], 0.0, 0.1);
        }
    }
    add("ln_final.w".into(), vec![d], 1.0, 0.2);
    if llama {
        add("unembed.W_U".into(), vec![v, d], 0.0, 2.0 * inv_sqrt(d));
    } else {
        add("ln_final.b".into(), vec![d], 0.0, 0.1);
    }
    SynthModel { config, tensors, vocab: VOCAB.iter().map(|w| w.to_string()).collect() }
}

/// Uniform noise with the given mean and standard deviation (uniform on +-sqrt(3)*std).
fn random(rng: &mut ChaCha8Rng, shape: Vec<usize>, mean: f32, std: f32) -> Tensor {
    let half_width = std * 3f32.sqrt();
    let n = shape.iter().product();
    let data = (0..n).map(|_| mean + rng.gen_range(-half_width..half_width)).collect();
    Tensor::new(shape, data)
}

impl SynthModel {
    /// Token ids of a whitespace-separated prompt; unknown words map to `<unk>` (id 0).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        text.split_whitespace().map(|w| self.vocab.iter().position(|v| v == w).unwrap_or(0) as u32).collect()
    }

    /// A Hugging Face `tokenizers` JSON: WordLevel model over [`Self::vocab`], Whitespace
    /// pre-tokenizer, `<unk>` for unknown words.
    pub fn tokenizer_value(&self) -> serde_json::Value {
        let vocab: serde_json::Map<String, serde_json::Value> =
            self.vocab.iter().enumerate().map(|(i, w)| (w.clone(), json!(i))).collect();
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": { "type": "Whitespace" },
            "post_processor": null,
            "decoder": null,
            "model": { "type": "WordLevel", "vocab": vocab, "unk_token": "<unk>" }
        })
    }

    /// The tensor with a canonical name, resolving tied embeddings.
    fn canonical(&self, name: &str) -> Option<&Tensor> {
        let name = if name == "unembed.W_U" && self.config.tied_embeddings { "embed.W_E" } else { name };
        self.tensors.get(name)
    }

    /// Write a Hugging Face checkpoint folder (`config.json`, `model.safetensors`,
    /// `tokenizer.json`) with HF tensor names and layouts, readable by `HfCheckpoint`.
    /// Llama models carrying q/k/v biases are written as `Qwen2ForCausalLM`.
    pub fn write_hf_folder(&self, dir: &Path, dtype: WeightDtype) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let c = &self.config;
        let config = match c.architecture {
            Architecture::Llama => {
                let (arch, model_type) = if self.tensors.contains_key("blocks.0.attn.b_Q") {
                    ("Qwen2ForCausalLM", "qwen2")
                } else {
                    ("LlamaForCausalLM", "llama")
                };
                json!({
                    "architectures": [arch], "model_type": model_type,
                    "hidden_size": c.d_model, "num_hidden_layers": c.n_layers,
                    "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
                    "head_dim": c.d_head, "intermediate_size": c.d_mlp, "vocab_size": c.vocab_size,
                    "max_position_embeddings": c.n_ctx, "rms_norm_eps": c.norm_eps,
                    "rope_theta": c.rope_theta.unwrap_or(10000.0), "rope_scaling": null,
                    "hidden_act": "silu", "tie_word_embeddings": c.tied_embeddings,
                })
            }
            Architecture::Gpt2 => json!({
                "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "n_embd": c.d_model, "n_layer": c.n_layers, "n_head": c.n_heads, "n_inner": c.d_mlp,
                "vocab_size": c.vocab_size, "n_positions": c.n_ctx, "n_ctx": c.n_ctx,
                "layer_norm_epsilon": c.norm_eps, "activation_function": "gelu_new",
            }),
        };
        write_json(&dir.join("config.json"), &config)?;
        write_json(&dir.join(TOKENIZER_FILE), &self.tokenizer_value())?;

        let hf_tensors = match c.architecture {
            Architecture::Llama => self.llama_hf_tensors(),
            Architecture::Gpt2 => self.gpt2_hf_tensors(),
        };
        write_safetensors(&dir.join("model.safetensors"), &hf_tensors, dtype)
    }

    /// Write a GGUF file (word-level vocabulary) that `GgufCheckpoint` reads back; with
    /// `GgufTypes::EXACT` every tensor round-trips bit for bit.
    pub fn write_gguf(&self, path: &Path, types: crate::test_support::gguf_writer::GgufTypes) -> Result<()> {
        crate::test_support::gguf_writer::canonical_to_gguf(path, &self.config, &self.tensors, &self.vocab, &[], types)
    }

    fn llama_hf_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let mut put = |hf: String, canonical: &str| {
            if let Some(t) = self.canonical(canonical) {
                out.push((hf, t.clone()));
            }
        };
        put("model.embed_tokens.weight".into(), "embed.W_E");
        for l in 0..self.config.n_layers {
            let p = format!("model.layers.{l}");
            let b = |s: &str| format!("blocks.{l}.{s}");
            put(format!("{p}.input_layernorm.weight"), &b("ln1.w"));
            put(format!("{p}.post_attention_layernorm.weight"), &b("ln2.w"));
            for (proj, x) in [("q", "Q"), ("k", "K"), ("v", "V"), ("o", "O")] {
                put(format!("{p}.self_attn.{proj}_proj.weight"), &b(&format!("attn.W_{x}")));
                put(format!("{p}.self_attn.{proj}_proj.bias"), &b(&format!("attn.b_{x}")));
            }
            put(format!("{p}.mlp.gate_proj.weight"), &b("mlp.W_gate"));
            put(format!("{p}.mlp.up_proj.weight"), &b("mlp.W_in"));
            put(format!("{p}.mlp.down_proj.weight"), &b("mlp.W_out"));
        }
        put("model.norm.weight".into(), "ln_final.w");
        if !self.config.tied_embeddings {
            put("lm_head.weight".into(), "unembed.W_U");
        }
        out
    }

    /// GPT-2 uses Conv1D ([in, out]) for its projections and fuses Q, K, V into `c_attn`.
    fn gpt2_hf_tensors(&self) -> Vec<(String, Tensor)> {
        let get = |name: &str| self.tensors[name].clone();
        let conv = |name: &str| self.tensors[name].transposed();
        let concat = |names: [String; 3]| {
            let parts: Vec<&Tensor> = names.iter().map(|n| &self.tensors[n]).collect();
            let rows = parts.iter().map(|t| t.shape[0]).sum();
            let mut shape = parts[0].shape.clone();
            shape[0] = rows;
            Tensor::new(shape, parts.iter().flat_map(|t| t.data.iter().copied()).collect())
        };
        let mut out = vec![
            ("transformer.wte.weight".to_string(), get("embed.W_E")),
            ("transformer.wpe.weight".to_string(), get("pos_embed.W_pos")),
        ];
        for l in 0..self.config.n_layers {
            let p = format!("transformer.h.{l}");
            let b = |s: &str| format!("blocks.{l}.{s}");
            out.push((format!("{p}.ln_1.weight"), get(&b("ln1.w"))));
            out.push((format!("{p}.ln_1.bias"), get(&b("ln1.b"))));
            let w_qkv = concat([b("attn.W_Q"), b("attn.W_K"), b("attn.W_V")]);
            out.push((format!("{p}.attn.c_attn.weight"), w_qkv.transposed()));
            out.push((format!("{p}.attn.c_attn.bias"), concat([b("attn.b_Q"), b("attn.b_K"), b("attn.b_V")])));
            out.push((format!("{p}.attn.c_proj.weight"), conv(&b("attn.W_O"))));
            out.push((format!("{p}.attn.c_proj.bias"), get(&b("attn.b_O"))));
            out.push((format!("{p}.ln_2.weight"), get(&b("ln2.w"))));
            out.push((format!("{p}.ln_2.bias"), get(&b("ln2.b"))));
            out.push((format!("{p}.mlp.c_fc.weight"), conv(&b("mlp.W_in"))));
            out.push((format!("{p}.mlp.c_fc.bias"), get(&b("mlp.b_in"))));
            out.push((format!("{p}.mlp.c_proj.weight"), conv(&b("mlp.W_out"))));
            out.push((format!("{p}.mlp.c_proj.bias"), get(&b("mlp.b_out"))));
        }
        out.push(("transformer.ln_f.weight".to_string(), get("ln_final.w")));
        out.push(("transformer.ln_f.bias".to_string(), get("ln_final.b")));
        out
    }
}

impl Checkpoint for SynthModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.canonical(name).cloned())
    }

    fn format(&self) -> &'static str {
        "synthetic"
    }

    fn tokenizer_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(&self.tokenizer_value())?)
    }

    /// Synthetic models hold exactly the canonical tensors of their config.
    fn unused_tensors(&self) -> Vec<String> {
        Vec::new()
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Write tensors with the `safetensors` crate (an independent writer keeps our reader honest).
fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], dtype: WeightDtype) -> Result<()> {
    let st_dtype = match dtype {
        WeightDtype::F32 => safetensors::Dtype::F32,
        WeightDtype::F16 => safetensors::Dtype::F16,
        WeightDtype::Bf16 => safetensors::Dtype::BF16,
    };
    let encoded: Vec<(&str, &[usize], Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let bytes = match dtype {
                WeightDtype::F32 => t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
                WeightDtype::F16 => t.data.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
                WeightDtype::Bf16 => t.data.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
            };
            (name.as_str(), t.shape.as_slice(), bytes)
        })
        .collect();
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| Ok((*name, safetensors::tensor::TensorView::new(st_dtype, shape.to_vec(), bytes)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow::anyhow!("cannot encode safetensors: {e:?}"))?;
    safetensors::serialize_to_file(views, &None, path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e:?}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::safetensors::HfCheckpoint;

    #[test]
    fn deterministic_per_seed() {
        for arch in [Architecture::Llama, Architecture::Gpt2] {
            assert_eq!(tiny(arch, 7).tensors, tiny(arch, 7).tensors);
            assert_ne!(tiny(arch, 7).tensors, tiny(arch, 8).tensors);
        }
    }

    #[test]
    fn tensors_have_canonical_shapes() {
        for arch in [Architecture::Llama, Architecture::Gpt2] {
            let m = tiny(arch, 0);
            let c = &m.config;
            let w_u = crate::model::checkpoint::required(&m, "unembed.W_U", &[c.vocab_size, c.d_model]).unwrap();
            assert_eq!(w_u == m.tensors["embed.W_E"], c.tied_embeddings);
            crate::model::checkpoint::required(&m, "blocks.1.attn.W_K", &[c.n_kv_heads * c.d_head, c.d_model]).unwrap();
        }
    }

    #[test]
    fn tokenizer_encodes_ioi_prompt_word_by_word() {
        let m = tiny(Architecture::Gpt2, 0);
        let mut seen = std::collections::HashSet::new();
        assert!(m.vocab.iter().all(|w| seen.insert(w)), "duplicate vocabulary word");
        let tokenizer: tokenizers::Tokenizer = m.tokenizer_json().unwrap().parse().unwrap();
        let prompt = "When Mary and John went to the store , John gave a drink to";
        let encoding = tokenizer.encode(prompt, false).unwrap();
        assert_eq!(encoding.get_ids(), m.encode(prompt).as_slice());
        assert!(!encoding.get_ids().contains(&0), "prompt word missing from the vocabulary");
        // Whitespace pre-tokenization splits punctuation off words.
        assert_eq!(tokenizer.encode("store, Mary.", false).unwrap().get_ids(), m.encode("store , Mary .").as_slice());
        assert_eq!(tokenizer.encode("Zebra", false).unwrap().get_ids(), &[0]);
    }

    /// Every canonical tensor read back through `HfCheckpoint` equals the original (after rounding
    /// to the stored dtype).
    fn assert_round_trip(m: &SynthModel, dtype: WeightDtype) {
        let dir = tempfile::tempdir().unwrap();
        m.write_hf_folder(dir.path(), dtype).unwrap();
        let hf = HfCheckpoint::open(dir.path()).unwrap();
        assert_eq!(hf.config(), &m.config);
        let round = |x: f32| match dtype {
            WeightDtype::F32 => x,
            WeightDtype::F16 => half::f16::from_f32(x).to_f32(),
            WeightDtype::Bf16 => half::bf16::from_f32(x).to_f32(),
        };
        let mut names: Vec<&str> = m.tensors.keys().map(String::as_str).collect();
        names.push("unembed.W_U");
        for name in names {
            let want = m.tensor(name).unwrap().unwrap();
            let got = hf.tensor(name).unwrap().unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(got.shape, want.shape, "{name}");
            assert!(got.data.iter().zip(&want.data).all(|(g, w)| *g == round(*w)), "{name} differs");
        }
        for absent in ["blocks.0.attn.b_Q", "pos_embed.W_pos", "blocks.0.ln1.b", "blocks.9.ln1.w"] {
            assert_eq!(hf.tensor(absent).unwrap().is_some(), m.tensor(absent).unwrap().is_some(), "{absent}");
        }
        assert_eq!(hf.tokenizer_json().unwrap(), m.tokenizer_json().unwrap());
    }

    #[test]
    fn hf_round_trip_llama() {
        assert_round_trip(&tiny(Architecture::Llama, 1), WeightDtype::F32);
    }

    #[test]
    fn hf_round_trip_gpt2() {
        assert_round_trip(&tiny(Architecture::Gpt2, 2), WeightDtype::F32);
    }

    #[test]
    fn hf_round_trip_half_precision() {
        assert_round_trip(&tiny(Architecture::Llama, 3), WeightDtype::F16);
        assert_round_trip(&tiny(Architecture::Gpt2, 3), WeightDtype::Bf16);
    }

    #[test]
    fn hf_round_trip_qwen2_biases() {
        let mut m = tiny(Architecture::Llama, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for l in 0..m.config.n_layers {
            let (q, kv) = (m.config.n_heads * m.config.d_head, m.config.n_kv_heads * m.config.d_head);
            for (name, n) in [("b_Q", q), ("b_K", kv), ("b_V", kv)] {
                m.tensors.insert(format!("blocks.{l}.attn.{name}"), random(&mut rng, vec![n], 0.0, 0.1));
            }
        }
        assert_round_trip(&m, WeightDtype::F32);
        let dir = tempfile::tempdir().unwrap();
        m.write_hf_folder(dir.path(), WeightDtype::F32).unwrap();
        let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        assert!(config.contains("Qwen2ForCausalLM"));
    }

    #[test]
    fn hf_round_trip_sharded() {
        // Split the llama file into two shards with an index, as `save_pretrained` does.
        let m = tiny(Architecture::Llama, 5);
        let dir = tempfile::tempdir().unwrap();
        m.write_hf_folder(dir.path(), WeightDtype::F32).unwrap();
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let tensors = m.llama_hf_tensors();
        let (first, second) = tensors.split_at(tensors.len() / 2);
        let mut weight_map = serde_json::Map::new();
        for (shard, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)]
        {
            write_safetensors(&dir.path().join(shard), part, WeightDtype::F32).unwrap();
            for (name, _) in part {
                weight_map.insert(name.clone(), json!(shard));
            }
        }
        let index = json!({ "metadata": {}, "weight_map": weight_map });
        write_json(&dir.path().join("model.safetensors.index.json"), &index).unwrap();
        let hf = HfCheckpoint::open(dir.path()).unwrap();
        for (name, t) in &m.tensors {
            assert_eq!(&hf.tensor(name).unwrap().unwrap(), t, "{name}");
        }
    }
}
