//! Expectations: what CI should find, checked against the patches and metrics the sweep runs.

use super::checker::Checker;
use super::error::{overflowed, CheckError, Decimal};
use crate::diag::{Diagnostic, Span};
use crate::ir::experiment::*;
use crate::syntax::ast::{self, ExpectKind, Spanned};

impl Checker<'_> {
    /// Check every expectation.
    pub fn expectations(&mut self) {
        let mut errors = Vec::new();
        let expectations =
            self.defs.expects.iter().filter_map(|(e, span)| expectation(self, e, span, &mut errors)).collect();
        self.expectations = expectations;
        self.errors.extend(errors);
    }
}

/// An expectation, its patch, metric, components and `when` filters checked.
fn expectation(checker: &Checker, e: &ast::Expect, span: &Span, errors: &mut Vec<Diagnostic>) -> Option<Expectation> {
    let manifest = checker.model.as_ref().map(|m| &m.manifest);
    let n0 = errors.len();
    let (target, metric) = match &e.kind {
        ExpectKind::Detected { target, metric, .. }
        | ExpectKind::Top { target, metric, .. }
        | ExpectKind::Effect { target, metric, .. } => (target, metric),
    };
    let patch_names: Vec<&str> = checker.defs.patches.iter().map(|p| p.0.name.node.as_str()).collect();
    if !patch_names.contains(&target.node.as_str()) {
        errors.push(CheckError::unknown("patch", &target.node, patch_names.iter().copied()).at(&target.span));
    } else if !checker.sweep.patches.contains(&target.node) {
        errors.push(CheckError::PatchNotInSweep { patch: target.node.clone() }.at(&target.span));
    }
    let metric_names: Vec<&str> = checker.defs.metrics.iter().map(|m| m.0.node.as_str()).collect();
    if !metric_names.contains(&metric.node.as_str()) {
        errors.push(CheckError::unknown("metric", &metric.node, metric_names.iter().copied()).at(&metric.span));
    } else if !checker.sweep.metrics.contains(&metric.node) {
        let error = CheckError::MetricNotComputed {
            metric: metric.node.clone(),
            computed: checker.sweep.metrics.clone(),
            metric_axis: checker.metric_axis.clone(),
        };
        errors.push(error.at(&metric.span));
    }
    let target_t = checker.patches.iter().find(|p| p.name == target.node);
    let comp = |c: &Spanned<ast::Component>, errors: &mut Vec<Diagnostic>| -> Option<ComponentRef> {
        let t = target_t?;
        let mut ok = true;
        if let (Some(m), Some(layers)) = (manifest, &t.layers) {
            if c.node.layer < 0 || c.node.layer as u64 >= m.config.n_layers as u64 {
                errors.push(CheckError::layer_out_of_range(&c.span, c.node.layer, m.config.n_layers).at(&c.span));
                ok = false;
            } else if !layers.contains(&(c.node.layer as usize)) {
                let (patch, layer, layers) = (t.name.clone(), c.node.layer, compact(layers));
                errors.push(CheckError::LayerNotPatched { patch, layer, layers }.at(&c.span));
                ok = false;
            }
        }
        match (c.node.head, &t.heads) {
            (Some(h), Some(hs)) if !hs.contains(&(h.max(0) as usize)) || h < 0 => {
                let (patch, heads) = (t.name.clone(), compact(hs));
                errors.push(CheckError::HeadNotPatched { patch, head: h, heads }.at(&c.span));
                ok = false;
            }
            (Some(_), None) => {
                errors.push(CheckError::NotPatchedPerHead { patch: t.name.clone() }.at(&c.span));
                ok = false;
            }
            (None, Some(_)) => {
                errors.push(CheckError::NeedsHead { patch: t.name.clone(), layer: c.node.layer }.at(&c.span));
                ok = false;
            }
            _ => {}
        }
        if let Some(p) = &c.node.position {
            let fine = match &t.positions {
                PositionSelection::List(l) => l.contains(&Position::from(p)),
                PositionSelection::Each => matches!(p, ast::Position::Index(_)),
                PositionSelection::All => false,
            };
            if !fine {
                let (patch, position) = (t.name.clone(), position_label(&p.into()));
                errors.push(CheckError::PositionNotPatched { patch, position }.at(&c.span));
                ok = false;
            }
        } else if matches!(t.positions, PositionSelection::List(_) | PositionSelection::Each) {
            errors.push(CheckError::NeedsPosition { patch: t.name.clone(), layer: c.node.layer }.at(&c.span));
            ok = false;
        }
        ok.then(|| ComponentRef {
            layer: c.node.layer.max(0) as usize,
            head: c.node.head.map(|h| h as usize),
            position: c.node.position.as_ref().map(Position::from),
        })
    };
    let kind = match &e.kind {
        ExpectKind::Detected { sd, includes, components, .. } => {
            let sdv = match sd {
                Some(s) if !(s.node > 0.0 && s.node.is_finite()) => {
                    errors.push(CheckError::decimal(s.node, &s.span, Decimal::DetectionThreshold).at(&s.span));
                    2.0
                }
                Some(s) => s.node,
                None => 2.0,
            };
            let cs: Vec<_> = components.iter().filter_map(|c| comp(c, errors)).collect();
            ExpectationKind::Detected {
                target: target.node.clone(),
                metric: metric.node.clone(),
                sd: sdv,
                includes: *includes,
                components: cs,
            }
        }
        ExpectKind::Top { k, includes, components, .. } => {
            if k.node < 1 {
                errors.push(CheckError::TopKTooSmall.at(&k.span));
            } else if let Some(n) = target_t.and_then(|t| component_count(t, e)) {
                if k.node as u64 > n as u64 {
                    let shown =
                        if overflowed(k.node, &k.span) { k.span.text().trim().to_string() } else { k.node.to_string() };
                    let error = CheckError::TopKTooLarge {
                        k: shown,
                        patch: target.node.clone(),
                        components: n,
                        patch_span: target.span.clone(),
                    };
                    errors.push(error.at(&k.span));
                }
            }
            let cs: Vec<_> = components.iter().filter_map(|c| comp(c, errors)).collect();
            ExpectationKind::Top {
                k: k.node.max(1) as usize,
                target: target.node.clone(),
                metric: metric.node.clone(),
                includes: *includes,
                components: cs,
            }
        }
        ExpectKind::Effect { component, op, value, .. } => {
            if !value.node.is_finite() {
                errors.push(CheckError::decimal(value.node, &value.span, Decimal::EffectThreshold).at(&value.span));
            }
            let c = comp(component, errors);
            ExpectationKind::Effect {
                target: target.node.clone(),
                component: c.unwrap_or(ComponentRef { layer: 0, head: None, position: None }),
                metric: metric.node.clone(),
                op: op.node.into(),
                value: value.node,
            }
        }
    };
    let mut when = Vec::new();
    for (axis, v) in &e.when {
        let allowed: Vec<String> = match axis.node.as_str() {
            "dataset" => checker.sweep.datasets.clone(),
            "corruption" => checker.sweep.corruptions.clone(),
            "direction" => checker.sweep.directions.iter().map(|d| d.name().to_string()).collect(),
            "window" => {
                let ws: Vec<String> = target_t
                    .and_then(|t| t.windows.clone())
                    .unwrap_or_default()
                    .iter()
                    .map(|w| w.to_string())
                    .collect();
                ws
            }
            _ => {
                let axes = ["dataset", "corruption", "direction", "window"];
                errors.push(CheckError::unknown("variant axis", &axis.node, axes).at(&axis.span));
                continue;
            }
        };
        if !allowed.contains(&v.node) {
            let error = CheckError::NoSuchVariant { axis: axis.node.clone(), value: v.node.clone(), allowed };
            errors.push(error.at(&v.span));
            continue;
        }
        when.push((axis.node.clone(), v.node.clone()));
    }
    (errors.len() == n0).then(|| Expectation {
        // The statement's source, without the comments the parser's span takes in after it
        // (an expectation holds no strings, so `#` starts a comment).
        text: span
            .text()
            .lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .flat_map(str::split_whitespace)
            .collect::<Vec<_>>()
            .join(" "),
        line: span.line(),
        kind,
        when,
    })
}

/// How many components a `top k` expectation ranks in one variant: the runs of the patch, per
/// window when `when window = w` names one. None when it depends on the prompts (`positions each`).
fn component_count(t: &PatchTarget, e: &ast::Expect) -> Option<usize> {
    let positions = match &t.positions {
        PositionSelection::All => 1,
        PositionSelection::List(l) => l.len(),
        PositionSelection::Each => return None,
    };
    let heads = t.heads.as_ref().map(|h| h.len()).unwrap_or(1);
    let layers = t.layers.as_ref().map(|l| l.len()).unwrap_or(1);
    let windows = match &t.windows {
        Some(ws) if !e.when.iter().any(|(a, _)| a.node == "window") => ws.len(),
        _ => 1,
    };
    Some(positions * heads * layers * windows)
}
