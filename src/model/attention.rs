//! The attention pattern from queries and keys, as the models patchbay builds compute it: rotary
//! embedding (llama), scores scaled by 1/sqrt(d_head), a causal softmax, grouped-query heads. The
//! reference forward pass uses it, and so does AtP*'s QK fix, which recomputes the pattern
//! exactly for patched queries and keys.

use anyhow::Result;

use crate::model::{Architecture, ModelConfig};

/// `[n_heads, pos, pos]` probabilities (0 above the diagonal) from `q` `[pos, n_heads, d_head]`
/// and `k` `[pos, n_kv_heads, d_head]`, both before the rotary embedding, positions 0..pos.
pub fn pattern(c: &ModelConfig, q: &[f32], k: &[f32]) -> Result<Vec<f32>> {
    let (dh, nh, nkv) = (c.d_head, c.n_heads, c.n_kv_heads);
    let n = q.len() / (nh * dh);
    let (q, k) = match c.architecture {
        Architecture::Llama => {
            let inv_freq =
                c.rope_inv_freq().ok_or_else(|| anyhow::anyhow!("a llama model needs a RoPE base frequency"))?;
            (rope(q, nh, dh, &inv_freq), rope(k, nkv, dh, &inv_freq))
        }
        Architecture::Gpt2 => (q.to_vec(), k.to_vec()),
    };
    // Grouped-query attention: consecutive query heads share a key/value head (HF `repeat_kv`).
    let group = nh / nkv;
    let scale = 1.0 / (dh as f32).sqrt();
    let mut pattern = vec![0.0; nh * n * n];
    for h in 0..nh {
        let kvh = h / group;
        for i in 0..n {
            let qi = &q[(i * nh + h) * dh..][..dh];
            // Causal: query i attends to keys 0..=i.
            let scores: Vec<f32> = (0..=i).map(|j| dot(qi, &k[(j * nkv + kvh) * dh..][..dh]) * scale).collect();
            pattern[(h * n + i) * n..][..=i].copy_from_slice(&softmax(&scores));
        }
    }
    Ok(pattern)
}

/// Rotary position embedding, HF "rotate half" convention, on `[pos, heads, d_head]`:
/// x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1) and frequency `inv_freq[i]`
/// shared by both halves. Angles are computed in f64 for accuracy.
pub fn rope(x: &[f32], heads: usize, dh: usize, inv_freq: &[f32]) -> Vec<f32> {
    let half = dh / 2;
    let mut out = x.to_vec();
    for (idx, head) in out.chunks_exact_mut(dh).enumerate() {
        let pos = (idx / heads) as f64;
        for i in 0..half {
            let (sin, cos) = (pos * inv_freq[i] as f64).sin_cos();
            let (x1, x2) = (head[i] as f64, head[i + half] as f64);
            head[i] = (x1 * cos - x2 * sin) as f32;
            head[i + half] = (x2 * cos + x1 * sin) as f32;
        }
    }
    out
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub(crate) fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}
