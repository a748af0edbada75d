//! Reading the files an experiment names (the experiment itself, includes, pool files, dataset
//! files): regular files of bounded size only, so that `include "/dev/zero"` or a named pipe is an
//! error rather than a read that never ends.

use std::io::{self, Read};
use std::path::Path;

/// The largest file the language reads: far above any experiment, pool or prompt dataset.
pub const MAX_INPUT_BYTES: u64 = 64 << 20;

/// The UTF-8 text of the regular file at `path`, at most [`MAX_INPUT_BYTES`] long.
pub fn read_text(path: &Path) -> io::Result<String> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(io::Error::new(io::ErrorKind::IsADirectory, "is a folder, not a file"));
    }
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "is not a regular file (a device, pipe or socket)"));
    }
    let mut bytes = Vec::new();
    // Bounded even when the size reported differs from what a read yields (files under /proc).
    std::fs::File::open(path)?.take(MAX_INPUT_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!("is larger than {} MiB, the limit for files an experiment reads", MAX_INPUT_BYTES >> 20),
        ));
    }
    String::from_utf8(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "is not UTF-8 text"))
}
