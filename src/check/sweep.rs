//! The sweep: which datasets, corruptions, directions, patches and metrics are run.

use std::collections::BTreeMap;

use super::checker::Checker;
use super::error::CheckError;
use crate::diag::Span;
use crate::ir::experiment::Direction;
use crate::syntax::ast::StatementKind;

/// The names defined in the experiment file itself, or all (included ones) when it defines none.
fn main_or_all(items: Vec<(String, bool)>) -> Vec<String> {
    let main: Vec<String> = items.iter().filter(|(_, inc)| !inc).map(|(n, _)| n.clone()).collect();
    if main.is_empty() {
        items.into_iter().map(|(n, _)| n).collect()
    } else {
        main
    }
}

impl Checker<'_> {
    /// The sweep's axes: the `sweep` statement's, or the defaults.
    pub fn sweep(&mut self) {
        // Whether each dataset is included (the last statement of a name decides).
        let ds_included: BTreeMap<String, bool> = self
            .ast
            .statements
            .iter()
            .filter_map(|s| match &s.kind {
                StatementKind::Dataset(d) => Some((d.name.node.clone(), s.included)),
                _ => None,
            })
            .collect();
        let defs = &self.defs;
        let sw = &mut self.sweep;
        sw.datasets =
            main_or_all(defs.datasets.iter().map(|d| (d.name.node.clone(), ds_included[&d.name.node])).collect());
        sw.corruptions = main_or_all(defs.corruptions.iter().map(|c| (c.0.node.clone(), c.3)).collect());
        sw.patches = main_or_all(defs.patches.iter().map(|p| (p.0.name.node.clone(), p.1)).collect());
        sw.metrics = main_or_all(defs.metrics.iter().map(|m| (m.0.node.clone(), m.3)).collect());
        // Keep only names that resolved.
        let corruptions = &self.corruptions;
        let metrics = &self.metrics;
        sw.corruptions.retain(|n| corruptions.iter().any(|c| &c.name == n));
        sw.metrics.retain(|n| metrics.iter().any(|m| &m.name == n));
        let Some((axes, _)) = defs.sweep else { return };
        let mut seen: BTreeMap<String, Span> = BTreeMap::new();
        for axis in axes.iter() {
            if let Some(prev) = seen.get(&axis.name.node) {
                self.errors.push(CheckError::duplicate("sweep axis", &axis.name.node, prev).at(&axis.name.span));
                continue;
            }
            seen.insert(axis.name.node.clone(), axis.name.span.clone());
            let (what, defined): (&'static str, Vec<String>) = match axis.name.node.as_str() {
                "dataset" => ("dataset", defs.datasets.iter().map(|d| d.name.node.clone()).collect()),
                "corruption" => ("corruption", defs.corruptions.iter().map(|c| c.0.node.clone()).collect()),
                "patch" => ("patch", defs.patches.iter().map(|p| p.0.name.node.clone()).collect()),
                "metric" => ("metric", defs.metrics.iter().map(|m| m.0.node.clone()).collect()),
                "direction" => ("direction", vec!["denoise".into(), "noise".into()]),
                _ => {
                    let error = CheckError::UnknownSweepAxis { name: axis.name.node.clone() };
                    self.errors.push(error.at(&axis.name.span));
                    continue;
                }
            };
            let mut values = Vec::new();
            for v in &axis.values {
                if !defined.contains(&v.node) {
                    let error = CheckError::unknown(what, &v.node, defined.iter().map(|s| s.as_str()));
                    self.errors.push(error.at(&v.span));
                } else if values.contains(&v.node) {
                    self.errors.push(CheckError::DuplicateSweepValue { value: v.node.clone() }.at(&v.span));
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
                    let last = axis.values.last().map(|v| v.span.clone()).unwrap_or(axis.name.span.clone());
                    self.metric_axis = Some(axis.name.span.to(&last));
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

    /// Every axis of the sweep must have something to run.
    pub fn sweep_not_empty(&mut self) {
        let sweep_span = self.defs.sweep.map(|s| s.1.clone());
        for (axis, list) in
            [("dataset", &self.sweep.datasets), ("patch", &self.sweep.patches), ("metric", &self.sweep.metrics)]
        {
            if list.is_empty() && !(axis == "dataset" && self.defs.datasets.is_empty()) {
                if let Some(start) = self.file_start() {
                    let span = sweep_span.clone().unwrap_or(start);
                    self.errors.push(CheckError::EmptySweep { axis }.at(&span));
                }
            }
        }
        if self.sweep.corruptions.is_empty() && self.errors.is_empty() {
            if let Some(start) = self.file_start() {
                self.errors.push(CheckError::NoCorruption.at(&start));
            }
        }
    }
}
