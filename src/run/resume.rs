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

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub struct RunFolder {
    dir: PathBuf,
}

/// `(run, prompt, sample, metric values)` of one patched pass.
pub type Entry = (usize, usize, usize, Vec<f64>);

pub struct VariantLog {
    file: std::fs::File,
    done: HashMap<u64, Vec<Entry>>,
}

const KEY_FILE: &str = "key";

impl RunFolder {
    /// Open (or start) the run folder of `output` for a run identified by `key`. Returns a note
    /// for the user when an earlier run is resumed or discarded.
    pub fn open(output: &Path, key: &str) -> Result<(RunFolder, Option<String>)> {
        let mut name = output.file_name().unwrap_or_default().to_os_string();
        name.push(".run");
        let dir = output.with_file_name(name);
        let mut note = None;
        if dir.is_dir() {
            match std::fs::read_to_string(dir.join(KEY_FILE)) {
                Ok(old) if old.trim() == key => {
                    note = Some(format!("resuming the interrupted run in {}", dir.display()));
                }
                _ => {
                    note = Some(format!(
                        "discarding the interrupted run in {}: the experiment, its data or the model changed since",
                        dir.display()
                    ));
                    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
                }
            }
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join(KEY_FILE), key).with_context(|| format!("cannot write in {}", dir.display()))?;
        Ok((RunFolder { dir }, note))
    }

    pub fn variant(&self, v: usize) -> Result<VariantLog> {
        let path = self.dir.join(format!("variant-{v}.log"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let done = parse(&text);
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
        Ok(VariantLog { file, done })
    }

    /// Remove the folder: the run finished and its outputs are written.
    pub fn finish(self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir).with_context(|| format!("cannot remove {}", self.dir.display()))
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

impl VariantLog {
    /// The passes of batch `batch`, if an earlier run completed it.
    pub fn completed(&mut self, batch: u64) -> Option<Vec<Entry>> {
        self.done.remove(&batch)
    }

    /// Record a completed batch durably.
    pub fn record(&mut self, batch: u64, entries: &[Entry]) -> Result<()> {
        let mut text = String::new();
        for (r, p, s, values) in entries {
            text.push_str(&format!("{batch:x} {r:x} {p:x} {s:x}"));
            for v in values {
                text.push_str(&format!(" {:x}", v.to_bits()));
            }
            text.push('\n');
        }
        text.push_str(&format!("end {batch:x}\n"));
        self.file.write_all(text.as_bytes()).context("cannot write the run checkpoint")?;
        self.file.sync_data().context("cannot write the run checkpoint")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unterminated_batches_do_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.csv");
        let (folder, note) = RunFolder::open(&out, "k1").unwrap();
        assert!(note.is_none());
        let mut log = folder.variant(0).unwrap();
        log.record(0, &[(1, 2, 0, vec![0.5, -1.25])]).unwrap();
        log.record(1, &[(3, 0, 0, vec![f64::MIN_POSITIVE, 7.0])]).unwrap();
        // A kill in the middle of batch 2.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("r.csv.run/variant-0.log"))
            .unwrap()
            .write_all(b"2 1 1 0 3ff")
            .unwrap();
        let (folder, note) = RunFolder::open(&out, "k1").unwrap();
        assert!(note.unwrap().contains("resuming"));
        let mut log = folder.variant(0).unwrap();
        assert_eq!(log.completed(0), Some(vec![(1, 2, 0, vec![0.5, -1.25])]));
        assert_eq!(log.completed(1), Some(vec![(3, 0, 0, vec![f64::MIN_POSITIVE, 7.0])]));
        assert_eq!(log.completed(2), None);
        // The torn batch was cut off: a redone batch 2 parses cleanly.
        log.record(2, &[(1, 1, 0, vec![1.0])]).unwrap();
        let (folder, _) = RunFolder::open(&out, "k1").unwrap();
        assert_eq!(folder.variant(0).unwrap().completed(2), Some(vec![(1, 1, 0, vec![1.0])]));
        // Batch numbers are written in hex and read back as such (batch 10 is `a`, 26 is `1a`).
        let mut log = folder.variant(0).unwrap();
        for batch in [10, 26] {
            log.record(batch, &[(batch as usize, 0, 0, vec![2.0])]).unwrap();
        }
        let (folder, _) = RunFolder::open(&out, "k1").unwrap();
        let mut log = folder.variant(0).unwrap();
        assert_eq!(log.completed(10), Some(vec![(10, 0, 0, vec![2.0])]));
        assert_eq!(log.completed(26), Some(vec![(26, 0, 0, vec![2.0])]));
        // A different key starts afresh.
        let (folder, note) = RunFolder::open(&out, "k2").unwrap();
        assert!(note.unwrap().contains("changed"));
        assert_eq!(folder.variant(0).unwrap().completed(0), None);
        folder.finish().unwrap();
        assert!(!dir.path().join("r.csv.run").exists());
    }
}
