//! Text made safe for where it lands. Token text comes from model vocabularies, which hold `<`,
//! `&`, quotes and control bytes; labels come from a CSV anyone may edit. Nothing from either
//! may become markup, and control bytes (invalid in XML, invisible in HTML) are shown escaped.

/// Control characters written as Rust escapes (`\n`, `\u{7}`) so that they are visible and
/// the text stays valid XML.
pub fn visible(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { c.escape_debug().to_string() } else { c.to_string() }).collect()
}

/// The entity of a character that starts or ends markup, in HTML and in Markdown alike.
fn entity(c: char) -> Option<&'static str> {
    match c {
        '&' => Some("&amp;"),
        '<' => Some("&lt;"),
        '>' => Some("&gt;"),
        _ => None,
    }
}

/// Text for an XML/HTML text node or a quoted attribute value.
pub fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in visible(s).chars() {
        match (entity(c), c) {
            (Some(e), _) => out.push_str(e),
            (None, '"') => out.push_str("&quot;"),
            (None, '\'') => out.push_str("&#39;"),
            (None, c) => out.push(c),
        }
    }
    out
}

/// Text for a Markdown table cell or heading: markup characters are escaped (HTML ones as
/// entities, since Markdown renderers pass raw HTML through) and nothing breaks the table row.
pub fn markdown(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in visible(s).chars() {
        if let Some(e) = entity(c) {
            out.push_str(e);
            continue;
        }
        match c {
            '\\' | '|' | '*' | '_' | '`' | '[' | ']' | '#' | '~' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// A token's text as a label: quoted, so leading spaces show (`" Mary"`), control bytes escaped.
pub fn token(s: &str) -> String {
    format!("{s:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_and_control_bytes_become_text() {
        assert_eq!(xml("<script>a&'\"\u{7}\n"), "&lt;script&gt;a&amp;&#39;&quot;\\u{7}\\n");
        assert_eq!(markdown("a|b<c>_\u{0}"), "a\\|b&lt;c&gt;\\_\\\\0");
        assert_eq!(token(" Mary\n"), "\" Mary\\n\"");
    }
}
