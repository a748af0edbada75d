//! Gaussian-noise corruption: the seeded noise stream and the pooled embedding sd it scales.

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::ir::experiment::{CorruptedPrompt, CorruptionKind};
use crate::ir::plan::Variant;
use crate::model::checkpoint::Tensor;

/// Gaussian noise eps ~ N(0, nu^2) added to the embedding rows at `positions`.
///
/// ChaCha8 seeded with the corruption's seed, on the plan's stream for this prompt and sample;
/// normals by Box-Muller, positions in order, each row's `d_model` values in order.
pub fn noised(embed: &Tensor, positions: &[usize], nu: f64, seed: u64, stream: u64) -> Vec<f32> {
    let d = embed.shape[1];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let mut out = embed.data.clone();
    for &pos in positions {
        for x in &mut out[pos * d..(pos + 1) * d] {
            *x = (*x as f64 + nu * standard_normal(&mut rng)) as f32;
        }
    }
    out
}

fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    // Box-Muller; 1 - u keeps the logarithm finite.
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// nu = scale x the standard deviation (n - 1, as torch's `std`) of the clean token embeddings
/// at the noised positions, pooled over all of the dataset's prompts.
pub fn noise_sd(variant: &Variant, clean_embeds: &[Tensor]) -> f64 {
    let CorruptionKind::Noise { scale, .. } = variant.corruption_kind else { return 0.0 };
    let mut values = vec![];
    for (prompt, embed) in variant.prompts.iter().zip(clean_embeds) {
        if let CorruptedPrompt::Noise { positions } = &prompt.corrupted {
            let d = embed.shape[1];
            for &p in positions {
                values.extend(embed.data[p * d..(p + 1) * d].iter().map(|&x| x as f64));
            }
        }
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    scale * var.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_seeded_per_stream() {
        let embed = Tensor::new(vec![3, 4], vec![0.0; 12]);
        let a = noised(&embed, &[1], 1.0, 7, 0);
        assert_eq!(a, noised(&embed, &[1], 1.0, 7, 0));
        assert_ne!(a, noised(&embed, &[1], 1.0, 7, 1));
        assert_ne!(a, noised(&embed, &[1], 1.0, 8, 0));
        assert!(a[..4].iter().chain(&a[8..]).all(|x| *x == 0.0));
        assert!(a[4..8].iter().all(|x| *x != 0.0));
    }
}
