//! Stage 5: a run's results written for people and programs: the CSV (one row per variant and
//! component), the per-prompt CSV, the provenance sidecar, the report (HTML or Markdown, see
//! [`page`]), and the terminal summary. Every file is written to a temporary file in its folder
//! and renamed into place, so a crash never leaves a truncated result.

pub mod agreement;
pub mod csv;
pub mod page;
pub mod provenance;
pub mod summary;

use std::path::PathBuf;

use anyhow::Result;

use crate::files;
use crate::ir::experiment::Experiment;
use crate::run::{self, Outcome, RunOptions};

/// A run whose outputs are written.
pub struct Report {
    pub outcome: Outcome,
    pub written: Vec<PathBuf>,
}

/// `patchbay run` for one checked experiment: run it, write its outputs, then drop the run's
/// checkpoints (kept until the outputs are safely written, so an interrupted run resumes).
pub fn run_and_write(exp: &Experiment, opts: &RunOptions) -> Result<Report> {
    // A report that could not be written is refused before the run, not after it.
    if let Some(path) = &exp.outputs.report {
        page::kind_of(path)?;
        page::ensure_replaceable(path, false)?;
    }
    let mut outcome = run::run(exp, opts)?;
    // A shard's part is in the run folder; the merge writes the outputs.
    let written = match opts.shard {
        None => write(exp, &outcome)?,
        Some(_) => vec![],
    };
    outcome.complete()?;
    Ok(Report { outcome, written })
}

/// Write the outputs the experiment names; the paths written, in order.
fn write(exp: &Experiment, outcome: &Outcome) -> Result<Vec<PathBuf>> {
    let mut written = vec![];
    let table = csv::csv(&outcome.plan, &outcome.rows)?;
    let sidecar_bytes = provenance::provenance(exp, outcome)?;
    if let (Some(path), Some(sidecar)) = (&exp.outputs.csv, exp.outputs.provenance()) {
        files::write_atomic(path, &table)?;
        written.push(path.clone());
        files::write_atomic(&sidecar, &sidecar_bytes)?;
        written.push(sidecar);
    }
    if let Some(path) = &exp.outputs.per_prompt {
        files::write_atomic(path, &csv::per_prompt_csv(&outcome.plan, &outcome.rows)?)?;
        written.push(path.clone());
    }
    if let Some(path) = &exp.outputs.report {
        // Rendered from the bytes just written, as `patchbay report` would from the files.
        let name = exp.outputs.csv.as_ref().unwrap_or(path).display().to_string();
        let files = page::render((&table, &name), Some((&sidecar_bytes, "the provenance sidecar")), path)?;
        page::write(&files, false)?;
        written.push(path.clone());
    }
    Ok(written)
}
