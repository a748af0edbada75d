//! The pest parser: statements parsed one by one, with recovery after syntax errors so that
//! every broken statement is reported; `lower` turns each parse tree into AST.

use std::sync::Arc;

use pest::Parser as _;

use super::ast::*;
use super::lower::{convert_statement, Ctx};
use crate::diag::{did_you_mean, Diagnostic, SourceFile, Span};

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/bay.pest"]
pub struct BayParser;

/// Words that start a statement, for error recovery and suggestions.
pub const STATEMENT_KEYWORDS: &[&str] = &[
    "include",
    "model",
    "batch",
    "pool",
    "dataset",
    "corruption",
    "patch",
    "path",
    "metric",
    "average",
    "sweep",
    "expect",
    "output",
    "per_prompt",
    "report",
];

/// Parse the statements of one file (no includes), recovering after syntax errors so that every
/// broken statement is reported.
pub fn parse_statements(file: &Arc<SourceFile>) -> (Vec<Statement>, Vec<Diagnostic>) {
    // Track literal tokens (`=`, `{`, ...) at the furthest position, not only rules: without it
    // an error at a literal is reported at the start of the statement.
    pest::set_error_detail(true);
    let text = file.text.as_str();
    let mut pos = 0usize;
    let mut statements = Vec::new();
    let mut errors = Vec::new();
    loop {
        pos = skip_trivia(text, pos);
        if pos >= text.len() {
            break;
        }
        match BayParser::parse(Rule::one_statement, &text[pos..]) {
            Ok(mut pairs) => {
                let one = pairs.next().expect("one_statement");
                let end = pos + one.as_span().end();
                let stmt = one.into_inner().next().expect("statement");
                let ctx = Ctx { file, offset: pos, errors: Default::default() };
                statements.push(convert_statement(&ctx, stmt));
                errors.extend(ctx.errors.into_inner());
                if end == pos {
                    break;
                }
                pos = end;
            }
            Err(e) => {
                let d = syntax_error(file, pos, e);
                let at = d.span.as_ref().map(|s| s.range.start).unwrap_or(pos);
                errors.push(d);
                // Inside a `{ ... }` block, keep checking the block's remaining lines.
                let from = match block_rule(text, pos, at) {
                    Some((rule, open)) => recover_in_block(file, rule, open, at, &mut errors),
                    None => pos,
                };
                match resync(text, from.max(pos)) {
                    Some(next) => pos = next,
                    None => break,
                }
            }
        }
    }
    (statements, errors)
}

/// Words that start a line of a dataset block or a sweep axis (for recovery inside blocks).
const DATASET_ITEM_KEYWORDS: &[&str] =
    &["template", "slot", "pool", "count", "seed", "answer", "wrong", "prompt", "counterfactual"];

/// When the statement at `start` is a block statement (`dataset`, `sweep`) and the error at `at`
/// lies inside its `{`, the rule that parses one line of the block and the position of the `{`.
fn block_rule(text: &str, start: usize, at: usize) -> Option<(Rule, usize)> {
    let word: String = text[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    let rule = match word.as_str() {
        "dataset" => Rule::one_dataset_item,
        "sweep" => Rule::one_axis,
        _ => return None,
    };
    // The first `{` outside a string literal.
    let bytes = text.as_bytes();
    let mut i = start;
    let mut in_str = false;
    while i < at.min(bytes.len()) {
        match bytes[i] {
            b'\\' if in_str => i += 1,
            b'"' => in_str = !in_str,
            b'\n' => in_str = false,
            b'{' if !in_str => return Some((rule, i)),
            b'#' if !in_str => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// After a syntax error at `at` inside a block opened at `open`, parse the block's remaining lines
/// one at a time (resynchronising at each line that starts with a block keyword) and report their
/// errors too. Returns where the block ends.
fn recover_in_block(file: &Arc<SourceFile>, rule: Rule, open: usize, at: usize, errors: &mut Vec<Diagnostic>) -> usize {
    let text = file.text.as_str();
    let Some(mut pos) = next_block_line(text, at, rule) else { return text.len() };
    let _ = open;
    loop {
        pos = skip_trivia(text, pos);
        if pos >= text.len() || text[pos..].starts_with('}') || at_statement_line(text, pos) {
            return pos;
        }
        match BayParser::parse(rule, &text[pos..]) {
            Ok(mut pairs) => {
                let end = pairs.next().map(|p| p.as_span().end()).unwrap_or(0);
                if end == 0 {
                    return pos;
                }
                pos += end;
            }
            Err(e) => {
                let d = syntax_error(file, pos, e);
                let err_at = d.span.as_ref().map(|s| s.range.start).unwrap_or(pos);
                errors.push(d);
                match next_block_line(text, err_at, rule) {
                    Some(next) => pos = next,
                    None => return text.len(),
                }
            }
        }
    }
}

/// The start of the next line (after `pos`) that begins, after indentation, with a keyword of a
/// block line (or with `}`, or is an unindented statement).
fn next_block_line(text: &str, pos: usize, rule: Rule) -> Option<usize> {
    let mut line_start = text[pos..].find('\n').map(|i| pos + i + 1)?;
    loop {
        let line = &text[line_start..];
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        let rest = &line[indent..];
        let word: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let item = match rule {
            Rule::one_dataset_item => DATASET_ITEM_KEYWORDS.contains(&word.as_str()),
            // A sweep axis line starts with a name.
            _ => !word.is_empty(),
        };
        if rest.starts_with('}') || item || at_statement_line(text, line_start) {
            return Some(line_start + indent);
        }
        line_start = line_start + line.find('\n')? + 1;
    }
}

/// Whether `pos` starts an unindented line with a statement keyword.
fn at_statement_line(text: &str, pos: usize) -> bool {
    if pos > 0 && text.as_bytes()[pos - 1] != b'\n' {
        return false;
    }
    let word: String = text[pos..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    STATEMENT_KEYWORDS.contains(&word.as_str())
}

fn skip_trivia(text: &str, mut pos: usize) -> usize {
    let bytes = text.as_bytes();
    while pos < bytes.len() {
        match bytes[pos] {
            b' ' | b'\t' | b'\r' | b'\n' => pos += 1,
            b'#' => {
                while pos < bytes.len() && bytes[pos] != b'\n' {
                    pos += 1;
                }
            }
            _ => break,
        }
    }
    pos
}

/// The start of the next unindented line that begins with a statement keyword.
fn resync(text: &str, pos: usize) -> Option<usize> {
    let mut line_start = text[pos..].find('\n').map(|i| pos + i + 1)?;
    loop {
        let line = &text[line_start..];
        let word: String = line.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if STATEMENT_KEYWORDS.contains(&word.as_str()) {
            return Some(line_start);
        }
        line_start = line_start + line.find('\n')? + 1;
    }
}

fn rule_name(rule: Rule) -> String {
    let s = format!("{rule:?}");
    if let Some(k) = s.strip_prefix("kw_") {
        return format!("`{k}`");
    }
    match rule {
        Rule::ident | Rule::ident_list => "a name".into(),
        Rule::string => "a quoted string".into(),
        Rule::int => "an integer".into(),
        Rule::number => "a number".into(),
        Rule::hook_name | Rule::hooks => "a hook name".into(),
        Rule::str_list => "a list of strings `[\"a\", \"b\"]`".into(),
        Rule::pool_ref => "a pool name or a list of strings".into(),
        Rule::cmp_op => "a comparison (`>`, `>=`, `<`, `<=`, `=`, `!=`)".into(),
        Rule::selection => "`all`, a number, a range `a..b` or a list `[...]`".into(),
        Rule::component | Rule::component_id | Rule::components => "a component like `L9.H9` or `L3`".into(),
        Rule::position | Rule::pos_list => "a position (`end`, a slot name, an index)".into(),
        Rule::EOI => "end of file".into(),
        Rule::statement | Rule::one_statement | Rule::statement_kw => "a statement".into(),
        Rule::one_axis => "a sweep axis like `corruption: [a, b]`".into(),
        Rule::dataset_item
        | Rule::one_dataset_item
        | Rule::template
        | Rule::slot_from
        | Rule::slot_eq
        | Rule::count
        | Rule::seed
        | Rule::answer
        | Rule::wrong
        | Rule::column => {
            "a dataset line (`template`, `slot`, `pool`, `count`, `seed`, `answer`, `wrong`, `prompt: column`)".into()
        }
        Rule::axis => "a sweep axis like `corruption: [a, b]`".into(),
        Rule::noise_opt => "`scale`, `samples` or `seed`".into(),
        Rule::metric_opt => "a metric option".into(),
        Rule::layers
        | Rule::heads
        | Rule::positions
        | Rule::window
        | Rule::summation
        | Rule::estimate
        | Rule::verify => {
            "`layers`, `heads`, `positions`, `window`, `with summation baseline`, `by attribution` or `verify top k`"
                .into()
        }
        Rule::receiver | Rule::recv_heads | Rule::recv_input | Rule::head_list => {
            "a receiver: `logits`, `resid N`, or heads with their input (`[L9.H9, L10.H7] q`, `L9.H9 k`)".into()
        }
        Rule::freeze | Rule::freeze_item => "`freeze heads`, `freeze heads, mlps` or `freeze none`".into(),
        Rule::ablation => "`zero ablation`, `mean ablation` or `resample ablation`".into(),
        Rule::replace | Rule::resample | Rule::noise | Rule::counterfactual => {
            "a corruption (`replace`, `resample`, `noise on`, `counterfactual`, `... ablation`)".into()
        }
        Rule::exp_detected | Rule::exp_top | Rule::exp_effect => "`detected`, `top` or `effect`".into(),
        Rule::when => "`when`".into(),
        Rule::membership => "`includes` or `excludes`".into(),
        _ => format!("`{}`", s.replace('_', " ")),
    }
}

fn at_of(e: &pest::error::Error<Rule>, offset: usize) -> usize {
    offset
        + match e.location {
            pest::error::InputLocation::Pos(p) => p,
            pest::error::InputLocation::Span((s, _)) => s,
        }
}

fn syntax_error(file: &Arc<SourceFile>, offset: usize, e: pest::error::Error<Rule>) -> Diagnostic {
    use pest::error::{ErrorVariant, InputLocation};
    let mut rel = match e.location {
        InputLocation::Pos(p) => p,
        InputLocation::Span((s, _)) => s,
    };
    // pest reports rules only; literal tokens (`=`, `{`, `:`) expected further on are in the
    // parse attempts.
    let mut literal_expected: Vec<String> = Vec::new();
    if let Some(att) = e.parse_attempts() {
        if att.max_position >= rel {
            rel = att.max_position;
            // Punctuation only: whitespace, comments, character ranges and the characters of
            // names and numbers are noise here.
            literal_expected = att
                .expected_tokens()
                .iter()
                .map(|t| t.to_string())
                .filter(|t| {
                    let is_char_range = t.chars().count() == 4 && t.chars().skip(1).take(2).all(|c| c == '.');
                    !is_char_range
                        && !t.is_empty()
                        && !t.chars().all(|c| c.is_whitespace())
                        && !matches!(t.as_str(), "#" | "-" | "." | "\\" | "\"")
                        && !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                })
                .map(|t| format!("`{t}`"))
                .collect();
        }
    }
    let at = offset + rel;
    let text = &file.text;
    let at = at.min(text.len());
    // What was found: the word (or character) at the error.
    let rest = &text[at..];
    let word_len = rest
        .char_indices()
        .take_while(|(_, c)| c.is_alphanumeric() || *c == '_' || *c == '.')
        .last()
        .map(|(i, c)| i + c.len_utf8())
        .unwrap_or_else(|| rest.chars().next().map(|c| c.len_utf8()).unwrap_or(0));
    let found_text = &rest[..word_len];
    let found = if found_text.is_empty() {
        "end of file".to_string()
    } else if found_text == "\n" || found_text == "\r" {
        "end of line".to_string()
    } else {
        format!("`{found_text}`")
    };
    let span = Span::new(file, at..at + word_len);
    let mut expected: Vec<String> = match &e.variant {
        _ if offset + rel != at_of(&e, offset) && !literal_expected.is_empty() => literal_expected,
        ErrorVariant::ParsingError { positives, .. } => {
            positives.iter().map(|r| rule_name(*r)).chain(literal_expected).collect()
        }
        ErrorVariant::CustomError { message } => vec![message.clone()],
    };
    expected.sort();
    expected.dedup();
    // At the start of a statement, an unknown word gets a "did you mean".
    if at == offset {
        let mut d = Diagnostic::error(
            "patchbay::syntax",
            format!("syntax error: expected a statement, found {found}"),
            &span,
            "not a statement",
        );
        d = match did_you_mean(found_text, STATEMENT_KEYWORDS.iter().copied()) {
            Some(s) if !found_text.is_empty() => d.help(format!("did you mean `{s}`?")),
            _ => d.help(format!("statements start with one of: {}", STATEMENT_KEYWORDS.join(", "))),
        };
        return d;
    }
    let expected_words = match expected.len() {
        0 => "something else".to_string(),
        1 => expected[0].clone(),
        n => format!("{} or {}", expected[..n - 1].join(", "), expected[n - 1]),
    };
    let help = if !found_text.is_ascii() {
        "names are ASCII letters, digits and `_` (`[A-Za-z_][A-Za-z0-9_]*`); other text goes in a \"string\""
    } else {
        "the language reference is spec/language.md; statements after this one are still checked"
    };
    Diagnostic::error(
        "patchbay::syntax",
        format!("syntax error: expected {expected_words}, found {found}"),
        &span,
        "unexpected here",
    )
    .help(help)
}
