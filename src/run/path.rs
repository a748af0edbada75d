//! Path patching (Wang et al. 2022; spec/language.md, "path"): a sender's effect on the metric
//! through a receiver only, every other path frozen.
//!
//! Per (sender, prompt, sample), with the clean and corrupted runs cached:
//! 1. step two: the base run with the sender's activation from the source and every frozen
//!    hook (other heads' outputs, MLP outputs) from layer of the sender on held at its base
//!    value; the receivers' inputs are recorded;
//! 2. step three: the base run with only the receivers' inputs replaced by those recorded
//!    values; its metric is the path effect. For the logits as receiver, step two's own
//!    metric is.
//!
//! Both steps are full forward passes, batched `rows` to an ONNX Runtime call (the reference
//! executor: one).

use anyhow::Result;

use crate::ir::experiment::{PathSpec, Receiver};
use crate::ir::plan::PatchRun;
use crate::model::checkpoint::Tensor;
use crate::run::engine::{Engine, HookPatch, Pass};
use crate::run::execute::cached_runs;
use crate::run::passes::{Setup, VariantValues, Work};

/// Every run of `setup`'s variant is a path run.
pub fn run(setup: &Setup, engine: &mut Engine, rows: usize) -> Result<VariantValues> {
    let runs = cached_runs(setup, engine, rows)?;
    let (n, samples) = (setup.variant.prompts.len(), setup.samples());
    let n_layers = engine.n_layers;
    let mut patched = vec![vec![vec![vec![]; samples]; n]; setup.variant.patches.len()];
    let items: Vec<(usize, usize, usize)> = (0..setup.variant.patches.len())
        .flat_map(|r| (0..n).flat_map(move |p| (0..samples).map(move |s| (r, p, s))))
        .collect();
    let mut work = Work::default();
    let spec = |r: usize| setup.variant.patches[r].path.as_ref().expect("a path run");
    for chunk in items.chunks(rows.max(1)) {
        let senders: Vec<Pass> = chunk
            .iter()
            .map(|&(r, p, s)| {
                let (base, base_acts, source) = setup.base_and_source(&runs, p, s);
                step_two(setup, &setup.variant.patches[r], p, &base, base_acts, &source, n_layers)
            })
            .collect();
        let record = chunk.iter().any(|&(r, ..)| spec(r).receiver != Receiver::Logits);
        let mut receivers = vec![];
        for (&(r, p, s), out) in chunk.iter().zip(engine.run(&senders, record)?) {
            let tokens = n_layers * setup.variant.prompts[p].clean_ids.len();
            work += Work::pass(tokens, chunk.len());
            match spec(r).receiver {
                Receiver::Logits => patched[r][p][s] = setup.values(&out.logits, p, &runs.clean_lp[p]),
                _ => {
                    let (base, ..) = setup.base_and_source(&runs, p, s);
                    receivers.push(((r, p, s), step_three(setup, spec(r), base, &out.captures, n_layers)));
                }
            }
        }
        let passes: Vec<Pass> = receivers.iter().map(|(_, pass)| pass.clone()).collect();
        if passes.is_empty() {
            continue;
        }
        for (((r, p, s), _), out) in receivers.iter().zip(engine.run(&passes, false)?) {
            work += Work::pass(n_layers * setup.variant.prompts[*p].clean_ids.len(), passes.len());
            patched[*r][*p][*s] = setup.values(&out.logits, *p, &runs.clean_lp[*p]);
        }
    }
    Ok(setup.collect(&runs, &patched, work))
}

/// Step two of `run` on prompt `p`: the base pass with the sender patched from `source` and the
/// frozen hooks of every layer from the sender's to the receiver's held at `base_acts`.
pub fn step_two(
    setup: &Setup,
    run: &PatchRun,
    p: usize,
    base: &Pass,
    base_acts: &[Tensor],
    source: &[Tensor],
    n_layers: usize,
) -> Pass {
    let spec = run.path.as_ref().expect("a path run");
    let (mut pass, _) = setup.patched_pass(run, p, base, base_acts, source);
    let first = run.layers.iter().min().copied().unwrap_or(0);
    for l in first..spec.receiver.layer(n_layers) {
        for hook in spec.frozen_hooks(l) {
            let h = setup.hook_index(&hook);
            let held = &base_acts[h].data;
            match pass.patches.iter_mut().find(|x| x.hook == h) {
                // The sender's own hook: the sender from the source, the rest held.
                Some(sender) => {
                    for ((v, m), &b) in sender.value.iter_mut().zip(sender.mask.iter_mut()).zip(held) {
                        if !*m {
                            (*v, *m) = (b, true);
                        }
                    }
                }
                None => pass.patches.push(HookPatch { hook: h, value: held.clone(), mask: vec![true; held.len()] }),
            }
        }
    }
    pass
}

/// Step three: the base pass with the receivers' inputs from step two's `recorded` hooks.
fn step_three(setup: &Setup, spec: &PathSpec, mut pass: Pass, recorded: &[Tensor], n_layers: usize) -> Pass {
    for (hook, head) in spec.receiver_hooks(n_layers) {
        let h = setup.hook_index(&hook);
        let values = &recorded[h];
        // Head hooks are [pos, heads, d_head].
        let mask: Vec<bool> = match head {
            None => vec![true; values.data.len()],
            Some(head) => {
                let (heads, d_head) = (values.shape[1], values.shape[2]);
                (0..values.data.len()).map(|i| (i / d_head) % heads == head).collect()
            }
        };
        match pass.patches.iter_mut().find(|x| x.hook == h) {
            Some(existing) => {
                for ((v, m), (&x, &new)) in
                    existing.value.iter_mut().zip(existing.mask.iter_mut()).zip(values.data.iter().zip(&mask))
                {
                    if new {
                        (*v, *m) = (x, true);
                    }
                }
            }
            None => pass.patches.push(HookPatch { hook: h, value: values.data.clone(), mask }),
        }
    }
    pass
}
