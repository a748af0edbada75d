//! The Markdown summary, for terminals and code review: the page's tables, with links to its
//! heat maps and matrices written as SVG files beside it.

use anyhow::Result;
use minijinja::value::Serde;

use super::content::Content;
use super::templates;

/// A file beside the summary: its name and bytes.
pub type Beside = (String, Vec<u8>);

/// The summary and the SVG files it links.
pub fn summary(content: &Content) -> Result<(String, Vec<Beside>)> {
    let env = templates::environment()?;
    let text = env.get_template("report.md")?.render(Serde(content))?;
    let files = content.svgs().into_iter().map(|svg| (svg.file.clone(), svg.file_bytes())).collect();
    Ok((text, files))
}
