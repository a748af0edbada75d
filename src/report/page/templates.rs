//! The template engine (minijinja) set up for reports: templates compiled into the binary,
//! undefined names an error, and every printed string escaped for its target by one
//! formatter (HTML for `.html` templates, Markdown for `.md`), so no template can forget to.

use minijinja::{AutoEscape, Environment, Error, Output, State, UndefinedBehavior, Value};

use super::escape;

const TEMPLATES: [(&str, &str); 2] =
    [("report.html", include_str!("templates/report.html")), ("report.md", include_str!("templates/report.md"))];

/// Values marked `|safe` (SVG markup the report drew itself) pass as they are; every other
/// string is escaped, control bytes made visible.
fn formatter(out: &mut Output, state: &mut State, value: &Value) -> Result<(), Error> {
    let text = if value.is_safe() {
        value.to_string()
    } else {
        let s = value.to_string();
        match state.auto_escape() {
            AutoEscape::Html => escape::xml(&s),
            _ => escape::markdown(&s),
        }
    };
    out.write_str(&text).map_err(Error::from)
}

/// The report templates, ready to render.
pub fn environment() -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".html") {
            AutoEscape::Html
        } else {
            AutoEscape::Custom("markdown".into())
        }
    });
    env.set_formatter(formatter);
    for (name, source) in TEMPLATES {
        env.add_template(name, source)?;
    }
    Ok(env)
}
