//! Attribution patching (AtP; Nanda 2023, Syed et al. 2023): every patch run's effect estimated
//! to first order from one backward pass per base run,
//!
//!   M(patched) ~ M(base) + sum over the patched activations of (a_source - a_base) dM/da,
//!
//! the gradient taken at the base run (the corrupted run when denoising, the clean run when
//! noising; per noise sample). The patches are exactly those the exact executors apply
//! ([`Setup::patched_pass`]), so an estimate and its exact value differ only by the
//! linearisation.

use anyhow::Result;

use crate::model::checkpoint::Tensor;
use crate::run::attribution::{metric_gradient, Gradients};
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

/// Every patch run's metrics estimated by attribution patching, `rows` passes per call.
pub fn attribution(setup: &Setup, model: &mut Gradients, rows: usize) -> Result<VariantValues> {
    let runs = cached_runs(setup, model, rows)?;
    let (n, samples, n_metrics) = (setup.variant.prompts.len(), setup.samples(), setup.metrics.len());
    // One backward pass per (prompt, sample, metric), seeded with dM/d(logits) at the base run.
    let mut jobs: Vec<(usize, usize, usize)> = vec![];
    for p in 0..n {
        for s in 0..samples {
            jobs.extend((0..n_metrics).map(|m| (p, s, m)));
        }
    }
    // [prompt][sample][metric] -> the gradient at every hook
    let mut gradients: Vec<Vec<Vec<Vec<Tensor>>>> = vec![vec![vec![vec![]; n_metrics]; samples]; n];
    let mut work = Work::default();
    for chunk in jobs.chunks(rows.max(1)) {
        let mut passes = vec![];
        let mut seeds = vec![];
        for &(p, s, m) in chunk {
            let (base, ..) = setup.base_and_source(&runs, p, s);
            let logits = base_logits(&runs, setup, p, s).full().expect("the gradient session unembeds the vocabulary");
            let prompt = &setup.variant.prompts[p];
            let readout = Readout {
                answer: prompt.answer.ids(),
                wrong: prompt.wrong.as_ref().map(|w| w.ids()),
                clean_log_probs: &runs.clean_lp[p],
            };
            seeds.push(metric_gradient(setup.metrics[m].kind, logits, &readout).iter().map(|&x| x as f32).collect());
            work.backward_passes += 1;
            passes.push(base);
        }
        for (&(p, s, m), run) in chunk.iter().zip(model.run(&passes, Some(&seeds))?) {
            gradients[p][s][m] = run.gradients;
        }
    }
    // [run][prompt][sample] -> every metric's estimate
    let mut estimates: Vec<Vec<Vec<Vec<f64>>>> = vec![vec![vec![vec![]; samples]; n]; setup.variant.patches.len()];
    for (run, run_estimates) in setup.variant.patches.iter().zip(estimates.iter_mut()) {
        for (p, prompt_estimates) in run_estimates.iter_mut().enumerate() {
            for (s, values) in prompt_estimates.iter_mut().enumerate() {
                let (base, base_acts, source) = setup.base_and_source(&runs, p, s);
                let base_values = setup.values(base_logits(&runs, setup, p, s), p, &runs.clean_lp[p]);
                let (pass, from) = setup.patched_pass(run, p, &base, base_acts, &source);
                *values = match from {
                    // Nothing changes: the base run's own metrics, as the exact executors give.
                    None => base_values,
                    Some(_) => (0..n_metrics)
                        .map(|m| {
                            let grad = &gradients[p][s][m];
                            let change: f64 = pass
                                .patches
                                .iter()
                                .map(|patch| {
                                    let (a, g) = (&base_acts[patch.hook].data, &grad[patch.hook].data);
                                    patch
                                        .mask
                                        .iter()
                                        .zip(&patch.value)
                                        .zip(a.iter().zip(g))
                                        .filter(|((&on, _), _)| on)
                                        .map(|((_, &v), (&a, &g))| (v as f64 - a as f64) * g as f64)
                                        .sum::<f64>()
                                })
                                .sum();
                            base_values[m] + change
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
