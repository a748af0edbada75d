//! The typed, resolved experiment: the checker's output and the planner's input.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::diag::Diagnostic;
use crate::model::Manifest;
pub use crate::runtime::Device;

pub use super::path::{HeadInput, PathSpec, Receiver};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Experiment {
    /// The experiment file's stem.
    pub name: String,
    pub source: PathBuf,
    pub model: Model,
    /// At most this many passes per ONNX Runtime call (`batch N`); `None`: as many as the
    /// memory budget allows.
    pub batch_size: Option<usize>,
    pub datasets: Vec<Dataset>,
    pub corruptions: Vec<Corruption>,
    pub patches: Vec<PatchTarget>,
    pub metrics: Vec<Metric>,
    pub sweep: Sweep,
    pub expectations: Vec<Expectation>,
    pub outputs: Outputs,
    /// Every file read besides the experiment file: includes, pool files, prompt files.
    pub inputs: Vec<PathBuf>,
    /// Warnings found while checking (the experiment is still valid).
    #[serde(skip)]
    pub warnings: Vec<Diagnostic>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Model {
    /// As written in the file.
    pub reference: String,
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub device: Device,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Dataset {
    pub name: String,
    pub origin: DatasetOrigin,
    pub prompts: Vec<Prompt>,
    /// Corrupted inputs per corruption name (only the corruptions the sweep pairs with it).
    pub corrupted: BTreeMap<String, Vec<CorruptedPrompt>>,
    /// Whether prompts carry a wrong answer r'.
    pub has_wrong: bool,
    /// Slot names available for positions and corruptions.
    pub slots: Vec<String>,
}

impl Dataset {
    /// The token count shared by all prompts, if they share one.
    pub fn common_len(&self) -> Option<usize> {
        let n = self.prompts.first()?.ids.len();
        self.prompts.iter().all(|p| p.ids.len() == n).then_some(n)
    }
    pub fn min_len(&self) -> usize {
        self.prompts.iter().map(|p| p.ids.len()).min().unwrap_or(0)
    }
    pub fn max_len(&self) -> usize {
        self.prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub enum DatasetOrigin {
    Template { template: String, count: usize, seed: u64 },
    File { path: PathBuf },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prompt {
    pub text: String,
    pub ids: Vec<u32>,
    /// Display form of each token.
    pub tokens: Vec<String>,
    pub slots: BTreeMap<String, SlotSpan>,
    pub answer: Answer,
    pub wrong: Option<Answer>,
}

impl Prompt {
    /// Token index of a symbolic position in this prompt (None when out of range / unknown).
    pub fn resolve(&self, pos: &Position) -> Option<usize> {
        let n = self.ids.len() as i64;
        match pos {
            Position::End => (n > 0).then(|| (n - 1) as usize),
            Position::Index(i) => {
                let i = if *i < 0 { n + i } else { *i };
                (0..n).contains(&i).then_some(i as usize)
            }
            Position::Slot { name, first } => self.slots.get(name).map(|s| if *first { s.first } else { s.last }),
        }
    }

    /// A symbolic label for token index `i`: the slot covering it, `end`, or the index.
    pub fn label_of(&self, i: usize) -> String {
        if i + 1 == self.ids.len() {
            return "end".into();
        }
        for (name, s) in &self.slots {
            if s.last == i {
                return name.clone();
            }
            if s.first == i {
                return format!("first {name}");
            }
        }
        i.to_string()
    }
}

/// Where a slot's value sits in the tokenised prompt (inclusive token indices).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SlotSpan {
    pub value: String,
    pub first: usize,
    pub last: usize,
    /// Byte range of the value in the prompt text.
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Token {
        text: String,
        id: u32,
    },
    /// A token set: metrics sum probabilities (or logits) over it.
    Set(Vec<(String, u32)>),
}

impl Answer {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            Answer::Token { id, .. } => vec![*id],
            Answer::Set(s) => s.iter().map(|(_, i)| *i).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CorruptedPrompt {
    /// A different prompt of the same token count (STR, counterfactual).
    Tokens { text: String, ids: Vec<u32>, tokens: Vec<String> },
    /// Gaussian noise added to the token embeddings at these positions.
    Noise { positions: Vec<usize> },
    /// Ablations patch in zeros / means / another prompt's activation; the input is the clean one.
    Ablation { source_prompt: Option<usize> },
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Corruption {
    pub name: String,
    pub kind: CorruptionKind,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CorruptionKind {
    /// Slot -> replacement (another slot's value, or a literal).
    Replace(Vec<(String, Replacement)>),
    Resample {
        slots: Vec<String>,
        distinct: bool,
        seed: u64,
    },
    Noise {
        slots: Vec<String>,
        scale: f64,
        samples: usize,
        seed: u64,
    },
    Counterfactual,
    Ablation {
        kind: AblationKind,
        seed: u64,
    },
}

impl CorruptionKind {
    pub fn is_ablation(&self) -> bool {
        matches!(self, CorruptionKind::Ablation { .. })
    }
    /// Noise samples per prompt (1 for everything but noise).
    pub fn samples(&self) -> usize {
        match self {
            CorruptionKind::Noise { samples, .. } => *samples,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Replacement {
    Slot(String),
    Literal(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AblationKind {
    Zero,
    Mean,
    Resample,
}

impl AblationKind {
    pub fn name(self) -> &'static str {
        match self {
            AblationKind::Zero => "zero",
            AblationKind::Mean => "mean",
            AblationKind::Resample => "resample",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PatchTarget {
    pub name: String,
    /// Hooks patched jointly (one run patches all of them).
    pub hooks: Vec<HookRef>,
    /// Layers, one patch per layer (None: the hook has no layer, e.g. `hook_embed`).
    pub layers: Option<Vec<usize>>,
    /// Heads, one patch per head (None: all heads together / no head axis).
    pub heads: Option<Vec<usize>>,
    pub positions: PositionSelection,
    /// Sliding windows (w layers patched jointly around each layer).
    pub windows: Option<Vec<usize>>,
    pub summation: bool,
    /// How the target's components are measured.
    pub method: Method,
    /// With [`Method::Attribution`]: how many components of largest |estimate| are also
    /// patched exactly.
    pub verify: Option<usize>,
    /// With [`Method::Path`]: where the senders' effect is received, and what is frozen.
    pub path: Option<PathSpec>,
}

/// How a target's effects are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Method {
    /// Activation patching: one patched forward pass per component.
    Exact,
    /// Attribution patching (AtP): a first-order estimate from the metric's gradient at the
    /// base run.
    Attribution,
    /// AtP* (Kramar et al. 2024) with GradDrop: the size of the effect, averaged over backward
    /// passes that each drop one layer's residual write (spec/language.md, "by atp*").
    AtpStar,
    /// Path patching: the sender's effect through a receiver, other paths frozen.
    Path,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Exact => "exact",
            Method::Attribution => "attribution",
            Method::AtpStar => "atp*",
            Method::Path => "path",
        }
    }

    pub fn is_estimate(self) -> bool {
        matches!(self, Method::Attribution | Method::AtpStar)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum HookRef {
    /// `hook_mlp_out` -> `blocks.{L}.hook_mlp_out`.
    Layered(String),
    /// A hook without a layer (`hook_embed`).
    Global(String),
}

impl HookRef {
    pub fn full_name(&self, layer: Option<usize>) -> String {
        match (self, layer) {
            (HookRef::Layered(h), Some(l)) => format!("blocks.{l}.{h}"),
            (HookRef::Layered(h), None) => h.clone(),
            (HookRef::Global(h), _) => h.clone(),
        }
    }
    pub fn short(&self) -> &str {
        match self {
            HookRef::Layered(h) | HookRef::Global(h) => h,
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum PositionSelection {
    /// All positions at once (the default).
    All,
    /// Every position separately (prompts must share one token count).
    Each,
    List(Vec<Position>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    LogitDiff,
    ProbDiff,
    Prob,
    LogProb,
    Kl,
}

impl MetricKind {
    pub const ALL: [(&'static str, MetricKind); 5] = [
        ("logit_diff", MetricKind::LogitDiff),
        ("prob_diff", MetricKind::ProbDiff),
        ("prob", MetricKind::Prob),
        ("logprob", MetricKind::LogProb),
        ("kl", MetricKind::Kl),
    ];
    pub fn name(self) -> &'static str {
        MetricKind::ALL.iter().find(|(_, k)| *k == self).map(|(n, _)| *n).unwrap_or("?")
    }
    /// Whether the metric needs the whole vocabulary's logits: probabilities normalise over it,
    /// a logit difference reads its tokens' logits only.
    pub fn reads_vocabulary(self) -> bool {
        self != MetricKind::LogitDiff
    }
    /// Whether the metric reads the wrong answer r'.
    pub fn needs_wrong(self) -> bool {
        matches!(self, MetricKind::LogitDiff | MetricKind::ProbDiff)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Averaging {
    RatioOfMeans,
    PerPromptMean,
}

impl Averaging {
    pub fn name(self) -> &'static str {
        match self {
            Averaging::RatioOfMeans => "ratio_of_means",
            Averaging::PerPromptMean => "per_prompt_mean",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Metric {
    pub name: String,
    pub kind: MetricKind,
    pub normalized: bool,
    pub averaging: Averaging,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Denoise,
    Noise,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Denoise => "denoise",
            Direction::Noise => "noise",
        }
    }
}

/// The methodology grid: every combination of dataset x corruption x direction is a variant;
/// every variant runs every patch target and computes every metric.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sweep {
    pub datasets: Vec<String>,
    pub corruptions: Vec<String>,
    pub directions: Vec<Direction>,
    pub patches: Vec<String>,
    pub metrics: Vec<String>,
}

#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct Expectation {
    /// The expectation as written (for messages).
    pub text: String,
    /// 1-based line in its file.
    pub line: usize,
    pub kind: ExpectationKind,
    /// Variant filter: axis -> value (`dataset`, `corruption`, `direction`, `window`).
    pub when: Vec<(String, String)>,
}

#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub enum ExpectationKind {
    /// Components whose effect is more than `sd` standard deviations from the mean effect.
    Detected {
        target: String,
        metric: String,
        sd: f64,
        includes: bool,
        components: Vec<ComponentRef>,
    },
    Top {
        k: usize,
        target: String,
        metric: String,
        includes: bool,
        components: Vec<ComponentRef>,
    },
    Effect {
        target: String,
        component: ComponentRef,
        metric: String,
        op: CmpOp,
        value: f64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ComponentRef {
    pub layer: usize,
    pub head: Option<usize>,
    pub position: Option<Position>,
}

impl std::fmt::Display for ComponentRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "L{}", self.layer)?;
        if let Some(h) = self.head {
            write!(f, ".H{h}")?;
        }
        if let Some(p) = &self.position {
            write!(f, "@{}", position_label(p))?;
        }
        Ok(())
    }
}

pub fn position_label(p: &Position) -> String {
    match p {
        Position::End => "end".into(),
        Position::Index(i) => i.to_string(),
        Position::Slot { name, first: true } => format!("first {name}"),
        Position::Slot { name, first: false } => name.clone(),
    }
}

/// The two forms of a report, chosen by the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ReportKind {
    /// `.html`: one self-contained page.
    Html,
    /// `.md`: a Markdown summary with SVG files beside it.
    Markdown,
}

impl ReportKind {
    pub fn of(path: &std::path::Path) -> Option<ReportKind> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("html" | "htm") => Some(ReportKind::Html),
            Some("md" | "markdown") => Some(ReportKind::Markdown),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize, PartialEq)]
pub struct Outputs {
    pub csv: Option<PathBuf>,
    pub per_prompt: Option<PathBuf>,
    pub report: Option<PathBuf>,
}

impl Outputs {
    /// The provenance sidecar beside the CSV: `<output>.provenance.json`.
    pub fn provenance(&self) -> Option<PathBuf> {
        self.csv.as_ref().map(|csv| csv.with_extension("provenance.json"))
    }

    /// Every file a run writes.
    pub fn files(&self) -> impl Iterator<Item = PathBuf> + '_ {
        [self.csv.clone(), self.provenance(), self.per_prompt.clone()].into_iter().flatten()
    }
}

/// A token position as the experiment names it; the plan resolves it per prompt.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    /// The last token.
    End,
    /// A token index; negative counts from the end (-1 is the last token).
    Index(i64),
    /// A slot's token: its last (default) or first token.
    Slot { name: String, first: bool },
}

/// A numeric comparison (token-set filters, expectations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

impl CmpOp {
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
        }
    }

    pub fn holds(self, a: f64, b: f64) -> bool {
        match self {
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
        }
    }
}

/// `0..5, 7` style rendering of a sorted list.
pub fn compact(xs: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < xs.len() {
        let mut j = i;
        while j + 1 < xs.len() && xs[j + 1] == xs[j] + 1 {
            j += 1;
        }
        parts.push(if j > i + 1 {
            format!("{}..{}", xs[i], xs[j])
        } else if j == i + 1 {
            format!("{}, {}", xs[i], xs[j])
        } else {
            xs[i].to_string()
        });
        i = j + 1;
    }
    parts.join(", ")
}
