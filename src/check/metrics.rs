//! Metrics and their averaging.

use super::checker::Checker;
use super::error::CheckError;
use crate::ir::experiment::{Averaging, Metric, MetricKind};

impl Checker<'_> {
    /// Resolve each metric's kind and options (`average` sets the default averaging).
    pub fn metrics(&mut self) {
        let default_avg = match self.defs.average {
            None => Averaging::RatioOfMeans,
            Some(a) => match a.node.as_str() {
                "ratio_of_means" => Averaging::RatioOfMeans,
                "per_prompt_mean" => Averaging::PerPromptMean,
                _ => {
                    let error = CheckError::unknown("averaging", &a.node, ["ratio_of_means", "per_prompt_mean"]);
                    self.errors.push(error.at(&a.span));
                    Averaging::RatioOfMeans
                }
            },
        };
        for (name, kind, options, _) in &self.defs.metrics {
            let Some((_, k)) = MetricKind::ALL.iter().find(|(n, _)| *n == kind.node) else {
                let error = CheckError::unknown("metric kind", &kind.node, MetricKind::ALL.iter().map(|(n, _)| *n));
                self.errors.push(error.at(&kind.span));
                continue;
            };
            let mut m = Metric { name: name.node.clone(), kind: *k, normalized: false, averaging: default_avg };
            for o in options.iter() {
                match o.node.as_str() {
                    "normalized" | "normalised" => m.normalized = true,
                    "ratio_of_means" => m.averaging = Averaging::RatioOfMeans,
                    "per_prompt_mean" => m.averaging = Averaging::PerPromptMean,
                    _ => {
                        let options = ["normalized", "ratio_of_means", "per_prompt_mean"];
                        self.errors.push(CheckError::unknown("metric option", &o.node, options).at(&o.span));
                    }
                }
            }
            self.metrics.push(m);
        }
    }

    /// Metrics that read r' need a wrong answer in every dataset they run on.
    pub fn wrong_answers(&mut self) {
        let mut errors = Vec::new();
        for m in self.metrics.iter().filter(|m| m.kind.needs_wrong() && self.sweep.metrics.contains(&m.name)) {
            for b in self.sweep_datasets().filter(|b| !b.dataset.has_wrong) {
                let span = &self.defs.metrics.iter().find(|x| x.0.node == m.name).unwrap().1.span;
                let error = CheckError::NeedsWrongAnswer { metric: m.kind.name(), dataset: b.dataset.name.clone() };
                errors.push(error.at(span));
            }
        }
        self.errors.extend(errors);
    }
}
