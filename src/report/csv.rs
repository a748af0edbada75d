//! The result tables: the CSV (one row per variant and component) and the per-prompt CSV, with
//! numbers written so that a rerun is byte-identical.

use anyhow::Result;

use crate::ir::plan::Plan;
use crate::run::results::Row;

/// Key columns, in order, before the metric columns.
pub const KEY_COLUMNS: [&str; 17] = [
    "experiment",
    "variant",
    "dataset",
    "corruption",
    "direction",
    "target",
    "component",
    "hook",
    "layer",
    "head",
    "position",
    "position_label",
    "window",
    "baseline",
    "n_prompts",
    "n_samples",
    "method",
];

/// The columns of each metric `m`, after its name: `m`, `m_effect`, ...
pub const METRIC_SUFFIXES: [&str; 7] = ["", "_effect", "_patched", "_clean", "_corrupted", "_sem", "_estimate"];

fn num(x: Option<f64>) -> String {
    x.map(|v| v.to_string()).unwrap_or_default()
}

fn opt<T: ToString>(x: Option<T>) -> String {
    x.map(|v| v.to_string()).unwrap_or_default()
}

fn keys(plan: &Plan, row: &Row) -> Vec<String> {
    let v = &plan.variants[row.variant];
    vec![
        plan.experiment.clone(),
        v.label.clone(),
        v.dataset.clone(),
        v.corruption.clone(),
        v.direction.name().to_string(),
        row.target.clone(),
        row.component.clone(),
        row.hooks.join("+"),
        opt(row.layer),
        opt(row.head),
        opt(row.position),
        row.position_label.clone().unwrap_or_default(),
        opt(row.window),
        if row.summation { "summation".into() } else { String::new() },
        v.prompts.len().to_string(),
        v.corruption_kind.samples().to_string(),
        row.method.name().to_string(),
    ]
}

/// The results CSV.
pub fn csv(plan: &Plan, rows: &[Row]) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(vec![]);
    let mut header: Vec<String> = KEY_COLUMNS.iter().map(|s| s.to_string()).collect();
    for m in &plan.metrics {
        for suffix in METRIC_SUFFIXES {
            header.push(format!("{}{suffix}", m.name));
        }
    }
    w.write_record(&header)?;
    for row in rows {
        let mut record = keys(plan, row);
        for c in &row.cells {
            record.extend([
                num(c.value),
                num(Some(c.effect)),
                num(c.patched),
                num(Some(c.clean)),
                num(c.corrupted),
                num(c.sem),
                num(c.estimate),
            ]);
        }
        w.write_record(&record)?;
    }
    Ok(w.into_inner()?)
}

/// The per-prompt CSV: the same keys plus `prompt_index` and `sample` (empty: noise samples
/// are averaged first), then per metric its per-prompt value, effect and patched metric.
pub fn per_prompt_csv(plan: &Plan, rows: &[Row]) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(vec![]);
    let mut header: Vec<String> = KEY_COLUMNS.iter().map(|s| s.to_string()).collect();
    header.extend(["prompt_index".to_string(), "sample".to_string()]);
    for m in &plan.metrics {
        for suffix in ["", "_effect", "_patched"] {
            header.push(format!("{}{suffix}", m.name));
        }
    }
    w.write_record(&header)?;
    for row in rows.iter().filter(|r| !r.per_prompt.is_empty()) {
        for p in 0..row.per_prompt[0].len() {
            let mut record = keys(plan, row);
            record.extend([p.to_string(), String::new()]);
            for metric in &row.per_prompt {
                let (value, effect, patched) = metric[p];
                record.extend([num(value), num(Some(effect)), num(patched)]);
            }
            w.write_record(&record)?;
        }
    }
    Ok(w.into_inner()?)
}
