//! Answers: single tokens (a slot's value, a literal, a file's column) and token sets.

use std::collections::BTreeMap;

use super::checker::PoolValues;
use super::error::CheckError;
use super::tok::Tok;
use crate::diag::{Diagnostic, Span};
use crate::ir::experiment::{Answer, CmpOp};
use crate::syntax::ast::{AnswerSpec, Spanned};

/// An answer spec resolved for one prompt.
pub fn resolve_answer(
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
        let shown = tok.bracketed(&ids);
        errors.push(CheckError::MultiTokenAnswer { text: text.to_string(), n_tokens: ids.len(), shown }.at(span));
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
                        let error = CheckError::NotANumber { value: v.clone(), reference: reference.clone() };
                        errors.push(error.at(&op.span));
                        return None;
                    };
                    if !CmpOp::from(op.node).holds(a, b) {
                        continue;
                    }
                }
                let ids = tok.encode_plain(v);
                if ids.len() != 1 {
                    let shown = tok.bracketed(&ids);
                    let error = CheckError::MultiTokenSetMember { value: v.clone(), n_tokens: ids.len(), shown };
                    errors.push(error.at(pool.span()));
                    return None;
                }
                out.push((v.clone(), ids[0]));
            }
            if out.is_empty() {
                let filter = filter
                    .as_ref()
                    .and_then(|(op, s)| values.get(&s.node).map(|v| (CmpOp::from(op.node).symbol(), v.clone())));
                errors.push(CheckError::EmptyTokenSet { prompt, filter }.at(&spec.span));
                return None;
            }
            Some(Answer::Set(out))
        }
    }
}
