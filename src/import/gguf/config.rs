//! A GGUF file's metadata -> [`ModelConfig`]: architecture, sizes, RoPE and its scaling.
//!
//! No silent defaults: every `{arch}.*` key is honoured, neutral at llama.cpp's default, or
//! refused by name; RoPE scaling (`rope.scaling.*`, the `rope_freqs.weight` tensor) likewise.

use anyhow::{bail, Result};

use super::GgufFile;
use crate::bail_fixable;
use crate::model::rope::RopeScaling;
use crate::model::{Architecture, ModelConfig};

/// How a GGUF architecture maps onto patchbay's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `llama`, `mistral`: llama.cpp's converter permutes Q/K rows for interleaved RoPE.
    LlamaPermuted,
    /// `qwen2`: llama.cpp uses NeoX (rotate-half) RoPE here, so rows are in HF order.
    Llama,
    Gpt2,
}

const SUPPORTED_ARCHITECTURES: &str = "llama, mistral, qwen2, gpt2";

pub fn family(arch: &str) -> Result<Family> {
    Ok(match arch {
        "llama" | "mistral" => Family::LlamaPermuted,
        "qwen2" => Family::Llama,
        "gpt2" => Family::Gpt2,
        other => bail!("GGUF architecture `{other}` is not supported; patchbay imports: {SUPPORTED_ARCHITECTURES}"),
    })
}

/// Read the model hyper-parameters from GGUF metadata (and tensor shapes).
pub fn config_from(file: &GgufFile) -> Result<(ModelConfig, Family)> {
    let arch = file
        .get_str("general.architecture")?
        .ok_or_else(|| anyhow::anyhow!("GGUF has no `general.architecture`; cannot tell what model this is"))?;
    let family = family(arch)?;
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| -> Result<usize> {
        let k = key(k);
        let v = file.get_u64(&k)?.ok_or_else(|| anyhow::anyhow!("GGUF metadata has no `{k}`"))?;
        usize::try_from(v)
            .ok()
            .filter(|&v| v > 0 && v < 1 << 32)
            .ok_or_else(|| anyhow::anyhow!("GGUF metadata `{k}` = {v} is out of range"))
    };
    let n_layers = need("block_count")?;
    let d_model = need("embedding_length")?;
    let n_heads = need("attention.head_count")?;
    let n_kv_heads = match file.get_u64(&key("attention.head_count_kv"))? {
        Some(n) => n as usize,
        None => n_heads,
    };
    if n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        bail!("GGUF metadata: {n_heads} attention heads cannot be shared among {n_kv_heads} key/value heads");
    }
    let d_head = match file.get_u64(&key("attention.key_length"))? {
        Some(n) => n as usize,
        None if d_model.is_multiple_of(n_heads) => d_model / n_heads,
        None => bail!("GGUF metadata: embedding_length {d_model} is not divisible by head_count {n_heads}"),
    };
    if family != Family::Gpt2 {
        if let Some(rot) = file.get_u64(&key("rope.dimension_count"))? {
            if rot as usize != d_head {
                bail!("GGUF model rotates {rot} of {d_head} head dimensions; patchbay supports full-width RoPE only");
            }
        }
    }
    let d_mlp = need("feed_forward_length")?;
    let n_ctx = need("context_length")?;
    let eps_key =
        key(if family == Family::Gpt2 { "attention.layer_norm_epsilon" } else { "attention.layer_norm_rms_epsilon" });
    let norm_eps = file.get_f64(&eps_key)?.ok_or_else(|| anyhow::anyhow!("GGUF metadata has no `{eps_key}`"))? as f32;
    let (rope_theta, rope_scaling) = match family {
        Family::Gpt2 => (None, None),
        _ => {
            // llama.cpp's default base when the key is absent.
            let theta = file.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32;
            (Some(theta), rope_scaling(file, arch, d_head)?)
        }
    };
    check_metadata_keys(file, arch, d_head)?;
    let vocab_size = match file.tensor_info("token_embd.weight") {
        Some(t) if t.dims.len() == 2 => t.dims[1] as usize,
        Some(t) => bail!("GGUF tensor token_embd.weight has dims {:?}, expected 2", t.dims),
        None => bail!("GGUF file has no token_embd.weight tensor"),
    };
    let config = ModelConfig {
        architecture: if family == Family::Gpt2 { Architecture::Gpt2 } else { Architecture::Llama },
        n_layers,
        n_heads,
        n_kv_heads,
        d_model,
        d_head,
        d_mlp,
        vocab_size,
        n_ctx,
        norm_eps,
        rope_theta,
        rope_scaling,
        tied_embeddings: file.tensor_info("output.weight").is_none(),
    };
    if let Some(n) = file.get_u64(&key("vocab_size"))? {
        if n as usize != config.vocab_size {
            bail!(
                "GGUF metadata `{}` = {n} disagrees with token_embd.weight's {} rows",
                key("vocab_size"),
                config.vocab_size
            );
        }
    }
    Ok((config, family))
}

/// The GGUF tensor of llama.cpp's per-frequency RoPE divisors (how it stores llama3 scaling).
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// RoPE scaling from `{arch}.rope.scaling.*` (and the older `rope.scale_linear`) and the
/// `rope_freqs.weight` tensor, as llama.cpp reads them; what it cannot honour is refused.
fn rope_scaling(file: &GgufFile, arch: &str, d_head: usize) -> Result<Option<RopeScaling>> {
    let key = |k: &str| format!("{arch}.{k}");
    let kind = file.get_str(&key("rope.scaling.type"))?;
    let factor = match (file.get_f64(&key("rope.scaling.factor"))?, file.get_f64(&key("rope.scale_linear"))?) {
        (Some(a), Some(b)) if a != b => bail!(
            "GGUF metadata gives two RoPE scaling factors: `{}` = {a} and `{}` = {b}",
            key("rope.scaling.factor"),
            key("rope.scale_linear")
        ),
        (Some(f), _) | (None, Some(f)) => Some(f as f32),
        (None, None) => None,
    };
    // llama.cpp treats a factor of 0 as "unset", and 1 scales nothing.
    let factor = factor.filter(|f| *f != 0.0 && *f != 1.0);
    let mut scaling = match (kind, factor) {
        (None | Some("none"), None) => None,
        (None | Some("linear"), Some(factor)) => Some(RopeScaling::Linear { factor }),
        (Some("linear"), None) => None,
        (Some("none"), Some(factor)) => bail!(
            "GGUF metadata sets `{}` = none but a RoPE scaling factor of {factor}; refusing an ambiguous setting",
            key("rope.scaling.type")
        ),
        (Some(other), _) => bail!(
            "GGUF RoPE scaling type `{other}` (`{}`) is not supported yet; patchbay implements none, linear and \
             llama3 (`{ROPE_FREQS}`)",
            key("rope.scaling.type")
        ),
    };
    if let Some(t) = file.read_tensor(ROPE_FREQS)? {
        if scaling.is_some() {
            bail!("GGUF has both `{ROPE_FREQS}` and a linear RoPE scaling factor; patchbay applies one RoPE scaling");
        }
        scaling = Some(RopeScaling::FreqFactors { factors: t.data });
    }
    crate::model::rope::validate(d_head, scaling.as_ref())?;
    Ok(scaling)
}

/// `{arch}.*` metadata keys patchbay reads (in [`config_from`] and [`rope_scaling`]).
const HONOURED_KEYS: &[&str] = &[
    "block_count",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "vocab_size",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.layer_norm_epsilon",
    "attention.layer_norm_rms_epsilon",
    "rope.dimension_count",
    "rope.freq_base",
    "rope.scaling.type",
    "rope.scaling.factor",
    "rope.scale_linear",
    // Read by llama.cpp only for YaRN, which is refused; inert for the scalings we implement.
    "rope.scaling.original_context_length",
    // A training-history flag that llama.cpp does not compute with.
    "rope.scaling.finetuned",
];

/// `{arch}.*` keys whose value is harmless only at the value given (llama.cpp's default).
const NEUTRAL_VALUES: &[(&str, f64)] = &[
    ("expert_count", 0.0),
    ("expert_used_count", 0.0),
    ("logit_scale", 1.0),
    ("rope.scaling.attn_factor", 1.0),
    ("attention.causal", 1.0),
];

/// No silent defaults: every `{arch}.*` key is honoured, neutral, or refused by name; so is a
/// split (multi-file) GGUF.
fn check_metadata_keys(file: &GgufFile, arch: &str, d_head: usize) -> Result<()> {
    if let Some(n) = file.get_u64("split.count")?.filter(|n| *n > 1) {
        bail!("this GGUF is one of {n} split files; merge them first (llama.cpp's `llama-gguf-split --merge`)");
    }
    let prefix = format!("{arch}.");
    for (full, value) in file.metadata() {
        let Some(k) = full.strip_prefix(&prefix) else { continue };
        if HONOURED_KEYS.contains(&k) {
            continue;
        }
        // patchbay's heads have one size for keys and values.
        if k == "attention.value_length" && value.as_u64() == Some(d_head as u64) {
            continue;
        }
        let neutral = NEUTRAL_VALUES.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        let as_number = value.as_f64().or_else(|| value.as_bool().map(|b| if b { 1.0 } else { 0.0 }));
        match neutral {
            Some(v) if as_number == Some(v) => continue,
            _ => bail_fixable!(
                "GGUF metadata `{full}` = {} is not implemented by patchbay, and llama.cpp computes with it",
                value.describe();
                help: "patchbay imports a model only when it computes exactly what the file describes"
            ),
        }
    }
    Ok(())
}
