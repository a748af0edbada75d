//! Evaluating `expect` statements on the result rows (spec/language.md, "expect").
//!
//! The effect of a component is its row's declared value (the normalised effect for a
//! `normalized` metric). Detection: more than k standard deviations (population sd over all
//! components of the target in the variant) from their mean, above for positive, below for
//! negative. Summation-baseline rows are not components.

use crate::ir::experiment::{position_label, ComponentRef, Expectation, ExpectationKind};
use crate::ir::plan::Plan;
use crate::run::results::Row;

/// The verdict on one expectation.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub text: String,
    pub line: usize,
    pub holds: bool,
    /// The numbers that decided it, one line per variant checked.
    pub details: Vec<String>,
}

fn matches(row: &Row, c: &ComponentRef) -> bool {
    row.layer == Some(c.layer) && row.head == c.head && row.position_label == c.position.as_ref().map(position_label)
}

pub fn evaluate(plan: &Plan, expectations: &[Expectation], rows: &[Row]) -> Vec<Verdict> {
    expectations.iter().map(|e| verdict(plan, e, rows)).collect()
}

fn verdict(plan: &Plan, e: &Expectation, rows: &[Row]) -> Verdict {
    let mut holds = true;
    let mut details = vec![];
    let metric_index = |name: &str| plan.metrics.iter().position(|m| m.name == name);
    for (v, variant) in plan.variants.iter().enumerate() {
        let window_filter = e.when.iter().find(|(k, _)| k == "window").map(|(_, w)| w.clone());
        let selected = e.when.iter().all(|(axis, value)| match axis.as_str() {
            "dataset" => &variant.dataset == value,
            "corruption" => &variant.corruption == value,
            "direction" => variant.direction.name() == value,
            _ => true,
        });
        if !selected {
            continue;
        }
        let (target, metric) = match &e.kind {
            ExpectationKind::Detected { target, metric, .. }
            | ExpectationKind::Top { target, metric, .. }
            | ExpectationKind::Effect { target, metric, .. } => (target, metric),
        };
        let Some(m) = metric_index(metric) else { continue };
        let components: Vec<&Row> = rows
            .iter()
            .filter(|r| r.variant == v && &r.target == target && !r.summation)
            .filter(|r| window_filter.as_ref().is_none_or(|w| r.window.map(|x| x.to_string()).as_ref() == Some(w)))
            .collect();
        let effect = |r: &Row| r.cells[m].value.unwrap_or(f64::NAN);
        let label = &variant.label;
        match &e.kind {
            ExpectationKind::Detected { sd, includes, components: wanted, .. } => {
                let values: Vec<f64> = components.iter().map(|r| effect(r)).collect();
                let n = values.len() as f64;
                let mean = values.iter().sum::<f64>() / n;
                let std = (values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
                for c in wanted {
                    let Some(row) = components.iter().find(|r| matches(r, c)) else {
                        holds = false;
                        details.push(format!("{label}: {c} has no row"));
                        continue;
                    };
                    let x = effect(row);
                    let detected = (x - mean).abs() > sd * std;
                    let ok = detected == *includes;
                    holds &= ok;
                    details.push(format!(
                        "{label}: {c} effect {x:.4}, mean {mean:.4}, sd {std:.4}: {} ({}{sd} sd)",
                        if detected { "detected" } else { "not detected" },
                        if ok { "as expected, " } else { "NOT as expected, " }
                    ));
                }
            }
            ExpectationKind::Top { k, includes, components: wanted, .. } => {
                let mut ranked: Vec<&&Row> = components.iter().collect();
                ranked.sort_by(|a, b| effect(b).total_cmp(&effect(a)));
                for c in wanted {
                    let rank = ranked.iter().position(|r| matches(r, c));
                    let in_top = rank.is_some_and(|r| r < *k);
                    let ok = in_top == *includes;
                    holds &= ok;
                    let x = rank.map(|r| effect(ranked[r]));
                    details.push(format!(
                        "{label}: {c} rank {} of {} (effect {}): {}",
                        rank.map_or("-".into(), |r| (r + 1).to_string()),
                        ranked.len(),
                        x.map_or("-".into(), |x| format!("{x:.4}")),
                        if ok { "holds" } else { "fails" }
                    ));
                }
            }
            ExpectationKind::Effect { component, op, value, .. } => {
                let row = components.iter().find(|r| matches(r, component));
                let x = row.map(|r| effect(r));
                let ok = x.is_some_and(|x| op.holds(x, *value));
                holds &= ok;
                details.push(format!(
                    "{label}: {component} effect {} {} {value}: {}",
                    x.map_or("(no row)".into(), |x| format!("{x:.4}")),
                    op.symbol(),
                    if ok { "holds" } else { "fails" }
                ));
            }
        }
    }
    Verdict { text: e.text.clone(), line: e.line, holds, details }
}
