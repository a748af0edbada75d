//! Lowering pest's parse tree into the [`ast`](super::ast): spans, literals (unescaped strings,
//! integers that must be whole) and one AST node per grammar rule.

use std::sync::Arc;

use pest::iterators::Pair;

use super::ast::*;
use super::parser::Rule;
use crate::diag::{Diagnostic, SourceFile, Span};

pub(super) struct Ctx<'a> {
    pub(super) file: &'a Arc<SourceFile>,
    pub(super) offset: usize,
    /// Errors found while converting (e.g. `1.5` where an integer is required).
    pub(super) errors: std::cell::RefCell<Vec<Diagnostic>>,
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

pub(super) fn convert_statement(ctx: &Ctx, pair: Pair<Rule>) -> Statement {
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
        Rule::path => StatementKind::Patch(convert_path(ctx, inner)),
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
    let mut patch = target_named(ctx, &mut inner);
    for opt in inner {
        let span = ctx.span(&opt);
        match opt.as_rule() {
            Rule::layers | Rule::heads | Rule::positions => target_selection(ctx, opt, &mut patch),
            Rule::window => {
                let p = no_kw(opt).next().unwrap();
                let ws = match p.as_rule() {
                    Rule::win_list => p.into_inner().map(|i| ctx.int(i)).collect(),
                    _ => vec![ctx.int(p)],
                };
                patch.window = Some(Spanned::new(ws, span));
            }
            Rule::estimate => {
                let estimator = match no_kw(opt).next().map(|p| p.as_rule()) {
                    Some(Rule::atp_star) => Estimator::AtpStar,
                    _ => Estimator::Attribution,
                };
                patch.estimate = Some(Spanned::new(estimator, span));
            }
            Rule::verify => patch.verify = Some(Spanned::new(ctx.int(no_kw(opt).next().unwrap()).node, span)),
            _ => patch.summation = Some(span),
        }
    }
    patch
}

/// A patch target's (or a path's) name and hooks, the first two of `inner`; nothing selected yet.
fn target_named<'i>(ctx: &Ctx, inner: &mut impl Iterator<Item = Pair<'i, Rule>>) -> Patch {
    let name = ctx.ident(inner.next().unwrap());
    let hooks = inner.next().unwrap().into_inner().map(|h| ctx.ident(h)).collect();
    Patch {
        name,
        hooks,
        layers: None,
        heads: None,
        positions: None,
        window: None,
        summation: None,
        estimate: None,
        verify: None,
        path: None,
    }
}

/// `layers`, `heads` or `positions` of a patch target (or of a path's senders).
fn target_selection(ctx: &Ctx, opt: Pair<Rule>, patch: &mut Patch) {
    let span = ctx.span(&opt);
    match opt.as_rule() {
        Rule::layers => patch.layers = Some(convert_selection(ctx, no_kw(opt).next().unwrap())),
        Rule::heads => patch.heads = Some(convert_selection(ctx, no_kw(opt).next().unwrap())),
        _ => {
            let p = no_kw(opt).next().unwrap();
            let sel = match p.as_rule() {
                Rule::all => PositionSel::All,
                Rule::each => PositionSel::Each,
                Rule::pos_list => PositionSel::List(p.into_inner().map(|q| convert_position(ctx, q)).collect()),
                _ => PositionSel::List(vec![convert_position(ctx, p)]),
            };
            patch.positions = Some(Spanned::new(sel, span));
        }
    }
}

/// A `path` statement: a patch target (its senders) with a receiver and what is frozen.
fn convert_path<'i>(ctx: &Ctx, mut inner: impl Iterator<Item = Pair<'i, Rule>>) -> Patch {
    let mut patch = target_named(ctx, &mut inner);
    let (mut receiver, mut freeze) = (None, None);
    for opt in inner {
        let span = ctx.span(&opt);
        match opt.as_rule() {
            Rule::layers | Rule::heads | Rule::positions => target_selection(ctx, opt, &mut patch),
            Rule::receiver => {
                let r = opt.into_inner().next().unwrap();
                let kind = match r.as_rule() {
                    Rule::recv_logits => Receiver::Logits,
                    Rule::recv_resid => Receiver::Resid(ctx.int(no_kw(r).next().unwrap())),
                    _ => {
                        let mut parts = r.into_inner();
                        let heads = parts.next().unwrap();
                        let heads = match heads.as_rule() {
                            Rule::head_list => heads.into_inner().map(|h| convert_component_id(ctx, h)).collect(),
                            _ => vec![convert_component_id(ctx, heads)],
                        };
                        let input = parts.next().unwrap();
                        Receiver::Heads { heads, input: Spanned::new(input.as_str().to_string(), ctx.span(&input)) }
                    }
                };
                receiver = Some(Spanned::new(kind, span));
            }
            _ => {
                let items: Vec<Rule> =
                    no_kw(opt).map(|i| i.into_inner().next().map_or(Rule::kw_none, |k| k.as_rule())).collect();
                let has = |rule: Rule| items.contains(&rule);
                freeze = Some(Spanned::new(Freeze { heads: has(Rule::kw_heads), mlps: has(Rule::kw_mlps) }, span));
            }
        }
    }
    patch.path = Some(Box::new(PathSpec { receiver: receiver.expect("the grammar requires a receiver"), freeze }));
    patch
}

/// `L9.H9` (or `L9`) without a position.
fn convert_component_id(ctx: &Ctx, pair: Pair<Rule>) -> Spanned<Component> {
    let span = ctx.span(&pair);
    let body = &pair.as_str()[1..];
    let (l, h) = match body.split_once(".H") {
        Some((l, h)) => (l, Some(h)),
        None => (body, None),
    };
    let num = |s: &str| s.parse::<i64>().unwrap_or(i64::MAX);
    Spanned::new(Component { layer: num(l), head: h.map(num), position: None }, span)
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
