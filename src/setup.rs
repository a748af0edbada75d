//! Where patchbay keeps what it fetches: the cache directory, the models folder, the demo model.

use std::path::{Path, PathBuf};

/// Name of the built-in demo model in the models folder.
pub const DEMO_MODEL: &str = "smollm2-135m";

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
