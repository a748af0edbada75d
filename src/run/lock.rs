//! Locks (two runs never write the same files: a lock beside a run's output, one per shard in a
//! sharded run folder), and the check that the output paths can be written, both before any
//! compute.
//!
//! A lock file holds its holder's pid and host. A lock left by a process that no longer exists
//! (kill -9, a crash) is taken over: on the same host that is a pid check; a holder on another
//! host (a cluster node, the folder on NFS) is alive while it refreshes the file, which it does
//! every [`HEARTBEAT`], and gone once the file is older than [`STALE`] by the shared folder's
//! own clock.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::bail_fixable;

const HEARTBEAT: Duration = Duration::from_secs(20);
const STALE: Duration = Duration::from_secs(120);

/// A held lock; dropping it releases it.
pub struct Lock {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    heartbeat: Option<std::thread::JoinHandle<()>>,
}

impl Lock {
    /// Takes the lock beside `output`; this also proves, before any compute, that the folder is
    /// writable.
    pub fn take(output: &Path) -> Result<Lock> {
        let dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the output folder {}", dir.display()))?;
        Lock::at(&output.with_extension("csv.lock"), &format!("writing {}", output.display()))
    }

    /// Takes the lock at `path`; `what` says what its holder does, for the error.
    pub fn at(path: &Path, what: &str) -> Result<Lock> {
        if let Ok(text) = std::fs::read_to_string(path) {
            if holder_is_gone(path, &text) {
                let _ = std::fs::remove_file(path);
            }
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(mut f) => {
                let _ = writeln!(f, "{} {}", std::process::id(), crate::files::host());
                let stop = Arc::new(AtomicBool::new(false));
                let heartbeat = Some(refresh_until(path.to_path_buf(), stop.clone()));
                HELD.lock().unwrap_or_else(|e| e.into_inner()).push(path.to_path_buf());
                Ok(Lock { path: path.to_path_buf(), stop, heartbeat })
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail_fixable!(
                "another patchbay run is {what} (lock {} exists)", path.display();
                help: "wait for it to finish; if no run is active, delete the lock file"
            ),
            Err(e) => {
                bail_fixable!("cannot write to {}: {e}", dir.display(); help: "choose an output path in a writable folder")
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.heartbeat.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
        HELD.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| *p != self.path);
    }
}

/// Rewrite the lock file every [`HEARTBEAT`] (its modification time is its holder's pulse)
/// until `stop`.
fn refresh_until(path: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || loop {
        std::thread::park_timeout(HEARTBEAT);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(text) = std::fs::read(&path) {
            let _ = std::fs::OpenOptions::new().write(true).open(&path).and_then(|mut f| f.write_all(&text));
        }
    })
}

/// The locks this process holds (by path): a lock naming this process's pid that is not among
/// them is a predecessor's (a retried container's pid is often 1 again).
static HELD: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn held_here(path: &Path) -> bool {
    HELD.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|p| p == path)
}

/// Whether the process that wrote lock `text` (`<pid> [<host>]`) no longer holds it: silent for
/// longer than [`STALE`] (its heartbeat stopped), or, on this host, gone.
fn holder_is_gone(path: &Path, text: &str) -> bool {
    let mut fields = text.split_whitespace();
    let Some(pid) = fields.next().and_then(|p| p.parse::<i32>().ok()) else { return false };
    let same_host = fields.next().is_none_or(|h| h == crate::files::host());
    let predecessor = pid as u32 == std::process::id() && !held_here(path);
    let silent = age(path).is_some_and(|a| a > STALE);
    silent || (same_host && (predecessor || !process_alive(pid)))
}

/// How long ago `path` was last written, by the clock of the file system it lives on (a file
/// written just now in the same folder), not this host's.
fn age(path: &Path) -> Option<Duration> {
    let written = std::fs::metadata(path).ok()?.modified().ok()?;
    let probe = path.with_extension(format!("now.{}.{}", crate::files::host(), std::process::id()));
    std::fs::write(&probe, b"").ok()?;
    let now = std::fs::metadata(&probe).and_then(|m| m.modified()).ok();
    let _ = std::fs::remove_file(&probe);
    now.unwrap_or_else(SystemTime::now).duration_since(written).ok()
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; EPERM means it exists as another user's.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_of_gone_holders_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let lock = Lock::at(&path, "testing").unwrap();
        assert!(Lock::at(&path, "testing").is_err(), "a held lock is refused");
        drop(lock);
        assert!(!path.exists());
        // This host, a pid that cannot exist.
        std::fs::write(&path, format!("{} {}\n", i32::MAX, crate::files::host())).unwrap();
        drop(Lock::at(&path, "testing").unwrap());
        // This process's pid, not a lock it holds: a predecessor's (a retried container).
        std::fs::write(&path, format!("{} {}\n", std::process::id(), crate::files::host())).unwrap();
        drop(Lock::at(&path, "testing").unwrap());
        // Another host, refreshed just now: held.
        std::fs::write(&path, "1 some-other-node\n").unwrap();
        assert!(Lock::at(&path, "testing").is_err());
        // Another host, silent for longer than STALE: gone.
        let old = SystemTime::now() - STALE - Duration::from_secs(60);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
        drop(Lock::at(&path, "testing").unwrap());
    }
}
