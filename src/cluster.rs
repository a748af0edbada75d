//! Running a sharded experiment on a cluster scheduler: `patchbay plan FILE --slurm N` writes a
//! script that submits a Slurm job array of N shards and a merge job that waits for them;
//! `--kubernetes N` writes an Indexed Job of N shards and a merge Job. patchbay schedules
//! nothing itself: the shards are `patchbay run FILE --shard K/N`, the merge `patchbay run FILE`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::bail_fixable;
use crate::ir::experiment::Experiment;
use crate::ir::plan::Plan;
use crate::runtime::Device;

/// What a scheduler runs: the experiment, split into `shards`, each task's resources.
pub struct Job {
    pub experiment: PathBuf,
    pub output: PathBuf,
    pub shards: usize,
    /// `run --memory`, in GiB (part of the plan's key: every shard and the merge use it).
    pub memory_gib: f64,
    pub device: Device,
    pub cpus: usize,
    /// Memory to request per task, in MiB.
    pub request_mib: u64,
    /// The patchbay binary the tasks run.
    pub patchbay: PathBuf,
}

impl Job {
    pub fn new(exp: &Experiment, plan: &Plan, file: &Path, shards: usize, memory_gib: f64, cpus: usize) -> Result<Job> {
        let Some(output) = &exp.outputs.csv else {
            bail_fixable!(
                "{}: a sharded run needs an `output` CSV (its run folder, beside it, collects the shards)", file.display();
                help: "add `output \"results/name.csv\"` to the experiment"
            );
        };
        if shards == 0 || cpus == 0 {
            bail_fixable!("{shards} shards of {cpus} CPUs each: both must be at least 1"; help: "e.g. `--slurm 4 --cpus 4`");
        }
        let absolute = |p: &Path| std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()));
        Ok(Job {
            experiment: absolute(file)?,
            output: absolute(output)?,
            shards,
            memory_gib,
            device: exp.model.device,
            cpus,
            request_mib: peak_estimate(exp, plan, memory_gib)? >> 20,
            patchbay: std::env::current_exe().context("cannot find the patchbay binary")?,
        })
    }

    /// `patchbay run` with the job's options (the device always named: it is part of the plan),
    /// for a shard (`shard`: the shell expression of its number) or the merge; `experiment` is
    /// the file as a shell word.
    fn command(&self, patchbay: &str, experiment: &str, shard: Option<&str>) -> String {
        let shard = shard.map(|k| format!(" --shard {k}/{}", self.shards)).unwrap_or_default();
        format!("{patchbay} run --quiet --memory {} --device {}{shard} {experiment}", self.memory_gib, self.device)
    }

    fn run_folder(&self) -> String {
        let mut name = self.output.file_name().unwrap_or_default().to_os_string();
        name.push(".run");
        quote(&self.output.with_file_name(name).display().to_string())
    }

    /// The job's name: a DNS label (Kubernetes), room left for `-merge`.
    fn name(&self) -> String {
        let stem = self.experiment.file_stem().unwrap_or_default().to_string_lossy().to_lowercase();
        let clean: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let name = format!("patchbay-{clean}");
        name[..name.len().min(56)].trim_end_matches('-').to_string()
    }
}

/// A bash script that submits the shards as a Slurm job array and the merge as a job that
/// starts once every array task succeeded. `bash script 2,4` resubmits shards 2 and 4 (and a
/// merge after them).
pub fn slurm(job: &Job) -> String {
    let gres = if job.device == Device::Cuda { " --gres=gpu:1" } else { "" };
    let logs = format!("{}.slurm", job.output.display());
    // Slurm reads `%` in file names as a pattern.
    let (logs, log_pattern) = (quote(&logs), quote(&logs.replace('%', "%%")));
    let resources = format!("--cpus-per-task={} --mem={}M{gres}", job.cpus, job.request_mib);
    // The job's shell expands the variables (sbatch exports the submitting environment), so
    // the wrapped command needs no quoting of paths.
    let shard = job.command("\"$PATCHBAY\"", "\"$EXPERIMENT\"", Some("$SLURM_ARRAY_TASK_ID"));
    let merge = job.command("\"$PATCHBAY\"", "\"$EXPERIMENT\"", None);
    format!(
        r#"#!/usr/bin/env bash
# {file} as a Slurm job array of {n} shards and a merge job after them.
# Written by `patchbay plan {file} --slurm {n}`. Submit: `bash <this script>`; resubmit some
# shards (and a new merge): `bash <this script> 2,4`. Progress: `patchbay status {folder}`.
# Each task requests {cpus} CPUs and {mib} MiB: patchbay's estimate of a task's peak memory
# (twice the model's files, twice the --memory budget of {gib} GiB, the cached runs, 512 MiB).
# The run folder beside the output must be on storage every node sees.
set -euo pipefail
export PATCHBAY=${{PATCHBAY:-{patchbay}}}
export EXPERIMENT={experiment}
SHARDS=${{1:-1-{n}}}
mkdir -p {logs}
array=$(sbatch --parsable --job-name={name} --array="$SHARDS" {resources} \
  --output={log_pattern}/shard-%a.out \
  --wrap='{shard}')
array=${{array%%;*}}
merge=$(sbatch --parsable --job-name={name}-merge --dependency=afterok:"$array" --kill-on-invalid-dep=yes {resources} \
  --output={log_pattern}/merge.out \
  --wrap='{merge}')
merge=${{merge%%;*}}
echo "shards $SHARDS of {n}: job array $array; merge: job $merge (logs in {logs})"
"#,
        file = job.experiment.display(),
        n = job.shards,
        folder = job.run_folder(),
        cpus = job.cpus,
        mib = job.request_mib,
        gib = job.memory_gib,
        patchbay = quote(&job.patchbay.display().to_string()),
        experiment = quote(&job.experiment.display().to_string()),
        name = job.name(),
    )
}

/// An Indexed Job of the shards and a merge Job that waits (`patchbay status` exits 0 once every
/// shard is done) and merges. The folder holding the experiment, its output and its model comes
/// from a ReadWriteMany volume, the patchbay cache (`PATCHBAY_CACHE`: ONNX Runtime, the models
/// folder) from another, both mounted at their paths on this machine; the image must hold
/// patchbay (set `image`).
pub fn kubernetes(job: &Job, model: &Path, cache: &Path) -> Result<String> {
    // A model in the cache comes with the cache's volume.
    let mut paths = vec![job.experiment.as_path(), job.output.as_path()];
    if !model.starts_with(cache) {
        paths.push(model);
    }
    let work = common_root(&paths);
    if work == Path::new("/") {
        bail_fixable!(
            "the experiment {}, its output and its model share no folder but /, which a volume cannot be mounted at", job.experiment.display();
            help: "keep the experiment, its output and the model directory under one project folder"
        );
    }
    let gpu = if job.device == Device::Cuda { "\n              nvidia.com/gpu: 1" } else { "" };
    let experiment = quote(&job.experiment.display().to_string());
    let shard = job.command("patchbay", &experiment, Some("$((JOB_COMPLETION_INDEX + 1))"));
    let merge = format!(
        "until patchbay status {} >/dev/null; do sleep 30; done; exec {}",
        job.run_folder(),
        job.command("patchbay", &experiment, None)
    );
    let spec = |command: &str| {
        format!(
            r#"      restartPolicy: Never
      containers:
        - name: patchbay
          image: patchbay:latest # an image with the patchbay binary on its PATH
          command: ["sh", "-c", {command}]
          env:
            - name: PATCHBAY_CACHE
              value: {cache}
          resources:
            requests:
              cpu: "{cpus}"
              memory: {mib}Mi
            limits:
              memory: {mib}Mi{gpu}
          volumeMounts:
            - name: work
              mountPath: {work}
            - name: cache
              mountPath: {cache}
      volumes:
        - name: work
          persistentVolumeClaim:
            claimName: patchbay-work # ReadWriteMany: the experiment, its output and model
        - name: cache
          persistentVolumeClaim:
            claimName: patchbay-cache # the patchbay cache: ONNX Runtime and the models folder"#,
            command = json(command),
            cache = json(&cache.display().to_string()),
            cpus = job.cpus,
            mib = job.request_mib,
            work = json(&work.display().to_string()),
        )
    };
    Ok(format!(
        r#"# {file} as a Kubernetes Indexed Job of {n} shards and a merge Job that waits for them.
# Written by `patchbay plan {file} --kubernetes {n}`; `kubectl apply -f <this file>`.
# Each shard requests {mib} MiB: patchbay's estimate of its peak memory.
apiVersion: batch/v1
kind: Job
metadata:
  name: {name}
spec:
  completionMode: Indexed
  completions: {n}
  parallelism: {n}
  backoffLimit: {retries}
  template:
    spec:
{shard_spec}
---
apiVersion: batch/v1
kind: Job
metadata:
  name: {name}-merge
spec:
  backoffLimit: 2
  template:
    spec:
{merge_spec}
"#,
        file = job.experiment.display(),
        n = job.shards,
        mib = job.request_mib,
        name = job.name(),
        retries = 2 * job.shards,
        shard_spec = spec(&shard),
        merge_spec = spec(&merge),
    ))
}

/// A task's peak memory: the model's files twice (mapped weights and ONNX Runtime's packed
/// copies), the call budget twice (a call and the allocator's slack), the largest variant's
/// cached clean and corrupted runs (residual streams, keys and values at every layer), 512 MiB.
fn peak_estimate(exp: &Experiment, plan: &Plan, memory_gib: f64) -> Result<u64> {
    let dir = crate::model::ModelDir::open(&exp.model.dir)?;
    let files: u64 = std::fs::read_dir(&dir.path)
        .with_context(|| format!("cannot read {}", dir.path.display()))?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let c = &dir.manifest.config;
    let per_token = (c.n_layers * (c.d_model + 2 * c.n_kv_heads * c.d_head) * 4) as u64;
    let cached = plan
        .variants
        .iter()
        .map(|v| {
            let len = v.prompts.iter().map(|p| p.clean_ids.len()).max().unwrap_or(0) as u64;
            (v.counts.clean_runs + v.counts.corrupted_runs) * len * per_token
        })
        .max()
        .unwrap_or(0);
    Ok(2 * files + (2.0 * memory_gib * (1u64 << 30) as f64) as u64 + cached + (512 << 20))
}

/// The deepest folder holding every path.
fn common_root(paths: &[&Path]) -> PathBuf {
    let mut root: PathBuf = paths[0].parent().unwrap_or(Path::new("/")).to_path_buf();
    while !paths.iter().all(|p| p.starts_with(&root)) {
        if !root.pop() {
            break;
        }
    }
    root
}

/// `s` as one shell word.
fn quote(s: &str) -> String {
    match s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:=@".contains(c)) {
        true => s.to_string(),
        false => format!("'{}'", s.replace('\'', r"'\''")),
    }
}

/// `s` as a YAML (JSON) string.
fn json(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_the_shell() {
        assert_eq!(quote("/a/b.bay"), "/a/b.bay");
        assert_eq!(quote("/a b/it's.bay"), r"'/a b/it'\''s.bay'");
        assert_eq!(common_root(&[Path::new("/w/x/e.bay"), Path::new("/w/y/r.csv")]), Path::new("/w"));
    }
}
