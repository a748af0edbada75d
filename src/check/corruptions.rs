//! Corruptions: what each one does, before it is applied to a dataset (see `corrupt.rs`).

use super::checker::Checker;
use super::error::{CheckError, Decimal};
use crate::diag::Diagnostic;
use crate::ir::experiment::*;
use crate::syntax::ast::{self, Ident, Spanned};

impl Checker<'_> {
    /// The dataset-independent part of each corruption.
    pub fn corruptions(&mut self) {
        for (name, kind, span, _) in &self.defs.corruptions {
            if let Some((c, slots)) = corruption(name, kind, &mut self.errors) {
                self.corruption_slots.insert(name.node.clone(), (slots, (*span).clone()));
                self.corruptions.push(c);
            }
        }
    }

    /// Ablations have no denoising run: a warning when the sweep denoises.
    pub fn ablation_directions(&mut self) {
        if !self.sweep.directions.contains(&Direction::Denoise) {
            return;
        }
        for c in self.corruptions.iter().filter(|c| c.kind.is_ablation() && self.sweep.corruptions.contains(&c.name)) {
            let span = &self.corruption_slots[&c.name].1;
            self.warnings.push(CheckError::AblationDirection { corruption: c.name.clone() }.at(span));
        }
    }
}

/// The dataset-independent part of a corruption, plus the slots it names (checked per dataset).
fn corruption(
    name: &Ident,
    kind: &ast::CorruptionKind,
    errors: &mut Vec<Diagnostic>,
) -> Option<(Corruption, Vec<Ident>)> {
    let n0 = errors.len();
    let seed = |s: &Option<Spanned<i64>>, errors: &mut Vec<Diagnostic>| -> u64 {
        match s {
            Some(v) => match CheckError::bad_seed(v.node, &v.span) {
                Some(error) => {
                    errors.push(error.at(&v.span));
                    0
                }
                None => v.node as u64,
            },
            None => 0,
        }
    };
    let (k, slots) = match kind {
        ast::CorruptionKind::Replace(reps) => {
            let mut slots = Vec::new();
            let mut out = Vec::new();
            for (s, w) in reps {
                slots.push(s.clone());
                let with = match w {
                    ast::ReplaceWith::Slot(o) => {
                        slots.push(o.clone());
                        Replacement::Slot(o.node.clone())
                    }
                    ast::ReplaceWith::Literal(l) => Replacement::Literal(l.node.clone()),
                };
                if out.iter().any(|(x, _): &(String, Replacement)| *x == s.node) {
                    errors.push(CheckError::DuplicateReplacement { slot: s.node.clone() }.at(&s.span));
                }
                out.push((s.node.clone(), with));
            }
            (CorruptionKind::Replace(out), slots)
        }
        ast::CorruptionKind::Resample { slots, distinct, seed: s } => (
            CorruptionKind::Resample {
                slots: slots.iter().map(|s| s.node.clone()).collect(),
                distinct: *distinct,
                seed: seed(s, errors),
            },
            slots.clone(),
        ),
        ast::CorruptionKind::Noise { slots, scale, samples, seed: s } => {
            let scale_v = match scale {
                Some(s) if !(s.node > 0.0 && s.node.is_finite()) => {
                    errors.push(CheckError::decimal(s.node, &s.span, Decimal::NoiseScale).at(&s.span));
                    3.0
                }
                Some(s) => s.node,
                None => 3.0,
            };
            let samples_v = match samples {
                Some(s) if !(1..=10_000).contains(&s.node) => {
                    errors.push(CheckError::SamplesOutOfRange.at(&s.span));
                    10
                }
                Some(s) => s.node as usize,
                None => 10,
            };
            (
                CorruptionKind::Noise {
                    slots: slots.iter().map(|s| s.node.clone()).collect(),
                    scale: scale_v,
                    samples: samples_v,
                    seed: seed(s, errors),
                },
                slots.clone(),
            )
        }
        ast::CorruptionKind::Counterfactual => (CorruptionKind::Counterfactual, Vec::new()),
        ast::CorruptionKind::Ablation { kind, seed: s } => {
            let k = match kind.node.as_str() {
                "zero" => AblationKind::Zero,
                "mean" => AblationKind::Mean,
                "resample" => AblationKind::Resample,
                _ => {
                    errors
                        .push(CheckError::unknown("ablation", &kind.node, ["zero", "mean", "resample"]).at(&kind.span));
                    return None;
                }
            };
            (CorruptionKind::Ablation { kind: k, seed: seed(s, errors) }, Vec::new())
        }
    };
    (errors.len() == n0).then(|| (Corruption { name: name.node.clone(), kind: k }, slots))
}
