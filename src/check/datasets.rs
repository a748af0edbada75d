//! Datasets: pools, template expansion, prompt files, answers; and corrupted prompts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::tok::Tok;
use crate::diag::{did_you_mean, Diagnostic, Span};
use crate::ir::experiment::*;
use crate::syntax::ast::{self, AnswerSpec, ColumnRole, DatasetItem, PoolRef, PoolSource, Spanned};

/// A pool's values and where it was defined.
#[derive(Clone)]
pub struct PoolValues {
    pub values: Vec<String>,
    pub span: Span,
}

/// Load a pool definition (inline list, or a file with one value per line).
pub fn load_pool(pool: &ast::Pool, errors: &mut Vec<Diagnostic>) -> Option<PoolValues> {
    match &pool.source {
        PoolSource::Inline(v) => {
            if v.is_empty() {
                errors.push(empty_inline_pool(&pool.name.span));
                return None;
            }
            Some(PoolValues { values: v.iter().map(|s| s.node.clone()).collect(), span: pool.name.span.clone() })
        }
        PoolSource::File(f) => {
            let path = f.span.file.dir().join(&f.node);
            match crate::syntax::files::read_text(&path) {
                Ok(text) => {
                    let values: Vec<String> = text
                        .lines()
                        .map(|l| l.trim_end_matches('\r').to_string())
                        .filter(|l| !l.trim().is_empty())
                        .collect();
                    if values.is_empty() {
                        errors.push(
                            Diagnostic::error(
                                "patchbay::empty_pool",
                                format!("pool file `{}` has no values", f.node),
                                &f.span,
                                "empty file",
                            )
                            .help(format!(
                                "write one value per line into {} (blank lines are skipped)",
                                path.display()
                            )),
                        );
                        return None;
                    }
                    Some(PoolValues { values, span: pool.name.span.clone() })
                }
                Err(e) => {
                    errors.push(missing_file(f, &path, e));
                    None
                }
            }
        }
    }
}

fn csv_error(f: &Spanned<String>, e: &csv::Error) -> Diagnostic {
    Diagnostic::error("patchbay::bad_file", format!("`{}` is not valid CSV: {e}", f.node), &f.span, "in this file")
        .help("a CSV file needs a header row and the same number of fields on every row (quote fields with commas)")
}

fn count_range(c: &Spanned<i64>) -> Diagnostic {
    Diagnostic::error("patchbay::range", "count must be between 1 and 100000", &c.span, "out of range")
        .help("count is the number of prompts; patching cost grows with it (default 32)")
}

/// A seed that is negative or does not fit in 64 bits.
pub fn seed_range(s: &Spanned<i64>) -> Diagnostic {
    let (message, label) = if s.node < 0 {
        ("a seed must be 0 or more", "negative")
    } else {
        ("the seed is too large: seeds are 0..9223372036854775807", "too large")
    };
    Diagnostic::error("patchbay::range", message, &s.span, label).help(
        "a seed is a whole number from 0 to 9223372036854775807 that makes random draws repeatable, e.g. `seed 1`",
    )
}

fn empty_inline_pool(span: &Span) -> Diagnostic {
    Diagnostic::error("patchbay::empty_pool", "the pool `[]` has no values", span, "empty pool")
        .help("list at least one value: `[\" Mary\", \" John\"]`")
}

pub fn missing_file(f: &Spanned<String>, path: &Path, e: std::io::Error) -> Diagnostic {
    Diagnostic::error("patchbay::missing_file", format!("cannot read `{}`", f.node), &f.span, format!("{e}"))
        .help(read_help(path, &e))
}

/// Help for a file that could not be read: missing, a folder, or not UTF-8 text.
pub fn read_help(path: &Path, e: &std::io::Error) -> String {
    if path.is_dir() {
        format!("{} is a folder; name a file", path.display())
    } else if e.kind() == std::io::ErrorKind::InvalidInput {
        format!("{} is not a regular file; name a text file", path.display())
    } else if e.kind() == std::io::ErrorKind::FileTooLarge {
        format!("split {} into smaller files, or use its first rows (`count N`)", path.display())
    } else if e.kind() == std::io::ErrorKind::InvalidData {
        format!("{} is not UTF-8 text; save it as UTF-8", path.display())
    } else {
        format!("paths are relative to the folder of the file that names them: looked for {}", path.display())
    }
}

fn resolve_pool(
    r: &PoolRef,
    local: &BTreeMap<String, PoolValues>,
    global: &BTreeMap<String, PoolValues>,
    errors: &mut Vec<Diagnostic>,
) -> Option<PoolValues> {
    match r {
        PoolRef::Inline(l) => {
            if l.node.is_empty() {
                errors.push(empty_inline_pool(&l.span));
                return None;
            }
            Some(PoolValues { values: l.node.iter().map(|s| s.node.clone()).collect(), span: l.span.clone() })
        }
        PoolRef::Named(n) => {
            if let Some(p) = local.get(&n.node).or_else(|| global.get(&n.node)) {
                // No values: the pool's definition failed and was reported there.
                return (!p.values.is_empty()).then(|| p.clone());
            }
            let names: Vec<&str> = local.keys().chain(global.keys()).map(|s| s.as_str()).collect();
            errors.push(unknown("pool", n, names));
            None
        }
    }
}

/// "unknown X `name`" with a "did you mean".
pub fn unknown<'a>(what: &str, name: &Spanned<String>, candidates: impl IntoIterator<Item = &'a str>) -> Diagnostic {
    let cands: Vec<&str> = candidates.into_iter().collect();
    let d = Diagnostic::error(
        "patchbay::unknown_name",
        format!("unknown {what} `{}`", name.node),
        &name.span,
        format!("no {what} named `{}`", name.node),
    );
    match did_you_mean(&name.node, cands.iter().copied()) {
        Some(s) => d.help(format!("did you mean `{s}`?")),
        None if cands.is_empty() => d.help(format!("no {what} is defined")),
        None => d.help(format!("defined: {}", cands.join(", "))),
    }
}

struct SlotDef {
    pool: Option<PoolValues>,
    /// Index of its `distinct` group.
    group: Option<usize>,
    equals: Option<ast::Ident>,
}

/// Answer spec resolved for one prompt.
fn resolve_answer(
    spec: &Spanned<AnswerSpec>,
    values: &BTreeMap<String, String>,
    sets: &BTreeMap<usize, PoolValues>,
    // 0 for the answer, 1 for the wrong answer: which of `sets` is this spec's.
    which: usize,
    prompt: usize,
    tok: &Tok,
    errors: &mut Vec<Diagnostic>,
) -> Option<Answer> {
    let single = |text: &str, span: &Span, errors: &mut Vec<Diagnostic>| -> Option<Answer> {
        let ids = tok.encode_plain(text);
        if ids.len() == 1 {
            return Some(Answer::Token { text: text.to_string(), id: ids[0] });
        }
        errors.push(
            Diagnostic::error(
                "patchbay::multi_token_answer",
                format!("the answer `{text}` is {} tokens, not one: {}", ids.len(), tok.bracketed(&ids)),
                span,
                "an answer must be a single token",
            )
            .help(
                "metrics read the logit of one next token, so patchbay never silently uses the first token of a \
                 longer answer: choose single-token values (mind the leading space), or declare a token set with \
                 `answer set [...]`",
            ),
        );
        None
    };
    match &spec.node {
        AnswerSpec::Literal(s) => single(&s.node, &s.span, errors),
        AnswerSpec::Slot(slot) => {
            let v = values.get(&slot.node)?;
            single(v, &slot.span, errors)
        }
        AnswerSpec::Set { pool, filter } => {
            let pool_values = sets.get(&which).map(|p| p.values.clone()).unwrap_or_default();
            let mut out = Vec::new();
            for v in &pool_values {
                if let Some((op, slot)) = filter {
                    let reference = values.get(&slot.node)?;
                    let (Ok(a), Ok(b)) = (v.trim().parse::<f64>(), reference.trim().parse::<f64>()) else {
                        errors.push(
                            Diagnostic::error(
                                "patchbay::not_a_number",
                                format!("cannot compare `{v}` with `{reference}` as numbers"),
                                &op.span,
                                "numeric comparison",
                            )
                            .help("a filtered token set compares pool values and the slot's value as numbers"),
                        );
                        return None;
                    };
                    if !CmpOp::from(op.node).holds(a, b) {
                        continue;
                    }
                }
                let ids = tok.encode_plain(v);
                if ids.len() != 1 {
                    errors.push(
                        Diagnostic::error(
                            "patchbay::multi_token_answer",
                            format!(
                                "the token-set member `{v}` is {} tokens, not one: {}",
                                ids.len(),
                                tok.bracketed(&ids)
                            ),
                            pool.span(),
                            "every member of a token set must be a single token",
                        )
                        .help("remove it from the set, or use values the tokenizer keeps whole"),
                    );
                    return None;
                }
                out.push((v.clone(), ids[0]));
            }
            if out.is_empty() {
                let detail = filter
                    .as_ref()
                    .and_then(|(op, s)| {
                        values.get(&s.node).map(|v| format!(" (no value {} {v})", CmpOp::from(op.node).symbol()))
                    })
                    .unwrap_or_default();
                errors.push(
                    Diagnostic::error(
                        "patchbay::empty_token_set",
                        format!("the token set is empty for prompt {prompt}{detail}"),
                        &spec.span,
                        "empty token set",
                    )
                    .help("restrict the slot's pool so that every prompt has at least one token in the set"),
                );
                return None;
            }
            Some(Answer::Set(out))
        }
    }
}

/// Map a slot's byte range in `text` to inclusive token indices.
fn token_span(offsets: &[(usize, usize)], start: usize, end: usize) -> Option<(usize, usize)> {
    let hits: Vec<usize> =
        offsets.iter().enumerate().filter(|(_, (s, e))| e > s && *s < end && *e > start).map(|(i, _)| i).collect();
    Some((*hits.first()?, *hits.last()?))
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
pub fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

/// A `{...}` in a template whose content is not a slot name (`{}`, `{IO and{S1}`, `{S 1}`).
fn bad_slot_placeholder(name: &str, placeholder: &str, span: &Span, declared: &[String]) -> Diagnostic {
    let (message, label) = if name.trim().is_empty() {
        (format!("empty slot placeholder `{placeholder}` in the template"), "no slot name")
    } else if name.contains('{') {
        (
            format!("`{placeholder}` is not a slot placeholder: a `{{` is not closed before the next `{{`"),
            "unclosed `{`",
        )
    } else {
        (format!("`{placeholder}` is not a slot placeholder: `{name}` is not a valid slot name"), "not a slot name")
    };
    let example = declared.first().map(|s| s.as_str()).unwrap_or("IO");
    let mut help = format!(
        "write each slot as `{{NAME}}`, e.g. `{{{example}}}`, where NAME is letters, digits and `_` \
         (`[A-Za-z_][A-Za-z0-9_]*`) and has a `slot NAME ...` line; templates cannot contain other braces"
    );
    if !declared.is_empty() {
        help.push_str(&format!("; declared slots: {}", declared.join(", ")));
    }
    Diagnostic::error("patchbay::template", message, span, label).help(help)
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

pub struct Built {
    pub dataset: Dataset,
    /// Slot -> pool, for resampling.
    pub pools: BTreeMap<String, Vec<String>>,
    /// Slot -> the span of `{SLOT}` in the template (or the slot's column), for labels.
    pub slot_spans: BTreeMap<String, Span>,
    pub counterfactual: Option<Vec<String>>,
    pub seed: u64,
}

pub fn build_dataset(
    d: &ast::Dataset,
    global_pools: &BTreeMap<String, PoolValues>,
    tok: Option<&Tok>,
    errors: &mut Vec<Diagnostic>,
) -> Option<Built> {
    match &d.file {
        Some(f) => build_file_dataset(d, f, tok, errors),
        None => build_template_dataset(d, global_pools, tok, errors),
    }
}

fn first_dup<'a, T>(items: impl Iterator<Item = (&'a str, &'a Span)>, what: &str, errors: &mut Vec<Diagnostic>) {
    let mut seen: BTreeMap<&str, &Span> = BTreeMap::new();
    for (name, span) in items {
        if let Some(prev) = seen.get(name) {
            errors.push(super::duplicate(what, name, span, prev));
        } else {
            seen.insert(name, span);
        }
    }
    let _ = std::marker::PhantomData::<T>;
}

fn build_template_dataset(
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
    let once = |what: &str, span: &Span, prev: Option<Span>, errors: &mut Vec<Diagnostic>| {
        if let Some(p) = prev {
            errors.push(super::duplicate(what, what, span, &p));
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
                    errors.push(super::duplicate("pool", &p.name.node, &p.name.span, &prev));
                } else {
                    // A broken pool stays defined with no values (see `resolve_pool`).
                    let v =
                        load_pool(p, errors).unwrap_or(PoolValues { values: Vec::new(), span: p.name.span.clone() });
                    local_pools.insert(p.name.node.clone(), v);
                }
            }
            DatasetItem::SlotFrom { .. } | DatasetItem::SlotEq { .. } => {}
            DatasetItem::Column { role, .. } => errors.push(
                Diagnostic::error(
                    "patchbay::column_without_file",
                    "a column mapping needs a prompt file",
                    &role.span,
                    "this dataset has no file",
                )
                .help(format!(
                    "write `dataset {} from \"prompts.csv\" {{ ... }}` to read prompts from a file",
                    d.name.node
                )),
            ),
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
                        errors.push(
                            Diagnostic::error(
                                "patchbay::pool_too_small",
                                format!(
                                    "the pool has {} distinct value(s) but {} slots must differ",
                                    distinct_values.len(),
                                    names.len()
                                ),
                                ds,
                                format!("{} distinct slots", names.len()),
                            )
                            .with_label(pool.span(), format!("{} distinct value(s)", distinct_values.len()))
                            .help("add values to the pool, or drop `distinct`"),
                        );
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
    first_dup::<()>(slot_decls.iter().map(|(n, s)| (n.as_str(), s)), "slot", errors);
    let slot_names: Vec<String> = slots.keys().cloned().collect();
    for def in slots.values() {
        if let Some(o) = &def.equals {
            if !slots.contains_key(&o.node) {
                errors.push(unknown("slot", o, slot_names.iter().map(|s| s.as_str())));
            } else if slots[&o.node].equals.is_some() {
                errors.push(
                    Diagnostic::error(
                        "patchbay::slot_chain",
                        "a slot can only equal a slot that has its own values",
                        &o.span,
                        "this slot is itself `=` another",
                    )
                    .help("point both slots at the slot that draws from a pool"),
                );
            }
        }
    }
    let Some(template) = template else {
        errors.push(
            Diagnostic::error("patchbay::no_template", format!("dataset `{}` has no template", d.name.node), &d.name.span, "no `template`")
                .help("add `template \"When{IO} and{S1} went to the store,{S2} gave a drink to\"`, or read prompts from a file with `from \"file.csv\"`"),
        );
        return None;
    };
    let parts = match split_template(&template.node) {
        Ok(p) => p,
        Err(at) => {
            errors.push(
                Diagnostic::error(
                    "patchbay::template",
                    "unclosed `{` in the template",
                    &sub_span(template, &(at..at + 1)),
                    "no matching `}`",
                )
                .help("write slots as `{NAME}`, with a name made of letters, digits and `_`"),
            );
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
            errors.push(bad_slot_placeholder(name, &template.node[r.clone()], &sp, &slot_names));
            continue;
        }
        if in_template.contains_key(name) {
            errors.push(
                Diagnostic::error(
                    "patchbay::template",
                    format!("slot `{name}` appears twice in the template"),
                    &sp,
                    "second use",
                )
                .help(format!(
                    "a slot appears once; for a repeated name declare another slot: `slot {name}2 = {name}`"
                )),
            );
        } else if !slots.contains_key(name) {
            let d2 = Diagnostic::error(
                "patchbay::slot_without_values",
                format!("the template uses slot `{name}`, which has no values"),
                &sp,
                "no `slot` line for this",
            );
            errors.push(match did_you_mean(name, slot_names.iter().map(|s| s.as_str())) {
                Some(s) => d2.help(format!("did you mean `{s}`? otherwise declare `slot {name} from <pool>`")),
                None => d2.help(format!("declare it: `slot {name} from <pool>`")),
            });
        }
        in_template.insert(name.clone(), sp);
    }
    for (name, span) in &slot_decls {
        // After a malformed placeholder, "not in the template" would only repeat that error.
        if !in_template.contains_key(name) && !bad_placeholder {
            errors.push(slot_not_in_template(name, span, in_template.keys().map(|s| s.as_str())));
        }
    }
    let check_slot_ref = |id: &ast::Ident, errors: &mut Vec<Diagnostic>| {
        if !slots.contains_key(&id.node) {
            errors.push(slot_not_in_template(&id.node, &id.span, slots.keys().map(|s| s.as_str())));
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
        errors.push(
            Diagnostic::error("patchbay::no_answer", format!("dataset `{}` has no answer", d.name.node), &d.name.span, "no `answer`")
                .help("name the correct next token: `answer IO` (a slot), `answer \" Paris\"` or `answer set years where > YY`"),
        );
    }
    let count_v = match count {
        Some(c) if c.node < 1 || c.node > 100_000 => {
            errors.push(count_range(c));
            return None;
        }
        Some(c) => c.node as usize,
        None => 32,
    };
    let seed_v = match seed {
        Some(s) if s.node < 0 || super::targets::overflowed(s.node, &s.span) => {
            errors.push(seed_range(s));
            return None;
        }
        Some(s) => s.node as u64,
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
                    errors.push(
                        Diagnostic::error(
                            "patchbay::empty_pool",
                            format!("slot `{n}` has no values to draw from"),
                            &template.span,
                            "in this template",
                        )
                        .help("give the slot a pool with at least one value"),
                    );
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
                let value = values.get(&slot).map(String::as_str).unwrap_or_default();
                errors.push(slot_without_tokens(&slot, value, &text, &format!("prompt {idx}"), &template.span));
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
        let _ = idx;
    }
    if prompts.len() != count_v {
        errors.push(
            Diagnostic::error(
                "patchbay::empty_slot",
                "a slot value produced no tokens",
                &template.span,
                "in this template",
            )
            .help("every slot value must be non-empty text"),
        );
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
        slot_spans: in_template,
        counterfactual: None,
        seed: seed_v,
    })
}

type Rendered = (String, super::tok::Encoded, BTreeMap<String, (usize, usize, usize, usize)>);

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
        let Some((a, b)) = token_span(&enc.offsets, s, e) else { return Err((name, text)) };
        spans.insert(name, (a, b, s, e));
    }
    Ok((text, enc, spans))
}

/// A slot whose value covers no token: it could be neither patched nor corrupted, so the prompt
/// would have to be dropped, and a dataset never loses prompts silently.
fn slot_without_tokens(slot: &str, value: &str, prompt: &str, which: &str, span: &Span) -> Diagnostic {
    Diagnostic::error(
        "patchbay::slot_without_tokens",
        format!("{which}: slot `{slot}` (value `{value}`) covers no token of the prompt `{prompt}`"),
        span,
        "this slot",
    )
    .help("give the slot a non-empty value that the tokenizer maps to at least one token")
}

pub fn slot_not_in_template<'a>(name: &str, span: &Span, slots: impl IntoIterator<Item = &'a str>) -> Diagnostic {
    let slots: Vec<&str> = slots.into_iter().collect();
    let d = Diagnostic::error(
        "patchbay::slot_not_in_template",
        format!("slot `{name}` is not in the template"),
        span,
        "not a slot of the template",
    );
    match did_you_mean(name, slots.iter().copied()) {
        Some(s) => d.help(format!("did you mean `{s}`?")),
        None if slots.is_empty() => d.help("the template has no `{SLOT}`s"),
        None => d.help(format!("the template's slots are: {}", slots.join(", "))),
    }
}

fn build_file_dataset(
    d: &ast::Dataset,
    f: &Spanned<String>,
    tok: Option<&Tok>,
    errors: &mut Vec<Diagnostic>,
) -> Option<Built> {
    let n_errors = errors.len();
    let path = f.span.file.dir().join(&f.node);
    let rows: Vec<BTreeMap<String, String>>;
    let headers: Vec<String>;
    let text = match crate::syntax::files::read_text(&path) {
        Ok(t) => t,
        Err(e) => {
            errors.push(missing_file(f, &path, e));
            return None;
        }
    };
    let is_jsonl = f.node.ends_with(".jsonl") || f.node.ends_with(".ndjson");
    if is_jsonl {
        let mut hs = BTreeSet::new();
        let mut rs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line) {
                Ok(obj) => {
                    let row: BTreeMap<String, String> = obj
                        .into_iter()
                        .map(|(k, v)| {
                            let s = match v {
                                serde_json::Value::String(s) => s,
                                other => other.to_string(),
                            };
                            hs.insert(k.clone());
                            (k, s)
                        })
                        .collect();
                    rs.push(row);
                }
                Err(e) => {
                    errors.push(
                        Diagnostic::error(
                            "patchbay::bad_file",
                            format!("line {} of `{}` is not a JSON object: {e}", i + 1, f.node),
                            &f.span,
                            "in this file",
                        )
                        .help("a .jsonl file holds one JSON object per line: {\"prompt\": \"...\", \"answer\": \" Paris\"}"),
                    );
                    return None;
                }
            }
        }
        headers = hs.into_iter().collect();
        rows = rs;
    } else {
        let mut rdr = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
        headers = match rdr.headers() {
            Ok(h) => h.iter().map(|s| s.to_string()).collect(),
            Err(e) => {
                errors.push(csv_error(f, &e));
                return None;
            }
        };
        let mut rs = Vec::new();
        for rec in rdr.records() {
            match rec {
                Ok(r) => rs.push(headers.iter().cloned().zip(r.iter().map(|s| s.to_string())).collect()),
                Err(e) => {
                    errors.push(csv_error(f, &e));
                    return None;
                }
            }
        }
        rows = rs;
    }
    let mut prompt_col = None;
    let mut cf_col = None;
    let mut answer_col = None;
    let mut wrong_col = None;
    let mut slot_cols: Vec<(ast::Ident, ast::Ident)> = Vec::new();
    let mut count = None;
    for item in &d.items {
        match item {
            DatasetItem::Column { role, column } => {
                if !headers.contains(&column.node) {
                    let d2 = Diagnostic::error(
                        "patchbay::missing_column",
                        format!("`{}` has no column `{}`", f.node, column.node),
                        &column.span,
                        "no such column",
                    )
                    .with_label(&f.span, "in this file");
                    errors.push(match did_you_mean(&column.node, headers.iter().map(|s| s.as_str())) {
                        Some(s) => d2.help(format!("did you mean `{s}`? the columns are: {}", headers.join(", "))),
                        None => d2.help(format!("the columns are: {}", headers.join(", "))),
                    });
                }
                let slot = match &role.node {
                    ColumnRole::Prompt => &mut prompt_col,
                    ColumnRole::Counterfactual => &mut cf_col,
                    ColumnRole::Answer => &mut answer_col,
                    ColumnRole::Wrong => &mut wrong_col,
                    ColumnRole::Slot(s) => {
                        slot_cols.push((s.clone(), column.clone()));
                        continue;
                    }
                };
                if let Some((prev, _)) = slot {
                    let prev: &Span = prev;
                    errors.push(super::duplicate("column role", role.span.text(), &role.span, prev));
                }
                *slot = Some((role.span.clone(), column.node.clone()));
            }
            DatasetItem::Count(c) => {
                if !(1..=100_000).contains(&c.node) {
                    errors.push(count_range(c));
                }
                count = Some(c)
            }
            DatasetItem::Template(t) => errors.push(
                Diagnostic::error(
                    "patchbay::template_with_file",
                    "a dataset reads a file or fills a template, not both",
                    &t.span,
                    "template",
                )
                .with_label(&f.span, "file"),
            ),
            DatasetItem::Seed(_) | DatasetItem::Pool(_) => {}
            DatasetItem::SlotFrom { span, .. } | DatasetItem::SlotEq { span, .. } => errors.push(
                Diagnostic::error(
                    "patchbay::slot_in_file_dataset",
                    "a prompt file names its slots by column",
                    span,
                    "not in a file dataset",
                )
                .help("write `slot S: column`, where the column holds text that occurs in the prompt"),
            ),
            DatasetItem::Answer(a) | DatasetItem::Wrong(a) => errors.push(
                Diagnostic::error(
                    "patchbay::answer_in_file_dataset",
                    "a prompt file gives answers by column",
                    &a.span,
                    "not in a file dataset",
                )
                .help("write `answer: column` (and `wrong: column`)"),
            ),
        }
    }
    if prompt_col.is_none() {
        errors.push(
            Diagnostic::error(
                "patchbay::no_prompt_column",
                format!("dataset `{}` names no prompt column", d.name.node),
                &d.name.span,
                "no `prompt: column`",
            )
            .help(format!("the columns of `{}` are: {}", f.node, headers.join(", "))),
        );
    }
    if answer_col.is_none() {
        errors.push(
            Diagnostic::error(
                "patchbay::no_answer",
                format!("dataset `{}` has no answer", d.name.node),
                &d.name.span,
                "no `answer: column`",
            )
            .help(format!("the columns of `{}` are: {}", f.node, headers.join(", "))),
        );
    }
    if rows.is_empty() {
        // Column errors about an empty file only repeat this one.
        errors.truncate(n_errors);
        errors.push(
            Diagnostic::error("patchbay::empty_file", format!("`{}` has no rows", f.node), &f.span, "empty").help(
                if is_jsonl {
                    "add one JSON object per line"
                } else {
                    "add a header row naming the columns, then one row per prompt"
                },
            ),
        );
        return None;
    }
    if errors.len() > n_errors {
        return None;
    }
    // JSONL lines need not share keys: every used column must be in every row read.
    let limit = count.map(|c| c.node.max(1) as usize).unwrap_or(usize::MAX);
    let used: Vec<&ast::Ident> = d
        .items
        .iter()
        .filter_map(|it| match it {
            DatasetItem::Column { column, .. } => Some(column),
            _ => None,
        })
        .collect();
    for (i, row) in rows.iter().take(limit).enumerate() {
        if let Some(col) = used.iter().find(|c| !row.contains_key(&c.node)) {
            errors.push(
                Diagnostic::error(
                    "patchbay::missing_column",
                    format!("row {} of `{}` has no `{}`", i + 1, f.node, col.node),
                    &col.span,
                    "missing in that row",
                )
                .with_label(&f.span, "in this file")
                .help(format!("give every line of `{}` a `{}` key", f.node, col.node)),
            );
            return None;
        }
    }
    let tok = tok?;
    let (pc, ac) = (prompt_col.unwrap().1, answer_col.unwrap());
    let mut prompts = Vec::new();
    let mut cfs = Vec::new();
    for (i, row) in rows.iter().take(limit).enumerate() {
        let text = row[&pc].clone();
        let enc = tok.encode(&text);
        let mut slots = BTreeMap::new();
        for (s, col) in &slot_cols {
            let v = &row[&col.node];
            let Some(start) = (if v.is_empty() { None } else { text.find(v.as_str()) }) else {
                errors.push(
                    Diagnostic::error(
                        "patchbay::slot_not_in_prompt",
                        format!("row {}: the `{}` value `{v}` does not occur in the prompt `{text}`", i + 1, col.node),
                        &col.span,
                        "slot column",
                    )
                    .help("a slot column must hold text that occurs in the prompt"),
                );
                return None;
            };
            match token_span(&enc.offsets, start, start + v.len()) {
                Some((a, b)) => {
                    slots.insert(
                        s.node.clone(),
                        SlotSpan { value: v.clone(), first: a, last: b, start, end: start + v.len() },
                    );
                }
                None => {
                    errors.push(slot_without_tokens(&col.node, v, &text, &format!("row {}", i + 1), &col.span));
                    return None;
                }
            }
        }
        let ans_spec = |col: &str, span: &Span, errors: &mut Vec<Diagnostic>| {
            let v = row[col].clone();
            let spec = Spanned::new(AnswerSpec::Literal(Spanned::new(v, span.clone())), span.clone());
            resolve_answer(&spec, &BTreeMap::new(), &BTreeMap::new(), 0, i, tok, errors)
        };
        let answer = ans_spec(&ac.1, &ac.0, errors);
        let wrong = wrong_col.as_ref().and_then(|(sp, c)| ans_spec(c, sp, errors));
        if errors.len() > n_errors {
            return None;
        }
        if let Some((_, c)) = &cf_col {
            cfs.push(row[c].clone());
        }
        prompts.push(Prompt { text, ids: enc.ids, tokens: enc.tokens, slots, answer: answer?, wrong });
    }
    let slot_spans = slot_cols.iter().map(|(s, _)| (s.node.clone(), s.span.clone())).collect();
    Some(Built {
        dataset: Dataset {
            name: d.name.node.clone(),
            origin: DatasetOrigin::File { path },
            prompts,
            corrupted: BTreeMap::new(),
            has_wrong: wrong_col.is_some(),
            slots: slot_cols.iter().map(|(s, _)| s.node.clone()).collect(),
        },
        pools: BTreeMap::new(),
        slot_spans,
        counterfactual: cf_col.map(|_| cfs),
        seed: 0,
    })
}

/// STR token-count mismatch, showing both tokenisations.
fn length_mismatch(
    what: &str,
    span: &Span,
    clean: &Prompt,
    text: &str,
    ids: &[u32],
    tok: &Tok,
    help: &str,
) -> Diagnostic {
    Diagnostic::error(
        "patchbay::token_count_changed",
        format!(
            "{what} changes the token count ({} -> {} tokens), so positions no longer align",
            clean.ids.len(),
            ids.len()
        ),
        span,
        "this corruption",
    )
    .help(format!(
        "clean:     {:?}\n  {}\ncorrupted: {:?}\n  {}\n{help}",
        clean.text,
        tok.bracketed(&clean.ids),
        text,
        tok.bracketed(ids)
    ))
}

/// Build the corrupted inputs of one (dataset, corruption) pair.
pub fn corrupt(
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
            let mut d = slot_not_in_template(&s.node, &s.span, ds.slots.iter().map(|x| x.as_str()));
            d.message = format!("slot `{}` is not a slot of dataset `{}`", s.node, ds.name);
            errors.push(d);
        }
    }
    if errors.len() > n_errors {
        return None;
    }
    match &c.kind {
        CorruptionKind::Replace(reps) => {
            if matches!(ds.origin, DatasetOrigin::File { .. }) {
                // Slots of file datasets are substrings of the prompt; replace them textually.
            }
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
                    errors.push(length_mismatch(
                        &format!("`{}`", c.name),
                        span,
                        p,
                        &text,
                        &enc.ids,
                        tok,
                        "STR needs replacements with the same number of tokens as the originals",
                    ));
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
                    errors.push(
                        Diagnostic::error(
                            "patchbay::no_pool",
                            format!("slot `{}` has no pool to resample from", s.node),
                            &s.span,
                            "no pool",
                        )
                        .help("resampling draws fresh values from the slot's pool; prompt-file slots have none"),
                    );
                    return None;
                }
            }
            if *distinct {
                let union: BTreeSet<&String> = slots.iter().flat_map(|s| built.pools[s].iter()).collect();
                if union.len() < slots.len() {
                    errors.push(
                        Diagnostic::error(
                            "patchbay::pool_too_small",
                            format!(
                                "the pools have {} distinct value(s) but {} slots must differ",
                                union.len(),
                                slots.len()
                            ),
                            span,
                            "distinct resampling",
                        )
                        .help("add values to the pool, or drop `distinct`"),
                    );
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
                        errors.push(
                            Diagnostic::error(
                                "patchbay::token_count_changed",
                                format!("`{}`: no resampled values keep prompt {pi}'s token count ({} tokens)", c.name, p.ids.len()),
                                span,
                                "this corruption",
                            )
                            .help(format!(
                                "clean: {:?}\n  {}\nSTR needs pool values with the same number of tokens as the originals",
                                p.text,
                                tok.bracketed(&p.ids)
                            )),
                        );
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
                errors.push(
                    Diagnostic::error(
                        "patchbay::no_counterfactual",
                        format!("dataset `{}` has no counterfactual column", ds.name),
                        span,
                        "needs `counterfactual: column`",
                    )
                    .help("counterfactual corruption reads the corrupted prompt from a prompt file's column"),
                );
                return None;
            };
            let mut out = Vec::new();
            for (p, t) in ds.prompts.iter().zip(cfs) {
                let enc = tok.encode(t);
                if enc.ids.len() != p.ids.len() {
                    errors.push(length_mismatch(
                        &format!("the counterfactual prompt of `{}`", ds.name),
                        span,
                        p,
                        t,
                        &enc.ids,
                        tok,
                        "a counterfactual prompt must have as many tokens as its clean prompt",
                    ));
                    return None;
                }
                out.push(CorruptedPrompt::Tokens { text: t.clone(), ids: enc.ids, tokens: enc.tokens });
            }
            Some(out)
        }
        CorruptionKind::Ablation { kind, seed } => {
            if *kind != AblationKind::Zero && ds.common_len().is_none() {
                errors.push(
                    Diagnostic::error(
                        "patchbay::unequal_lengths",
                        format!(
                            "{} ablation needs prompts of one token count; `{}` has {}..{}",
                            kind.name(),
                            ds.name,
                            ds.min_len(),
                            ds.max_len()
                        ),
                        span,
                        "this ablation",
                    )
                    .help("use pool values with equal token counts, or zero ablation"),
                );
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
