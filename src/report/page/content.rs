//! What a report says, computed once and shown twice (HTML page, Markdown summary): numbers are
//! formatted here so both forms agree to the digit.

use serde::Serialize;

use anyhow::Result;

use super::chart;
use super::compare::{self, DETECTION_SD};
use super::heatmap::{self, Grid};
use super::maps::{self, Measure};
use super::read::Table;
use super::sidecar::{Sidecar, Verdict};
use super::MARKER;

/// How many components "top components" lists.
pub const TOP: usize = 5;

#[derive(Debug, Serialize)]
pub struct Content {
    pub experiment: String,
    /// The result CSV's file name.
    pub source: String,
    pub metrics: Vec<String>,
    pub variants: Vec<VariantView>,
    pub comparisons: Vec<ComparisonView>,
    pub peaks: Vec<PeakView>,
    /// Window profiles against the summation baseline, per variant, window target and metric.
    pub profiles: Vec<Svg>,
    /// Path patching: senders x receivers, per variant and metric.
    pub paths: Vec<Svg>,
    /// How many senders a path heat map shows.
    pub path_senders: usize,
    pub has_sidecar: bool,
    /// Attribution estimates against exact values, from the sidecar.
    pub agreements: Vec<AgreementView>,
    pub expectations: Vec<Verdict>,
    pub provenance: Vec<(String, String)>,
    /// The detection threshold as the page writes it (`2`).
    pub detection_sd: String,
    pub top: usize,
}

/// An estimated target against its exactly patched twin, for one variant and metric.
#[derive(Debug, Serialize)]
pub struct AgreementView {
    pub variant: String,
    pub estimated: String,
    pub exact: String,
    pub metric: String,
    pub components: usize,
    pub spearman: String,
    pub recall: String,
    /// `component (exact, estimated, rank)`, largest |exact| first.
    pub misses: Vec<String>,
}

/// An SVG chart: its markup, and the file it is written to beside a Markdown report.
#[derive(Debug, Serialize)]
pub struct Svg {
    pub title: String,
    pub file: String,
    pub markup: String,
}

impl Svg {
    /// The standalone file: the report marker, then the SVG.
    pub fn file_bytes(&self) -> Vec<u8> {
        format!("{MARKER}\n{}\n", self.markup).into_bytes()
    }
}

#[derive(Debug, Serialize)]
pub struct VariantView {
    pub label: String,
    pub dataset: String,
    pub corruption: String,
    pub direction: String,
    pub n_prompts: usize,
    pub n_samples: usize,
    /// Per metric: name, clean and corrupted metric.
    pub metrics: Vec<(String, String, String)>,
    pub targets: Vec<TargetView>,
}

#[derive(Debug, Serialize)]
pub struct TargetView {
    pub target: String,
    pub metric: String,
    pub mean: String,
    pub sd: String,
    pub positive: String,
    pub negative: String,
    pub top: String,
    pub map: Svg,
}

#[derive(Debug, Serialize)]
pub struct ComparisonView {
    pub target: String,
    pub metric: String,
    /// Per variant: label, detected positive, detected negative.
    pub sets: Vec<(String, String, String)>,
    pub pairs: Vec<PairView>,
    pub jaccard: Svg,
    pub spearman: Svg,
}

#[derive(Debug, Serialize)]
pub struct PairView {
    pub a: String,
    pub b: String,
    pub detected_a: usize,
    pub detected_b: usize,
    pub detected_both: usize,
    pub jaccard: String,
    pub shared: usize,
    pub spearman: String,
}

#[derive(Debug, Serialize)]
pub struct PeakView {
    pub variant: String,
    pub target: String,
    pub position: String,
    pub metric: String,
    pub window: usize,
    pub peak: String,
    pub baseline: String,
    pub ratio: String,
}

/// A number as every table writes it.
pub fn num(x: f64) -> String {
    format!("{x:.4}")
}

fn opt(x: Option<f64>) -> String {
    x.map_or("–".into(), num)
}

fn listed(effects: &[compare::Effect]) -> String {
    if effects.is_empty() {
        return "none".into();
    }
    effects.iter().map(|e| format!("{} ({})", e.component, num(e.value))).collect::<Vec<_>>().join(", ")
}

/// `L12 (0.8123)`: a peak and the layer it is at.
fn at(peak: (Option<usize>, f64)) -> String {
    match peak.0 {
        Some(layer) => format!("{} at L{layer}", num(peak.1)),
        None => num(peak.1),
    }
}

/// Names SVG files `<stem>.<n>.<what>.svg`, numbered so that no two collide.
struct Files<'a> {
    stem: &'a str,
    n: usize,
}

impl Files<'_> {
    /// A fresh id (unique on the page) and file name for a chart of `what`.
    fn next(&mut self, what: &str) -> (String, String) {
        self.n += 1;
        let slug: String = what.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' }).collect();
        let id = format!("{}-{slug}", self.n);
        let file = format!("{}.{id}.svg", self.stem);
        (id, file)
    }

    fn svg(&mut self, grid: &Grid, what: &str) -> Svg {
        let (id, file) = self.next(what);
        Svg { title: grid.title.clone(), file, markup: heatmap::svg(grid, &id) }
    }
}

impl Content {
    /// Everything a report shows; `source` names the CSV, `stem` prefixes SVG file names.
    pub fn build(table: &Table, sidecar: Option<&Sidecar>, source: &str, stem: &str) -> Result<Content> {
        let empty = Sidecar::default();
        let side = sidecar.unwrap_or(&empty);
        let mut files = Files { stem, n: 0 };
        let mut variants = vec![];
        for variant in table.variants() {
            let rows: Vec<_> = table.rows.iter().filter(|r| r.variant == variant).collect();
            let first = rows.iter().find(|r| !r.summation).unwrap_or(&rows[0]);
            let mut targets = vec![];
            for target in table.targets(variant) {
                for (m, metric) in table.metrics.iter().enumerate() {
                    let effects = compare::effects(table, variant, target, m);
                    if effects.is_empty() {
                        continue;
                    }
                    let d = compare::detect(&effects, DETECTION_SD);
                    let grid = maps::grid(table, side, variant, target, m);
                    targets.push(TargetView {
                        target: target.to_string(),
                        metric: metric.clone(),
                        mean: num(d.mean),
                        sd: num(d.sd),
                        positive: listed(&d.positive),
                        negative: listed(&d.negative),
                        top: listed(&compare::top(&effects, TOP)),
                        map: files.svg(&grid, &format!("{variant}.{target}.{metric}")),
                    });
                }
            }
            variants.push(VariantView {
                label: variant.to_string(),
                dataset: first.dataset.clone(),
                corruption: first.corruption.clone(),
                direction: first.direction.clone(),
                n_prompts: first.n_prompts,
                n_samples: first.n_samples,
                metrics: table
                    .metrics
                    .iter()
                    .zip(&first.cells)
                    .map(|(name, c)| (name.clone(), num(c.clean), opt(c.corrupted)))
                    .collect(),
                targets,
            });
        }

        let mut comparisons = vec![];
        let mut targets: Vec<&str> = vec![];
        for v in table.variants() {
            targets.extend(table.targets(v).into_iter().filter(|t| !targets.contains(t)).collect::<Vec<_>>());
        }
        for target in targets {
            for (m, metric) in table.metrics.iter().enumerate() {
                let sets = table
                    .variants()
                    .into_iter()
                    .filter(|v| table.targets(v).contains(&target))
                    .map(|v| {
                        let d = compare::detect(&compare::effects(table, v, target, m), DETECTION_SD);
                        (v.to_string(), listed(&d.positive), listed(&d.negative))
                    })
                    .collect();
                let pairs = compare::pairs(table, target, m)
                    .into_iter()
                    .map(|p| PairView {
                        a: p.a,
                        b: p.b,
                        detected_a: p.detected_a,
                        detected_b: p.detected_b,
                        detected_both: p.detected_both,
                        jaccard: opt(p.jaccard),
                        shared: p.shared,
                        spearman: opt(p.spearman),
                    })
                    .collect();
                let what = format!("{target}.{metric}");
                comparisons.push(ComparisonView {
                    target: target.to_string(),
                    metric: metric.clone(),
                    sets,
                    pairs,
                    jaccard: files.svg(&maps::matrix(table, target, m, Measure::Jaccard), &format!("jaccard.{what}")),
                    spearman: files
                        .svg(&maps::matrix(table, target, m, Measure::Spearman), &format!("spearman.{what}")),
                });
            }
        }

        let mut peaks = vec![];
        let mut profiles = vec![];
        for (m, metric) in table.metrics.iter().enumerate() {
            let window_peaks = compare::window_peaks(table, m);
            let mut drawn: Vec<(&str, &str, Option<&str>)> = vec![];
            for p in &window_peaks {
                let key = (p.variant.as_str(), p.target.as_str(), p.position.as_deref());
                if drawn.contains(&key) {
                    continue;
                }
                drawn.push(key);
                if let Some(markup) = chart::window_profile(table, key.0, key.1, key.2, m)? {
                    let what = format!("windows.{}.{}.{metric}", key.0, key.1);
                    let (_, file) = files.next(&what);
                    profiles.push(Svg { title: what, file, markup });
                }
            }
            peaks.extend(window_peaks.into_iter().map(|p| PeakView {
                variant: p.variant,
                target: p.target,
                position: p.position.unwrap_or_else(|| "–".into()),
                metric: metric.clone(),
                window: p.window,
                peak: at(p.peak),
                baseline: p.baseline.map_or("–".into(), at),
                ratio: opt(p.ratio),
            }));
        }

        let mut paths = vec![];
        for variant in table.variants() {
            for (m, metric) in table.metrics.iter().enumerate() {
                if let Some(grid) = maps::paths(table, variant, m) {
                    paths.push(files.svg(&grid, &format!("paths.{variant}.{metric}")));
                }
            }
        }

        Ok(Content {
            experiment: table.experiment.clone(),
            source: source.to_string(),
            metrics: table.metrics.clone(),
            variants,
            comparisons,
            peaks,
            profiles,
            paths,
            path_senders: maps::PATH_SENDERS,
            has_sidecar: sidecar.is_some(),
            agreements: side
                .agreements
                .iter()
                .map(|a| AgreementView {
                    variant: a.variant.clone(),
                    estimated: a.estimated.clone(),
                    exact: a.exact.clone(),
                    metric: a.metric.clone(),
                    components: a.components,
                    spearman: opt(a.spearman),
                    recall: format!("{}/{}", a.recalled, a.k),
                    misses: a
                        .misses
                        .iter()
                        .map(|m| {
                            format!(
                                "{} ({}, estimated {}, rank {})",
                                m.component,
                                num(m.exact),
                                num(m.estimate),
                                m.estimate_rank
                            )
                        })
                        .collect(),
                })
                .collect(),
            expectations: side.expectations.clone(),
            provenance: side.facts.clone(),
            detection_sd: DETECTION_SD.to_string(),
            top: TOP,
        })
    }

    /// Every SVG the report draws, in page order.
    pub fn svgs(&self) -> Vec<&Svg> {
        let maps = self.variants.iter().flat_map(|v| v.targets.iter().map(|t| &t.map));
        let matrices = self.comparisons.iter().flat_map(|c| [&c.jaccard, &c.spearman]);
        maps.chain(matrices).chain(&self.profiles).chain(&self.paths).collect()
    }
}
