//! Where patchbay keeps what it fetches and imports: the cache folder, the models folder, how a
//! model reference resolves to a directory, and staging folders for work moved into place when
//! complete.

use std::path::{Path, PathBuf};

/// `$PATCHBAY_CACHE`, else `$XDG_CACHE_HOME/patchbay`, else `~/.cache/patchbay`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PATCHBAY_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("patchbay");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("patchbay")
}

/// `$PATCHBAY_MODELS`, else `<cache>/models`.
pub fn models_dir() -> PathBuf {
    match std::env::var_os("PATCHBAY_MODELS") {
        Some(dir) => PathBuf::from(dir),
        None => cache_dir().join("models"),
    }
}

/// Resolve a model reference from an experiment file or the command line: a path (absolute, or
/// relative to `base`) when one exists there, else a name in the models folder.
pub fn resolve_model(reference: &str, base: &Path) -> PathBuf {
    let as_path = Path::new(reference);
    let candidate = if as_path.is_absolute() { as_path.to_path_buf() } else { base.join(as_path) };
    if candidate.exists() || reference.contains('/') {
        candidate
    } else {
        models_dir().join(reference)
    }
}

/// A fresh staging folder name `<parent>/<name>.partial-<pid>` for work that is moved into place
/// when complete. Staging folders of processes that no longer run (killed mid-way) are removed.
pub fn staging_dir(parent: &Path, name: &str) -> PathBuf {
    let prefix = format!("{name}.partial-");
    if let Ok(entries) = std::fs::read_dir(parent) {
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = file_name.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
            if pid == std::process::id() || !process_is_running(pid) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    parent.join(format!("{prefix}{}", std::process::id()))
}

fn process_is_running(pid: u32) -> bool {
    // Where we cannot tell, assume it runs: never delete another live process's work.
    !cfg!(target_os = "linux") || Path::new(&format!("/proc/{pid}")).exists()
}
