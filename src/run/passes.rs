//! What a variant's runs are, shared by every executor: the clean, corrupted and patched passes
//! (patch masks per component, positions resolved per prompt), the cached runs they read, and
//! each run's metric values.

use std::borrow::Cow;
use std::sync::Arc;

use anyhow::{bail, Result};

use crate::ir::experiment::{AblationKind, Answer, CorruptedPrompt, CorruptionKind, Direction};
use crate::ir::plan::{PatchRun, PlanMetric, Variant};
use crate::model::checkpoint::Tensor;
use crate::model::{Dim, EMBED_HOOK};
use crate::run::engine::{concrete, HookPatch, Pass};
use crate::run::metrics::{self, Readout};
use crate::run::noise::{noise_sd, noised};
use crate::run::readout::Logits;

/// Metric values of one variant: `[metric][prompt]`, noise samples already averaged.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantValues {
    pub clean: Vec<Vec<f64>>,
    /// `None` for ablations (no corrupted run).
    pub corrupted: Option<Vec<Vec<f64>>>,
    /// `[patch run][metric][prompt]`.
    pub patched: Vec<Vec<Vec<f64>>>,
    /// `[patch run]`: whether `patched` holds exact patching's values, not an estimate's.
    pub exact: Vec<bool>,
    /// `[patch run]`: an estimated run's attribution-patching estimate, `[metric][prompt]`.
    pub estimates: Vec<Option<Vec<Vec<f64>>>>,
    /// The patched forward passes actually run.
    pub work: Work,
    /// How the model does the task on the clean prompts (`None` without wrong answers).
    pub task: Option<CleanTask>,
}

impl VariantValues {
    /// The metrics of the runs patches start from, `[metric][prompt]`: the corrupted runs' when
    /// denoising, the clean runs' when noising or ablating (no corrupted run).
    pub fn base(&self, direction: Direction) -> &[Vec<f64>] {
        match (direction, &self.corrupted) {
            (Direction::Denoise, Some(corrupted)) => corrupted,
            _ => &self.clean,
        }
    }
}

/// How the model does the task on a variant's clean prompts: a prompt it gets wrong has no
/// behaviour for patching to localise. Right means the answer is more likely than the wrong
/// answer: a positive logit difference, for token sets log P(answers) - log P(wrong answers)
/// (a difference of logit sums would favour the larger set).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CleanTask {
    /// Prompts whose answer is more likely than their wrong answer.
    pub correct: usize,
    pub prompts: usize,
    /// The mean log-odds of answer against wrong answer, log P(answer) - log P(wrong answer):
    /// the logit difference for single tokens.
    pub mean_log_odds: f64,
    /// The other prompts' indices.
    pub wrong: Vec<usize>,
}

impl CleanTask {
    /// From each prompt's clean logit difference.
    fn new(log_odds: &[f64]) -> CleanTask {
        // NaN is wrong, not right: a logit the run did not compute must not pass for an answer.
        let wrong: Vec<usize> = (0..log_odds.len()).filter(|&p| log_odds[p].is_nan() || log_odds[p] <= 0.0).collect();
        CleanTask {
            correct: log_odds.len() - wrong.len(),
            prompts: log_odds.len(),
            mean_log_odds: log_odds.iter().sum::<f64>() / log_odds.len().max(1) as f64,
            wrong,
        }
    }
}

/// Patched work done: passes run (no-ops skipped), the transformer layers they computed times
/// their tokens (a pass that starts late computes fewer layers), and the most passes one ONNX
/// Runtime call ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    pub passes: u64,
    pub layer_tokens: u64,
    pub largest_call: u64,
    /// Forward and backward passes of attribution patching (one per base run and metric kind;
    /// for AtP*, one per layer too).
    pub backward_passes: u64,
    /// Of `passes`, those read back from checkpoints (an interrupted run's, or shards') rather
    /// than computed by this process.
    pub restored_passes: u64,
}

impl Work {
    /// One pass of `layer_tokens`, run in a call of `call` passes.
    pub fn pass(layer_tokens: usize, call: usize) -> Work {
        Work { passes: 1, layer_tokens: layer_tokens as u64, largest_call: call as u64, ..Work::default() }
    }

    /// The same pass, read back from a checkpoint.
    pub fn restored(layer_tokens: usize, call: usize) -> Work {
        Work { restored_passes: 1, ..Work::pass(layer_tokens, call) }
    }
}

impl std::ops::AddAssign for Work {
    fn add_assign(&mut self, other: Work) {
        self.passes += other.passes;
        self.layer_tokens += other.layer_tokens;
        self.largest_call = self.largest_call.max(other.largest_call);
        self.backward_passes += other.backward_passes;
        self.restored_passes += other.restored_passes;
    }
}

/// Everything about a variant's runs that both executors share.
pub struct Setup<'a> {
    pub variant: &'a Variant,
    pub metrics: &'a [PlanMetric],
    /// The engine's patchable hooks (the variant's `captures`) with their shapes.
    pub hooks: Vec<(String, Vec<Dim>)>,
    /// The (query) position axis of each hook's unbatched shape.
    pos_axis: Vec<usize>,
}

impl<'a> Setup<'a> {
    /// `hooks`: the forward pass's patchable hooks (the variant's `captures`) with shapes.
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

    /// The position axis of hook `h`'s unbatched values.
    pub(crate) fn pos_axis(&self, h: usize) -> usize {
        self.pos_axis[h]
    }

    pub(crate) fn hook_index(&self, name: &str) -> usize {
        self.hooks.iter().position(|(h, _)| h == name).expect("every patched hook is patchable")
    }

    pub(crate) fn samples(&self) -> usize {
        self.variant.corruption_kind.samples()
    }

    /// The clean pass of prompt `p`.
    pub(crate) fn clean_pass(&self, p: usize) -> Pass {
        Pass { ids: self.variant.prompts[p].clean_ids.clone(), patches: vec![] }
    }

    /// The corrupted pass of prompt `p`, sample `s` (`None` for ablations). `clean_embed` is
    /// the clean run's `hook_embed`, needed for Gaussian noise.
    pub(crate) fn corrupted_pass(&self, p: usize, s: usize, clean_embed: Option<&Tensor>, nu: f64) -> Option<Pass> {
        let prompt = &self.variant.prompts[p];
        match (&prompt.corrupted, &self.variant.corruption_kind) {
            (CorruptedPrompt::Tokens { ids, .. }, _) => Some(Pass { ids: ids.clone(), patches: vec![] }),
            (CorruptedPrompt::Noise { positions }, CorruptionKind::Noise { seed, .. }) => {
                let embed = clean_embed.expect("noise needs the clean embeddings");
                let value = noised(embed, positions, nu, *seed, prompt.noise_streams[s]);
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
    pub(crate) fn component_mask(&self, run: &PatchRun, hook: usize, p: usize) -> Vec<bool> {
        let prompt = &self.variant.prompts[p];
        let dims = &self.hooks[hook].1;
        let shape = concrete(dims, None, prompt.clean_ids.len());
        let pos_axis = dims
            .iter()
            .filter(|d| !matches!(d, Dim::Symbolic(s) if s == "batch"))
            .position(|d| matches!(d, Dim::Symbolic(_)));
        let head = head_axis(dims).and_then(|a| run.head.map(|h| (a, h)));
        let position = run.token_positions.get(p).copied();
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

    /// Whether a metric reads more than a few logits: probabilities need the log-softmax over
    /// the whole vocabulary (an exp per token), logit differences do not.
    pub(crate) fn needs_log_probs(&self) -> bool {
        self.metrics.iter().any(|m| m.kind.reads_vocabulary())
    }

    /// Every metric of one run.
    pub(crate) fn values(&self, logits: &Logits, p: usize, clean_log_probs: &[f64]) -> Vec<f64> {
        let lp = match (self.needs_log_probs(), logits.full()) {
            (false, _) => vec![],
            (true, Some(full)) => metrics::log_probs(full),
            // The engine unembeds only some tokens when every metric is a logit difference.
            (true, None) => unreachable!("probabilities need the whole vocabulary's logits"),
        };
        let prompt = &self.variant.prompts[p];
        let r = Readout { answer: prompt.answer.ids(), wrong: prompt.wrong.as_ref().map(Answer::ids), clean_log_probs };
        self.metrics.iter().map(|m| metrics::value(m.kind, logits, &lp, &r)).collect()
    }
}

/// The head axis of a hook's unbatched shape: the first fixed axis of a rank-3 shape
/// (`[pos, heads, d_head]`, `[heads, q_pos, k_pos]`).
fn head_axis(dims: &[Dim]) -> Option<usize> {
    let unbatched: Vec<&Dim> = dims.iter().filter(|d| !matches!(d, Dim::Symbolic(s) if s == "batch")).collect();
    (unbatched.len() == 3).then(|| unbatched.iter().position(|d| matches!(d, Dim::Fixed(_)))).flatten()
}

/// Which cached run a pass is: prompt `prompt`'s clean run (`sample: None`) or its corrupted
/// run `sample`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RunKey {
    pub(crate) prompt: usize,
    pub(crate) sample: Option<usize>,
}

/// The cached clean and corrupted runs of a variant.
pub(crate) struct Runs {
    pub(crate) clean_logits: Vec<Logits>,
    /// log P_clean per prompt (what `kl` compares with).
    pub(crate) clean_lp: Vec<Vec<f64>>,
    /// `[prompt][hook]`.
    pub(crate) clean_acts: Vec<Arc<Vec<Tensor>>>,
    /// `[prompt][sample]`; empty for ablations.
    pub(crate) corrupted_logits: Vec<Vec<Logits>>,
    /// `[prompt][sample][hook]`.
    pub(crate) corrupted_acts: Vec<Vec<Arc<Vec<Tensor>>>>,
    /// `[prompt][sample]`.
    pub(crate) corrupted_passes: Vec<Vec<Pass>>,
    /// The residual stream between segments, `[prompt][boundary]` and `[prompt][sample][boundary]`
    /// (empty from the full-graph engine): where late-starting passes enter.
    pub(crate) clean_bounds: Vec<Vec<Arc<Tensor>>>,
    pub(crate) corrupted_bounds: Vec<Vec<Vec<Arc<Tensor>>>>,
    /// Mean ablation: the clean activations averaged over prompts, `[hook]`.
    pub(crate) means: Vec<Tensor>,
}

impl Setup<'_> {
    /// Pooled noise sd from the clean runs' embeddings (0 without noise).
    pub(crate) fn nu(&self, clean_acts: &[Arc<Vec<Tensor>>]) -> f64 {
        if !matches!(self.variant.corruption_kind, CorruptionKind::Noise { .. }) {
            return 0.0;
        }
        let embed = self.hook_index(EMBED_HOOK);
        let embeds: Vec<Tensor> = clean_acts.iter().map(|a| a[embed].clone()).collect();
        noise_sd(self.variant, &embeds)
    }

    pub(crate) fn means(&self, clean_acts: &[Arc<Vec<Tensor>>]) -> Result<Vec<Tensor>> {
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

    /// The run a patch of prompt `p`, sample `s` starts from (see [`Setup::base_and_source`]).
    pub(crate) fn base_key(&self, p: usize, s: usize) -> RunKey {
        RunKey { prompt: p, sample: (!self.variant.base_is_clean()).then_some(s) }
    }

    /// The base pass, its activations at every hook, and the source activations a patch
    /// writes, for prompt `p` and sample `s`.
    pub(crate) fn base_and_source<'r>(
        &self,
        runs: &'r Runs,
        p: usize,
        s: usize,
    ) -> (Pass, &'r [Tensor], Cow<'r, [Tensor]>) {
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
    pub(crate) fn patched_pass(
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
    pub(crate) fn per_prompt(&self, logits: &[Vec<&Logits>], clean_lp: &[Vec<f64>]) -> Vec<Vec<f64>> {
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
    pub(crate) fn collect(&self, runs: &Runs, patched: &[Vec<Vec<Vec<f64>>>], work: Work) -> VariantValues {
        let clean_lp = &runs.clean_lp;
        let clean: Vec<Vec<&Logits>> = runs.clean_logits.iter().map(|l| vec![l]).collect();
        let corrupted = (!runs.corrupted_logits.is_empty()).then(|| {
            let logits: Vec<Vec<&Logits>> = runs.corrupted_logits.iter().map(|s| s.iter().collect()).collect();
            self.per_prompt(&logits, clean_lp)
        });
        let patched: Vec<Vec<Vec<f64>>> = patched
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
        let prompts = &self.variant.prompts;
        let task = prompts.iter().all(|p| p.wrong.is_some()).then(|| {
            let diffs: Vec<f64> = (0..prompts.len())
                .map(|p| {
                    let logits = &runs.clean_logits[p];
                    let wrong = prompts[p].wrong.as_ref().expect("checked above");
                    // log P(ids) up to the softmax's normaliser, which cancels.
                    let log_p = |ids: Vec<u32>| metrics::log_sum_exp(ids.into_iter().map(|i| logits.get(i) as f64));
                    log_p(prompts[p].answer.ids()) - log_p(wrong.ids())
                })
                .collect();
            CleanTask::new(&diffs)
        });
        let (exact, estimates) = (vec![true; patched.len()], vec![None; patched.len()]);
        VariantValues { clean: self.per_prompt(&clean, clean_lp), corrupted, patched, exact, estimates, work, task }
    }
}
