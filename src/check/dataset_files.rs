//! Prompt-file datasets: CSV (with a header row) or JSONL, columns mapped to roles.

use std::collections::{BTreeMap, BTreeSet};

use super::answers::resolve_answer;
use super::checker::Built;
use super::error::CheckError;
use super::tok::Tok;
use crate::diag::{Diagnostic, Span};
use crate::ir::experiment::*;
use crate::syntax::ast::{self, AnswerSpec, ColumnRole, DatasetItem, Spanned};

fn bad_csv(f: &Spanned<String>, e: &csv::Error) -> Diagnostic {
    CheckError::BadCsv { file: f.node.clone(), error: e.to_string() }.at(&f.span)
}

/// A dataset read from a prompt file: CSV with a header row, or JSONL.
pub fn build_file_dataset(
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
            errors.push(CheckError::missing_file(&f.node, &path, &e).at(&f.span));
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
                    let error = CheckError::BadJsonl { file: f.node.clone(), line: i + 1, error: e.to_string() };
                    errors.push(error.at(&f.span));
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
                errors.push(bad_csv(f, &e));
                return None;
            }
        };
        let mut rs = Vec::new();
        for rec in rdr.records() {
            match rec {
                Ok(r) => rs.push(headers.iter().cloned().zip(r.iter().map(|s| s.to_string())).collect()),
                Err(e) => {
                    errors.push(bad_csv(f, &e));
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
                    let error = CheckError::MissingColumn {
                        file: f.node.clone(),
                        column: column.node.clone(),
                        columns: headers.clone(),
                        file_span: f.span.clone(),
                    };
                    errors.push(error.at(&column.span));
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
                    errors.push(CheckError::duplicate("column role", role.span.text(), prev).at(&role.span));
                }
                *slot = Some((role.span.clone(), column.node.clone()));
            }
            DatasetItem::Count(c) => {
                if !(1..=100_000).contains(&c.node) {
                    errors.push(CheckError::CountOutOfRange.at(&c.span));
                }
                count = Some(c)
            }
            DatasetItem::Template(t) => {
                errors.push(CheckError::TemplateWithFile { file_span: f.span.clone() }.at(&t.span))
            }
            DatasetItem::Seed(_) | DatasetItem::Pool(_) => {}
            DatasetItem::SlotFrom { span, .. } | DatasetItem::SlotEq { span, .. } => {
                errors.push(CheckError::SlotInFileDataset.at(span))
            }
            DatasetItem::Answer(a) | DatasetItem::Wrong(a) => errors.push(CheckError::AnswerInFileDataset.at(&a.span)),
        }
    }
    if prompt_col.is_none() {
        let error =
            CheckError::NoPromptColumn { dataset: d.name.node.clone(), file: f.node.clone(), columns: headers.clone() };
        errors.push(error.at(&d.name.span));
    }
    if answer_col.is_none() {
        let error =
            CheckError::NoAnswerColumn { dataset: d.name.node.clone(), file: f.node.clone(), columns: headers.clone() };
        errors.push(error.at(&d.name.span));
    }
    if rows.is_empty() {
        // Column errors about an empty file only repeat this one.
        errors.truncate(n_errors);
        errors.push(CheckError::EmptyFile { file: f.node.clone(), jsonl: is_jsonl }.at(&f.span));
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
            let error = CheckError::RowMissingColumn {
                file: f.node.clone(),
                row: i + 1,
                column: col.node.clone(),
                file_span: f.span.clone(),
            };
            errors.push(error.at(&col.span));
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
                let error = CheckError::SlotNotInPrompt {
                    row: i + 1,
                    column: col.node.clone(),
                    value: v.clone(),
                    prompt: text.clone(),
                };
                errors.push(error.at(&col.span));
                return None;
            };
            match enc.token_span(start, start + v.len()) {
                Some((a, b)) => {
                    slots.insert(
                        s.node.clone(),
                        SlotSpan { value: v.clone(), first: a, last: b, start, end: start + v.len() },
                    );
                }
                None => {
                    let which = format!("row {}", i + 1);
                    let (slot, value, prompt) = (col.node.clone(), v.clone(), text.clone());
                    errors.push(CheckError::SlotWithoutTokens { which, slot, value, prompt }.at(&col.span));
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
        counterfactual: cf_col.map(|_| cfs),
        seed: 0,
    })
}
