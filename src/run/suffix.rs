//! Suffix mode: a layer segment rewritten to compute only the positions from the first changed
//! one on. Causal attention leaves earlier positions as the base run had them, so their keys
//! and values come in as inputs (the base run's cached ones) and the queries, MLP and residual
//! stream cover the suffix only.

use std::collections::HashSet;

use crate::model::Dim;
use crate::onnx::proto::{data_type, ModelProto};
use crate::run::graph;

/// Unbatched axes of a hook that run over the computed positions only: every position axis,
/// except a key's or value's (all positions, the prefix included) and an attention pattern's
/// key axis.
pub(crate) fn suffix_axes(hook: &str, dims: &[Dim]) -> Vec<usize> {
    let positions: Vec<usize> = dims
        .iter()
        .filter(|d| !matches!(d, Dim::Symbolic(s) if s == "batch"))
        .enumerate()
        .filter(|(_, d)| matches!(d, Dim::Symbolic(_)))
        .map(|(i, _)| i)
        .collect();
    match hook.rsplit('.').next() {
        Some("hook_k" | "hook_v") => vec![],
        Some("hook_pattern") => positions.into_iter().take(1).collect(),
        _ => positions,
    }
}

/// Prefix key/value inputs of a suffix segment: every base run's keys or values
/// (`[bases, frame, kv_heads, d_head]`, the base run cache's), from which each row takes its
/// base run's ([`PREFIX_ROWS`]) at the frame positions [`PREFIX_START`]..[`PREFIX_END`].
pub fn prefix_input(hook: &str) -> String {
    format!("prefix.bases.{hook}")
}

/// The input (`[batch]`, int64) naming each row's base run among the prefix inputs' bases.
pub const PREFIX_ROWS: &str = "prefix.rows";
/// The inputs (`[1]`, int64) bounding the prefix positions in the bases' frame.
pub const PREFIX_START: &str = "prefix.start";
pub const PREFIX_END: &str = "prefix.end";

/// Turn layer `layer`'s segment (reading the residual stream `input`) into one that computes
/// only the last S positions, S = the length of `input`: queries, MLP and residual stream for
/// those positions, keys and values for all (the first ones from the [`prefix_input`]s, the
/// cached values of the base runs, unchanged there by causality, gathered on the device).
/// Returns false, leaving `model` as it was, when the graph is not laid out as `patchbay import`
/// builds it (attention bias from the `mask` scope, RoPE tables from the `rope` scope).
pub(crate) fn make_suffix(
    model: &mut ModelProto,
    manifest: &crate::model::Manifest,
    layer: usize,
    input: &str,
) -> bool {
    use crate::onnx::proto::NodeProto;
    let original = model.clone();
    let g = model.graph.as_mut().expect("segments have graphs");
    let tensor = |hook: &str| manifest.hooks.get(&format!("blocks.{layer}.attn.{hook}")).map(|h| h.tensor.clone());
    let (Some(q), Some(k), Some(v)) = (tensor("hook_q"), tensor("hook_k"), tensor("hook_v")) else { return false };
    // The scope of a tensor's producer: the builder names outputs `<scope>.<op>_<n>`.
    let scope_of: std::collections::HashMap<String, String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(|o| (o.clone(), n.output[0].split('.').next().unwrap_or("").to_string())))
        .collect();
    let node = |op: &str, inputs: &[&str], output: &str, attrs: Vec<crate::onnx::proto::AttributeProto>| NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: format!("patchbay:suffix:{output}"),
        op_type: op.into(),
        attribute: attrs,
        ..Default::default()
    };
    let mut added: Vec<NodeProto> = vec![
        node(
            "Shape",
            &[input],
            "suffix.len",
            vec![crate::onnx::writer::attr_int("start", 1), crate::onnx::writer::attr_int("end", 2)],
        ),
        node("Neg", &["suffix.len"], "suffix.start", vec![]),
    ];
    for (name, values) in [("suffix.end", vec![i64::MAX]), ("suffix.axis1", vec![1]), ("suffix.axis2", vec![2])] {
        g.initializer.push(crate::onnx::proto::TensorProto {
            dims: vec![1],
            data_type: data_type::INT64,
            name: name.into(),
            raw_data: values.iter().flat_map(|v: &i64| v.to_le_bytes()).collect(),
            ..Default::default()
        });
    }
    // Tensors downstream of q (the query path), to tell its RoPE from the keys'.
    let mut q_path: HashSet<String> = [q.clone()].into();
    for n in &g.node {
        if n.input.iter().any(|i| q_path.contains(i)) {
            q_path.extend(n.output.iter().cloned());
        }
    }
    let mut bias_slices = 0;
    let mut rope_slices = 0;
    let mut rope_tables = 0;
    let scopes: Vec<(usize, usize, String)> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.input.iter().enumerate().map(move |(j, x)| (i, j, x.clone())))
        .collect();
    for (i, j, x) in scopes {
        let consumer_scope = g.node[i].output[0].split('.').next().unwrap_or("").to_string();
        match scope_of.get(&x).map(String::as_str) {
            // The attention bias [batch, 1, q, k]: keep the last S query rows.
            Some("mask") if consumer_scope != "mask" => {
                let sliced = format!("{x}.suffix");
                added.push(node("Slice", &[&x, "suffix.start", "suffix.end", "suffix.axis2"], &sliced, vec![]));
                g.node[i].input[j] = sliced;
                bias_slices += 1;
            }
            // RoPE tables [batch, pos, 1, d_head]: the queries' rows are the last S.
            Some("rope") if consumer_scope != "rope" => {
                rope_tables += 1;
                if g.node[i].input.iter().any(|y| q_path.contains(y)) {
                    let sliced = format!("{x}.suffix");
                    added.push(node("Slice", &[&x, "suffix.start", "suffix.end", "suffix.axis1"], &sliced, vec![]));
                    g.node[i].input[j] = sliced;
                    rope_slices += 1;
                }
            }
            _ => {}
        }
    }
    // Keys and values: the prefix from the cache, then the computed suffix.
    for t in [&k, &v] {
        let Some(producer) = g.node.iter_mut().find(|n| n.output.iter().any(|o| o == t)) else { return false };
        let own = format!("{t}.suffix");
        producer.output.iter_mut().filter(|o| *o == t).for_each(|o| *o = own.clone());
        let bases = prefix_input(t);
        let dims = [
            Dim::Symbolic("bases".into()),
            Dim::Symbolic("frame".into()),
            Dim::Fixed(manifest.config.n_kv_heads),
            Dim::Fixed(manifest.config.d_head),
        ];
        g.input.push(crate::onnx::writer::value_info(&bases, data_type::FLOAT, &dims));
        let (picked, prefix) = (format!("{t}.picked"), format!("{t}.prefix"));
        added.push(node("Gather", &[&bases, PREFIX_ROWS], &picked, vec![crate::onnx::writer::attr_int("axis", 0)]));
        added.push(node("Slice", &[&picked, PREFIX_START, PREFIX_END, "suffix.axis1"], &prefix, vec![]));
        added.push(node("Concat", &[&prefix, &own], t, vec![crate::onnx::writer::attr_int("axis", 1)]));
    }
    g.input.push(crate::onnx::writer::value_info(PREFIX_ROWS, data_type::INT64, &[Dim::Symbolic("batch".into())]));
    for bound in [PREFIX_START, PREFIX_END] {
        g.input.push(crate::onnx::writer::value_info(bound, data_type::INT64, &[Dim::Fixed(1)]));
    }
    let rope_ok = rope_tables == 0 || rope_slices > 0;
    if bias_slices == 0 || !rope_ok {
        *model = original;
        return false;
    }
    g.node.extend(added);
    if graph::sort_topologically(g).is_err() {
        *model = original;
        return false;
    }
    true
}
