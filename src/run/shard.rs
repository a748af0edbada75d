//! Sharding a run: `--shard K/N` computes a deterministic part of the patched passes into the run
//! folder, and a run without `--shard` merges the parts once every shard is done.
//!
//! Every shard forms the same numbered batches (the cached clean and corrupted runs, and any
//! attribution estimates, are done by each shard that needs them), and takes the batches that the
//! greedy longest-first split of their estimated cost (layers times positions computed) gives
//! it, carrying each shard's load from one variant to the next. A shard records its batches in
//! its own log, writes `shard-K.progress` after each, and `shard-K.done` once its last one is
//! durable; `patchbay status` reads those.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::bail_fixable;

/// Shard `index` (1-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Shard, String> {
        let parsed = s.split_once('/').and_then(|(k, n)| Some((k.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if (1..=count).contains(&index) => Ok(Shard { index, count }),
            _ => Err(format!("`{s}` is not a shard: expected K/N with 1 <= K <= N, e.g. `--shard 2/4`")),
        }
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Which shard (0-based) computes each batch of `costs`: longest first, each to the least
/// loaded shard (the lowest-numbered on ties), starting from and updating `loads`.
pub fn assign(costs: &[u64], loads: &mut [u64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by_key(|&b| (std::cmp::Reverse(costs[b]), b));
    let mut owner = vec![0; costs.len()];
    for b in order {
        let shard = (0..loads.len()).min_by_key(|&s| (loads[s], s)).expect("at least one shard");
        loads[shard] += costs[b];
        owner[b] = shard;
    }
    owner
}

/// A shard's progress, rewritten after each of its batches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub host: String,
    pub pid: u32,
    pub started_unix: f64,
    pub updated_unix: f64,
    /// The variant being worked on (0-based) and how many the plan has.
    pub variant: usize,
    pub variants: usize,
    /// This shard's estimated cost of the variant, and how much of it is done.
    pub variant_cost: u64,
    pub variant_done: u64,
    pub batches_computed: u64,
    pub batches_restored: u64,
}

impl Progress {
    /// This process's record, starting now, of a plan of `variants` variants.
    pub fn start(variants: usize) -> Progress {
        Progress {
            host: crate::files::host(),
            pid: std::process::id(),
            started_unix: now_unix(),
            updated_unix: now_unix(),
            variant: 0,
            variants,
            variant_cost: 0,
            variant_done: 0,
            batches_computed: 0,
            batches_restored: 0,
        }
    }

    /// The fraction of the shard's work done, counting every variant as equally costly.
    pub fn fraction(&self) -> f64 {
        let within = match self.variant_cost {
            0 => 1.0,
            cost => self.variant_done as f64 / cost as f64,
        };
        ((self.variant as f64 + within) / self.variants.max(1) as f64).min(1.0)
    }
}

pub fn progress_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index}.progress"))
}

pub fn done_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index}.done"))
}

pub fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// What `patchbay status` prints for the run folder `dir` (or the output CSV it belongs to), and
/// whether every shard is done.
pub fn status(dir: &Path) -> Result<(String, bool)> {
    let dir = match dir.extension().is_some_and(|e| e == "csv") {
        true => crate::run::resume::folder_of(dir),
        false => dir.to_path_buf(),
    };
    if !dir.is_dir() {
        let what = if dir.exists() { "it is not a folder" } else { "it does not exist" };
        bail_fixable!(
            "{} is not a run folder ({what})", dir.display();
            help: "a run folder is `<output>.run` beside the output CSV, present while a run or its shards are unfinished; once merged it is removed"
        );
    }
    let Some(count) = crate::run::resume::shard_count(&dir)? else {
        let text =
            format!("{}: an unsharded run, unfinished (run the same command again to resume it)\n", dir.display());
        return Ok((text, false));
    };
    let now = now_unix();
    let mut out = format!("{}: {count} shards\n", dir.display());
    let (mut done, mut eta, mut waiting) = (0, 0.0f64, 0);
    for index in 1..=count {
        let progress: Option<Progress> =
            std::fs::read(progress_path(&dir, index)).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let line = match (done_path(&dir, index).is_file(), progress) {
            (true, p) => {
                done += 1;
                format!("done{}", p.map(|p| format!(" on {}", p.host)).unwrap_or_default())
            }
            (false, None) => {
                waiting += 1;
                "not started".into()
            }
            (false, Some(p)) => {
                let f = p.fraction();
                let elapsed = (p.updated_unix - p.started_unix).max(0.0);
                let silent = (now - p.updated_unix).max(0.0);
                let left = if f > 0.0 { (elapsed * (1.0 - f) / f - silent).max(0.0) } else { f64::NAN };
                eta = eta.max(left);
                format!(
                    "{:>5.1}% on {} (pid {}), variant {}/{}, last progress {} ago, about {} left",
                    100.0 * f,
                    p.host,
                    p.pid,
                    p.variant + 1,
                    p.variants,
                    duration(silent),
                    duration(left)
                )
            }
        };
        out.push_str(&format!("  shard {index}/{count}: {line}\n"));
    }
    out.push_str(&match (done, waiting) {
        (d, _) if d == count => "all shards done: run the experiment without --shard to merge them\n".into(),
        (_, 0) => format!("{done}/{count} done; about {} until the last running shard finishes\n", duration(eta)),
        (_, w) => format!("{done}/{count} done; {w} not started (no ETA for those)\n"),
    });
    Ok((out, done == count))
}

fn duration(seconds: f64) -> String {
    match seconds {
        s if s.is_nan() => "unknown".into(),
        s if s < 90.0 => format!("{s:.0} s"),
        s if s < 5400.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_one_based() {
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        for bad in ["0/4", "5/4", "4", "a/b", "1/0"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn batches_are_split_by_cost_longest_first() {
        let mut loads = vec![0, 0];
        // 10 goes to shard 0; 6, 3 and 1 to shard 1 (6 + 3 + 1 = 10).
        assert_eq!(assign(&[1, 10, 3, 6], &mut loads), vec![1, 0, 1, 1]);
        assert_eq!(loads, vec![10, 10]);
        // Loads carry over: the next variant's first batch goes to the lower-numbered shard.
        assert_eq!(assign(&[5], &mut loads), vec![0]);
    }
}
