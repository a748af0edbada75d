//! The pest parser and the conversion of its parse tree into the [`ast`](super::ast).

use std::sync::Arc;

use pest::iterators::Pair;
use pest::Parser as _;

use super::ast::*;
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
    "metric",
    "average",
    "sweep",
    "expect",
    "output",
    "per_prompt",
    "report",
];

struct Ctx<'a> {
    file: &'a Arc<SourceFile>,
    offset: usize,
    /// Errors found while converting (e.g. `1.5` where an integer is required).
    errors: std::cell::RefCell<Vec<Diagnostic>>,
}

impl Ctx<'_> {
    fn span(&self, pair: &Pair<Rule>) -> Span {
        let s = pair.as_span();
        Span::new(self.file, self.offset + s.start()..self.offset + s.end())
    }
    fn ident(&self, pair: Pair<Rule>) -> Ident {
        Spanned::new(pair.as_str().to_string(), self.span(&pair))
    }
    fn string(&self, pair: Pair<Rule>) -> Spanned<String> {
        let span = self.span(&pair);
        let inner = pair.into_inner().next().map(|p| p.as_str()).unwrap_or("");
        Spanned::new(unescape(inner), span)
    }
    fn int(&self, pair: Pair<Rule>) -> Spanned<i64> {
        let span = self.span(&pair);
        if pair.as_str().contains(['.', 'e', 'E']) {
            self.errors.borrow_mut().push(
                Diagnostic::error(
                    "patchbay::syntax",
                    format!("`{}` is not a whole number", pair.as_str()),
                    &span,
                    "an integer is required here",
                )
                .help(
                    "counts, seeds, samples, batch sizes, layers, heads, positions, windows and `top k` are \
                     integers: write digits only, e.g. `1000` instead of `1e3`",
                ),
            );
            return Spanned::new(0, span);
        }
        // Out-of-range literals saturate; the checker reports the range problem.
        let v =
            pair.as_str().parse::<i64>().unwrap_or(if pair.as_str().starts_with('-') { i64::MIN } else { i64::MAX });
        Spanned::new(v, span)
    }
    fn number(&self, pair: Pair<Rule>) -> Spanned<f64> {
        let span = self.span(&pair);
        Spanned::new(pair.as_str().parse::<f64>().unwrap_or(f64::NAN), span)
    }
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(o) => out.push(o),
                None => {}
            }
        } else {
            out.push(c);
        }
    }
    out
}

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
        Rule::layers | Rule::heads | Rule::positions | Rule::window | Rule::summation => {
            "`layers`, `heads`, `positions`, `window` or `with summation baseline`".into()
        }
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

fn convert_statement(ctx: &Ctx, pair: Pair<Rule>) -> Statement {
    let span = ctx.span(&pair);
    let rule = pair.as_rule();
    let mut inner = no_kw(pair).peekable();
    let kind = match rule {
        Rule::include => StatementKind::Include(ctx.string(inner.next().unwrap())),
        Rule::model => StatementKind::Model {
            reference: ctx.string(inner.next().unwrap()),
            device: inner.next().map(|p| ctx.ident(p)),
        },
        Rule::batch => StatementKind::Batch(ctx.int(inner.next().unwrap())),
        Rule::pool => StatementKind::Pool(convert_pool(ctx, inner)),
        Rule::dataset => {
            let name = ctx.ident(inner.next().unwrap());
            let mut file = None;
            let mut items = Vec::new();
            for p in inner {
                match p.as_rule() {
                    Rule::string => file = Some(ctx.string(p)),
                    _ => items.push(convert_dataset_item(ctx, p)),
                }
            }
            StatementKind::Dataset(Dataset { name, file, items, span: span.clone() })
        }
        Rule::corruption => {
            let name = ctx.ident(inner.next().unwrap());
            let kind = convert_corruption(ctx, inner.next().unwrap());
            StatementKind::Corruption { name, kind }
        }
        Rule::patch => StatementKind::Patch(convert_patch(ctx, inner)),
        Rule::metric => {
            let name = ctx.ident(inner.next().unwrap());
            let kind = ctx.ident(inner.next().unwrap());
            let options = inner.map(|p| ctx.ident(p.into_inner().next().unwrap())).collect();
            StatementKind::Metric { name, kind, options }
        }
        Rule::average => StatementKind::Average(ctx.ident(inner.next().unwrap())),
        Rule::sweep => StatementKind::Sweep(
            inner
                .map(|axis| {
                    let mut it = axis.into_inner();
                    let name = ctx.ident(it.next().unwrap());
                    let values = it.map(|v| ctx.ident(v)).collect();
                    Axis { name, values }
                })
                .collect(),
        ),
        Rule::expect => {
            let kind = convert_expect(ctx, inner.next().unwrap());
            let when = inner
                .next()
                .map(|w| {
                    w.into_inner()
                        .filter(|p| p.as_rule() == Rule::condition)
                        .map(|c| {
                            let mut it = c.into_inner();
                            (ctx.ident(it.next().unwrap()), ctx.ident(it.next().unwrap()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            StatementKind::Expect(Expect { kind, when })
        }
        Rule::output => StatementKind::Output(ctx.string(inner.next().unwrap())),
        Rule::per_prompt => StatementKind::PerPrompt(ctx.string(inner.next().unwrap())),
        Rule::report => StatementKind::Report(ctx.string(inner.next().unwrap())),
        other => unreachable!("statement rule {other:?}"),
    };
    Statement { kind, span, included: false }
}

fn no_kw<'i>(pair: Pair<'i, Rule>) -> impl Iterator<Item = Pair<'i, Rule>> {
    pair.into_inner().filter(|p| !format!("{:?}", p.as_rule()).starts_with("kw_"))
}

fn convert_pool<'i>(ctx: &Ctx, mut inner: impl Iterator<Item = Pair<'i, Rule>>) -> Pool {
    let name = ctx.ident(inner.next().unwrap());
    let src = inner.next().unwrap();
    let source = match src.as_rule() {
        Rule::str_list => PoolSource::Inline(src.into_inner().map(|s| ctx.string(s)).collect()),
        _ => PoolSource::File(ctx.string(src)),
    };
    Pool { name, source }
}

fn convert_pool_ref(ctx: &Ctx, pair: Pair<Rule>) -> PoolRef {
    let p = pair.into_inner().next().unwrap();
    match p.as_rule() {
        Rule::str_list => {
            let span = ctx.span(&p);
            PoolRef::Inline(Spanned::new(p.into_inner().map(|s| ctx.string(s)).collect(), span))
        }
        _ => PoolRef::Named(ctx.ident(p)),
    }
}

fn convert_answer(ctx: &Ctx, pair: Pair<Rule>) -> Spanned<AnswerSpec> {
    let span = ctx.span(&pair);
    let p = no_kw(pair).next().unwrap();
    let spec = match p.as_rule() {
        Rule::string => AnswerSpec::Literal(ctx.string(p)),
        Rule::ident => AnswerSpec::Slot(ctx.ident(p)),
        _ => {
            let mut it = no_kw(p);
            let pool = convert_pool_ref(ctx, it.next().unwrap());
            let filter = it.next().map(|op| {
                let op = Spanned::new(parse_cmp(op.as_str()), ctx.span(&op));
                (op, ctx.ident(it.next().unwrap()))
            });
            AnswerSpec::Set { pool, filter }
        }
    };
    Spanned::new(spec, span)
}

fn parse_cmp(s: &str) -> CmpOp {
    match s {
        ">" => CmpOp::Gt,
        ">=" => CmpOp::Ge,
        "<" => CmpOp::Lt,
        "<=" => CmpOp::Le,
        "!=" => CmpOp::Ne,
        _ => CmpOp::Eq,
    }
}

fn convert_dataset_item(ctx: &Ctx, pair: Pair<Rule>) -> DatasetItem {
    let span = ctx.span(&pair);
    match pair.as_rule() {
        Rule::template => DatasetItem::Template(ctx.string(no_kw(pair).next().unwrap())),
        Rule::pool => DatasetItem::Pool(convert_pool(ctx, no_kw(pair))),
        Rule::slot_from => {
            let mut it = no_kw(pair);
            let slots = it.next().unwrap().into_inner().map(|p| ctx.ident(p)).collect();
            let pool = convert_pool_ref(ctx, it.next().unwrap());
            let distinct = it.next().map(|p| ctx.span(&p));
            DatasetItem::SlotFrom { slots, pool, distinct, span }
        }
        Rule::slot_eq => {
            let mut it = no_kw(pair);
            DatasetItem::SlotEq { slot: ctx.ident(it.next().unwrap()), other: ctx.ident(it.next().unwrap()), span }
        }
        Rule::count => DatasetItem::Count(ctx.int(no_kw(pair).next().unwrap())),
        Rule::seed => DatasetItem::Seed(ctx.int(no_kw(pair).next().unwrap())),
        Rule::answer => DatasetItem::Answer(convert_answer(ctx, pair)),
        Rule::wrong => DatasetItem::Wrong(convert_answer(ctx, pair)),
        Rule::column => {
            let mut it = pair.into_inner();
            let role_pair = it.next().unwrap();
            let role_span = ctx.span(&role_pair);
            let r = role_pair.into_inner().next().unwrap();
            let role = match r.as_rule() {
                Rule::kw_prompt => ColumnRole::Prompt,
                Rule::kw_counterfactual => ColumnRole::Counterfactual,
                Rule::kw_answer => ColumnRole::Answer,
                Rule::kw_wrong => ColumnRole::Wrong,
                _ => ColumnRole::Slot(ctx.ident(no_kw(r).next().unwrap())),
            };
            DatasetItem::Column { role: Spanned::new(role, role_span), column: ctx.ident(it.next().unwrap()) }
        }
        other => unreachable!("dataset item {other:?}"),
    }
}

fn opt_seed<'i>(ctx: &Ctx, it: &mut impl Iterator<Item = Pair<'i, Rule>>) -> Option<Spanned<i64>> {
    it.next().map(|p| ctx.int(p))
}

fn convert_corruption(ctx: &Ctx, pair: Pair<Rule>) -> CorruptionKind {
    match pair.as_rule() {
        Rule::replace => CorruptionKind::Replace(
            no_kw(pair)
                .map(|r| {
                    let mut it = no_kw(r);
                    let slot = ctx.ident(it.next().unwrap());
                    let w = it.next().unwrap();
                    let with = match w.as_rule() {
                        Rule::string => ReplaceWith::Literal(ctx.string(w)),
                        _ => ReplaceWith::Slot(ctx.ident(w)),
                    };
                    (slot, with)
                })
                .collect(),
        ),
        Rule::resample => {
            let mut slots = Vec::new();
            let mut distinct = false;
            let mut seed = None;
            for p in no_kw(pair) {
                match p.as_rule() {
                    Rule::ident_list => slots = p.into_inner().map(|i| ctx.ident(i)).collect(),
                    Rule::distinct => distinct = true,
                    _ => seed = Some(ctx.int(p)),
                }
            }
            CorruptionKind::Resample { slots, distinct, seed }
        }
        Rule::noise => {
            let mut it = no_kw(pair);
            let slots = it.next().unwrap().into_inner().map(|i| ctx.ident(i)).collect();
            let (mut scale, mut samples, mut seed) = (None, None, None);
            for opt in it {
                let mut o = opt.into_inner();
                let kw = o.next().unwrap();
                let v = o.next().unwrap();
                match kw.as_rule() {
                    Rule::kw_scale => scale = Some(ctx.number(v)),
                    Rule::kw_samples => samples = Some(ctx.int(v)),
                    _ => seed = Some(ctx.int(v)),
                }
            }
            CorruptionKind::Noise { slots, scale, samples, seed }
        }
        Rule::counterfactual => CorruptionKind::Counterfactual,
        Rule::ablation => {
            let mut it = no_kw(pair);
            let kind = ctx.ident(it.next().unwrap());
            CorruptionKind::Ablation { kind, seed: opt_seed(ctx, &mut it) }
        }
        other => unreachable!("corruption {other:?}"),
    }
}

fn convert_selection(ctx: &Ctx, pair: Pair<Rule>) -> Spanned<Selection> {
    let span = ctx.span(&pair);
    let p = pair.into_inner().next().unwrap();
    let item = |p: Pair<Rule>| -> Spanned<SelItem> {
        let span = ctx.span(&p);
        match p.as_rule() {
            Rule::range => {
                let mut it = p.into_inner();
                let a = ctx.int(it.next().unwrap()).node;
                let b = ctx.int(it.next().unwrap()).node;
                Spanned::new(SelItem::Range(a, b), span)
            }
            _ => Spanned::new(SelItem::One(ctx.int(p).node), span),
        }
    };
    let sel = match p.as_rule() {
        Rule::all => Selection::All,
        Rule::int_list => Selection::Items(p.into_inner().map(item).collect()),
        _ => Selection::Items(vec![item(p)]),
    };
    Spanned::new(sel, span)
}

fn convert_position(ctx: &Ctx, pair: Pair<Rule>) -> Spanned<Position> {
    let span = ctx.span(&pair);
    let mut first = false;
    let mut pos = Position::End;
    for p in pair.into_inner() {
        match p.as_rule() {
            Rule::end => pos = Position::End,
            Rule::int => pos = Position::Index(ctx.int(p).node),
            Rule::first_last => first = p.as_str().starts_with("first"),
            _ => pos = Position::Slot { name: p.as_str().to_string(), first },
        }
    }
    Spanned::new(pos, span)
}

fn convert_patch<'i>(ctx: &Ctx, mut inner: impl Iterator<Item = Pair<'i, Rule>>) -> Patch {
    let name = ctx.ident(inner.next().unwrap());
    let hooks = inner.next().unwrap().into_inner().map(|h| ctx.ident(h)).collect();
    let mut patch = Patch { name, hooks, layers: None, heads: None, positions: None, window: None, summation: None };
    for opt in inner {
        let span = ctx.span(&opt);
        match opt.as_rule() {
            Rule::layers => patch.layers = Some(convert_selection(ctx, no_kw(opt).next().unwrap())),
            Rule::heads => patch.heads = Some(convert_selection(ctx, no_kw(opt).next().unwrap())),
            Rule::positions => {
                let p = no_kw(opt).next().unwrap();
                let sel = match p.as_rule() {
                    Rule::all => PositionSel::All,
                    Rule::each => PositionSel::Each,
                    Rule::pos_list => PositionSel::List(p.into_inner().map(|q| convert_position(ctx, q)).collect()),
                    _ => PositionSel::List(vec![convert_position(ctx, p)]),
                };
                patch.positions = Some(Spanned::new(sel, span));
            }
            Rule::window => {
                let p = no_kw(opt).next().unwrap();
                let ws = match p.as_rule() {
                    Rule::win_list => p.into_inner().map(|i| ctx.int(i)).collect(),
                    _ => vec![ctx.int(p)],
                };
                patch.window = Some(Spanned::new(ws, span));
            }
            _ => patch.summation = Some(span),
        }
    }
    patch
}

fn convert_component(ctx: &Ctx, pair: Pair<Rule>) -> Spanned<Component> {
    let span = ctx.span(&pair);
    let mut it = pair.into_inner();
    let id = it.next().unwrap().as_str();
    let body = &id[1..];
    let (l, h) = match body.split_once(".H") {
        Some((l, h)) => (l, Some(h)),
        None => (body, None),
    };
    let num = |s: &str| s.parse::<i64>().unwrap_or(i64::MAX);
    let position = it.next().map(|p| convert_position(ctx, p).node);
    Spanned::new(Component { layer: num(l), head: h.map(num), position }, span)
}

fn convert_expect(ctx: &Ctx, pair: Pair<Rule>) -> ExpectKind {
    let rule = pair.as_rule();
    let mut it = no_kw(pair);
    match rule {
        Rule::exp_detected => {
            let target = ctx.ident(it.next().unwrap());
            let metric = ctx.ident(it.next().unwrap());
            let mut sd = None;
            let mut next = it.next().unwrap();
            if next.as_rule() == Rule::number {
                sd = Some(ctx.number(next));
                next = it.next().unwrap();
            }
            let includes = next.as_str().starts_with("includes");
            let components = it.next().unwrap().into_inner().map(|c| convert_component(ctx, c)).collect();
            ExpectKind::Detected { target, metric, sd, includes, components }
        }
        Rule::exp_top => {
            let k = ctx.int(it.next().unwrap());
            let target = ctx.ident(it.next().unwrap());
            let metric = ctx.ident(it.next().unwrap());
            let includes = it.next().unwrap().as_str().starts_with("includes");
            let components = it.next().unwrap().into_inner().map(|c| convert_component(ctx, c)).collect();
            ExpectKind::Top { k, target, metric, includes, components }
        }
        _ => {
            let target = ctx.ident(it.next().unwrap());
            let component = convert_component(ctx, it.next().unwrap());
            let metric = ctx.ident(it.next().unwrap());
            let op_pair = it.next().unwrap();
            let op = Spanned::new(parse_cmp(op_pair.as_str()), ctx.span(&op_pair));
            let value = ctx.number(it.next().unwrap());
            ExpectKind::Effect { target, component, metric, op, value }
        }
    }
}
