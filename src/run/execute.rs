//! Executing one variant: the clean, corrupted and patched runs, and each run's metrics.
//!
//! Two executors compute the same numbers:
//! - [`fast`]: clean and corrupted runs once per prompt (and noise sample), their activations
//!   cached; patched runs batched many (prompt, component) pairs per ONNX Runtime call; a
//!   patch that writes exactly the base run's own values is not run (its result is the base).
//! - [`reference`]: written for clarity, to check the fast path: for every (component, prompt,
//!   sample) it recomputes the source and base runs and does one plain patched forward pass.

use std::borrow::Cow;
use std::sync::Arc;

use anyhow::{bail, Result};
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::ir::experiment::Position;
use crate::ir::experiment::{AblationKind, Answer, CorruptedPrompt, CorruptionKind, Direction};
use crate::ir::plan::{PatchRun, PlanMetric, PlannedPrompt, Variant};
use crate::model::checkpoint::Tensor;
use crate::model::Dim;
use crate::run::engine::{concrete, Engine, HookPatch, Output, Pass};
use crate::run::metrics::{self, Readout};
use crate::run::resume::VariantLog;
use crate::run::segments::{self, Segments};

pub const EMBED_HOOK: &str = "hook_embed";

/// Metric values of one variant: `[metric][prompt]`, noise samples already averaged.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantValues {
    pub clean: Vec<Vec<f64>>,
    /// `None` for ablations (no corrupted run).
    pub corrupted: Option<Vec<Vec<f64>>>,
    /// `[patch run][metric][prompt]`.
    pub patched: Vec<Vec<Vec<f64>>>,
    /// The patched forward passes actually run.
    pub work: Work,
}

/// Patched work done: passes run (no-ops skipped), and the transformer layers they computed
/// times their tokens (a pass that starts late computes fewer layers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    pub passes: u64,
    pub layer_tokens: u64,
}

impl std::ops::AddAssign for Work {
    fn add_assign(&mut self, other: Work) {
        self.passes += other.passes;
        self.layer_tokens += other.layer_tokens;
    }
}

/// The hooks a variant patches (and captures), in a fixed order.
pub fn hooks(variant: &Variant) -> Vec<String> {
    let mut hooks: Vec<String> = variant.patches.iter().flat_map(|p| p.hooks.iter().cloned()).collect();
    if matches!(variant.corruption_kind, CorruptionKind::Noise { .. }) {
        hooks.push(EMBED_HOOK.to_string());
    }
    hooks.sort();
    hooks.dedup();
    hooks
}

/// Everything about a variant's runs that both executors share.
pub struct Setup<'a> {
    pub variant: &'a Variant,
    pub metrics: &'a [PlanMetric],
    /// The engine's patchable hooks (= [`hooks`]) with their shapes.
    pub hooks: Vec<(String, Vec<Dim>)>,
    /// The (query) position axis of each hook's unbatched shape.
    pos_axis: Vec<usize>,
}

impl<'a> Setup<'a> {
    /// `hooks`: the forward pass's patchable hooks (= [`hooks`] of the variant) with shapes.
    pub fn new(variant: &'a Variant, metrics: &'a [PlanMetric], hooks: Vec<(String, Vec<Dim>)>) -> Setup<'a> {
        let pos_axis = hooks
            .iter()
            .map(|(_, dims)| {
                let unbatched = dims.iter().filter(|d| !matches!(d, Dim::Symbolic(s) if s == "batch"));
                unbatched.into_iter().position(|d| matches!(d, Dim::Symbolic(_))).unwrap_or(0)
            })
            .collect();
        Setup { variant, metrics, hooks, pos_axis }
    }

    fn hook_index(&self, name: &str) -> usize {
        self.hooks.iter().position(|(h, _)| h == name).expect("every patched hook is patchable")
    }

    fn samples(&self) -> usize {
        self.variant.corruption_kind.samples()
    }

    /// The clean pass of prompt `p`.
    fn clean_pass(&self, p: usize) -> Pass {
        Pass { ids: self.variant.prompts[p].clean_ids.clone(), patches: vec![] }
    }

    /// The corrupted pass of prompt `p`, sample `s` (`None` for ablations). `clean_embed` is
    /// the clean run's `hook_embed`, needed for Gaussian noise.
    fn corrupted_pass(&self, p: usize, s: usize, clean_embed: Option<&Tensor>, nu: f64) -> Option<Pass> {
        let prompt = &self.variant.prompts[p];
        match (&prompt.corrupted, &self.variant.corruption_kind) {
            (CorruptedPrompt::Tokens { ids, .. }, _) => Some(Pass { ids: ids.clone(), patches: vec![] }),
            (CorruptedPrompt::Noise { positions }, CorruptionKind::Noise { seed, .. }) => {
                let embed = clean_embed.expect("noise needs the clean embeddings");
                let value = noised(embed, positions, nu, *seed, p, s);
                let hook = self.hook_index(EMBED_HOOK);
                Some(Pass {
                    ids: prompt.clean_ids.clone(),
                    patches: vec![HookPatch { hook, mask: vec![true; value.len()], value }],
                })
            }
            _ => None,
        }
    }

    /// The mask of `run`'s component on hook `hook` for prompt `p`.
    fn component_mask(&self, run: &PatchRun, hook: usize, p: usize) -> Vec<bool> {
        let prompt = &self.variant.prompts[p];
        let dims = &self.hooks[hook].1;
        let shape = concrete(dims, None, prompt.clean_ids.len());
        let pos_axis = dims
            .iter()
            .filter(|d| !matches!(d, Dim::Symbolic(s) if s == "batch"))
            .position(|d| matches!(d, Dim::Symbolic(_)));
        let head = head_axis(dims).and_then(|a| run.head.map(|h| (a, h)));
        let position = run.position.as_ref().map(|pos| resolve(pos, prompt));
        let mut mask = vec![false; shape.iter().product()];
        let mut index = vec![0usize; shape.len()];
        for m in mask.iter_mut() {
            let head_ok = head.is_none_or(|(a, h)| index[a] == h);
            let pos_ok = match (position, pos_axis) {
                (Some(q), Some(a)) => index[a] == q,
                _ => true,
            };
            *m = head_ok && pos_ok;
            for axis in (0..shape.len()).rev() {
                index[axis] += 1;
                if index[axis] < shape[axis] {
                    break;
                }
                index[axis] = 0;
            }
        }
        mask
    }

    /// Every metric of one run.
    fn values(&self, logits: &[f32], p: usize, clean_log_probs: &[f64]) -> Vec<f64> {
        let lp = metrics::log_probs(logits);
        let prompt = &self.variant.prompts[p];
        let r = Readout { answer: prompt.answer.ids(), wrong: prompt.wrong.as_ref().map(Answer::ids), clean_log_probs };
        self.metrics.iter().map(|m| metrics::value(m.kind, logits, &lp, &r)).collect()
    }
}

/// Index into a prompt's position table.
pub fn resolve(pos: &Position, prompt: &PlannedPrompt) -> usize {
    let len = prompt.clean_ids.len();
    let lookup = |label: &str| prompt.positions.iter().find(|(l, _)| l == label).map(|(_, i)| *i);
    match pos {
        Position::End => len - 1,
        Position::Index(i) if *i < 0 => (len as i64 + i) as usize,
        Position::Index(i) => *i as usize,
        Position::Slot { name, first: true } => lookup(&format!("first {name}")).or_else(|| lookup(name)).unwrap_or(0),
        Position::Slot { name, first: false } => lookup(name).unwrap_or(0),
    }
}

/// The head axis of a hook's unbatched shape: the first fixed axis of a rank-3 shape
/// (`[pos, heads, d_head]`, `[heads, q_pos, k_pos]`).
fn head_axis(dims: &[Dim]) -> Option<usize> {
    let unbatched: Vec<&Dim> = dims.iter().filter(|d| !matches!(d, Dim::Symbolic(s) if s == "batch")).collect();
    (unbatched.len() == 3).then(|| unbatched.iter().position(|d| matches!(d, Dim::Fixed(_)))).flatten()
}

/// Gaussian noise eps ~ N(0, nu^2) added to the embedding rows at `positions`.
///
/// Stream: ChaCha8 seeded with the corruption's seed, stream number `prompt << 32 | sample`;
/// normals by Box-Muller, positions in order, each row's `d_model` values in order.
pub fn noised(embed: &Tensor, positions: &[usize], nu: f64, seed: u64, prompt: usize, sample: usize) -> Vec<f32> {
    let d = embed.shape[1];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(((prompt as u64) << 32) | sample as u64);
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

/// The cached clean and corrupted runs of a variant.
struct Runs {
    clean_logits: Vec<Vec<f32>>,
    /// log P_clean per prompt (what `kl` compares with).
    clean_lp: Vec<Vec<f64>>,
    /// `[prompt][hook]`.
    clean_acts: Vec<Arc<Vec<Tensor>>>,
    /// `[prompt][sample]`; empty for ablations.
    corrupted_logits: Vec<Vec<Vec<f32>>>,
    /// `[prompt][sample][hook]`.
    corrupted_acts: Vec<Vec<Arc<Vec<Tensor>>>>,
    /// `[prompt][sample]`.
    corrupted_passes: Vec<Vec<Pass>>,
    /// The residual stream between segments, `[prompt][boundary]` and `[prompt][sample][boundary]`
    /// (empty from the full-graph engine): where late-starting passes enter.
    clean_bounds: Vec<Vec<Arc<Tensor>>>,
    corrupted_bounds: Vec<Vec<Vec<Arc<Tensor>>>>,
    /// Mean ablation: the clean activations averaged over prompts, `[hook]`.
    means: Vec<Tensor>,
}

impl Setup<'_> {
    /// Pooled noise sd from the clean runs' embeddings (0 without noise).
    fn nu(&self, clean_acts: &[Arc<Vec<Tensor>>]) -> f64 {
        if !matches!(self.variant.corruption_kind, CorruptionKind::Noise { .. }) {
            return 0.0;
        }
        let embed = self.hook_index(EMBED_HOOK);
        let embeds: Vec<Tensor> = clean_acts.iter().map(|a| a[embed].clone()).collect();
        noise_sd(self.variant, &embeds)
    }

    fn means(&self, clean_acts: &[Arc<Vec<Tensor>>]) -> Result<Vec<Tensor>> {
        if !matches!(self.variant.corruption_kind, CorruptionKind::Ablation { kind: AblationKind::Mean, .. }) {
            return Ok(vec![]);
        }
        let n = clean_acts.len() as f64;
        (0..self.hooks.len())
            .map(|h| {
                let first = &clean_acts[0][h];
                if clean_acts.iter().any(|a| a[h].shape != first.shape) {
                    bail!("mean ablation needs prompts of one token count (variant {})", self.variant.label);
                }
                let mut sum = vec![0f64; first.data.len()];
                for a in clean_acts {
                    for (s, &x) in sum.iter_mut().zip(&a[h].data) {
                        *s += x as f64;
                    }
                }
                Ok(Tensor::new(first.shape.clone(), sum.into_iter().map(|s| (s / n) as f32).collect()))
            })
            .collect()
    }

    /// The base pass, its activations at every hook, and the source activations a patch
    /// writes, for prompt `p` and sample `s`.
    fn base_and_source<'r>(&self, runs: &'r Runs, p: usize, s: usize) -> (Pass, &'r [Tensor], Cow<'r, [Tensor]>) {
        let clean: &[Tensor] = &runs.clean_acts[p];
        match (self.variant.direction, &self.variant.corruption_kind) {
            (_, CorruptionKind::Ablation { kind, .. }) => {
                let source: Cow<[Tensor]> = match kind {
                    AblationKind::Zero => Cow::Owned(
                        clean.iter().map(|t| Tensor::new(t.shape.clone(), vec![0.0; t.data.len()])).collect(),
                    ),
                    AblationKind::Mean => Cow::Borrowed(&runs.means),
                    AblationKind::Resample => match self.variant.prompts[p].corrupted {
                        CorruptedPrompt::Ablation { source_prompt: Some(q) } => Cow::Borrowed(&runs.clean_acts[q][..]),
                        _ => Cow::Borrowed(clean),
                    },
                };
                (self.clean_pass(p), clean, source)
            }
            (Direction::Denoise, _) => {
                (runs.corrupted_passes[p][s].clone(), &runs.corrupted_acts[p][s][..], Cow::Borrowed(clean))
            }
            (Direction::Noise, _) => (self.clean_pass(p), clean, Cow::Borrowed(&runs.corrupted_acts[p][s][..])),
        }
    }

    /// The patched pass of `run` on prompt `p`, and the first position where it writes a value
    /// the base run does not already have; `None` when there is none (a no-op).
    fn patched_pass(
        &self,
        run: &PatchRun,
        p: usize,
        base: &Pass,
        base_acts: &[Tensor],
        source: &[Tensor],
    ) -> (Pass, Option<usize>) {
        let mut pass = base.clone();
        let mut from: Option<usize> = None;
        for hook_name in &run.hooks {
            let h = self.hook_index(hook_name);
            let mask = self.component_mask(run, h, p);
            let src = &source[h].data;
            let (pos_axis, shape) = (self.pos_axis[h], &source[h].shape);
            let stride: usize = shape[pos_axis + 1..].iter().product();
            let first = mask
                .iter()
                .zip(src.iter().zip(&base_acts[h].data))
                .position(|(&m, (a, b))| m && a.to_bits() != b.to_bits())
                .map(|i| i / stride);
            // The position axis is outermost except in patterns ([heads, q, k]): scan them all.
            let first = if pos_axis == 0 {
                first
            } else {
                mask.iter()
                    .zip(src.iter().zip(&base_acts[h].data))
                    .enumerate()
                    .filter(|(_, (&m, (a, b)))| m && a.to_bits() != b.to_bits())
                    .map(|(i, _)| (i / stride) % shape[pos_axis])
                    .min()
            };
            from = match (from, first) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match pass.patches.iter_mut().find(|x| x.hook == h) {
                // The base run already overwrites this hook (noised embeddings): the component's
                // part comes from the source, the rest stays as the base wrote it.
                Some(existing) => {
                    for ((v, m), &x) in existing.value.iter_mut().zip(&mask).zip(src) {
                        if *m {
                            *v = x;
                        }
                    }
                }
                None => pass.patches.push(HookPatch { hook: h, value: src.clone(), mask }),
            }
        }
        (pass, from)
    }

    /// `[metric][prompt]` from each prompt's runs (noise samples averaged).
    fn per_prompt(&self, logits: &[Vec<&Vec<f32>>], clean_lp: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let mut out = vec![vec![0f64; logits.len()]; self.metrics.len()];
        for (p, samples) in logits.iter().enumerate() {
            for l in samples {
                for (m, v) in self.values(l, p, &clean_lp[p]).into_iter().enumerate() {
                    out[m][p] += v / samples.len() as f64;
                }
            }
        }
        out
    }

    /// `patched`: `[run][prompt][sample]` -> every metric of that patched pass.
    fn collect(&self, runs: &Runs, patched: &[Vec<Vec<Vec<f64>>>], work: Work) -> VariantValues {
        let clean_lp = &runs.clean_lp;
        let clean: Vec<Vec<&Vec<f32>>> = runs.clean_logits.iter().map(|l| vec![l]).collect();
        let corrupted = (!runs.corrupted_logits.is_empty()).then(|| {
            let logits: Vec<Vec<&Vec<f32>>> = runs.corrupted_logits.iter().map(|s| s.iter().collect()).collect();
            self.per_prompt(&logits, clean_lp)
        });
        let patched = patched
            .iter()
            .map(|run| {
                (0..self.metrics.len())
                    .map(|m| {
                        run.iter()
                            .map(|samples| samples.iter().map(|v| v[m]).sum::<f64>() / samples.len() as f64)
                            .collect()
                    })
                    .collect()
            })
            .collect();
        VariantValues { clean: self.per_prompt(&clean, clean_lp), corrupted, patched, work }
    }
}

/// A whole forward pass, however it is computed: the full graph, or its segments.
pub trait Forward {
    fn forward(&mut self, passes: &[Pass], capture: bool) -> Result<Vec<Output>>;
}

impl Forward for Engine {
    fn forward(&mut self, passes: &[Pass], capture: bool) -> Result<Vec<Output>> {
        self.run(passes, capture)
    }
}

impl Forward for Segments {
    fn forward(&mut self, passes: &[Pass], capture: bool) -> Result<Vec<Output>> {
        let rows: Vec<segments::Row> = passes
            .iter()
            .map(|p| segments::Row {
                ids: p.ids.clone(),
                patches: p.patches.clone(),
                start: 0,
                resid: None,
                from: 0,
                base: None,
            })
            .collect();
        self.run(&rows, capture)
    }
}

/// Run `passes` in chunks of `rows`, capturing hooks when asked.
fn run_chunked(model: &mut dyn Forward, passes: &[Pass], rows: usize, capture: bool) -> Result<Vec<Output>> {
    let mut out = Vec::with_capacity(passes.len());
    for chunk in passes.chunks(rows.max(1)) {
        out.extend(model.forward(chunk, capture)?);
    }
    Ok(out)
}

/// Clean and corrupted runs, once per prompt (and sample), activations cached.
fn cached_runs(setup: &Setup, model: &mut dyn Forward, rows: usize) -> Result<Runs> {
    let n = setup.variant.prompts.len();
    let clean: Vec<Pass> = (0..n).map(|p| setup.clean_pass(p)).collect();
    let (mut clean_logits, mut clean_acts, mut clean_bounds) = (vec![], vec![], vec![]);
    for out in run_chunked(model, &clean, rows, true)? {
        clean_logits.push(out.logits);
        clean_acts.push(Arc::new(out.captures));
        clean_bounds.push(out.boundaries);
    }
    let nu = setup.nu(&clean_acts);
    let embed = setup.hooks.iter().position(|(h, _)| h == EMBED_HOOK);
    let mut corrupted_passes = vec![];
    for (p, acts) in clean_acts.iter().enumerate() {
        let passes: Option<Vec<Pass>> =
            (0..setup.samples()).map(|s| setup.corrupted_pass(p, s, embed.map(|e| &acts[e]), nu)).collect();
        corrupted_passes.push(passes.unwrap_or_default());
    }
    let flat: Vec<Pass> = corrupted_passes.iter().flatten().cloned().collect();
    let mut results = run_chunked(model, &flat, rows, true)?.into_iter();
    let (mut corrupted_logits, mut corrupted_acts, mut corrupted_bounds) = (vec![], vec![], vec![]);
    for passes in &corrupted_passes {
        let (mut l, mut a, mut b) = (vec![], vec![], vec![]);
        for out in results.by_ref().take(passes.len()) {
            l.push(out.logits);
            a.push(Arc::new(out.captures));
            b.push(out.boundaries);
        }
        corrupted_logits.push(l);
        corrupted_acts.push(a);
        corrupted_bounds.push(b);
    }
    if corrupted_passes.iter().all(Vec::is_empty) {
        corrupted_logits.clear();
    }
    let means = setup.means(&clean_acts)?;
    let clean_lp = clean_logits.iter().map(|l| metrics::log_probs(l)).collect();
    Ok(Runs {
        clean_logits,
        clean_lp,
        clean_acts,
        corrupted_logits,
        corrupted_acts,
        corrupted_passes,
        clean_bounds,
        corrupted_bounds,
        means,
    })
}

/// The fast executor: cached clean/corrupted runs, batched patched runs, no-ops skipped.
/// `log`: where completed batches are checkpointed, and earlier runs' batches read back.
pub fn fast(
    setup: &Setup,
    model: &mut Segments,
    rows: usize,
    mut log: Option<&mut VariantLog>,
    progress: &dyn Fn(u64),
) -> Result<VariantValues> {
    let runs = cached_runs(setup, model, rows)?;
    let n = setup.variant.prompts.len();
    let samples = setup.samples();
    // [run][prompt][sample] -> metric values (logits are read and dropped: a sweep's logits
    // would not fit in memory)
    let mut patched: Vec<Vec<Vec<Vec<f64>>>> = vec![vec![vec![vec![]; samples]; n]; setup.variant.patches.len()];
    let mut pending: Vec<(usize, usize, usize)> = vec![];
    let mut batch: Vec<segments::Row> = vec![];
    let mut work = Work::default();
    // Segments: the embedding, one per layer, the unembedding.
    let n_layers = model.len() - 2;
    let suffix = model.suffix;
    // Batches are numbered in their fixed order, the key of the checkpoint.
    let mut batch_number = 0u64;
    let mut flush = |pending: &mut Vec<(usize, usize, usize)>,
                     batch: &mut Vec<segments::Row>,
                     patched: &mut Vec<Vec<Vec<Vec<f64>>>>|
     -> Result<()> {
        let number = batch_number;
        batch_number += 1;
        if let Some(entries) = log.as_mut().and_then(|l| l.completed(number)) {
            for (r, p, s, values) in entries {
                patched[r][p][s] = values;
            }
            progress(batch.len() as u64);
            pending.clear();
            batch.clear();
            return Ok(());
        }
        let mut entries = Vec::with_capacity(batch.len());
        for ((r, p, s), out) in pending.drain(..).zip(model.run(batch, false)?) {
            let values = setup.values(&out.logits, p, &runs.clean_lp[p]);
            patched[r][p][s] = values.clone();
            entries.push((r, p, s, values));
        }
        if let Some(log) = log.as_mut() {
            log.record(number, &entries)?;
        }
        for row in batch.iter() {
            let layers = n_layers - row.start.saturating_sub(1);
            let tokens = if suffix { row.ids.len() - row.from } else { row.ids.len() };
            work += Work { passes: 1, layer_tokens: (layers * tokens) as u64 };
        }
        progress(batch.len() as u64);
        batch.clear();
        Ok(())
    };
    for (r, run) in setup.variant.patches.iter().enumerate() {
        // Start late: nothing before the first patched layer changes.
        let start = run.hooks.iter().map(|h| segments::segment_of(h)).min().unwrap_or(0);
        for p in 0..n {
            for s in 0..samples {
                let (base, base_acts, source) = setup.base_and_source(&runs, p, s);
                let (pass, from) = setup.patched_pass(run, p, &base, base_acts, &source);
                let Some(from) = from else {
                    patched[r][p][s] = setup.values(base_logits(&runs, setup, p, s), p, &runs.clean_lp[p]);
                    progress(1);
                    continue;
                };
                // The base run's own patches before `start` (noised embeddings) are already in
                // the residual stream it left at `start`.
                let patches: Vec<HookPatch> = pass
                    .patches
                    .into_iter()
                    .filter(|x| segments::segment_of(&setup.hooks[x.hook].0) >= start)
                    .collect();
                let resid = (start > 0).then(|| base_bounds(&runs, setup, p, s)[start - 1].clone());
                let base = Some(base_captures(&runs, setup, p, s).clone());
                batch.push(segments::Row { ids: pass.ids, patches, start, resid, from, base });
                pending.push((r, p, s));
                if batch.len() >= rows {
                    flush(&mut pending, &mut batch, &mut patched)?;
                }
            }
        }
    }
    flush(&mut pending, &mut batch, &mut patched)?;
    Ok(setup.collect(&runs, &patched, work))
}

/// Everything the base run of prompt `p`, sample `s` captured (its keys and values included).
fn base_captures<'r>(runs: &'r Runs, setup: &Setup, p: usize, s: usize) -> &'r Arc<Vec<Tensor>> {
    match (setup.variant.direction, runs.corrupted_logits.is_empty()) {
        (Direction::Denoise, false) => &runs.corrupted_acts[p][s],
        _ => &runs.clean_acts[p],
    }
}

/// The residual streams the base run of prompt `p`, sample `s` left between segments.
fn base_bounds<'r>(runs: &'r Runs, setup: &Setup, p: usize, s: usize) -> &'r [Arc<Tensor>] {
    match (setup.variant.direction, runs.corrupted_logits.is_empty()) {
        (Direction::Denoise, false) => &runs.corrupted_bounds[p][s],
        _ => &runs.clean_bounds[p],
    }
}

fn base_logits<'r>(runs: &'r Runs, setup: &Setup, p: usize, s: usize) -> &'r Vec<f32> {
    match (setup.variant.direction, runs.corrupted_logits.is_empty()) {
        (Direction::Denoise, false) => &runs.corrupted_logits[p][s],
        _ => &runs.clean_logits[p],
    }
}

/// How peer libraries patch (TransformerLens' `patching`): clean and corrupted runs cached, then
/// one full forward pass of all prompts per component. For benchmarks.
pub fn per_component(setup: &Setup, engine: &mut Engine, progress: &dyn Fn(u64)) -> Result<VariantValues> {
    let n = setup.variant.prompts.len();
    let runs = cached_runs(setup, engine, n * setup.samples())?;
    let mut patched = vec![vec![vec![vec![]; setup.samples()]; n]; setup.variant.patches.len()];
    let mut work = Work::default();
    for (run, run_values) in setup.variant.patches.iter().zip(patched.iter_mut()) {
        let mut passes = vec![];
        for p in 0..n {
            for s in 0..setup.samples() {
                let (base, base_acts, source) = setup.base_and_source(&runs, p, s);
                passes.push(setup.patched_pass(run, p, &base, base_acts, &source).0);
            }
        }
        let mut outputs = engine.run(&passes, false)?.into_iter();
        for (p, prompt_values) in run_values.iter_mut().enumerate() {
            for (values, out) in prompt_values.iter_mut().zip(outputs.by_ref()) {
                *values = setup.values(&out.logits, p, &runs.clean_lp[p]);
            }
        }
        for pass in &passes {
            work += Work { passes: 1, layer_tokens: (engine.n_layers * pass.ids.len()) as u64 };
        }
        progress(passes.len() as u64);
    }
    Ok(setup.collect(&runs, &patched, work))
}

/// The reference executor: one plain forward pass per (component, prompt, sample), after
/// recomputing that prompt's clean and corrupted runs; no batching, no caching, no skipping.
pub fn reference(setup: &Setup, engine: &mut Engine) -> Result<VariantValues> {
    // The pooled noise sd and the ablation means are statistics of the whole dataset's clean
    // runs, not a cache of this executor: computed once, as the definition says.
    let dataset = cached_runs(setup, engine, 1)?;
    let n = setup.variant.prompts.len();
    let samples = setup.samples();
    let mut patched = vec![vec![vec![vec![]; samples]; n]; setup.variant.patches.len()];
    let mut work = Work::default();
    for (run, run_values) in setup.variant.patches.iter().zip(patched.iter_mut()) {
        for (p, prompt_values) in run_values.iter_mut().enumerate() {
            for (s, values) in prompt_values.iter_mut().enumerate() {
                // This prompt's runs, recomputed; the other prompts' slots stay empty.
                let mut fresh = Runs {
                    clean_logits: vec![vec![]; n],
                    clean_lp: vec![],
                    clean_acts: (0..n).map(|_| Arc::new(vec![])).collect(),
                    corrupted_logits: vec![vec![]; n],
                    corrupted_acts: vec![vec![]; n],
                    corrupted_passes: vec![vec![]; n],
                    clean_bounds: vec![],
                    corrupted_bounds: vec![],
                    means: dataset.means.clone(),
                };
                let clean = engine.run(&[setup.clean_pass(p)], true)?.remove(0);
                fresh.clean_logits[p] = clean.logits;
                fresh.clean_acts[p] = Arc::new(clean.captures);
                if let CorruptedPrompt::Ablation { source_prompt: Some(q) } = setup.variant.prompts[p].corrupted {
                    fresh.clean_acts[q] = Arc::new(engine.run(&[setup.clean_pass(q)], true)?.remove(0).captures);
                }
                if let Some(pass) = dataset.corrupted_passes[p].get(s) {
                    let corrupted = engine.run(std::slice::from_ref(pass), true)?.remove(0);
                    fresh.corrupted_passes[p] = vec![pass.clone(); s + 1];
                    fresh.corrupted_logits[p] = vec![corrupted.logits; s + 1];
                    let captures = Arc::new(corrupted.captures);
                    fresh.corrupted_acts[p] = (0..=s).map(|_| captures.clone()).collect();
                }
                let (base, base_acts, source) = setup.base_and_source(&fresh, p, s);
                let (pass, _) = setup.patched_pass(run, p, &base, base_acts, &source);
                let logits = engine.run(&[pass], false)?.remove(0).logits;
                *values = setup.values(&logits, p, &dataset.clean_lp[p]);
                work += Work {
                    passes: 1,
                    layer_tokens: (engine.n_layers * setup.variant.prompts[p].clean_ids.len()) as u64,
                };
            }
        }
    }
    Ok(setup.collect(&dataset, &patched, work))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_seeded_per_prompt_and_sample() {
        let embed = Tensor::new(vec![3, 4], vec![0.0; 12]);
        let a = noised(&embed, &[1], 1.0, 7, 0, 0);
        assert_eq!(a, noised(&embed, &[1], 1.0, 7, 0, 0));
        assert_ne!(a, noised(&embed, &[1], 1.0, 7, 0, 1));
        assert_ne!(a, noised(&embed, &[1], 1.0, 7, 1, 0));
        assert!(a[..4].iter().chain(&a[8..]).all(|x| *x == 0.0));
        assert!(a[4..8].iter().all(|x| *x != 0.0));
    }
}
