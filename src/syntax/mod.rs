//! Stage 1: source text -> [`Ast`] with spans.
//!
//! The grammar is `grammar/bay.pest`. Parsing recovers after a syntax error inside a `{ ... }` block
//! at the block's next line keyword, and otherwise at the next
//! unindented statement keyword, so every broken statement of a file is reported at once.
//! `include "file.bay"` splices the statements of another file (resolved relative to the
//! including file); diagnostics about included statements point into the included file.

pub mod ast;

pub mod files;
mod lower;
pub mod parser;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::diag::{Diagnostic, SourceFile, Span};
pub use ast::*;

/// Parse `source` (the text of the file at `path`), following `include`s.
pub fn parse(source: &str, path: &Path) -> Result<Ast, Vec<Diagnostic>> {
    let file = SourceFile::new(path, source.to_string());
    parse_source(&file)
}

/// Read and parse the file at `path`.
pub fn parse_file(path: &Path) -> Result<Ast, Vec<Diagnostic>> {
    match files::read_text(path) {
        Ok(text) => parse(&text, path),
        Err(e) => Err(vec![Diagnostic::bare("patchbay::io", format!("cannot read {}: {e}", path.display()))
            .help("check the path: experiment files are UTF-8 text, e.g. `patchbay check examples/ioi.bay`")]),
    }
}

/// Parse an already loaded source file, following `include`s.
pub fn parse_source(file: &Arc<SourceFile>) -> Result<Ast, Vec<Diagnostic>> {
    let mut ast = Ast { statements: Vec::new(), root: Some(file.clone()) };
    let mut errors = Vec::new();
    let mut stack = vec![(canonical(&file.path), display_name(&file.path, &file.dir()))];
    expand(file, false, &mut stack, &mut ast, &mut errors);
    if errors.iter().any(|d| d.is_error()) {
        Err(errors)
    } else {
        Ok(ast)
    }
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A file's name in an include chain: relative to the experiment file's folder where possible.
fn display_name(path: &Path, root_dir: &Path) -> String {
    let p = path.strip_prefix(root_dir).unwrap_or(path);
    let p = p.strip_prefix(".").unwrap_or(p);
    p.display().to_string()
}

const MAX_INCLUDE_DEPTH: usize = 16;

fn expand(
    file: &Arc<SourceFile>,
    included: bool,
    stack: &mut Vec<(PathBuf, String)>,
    ast: &mut Ast,
    errors: &mut Vec<Diagnostic>,
) {
    let (statements, errs) = parser::parse_statements(file);
    errors.extend(errs);
    for mut st in statements {
        st.included = included;
        if let StatementKind::Include(target) = &st.kind {
            let path = file.dir().join(&target.node);
            let key = canonical(&path);
            if let Some(i) = stack.iter().position(|(k, _)| *k == key) {
                // The chain from the first inclusion of the file back to itself.
                let mut chain: Vec<&str> = stack[i..].iter().map(|(_, n)| n.as_str()).collect();
                chain.push(stack[i].1.as_str());
                let message = if chain.len() == 2 {
                    format!("include cycle: `{}` includes itself", chain[0])
                } else {
                    format!("include cycle: {}", chain.join(" -> "))
                };
                errors.push(
                    Diagnostic::error(
                        "patchbay::include_cycle",
                        message,
                        &target.span,
                        "this include closes the cycle",
                    )
                    .help(format!(
                        "remove one of the includes of the chain {}; put shared definitions in a file that \
                             includes nothing and include it from the experiment file",
                        chain.join(" -> ")
                    )),
                );
            } else if stack.len() >= MAX_INCLUDE_DEPTH {
                errors.push(
                    Diagnostic::error(
                        "patchbay::include_depth",
                        format!("includes nested too deeply (more than {MAX_INCLUDE_DEPTH} files deep)"),
                        &target.span,
                        "one include too many",
                    )
                    .help(format!(
                        "includes may nest at most {MAX_INCLUDE_DEPTH} files deep: include the shared files directly \
                         from the experiment file instead of through a chain (e.g. `include \"{}\"` there)",
                        target.node
                    )),
                );
            } else {
                match files::read_text(&path) {
                    Ok(text) => {
                        let inc = SourceFile::new(&path, text);
                        let root_dir = stack[0].0.parent().map(Path::to_path_buf).unwrap_or_default();
                        stack.push((key.clone(), display_name(&key, &root_dir)));
                        ast.statements.push(st.clone());
                        expand(&inc, true, stack, ast, errors);
                        stack.pop();
                        continue;
                    }
                    Err(e) => errors.push(
                        Diagnostic::error(
                            "patchbay::missing_file",
                            format!("cannot read included file `{}`", target.node),
                            &target.span,
                            format!("{e}"),
                        )
                        .help(format!(
                            "paths are relative to the including file's folder: looked for {}",
                            path.display()
                        )),
                    ),
                }
            }
        }
        ast.statements.push(st);
    }
}
