//! Patch targets: hooks, layers, heads, positions and windows, checked against the manifest.

use super::checker::Checker;
use super::error::{overflowed, CheckError};
use crate::diag::{did_you_mean, Diagnostic, Span};
use crate::ir::experiment::*;
use crate::model::{Dim, Manifest};
use crate::syntax::ast::{self, Estimator, Ident, PositionSel, SelItem, Selection, Spanned};

impl Checker<'_> {
    /// Resolve each patch target (against the datasets of the sweep, for positions).
    pub fn patches(&mut self) {
        let datasets: Vec<&Dataset> = self.sweep_datasets().map(|b| &b.dataset).collect();
        let manifest = self.model.as_ref().map(|m| &m.manifest);
        let (mut errors, mut warnings) = (Vec::new(), Vec::new());
        let patches = self
            .defs
            .patches
            .iter()
            .filter_map(|(p, _)| patch(p, manifest, &datasets, &mut errors, &mut warnings))
            .collect();
        self.patches = patches;
        self.errors.extend(errors);
        self.warnings.extend(warnings);
    }
}

/// How a hook name resolves against the manifest.
fn resolve_hook(h: &Ident, manifest: &Manifest) -> Result<(HookRef, Option<usize>), Box<CheckError>> {
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
                let n_layers = manifest.config.n_layers;
                return Err(Box::new(CheckError::layer_out_of_range(&h.span, l.parse().unwrap_or(0), n_layers)));
            }
        }
    }
    let tail = h.node.rsplit('.').next().unwrap_or(&h.node).to_string();
    let suggestion = did_you_mean(&h.node, cands.iter().map(|s| s.as_str()))
        .or_else(|| cands.iter().find(|c| c.ends_with(&tail)).map(|s| s.as_str()))
        .map(str::to_string);
    Err(Box::new(CheckError::UnknownHook {
        hook: h.node.clone(),
        model: manifest.name.clone(),
        hooks: cands,
        suggestion,
    }))
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
    err: impl Fn(&Span, i64) -> CheckError,
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
                    errors.push(CheckError::EmptyRange { start: a, end: b }.at(&it.span));
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
                        let span = if overflowed(x, &end) { &end } else { &it.span };
                        errors.push(err(span, x).at(span));
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
                let (position, dataset, slots) = (name.clone(), d.name.clone(), d.slots.clone());
                errors.push(CheckError::PositionNotASlot { position, dataset, slots }.at(&p.span));
                return;
            }
            ast::Position::Index(i) => {
                let n = d.min_len() as i64;
                if *i >= n || *i < -n {
                    let position =
                        if overflowed(*i, &p.span) { p.span.text().trim().to_string() } else { i.to_string() };
                    let error = CheckError::PositionOutOfRange { position, dataset: d.name.clone(), n_tokens: n };
                    errors.push(error.at(&p.span));
                    return;
                }
            }
            _ => {}
        }
    }
}

/// A patch target: its hooks resolved against the manifest, its layers, heads, positions and
/// windows checked.
fn patch(
    p: &ast::Patch,
    manifest: Option<&Manifest>,
    datasets: &[&Dataset],
    errors: &mut Vec<Diagnostic>,
    warnings: &mut Vec<Diagnostic>,
) -> Option<PatchTarget> {
    let n0 = errors.len();
    let positions = match &p.positions {
        None => PositionSelection::All,
        Some(s) => match &s.node {
            PositionSel::All => PositionSelection::All,
            PositionSel::Each => {
                for d in datasets {
                    if d.common_len().is_none() && !d.prompts.is_empty() {
                        let (dataset, min, max) = (d.name.clone(), d.min_len(), d.max_len());
                        errors.push(CheckError::PositionsEachUnequalLengths { dataset, min, max }.at(&s.span));
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
        },
    };
    if let (Some(s), None) = (&p.summation, &p.window) {
        errors.push(CheckError::SummationWithoutWindow.at(s));
    }
    let method = match &p.estimate {
        None => Method::Exact,
        Some(e) if e.node == Estimator::AtpStar => Method::AtpStar,
        Some(_) => Method::Attribution,
    };
    let verify = match (&p.verify, &p.estimate) {
        (None, _) => None,
        (Some(v), None) => {
            errors.push(CheckError::VerifyWithoutEstimate.at(&v.span));
            None
        }
        (Some(v), Some(_)) if v.node < 1 || v.node == i64::MAX => {
            // The clause's last word is the count as written (an overflow reads as i64::MAX).
            let count = v.span.text().split_whitespace().last().unwrap_or_default().to_string();
            errors.push(CheckError::VerifyCount { count }.at(&v.span));
            None
        }
        (Some(v), Some(_)) => Some(v.node as usize),
    };
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
                    errors.push(CheckError::DuplicateHook { hook: h.node.clone() }.at(&h.span));
                }
                hooks.push(r);
            }
            Err(e) => errors.push(e.at(&h.span)),
        }
    }
    if errors.len() > n0 {
        return None;
    }
    let layered = hooks.iter().filter(|h| matches!(h, HookRef::Layered(_))).count();
    if layered != 0 && layered != hooks.len() {
        errors.push(CheckError::MixedLayeredHooks.at(&p.hooks[0].span.to(&p.hooks[p.hooks.len() - 1].span)));
        return None;
    }
    fixed_layers.sort();
    fixed_layers.dedup();
    let layers = if layered == 0 {
        if let Some(l) = &p.layers {
            errors.push(CheckError::HookHasNoLayers { hook: hooks[0].short().to_string() }.at(&l.span));
        }
        None
    } else if !fixed_layers.is_empty() {
        if fixed_layers.len() > 1 || p.layers.is_some() {
            errors.push(CheckError::FixedLayer.at(&p.hooks[0].span));
        }
        Some(fixed_layers)
    } else {
        Some(match &p.layers {
            None => (0..nl).collect(),
            Some(sel) => expand_selection(sel, nl, |s, l| CheckError::layer_out_of_range(s, l, nl), errors),
        })
    };
    let heads = match &p.heads {
        None => None,
        Some(sel) => {
            let full = hooks[0].full_name(Some(0));
            match head_count(manifest, &full) {
                None => {
                    errors.push(CheckError::HookHasNoHeads { hook: hooks[0].short().to_string() }.at(&sel.span));
                    None
                }
                Some(nh) => {
                    for h in &hooks[1..] {
                        if head_count(manifest, &h.full_name(Some(0))) != Some(nh) {
                            let error = CheckError::MixedHeadCounts {
                                first: hooks[0].short().to_string(),
                                heads: nh,
                                other: h.short().to_string(),
                                other_heads: head_count(manifest, &h.full_name(Some(0))),
                            };
                            errors.push(error.at(&sel.span));
                        }
                    }
                    let hook = hooks[0].short().to_string();
                    let grouped_query = nh < manifest.config.n_heads;
                    let err = |s: &Span, h: i64| {
                        if overflowed(h, s) {
                            let literal = s.text().trim().to_string();
                            return CheckError::HeadNumberTooLarge { literal, hook: hook.clone(), n_heads: nh };
                        }
                        CheckError::HeadOutOfRange { head: h, hook: hook.clone(), n_heads: nh, grouped_query }
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
                errors.push(CheckError::WindowWithoutLayers.at(&ws.span));
            }
            let mut out = Vec::new();
            for w in &ws.node {
                if w.node < 1 || w.node as u64 > nl as u64 {
                    let window = w.span.text().trim().to_string();
                    errors.push(CheckError::WindowOutOfRange { window, n_layers: nl }.at(&w.span));
                } else if !out.contains(&(w.node as usize)) {
                    out.push(w.node as usize);
                }
            }
            Some(out)
        }
    };
    let path = p.path.as_ref().and_then(|spec| path(p, spec, &hooks, layers.as_deref(), manifest, errors, warnings));
    (errors.len() == n0).then(|| PatchTarget {
        name: p.name.node.clone(),
        hooks,
        layers,
        heads,
        positions,
        windows,
        summation: p.summation.is_some(),
        method: if p.path.is_some() { Method::Path } else { method },
        verify,
        path,
    })
}

/// A `path` statement's senders (the target's hooks and layers) and receiver.
fn path(
    p: &ast::Patch,
    spec: &ast::PathSpec,
    hooks: &[HookRef],
    layers: Option<&[usize]>,
    manifest: &Manifest,
    errors: &mut Vec<Diagnostic>,
    warnings: &mut Vec<Diagnostic>,
) -> Option<PathSpec> {
    let c = &manifest.config;
    let sender_ok = matches!(hooks, [HookRef::Layered(h)] if h == "attn.hook_z" || h == "hook_mlp_out");
    if !sender_ok {
        let hook = hooks.iter().map(|h| h.short().to_string()).collect::<Vec<_>>().join(", ");
        errors.push(CheckError::PathSender { hook }.at(&p.hooks[0].span));
        return None;
    }
    let span = &spec.receiver.span;
    let out_of_range =
        |reason: String| CheckError::PathReceiverOutOfRange { receiver: span.text().trim().to_string(), reason };
    let receiver = match &spec.receiver.node {
        ast::Receiver::Logits => Receiver::Logits,
        ast::Receiver::Resid(l) if (1..=c.n_layers as i64).contains(&l.node) => Receiver::Resid(l.node as usize),
        ast::Receiver::Resid(_) => {
            let reason = format!("the residual stream enters layers 1..={} (the last: the final stream)", c.n_layers);
            errors.push(out_of_range(reason).at(&spec.receiver.span));
            return None;
        }
        ast::Receiver::Heads { heads, input } => {
            let input = match input.node.as_str() {
                "q" => HeadInput::Q,
                "k" => HeadInput::K,
                _ => HeadInput::V,
            };
            let group = c.n_heads / c.n_kv_heads.max(1);
            let mut out = Vec::new();
            for h in heads {
                let (layer, head) = (h.node.layer, h.node.head);
                let reason = match head {
                    None => Some("a head receiver names a head, e.g. `L9.H3`".to_string()),
                    Some(_) if !(0..c.n_layers as i64).contains(&layer) => {
                        Some(format!("layer {layer} is out of range (0..{})", c.n_layers.saturating_sub(1)))
                    }
                    Some(m) if !(0..c.n_heads as i64).contains(&m) => {
                        Some(format!("head {m} is out of range (0..{})", c.n_heads.saturating_sub(1)))
                    }
                    Some(_) => None,
                };
                if let Some(reason) = reason {
                    errors.push(
                        CheckError::PathReceiverOutOfRange { receiver: h.span.text().trim().to_string(), reason }
                            .at(&h.span),
                    );
                    continue;
                }
                let (layer, head) = (layer as usize, head.unwrap_or(0) as usize);
                let head = match input {
                    HeadInput::Q => head,
                    _ if group > 1 => {
                        let kv_head = head / group;
                        let receiver = h.span.text().trim().to_string();
                        let query_heads = (kv_head * group..(kv_head + 1) * group).collect();
                        let note = CheckError::PathGroupedReceiver {
                            receiver,
                            input: input.name().into(),
                            kv_head,
                            query_heads,
                        };
                        warnings.push(note.at(&h.span));
                        kv_head
                    }
                    _ => head,
                };
                if !out.contains(&(layer, head)) {
                    out.push((layer, head));
                }
            }
            Receiver::Heads { input, heads: out, kv_heads: input != HeadInput::Q && group > 1 }
        }
    };
    let last_sender = layers.and_then(|l| l.iter().max().copied()).unwrap_or(0);
    let receiver_layer = receiver.layer(c.n_layers);
    if receiver_layer <= last_sender {
        let error = CheckError::PathReceiverNotAfterSender { receiver_layer, sender_layer: last_sender };
        errors.push(error.at(span));
        return None;
    }
    let freeze = spec.freeze.as_ref().map_or(ast::Freeze { heads: true, mlps: true }, |f| f.node);
    Some(PathSpec { receiver, freeze_heads: freeze.heads, freeze_mlps: freeze.mlps })
}
