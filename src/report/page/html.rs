//! The self-contained HTML page: styles and SVG inline, no script, nothing fetched, so it opens
//! offline and from an archive. Its markup stays well-formed XML (a test parses it as such).

use anyhow::Result;
use minijinja::value::Serde;

use super::content::Content;
use super::templates;

pub fn page(content: &Content) -> Result<String> {
    let env = templates::environment()?;
    Ok(env.get_template("report.html")?.render(Serde(content))?)
}
