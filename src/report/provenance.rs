//! The provenance sidecar beside a run's CSV: what produced the numbers (versions, device, the
//! model and experiment hashes, seeds, counts, wall time), and what the report needs beyond the
//! CSV: the token text at each patched position and the expectations' verdicts.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::ir::experiment::{position_label, Experiment};
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
        "positions": positions(outcome)?,
        "fast_path_shortcuts": plan
            .variants
            .iter()
            .zip(&outcome.shortcuts)
            .map(|(v, s)| serde_json::json!({"variant": v.label, "shortcuts": s}))
            .collect::<Vec<_>>(),
        "clean_task": plan
            .variants
            .iter()
            .zip(&outcome.tasks)
            .map(|(v, task)| serde_json::json!({"variant": v.label, "task": task}))
            .collect::<Vec<_>>(),
        "attribution_agreement": crate::report::agreement::agreements(plan, &outcome.rows),
        "expectations": outcome
            .verdicts
            .iter()
            .map(|v| serde_json::json!({"line": v.line, "text": v.text, "holds": v.holds, "details": v.details}))
            .collect::<Vec<_>>(),
        "counts": {
            "clean_runs": plan.counts.clean_runs,
            "corrupted_runs": plan.counts.corrupted_runs,
            "patched_runs_planned": plan.counts.patched_runs,
            "estimated_runs_planned": plan.counts.estimated_runs,
            "patched_passes_run": passes,
            "backward_passes_run": outcome.work.backward_passes,
        },
        // Not part of the results: reruns (resumed, merged from shards) differ only here.
        "wall_seconds": (seconds * 10.0).round() / 10.0,
        "patched_passes_restored": outcome.work.restored_passes,
    });
    Ok((serde_json::to_string_pretty(&json)? + "\n").into_bytes())
}

/// Per variant, each patched position's label, its token index in the first prompt and that
/// token's text, so the report can label heat-map rows with tokens (the CSV has labels only).
fn positions(outcome: &Outcome) -> Result<serde_json::Value> {
    let tokenizer = outcome.model.tokenizer()?;
    let text = |id: u32| match tokenizer.decode(&[id], false) {
        Ok(s) if !s.is_empty() => s,
        _ => tokenizer.id_to_token(id).unwrap_or_default(),
    };
    let mut per_variant = serde_json::Map::new();
    for variant in &outcome.plan.variants {
        let Some(first) = variant.prompts.first() else { continue };
        let mut seen = vec![];
        let mut list = vec![];
        for run in &variant.patches {
            let (Some(position), Some(&index)) = (&run.position, run.token_positions.first()) else { continue };
            let label = position_label(position);
            if seen.contains(&label) {
                continue;
            }
            let token = first.clean_ids.get(index).map(|&id| text(id));
            list.push(serde_json::json!({"label": label, "index": index, "token": token}));
            seen.push(label);
        }
        per_variant.insert(variant.label.clone(), list.into());
    }
    Ok(per_variant.into())
}
