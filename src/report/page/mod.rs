//! The report a person reads: one experiment's result CSV (and its provenance sidecar) as a
//! self-contained HTML page or a Markdown summary with SVG files beside it. Heat maps per
//! variant, target and metric; detected and top components; the methodology comparison
//! (detected sets, Jaccard overlap, Spearman correlation, window peaks against the summation
//! baseline); expectations and provenance.
//!
//! Rendered from the CSV's bytes, not the run's memory, so `patchbay report` on a CSV and the
//! `report` statement at the end of `patchbay run` give the same page.
//!
//! read (CSV -> table) -> compare (detection, pairs, peaks) -> maps + heatmap (SVG heat maps,
//! hand-written for their per-cell tooltips), chart (window profiles, `plotters`) -> content
//! (what the report says) -> templates (`minijinja`) -> html | markdown.

pub mod chart;
pub mod compare;
pub mod content;
pub mod escape;
pub mod heatmap;
pub mod html;
pub mod maps;
pub mod markdown;
pub mod read;
pub mod sidecar;
pub mod templates;

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::{bail_fixable, fixable};
use content::Content;
use sidecar::Sidecar;

/// The first line of every file a report writes; a file without it is never replaced unless
/// forced.
pub const MARKER: &str = "<!-- patchbay report -->";

pub use crate::ir::experiment::ReportKind as Kind;

/// The report to write to `path`, by its extension.
pub fn kind_of(path: &Path) -> Result<Kind> {
    match Kind::of(path) {
        Some(kind) => Ok(kind),
        None => bail_fixable!(
                "cannot tell which report to write to {}", path.display();
                help: "name the report `.html` (a self-contained page) or `.md` (Markdown with SVG files beside it)"
        ),
    }
}

/// The files of the report at `target`, from a result CSV and its sidecar (names for errors).
pub fn render(csv: (&[u8], &str), sidecar: Option<(&[u8], &str)>, target: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let kind = kind_of(target)?;
    let table = read::read(csv.0, csv.1)?;
    let sidecar = sidecar.map(|(bytes, name)| Sidecar::parse(bytes, name)).transpose()?;
    let stem = target.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let source = Path::new(csv.1).file_name().map_or(csv.1.into(), |n| n.to_string_lossy().into_owned());
    let content = Content::build(&table, sidecar.as_ref(), &source, &stem)?;
    let dir = target.parent().unwrap_or(Path::new(""));
    Ok(match kind {
        Kind::Html => vec![(target.to_path_buf(), html::page(&content)?.into_bytes())],
        Kind::Markdown => {
            let (text, svgs) = markdown::summary(&content)?;
            let mut files = vec![(target.to_path_buf(), text.into_bytes())];
            files.extend(svgs.into_iter().map(|(name, bytes)| (dir.join(name), bytes)));
            files
        }
    })
}

/// Refuse to replace a file that a report did not write, unless `force`.
pub fn ensure_replaceable(path: &Path, force: bool) -> Result<()> {
    if force || !path.exists() {
        return Ok(());
    }
    let mut head = Vec::with_capacity(MARKER.len());
    let is_report =
        std::fs::File::open(path).and_then(|f| f.take(MARKER.len() as u64).read_to_end(&mut head).map(|_| ())).is_ok()
            && head.starts_with(MARKER.as_bytes());
    if !is_report {
        bail_fixable!(
            "{} exists and is not a patchbay report; not replacing it", path.display();
            help: "move it away, write the report elsewhere (`--out DIR`), or pass `--force` to replace it"
        );
    }
    Ok(())
}

/// Write a report's files (each atomically), after checking that none replaces a file that
/// is not a report.
pub fn write(files: &[(PathBuf, Vec<u8>)], force: bool) -> Result<()> {
    for (path, _) in files {
        ensure_replaceable(path, force)?;
    }
    for (path, bytes) in files {
        crate::files::write_atomic(path, bytes)?;
    }
    Ok(())
}

/// `patchbay report RESULTS.csv`: the report of a result CSV (with the sidecar beside it, when
/// there is one) written to `out` (default: the CSV's folder); the main file's path.
pub fn report_csv(csv: &Path, out: Option<&Path>, kind: Kind, force: bool) -> Result<PathBuf> {
    let bytes = std::fs::read(csv).map_err(
        |e| fixable!("cannot read {}: {e}", csv.display(); help: "give the `output` CSV that `patchbay run` wrote"),
    )?;
    let sidecar_path = csv.with_extension("provenance.json");
    let sidecar = std::fs::read(&sidecar_path).ok();
    let dir = out.map(Path::to_path_buf).unwrap_or_else(|| csv.parent().unwrap_or(Path::new("")).to_path_buf());
    std::fs::create_dir_all(if dir.as_os_str().is_empty() { Path::new(".") } else { &dir })
        .map_err(|e| fixable!("cannot create {}: {e}", dir.display(); help: "choose another `--out` folder"))?;
    let stem = csv.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "report".into());
    let target = dir.join(format!("{stem}.{}", if kind == Kind::Html { "html" } else { "md" }));
    let (csv_name, sidecar_name) = (csv.display().to_string(), sidecar_path.display().to_string());
    let files = render((&bytes, &csv_name), sidecar.as_deref().map(|b| (b, sidecar_name.as_str())), &target)?;
    write(&files, force)?;
    Ok(target)
}
