//! Stage 4: execute an experiment's [`Plan`] against its model directory and write the results
//! (spec/language.md says what `run` does).

pub mod engine;
pub mod execute;
pub mod expect;
pub mod graph;
pub mod metrics;
pub mod noise;
pub mod output;
pub mod passes;
pub mod results;
pub mod resume;
pub mod segments;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::bail_fixable;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::ir::experiment::Experiment;
use crate::ir::plan::Plan;
use crate::model::{ModelDir, MANIFEST_FILE};
use crate::plan;
use crate::runtime;
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
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions { executor: Executor::Fast, memory_bytes: 1 << 30, quiet: true }
    }
}

pub struct Outcome {
    pub plan: Plan,
    pub rows: Vec<Row>,
    pub verdicts: Vec<Verdict>,
    pub work: passes::Work,
    pub written: Vec<PathBuf>,
    pub seconds: f64,
}

/// Run a checked experiment: every variant, its rows, the expectations, the output files.
pub fn run(exp: &Experiment, opts: &RunOptions) -> Result<Outcome> {
    let started = Instant::now();
    let plan = plan::plan(exp);
    let dir = ModelDir::open(&exp.model.dir)?;
    let device = exp.model.device;
    // Outputs are checked (and locked) before any compute.
    let _lock = exp.outputs.csv.as_deref().map(output::Lock::take).transpose()?;
    runtime::ensure(false)?;
    // Checkpoints of completed batches, for the fast path writing an output.
    let run_folder = match (&exp.outputs.csv, opts.executor) {
        (Some(csv), Executor::Fast) => {
            let (folder, note) = resume::RunFolder::open(csv, &run_key(&plan, &dir, opts.memory_bytes)?)?;
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
    let mut rows = vec![];
    let mut work = passes::Work::default();
    // One model at a time, rebuilt when a variant patches a different set of hooks (variants
    // of one corruption share theirs); two would hold the weights twice.
    let mut current: Option<(Vec<String>, Model)> = None;
    for (v, variant) in plan.variants.iter().enumerate() {
        progress.set_message(variant.label.clone());
        let hooks = variant.captures.clone();
        if current.as_ref().is_none_or(|(h, _)| *h != hooks) {
            drop(current.take());
            let model = match opts.executor {
                Executor::Fast => Model::Segments(Segments::new(&dir, &hooks, device)?),
                Executor::Reference | Executor::PerComponent => Model::Full(Engine::new(&dir, &hooks, &hooks, device)?),
            };
            current = Some((hooks, model));
        }
        let (_, model) = current.as_mut().expect("a model was just made");
        let values: VariantValues = match model {
            Model::Segments(model) => {
                let setup = Setup::new(variant, &plan.metrics, model.patchable.clone());
                let rows_per_call = rows_per_call(&dir, variant, opts.memory_bytes);
                let mut log = run_folder.as_ref().map(|f| f.variant(v)).transpose()?;
                execute::fast(&setup, model, rows_per_call, log.as_mut(), &|n| progress.inc(n))?
            }
            Model::Full(engine) => {
                let setup = Setup::new(variant, &plan.metrics, engine.patchable.clone());
                match opts.executor {
                    Executor::PerComponent => execute::per_component(&setup, engine, &|n| progress.inc(n))?,
                    _ => execute::reference(&setup, engine)?,
                }
            }
        };
        work += values.work;
        let variant_rows = results::rows(&plan, v, &values);
        check_finite(&plan, &variant_rows)?;
        rows.extend(variant_rows);
    }
    progress.finish_and_clear();
    let verdicts = expect::evaluate(&plan, &exp.expectations, &rows);
    let seconds = started.elapsed().as_secs_f64();

    let mut written = vec![];
    if let Some(path) = &exp.outputs.csv {
        output::write_atomic(path, &output::csv(&plan, &rows)?)?;
        written.push(path.clone());
        let sidecar = path.with_extension("provenance.json");
        output::write_atomic(&sidecar, &provenance(exp, &plan, &dir, work.passes, seconds)?)?;
        written.push(sidecar);
    }
    if let Some(path) = &exp.outputs.per_prompt {
        output::write_atomic(path, &output::per_prompt_csv(&plan, &rows)?)?;
        written.push(path.clone());
    }
    if let Some(folder) = run_folder {
        folder.finish()?;
    }
    Ok(Outcome { plan, rows, verdicts, work, written, seconds })
}

/// What a run's checkpoints depend on: the plan (prompts, corruptions, runs, metrics), the
/// model, the batching, and this patchbay.
fn run_key(plan: &Plan, dir: &ModelDir, memory: u64) -> Result<String> {
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(plan)?);
    hasher.update(sha256_file(&dir.path.join(MANIFEST_FILE))?);
    hasher.update(format!("{memory} {}", env!("CARGO_PKG_VERSION")));
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

fn sha256_file(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(bytes)))
}

fn provenance(exp: &Experiment, plan: &Plan, dir: &ModelDir, passes: u64, seconds: f64) -> Result<Vec<u8>> {
    let rt = runtime::ensure(false)?;
    let seeds: Vec<serde_json::Value> = plan
        .variants
        .iter()
        .map(|v| serde_json::json!({"variant": v.label, "corruption": format!("{:?}", v.corruption_kind)}))
        .collect();
    let json = serde_json::json!({
        "patchbay_version": env!("CARGO_PKG_VERSION"),
        "onnxruntime_version": runtime::version(&rt.library),
        "device": exp.model.device.name(),
        "model": {
            "directory": dir.path.display().to_string(),
            "manifest_sha256": sha256_file(&dir.path.join(MANIFEST_FILE))?,
            "source_sha256": dir.manifest.source.sha256,
        },
        "experiment": {
            "file": exp.source.display().to_string(),
            "sha256": sha256_file(&exp.source)?,
        },
        "corruptions_and_seeds": seeds,
        "counts": {
            "clean_runs": plan.counts.clean_runs,
            "corrupted_runs": plan.counts.corrupted_runs,
            "patched_runs_planned": plan.counts.patched_runs,
            "patched_passes_run": passes,
        },
        // Not part of the results: reruns differ only here.
        "wall_seconds": (seconds * 10.0).round() / 10.0,
    });
    Ok((serde_json::to_string_pretty(&json)? + "\n").into_bytes())
}

/// The terminal summary: per variant the clean and corrupted metric and the top components,
/// then the expectations.
pub fn summary(outcome: &Outcome) -> String {
    use std::fmt::Write as _;
    let plan = &outcome.plan;
    let mut s = String::new();
    let _ = writeln!(s, "{}: {} patched passes in {:.1} s", plan.experiment, outcome.work.passes, outcome.seconds);
    for (v, variant) in plan.variants.iter().enumerate() {
        let _ = writeln!(s, "\n{} ({} prompts)", variant.label, variant.prompts.len());
        for (m, metric) in plan.metrics.iter().enumerate() {
            let rows: Vec<&Row> = outcome.rows.iter().filter(|r| r.variant == v && !r.summation).collect();
            let Some(first) = rows.first() else { continue };
            let c = &first.cells[m];
            let corrupted = c.corrupted.map_or("-".to_string(), |x| format!("{x:.4}"));
            let _ = write!(s, "  {}: clean {:.4}, corrupted {corrupted}; largest |effect|:", metric.name, c.clean);
            // By size: in the noise direction the components that matter most are negative.
            let size = |r: &Row| r.cells[m].value.map_or(-1.0, f64::abs);
            let mut ranked = rows.clone();
            ranked.sort_by(|a, b| size(b).total_cmp(&size(a)));
            for r in ranked.iter().take(3) {
                let value = r.cells[m].value.map_or("-".to_string(), |x| format!("{x:.3}"));
                let _ = write!(s, " {} {} {value},", r.target, r.component);
            }
            s.pop();
            s.push('\n');
        }
    }
    if !outcome.verdicts.is_empty() {
        let _ = writeln!(s, "\nexpectations:");
        for verdict in &outcome.verdicts {
            let _ = writeln!(
                s,
                "  {} line {}: {}",
                if verdict.holds { "holds" } else { "FAILS" },
                verdict.line,
                verdict.text
            );
            for d in &verdict.details {
                let _ = writeln!(s, "      {d}");
            }
        }
    }
    for path in &outcome.written {
        let _ = writeln!(s, "wrote {}", path.display());
    }
    s
}
