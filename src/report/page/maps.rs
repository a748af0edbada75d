//! Which grids a table draws: one heat map per (variant, target, metric), layers across and
//! heads, positions or windows down; and the comparison's variant x variant matrices.

use super::compare::{self, Detection, Effect, DETECTION_SD};
use super::escape;
use super::heatmap::{Grid, GridCell, Tick};
use super::read::{Row, Table};
use super::sidecar::Sidecar;

/// A row of the heat map: what a CSV row patches besides its layer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    head: Option<usize>,
    /// The position label's rank in CSV order (the order the experiment lists positions).
    position: Option<usize>,
    window: Option<usize>,
    summation: bool,
}

/// The heat map of one target in one variant for one metric.
pub fn grid(table: &Table, sidecar: &Sidecar, variant: &str, target: &str, metric: usize) -> Grid {
    let rows: Vec<&Row> = table.rows_of(variant, target).collect();
    let mut layers: Vec<Option<usize>> = rows.iter().map(|r| r.layer).collect();
    layers.sort();
    layers.dedup();
    let mut labels: Vec<&str> = vec![];
    for r in &rows {
        if let Some(l) = r.position_label.as_deref().filter(|l| !labels.contains(l)) {
            labels.push(l);
        }
    }
    let key = |r: &Row| Key {
        head: r.head,
        position: r.position_label.as_deref().and_then(|l| labels.iter().position(|x| *x == l)),
        window: r.window,
        summation: r.summation,
    };
    let mut keys: Vec<Key> = rows.iter().map(|r| key(r)).collect();
    keys.sort();
    keys.dedup();

    let y_ticks = keys.iter().map(|k| tick(k, &labels, sidecar, variant)).collect();
    let cells = rows
        .iter()
        .map(|r| GridCell {
            x: layers.iter().position(|l| *l == r.layer).unwrap_or(0),
            y: keys.iter().position(|k| *k == key(r)).unwrap_or(0),
            value: r.cells[metric].shown(),
            name: if r.summation { format!("{} (summation baseline)", r.component) } else { r.component.clone() },
        })
        .collect();
    let has = |f: fn(&Key) -> bool| keys.iter().any(f);
    let y_title: Vec<&str> = [
        (has(|k| k.head.is_some()), "head"),
        (has(|k| k.position.is_some()), "position"),
        (has(|k| k.window.is_some()), "window"),
    ]
    .into_iter()
    .filter_map(|(present, name)| present.then_some(name))
    .collect();
    let windows = has(|k| k.window.is_some());
    Grid {
        title: format!("{variant} · {target} · {}", table.metrics[metric]),
        x_title: if windows { "layer (window centre)".into() } else { "layer".into() },
        y_title: y_title.join(" / "),
        x_ticks: layers.iter().map(|l| l.map_or("–".into(), |l| l.to_string())).collect(),
        y_ticks,
        cells,
        limit: None,
    }
}

/// A heat-map row's label (`H3`, `S2 " John"`, `w5 sum`) and its long form.
fn tick(k: &Key, labels: &[&str], sidecar: &Sidecar, variant: &str) -> Tick {
    let (mut label, mut tip) = (vec![], vec![]);
    if let Some(h) = k.head {
        label.push(format!("H{h}"));
        tip.push(format!("head {h}"));
    }
    if let Some(p) = k.position {
        let name = labels[p];
        match sidecar.positions.get(variant).and_then(|ps| ps.iter().find(|t| t.label == name)) {
            Some(t) => {
                let text = t.token.as_deref().map(escape::token).unwrap_or_default();
                label.push(format!("{name} {text}"));
                tip.push(format!("position {name}: token {} {text} of the first prompt", t.index));
            }
            None => {
                label.push(name.to_string());
                tip.push(format!("position {name}"));
            }
        }
    }
    if let Some(w) = k.window {
        label.push(if k.summation { format!("w{w} sum") } else { format!("w{w}") });
        tip.push(if k.summation {
            format!("window {w}: summation baseline (sum of single-layer effects)")
        } else {
            format!("window {w}: layers patched jointly")
        });
    }
    if label.is_empty() {
        return Tick { label: "all".into(), tip: "the whole hook".into() };
    }
    Tick { label: label.join(" "), tip: tip.join("; ") }
}

/// Which comparison a matrix shows.
#[derive(Debug, Clone, Copy)]
pub enum Measure {
    Jaccard,
    Spearman,
}

/// A variant x variant matrix of one measure for one target and metric; variants are numbered
/// on the axes (their names are long) and named in the row labels.
pub fn matrix(table: &Table, target: &str, metric: usize, measure: Measure) -> Grid {
    let variants: Vec<&str> = table.variants().into_iter().filter(|v| table.targets(v).contains(&target)).collect();
    let per_variant: Vec<(Vec<Effect>, Detection)> = variants
        .iter()
        .map(|v| {
            let e = compare::effects(table, v, target, metric);
            let d = compare::detect(&e, DETECTION_SD);
            (e, d)
        })
        .collect();
    let mut cells = vec![];
    for (y, a) in variants.iter().enumerate() {
        for (x, b) in variants.iter().enumerate() {
            let p = compare::pair(a, &per_variant[y], b, &per_variant[x]);
            let value = match measure {
                Measure::Jaccard => p.jaccard,
                Measure::Spearman => p.spearman,
            };
            if let Some(value) = value {
                cells.push(GridCell { x, y, value, name: format!("{} vs {}", y + 1, x + 1) });
            }
        }
    }
    let name = match measure {
        Measure::Jaccard => "Jaccard overlap of detected sets",
        Measure::Spearman => "Spearman rank correlation of effects",
    };
    Grid {
        title: format!("{target} · {}: {name}", table.metrics[metric]),
        x_title: "variant".into(),
        y_title: String::new(),
        x_ticks: (1..=variants.len()).map(|i| i.to_string()).collect(),
        y_ticks: variants
            .iter()
            .enumerate()
            .map(|(i, v)| Tick { label: format!("{} {v}", i + 1), tip: v.to_string() })
            .collect(),
        cells,
        limit: Some(1.0),
    }
}

/// How many senders a path heat map shows: those of largest |effect| through any receiver.
pub const PATH_SENDERS: usize = 20;

/// Senders x receivers for one variant and metric: one column per `path` target of the variant
/// (its receiver, named in the CSV's `hook` after `->`), one row per sender among the
/// [`PATH_SENDERS`] of largest |value| through any of them. `None` without path rows.
pub fn paths(table: &Table, variant: &str, metric: usize) -> Option<Grid> {
    let path_rows: Vec<&Row> = table.rows.iter().filter(|r| r.variant == variant && r.method == "path").collect();
    let mut targets: Vec<(&str, &str)> = vec![];
    for r in &path_rows {
        let receiver = r.hook.split_once("->").map_or("", |(_, to)| to);
        if !targets.iter().any(|(t, _)| *t == r.target) {
            targets.push((&r.target, receiver));
        }
    }
    if targets.is_empty() {
        return None;
    }
    let mut senders: Vec<(&str, f64)> = vec![];
    for r in &path_rows {
        let size = r.cells[metric].shown().abs();
        match senders.iter_mut().find(|(c, _)| *c == r.component) {
            Some((_, largest)) => *largest = largest.max(size),
            None => senders.push((&r.component, size)),
        }
    }
    senders.sort_by(|a, b| b.1.total_cmp(&a.1));
    senders.truncate(PATH_SENDERS);
    let mut cells = vec![];
    for r in &path_rows {
        let x = targets.iter().position(|(t, _)| *t == r.target);
        let y = senders.iter().position(|(c, _)| *c == r.component);
        if let (Some(x), Some(y)) = (x, y) {
            let value = r.cells[metric].shown();
            cells.push(GridCell { x, y, value, name: format!("{} -> {}", r.component, targets[x].1) });
        }
    }
    Some(Grid {
        title: format!("{variant} · {}: senders x receivers (path patching)", table.metrics[metric]),
        x_title: "receiver".into(),
        y_title: "sender".into(),
        x_ticks: targets.iter().map(|(t, _)| t.to_string()).collect(),
        y_ticks: senders.iter().map(|(c, _)| Tick { label: c.to_string(), tip: c.to_string() }).collect(),
        cells,
        limit: None,
    })
}
