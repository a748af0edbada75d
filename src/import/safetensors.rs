//! Hugging Face checkpoint folders: `config.json` + `*.safetensors` (one file, or shards listed in
//! `model.safetensors.index.json`) + `tokenizer.json`.
//!
//! Files are memory-mapped and tensors decoded on demand, one at a time. We parse the safetensors
//! header ourselves (it is 8 bytes of length + JSON) rather than through the `safetensors` crate
//! so that every malformed header yields a message naming the file and the tensor.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use serde_json::Value;

use crate::bail_fixable;
use crate::import::hf_config::parse_config;
use crate::model::checkpoint::{Checkpoint, Tensor};
use crate::model::{Architecture, ModelConfig, TOKENIZER_FILE};

pub const CONFIG_FILE: &str = "config.json";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// An opened Hugging Face checkpoint folder.
pub struct HfCheckpoint {
    dir: PathBuf,
    config: ModelConfig,
    files: Vec<SafetensorsFile>,
    /// Tensor name -> (index into `files`, its header entry).
    tensors: HashMap<String, (usize, Entry)>,
    /// Names of the tensors read so far, to find the ones the import never used.
    used: Mutex<BTreeSet<String>>,
    /// Which attention biases transformers builds: Qwen2 always has q/k/v biases; Llama and
    /// Mistral have q/k/v/o biases exactly when `attention_bias` is true.
    qkv_bias: bool,
    o_bias: bool,
}

/// One memory-mapped `.safetensors` file.
struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset where the data section starts (8 + header length).
    data_start: usize,
}

/// One tensor's header entry, already validated against the file.
#[derive(Debug, Clone)]
pub struct Entry {
    dtype: String,
    shape: Vec<usize>,
    /// Byte range within the data section.
    start: usize,
    end: usize,
}

impl HfCheckpoint {
    pub fn open(dir: &Path) -> Result<HfCheckpoint> {
        if !dir.is_dir() {
            bail!("{} is not a directory (expected a Hugging Face checkpoint folder)", dir.display());
        }
        // Checked first: without the model's own tokenizer, the import is useless.
        if !dir.join(TOKENIZER_FILE).is_file() {
            bail_fixable!(
                "no {TOKENIZER_FILE} in {}; patchbay needs the tokenizer the model was trained with", dir.display();
                help: "download `{TOKENIZER_FILE}` from the same Hugging Face repository as the weights"
            );
        }
        let config_path = dir.join(CONFIG_FILE);
        let config_text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {} (a Hugging Face checkpoint needs one)", config_path.display()))?;
        let json: Value = serde_json::from_str(&config_text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        let config = parse_config(&json).with_context(|| format!("in {}", config_path.display()))?;

        let mut ckpt = HfCheckpoint {
            dir: dir.to_path_buf(),
            config,
            files: Vec::new(),
            tensors: HashMap::new(),
            used: Mutex::new(BTreeSet::new()),
            qkv_bias: json["model_type"] == "qwen2" || json["attention_bias"] == true,
            o_bias: json["attention_bias"] == true,
        };
        for path in weight_files(dir)? {
            ckpt.add_file(&path)?;
        }
        ckpt.check_index()?;
        ckpt.check_unembedding()?;
        Ok(ckpt)
    }

    /// The unembedding must be where the config says: transformers reads `lm_head.weight` unless
    /// `tie_word_embeddings` is set, and otherwise ignores it.
    fn check_unembedding(&self) -> Result<()> {
        let embedding = match self.config.architecture {
            Architecture::Llama => "model.embed_tokens.weight",
            Architecture::Gpt2 => "transformer.wte.weight",
        };
        let head = "lm_head.weight";
        match (self.config.tied_embeddings, self.tensors.contains_key(head)) {
            (false, false) => bail_fixable!(
                "config.json sets `tie_word_embeddings: false` (or leaves it at false, transformers' default \
                 here) but the checkpoint has no `{head}`";
                help: "a checkpoint that reuses its embedding as unembedding says `\"tie_word_embeddings\": true`"
            ),
            (true, true) if self.tensors.contains_key(embedding) => {
                // A tied head saved anyway is harmless only when it is the embedding itself.
                let (head_t, embed_t) = (self.load(&[head.into()])?, self.load(&[embedding.into()])?);
                if head_t != embed_t {
                    bail_fixable!(
                        "config.json ties the unembedding to the embedding (`tie_word_embeddings: true`) but \
                         `{head}` differs from `{embedding}`; transformers would silently ignore `{head}`";
                        help: "set `\"tie_word_embeddings\": false` if the model was trained with a separate head"
                    );
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Names of all tensors in the checkpoint's files (Hugging Face names), sorted.
    pub fn hf_tensor_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the mapping is read-only; like every mmap-based loader we assume the file is not
        // truncated or rewritten while patchbay runs.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot memory-map {}", path.display()))?;
        let (data_start, entries) =
            parse_header(&mmap).with_context(|| format!("invalid safetensors file {}", path.display()))?;
        let index = self.files.len();
        for (name, entry) in entries {
            if let Some((other, _)) = self.tensors.get(&name) {
                bail!("tensor `{name}` appears in both {} and {}", self.files[*other].path.display(), path.display());
            }
            self.tensors.insert(name, (index, entry));
        }
        self.files.push(SafetensorsFile { path: path.to_path_buf(), mmap, data_start });
        Ok(())
    }

    /// With a shard index, every tensor it lists must be in the shard it names.
    fn check_index(&self) -> Result<()> {
        let index_path = self.dir.join(INDEX_FILE);
        let Some(weight_map) = read_index(&index_path)? else {
            return Ok(());
        };
        for (name, file) in weight_map {
            match self.tensors.get(&name) {
                Some((i, _)) if self.files[*i].path == self.dir.join(&file) => {}
                _ => {
                    bail!("{} lists tensor `{name}` in {file}, but that file does not contain it", index_path.display())
                }
            }
        }
        Ok(())
    }

    /// A Hugging Face tensor by name (first of `candidates` present), decoded to f32.
    fn load(&self, candidates: &[String]) -> Result<Option<Tensor>> {
        let Some(name) = candidates.iter().find(|n| self.tensors.contains_key(*n)) else {
            return Ok(None);
        };
        self.used.lock().expect("not poisoned").insert(name.clone());
        let (file_index, entry) = &self.tensors[name];
        let file = &self.files[*file_index];
        let bytes = &file.mmap[file.data_start + entry.start..file.data_start + entry.end];
        let data: Vec<f32> = match entry.dtype.as_str() {
            "F32" => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            "F16" => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            "BF16" => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => bail_fixable!(
                "tensor `{name}` in {} has dtype {other}; patchbay reads F32, F16 and BF16 safetensors",
                file.path.display();
                help: "convert the checkpoint to float16/bfloat16/float32 (e.g. `model.to(torch.float16).save_pretrained(...)`)"
            ),
        };
        Ok(Some(Tensor::new(entry.shape.clone(), data)))
    }

    /// Like [`Self::load`] but the tensor must exist.
    fn load_required(&self, candidates: &[String]) -> Result<Tensor> {
        self.load(candidates)?
            .ok_or_else(|| anyhow!("checkpoint {} has no tensor `{}`", self.dir.display(), candidates.join("` or `")))
    }

    fn llama_tensor(&self, name: &str) -> Result<Option<Tensor>> {
        // The `model.` prefix is absent when a bare `LlamaModel` was saved.
        let hf = |suffix: &str| vec![format!("model.{suffix}"), suffix.to_string()];
        let required = |suffix: &str| self.load_required(&hf(suffix)).map(Some);
        match name {
            "embed.W_E" => return required("embed_tokens.weight"),
            "ln_final.w" => return required("norm.weight"),
            "unembed.W_U" if self.config.tied_embeddings => return required("embed_tokens.weight"),
            "unembed.W_U" => return self.load_required(&["lm_head.weight".to_string()]).map(Some),
            _ => {}
        }
        let Some((layer, rest)) = split_block(name, self.config.n_layers) else {
            return Ok(None);
        };
        let p = format!("layers.{layer}");
        match rest {
            "ln1.w" => required(&format!("{p}.input_layernorm.weight")),
            "ln2.w" => required(&format!("{p}.post_attention_layernorm.weight")),
            "attn.W_Q" => required(&format!("{p}.self_attn.q_proj.weight")),
            "attn.W_K" => required(&format!("{p}.self_attn.k_proj.weight")),
            "attn.W_V" => required(&format!("{p}.self_attn.v_proj.weight")),
            "attn.W_O" => required(&format!("{p}.self_attn.o_proj.weight")),
            // A bias transformers does not build stays unread, so the import refuses it.
            "attn.b_Q" if self.qkv_bias => required(&format!("{p}.self_attn.q_proj.bias")),
            "attn.b_K" if self.qkv_bias => required(&format!("{p}.self_attn.k_proj.bias")),
            "attn.b_V" if self.qkv_bias => required(&format!("{p}.self_attn.v_proj.bias")),
            "attn.b_O" if self.o_bias => required(&format!("{p}.self_attn.o_proj.bias")),
            "mlp.W_gate" => required(&format!("{p}.mlp.gate_proj.weight")),
            "mlp.W_in" => required(&format!("{p}.mlp.up_proj.weight")),
            "mlp.W_out" => required(&format!("{p}.mlp.down_proj.weight")),
            _ => Ok(None),
        }
    }

    fn gpt2_tensor(&self, name: &str) -> Result<Option<Tensor>> {
        // `GPT2Model` checkpoints have no `transformer.` prefix; `GPT2LMHeadModel` ones do.
        let hf = |suffix: &str| vec![format!("transformer.{suffix}"), suffix.to_string()];
        let plain = |suffix: &str| self.load_required(&hf(suffix)).map(Some);
        let d = self.config.d_model;
        match name {
            "embed.W_E" => return plain("wte.weight"),
            "unembed.W_U" if self.config.tied_embeddings => return plain("wte.weight"),
            "unembed.W_U" => return self.load_required(&["lm_head.weight".to_string()]).map(Some),
            "pos_embed.W_pos" => return plain("wpe.weight"),
            "ln_final.w" => return plain("ln_f.weight"),
            "ln_final.b" => return plain("ln_f.bias"),
            _ => {}
        }
        let Some((layer, rest)) = split_block(name, self.config.n_layers) else {
            return Ok(None);
        };
        let p = format!("h.{layer}");
        // Conv1D layers store weights as [in, out]; canonical matrices are [out, in].
        let conv_weight = |suffix: &str, d_in: usize, d_out: usize| -> Result<Tensor> {
            let t = self.load_required(&hf(&format!("{p}.{suffix}")))?;
            expect_shape(&format!("{p}.{suffix}"), &t, &[d_in, d_out])?;
            Ok(t.transposed())
        };
        // c_attn fuses Q, K and V along its output axis: [d, 3d] -> rows `part*d..(part+1)*d`.
        let qkv_part = |part: usize| -> Result<Option<Tensor>> {
            let w = conv_weight("attn.c_attn.weight", d, 3 * d)?;
            Ok(Some(Tensor::new(vec![d, d], w.data[part * d * d..(part + 1) * d * d].to_vec())))
        };
        let qkv_bias = |part: usize| -> Result<Option<Tensor>> {
            let b = self.load_required(&hf(&format!("{p}.attn.c_attn.bias")))?;
            expect_shape(&format!("{p}.attn.c_attn.bias"), &b, &[3 * d])?;
            Ok(Some(Tensor::new(vec![d], b.data[part * d..(part + 1) * d].to_vec())))
        };
        let d_mlp = self.config.d_mlp;
        match rest {
            "ln1.w" => plain(&format!("{p}.ln_1.weight")),
            "ln1.b" => plain(&format!("{p}.ln_1.bias")),
            "ln2.w" => plain(&format!("{p}.ln_2.weight")),
            "ln2.b" => plain(&format!("{p}.ln_2.bias")),
            "attn.W_Q" => qkv_part(0),
            "attn.W_K" => qkv_part(1),
            "attn.W_V" => qkv_part(2),
            "attn.b_Q" => qkv_bias(0),
            "attn.b_K" => qkv_bias(1),
            "attn.b_V" => qkv_bias(2),
            "attn.W_O" => conv_weight("attn.c_proj.weight", d, d).map(Some),
            "attn.b_O" => plain(&format!("{p}.attn.c_proj.bias")),
            "mlp.W_in" => conv_weight("mlp.c_fc.weight", d, d_mlp).map(Some),
            "mlp.b_in" => plain(&format!("{p}.mlp.c_fc.bias")),
            "mlp.W_out" => conv_weight("mlp.c_proj.weight", d_mlp, d).map(Some),
            "mlp.b_out" => plain(&format!("{p}.mlp.c_proj.bias")),
            _ => Ok(None),
        }
    }
}

impl Checkpoint for HfCheckpoint {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn tensor(&self, name: &str) -> Result<Option<Tensor>> {
        match self.config.architecture {
            Architecture::Llama => self.llama_tensor(name),
            Architecture::Gpt2 => self.gpt2_tensor(name),
        }
    }

    fn format(&self) -> &'static str {
        "safetensors"
    }

    fn unused_tensors(&self) -> Vec<String> {
        let used = self.used.lock().expect("not poisoned");
        let mut unused: Vec<String> =
            self.tensors.keys().filter(|name| !used.contains(*name) && !is_buffer(name)).cloned().collect();
        unused.sort();
        unused
    }

    fn tokenizer_json(&self) -> Result<String> {
        crate::import::hf_tokenizer::tokenizer_json(&self.dir)
    }
}

/// Constant buffers some exporters save beside the weights: GPT-2's causal mask (`attn.bias`,
/// `attn.masked_bias`) and llama's rotary `inv_freq`. They hold no learned values, and
/// transformers ignores them on load and recomputes them from the config.
fn is_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") || name.ends_with(".rotary_emb.inv_freq")
}

/// `blocks.{L}.rest` -> (L, rest), for L < n_layers.
fn split_block(name: &str, n_layers: usize) -> Option<(usize, &str)> {
    let (layer, rest) = name.strip_prefix("blocks.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    (layer < n_layers).then_some((layer, rest))
}

fn expect_shape(name: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.shape != shape {
        bail!("tensor `{name}` has shape {:?}, expected {shape:?} from config.json", t.shape);
    }
    Ok(())
}

/// The `.safetensors` files to open: the shards named by the index, else every `*.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = match read_index(&dir.join(INDEX_FILE))? {
        Some(weight_map) => weight_map.into_values().map(|f| dir.join(f)).collect(),
        None => std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect(),
    };
    files.sort();
    files.dedup();
    if files.is_empty() {
        bail_fixable!(
            "no *.safetensors files in {}", dir.display();
            help: "a Hugging Face checkpoint folder holds config.json, model.safetensors (or shards) and tokenizer.json"
        );
    }
    Ok(files)
}

/// `weight_map` of a shard index (tensor name -> shard file name), if the index exists.
fn read_index(path: &Path) -> Result<Option<BTreeMap<String, String>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid shard index (expected a `weight_map` object)", path.display()))?;
    Ok(Some(index.weight_map))
}

/// Bytes per element of the safetensors dtypes; `None` for names we do not know.
fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" => 1,
        "I16" | "U16" | "F16" | "BF16" => 2,
        "I32" | "U32" | "F32" => 4,
        "I64" | "U64" | "F64" => 8,
        _ => return None,
    })
}

/// Parse and validate a safetensors header: returns where the data section starts and the entries.
/// Errors name the tensor; the caller adds the file.
pub fn parse_header(bytes: &[u8]) -> Result<(usize, Vec<(String, Entry)>)> {
    if bytes.len() < 8 {
        bail!("file is {} bytes long, too short for the 8-byte header length", bytes.len());
    }
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let data_start = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&start| start <= bytes.len())
        .ok_or_else(|| anyhow!("header length {header_len} runs past the end of the file ({} bytes)", bytes.len()))?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..data_start]).context("header is not a JSON object")?;
    let data_len = bytes.len() - data_start;

    #[derive(serde::Deserialize)]
    struct RawEntry {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: (usize, usize),
    }
    let mut entries = Vec::new();
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let raw: RawEntry = serde_json::from_value(value).with_context(|| {
            format!("header entry for tensor `{name}` is malformed (expected dtype, shape, data_offsets)")
        })?;
        let (start, end) = raw.data_offsets;
        if start > end || end > data_len {
            bail!("tensor `{name}` has data offsets [{start}, {end}) outside the data section ({data_len} bytes)");
        }
        if let Some(size) = dtype_size(&raw.dtype) {
            let expected = raw.shape.iter().try_fold(size, |acc, &d| acc.checked_mul(d));
            if expected != Some(end - start) {
                bail!(
                    "tensor `{name}` has shape {:?} and dtype {} ({} bytes) but its data offsets span {} bytes",
                    raw.shape,
                    raw.dtype,
                    expected.map_or("overflowing".to_string(), |n| n.to_string()),
                    end - start
                );
            }
        }
        entries.push((name, Entry { dtype: raw.dtype, shape: raw.shape, start, end }));
    }

    // Tensors must not share bytes (empty tensors occupy none).
    let mut spans: Vec<&(String, Entry)> = entries.iter().filter(|(_, e)| e.start < e.end).collect();
    spans.sort_by_key(|(_, e)| e.start);
    for pair in spans.windows(2) {
        let ((a, ea), (b, eb)) = (pair[0], pair[1]);
        if eb.start < ea.end {
            bail!(
                "tensors `{a}` [{}, {}) and `{b}` [{}, {}) overlap in the data section",
                ea.start,
                ea.end,
                eb.start,
                eb.end
            );
        }
    }
    Ok((data_start, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file from a raw header and data section.
    fn file_bytes(header: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data_len));
        bytes
    }

    fn header_error(header: &str, data_len: usize) -> String {
        format!("{:#}", parse_header(&file_bytes(header, data_len)).unwrap_err())
    }

    #[test]
    fn valid_header_parses() {
        let header = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}}"#;
        let (start, entries) = parse_header(&file_bytes(header, 22)).unwrap();
        assert_eq!(start, 8 + header.len());
        assert_eq!(entries.len(), 2);
    }

    #[test]
    fn file_too_short() {
        assert!(format!("{:#}", parse_header(&[1, 2, 3]).unwrap_err()).contains("too short"));
    }

    #[test]
    fn header_length_past_end() {
        let mut bytes = file_bytes("{}", 0);
        bytes[..8].copy_from_slice(&1000u64.to_le_bytes());
        assert!(format!("{:#}", parse_header(&bytes).unwrap_err()).contains("runs past the end"));
        bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(format!("{:#}", parse_header(&bytes).unwrap_err()).contains("runs past the end"));
    }

    #[test]
    fn header_not_json() {
        assert!(header_error("{not json", 0).contains("not a JSON object"));
    }

    #[test]
    fn malformed_entry_names_tensor() {
        let e = header_error(r#"{"w":{"dtype":"F32","shape":[2]}}"#, 8);
        assert!(e.contains("`w`") && e.contains("malformed"), "{e}");
    }

    #[test]
    fn offsets_beyond_file() {
        let e = header_error(r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 8);
        assert!(e.contains("`w`") && e.contains("outside the data section"), "{e}");
        let e = header_error(r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#, 8);
        assert!(e.contains("`w`") && e.contains("outside the data section"), "{e}");
    }

    #[test]
    fn length_mismatch() {
        let e = header_error(r#"{"w":{"dtype":"F16","shape":[3],"data_offsets":[0,8]}}"#, 8);
        assert!(e.contains("`w`") && e.contains("6 bytes") && e.contains("span 8 bytes"), "{e}");
        let e = header_error(r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#, 8);
        assert!(e.contains("`w`") && e.contains("overflowing"), "{e}");
    }

    #[test]
    fn overlapping_tensors() {
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        let e = header_error(header, 12);
        assert!(e.contains("`a`") && e.contains("`b`") && e.contains("overlap"), "{e}");
    }

    /// A minimal valid llama folder whose one file is given as raw bytes.
    fn folder_with(file: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let config = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":4,"num_hidden_layers":1,
            "num_attention_heads":2,"intermediate_size":8,"vocab_size":3,"max_position_embeddings":16,
            "tie_word_embeddings":true}"#;
        std::fs::write(dir.path().join(CONFIG_FILE), config).unwrap();
        std::fs::write(dir.path().join(TOKENIZER_FILE), "{}").unwrap();
        std::fs::write(dir.path().join("model.safetensors"), file).unwrap();
        dir
    }

    #[test]
    fn open_errors_name_the_file() {
        let dir = folder_with(&file_bytes(r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 8));
        let e = format!("{:#}", HfCheckpoint::open(dir.path()).err().unwrap());
        assert!(e.contains("model.safetensors") && e.contains("`w`"), "{e}");
    }

    #[test]
    fn unsupported_dtype_names_tensor_and_dtype() {
        let dir = folder_with(&file_bytes(
            r#"{"model.embed_tokens.weight":{"dtype":"I32","shape":[3,4],"data_offsets":[0,48]}}"#,
            48,
        ));
        let ckpt = HfCheckpoint::open(dir.path()).unwrap();
        let e = format!("{:#}", ckpt.tensor("embed.W_E").unwrap_err());
        assert!(e.contains("model.embed_tokens.weight") && e.contains("I32"), "{e}");
    }

    #[test]
    fn missing_tokenizer() {
        let dir = folder_with(&file_bytes("{}", 0));
        std::fs::remove_file(dir.path().join(TOKENIZER_FILE)).unwrap();
        let e = format!("{:#}", HfCheckpoint::open(dir.path()).err().unwrap());
        assert!(e.contains("no tokenizer.json in") && e.contains("trained with"), "{e}");
    }

    #[test]
    fn missing_required_tensor_is_an_error() {
        let dir = folder_with(&file_bytes("{}", 0));
        let ckpt = HfCheckpoint::open(dir.path()).unwrap();
        let e = format!("{:#}", ckpt.tensor("blocks.0.attn.W_Q").unwrap_err());
        assert!(e.contains("model.layers.0.self_attn.q_proj.weight"), "{e}");
        assert!(ckpt.tensor("blocks.0.attn.b_Q").unwrap().is_none());
        assert!(ckpt.tensor("pos_embed.W_pos").unwrap().is_none());
    }
}
