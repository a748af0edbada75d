//! Corruptions applied to datasets: the corrupted prompt of each clean prompt (STR must keep its
//! token count), noised positions, or ablation sources.

use std::collections::{BTreeMap, BTreeSet};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::checker::{Built, Checker};
use super::error::{CheckError, Retokenised};
use super::tok::Tok;
use crate::diag::{Diagnostic, Span};
use crate::ir::experiment::*;
use crate::syntax::ast;

impl Checker<'_> {
    /// Corrupt each dataset of the sweep with each corruption of the sweep.
    pub fn corrupt_datasets(&mut self) {
        let Some(tok) = &self.tok else { return };
        for b in self.datasets.iter_mut().filter(|b| self.sweep.datasets.contains(&b.dataset.name)) {
            for c in self.corruptions.iter().filter(|c| self.sweep.corruptions.contains(&c.name)) {
                let (slots, span) = &self.corruption_slots[&c.name];
                if let Some(out) = corrupt(b, c, span, slots, tok, &mut self.errors) {
                    b.dataset.corrupted.insert(c.name.clone(), out);
                }
            }
        }
    }
}

/// A clean prompt and its corrupted text, both tokenised.
fn retokenised(clean: &Prompt, text: &str, ids: &[u32], tok: &Tok) -> Retokenised {
    Retokenised {
        clean: clean.text.clone(),
        clean_len: clean.ids.len(),
        clean_tokens: tok.bracketed(&clean.ids),
        corrupted: text.to_string(),
        corrupted_len: ids.len(),
        corrupted_tokens: tok.bracketed(ids),
    }
}

/// Build the corrupted inputs of one (dataset, corruption) pair.
fn corrupt(
    built: &Built,
    c: &Corruption,
    span: &Span,
    slot_idents: &[ast::Ident],
    tok: &Tok,
    errors: &mut Vec<Diagnostic>,
) -> Option<Vec<CorruptedPrompt>> {
    let ds = &built.dataset;
    let n_errors = errors.len();
    for s in slot_idents {
        if !ds.slots.contains(&s.node) {
            let (slot, dataset, slots) = (s.node.clone(), ds.name.clone(), ds.slots.clone());
            errors.push(CheckError::CorruptionSlotNotInDataset { slot, dataset, slots }.at(&s.span));
        }
    }
    if errors.len() > n_errors {
        return None;
    }
    match &c.kind {
        CorruptionKind::Replace(reps) => {
            // Slots (of template and file datasets alike) are byte ranges of the prompt: replace
            // them textually.
            let mut out = Vec::new();
            for p in &ds.prompts {
                let mut edits: Vec<(usize, usize, String)> = Vec::new();
                for (slot, with) in reps {
                    let s = &p.slots[slot];
                    let new = match with {
                        Replacement::Slot(o) => p.slots.get(o).map(|x| x.value.clone()).unwrap_or_default(),
                        Replacement::Literal(l) => l.clone(),
                    };
                    let (a, b) = byte_range(p, s);
                    edits.push((a, b, new));
                }
                edits.sort_by_key(|e| std::cmp::Reverse(e.0));
                let mut text = p.text.clone();
                for (a, b, new) in edits {
                    text.replace_range(a..b, &new);
                }
                let enc = tok.encode(&text);
                if enc.ids.len() != p.ids.len() {
                    let tokens = retokenised(p, &text, &enc.ids, tok);
                    errors.push(CheckError::ReplaceChangesTokenCount { corruption: c.name.clone(), tokens }.at(span));
                    return None;
                }
                out.push(CorruptedPrompt::Tokens { text, ids: enc.ids, tokens: enc.tokens });
            }
            Some(out)
        }
        CorruptionKind::Resample { slots, distinct, seed } => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(built.seed.wrapping_mul(0x9E37_79B9)));
            let mut out = Vec::new();
            for s in slot_idents {
                if !built.pools.contains_key(&s.node) {
                    errors.push(CheckError::NoPool { slot: s.node.clone() }.at(&s.span));
                    return None;
                }
            }
            if *distinct {
                let union: BTreeSet<&String> = slots.iter().flat_map(|s| built.pools[s].iter()).collect();
                if union.len() < slots.len() {
                    let error = CheckError::ResamplePoolTooSmall { distinct: union.len(), slots: slots.len() };
                    errors.push(error.at(span));
                    return None;
                }
            }
            for (pi, p) in ds.prompts.iter().enumerate() {
                let mut found = None;
                for _attempt in 0..200 {
                    let mut chosen: BTreeMap<&String, String> = BTreeMap::new();
                    let mut ok = true;
                    for s in slots {
                        let pool = &built.pools[s];
                        let cands: Vec<&String> = pool
                            .iter()
                            .filter(|v| **v != p.slots[s].value && !(*distinct && chosen.values().any(|c| c == *v)))
                            .collect();
                        match cands.choose(&mut rng) {
                            Some(v) => {
                                chosen.insert(s, (*v).clone());
                            }
                            None => {
                                ok = false;
                                break;
                            }
                        }
                    }
                    if !ok {
                        break;
                    }
                    let mut edits: Vec<(usize, usize, String)> = chosen
                        .iter()
                        .map(|(s, v)| (byte_range(p, &p.slots[*s]), v.clone()))
                        .map(|((a, b), v)| (a, b, v))
                        .collect();
                    edits.sort_by_key(|e| std::cmp::Reverse(e.0));
                    let mut text = p.text.clone();
                    for (a, b, new) in edits {
                        text.replace_range(a..b, &new);
                    }
                    let enc = tok.encode(&text);
                    if enc.ids.len() == p.ids.len() {
                        found = Some(CorruptedPrompt::Tokens { text, ids: enc.ids, tokens: enc.tokens });
                        break;
                    }
                }
                match found {
                    Some(f) => out.push(f),
                    None => {
                        let error = CheckError::ResampleChangesTokenCount {
                            corruption: c.name.clone(),
                            prompt: pi,
                            text: p.text.clone(),
                            len: p.ids.len(),
                            shown: tok.bracketed(&p.ids),
                        };
                        errors.push(error.at(span));
                        return None;
                    }
                }
            }
            Some(out)
        }
        CorruptionKind::Noise { slots, .. } => Some(
            ds.prompts
                .iter()
                .map(|p| {
                    let mut positions: BTreeSet<usize> = BTreeSet::new();
                    for s in slots {
                        let sp = &p.slots[s];
                        positions.extend(sp.first..=sp.last);
                    }
                    CorruptedPrompt::Noise { positions: positions.into_iter().collect() }
                })
                .collect(),
        ),
        CorruptionKind::Counterfactual => {
            let Some(cfs) = &built.counterfactual else {
                errors.push(CheckError::NoCounterfactual { dataset: ds.name.clone() }.at(span));
                return None;
            };
            let mut out = Vec::new();
            for (p, t) in ds.prompts.iter().zip(cfs) {
                let enc = tok.encode(t);
                if enc.ids.len() != p.ids.len() {
                    let tokens = retokenised(p, t, &enc.ids, tok);
                    errors.push(
                        CheckError::CounterfactualChangesTokenCount { dataset: ds.name.clone(), tokens }.at(span),
                    );
                    return None;
                }
                out.push(CorruptedPrompt::Tokens { text: t.clone(), ids: enc.ids, tokens: enc.tokens });
            }
            Some(out)
        }
        CorruptionKind::Ablation { kind, seed } => {
            if *kind != AblationKind::Zero && ds.common_len().is_none() {
                let error = CheckError::AblationUnequalLengths {
                    kind: kind.name(),
                    dataset: ds.name.clone(),
                    min: ds.min_len(),
                    max: ds.max_len(),
                };
                errors.push(error.at(span));
                return None;
            }
            let n = ds.prompts.len();
            let sources: Vec<Option<usize>> = if *kind == AblationKind::Resample {
                let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                (0..n)
                    .map(|i| {
                        if n < 2 {
                            return None;
                        }
                        let mut j = rng.gen_range(0..n - 1);
                        if j >= i {
                            j += 1;
                        }
                        Some(j)
                    })
                    .collect()
            } else {
                vec![None; n]
            };
            Some(sources.into_iter().map(|s| CorruptedPrompt::Ablation { source_prompt: s }).collect())
        }
    }
}

fn byte_range(_p: &Prompt, s: &SlotSpan) -> (usize, usize) {
    (s.start, s.end)
}
