//! Writing files so that readers (and other processes on shared storage) never see half of one:
//! a temporary file in the same folder, then a rename, the one file-system operation relied on
//! (atomic within one directory, also on NFS).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Write `bytes` to `path` atomically, replacing what is there.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary(path);
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write {}: {e}", path.display());
    }
    Ok(())
}

/// Publish `content` at `path` unless something is there already (a hard link fails rather
/// than replaces, so the first of several processes starting at once wins); what `path` holds
/// after.
pub fn publish_once(path: &Path, content: &str) -> Result<String> {
    if !path.exists() {
        let tmp = temporary(path);
        std::fs::write(&tmp, content).with_context(|| format!("cannot write {}", tmp.display()))?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => bail!("cannot write {}: {e}", path.display()),
            _ => {}
        }
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// This machine's host name.
pub fn host() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match ok {
        true => String::from_utf8_lossy(&buf[..end]).into_owned(),
        false => "unknown-host".into(),
    }
}

/// A temporary name beside `path`, unique to this process on this host (shared storage may
/// see several hosts' processes with the same pid).
fn temporary(path: &Path) -> PathBuf {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!(".{name}.{}.{}.tmp", host(), std::process::id()))
}
