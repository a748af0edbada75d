//! `patchbay predict`: the top-k next tokens of a prompt, to sanity-check an imported model.

use crate::bail_fixable;
use crate::model::ModelDir;
use crate::runtime::{self, Batch, Device};

#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub token_id: u32,
    /// The decoded token, e.g. `" Paris"`.
    pub token: String,
    pub probability: f64,
    pub logit: f32,
}

#[derive(Debug, Clone)]
pub struct Prediction {
    pub tokens: Vec<u32>,
    pub candidates: Vec<Candidate>,
}

/// Tokenise `prompt` as every command does (with the special tokens the tokenizer adds, e.g. BOS),
/// run the model once and rank the next-token distribution at the last position.
pub fn predict(model: &ModelDir, prompt: &str, top_k: usize, device: Device) -> anyhow::Result<Prediction> {
    let tokenizer = model.tokenizer()?;
    let encoding = tokenizer.encode(prompt, true).map_err(|e| anyhow::anyhow!("cannot tokenise the prompt: {e}"))?;
    let tokens = encoding.get_ids().to_vec();
    if tokens.is_empty() {
        bail_fixable!("the prompt is empty after tokenisation"; help: "give a non-empty prompt");
    }
    let n_ctx = model.manifest.config.n_ctx;
    if tokens.len() > n_ctx {
        anyhow::bail!("the prompt has {} tokens but the model's context is {n_ctx}", tokens.len());
    }
    let mut session = runtime::session(&model.onnx_path(), device)?;
    let logits =
        runtime::run(&mut session, &Batch::new(std::slice::from_ref(&tokens)), &[&model.manifest.logits])?.remove(0);
    let vocab = *logits.shape.last().expect("logits have a vocab axis");
    let last = &logits.data[logits.data.len() - vocab..];
    let probabilities = softmax(last);

    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]).then(a.cmp(&b)));
    let candidates = order
        .into_iter()
        .take(top_k)
        .map(|id| Candidate {
            token_id: id as u32,
            token: tokenizer.decode(&[id as u32], false).unwrap_or_default(),
            probability: probabilities[id],
            logit: last[id],
        })
        .collect();
    Ok(Prediction { tokens, candidates })
}

/// Softmax in f64 with the max subtracted, for probabilities that sum to 1 to many digits.
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&z| (z as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}
