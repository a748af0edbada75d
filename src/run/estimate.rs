//! Attribution patching (AtP; Nanda 2023, Syed et al. 2023): every patch run's effect estimated
//! to first order from one backward pass per base run,
//!
//!   M(patched) ~ M(base) + sum over the patched activations of (a_source - a_base) dM/da,
//!
//! the gradient taken at the base run (the corrupted run when denoising, the clean run when
//! noising; per noise sample). The patches are exactly those the exact executors apply
//! ([`Setup::patched_pass`]), so an estimate and its exact value differ only by the
//! linearisation.

use anyhow::{anyhow, Result};

use crate::ir::experiment::Method;
use crate::model::checkpoint::Tensor;
use crate::run::attribution::{metric_gradient, Gradients, Seed};
use crate::run::engine::{Output, Pass};
use crate::run::execute::{base_logits, cached_runs, Forward};
use crate::run::metrics::Readout;
use crate::run::passes::{Setup, VariantValues, Work};
use crate::run::readout::Logits;

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
    let runs = cached_runs(setup, model, rows)?;
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
        drops.extend((0..n_layers).map(Some));
    }
    let mut jobs: Vec<(usize, usize, usize, usize)> = vec![];
    for p in 0..n {
        for s in 0..samples {
            for m in 0..n_metrics {
                jobs.extend((0..drops.len()).map(|d| (p, s, m, d)));
            }
        }
    }
    // [prompt][sample][metric][drop] -> the gradient at every hook
    let mut gradients: Vec<Vec<Vec<Vec<Vec<Tensor>>>>> =
        vec![vec![vec![vec![vec![]; drops.len()]; n_metrics]; samples]; n];
    let mut work = Work::default();
    for chunk in jobs.chunks(rows.max(1)) {
        let mut passes = vec![];
        let mut seeds = vec![];
        for &(p, s, m, d) in chunk {
            let (base, ..) = setup.base_and_source(&runs, p, s);
            let logits = base_logits(&runs, setup, p, s).full().expect("the gradient session unembeds the vocabulary");
            let prompt = &setup.variant.prompts[p];
            let readout = Readout {
                answer: prompt.answer.ids(),
                wrong: prompt.wrong.as_ref().map(|w| w.ids()),
                clean_log_probs: &runs.clean_lp[p],
            };
            let d_logits = metric_gradient(setup.metrics[m].kind, logits, &readout).iter().map(|&x| x as f32).collect();
            seeds.push(Seed { d_logits, dropped_layer: drops[d] });
            work.backward_passes += 1;
            passes.push(base);
        }
        for (&(p, s, m, d), run) in chunk.iter().zip(model.run(&passes, Some(&seeds))?) {
            gradients[p][s][m][d] = run.gradients;
        }
    }
    let plain = drops.iter().position(Option::is_none);
    let dropped: Vec<usize> = (0..drops.len()).filter(|&d| drops[d].is_some()).collect();
    // [run][prompt][sample] -> every metric's estimate
    let mut estimates: Vec<Vec<Vec<Vec<f64>>>> = vec![vec![vec![vec![]; samples]; n]; setup.variant.patches.len()];
    for (run, run_estimates) in setup.variant.patches.iter().zip(estimates.iter_mut()) {
        for (p, prompt_estimates) in run_estimates.iter_mut().enumerate() {
            for (s, values) in prompt_estimates.iter_mut().enumerate() {
                let (base, base_acts, source) = setup.base_and_source(&runs, p, s);
                let base_values = setup.values(base_logits(&runs, setup, p, s), p, &runs.clean_lp[p]);
                let (pass, from) = setup.patched_pass(run, p, &base, base_acts, &source);
                let change = |d: usize, m: usize| first_order_change(&pass, base_acts, &gradients[p][s][m][d]);
                *values = match from {
                    // Nothing changes: the base run's own metrics, as the exact executors give.
                    None => base_values,
                    Some(_) => (0..n_metrics)
                        .map(|m| match run.method {
                            Method::AtpStar => {
                                // GradDrop (Kramar et al. 2024): the mean |estimate| over the
                                // dropped layers, over L - 1 since a component's own layer
                                // drops all of its effect. Unsigned: the size of the change.
                                let size: f64 = dropped.iter().map(|&d| change(d, m).abs()).sum();
                                base_values[m] + size / (n_layers.max(2) - 1) as f64
                            }
                            _ => base_values[m] + change(plain.expect("AtP runs have the plain gradient"), m),
                        })
                        .collect(),
                };
            }
        }
    }
    let mut values = setup.collect(&runs, &estimates, work);
    values.exact = vec![false; values.patched.len()];
    values.estimates = values.patched.iter().cloned().map(Some).collect();
    Ok(values)
}

/// sum over the patched activations of (a_source - a_base) dM/da.
fn first_order_change(pass: &Pass, base_acts: &[Tensor], gradient: &[Tensor]) -> f64 {
    pass.patches
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
