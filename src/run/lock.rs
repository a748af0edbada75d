//! The lock beside a run's output (two runs never write the same files), and the check that the
//! output paths can be written, both before any compute.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::bail_fixable;

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

/// An output file the run will write must not already be something else (a folder, a device):
/// found out before any compute, not after.
pub fn check_output(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => bail_fixable!(
            "the output {} exists and is not a file", path.display();
            help: "name a file path for `output` / `per_prompt` (e.g. \"results/run.csv\")"
        ),
        _ => Ok(()),
    }
}
