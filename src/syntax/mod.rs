//! Stage 1: source text -> [`Ast`] with spans.
//!
//! The grammar is `grammar/bay.pest`. Parsing recovers after a syntax error inside a `{ ... }` block
//! at the block's next line keyword, and otherwise at the next
//! unindented statement keyword, so every broken statement of a file is reported at once.
//! `include "file.bay"` splices the statements of another file (resolved relative to the
//! including file); diagnostics about included statements point into the included file.

pub mod ast;
pub mod diag;
pub mod parser;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use ast::*;
pub use diag::{Diagnostic, SourceFile, Span};

/// Parse `source` (the text of the file at `path`), following `include`s.
pub fn parse(source: &str, path: &Path) -> Result<Ast, Vec<Diagnostic>> {
    let file = SourceFile::new(path, source.to_string());
    parse_source(&file)
}

/// Read and parse the file at `path`.
pub fn parse_file(path: &Path) -> Result<Ast, Vec<Diagnostic>> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, path),
        Err(e) => Err(vec![Diagnostic::bare("patchbay::io", format!("cannot read {}: {e}", path.display()))]),
    }
}

/// Parse an already loaded source file, following `include`s.
pub fn parse_source(file: &Arc<SourceFile>) -> Result<Ast, Vec<Diagnostic>> {
    let mut ast = Ast::default();
    let mut errors = Vec::new();
    let mut stack = vec![canonical(&file.path)];
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

const MAX_INCLUDE_DEPTH: usize = 16;

fn expand(
    file: &Arc<SourceFile>,
    included: bool,
    stack: &mut Vec<PathBuf>,
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
            if stack.contains(&key) {
                errors.push(
                    Diagnostic::error(
                        "patchbay::include_cycle",
                        format!("`{}` includes itself", target.node),
                        &target.span,
                        "include cycle",
                    )
                    .help("remove one of the includes that form the cycle"),
                );
            } else if stack.len() >= MAX_INCLUDE_DEPTH {
                errors.push(Diagnostic::error(
                    "patchbay::include_depth",
                    "includes nested too deeply",
                    &target.span,
                    "here",
                ));
            } else {
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        let inc = SourceFile::new(&path, text);
                        stack.push(key);
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
