//! Path patching (Wang et al. 2022; spec/language.md, "path"): a sender's effect on the metric
//! through a receiver only, every other path frozen.
//!
//! Per (sender, prompt, sample), with the clean and corrupted runs cached:
//! 1. step two: the base run with the sender's activation from the source and every frozen
//!    hook (other heads' outputs, MLP outputs) from the sender's layer to the last receiver's
//!    held at its base value; the receivers' inputs are recorded;
//! 2. step three: the base run with only the receivers' inputs replaced by those recorded
//!    values; its metric is the path effect. For the logits as receiver, step two's own
//!    metric is.
//!
//! [`reference`] runs both steps as full forward passes, one per ONNX Runtime call. [`fast`]
//! batches them on the per-layer segments and starts late: step two at the sender's layer (at
//! the receivers' when heads and MLPs are frozen: [`Linear`]), step three at the receivers',
//! each from its base run's cached residual stream; step three (and step two to the logits)
//! computes only the positions from the first one it changes.

use std::collections::HashMap;

use anyhow::Result;

use crate::ir::experiment::{PathSpec, Receiver};
use crate::ir::plan::PatchRun;
use crate::model::checkpoint::Tensor;
use crate::model::ModelDir;
use crate::run::engine::{Engine, HookPatch, Pass};
use crate::run::execute::{base_index, base_logits, cached_runs, take_base_runs};
use crate::run::passes::{Setup, VariantValues, Work};
use crate::run::segments::{self, Segments};

/// The fast path: every run of `setup`'s variant is a path run; `rows` passes per call. `dir`:
/// the model directory, whose attention output weights make step two linear when heads and
/// MLPs are frozen.
pub fn fast(
    setup: &Setup,
    model: &mut Segments,
    dir: &ModelDir,
    rows: usize,
    progress: &dyn Fn(u64),
) -> Result<VariantValues> {
    let mut linear = Linear { dir, graph: None, w_o: HashMap::new() };
    model.release_bases();
    let mut runs = cached_runs(setup, model, rows)?;
    let bases = take_base_runs(&mut runs, setup, &model.key_value_captures(), model.patchable.len());
    model.keep_bases(bases)?;
    let (n, samples) = (setup.variant.prompts.len(), setup.samples());
    let n_layers = model.len() - 2;
    let mut patched = vec![vec![vec![vec![]; samples]; n]; setup.variant.patches.len()];
    let items: Vec<(usize, usize, usize)> = (0..setup.variant.patches.len())
        .flat_map(|r| (0..n).flat_map(move |p| (0..samples).map(move |s| (r, p, s))))
        .collect();
    let mut work = Work::default();
    for chunk in items.chunks(rows.max(1)) {
        // Step two: from the sender's layer; all positions where receivers are recorded.
        let (mut recording, mut direct) = (vec![], vec![]);
        for &(r, p, s) in chunk {
            let run = &setup.variant.patches[r];
            let (base, base_acts, source) = setup.base_and_source(&runs, p, s);
            let Some(from) = setup.patched_pass(run, p, &base, base_acts, &source).1 else {
                // The sender writes the base run's own values: every path carries nothing.
                patched[r][p][s] = setup.values(base_logits(&runs, setup, p, s), p, &runs.clean_lp[p]);
                continue;
            };
            let pass = step_two(setup, run, p, &base, base_acts, &source, n_layers);
            let index = base_index(&runs, setup, p, s);
            let row = match linear.entry(setup, run, &pass, base_acts, n_layers)? {
                Some((pass, start)) => match first_change(setup, &pass, base_acts) {
                    Some(from) => segment_row(setup, pass, start, from, index),
                    None => {
                        patched[r][p][s] = setup.values(base_logits(&runs, setup, p, s), p, &runs.clean_lp[p]);
                        continue;
                    }
                },
                None => {
                    let start = run.hooks.iter().map(|h| segments::segment_of(h)).min().unwrap_or(0);
                    segment_row(setup, pass, start, from, index)
                }
            };
            match run.path.as_ref().expect("a path run").receiver {
                Receiver::Logits => direct.push(((r, p, s), row)),
                _ => recording.push(((r, p, s), row)),
            }
        }
        for (calls, capture) in [(&direct, false), (&recording, true)] {
            let rows: Vec<segments::Row> = calls.iter().map(|(_, row)| row.clone()).collect();
            let mut receivers = vec![];
            for (((r, p, s), row), out) in calls.iter().zip(model.run(&rows, capture)?) {
                let span = if capture { row.ids.len() } else { model.positions_computed(row.ids.len(), row.from) };
                work += Work::pass((n_layers + 1 - row.start) * span, rows.len());
                if !capture {
                    patched[*r][*p][*s] = setup.values(&out.logits, *p, &runs.clean_lp[*p]);
                    continue;
                }
                // Step three: from the receivers' layer, the positions their inputs change.
                let spec = setup.variant.patches[*r].path.as_ref().expect("a path run");
                let (base, base_acts, _) = setup.base_and_source(&runs, *p, *s);
                let pass = step_three(setup, spec, base, &out.captures, n_layers);
                let hooks = spec.receiver_hooks(n_layers);
                let start = hooks.iter().map(|(h, _)| segments::segment_of(h)).min().unwrap_or(0);
                match first_change(setup, &pass, base_acts) {
                    Some(from) => receivers
                        .push(((*r, *p, *s), segment_row(setup, pass, start, from, row.base.expect("a base run")))),
                    None => {
                        patched[*r][*p][*s] = setup.values(base_logits(&runs, setup, *p, *s), *p, &runs.clean_lp[*p])
                    }
                }
            }
            let rows: Vec<segments::Row> = receivers.iter().map(|(_, row)| row.clone()).collect();
            for (((r, p, s), row), out) in receivers.iter().zip(model.run(&rows, false)?) {
                work += Work::pass(
                    (n_layers + 1 - row.start) * model.positions_computed(row.ids.len(), row.from),
                    rows.len(),
                );
                patched[*r][*p][*s] = setup.values(&out.logits, *p, &runs.clean_lp[*p]);
            }
        }
        progress(passes_of(setup, chunk));
    }
    model.release_bases();
    Ok(setup.collect(&runs, &patched, work))
}

/// The planned passes of `chunk`'s (run, prompt, sample) items: two per path, one to the logits.
fn passes_of(setup: &Setup, chunk: &[(usize, usize, usize)]) -> u64 {
    let spec = |r: usize| setup.variant.patches[r].path.as_ref().expect("a path run");
    chunk.iter().map(|&(r, ..)| if spec(r).receiver == Receiver::Logits { 1 } else { 2 }).sum()
}

/// Step two when heads and MLPs are frozen: every write between sender and receivers is held,
/// so the residual stream reaching the receivers' layer is the base run's plus the sender's
/// output change (a head's: its z change through its rows of W_O; an MLP's: the change itself).
/// The pass enters there instead of at the sender's layer.
struct Linear<'d> {
    dir: &'d ModelDir,
    graph: Option<crate::onnx::proto::ModelProto>,
    /// Per layer, `W_O` as the graph multiplies by it (`[heads * d_head, d_model]`), if the
    /// graph has it.
    w_o: HashMap<usize, Option<Vec<f32>>>,
}

impl Linear<'_> {
    /// `pass` (step two's) entering at the receivers' layer: the entry hook set to the base
    /// run's plus the sender's change, the frozen hooks from there on; and its segment. `None`
    /// where step two is not linear (something unfrozen, or a graph without readable `W_O`).
    fn entry(
        &mut self,
        setup: &Setup,
        run: &PatchRun,
        pass: &Pass,
        base_acts: &[Tensor],
        n_layers: usize,
    ) -> Result<Option<(Pass, usize)>> {
        let spec = run.path.as_ref().expect("a path run");
        let (Some(entry), [sender_hook]) = (spec.entry_hook(n_layers), run.hooks.as_slice()) else { return Ok(None) };
        let sender = setup.hook_index(sender_hook);
        let Some(patch) = pass.patches.iter().find(|x| x.hook == sender) else { return Ok(None) };
        let base = &base_acts[sender];
        // The sender's change, where the pass patches it from the source.
        let change: Vec<f32> = patch
            .value
            .iter()
            .zip(&base.data)
            .zip(&patch.mask)
            .map(|((v, b), &m)| if m { v - b } else { 0.0 })
            .collect();
        let e = setup.hook_index(&entry);
        let d = base_acts[e].shape[1];
        let moved: Vec<f32> = if sender_hook.ends_with("attn.hook_z") {
            let layer = run.layers[0];
            let Some(w) = self.w_o(layer, d)? else { return Ok(None) };
            let width = w.len() / d;
            change
                .chunks(width)
                .flat_map(|z| {
                    let mut out = vec![0f32; d];
                    for (k, &zk) in z.iter().enumerate().filter(|(_, z)| **z != 0.0) {
                        for (o, &wk) in out.iter_mut().zip(&w[k * d..(k + 1) * d]) {
                            *o += zk * wk;
                        }
                    }
                    out
                })
                .collect()
        } else {
            change
        };
        let value: Vec<f32> = base_acts[e].data.iter().zip(&moved).map(|(b, m)| b + m).collect();
        let start = segments::segment_of(&entry);
        let mut patches: Vec<HookPatch> = pass
            .patches
            .iter()
            .filter(|x| x.hook != e && segments::segment_of(&setup.hooks[x.hook].0) >= start)
            .cloned()
            .collect();
        patches.push(HookPatch { hook: e, mask: vec![true; value.len()], value });
        Ok(Some((Pass { ids: pass.ids.clone(), patches }, start)))
    }

    /// Layer `l`'s `W_O` (`[heads * d_head, d]`), read once from the model directory.
    fn w_o(&mut self, l: usize, d: usize) -> Result<Option<&Vec<f32>>> {
        if !self.w_o.contains_key(&l) {
            if self.graph.is_none() {
                self.graph = Some(crate::onnx::surgery::load(&self.dir.path.join(crate::model::ONNX_FILE))?);
            }
            let graph = self.graph.as_ref().expect("loaded above");
            let name = format!("blocks.{l}.attn.W_O");
            let w = crate::onnx::surgery::external_initializer(&self.dir.path, graph, &name)?;
            let w = w.filter(|(shape, _)| shape.len() == 2 && shape[1] == d).map(|(_, data)| data);
            self.w_o.insert(l, w);
        }
        Ok(self.w_o[&l].as_ref())
    }
}

/// A segments row of `pass` entering at segment `start`: its patches from there on (the base
/// run's own earlier patches, noised embeddings, are in the residual stream it left there).
fn segment_row(setup: &Setup, pass: Pass, start: usize, from: usize, base: usize) -> segments::Row {
    let patches = pass.patches.into_iter().filter(|x| segments::segment_of(&setup.hooks[x.hook].0) >= start).collect();
    segments::Row { ids: pass.ids, patches, start, from, base: Some(base) }
}

/// The first position at which `pass` writes a value its base run (`base_acts`) does not have.
fn first_change(setup: &Setup, pass: &Pass, base_acts: &[Tensor]) -> Option<usize> {
    pass.patches
        .iter()
        .filter_map(|x| {
            let (shape, axis) = (&base_acts[x.hook].shape, setup.pos_axis(x.hook));
            let stride: usize = shape[axis + 1..].iter().product();
            let changed = x.mask.iter().zip(x.value.iter().zip(&base_acts[x.hook].data));
            changed
                .enumerate()
                .filter(|(_, (&m, (a, b)))| m && a.to_bits() != b.to_bits())
                .map(|(i, _)| (i / stride) % shape[axis])
                .min()
        })
        .min()
}

/// The reference executor: every run of `setup`'s variant is a path run; `rows` full-graph
/// passes per call.
pub fn reference(setup: &Setup, engine: &mut Engine, rows: usize, progress: &dyn Fn(u64)) -> Result<VariantValues> {
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
        progress(passes_of(setup, chunk));
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
/// frozen hooks of every layer from the sender's to the last receiver's held at `base_acts`.
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
    for l in first..spec.receiver.last_layer(n_layers) {
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
