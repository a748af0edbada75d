//! The model directory: the contract between `patchbay import` and everything that runs a model.
//!
//! A model directory holds `model.onnx` (+ `model.onnx.data`, its external weights),
//! `tokenizer.json` and the manifest `patchbay.json` described by [`Manifest`].

pub mod attention;
pub mod checkpoint;
pub mod reference;
pub mod rope;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{bail_fixable, fixable};

pub const MANIFEST_FILE: &str = "patchbay.json";
pub const ONNX_FILE: &str = "model.onnx";
pub const ONNX_DATA_FILE: &str = "model.onnx.data";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The token embeddings, where Gaussian-noise corruption is applied.
pub const EMBED_HOOK: &str = "hook_embed";
/// 2: the unembedding reads batch and positions from the residual stream, not the input.
pub const MANIFEST_FORMAT: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// RMSNorm, rotary positions (rotate-half convention), grouped-query attention, SwiGLU MLP.
    Llama,
    /// LayerNorm, learned positions, GELU MLP, biases everywhere.
    Gpt2,
}

impl Architecture {
    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Gpt2 => "gpt2",
        }
    }
}

/// Hyper-parameters of a decoder-only transformer, architecture-neutral.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_model: usize,
    pub d_head: usize,
    pub d_mlp: usize,
    pub vocab_size: usize,
    /// Longest sequence the position tables cover.
    pub n_ctx: usize,
    pub norm_eps: f32,
    /// RoPE base frequency (llama family only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f32>,
    /// How the RoPE frequencies are rescaled; `None` for plain RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<rope::RopeScaling>,
    pub tied_embeddings: bool,
}

impl ModelConfig {
    /// The RoPE frequencies (`d_head / 2` of them); `None` for architectures without RoPE.
    pub fn rope_inv_freq(&self) -> Option<Vec<f32>> {
        let theta = self.rope_theta?;
        Some(rope::inv_freq(self.d_head, theta, self.rope_scaling.as_ref()))
    }
}

/// One dimension of a hook's shape: a symbolic axis (`batch`, `pos`) or a fixed size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(usize),
    Symbolic(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => f.write_str(s),
        }
    }
}

/// Where a TransformerLens-named hook lives in the ONNX graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hook {
    /// Name of the ONNX tensor holding the activation.
    pub tensor: String,
    pub shape: Vec<Dim>,
}

/// `patchbay.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub config: ModelConfig,
    /// What the model was imported from (file name, format, sha256) and by which patchbay.
    pub source: Source,
    /// Graph inputs, in order: `input_ids`, `position_ids`, `attention_mask` ([batch, pos], int64).
    pub inputs: Vec<String>,
    /// Graph output holding logits [batch, pos, vocab].
    pub logits: String,
    /// Hook name -> tensor, ordered by name.
    pub hooks: BTreeMap<String, Hook>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub path: String,
    pub format: String,
    pub sha256: String,
    pub patchbay_version: String,
}

impl Manifest {
    /// The hook table DESIGN.md prescribes, for every layer; tensor names equal hook names.
    pub fn hook_table(config: &ModelConfig) -> BTreeMap<String, Hook> {
        let sym = |s: &str| Dim::Symbolic(s.to_string());
        let fixed = Dim::Fixed;
        let mut hooks = BTreeMap::new();
        let mut add = |name: String, shape: Vec<Dim>| {
            hooks.insert(name.clone(), Hook { tensor: name, shape });
        };
        let residual = || vec![sym("batch"), sym("pos"), fixed(config.d_model)];
        add(EMBED_HOOK.into(), residual());
        if config.architecture == Architecture::Gpt2 {
            add("hook_pos_embed".into(), residual());
        }
        for l in 0..config.n_layers {
            for h in ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"] {
                add(format!("blocks.{l}.{h}"), residual());
            }
            let heads = |n: usize| vec![sym("batch"), sym("pos"), fixed(n), fixed(config.d_head)];
            add(format!("blocks.{l}.attn.hook_q"), heads(config.n_heads));
            add(format!("blocks.{l}.attn.hook_k"), heads(config.n_kv_heads));
            add(format!("blocks.{l}.attn.hook_v"), heads(config.n_kv_heads));
            add(format!("blocks.{l}.attn.hook_z"), heads(config.n_heads));
            add(
                format!("blocks.{l}.attn.hook_pattern"),
                vec![sym("batch"), fixed(config.n_heads), sym("q_pos"), sym("k_pos")],
            );
            add(format!("blocks.{l}.mlp.hook_post"), vec![sym("batch"), sym("pos"), fixed(config.d_mlp)]);
        }
        hooks
    }

    pub fn load(dir: &Path) -> anyhow::Result<Manifest> {
        if !dir.is_dir() {
            bail_fixable!(
                "no model directory at {}", dir.display();
                help: "run `patchbay demo` to fetch the demo model, or `patchbay import` to add one; `patchbay doctor` lists the models found"
            );
        }
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            fixable!(
                "cannot read {}: {e}", path.display();
                help: "is {} a model directory made by `patchbay import`?", dir.display()
            )
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
            fixable!(
                "{} is not a valid patchbay manifest: {e}", path.display();
                help: "re-import the model with `patchbay import --force`"
            )
        })?;
        if manifest.format != MANIFEST_FORMAT {
            bail_fixable!(
                "{} has manifest format {}, this patchbay reads format {MANIFEST_FORMAT}", path.display(), manifest.format;
                help: "re-import the model with `patchbay import --force`"
            );
        }
        manifest.validate().map_err(|problem| {
            fixable!(
                "{} is damaged: {problem}", path.display();
                help: "re-import the model with `patchbay import --force`"
            )
        })?;
        Ok(manifest)
    }

    /// What a hand-edited or damaged manifest can get wrong that would otherwise surface as a
    /// panic or a wrong number far from its cause.
    fn validate(&self) -> Result<(), String> {
        let c = &self.config;
        let sha = &self.source.sha256;
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("source.sha256 `{sha}` is not 64 hexadecimal digits"));
        }
        for (key, value) in [
            ("n_layers", c.n_layers),
            ("n_heads", c.n_heads),
            ("n_kv_heads", c.n_kv_heads),
            ("d_model", c.d_model),
            ("d_head", c.d_head),
            ("d_mlp", c.d_mlp),
        ] {
            if value == 0 {
                return Err(format!("config.{key} is 0"));
            }
        }
        if !c.n_heads.is_multiple_of(c.n_kv_heads) {
            return Err(format!("config.n_heads {} is not a multiple of n_kv_heads {}", c.n_heads, c.n_kv_heads));
        }
        if self.inputs.len() != 3 {
            return Err(format!(
                "`inputs` lists {} graph inputs, expected input_ids, position_ids, attention_mask",
                self.inputs.len()
            ));
        }
        for (name, hook) in &self.hooks {
            if hook.tensor.is_empty() {
                return Err(format!("hook `{name}` names no tensor"));
            }
            if hook.shape.contains(&Dim::Fixed(0)) {
                return Err(format!("hook `{name}` has a dimension of size 0 in its shape {:?}", hook.shape));
            }
        }
        Ok(())
    }
}

/// A model directory on disk.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub path: PathBuf,
    pub manifest: Manifest,
}

impl ModelDir {
    pub fn open(path: &Path) -> anyhow::Result<ModelDir> {
        let manifest = Manifest::load(path)?;
        for file in [ONNX_FILE, TOKENIZER_FILE] {
            if !path.join(file).is_file() {
                bail_fixable!(
                    "model directory {} has no {file}", path.display();
                    help: "re-import the model with `patchbay import --force`"
                );
            }
        }
        Ok(ModelDir { path: path.to_path_buf(), manifest })
    }

    /// The sha256 of the manifest file, as hex: identifies the imported model.
    pub fn manifest_sha256(&self) -> anyhow::Result<String> {
        use sha2::Digest as _;
        let path = self.path.join(MANIFEST_FILE);
        let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Ok(format!("{:x}", sha2::Sha256::digest(bytes)))
    }

    pub fn onnx_path(&self) -> PathBuf {
        self.path.join(ONNX_FILE)
    }

    pub fn tokenizer(&self) -> anyhow::Result<tokenizers::Tokenizer> {
        let path = self.path.join(TOKENIZER_FILE);
        tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display()))
    }
}
