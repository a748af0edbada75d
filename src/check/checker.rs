//! The checker's shared state: the definitions of the file, what each phase has resolved so
//! far, and the diagnostics found. Each phase is a method in the module of its concept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::collect::Definitions;
use super::tok::Tok;
use crate::diag::{Diagnostic, Span};
use crate::ir::experiment::*;
use crate::syntax::ast::{self, Ast, Ident, Pool, PoolSource, Spanned, StatementKind};

/// A pool's values and where it was defined.
#[derive(Clone)]
pub struct PoolValues {
    pub values: Vec<String>,
    pub span: Span,
}

/// A dataset with what corrupting it needs besides its prompts.
pub struct Built {
    pub dataset: Dataset,
    /// Slot -> pool, for resampling.
    pub pools: BTreeMap<String, Vec<String>>,
    pub counterfactual: Option<Vec<String>>,
    pub seed: u64,
}

pub struct Checker<'a> {
    pub ast: &'a Ast,
    /// The experiment file.
    pub path: &'a Path,
    pub defs: Definitions<'a>,
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
    /// Top-level pools by name. A pool that failed to load (empty, missing file) stays defined,
    /// with no values, so that its uses do not report a follow-on "unknown pool".
    pub pools: BTreeMap<String, PoolValues>,
    pub model: Option<Model>,
    pub tok: Option<Tok>,
    pub metrics: Vec<Metric>,
    pub corruptions: Vec<Corruption>,
    /// Per corruption: the slots it names (checked per dataset) and its statement.
    pub corruption_slots: BTreeMap<String, (Vec<Ident>, Span)>,
    pub sweep: Sweep,
    /// The sweep's `metric: [...]` axis, for a label.
    pub metric_axis: Option<Span>,
    pub datasets: Vec<Built>,
    pub patches: Vec<PatchTarget>,
    pub expectations: Vec<Expectation>,
    pub batch_size: Option<usize>,
    pub outputs: Outputs,
}

impl<'a> Checker<'a> {
    /// A checker for `ast`, read from `path`, with its definitions collected.
    pub fn new(ast: &'a Ast, path: &'a Path) -> Checker<'a> {
        let mut errors = Vec::new();
        let defs = Definitions::collect(ast, &mut errors);
        Checker {
            ast,
            path,
            defs,
            errors,
            warnings: Vec::new(),
            pools: BTreeMap::new(),
            model: None,
            tok: None,
            metrics: Vec::new(),
            corruptions: Vec::new(),
            corruption_slots: BTreeMap::new(),
            sweep: Sweep {
                datasets: Vec::new(),
                corruptions: Vec::new(),
                directions: vec![Direction::Denoise],
                patches: Vec::new(),
                metrics: Vec::new(),
            },
            metric_axis: None,
            datasets: Vec::new(),
            patches: Vec::new(),
            expectations: Vec::new(),
            batch_size: None,
            outputs: Outputs::default(),
        }
    }

    /// The start of the experiment file (for errors about the whole experiment), if it has a
    /// statement of its own.
    pub fn file_start(&self) -> Option<Span> {
        self.ast.statements.iter().find(|s| !s.included).map(|st| Span::new(&st.span.file, 0..0))
    }

    /// The datasets the sweep runs.
    pub fn sweep_datasets(&self) -> impl Iterator<Item = &Built> {
        self.datasets.iter().filter(|b| self.sweep.datasets.contains(&b.dataset.name))
    }

    /// The experiment, or every error found (errors sorted by place; then the warnings).
    pub fn finish(mut self) -> Result<Experiment, Vec<Diagnostic>> {
        self.errors.sort_by_key(|d| d.span.as_ref().map(|s| (s.file.name.clone(), s.range.start)));
        let model = match self.model {
            Some(model) if self.errors.is_empty() => model,
            _ => {
                self.errors.extend(self.warnings);
                return Err(self.errors);
            }
        };
        Ok(Experiment {
            name: self
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "experiment".into()),
            source: self.path.to_path_buf(),
            model,
            batch_size: self.batch_size,
            datasets: self.datasets.into_iter().map(|b| b.dataset).collect(),
            corruptions: self.corruptions,
            patches: self.patches,
            metrics: self.metrics,
            sweep: self.sweep,
            expectations: self.expectations,
            outputs: self.outputs,
            inputs: input_files(self.ast),
            warnings: self.warnings,
        })
    }
}

/// Every file the experiment read besides itself: included files, pool files and prompt files,
/// each once, sorted.
fn input_files(ast: &Ast) -> Vec<PathBuf> {
    let mut files = std::collections::BTreeSet::new();
    for st in &ast.statements {
        let named = |s: &Spanned<String>| s.span.file.dir().join(&s.node);
        if st.included {
            files.insert(st.span.file.path.clone());
        }
        match &st.kind {
            StatementKind::Include(target) => files.insert(named(target)),
            StatementKind::Pool(Pool { source: PoolSource::File(f), .. }) => files.insert(named(f)),
            StatementKind::Dataset(ast::Dataset { file: Some(f), .. }) => files.insert(named(f)),
            _ => false,
        };
    }
    files.into_iter().collect()
}
