//! Corruptions, patch targets and expectations.

use super::datasets::{slot_not_in_template, unknown};
use crate::diag::{did_you_mean, Diagnostic, Span};
use crate::ir::experiment::*;
use crate::model::{Dim, Manifest};
use crate::syntax::ast::{self, ExpectKind, Ident, PositionSel, SelItem, Selection, Spanned};

/// The dataset-independent part of a corruption, plus the slots it names (checked per dataset).
pub fn corruption(
    name: &Ident,
    kind: &ast::CorruptionKind,
    errors: &mut Vec<Diagnostic>,
) -> Option<(Corruption, Vec<Ident>)> {
    let n0 = errors.len();
    let nonneg = |s: &Option<Spanned<i64>>, errors: &mut Vec<Diagnostic>| -> u64 {
        match s {
            Some(v) if v.node < 0 || overflowed(v.node, &v.span) => {
                errors.push(super::datasets::seed_range(v));
                0
            }
            Some(v) => v.node as u64,
            None => 0,
        }
    };
    let (k, slots) = match kind {
        ast::CorruptionKind::Replace(reps) => {
            let mut slots = Vec::new();
            let mut out = Vec::new();
            for (s, w) in reps {
                slots.push(s.clone());
                let with = match w {
                    ast::ReplaceWith::Slot(o) => {
                        slots.push(o.clone());
                        Replacement::Slot(o.node.clone())
                    }
                    ast::ReplaceWith::Literal(l) => Replacement::Literal(l.node.clone()),
                };
                if out.iter().any(|(x, _): &(String, Replacement)| *x == s.node) {
                    errors.push(Diagnostic::error(
                        "patchbay::duplicate",
                        format!("slot `{}` is replaced twice", s.node),
                        &s.span,
                        "again here",
                    ).help("replace each slot once, e.g. `replace S2 with IO, S1 with \" John\"`; for another choice, define a second corruption"));
                }
                out.push((s.node.clone(), with));
            }
            (CorruptionKind::Replace(out), slots)
        }
        ast::CorruptionKind::Resample { slots, distinct, seed } => (
            CorruptionKind::Resample {
                slots: slots.iter().map(|s| s.node.clone()).collect(),
                distinct: *distinct,
                seed: nonneg(seed, errors),
            },
            slots.clone(),
        ),
        ast::CorruptionKind::Noise { slots, scale, samples, seed } => {
            let scale_v = match scale {
                Some(s) if !(s.node > 0.0 && s.node.is_finite()) => {
                    errors.push(number_range(s, "the noise scale must be a positive number", "not positive").help(
                        "the scale multiplies the standard deviation of the token embeddings: a positive number \
                         such as `scale 3` (the default; ROME uses 3)",
                    ));
                    3.0
                }
                Some(s) => s.node,
                None => 3.0,
            };
            let samples_v = match samples {
                Some(s) if !(1..=10_000).contains(&s.node) => {
                    errors.push(
                        Diagnostic::error(
                            "patchbay::range",
                            "samples must be between 1 and 10000",
                            &s.span,
                            "out of range",
                        )
                        .help("samples is the number of noise draws per prompt (default 10), e.g. `samples 10`"),
                    );
                    10
                }
                Some(s) => s.node as usize,
                None => 10,
            };
            (
                CorruptionKind::Noise {
                    slots: slots.iter().map(|s| s.node.clone()).collect(),
                    scale: scale_v,
                    samples: samples_v,
                    seed: nonneg(seed, errors),
                },
                slots.clone(),
            )
        }
        ast::CorruptionKind::Counterfactual => (CorruptionKind::Counterfactual, Vec::new()),
        ast::CorruptionKind::Ablation { kind, seed } => {
            let k = match kind.node.as_str() {
                "zero" => AblationKind::Zero,
                "mean" => AblationKind::Mean,
                "resample" => AblationKind::Resample,
                _ => {
                    errors.push(unknown("ablation", kind, ["zero", "mean", "resample"]));
                    return None;
                }
            };
            (CorruptionKind::Ablation { kind: k, seed: nonneg(seed, errors) }, Vec::new())
        }
    };
    (errors.len() == n0).then(|| (Corruption { name: name.node.clone(), kind: k }, slots))
}

/// How a hook name resolves against the manifest.
fn resolve_hook(h: &Ident, manifest: &Manifest) -> Result<(HookRef, Option<usize>), Box<Diagnostic>> {
    if manifest.hooks.contains_key(&h.node) {
        // A full name: a global hook, or one fixed layer.
        if let Some(rest) = h.node.strip_prefix("blocks.") {
            if let Some((l, short)) = rest.split_once('.') {
                if let Ok(l) = l.parse::<usize>() {
                    return Ok((HookRef::Layered(short.to_string()), Some(l)));
                }
            }
        }
        return Ok((HookRef::Global(h.node.clone()), None));
    }
    if manifest.hooks.contains_key(&format!("blocks.0.{}", h.node)) {
        return Ok((HookRef::Layered(h.node.clone()), None));
    }
    // Suggestions: short per-layer names and global names.
    let mut cands: Vec<String> = manifest
        .hooks
        .keys()
        .map(|k| match k.strip_prefix("blocks.") {
            Some(r) => r.split_once('.').map(|(_, s)| s.to_string()).unwrap_or_else(|| k.clone()),
            None => k.clone(),
        })
        .collect();
    cands.sort();
    cands.dedup();
    // A hook with a layer out of range: say so.
    if let Some(rest) = h.node.strip_prefix("blocks.") {
        if let Some((l, short)) = rest.split_once('.') {
            if cands.iter().any(|c| c == short) && l.parse::<usize>().is_ok() {
                return Err(Box::new(layer_out_of_range(&h.span, l.parse().unwrap_or(0), manifest.config.n_layers)));
            }
        }
    }
    let tail = h.node.rsplit('.').next().unwrap_or(&h.node).to_string();
    let suggestion = did_you_mean(&h.node, cands.iter().map(|s| s.as_str()))
        .or_else(|| cands.iter().find(|c| c.ends_with(&tail)).map(|s| s.as_str()));
    let d = Diagnostic::error(
        "patchbay::unknown_hook",
        format!("hook `{}` is not in the model's manifest", h.node),
        &h.span,
        "unknown hook",
    );
    Err(Box::new(match suggestion {
        Some(s) => d.help(format!("did you mean `{s}`? hooks of `{}`: {}", manifest.name, cands.join(", "))),
        None => d.help(format!("hooks of `{}`: {}", manifest.name, cands.join(", "))),
    }))
}

/// Whether an integer literal did not fit (the parser saturates it to i64::MIN/MAX).
pub fn overflowed(v: i64, span: &Span) -> bool {
    (v == i64::MAX || v == i64::MIN) && span.text().trim().parse::<i64>().is_err()
}

/// "`99999999999999999999` is too large for a layer/head number", with the valid range.
fn too_large(span: &Span, what: &str, n: usize, help: String) -> Diagnostic {
    Diagnostic::error(
        "patchbay::number_too_large",
        format!(
            "the {what} number `{}` is too large: valid {what}s are 0..{}",
            span.text().trim(),
            n.saturating_sub(1)
        ),
        span,
        "number too large",
    )
    .help(help)
}

fn layer_out_of_range(span: &Span, l: i64, n: usize) -> Diagnostic {
    if overflowed(l, span) {
        return too_large(
            span,
            "layer",
            n,
            format!(
                "the model has {n} layers, numbered 0..{}; write `layers 0..{}` or `layers all` for every layer",
                n.saturating_sub(1),
                n.saturating_sub(1)
            ),
        );
    }
    Diagnostic::error(
        "patchbay::layer_out_of_range",
        format!("layer {l} is out of range: the model has {n} layers (0..{})", n.saturating_sub(1)),
        span,
        "no such layer",
    )
    .help(format!(
        "layers are numbered from 0; write `layers 0..{}` or `layers all` for every layer",
        n.saturating_sub(1)
    ))
}

/// Heads of a hook's shape ([batch, pos, heads, d_head] or [batch, heads, q_pos, k_pos]).
fn head_count(manifest: &Manifest, full: &str) -> Option<usize> {
    let shape = &manifest.hooks.get(full)?.shape;
    if shape.len() != 4 {
        return None;
    }
    match (&shape[1], &shape[2]) {
        (Dim::Symbolic(_), Dim::Fixed(n)) => Some(*n),
        (Dim::Fixed(n), _) => Some(*n),
        _ => None,
    }
}

fn expand_selection(
    sel: &Spanned<Selection>,
    n: usize,
    err: impl Fn(&Span, i64) -> Diagnostic,
    errors: &mut Vec<Diagnostic>,
) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    match &sel.node {
        Selection::All => out.extend(0..n),
        Selection::Items(items) => {
            for it in items {
                let (a, b) = match it.node {
                    SelItem::One(x) => (x, x),
                    SelItem::Range(a, b) => (a, b),
                };
                if a > b {
                    errors.push(
                        Diagnostic::error(
                            "patchbay::empty_range",
                            format!("the range {a}..{b} is empty"),
                            &it.span,
                            "start is after end",
                        )
                        .help(format!("ranges are inclusive and ascending: write {b}..{a}")),
                    );
                    continue;
                }
                // The literal of each end, for a precise span on a number that is too large.
                let ends: Vec<Span> = match it.node {
                    SelItem::Range(..) => match it.span.text().find("..") {
                        Some(i) => vec![
                            Span::new(&it.span.file, it.span.range.start..it.span.range.start + i),
                            Span::new(&it.span.file, it.span.range.start + i + 2..it.span.range.end),
                        ],
                        None => vec![it.span.clone(), it.span.clone()],
                    },
                    SelItem::One(_) => vec![it.span.clone(), it.span.clone()],
                };
                let trimmed = |s: &Span| {
                    let t = s.text();
                    let lead = t.len() - t.trim_start().len();
                    Span::new(&s.file, s.range.start + lead..s.range.start + lead + t.trim().len())
                };
                for (k, x) in [a, b].into_iter().enumerate() {
                    if k == 1 && a == b && matches!(it.node, SelItem::One(_)) {
                        break;
                    }
                    if x < 0 || x as u64 >= n as u64 {
                        let end = trimmed(&ends[k]);
                        errors.push(err(if overflowed(x, &end) { &end } else { &it.span }, x));
                    }
                }
                if a >= 0 && (b as u64) < n as u64 {
                    for x in a..=b {
                        if !out.contains(&(x as usize)) {
                            out.push(x as usize);
                        }
                    }
                }
            }
        }
    }
    out
}

fn check_position(p: &Spanned<ast::Position>, datasets: &[&Dataset], errors: &mut Vec<Diagnostic>) {
    for d in datasets {
        match &p.node {
            ast::Position::Slot { name, .. } if !d.slots.contains(name) => {
                let mut diag = slot_not_in_template(name, &p.span, d.slots.iter().map(|s| s.as_str()));
                diag.message = format!("position `{name}` is not a slot of dataset `{}`", d.name);
                diag.help = Some(format!(
                    "{} positions are slot names, `end`, or token indices (negative from the end)",
                    diag.help.clone().unwrap_or_default()
                ));
                errors.push(diag);
                return;
            }
            ast::Position::Index(i) => {
                let n = d.min_len() as i64;
                if *i >= n || *i < -n {
                    errors.push(
                        Diagnostic::error(
                            "patchbay::position_out_of_range",
                            format!(
                                "position {} is outside the shortest prompt of `{}` ({n} tokens)",
                                if overflowed(*i, &p.span) { p.span.text().trim().to_string() } else { i.to_string() },
                                d.name
                            ),
                            &p.span,
                            "no such token",
                        )
                        .help(format!("indices run 0..{} (or -{n}..-1 from the end)", n - 1)),
                    );
                    return;
                }
            }
            _ => {}
        }
    }
}

pub fn patch(
    p: &ast::Patch,
    manifest: Option<&Manifest>,
    datasets: &[&Dataset],
    errors: &mut Vec<Diagnostic>,
) -> Option<PatchTarget> {
    let n0 = errors.len();
    let positions = match &p.positions {
        None => PositionSelection::All,
        Some(s) => {
            match &s.node {
                PositionSel::All => PositionSelection::All,
                PositionSel::Each => {
                    for d in datasets {
                        if d.common_len().is_none() && !d.prompts.is_empty() {
                            errors.push(
                            Diagnostic::error(
                                "patchbay::unequal_lengths",
                                format!("`positions each` needs prompts of one token count; `{}` has {}..{}", d.name, d.min_len(), d.max_len()),
                                &s.span,
                                "one patch per token index",
                            )
                            .help("name the positions instead (slot names, `end`), which work for prompts of any length"),
                        );
                        }
                    }
                    PositionSelection::Each
                }
                PositionSel::List(list) => {
                    for q in list {
                        check_position(q, datasets, errors);
                    }
                    PositionSelection::List(list.iter().map(|q| Position::from(&q.node)).collect())
                }
            }
        }
    };
    if let (Some(s), None) = (&p.summation, &p.window) {
        errors.push(
            Diagnostic::error(
                "patchbay::summation_without_window",
                "the summation baseline compares against sliding windows",
                s,
                "no `window` here",
            )
            .help("add `window [3, 5]` to this patch"),
        );
    }
    let manifest = manifest?;
    let nl = manifest.config.n_layers;
    let mut hooks = Vec::new();
    let mut fixed_layers: Vec<usize> = Vec::new();
    for h in &p.hooks {
        match resolve_hook(h, manifest) {
            Ok((r, fixed)) => {
                if let Some(l) = fixed {
                    fixed_layers.push(l);
                }
                if hooks.contains(&r) {
                    errors.push(
                        Diagnostic::error(
                            "patchbay::duplicate",
                            format!("hook `{}` is listed twice", h.node),
                            &h.span,
                            "again here",
                        )
                        .help("list each hook once in `{...}`"),
                    );
                }
                hooks.push(r);
            }
            Err(d) => errors.push(*d),
        }
    }
    if errors.len() > n0 {
        return None;
    }
    let layered = hooks.iter().filter(|h| matches!(h, HookRef::Layered(_))).count();
    if layered != 0 && layered != hooks.len() {
        errors.push(
            Diagnostic::error(
                "patchbay::mixed_hooks",
                "hooks patched jointly must all have layers, or none",
                &p.hooks[0].span.to(&p.hooks[p.hooks.len() - 1].span),
                "mixed",
            )
            .help(
                "a layer-less hook (`hook_embed`) cannot be patched jointly with per-layer hooks: give it its own \
                 target, e.g. `patch emb = hook_embed` and `patch joint = {hook_attn_out, hook_mlp_out}`",
            ),
        );
        return None;
    }
    fixed_layers.sort();
    fixed_layers.dedup();
    let layers = if layered == 0 {
        if let Some(l) = &p.layers {
            errors.push(
                Diagnostic::error(
                    "patchbay::no_layers",
                    format!("hook `{}` has no layers", hooks[0].short()),
                    &l.span,
                    "not selectable",
                )
                .help("drop `layers` for this hook"),
            );
        }
        None
    } else if !fixed_layers.is_empty() {
        if fixed_layers.len() > 1 || p.layers.is_some() {
            errors.push(
                Diagnostic::error(
                    "patchbay::fixed_layer",
                    "a hook written with its layer (`blocks.3.hook_mlp_out`) fixes the layer",
                    &p.hooks[0].span,
                    "layer given in the name",
                )
                .help("write the short hook name (`hook_mlp_out`) with `layers ...`"),
            );
        }
        Some(fixed_layers)
    } else {
        Some(match &p.layers {
            None => (0..nl).collect(),
            Some(sel) => expand_selection(sel, nl, |s, l| layer_out_of_range(s, l, nl), errors),
        })
    };
    let heads = match &p.heads {
        None => None,
        Some(sel) => {
            let full = hooks[0].full_name(Some(0));
            match head_count(manifest, &full) {
                None => {
                    errors.push(
                        Diagnostic::error(
                            "patchbay::no_heads",
                            format!("hook `{}` has no head axis", hooks[0].short()),
                            &sel.span,
                            "no heads to select",
                        )
                        .help("per-head hooks: attn.hook_z, attn.hook_q, attn.hook_k, attn.hook_v, attn.hook_pattern"),
                    );
                    None
                }
                Some(nh) => {
                    for h in &hooks[1..] {
                        if head_count(manifest, &h.full_name(Some(0))) != Some(nh) {
                            errors.push(
                                Diagnostic::error(
                                    "patchbay::mixed_hooks",
                                    format!(
                                        "hooks patched jointly per head must have the same heads: `{}` has {nh}, `{}` has {}",
                                        hooks[0].short(),
                                        h.short(),
                                        head_count(manifest, &h.full_name(Some(0)))
                                            .map(|n| n.to_string())
                                            .unwrap_or_else(|| "no head axis".into())
                                    ),
                                    &sel.span,
                                    "heads",
                                )
                                .help(
                                    "patch such hooks in separate targets (`hook_k`/`hook_v` have n_kv_heads heads, \
                                     `hook_q`/`hook_z` have n_heads), or drop `heads` to patch all heads together",
                                ),
                            );
                        }
                    }
                    let err = |s: &Span, h: i64| {
                        if overflowed(h, s) {
                            return too_large(
                                s,
                                "head",
                                nh,
                                format!(
                                    "`{}` has {nh} heads, numbered 0..{}; write `heads all` for all of them",
                                    hooks[0].short(),
                                    nh - 1
                                ),
                            );
                        }
                        Diagnostic::error(
                            "patchbay::head_out_of_range",
                            format!("head {h} is out of range: `{}` has {nh} heads (0..{})", hooks[0].short(), nh - 1),
                            s,
                            "no such head",
                        )
                        .help(if nh < manifest.config.n_heads {
                            "keys and values have fewer heads than queries (grouped-query attention)".to_string()
                        } else {
                            format!("heads are numbered from 0; write `heads all` for all {nh}")
                        })
                    };
                    Some(expand_selection(sel, nh, err, errors))
                }
            }
        }
    };
    let windows = match &p.window {
        None => None,
        Some(ws) => {
            if layers.is_none() {
                errors.push(
                    Diagnostic::error(
                        "patchbay::no_layers",
                        "a sliding window needs a hook with layers",
                        &ws.span,
                        "window",
                    )
                    .help("drop `window` for a layer-less hook, or patch a per-layer hook such as `hook_mlp_out`"),
                );
            }
            let mut out = Vec::new();
            for w in &ws.node {
                if w.node < 1 || w.node as u64 > nl as u64 {
                    errors.push(
                        Diagnostic::error(
                            "patchbay::range",
                            format!("window {} is out of range: windows span 1..{nl} layers", w.span.text().trim()),
                            &w.span,
                            "bad window",
                        )
                        .help(format!(
                            "a window is a number of layers from 1 to {nl}, e.g. `window [1, 3, 5]`; w = 1 is single-layer patching"
                        )),
                    );
                } else if !out.contains(&(w.node as usize)) {
                    out.push(w.node as usize);
                }
            }
            Some(out)
        }
    };
    (errors.len() == n0).then(|| PatchTarget {
        name: p.name.node.clone(),
        hooks,
        layers,
        heads,
        positions,
        windows,
        summation: p.summation.is_some(),
    })
}

pub struct ExpectCtx<'a> {
    pub patch_asts: &'a [&'a ast::Patch],
    pub patches: &'a [PatchTarget],
    pub metric_names: &'a [String],
    pub computed: &'a [String],
    pub metric_axis: Option<&'a Span>,
    pub sweep: &'a Sweep,
    pub manifest: Option<&'a Manifest>,
}

pub fn expectation(
    e: &ast::Expect,
    span: &Span,
    ctx: &ExpectCtx,
    errors: &mut Vec<Diagnostic>,
) -> Option<ExpectationKind2> {
    let n0 = errors.len();
    let (target, metric) = match &e.kind {
        ExpectKind::Detected { target, metric, .. }
        | ExpectKind::Top { target, metric, .. }
        | ExpectKind::Effect { target, metric, .. } => (target, metric),
    };
    let patch_names: Vec<&str> = ctx.patch_asts.iter().map(|p| p.name.node.as_str()).collect();
    if !patch_names.contains(&target.node.as_str()) {
        errors.push(unknown("patch", target, patch_names.iter().copied()));
    } else if !ctx.sweep.patches.contains(&target.node) {
        errors.push(
            Diagnostic::error(
                "patchbay::not_computed",
                format!("patch `{}` is not run by the sweep", target.node),
                &target.span,
                "not in the sweep",
            )
            .help("add it to the sweep's `patch: [...]` axis"),
        );
    }
    if !ctx.metric_names.contains(&metric.node) {
        errors.push(unknown("metric", metric, ctx.metric_names.iter().map(|s| s.as_str())));
    } else if !ctx.computed.contains(&metric.node) {
        let mut d = Diagnostic::error(
            "patchbay::metric_not_computed",
            format!("the expectation reads metric `{}`, which the sweep does not compute", metric.node),
            &metric.span,
            "not computed",
        )
        .help(format!(
            "add `{}` to the sweep's metric list: metric: [{}, {}]",
            metric.node,
            ctx.computed.join(", "),
            metric.node
        ));
        if let Some(a) = ctx.metric_axis {
            d = d.with_label(a, "the sweep computes only these");
        }
        errors.push(d);
    }
    let target_t = ctx.patches.iter().find(|p| p.name == target.node);
    let comp = |c: &Spanned<ast::Component>, errors: &mut Vec<Diagnostic>| -> Option<ComponentRef> {
        let t = target_t?;
        let mut ok = true;
        if let (Some(m), Some(layers)) = (ctx.manifest, &t.layers) {
            if c.node.layer < 0 || c.node.layer as u64 >= m.config.n_layers as u64 {
                errors.push(layer_out_of_range(&c.span, c.node.layer, m.config.n_layers));
                ok = false;
            } else if !layers.contains(&(c.node.layer as usize)) {
                errors.push(
                    Diagnostic::error(
                        "patchbay::not_patched",
                        format!("`{}` does not patch layer {}", t.name, c.node.layer),
                        &c.span,
                        "not a patched component",
                    )
                    .help(format!("`{}` patches layers {}", t.name, compact(layers))),
                );
                ok = false;
            }
        }
        match (c.node.head, &t.heads) {
            (Some(h), Some(hs)) if !hs.contains(&(h.max(0) as usize)) || h < 0 => {
                errors.push(
                    Diagnostic::error(
                        "patchbay::head_out_of_range",
                        format!("`{}` does not patch head {h}", t.name),
                        &c.span,
                        "no such head",
                    )
                    .help(format!("`{}` patches heads {}", t.name, compact(hs))),
                );
                ok = false;
            }
            (Some(_), None) => {
                errors.push(
                    Diagnostic::error(
                        "patchbay::no_heads",
                        format!("`{}` is not patched per head", t.name),
                        &c.span,
                        "has a head",
                    )
                    .help("write the component without `.H`, or add `heads all` to the patch"),
                );
                ok = false;
            }
            (None, Some(_)) => {
                errors.push(
                    Diagnostic::error(
                        "patchbay::needs_head",
                        format!("`{}` is patched per head: name the head", t.name),
                        &c.span,
                        "no head",
                    )
                    .help(format!("e.g. `L{}.H0`", c.node.layer)),
                );
                ok = false;
            }
            _ => {}
        }
        if let Some(p) = &c.node.position {
            let fine = match &t.positions {
                PositionSelection::List(l) => l.contains(&Position::from(p)),
                PositionSelection::Each => matches!(p, ast::Position::Index(_)),
                PositionSelection::All => false,
            };
            if !fine {
                errors.push(
                    Diagnostic::error(
                        "patchbay::not_patched",
                        format!("`{}` does not patch position `{}`", t.name, position_label(&p.into())),
                        &c.span,
                        "position",
                    )
                    .help("name one of the patch's `positions`, or drop `@ ...` when positions are patched together"),
                );
                ok = false;
            }
        } else if matches!(t.positions, PositionSelection::List(_) | PositionSelection::Each) {
            errors.push(
                Diagnostic::error(
                    "patchbay::needs_position",
                    format!("`{}` is patched per position: name one", t.name),
                    &c.span,
                    "no position",
                )
                .help(format!("e.g. `L{} @ end`", c.node.layer)),
            );
            ok = false;
        }
        ok.then(|| ComponentRef {
            layer: c.node.layer.max(0) as usize,
            head: c.node.head.map(|h| h as usize),
            position: c.node.position.as_ref().map(Position::from),
        })
    };
    let kind = match &e.kind {
        ExpectKind::Detected { sd, includes, components, .. } => {
            let sdv = match sd {
                Some(s) if !(s.node > 0.0 && s.node.is_finite()) => {
                    errors.push(number_range(s, "the detection threshold must be positive", "not positive").help(
                        "the threshold is a number of standard deviations above 0, e.g. `beyond 2 sd` (the default)",
                    ));
                    2.0
                }
                Some(s) => s.node,
                None => 2.0,
            };
            let cs: Vec<_> = components.iter().filter_map(|c| comp(c, errors)).collect();
            ExpectationKind::Detected {
                target: target.node.clone(),
                metric: metric.node.clone(),
                sd: sdv,
                includes: *includes,
                components: cs,
            }
        }
        ExpectKind::Top { k, includes, components, .. } => {
            if k.node < 1 {
                errors.push(
                    Diagnostic::error("patchbay::range", "top k needs k >= 1", &k.span, "k")
                        .help("k is how many of the patch's components rank highest by effect, e.g. `expect top 3 heads by ld includes L9.H9`"),
                );
            } else if let Some(n) = target_t.and_then(|t| component_count(t, e)) {
                if k.node as u64 > n as u64 {
                    let shown =
                        if overflowed(k.node, &k.span) { k.span.text().trim().to_string() } else { k.node.to_string() };
                    errors.push(
                        Diagnostic::error(
                            "patchbay::range",
                            format!("top {shown}, but patch `{}` has only {n} component(s) to rank", target.node),
                            &k.span,
                            format!("more than {n}"),
                        )
                        .with_label(&target.span, format!("{n} component(s) per variant"))
                        .help(format!(
                            "k must be between 1 and {n}; e.g. `expect top {} {} by ...`",
                            n.clamp(1, 3),
                            target.node
                        )),
                    );
                }
            }
            let cs: Vec<_> = components.iter().filter_map(|c| comp(c, errors)).collect();
            ExpectationKind::Top {
                k: k.node.max(1) as usize,
                target: target.node.clone(),
                metric: metric.node.clone(),
                includes: *includes,
                components: cs,
            }
        }
        ExpectKind::Effect { component, op, value, .. } => {
            if !value.node.is_finite() {
                errors.push(
                    number_range(value, "the effect threshold is not a finite number", "out of range").help(
                        "compare the effect with an ordinary number, e.g. `expect effect mlp L3 @ end by ld > 0.2`",
                    ),
                );
            }
            let c = comp(component, errors);
            ExpectationKind::Effect {
                target: target.node.clone(),
                component: c.unwrap_or(ComponentRef { layer: 0, head: None, position: None }),
                metric: metric.node.clone(),
                op: op.node.into(),
                value: value.node,
            }
        }
    };
    let mut when = Vec::new();
    for (axis, v) in &e.when {
        let allowed: Vec<String> = match axis.node.as_str() {
            "dataset" => ctx.sweep.datasets.clone(),
            "corruption" => ctx.sweep.corruptions.clone(),
            "direction" => ctx.sweep.directions.iter().map(|d| d.name().to_string()).collect(),
            "window" => {
                let ws: Vec<String> = target_t
                    .and_then(|t| t.windows.clone())
                    .unwrap_or_default()
                    .iter()
                    .map(|w| w.to_string())
                    .collect();
                ws
            }
            _ => {
                errors.push(unknown("variant axis", axis, ["dataset", "corruption", "direction", "window"]));
                continue;
            }
        };
        if !allowed.contains(&v.node) {
            let d = Diagnostic::error(
                "patchbay::not_computed",
                format!("no variant has {} = {}", axis.node, v.node),
                &v.span,
                "not in the sweep",
            );
            errors.push(match did_you_mean(&v.node, allowed.iter().map(|s| s.as_str())) {
                Some(s) => d.help(format!("did you mean `{s}`?")),
                None => d.help(format!("the sweep has {}: {}", axis.node, allowed.join(", "))),
            });
            continue;
        }
        when.push((axis.node.clone(), v.node.clone()));
    }
    (errors.len() == n0).then(|| Expectation {
        text: span.text().split_whitespace().collect::<Vec<_>>().join(" "),
        line: span.line(),
        kind,
        when,
    })
}

pub type ExpectationKind2 = Expectation;

/// A range error on a decimal number; a literal too large for a number (`1e400`) says so.
fn number_range(v: &Spanned<f64>, message: &str, label: &str) -> Diagnostic {
    if v.node.is_infinite() {
        Diagnostic::error(
            "patchbay::number_too_large",
            format!("the number `{}` is out of range (too large for a 64-bit float)", v.span.text().trim()),
            &v.span,
            "too large",
        )
    } else {
        Diagnostic::error("patchbay::range", message, &v.span, label)
    }
}

/// How many components a `top k` expectation ranks in one variant: the runs of the patch, per
/// window when `when window = w` names one. None when it depends on the prompts (`positions each`).
fn component_count(t: &PatchTarget, e: &ast::Expect) -> Option<usize> {
    let positions = match &t.positions {
        PositionSelection::All => 1,
        PositionSelection::List(l) => l.len(),
        PositionSelection::Each => return None,
    };
    let heads = t.heads.as_ref().map(|h| h.len()).unwrap_or(1);
    let layers = t.layers.as_ref().map(|l| l.len()).unwrap_or(1);
    let windows = match &t.windows {
        Some(ws) if !e.when.iter().any(|(a, _)| a.node == "window") => ws.len(),
        _ => 1,
    };
    Some(positions * heads * layers * windows)
}
