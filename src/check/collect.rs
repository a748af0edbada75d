//! The statements of a file, grouped by kind; a name or statement given twice is reported here.

use std::collections::BTreeMap;

use super::error::CheckError;
use crate::diag::{Diagnostic, Span};
use crate::syntax::ast::{self, Ast, Axis, Expect, Ident, Patch, Spanned, StatementKind};

/// A `corruption` statement: its name, kind and span, and whether it was included.
pub type CorruptionDef<'a> = (&'a Ident, &'a ast::CorruptionKind, &'a Span, bool);
/// A `metric` statement: its name, kind, options, and whether it was included.
pub type MetricDef<'a> = (&'a Ident, &'a Ident, &'a Vec<Ident>, bool);

/// The definitions of an experiment, each name defined once (later definitions are dropped;
/// pools are de-duplicated when they are loaded).
#[derive(Default)]
pub struct Definitions<'a> {
    pub model: Option<(&'a Spanned<String>, Option<&'a Ident>, &'a Span)>,
    pub batch: Option<&'a Spanned<i64>>,
    /// Every `pool` statement, a name defined twice included (see `Checker::pools`).
    pub pools: Vec<&'a ast::Pool>,
    pub datasets: Vec<&'a ast::Dataset>,
    pub corruptions: Vec<CorruptionDef<'a>>,
    /// Patches, and whether each was included.
    pub patches: Vec<(&'a Patch, bool)>,
    pub metrics: Vec<MetricDef<'a>>,
    pub average: Option<&'a Ident>,
    pub sweep: Option<(&'a Vec<Axis>, &'a Span)>,
    pub expects: Vec<(&'a Expect, &'a Span)>,
    /// `output`, `per_prompt` and `report`.
    pub outputs: [Option<&'a Spanned<String>>; 3],
}

impl<'a> Definitions<'a> {
    /// Group the statements of `ast`, reporting names defined twice and statements given twice.
    pub fn collect(ast: &'a Ast, errors: &mut Vec<Diagnostic>) -> Definitions<'a> {
        let mut defs = Definitions::default();
        let mut names: BTreeMap<(&str, String), Span> = BTreeMap::new();
        let mut define = |kind: &'static str, id: &Ident, errors: &mut Vec<Diagnostic>| -> bool {
            let key = (kind, id.node.clone());
            if let Some(prev) = names.get(&key) {
                errors.push(CheckError::duplicate(kind, &id.node, prev).at(&id.span));
                false
            } else {
                names.insert(key, id.span.clone());
                true
            }
        };
        let once = |what: &str, span: &Span, prev: Option<&Span>, errors: &mut Vec<Diagnostic>| {
            if let Some(p) = prev {
                errors.push(CheckError::duplicate("statement", what, p).at(span));
            }
        };
        for st in &ast.statements {
            match &st.kind {
                StatementKind::Include(_) => {}
                StatementKind::Model { reference, device } => {
                    once("model", &st.span, defs.model.map(|m| m.2), errors);
                    defs.model = Some((reference, device.as_ref(), &st.span));
                }
                StatementKind::Batch(b) => {
                    once("batch", &b.span, defs.batch.map(|b| &b.span), errors);
                    defs.batch = Some(b);
                }
                // Pools are defined, in order, by the pools phase, which loads them.
                StatementKind::Pool(p) => defs.pools.push(p),
                StatementKind::Dataset(d) => {
                    if define("dataset", &d.name, errors) {
                        defs.datasets.push(d);
                    }
                }
                StatementKind::Corruption { name, kind } => {
                    if define("corruption", name, errors) {
                        defs.corruptions.push((name, kind, &st.span, st.included));
                    }
                }
                StatementKind::Patch(p) => {
                    if define("patch", &p.name, errors) {
                        defs.patches.push((p, st.included));
                    }
                }
                StatementKind::Metric { name, kind, options } => {
                    if define("metric", name, errors) {
                        defs.metrics.push((name, kind, options, st.included));
                    }
                }
                StatementKind::Average(a) => {
                    once("average", &a.span, defs.average.map(|a| &a.span), errors);
                    defs.average = Some(a);
                }
                StatementKind::Sweep(axes) => {
                    once("sweep", &st.span, defs.sweep.map(|s| s.1), errors);
                    defs.sweep = Some((axes, &st.span));
                }
                StatementKind::Expect(e) => defs.expects.push((e, &st.span)),
                StatementKind::Output(s) | StatementKind::PerPrompt(s) | StatementKind::Report(s) => {
                    let (i, what) = match &st.kind {
                        StatementKind::Output(_) => (0, "output"),
                        StatementKind::PerPrompt(_) => (1, "per_prompt"),
                        _ => (2, "report"),
                    };
                    once(what, &s.span, defs.outputs[i].map(|o| &o.span), errors);
                    defs.outputs[i] = Some(s);
                }
            }
        }
        defs
    }
}
