//! The methodology comparison: what each variant detects, and how far variants agree.
//!
//! - **Detection** (spec/language.md, "expect"): a component is detected when its effect is more
//!   than k = 2 standard deviations (population sd) from the mean effect over the target's
//!   components in the variant; above the mean it is positive, below negative. Summation rows
//!   are not components.
//! - **Jaccard** overlap of two variants' detected sets (positive and negative together),
//!   |A ∩ B| / |A ∪ B|; undefined when both are empty.
//! - **Spearman** rank correlation of effects over the components both variants have: the
//!   Pearson correlation of their ranks, tied values sharing their average rank; undefined with
//!   fewer than two shared components or when either side is constant.
//! - **Window peaks**: per window, the effect of largest magnitude over layers (signed), beside
//!   the same for the window's summation-baseline rows, and their ratio (window / baseline).

use std::collections::BTreeSet;

use super::read::{Row, Table};
use crate::report::agreement::spearman;

/// The spec's default detection threshold, in standard deviations.
pub const DETECTION_SD: f64 = 2.0;

/// A component and its effect.
#[derive(Debug, Clone, PartialEq)]
pub struct Effect {
    pub component: String,
    pub value: f64,
}

/// The detection rule applied to one target's components in one variant for one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub mean: f64,
    pub sd: f64,
    /// Above mean + k sd, largest first.
    pub positive: Vec<Effect>,
    /// Below mean - k sd, most negative first.
    pub negative: Vec<Effect>,
}

impl Detection {
    /// Every detected component's name.
    pub fn set(&self) -> BTreeSet<&str> {
        self.positive.iter().chain(&self.negative).map(|e| e.component.as_str()).collect()
    }
}

/// The effects of a target's components (summation rows left out) in a variant, in CSV order.
pub fn effects(table: &Table, variant: &str, target: &str, metric: usize) -> Vec<Effect> {
    table
        .rows_of(variant, target)
        .filter(|r| !r.summation)
        .map(|r| Effect { component: r.component.clone(), value: r.cells[metric].shown() })
        .collect()
}

pub fn detect(effects: &[Effect], k: f64) -> Detection {
    let n = effects.len() as f64;
    let mean = effects.iter().map(|e| e.value).sum::<f64>() / n;
    let sd = (effects.iter().map(|e| (e.value - mean).powi(2)).sum::<f64>() / n).sqrt();
    let mut positive: Vec<Effect> = effects.iter().filter(|e| e.value - mean > k * sd).cloned().collect();
    let mut negative: Vec<Effect> = effects.iter().filter(|e| mean - e.value > k * sd).cloned().collect();
    positive.sort_by(|a, b| b.value.total_cmp(&a.value));
    negative.sort_by(|a, b| a.value.total_cmp(&b.value));
    Detection { mean, sd, positive, negative }
}

/// The `n` components with the largest |effect| (in the noise direction the components that
/// matter most are negative), ties in CSV order.
pub fn top(effects: &[Effect], n: usize) -> Vec<Effect> {
    let mut ranked = effects.to_vec();
    ranked.sort_by(|a, b| b.value.abs().total_cmp(&a.value.abs()));
    ranked.truncate(n);
    ranked
}

pub fn jaccard(a: &BTreeSet<&str>, b: &BTreeSet<&str>) -> Option<f64> {
    let union = a.union(b).count();
    (union > 0).then(|| a.intersection(b).count() as f64 / union as f64)
}

/// Two variants compared on one target and metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub a: String,
    pub b: String,
    pub detected_a: usize,
    pub detected_b: usize,
    pub detected_both: usize,
    pub jaccard: Option<f64>,
    /// Components both variants have.
    pub shared: usize,
    pub spearman: Option<f64>,
}

/// Every pair of the variants that patch `target` (in CSV order, each pair once).
pub fn pairs(table: &Table, target: &str, metric: usize) -> Vec<Pair> {
    let variants: Vec<&str> = table.variants().into_iter().filter(|v| table.targets(v).contains(&target)).collect();
    let per_variant: Vec<(Vec<Effect>, Detection)> = variants
        .iter()
        .map(|v| {
            let e = effects(table, v, target, metric);
            let d = detect(&e, DETECTION_SD);
            (e, d)
        })
        .collect();
    let mut out = vec![];
    for i in 0..variants.len() {
        for j in i + 1..variants.len() {
            out.push(pair(variants[i], &per_variant[i], variants[j], &per_variant[j]));
        }
    }
    out
}

/// One pair's numbers (also the matrix plot's cells, where a variant meets itself).
pub fn pair(a: &str, (ea, da): &(Vec<Effect>, Detection), b: &str, (eb, db): &(Vec<Effect>, Detection)) -> Pair {
    let (sa, sb) = (da.set(), db.set());
    let (mut xs, mut ys) = (vec![], vec![]);
    for x in ea {
        if let Some(y) = eb.iter().find(|y| y.component == x.component) {
            xs.push(x.value);
            ys.push(y.value);
        }
    }
    Pair {
        a: a.to_string(),
        b: b.to_string(),
        detected_a: sa.len(),
        detected_b: sb.len(),
        detected_both: sa.intersection(&sb).count(),
        jaccard: jaccard(&sa, &sb),
        shared: xs.len(),
        spearman: spearman(&xs, &ys),
    }
}

/// A window's peak against its summation baseline's.
#[derive(Debug, Clone, PartialEq)]
pub struct Peak {
    pub variant: String,
    pub target: String,
    pub position: Option<String>,
    pub window: usize,
    /// (layer, effect) of the window's largest |effect|.
    pub peak: (Option<usize>, f64),
    pub baseline: Option<(Option<usize>, f64)>,
    /// peak / baseline peak; undefined without a baseline or when it is 0.
    pub ratio: Option<f64>,
}

/// Per variant, window target, position and window: the peaks, in CSV order.
pub fn window_peaks(table: &Table, metric: usize) -> Vec<Peak> {
    let mut keys: Vec<(&str, &str, Option<&str>, usize)> = vec![];
    for r in &table.rows {
        if let Some(w) = r.window {
            let key = (r.variant.as_str(), r.target.as_str(), r.position_label.as_deref(), w);
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    let peak_of = |rows: Vec<&Row>| {
        rows.iter()
            .map(|r| (r.layer, r.cells[metric].shown()))
            .reduce(|best, x| if x.1.abs() > best.1.abs() { x } else { best })
    };
    keys.into_iter()
        .filter_map(|(variant, target, position, window)| {
            let rows: Vec<&Row> = table
                .rows_of(variant, target)
                .filter(|r| r.window == Some(window) && r.position_label.as_deref() == position)
                .collect();
            let peak = peak_of(rows.iter().copied().filter(|r| !r.summation).collect())?;
            let baseline = peak_of(rows.iter().copied().filter(|r| r.summation).collect());
            let ratio = baseline.filter(|b| b.1 != 0.0).map(|b| peak.1 / b.1);
            Some(Peak {
                variant: variant.to_string(),
                target: target.to_string(),
                position: position.map(str::to_string),
                window,
                peak,
                baseline,
                ratio,
            })
        })
        .collect()
}
