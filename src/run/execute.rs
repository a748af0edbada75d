//! Executing one variant: the clean, corrupted and patched runs, and each run's metrics.
//!
//! Two executors compute the same numbers:
//! - [`fast`]: clean and corrupted runs once per prompt (and noise sample), their activations
//!   cached; patched runs batched many (prompt, component) pairs per ONNX Runtime call; a
//!   patch that writes exactly the base run's own values is not run (its result is the base).
//! - [`reference`]: written for clarity, to check the fast path: for every (component, prompt,
//!   sample) it recomputes the source and base runs and does one plain patched forward pass.
//!
//! [`per_component`] runs as peer libraries do (one pass of all prompts per component), for
//! benchmarks.

use std::sync::Arc;

use anyhow::Result;

use crate::bail_fixable;
use crate::ir::experiment::{CorruptedPrompt, Direction};
use crate::model::checkpoint::Tensor;
use crate::model::EMBED_HOOK;
use crate::run::cache::BaseRun;
use crate::run::engine::{Engine, HookPatch, Output, Pass};
use crate::run::metrics;
use crate::run::passes::{RunKey, Runs, Setup, VariantValues, Work};
use crate::run::readout::Logits;
use crate::run::resume::VariantLog;
use crate::run::segments::{self, Segments};

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
            .map(|p| segments::Row { ids: p.ids.clone(), patches: p.patches.clone(), start: 0, from: 0, base: None })
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
pub(crate) fn cached_runs(setup: &Setup, model: &mut dyn Forward, rows: usize) -> Result<Runs> {
    cached_runs_by(setup, |_, passes| run_chunked(model, passes, rows, true))
}

/// [`cached_runs`], each batch of passes (clean runs, then corrupted runs) computed by `run`,
/// which is told which run each pass is and returns their outputs with captures.
pub(crate) fn cached_runs_by(
    setup: &Setup,
    mut run: impl FnMut(&[RunKey], &[Pass]) -> Result<Vec<Output>>,
) -> Result<Runs> {
    let n = setup.variant.prompts.len();
    let clean: Vec<Pass> = (0..n).map(|p| setup.clean_pass(p)).collect();
    let clean_keys: Vec<RunKey> = (0..n).map(|prompt| RunKey { prompt, sample: None }).collect();
    let (mut clean_logits, mut clean_acts, mut clean_bounds) = (vec![], vec![], vec![]);
    for out in run(&clean_keys, &clean)? {
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
    let keys: Vec<RunKey> = (corrupted_passes.iter().enumerate())
        .flat_map(|(prompt, passes)| (0..passes.len()).map(move |s| RunKey { prompt, sample: Some(s) }))
        .collect();
    let mut results = run(&keys, &flat)?.into_iter();
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
    // log P_clean, for `kl` (whose runs unembed the whole vocabulary).
    let needs_log_probs = setup.needs_log_probs();
    let clean_lp = clean_logits
        .iter()
        .map(|l: &Logits| match (needs_log_probs, l.full()) {
            (true, Some(full)) => metrics::log_probs(full),
            _ => vec![],
        })
        .collect();
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
/// `log`: where completed batches are checkpointed, and earlier runs' batches read back; for a
/// shard, which batches are its own.
pub fn fast(
    setup: &Setup,
    model: &mut Segments,
    rows: usize,
    mut log: Option<&mut VariantLog>,
    progress: &dyn Fn(u64),
) -> Result<Fast> {
    model.release_bases();
    let mut runs = cached_runs(setup, model, rows)?;
    // Patched passes read the base runs' residual streams, keys and values from the cache.
    let bases = take_base_runs(&mut runs, setup, &model.key_value_captures(), model.patchable.len());
    model.keep_bases(bases)?;
    let (n, samples) = (setup.variant.prompts.len(), setup.samples());
    // [run][prompt][sample] -> metric values (logits are read and dropped: a sweep's logits
    // would not fit in memory)
    let mut patched: Vec<Vec<Vec<Vec<f64>>>> = vec![vec![vec![vec![]; samples]; n]; setup.variant.patches.len()];
    // Every pass that changes something, with where it enters and how many positions it
    // computes. No-ops are settled here: their result is the base run's.
    let mut items: Vec<Item> = vec![];
    for (r, (run, run_values)) in setup.variant.patches.iter().zip(patched.iter_mut()).enumerate() {
        // Start late: nothing before the first patched layer changes.
        let start = run.hooks.iter().map(|h| segments::segment_of(h)).min().unwrap_or(0);
        for (p, prompt_values) in run_values.iter_mut().enumerate() {
            for (s, values) in prompt_values.iter_mut().enumerate() {
                let (base, base_acts, source) = setup.base_and_source(&runs, p, s);
                match setup.patched_pass(run, p, &base, base_acts, &source).1 {
                    Some(from) => {
                        let span = model.positions_computed(base.ids.len(), from);
                        items.push(Item { run: r, prompt: p, sample: s, start, span });
                    }
                    None => {
                        *values = setup.values(base_logits(&runs, setup, p, s), p, &runs.clean_lp[p]);
                        progress(1);
                    }
                }
            }
        }
    }
    // A call computes its longest pass's positions for every pass in it: passes of one span
    // are batched together, and within a span by start, so passes join as the call reaches them.
    items.sort_by_key(|i| (i.span, i.start));
    // Segments: the embedding, one per layer, the unembedding.
    let n_layers = model.len() - 2;
    let mut work = Work::default();
    // Batches are numbered in this fixed order, the key of their checkpoints.
    let chunks: Vec<&[Item]> = items.chunks(rows.max(1)).collect();
    // A pass costs about its layers times the positions it computes.
    let layers_of = |item: &Item| n_layers - item.start.saturating_sub(1);
    let costs: Vec<u64> = chunks.iter().map(|c| c.iter().map(|i| (layers_of(i) * i.span) as u64).sum()).collect();
    let mine = match log.as_mut() {
        Some(log) => log.mine(&costs)?,
        None => vec![true; chunks.len()],
    };
    for (number, chunk) in chunks.iter().enumerate() {
        let (batch, cost) = (number as u64, costs[number]);
        if !mine[number] {
            continue;
        }
        // A checkpoint counts only if it holds exactly this batch's passes (a batch's passes
        // depend on bit-exact comparisons of activations, which another machine may not repeat).
        let restored = log.as_mut().and_then(|l| l.completed(batch)).filter(|entries| {
            entries.len() == chunk.len()
                && entries.iter().zip(chunk.iter()).all(|(e, i)| (e.0, e.1, e.2) == (i.run, i.prompt, i.sample))
        });
        if let Some(entries) = restored {
            if let Some(log) = log.as_mut() {
                log.record(batch, cost, &[], true)?;
            }
            for (r, p, s, values) in entries {
                patched[r][p][s] = values;
            }
            // The work behind the results, wherever it was done.
            for item in chunk.iter() {
                work += Work::restored(layers_of(item) * item.span, chunk.len());
            }
            progress(chunk.len() as u64);
            continue;
        }
        if log.as_ref().is_some_and(|l| l.merging()) {
            bail_fixable!(
                "no shard's log holds batch {batch} of variant `{}` as this machine forms it: the shards ran a different set of passes", setup.variant.label;
                help: "run the shards and the merge with the same patchbay build on the same kind of machine (a batch's passes depend on bit-exact comparisons of activations); delete the run folder to start afresh"
            );
        }
        let batch_rows: Vec<segments::Row> = chunk.iter().map(|item| patched_row(setup, &runs, item)).collect();
        let mut entries = Vec::with_capacity(chunk.len());
        for (item, out) in chunk.iter().zip(model.run(&batch_rows, false)?) {
            let values = setup.values(&out.logits, item.prompt, &runs.clean_lp[item.prompt]);
            patched[item.run][item.prompt][item.sample] = values.clone();
            entries.push((item.run, item.prompt, item.sample, values));
        }
        if let Some(log) = log.as_mut() {
            log.record(batch, cost, &entries, false)?;
        }
        for item in chunk.iter() {
            work += Work::pass(layers_of(item) * item.span, chunk.len());
        }
        progress(chunk.len() as u64);
    }
    if mine.iter().any(|m| !m) {
        // A shard's part: the other batches are other shards' (and the merge's) to collect.
        return Ok(Fast::ShardPart(work));
    }
    Ok(Fast::Values(setup.collect(&runs, &patched, work)))
}

/// What the fast executor computed of a variant.
pub enum Fast {
    Values(VariantValues),
    /// A shard's part, checkpointed in its log: the merge makes the values.
    ShardPart(Work),
}

/// The segments' row of a queued pass: its patches from its start segment on, and the base
/// run's residual stream there and keys and values.
fn patched_row(setup: &Setup, runs: &Runs, item: &Item) -> segments::Row {
    let (r, p, s, start) = (item.run, item.prompt, item.sample, item.start);
    let (base, base_acts, source) = setup.base_and_source(runs, p, s);
    let (pass, from) = setup.patched_pass(&setup.variant.patches[r], p, &base, base_acts, &source);
    // The base run's own patches before `start` (noised embeddings) are already in the
    // residual stream it left at `start`.
    let patches: Vec<HookPatch> =
        pass.patches.into_iter().filter(|x| segments::segment_of(&setup.hooks[x.hook].0) >= start).collect();
    segments::Row {
        ids: pass.ids,
        patches,
        start,
        from: from.expect("only passes that change something are queued"),
        base: Some(base_index(runs, setup, p, s)),
    }
}

/// A patched pass to run: (patch run, prompt, sample), the segment it enters at, and the
/// positions it computes.
struct Item {
    run: usize,
    prompt: usize,
    sample: usize,
    start: usize,
    span: usize,
}

/// Whether patched passes start from the corrupted runs (denoising a corruption), not the clean.
fn from_corrupted(runs: &Runs, setup: &Setup) -> bool {
    setup.variant.direction == Direction::Denoise && !runs.corrupted_logits.is_empty()
}

/// The runs patched passes start from, taken out of `runs`: per prompt, its corrupted runs (one
/// per sample) or its clean run, [`base_index`] numbering them. Their residual streams, and
/// keys and values (`key_values`: capture indices per layer) that are not patchable hooks, leave
/// `runs`; every run keeps its first `n_patchable` captures, the hooks patches read.
pub(crate) fn take_base_runs(
    runs: &mut Runs,
    setup: &Setup,
    key_values: &[[usize; 2]],
    n_patchable: usize,
) -> Vec<BaseRun> {
    let corrupted = from_corrupted(runs, setup);
    let bounds: Vec<Vec<Arc<Tensor>>> = match corrupted {
        true => std::mem::take(&mut runs.corrupted_bounds).into_iter().flatten().collect(),
        false => std::mem::take(&mut runs.clean_bounds),
    };
    runs.clean_bounds.clear();
    runs.corrupted_bounds.clear();
    let acts: Vec<&mut Arc<Vec<Tensor>>> = match corrupted {
        true => runs.corrupted_acts.iter_mut().flatten().collect(),
        false => runs.clean_acts.iter_mut().collect(),
    };
    let take = |acts: &mut Arc<Vec<Tensor>>, i: usize| match (i >= n_patchable, Arc::get_mut(acts)) {
        (true, Some(acts)) => std::mem::replace(&mut acts[i], Tensor::new(vec![0], vec![])),
        _ => acts[i].clone(),
    };
    let bases = bounds
        .into_iter()
        .zip(acts)
        .map(|(boundaries, acts)| BaseRun {
            boundaries,
            keys_values: key_values.iter().map(|&[k, v]| [take(acts, k), take(acts, v)]).collect(),
        })
        .collect();
    for acts in runs.clean_acts.iter_mut().chain(runs.corrupted_acts.iter_mut().flatten()) {
        if let Some(acts) = Arc::get_mut(acts) {
            acts.truncate(n_patchable);
        }
    }
    bases
}

/// The index of prompt `p`'s base run for sample `s` among [`base_runs`].
pub(crate) fn base_index(runs: &Runs, setup: &Setup, p: usize, s: usize) -> usize {
    match from_corrupted(runs, setup) {
        true => p * setup.samples() + s,
        false => p,
    }
}

/// The logits of the base run of prompt `p`, sample `s`.
pub(crate) fn base_logits<'r>(runs: &'r Runs, setup: &Setup, p: usize, s: usize) -> &'r Logits {
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
            work += Work::pass(engine.n_layers * pass.ids.len(), passes.len());
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
                    clean_logits: vec![Logits::default(); n],
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
                work += Work::pass(engine.n_layers * setup.variant.prompts[p].clean_ids.len(), 1);
            }
        }
    }
    Ok(setup.collect(&dataset, &patched, work))
}
