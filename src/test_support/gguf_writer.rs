//! A GGUF v3 writer, and [`canonical_to_gguf`]: canonical weights written the way llama.cpp's
//! converter lays them out, so that tests can import GGUF files of known content.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::import::gguf::checkpoint::{permute_rope_rows, source, Source};
use crate::import::gguf::config::Family;
use crate::import::gguf::{tokenizer, MetaValue, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};
use crate::import::quant::{self, GgmlType};
use crate::model::checkpoint::Tensor;
use crate::model::{Architecture, ModelConfig};

/// A tensor to write: row-major `shape` (as in [`Tensor`]) and its encoded bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorData {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

impl GgufTensorData {
    /// Encode an f32 tensor as `ty` (see [`quant::quantize`] for the types offered).
    pub fn encode(name: &str, tensor: &Tensor, ty: GgmlType) -> Result<GgufTensorData> {
        let row = tensor.shape.last().copied().unwrap_or(1);
        if !row.is_multiple_of(ty.block_size()) {
            bail!("tensor {name} has rows of {row} elements, not a whole number of {ty} blocks");
        }
        let data = quant::quantize(ty, &tensor.data).with_context(|| format!("cannot encode tensor {name}"))?;
        Ok(GgufTensorData { name: name.to_string(), shape: tensor.shape.clone(), ty, data })
    }
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn write_value(w: &mut impl Write, v: &MetaValue) -> std::io::Result<()> {
    match v {
        MetaValue::U8(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I8(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I16(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::U32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F32(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::Bool(x) => w.write_all(&[*x as u8]),
        MetaValue::String(s) => write_str(w, s),
        MetaValue::Array(ty, items) => {
            w.write_all(&ty.id().to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|item| write_value(w, item))
        }
        MetaValue::U64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::I64(x) => w.write_all(&x.to_le_bytes()),
        MetaValue::F64(x) => w.write_all(&x.to_le_bytes()),
    }
}

/// Write a GGUF v3 file. The alignment is `general.alignment` when `metadata` sets it, else 32.
pub fn write_gguf(path: &Path, metadata: &[(String, MetaValue)], tensors: &[GgufTensorData]) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    write_gguf_to(&mut w, metadata, tensors)?;
    w.flush().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// [`write_gguf`] into any writer.
pub fn write_gguf_to(w: &mut impl Write, metadata: &[(String, MetaValue)], tensors: &[GgufTensorData]) -> Result<()> {
    for (key, value) in metadata {
        if let MetaValue::Array(ty, items) = value {
            if let Some(bad) = items.iter().find(|i| i.meta_type() != *ty) {
                bail!("metadata `{key}` is an array of {ty:?} holding a {:?}", bad.meta_type());
            }
        }
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, MetaValue::U32(a))) if a.is_power_of_two() => *a as u64,
        Some(_) => bail!("general.alignment must be a u32 power of two"),
    };
    for t in tensors {
        let n: usize = t.shape.iter().product();
        if t.shape.is_empty() || t.shape.len() > MAX_DIMS as usize || t.ty.n_bytes(n) != Some(t.data.len()) {
            bail!(
                "tensor {} ({}, shape {:?}) has {} bytes of data, which does not fit",
                t.name,
                t.ty,
                t.shape,
                t.data.len()
            );
        }
    }

    let mut header = Vec::new();
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_str(&mut header, key)?;
        header.extend_from_slice(&value.meta_type().id().to_le_bytes());
        write_value(&mut header, value)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        write_str(&mut header, &t.name)?;
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            header.extend_from_slice(&(d as u64).to_le_bytes());
        }
        header.extend_from_slice(&t.ty.id().to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offset = (offset + t.data.len() as u64).next_multiple_of(alignment);
    }
    let pad = |len: u64| vec![0u8; (len.next_multiple_of(alignment) - len) as usize];
    header.extend(pad(header.len() as u64));
    w.write_all(&header)?;
    for t in tensors {
        w.write_all(&t.data)?;
        w.write_all(&pad(t.data.len() as u64))?;
    }
    Ok(())
}

/// Which ggml types [`canonical_to_gguf`] stores. Vectors (norms, biases) are always F32, and a
/// matrix whose rows are not a whole number of blocks falls back to F32, as llama.cpp does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgufTypes {
    /// Token (and position) embeddings.
    pub embed: GgmlType,
    /// All other matrices.
    pub matrices: GgmlType,
}

impl GgufTypes {
    /// Everything F32: reading back gives exactly the tensors written.
    pub const EXACT: GgufTypes = GgufTypes { embed: GgmlType::F32, matrices: GgmlType::F32 };
}

impl Default for GgufTypes {
    /// Like real quantised checkpoints: a Q8_0 embedding, Q4_1 weights.
    fn default() -> GgufTypes {
        GgufTypes { embed: GgmlType::Q8_0, matrices: GgmlType::Q4_1 }
    }
}

/// Write canonical weights as a GGUF file that [`GgufCheckpoint`] reads back to the same
/// canonical tensors (up to the quantisation `types` asks for).
///
/// - `tensors`: canonical names and shapes as documented in `checkpoint.rs`, f32 `[out, in]`,
///   Q/K rows in HF rotate-half order. Every tensor the architecture requires must be present;
///   optional biases may be; `unembed.W_U` is ignored when `config.tied_embeddings`. Unknown
///   names are an error (they would be silently dropped otherwise).
/// - `vocab`: token strings by id, `config.vocab_size` of them. With empty `merges` this is a
///   word-level vocabulary (must contain `<unk>`), written under our own
///   `tokenizer.ggml.model = "patchbay-word"`; with merges it is a GPT-2 byte-level BPE
///   vocabulary (`"a b"` merge strings).
///
/// llama Q/K rows are permuted to llama.cpp's interleaved order; GPT-2's Q, K and V are fused
/// into `attn_qkv`.
pub fn canonical_to_gguf(
    path: &Path,
    config: &ModelConfig,
    tensors: &BTreeMap<String, Tensor>,
    vocab: &[String],
    merges: &[String],
    types: GgufTypes,
) -> Result<()> {
    let c = config;
    if vocab.len() != c.vocab_size {
        bail!("vocabulary has {} tokens but the config says vocab_size {}", vocab.len(), c.vocab_size);
    }
    if c.architecture == Architecture::Llama && !c.d_head.is_multiple_of(2) {
        bail!("d_head {} must be even for rotary embeddings", c.d_head);
    }
    let family = match c.architecture {
        Architecture::Llama => Family::LlamaPermuted,
        Architecture::Gpt2 => Family::Gpt2,
    };
    let arch = c.architecture.name();

    // Every canonical name this architecture can have, with its shape.
    let (q, kv) = (c.n_heads * c.d_head, c.n_kv_heads * c.d_head);
    let gpt2 = c.architecture == Architecture::Gpt2;
    let mut expected: Vec<(String, Vec<usize>, bool)> = vec![
        ("embed.W_E".into(), vec![c.vocab_size, c.d_model], true),
        ("ln_final.w".into(), vec![c.d_model], true),
        ("ln_final.b".into(), vec![c.d_model], gpt2),
        ("unembed.W_U".into(), vec![c.vocab_size, c.d_model], !c.tied_embeddings),
    ];
    if gpt2 {
        expected.push(("pos_embed.W_pos".into(), vec![c.n_ctx, c.d_model], true));
    }
    for l in 0..c.n_layers {
        let mut add =
            |n: &str, shape: Vec<usize>, required: bool| expected.push((format!("blocks.{l}.{n}"), shape, required));
        add("ln1.w", vec![c.d_model], true);
        add("ln2.w", vec![c.d_model], true);
        add("ln1.b", vec![c.d_model], gpt2);
        add("ln2.b", vec![c.d_model], gpt2);
        add("attn.W_Q", vec![q, c.d_model], true);
        add("attn.W_K", vec![kv, c.d_model], true);
        add("attn.W_V", vec![kv, c.d_model], true);
        add("attn.W_O", vec![c.d_model, q], true);
        add("attn.b_Q", vec![q], gpt2);
        add("attn.b_K", vec![kv], gpt2);
        add("attn.b_V", vec![kv], gpt2);
        add("attn.b_O", vec![c.d_model], gpt2);
        if !gpt2 {
            add("mlp.W_gate", vec![c.d_mlp, c.d_model], true);
        }
        add("mlp.W_in", vec![c.d_mlp, c.d_model], true);
        add("mlp.W_out", vec![c.d_model, c.d_mlp], true);
        add("mlp.b_in", vec![c.d_mlp], gpt2);
        add("mlp.b_out", vec![c.d_model], gpt2);
    }
    for name in tensors.keys() {
        if !expected.iter().any(|(n, ..)| n == name) {
            bail!("`{name}` is not a canonical tensor name for a {arch} model with {} layers", c.n_layers);
        }
    }

    // GGUF name -> f32 tensor, after permuting / fusing.
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut fused: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
    for (name, shape, required) in &expected {
        if name == "unembed.W_U" && c.tied_embeddings {
            continue;
        }
        let Some(t) = tensors.get(name) else {
            if *required {
                bail!("canonical tensor `{name}` is missing");
            }
            continue;
        };
        if &t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
            bail!("canonical tensor `{name}` has shape {:?}, expected {shape:?}", t.shape);
        }
        match source(name, c, family).expect("expected names are canonical") {
            Source::Plain(g) => {
                out.insert(g, t.clone());
            }
            Source::Permuted(g, n_heads) => {
                let row_len = if t.shape.len() == 2 { t.shape[1] } else { 1 };
                out.insert(g, Tensor::new(t.shape.clone(), permute_rope_rows(&t.data, n_heads, row_len)));
            }
            Source::Fused(g, part) => {
                fused.entry(g).or_default()[part] = Some(t.clone());
            }
        }
    }
    for (g, parts) in fused {
        let [Some(tq), Some(tk), Some(tv)] = parts else {
            bail!("GPT-2 needs all of Q, K and V (or none of their biases) to write {g}");
        };
        let mut shape = tq.shape.clone();
        shape[0] = tq.shape[0] + tk.shape[0] + tv.shape[0];
        out.insert(g, Tensor::new(shape, [tq.data, tk.data, tv.data].concat()));
    }

    let mut encoded = Vec::with_capacity(out.len());
    for (name, t) in &out {
        let wanted = match (t.shape.len(), name.as_str()) {
            (1, _) => GgmlType::F32,
            (_, "token_embd.weight" | "position_embd.weight") => types.embed,
            _ => types.matrices,
        };
        let ty = if t.shape[t.shape.len() - 1].is_multiple_of(wanted.block_size()) { wanted } else { GgmlType::F32 };
        encoded.push(GgufTensorData::encode(name, t, ty)?);
    }

    let u32v = |n: usize| MetaValue::U32(n as u32);
    let mut meta: Vec<(String, MetaValue)> = vec![
        ("general.architecture".into(), MetaValue::String(arch.into())),
        ("general.name".into(), MetaValue::String("patchbay synthetic model".into())),
    ];
    let mut put = |k: &str, v: MetaValue| meta.push((format!("{arch}.{k}"), v));
    put("block_count", u32v(c.n_layers));
    put("context_length", u32v(c.n_ctx));
    put("embedding_length", u32v(c.d_model));
    put("feed_forward_length", u32v(c.d_mlp));
    put("attention.head_count", u32v(c.n_heads));
    put("attention.head_count_kv", u32v(c.n_kv_heads));
    if c.d_head * c.n_heads != c.d_model {
        put("attention.key_length", u32v(c.d_head));
        put("attention.value_length", u32v(c.d_head));
    }
    if gpt2 {
        put("attention.layer_norm_epsilon", MetaValue::F32(c.norm_eps));
    } else {
        put("attention.layer_norm_rms_epsilon", MetaValue::F32(c.norm_eps));
        put("rope.freq_base", MetaValue::F32(c.rope_theta.unwrap_or(10000.0)));
        put("rope.dimension_count", u32v(c.d_head));
    }
    let tokenizer =
        if merges.is_empty() { tokenizer::word_level_metadata(vocab)? } else { tokenizer::bpe_metadata(vocab, merges) };
    meta.extend(tokenizer);
    write_gguf(path, &meta, &encoded)
}
