//! Stage 2: [`Ast`] -> typed, resolved [`Experiment`].
//!
//! Names are resolved (with "did you mean"), the model's manifest and tokenizer are read (the
//! model itself is never run), datasets are expanded and tokenised, corruptions are applied and
//! checked (STR must keep the token count), hooks, layers, heads and positions are checked
//! against the manifest. Every problem found is reported, not only the first.
//!
//! [`check`] drives a `Checker` through one phase per concept, each a method in the
//! module of its concept; every diagnostic is a [`error::CheckError`].

mod answers;
mod checker;
mod collect;
mod corrupt;
mod corruptions;
mod dataset_files;
mod datasets;
pub mod error;
mod expectations;
mod metrics;
mod model;
mod outputs;
mod patches;
mod pools;
mod sweep;
mod templates;
pub mod tok;

use std::path::Path;

use crate::diag::Diagnostic;
use crate::ir::experiment::*;
use crate::syntax::ast::{self, Ast};
use checker::Checker;

/// Read, parse and check one file.
pub fn check_file(path: &Path, device_override: Option<Device>) -> Result<Experiment, Vec<Diagnostic>> {
    let ast = crate::syntax::parse_file(path)?;
    check(&ast, path, device_override)
}

/// Check a parsed file. `path` is the experiment file (its stem names the experiment, its folder
/// anchors relative paths).
pub fn check(ast: &Ast, path: &Path, device_override: Option<Device>) -> Result<Experiment, Vec<Diagnostic>> {
    // Collects the definitions; names and statements given twice are reported.
    let mut c = Checker::new(ast, path);
    c.pools();
    c.model(device_override);
    c.metrics();
    c.corruptions();
    c.sweep();
    c.datasets();
    c.corrupt_datasets();
    c.wrong_answers();
    c.ablation_directions();
    c.patches();
    c.expectations();
    c.outputs();
    c.sweep_not_empty();
    c.finish()
}

impl From<&ast::Position> for Position {
    fn from(p: &ast::Position) -> Position {
        match p {
            ast::Position::End => Position::End,
            ast::Position::Index(i) => Position::Index(*i),
            ast::Position::Slot { name, first } => Position::Slot { name: name.clone(), first: *first },
        }
    }
}

impl From<ast::CmpOp> for CmpOp {
    fn from(op: ast::CmpOp) -> CmpOp {
        match op {
            ast::CmpOp::Gt => CmpOp::Gt,
            ast::CmpOp::Ge => CmpOp::Ge,
            ast::CmpOp::Lt => CmpOp::Lt,
            ast::CmpOp::Le => CmpOp::Le,
            ast::CmpOp::Eq => CmpOp::Eq,
            ast::CmpOp::Ne => CmpOp::Ne,
        }
    }
}
