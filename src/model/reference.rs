//! A pure-Rust reference forward pass: naive f32 loops written for clarity, not speed.
//!
//! It is the ground truth the ONNX graphs are tested against, so it follows Hugging Face /
//! TransformerLens semantics step by step and records every hook of [`Manifest::hook_table`]
//! (batch 1). Conventions worth knowing:
//! - `attn.hook_q` / `attn.hook_k` hold q and k *before* rotary embedding (as in TransformerLens);
//!   the attention scores use the rotated values.
//! - `attn.hook_pattern` holds softmax probabilities, 0 above the diagonal.
//! - `mlp.hook_post` is the input of `W_out`: silu(gate) * up (llama), gelu_new(pre) (GPT-2).

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use crate::model::attention::{self, dot};
use crate::model::checkpoint::{optional, required, Checkpoint, Tensor};
use crate::model::{Architecture, ModelConfig};

#[cfg(doc)]
use crate::model::Manifest;

/// Outputs of one forward pass over a single sequence.
#[derive(Debug, Clone)]
pub struct Activations {
    /// `[1, pos, vocab]`.
    pub logits: Tensor,
    /// Every hook of the hook table, with the table's shapes (batch 1).
    pub hooks: BTreeMap<String, Tensor>,
}

/// Run the model on `tokens` (batch 1), loading weights from `ckpt` one layer at a time.
pub fn forward(ckpt: &dyn Checkpoint, tokens: &[u32]) -> Result<Activations> {
    forward_patched(ckpt, tokens, &mut |_, _| {})
}

/// [`forward`], with `patch(hook, values)` called at every hook before the rest of the model
/// reads it (values without the batch axis, in the hook table's layout): an activation patch
/// overwrites some of them. Recorded hooks hold the patched values.
pub fn forward_patched(
    ckpt: &dyn Checkpoint,
    tokens: &[u32],
    patch: &mut dyn FnMut(&str, &mut [f32]),
) -> Result<Activations> {
    let c = ckpt.config().clone();
    let n = tokens.len();
    if n == 0 {
        bail!("cannot run the model on an empty token sequence");
    }
    if n > c.n_ctx {
        bail!("sequence of {n} tokens is longer than the model's context of {} positions", c.n_ctx);
    }
    if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
        bail!("token id {t} is outside the vocabulary (size {})", c.vocab_size);
    }
    if c.n_kv_heads == 0 || !c.n_heads.is_multiple_of(c.n_kv_heads) {
        bail!("{} attention heads cannot share {} key/value heads", c.n_heads, c.n_kv_heads);
    }
    let gpt2 = c.architecture == Architecture::Gpt2;
    let d = c.d_model;
    let mut hooks = BTreeMap::new();
    let mut record = |name: String, shape: Vec<usize>, data: &mut [f32], patch: &mut dyn FnMut(&str, &mut [f32])| {
        patch(&name, data);
        hooks.insert(name, Tensor::new(shape, data.to_vec()));
    };

    // Embedding (+ learned positions for GPT-2).
    let w_e = required(ckpt, "embed.W_E", &[c.vocab_size, d])?;
    let mut x: Vec<f32> = tokens.iter().flat_map(|&t| row(&w_e, t as usize).iter().copied()).collect();
    record("hook_embed".into(), vec![1, n, d], &mut x, patch);
    if gpt2 {
        let w_pos = required(ckpt, "pos_embed.W_pos", &[c.n_ctx, d])?;
        let mut pos = w_pos.data[..n * d].to_vec();
        record("hook_pos_embed".into(), vec![1, n, d], &mut pos, patch);
        add_in_place(&mut x, &pos);
    }

    for l in 0..c.n_layers {
        let name = |s: &str| format!("blocks.{l}.{s}");
        record(name("hook_resid_pre"), vec![1, n, d], &mut x, patch);

        let h = norm(ckpt, &c, &name("ln1"), &x)?;
        let mut attn = attention(ckpt, &c, l, &h, patch)?;
        record(name("attn.hook_q"), vec![1, n, c.n_heads, c.d_head], &mut attn.q, &mut |_, _| {});
        record(name("attn.hook_k"), vec![1, n, c.n_kv_heads, c.d_head], &mut attn.k, &mut |_, _| {});
        record(name("attn.hook_v"), vec![1, n, c.n_kv_heads, c.d_head], &mut attn.v, &mut |_, _| {});
        record(name("attn.hook_pattern"), vec![1, c.n_heads, n, n], &mut attn.pattern, &mut |_, _| {});
        record(name("attn.hook_z"), vec![1, n, c.n_heads, c.d_head], &mut attn.z, &mut |_, _| {});
        record(name("hook_attn_out"), vec![1, n, d], &mut attn.out, patch);
        add_in_place(&mut x, &attn.out);
        record(name("hook_resid_mid"), vec![1, n, d], &mut x, patch);

        let h = norm(ckpt, &c, &name("ln2"), &x)?;
        let (mut post, mut mlp_out) = mlp(ckpt, &c, l, &h, patch)?;
        record(name("mlp.hook_post"), vec![1, n, c.d_mlp], &mut post, &mut |_, _| {});
        record(name("hook_mlp_out"), vec![1, n, d], &mut mlp_out, patch);
        add_in_place(&mut x, &mlp_out);
        record(name("hook_resid_post"), vec![1, n, d], &mut x, patch);
    }

    let h = norm(ckpt, &c, "ln_final", &x)?;
    let w_u = required(ckpt, "unembed.W_U", &[c.vocab_size, d])?;
    let logits = linear(&h, &w_u, None);
    Ok(Activations { logits: Tensor::new(vec![1, n, c.vocab_size], logits), hooks })
}

/// Per-layer attention results, each row-major with positions outermost.
struct Attention {
    /// `[pos, n_heads, d_head]`, before RoPE.
    q: Vec<f32>,
    /// `[pos, n_kv_heads, d_head]`, before RoPE.
    k: Vec<f32>,
    v: Vec<f32>,
    /// `[n_heads, q_pos, k_pos]`.
    pattern: Vec<f32>,
    /// `[pos, n_heads, d_head]`.
    z: Vec<f32>,
    /// `[pos, d_model]`.
    out: Vec<f32>,
}

/// Attention of layer `l`; `patch` sees q, k, v (before RoPE), the pattern and z as they are
/// made (the caller records them).
fn attention(
    ckpt: &dyn Checkpoint,
    c: &ModelConfig,
    l: usize,
    x: &[f32],
    patch: &mut dyn FnMut(&str, &mut [f32]),
) -> Result<Attention> {
    let (d, dh, nh, nkv) = (c.d_model, c.d_head, c.n_heads, c.n_kv_heads);
    let n = x.len() / d;
    let p = |s: &str| format!("blocks.{l}.attn.{s}");
    let w_q = required(ckpt, &p("W_Q"), &[nh * dh, d])?;
    let w_k = required(ckpt, &p("W_K"), &[nkv * dh, d])?;
    let w_v = required(ckpt, &p("W_V"), &[nkv * dh, d])?;
    let w_o = required(ckpt, &p("W_O"), &[d, nh * dh])?;
    let b_q = bias(ckpt, c, &p("b_Q"), nh * dh)?;
    let b_k = bias(ckpt, c, &p("b_K"), nkv * dh)?;
    let b_v = bias(ckpt, c, &p("b_V"), nkv * dh)?;
    let b_o = bias(ckpt, c, &p("b_O"), d)?;

    let hook = |s: &str| format!("blocks.{l}.attn.{s}");
    let mut q = linear(x, &w_q, b_q.as_ref());
    let mut k = linear(x, &w_k, b_k.as_ref());
    let mut v = linear(x, &w_v, b_v.as_ref());
    patch(&hook("hook_q"), &mut q);
    patch(&hook("hook_k"), &mut k);
    patch(&hook("hook_v"), &mut v);
    let mut pattern = attention::pattern(c, &q, &k)?;
    let group = nh / nkv;
    patch(&hook("hook_pattern"), &mut pattern);
    let mut z = vec![0.0; n * nh * dh];
    for h in 0..nh {
        let kvh = h / group;
        for i in 0..n {
            let zi = &mut z[(i * nh + h) * dh..][..dh];
            for (j, &pj) in pattern[(h * n + i) * n..][..n].iter().enumerate() {
                for (zk, vk) in zi.iter_mut().zip(&v[(j * nkv + kvh) * dh..][..dh]) {
                    *zk += pj * vk;
                }
            }
        }
    }
    patch(&hook("hook_z"), &mut z);
    let out = linear(&z, &w_o, b_o.as_ref());
    Ok(Attention { q, k, v, pattern, z, out })
}

/// Returns (`mlp.hook_post`, `hook_mlp_out`).
fn mlp(
    ckpt: &dyn Checkpoint,
    c: &ModelConfig,
    l: usize,
    x: &[f32],
    patch: &mut dyn FnMut(&str, &mut [f32]),
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (d, dm) = (c.d_model, c.d_mlp);
    let p = |s: &str| format!("blocks.{l}.mlp.{s}");
    let w_in = required(ckpt, &p("W_in"), &[dm, d])?;
    let w_out = required(ckpt, &p("W_out"), &[d, dm])?;
    let b_in = bias(ckpt, c, &p("b_in"), dm)?;
    let b_out = bias(ckpt, c, &p("b_out"), d)?;
    let mut post: Vec<f32> = match c.architecture {
        Architecture::Llama => {
            let w_gate = required(ckpt, &p("W_gate"), &[dm, d])?;
            let gate = linear(x, &w_gate, None);
            let up = linear(x, &w_in, b_in.as_ref());
            gate.iter().zip(&up).map(|(&g, &u)| silu(g) * u).collect()
        }
        Architecture::Gpt2 => linear(x, &w_in, b_in.as_ref()).into_iter().map(gelu_new).collect(),
    };
    patch(&format!("blocks.{l}.mlp.hook_post"), &mut post);
    let out = linear(&post, &w_out, b_out.as_ref());
    Ok((post, out))
}

/// Biases are required for GPT-2 and optional for the llama family (Qwen2 has q/k/v biases).
fn bias(ckpt: &dyn Checkpoint, c: &ModelConfig, name: &str, len: usize) -> Result<Option<Tensor>> {
    match c.architecture {
        Architecture::Gpt2 => required(ckpt, name, &[len]).map(Some),
        Architecture::Llama => optional(ckpt, name, &[len]),
    }
}

/// The norm `prefix` (`blocks.L.ln1`, `ln_final`, ...) applied to each row of `x`:
/// RMSNorm for llama, LayerNorm for GPT-2.
fn norm(ckpt: &dyn Checkpoint, c: &ModelConfig, prefix: &str, x: &[f32]) -> Result<Vec<f32>> {
    let d = c.d_model;
    let w = required(ckpt, &format!("{prefix}.w"), &[d])?;
    let mut out = Vec::with_capacity(x.len());
    match c.architecture {
        Architecture::Llama => {
            for r in x.chunks_exact(d) {
                let mean_square = r.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let inv = 1.0 / (mean_square + c.norm_eps).sqrt();
                out.extend(r.iter().zip(&w.data).map(|(v, w)| v * inv * w));
            }
        }
        Architecture::Gpt2 => {
            let b = required(ckpt, &format!("{prefix}.b"), &[d])?;
            for r in x.chunks_exact(d) {
                let mean = r.iter().sum::<f32>() / d as f32;
                // Biased variance, as torch.nn.LayerNorm.
                let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
                let inv = 1.0 / (var + c.norm_eps).sqrt();
                out.extend(r.iter().zip(&w.data).zip(&b.data).map(|((v, w), b)| (v - mean) * inv * w + b));
            }
        }
    }
    Ok(out)
}

/// Rows of `x` times `w^T` (`w` is `[out, in]`), plus `b`.
fn linear(x: &[f32], w: &Tensor, b: Option<&Tensor>) -> Vec<f32> {
    let (d_out, d_in) = (w.shape[0], w.shape[1]);
    let mut out = Vec::with_capacity(x.len() / d_in * d_out);
    for r in x.chunks_exact(d_in) {
        for o in 0..d_out {
            out.push(dot(r, row(w, o)) + b.map_or(0.0, |b| b.data[o]));
        }
    }
    out
}

fn row(t: &Tensor, i: usize) -> &[f32] {
    let width = t.shape[1];
    &t.data[i * width..(i + 1) * width]
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GPT-2's `gelu_new`: the tanh approximation of GELU.
fn gelu_new(x: f32) -> f32 {
    let c = (2.0 / std::f32::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::rope;
    use crate::model::{Dim, Manifest};
    use crate::test_support::synth::{tiny, SynthModel};

    const ARCHS: [Architecture; 2] = [Architecture::Llama, Architecture::Gpt2];
    const PROMPT: &str = "When Mary and John went to the store , John gave a drink to";

    fn run(m: &SynthModel, text: &str) -> Activations {
        forward(m, &m.encode(text)).unwrap()
    }

    fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths differ");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
        }
    }

    #[test]
    fn every_hook_present_with_table_shapes() {
        for arch in ARCHS {
            let m = tiny(arch, 0);
            let acts = run(&m, PROMPT);
            let n = m.encode(PROMPT).len();
            let table = Manifest::hook_table(&m.config);
            assert_eq!(acts.hooks.keys().collect::<Vec<_>>(), table.keys().collect::<Vec<_>>());
            for (name, hook) in &table {
                let shape: Vec<usize> = hook
                    .shape
                    .iter()
                    .map(|dim| match dim {
                        Dim::Fixed(k) => *k,
                        Dim::Symbolic(s) if s == "batch" => 1,
                        Dim::Symbolic(_) => n,
                    })
                    .collect();
                assert_eq!(acts.hooks[name].shape, shape, "{name}");
            }
            assert_eq!(acts.logits.shape, vec![1, n, m.config.vocab_size]);
        }
    }

    #[test]
    fn residual_invariants() {
        for arch in ARCHS {
            let m = tiny(arch, 1);
            let acts = run(&m, PROMPT);
            let hook = |s: String| &acts.hooks[&s].data;
            let mut embed = acts.hooks["hook_embed"].data.clone();
            if arch == Architecture::Gpt2 {
                add_in_place(&mut embed, &acts.hooks["hook_pos_embed"].data);
            }
            assert_eq!(hook("blocks.0.hook_resid_pre".into()), &embed);
            for l in 0..m.config.n_layers {
                let b = |s: &str| format!("blocks.{l}.{s}");
                let mut mid = hook(b("hook_resid_pre")).clone();
                add_in_place(&mut mid, hook(b("hook_attn_out")));
                assert_eq!(hook(b("hook_resid_mid")), &mid);
                let mut post = mid;
                add_in_place(&mut post, hook(b("hook_mlp_out")));
                assert_eq!(hook(b("hook_resid_post")), &post);
                if l + 1 < m.config.n_layers {
                    assert_eq!(hook(format!("blocks.{}.hook_resid_pre", l + 1)), &post);
                }
            }
        }
    }

    #[test]
    fn activations_are_order_one_and_logits_not_degenerate() {
        for arch in ARCHS {
            let m = tiny(arch, 2);
            let acts = run(&m, PROMPT);
            let resid = &acts.hooks["blocks.1.hook_resid_post"].data;
            let rms = (resid.iter().map(|x| x * x).sum::<f32>() / resid.len() as f32).sqrt();
            assert!((0.2..5.0).contains(&rms), "{arch:?} residual rms {rms}");
            let last = &acts.logits.data[acts.logits.data.len() - m.config.vocab_size..];
            let (lo, hi) = last.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            assert!(hi - lo > 1.0 && hi - lo < 50.0, "{arch:?} logit range {lo}..{hi}");
        }
    }

    #[test]
    fn causal() {
        for arch in ARCHS {
            let m = tiny(arch, 3);
            let a = run(&m, "When Mary and John went to the store");
            let b = run(&m, "When Mary and John gave a drink to");
            let v = m.config.vocab_size;
            // Prompts agree on 4 tokens: logits there are unchanged by the later tokens.
            assert_eq!(a.logits.data[..4 * v], b.logits.data[..4 * v]);
            assert_ne!(a.logits.data[4 * v..5 * v], b.logits.data[4 * v..5 * v]);
        }
    }

    #[test]
    fn pattern_rows_are_causal_distributions() {
        for arch in ARCHS {
            let m = tiny(arch, 4);
            let acts = run(&m, PROMPT);
            let n = m.encode(PROMPT).len();
            for l in 0..m.config.n_layers {
                let pattern = &acts.hooks[&format!("blocks.{l}.attn.hook_pattern")].data;
                for (r, probs) in pattern.chunks_exact(n).enumerate() {
                    let i = r % n;
                    assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                    assert!(probs[i + 1..].iter().all(|&p| p == 0.0));
                    assert!(probs[..=i].iter().all(|&p| p > 0.0));
                }
            }
        }
    }

    /// With W_O = 0 and W_out = 0 (and their biases), every block is the identity, so
    /// logits = unembed(final_norm(embed (+ pos))), computed here by hand.
    #[test]
    fn blocks_that_write_nothing() {
        for arch in ARCHS {
            let mut m = tiny(arch, 5);
            for (name, t) in m.tensors.iter_mut() {
                if ["attn.W_O", "attn.b_O", "mlp.W_out", "mlp.b_out"].iter().any(|s| name.ends_with(s)) {
                    t.data.fill(0.0);
                }
            }
            let tokens = m.encode("John gave Mary");
            let acts = forward(&m, &tokens).unwrap();
            let c = &m.config;
            let d = c.d_model;
            let w_u = m.tensor("unembed.W_U").unwrap().unwrap();
            for (pos, &t) in tokens.iter().enumerate() {
                let mut x = row(&m.tensors["embed.W_E"], t as usize).to_vec();
                if arch == Architecture::Gpt2 {
                    add_in_place(&mut x, row(&m.tensors["pos_embed.W_pos"], pos));
                }
                let w = &m.tensors["ln_final.w"].data;
                let normed: Vec<f32> = if arch == Architecture::Llama {
                    let rms = (x.iter().map(|v| v * v).sum::<f32>() / d as f32 + c.norm_eps).sqrt();
                    (0..d).map(|i| x[i] / rms * w[i]).collect()
                } else {
                    let mean = x.iter().sum::<f32>() / d as f32;
                    let sd = (x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / d as f32 + c.norm_eps).sqrt();
                    let b = &m.tensors["ln_final.b"].data;
                    (0..d).map(|i| (x[i] - mean) / sd * w[i] + b[i]).collect()
                };
                let want: Vec<f32> = (0..c.vocab_size).map(|v| dot(&normed, row(&w_u, v))).collect();
                let got = &acts.logits.data[pos * c.vocab_size..(pos + 1) * c.vocab_size];
                assert_close(got, &want, 1e-5, &format!("{arch:?} logits at {pos}"));
            }
        }
    }

    /// A model with 2 KV heads equals one with 4 where each KV head is duplicated for the two
    /// query heads that share it (HF `repeat_kv`).
    #[test]
    fn grouped_query_attention_matches_repeated_heads() {
        let m = tiny(Architecture::Llama, 6);
        let mut full = m.clone();
        full.config.n_kv_heads = full.config.n_heads;
        let dh = m.config.d_head;
        for l in 0..m.config.n_layers {
            for w in ["W_K", "W_V"] {
                let t = full.tensors.get_mut(&format!("blocks.{l}.attn.{w}")).unwrap();
                let heads: Vec<&[f32]> = t.data.chunks_exact(dh * t.shape[1]).collect();
                let data: Vec<f32> = heads.iter().flat_map(|h| h.iter().chain(h.iter()).copied()).collect();
                *t = Tensor::new(vec![2 * t.shape[0], t.shape[1]], data);
            }
        }
        let (a, b) = (run(&m, PROMPT), run(&full, PROMPT));
        assert_close(&a.logits.data, &b.logits.data, 1e-5, "logits");
        assert_close(&a.hooks["blocks.1.attn.hook_z"].data, &b.hooks["blocks.1.attn.hook_z"].data, 1e-5, "z");
    }

    #[test]
    fn rope_is_a_relative_rotation() {
        let (dh, theta) = (8, 10000.0);
        let q: Vec<f32> = (0..dh).map(|i| (i as f32 * 0.7).sin()).collect();
        let k: Vec<f32> = (0..dh).map(|i| (i as f32 * 1.3).cos()).collect();
        // One head at positions 0..6: position 0 is untouched, norms are preserved, and
        // q_rot(i) . k_rot(j) depends only on i - j.
        let inv_freq = crate::model::rope::inv_freq(dh, theta, None);
        let at = |x: &[f32]| rope(&x.repeat(6), 1, dh, &inv_freq);
        let (qr, kr) = (at(&q), at(&k));
        assert_close(&qr[..dh], &q, 1e-6, "position 0");
        let norm = |v: &[f32]| dot(v, v).sqrt();
        assert!((norm(&qr[5 * dh..]) - norm(&q)).abs() < 1e-5);
        let score = |i: usize, j: usize| dot(&qr[i * dh..][..dh], &kr[j * dh..][..dh]);
        assert!((score(3, 1) - score(5, 3)).abs() < 1e-5);
        assert!((score(3, 1) - score(3, 2)).abs() > 1e-3);
        // Hand check for the first frequency (inv_freq = 1): a rotation by `pos` radians of
        // the pair (x[0], x[4]).
        let (s, c) = 2f32.sin_cos();
        assert!((qr[2 * dh] - (q[0] * c - q[4] * s)).abs() < 1e-6);
        assert!((qr[2 * dh + 4] - (q[4] * c + q[0] * s)).abs() < 1e-6);
    }

    #[test]
    fn gelu_new_values() {
        // Reference values from torch: gelu(x, approximate="tanh").
        assert_eq!(gelu_new(0.0), 0.0);
        assert!((gelu_new(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu_new(-1.0) + 0.158_808).abs() < 1e-5);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let m = tiny(Architecture::Gpt2, 0);
        let e = forward(&m, &[1, m.config.vocab_size as u32]).unwrap_err().to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
        assert!(forward(&m, &[]).is_err());
        let e = forward(&m, &vec![1; m.config.n_ctx + 1]).unwrap_err().to_string();
        assert!(e.contains("longer than the model's context"), "{e}");
        let mut broken = m.clone();
        broken.tensors.remove("blocks.1.mlp.b_in");
        assert!(forward(&broken, &[1, 2]).unwrap_err().to_string().contains("blocks.1.mlp.b_in"));
    }
}
