//! Attribution patching (AtP; Nanda 2023, Syed et al. 2023): every patch run's effect estimated
//! to first order from one backward pass per base run,
//!
//!   M(patched) ~ M(base) + sum over the patched activations of (a_source - a_base) dM/da,
//!
//! the gradient taken at the base run (the corrupted run when denoising, the clean run when
//! noising; per noise sample). The patches are exactly those the exact executors apply
//! ([`Setup::patched_pass`]), so an estimate and its exact value differ only by the
//! linearisation.
//!
//! AtP* (Kramar et al. 2024) changes two things: GradDrop (one backward pass per layer, that
//! layer's residual writes dropped; the score is the mean size of those estimates) and the QK
//! fix (a patch of queries or keys changes the attention pattern, which is recomputed exactly,
//! and only what follows the pattern is linearised).

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};

use crate::ir::experiment::{CorruptionKind, Method, MetricKind};
use crate::ir::plan::{PlanMetric, Variant};
use crate::model::attention;
use crate::model::checkpoint::Tensor;
use crate::model::ModelConfig;
use crate::run::attribution::{constant_gradient, logit_diff_gradient, metric_gradient, Gradients, Seed};
use crate::run::engine::{HookPatch, Output, Pass};
use crate::run::execute::{base_logits, cached_runs_by, Forward};
use crate::run::metrics::Readout;
use crate::run::passes::{RunKey, Setup, VariantValues, Work};
use crate::run::readout::Logits;
use crate::runtime::Runs;

impl Forward for Gradients {
    /// A forward pass: logits and hook values.
    fn forward(&mut self, passes: &[Pass], _capture: bool) -> Result<Vec<Output>> {
        Ok(self
            .run(passes, None)?
            .into_iter()
            .map(|run| Output { logits: Logits::vocabulary(run.logits), captures: run.values, boundaries: vec![] })
            .collect())
    }
}

/// Every patch run's metrics estimated by attribution patching (AtP, or AtP* for runs whose
/// method says so), `rows` passes per call.
pub fn attribution(setup: &Setup, model: &mut Gradients, rows: usize) -> Result<VariantValues> {
    let (n, samples, n_metrics) = (setup.variant.prompts.len(), setup.samples(), setup.metrics.len());
    // The backward passes each base run needs: the plain gradient for AtP, and one per dropped
    // layer for AtP*'s GradDrop.
    let methods = |m: Method| setup.variant.patches.iter().any(|r| r.method == m);
    let mut drops: Vec<Option<usize>> = vec![];
    if methods(Method::Attribution) {
        drops.push(None);
    }
    let mut n_layers = 0;
    if methods(Method::AtpStar) {
        n_layers = model.droppable_layers().ok_or_else(|| anyhow!("AtP* needs a session with GradDrop gates"))?;
        if n_layers < 2 {
            bail!("AtP*'s GradDrop averages over the layers other than a component's own: a one-layer model has none; use `by attribution`");
        }
        drops.extend((0..n_layers).map(Some));
    }
    let plain = drops.iter().position(Option::is_none);
    let (kinds, kind_of) = metric_kinds(setup.metrics);
    // The kind whose plain gradient is known before the run (a logit difference's): it is taken
    // in the base run's own pass, forward and backward at once, not in a pass of its own.
    let early = plain.and_then(|_| kinds.iter().position(|&k| constant_gradient(k)));
    let mut work = Work::default();
    let mut early_gradients: HashMap<RunKey, Vec<Tensor>> = HashMap::new();
    let runs = cached_runs_by(setup, |keys, passes| {
        let mut out = Vec::with_capacity(passes.len());
        for (keys, chunk) in keys.chunks(rows.max(1)).zip(passes.chunks(rows.max(1))) {
            if early.is_none() || keys.iter().any(|k| k.sample.is_none() != setup.variant.base_is_clean()) {
                out.extend(model.forward(chunk, true)?);
                continue;
            }
            let seeds: Vec<Seed> = keys
                .iter()
                .map(|k| {
                    let d_logits = logit_diff_gradient(model.vocab(), &readout(setup, k.prompt, &[]));
                    Seed { d_logits: d_logits.iter().map(|&x| x as f32).collect(), dropped_layer: None }
                })
                .collect();
            work.backward_passes += chunk.len() as u64;
            for (key, run) in keys.iter().zip(model.run(chunk, Some(&seeds))?) {
                early_gradients.insert(*key, run.gradients);
                out.push(Output { logits: Logits::vocabulary(run.logits), captures: run.values, boundaries: vec![] });
            }
        }
        Ok(out)
    })?;
    let dropped: Vec<usize> = (0..drops.len()).filter(|&d| drops[d].is_some()).collect();
    let qk = QkFix::new(&setup.hooks, model.config().clone());
    // Every run's estimates for prompt p, sample s, from its base run's gradients `[kind][drop]`.
    let estimate = |p: usize, s: usize, gradients: &BaseGradients| -> Result<Vec<Vec<f64>>> {
        let (base, base_acts, source) = setup.base_and_source(&runs, p, s);
        let base_values = setup.values(base_logits(&runs, setup, p, s), p, &runs.clean_lp[p]);
        let mut out = vec![];
        for run in &setup.variant.patches {
            let (pass, from) = setup.patched_pass(run, p, &base, base_acts, &source);
            if from.is_none() {
                // Nothing changes: the base run's own metrics, as the exact executors give.
                out.push(base_values.clone());
                continue;
            }
            let (patterns, fixed) = match run.method {
                Method::AtpStar => qk.pattern_changes(&pass, base_acts)?,
                _ => (vec![], vec![]),
            };
            let linearised: Vec<&HookPatch> = pass.patches.iter().filter(|p| !fixed.contains(&p.hook)).collect();
            let change = |d: usize, m: usize| {
                let gradient = &gradients[kind_of[m]][d];
                let through_patterns: f64 = patterns
                    .iter()
                    .map(|(h, delta)| {
                        delta.iter().zip(&gradient[*h].data).map(|(x, g)| *x as f64 * *g as f64).sum::<f64>()
                    })
                    .sum();
                first_order_change(&linearised, base_acts, gradient) + through_patterns
            };
            out.push(
                (0..n_metrics)
                    .map(|m| match run.method {
                        Method::AtpStar => {
                            // GradDrop: the sum of |estimate| over the dropped layers, over L - 1
                            // (a component inside a layer loses all of its effect when its own
                            // layer is dropped). Unsigned: the size of the change.
                            let size: f64 = dropped.iter().map(|&d| change(d, m).abs()).sum();
                            base_values[m] + size / (n_layers - 1) as f64
                        }
                        _ => base_values[m] + change(plain.expect("AtP runs have the plain gradient"), m),
                    })
                    .collect(),
            );
        }
        Ok(out)
    };
    // [run][prompt][sample] -> every metric's estimate
    let mut estimates: Vec<Vec<Vec<Vec<f64>>>> = vec![vec![vec![vec![]; samples]; n]; setup.variant.patches.len()];
    // Each base run and the samples it serves: when noising, the clean run serves them all.
    let mut bases: Vec<(RunKey, Vec<usize>)> = vec![];
    for p in 0..n {
        for s in 0..samples {
            match bases.last_mut() {
                Some((key, served)) if *key == setup.base_key(p, s) => served.push(s),
                _ => bases.push((setup.base_key(p, s), vec![s])),
            }
        }
    }
    let mut settle = |key: RunKey, served: &[usize], gradients: &BaseGradients| -> Result<()> {
        for &s in served {
            for (r, values) in estimate(key.prompt, s, gradients)?.into_iter().enumerate() {
                estimates[r][key.prompt][s] = values;
            }
        }
        Ok(())
    };
    // Per base run: its gradients `[kind][drop]` and how many backward passes it still needs.
    // GradDrop's gradients are used and dropped as soon as a base run has them all, so memory
    // does not grow with the prompts times the dropped layers; the early gradients (one set per
    // base run, the size of its cached activations) are held from the cached runs until then.
    let mut pending: HashMap<RunKey, (BaseGradients, usize)> = HashMap::new();
    let mut jobs: Vec<(usize, usize, usize)> = vec![];
    for (b, (key, served)) in bases.iter().enumerate() {
        let mut gradients: BaseGradients = vec![vec![vec![]; drops.len()]; kinds.len()];
        let mut early_gradient = early_gradients.remove(key);
        let mut left = 0;
        for (k, per_drop) in gradients.iter_mut().enumerate() {
            for (d, gradient) in per_drop.iter_mut().enumerate() {
                match (early == Some(k) && Some(d) == plain).then(|| early_gradient.take()).flatten() {
                    Some(g) => *gradient = g,
                    None => {
                        jobs.push((b, k, d));
                        left += 1;
                    }
                }
            }
        }
        match left {
            0 => settle(*key, served, &gradients)?,
            _ => drop(pending.insert(*key, (gradients, left))),
        }
    }
    // dM/d(logits) of the last (base run, kind): the same for each of its dropped layers.
    let mut last_seed: Option<((usize, usize), Vec<f32>)> = None;
    for chunk in jobs.chunks(rows.max(1)) {
        let mut passes = vec![];
        let mut seeds = vec![];
        for &(b, k, d) in chunk {
            let (key, served) = &bases[b];
            let (p, s) = (key.prompt, served[0]);
            let (base, ..) = setup.base_and_source(&runs, p, s);
            if last_seed.as_ref().is_none_or(|(job, _)| *job != (b, k)) {
                let logits =
                    base_logits(&runs, setup, p, s).full().expect("the gradient session unembeds the vocabulary");
                let d_logits = metric_gradient(kinds[k], logits, &readout(setup, p, &runs.clean_lp[p]));
                last_seed = Some(((b, k), d_logits.iter().map(|&x| x as f32).collect()));
            }
            let d_logits = last_seed.as_ref().expect("set above").1.clone();
            seeds.push(Seed { d_logits, dropped_layer: drops[d] });
            work.backward_passes += 1;
            passes.push(base);
        }
        for (&(b, k, d), run) in chunk.iter().zip(model.run(&passes, Some(&seeds))?) {
            let (key, served) = &bases[b];
            let (gradients, left) = pending.get_mut(key).expect("a job's base run is pending");
            gradients[k][d] = run.gradients;
            *left -= 1;
            if *left == 0 {
                let (gradients, _) = pending.remove(key).expect("found above");
                settle(*key, served, &gradients)?;
            }
        }
    }
    let mut values = setup.collect(&runs, &estimates, work);
    values.exact = vec![false; values.patched.len()];
    values.estimates = values.patched.iter().cloned().map(Some).collect();
    Ok(values)
}

/// The metrics' distinct kinds, and each metric's index among them. A metric's gradient depends
/// on its kind only (the answers are the prompt's): one backward pass per base run serves every
/// metric of a kind.
fn metric_kinds(metrics: &[PlanMetric]) -> (Vec<MetricKind>, Vec<usize>) {
    let mut kinds: Vec<MetricKind> = vec![];
    let kind_of = (metrics.iter())
        .map(|metric| match kinds.iter().position(|&k| k == metric.kind) {
            Some(k) => k,
            None => {
                kinds.push(metric.kind);
                kinds.len() - 1
            }
        })
        .collect();
    (kinds, kind_of)
}

/// ONNX Runtime calls from which prepacking the gradient session's weights pays for itself: on
/// SmolLM2 it took 1.1 s and saved about 0.09 s per call of 20 to 28 passes (README,
/// "Attribution patching against exact patching").
const PREPACKING_PAYS_FROM_CALLS: usize = 12;

/// How to prepare the gradient session for `variant`'s estimates at `rows` passes per call,
/// from the passes [`attribution`] makes: the cached clean and corrupted runs (a logit
/// difference's gradient among them), then a backward pass per base run and other metric kind,
/// and for AtP* one per base run, metric kind and layer.
pub fn session_runs(variant: &Variant, metrics: &[PlanMetric], n_layers: usize, rows: usize) -> Runs {
    let prompts = variant.prompts.len();
    let samples = variant.corruption_kind.samples();
    let ablation = matches!(variant.corruption_kind, CorruptionKind::Ablation { .. });
    let corrupted = if ablation { 0 } else { prompts * samples };
    let base_runs = if variant.base_is_clean() { prompts } else { prompts * samples };
    let (kinds, _) = metric_kinds(metrics);
    let has = |m: Method| variant.patches.iter().any(|r| r.method == m);
    let plain = if has(Method::Attribution) { kinds.iter().filter(|&&k| !constant_gradient(k)).count() } else { 0 };
    let dropped = if has(Method::AtpStar) { kinds.len() * n_layers } else { 0 };
    let passes = prompts + corrupted + base_runs * (plain + dropped);
    match passes.div_ceil(rows.max(1)) >= PREPACKING_PAYS_FROM_CALLS {
        true => Runs::Many,
        false => Runs::Few,
    }
}

/// What prompt `p`'s metrics read, with `clean_log_probs` (for `kl`).
fn readout<'a>(setup: &Setup, p: usize, clean_log_probs: &'a [f64]) -> Readout<'a> {
    let prompt = &setup.variant.prompts[p];
    Readout { answer: prompt.answer.ids(), wrong: prompt.wrong.as_ref().map(|w| w.ids()), clean_log_probs }
}

/// A base run's gradients, `[metric kind][drop]` -> per hook.
type BaseGradients = Vec<Vec<Vec<Tensor>>>;

/// The hooks AtP*'s QK fix reads besides the patched ones: for every layer whose queries or
/// keys `runs` patch, its queries, keys and attention pattern.
pub fn qk_fix_hooks(runs: &[&crate::ir::plan::PatchRun]) -> Vec<String> {
    let mut hooks = vec![];
    for hook in runs.iter().flat_map(|r| &r.hooks) {
        let Some(layer) = hook.strip_suffix("attn.hook_q").or(hook.strip_suffix("attn.hook_k")) else { continue };
        for name in ["hook_q", "hook_k", "hook_pattern"] {
            let full = format!("{layer}attn.{name}");
            if !hooks.contains(&full) {
                hooks.push(full);
            }
        }
    }
    hooks
}

/// sum over the patched activations of (a_source - a_base) dM/da.
fn first_order_change(patches: &[&HookPatch], base_acts: &[Tensor], gradient: &[Tensor]) -> f64 {
    patches
        .iter()
        .map(|patch| {
            let (a, g) = (&base_acts[patch.hook].data, &gradient[patch.hook].data);
            patch
                .mask
                .iter()
                .zip(&patch.value)
                .zip(a.iter().zip(g))
                .filter(|((&on, _), _)| on)
                .map(|((_, &v), (&a, &g))| (v as f64 - a as f64) * g as f64)
                .sum::<f64>()
        })
        .sum()
}

/// A pattern hook and the change of its values.
type PatternChange = (usize, Vec<f32>);

/// AtP*'s QK fix: per layer whose queries or keys a pass patches, the attention pattern
/// recomputed from the patched queries and keys, minus the base run's (both by
/// [`attention::pattern`], so unchanged rows differ by exactly 0). The gradient is then taken
/// at the pattern instead of at the queries and keys.
struct QkFix {
    /// Per layer: the layer and the indices of its `attn.hook_q`, `attn.hook_k` and
    /// `attn.hook_pattern`.
    layers: Vec<(usize, [usize; 3])>,
    /// Query and key hooks without their layer's other two (a patch of them cannot be fixed).
    unfixable: Vec<usize>,
    config: ModelConfig,
}

impl QkFix {
    /// The layers whose query, key and pattern hooks are all among `hooks`.
    fn new(hooks: &[(String, Vec<crate::model::Dim>)], config: ModelConfig) -> QkFix {
        let index = |name: String| hooks.iter().position(|(h, _)| *h == name);
        let (mut layers, mut unfixable) = (vec![], vec![]);
        for l in 0..config.n_layers {
            let hook = |s: &str| index(format!("blocks.{l}.attn.{s}"));
            match (hook("hook_q"), hook("hook_k"), hook("hook_pattern")) {
                (Some(q), Some(k), Some(pattern)) => layers.push((l, [q, k, pattern])),
                (q, k, _) => unfixable.extend(q.into_iter().chain(k)),
            }
        }
        QkFix { layers, unfixable, config }
    }

    /// (pattern hook, exact change of its values) for every layer whose queries or keys `pass`
    /// patches, and the patched hooks those changes account for: the layer's queries and keys,
    /// and its pattern when the pass patches that too (its patch then applies on top).
    fn pattern_changes(&self, pass: &Pass, base_acts: &[Tensor]) -> Result<(Vec<PatternChange>, Vec<usize>)> {
        let patched = |hook: usize| -> Option<Vec<f32>> {
            let patch = pass.patches.iter().find(|p| p.hook == hook)?;
            let mut values = base_acts[hook].data.clone();
            for ((v, &on), &new) in values.iter_mut().zip(&patch.mask).zip(&patch.value) {
                if on {
                    *v = new;
                }
            }
            Some(values)
        };
        if let Some(patch) = pass.patches.iter().find(|p| self.unfixable.contains(&p.hook)) {
            bail!("AtP*'s QK fix needs hook {}'s layer's queries, keys and pattern captured", patch.hook);
        }
        let (mut changes, mut fixed) = (vec![], vec![]);
        for &(layer, [q, k, pattern]) in &self.layers {
            let (new_q, new_k) = (patched(q), patched(k));
            if new_q.is_none() && new_k.is_none() {
                continue;
            }
            let (base_q, base_k) = (&base_acts[q].data, &base_acts[k].data);
            let before = attention::pattern(&self.config, base_q, base_k)?;
            // The recomputation must be the model's own attention: checked on the base run.
            let off = before.iter().zip(&base_acts[pattern].data).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            if off > 1e-3 {
                bail!(
                    "AtP*'s QK fix recomputes attention patterns the way patchbay's imported models compute them, but this model's layer {layer} pattern differs by {off:.1e}; estimate query and key patches `by attribution` instead"
                );
            }
            let mut after = attention::pattern(
                &self.config,
                new_q.as_deref().unwrap_or(base_q),
                new_k.as_deref().unwrap_or(base_k),
            )?;
            if let Some(patch) = pass.patches.iter().find(|p| p.hook == pattern) {
                for ((a, &on), &value) in after.iter_mut().zip(&patch.mask).zip(&patch.value) {
                    if on {
                        *a = value;
                    }
                }
            }
            changes.push((pattern, after.iter().zip(&before).map(|(a, b)| a - b).collect()));
            fixed.extend([q, k, pattern]);
        }
        Ok((changes, fixed))
    }
}
