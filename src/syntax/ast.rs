//! The abstract syntax tree of a `.bay` file: what was written, with spans, nothing resolved.

use crate::diag::Span;

/// A value with the span it was written at.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Spanned<T> {
    pub node: T,
    pub span: Span,
}

impl<T> Spanned<T> {
    pub fn new(node: T, span: Span) -> Self {
        Spanned { node, span }
    }
}

pub type Ident = Spanned<String>;

/// A parsed file: its statements in order, `include`d files' statements spliced in place.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Ast {
    pub statements: Vec<Statement>,
    /// The file that was parsed (the root of the includes); diagnostics about the whole
    /// experiment (no model, no dataset) point at its start, even when it has no statements.
    #[serde(skip)]
    pub root: Option<std::sync::Arc<crate::diag::SourceFile>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Statement {
    pub kind: StatementKind,
    pub span: Span,
    /// True when the statement comes from an `include`d file.
    pub included: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum StatementKind {
    Include(Spanned<String>),
    Model { reference: Spanned<String>, device: Option<Ident> },
    Batch(Spanned<i64>),
    Pool(Pool),
    Dataset(Dataset),
    Corruption { name: Ident, kind: CorruptionKind },
    Patch(Patch),
    Metric { name: Ident, kind: Ident, options: Vec<Ident> },
    Average(Ident),
    Sweep(Vec<Axis>),
    Expect(Expect),
    Output(Spanned<String>),
    PerPrompt(Spanned<String>),
    Report(Spanned<String>),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Pool {
    pub name: Ident,
    pub source: PoolSource,
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum PoolSource {
    Inline(Vec<Spanned<String>>),
    File(Spanned<String>),
}

/// A pool named, or written inline.
#[derive(Debug, Clone, serde::Serialize)]
pub enum PoolRef {
    Named(Ident),
    Inline(Spanned<Vec<Spanned<String>>>),
}

impl PoolRef {
    pub fn span(&self) -> &Span {
        match self {
            PoolRef::Named(i) => &i.span,
            PoolRef::Inline(l) => &l.span,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Dataset {
    pub name: Ident,
    pub file: Option<Spanned<String>>,
    pub items: Vec<DatasetItem>,
    pub span: Span,
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum DatasetItem {
    Template(Spanned<String>),
    Pool(Pool),
    SlotFrom { slots: Vec<Ident>, pool: PoolRef, distinct: Option<Span>, span: Span },
    SlotEq { slot: Ident, other: Ident, span: Span },
    Count(Spanned<i64>),
    Seed(Spanned<i64>),
    Answer(Spanned<AnswerSpec>),
    Wrong(Spanned<AnswerSpec>),
    Column { role: Spanned<ColumnRole>, column: Ident },
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum ColumnRole {
    Prompt,
    Counterfactual,
    Answer,
    Wrong,
    Slot(Ident),
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum AnswerSpec {
    /// A slot's value.
    Slot(Ident),
    /// A literal token text.
    Literal(Spanned<String>),
    /// A set of tokens from a pool, optionally filtered numerically against a slot's value.
    Set { pool: PoolRef, filter: Option<(Spanned<CmpOp>, Ident)> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CmpOp {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum CorruptionKind {
    Replace(Vec<(Ident, ReplaceWith)>),
    Resample { slots: Vec<Ident>, distinct: bool, seed: Option<Spanned<i64>> },
    Noise { slots: Vec<Ident>, scale: Option<Spanned<f64>>, samples: Option<Spanned<i64>>, seed: Option<Spanned<i64>> },
    Counterfactual,
    Ablation { kind: Ident, seed: Option<Spanned<i64>> },
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum ReplaceWith {
    Slot(Ident),
    Literal(Spanned<String>),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Patch {
    pub name: Ident,
    pub hooks: Vec<Ident>,
    pub layers: Option<Spanned<Selection>>,
    pub heads: Option<Spanned<Selection>>,
    pub positions: Option<Spanned<PositionSel>>,
    pub window: Option<Spanned<Vec<Spanned<i64>>>>,
    pub summation: Option<Span>,
    /// `by attribution` / `by atp*`: estimated instead of patched.
    pub estimate: Option<Spanned<Estimator>>,
    /// `verify top k`: the k components of largest |estimate| patched exactly too.
    pub verify: Option<Spanned<i64>>,
    /// A `path` statement: the target's components are senders, measured through receivers.
    pub path: Option<Box<PathSpec>>,
}

/// `to RECEIVER [freeze ...]` of a `path` statement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PathSpec {
    pub receiver: Spanned<Receiver>,
    /// What is held at its base value between sender and receiver (`None`: not written).
    pub freeze: Option<Spanned<Freeze>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum Receiver {
    Logits,
    /// The residual stream entering layer N (N = the layer count: the final one).
    Resid(Spanned<i64>),
    /// Heads' query, key or value input.
    Heads {
        heads: Vec<Spanned<Component>>,
        input: Spanned<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Freeze {
    pub heads: bool,
    pub mlps: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Estimator {
    Attribution,
    AtpStar,
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum Selection {
    All,
    /// Single values and inclusive ranges, in the order written.
    Items(Vec<Spanned<SelItem>>),
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub enum SelItem {
    One(i64),
    Range(i64, i64),
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum PositionSel {
    /// All positions patched together (the default).
    All,
    /// Every position separately.
    Each,
    List(Vec<Spanned<Position>>),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    End,
    Index(i64),
    /// A slot's token: its last (default) or first token.
    Slot {
        name: String,
        first: bool,
    },
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Axis {
    pub name: Ident,
    pub values: Vec<Ident>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Expect {
    pub kind: ExpectKind,
    pub when: Vec<(Ident, Ident)>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum ExpectKind {
    Detected {
        target: Ident,
        metric: Ident,
        sd: Option<Spanned<f64>>,
        includes: bool,
        components: Vec<Spanned<Component>>,
    },
    Top {
        k: Spanned<i64>,
        target: Ident,
        metric: Ident,
        includes: bool,
        components: Vec<Spanned<Component>>,
    },
    Effect {
        target: Ident,
        component: Spanned<Component>,
        metric: Ident,
        op: Spanned<CmpOp>,
        value: Spanned<f64>,
    },
}

/// `L9.H9`, `L3`, `L3 @ S2`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Component {
    pub layer: i64,
    pub head: Option<i64>,
    pub position: Option<Position>,
}
