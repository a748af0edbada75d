//! Stage 3: typed [`Experiment`] -> execution [`Plan`].
//!
//! The sweep grid (dataset x corruption x direction) becomes variants; each variant lists its
//! prompts (token ids, corrupted inputs, answers, symbolic positions) and the patches to run
//! (hook, layers, head, position, label). Counts compare patchbay's strategy (clean and
//! corrupted runs once per prompt and noise sample, patches batched) with a naive one forward
//! pass per patch. Deterministic: the same experiment gives the same plan.

use crate::ir::experiment::*;
pub use crate::ir::plan::*;
use crate::model::EMBED_HOOK;

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
                    token_positions: vec![],
                    label: component_label(layers, *h, p.as_ref(), *window),
                    window: *window,
                    baseline_only: *baseline_only,
                    summation: t.summation,
                    method: t.method,
                    verify: t.verify,
                    path: t.path.clone(),
                });
            }
        }
    }
    out
}

/// How many estimated runs are also patched exactly: each estimated target's `verify top k`, at
/// most its components.
fn verified(patches: &[PatchRun]) -> u64 {
    let mut per_target: Vec<(&str, usize, usize)> = vec![];
    for p in patches.iter().filter(|p| p.method.is_estimate() && !p.baseline_only) {
        match per_target.iter_mut().find(|(t, ..)| *t == p.target) {
            Some((_, runs, _)) => *runs += 1,
            None => per_target.push((&p.target, 1, p.verify.unwrap_or(0))),
        }
    }
    per_target.iter().map(|&(_, runs, k)| runs.min(k) as u64).sum()
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
                let estimated = patches.iter().filter(|p| p.method.is_estimate()).count() as u64;
                // A path run's step three is a second pass (none for the logits as receiver).
                let second_passes =
                    patches.iter().filter(|p| p.path.as_ref().is_some_and(|x| x.receiver != Receiver::Logits)).count();
                counts.patched_runs =
                    reps * (patches.len() as u64 - estimated + verified(&patches) + second_passes as u64);
                counts.estimated_runs = reps * estimated;
                counts.layer_fraction_runs = patches
                    .iter()
                    .filter(|p| p.method == Method::Exact)
                    .map(|p| {
                        let first = p.layers.iter().min().copied().unwrap_or(0);
                        reps as f64 * (n_layers - first) as f64 / n_layers as f64
                    })
                    .sum();
                counts.naive_runs = reps * (patches.len() + second_passes) as u64
                    + exp.sweep.patches.len() as u64 * (n + if c.kind.is_ablation() { 0 } else { n * samples });
                total.patched_runs += counts.patched_runs;
                total.estimated_runs += counts.estimated_runs;
                total.layer_fraction_runs += counts.layer_fraction_runs;
                total.naive_runs += counts.naive_runs;
                cache_bytes = cache_bytes.max(cache_estimate(exp, ds, &patches, c, dir));
                let prompts: Vec<PlannedPrompt> = ds
                    .prompts
                    .iter()
                    .zip(corrupted)
                    .enumerate()
                    .map(|(i, (p, cp))| {
                        let mut positions: Vec<(String, usize)> = Vec::new();
                        for (name, s) in &p.slots {
                            positions.push((name.clone(), s.last));
                            if s.first != s.last {
                                positions.push((format!("first {name}"), s.first));
                            }
                        }
                        positions.push(("end".into(), p.ids.len().saturating_sub(1)));
                        let first_changed_token = match cp {
                            CorruptedPrompt::Tokens { ids, .. } => p.ids.iter().zip(ids).position(|(a, b)| a != b),
                            CorruptedPrompt::Noise { positions } => positions.iter().min().copied(),
                            CorruptedPrompt::Ablation { .. } => None,
                        };
                        PlannedPrompt {
                            clean_text: p.text.clone(),
                            clean_ids: p.ids.clone(),
                            corrupted: cp.clone(),
                            answer: p.answer.clone(),
                            wrong: p.wrong.clone(),
                            positions,
                            first_changed_token,
                            noise_streams: match cp {
                                CorruptedPrompt::Noise { .. } => (0..samples).map(|s| ((i as u64) << 32) | s).collect(),
                                _ => vec![],
                            },
                        }
                    })
                    .collect();
                let patches = resolved(&patches, &prompts);
                let shares_runs_with = variants
                    .iter()
                    .find(|v: &&Variant| v.dataset == ds.name && v.corruption == c.name)
                    .map(|v| v.label.clone());
                variants.push(Variant {
                    label: format!("{}/{}/{}", ds.name, c.name, dir.name()),
                    dataset: ds.name.clone(),
                    corruption: c.name.clone(),
                    corruption_kind: c.kind.clone(),
                    direction: dir,
                    prompts,
                    captures: captures(&patches, &c.kind, n_layers),
                    patches,
                    shares_runs_with,
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
    Plan {
        experiment: exp.name.clone(),
        model: exp.model.reference.clone(),
        model_dir: exp.model.dir.clone(),
        n_layers,
        device: exp.model.device,
        batch_size: exp.batch_size,
        variants,
        metrics,
        expectations: exp.expectations.clone(),
        outputs: exp.outputs.clone(),
        counts: total,
        cache_bytes,
    }
}

/// `patches` with their positions resolved in each of `prompts`.
fn resolved(patches: &[PatchRun], prompts: &[PlannedPrompt]) -> Vec<PatchRun> {
    let mut patches = patches.to_vec();
    for run in &mut patches {
        if let Some(pos) = &run.position {
            run.token_positions = prompts
                .iter()
                .map(|p| p.token_index(pos).expect("the checker resolved every position in every prompt"))
                .collect();
        }
    }
    patches
}

/// The hooks a variant's cached runs capture: every patched hook, the hooks path runs freeze and
/// receive at, and the embeddings when Gaussian noise perturbs them.
fn captures(patches: &[PatchRun], corruption: &CorruptionKind, n_layers: usize) -> Vec<String> {
    let mut hooks: Vec<String> = patches.iter().flat_map(|p| p.hooks.iter().cloned()).collect();
    hooks.extend(patches.iter().filter_map(|p| p.path.as_ref()).flat_map(|path| path.hooks(n_layers)));
    if matches!(corruption, CorruptionKind::Noise { .. }) {
        hooks.push(EMBED_HOOK.to_string());
    }
    hooks.sort();
    hooks.dedup();
    hooks
}

/// Activation cache of one variant: the source run's activations at every patched hook (and
/// every hook a path run freezes, reads or enters at), for every prompt (and noise sample when the source is the noised run), 4 bytes per value.
fn cache_estimate(exp: &Experiment, ds: &Dataset, patches: &[PatchRun], c: &Corruption, dir: Direction) -> u64 {
    let seq = ds.max_len() as u64;
    let n = ds.prompts.len() as u64;
    let copies = match (dir, &c.kind) {
        (Direction::Noise, CorruptionKind::Noise { samples, .. }) => *samples as u64,
        (_, CorruptionKind::Ablation { kind: AblationKind::Zero, .. }) => 0,
        (_, CorruptionKind::Ablation { kind: AblationKind::Mean, .. }) => 0,
        _ => 1,
    };
    let n_layers = exp.model.manifest.config.n_layers;
    let path_hooks: Vec<String> =
        patches.iter().filter_map(|p| p.path.as_ref()).flat_map(|path| path.hooks(n_layers)).collect();
    let mut hooks: Vec<&String> = patches.iter().flat_map(|p| p.hooks.iter()).chain(&path_hooks).collect();
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
