//! Stage 4: execute an experiment's [`Plan`] against its model directory: the rows of every
//! variant and the expectations (spec/language.md says what `run` does; the report stage writes
//! the files).

pub mod attribution;
pub mod cache;
pub mod engine;
pub mod estimate;
pub mod execute;
pub mod expect;
pub mod graph;
pub mod lock;
pub mod metrics;
pub mod noise;
pub mod passes;
pub mod path;
pub mod readout;
pub mod results;
pub mod resume;
pub mod segments;
pub mod shard;
pub mod suffix;

use std::time::Instant;

use anyhow::Result;

use crate::bail_fixable;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::ir::experiment::{Experiment, Method};
use crate::ir::plan::Plan;
use crate::model::ModelDir;
use crate::plan;
use crate::runtime::{self, Device};
use attribution::Gradients;
use engine::Engine;
use expect::Verdict;
use passes::{Setup, VariantValues};
use results::Row;
use segments::Segments;

/// Which executor computes the patched runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executor {
    Fast,
    /// One plain forward pass per (component, prompt, sample): for checking the fast path.
    Reference,
    /// One forward pass of all prompts per component, as peer libraries do: for benchmarks.
    PerComponent,
}

/// The forward pass an executor uses.
enum Model {
    Segments(Segments),
    Full(Engine),
}

pub struct RunOptions {
    pub executor: Executor,
    /// Memory budget for one ONNX Runtime call, in bytes; decides how many passes are batched.
    pub memory_bytes: u64,
    pub quiet: bool,
    /// Compute this shard's part of the patched passes into the run folder, nothing else.
    pub shard: Option<shard::Shard>,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions { executor: Executor::Fast, memory_bytes: 1 << 30, quiet: true, shard: None }
    }
}

/// Which of the fast path's shortcuts a variant's passes took, beyond starting late and skipping
/// no-ops (always on): recorded in the provenance, because a model directory whose graph does not
/// allow one runs without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Shortcuts {
    /// Positions before the first changed one were not recomputed.
    pub suffix_positions: bool,
    /// The last layer's MLP ran at the final position only.
    pub final_position_only: bool,
    /// The logits of this many tokens were computed (`None`: the whole vocabulary's).
    pub tokens_read: Option<usize>,
}

/// A finished run: its results, and, until [`Outcome::complete`], the output lock and the
/// checkpoints of its batches (kept if the outputs are never written, so a rerun resumes).
pub struct Outcome {
    pub plan: Plan,
    pub model: ModelDir,
    pub rows: Vec<Row>,
    pub verdicts: Vec<Verdict>,
    /// Per variant, how the model does the task on the clean prompts.
    pub tasks: Vec<Option<passes::CleanTask>>,
    /// Per variant, the work the fast path left out (`None` from the other executors).
    pub shortcuts: Vec<Option<Shortcuts>>,
    pub work: passes::Work,
    pub seconds: f64,
    /// The shard this run computed (its rows are empty: the merge writes them).
    pub shard: Option<shard::Shard>,
    lock: Option<lock::Lock>,
    run_folder: Option<resume::RunFolder>,
}

impl Outcome {
    /// The outputs are written (or, for a shard, its batches are all checkpointed): drop the
    /// checkpoints (mark the shard done) and release the lock.
    pub fn complete(&mut self) -> Result<()> {
        match (self.run_folder.take(), self.shard) {
            (Some(folder), Some(_)) => folder.finish_shard()?,
            (Some(folder), None) => folder.finish()?,
            (None, _) => {}
        }
        drop(self.lock.take());
        Ok(())
    }
}

/// Run a checked experiment: every variant, its rows and the expectations. The output files are
/// the report stage's (`report::run_and_write`).
pub fn run(exp: &Experiment, opts: &RunOptions) -> Result<Outcome> {
    let started = Instant::now();
    let plan = plan::plan(exp);
    let dir = ModelDir::open(&exp.model.dir)?;
    let device = exp.model.device;
    // Outputs are checked (and locked) before any compute.
    for path in exp.outputs.files() {
        lock::check_output(&path)?;
    }
    if let Some(s) = opts.shard {
        if exp.outputs.csv.is_none() || opts.executor != Executor::Fast {
            bail_fixable!(
                "--shard {s}: only a fast-path run with an `output` CSV can be sharded (its run folder, beside the output, collects the shards)";
                help: "add `output \"results/name.csv\"` to the experiment, and leave out --reference"
            );
        }
    }
    // Shards run side by side (each under its own lock); the merge holds the output's.
    let lock = match opts.shard {
        None => exp.outputs.csv.as_deref().map(lock::Lock::take).transpose()?,
        Some(_) => None,
    };
    runtime::ensure(false)?;
    // Checkpoints of completed batches, for the fast path writing an output.
    let run_folder = match (&exp.outputs.csv, opts.executor) {
        (Some(csv), Executor::Fast) => {
            let key = run_key(&plan, &dir, opts.memory_bytes, device)?;
            let (folder, note) = resume::RunFolder::open(csv, &key, opts.shard)?;
            if let Some(note) = note {
                eprintln!("note: {note}");
            }
            Some(folder)
        }
        _ => None,
    };

    let total: u64 = plan.variants.iter().map(|v| v.counts.patched_runs).sum();
    let progress = if opts.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    progress.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} patched passes ({eta} left)")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let (mut rows, mut tasks, mut shortcuts) = (vec![], vec![], vec![]);
    let mut work = passes::Work::default();
    // One model at a time, rebuilt when a variant patches a different set of hooks (variants
    // of one corruption share theirs); two would hold the weights twice.
    let mut current: Option<(Vec<String>, Model)> = None;
    for (v, full_variant) in plan.variants.iter().enumerate() {
        progress.set_message(full_variant.label.clone());
        let hooks = full_variant.captures.clone();
        // Estimated targets first (their `verify top k` picks runs to patch exactly), then
        // every run patched exactly.
        let estimated: Vec<usize> =
            (0..full_variant.patches.len()).filter(|&r| full_variant.patches[r].method.is_estimate()).collect();
        let estimates = match estimated.is_empty() {
            true => None,
            false => {
                drop(current.take());
                let star: Vec<&crate::ir::plan::PatchRun> = estimated
                    .iter()
                    .map(|&r| &full_variant.patches[r])
                    .filter(|run| run.method == Method::AtpStar)
                    .collect();
                let mut captured = hooks.clone();
                for extra in estimate::qk_fix_hooks(&star) {
                    if !captured.contains(&extra) {
                        captured.push(extra);
                    }
                }
                let sub = subset(full_variant, &estimated);
                let rows = rows_per_backward(&dir, full_variant, opts.memory_bytes);
                let runs = estimate::session_runs(&sub, &plan.metrics, dir.manifest.config.n_layers, rows);
                let mut model = Gradients::new(&dir, &hooks, &captured, !star.is_empty(), runs, device)?;
                let setup = Setup::new(&sub, &plan.metrics, model.hooks.clone());
                Some(estimate::attribution(&setup, &mut model, rows)?)
            }
        };
        let verified = estimates.as_ref().map_or(vec![], |e| verify_top(full_variant, &estimated, e));
        let exact: Vec<usize> = (0..full_variant.patches.len())
            .filter(|r| full_variant.patches[*r].method == Method::Exact || verified.contains(r))
            .collect();
        // Path runs (spec/language.md, "path"); not split into shards: the merge computes them.
        let path_runs: Vec<usize> =
            (0..full_variant.patches.len()).filter(|&r| full_variant.patches[r].method == Method::Path).collect();
        let paths = match path_runs.is_empty() || opts.shard.is_some() {
            true => None,
            false => {
                drop(current.take());
                let sub = subset(full_variant, &path_runs);
                let step = |n| progress.inc(n);
                let values = match opts.executor {
                    Executor::Fast => {
                        let mut model = Segments::new(&dir, &hooks, device, tokens_read(&plan).as_deref())?;
                        let setup = Setup::new(&sub, &plan.metrics, model.patchable.clone());
                        let fits = rows_per_path_call(&dir, &sub, opts.memory_bytes);
                        let rows = plan.batch_size.map_or(fits, |cap| fits.min(cap));
                        path::fast(&setup, &mut model, &dir, rows, &step)?
                    }
                    _ => {
                        let mut engine = Engine::new(&dir, &hooks, &hooks, graph::Unembed::LastPosition, device)?;
                        let setup = Setup::new(&sub, &plan.metrics, engine.patchable.clone());
                        path::reference(&setup, &mut engine, 1, &step)?
                    }
                };
                Some((path_runs, values))
            }
        };
        let estimates = estimates.map(|e| (estimated.clone(), e));
        if opts.shard.is_some() && exact.is_empty() {
            // A shard computes exact batches only; the merge makes every row.
            continue;
        }
        if exact.is_empty() {
            shortcuts.push(None);
            let values = merge(full_variant, None, estimates, paths);
            work += values.work;
            tasks.push(values.task.clone());
            let variant_rows = results::rows(&plan, v, &values);
            check_finite(&plan, &variant_rows)?;
            rows.extend(variant_rows);
            continue;
        }
        let exact_variant = subset(full_variant, &exact);
        let variant = &exact_variant;
        if current.as_ref().is_none_or(|(h, _)| *h != hooks) {
            drop(current.take());
            let model = match opts.executor {
                Executor::Fast => Model::Segments(Segments::new(&dir, &hooks, device, tokens_read(&plan).as_deref())?),
                Executor::Reference => {
                    Model::Full(Engine::new(&dir, &hooks, &hooks, graph::Unembed::LastPosition, device)?)
                }
                // Peers' forward passes compute the logits of every position.
                Executor::PerComponent => {
                    Model::Full(Engine::new(&dir, &hooks, &hooks, graph::Unembed::EveryPosition, device)?)
                }
            };
            current = Some((hooks, model));
        }
        let (_, model) = current.as_mut().expect("a model was just made");
        let values: VariantValues = match model {
            Model::Segments(model) => {
                shortcuts.push(Some(Shortcuts {
                    suffix_positions: model.suffix,
                    final_position_only: model.final_position_only(),
                    tokens_read: model.tokens_read().map(<[u32]>::len),
                }));
                let setup = Setup::new(variant, &plan.metrics, model.patchable.clone());
                let fits = rows_per_call(&dir, variant, opts.memory_bytes);
                let rows_per_call = plan.batch_size.map_or(fits, |cap| fits.min(cap));
                let mut log =
                    run_folder.as_ref().map(|f| f.variant(v, plan.variants.len(), exact.clone())).transpose()?;
                match execute::fast(&setup, model, rows_per_call, log.as_mut(), &|n| progress.inc(n))? {
                    // A shard's part is in its log; the merge makes the rows.
                    execute::Fast::ShardPart(part) => {
                        work += part;
                        continue;
                    }
                    execute::Fast::Values(values) if opts.shard.is_some() => {
                        work += values.work;
                        continue;
                    }
                    execute::Fast::Values(values) => values,
                }
            }
            Model::Full(engine) => {
                shortcuts.push(None);
                let setup = Setup::new(variant, &plan.metrics, engine.patchable.clone());
                match opts.executor {
                    Executor::PerComponent => execute::per_component(&setup, engine, &|n| progress.inc(n))?,
                    _ => execute::reference(&setup, engine)?,
                }
            }
        };
        let values = merge(full_variant, Some((exact, values)), estimates, paths);
        work += values.work;
        tasks.push(values.task.clone());
        let variant_rows = results::rows(&plan, v, &values);
        check_finite(&plan, &variant_rows)?;
        rows.extend(variant_rows);
    }
    progress.finish_and_clear();
    if opts.shard.is_some() {
        rows.clear();
    }
    let verdicts = match opts.shard {
        None => expect::evaluate(&plan, &exp.expectations, &rows),
        Some(_) => vec![],
    };
    let seconds = started.elapsed().as_secs_f64();
    let shard = opts.shard;
    Ok(Outcome { plan, model: dir, rows, verdicts, tasks, shortcuts, work, seconds, shard, lock, run_folder })
}

/// Every token whose logit a metric of `plan` reads, when the metrics read nothing else (logit
/// differences: the answers and wrong answers); `None` when a metric needs the vocabulary.
fn tokens_read(plan: &Plan) -> Option<Vec<u32>> {
    if plan.metrics.iter().any(|m| m.kind.reads_vocabulary()) {
        return None;
    }
    let prompts = plan.variants.iter().flat_map(|v| &v.prompts);
    Some(prompts.flat_map(|p| p.answer.ids().into_iter().chain(p.wrong.iter().flat_map(|w| w.ids()))).collect())
}

/// How the fast path orders passes into numbered batches, and how checkpoints name them (by
/// number, their runs by the variant's numbering): a change must start runs afresh.
const BATCH_ORDER: u32 = 3;

/// What a run's checkpoints depend on: the plan (prompts, corruptions, runs, metrics), the
/// model, the device, the batching, and this patchbay.
fn run_key(plan: &Plan, dir: &ModelDir, memory: u64, device: Device) -> Result<String> {
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(plan)?);
    hasher.update(dir.manifest_sha256()?);
    hasher.update(format!("{memory} {} {BATCH_ORDER} {}", env!("CARGO_PKG_VERSION"), device.name()));
    Ok(format!("{:x}", hasher.finalize()))
}

/// Passes per ONNX Runtime call within the memory budget: a pass holds a few layers' worth of
/// activations at once (ONNX Runtime frees intermediates), the attention scores, and the patch
/// inputs of the hooks it overwrites.
fn rows_per_call(dir: &ModelDir, variant: &plan::Variant, budget: u64) -> usize {
    let c = &dir.manifest.config;
    let len = variant.prompts.iter().map(|p| p.clean_ids.len()).max().unwrap_or(1) as u64;
    let per_position =
        (8 * c.d_model + 4 * c.d_mlp + 3 * c.n_heads * len as usize + c.vocab_size / len as usize) as u64;
    let per_row = 4 * len * per_position * 2;
    (budget / per_row.max(1)).clamp(1, 1024) as usize
}

/// Path passes per call: a full-graph pass (as [`rows_per_call`]) that also carries every
/// captured hook three times (its patch value and mask, built here and copied for ONNX Runtime,
/// and its captured value coming back).
fn rows_per_path_call(dir: &ModelDir, variant: &plan::Variant, budget: u64) -> usize {
    let len = variant.prompts.iter().map(|p| p.clean_ids.len()).max().unwrap_or(1);
    let hook_values: usize = variant
        .captures
        .iter()
        .filter_map(|h| dir.manifest.hooks.get(h))
        .map(|hook| {
            let fixed = |d: &crate::model::Dim| match d {
                crate::model::Dim::Fixed(k) => *k,
                crate::model::Dim::Symbolic(s) if s == "batch" => 1,
                crate::model::Dim::Symbolic(_) => len,
            };
            hook.shape.iter().map(fixed).product::<usize>()
        })
        .sum();
    let per_row = (budget / rows_per_call(dir, variant, budget).max(1) as u64) + 3 * 5 * hook_values as u64;
    (budget / per_row.max(1)).clamp(1, 1024) as usize
}

/// `variant` with only the patch runs `runs`.
fn subset(variant: &plan::Variant, runs: &[usize]) -> plan::Variant {
    plan::Variant { patches: runs.iter().map(|&r| variant.patches[r].clone()).collect(), ..variant.clone() }
}

/// The estimated runs (`estimated`, indices into `variant`'s runs) each target's `verify top k`
/// patches exactly: its k components of largest |estimated effect| on the first metric.
fn verify_top(variant: &plan::Variant, estimated: &[usize], values: &VariantValues) -> Vec<usize> {
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len().max(1) as f64;
    let base = mean(&values.base(variant.direction)[0]);
    let mut picked = vec![];
    let mut targets: Vec<&str> = estimated.iter().map(|&r| variant.patches[r].target.as_str()).collect();
    targets.dedup();
    for target in targets {
        let mut runs: Vec<(usize, f64)> = estimated
            .iter()
            .enumerate()
            .filter(|(_, &r)| variant.patches[r].target == target && !variant.patches[r].baseline_only)
            .map(|(i, &r)| (r, (mean(&values.patched[i][0]) - base).abs()))
            .collect();
        let k = runs.first().and_then(|&(r, _)| variant.patches[r].verify).unwrap_or(0);
        runs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        picked.extend(runs.iter().take(k).map(|&(r, _)| r));
    }
    picked.sort_unstable();
    picked
}

/// One variant's values from the exactly patched runs and the estimated ones (indices into the
/// variant's runs, with the values computed on that subset).
///
/// An estimate is its base run's metric plus a first-order change. With exact or path runs,
/// the rows report those runs' clean and corrupted metrics, so each estimate's change is
/// carried onto them: a patch that changes nothing is 0 whichever session computed the base.
fn merge(
    variant: &plan::Variant,
    exact: Option<(Vec<usize>, VariantValues)>,
    estimated: Option<(Vec<usize>, VariantValues)>,
    paths: Option<(Vec<usize>, VariantValues)>,
) -> VariantValues {
    let n_runs = variant.patches.len();
    let base = exact.as_ref().or(paths.as_ref()).or(estimated.as_ref()).map(|(_, v)| v);
    let base = base.expect("a variant measures some runs");
    let mut merged = VariantValues {
        patched: vec![vec![]; n_runs],
        exact: vec![false; n_runs],
        estimates: vec![None; n_runs],
        work: passes::Work::default(),
        ..base.clone()
    };
    if let Some((runs, values)) = &estimated {
        // [metric][prompt]: the base runs' metrics behind the estimates, and the rows'.
        let rebase = (exact.is_some() || paths.is_some())
            .then(|| (values.base(variant.direction).to_vec(), merged.base(variant.direction).to_vec()));
        for (i, &r) in runs.iter().enumerate() {
            let mut patched = values.patched[i].clone();
            if let Some((own, reported)) = &rebase {
                for (m, prompts) in patched.iter_mut().enumerate() {
                    for (p, value) in prompts.iter_mut().enumerate() {
                        *value = reported[m][p] + (*value - own[m][p]);
                    }
                }
            }
            merged.estimates[r] = Some(patched.clone());
            merged.patched[r] = patched;
        }
        merged.work += values.work;
    }
    if let Some((runs, values)) = &exact {
        for (i, &r) in runs.iter().enumerate() {
            merged.patched[r] = values.patched[i].clone();
            merged.exact[r] = true;
        }
        merged.work += values.work;
    }
    if let Some((runs, values)) = &paths {
        for (i, &r) in runs.iter().enumerate() {
            merged.patched[r] = values.patched[i].clone();
        }
        merged.work += values.work;
    }
    merged
}

/// Passes per forward and backward call within the memory budget: the backward pass reads every
/// layer's activations, so a pass holds all of them at once, and the vocabulary's logits and
/// their gradient.
fn rows_per_backward(dir: &ModelDir, variant: &plan::Variant, budget: u64) -> usize {
    let c = &dir.manifest.config;
    let len = variant.prompts.iter().map(|p| p.clean_ids.len()).max().unwrap_or(1);
    let per_layer = len * (16 * c.d_model + 8 * c.d_mlp + 4 * c.n_heads * len);
    let per_row = 4 * (c.n_layers * per_layer + 2 * c.vocab_size) as u64;
    (budget / per_row.max(1)).clamp(1, 1024) as usize
}

/// A NaN or infinite value is an error naming where it arose, never a number in the CSV.
fn check_finite(plan: &Plan, rows: &[Row]) -> Result<()> {
    let bad: Vec<String> =
        rows.iter()
            .flat_map(|r| {
                r.cells.iter().zip(&plan.metrics).filter_map(move |(c, m)| {
                    let values = [c.value, Some(c.effect), c.patched, Some(c.clean), c.corrupted];
                    values.iter().flatten().any(|x| !x.is_finite()).then(|| {
                        format!("{} {} {} ({})", plan.variants[r.variant].label, r.target, r.component, m.name)
                    })
                })
            })
            .collect();
    if !bad.is_empty() {
        bail_fixable!(
            "{} result(s) are NaN or infinite, e.g. {}",
            bad.len(),
            bad.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
            help: "a metric overflowed or its normalisation divided by zero (clean and corrupted metrics equal, or \
                   a huge noise scale); nothing was written"
        );
    }
    Ok(())
}
