//! Result files: the CSV (one row per variant and component), the per-prompt CSV, and the
//! provenance sidecar. Every file is written to a temporary file in its folder and renamed into
//! place, so a crash never leaves a truncated result; a lock file keeps two runs from writing
//! the same output.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::bail_fixable;

use crate::ir::plan::Plan;
use crate::run::results::Row;

/// Key columns, in order, before the metric columns.
pub const KEY_COLUMNS: [&str; 16] = [
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
];

/// A lock beside `output`, held while the run writes it.
pub struct Lock(PathBuf);

impl Lock {
    /// Takes the lock; this also proves, before any compute, that the folder is writable.
    pub fn take(output: &Path) -> Result<Lock> {
        let dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the output folder {}", dir.display()))?;
        let path = output.with_extension("csv.lock");
        // A lock left by a run that no longer exists (kill -9, a crash) is taken over.
        if let Some(pid) = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse::<i32>().ok()) {
            if !process_alive(pid) {
                let _ = std::fs::remove_file(&path);
            }
        }
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                let _ = writeln!(f, "{}", std::process::id());
                Ok(Lock(path))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail_fixable!(
                "another patchbay run is writing {} (lock {} exists)", output.display(), path.display();
                help: "wait for it to finish; if no run is active, delete the lock file"
            ),
            Err(e) => {
                bail_fixable!("cannot write to {}: {e}", dir.display(); help: "choose an output path in a writable folder")
            }
        }
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; EPERM means it exists as another user's.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Write `bytes` to `path` atomically (temporary file in the same folder, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write {}: {e}", path.display());
    }
    Ok(())
}

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
    ]
}

/// The results CSV.
pub fn csv(plan: &Plan, rows: &[Row]) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(vec![]);
    let mut header: Vec<String> = KEY_COLUMNS.iter().map(|s| s.to_string()).collect();
    for m in &plan.metrics {
        for suffix in ["", "_effect", "_patched", "_clean", "_corrupted", "_sem"] {
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
                record.extend([num(value), num(Some(effect)), num(Some(patched))]);
            }
            w.write_record(&record)?;
        }
    }
    Ok(w.into_inner()?)
}
