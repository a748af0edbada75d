//! Resuming an interrupted run. Completed batches of patched passes are checkpointed in a run
//! folder beside the output (`<output>.run/`), keyed by a hash of the plan, the model and the
//! patchbay version. The same command restarted after Ctrl-C, kill -9 or a crash skips the
//! batches already done; batches are formed in a fixed order, so the remaining ones hold the same
//! passes as before and the results are byte-identical. A changed experiment or model starts
//! afresh, and says why. The folder is removed once the outputs are written.
//!
//! A variant's log (`variant-<v>.log`) holds, per completed batch, one line per pass
//! (`<batch> <run> <prompt> <sample> <metric values as f64 bit patterns>`) and then
//! `end <batch>`; a batch without its `end` line (a kill mid-write) does not count.
//!
//! A sharded run ([`crate::run::shard`]) shares the folder: each shard appends to its own logs
//! (`variant-<v>.shard-<K>.log`) under its lock, the folder records the plan's key and the
//! shard count (`shards`), and the whole run, started once every shard is done, reads every log
//! and computes no patched pass itself (it recomputes the clean and corrupted runs, and any
//! estimates, so it must run the same build on the same kind of machine as the shards). A folder of another plan is refused, never discarded, once it
//! holds shards.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::bail_fixable;
use crate::files::{publish_once, write_atomic};
use crate::run::lock::Lock;
use crate::run::shard::{self, Progress, Shard};

pub struct RunFolder {
    dir: PathBuf,
    mode: Mode,
    /// Per shard, the estimated cost of the batches assigned to it so far (sharded runs).
    loads: RefCell<Vec<u64>>,
    /// This shard's progress, rewritten after each batch.
    progress: RefCell<Option<Progress>>,
}

/// What a run does with the folder.
enum Mode {
    /// Compute every batch no log holds (a plain run, or a resumed one).
    Whole,
    /// Compute this shard's batches only.
    Shard { shard: Shard, _lock: Lock },
    /// Every shard is done: every batch must come from their logs.
    Merge,
}

/// `(run, prompt, sample, metric values)` of one patched pass.
pub type Entry = (usize, usize, usize, Vec<f64>);

pub struct VariantLog<'f> {
    folder: &'f RunFolder,
    file: std::fs::File,
    done: HashMap<u64, Vec<Entry>>,
    /// The variant's run of each exactly patched run: logs name runs by the variant's numbering,
    /// so a checkpoint never lands on another run when `verify top k` picks differently.
    runs: Vec<usize>,
}

const KEY_FILE: &str = "key";
const SHARDS_FILE: &str = "shards";

/// The run folder of the output CSV `output`: `<output>.run`.
pub fn folder_of(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".run");
    output.with_file_name(name)
}

/// Into how many shards the run in `dir` is split, if it is.
pub fn shard_count(dir: &Path) -> Result<Option<usize>> {
    match std::fs::read_to_string(dir.join(SHARDS_FILE)) {
        Ok(text) => match text.trim().parse() {
            Ok(count) if count > 0 => Ok(Some(count)),
            _ => bail_fixable!(
                "{} is garbled: it should hold the number of shards", dir.join(SHARDS_FILE).display();
                help: "the run folder is damaged; delete it and run the shards again"
            ),
        },
        Err(_) => Ok(None),
    }
}

impl RunFolder {
    /// Open (or start) the run folder of `output` for a run identified by `key`, as `shard`
    /// of it or as the whole run (which merges the shards of a sharded folder). Returns a note
    /// for the user when an earlier run is resumed, merged or discarded.
    pub fn open(output: &Path, key: &str, shard: Option<Shard>) -> Result<(RunFolder, Option<String>)> {
        let dir = folder_of(output);
        let old_key = std::fs::read_to_string(dir.join(KEY_FILE)).ok().map(|k| k.trim().to_string());
        let sharded = shard_count(&dir)?;
        let mut note = None;
        let mode = match (shard, sharded) {
            (Some(s), _) => {
                refuse_other_plan(&dir, old_key.as_deref(), key)?;
                std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
                // Several shards may start at once: the first to publish the key and count wins.
                refuse_other_plan(&dir, Some(publish_once(&dir.join(KEY_FILE), key)?.trim()), key)?;
                let count: usize =
                    publish_once(&dir.join(SHARDS_FILE), &s.count.to_string())?.trim().parse().unwrap_or(0);
                if count != s.count {
                    bail_fixable!(
                        "--shard {s}: the run folder {} is split into {count} shards, not {}", dir.display(), s.count;
                        help: "run the shards as `--shard K/{count}`, or delete the folder to split the run differently"
                    );
                }
                let lock = Lock::at(&dir.join(format!("shard-{}.lock", s.index)), &format!("computing shard {s}"))?;
                if shard::progress_path(&dir, s.index).is_file() {
                    note = Some(format!("shard {s}: going on from the batches already in {}", dir.display()));
                }
                Mode::Shard { shard: s, _lock: lock }
            }
            (None, Some(count)) => {
                refuse_other_plan(&dir, old_key.as_deref(), key)?;
                let missing: Vec<usize> = (1..=count).filter(|&k| !shard::done_path(&dir, k).is_file()).collect();
                if !missing.is_empty() {
                    let list = missing.iter().map(|k| format!("{k}/{count}")).collect::<Vec<_>>().join(", ");
                    bail_fixable!(
                        "cannot merge {}: {} of its {count} shards not done ({list}); nothing was written", dir.display(), missing.len();
                        help: "run the missing shards (`patchbay run FILE --shard K/{count}`; `patchbay status {}` shows them), then merge again", dir.display()
                    );
                }
                note = Some(format!("merging the {count} shards in {}", dir.display()));
                Mode::Merge
            }
            (None, None) => {
                match old_key {
                    Some(old) if old == key => {
                        note = Some(format!("resuming the interrupted run in {}", dir.display()))
                    }
                    _ if dir.is_dir() => {
                        note = Some(format!(
                            "discarding the interrupted run in {}: the experiment, its data or the model changed since",
                            dir.display()
                        ));
                        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
                    }
                    _ => {}
                }
                std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
                std::fs::write(dir.join(KEY_FILE), key)
                    .with_context(|| format!("cannot write in {}", dir.display()))?;
                Mode::Whole
            }
        };
        let loads = RefCell::new(vec![0; shard.map_or(1, |s| s.count)]);
        Ok((RunFolder { dir, mode, loads, progress: RefCell::new(None) }, note))
    }

    /// The shard this process computes, if it computes one.
    pub fn shard(&self) -> Option<Shard> {
        match &self.mode {
            Mode::Shard { shard, .. } => Some(*shard),
            _ => None,
        }
    }

    /// The checkpoints of variant `v` (of `variants`), whose exactly patched runs are `runs`
    /// (indices into the variant's runs; `verify top k` picks some): every log of it in the
    /// folder is read; this process appends to its own.
    pub fn variant(&self, v: usize, variants: usize, runs: Vec<usize>) -> Result<VariantLog<'_>> {
        let own = match self.shard() {
            Some(s) => format!("variant-{v}.shard-{}.log", s.index),
            None => format!("variant-{v}.log"),
        };
        let prefix = format!("variant-{v}.");
        let mut done = HashMap::new();
        let listing = std::fs::read_dir(&self.dir).with_context(|| format!("cannot read {}", self.dir.display()))?;
        for entry in listing.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".log") && name != own {
                done.extend(parse(&read_log(&entry.path())?));
            }
        }
        let path = self.dir.join(own);
        let text = read_log(&path)?;
        done.extend(parse(&text));
        // Drop whatever follows the last completed batch (a kill mid-write), so new batches
        // are appended to a clean log.
        let complete = text.rfind("\nend ").or(text.starts_with("end ").then_some(0)).map_or(0, |at| {
            let line_end = text[at + 1..].find('\n').map_or(text.len(), |i| at + 1 + i + 1);
            line_end.min(text.len())
        });
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        file.set_len(complete as u64).with_context(|| format!("cannot write {}", path.display()))?;
        if let Some(s) = self.shard() {
            let mut progress = self.progress.borrow_mut();
            let p = progress.get_or_insert_with(|| Progress::start(variants));
            (p.variant, p.variant_cost, p.variant_done) = (v, 0, 0);
            write_atomic(&shard::progress_path(&self.dir, s.index), &serde_json::to_vec(p)?)?;
        }
        Ok(VariantLog { folder: self, file, done, runs })
    }

    /// Remove the folder: the run finished and its outputs are written.
    pub fn finish(self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir).with_context(|| format!("cannot remove {}", self.dir.display()))
    }

    /// Mark this shard done (its batches are all in its log); the folder stays for the merge.
    pub fn finish_shard(self) -> Result<()> {
        if let Some(s) = self.shard() {
            // A shard with no exactly patched runs (estimates only) never started a record.
            let mut progress = self.progress.borrow_mut();
            let p = progress.get_or_insert_with(|| Progress::start(0));
            p.updated_unix = shard::now_unix();
            (p.variant, p.variant_cost, p.variant_done) = (p.variants, 0, 0);
            write_atomic(&shard::progress_path(&self.dir, s.index), &serde_json::to_vec(p)?)?;
            write_atomic(&shard::done_path(&self.dir, s.index), &serde_json::to_vec(p)?)?;
        }
        Ok(())
    }
}

/// A log's text; one that does not exist yet is empty, one that cannot be read is an error (an
/// empty read would truncate the checkpoints).
fn read_log(path: &Path) -> Result<String> {
    match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        read => read.with_context(|| format!("cannot read the checkpoints in {}", path.display())),
    }
}

/// A sharded folder of another plan is refused, not discarded: its shards are finished work.
fn refuse_other_plan(dir: &Path, old: Option<&str>, key: &str) -> Result<()> {
    match old {
        Some(old) if old != key => bail_fixable!(
            "the run folder {} holds the work of a different plan (the experiment file, its data, the model, --memory or --device differ)", dir.display();
            help: "run every shard and the merge with the same file, model and options; to start afresh, delete the folder"
        ),
        _ => Ok(()),
    }
}

/// The completed batches of a log; an unterminated or garbled batch is dropped.
fn parse(text: &str) -> HashMap<u64, Vec<Entry>> {
    let mut done = HashMap::new();
    let mut pending: HashMap<u64, Vec<Entry>> = HashMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if let ["end", batch] = fields[..] {
            let number = u64::from_str_radix(batch, 16).ok();
            if let Some((b, entries)) = number.and_then(|b| pending.remove(&b).map(|e| (b, e))) {
                done.insert(b, entries);
            }
            continue;
        }
        let numbers: Option<Vec<u64>> = fields.iter().map(|f| u64::from_str_radix(f, 16).ok()).collect();
        if let Some(n) = numbers.filter(|n| n.len() >= 4) {
            let values = n[4..].iter().map(|&bits| f64::from_bits(bits)).collect();
            pending.entry(n[0]).or_default().push((n[1] as usize, n[2] as usize, n[3] as usize, values));
        }
    }
    done
}

impl VariantLog<'_> {
    /// Which batches of `costs` (estimated costs, in batch order) this process computes: all
    /// of them, or a shard's share.
    pub fn mine(&mut self, costs: &[u64]) -> Result<Vec<bool>> {
        let Some(s) = self.folder.shard() else { return Ok(vec![true; costs.len()]) };
        let owners = shard::assign(costs, &mut self.folder.loads.borrow_mut());
        let mine: Vec<bool> = owners.iter().map(|&o| o + 1 == s.index).collect();
        let mut progress = self.folder.progress.borrow_mut();
        let p = progress.as_mut().expect("a shard's log starts its progress");
        p.variant_cost = costs.iter().zip(&mine).filter(|(_, m)| **m).map(|(c, _)| c).sum();
        Ok(mine)
    }

    /// Whether a batch no log holds is an error (a merge) rather than work to do.
    pub fn merging(&self) -> bool {
        matches!(self.folder.mode, Mode::Merge)
    }

    /// The passes of batch `batch`, if an earlier run completed it (and every run it names is
    /// patched exactly here).
    pub fn completed(&mut self, batch: u64) -> Option<Vec<Entry>> {
        let entries = self.done.remove(&batch)?;
        let exact = |full: usize| self.runs.iter().position(|&r| r == full);
        entries.into_iter().map(|(r, p, s, values)| Some((exact(r)?, p, s, values))).collect()
    }

    /// Record a completed batch of estimated cost `cost` durably (`restored`: read back from a
    /// log rather than computed).
    pub fn record(&mut self, batch: u64, cost: u64, entries: &[Entry], restored: bool) -> Result<()> {
        if !restored {
            let mut text = String::new();
            for (r, p, s, values) in entries {
                text.push_str(&format!("{batch:x} {:x} {p:x} {s:x}", self.runs[*r]));
                for v in values {
                    text.push_str(&format!(" {:x}", v.to_bits()));
                }
                text.push('\n');
            }
            text.push_str(&format!("end {batch:x}\n"));
            self.file.write_all(text.as_bytes()).context("cannot write the run checkpoint")?;
            self.file.sync_data().context("cannot write the run checkpoint")?;
        }
        if let (Some(s), Some(p)) = (self.folder.shard(), self.folder.progress.borrow_mut().as_mut()) {
            p.variant_done += cost;
            p.updated_unix = shard::now_unix();
            *if restored { &mut p.batches_restored } else { &mut p.batches_computed } += 1;
            write_atomic(&shard::progress_path(&self.folder.dir, s.index), &serde_json::to_vec(p)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unterminated_batches_do_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.csv");
        let (folder, note) = RunFolder::open(&out, "k1", None).unwrap();
        assert!(note.is_none());
        let mut log = folder.variant(0, 1, (0..30).collect()).unwrap();
        log.record(0, 1, &[(1, 2, 0, vec![0.5, -1.25])], false).unwrap();
        log.record(1, 1, &[(3, 0, 0, vec![f64::MIN_POSITIVE, 7.0])], false).unwrap();
        // A kill in the middle of batch 2.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("r.csv.run/variant-0.log"))
            .unwrap()
            .write_all(b"2 1 1 0 3ff")
            .unwrap();
        let (folder, note) = RunFolder::open(&out, "k1", None).unwrap();
        assert!(note.unwrap().contains("resuming"));
        let mut log = folder.variant(0, 1, (0..30).collect()).unwrap();
        assert_eq!(log.completed(0), Some(vec![(1, 2, 0, vec![0.5, -1.25])]));
        assert_eq!(log.completed(1), Some(vec![(3, 0, 0, vec![f64::MIN_POSITIVE, 7.0])]));
        assert_eq!(log.completed(2), None);
        // The torn batch was cut off: a redone batch 2 parses cleanly.
        log.record(2, 1, &[(1, 1, 0, vec![1.0])], false).unwrap();
        let (folder, _) = RunFolder::open(&out, "k1", None).unwrap();
        assert_eq!(folder.variant(0, 1, (0..30).collect()).unwrap().completed(2), Some(vec![(1, 1, 0, vec![1.0])]));
        // Batch numbers are written in hex and read back as such (batch 10 is `a`, 26 is `1a`).
        let mut log = folder.variant(0, 1, (0..30).collect()).unwrap();
        for batch in [10, 26] {
            log.record(batch, 1, &[(batch as usize, 0, 0, vec![2.0])], false).unwrap();
        }
        let (folder, _) = RunFolder::open(&out, "k1", None).unwrap();
        let mut log = folder.variant(0, 1, (0..30).collect()).unwrap();
        assert_eq!(log.completed(10), Some(vec![(10, 0, 0, vec![2.0])]));
        assert_eq!(log.completed(26), Some(vec![(26, 0, 0, vec![2.0])]));
        // A different key starts afresh.
        let (folder, note) = RunFolder::open(&out, "k2", None).unwrap();
        assert!(note.unwrap().contains("changed"));
        assert_eq!(folder.variant(0, 1, (0..30).collect()).unwrap().completed(0), None);
        folder.finish().unwrap();
        assert!(!dir.path().join("r.csv.run").exists());
    }
}
