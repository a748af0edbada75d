//! [`GgufCheckpoint`]: a GGUF file seen through the canonical [`Checkpoint`] interface, with the
//! tensor-name mapping (llama's RoPE-permuted Q/K rows, GPT-2's fused QKV) between the two.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

use super::config::{config_from, Family, ROPE_FREQS};
use super::{tokenizer, GgufFile};
use crate::model::checkpoint::{Checkpoint, Tensor};
use crate::model::ModelConfig;

/// Where a canonical tensor lives in a GGUF file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Source {
    Plain(String),
    /// Rows of llama's Q (`n_heads`) or K (`n_kv_heads`) projection, stored RoPE-interleaved.
    Permuted(String, usize),
    /// Part `i` (0 = Q, 1 = K, 2 = V) of a fused `attn_qkv` tensor.
    Fused(String, usize),
}

/// Map a canonical name (see `checkpoint.rs`) to its GGUF source; `None` for an unknown name.
pub(crate) fn source(name: &str, config: &ModelConfig, family: Family) -> Option<Source> {
    let plain = |s: &str| Some(Source::Plain(s.to_string()));
    match name {
        "embed.W_E" => return plain("token_embd.weight"),
        "pos_embed.W_pos" => return plain("position_embd.weight"),
        "ln_final.w" => return plain("output_norm.weight"),
        "ln_final.b" => return plain("output_norm.bias"),
        "unembed.W_U" if config.tied_embeddings => return plain("token_embd.weight"),
        "unembed.W_U" => return plain("output.weight"),
        _ => {}
    }
    let rest = name.strip_prefix("blocks.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let blk = |s: &str| format!("blk.{layer}.{s}");
    let (gguf, qkv_part) = match part {
        "ln1.w" => ("attn_norm.weight", None),
        "ln1.b" => ("attn_norm.bias", None),
        "ln2.w" => ("ffn_norm.weight", None),
        "ln2.b" => ("ffn_norm.bias", None),
        "attn.W_Q" => ("attn_q.weight", Some(0)),
        "attn.W_K" => ("attn_k.weight", Some(1)),
        "attn.W_V" => ("attn_v.weight", Some(2)),
        "attn.b_Q" => ("attn_q.bias", Some(0)),
        "attn.b_K" => ("attn_k.bias", Some(1)),
        "attn.b_V" => ("attn_v.bias", Some(2)),
        "attn.W_O" => ("attn_output.weight", None),
        "attn.b_O" => ("attn_output.bias", None),
        "mlp.W_gate" => ("ffn_gate.weight", None),
        "mlp.W_in" => ("ffn_up.weight", None),
        "mlp.W_out" => ("ffn_down.weight", None),
        "mlp.b_in" => ("ffn_up.bias", None),
        "mlp.b_out" => ("ffn_down.bias", None),
        _ => return None,
    };
    Some(match qkv_part {
        // GPT-2 stores Q, K and V as one fused tensor.
        Some(i) if family == Family::Gpt2 => {
            let suffix = if gguf.ends_with("bias") { "bias" } else { "weight" };
            Source::Fused(blk(&format!("attn_qkv.{suffix}")), i)
        }
        Some(0) if family == Family::LlamaPermuted => Source::Permuted(blk(gguf), config.n_heads),
        Some(1) if family == Family::LlamaPermuted => Source::Permuted(blk(gguf), config.n_kv_heads),
        _ => Source::Plain(blk(gguf)),
    })
}

/// llama.cpp's converter permutation for interleaved RoPE, on the rows of `data` (rows of
/// `row_len` values, `n_heads` heads): `w.reshape(n_heads, 2, d_head/2, row).swapaxes(1, 2)`.
/// Within a head, HF row `s*half + i` (`s` = first or second half) becomes GGUF row `2*i + s`.
pub fn permute_rope_rows(data: &[f32], n_heads: usize, row_len: usize) -> Vec<f32> {
    rope_rows(data, n_heads, row_len, true)
}

/// The inverse of [`permute_rope_rows`]: GGUF (interleaved) row order back to HF rotate-half.
pub fn unpermute_rope_rows(data: &[f32], n_heads: usize, row_len: usize) -> Vec<f32> {
    rope_rows(data, n_heads, row_len, false)
}

fn rope_rows(data: &[f32], n_heads: usize, row_len: usize, to_gguf: bool) -> Vec<f32> {
    let n_rows = data.len() / row_len;
    let half = n_rows / n_heads / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_heads {
        for s in 0..2 {
            for i in 0..half {
                let hf = h * 2 * half + s * half + i;
                let gguf = h * 2 * half + 2 * i + s;
                let (from, to) = if to_gguf { (hf, gguf) } else { (gguf, hf) };
                out[to * row_len..(to + 1) * row_len].copy_from_slice(&data[from * row_len..(from + 1) * row_len]);
            }
        }
    }
    out
}

/// A GGUF file seen through the canonical [`Checkpoint`] interface.
pub struct GgufCheckpoint {
    file: GgufFile,
    config: ModelConfig,
    family: Family,
    /// GGUF names of the tensors read so far (the RoPE factors are read by [`config_from`]).
    used: Mutex<BTreeSet<String>>,
}

impl GgufCheckpoint {
    pub fn open(path: &Path) -> Result<GgufCheckpoint> {
        let file = GgufFile::open(path)?;
        let (config, family) = config_from(&file).with_context(|| format!("cannot import {}", path.display()))?;
        let used = Mutex::new([ROPE_FREQS.to_string()].into());
        Ok(GgufCheckpoint { file, config, family, used })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    fn load(&self, canonical: &str) -> Result<Option<Tensor>> {
        let Some(src) = source(canonical, &self.config, self.family) else {
            bail!("`{canonical}` is not a canonical tensor name");
        };
        let (gguf, t) = match &src {
            Source::Plain(g) | Source::Permuted(g, _) | Source::Fused(g, _) => (g, self.file.read_tensor(g)?),
        };
        self.used.lock().expect("not poisoned").insert(gguf.clone());
        let Some(t) = t else { return Ok(None) };
        let row_len = if t.shape.len() == 2 { t.shape[1] } else { 1 };
        let n_rows = t.data.len() / row_len;
        Ok(Some(match src {
            Source::Plain(_) => t,
            Source::Permuted(_, n_heads) => {
                if !n_rows.is_multiple_of(2 * n_heads) {
                    bail!("GGUF tensor {gguf} has {n_rows} rows, not an even number per head for {n_heads} heads");
                }
                Tensor::new(t.shape.clone(), unpermute_rope_rows(&t.data, n_heads, row_len))
            }
            Source::Fused(_, part) => {
                let c = &self.config;
                let sizes = [c.n_heads * c.d_head, c.n_kv_heads * c.d_head, c.n_kv_heads * c.d_head];
                if n_rows != sizes.iter().sum::<usize>() {
                    bail!(
                        "GGUF tensor {gguf} has {n_rows} rows, expected {} (Q, K and V rows)",
                        sizes.iter().sum::<usize>()
                    );
                }
                let start: usize = sizes[..part].iter().sum();
                let data = t.data[start * row_len..(start + sizes[part]) * row_len].to_vec();
                let mut shape = t.shape.clone();
                shape[0] = sizes[part];
                Tensor::new(shape, data)
            }
        }))
    }
}

impl Checkpoint for GgufCheckpoint {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        self.load(name).with_context(|| format!("cannot load `{name}` from {}", self.file.path().display()))
    }

    fn format(&self) -> &'static str {
        "gguf"
    }

    fn unused_tensors(&self) -> Vec<String> {
        let used = self.used.lock().expect("not poisoned");
        self.file.tensors().iter().map(|t| t.name.clone()).filter(|n| !used.contains(n)).collect()
    }

    fn tokenizer_json(&self) -> Result<String> {
        tokenizer::tokenizer_json(&self.file)
            .with_context(|| format!("cannot build a tokenizer from {}", self.file.path().display()))
    }
}
