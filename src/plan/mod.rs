//! Stage 3: typed [`Experiment`] -> execution [`Plan`].
//!
//! The sweep grid (dataset x corruption x direction) becomes variants; each variant lists its
//! prompts (token ids, corrupted inputs, answers, symbolic positions) and the patches to run
//! (hook, layers, head, position, label). Counts compare patchbay's strategy (clean and
//! corrupted runs once per prompt and noise sample, patches batched) with a naive one forward
//! pass per patch. Deterministic: the same experiment gives the same plan.

use std::fmt;

use crate::check::types::*;
use crate::check::{self, targets::compact};
use crate::syntax::ast::Position;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Plan {
    pub experiment: String,
    pub model: String,
    pub n_layers: usize,
    pub device: Device,
    pub batch_size: usize,
    pub variants: Vec<Variant>,
    pub metrics: Vec<PlanMetric>,
    pub expectations: Vec<String>,
    pub outputs: Vec<(String, String)>,
    pub counts: Counts,
    /// Estimated activation-cache bytes (f32) for the largest variant.
    pub cache_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlanMetric {
    pub name: String,
    pub kind: MetricKind,
    pub normalized: bool,
    pub averaging: Averaging,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Variant {
    /// `ioi/s2_io/denoise`.
    pub label: String,
    pub dataset: String,
    pub corruption: String,
    pub corruption_kind: CorruptionKind,
    pub direction: Direction,
    pub prompts: Vec<PlannedPrompt>,
    pub patches: Vec<PatchRun>,
    pub counts: Counts,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PlannedPrompt {
    pub clean_text: String,
    pub clean_ids: Vec<u32>,
    pub corrupted: CorruptedPrompt,
    pub answer: Answer,
    pub wrong: Option<Answer>,
    /// Symbolic position labels -> token index (slots' last and first tokens, `end`).
    pub positions: Vec<(String, usize)>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PatchRun {
    pub target: String,
    /// Full hook names patched jointly in this run (several hooks and/or window layers).
    pub hooks: Vec<String>,
    pub layers: Vec<usize>,
    pub head: Option<usize>,
    /// None: all positions at once.
    pub position: Option<Position>,
    /// Component label, e.g. `L9.H9`, `L3@S2`, `L3 w5`.
    pub label: String,
    /// Window size and centre layer, for sliding windows.
    pub window: Option<(usize, usize)>,
    /// A single-layer run added only to compute the summation baseline.
    pub baseline_only: bool,
    /// The target asks for the summation baseline of its windows.
    pub summation: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Counts {
    pub clean_runs: u64,
    pub corrupted_runs: u64,
    pub patched_runs: u64,
    pub batches: u64,
    /// Patched runs weighted by the fraction of layers they recompute (start late).
    pub layer_fraction_runs: f64,
    /// One forward pass per patch, re-running clean and corrupted per variant and target.
    pub naive_runs: u64,
}

impl Counts {
    pub fn total(&self) -> u64 {
        self.clean_runs + self.corrupted_runs + self.patched_runs
    }
}

fn window_layers(l: usize, w: usize, n: usize) -> Vec<usize> {
    let lo = l.saturating_sub(w / 2);
    let hi = (l + w.div_ceil(2)).min(n);
    (lo..hi).collect()
}

fn component_label(
    layers: &[usize],
    head: Option<usize>,
    pos: Option<&Position>,
    window: Option<(usize, usize)>,
) -> String {
    let mut s = match (window, layers.first()) {
        (Some((w, c)), _) => format!("L{c} w{w}"),
        (None, Some(l)) => format!("L{l}"),
        (None, None) => "embed".into(),
    };
    if let Some(h) = head {
        s.push_str(&format!(".H{h}"));
    }
    if let Some(p) = pos {
        s.push_str(&format!("@{}", position_label(p)));
    }
    s
}

/// Layers patched jointly, the (window, centre), and whether the run only feeds the baseline.
type LayerSet = (Vec<usize>, Option<(usize, usize)>, bool);

fn expand_patches(t: &PatchTarget, n_layers: usize, common_len: Option<usize>) -> Vec<PatchRun> {
    let positions: Vec<Option<Position>> = match &t.positions {
        PositionSelection::All => vec![None],
        PositionSelection::Each => (0..common_len.unwrap_or(0)).map(|i| Some(Position::Index(i as i64))).collect(),
        PositionSelection::List(l) => l.iter().cloned().map(Some).collect(),
    };
    let heads: Vec<Option<usize>> = match &t.heads {
        None => vec![None],
        Some(h) => h.iter().map(|x| Some(*x)).collect(),
    };
    // (layers patched jointly, window, baseline_only)
    let mut layer_sets: Vec<LayerSet> = Vec::new();
    match (&t.layers, &t.windows) {
        (None, _) => layer_sets.push((Vec::new(), None, false)),
        (Some(ls), None) => layer_sets.extend(ls.iter().map(|l| (vec![*l], None, false))),
        (Some(ls), Some(ws)) => {
            for w in ws {
                for l in ls {
                    if *w == 1 {
                        layer_sets.push((vec![*l], Some((1, *l)), false));
                    } else {
                        layer_sets.push((window_layers(*l, *w, n_layers), Some((*w, *l)), false));
                    }
                }
            }
            if t.summation && !ws.contains(&1) {
                // The baseline sums single-layer effects over each window: every layer any window touches.
                let mut needed: Vec<usize> =
                    ls.iter().flat_map(|l| ws.iter().flat_map(move |w| window_layers(*l, *w, n_layers))).collect();
                needed.sort();
                needed.dedup();
                layer_sets.extend(needed.into_iter().map(|l| (vec![l], Some((1, l)), true)));
            }
        }
    }
    let mut out = Vec::new();
    for (layers, window, baseline_only) in &layer_sets {
        for h in &heads {
            for p in &positions {
                let hooks = if layers.is_empty() {
                    t.hooks.iter().map(|k| k.full_name(None)).collect()
                } else {
                    layers.iter().flat_map(|l| t.hooks.iter().map(move |k| k.full_name(Some(*l)))).collect()
                };
                out.push(PatchRun {
                    target: t.name.clone(),
                    hooks,
                    layers: layers.clone(),
                    head: *h,
                    position: p.clone(),
                    label: component_label(layers, *h, p.as_ref(), *window),
                    window: *window,
                    baseline_only: *baseline_only,
                    summation: t.summation,
                });
            }
        }
    }
    out
}

/// Compile a checked experiment into its execution plan.
pub fn plan(exp: &Experiment) -> Plan {
    let n_layers = exp.model.manifest.config.n_layers;
    let mut variants = Vec::new();
    let mut total = Counts::default();
    let mut cache_bytes = 0u64;
    for dname in &exp.sweep.datasets {
        let Some(ds) = exp.datasets.iter().find(|d| &d.name == dname) else { continue };
        let n = ds.prompts.len() as u64;
        total.clean_runs += n;
        let patches: Vec<PatchRun> = exp
            .patches
            .iter()
            .filter(|p| exp.sweep.patches.contains(&p.name))
            .flat_map(|p| expand_patches(p, n_layers, ds.common_len()))
            .collect();
        for cname in &exp.sweep.corruptions {
            let Some(c) = exp.corruptions.iter().find(|c| &c.name == cname) else { continue };
            let Some(corrupted) = ds.corrupted.get(cname) else { continue };
            let samples = c.kind.samples() as u64;
            let mut corrupted_counted = false;
            for &dir in &exp.sweep.directions {
                if c.kind.is_ablation() && dir == Direction::Denoise {
                    continue;
                }
                let mut counts = Counts { clean_runs: n, ..Counts::default() };
                if !c.kind.is_ablation() {
                    counts.corrupted_runs = n * samples;
                    if !corrupted_counted {
                        total.corrupted_runs += n * samples;
                        corrupted_counted = true;
                    }
                }
                let reps = n * samples;
                counts.patched_runs = reps * patches.len() as u64;
                counts.batches = counts.patched_runs.div_ceil(exp.batch_size as u64);
                counts.layer_fraction_runs = patches
                    .iter()
                    .map(|p| {
                        let first = p.layers.iter().min().copied().unwrap_or(0);
                        reps as f64 * (n_layers - first) as f64 / n_layers as f64
                    })
                    .sum();
                counts.naive_runs = reps * patches.len() as u64
                    + exp.sweep.patches.len() as u64 * (n + if c.kind.is_ablation() { 0 } else { n * samples });
                total.patched_runs += counts.patched_runs;
                total.batches += counts.batches;
                total.layer_fraction_runs += counts.layer_fraction_runs;
                total.naive_runs += counts.naive_runs;
                cache_bytes = cache_bytes.max(cache_estimate(exp, ds, &patches, c, dir));
                let prompts = ds
                    .prompts
                    .iter()
                    .zip(corrupted)
                    .map(|(p, cp)| {
                        let mut positions: Vec<(String, usize)> = Vec::new();
                        for (name, s) in &p.slots {
                            positions.push((name.clone(), s.last));
                            if s.first != s.last {
                                positions.push((format!("first {name}"), s.first));
                            }
                        }
                        positions.push(("end".into(), p.ids.len().saturating_sub(1)));
                        PlannedPrompt {
                            clean_text: p.text.clone(),
                            clean_ids: p.ids.clone(),
                            corrupted: cp.clone(),
                            answer: p.answer.clone(),
                            wrong: p.wrong.clone(),
                            positions,
                        }
                    })
                    .collect();
                variants.push(Variant {
                    label: format!("{}/{}/{}", ds.name, c.name, dir.name()),
                    dataset: ds.name.clone(),
                    corruption: c.name.clone(),
                    corruption_kind: c.kind.clone(),
                    direction: dir,
                    prompts,
                    patches: patches.clone(),
                    counts,
                });
            }
        }
    }
    let metrics = exp
        .metrics
        .iter()
        .filter(|m| exp.sweep.metrics.contains(&m.name))
        .map(|m| PlanMetric { name: m.name.clone(), kind: m.kind, normalized: m.normalized, averaging: m.averaging })
        .collect();
    let mut outputs = Vec::new();
    for (k, v) in
        [("csv", &exp.outputs.csv), ("per-prompt csv", &exp.outputs.per_prompt), ("report", &exp.outputs.report)]
    {
        if let Some(p) = v {
            outputs.push((k.to_string(), p.display().to_string()));
        }
    }
    Plan {
        experiment: exp.name.clone(),
        model: exp.model.reference.clone(),
        n_layers,
        device: exp.model.device,
        batch_size: exp.batch_size,
        variants,
        metrics,
        expectations: exp.expectations.iter().map(|e| e.text.clone()).collect(),
        outputs,
        counts: total,
        cache_bytes,
    }
}

/// Activation cache of one variant: the source run's activations at every patched hook, for
/// every prompt (and noise sample when the source is the noised run), 4 bytes per value.
fn cache_estimate(exp: &Experiment, ds: &Dataset, patches: &[PatchRun], c: &Corruption, dir: Direction) -> u64 {
    let seq = ds.max_len() as u64;
    let n = ds.prompts.len() as u64;
    let copies = match (dir, &c.kind) {
        (Direction::Noise, CorruptionKind::Noise { samples, .. }) => *samples as u64,
        (_, CorruptionKind::Ablation { kind: AblationKind::Zero, .. }) => 0,
        (_, CorruptionKind::Ablation { kind: AblationKind::Mean, .. }) => 0,
        _ => 1,
    };
    let mut hooks: Vec<&String> = patches.iter().flat_map(|p| p.hooks.iter()).collect();
    hooks.sort();
    hooks.dedup();
    let mut per_prompt = 0u64;
    for h in hooks {
        let Some(hook) = exp.model.manifest.hooks.get(h) else { continue };
        let mut elems = 1u64;
        for d in &hook.shape {
            elems *= match d {
                crate::model::Dim::Fixed(k) => *k as u64,
                crate::model::Dim::Symbolic(s) if s == "batch" => 1,
                crate::model::Dim::Symbolic(_) => seq,
            };
        }
        per_prompt += elems;
    }
    let mean_ablation = matches!(c.kind, CorruptionKind::Ablation { kind: AblationKind::Mean, .. });
    4 * per_prompt * (n * copies + u64::from(mean_ablation))
}

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

fn describe_corruption(k: &CorruptionKind) -> String {
    match k {
        CorruptionKind::Replace(r) => format!(
            "STR, replace {}",
            r.iter()
                .map(|(s, w)| format!(
                    "{s} with {}",
                    match w {
                        Replacement::Slot(o) => o.clone(),
                        Replacement::Literal(l) => format!("{l:?}"),
                    }
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        CorruptionKind::Resample { slots, distinct, seed } => {
            format!("STR, resample {}{} from their pools (seed {seed})", slots.join(", "), if *distinct { " distinct" } else { "" })
        }
        CorruptionKind::Noise { slots, scale, samples, seed } => format!(
            "Gaussian noise on the token embeddings of {}, sd = {scale} x pooled embedding sd, {samples} samples (seed {seed})",
            slots.join(", ")
        ),
        CorruptionKind::Counterfactual => "counterfactual prompts from the dataset".into(),
        CorruptionKind::Ablation { kind, seed } => match kind {
            AblationKind::Resample => format!("resample ablation (activation of another prompt, seed {seed})"),
            k => format!("{} ablation", k.name()),
        },
    }
}

fn describe_answer(a: &Answer) -> String {
    match a {
        Answer::Token { text, id } => format!("{text:?} ({id})"),
        Answer::Set(s) => {
            format!("set of {} {{{}}}", s.len(), s.iter().map(|(t, _)| format!("{t:?}")).collect::<Vec<_>>().join(", "))
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "plan for `{}` on model `{}` ({} layers), device {}",
            self.experiment,
            self.model,
            self.n_layers,
            self.device.name()
        )?;
        writeln!(f, "metrics (columns of every row; computed from the same runs):")?;
        for m in &self.metrics {
            writeln!(
                f,
                "  {} = {}{}, averaged by {}",
                m.name,
                m.kind.name(),
                if m.normalized { " normalized" } else { "" },
                m.averaging.name()
            )?;
        }
        writeln!(f, "{} variant(s):", self.variants.len())?;
        for v in &self.variants {
            writeln!(f, "\nvariant {}", v.label)?;
            writeln!(f, "  corruption: {}", describe_corruption(&v.corruption_kind))?;
            writeln!(
                f,
                "  direction:  {}",
                match v.direction {
                    Direction::Denoise => "denoise (clean activations patched into the corrupted run)",
                    Direction::Noise => "noise (corrupted activations patched into the clean run)",
                }
            )?;
            writeln!(f, "  prompts:    {}", v.prompts.len())?;
            for (i, p) in v.prompts.iter().take(2).enumerate() {
                writeln!(f, "    [{i}] clean     {:?} {:?}", p.clean_text, p.clean_ids)?;
                match &p.corrupted {
                    CorruptedPrompt::Tokens { text, ids, .. } => writeln!(f, "        corrupted {text:?} {ids:?}")?,
                    CorruptedPrompt::Noise { positions } => writeln!(f, "        noise at positions {positions:?}")?,
                    CorruptedPrompt::Ablation { source_prompt: Some(s) } => {
                        writeln!(f, "        ablated from prompt {s}")?
                    }
                    CorruptedPrompt::Ablation { source_prompt: None } => writeln!(f, "        ablated")?,
                }
                write!(f, "        answer {}", describe_answer(&p.answer))?;
                if let Some(w) = &p.wrong {
                    write!(f, ", wrong {}", describe_answer(w))?;
                }
                writeln!(
                    f,
                    "; positions {}",
                    p.positions.iter().map(|(l, i)| format!("{l}={i}")).collect::<Vec<_>>().join(" ")
                )?;
            }
            if v.prompts.len() > 2 {
                writeln!(f, "    ... {} more", v.prompts.len() - 2)?;
            }
            let mut targets: Vec<&str> = v.patches.iter().map(|p| p.target.as_str()).collect();
            targets.dedup();
            writeln!(f, "  patches:    {}", v.patches.len())?;
            for t in targets {
                let ps: Vec<&PatchRun> = v.patches.iter().filter(|p| p.target == t).collect();
                let mut layers: Vec<usize> = ps.iter().flat_map(|p| p.layers.iter().copied()).collect();
                layers.sort();
                layers.dedup();
                let baseline = ps.iter().filter(|p| p.baseline_only).count();
                let hooks: Vec<String> = {
                    let mut h: Vec<String> = ps[0]
                        .hooks
                        .iter()
                        .map(|h| {
                            h.split('.')
                                .skip_while(|s| *s == "blocks" || s.parse::<usize>().is_ok())
                                .collect::<Vec<_>>()
                                .join(".")
                        })
                        .collect();
                    h.dedup();
                    h
                };
                write!(f, "    {t}: {} run(s) of {{{}}}", ps.len(), hooks.join(", "))?;
                if !layers.is_empty() {
                    write!(f, " over layers {}", compact(&layers))?;
                }
                if baseline > 0 {
                    write!(f, " ({baseline} single-layer runs for the summation baseline)")?;
                }
                let labels: Vec<&str> = ps.iter().map(|p| p.label.as_str()).collect();
                let shown = if labels.len() > 6 {
                    format!("{}, ..., {}", labels[..4].join(", "), labels[labels.len() - 1])
                } else {
                    labels.join(", ")
                };
                writeln!(f, "\n      components: {shown}")?;
            }
            writeln!(
                f,
                "  forward passes: {} clean + {} corrupted + {} patched in {} batch(es) of {}; naive one pass per patch: {}",
                v.counts.clean_runs, v.counts.corrupted_runs, v.counts.patched_runs, v.counts.batches, self.batch_size, v.counts.naive_runs
            )?;
        }
        let c = &self.counts;
        writeln!(f, "\ntotal forward passes: {} ({} clean + {} corrupted, each run once and cached; {} patched in {} batch(es))", c.total(), c.clean_runs, c.corrupted_runs, c.patched_runs, c.batches)?;
        writeln!(
            f,
            "  starting patched runs at their first patched layer: {:.1} full-pass equivalents",
            c.clean_runs as f64 + c.corrupted_runs as f64 + c.layer_fraction_runs
        )?;
        writeln!(f, "  naive (one pass per patch, clean and corrupted re-run per target): {}", c.naive_runs)?;
        writeln!(f, "estimated activation cache: {} (f32, largest variant)", human_bytes(self.cache_bytes))?;
        if !self.expectations.is_empty() {
            writeln!(f, "expectations:")?;
            for e in &self.expectations {
                writeln!(f, "  {e}")?;
            }
        }
        for (k, p) in &self.outputs {
            writeln!(f, "{k}: {p}")?;
        }
        Ok(())
    }
}

/// `patchbay plan FILE`: check, then print the plan in words.
pub fn command(file: &std::path::Path, device_override: Option<&str>) -> anyhow::Result<bool> {
    match check::check_file(file, device_override) {
        Ok(exp) => {
            for w in &exp.warnings {
                eprint!("{}", w.render_terminal());
            }
            print!("{}", plan(&exp));
            Ok(true)
        }
        Err(diags) => {
            for d in &diags {
                eprint!("{}", d.render_terminal());
            }
            eprintln!("error: {} has {} error(s)", file.display(), diags.iter().filter(|d| d.is_error()).count());
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::window_layers;

    /// METHOD.md: layers max(0, l - w//2) .. min(L, l + ceil(w/2)) - 1.
    #[test]
    fn sliding_window_layers() {
        assert_eq!(window_layers(10, 1, 30), vec![10]);
        assert_eq!(window_layers(10, 3, 30), vec![9, 10, 11]);
        assert_eq!(window_layers(10, 5, 30), vec![8, 9, 10, 11, 12]);
        assert_eq!(window_layers(10, 10, 30), (5..=14).collect::<Vec<_>>());
        assert_eq!(window_layers(1, 5, 30), vec![0, 1, 2, 3]);
        assert_eq!(window_layers(29, 10, 30), (24..=29).collect::<Vec<_>>());
    }
}
