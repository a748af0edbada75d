//! From per-prompt metric values to result rows: effects, normalisation, averaging, standard
//! errors, and the summation baseline of sliding windows (spec/language.md, "metric").

use crate::ir::experiment::{position_label, Averaging, Direction, Method};
use crate::ir::plan::{PatchRun, Plan, PlanMetric};
use crate::run::passes::VariantValues;

/// One metric's cells in a row.
#[derive(Debug, Clone, PartialEq)]
pub struct Cells {
    /// As declared: the normalised effect when the metric is `normalized`, else the raw effect.
    /// `None` when normalisation has no corrupted baseline (ablations).
    pub value: Option<f64>,
    pub effect: f64,
    /// Mean metric of the patched runs; `None` on summation-baseline rows.
    pub patched: Option<f64>,
    pub clean: f64,
    pub corrupted: Option<f64>,
    /// Standard error over prompts of the per-prompt value.
    pub sem: Option<f64>,
    /// An estimated target's attribution-patching estimate, as `value` is declared (the row's
    /// other numbers are the estimate's too unless it was verified, i.e. `method` is exact).
    pub estimate: Option<f64>,
}

/// One prompt's value (as [`Cells::value`]), effect and patched metric (none for an AtP*
/// score, which estimates no patched metric).
pub type PromptCells = (Option<f64>, f64, Option<f64>);

/// One CSV row: a (variant, component), or a window's summation baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub variant: usize,
    pub target: String,
    pub component: String,
    pub hooks: Vec<String>,
    pub layer: Option<usize>,
    pub head: Option<usize>,
    /// The token index, when it is the same for every prompt.
    pub position: Option<usize>,
    pub position_label: Option<String>,
    pub window: Option<usize>,
    pub summation: bool,
    /// How the row's values were measured: exact patching, or the attribution estimate.
    pub method: Method,
    pub cells: Vec<Cells>,
    /// `[metric][prompt]`.
    pub per_prompt: Vec<Vec<PromptCells>>,
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

fn sem(x: &[f64]) -> Option<f64> {
    let n = x.len() as f64;
    if x.len() < 2 {
        return None;
    }
    let m = mean(x);
    Some((x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() / n.sqrt())
}

/// Cells and per-prompt values of one patched run for one metric.
fn cells(
    metric: &PlanMetric,
    direction: Direction,
    values: &VariantValues,
    m: usize,
    patched: &[f64],
) -> (Cells, Vec<PromptCells>) {
    let clean = &values.clean[m];
    let corrupted = values.corrupted.as_ref().map(|c| &c[m]);
    let base = &values.base(direction)[m];
    let effects: Vec<f64> = patched.iter().zip(base).map(|(p, b)| p - b).collect();
    let effect = mean(patched) - mean(base);
    let (mean_clean, mean_corrupted) = (mean(clean), corrupted.map(|c| mean(c)));
    let per_prompt_value: Vec<Option<f64>> = match (metric.normalized, corrupted) {
        (false, _) => effects.iter().map(|e| Some(*e)).collect(),
        (true, None) => vec![None; effects.len()],
        (true, Some(c)) => match metric.averaging {
            Averaging::PerPromptMean => {
                effects.iter().zip(clean.iter().zip(c)).map(|(e, (cl, co))| Some(e / (cl - co))).collect()
            }
            // Ratio of means: the per-prompt effect over the mean denominator, so that the
            // mean of these is the row's value.
            Averaging::RatioOfMeans => effects.iter().map(|e| Some(e / (mean_clean - mean(c)))).collect(),
        },
    };
    let value = match (metric.normalized, mean_corrupted) {
        (false, _) => Some(effect),
        (true, None) => None,
        (true, Some(co)) => match metric.averaging {
            Averaging::RatioOfMeans => Some(effect / (mean_clean - co)),
            Averaging::PerPromptMean => {
                Some(mean(&per_prompt_value.iter().map(|v| v.unwrap_or(f64::NAN)).collect::<Vec<_>>()))
            }
        },
    };
    let sem = per_prompt_value.iter().copied().collect::<Option<Vec<f64>>>().and_then(|v| sem(&v));
    let per_prompt =
        per_prompt_value.into_iter().zip(&effects).zip(patched).map(|((v, e), p)| (v, *e, Some(*p))).collect();
    (
        Cells {
            value,
            effect,
            patched: Some(mean(patched)),
            clean: mean_clean,
            corrupted: mean_corrupted,
            sem,
            estimate: None,
        },
        per_prompt,
    )
}

/// Run `r`'s estimate of metric `m`, as `value` is declared; an AtP* score as a size, the mean
/// over prompts of its per-prompt value's magnitude.
fn estimate(
    metric: &PlanMetric,
    direction: Direction,
    values: &VariantValues,
    m: usize,
    r: usize,
    method: Method,
) -> Option<f64> {
    let (c, per_prompt) = cells(metric, direction, values, m, &values.estimates[r].as_ref()?[m]);
    match method {
        Method::AtpStar => size(&per_prompt),
        _ => c.value,
    }
}

/// The mean over prompts of |value|; `None` where a prompt has no value.
fn size(per_prompt: &[PromptCells]) -> Option<f64> {
    let sizes: Option<Vec<f64>> = per_prompt.iter().map(|p| p.0.map(f64::abs)).collect();
    sizes.map(|s| mean(&s))
}

/// The rows of one variant, in plan order; summation-baseline rows follow their window row.
pub fn rows(plan: &Plan, v: usize, values: &VariantValues) -> Vec<Row> {
    let variant = &plan.variants[v];
    let mut rows: Vec<Row> = vec![];
    for (r, run) in variant.patches.iter().enumerate() {
        if run.baseline_only {
            continue;
        }
        let mut cells_all = vec![];
        let mut per_prompt = vec![];
        for (m, metric) in plan.metrics.iter().enumerate() {
            let (mut c, mut pp) = cells(metric, variant.direction, values, m, &values.patched[r][m]);
            if !values.exact[r] && run.method == Method::AtpStar {
                // A score is the size of the change: base + score is no metric of a patched run,
                // and a normaliser's sign must not turn a size negative.
                pp.iter_mut().for_each(|p| *p = (p.0.map(f64::abs), p.1, None));
                let sizes: Option<Vec<f64>> = pp.iter().map(|p| p.0).collect();
                (c.value, c.sem, c.patched) = (size(&pp), sizes.and_then(|s| sem(&s)), None);
            }
            c.estimate = estimate(metric, variant.direction, values, m, r, run.method);
            cells_all.push(c);
            per_prompt.push(pp);
        }
        let mut row = row(v, run, cells_all, per_prompt);
        row.method = if values.exact[r] { Method::Exact } else { run.method };
        let window = run.window.filter(|(w, _)| *w > 1);
        rows.push(row);
        if let (Some(_), true) = (window, run.summation) {
            rows.push(summation_row(plan, v, values, run));
        }
    }
    rows
}

fn row(v: usize, run: &PatchRun, cells: Vec<Cells>, per_prompt: Vec<Vec<PromptCells>>) -> Row {
    let positions = &run.token_positions;
    let same = positions.first().filter(|first| positions.iter().all(|p| p == *first)).copied();
    Row {
        variant: v,
        target: run.target.clone(),
        component: run.label.clone(),
        // A path's sender hook, and where it is received: `blocks.9.attn.hook_z->[L23.H3] q`.
        hooks: match &run.path {
            None => run.hooks.clone(),
            Some(path) => vec![format!("{}->{}", run.hooks.join("+"), path.receiver.label())],
        },
        layer: run.window.map(|(_, centre)| centre).or(run.layers.first().copied()),
        head: run.head,
        position: same,
        position_label: run.position.as_ref().map(position_label),
        window: run.window.map(|(w, _)| w),
        summation: false,
        method: Method::Exact,
        cells,
        per_prompt,
    }
}

/// The sum of the single-layer effects over a window's layers.
fn summation_row(plan: &Plan, v: usize, values: &VariantValues, window_run: &PatchRun) -> Row {
    let variant = &plan.variants[v];
    let singles: Vec<usize> = variant
        .patches
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.target == window_run.target
                && r.head == window_run.head
                && r.position == window_run.position
                && matches!(r.window, Some((1, l)) if window_run.layers.contains(&l))
        })
        .map(|(i, _)| i)
        .collect();
    let mut cells_all = vec![];
    for (m, metric) in plan.metrics.iter().enumerate() {
        let parts: Vec<Cells> =
            singles.iter().map(|&r| cells(metric, variant.direction, values, m, &values.patched[r][m]).0).collect();
        let value = parts.iter().map(|c| c.value).sum::<Option<f64>>();
        let estimate =
            singles.iter().map(|&r| estimate(metric, variant.direction, values, m, r, window_run.method)).sum();
        cells_all.push(Cells {
            value,
            effect: parts.iter().map(|c| c.effect).sum(),
            patched: None,
            clean: parts.first().map_or(0.0, |c| c.clean),
            corrupted: parts.first().and_then(|c| c.corrupted),
            sem: None,
            estimate,
        });
    }
    let mut row = row(v, window_run, cells_all, vec![]);
    row.summation = true;
    row.method = if singles.iter().all(|&r| values.exact[r]) { Method::Exact } else { window_run.method };
    row
}
