//! Template datasets: slots drawn from pools, prompts generated (seeded) and tokenised.

use std::collections::{BTreeMap, BTreeSet};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::answers::resolve_answer;
use super::checker::{Built, PoolValues};
use super::error::CheckError;
use super::pools::{load_pool, resolve_pool};
use super::tok::{Encoded, Tok};
use crate::diag::{Diagnostic, Span};
use crate::ir::experiment::*;
use crate::syntax::ast::{self, AnswerSpec, DatasetItem, Spanned};

struct SlotDef {
    pool: Option<PoolValues>,
    /// Index of its `distinct` group.
    group: Option<usize>,
    equals: Option<ast::Ident>,
}

/// A dataset expanded from a template: `count` prompts drawn (seeded) from the slots' pools.
pub fn build_template_dataset(
    d: &ast::Dataset,
    global_pools: &BTreeMap<String, PoolValues>,
    tok: Option<&Tok>,
    errors: &mut Vec<Diagnostic>,
) -> Option<Built> {
    let n_errors = errors.len();
    let mut template: Option<&Spanned<String>> = None;
    let mut count: Option<&Spanned<i64>> = None;
    let mut seed: Option<&Spanned<i64>> = None;
    let mut answer: Option<&Spanned<AnswerSpec>> = None;
    let mut wrong: Option<&Spanned<AnswerSpec>> = None;
    let mut local_pools = BTreeMap::new();
    let mut slots: BTreeMap<String, SlotDef> = BTreeMap::new();
    let mut groups: Vec<(Vec<String>, Span)> = Vec::new();
    let mut slot_decls: Vec<(String, Span)> = Vec::new();
    // A pool that did not resolve (reported, possibly at a top-level definition).
    let mut broken_pool = false;
    let once = |what: &'static str, span: &Span, prev: Option<Span>, errors: &mut Vec<Diagnostic>| {
        if let Some(p) = prev {
            errors.push(CheckError::duplicate(what, what, &p).at(span));
        }
    };
    for item in &d.items {
        match item {
            DatasetItem::Template(t) => {
                once("template", &t.span, template.map(|x| x.span.clone()), errors);
                template = Some(t);
            }
            DatasetItem::Count(c) => {
                once("count", &c.span, count.map(|x| x.span.clone()), errors);
                count = Some(c);
            }
            DatasetItem::Seed(s) => {
                once("seed", &s.span, seed.map(|x| x.span.clone()), errors);
                seed = Some(s);
            }
            DatasetItem::Answer(a) => {
                once("answer", &a.span, answer.map(|x| x.span.clone()), errors);
                answer = Some(a);
            }
            DatasetItem::Wrong(a) => {
                once("wrong", &a.span, wrong.map(|x| x.span.clone()), errors);
                wrong = Some(a);
            }
            DatasetItem::Pool(p) => {
                if let Some(prev) = local_pools.get(&p.name.node).map(|v: &PoolValues| v.span.clone()) {
                    errors.push(CheckError::duplicate("pool", &p.name.node, &prev).at(&p.name.span));
                } else {
                    // A broken pool stays defined with no values (see `resolve_pool`).
                    let v =
                        load_pool(p, errors).unwrap_or(PoolValues { values: Vec::new(), span: p.name.span.clone() });
                    local_pools.insert(p.name.node.clone(), v);
                }
            }
            DatasetItem::SlotFrom { .. } | DatasetItem::SlotEq { .. } => {}
            DatasetItem::Column { role, .. } => {
                errors.push(CheckError::ColumnWithoutFile { dataset: d.name.node.clone() }.at(&role.span))
            }
        }
    }
    // Slots (after pools, so that local pools may be declared below their use).
    for item in &d.items {
        match item {
            DatasetItem::SlotFrom { slots: names, pool, distinct, .. } => {
                let values = resolve_pool(pool, &local_pools, global_pools, errors);
                broken_pool |= values.is_none();
                let group = distinct.as_ref().map(|s| {
                    groups.push((names.iter().map(|n| n.node.clone()).collect(), s.clone()));
                    groups.len() - 1
                });
                if let (Some(v), Some(ds)) = (&values, distinct) {
                    let distinct_values: BTreeSet<&String> = v.values.iter().collect();
                    if distinct_values.len() < names.len() {
                        let (distinct, slots) = (distinct_values.len(), names.len());
                        errors.push(CheckError::PoolTooSmall { distinct, slots, pool: pool.span().clone() }.at(ds));
                    }
                }
                for n in names {
                    slot_decls.push((n.node.clone(), n.span.clone()));
                    slots.insert(n.node.clone(), SlotDef { pool: values.clone(), group, equals: None });
                }
            }
            DatasetItem::SlotEq { slot, other, .. } => {
                slot_decls.push((slot.node.clone(), slot.span.clone()));
                slots.insert(slot.node.clone(), SlotDef { pool: None, group: None, equals: Some(other.clone()) });
            }
            _ => {}
        }
    }
    first_dup(&slot_decls, "slot", errors);
    let slot_names: Vec<String> = slots.keys().cloned().collect();
    for def in slots.values() {
        if let Some(o) = &def.equals {
            if !slots.contains_key(&o.node) {
                errors.push(CheckError::unknown("slot", &o.node, slot_names.iter().map(|s| s.as_str())).at(&o.span));
            } else if slots[&o.node].equals.is_some() {
                errors.push(CheckError::SlotChain.at(&o.span));
            }
        }
    }
    let Some(template) = template else {
        errors.push(CheckError::NoTemplate { dataset: d.name.node.clone() }.at(&d.name.span));
        return None;
    };
    let parts = match split_template(&template.node) {
        Ok(p) => p,
        Err(at) => {
            errors.push(CheckError::UnclosedBrace.at(&sub_span(template, &(at..at + 1))));
            return None;
        }
    };
    let mut in_template: BTreeMap<String, Span> = BTreeMap::new();
    let mut bad_placeholder = false;
    for (is_slot, name, r) in &parts {
        if !*is_slot {
            continue;
        }
        let sp = sub_span(template, r);
        if !is_name(name) {
            bad_placeholder = true;
            let placeholder = template.node[r.clone()].to_string();
            let error = CheckError::BadPlaceholder { name: name.clone(), placeholder, declared: slot_names.clone() };
            errors.push(error.at(&sp));
            continue;
        }
        if in_template.contains_key(name) {
            errors.push(CheckError::SlotRepeatedInTemplate { slot: name.clone() }.at(&sp));
        } else if !slots.contains_key(name) {
            errors.push(CheckError::SlotWithoutValues { slot: name.clone(), slots: slot_names.clone() }.at(&sp));
        }
        in_template.insert(name.clone(), sp);
    }
    for (name, span) in &slot_decls {
        // After a malformed placeholder, "not in the template" would only repeat that error.
        if !in_template.contains_key(name) && !bad_placeholder {
            let slots = in_template.keys().cloned().collect();
            errors.push(CheckError::SlotNotInTemplate { slot: name.clone(), slots }.at(span));
        }
    }
    let check_slot_ref = |id: &ast::Ident, errors: &mut Vec<Diagnostic>| {
        if !slots.contains_key(&id.node) {
            let error = CheckError::SlotNotInTemplate { slot: id.node.clone(), slots: slots.keys().cloned().collect() };
            errors.push(error.at(&id.span));
        }
    };
    let mut set_pools: BTreeMap<usize, PoolValues> = BTreeMap::new();
    for (i, spec) in [answer, wrong].iter().enumerate() {
        if let Some(spec) = spec {
            match &spec.node {
                AnswerSpec::Slot(s) => check_slot_ref(s, errors),
                AnswerSpec::Set { pool, filter } => {
                    match resolve_pool(pool, &local_pools, global_pools, errors) {
                        Some(v) => {
                            set_pools.insert(i, v);
                        }
                        None => broken_pool = true,
                    }
                    if let Some((_, s)) = filter {
                        check_slot_ref(s, errors);
                    }
                }
                AnswerSpec::Literal(_) => {}
            }
        }
    }
    if answer.is_none() {
        errors.push(CheckError::NoAnswer { dataset: d.name.node.clone() }.at(&d.name.span));
    }
    let count_v = match count {
        Some(c) if c.node < 1 || c.node > 100_000 => {
            errors.push(CheckError::CountOutOfRange.at(&c.span));
            return None;
        }
        Some(c) => c.node as usize,
        None => 32,
    };
    let seed_v = match seed {
        Some(s) => match CheckError::bad_seed(s.node, &s.span) {
            Some(error) => {
                errors.push(error.at(&s.span));
                return None;
            }
            None => s.node as u64,
        },
        None => 0,
    };
    if errors.len() > n_errors || broken_pool {
        return None;
    }
    let tok = tok?;
    // Generate.
    let mut rng = ChaCha8Rng::seed_from_u64(seed_v);
    let mut prompts = Vec::with_capacity(count_v);
    let order: Vec<String> = slot_decls.iter().map(|(n, _)| n.clone()).collect();
    for idx in 0..count_v {
        let mut values: BTreeMap<String, String> = BTreeMap::new();
        // Grouped (distinct) slots first, then free ones, then `=`.
        for (g, (names, _)) in groups.iter().enumerate() {
            let pool = slots[&names[0]].pool.as_ref().map(|p| p.values.clone()).unwrap_or_default();
            let mut uniq: Vec<String> = pool.clone();
            uniq.sort();
            uniq.dedup();
            let chosen: Vec<String> = uniq.choose_multiple(&mut rng, names.len()).cloned().collect();
            for (n, v) in names.iter().zip(chosen) {
                if slots[n].group == Some(g) {
                    values.insert(n.clone(), v);
                }
            }
        }
        for n in &order {
            let def = &slots[n];
            if def.equals.is_none() && !values.contains_key(n) {
                let pool = def.pool.as_ref().map(|p| p.values.clone()).unwrap_or_default();
                if pool.is_empty() {
                    errors.push(CheckError::EmptySlotPool { slot: n.clone() }.at(&template.span));
                    return None;
                }
                values.insert(n.clone(), pool[rng.gen_range(0..pool.len())].clone());
            }
        }
        for n in &order {
            if let Some(o) = &slots[n].equals {
                let v = values.get(&o.node).cloned().unwrap_or_default();
                values.insert(n.clone(), v);
            }
        }
        let (text, enc, spans) = match render(&parts, &values, tok) {
            Ok(rendered) => rendered,
            Err((slot, text)) => {
                let value = values.get(&slot).cloned().unwrap_or_default();
                let which = format!("prompt {idx}");
                errors.push(CheckError::SlotWithoutTokens { which, slot, value, prompt: text }.at(&template.span));
                return None;
            }
        };
        let ans = answer.and_then(|a| resolve_answer(a, &values, &set_pools, 0, idx, tok, errors));
        let wr = wrong.and_then(|a| resolve_answer(a, &values, &set_pools, 1, idx, tok, errors));
        if errors.len() > n_errors {
            return None;
        }
        let ans = ans?;
        let slots_map = spans
            .into_iter()
            .map(|(n, (f, l, s, e))| {
                (n.clone(), SlotSpan { value: values[&n].clone(), first: f, last: l, start: s, end: e })
            })
            .collect();
        prompts.push(Prompt { text, ids: enc.ids, tokens: enc.tokens, slots: slots_map, answer: ans, wrong: wr });
    }
    if prompts.len() != count_v {
        errors.push(CheckError::EmptySlot.at(&template.span));
        return None;
    }
    let pools = slots
        .iter()
        .filter_map(|(n, d)| {
            let p = match &d.equals {
                Some(o) => slots.get(&o.node)?.pool.as_ref()?,
                None => d.pool.as_ref()?,
            };
            Some((n.clone(), p.values.clone()))
        })
        .collect();
    Some(Built {
        dataset: Dataset {
            name: d.name.node.clone(),
            origin: DatasetOrigin::Template { template: template.node.clone(), count: count_v, seed: seed_v },
            prompts,
            corrupted: BTreeMap::new(),
            has_wrong: wrong.is_some(),
            slots: in_template.keys().cloned().collect(),
        },
        pools,
        counterfactual: None,
        seed: seed_v,
    })
}

type Rendered = (String, Encoded, BTreeMap<String, (usize, usize, usize, usize)>);

/// Fill a template and locate each slot's tokens.
fn render(
    parts: &[(bool, String, std::ops::Range<usize>)],
    values: &BTreeMap<String, String>,
    tok: &Tok,
) -> Result<Rendered, (String, String)> {
    let mut text = String::new();
    let mut ranges = BTreeMap::new();
    for (is_slot, name, _) in parts {
        if *is_slot {
            // Every slot of the template has a value by now (checked before generating).
            let v = values.get(name).map(String::as_str).unwrap_or_default();
            let start = text.len();
            text.push_str(v);
            ranges.insert(name.clone(), (start, text.len()));
        } else {
            text.push_str(name);
        }
    }
    let enc = tok.encode(&text);
    let mut spans = BTreeMap::new();
    for (name, (s, e)) in ranges {
        let Some((a, b)) = enc.token_span(s, e) else { return Err((name, text)) };
        spans.insert(name, (a, b, s, e));
    }
    Ok((text, enc, spans))
}

/// Template pieces: literal text and `{SLOT}` references (with their byte range in the string).
fn split_template(t: &str) -> Result<Vec<(bool, String, std::ops::Range<usize>)>, usize> {
    let mut out = Vec::new();
    let mut rest = 0;
    let b = t.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'{' {
            let close = t[i..].find('}').ok_or(i)? + i;
            if rest < i {
                out.push((false, t[rest..i].to_string(), rest..i));
            }
            out.push((true, t[i + 1..close].to_string(), i..close + 1));
            i = close + 1;
            rest = i;
        } else {
            i += 1;
        }
    }
    if rest < t.len() {
        out.push((false, t[rest..].to_string(), rest..t.len()));
    }
    Ok(out)
}

/// Whether `s` is a name: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// Span of a part of a string literal (for a label on `{S2}` inside the template).
fn sub_span(s: &Spanned<String>, r: &std::ops::Range<usize>) -> Span {
    // The literal starts with a quote; escapes are rare in templates, so map 1:1 when possible.
    let raw = s.span.text();
    if raw.len() == s.node.len() + 2 {
        Span::new(&s.span.file, s.span.range.start + 1 + r.start..s.span.range.start + 1 + r.end)
    } else {
        s.span.clone()
    }
}

/// Report each slot declared a second time.
fn first_dup(decls: &[(String, Span)], what: &'static str, errors: &mut Vec<Diagnostic>) {
    let mut seen: BTreeMap<&str, &Span> = BTreeMap::new();
    for (name, span) in decls {
        if let Some(prev) = seen.get(name.as_str()) {
            errors.push(CheckError::duplicate(what, name, prev).at(span));
        } else {
            seen.insert(name, span);
        }
    }
}
