//! The execution plan: plan's output and the engine's only input. Deterministic: the same
//! experiment gives the same plan; it serialises (snapshot tests) and prints in words (`patchbay
//! plan`).

use std::fmt;

use crate::ir::experiment::*;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Plan {
    pub experiment: String,
    /// The model as the file names it, and the directory it resolved to.
    pub model: String,
    pub model_dir: std::path::PathBuf,
    pub n_layers: usize,
    pub device: Device,
    /// At most this many passes per ONNX Runtime call (`batch N`); `None`: as many as the
    /// memory budget allows.
    pub batch_size: Option<usize>,
    pub variants: Vec<Variant>,
    pub metrics: Vec<PlanMetric>,
    pub expectations: Vec<Expectation>,
    pub outputs: Outputs,
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
    /// The hooks whose activations the clean and corrupted runs cache (what the patches read,
    /// and the embeddings that Gaussian noise perturbs), sorted.
    pub captures: Vec<String>,
    /// The earlier variant whose clean and corrupted runs are this one's too (same dataset and
    /// corruption, another direction).
    pub shares_runs_with: Option<String>,
    pub counts: Counts,
}

impl Variant {
    /// Whether patches start from the clean runs (noising, ablations) or the corrupted ones.
    pub fn base_is_clean(&self) -> bool {
        self.direction == Direction::Noise || matches!(self.corruption_kind, CorruptionKind::Ablation { .. })
    }
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
    /// The first token whose input the corruption changes (STR and counterfactual prompts: the
    /// first differing id; Gaussian noise: the first noised position). Every earlier position is
    /// the same in the clean and corrupted runs (causal attention). `None` for ablations, which
    /// change activations rather than inputs.
    pub first_changed_token: Option<usize>,
    /// Gaussian noise: the random stream of each sample, drawn by ChaCha8 seeded with the
    /// corruption's seed (`prompt << 32 | sample`); empty for other corruptions.
    pub noise_streams: Vec<u64>,
}

impl PlannedPrompt {
    /// The token index of `pos` in this prompt; `None` for a label the prompt does not have or
    /// an index outside it (the checker refuses both).
    pub fn token_index(&self, pos: &Position) -> Option<usize> {
        let len = self.clean_ids.len() as i64;
        let lookup = |label: &str| self.positions.iter().find(|(l, _)| l == label).map(|(_, i)| *i);
        match pos {
            Position::End => lookup("end"),
            Position::Index(i) => {
                let i = if *i < 0 { len + i } else { *i };
                (0..len).contains(&i).then_some(i as usize)
            }
            Position::Slot { name, first: true } => lookup(&format!("first {name}")).or_else(|| lookup(name)),
            Position::Slot { name, first: false } => lookup(name),
        }
    }
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
    /// `position` resolved in each of the variant's prompts (token index, in prompt order);
    /// empty when the run patches all positions.
    pub token_positions: Vec<usize>,
    /// Component label, e.g. `L9.H9`, `L3@S2`, `L3 w5`.
    pub label: String,
    /// Window size and centre layer, for sliding windows.
    pub window: Option<(usize, usize)>,
    /// A single-layer run added only to compute the summation baseline.
    pub baseline_only: bool,
    /// The target asks for the summation baseline of its windows.
    pub summation: bool,
    /// Patched exactly, or estimated by attribution patching.
    pub method: Method,
    /// Estimated targets: how many of the target's components of largest |estimate| are also
    /// patched exactly.
    pub verify: Option<usize>,
    /// Path targets: the receiver and what is frozen; the run's hooks are the sender's.
    pub path: Option<PathSpec>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Counts {
    pub clean_runs: u64,
    pub corrupted_runs: u64,
    pub patched_runs: u64,
    /// Patched runs estimated by attribution patching instead (no forward pass each).
    pub estimated_runs: u64,
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
                if let Some(first) = ps.first().filter(|p| p.method.is_estimate()) {
                    match first.method {
                        Method::AtpStar => write!(f, ", estimated by AtP* (GradDrop; its score is the effect's size)")?,
                        _ => write!(f, ", estimated by attribution patching")?,
                    }
                    if let Some(k) = first.verify {
                        write!(f, " (the top {k} by |estimate| also patched exactly)")?;
                    }
                }
                if let Some(path) = ps.first().and_then(|p| p.path.as_ref()) {
                    let frozen = match (path.freeze_heads, path.freeze_mlps) {
                        (true, true) => "other heads and MLPs",
                        (true, false) => "other heads",
                        (false, true) => "MLPs",
                        (false, false) => "nothing",
                    };
                    let passes = if path.receiver == Receiver::Logits { "one pass" } else { "two passes" };
                    write!(f, ", path patching to {} ({frozen} frozen; {passes} per sender)", path.receiver.label())?;
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
                "  forward passes: {} clean + {} corrupted + {} patched; naive one pass per patch: {}",
                v.counts.clean_runs, v.counts.corrupted_runs, v.counts.patched_runs, v.counts.naive_runs
            )?;
            if v.counts.estimated_runs > 0 {
                let graddrop = v.patches.iter().any(|p| p.method == Method::AtpStar);
                writeln!(
                    f,
                    "  estimated by attribution patching: {} patched runs, from one backward pass per base run and metric kind{}",
                    v.counts.estimated_runs,
                    if graddrop { " (AtP*: one per layer)" } else { "" }
                )?;
            }
        }
        let c = &self.counts;
        writeln!(
            f,
            "\ntotal forward passes: {} ({} clean + {} corrupted, each run once and cached; {} patched)",
            c.total(),
            c.clean_runs,
            c.corrupted_runs,
            c.patched_runs
        )?;
        match self.batch_size {
            Some(b) => {
                writeln!(f, "  patched passes per ONNX Runtime call: at most {b} (`batch`), within the memory budget")?
            }
            None => {
                writeln!(f, "  patched passes per ONNX Runtime call: as many as the memory budget (`--memory`) allows")?
            }
        }
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
                writeln!(f, "  {}", e.text)?;
            }
        }
        let outputs = [
            ("csv", &self.outputs.csv),
            ("per-prompt csv", &self.outputs.per_prompt),
            ("report", &self.outputs.report),
        ];
        for (kind, path) in outputs {
            if let Some(path) = path {
                writeln!(f, "{kind}: {}", path.display())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_resolve_to_token_indices() {
        let prompt = PlannedPrompt {
            clean_text: "a b c d".into(),
            clean_ids: vec![10, 11, 12, 13],
            corrupted: CorruptedPrompt::Ablation { source_prompt: None },
            answer: Answer::Token { text: " x".into(), id: 1 },
            wrong: None,
            positions: vec![("S".into(), 2), ("first S".into(), 1), ("IO".into(), 0), ("end".into(), 3)],
            first_changed_token: None,
            noise_streams: vec![],
        };
        let slot = |name: &str, first| Position::Slot { name: name.into(), first };
        let at = |p: Position| prompt.token_index(&p);
        assert_eq!((at(Position::End), at(Position::Index(1)), at(Position::Index(-1))), (Some(3), Some(1), Some(3)));
        assert_eq!((at(slot("S", false)), at(slot("S", true)), at(slot("IO", true))), (Some(2), Some(1), Some(0)));
        // Outside the prompt, or a label it does not have: no position, never token 0.
        assert_eq!((at(Position::Index(4)), at(Position::Index(-5)), at(slot("S2", false))), (None, None, None));
    }
}
