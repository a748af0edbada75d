//! Stage 2: [`Ast`] -> typed, resolved [`Experiment`].
//!
//! Names are resolved (with "did you mean"), the model's manifest and tokenizer are read (the
//! model itself is never run), datasets are expanded and tokenised, corruptions are applied and
//! checked (STR must keep the token count), hooks, layers, heads and positions are checked
//! against the manifest. Every problem found is reported, not only the first.

pub mod datasets;
pub mod targets;
pub mod tok;

use std::collections::BTreeMap;
use std::path::Path;

use crate::ir::experiment::*;

use crate::diag::{Diagnostic, Span};
use crate::model::{Manifest, TOKENIZER_FILE};
use crate::syntax::ast::{self, Ast, Axis, Expect, Ident, Patch, Spanned, StatementKind};
use datasets::{unknown, PoolValues};
use tok::Tok;

/// "`x` is defined twice" with both places labelled.
pub fn duplicate(what: &str, name: &str, span: &Span, prev: &Span) -> Diagnostic {
    Diagnostic::error("patchbay::duplicate", format!("{what} `{name}` is defined twice"), span, "defined again here")
        .with_label(prev, "first defined here")
        .help("rename one of them, or delete the repeated definition")
}

/// Read, parse and check one file.
pub fn check_file(path: &Path, device_override: Option<Device>) -> Result<Experiment, Vec<Diagnostic>> {
    let ast = crate::syntax::parse_file(path)?;
    check(&ast, path, device_override)
}

/// Check a parsed file. `path` is the experiment file (its stem names the experiment, its folder
/// anchors relative paths).
pub fn check(ast: &Ast, path: &Path, device_override: Option<Device>) -> Result<Experiment, Vec<Diagnostic>> {
    let mut errors: Vec<Diagnostic> = Vec::new();

    // ---- collect and de-duplicate definitions --------------------------------------------
    let mut model_stmt: Option<(&Spanned<String>, Option<&Ident>, &Span)> = None;
    let mut batch: Option<&Spanned<i64>> = None;
    let mut pools: BTreeMap<String, PoolValues> = BTreeMap::new();
    let mut dataset_asts: Vec<&ast::Dataset> = Vec::new();
    let mut corruption_asts: Vec<(&Ident, &ast::CorruptionKind, &Span, bool)> = Vec::new();
    let mut patch_asts: Vec<(&Patch, bool)> = Vec::new();
    let mut metric_asts: Vec<(&Ident, &Ident, &Vec<Ident>, bool)> = Vec::new();
    let mut average: Option<&Ident> = None;
    let mut sweep: Option<(&Vec<Axis>, &Span)> = None;
    let mut expects: Vec<(&Expect, &Span)> = Vec::new();
    let mut outputs: [Option<&Spanned<String>>; 3] = [None, None, None];
    let mut names: BTreeMap<(&str, String), Span> = BTreeMap::new();
    let mut define = |kind: &'static str, id: &Ident, errors: &mut Vec<Diagnostic>| -> bool {
        let key = (kind, id.node.clone());
        if let Some(prev) = names.get(&key) {
            errors.push(duplicate(kind, &id.node, &id.span, prev));
            false
        } else {
            names.insert(key, id.span.clone());
            true
        }
    };
    let once = |what: &str, span: &Span, prev: Option<&Span>, errors: &mut Vec<Diagnostic>| {
        if let Some(p) = prev {
            errors.push(duplicate("statement", what, span, p));
        }
    };
    for st in &ast.statements {
        match &st.kind {
            StatementKind::Include(_) => {}
            StatementKind::Model { reference, device } => {
                once("model", &st.span, model_stmt.map(|m| m.2), &mut errors);
                model_stmt = Some((reference, device.as_ref(), &st.span));
            }
            StatementKind::Batch(b) => {
                once("batch", &b.span, batch.map(|b| &b.span), &mut errors);
                batch = Some(b);
            }
            StatementKind::Pool(p) => {
                if define("pool", &p.name, &mut errors) {
                    // A pool that failed to load (empty, missing file) stays defined, with no
                    // values, so that its uses do not report a follow-on "unknown pool".
                    let v = datasets::load_pool(p, &mut errors)
                        .unwrap_or(PoolValues { values: Vec::new(), span: p.name.span.clone() });
                    pools.insert(p.name.node.clone(), v);
                }
            }
            StatementKind::Dataset(d) => {
                if define("dataset", &d.name, &mut errors) {
                    dataset_asts.push(d);
                }
            }
            StatementKind::Corruption { name, kind } => {
                if define("corruption", name, &mut errors) {
                    corruption_asts.push((name, kind, &st.span, st.included));
                }
            }
            StatementKind::Patch(p) => {
                if define("patch", &p.name, &mut errors) {
                    patch_asts.push((p, st.included));
                }
            }
            StatementKind::Metric { name, kind, options } => {
                if define("metric", name, &mut errors) {
                    metric_asts.push((name, kind, options, st.included));
                }
            }
            StatementKind::Average(a) => {
                once("average", &a.span, average.map(|a| &a.span), &mut errors);
                average = Some(a);
            }
            StatementKind::Sweep(axes) => {
                once("sweep", &st.span, sweep.map(|s| s.1), &mut errors);
                sweep = Some((axes, &st.span));
            }
            StatementKind::Expect(e) => expects.push((e, &st.span)),
            StatementKind::Output(s) | StatementKind::PerPrompt(s) | StatementKind::Report(s) => {
                let (i, what) = match &st.kind {
                    StatementKind::Output(_) => (0, "output"),
                    StatementKind::PerPrompt(_) => (1, "per_prompt"),
                    _ => (2, "report"),
                };
                once(what, &s.span, outputs[i].map(|o| &o.span), &mut errors);
                outputs[i] = Some(s);
            }
        }
    }

    // ---- model ---------------------------------------------------------------------------
    let mut model: Option<(Model, Tok)> = None;
    match model_stmt {
        None => {
            let empty = ast.statements.is_empty();
            let message = if empty {
                format!("{} has no statements, so it names no model", path.display())
            } else {
                format!("{} names no model", path.display())
            };
            let mut d = Diagnostic::bare("patchbay::no_model", message).help(
                "add a line like `model \"smollm2-135m\" on cpu` (a model directory or a name in the models \
                 folder); spec/language.md shows a complete experiment",
            );
            // Point at the start of the experiment file, even when it is empty or all comments.
            let file = ast.statements.iter().find(|s| !s.included).map(|st| st.span.file.clone()).or(ast.root.clone());
            if let Some(file) = file {
                d.span = Some(Span::new(&file, 0..0));
                d.label = "expected a `model` statement".into();
            }
            errors.push(d);
        }
        Some((reference, device, _)) => {
            let mut dev = Device::Cpu;
            if let Some(d) = device {
                match d.node.parse::<Device>().ok() {
                    Some(x) => dev = x,
                    None => errors.push(unknown("device", d, ["cpu", "cuda"]).help("devices are `cpu` and `cuda`")),
                }
            }
            if let Some(o) = device_override {
                dev = o;
            }
            let dir = crate::cache::resolve_model(&reference.node, &reference.span.file.dir());
            let help = "run `patchbay demo` to fetch the demo model or `patchbay import ...`";
            if !dir.is_dir() {
                errors.push(
                    Diagnostic::error(
                        "patchbay::missing_model",
                        format!("model `{}` not found", reference.node),
                        &reference.span,
                        format!("no model directory at {}", dir.display()),
                    )
                    .help(help),
                );
            } else {
                match Manifest::load(&dir) {
                    Err(e) => errors.push(
                        Diagnostic::error(
                            "patchbay::bad_model",
                            format!("cannot read the model's manifest: {e}"),
                            &reference.span,
                            "this model",
                        )
                        .help(help),
                    ),
                    Ok(manifest) => match tokenizers::Tokenizer::from_file(dir.join(TOKENIZER_FILE)) {
                        Err(e) => errors.push(
                            Diagnostic::error(
                                "patchbay::bad_model",
                                format!("cannot load the model's tokenizer: {e}"),
                                &reference.span,
                                "this model",
                            )
                            .help(help),
                        ),
                        Ok(t) => {
                            model = Some((
                                Model { reference: reference.node.clone(), dir, manifest, device: dev },
                                Tok::new(t),
                            ));
                        }
                    },
                }
            }
        }
    }
    let tok = model.as_ref().map(|m| &m.1);

    // ---- metrics -------------------------------------------------------------------------
    let default_avg = match average {
        None => Averaging::RatioOfMeans,
        Some(a) => match a.node.as_str() {
            "ratio_of_means" => Averaging::RatioOfMeans,
            "per_prompt_mean" => Averaging::PerPromptMean,
            _ => {
                errors.push(unknown("averaging", a, ["ratio_of_means", "per_prompt_mean"]));
                Averaging::RatioOfMeans
            }
        },
    };
    let mut metrics = Vec::new();
    for (name, kind, options, _) in &metric_asts {
        let Some((_, k)) = MetricKind::ALL.iter().find(|(n, _)| *n == kind.node) else {
            errors.push(unknown("metric kind", kind, MetricKind::ALL.iter().map(|(n, _)| *n)));
            continue;
        };
        let mut m = Metric { name: name.node.clone(), kind: *k, normalized: false, averaging: default_avg };
        for o in options.iter() {
            match o.node.as_str() {
                "normalized" | "normalised" => m.normalized = true,
                "ratio_of_means" => m.averaging = Averaging::RatioOfMeans,
                "per_prompt_mean" => m.averaging = Averaging::PerPromptMean,
                _ => errors.push(unknown("metric option", o, ["normalized", "ratio_of_means", "per_prompt_mean"])),
            }
        }
        metrics.push(m);
    }

    // ---- corruptions (dataset-independent part) ------------------------------------------
    let mut corruptions = Vec::new();
    let mut corruption_slots: BTreeMap<String, (Vec<Ident>, Span)> = BTreeMap::new();
    for (name, kind, span, _) in &corruption_asts {
        if let Some((c, slots)) = targets::corruption(name, kind, &mut errors) {
            corruption_slots.insert(name.node.clone(), (slots, (*span).clone()));
            corruptions.push(c);
        }
    }

    // ---- sweep -----------------------------------------------------------------------------
    let main_or_all = |items: Vec<(String, bool)>| -> Vec<String> {
        let main: Vec<String> = items.iter().filter(|(_, inc)| !inc).map(|(n, _)| n.clone()).collect();
        if main.is_empty() {
            items.into_iter().map(|(n, _)| n).collect()
        } else {
            main
        }
    };
    let ds_included: BTreeMap<String, bool> = ast
        .statements
        .iter()
        .filter_map(|s| match &s.kind {
            StatementKind::Dataset(d) => Some((d.name.node.clone(), s.included)),
            _ => None,
        })
        .collect();
    let mut sw = Sweep {
        datasets: main_or_all(dataset_asts.iter().map(|d| (d.name.node.clone(), ds_included[&d.name.node])).collect()),
        corruptions: main_or_all(corruption_asts.iter().map(|c| (c.0.node.clone(), c.3)).collect()),
        directions: vec![Direction::Denoise],
        patches: main_or_all(patch_asts.iter().map(|p| (p.0.name.node.clone(), p.1)).collect()),
        metrics: main_or_all(metric_asts.iter().map(|m| (m.0.node.clone(), m.3)).collect()),
    };
    // Keep only names that resolved.
    sw.corruptions.retain(|n| corruptions.iter().any(|c| &c.name == n));
    sw.metrics.retain(|n| metrics.iter().any(|m| &m.name == n));
    let mut metric_axis_span: Option<Span> = None;
    if let Some((axes, _)) = sweep {
        let mut seen: BTreeMap<String, Span> = BTreeMap::new();
        for axis in axes.iter() {
            if let Some(prev) = seen.get(&axis.name.node) {
                errors.push(duplicate("sweep axis", &axis.name.node, &axis.name.span, prev));
                continue;
            }
            seen.insert(axis.name.node.clone(), axis.name.span.clone());
            let defined: Vec<String> = match axis.name.node.as_str() {
                "dataset" => dataset_asts.iter().map(|d| d.name.node.clone()).collect(),
                "corruption" => corruption_asts.iter().map(|c| c.0.node.clone()).collect(),
                "patch" => patch_asts.iter().map(|p| p.0.name.node.clone()).collect(),
                "metric" => metric_asts.iter().map(|m| m.0.node.clone()).collect(),
                "direction" => vec!["denoise".into(), "noise".into()],
                _ => {
                    errors.push(
                        unknown("sweep axis", &axis.name, ["dataset", "corruption", "direction", "patch", "metric"])
                            .help("sweep axes: dataset, corruption, direction, patch, metric (windows are listed on the patch)"),
                    );
                    continue;
                }
            };
            let what = axis.name.node.as_str();
            let mut values = Vec::new();
            for v in &axis.values {
                if !defined.contains(&v.node) {
                    errors.push(unknown(what, v, defined.iter().map(|s| s.as_str())));
                } else if values.contains(&v.node) {
                    errors.push(
                        Diagnostic::error(
                            "patchbay::duplicate",
                            format!("`{}` is listed twice", v.node),
                            &v.span,
                            "again here",
                        )
                        .help("list each value once"),
                    );
                } else {
                    values.push(v.node.clone());
                }
            }
            match what {
                "dataset" => sw.datasets = values,
                "corruption" => {
                    sw.corruptions = values.into_iter().filter(|n| corruptions.iter().any(|c| &c.name == n)).collect()
                }
                "patch" => sw.patches = values,
                "metric" => {
                    sw.metrics = values.into_iter().filter(|n| metrics.iter().any(|m| &m.name == n)).collect();
                    metric_axis_span = Some(
                        axis.name.span.to(&axis
                            .values
                            .last()
                            .map(|v| v.span.clone())
                            .unwrap_or(axis.name.span.clone())),
                    );
                }
                _ => {
                    sw.directions = values
                        .iter()
                        .map(|v| if v == "noise" { Direction::Noise } else { Direction::Denoise })
                        .collect()
                }
            }
        }
    }

    // ---- datasets ------------------------------------------------------------------------
    let mut built: Vec<datasets::Built> = Vec::new();
    for d in &dataset_asts {
        if let Some(b) = datasets::build_dataset(d, &pools, tok, &mut errors) {
            built.push(b);
        }
    }
    if dataset_asts.is_empty() {
        if let Some(st) = ast.statements.iter().find(|s| !s.included) {
            errors.push(
                Diagnostic::error(
                    "patchbay::no_dataset",
                    "the experiment has no dataset",
                    &Span::new(&st.span.file, 0..0),
                    "no `dataset`",
                )
                .help("add a `dataset name { template \"...\" ... }` or `dataset name from \"prompts.csv\" { ... }`"),
            );
        }
    }
    // Corrupt each dataset of the sweep with each corruption of the sweep.
    if let Some(tok) = tok {
        for b in built.iter_mut().filter(|b| sw.datasets.contains(&b.dataset.name)) {
            for c in corruptions.iter().filter(|c| sw.corruptions.contains(&c.name)) {
                let (slots, span) = &corruption_slots[&c.name];
                if let Some(out) = datasets::corrupt(b, c, span, slots, tok, &mut errors) {
                    b.dataset.corrupted.insert(c.name.clone(), out);
                }
            }
        }
    }
    // Metrics that read r' need a wrong answer in every dataset they run on.
    for m in metrics.iter().filter(|m| m.kind.needs_wrong() && sw.metrics.contains(&m.name)) {
        for b in built.iter().filter(|b| sw.datasets.contains(&b.dataset.name) && !b.dataset.has_wrong) {
            let span = &metric_asts.iter().find(|x| x.0.node == m.name).unwrap().1.span;
            errors.push(
                Diagnostic::error(
                    "patchbay::needs_wrong_answer",
                    format!("{} needs a wrong answer r', but dataset `{}` has none", m.kind.name(), b.dataset.name),
                    span,
                    "reads z_r - z_r'",
                )
                .help("add `wrong S1` (or `wrong: column`) to the dataset, or use `prob`, `logprob` or `kl`"),
            );
        }
    }
    // Ablations have no denoising run.
    let mut warnings = Vec::new();
    if sw.directions.contains(&Direction::Denoise) {
        for c in corruptions.iter().filter(|c| c.kind.is_ablation() && sw.corruptions.contains(&c.name)) {
            let span = &corruption_slots[&c.name].1;
            warnings.push(
                Diagnostic::error(
                    "patchbay::ablation_direction",
                    format!("`{}` is an ablation: it only runs in the noise direction", c.name),
                    span,
                    "denoising variants skip it",
                )
                .warning()
                .help("ablations replace a component of the clean run; add `direction: [noise]` to the sweep to silence this"),
            );
        }
    }

    // ---- patch targets -------------------------------------------------------------------
    let sweep_datasets: Vec<&Dataset> =
        built.iter().filter(|b| sw.datasets.contains(&b.dataset.name)).map(|b| &b.dataset).collect();
    let mut patches = Vec::new();
    for (p, _) in &patch_asts {
        if let Some(t) = targets::patch(p, model.as_ref().map(|m| &m.0.manifest), &sweep_datasets, &mut errors) {
            patches.push(t);
        }
    }

    // ---- expectations --------------------------------------------------------------------
    let mut expectations = Vec::new();
    for (e, span) in &expects {
        let ctx = targets::ExpectCtx {
            patch_asts: &patch_asts.iter().map(|p| p.0).collect::<Vec<_>>(),
            patches: &patches,
            metric_names: &metric_asts.iter().map(|m| m.0.node.clone()).collect::<Vec<_>>(),
            computed: &sw.metrics,
            metric_axis: metric_axis_span.as_ref(),
            sweep: &sw,
            manifest: model.as_ref().map(|m| &m.0.manifest),
        };
        if let Some(x) = targets::expectation(e, span, &ctx, &mut errors) {
            expectations.push(x);
        }
    }

    // ---- the rest ------------------------------------------------------------------------
    let batch_size = match batch {
        Some(b) if !(1..=4096).contains(&b.node) => {
            errors.push(
                Diagnostic::error("patchbay::range", "batch must be between 1 and 4096", &b.span, "out of range")
                    .help("batch is the number of prompts per engine batch (default 32), e.g. `batch 64`"),
            );
            32
        }
        Some(b) => b.node as usize,
        None => 32,
    };
    for (axis, list) in [("dataset", &sw.datasets), ("patch", &sw.patches), ("metric", &sw.metrics)] {
        if list.is_empty() && !(axis == "dataset" && dataset_asts.is_empty()) {
            if let Some(st) = ast.statements.iter().find(|s| !s.included) {
                let span = sweep.map(|s| s.1.clone()).unwrap_or_else(|| Span::new(&st.span.file, 0..0));
                errors.push(
                    Diagnostic::error(
                        "patchbay::empty_sweep",
                        format!("the experiment has no {axis} to run"),
                        &span,
                        format!("no {axis}"),
                    )
                    .help(format!("define a `{axis}` (see spec/language.md)")),
                );
            }
        }
    }
    if sw.corruptions.is_empty() && errors.is_empty() {
        if let Some(st) = ast.statements.iter().find(|s| !s.included) {
            errors.push(
                Diagnostic::error(
                    "patchbay::empty_sweep",
                    "the experiment has no corruption to run",
                    &Span::new(&st.span.file, 0..0),
                    "no corruption",
                )
                .help("add e.g. `corruption s2_io = replace S2 with IO`"),
            );
        }
    }
    let out = |i: usize| outputs[i].map(|s| s.span.file.dir().join(&s.node));

    errors.sort_by_key(|d| d.span.as_ref().map(|s| (s.file.name.clone(), s.range.start)));
    if !errors.is_empty() || model.is_none() {
        errors.extend(warnings);
        return Err(errors);
    }
    let (model, _) = model.unwrap();
    Ok(Experiment {
        name: path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "experiment".into()),
        source: path.to_path_buf(),
        model,
        batch_size,
        datasets: built.into_iter().map(|b| b.dataset).collect(),
        corruptions,
        patches,
        metrics,
        sweep: sw,
        expectations,
        outputs: Outputs { csv: out(0), per_prompt: out(1), report: out(2) },
        warnings,
    })
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
