//! `config.json` of a Hugging Face checkpoint -> [`ModelConfig`].
//!
//! No silent defaults: every key that transformers' modelling code reads for the supported
//! architectures is honoured or refused by name. A default is applied only where transformers'
//! own config class applies the same one (each says so below). Keys transformers' forward pass
//! never reads (dropout rates, token ids, dtype, generation settings, ...) do not change the
//! numbers and are left alone, as transformers leaves them.
//!
//! RoPE settings come in two styles: transformers 4 writes a top-level `rope_theta` and an
//! optional `rope_scaling` object; transformers 5 writes one `rope_parameters` object holding
//! `rope_theta` and `rope_type`. Both are read, with transformers 5's precedence
//! (`modeling_rope_utils.convert_rope_params_to_dict`).

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};

use crate::bail_fixable;
use crate::model::rope::RopeScaling;
use crate::model::{Architecture, ModelConfig};

/// `config.json` `architectures[0]` values we can import.
pub const SUPPORTED_ARCHITECTURES: &[&str] =
    &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel"];

/// RoPE types transformers knows that patchbay does not implement yet.
const UNIMPLEMENTED_ROPE_TYPES: &str = "dynamic, yarn, longrope, ntk, proportional";

/// Read `config.json` into a [`ModelConfig`].
pub fn parse_config(json: &Value) -> Result<ModelConfig> {
    let obj = json.as_object().ok_or_else(|| anyhow!("config.json is not a JSON object"))?;
    let c = Config(obj);
    let arch_name = json["architectures"][0].as_str().or_else(|| json["model_type"].as_str()).unwrap_or("");
    let architecture = match arch_name {
        "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "llama" | "mistral" | "qwen2" => {
            Architecture::Llama
        }
        "GPT2LMHeadModel" | "gpt2" => Architecture::Gpt2,
        "" => bail!("config.json names no architecture (neither `architectures` nor `model_type`)"),
        other => bail!("unsupported architecture `{other}`; patchbay imports {}", SUPPORTED_ARCHITECTURES.join(", ")),
    };
    match architecture {
        Architecture::Llama => llama(&c, json["model_type"].as_str().unwrap_or(arch_name)),
        Architecture::Gpt2 => gpt2(&c),
    }
}

/// Typed access to the keys of `config.json`, with errors that name the key.
struct Config<'a>(&'a Map<String, Value>);

impl Config<'_> {
    /// The value of `key`, `None` when absent or `null` (transformers treats both as unset).
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| anyhow!("`{key}` should be a non-negative integer, found {v}"))
            })
            .transpose()
    }

    /// The first of `keys` present (GPT-2's and Llama's names for the same field).
    fn need(&self, keys: &[&str]) -> Result<usize> {
        for key in keys {
            if let Some(n) = self.usize(key)? {
                return Ok(n);
            }
        }
        bail!("missing `{}`", keys.join("` / `"))
    }

    fn f32(&self, key: &str) -> Result<Option<f32>> {
        self.get(key)
            .map(|v| v.as_f64().map(|x| x as f32).ok_or_else(|| anyhow!("`{key}` should be a number, found {v}")))
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| anyhow!("`{key}` should be true or false, found {v}")))
            .transpose()
    }

    fn str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| anyhow!("`{key}` should be a string, found {v}"))).transpose()
    }
}

/// Sizes every architecture has.
struct Sizes {
    d_model: usize,
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: usize,
    d_head: usize,
    vocab_size: usize,
    n_ctx: usize,
}

fn sizes(c: &Config) -> Result<Sizes> {
    let d_model = c.need(&["hidden_size", "n_embd"])?;
    let n_heads = c.need(&["num_attention_heads", "n_head"])?;
    // transformers: `num_key_value_heads` defaults to `num_attention_heads`; `head_dim` to
    // hidden_size // num_attention_heads.
    let n_kv_heads = c.usize("num_key_value_heads")?.unwrap_or(n_heads);
    if n_heads == 0 || n_kv_heads == 0 || !n_heads.is_multiple_of(n_kv_heads) {
        bail!("{n_heads} attention heads cannot share {n_kv_heads} key/value heads");
    }
    Ok(Sizes {
        d_model,
        n_layers: c.need(&["num_hidden_layers", "n_layer"])?,
        n_heads,
        n_kv_heads,
        d_head: c.usize("head_dim")?.unwrap_or(d_model / n_heads),
        vocab_size: c.need(&["vocab_size"])?,
        n_ctx: c.need(&["max_position_embeddings", "n_positions"])?,
    })
}

fn llama(c: &Config, model_type: &str) -> Result<ModelConfig> {
    let s = sizes(c)?;
    // transformers' default activation for these configs is silu ("swish" is the same function).
    let act = c.str("hidden_act")?.unwrap_or("silu");
    if act != "silu" && act != "swish" {
        bail!("hidden_act `{act}` is not supported for {model_type}; patchbay implements SwiGLU (silu)");
    }
    if c.bool("mlp_bias")? == Some(true) {
        bail!("mlp_bias: true is not supported; patchbay's llama MLP has no biases");
    }
    let mut n_ctx = s.n_ctx;
    // Sliding-window attention equals full attention on sequences no longer than the window, so
    // the context is capped there instead of implementing the window. transformers: Mistral
    // always windows (when `sliding_window` is set); Qwen2 only with `use_sliding_window`.
    let windowed = match model_type {
        "mistral" => true,
        "qwen2" => c.bool("use_sliding_window")?.unwrap_or(false),
        _ => false,
    };
    if let (true, Some(window)) = (windowed, c.usize("sliding_window")?) {
        n_ctx = n_ctx.min(window);
    }
    if let Some(types) = c.get("layer_types") {
        let sliding = types.as_array().is_some_and(|t| t.iter().any(|x| x != "full_attention"));
        match c.usize("sliding_window")? {
            Some(window) if sliding => n_ctx = n_ctx.min(window),
            None if sliding => bail!("`layer_types` asks for sliding-window layers but `sliding_window` is not set"),
            _ => {}
        }
    }
    let (rope_theta, rope_scaling) = rope(c, s.d_head, s.n_ctx)?;
    Ok(ModelConfig {
        architecture: Architecture::Llama,
        n_layers: s.n_layers,
        n_heads: s.n_heads,
        n_kv_heads: s.n_kv_heads,
        d_model: s.d_model,
        d_head: s.d_head,
        d_mlp: c.need(&["intermediate_size"])?,
        vocab_size: s.vocab_size,
        n_ctx,
        // LlamaConfig, MistralConfig and Qwen2Config all default rms_norm_eps to 1e-6.
        norm_eps: c.f32("rms_norm_eps")?.unwrap_or(1e-6),
        rope_theta: Some(rope_theta),
        rope_scaling,
        // The three configs default tie_word_embeddings to false.
        tied_embeddings: c.bool("tie_word_embeddings")?.unwrap_or(false),
    })
}

fn gpt2(c: &Config) -> Result<ModelConfig> {
    let s = sizes(c)?;
    // GPT2Config's default; "gelu_pytorch_tanh" is the same function.
    let act = c.str("activation_function")?.unwrap_or("gelu_new");
    if act != "gelu_new" && act != "gelu_pytorch_tanh" {
        bail!("activation_function `{act}` is not supported; patchbay's GPT-2 uses gelu_new");
    }
    for (key, wanted) in
        [("scale_attn_weights", true), ("scale_attn_by_inverse_layer_idx", false), ("add_cross_attention", false)]
    {
        if let Some(value) = c.bool(key)?.filter(|v| *v != wanted) {
            bail!("`{key}: {value}` is not supported; patchbay's GPT-2 implements `{key}: {wanted}`");
        }
    }
    Ok(ModelConfig {
        architecture: Architecture::Gpt2,
        n_layers: s.n_layers,
        n_heads: s.n_heads,
        n_kv_heads: s.n_kv_heads,
        d_model: s.d_model,
        d_head: s.d_head,
        // GPT2Config: n_inner = None means 4 * n_embd.
        d_mlp: c.usize("n_inner")?.unwrap_or(4 * s.d_model),
        vocab_size: s.vocab_size,
        n_ctx: s.n_ctx,
        // GPT2Config's default.
        norm_eps: c.f32("layer_norm_epsilon")?.unwrap_or(1e-5),
        rope_theta: None,
        rope_scaling: None,
        // GPT2Config (PretrainedConfig) defaults tie_word_embeddings to true.
        tied_embeddings: c.bool("tie_word_embeddings")?.unwrap_or(true),
    })
}

/// RoPE base and scaling from either config style. `max_positions` is the default for llama3's
/// `original_max_position_embeddings`, as in transformers.
fn rope(c: &Config, d_head: usize, max_positions: usize) -> Result<(f32, Option<RopeScaling>)> {
    let (key, params) = match (c.get("rope_parameters"), c.get("rope_scaling")) {
        (Some(_), Some(_)) => bail_fixable!(
            "config.json has both `rope_parameters` (transformers 5) and `rope_scaling` (transformers 4)";
            help: "keep the one the checkpoint was trained with"
        ),
        (Some(p), None) => ("rope_parameters", Some(p)),
        (None, Some(p)) => ("rope_scaling", Some(p)),
        (None, None) => ("rope_parameters", None),
    };
    let empty = Map::new();
    let params = match params {
        None => &empty,
        Some(Value::Object(map)) => map,
        Some(other) => bail!("`{key}` should be an object, found {other}"),
    };
    if params.values().any(Value::is_object) {
        bail!("`{key}` holds one RoPE setting per layer type; patchbay supports one RoPE for all layers");
    }
    let p = Config(params);
    let top_theta = c.f32("rope_theta")?;
    let theta = match (p.f32("rope_theta")?, top_theta) {
        (Some(a), Some(b)) if a != b => {
            bail!("config.json gives two RoPE bases: `{key}.rope_theta` = {a} and `rope_theta` = {b}")
        }
        (Some(t), _) | (None, Some(t)) => t,
        // transformers' `default_theta` for Llama, Mistral and Qwen2.
        (None, None) => 10000.0,
    };
    if !(theta > 0.0 && theta.is_finite()) {
        bail!("rope_theta {theta} must be a positive number");
    }
    let partial = match (p.f32("partial_rotary_factor")?, c.f32("partial_rotary_factor")?) {
        (Some(f), _) | (None, Some(f)) => f,
        (None, None) => 1.0,
    };
    if partial != 1.0 {
        bail!("partial_rotary_factor {partial} is not supported; patchbay rotates every head dimension");
    }

    // transformers 4 wrote `type`, later `rope_type`; `default` when neither is given.
    let rope_type = match (p.str("rope_type")?, p.str("type")?) {
        (Some(a), Some(b)) if a != b => bail!("`{key}` gives two RoPE types: `rope_type` {a} and `type` {b}"),
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => "default",
    };
    let factor = || p.f32("factor")?.ok_or_else(|| anyhow!("`{key}` of type {rope_type} has no `factor`"));
    let (scaling, known): (Option<RopeScaling>, &[&str]) = match rope_type {
        "default" => (None, &[]),
        "linear" => (Some(RopeScaling::Linear { factor: factor()? }), &["factor"]),
        "llama3" => {
            let need = |k: &str| p.f32(k)?.ok_or_else(|| anyhow!("`{key}` of type llama3 has no `{k}`"));
            let original = match p.f32("original_max_position_embeddings")? {
                Some(n) => n,
                // transformers: `original_max_position_embeddings` defaults to max_position_embeddings.
                None => max_positions as f32,
            };
            let scaling = RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: original,
            };
            (Some(scaling), &["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"])
        }
        other => bail!(
            "RoPE type `{other}` (in `{key}`) is not supported yet; patchbay implements default, linear and llama3 \
             RoPE ({UNIMPLEMENTED_ROPE_TYPES} are not implemented)"
        ),
    };
    let always = ["rope_type", "type", "rope_theta", "partial_rotary_factor"];
    if let Some(extra) = params.keys().find(|k| !always.contains(&k.as_str()) && !known.contains(&k.as_str())) {
        bail!(
            "`{key}.{extra}` = {} is not used by {rope_type} RoPE as patchbay implements it; refusing rather than ignoring it",
            params[extra]
        );
    }
    crate::model::rope::validate(d_head, scaling.as_ref())?;
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""hidden_size":64,"num_hidden_layers":1,"num_attention_heads":4,"intermediate_size":8,"vocab_size":3,"max_position_embeddings":2048"#;

    fn parse(extra: &str) -> Result<ModelConfig> {
        let json = format!(r#"{{"architectures":["LlamaForCausalLM"],{BASE}{extra}}}"#);
        parse_config(&serde_json::from_str(&json).unwrap())
    }

    fn error(extra: &str) -> String {
        format!("{:#}", parse(extra).unwrap_err())
    }

    /// The regression of issue 6: transformers 5 keeps the base inside `rope_parameters`.
    #[test]
    fn transformers5_rope_parameters_are_read() {
        let c = parse(r#","rope_parameters":{"rope_theta":500000.0,"rope_type":"default"}"#).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (Some(500000.0), None));
        let c = parse(r#","rope_theta":500000.0"#).unwrap();
        assert_eq!(c.rope_theta, Some(500000.0));
        // Neither style: LlamaConfig's default.
        assert_eq!(parse("").unwrap().rope_theta, Some(10000.0));
    }

    #[test]
    fn both_styles_give_the_same_scaling() {
        let llama3 =
            r#""factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64"#;
        let v4 = parse(&format!(r#","rope_theta":10000.0,"rope_scaling":{{"rope_type":"llama3",{llama3}}}"#)).unwrap();
        let v5 =
            parse(&format!(r#","rope_parameters":{{"rope_theta":10000.0,"rope_type":"llama3",{llama3}}}"#)).unwrap();
        assert_eq!(v4, v5);
        assert!(matches!(v5.rope_scaling, Some(RopeScaling::Llama3 { factor: 8.0, .. })));
        let old = parse(r#","rope_scaling":{"type":"linear","factor":2.0}"#).unwrap();
        assert_eq!(old.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
        // llama3 without original_max_position_embeddings: transformers uses max_position_embeddings.
        let c = parse(
            r#","rope_parameters":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0}"#,
        )
        .unwrap();
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { original_max_position_embeddings: 2048.0, .. })));
    }

    #[test]
    fn unsupported_rope_settings_are_refused_by_name() {
        let e = error(r#","rope_scaling":{"rope_type":"yarn","factor":4.0}"#);
        assert!(e.contains("`yarn`") && e.contains("rope_scaling") && e.contains("llama3"), "{e}");
        let e = error(r#","rope_parameters":{"rope_type":"dynamic","factor":2.0,"rope_theta":10000.0}"#);
        assert!(e.contains("`dynamic`") && e.contains("rope_parameters"), "{e}");
        let e = error(r#","rope_parameters":{"rope_type":"linear","factor":2.0,"attention_factor":0.5}"#);
        assert!(e.contains("rope_parameters.attention_factor"), "{e}");
        let e = error(r#","rope_parameters":{"rope_type":"default","rope_theta":1e6},"rope_theta":1e4"#);
        assert!(e.contains("two RoPE bases"), "{e}");
        let e = error(r#","partial_rotary_factor":0.5"#);
        assert!(e.contains("partial_rotary_factor"), "{e}");
        let e = error(r#","rope_parameters":{"full_attention":{"rope_type":"default"}}"#);
        assert!(e.contains("per layer type"), "{e}");
        let e = error(r#","rope_scaling":{"rope_type":"linear"}"#);
        assert!(e.contains("no `factor`"), "{e}");
    }

    #[test]
    fn computation_keys_are_refused_by_name() {
        assert!(error(r#","hidden_act":"gelu""#).contains("hidden_act `gelu`"));
        assert!(error(r#","mlp_bias":true"#).contains("mlp_bias"));
        let gpt2 =
            r#"{"architectures":["GPT2LMHeadModel"],"n_embd":8,"n_layer":2,"n_head":2,"vocab_size":5,"n_positions":32"#;
        for (key, value) in [("scale_attn_weights", "false"), ("scale_attn_by_inverse_layer_idx", "true")] {
            let json = format!(r#"{gpt2},"{key}":{value}}}"#);
            let e = format!("{:#}", parse_config(&serde_json::from_str(&json).unwrap()).unwrap_err());
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn defaults_are_transformers_defaults() {
        let c = parse_config(
            &serde_json::from_str(
                r#"{"architectures":["GPT2LMHeadModel"],"n_embd":8,"n_layer":2,"n_head":2,"vocab_size":5,"n_positions":32,"n_inner":null}"#,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!((c.d_mlp, c.d_head, c.n_kv_heads, c.norm_eps, c.tied_embeddings), (32, 4, 2, 1e-5, true));
        let c = parse("").unwrap();
        assert_eq!((c.norm_eps, c.tied_embeddings, c.n_kv_heads, c.d_head), (1e-6, false, 4, 16));
        let c = parse_config(
            &serde_json::from_str(
                r#"{"model_type":"mistral","hidden_size":8,"num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,
                "intermediate_size":16,"vocab_size":5,"max_position_embeddings":32768,"sliding_window":4096,"rope_theta":1e6}"#,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!((c.n_ctx, c.d_head, c.n_kv_heads, c.rope_theta), (4096, 2, 2, Some(1e6)));
    }

    #[test]
    fn unsupported_architecture_lists_supported_ones() {
        let e = format!(
            "{:#}",
            parse_config(
                &serde_json::from_str(&format!(r#"{{"architectures":["FalconForCausalLM"],{BASE}}}"#)).unwrap()
            )
            .unwrap_err()
        );
        assert!(
            e.contains("FalconForCausalLM") && e.contains("LlamaForCausalLM") && e.contains("GPT2LMHeadModel"),
            "{e}"
        );
    }
}
