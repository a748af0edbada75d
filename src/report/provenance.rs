//! The provenance sidecar beside a run's CSV: what produced the numbers (versions, device, the
//! model and experiment hashes, seeds, counts, wall time).

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::ir::experiment::Experiment;
use crate::run::Outcome;
use crate::runtime;

fn sha256_file(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(bytes)))
}

/// The sidecar JSON of a run's outputs.
pub fn provenance(exp: &Experiment, outcome: &Outcome) -> Result<Vec<u8>> {
    let (plan, dir, passes, seconds) = (&outcome.plan, &outcome.model, outcome.work.passes, outcome.seconds);
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
            "manifest_sha256": dir.manifest_sha256()?,
            "source_sha256": dir.manifest.source.sha256,
        },
        "experiment": {
            "file": exp.source.display().to_string(),
            "sha256": sha256_file(&exp.source)?,
        },
        "inputs": exp
            .inputs
            .iter()
            .map(|path| Ok(serde_json::json!({"file": path.display().to_string(), "sha256": sha256_file(path)?})))
            .collect::<Result<Vec<_>>>()?,
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
