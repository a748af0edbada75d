//! A result CSV read back into a typed table, refusing anything `patchbay run` would not have
//! written: the report must never draw a heat map from a file it misunderstood.

use anyhow::Result;

use crate::report::csv::{KEY_COLUMNS, METRIC_SUFFIXES};
use crate::{bail_fixable, fixable};

/// One experiment's results.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub experiment: String,
    /// Metric names, in column order.
    pub metrics: Vec<String>,
    pub rows: Vec<Row>,
}

/// One row: a component patched in a variant (or a window's summation baseline).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub variant: String,
    pub dataset: String,
    pub corruption: String,
    pub direction: String,
    pub target: String,
    pub component: String,
    pub hook: String,
    pub layer: Option<usize>,
    pub head: Option<usize>,
    pub position: Option<usize>,
    pub position_label: Option<String>,
    pub window: Option<usize>,
    /// A window's summation baseline, not a component.
    pub summation: bool,
    pub n_prompts: usize,
    pub n_samples: usize,
    /// `exact` (activation patching), `attribution` or `atp*` (the row's values are estimates),
    /// or `path` (path patching; `hook` names the receiver after `->`).
    pub method: String,
    /// One per metric, in [`Table::metrics`] order.
    pub cells: Vec<Cell>,
}

/// One metric's numbers in a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cell {
    /// The declared value: the normalised effect of a `normalized` metric, else the raw effect
    /// (empty where there is no corrupted run to normalise by).
    pub value: Option<f64>,
    pub effect: f64,
    pub patched: Option<f64>,
    pub clean: f64,
    pub corrupted: Option<f64>,
    pub sem: Option<f64>,
    /// An estimated target's attribution-patching estimate.
    pub estimate: Option<f64>,
}

impl Cell {
    /// What the report shows and ranks: the declared value, or the raw effect where a
    /// normalised value does not exist (ablations).
    pub fn shown(&self) -> f64 {
        self.value.unwrap_or(self.effect)
    }
}

impl Table {
    /// The variants, in the order of their first row.
    pub fn variants(&self) -> Vec<&str> {
        let mut out: Vec<&str> = vec![];
        for r in &self.rows {
            if !out.contains(&r.variant.as_str()) {
                out.push(&r.variant);
            }
        }
        out
    }

    /// The targets of a variant, in the order of their first row.
    pub fn targets(&self, variant: &str) -> Vec<&str> {
        let mut out: Vec<&str> = vec![];
        for r in self.rows.iter().filter(|r| r.variant == variant) {
            if !out.contains(&r.target.as_str()) {
                out.push(&r.target);
            }
        }
        out
    }

    /// The rows of one target in one variant, summation baselines included.
    pub fn rows_of<'a>(&'a self, variant: &'a str, target: &'a str) -> impl Iterator<Item = &'a Row> + 'a {
        self.rows.iter().filter(move |r| r.variant == variant && r.target == target)
    }
}

/// Parse a result CSV (`name` says which file in errors).
pub fn read(bytes: &[u8], name: &str) -> Result<Table> {
    let not_a_result = |why: String| {
        fixable!(
            "{name} is not a patchbay result CSV: {why}";
            help: "give the `output` CSV that `patchbay run` wrote (not the per-prompt CSV or the provenance JSON)"
        )
    };
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(bytes);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| not_a_result(format!("cannot read its header ({e})")))?
        .iter()
        .map(str::to_string)
        .collect();
    if !KEY_COLUMNS.iter().any(|k| header.iter().any(|h| h == k)) {
        return Err(not_a_result(
            "its header has none of patchbay's columns (experiment, variant, component, ...)".into(),
        ));
    }
    if let Some(missing) = KEY_COLUMNS.iter().find(|k| !header.iter().any(|h| h == *k)) {
        bail_fixable!(
            "{name} lacks the column `{missing}`";
            help: "a patchbay result CSV starts with the columns {}; rerun `patchbay run` to write it afresh",
            KEY_COLUMNS.join(", ")
        );
    }
    if header[..KEY_COLUMNS.len()] != KEY_COLUMNS {
        bail_fixable!(
            "{name} has patchbay's columns in another order";
            help: "a patchbay result CSV starts with the columns {}; rerun `patchbay run` to write it afresh",
            KEY_COLUMNS.join(", ")
        );
    }
    if header.iter().any(|h| h == "prompt_index") {
        return Err(not_a_result("it has a `prompt_index` column: it is a per-prompt CSV".into()));
    }
    let metrics = metric_names(&header[KEY_COLUMNS.len()..], name)?;

    let mut rows = vec![];
    let mut experiment: Option<String> = None;
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let record = record.map_err(|e| {
            fixable!("{name} line {line} is not valid CSV: {e}"; help: "rerun `patchbay run` to write the CSV afresh")
        })?;
        let field = |c: usize| record.get(c).unwrap_or_default();
        match &experiment {
            None => experiment = Some(field(0).to_string()),
            Some(first) if first != field(0) => bail_fixable!(
                "{name} mixes experiments: `{first}` and, on line {line}, `{}`", field(0);
                help: "a report covers one experiment; give each experiment its own `output` CSV"
            ),
            Some(_) => {}
        }
        let cell_error = |column: &str, value: &str, what: &str| {
            fixable!(
                "{name} line {line}, column `{column}`: `{value}` is not {what}";
                help: "the file was changed after `patchbay run` wrote it; rerun the experiment"
            )
        };
        let whole = |c: usize| -> Result<Option<usize>> {
            let v = field(c);
            if v.is_empty() {
                return Ok(None);
            }
            v.parse().map(Some).map_err(|_| cell_error(KEY_COLUMNS[c], v, "a whole number"))
        };
        let number = |c: usize| -> Result<Option<f64>> {
            let v = field(c);
            if v.is_empty() {
                return Ok(None);
            }
            match v.parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(cell_error(&header[c], v, "a finite number")),
            }
        };
        let required =
            |c: usize, x: Option<f64>| x.ok_or_else(|| cell_error(&header[c], "", "a number (it is required)"));
        let text = |c: usize| field(c).to_string();
        let mut cells = vec![];
        for m in 0..metrics.len() {
            let c = KEY_COLUMNS.len() + m * METRIC_SUFFIXES.len();
            cells.push(Cell {
                value: number(c)?,
                effect: required(c + 1, number(c + 1)?)?,
                patched: number(c + 2)?,
                clean: required(c + 3, number(c + 3)?)?,
                corrupted: number(c + 4)?,
                sem: number(c + 5)?,
                estimate: number(c + 6)?,
            });
        }
        let baseline = field(13);
        if !baseline.is_empty() && baseline != "summation" {
            return Err(cell_error("baseline", baseline, "empty or `summation`"));
        }
        rows.push(Row {
            variant: text(1),
            dataset: text(2),
            corruption: text(3),
            direction: text(4),
            target: text(5),
            component: text(6),
            hook: text(7),
            layer: whole(8)?,
            head: whole(9)?,
            position: whole(10)?,
            position_label: Some(text(11)).filter(|s| !s.is_empty()),
            window: whole(12)?,
            summation: !baseline.is_empty(),
            n_prompts: whole(14)?.ok_or_else(|| cell_error("n_prompts", "", "a whole number (it is required)"))?,
            n_samples: whole(15)?.ok_or_else(|| cell_error("n_samples", "", "a whole number (it is required)"))?,
            method: match field(16) {
                m @ ("exact" | "attribution" | "atp*" | "path") => m.to_string(),
                other => return Err(cell_error("method", other, "`exact`, `attribution`, `atp*` or `path`")),
            },
            cells,
        });
    }
    let Some(experiment) = experiment else {
        bail_fixable!("{name} has no result rows"; help: "rerun `patchbay run`; a finished run writes one row per component");
    };
    Ok(Table { experiment, metrics, rows })
}

/// The metric names of the columns after the key columns: seven columns per metric, named
/// `m, m_effect, m_patched, m_clean, m_corrupted, m_sem, m_estimate`.
fn metric_names(columns: &[String], name: &str) -> Result<Vec<String>> {
    if columns.is_empty() {
        bail_fixable!(
            "{name} has no metric columns";
            help: "a patchbay result CSV has seven columns per metric after `method`; rerun `patchbay run`"
        );
    }
    let mut metrics = vec![];
    for group in columns.chunks(METRIC_SUFFIXES.len()) {
        let metric = &group[0];
        for (i, suffix) in METRIC_SUFFIXES.iter().enumerate() {
            let expected = format!("{metric}{suffix}");
            if group.get(i) != Some(&expected) {
                bail_fixable!(
                    "{name} lacks the column `{expected}` of metric `{metric}`";
                    help: "a patchbay result CSV has seven columns per metric: m, m_effect, m_patched, m_clean, \
                           m_corrupted, m_sem, m_estimate; rerun `patchbay run`"
                );
            }
        }
        metrics.push(metric.clone());
    }
    Ok(metrics)
}
