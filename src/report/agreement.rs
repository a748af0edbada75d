//! How attribution estimates agree with exact patching: for every estimated target whose
//! components another target of the same variant patched exactly (same hooks, same components),
//! per metric, Spearman's rank correlation, the recall of exact's top k among the estimate's
//! top k, and exact's top components that the estimate's top k misses (AtP's false negatives).

use crate::ir::experiment::Method;
use crate::ir::plan::Plan;
use crate::run::results::Row;

/// How many of the largest components the recall and the misses look at.
pub const TOP_K: usize = 10;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Agreement {
    pub variant: String,
    /// The estimated target and its exactly patched twin.
    pub estimated: String,
    pub exact: String,
    pub metric: String,
    pub components: usize,
    pub spearman: Option<f64>,
    /// min(TOP_K, components).
    pub k: usize,
    /// Of exact's top k by |value|, how many are in the estimate's top k.
    pub recalled: usize,
    /// Exact's top-k components outside the estimate's top k, largest |exact value| first.
    pub misses: Vec<Miss>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Miss {
    pub component: String,
    pub exact: f64,
    pub estimate: f64,
    /// Where the estimate ranks it by |estimate| (1 = largest).
    pub estimate_rank: usize,
}

/// Every (estimated target, exact twin, metric) of every variant, in row order.
pub fn agreements(plan: &Plan, rows: &[Row]) -> Vec<Agreement> {
    let mut out = vec![];
    for (v, variant) in plan.variants.iter().enumerate() {
        let rows: Vec<&Row> = rows.iter().filter(|r| r.variant == v && !r.summation).collect();
        let mut targets: Vec<&str> = rows.iter().map(|r| r.target.as_str()).collect();
        targets.dedup();
        let of = |t: &str| -> Vec<&Row> { rows.iter().copied().filter(|r| r.target == t).collect() };
        let estimated = |t: &str| of(t).iter().any(|r| r.cells.iter().any(|c| c.estimate.is_some()));
        for est in targets.iter().filter(|t| estimated(t)) {
            let est_rows = of(est);
            let key = |r: &Row| (r.component.clone(), r.hooks.clone());
            let twin = targets.iter().find(|t| {
                !estimated(t) && {
                    let ex = of(t);
                    ex.len() == est_rows.len() && ex.iter().zip(&est_rows).all(|(a, b)| key(a) == key(b))
                }
            });
            let Some(exact) = twin else { continue };
            let ex_rows = of(exact);
            // AtP*'s score is the size of the effect: compare it with the exact effect's size.
            let unsigned = variant.patches.iter().any(|p| p.target == *est && p.method == Method::AtpStar);
            for (m, metric) in plan.metrics.iter().enumerate() {
                let pairs: Option<Vec<(f64, f64)>> = est_rows
                    .iter()
                    .zip(&ex_rows)
                    .map(|(e, x)| {
                        let exact = if unsigned { exact_size(x, m)? } else { x.cells[m].value? };
                        Some((exact, e.cells[m].estimate?))
                    })
                    .collect();
                let Some(pairs) = pairs else { continue };
                out.push(agreement(&variant.label, est, exact, &metric.name, &est_rows, &pairs));
            }
        }
    }
    out
}

/// The size of an exact row's effect on metric `m` as AtP* scores it: the mean over prompts of
/// |per-prompt value| (|value| where the row has no per-prompt values).
pub fn exact_size(row: &Row, m: usize) -> Option<f64> {
    match row.per_prompt.get(m).filter(|p| !p.is_empty()) {
        Some(per_prompt) => {
            let sizes: Option<Vec<f64>> = per_prompt.iter().map(|p| p.0.map(f64::abs)).collect();
            sizes.map(|s| s.iter().sum::<f64>() / s.len() as f64)
        }
        None => row.cells[m].value.map(f64::abs),
    }
}

fn agreement(
    variant: &str,
    estimated: &str,
    exact: &str,
    metric: &str,
    rows: &[&Row],
    pairs: &[(f64, f64)],
) -> Agreement {
    let (xs, ys): (Vec<f64>, Vec<f64>) = pairs.iter().copied().unzip();
    let by_size = |values: &[f64]| -> Vec<usize> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
        order
    };
    let (exact_order, estimate_order) = (by_size(&xs), by_size(&ys));
    let k = TOP_K.min(pairs.len());
    let estimate_top = &estimate_order[..k];
    let misses: Vec<Miss> = exact_order[..k]
        .iter()
        .filter(|i| !estimate_top.contains(i))
        .map(|&i| Miss {
            component: rows[i].component.clone(),
            exact: xs[i],
            estimate: ys[i],
            estimate_rank: estimate_order.iter().position(|&j| j == i).expect("every index is ranked") + 1,
        })
        .collect();
    Agreement {
        variant: variant.to_string(),
        estimated: estimated.to_string(),
        exact: exact.to_string(),
        metric: metric.to_string(),
        components: pairs.len(),
        spearman: spearman(&xs, &ys),
        k,
        recalled: k - misses.len(),
        misses,
    }
}

/// Ranks from 1, ties sharing the average of the ranks they span.
fn ranks(xs: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..xs.len()).collect();
    order.sort_by(|&a, &b| xs[a].total_cmp(&xs[b]));
    let mut out = vec![0.0; xs.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && xs[order[j + 1]] == xs[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = rank;
        }
        i = j + 1;
    }
    out
}

/// Spearman's rank correlation (Pearson's of the ranks); `None` for fewer than two pairs or a
/// constant side.
pub fn spearman(xs: &[f64], ys: &[f64]) -> Option<f64> {
    if xs.len() != ys.len() || xs.len() < 2 {
        return None;
    }
    let (rx, ry) = (ranks(xs), ranks(ys));
    let n = xs.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let cov: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = rx.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = ry.iter().map(|b| (b - my).powi(2)).sum();
    (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::experiment::Method;

    #[test]
    fn ties_share_their_average_rank() {
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
    }

    #[test]
    fn misses_are_exacts_top_components_outside_the_estimates_top() {
        let row = |i: usize| Row {
            variant: 0,
            target: "t".into(),
            component: format!("C{i}"),
            hooks: vec![],
            layer: None,
            head: None,
            position: None,
            position_label: None,
            window: None,
            summation: false,
            method: Method::Exact,
            cells: vec![],
            per_prompt: vec![],
        };
        let rows: Vec<Row> = (0..12).map(row).collect();
        let refs: Vec<&Row> = rows.iter().collect();
        // Exact: C0 largest, then C1 ... C11; the estimate puts C0 last and C11 first.
        let pairs: Vec<(f64, f64)> = (0..12)
            .map(|i| {
                (
                    12.0 - i as f64,
                    if i == 0 {
                        0.0
                    } else if i == 11 {
                        20.0
                    } else {
                        12.0 - i as f64
                    },
                )
            })
            .collect();
        let a = agreement("v", "est", "ex", "ld", &refs, &pairs);
        assert_eq!((a.k, a.recalled, a.components), (10, 9, 12));
        assert_eq!(a.misses, vec![Miss { component: "C0".into(), exact: 12.0, estimate: 0.0, estimate_rank: 12 }]);
    }
}
