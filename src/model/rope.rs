//! Rotary position embeddings: the frequencies of every RoPE variant patchbay imports.
//!
//! Both the ONNX graph (its cos/sin tables) and the reference forward pass take their
//! frequencies from [`inv_freq`], computed the way Hugging Face transformers computes them
//! (`modeling_rope_utils`), in f32 like transformers, so imported models match it closely.

use serde::{Deserialize, Serialize};

/// How a checkpoint rescales the default RoPE frequencies `theta^(-2i/d_head)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// transformers `linear` (llama.cpp `rope.scaling.type = linear`): every frequency / `factor`.
    Linear { factor: f32 },
    /// transformers `llama3` (Llama 3.1 / 3.2): low frequencies / `factor`, high ones unchanged,
    /// a smooth blend between.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: f32 },
    /// llama.cpp's `rope_freqs.weight` tensor: frequency `i` divided by `factors[i]` (how GGUF
    /// stores llama3 scaling).
    FreqFactors { factors: Vec<f32> },
}

/// The `d_head / 2` rotation frequencies, in transformers' order (frequency `i` rotates
/// dimensions `i` and `i + d_head/2`).
pub fn inv_freq(d_head: usize, theta: f32, scaling: Option<&RopeScaling>) -> Vec<f32> {
    // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), in f32.
    let default: Vec<f32> =
        (0..d_head / 2).map(|i| 1.0 / (theta as f64).powf(((2 * i) as f32 / d_head as f32) as f64) as f32).collect();
    match scaling {
        None => default,
        Some(RopeScaling::Linear { factor }) => default.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::FreqFactors { factors }) => default.iter().zip(factors).map(|(f, s)| f / s).collect(),
        Some(&RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            let old_len = original_max_position_embeddings;
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            default
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// Check a scaling's parameters against the head size, before any table is built.
pub fn validate(d_head: usize, scaling: Option<&RopeScaling>) -> anyhow::Result<()> {
    match scaling {
        None => {}
        Some(RopeScaling::Linear { factor }) if !(*factor > 0.0 && factor.is_finite()) => {
            anyhow::bail!("linear RoPE scaling factor {factor} must be a positive number")
        }
        Some(RopeScaling::Linear { .. }) => {}
        Some(&RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            let positive = [factor, low_freq_factor, high_freq_factor, original_max_position_embeddings]
                .iter()
                .all(|x| *x > 0.0 && x.is_finite());
            if !positive || high_freq_factor <= low_freq_factor {
                anyhow::bail!(
                    "llama3 RoPE scaling needs positive factor, low_freq_factor < high_freq_factor and \
                     original_max_position_embeddings; found factor {factor}, low_freq_factor {low_freq_factor}, \
                     high_freq_factor {high_freq_factor}, original_max_position_embeddings {original_max_position_embeddings}"
                )
            }
        }
        Some(RopeScaling::FreqFactors { factors }) => {
            if factors.len() != d_head / 2 {
                anyhow::bail!(
                    "rope_freqs.weight has {} factors, but a head of {d_head} dimensions rotates {} frequencies",
                    factors.len(),
                    d_head / 2
                );
            }
            if let Some(bad) = factors.iter().find(|x| !(**x > 0.0 && x.is_finite())) {
                anyhow::bail!("rope_freqs.weight holds {bad}; every RoPE frequency factor must be a positive number");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies() {
        let f = inv_freq(8, 10000.0, None);
        let expected = [1.0, 0.1, 0.01, 0.001];
        for (a, b) in f.iter().zip(expected) {
            assert!((a - b).abs() < 1e-7 * b.max(1e-3), "{f:?}");
        }
    }

    #[test]
    fn linear_divides_every_frequency() {
        let base = inv_freq(16, 10000.0, None);
        let scaled = inv_freq(16, 10000.0, Some(&RopeScaling::Linear { factor: 4.0 }));
        for (a, b) in base.iter().zip(&scaled) {
            assert_eq!(a / 4.0, *b);
        }
    }

    /// Llama 3.1's published parameters: wavelengths under 8192/4 = 2048 keep their frequency,
    /// over 8192 are divided by 8, and the band between blends smoothly (so the result is
    /// monotone and continuous at both edges).
    #[test]
    fn llama3_bands() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let base = inv_freq(128, 500000.0, None);
        let scaled = inv_freq(128, 500000.0, Some(&scaling));
        let mut saw = [false; 3];
        for (b, s) in base.iter().zip(&scaled) {
            let wavelen = 2.0 * std::f32::consts::PI / b;
            if wavelen < 2048.0 {
                assert_eq!(b, s);
                saw[0] = true;
            } else if wavelen > 8192.0 {
                assert_eq!(b / 8.0, *s);
                saw[2] = true;
            } else {
                assert!(*s < *b && *s > b / 8.0, "{b} {s}");
                saw[1] = true;
            }
        }
        assert_eq!(saw, [true; 3]);
        assert!(scaled.windows(2).all(|w| w[0] > w[1]));
    }

    /// llama.cpp stores llama3 scaling as per-frequency divisors; the two forms agree.
    #[test]
    fn freq_factors_reproduce_llama3() {
        let llama3 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        };
        let base = inv_freq(16, 10000.0, None);
        let scaled = inv_freq(16, 10000.0, Some(&llama3));
        let factors: Vec<f32> = base.iter().zip(&scaled).map(|(b, s)| b / s).collect();
        let again = inv_freq(16, 10000.0, Some(&RopeScaling::FreqFactors { factors }));
        for (a, b) in scaled.iter().zip(&again) {
            assert!((a - b).abs() <= 1e-6 * a, "{a} {b}");
        }
    }

    #[test]
    fn invalid_parameters_are_named() {
        let e = validate(16, Some(&RopeScaling::FreqFactors { factors: vec![1.0; 4] })).unwrap_err().to_string();
        assert!(e.contains("4 factors") && e.contains("8 frequencies"), "{e}");
        let e = validate(16, Some(&RopeScaling::Linear { factor: 0.0 })).unwrap_err().to_string();
        assert!(e.contains("linear"), "{e}");
    }
}
