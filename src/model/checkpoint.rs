//! The architecture-neutral view of a checkpoint that every importer produces.
//!
//! Loaders (GGUF, safetensors) translate their own tensor names and layouts into the canonical
//! names below, so the ONNX builder and the reference forward pass never see a file format.
//!
//! Canonical names and shapes (matrices in the `Linear` convention `[out, in]`, row-major):
//!
//! | name | shape | architectures |
//! |---|---|---|
//! | `embed.W_E` | `[vocab, d_model]` | all |
//! | `pos_embed.W_pos` | `[n_ctx, d_model]` | gpt2 |
//! | `blocks.{L}.ln1.w`, `blocks.{L}.ln2.w`, `ln_final.w` | `[d_model]` | all |
//! | `blocks.{L}.ln1.b`, `blocks.{L}.ln2.b`, `ln_final.b` | `[d_model]` | gpt2 |
//! | `blocks.{L}.attn.W_Q` | `[n_heads*d_head, d_model]` | all |
//! | `blocks.{L}.attn.W_K`, `blocks.{L}.attn.W_V` | `[n_kv_heads*d_head, d_model]` | all |
//! | `blocks.{L}.attn.W_O` | `[d_model, n_heads*d_head]` | all |
//! | `blocks.{L}.attn.b_Q` / `b_K` / `b_V` | `[n_heads*d_head]` / `[n_kv_heads*d_head]` | gpt2; optional for llama (Qwen2) |
//! | `blocks.{L}.attn.b_O` | `[d_model]` | gpt2 |
//! | `blocks.{L}.mlp.W_gate` | `[d_mlp, d_model]` | llama |
//! | `blocks.{L}.mlp.W_in` | `[d_mlp, d_model]` | all |
//! | `blocks.{L}.mlp.W_out` | `[d_model, d_mlp]` | all |
//! | `blocks.{L}.mlp.b_in` / `b_out` | `[d_mlp]` / `[d_model]` | gpt2 |
//! | `unembed.W_U` | `[vocab, d_model]` | all (the embedding when tied) |
//!
//! Llama-family Q and K rows are in the Hugging Face "rotate half" order (GGUF files store them
//! interleaved; the GGUF loader undoes that permutation).

use crate::model::ModelConfig;

/// A dense f32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Tensor { shape, data }
    }

    /// A matrix `[rows, cols]` as `[cols, rows]`.
    pub fn transposed(&self) -> Tensor {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let mut data = vec![0.0; self.data.len()];
        for r in 0..rows {
            for c in 0..cols {
                data[c * rows + r] = self.data[r * cols + c];
            }
        }
        Tensor::new(vec![cols, rows], data)
    }
}

/// A checkpoint opened for import. Tensors are produced on demand, one at a time, so that large
/// checkpoints stream through the importer instead of living in memory all at once.
pub trait Checkpoint: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// The tensor with a canonical name, converted to f32; `Ok(None)` when an optional tensor
    /// (a bias the architecture may omit) is absent.
    fn tensor(&self, name: &str) -> anyhow::Result<Option<Tensor>>;

    /// Source format, for the manifest (e.g. `gguf`, `safetensors`).
    fn format(&self) -> &'static str;

    /// The tokenizer in Hugging Face `tokenizers` JSON form.
    fn tokenizer_json(&self) -> anyhow::Result<String>;

    /// The checkpoint's own names of the tensors no [`Checkpoint::tensor`] call has read so far.
    /// After a complete import this must be empty: a tensor the architecture does not use (an
    /// unexpected bias, an extra norm) means the model computes something patchbay does not.
    fn unused_tensors(&self) -> Vec<String>;
}

/// Fetch a tensor that must exist, checking its shape.
pub fn required(ckpt: &dyn Checkpoint, name: &str, shape: &[usize]) -> anyhow::Result<Tensor> {
    let t = ckpt.tensor(name)?.ok_or_else(|| anyhow::anyhow!("checkpoint has no tensor for `{name}`"))?;
    check_shape(name, &t, shape)?;
    Ok(t)
}

/// Fetch a tensor that may be absent, checking its shape when present.
pub fn optional(ckpt: &dyn Checkpoint, name: &str, shape: &[usize]) -> anyhow::Result<Option<Tensor>> {
    let t = ckpt.tensor(name)?;
    if let Some(t) = &t {
        check_shape(name, t, shape)?;
    }
    Ok(t)
}

fn check_shape(name: &str, t: &Tensor, shape: &[usize]) -> anyhow::Result<()> {
    if t.shape != shape {
        anyhow::bail!("tensor `{name}` has shape {:?}, expected {:?} from the model config", t.shape, shape);
    }
    Ok(())
}
